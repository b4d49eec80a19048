//! A profile's local database: message history, contacts and the handshake replay
//! guard, behind the [`Store`] trait; [`SledStore`] is the engine used today.
//!
//! sled trees (schema 4):
//!
//! ```text
//! meta       "schema" → 4
//! chat       "m" ‖ peer ‖ 0 ‖ stored_at_ms (u64 BE) ‖ batch ‖ 3     → postcard(Vec<StoredMessage>), sent together
//!            "m" ‖ peer ‖ 0 ‖ stored_at_ms (u64 BE) ‖ batch ‖ 2     → postcard(Vec<StoredMessage>), received together
//!            "m" ‖ peer ‖ 0 ‖ stored_at_ms (u64 BE) ‖ id ‖ 1        → postcard(StoredMessage), sent, stored alone
//!            "m" ‖ peer ‖ 0 ‖ stored_at_ms (u64 BE) ‖ id ‖ 0        → postcard(StoredMessage), received by schema ≤ 3
//!            "s" ‖ peer ‖ 0 ‖ sent_at_ms >> 1 (u64 BE)              → postcard(Seen): incoming ids, where stored
//!            "s" ‖ peer ‖ 0 ‖ sent_at_ms >> 1 ‖ sent_at_ms ‖ id     → postcard(Place), once that bucket is full
//! contacts   username                                              → postcard(Contact)
//! ```
//!
//! "Last N with bob" is one reverse prefix scan of `m`; "last N overall" merges the
//! reverse scans of every peer's prefix. A batch's 16 bytes are a number counting this
//! process's batches and 8 bytes of its first id, so batches stored in the same
//! millisecond keep their order.
//!
//! What a peer sends in one go is stored in one go ([`Store::receive`]): the messages
//! go into batch values of about 4 KiB, and their ids into the buckets of `s`, keyed
//! by the sender's clock, which a resend carries unchanged. Likewise what a session
//! sends in one write is stored, pending, in one go as soon as the write is with the
//! stream, before any ack is read (before the write, when the stream must be waited
//! for) ([`Store::store_sent`]), and the acks that come back together mark their messages
//! delivered in one go ([`Store::mark_delivered`]): the session keeps each message's
//! [`MessageRef`], which finds its batch directly. A batch is a write or two whatever
//! it holds (an incoming one, one more per 2 ms of the sender's clock it spans), where
//! storing messages one by one took two writes each on either side: each sled write clones and relinks a tree node, and later frees the
//! old one, at 10 µs or more of CPU. The buckets are bounded (64 ids; past that, each
//! id is an entry of its own), so a sender whose clock stands still costs a write per
//! message and no more. A message that no session took (its sender gave up first) is
//! stored alone, as failed. Each write is a plain insert: sled's batches and
//! transactions take a process-wide lock that waits for every flush in progress, which
//! made each write cost a whole flush.
//!
//! The ids are written first, the batches after, under the store's own lock. sled
//! recovers a prefix of its log after a crash, so a cut-short batch leaves ids whose
//! place holds nothing; their sender never got an ack (acks wait for the flush), sends
//! them again, and the retry is stored and its id moved to the new place, so each
//! message is stored exactly once. Schemas 1 to 3 are migrated on open.
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
//! Under load (the last flush covered eight writes or more, whoever made them, a batch
//! of messages counting one per message) the next
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
mod layout;
use commit::Commits;
pub use commit::{durable, flush_in_place, Durability};
use layout::*;

pub const SCHEMA_VERSION: u64 = 4;

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

/// Where an outgoing message is kept: enough to find it again without an index. (An
/// incoming one is found by its sender's `sent_at` and id: [`Store::incoming`].)
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MessageRef {
    pub peer: Username,
    pub direction: Direction,
    pub stored_at: u64,
    pub id: [u8; 16],
    /// The batch it was stored in with others ([`Store::store_sent`]), if any.
    pub batch: Option<[u8; 16]>,
}

