//! A profile's local database: message history, contacts and the handshake replay
//! guard, behind the [`Store`] trait; [`SledStore`] is the engine used today.
//!
//! sled trees (schema 3):
//!
//! ```text
//! meta       "schema" → 3
//! chat       "m" ‖ peer ‖ 0x00 ‖ stored_at_ms (u64 BE) ‖ id ‖ direction  → postcard(StoredMessage)
//!            "i" ‖ peer ‖ 0x00 ‖ id                                    → stored_at_ms (u64 BE)
//! contacts   username                                                  → postcard(Contact)
//! ```
//!
//! "Last N with bob" is one reverse prefix scan of `m`; "last N overall" merges the
//! reverse scans of every peer's prefix. `i` indexes *incoming* messages only: it makes
//! a resent message land once. An outgoing message needs no index: the session that
//! carries it keeps its [`MessageRef`], which finds it directly when the ack arrives.
//! So a received message is two writes, a sent one is two (stored, then marked
//! delivered), and each write is a plain insert: sled's batches and transactions take a
//! process-wide lock that waits for every flush in progress, which made each write cost
//! a whole flush.
//!
//! An incoming message is written `i` first, then `m`, under the store's own lock. sled
//! recovers a prefix of its log after a crash, so a cut-short message has its `i` entry
//! but no `m`; the sender never got an ack for it (acks wait for the flush), sends it
//! again, and the retry completes it under the time chosen the first time, so it is
//! stored exactly once. Schemas 1 and 2 (which also kept a time index and indexed
//! outgoing ids) are migrated on open.
//!
//! Durability is a group commit. A write returns once it is applied; one flush (about
//! 100 µs to a few ms) then covers every write applied before it, instead of one flush
//! per message. A caller that must not go on before its write is on disk (the sender
//! before it reports a message sent, the receiver before it acknowledges one) either
//! takes a commit point with [`Store::written`] and waits for it with [`durable`] or
//! [`Store::wait_durable`] (the store's flusher thread starts on it at once, or within
//! 2 ms under load, and keeps flushing while points keep coming), or flushes on its own
//! thread with [`flush_in_place`] when no flush is under way. The receiving session does the
//! latter when it is otherwise idle: the flush then costs no hand-off to another thread
//! and back (about 0.13× of a round trip's baseline on two cores). A write nobody takes
//! a point for reaches the disk with the next flush, or within 100 ms (twice that at
//! worst, when the linger ends during a flush in place that began before the write).
//! Under load (the last flush covered eight writes or more, whoever made them) the next
//! flush waits until 2 ms after the last one began, so that each flush covers many
//! writes: a flush costs about the same whatever it covers, and flushing back to back
//! took over a quarter of the CPU at full speed. A message on an otherwise quiet store
//! never waits for that. Tasks waiting in [`durable`] are each woken once, by the flush
//! that decides their point. The group commit itself is in `store/commit.rs`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::keys::{IdentityKey, NoiseBinding};
use crate::username::Username;

mod commit;
use commit::Commits;
pub use commit::{durable, flush_in_place, Durability};

