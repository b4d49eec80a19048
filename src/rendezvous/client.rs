//! Client of a rendezvous node: connect with the pinned certificate, say Hello, prove
//! the identity key, then publish, look up and list.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::auth::{self, Binding, Purpose};
use super::proto::{AccountInfo, Credentials, Refusal, Request, Response, ALPN, MAX_FRAME};
use crate::address::ServerAddress;
use crate::keys::Identity;
use crate::presence::SignedPresence;
use crate::tls;
use crate::username::Username;
use crate::wire::{decode_message, decode_single_frame, encode_frame, encode_message, HEADER_LEN, WIRE_VERSION};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot resolve {host}")]
    Resolve { host: String, source: std::io::Error },
    #[error("no rendezvous node answered at {0}: is it running, and is the address right?")]
    Unreachable(String),
    #[error(
        "the server at {0} is not the node in the address: its certificate fingerprint differs (wrong address, or someone in between)"
    )]
    PinMismatch(String),
    #[error("the server at {0} does not speak sotto-rendezvous/1")]
    WrongProtocol(String),
    #[error("lost the connection to the rendezvous node: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the rendezvous node did not answer in time")]
    Timeout,
    #[error("the rendezvous node sent something this client cannot read")]
    Protocol,
    #[error("the rendezvous node refused: {0}")]
    Refused(Refusal),
    #[error("local socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// An open connection to a node, after Hello.
pub struct RendezvousClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    binding: Binding,
    /// The node's clock at Hello, Unix seconds.
    pub server_time: u64,
    /// Longest presence TTL the node accepts.
    pub max_ttl: u64,
}

impl RendezvousClient {
    /// Connects from a socket of its own.
    pub async fn connect(server: &ServerAddress) -> Result<Self, ClientError> {
        Self::connect_via(None, server).await
    }