impl StoredMessage {
    /// Where [`Store::insert`] keeps it.
    pub fn at(&self) -> MessageRef {
        MessageRef { peer: self.peer.clone(), direction: self.direction, stored_at: self.stored_at, id: self.id, batch: None }
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
    /// Adds a message; `true` if added. An outgoing message is added unless that very
    /// message (same [`MessageRef`]) exists; an incoming one as by [`receive`](Store::receive).
    fn insert(&self, msg: &StoredMessage) -> Result<bool, StoreError>;
    /// Adds incoming messages (others are refused), in order, together: a few writes
    /// however many there are. For each, `true` if added: a message is added unless one
    /// from the same peer with the same id and `sent_at` is stored (a resend is stored
    /// once, whenever it comes) or came earlier in `msgs`.
    fn receive(&self, msgs: &[StoredMessage]) -> Result<Vec<bool>, StoreError>;
    /// Adds outgoing messages together, as they go out: a write or two however many
    /// there are. Returns where each is kept (`None` for a message that is not
    /// outgoing, which is not stored).
    fn store_sent(&self, msgs: &[&StoredMessage]) -> Result<Vec<Option<MessageRef>>, StoreError>;
    /// Sets the state of an outgoing message; `false` if there is no outgoing message
    /// at `at`.
    fn set_state(&self, at: &MessageRef, state: State) -> Result<bool, StoreError>;
    /// Marks outgoing messages delivered, one write for those kept together; how many
    /// of them were found.
    fn mark_delivered(&self, refs: &[MessageRef]) -> Result<usize, StoreError>;
    /// Marks an outgoing message failed if it is still pending, in one step: an ack that
    /// marked it delivered meanwhile wins. `true` if it was marked.
    fn fail_pending(&self, at: &MessageRef) -> Result<bool, StoreError>;
    fn message(&self, at: &MessageRef) -> Result<Option<StoredMessage>, StoreError>;
    /// The incoming message from `peer` with this `sent_at` and id, wherever it was filed.
    fn incoming(&self, peer: &Username, sent_at: u64, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError>;
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
    /// Numbers this process's batches of incoming messages, so that batches stored in
    /// the same millisecond keep their order.
    batches: std::sync::atomic::AtomicU64,
    commits: Arc<Commits>,
    flusher: Option<JoinHandle<()>>,
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
                    v @ (1..=3) => migrate(&db, &chat, &meta, v)?,
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
        Ok(Self {
            chat,
            contacts: db.open_tree("contacts")?,
            db,
            write: Mutex::new(()),
            batches: Default::default(),
            commits,
            flusher: Some(flusher),
        })
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets an outgoing message's state to `next(current)` (`None` leaves it) under the
    /// write lock; `false` if there is no outgoing message at `at`.
    fn change_state(&self, at: &MessageRef, next: &mut dyn FnMut(State) -> Option<State>) -> Result<bool, StoreError> {
        let _write = self.lock_writes();
        self.change_states(std::slice::from_ref(at), next).map(|found| found == 1)
    }

    /// [`change_state`](Self::change_state) for several messages, each value they are
    /// kept in read and written once; the caller holds the write lock. Returns how many
    /// were found.
    fn change_states(&self, refs: &[MessageRef], next: &mut dyn FnMut(State) -> Option<State>) -> Result<usize, StoreError> {
        let mut by_key: std::collections::HashMap<Vec<u8>, (bool, Vec<[u8; 16]>)> = std::collections::HashMap::new();
        for at in refs.iter().filter(|at| at.direction == Direction::Out) {
            by_key.entry(message_key(at)).or_insert_with(|| (at.batch.is_some(), Vec::new())).1.push(at.id);
        }
        let mut found = 0;
        for (key, (batch, ids)) in by_key {
            let Some(bytes) = self.chat.get(&key)? else { continue };
            let mut msgs = messages_in(&key, &bytes)?;
            let mut changed = false;
            for msg in msgs.iter_mut().filter(|m| m.direction == Direction::Out && ids.contains(&m.id)) {
                found += 1;
                if let Some(state) = next(msg.state).filter(|s| *s != msg.state) {
                    msg.state = state;
                    changed = true;
                }
            }
            if changed {
                let value = if batch { encode(&msgs) } else { encode(&msgs[0]) };
                self.chat.insert(key, value)?;
                self.commits.wrote(1);
            }
        }
        Ok(found)
    }

    /// Cuts `peer`'s messages into batch values of about [`BATCH_BYTES`], each under a
    /// new place of its own of `kind`, in order; the caller holds the write lock.
    fn cut<'m>(
        &self,
        peer: &Username,
        msgs: impl Iterator<Item = &'m StoredMessage>,
        kind: u8,
    ) -> Result<Vec<(Place, Vec<&'m StoredMessage>)>, StoreError> {
        let mut batches: Vec<(Place, Vec<&StoredMessage>)> = Vec::new();
        let mut size = BATCH_BYTES;
        for msg in msgs {
            let len = msg.body.len() + msg.peer.as_str().len() + 64;
            if size + len > BATCH_BYTES {
                batches.push((self.new_place(peer, msg, kind)?, Vec::new()));
                size = 0;
            }
            size += len;
            batches.last_mut().expect("a batch was begun").1.push(msg);
        }
        Ok(batches)
    }

    /// A place for a batch beginning with `first`, where nothing is stored: the number
    /// orders this process's batches, and one stored under the same time and number
    /// before a restart (the clock went back) is not overwritten.
    fn new_place(&self, peer: &Username, first: &StoredMessage, kind: u8) -> Result<Place, StoreError> {
        loop {
            let n = self.batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_be_bytes());
            id[8..].copy_from_slice(&first.id[..8]);
            let place = Place { stored_at: first.stored_at, id, kind };
            if !self.chat.contains_key(place.key(peer))? {
                return Ok(place);
            }
        }
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
        let mut scans: Vec<Newest> = self.peer_prefixes()?.into_iter().map(|p| Newest::new(&self.chat, p)).collect();
        let mut heads = std::collections::BinaryHeap::with_capacity(scans.len());
        for (i, scan) in scans.iter_mut().enumerate() {
            heads.extend(Head::next(scan, i)?);
        }
        let mut out = Vec::with_capacity(limit.min(1024));
        while out.len() < limit {
            let Some(head) = heads.pop() else { break };
            heads.extend(Head::next(&mut scans[head.scan], head.scan)?);
            out.push(head.msg);
        }
        Ok(out)
    }

