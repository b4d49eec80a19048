//! A profile's local database: message history, contacts and the handshake replay
//! guard, behind the [`Store`] trait; [`SledStore`] is the engine used today.
//!
//! sled trees (schema 5):
//!
//! ```text
//! meta       "schema" → 5 (schema 4: the same without the journal)
//!            "journal" → u64 BE: the number of the last journal record applied
//! chat       "m" ‖ peer ‖ 0 ‖ stored_at_ms (u64 BE) ‖ batch ‖ 3     → postcard(Vec<StoredMessage>), sent together
//!            "m" ‖ peer ‖ 0 ‖ stored_at_ms (u64 BE) ‖ batch ‖ 2     → postcard(Vec<StoredMessage>), received together
//!            "m" ‖ peer ‖ 0 ‖ stored_at_ms (u64 BE) ‖ id ‖ 1        → postcard(StoredMessage), sent, stored alone
//!            "m" ‖ peer ‖ 0 ‖ stored_at_ms (u64 BE) ‖ id ‖ 0        → postcard(StoredMessage), received by schema ≤ 3
//!            "s" ‖ peer ‖ 0 ‖ sent_at_ms >> 1 (u64 BE)              → postcard(Seen): incoming ids, where stored
//!            "s" ‖ peer ‖ 0 ‖ sent_at_ms >> 1 ‖ sent_at_ms ‖ id     → postcard(Place), once that bucket is full
//! contacts   username                                              → postcard(Contact)
//! ```
//!
//! Beside sled's files, the directory holds the journal's two segments, `journal-0` and
//! `journal-1` (their format is in `store/journal.rs`).
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
//! Durability is a journal in front of sled (`store/journal.rs`) and a group commit
//! (`store/commit.rs`). Each operation (a batch received, what one write sent, the
//! marks the acks of one batch make, a contact update) becomes one journal record,
//! numbered; under the write lock, the record is appended (in memory), its writes are
//! applied to sled, and its number is written to `meta` as the last one applied. A
//! write returns once it is applied. A flush writes out every record appended so far
//! and syncs it: one write and one `sync_file_range` (on a file system that overwrites
//! in place, inside the segment's pre-written length; `fdatasync` otherwise) on the
//! flushing thread. Nothing waits for sled's own flush any more (it runs on its own
//! every 500 ms, as it always did); at checkpoints, when one of the journal's two 2 MiB
//! segments is full, records go on in the other while a thread of the store's own
//! flushes sled and syncs its files (its log, its blob files, the directories); then the
//! full segment may be written over. Opening the store replays, in order, the records
//! numbered past the last one sled holds, then begins a new epoch in the journal. sled
//! recovers a prefix of its operations and the journal's synced records are a prefix of
//! them too, so what comes back after a crash is a prefix at least as long as either,
//! and a crash loses nothing a flush covered. Closing checkpoints and empties the
//! journal. A failed journal sync or checkpoint is final until the store is opened
//! again (SECURITY.md, peer sessions step 6, says what "on disk" means here).
//!
//! Why not sled's own flush: it hands the write to sled's pool of I/O threads, waking
//! each idle one in turn, and waits on a condition variable for the one that wrote it.
//! Measured here, about 190 µs of CPU a flush, mostly context switches, where the
//! journal's sync from the calling thread costs about 45 µs (p50 85 µs against 190 µs).
//! On two cores a sender's and a receiver's flushes running at once slowed every
//! round trip by about 0.15× of its baseline (docs/PERFORMANCE.md).
//!
//! Commit points count writes. A caller that must not go on before its write is on disk
//! (the sender before it reports a message sent, the receiver before it acknowledges
//! one) either takes a commit point with [`Store::written`] and waits for it with
//! [`durable`] or [`Store::wait_durable`] (the store's flusher thread starts on it at
//! once, or within 2 ms under load, and keeps flushing while points keep coming), or
//! flushes on its own thread with [`flush_in_place`] when no flush is under way. The
//! receiving session does the latter when it is otherwise idle: the flush then costs no
//! hand-off to another thread and back. A write nobody takes a point for reaches the
//! disk with the next flush, or within 100 ms (twice that at worst, when the linger ends
//! during a flush in place that began before the write). Under load (the last flush
//! covered eight writes or more, whoever made them, a batch of messages counting one
//! per message) the next flush waits until 2 ms after the last one began, so that each
//! flush covers many writes. A message on an otherwise quiet store never waits for
//! that. Tasks waiting in [`durable`] are each woken once, by the flush that decides
//! their point.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::keys::{IdentityKey, NoiseBinding};
use crate::username::Username;