    /// Connects through `endpoint` (one UDP socket for many connections), or from a
    /// socket of its own.
    pub async fn connect_via(endpoint: Option<&quinn::Endpoint>, server: &ServerAddress) -> Result<Self, ClientError> {
        let shown = format!("{}:{}", server.host, server.port);
        let addrs = server.resolve().await.map_err(|source| ClientError::Resolve { host: server.host.clone(), source })?;
        let remote = *addrs.first().ok_or_else(|| ClientError::Unreachable(shown.clone()))?;
        let (config, mismatch) = tls::client_config(server.cert_sha256, ALPN)?;
        let endpoint = match endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                let bind: SocketAddr =
                    if remote.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
                quinn::Endpoint::client(bind)?
            }
        };
        let connecting = endpoint.connect_with(config, remote, "sotto-rendezvous").map_err(|_| ClientError::Unreachable(shown.clone()))?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(_)) if mismatch.load(Ordering::SeqCst) => return Err(ClientError::PinMismatch(shown)),
            Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
                if c.error_code.to_string().contains("120") || c.reason.starts_with(b"wrong ALPN") =>
            {
                return Err(ClientError::WrongProtocol(shown))
            }
            Ok(Err(e)) => return Err(ClientError::Connection(e)),
            Err(_) => return Err(ClientError::Unreachable(shown)),
        };
        if tls::negotiated_alpn(&conn).as_deref() != Some(ALPN) {
            return Err(ClientError::WrongProtocol(shown));
        }
        let channel = tls::channel_binding(&conn, auth::EXPORTER_LABEL).ok_or(ClientError::Protocol)?;
        let mut client = Self { endpoint, conn, binding: Binding { challenge: [0; 32], channel }, server_time: 0, max_ttl: 0 };
        match client.call(&Request::Hello).await? {
            Response::Challenge { challenge, server_time, max_ttl, .. } => {
                client.binding.challenge = challenge;
                client.server_time = server_time;
                client.max_ttl = max_ttl;
                Ok(client)
            }
            _ => Err(ClientError::Protocol),
        }
    }

    /// Sends one request on a new stream and reads the one response.
    async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        self.call_frame(&encode_frame(&encode_message(request))).await
    }

    /// Sends a request that carries a password, from a frame buffer wiped on drop.
    async fn call_secret(&self, request: &Request) -> Result<Response, ClientError> {
        self.call_frame(&secret_frame(request)?).await
    }

    /// Sends one encoded request frame on a new stream and reads the one response.
    async fn call_frame(&self, frame: &[u8]) -> Result<Response, ClientError> {
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await?;
            send.write_all(frame).await.map_err(|_| ClientError::Protocol)?;
            send.finish().map_err(|_| ClientError::Protocol)?;
            let bytes = recv.read_to_end(HEADER_LEN + MAX_FRAME).await.map_err(|e| match e {
                quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => ClientError::Connection(c),
                _ => ClientError::Protocol,
            })?;
            decode_single_frame(&bytes, MAX_FRAME).and_then(decode_message::<Response>).map_err(|_| ClientError::Protocol)
        };
        match tokio::time::timeout(CALL_TIMEOUT, exchange).await.map_err(|_| ClientError::Timeout)?? {
            Response::Refused(refusal) => Err(ClientError::Refused(refusal)),
            other => Ok(other),
        }
    }

    fn credentials(&self, identity: &Identity, username: &Username, password: &str, purpose: Purpose) -> Credentials {
        Credentials {
            username: username.clone(),
            password: password.to_string(),
            identity_key: identity.public(),
            noise: identity.binding(),
            proof: auth::prove(identity.secret(), purpose, &self.binding, username),
        }
    }

    pub async fn register(&self, identity: &Identity, username: &Username, password: &str) -> Result<(), ClientError> {
        match self.call_secret(&Request::Register(self.credentials(identity, username, password, Purpose::Register))).await? {
            Response::Registered => Ok(()),
            _ => Err(ClientError::Protocol),
        }
    }

    /// Logs in with the password, binding this identity; `true` if the key changed.
    pub async fn login(&self, identity: &Identity, username: &Username, password: &str) -> Result<bool, ClientError> {
        match self.call_secret(&Request::Login(self.credentials(identity, username, password, Purpose::Login))).await? {
            Response::LoggedIn { key_changed } => Ok(key_changed),
            _ => Err(ClientError::Protocol),
        }
    }

    pub async fn authenticate(&self, identity: &Identity, username: &Username) -> Result<(), ClientError> {
        let proof = auth::prove(identity.secret(), Purpose::Authenticate, &self.binding, username);
        match self.call(&Request::Authenticate { username: username.clone(), identity_key: identity.public(), proof }).await? {
            Response::Authenticated => Ok(()),
            _ => Err(ClientError::Protocol),
        }
    }

    /// Publishes a record; answers the address the node saw this client at.
    pub async fn publish(&self, signed: SignedPresence) -> Result<SocketAddr, ClientError> {
        match self.call(&Request::Publish(signed)).await? {
            Response::Published { observed } => Ok(observed),
            _ => Err(ClientError::Protocol),
        }
    }

    pub async fn withdraw(&self) -> Result<(), ClientError> {
        match self.call(&Request::Withdraw).await? {
            Response::Withdrawn => Ok(()),
            _ => Err(ClientError::Protocol),
        }
    }

    /// The user's account and current presence, as the node says; the caller verifies.
    pub async fn lookup(&self, username: &Username) -> Result<AccountInfo, ClientError> {
        match self.call(&Request::Lookup { username: username.clone() }).await? {
            Response::Account(info) if &info.username == username => Ok(info),
            _ => Err(ClientError::Protocol),
        }
    }

    pub async fn online(&self) -> Result<(Vec<Username>, bool), ClientError> {
        match self.call(&Request::ListOnline).await? {
            Response::Online { usernames, truncated } => Ok((usernames, truncated)),
            _ => Err(ClientError::Protocol),
        }
    }

    /// Watches `usernames`: returns who of them is online now, and a stream of changes.
    pub async fn watch(&self, usernames: &[Username]) -> Result<(Vec<Username>, Watch), ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        let request = Request::Watch { usernames: usernames.to_vec() };
        send.write_all(&encode_frame(&encode_message(&request))).await.map_err(|_| ClientError::Protocol)?;
        send.finish().map_err(|_| ClientError::Protocol)?;
        let mut watch = Watch { recv, _send: send };
        let first = tokio::time::timeout(CALL_TIMEOUT, watch.next()).await.map_err(|_| ClientError::Timeout)??;
        match first {
            WatchEvent::Online(online) => Ok((online, watch)),
            WatchEvent::Changed { .. } => Err(ClientError::Protocol),
        }
    }

    /// Sends a request as-is and returns the node's raw answer (for tests and tools).
    pub async fn raw_call(&self, request: &Request) -> Result<Response, ClientError> {
        self.call(request).await
    }

    /// False once the connection has closed for any reason.
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Completes when the connection ends, with the reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// Closes the connection and waits briefly for the node to hear it.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Encodes `request` as one frame (the same bytes as `encode_frame(&encode_message(..))`)
/// into a single allocation that is wiped on drop: growing a `Vec` while encoding would
/// leave copies of the password in freed memory.
fn secret_frame(request: &Request) -> Result<zeroize::Zeroizing<Vec<u8>>, ClientError> {
    let mut frame = zeroize::Zeroizing::new(vec![0u8; HEADER_LEN + MAX_FRAME]);
    frame[HEADER_LEN] = WIRE_VERSION;
    let body = postcard::to_slice(request, &mut frame[HEADER_LEN + 1..]).map_err(|_| ClientError::Protocol)?.len();
    let len = u32::try_from(1 + body).map_err(|_| ClientError::Protocol)?;
    frame[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    frame.truncate(HEADER_LEN + 1 + body);
    Ok(frame)
}

/// What a watch reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Exactly these watched users are online (at the start, and after a resync).
    Online(Vec<Username>),
    Changed {
        username: Username,
        online: bool,
    },
}