    /// Stores the new messages among `msgs` that came from `peer` (see
    /// [`Store::receive`]); the caller holds the write lock.
    fn receive_from(&self, peer: &Username, msgs: &[StoredMessage], added: &mut [bool]) -> Result<(), StoreError> {
        let mut buckets: Vec<(Vec<u8>, Seen, bool)> = Vec::new();
        let mut taken = std::collections::HashSet::new();
        let mut fresh = Vec::new();
        for (i, msg) in msgs.iter().enumerate() {
            if &msg.peer != peer || msg.direction != Direction::In || !taken.insert((msg.sent_at, msg.id)) {
                continue;
            }
            let key = seen_key(peer, msg.sent_at);
            let b = match buckets.iter().position(|(k, ..)| *k == key) {
                Some(b) => b,
                None => {
                    let seen = self.chat.get(&key)?.map(|v| Seen::read(&v)).transpose()?.unwrap_or_default();
                    buckets.push((key, seen, false));
                    buckets.len() - 1
                }
            };
            let (key, seen, _) = &buckets[b];
            // An id whose message is missing was recorded just before a crash cut the
            // write short (the sender got no ack for it): this copy completes it.
            if let Some(place) = self.place_of(key, seen, msg.sent_at, &msg.id)? {
                if self.stored_at_place(peer, place, &msg.id)?.is_some() {
                    continue;
                }
            }
            fresh.push((i, b));
        }
        if fresh.is_empty() {
            return Ok(());
        }
        // Cut into batches, each recorded under its place; ids first, messages last.
        let batches = self.cut(peer, fresh.iter().map(|&(i, _)| &msgs[i]), BATCH)?;
        let places = batches.iter().flat_map(|(place, batch)| batch.iter().map(move |_| *place));
        let mut overflow = Vec::new();
        for (&(i, b), place) in fresh.iter().zip(places) {
            let msg = &msgs[i];
            let (key, seen, changed) = &mut buckets[b];
            let was_full = seen.full;
            let fits = seen.set(msg.sent_at, msg.id, place);
            // A bucket that only resends touched, or that was full already, stays as it is.
            *changed |= fits || !was_full;
            if !fits {
                overflow.push((overflow_key(key, msg.sent_at, &msg.id), place));
            }
            added[i] = true;
        }
        for (key, seen, _) in buckets.iter().filter(|b| b.2) {
            self.chat.insert(key.as_slice(), encode(seen))?;
        }
        for (key, place) in &overflow {
            self.chat.insert(key.as_slice(), encode(place))?;
        }
        for (place, batch) in &batches {
            self.chat.insert(place.key(peer), encode(batch))?;
        }
        self.commits.wrote(fresh.len() as u64);
        Ok(())
    }