mod commit;
mod journal;
mod layout;
use commit::Commits;
pub use commit::{durable, flush_in_place, Durability};
use journal::{Disk, Journal, TreeId, Write};
use layout::*;

pub const SCHEMA_VERSION: u64 = 5;

/// The `meta` key holding the number of the last journal record applied (u64 BE).
const APPLIED: &str = "journal";

/// The number of the last journal record sled holds, 0 before the first.
fn applied_record(meta: &sled::Tree) -> Result<u64, StoreError> {
    let Some(v) = meta.get(APPLIED)? else { return Ok(0) };
    let n = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt("journal number"))?);
    if n >= journal::MAX_SEQ {
        return Err(StoreError::Corrupt("journal number"));
    }
    Ok(n)
}

/// Opens the journal, applies the records numbered past the last one sled holds, and
/// begins a new epoch (see the module docs). A new or `migrated` database is
/// checkpointed first, so its schema number is on disk before any record.
fn recover(
    dir: &Path,
    db: sled::Db,
    meta: &sled::Tree,
    chat: &sled::Tree,
    contacts: &sled::Tree,
    migrated: bool,
) -> Result<Arc<Disk>, StoreError> {
    let recovered = Journal::open(dir)?;
    let disk = Arc::new(Disk::new(db, recovered.journal, dir));
    let applied = applied_record(meta)?;
    let replay: Vec<_> = recovered.records.into_iter().filter(|r| r.seq > applied).collect();
    if replay.first().is_some_and(|r| r.seq != applied + 1) {
        return Err(StoreError::Corrupt("journal: records missing between the database and its journal"));
    }
    let last = replay.last().map_or(applied, |r| r.seq);
    for record in replay {
        for w in record.writes {
            tree_of(chat, contacts, w.tree).insert(w.key, w.value)?;
        }
    }
    // Every number a record found holds is taken as used, replayed or not (a pass
    // that did not join was never synced whole, and nothing in it was reported
    // durable), so that the next numbers follow on from sled's.
    let through = last.max(recovered.highest);
    if through > applied {
        meta.insert(APPLIED, &through.to_be_bytes())?;
    }
    if migrated || recovered.highest > 0 || through > applied {
        // What was read back is in sled on disk before the journal starts afresh.
        disk.checkpoint()?;
    }
    disk.journal.start(through + 1)?;
    Ok(disk)
}

/// Fails the journal when dropped: [`SledStore::commit`] forgets it once a record is
/// applied in full.
struct FailUnlessFinished<'j>(&'j Journal);

impl Drop for FailUnlessFinished<'_> {
    fn drop(&mut self) {
        self.0.fail();
    }
}