pub const SCHEMA_VERSION: u64 = 3;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("history database: {0}")]
    Db(#[from] sled::Error),
    #[error("history database is damaged: {0}")]
    Corrupt(&'static str),
    #[error("history database has schema {0}; this sotto reads schema {SCHEMA_VERSION}")]
    Schema(u64),
    #[error("history database could not be written to disk")]
    NotDurable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// Where a message is kept: enough to find it again without an index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MessageRef {
    pub peer: Username,
    pub direction: Direction,
    pub stored_at: u64,
    pub id: [u8; 16],
}

impl StoredMessage {
    pub fn at(&self) -> MessageRef {
        MessageRef { peer: self.peer.clone(), direction: self.direction, stored_at: self.stored_at, id: self.id }
    }
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

/// What sotto needs from a history engine. Writes are applied when they return and
/// durable once a commit point taken after them is (see the module docs).
pub trait Store: Send + Sync {
    /// Adds a message; `true` if added. An incoming message is added unless one with the
    /// same (peer, id) exists, whatever its time: a resend is stored once. An outgoing
    /// one is added unless that very message (same [`MessageRef`]) exists.
    fn insert(&self, msg: &StoredMessage) -> Result<bool, StoreError>;
    /// Sets the state of an outgoing message; `false` if there is no outgoing message
    /// at `at`.
    fn set_state(&self, at: &MessageRef, state: State) -> Result<bool, StoreError>;
    /// Marks an outgoing message failed if it is still pending, in one step: an ack that
    /// marked it delivered meanwhile wins. `true` if it was marked.
    fn fail_pending(&self, at: &MessageRef) -> Result<bool, StoreError>;
    fn message(&self, at: &MessageRef) -> Result<Option<StoredMessage>, StoreError>;
    /// The incoming message from `peer` with this id, wherever it was filed.
    fn incoming(&self, peer: &Username, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError>;
    /// The newest `limit` messages, with `peer` or with anyone, oldest first.
    fn last(&self, peer: Option<&Username>, limit: usize) -> Result<Vec<StoredMessage>, StoreError>;
    fn contact(&self, user: &Username) -> Result<Option<Contact>, StoreError>;
    fn put_contact(&self, contact: &Contact) -> Result<(), StoreError>;
    /// Atomically replaces `user`'s contact with `f(current)` (`None` keeps it absent or
    /// unchanged); `f` may run more than once under contention.
    fn update_contact(&self, user: &Username, f: &mut dyn FnMut(Option<Contact>) -> Option<Contact>)
        -> Result<Option<Contact>, StoreError>;
    fn contacts(&self) -> Result<Vec<Contact>, StoreError>;
    /// A commit point covering every write applied so far; the flusher starts on it at
    /// once (within 2 ms under load). Writes nobody takes a point for may wait a little
    /// to share a flush.
    fn written(&self) -> u64;
    /// Blocks until every write up to `point` is on disk.
    fn wait_durable(&self, point: u64) -> Result<(), StoreError>;
    /// Watches the flusher's progress.
    fn durability(&self) -> tokio::sync::watch::Receiver<Durability>;
    /// Resolves to `true` once every write up to `point` is on disk, `false` if its
    /// flush failed (an error if the store closed first); [`durable`] waits on it
    /// without blocking a thread.
    fn on_durable(&self, point: u64) -> tokio::sync::oneshot::Receiver<bool>;
    /// Whether a flush is under way now.
    fn flushing(&self) -> bool;
    /// Unless a flush is already under way, flushes everything applied so far on the
    /// calling thread (blocking it for as long as the disk takes) and returns the commit
    /// point it covered, its outcome published as for any flush. `None`: a flush was
    /// under way, or the store is under load and lets the flusher thread gather writes;
    /// take a point with [`written`](Store::written) and wait instead.
    fn flush_here(&self) -> Option<u64>;
    /// Blocks until every write so far is on disk.
    fn flush(&self) -> Result<(), StoreError> {
        self.wait_durable(self.written())
    }
}

pub struct SledStore {
    db: sled::Db,
    chat: sled::Tree,
    contacts: sled::Tree,
    /// Serialises message writes, so a check and the writes that follow are atomic.
    write: Mutex<()>,
    commits: Arc<Commits>,
    flusher: Option<JoinHandle<()>>,
}

const MESSAGE: u8 = b'm';
const INCOMING: u8 = b'i';

fn peer_prefix(peer: &Username) -> Vec<u8> {
    let mut k = Vec::with_capacity(59);
    k.push(MESSAGE);
    k.extend_from_slice(peer.as_str().as_bytes());
    k.push(0);
    k
}

fn message_key(at: &MessageRef) -> Vec<u8> {
    let mut k = peer_prefix(&at.peer);
    k.extend_from_slice(&at.stored_at.to_be_bytes());
    k.extend_from_slice(&at.id);
    k.push(at.direction as u8);
    k
}

fn incoming_key(peer: &Username, id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(50);
    k.push(INCOMING);
    k.extend_from_slice(peer.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(id);
    k
}

/// Adds `msg` (with its index entry, if incoming) to a migration batch.
fn migrate_one(batch: &mut sled::Batch, msg: &StoredMessage) {
    if msg.direction == Direction::In {
        batch.insert(incoming_key(&msg.peer, &msg.id), &msg.stored_at.to_be_bytes());
    }
    batch.insert(message_key(&msg.at()), encode(msg));
}

/// Moves an older database's messages into the schema-3 tree. Safe to run again after
/// a crash part way: it rewrites the same keys, and the old trees go only after the new
/// schema number is on disk.
fn migrate(db: &sled::Db, chat: &sled::Tree, meta: &sled::Tree, from: u64) -> Result<(), StoreError> {
    let (source, prefix, old_trees): (&str, &[u8], &[&str]) = match from {
        1 => ("messages", b"", &["messages", "ids", "by_time"]),
        _ => ("history", &[MESSAGE], &["history"]),
    };
    let old = db.open_tree(source)?;
    let mut batch = sled::Batch::default();
    for item in old.scan_prefix(prefix) {
        let msg: StoredMessage = decode(&item?.1, "message")?;
        migrate_one(&mut batch, &msg);
    }
    chat.apply_batch(batch)?;
    db.flush()?;
    meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
    db.flush()?;
    for tree in old_trees {
        db.drop_tree(tree)?;
    }
    db.flush()?;
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes into a Vec")
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, commit::LINGER, commit::GATHER)
    }

    fn open_with(dir: &Path, linger: std::time::Duration, gather: std::time::Duration) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).open()?;
        let meta = db.open_tree("meta")?;
        let chat = db.open_tree("chat")?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let v: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("schema"))?;
                match u64::from_be_bytes(v) {
                    SCHEMA_VERSION => {}
                    v @ (1 | 2) => migrate(&db, &chat, &meta, v)?,
                    v => return Err(StoreError::Schema(v)),
                }
            }
        }
        let commits = Arc::new(Commits::new(linger, gather));
        let flusher = {
            let (commits, db) = (commits.clone(), db.clone());
            std::thread::Builder::new()
                .name("sotto-history-flush".into())
                .spawn(move || commits.run(&db))
                .map_err(|e| StoreError::Db(sled::Error::Io(e)))?
        };
        Ok(Self { chat, contacts: db.open_tree("contacts")?, db, write: Mutex::new(()), commits, flusher: Some(flusher) })
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets an outgoing message's state to `next(current)` (`None` leaves it) under the
    /// write lock; `false` if there is no outgoing message at `at`.
    fn change_state(&self, at: &MessageRef, next: &mut dyn FnMut(State) -> Option<State>) -> Result<bool, StoreError> {
        if at.direction != Direction::Out {
            return Ok(false);
        }
        let key = message_key(at);
        let _write = self.lock_writes();
        let Some(bytes) = self.chat.get(&key)? else { return Ok(false) };
        let mut msg: StoredMessage = decode(&bytes, "message")?;
        if let Some(state) = next(msg.state).filter(|s| *s != msg.state) {
            msg.state = state;
            self.chat.insert(key, encode(&msg))?;
            self.commits.wrote();
        }
        Ok(true)
    }

    /// The key prefix of every peer with messages, in key order.
    fn peer_prefixes(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut prefixes = Vec::new();
        let mut from = vec![MESSAGE];
        while let Some(item) = self.chat.range(from.as_slice()..).next() {
            let (key, _) = item?;
            if key.first() != Some(&MESSAGE) {
                break;
            }
            let end = key.iter().position(|&b| b == 0).ok_or(StoreError::Corrupt("message key"))?;
            let prefix = key[..=end].to_vec();
            // The first key past this peer's: usernames never contain 0 or 1.
            from = [&key[..end], &[1u8][..]].concat();
            prefixes.push(prefix);
        }
        Ok(prefixes)
    }

    /// The newest `limit` messages with anyone, newest first: a merge of every peer's
    /// reverse scan.
    fn newest_overall(&self, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let mut scans: Vec<_> = self.peer_prefixes()?.into_iter().map(|p| self.chat.scan_prefix(p).rev()).collect();
        let mut heads = std::collections::BinaryHeap::with_capacity(scans.len());
        for (i, scan) in scans.iter_mut().enumerate() {
            heads.extend(next_head(scan, i)?);
        }
        let mut out = Vec::with_capacity(limit.min(1024));
        while out.len() < limit {
            let Some(Head { scan, value, .. }) = heads.pop() else { break };
            out.push(decode(&value, "message")?);
            heads.extend(next_head(&mut scans[scan], scan)?);
        }
        Ok(out)
    }
}