    /// Where the id was recorded, in the bucket at `bucket` or, once that is full, in an
    /// entry of its own.
    fn place_of(&self, bucket: &[u8], seen: &Seen, sent_at: u64, id: &[u8; 16]) -> Result<Option<Place>, StoreError> {
        match seen.find(sent_at, id)? {
            Some(place) => Ok(Some(place)),
            None if seen.full => self.chat.get(overflow_key(bucket, sent_at, id))?.map(|v| decode(&v, "id entry")).transpose(),
            None => Ok(None),
        }
    }

    /// The message `id`, if the message key at `place` holds it.
    fn stored_at_place(&self, peer: &Username, place: Place, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError> {
        let key = place.key(peer);
        let Some(value) = self.chat.get(&key)? else { return Ok(None) };
        Ok(messages_in(&key, &value)?.into_iter().find(|m| &m.id == id))
    }
}

/// One peer's messages, newest first: a reverse scan of its prefix that opens batches.
struct Newest {
    scan: std::iter::Rev<sled::Iter>,
    prefix_len: usize,
    /// The key of the value being read, and what is left of it, oldest first.
    key: sled::IVec,
    held: Vec<StoredMessage>,
}

impl Newest {
    fn new(chat: &sled::Tree, prefix: Vec<u8>) -> Self {
        Self { prefix_len: prefix.len(), scan: chat.scan_prefix(prefix).rev(), key: sled::IVec::default(), held: Vec::new() }
    }

    fn next(&mut self) -> Result<Option<StoredMessage>, StoreError> {
        loop {
            if let Some(msg) = self.held.pop() {
                return Ok(Some(msg));
            }
            let Some(item) = self.scan.next() else { return Ok(None) };
            let (key, value) = item?;
            if key.len() != self.prefix_len + 8 + 16 + 1 {
                return Err(StoreError::Corrupt("message key"));
            }
            let batch = key.last().is_some_and(|&k| k == BATCH || k == SENT_BATCH);
            self.key = key;
            if !batch {
                return decode(&value, "message").map(Some);
            }
            self.held = decode(&value, "message batch")?;
        }
    }