fn tree_of<'t>(chat: &'t sled::Tree, contacts: &'t sled::Tree, tree: TreeId) -> &'t sled::Tree {
    match tree {
        TreeId::Chat => chat,
        TreeId::Contacts => contacts,
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("history database: {0}")]
    Db(#[from] sled::Error),
    #[error("history journal: {0}")]
    Io(std::io::Error),
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
    /// unchanged); `f` may run more than once under contention, and must not use the
    /// store (it may run under the store's write lock).
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
    disk: Arc<Disk>,
    meta: sled::Tree,
    chat: sled::Tree,
    contacts: sled::Tree,
    /// Serialises writes, so that a check and the writes that follow are atomic, and
    /// sled applies records in the journal's order.
    write: Mutex<()>,
    /// Numbers this process's batches of incoming messages, so that batches stored in
    /// the same millisecond keep their order.
    batches: std::sync::atomic::AtomicU64,
    commits: Arc<Commits>,
    /// The flusher thread and the checkpoint thread.
    threads: Vec<JoinHandle<()>>,
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, commit::LINGER, commit::GATHER)
    }

    fn open_with(dir: &Path, linger: std::time::Duration, gather: std::time::Duration) -> Result<Self, StoreError> {
        // sled keeps its own timed flush (every 500 ms, with an fsync of its log): it
        // makes sled's state on disk newer, which the journal's numbering allows for,
        // and sled reuses its log's space on the strength of it.
        let db = sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).open()?;
        let meta = db.open_tree("meta")?;
        let chat = db.open_tree("chat")?;
        let contacts = db.open_tree("contacts")?;
        // A new or migrated database: its schema number goes to disk before any record.
        let migrated = match meta.get("schema")? {
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
                true
            }
            Some(v) => {
                let v: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("schema"))?;
                match u64::from_be_bytes(v) {
                    SCHEMA_VERSION => false,
                    v @ (1..=3) => {
                        migrate(&db, &chat, &meta, v)?;
                        true
                    }
                    // Schema 4 is schema 5's layout without the journal; the number
                    // changes so that no sotto that knows nothing of the journal opens a
                    // database whose journal holds records it would not replay.
                    4 => {
                        meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
                        true
                    }
                    v => return Err(StoreError::Schema(v)),
                }
            }
        };
        let disk = recover(dir, db, &meta, &chat, &contacts, migrated)?;
        let commits = Arc::new(Commits::new(linger, gather));
        let spawn = |name: &str, run: fn(&Commits, &Disk)| {
            let (commits, disk) = (commits.clone(), disk.clone());
            std::thread::Builder::new().name(name.into()).spawn(move || run(&commits, &disk)).map_err(StoreError::Io)
        };
        let flusher = spawn("sotto-history-flush", Commits::run)?;
        let checkpointer = spawn("sotto-history-checkpoint", Commits::run_checkpoints).inspect_err(|_| {
            commits.close();
        })?;
        let threads = vec![flusher, checkpointer];
        Ok(Self { chat, contacts, meta, disk, write: Mutex::new(()), batches: Default::default(), commits, threads })
    }

    /// Appends `writes` to the journal as one record, then applies them to sled, then
    /// records that number as applied (see the module docs); the caller holds the write
    /// lock. Applying a record that is in the journal must not fail half-way unnoticed:
    /// if it does, the journal takes nothing more until the store is opened again.
    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let appended = self.disk.journal.append(&writes)?;
        if appended.checkpoint_due {
            self.commits.want_checkpoint();
        }
        // Failing, or panicking, between here and the end leaves sled short of a record
        // the journal holds: the journal then takes nothing more.
        let unfinished = FailUnlessFinished(&self.disk.journal);
        writes
            .into_iter()
            .try_for_each(|w| self.tree(w.tree).insert(w.key, w.value).map(drop))
            .and_then(|()| self.meta.insert(APPLIED, &appended.seq.to_be_bytes()).map(drop))?;
        std::mem::forget(unfinished);
        Ok(())
    }

    fn tree(&self, tree: TreeId) -> &sled::Tree {
        tree_of(&self.chat, &self.contacts, tree)
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
        let (mut found, mut writes) = (0, Vec::new());
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
                writes.push(Write { tree: TreeId::Chat, key, value });
            }
        }
        let changed = writes.len() as u64;
        self.commit(writes)?;
        self.commits.wrote(changed);
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

    /// Adds to `writes` what stores the new messages among `msgs` that came from `peer`
    /// (see [`Store::receive`]), and says how many there are; the caller holds the write
    /// lock.
    fn receive_from(
        &self,
        peer: &Username,
        msgs: &[StoredMessage],
        added: &mut [bool],
        writes: &mut Vec<Write>,
    ) -> Result<u64, StoreError> {
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
            return Ok(0);
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
        for (key, seen, _) in buckets.into_iter().filter(|b| b.2) {
            writes.push(Write { tree: TreeId::Chat, key, value: encode(&seen) });
        }
        for (key, place) in overflow {
            writes.push(Write { tree: TreeId::Chat, key, value: encode(&place) });
        }
        for (place, batch) in &batches {
            writes.push(Write { tree: TreeId::Chat, key: place.key(peer), value: encode(batch) });
        }
        Ok(fresh.len() as u64)
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
    /// Flushes what is left, waits for the store's threads, and checkpoints, so the
    /// database can be opened again as soon as this returns, with nothing to replay.
    fn drop(&mut self) {
        self.commits.close();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // Everything in sled on disk, and nothing left for the next open to read back.
        if let Err(e) = self.disk.checkpoint().and_then(|()| self.disk.journal.clear()) {
            tracing::warn!(error = %e, "history database closed without a checkpoint; the next open replays its journal");
        }
    }
}