/// The next message of one peer's reverse scan, ordered for the merge by time, id,
/// direction and then peer, so the order is total.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Head {
    order: Vec<u8>,
    peer: Vec<u8>,
    scan: usize,
    value: sled::IVec,
}

fn next_head(scan: &mut std::iter::Rev<sled::Iter>, index: usize) -> Result<Option<Head>, StoreError> {
    let Some(item) = scan.next() else { return Ok(None) };
    let (key, value) = item?;
    let split = key.iter().position(|&b| b == 0).ok_or(StoreError::Corrupt("message key"))?;
    let (peer, rest) = key.split_at(split);
    if rest.len() != 1 + 8 + 16 + 1 {
        return Err(StoreError::Corrupt("message key"));
    }
    Ok(Some(Head { order: rest[1..].to_vec(), peer: peer.to_vec(), scan: index, value }))
}

impl Drop for SledStore {
    /// Flushes what is left and waits for the flusher, so the database can be opened
    /// again as soon as this returns.
    fn drop(&mut self) {
        self.commits.close();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

impl Store for SledStore {
    fn insert(&self, msg: &StoredMessage) -> Result<bool, StoreError> {
        if msg.direction == Direction::Out {
            let added = self.chat.compare_and_swap(message_key(&msg.at()), None::<&[u8]>, Some(encode(msg)))?.is_ok();
            if added {
                self.commits.wrote();
            }
            return Ok(added);
        }
        let index = incoming_key(&msg.peer, &msg.id);
        let _write = self.lock_writes();
        // Index first, message last: any prefix of the two that survives a crash is
        // completed by the next delivery of the same message. One compare-and-swap
        // both looks for an earlier copy and claims the id.
        let first = self.chat.compare_and_swap(&index, None::<&[u8]>, Some(&msg.stored_at.to_be_bytes()[..]))?;
        let msg = match first.err().and_then(|e| e.current) {
            Some(at) => {
                let at: [u8; 8] = at.as_ref().try_into().map_err(|_| StoreError::Corrupt("id index"))?;
                let first = StoredMessage { stored_at: u64::from_be_bytes(at), ..msg.clone() };
                if self.chat.contains_key(message_key(&first.at()))? {
                    return Ok(false);
                }
                // A crash came between the index entry and the message: finish the
                // write under the time chosen then, so the message is stored once.
                first
            }
            None => msg.clone(),
        };
        self.chat.insert(message_key(&msg.at()), encode(&msg))?;
        self.commits.wrote();
        Ok(true)
    }

    fn set_state(&self, at: &MessageRef, state: State) -> Result<bool, StoreError> {
        self.change_state(at, &mut |_| Some(state))
    }

    fn fail_pending(&self, at: &MessageRef) -> Result<bool, StoreError> {
        let mut marked = false;
        self.change_state(at, &mut |current| {
            marked = current == State::Pending;
            marked.then_some(State::Failed)
        })?;
        Ok(marked)
    }

    fn message(&self, at: &MessageRef) -> Result<Option<StoredMessage>, StoreError> {
        self.chat.get(message_key(at))?.map(|b| decode(&b, "message")).transpose()
    }

    fn incoming(&self, peer: &Username, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError> {
        let Some(at) = self.chat.get(incoming_key(peer, id))? else { return Ok(None) };
        let at: [u8; 8] = at.as_ref().try_into().map_err(|_| StoreError::Corrupt("id index"))?;
        self.message(&MessageRef { peer: peer.clone(), direction: Direction::In, stored_at: u64::from_be_bytes(at), id: *id })
    }

    fn last(&self, peer: Option<&Username>, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = match peer {
            Some(peer) => {
                let mut out = Vec::with_capacity(limit.min(1024));
                for item in self.chat.scan_prefix(peer_prefix(peer)).rev().take(limit) {
                    out.push(decode(&item?.1, "message")?);
                }
                out
            }
            None => self.newest_overall(limit)?,
        };
        out.reverse();
        Ok(out)
    }

    fn contact(&self, user: &Username) -> Result<Option<Contact>, StoreError> {
        self.contacts.get(user.as_str())?.map(|b| decode(&b, "contact")).transpose()
    }

    fn put_contact(&self, contact: &Contact) -> Result<(), StoreError> {
        self.contacts.insert(contact.username.as_str(), encode(contact))?;
        self.commits.wrote();
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
                self.commits.wrote();
                return Ok(Some(new));
            }
        }
    }

    fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        self.contacts.iter().map(|item| decode(&item?.1, "contact")).collect()
    }

    fn written(&self) -> u64 {
        self.commits.point()
    }

    fn wait_durable(&self, point: u64) -> Result<(), StoreError> {
        self.commits.wait(point)
    }

    fn durability(&self) -> tokio::sync::watch::Receiver<Durability> {
        self.commits.subscribe()
    }

    fn on_durable(&self, point: u64) -> tokio::sync::oneshot::Receiver<bool> {
        self.commits.on_durable(point)
    }

    fn flushing(&self) -> bool {
        self.commits.flushing()
    }

    fn flush_here(&self) -> Option<u64> {
        self.commits.flush_here(&self.db)
    }
}

#[cfg(test)]
mod tests;
