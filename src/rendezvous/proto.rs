//! Rendezvous wire messages: one request per bidirectional QUIC stream, one response.
//!
//! Flow on a connection (ALPN `sotto-rendezvous/1`):
//! 1. `Hello` → `Challenge` (32 random bytes, fixed for the connection).
//! 2. `Register` | `Login` | `Authenticate`, each with an identity proof over the
//!    challenge and this TLS session's exporter value (see [`super::auth`]).
//! 3. `Publish`, `Withdraw`, `Lookup`, `ListOnline`, in any number.
//!
//! Each direction has its own enum with an `Unknown` variant for what a newer peer may
//! send; new variants are only ever appended.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::keys::{IdentityKey, NoiseBinding};
use crate::presence::SignedPresence;
use crate::username::Username;
use crate::wire::Message;

pub const ALPN: &[u8] = b"sotto-rendezvous/1";
/// Largest request or response payload, checked before allocation. Room for the
/// longest list: 500 usernames of 32 bytes.
pub const MAX_FRAME: usize = 32 * 1024;
/// Longest password accepted, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 256;
/// Shortest password accepted at registration, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Most usernames one `Online` answer carries, and one `Watch` may name.
pub const MAX_ONLINE_LIST: usize = 500;

/// What a client proves it holds when it registers or logs in.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub username: Username,
    pub password: String,
    pub identity_key: IdentityKey,
    pub noise: NoiseBinding,
    #[serde(with = "crate::wire::bytes64")]
    pub proof: [u8; 64],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Hello,
    Register(Credentials),
    Login(Credentials),
    Authenticate {
        username: Username,
        identity_key: IdentityKey,
        #[serde(with = "crate::wire::bytes64")]
        proof: [u8; 64],
    },
    Publish(SignedPresence),
    Withdraw,
    Lookup {
        username: Username,
    },
    ListOnline,
    /// Keeps the stream open: the node answers `Watching`, then sends
    /// `PresenceChanged` whenever one of `usernames` comes online or goes offline.
    Watch {
        #[serde(with = "name_list")]
        usernames: Vec<Username>,
    },
    #[serde(other)]
    Unknown,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("identity_key", &self.identity_key).finish_non_exhaustive()
    }
}

impl Drop for Credentials {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.password);
    }
}

impl Message for Request {
    fn is_unknown(&self) -> bool {
        matches!(self, Request::Unknown)
    }
}

/// A user's account as any signed-in user may see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    pub username: Username,
    pub identity_key: IdentityKey,
    pub noise: NoiseBinding,
    /// The latest unexpired signed presence record, if the user is online.
    pub presence: Option<SignedPresence>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Challenge {
        challenge: [u8; 32],
        server_time: u64,
        max_ttl: u64,
        max_skew: u64,
    },
    Registered,
    LoggedIn {
        key_changed: bool,
    },
    Authenticated,
    Published {
        observed: SocketAddr,
    },
    Withdrawn,
    Account(AccountInfo),
    Online {
        #[serde(with = "name_list")]
        usernames: Vec<Username>,
        truncated: bool,
    },
    Refused(Refusal),
    /// The watched users online now (also sent again if the node skipped changes).
    Watching {
        #[serde(with = "name_list")]
        online: Vec<Username>,
    },
    PresenceChanged {
        username: Username,
        online: bool,
    },
    #[serde(other)]
    Unknown,
}

impl Message for Response {
    fn is_unknown(&self) -> bool {
        matches!(self, Response::Unknown)
    }
}