impl Store for SledStore {
    fn insert(&self, msg: &StoredMessage) -> Result<bool, StoreError> {
        if msg.direction == Direction::In {
            return Ok(self.receive(std::slice::from_ref(msg))?[0]);
        }
        let key = message_key(&msg.at());
        let _write = self.lock_writes();
        if self.chat.contains_key(&key)? {
            return Ok(false);
        }
        self.commit(vec![Write { tree: TreeId::Chat, key, value: encode(msg) }])?;
        self.commits.wrote(1);
        Ok(true)
    }

    fn receive(&self, msgs: &[StoredMessage]) -> Result<Vec<bool>, StoreError> {
        let mut added = vec![false; msgs.len()];
        let _write = self.lock_writes();
        let (mut done, mut writes, mut fresh): (Vec<&Username>, _, _) = (Vec::new(), Vec::new(), 0);
        for msg in msgs {
            if !done.contains(&&msg.peer) {
                fresh += self.receive_from(&msg.peer, msgs, &mut added, &mut writes)?;
                done.push(&msg.peer);
            }
        }
        self.commit(writes)?;
        self.commits.wrote(fresh);
        Ok(added)
    }

    fn store_sent(&self, msgs: &[&StoredMessage]) -> Result<Vec<Option<MessageRef>>, StoreError> {
        let mut refs = vec![None; msgs.len()];
        let _write = self.lock_writes();
        let (mut done, mut writes): (Vec<&Username>, _) = (Vec::new(), Vec::new());
        for msg in msgs.iter().filter(|m| m.direction == Direction::Out) {
            if done.contains(&&msg.peer) {
                continue;
            }
            done.push(&msg.peer);
            let theirs: Vec<usize> = (0..msgs.len()).filter(|&i| msgs[i].direction == Direction::Out && msgs[i].peer == msg.peer).collect();
            let batches = self.cut(&msg.peer, theirs.iter().map(|&i| msgs[i]), SENT_BATCH)?;
            for (place, batch) in &batches {
                writes.push(Write { tree: TreeId::Chat, key: place.key(&msg.peer), value: encode(batch) });
            }
            let places = batches.iter().flat_map(|(place, batch)| batch.iter().map(move |_| *place));
            for (&i, place) in theirs.iter().zip(places) {
                refs[i] = Some(MessageRef { batch: Some(place.id), stored_at: place.stored_at, ..msgs[i].at() });
            }
        }
        self.commit(writes)?;
        self.commits.wrote(refs.iter().flatten().count() as u64);
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
        let _write = self.lock_writes();
        self.commit(vec![Write { tree: TreeId::Contacts, key: contact.username.as_str().into(), value: encode(contact) }])?;
        self.commits.wrote(1);
        Ok(())
    }

    fn update_contact(
        &self,
        user: &Username,
        f: &mut dyn FnMut(Option<Contact>) -> Option<Contact>,
    ) -> Result<Option<Contact>, StoreError> {
        let _write = self.lock_writes();
        let current = self.contacts.get(user.as_str())?.map(|b| decode::<Contact>(&b, "contact")).transpose()?;
        let Some(new) = f(current.clone()) else { return Ok(current) };
        self.commit(vec![Write { tree: TreeId::Contacts, key: user.as_str().into(), value: encode(&new) }])?;
        self.commits.wrote(1);
        Ok(Some(new))
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
        self.commits.flush_here(&self.disk)
    }
}

#[cfg(test)]
mod tests;
