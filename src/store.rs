//! A profile's local database: message history, contacts and the handshake replay
//! guard, behind the [`Store`] trait; [`SledStore`] is the engine used today.
//!
//! sled trees (schema 2):
//!
//! ```text
//! meta       "schema" → 2
//! history    "m" ‖ peer ‖ 0x00 ‖ stored_at_ms (u64 BE) ‖ id  → postcard(StoredMessage)
//!            "i" ‖ peer ‖ 0x00 ‖ direction ‖ id              → its "m" key
//!            "t" ‖ stored_at_ms (u64 BE) ‖ id ‖ direction    → its "m" key
//! contacts   username                                         → postcard(Contact)
//! ```
//!
//! "Last N with bob" is one reverse prefix scan of `m`; "last N overall" is one reverse
//! scan of `t`. `i` makes delivery idempotent. A message is written as three plain
//! inserts, `i`, `t`, then `m`, under the store's own lock: sled's batches and
//! transactions take a process-wide lock that waits for every flush in progress, which
//! made each write cost a whole flush. sled recovers a prefix of its log after a crash,
//! so a cut-short message has its `i` entry but no `m`; the sender never got an ack for
//! it (acks wait for the flush), sends it again, and the retry completes it under the
//! key chosen the first time, so it is stored exactly once. (Schema 1 kept the three in
//! three trees, written by a cross-tree transaction; it is migrated on open.)
//!
//! Durability is a group commit. A write returns once it is applied; one flusher
//! thread per store writes everything applied so far to disk, over and over, while
//! writes keep coming. A caller that must not go on before its write is on disk (the
//! receiver before it acknowledges a message, the replay guard before it answers a
//! handshake) takes a commit point with [`Store::written`] and waits for it with
//! [`durable`] or [`Store::wait_durable`]. One flush (about 100 µs to a few ms) then
//! covers every message that arrived meanwhile, instead of one flush per message.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::keys::{IdentityKey, NoiseBinding};
use crate::username::Username;

pub const SCHEMA_VERSION: u64 = 2;

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

/// What sotto needs from a history engine. Writes are applied when they return and
/// durable once a commit point taken after them is (see the module docs).
pub trait Store: Send + Sync {
    /// Adds a message unless one with the same (peer, direction, id) exists; `true` if
    /// added.
    fn insert(&self, msg: &StoredMessage) -> Result<bool, StoreError>;
    /// Sets the state of an outgoing message; `false` if there is none with that id.
    fn set_state(&self, peer: &Username, id: &[u8; 16], state: State) -> Result<bool, StoreError>;
    fn message(&self, peer: &Username, direction: Direction, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError>;
    /// The newest `limit` messages, with `peer` or with anyone, oldest first.
    fn last(&self, peer: Option<&Username>, limit: usize) -> Result<Vec<StoredMessage>, StoreError>;
    fn contact(&self, user: &Username) -> Result<Option<Contact>, StoreError>;
    fn put_contact(&self, contact: &Contact) -> Result<(), StoreError>;
    /// Atomically replaces `user`'s contact with `f(current)` (`None` keeps it absent or
    /// unchanged); `f` may run more than once under contention.
    fn update_contact(&self, user: &Username, f: &mut dyn FnMut(Option<Contact>) -> Option<Contact>)
        -> Result<Option<Contact>, StoreError>;
    fn contacts(&self) -> Result<Vec<Contact>, StoreError>;
    /// A commit point covering every write applied so far.
    fn written(&self) -> u64;
    /// Blocks until every write up to `point` is on disk.
    fn wait_durable(&self, point: u64) -> Result<(), StoreError>;
    /// Watches the flusher's progress; [`durable`] waits on it without blocking a thread.
    fn durability(&self) -> tokio::sync::watch::Receiver<Durability>;
    /// Blocks until every write so far is on disk.
    fn flush(&self) -> Result<(), StoreError> {
        self.wait_durable(self.written())
    }
}

/// Waits, without blocking the thread, until every write up to `point` is on disk.
pub async fn durable(store: &dyn Store, point: u64) -> Result<(), StoreError> {
    let mut progress = store.durability();
    let reached = progress.wait_for(|d| d.covers(point).is_some()).await.map_err(|_| StoreError::NotDurable)?;
    let outcome = reached.covers(point);
    outcome.unwrap_or(Err(StoreError::NotDurable))
}

/// How far the flusher got: every write up to `flushed` is on disk; the flush that was
/// to cover writes up to `failed` did not succeed (and no later one has yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durability {
    pub flushed: u64,
    pub failed: u64,
    /// Flushes done so far; with the write count, how many writes each flush covered.
    pub flushes: u64,
}

