//! A profile's local database: message history, contacts and the handshake replay
//! guard, behind the [`Store`] trait; [`SledStore`] is the engine used today.
//!
//! sled trees (schema 1):
//!
//! ```text
//! meta       "schema" → 1
//! messages   peer ‖ 0x00 ‖ stored_at_ms (u64 BE) ‖ id  → postcard(StoredMessage)
//! ids        peer ‖ 0x00 ‖ direction ‖ id              → messages key
//! by_time    stored_at_ms (u64 BE) ‖ id ‖ direction    → messages key
//! contacts   username                                   → postcard(Contact)
//! ```
//!
//! "Last N with bob" is one reverse prefix scan of `messages`; "last N overall" is one
//! reverse scan of `by_time`. A message and its index entries are written in one
//! transaction, so nothing is ever half-written; `ids` makes delivery idempotent.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::keys::{IdentityKey, NoiseBinding};
use crate::username::Username;

pub const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("history database: {0}")]
    Db(#[from] sled::Error),
    #[error("history database is damaged: {0}")]
    Corrupt(&'static str),
    #[error("history database has schema {0}; this sotto reads schema {SCHEMA_VERSION}")]
    Schema(u64),
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Db(e),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    In,
    Out,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Outgoing, not yet acknowledged.
    Pending,
    /// Outgoing, acknowledged by the recipient after it stored the message.
    Delivered,
    /// Outgoing, could not be delivered.
    Failed,
    /// Incoming, stored.
    Received,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Received => "received",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub id: [u8; 16],
    pub peer: Username,
    pub direction: Direction,
    pub body: String,
    /// The sender's clock, milliseconds since the epoch.
    pub sent_at: u64,
    /// This machine's clock when stored; orders history.
    pub stored_at: u64,
    pub state: State,
}

/// A pinned contact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub username: Username,
    pub identity_key: IdentityKey,
    pub noise: NoiseBinding,
    pub verified: bool,
    pub first_seen: u64,
    pub last_seen: u64,
    /// Highest presence `seq` seen for this contact.
    pub highest_seq: u64,
    /// Timestamp of the last handshake initiation accepted from this contact.
    pub last_handshake: u64,
    /// A different identity key that was presented and refused, awaiting verification.
    pub changed_key: Option<IdentityKey>,
}

/// What sotto needs from a history engine.
pub trait Store: Send + Sync {
    /// Adds a message unless one with the same (peer, direction, id) exists; `true` if
    /// added. Durable when it returns.
    fn insert(&self, msg: &StoredMessage) -> Result<bool, StoreError>;
    /// Sets the state of an outgoing message; `false` if there is none with that id.
    fn set_state(&self, peer: &Username, id: &[u8; 16], state: State) -> Result<bool, StoreError>;
    fn message(&self, peer: &Username, direction: Direction, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError>;
    /// The newest `limit` messages, with `peer` or with anyone, oldest first.
    fn last(&self, peer: Option<&Username>, limit: usize) -> Result<Vec<StoredMessage>, StoreError>;
    fn contact(&self, user: &Username) -> Result<Option<Contact>, StoreError>;
    fn put_contact(&self, contact: &Contact) -> Result<(), StoreError>;
    /// Atomically replaces `user`'s contact with `f(current)` (`None` keeps it absent or
    /// unchanged); `f` may run more than once under contention. Durable when it returns.
    fn update_contact(&self, user: &Username, f: &mut dyn FnMut(Option<Contact>) -> Option<Contact>)
        -> Result<Option<Contact>, StoreError>;
    fn contacts(&self) -> Result<Vec<Contact>, StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
}

pub struct SledStore {
    db: sled::Db,
    messages: sled::Tree,
    ids: sled::Tree,
    by_time: sled::Tree,
    contacts: sled::Tree,
}

fn peer_prefix(peer: &Username) -> Vec<u8> {
    let mut k = peer.as_str().as_bytes().to_vec();
    k.push(0);
    k
}

fn message_key(msg: &StoredMessage) -> Vec<u8> {
    let mut k = peer_prefix(&msg.peer);
    k.extend_from_slice(&msg.stored_at.to_be_bytes());
    k.extend_from_slice(&msg.id);
    k
}

fn id_key(peer: &Username, direction: Direction, id: &[u8; 16]) -> Vec<u8> {
    let mut k = peer_prefix(peer);
    k.push(direction as u8);
    k.extend_from_slice(id);
    k
}

fn time_key(msg: &StoredMessage) -> Vec<u8> {
    let mut k = msg.stored_at.to_be_bytes().to_vec();
    k.extend_from_slice(&msg.id);
    k.push(msg.direction as u8);
    k
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes into a Vec")
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).open()?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let v: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("schema"))?;
                let v = u64::from_be_bytes(v);
                if v != SCHEMA_VERSION {
                    return Err(StoreError::Schema(v));
                }
            }
        }
        Ok(Self {
            messages: db.open_tree("messages")?,
            ids: db.open_tree("ids")?,
            by_time: db.open_tree("by_time")?,
            contacts: db.open_tree("contacts")?,
            db,
        })
    }
}