/// Why the node refused a request. Coarse on purpose; the node's log has detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the node could not read the request")]
    Malformed,
    #[error("the node does not know this request (is it older than this client?)")]
    UnknownRequest,
    #[error("the connection must start with Hello")]
    NeedHello,
    #[error("sign in first")]
    NotAuthenticated,
    #[error("unknown user or wrong password")]
    InvalidCredentials,
    #[error("that username is taken")]
    UsernameTaken,
    #[error("the password must be 8 to 256 bytes long")]
    WeakPassword,
    #[error("the identity proof does not verify")]
    BadProof,
    #[error("too many failed attempts; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the node is busy; retry shortly")]
    Busy,
    #[error("the presence record is not valid for this account")]
    BadRecord,
    #[error("the presence record is not newer than the last one (replayed?)")]
    StaleRecord,
    #[error("the presence record's time is off; check this machine's clock")]
    ClockSkew,
    #[error("the presence record has expired")]
    RecordExpired,
    #[error("the presence record asks to live longer than the node allows")]
    TtlTooLong,
    #[error("no such user")]
    NotFound,
    #[error("this account's identity key changed; log in again with `sotto login`")]
    KeyChanged,
    #[error("the node failed internally")]
    Internal,
    #[serde(other)]
    #[error("the node refused the request for a reason this client does not know")]
    Unknown,
}

/// Serde for the username lists (`Watch`, `Online`, `Watching`): at most
/// [`MAX_ONLINE_LIST`] names. A longer list does not decode, and decoding reserves room
/// for no more names than that, whatever count the sender claims; left to serde, a count
/// would reserve 24 bytes for every byte left in the frame. The encoding is a plain list.
mod name_list {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::{Serialize, Serializer};

    use super::MAX_ONLINE_LIST;
    use crate::username::Username;

    pub fn serialize<S: Serializer>(names: &[Username], s: S) -> Result<S::Ok, S::Error> {
        names.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Username>, D::Error> {
        struct Names;
        impl<'de> Visitor<'de> for Names {
            type Value = Vec<Username>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "at most {MAX_ONLINE_LIST} usernames")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Username>, A::Error> {
                let mut names = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_ONLINE_LIST));
                while let Some(name) = seq.next_element()? {
                    if names.len() == MAX_ONLINE_LIST {
                        return Err(A::Error::invalid_length(MAX_ONLINE_LIST + 1, &self));
                    }
                    names.push(name);
                }
                Ok(names)
            }
        }
        d.deserialize_seq(Names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_message, encode_message};

    #[test]
    fn requests_round_trip() {
        let username = Username::parse("alice").unwrap();
        for req in [
            Request::Hello,
            Request::Withdraw,
            Request::ListOnline,
            Request::Lookup { username: username.clone() },
            Request::Authenticate { username, identity_key: crate::keys::IdentitySecret::from_seed(&[1; 32]).public(), proof: [9; 64] },
        ] {
            assert_eq!(decode_message::<Request>(&encode_message(&req)), Ok(req));
        }
    }

    #[test]
    fn pinned_bytes() {
        assert_eq!(encode_message(&Request::Hello), [1, 0]);
        assert_eq!(encode_message(&Request::ListOnline), [1, 7]);
        assert_eq!(encode_message(&Response::Refused(Refusal::RateLimited { retry_after_secs: 30 })), [1, 8, 8, 30]);
    }

    #[test]
    fn name_lists_are_capped_when_decoded() {
        let names: Vec<Username> = (0..=MAX_ONLINE_LIST).map(|i| Username::parse(&format!("u{i:03}")).unwrap()).collect();
        let most = Request::Watch { usernames: names[..MAX_ONLINE_LIST].to_vec() };
        assert_eq!(decode_message::<Request>(&encode_message(&most)), Ok(most));
        let over = encode_message(&Request::Watch { usernames: names.clone() });
        assert_eq!(decode_message::<Request>(&over), Err(crate::wire::WireError::Malformed));
        let over = encode_message(&Response::Online { usernames: names.clone(), truncated: false });
        assert_eq!(decode_message::<Response>(&over), Err(crate::wire::WireError::Malformed));
        let over = encode_message(&Response::Watching { online: names });
        assert_eq!(decode_message::<Response>(&over), Err(crate::wire::WireError::Malformed));
    }

    #[test]
    fn unknown_tags_take_the_unknown_path() {
        assert_eq!(decode_message::<Request>(&[1, 99, 1, 2, 3]), Ok(Request::Unknown));
        assert_eq!(decode_message::<Response>(&[1, 99]), Ok(Response::Unknown));
        assert_eq!(decode_message::<Response>(&[1, 8, 77]), Ok(Response::Refused(Refusal::Unknown)));
    }
}