impl Durability {
    /// `Some(Ok)` once `point` is on disk, `Some(Err)` if its flush failed, `None` while
    /// it is still to come.
    pub fn covers(&self, point: u64) -> Option<Result<(), StoreError>> {
        if self.flushed >= point {
            Some(Ok(()))
        } else if self.failed >= point {
            Some(Err(StoreError::NotDurable))
        } else {
            None
        }
    }
}

/// The group-commit flusher shared by a store and its thread.
struct Commits {
    state: Mutex<CommitState>,
    /// Wakes the flusher: something was written, or the store is closing.
    work: Condvar,
    /// Wakes blocking waiters after each flush.
    done: Condvar,
    progress: tokio::sync::watch::Sender<Durability>,
}

#[derive(Default)]
struct CommitState {
    written: u64,
    /// Highest point a flush was attempted for.
    attempted: u64,
    durability: Durability,
    closing: bool,
}

impl Commits {
    fn state(&self) -> std::sync::MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one applied write and wakes the flusher.
    fn wrote(&self) {
        self.state().written += 1;
        self.work.notify_one();
    }

    /// The flusher thread: flushes while there are writes no flush has covered, then
    /// sleeps until there are more. Flushes what is left before the store closes.
    fn run(&self, db: &sled::Db) {
        loop {
            let target = {
                let mut state = self.state();
                loop {
                    if state.written > state.attempted {
                        break;
                    }
                    if state.closing {
                        return;
                    }
                    state = self.work.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                state.attempted = state.written;
                state.written
            };
            let result = db.flush();
            let mut state = self.state();
            match result {
                Ok(_) => {
                    state.durability.flushed = target;
                    state.durability.flushes += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "history database flush failed");
                    state.durability.failed = target;
                }
            }
            // Publish to async watchers under the lock, so that anyone who sees this
            // flush through the lock (a blocking waiter) also sees it through the watch.
            self.progress.send_replace(state.durability);
            drop(state);
            self.done.notify_all();
        }
    }
}

pub struct SledStore {
    history: sled::Tree,
    contacts: sled::Tree,
    /// Serialises history writes, so a check and the batch that follows are atomic.
    write: Mutex<()>,
    commits: Arc<Commits>,
    flusher: Option<JoinHandle<()>>,
}

const MESSAGE: u8 = b'm';
const ID: u8 = b'i';
const TIME: u8 = b't';

fn peer_prefix(peer: &Username) -> Vec<u8> {
    let mut k = Vec::with_capacity(34);
    k.push(MESSAGE);
    k.extend_from_slice(peer.as_str().as_bytes());
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
    let mut k = Vec::with_capacity(52);
    k.push(ID);
    k.extend_from_slice(peer.as_str().as_bytes());
    k.push(0);
    k.push(direction as u8);
    k.extend_from_slice(id);
    k
}

fn time_key(msg: &StoredMessage) -> Vec<u8> {
    let mut k = Vec::with_capacity(26);
    k.push(TIME);
    k.extend_from_slice(&msg.stored_at.to_be_bytes());
    k.extend_from_slice(&msg.id);
    k.push(msg.direction as u8);
    k
}

/// The batch that adds `msg` with both index entries.
fn insert_batch(batch: &mut sled::Batch, msg: &StoredMessage) {
    let key = message_key(msg);
    batch.insert(id_key(&msg.peer, msg.direction, &msg.id), key.as_slice());
    batch.insert(time_key(msg), key.as_slice());
    batch.insert(key, encode(msg));
}