impl Store for SledStore {
    fn insert(&self, msg: &StoredMessage) -> Result<bool, StoreError> {
        let (key, idk, tk, value) = (message_key(msg), id_key(&msg.peer, msg.direction, &msg.id), time_key(msg), encode(msg));
        let added = (&self.messages, &self.ids, &self.by_time).transaction(|(messages, ids, by_time)| {
            if ids.get(&idk)?.is_some() {
                return Ok(false);
            }
            messages.insert(key.as_slice(), value.as_slice())?;
            ids.insert(idk.as_slice(), key.as_slice())?;
            by_time.insert(tk.as_slice(), key.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(true)
        })?;
        self.db.flush()?;
        Ok(added)
    }

    fn set_state(&self, peer: &Username, id: &[u8; 16], state: State) -> Result<bool, StoreError> {
        let Some(key) = self.ids.get(id_key(peer, Direction::Out, id))? else { return Ok(false) };
        let updated = self.messages.transaction(|messages| {
            let Some(bytes) = messages.get(&key)? else { return Ok(false) };
            let mut msg: StoredMessage = decode(&bytes, "message").map_err(ConflictableTransactionError::Abort)?;
            msg.state = state;
            messages.insert(&key, encode(&msg))?;
            Ok(true)
        })?;
        self.db.flush()?;
        Ok(updated)
    }

    fn message(&self, peer: &Username, direction: Direction, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError> {
        let Some(key) = self.ids.get(id_key(peer, direction, id))? else { return Ok(None) };
        self.messages.get(key)?.map(|b| decode(&b, "message")).transpose()
    }

    fn last(&self, peer: Option<&Username>, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        match peer {
            Some(peer) => {
                for item in self.messages.scan_prefix(peer_prefix(peer)).rev().take(limit) {
                    out.push(decode(&item?.1, "message")?);
                }
            }
            None => {
                for item in self.by_time.iter().rev().take(limit) {
                    let key = item?.1;
                    let bytes = self.messages.get(&key)?.ok_or(StoreError::Corrupt("time index"))?;
                    out.push(decode(&bytes, "message")?);
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    fn contact(&self, user: &Username) -> Result<Option<Contact>, StoreError> {
        self.contacts.get(user.as_str())?.map(|b| decode(&b, "contact")).transpose()
    }

    fn put_contact(&self, contact: &Contact) -> Result<(), StoreError> {
        self.contacts.insert(contact.username.as_str(), encode(contact))?;
        self.db.flush()?;
        Ok(())
    }

    fn update_contact(
        &self,
        user: &Username,
        f: &mut dyn FnMut(Option<Contact>) -> Option<Contact>,
    ) -> Result<Option<Contact>, StoreError> {
        loop {
            let old = self.contacts.get(user.as_str())?;
            let current = old.as_ref().map(|b| decode::<Contact>(b, "contact")).transpose()?;
            let Some(new) = f(current.clone()) else { return Ok(current) };
            if self.contacts.compare_and_swap(user.as_str(), old, Some(encode(&new)))?.is_ok() {
                self.db.flush()?;
                return Ok(Some(new));
            }
        }
    }

    fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        self.contacts.iter().map(|item| decode(&item?.1, "contact")).collect()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn msg(peer: &str, id: u8, at: u64, direction: Direction) -> StoredMessage {
        StoredMessage {
            id: [id; 16],
            peer: name(peer),
            direction,
            body: format!("m{id}"),
            sent_at: at,
            stored_at: at,
            state: if direction == Direction::In { State::Received } else { State::Pending },
        }
    }

    #[test]
    fn insert_is_idempotent_per_peer_direction_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert!(s.insert(&msg("bob", 1, 10, Direction::In)).unwrap());
        assert!(!s.insert(&msg("bob", 1, 11, Direction::In)).unwrap(), "a resend is stored once");
        assert!(s.insert(&msg("bob", 1, 12, Direction::Out)).unwrap(), "our own id space is separate");
        assert!(s.insert(&msg("carol", 1, 13, Direction::In)).unwrap(), "another peer's id space is separate");
        assert_eq!(s.last(Some(&name("bob")), 10).unwrap().len(), 2);
    }

    #[test]
    fn last_n_is_oldest_first_and_per_peer() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        for i in 0..30u8 {
            s.insert(&msg(if i % 2 == 0 { "bob" } else { "bobby" }, i, 1000 + u64::from(i), Direction::In)).unwrap();
        }
        let bob = s.last(Some(&name("bob")), 5).unwrap();
        assert_eq!(bob.iter().map(|m| m.id[0]).collect::<Vec<_>>(), vec![20, 22, 24, 26, 28]);
        assert!(bob.iter().all(|m| m.peer == name("bob")), "the prefix must not leak into bobby");
        let all = s.last(None, 3).unwrap();
        assert_eq!(all.iter().map(|m| m.id[0]).collect::<Vec<_>>(), vec![27, 28, 29]);
    }

    #[test]
    fn ack_marks_only_our_outgoing_message() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.insert(&msg("bob", 1, 10, Direction::Out)).unwrap();
        s.insert(&msg("bob", 2, 11, Direction::In)).unwrap();
        assert!(s.set_state(&name("bob"), &[1; 16], State::Delivered).unwrap());
        assert!(!s.set_state(&name("bob"), &[2; 16], State::Delivered).unwrap(), "an incoming id is not ours to ack");
        assert!(!s.set_state(&name("carol"), &[1; 16], State::Delivered).unwrap(), "carol cannot ack bob's message");
        assert_eq!(s.message(&name("bob"), Direction::Out, &[1; 16]).unwrap().unwrap().state, State::Delivered);
    }

    #[test]
    fn survives_reopen_and_checks_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.insert(&msg("bob", 1, 10, Direction::In)).unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.last(None, 10).unwrap().len(), 1);
        s.db.open_tree("meta").unwrap().insert("schema", &9u64.to_be_bytes()).unwrap();
        drop(s);
        assert!(matches!(SledStore::open(dir.path()), Err(StoreError::Schema(9))));
    }
}