/// An open watch; dropping it ends it.
pub struct Watch {
    recv: quinn::RecvStream,
    _send: quinn::SendStream,
}

impl Watch {
    /// The next change; an error when the node or the connection ends the watch.
    pub async fn next(&mut self) -> Result<WatchEvent, ClientError> {
        let frame =
            crate::quic::read_frame(&mut self.recv, MAX_FRAME).await.map_err(|_| ClientError::Protocol)?.ok_or(ClientError::Protocol)?;
        match decode_message::<Response>(&frame).map_err(|_| ClientError::Protocol)? {
            Response::Watching { online } => Ok(WatchEvent::Online(online)),
            Response::PresenceChanged { username, online } => Ok(WatchEvent::Changed { username, online }),
            Response::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::Protocol),
        }
    }
}

/// Clock difference a client allows when it checks a looked-up presence record.
pub const LOOKUP_SKEW: u64 = 60;

/// A looked-up account after the client's own checks.
#[derive(Clone, Debug)]
pub struct VerifiedAccount {
    pub info: AccountInfo,
    /// The presence record, verified with the account's identity key and current.
    pub presence: Option<crate::presence::PresenceRecord>,
}

/// Checks what a node answered for a lookup: the Noise binding under the identity key,
/// and the presence record's signature, owner and time. `skew` allows for clocks.
pub fn verify_lookup(info: AccountInfo, now: u64, skew: u64) -> Result<VerifiedAccount, crate::presence::PresenceError> {
    use crate::presence::{check_current, PresenceError};
    info.noise.verify(&info.identity_key).map_err(|_| PresenceError::BadBinding)?;
    let presence = match &info.presence {
        None => None,
        Some(signed) => {
            // The account's binding, verified just above, is the one the record must
            // carry: it is not verified twice.
            let record = signed.verify_knowing(&info.identity_key, Some(&info.noise))?;
            if record.username != info.username {
                return Err(PresenceError::WrongUser);
            }
            if record.noise != info.noise {
                return Err(PresenceError::BadBinding);
            }
            check_current(&record, now, skew, None)?;
            Some(record)
        }
    };
    Ok(VerifiedAccount { info, presence })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::proto::Credentials;

    #[test]
    fn a_secret_frame_is_the_ordinary_encoding() {
        let id = crate::presence::tests::identity(1);
        let username = Username::parse("alice").unwrap();
        let credentials = || Credentials {
            username: username.clone(),
            password: "correct horse battery staple".into(),
            identity_key: id.public(),
            noise: id.binding(),
            proof: [7; 64],
        };
        for request in [Request::Register(credentials()), Request::Login(credentials()), Request::Hello] {
            assert_eq!(secret_frame(&request).unwrap().as_slice(), encode_frame(&encode_message(&request)).as_slice());
        }
    }
}