/// Moves a schema-1 database's messages into the schema-2 tree. Safe to run again
/// after a crash part way: it rewrites the same keys, and the old trees go only after
/// the new schema number is on disk.
fn migrate_from_1(db: &sled::Db, history: &sled::Tree, meta: &sled::Tree) -> Result<(), StoreError> {
    let old = db.open_tree("messages")?;
    let mut batch = sled::Batch::default();
    for item in old.iter() {
        let msg: StoredMessage = decode(&item?.1, "message")?;
        insert_batch(&mut batch, &msg);
    }
    history.apply_batch(batch)?;
    db.flush()?;
    meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
    db.flush()?;
    for tree in ["messages", "ids", "by_time"] {
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
        let db = sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).open()?;
        let meta = db.open_tree("meta")?;
        let history = db.open_tree("history")?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let v: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("schema"))?;
                match u64::from_be_bytes(v) {
                    SCHEMA_VERSION => {}
                    1 => migrate_from_1(&db, &history, &meta)?,
                    v => return Err(StoreError::Schema(v)),
                }
            }
        }
        let commits = Arc::new(Commits {
            state: Mutex::new(CommitState::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            progress: tokio::sync::watch::channel(Durability::default()).0,
        });
        let flusher = {
            let (commits, db) = (commits.clone(), db.clone());
            std::thread::Builder::new()
                .name("sotto-history-flush".into())
                .spawn(move || commits.run(&db))
                .map_err(|e| StoreError::Db(sled::Error::Io(e)))?
        };
        Ok(Self { history, contacts: db.open_tree("contacts")?, write: Mutex::new(()), commits, flusher: Some(flusher) })
    }
}