    /// The key after the peer's prefix (time, id, kind) of the message `next` gave.
    fn place(&self) -> &[u8] {
        &self.key[self.prefix_len..]
    }
}

/// The next message of one peer's reverse scan, ordered for the merge by time, id,
/// kind, place within its batch and then peer, so the order is total.
struct Head {
    order: (Vec<u8>, usize),
    peer: Username,
    scan: usize,
    msg: StoredMessage,
}

impl Head {
    fn next(scan: &mut Newest, index: usize) -> Result<Option<Head>, StoreError> {
        Ok(scan.next()?.map(|msg| Head { order: (scan.place().to_vec(), scan.held.len()), peer: msg.peer.clone(), scan: index, msg }))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Head {}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.order, self.peer.as_str()).cmp(&(&other.order, other.peer.as_str()))
    }
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
        if msg.direction == Direction::In {
            return Ok(self.receive(std::slice::from_ref(msg))?[0]);
        }
        let added = self.chat.compare_and_swap(message_key(&msg.at()), None::<&[u8]>, Some(encode(msg)))?.is_ok();
        if added {
            self.commits.wrote(1);
        }
        Ok(added)
    }

    fn receive(&self, msgs: &[StoredMessage]) -> Result<Vec<bool>, StoreError> {
        let mut added = vec![false; msgs.len()];
        let _write = self.lock_writes();
        let mut done: Vec<&Username> = Vec::new();
        for msg in msgs {
            if !done.contains(&&msg.peer) {
                self.receive_from(&msg.peer, msgs, &mut added)?;
                done.push(&msg.peer);
            }
        }
        Ok(added)
    }

    fn store_sent(&self, msgs: &[&StoredMessage]) -> Result<Vec<Option<MessageRef>>, StoreError> {
        let mut refs = vec![None; msgs.len()];
        let _write = self.lock_writes();
        let mut done: Vec<&Username> = Vec::new();
        for msg in msgs.iter().filter(|m| m.direction == Direction::Out) {
            if done.contains(&&msg.peer) {
                continue;
            }
            done.push(&msg.peer);
            let theirs: Vec<usize> = (0..msgs.len()).filter(|&i| msgs[i].direction == Direction::Out && msgs[i].peer == msg.peer).collect();
            let batches = self.cut(&msg.peer, theirs.iter().map(|&i| msgs[i]), SENT_BATCH)?;
            for (place, batch) in &batches {
                self.chat.insert(place.key(&msg.peer), encode(batch))?;
                self.commits.wrote(batch.len() as u64);
            }
            let places = batches.iter().flat_map(|(place, batch)| batch.iter().map(move |_| *place));
            for (&i, place) in theirs.iter().zip(places) {
                refs[i] = Some(MessageRef { batch: Some(place.id), stored_at: place.stored_at, ..msgs[i].at() });
            }
        }
        Ok(refs)
    }

    fn set_state(&self, at: &MessageRef, state: State) -> Result<bool, StoreError> {
        self.change_state(at, &mut |_| Some(state))
    }

    fn mark_delivered(&self, refs: &[MessageRef]) -> Result<usize, StoreError> {
        let _write = self.lock_writes();
        self.change_states(refs, &mut |_| Some(State::Delivered))
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
        let key = message_key(at);
        let Some(value) = self.chat.get(&key)? else { return Ok(None) };
        Ok(messages_in(&key, &value)?.into_iter().find(|m| m.id == at.id && m.direction == at.direction && m.peer == at.peer))
    }

    fn incoming(&self, peer: &Username, sent_at: u64, id: &[u8; 16]) -> Result<Option<StoredMessage>, StoreError> {
        let key = seen_key(peer, sent_at);
        let Some(seen) = self.chat.get(&key)?.map(|v| Seen::read(&v)).transpose()? else { return Ok(None) };
        match self.place_of(&key, &seen, sent_at, id)? {
            Some(place) => self.stored_at_place(peer, place, id),
            None => Ok(None),
        }
    }

    fn last(&self, peer: Option<&Username>, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = match peer {
            Some(peer) => {
                let mut out = Vec::with_capacity(limit.min(1024));
                let mut newest = Newest::new(&self.chat, peer_prefix(peer));
                while out.len() < limit {
                    let Some(msg) = newest.next()? else { break };
                    out.push(msg);
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
        self.commits.wrote(1);
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
                self.commits.wrote(1);
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