impl Drop for SledStore {
    /// Flushes what is left and waits for the flusher, so the database can be opened
    /// again as soon as this returns.
    fn drop(&mut self) {
        self.commits.state().closing = true;
        self.commits.work.notify_one();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

impl Store for SledStore {
    fn insert(&self, msg: &StoredMessage) -> Result<bool, StoreError> {
        let idk = id_key(&msg.peer, msg.direction, &msg.id);
        let _write = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let (key, msg) = match self.history.get(&idk)? {
            Some(key) if self.history.contains_key(&key)? => return Ok(false),
            // A crash came between the index entry and the message: finish the write
            // under the key chosen then, so the message is stored exactly once.
            Some(key) => {
                let at: [u8; 8] = key
                    .len()
                    .checked_sub(24)
                    .and_then(|at| key.get(at..at + 8))
                    .and_then(|b| b.try_into().ok())
                    .ok_or(StoreError::Corrupt("id index"))?;
                (key.to_vec(), StoredMessage { stored_at: u64::from_be_bytes(at), ..msg.clone() })
            }
            None => (message_key(msg), msg.clone()),
        };
        // Index first, message last: any prefix of these writes that survives a crash
        // is completed by the next delivery of the same message (see above).
        self.history.insert(idk, key.as_slice())?;
        self.history.insert(time_key(&msg), key.as_slice())?;
        self.history.insert(key, encode(&msg))?;
        self.commits.wrote();
        Ok(true)
    }

    fn set_state(&self, peer: &Username, id: &[u8; 16], state: State) -> Result<bool, StoreError> {
        let _write = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let Some(key) = self.history.get(id_key(peer, Direction::Out, id))? else { return Ok(false) };
        let Some(bytes) = self.history.get(&key)? else { return Err(StoreError::Corrupt("id index")) };
        let mut msg: StoredMessage = decode(&bytes, "message")?;
        if msg.state != state {
            msg.state = state;
            self.history.insert(key, encode(&msg))?;
            self.commits.wrote();
        }
        Ok(true)
    }

    fn message(&self, peer: &Username, direction: Direction, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError> {
        let Some(key) = self.history.get(id_key(peer, direction, id))? else { return Ok(None) };
        self.history.get(key)?.map(|b| decode(&b, "message")).transpose()
    }

    fn last(&self, peer: Option<&Username>, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        match peer {
            Some(peer) => {
                for item in self.history.scan_prefix(peer_prefix(peer)).rev().take(limit) {
                    out.push(decode(&item?.1, "message")?);
                }
            }
            None => {
                for item in self.history.scan_prefix([TIME]).rev() {
                    if out.len() == limit {
                        break;
                    }
                    // An entry whose message is not there yet (being written, or cut
                    // short by a crash and not redelivered yet) is skipped.
                    if let Some(bytes) = self.history.get(item?.1)? {
                        out.push(decode(&bytes, "message")?);
                    }
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
        self.commits.state().written
    }

    fn wait_durable(&self, point: u64) -> Result<(), StoreError> {
        let mut state = self.commits.state();
        loop {
            if let Some(outcome) = state.durability.covers(point) {
                return outcome;
            }
            state = self.commits.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn durability(&self) -> tokio::sync::watch::Receiver<Durability> {
        self.commits.progress.subscribe()
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
    fn writes_count_toward_commit_points_and_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.written(), 0);
        s.insert(&msg("bob", 1, 10, Direction::Out)).unwrap();
        assert!(!s.insert(&msg("bob", 1, 10, Direction::Out)).unwrap());
        assert_eq!(s.written(), 1, "a duplicate writes nothing");
        s.set_state(&name("bob"), &[1; 16], State::Delivered).unwrap();
        assert!(!s.set_state(&name("bob"), &[9; 16], State::Delivered).unwrap());
        assert_eq!(s.written(), 2, "an unknown id writes nothing");
        let point = s.written();
        s.wait_durable(point).unwrap();
        assert!(s.durability().borrow().flushed >= point);
        assert!(s.durability().borrow().flushes >= 1);
    }

    #[test]
    fn concurrent_writers_all_reach_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..25u8 {
                        let mut m = msg("bob", i, 1000 + u64::from(t) * 100 + u64::from(i), Direction::In);
                        m.id[1] = t;
                        assert!(s.insert(&m).unwrap());
                        s.wait_durable(s.written()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let progress = *s.durability().borrow();
        assert_eq!(progress.flushed, 100);
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.last(None, 1000).unwrap().len(), 100);
    }

    #[test]
    fn async_waiters_wake_after_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for i in 0..10u8 {
                s.insert(&msg("bob", i, 10 + u64::from(i), Direction::In)).unwrap();
                durable(&s, s.written()).await.unwrap();
                assert!(s.durability().borrow().flushed > u64::from(i));
            }
        });
    }

    #[test]
    fn durability_answers_per_point() {
        let d = Durability { flushed: 5, failed: 8, flushes: 2 };
        assert!(matches!(d.covers(5), Some(Ok(()))));
        assert!(matches!(d.covers(7), Some(Err(StoreError::NotDurable))));
        assert!(d.covers(9).is_none());
    }

    #[test]
    fn a_message_cut_short_by_a_crash_is_completed_once_by_the_resend() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let first = msg("bob", 3, 500, Direction::In);
        // What survives a crash after the first of the three writes.
        s.history.insert(id_key(&first.peer, first.direction, &first.id), message_key(&first)).unwrap();
        s.history.insert(time_key(&first), message_key(&first)).unwrap();
        assert!(s.last(None, 10).unwrap().is_empty(), "a dangling index entry is not a message");
        let resent = StoredMessage { stored_at: 900, ..first.clone() };
        assert!(s.insert(&resent).unwrap(), "the resend completes the message");
        assert!(!s.insert(&resent).unwrap(), "and only once");
        let stored = s.last(Some(&name("bob")), 10).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].stored_at, 500, "under the key chosen the first time");
        assert_eq!(s.last(None, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_id_index_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let m = msg("bob", 4, 500, Direction::In);
        s.history.insert(id_key(&m.peer, m.direction, &m.id), &b"short"[..]).unwrap();
        assert!(matches!(s.insert(&m), Err(StoreError::Corrupt("id index"))));
    }

    #[test]
    fn schema_1_databases_are_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The schema-1 layout: three trees, keys without a kind byte.
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("meta").unwrap().insert("schema", &1u64.to_be_bytes()).unwrap();
            let (messages, ids, by_time) =
                (db.open_tree("messages").unwrap(), db.open_tree("ids").unwrap(), db.open_tree("by_time").unwrap());
            for i in 0..5u8 {
                let m = msg(if i < 3 { "bob" } else { "carol" }, i, 100 + u64::from(i), Direction::In);
                let key = [&message_key(&m)[1..]].concat();
                messages.insert(&key, encode(&m)).unwrap();
                ids.insert(&id_key(&m.peer, m.direction, &m.id)[1..], key.as_slice()).unwrap();
                by_time.insert(&time_key(&m)[1..], key.as_slice()).unwrap();
            }
            db.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        let bob = s.last(Some(&name("bob")), 10).unwrap();
        assert_eq!(bob.iter().map(|m| m.id[0]).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(s.last(None, 10).unwrap().len(), 5);
        assert!(!s.insert(&msg("carol", 4, 999, Direction::In)).unwrap(), "the id index came across");
        drop(s);
        let db = sled::open(dir.path()).unwrap();
        assert!(!db.tree_names().iter().any(|t| t.as_ref() == b"messages"), "the old trees are gone");
        assert_eq!(db.open_tree("meta").unwrap().get("schema").unwrap().unwrap().as_ref(), &2u64.to_be_bytes());
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
        drop(s);
        sled::open(dir.path()).unwrap().open_tree("meta").unwrap().insert("schema", &9u64.to_be_bytes()).unwrap();
        assert!(matches!(SledStore::open(dir.path()), Err(StoreError::Schema(9))));
    }
}
