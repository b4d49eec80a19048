//! The history store's journal: every change [`SledStore`](super::SledStore) makes to
//! sled is appended here first, as one record, and making writes durable means syncing
//! the journal, one system call on the calling thread, instead of flushing sled. sled
//! is flushed only at checkpoints, after which a segment of the journal is written over;
//! on open, the records sled may have lost are applied again. This module owns the
//! segment files, the record format, the syncs and what recovery reads back; it never
//! touches sled's trees itself (the store applies records, [`Disk::checkpoint`] only
//! flushes).
//!
//! Why: sled's flush hands the write to a pool of sled's threads, waking every idle one
//! of them, and waits for the one that wrote it: measured here, about 190 µs of CPU per
//! flush, mostly context switches, against 45 µs for one `sync_file_range` of the same
//! bytes from the calling thread. See the parent module's docs for the whole picture.
//!
//! Two segment files, `journal-0` and `journal-1`, are written in turn. Each is made
//! once, full size, with zeros written and synced (so overwriting it later allocates
//! nothing), and begins with a 24-byte header. Records follow the header, the current
//! pass first, then whatever an earlier pass left. All integers are little-endian:
//!
//! ```text
//! segment = "sotto-journal/1\n" ‖ epoch: u64 ‖ record* ‖ (stale bytes)
//! record  = body_len: u32 ‖ crc32: u32 of (epoch ‖ seq ‖ body) ‖ seq: u64 ‖ body
//! body    = write+
//! write   = tree: u8 (0 chat, 1 contacts) ‖ key_len: u32 ‖ key ‖ value_len: u32 ‖ value
//! ```
//!
//! Record numbers (`seq`) count up from 1, stay below 2^62, and are never used twice.
//! Each open of the store begins a new epoch, a random number written into both
//! headers (and synced) before any record: a record written under an earlier epoch
//! fails its checksum under the new one, however its number compares, so nothing a
//! crash left lying past a damaged record can ever be read back as new. A segment's pass
//! is read from its start while each record is whole, its checksum holds under the
//! segment's epoch and its number follows the one before; the first record that fails
//! any of these ends it (a record cut short by a crash, or one of an earlier pass or
//! epoch). The two passes are joined only if the later one begins right after the
//! earlier one ends.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use super::StoreError;

mod disk;
mod format;
#[cfg(test)]
mod tests;
pub(super) use disk::Disk;
use disk::{overwrites_in_place, sync_dir, sync_range};
use format::*;
pub(super) use format::{Record, TreeId, Write, MAX_SEQ};

/// The size a segment is made at; once one holds this much, the next record goes to the
/// other segment (when a checkpoint has freed it) and a checkpoint of this one begins.
pub(super) const SEGMENT_BYTES: u64 = 2 << 20;

struct Segment {
    file: Arc<File>,
    /// Where the next record goes.
    end: u64,
    /// The file's first `durable` bytes are allocated and on disk, its size included:
    /// bytes written over inside them need only be written back.
    durable: u64,
    /// Records appended since the last sync, not written to the file yet: they go at
    /// `end - pending.len()`.
    pending: Vec<u8>,
}

struct State {
    segments: [Segment; 2],
    /// This open's epoch, in both segments' headers since [`Journal::start`].
    epoch: u64,
    active: usize,
    next_seq: u64,
    /// The other segment's records are all in sled on disk: it may be written over.
    other_free: bool,
    /// A checkpoint of the other segment is running.
    checkpointing: bool,
    /// A sync, or applying a record, failed: nothing more is taken, and no later sync
    /// is trusted (a failed sync may have dropped the data it was to write).
    failed: bool,
}

/// One segment's part of a sync: its pending records, where they go, and whether
/// writing them back is enough.
struct WriteOut {
    file: Arc<File>,
    segment: usize,
    data: Vec<u8>,
    at: u64,
    in_place: bool,
}

/// What [`Journal::append`] did.
pub(super) struct Appended {
    pub(super) seq: u64,
    /// A segment is full and the other is not free yet, or the record began the other
    /// segment: a checkpoint should run.
    pub(super) checkpoint_due: bool,
}

pub(super) struct Journal {
    state: Mutex<State>,
    /// Held by [`sync`](Self::sync), the only writer of records to the files: their
    /// writes land in the order the syncs ran.
    syncing: Mutex<()>,
    /// The file system overwrites allocated blocks in place, so `sync_file_range` makes
    /// bytes written over inside a segment durable (ext2/3/4, XFS, tmpfs). Elsewhere
    /// (copy-on-write file systems) every sync is an `fdatasync`.
    in_place: bool,
}

/// The journal as found on open, before anything is written to it.
pub(super) struct Recovered {
    pub(super) journal: Journal,
    /// The records of the joined passes, oldest first (see [`join_passes`]).
    pub(super) records: Vec<Record>,
    /// The highest record number found in either segment, joined or not.
    pub(super) highest: u64,
}

impl Journal {
    /// Opens the segments in `dir`, making any that is missing, and reads back what they
    /// hold. Nothing is written until [`start`](Self::start).
    pub(super) fn open(dir: &Path) -> Result<Recovered, StoreError> {
        let mut passes = Vec::with_capacity(2);
        let mut segments = Vec::with_capacity(2);
        for i in 0..2 {
            let file = open_segment(dir, i)?;
            let durable = file.metadata().map_err(StoreError::Io)?.len();
            passes.push(read_pass(&file)?);
            segments.push(Segment { file: Arc::new(file), end: HEADER, durable, pending: Vec::new() });
        }
        let highest = passes.iter().filter_map(|p| p.last()).map(|r| r.seq).max().unwrap_or(0);
        let b = passes.pop().expect("two passes");
        let a = passes.pop().expect("two passes");
        let records = join_passes(a, b);
        let segments: [Segment; 2] = segments.try_into().unwrap_or_else(|_| unreachable!("two segments"));
        let state = State { segments, epoch: 0, active: 0, next_seq: highest + 1, other_free: true, checkpointing: false, failed: false };
        let in_place = overwrites_in_place(dir);
        tracing::debug!(
            in_place,
            "history journal opened; records are synced with {}",
            if in_place { "sync_file_range" } else { "fdatasync" }
        );
        let journal = Journal { state: Mutex::new(state), syncing: Mutex::new(()), in_place };
        Ok(Recovered { journal, records, highest })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Begins writing: a new epoch goes into both headers, each segment's first record
    /// header is zeroed, and both are synced; the next record is numbered `next_seq` and
    /// goes to the start of the first segment. Every record either segment holds must be
    /// in sled on disk by now (the store checkpoints after replaying).
    pub(super) fn start(&self, next_seq: u64) -> Result<(), StoreError> {
        if next_seq >= MAX_SEQ {
            return Err(StoreError::Corrupt("journal record numbers used up"));
        }
        let mut st = self.state();
        let epoch = rand::random::<u64>();
        let mut header = [0u8; 8 + RECORD_HEADER];
        header[..8].copy_from_slice(&epoch.to_le_bytes());
        for seg in &st.segments {
            seg.file.write_all_at(&header, EPOCH_AT).map_err(StoreError::Io)?;
            self.sync_bytes(&seg.file, EPOCH_AT, HEADER + RECORD_HEADER as u64).map_err(StoreError::Io)?;
        }
        st.epoch = epoch;
        st.next_seq = next_seq;
        st.active = 0;
        st.other_free = true;
        for seg in &mut st.segments {
            seg.end = HEADER;
            seg.pending.clear();
        }
        Ok(())
    }

    /// Syncs bytes written over inside a segment's first, pre-written part.
    fn sync_bytes(&self, file: &File, from: u64, to: u64) -> std::io::Result<()> {
        if self.in_place {
            sync_range(file, from, to)
        } else {
            file.sync_data()
        }
    }

    /// Appends one record of `writes`, in memory: the next [`sync`](Self::sync) writes
    /// it out. The caller holds the store's write lock and applies the writes to sled
    /// right after, in the same order as records are numbered.
    pub(super) fn append(&self, writes: &[Write]) -> Result<Appended, StoreError> {
        let mut st = self.state();
        if st.failed {
            return Err(StoreError::NotDurable);
        }
        let (seq, epoch) = (st.next_seq, st.epoch);
        if seq >= MAX_SEQ {
            return Err(StoreError::Corrupt("journal record numbers used up"));
        }
        let active = st.active;
        let mut pending = std::mem::take(&mut st.segments[active].pending);
        let before = pending.len();
        let encoded = encode_record(epoch, seq, writes, &mut pending);
        st.segments[active].pending = pending;
        encoded?;
        let len = (st.segments[active].pending.len() - before) as u64;
        let mut checkpoint_due = false;
        let full = {
            let seg = &st.segments[active];
            seg.end > HEADER && seg.end + len > seg.durable.max(SEGMENT_BYTES)
        };
        if full {
            if st.other_free {
                // The record begins the other segment instead.
                let record = st.segments[active].pending.split_off(before);
                let next = 1 - active;
                st.active = next;
                st.other_free = false;
                let seg = &mut st.segments[next];
                seg.end = HEADER;
                // Whatever was left of its last pass is in sled on disk already.
                seg.pending = record;
                checkpoint_due = true;
            } else {
                // The checkpoint that frees the other is running, or failed and is tried
                // again: this segment grows meanwhile.
                checkpoint_due = !st.checkpointing;
            }
        }
        let active = st.active;
        st.segments[active].end += len;
        st.next_seq += 1;
        Ok(Appended { seq, checkpoint_due })
    }

    /// Stops all writing and syncing: applying a record to sled failed, so what sled
    /// holds and what the journal says no longer agree until the next open replays it.
    pub(super) fn fail(&self) {
        self.state().failed = true;
    }

    /// Makes every record appended so far durable: writes out what is pending and syncs
    /// it, the other segment first, then the active one, so that what is on disk is
    /// always a prefix of the records. Once a sync fails, every later one fails too.
    pub(super) fn sync(&self) -> Result<(), StoreError> {
        let _syncing = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let jobs: Vec<WriteOut> = {
            let mut st = self.state();
            if st.failed {
                return Err(StoreError::NotDurable);
            }
            let order = [1 - st.active, st.active];
            order
                .into_iter()
                .filter_map(|i| {
                    let seg = &mut st.segments[i];
                    if seg.pending.is_empty() {
                        return None;
                    }
                    let data = std::mem::take(&mut seg.pending);
                    let at = seg.end - data.len() as u64;
                    let in_place = self.in_place && seg.end <= seg.durable;
                    Some(WriteOut { file: seg.file.clone(), segment: i, data, at, in_place })
                })
                .collect()
        };
        for WriteOut { file, segment: i, data, at, in_place } in jobs {
            let to = at + data.len() as u64;
            let written = file.write_all_at(&data, at).and_then(|()| if in_place { sync_range(&file, at, to) } else { file.sync_data() });
            if let Err(e) = written {
                self.fail();
                return Err(StoreError::Io(e));
            }
            if !in_place {
                let mut st = self.state();
                st.segments[i].durable = st.segments[i].durable.max(to);
            }
        }
        Ok(())
    }

    /// Whether a checkpoint should run now (the other segment holds records sled may not
    /// have on disk, and none is running); if so it is marked running, and
    /// [`end_checkpoint`](Self::end_checkpoint) must follow.
    pub(super) fn begin_checkpoint(&self) -> bool {
        let mut st = self.state();
        let due = !st.other_free && !st.checkpointing && !st.failed;
        if due {
            st.checkpointing = true;
        }
        due
    }

    /// A checkpoint begun by [`begin_checkpoint`](Self::begin_checkpoint) ended; if it
    /// succeeded, the other segment may be written over. A failed one is final, as a
    /// failed sync is: a retry could "succeed" on data an `fsync` already reported lost,
    /// and free a segment whose records sled never got to disk.
    pub(super) fn end_checkpoint(&self, succeeded: bool) {
        let mut st = self.state();
        st.checkpointing = false;
        st.other_free |= succeeded;
        st.failed |= !succeeded;
    }

    /// After a checkpoint that covered every record: zeroes each segment's first record
    /// header, so that the next open finds nothing to read back.
    pub(super) fn clear(&self) -> Result<(), StoreError> {
        let st = self.state();
        if st.failed {
            return Err(StoreError::NotDurable);
        }
        for seg in &st.segments {
            seg.file.write_all_at(&[0; RECORD_HEADER], HEADER).map_err(StoreError::Io)?;
            self.sync_bytes(&seg.file, HEADER, HEADER + RECORD_HEADER as u64).map_err(StoreError::Io)?;
        }
        Ok(())
    }
}

/// Opens segment `i`, making it first if it does not exist: header and zeros written
/// under a temporary name, synced, renamed into place, and the directory synced.
fn open_segment(dir: &Path, i: usize) -> Result<File, StoreError> {
    let path = dir.join(format!("journal-{i}"));
    let (file, made) = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(file) => (file, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let fresh = dir.join(format!("journal-{i}.new"));
            // It holds message bodies, like the history: private, whatever the umask.
            let file =
                OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(&fresh).map_err(StoreError::Io)?;
            let mut bytes = vec![0u8; SEGMENT_BYTES as usize];
            bytes[..MAGIC.len()].copy_from_slice(MAGIC);
            file.write_all_at(&bytes, 0).map_err(StoreError::Io)?;
            file.sync_all().map_err(StoreError::Io)?;
            std::fs::rename(&fresh, &path).map_err(StoreError::Io)?;
            sync_dir(dir).map_err(StoreError::Io)?;
            (file, true)
        }
        Err(e) => return Err(StoreError::Io(e)),
    };
    let mut magic = [0u8; MAGIC.len()];
    if file.read_exact_at(&mut magic, 0).is_err() || &magic != MAGIC {
        return Err(StoreError::Corrupt("journal segment header"));
    }
    // A segment is made synced at its full size. One that grew past it may hold bytes an
    // earlier process wrote and did not sync: they are made durable before the file is
    // taken as allocated and on disk up to its length.
    if !made && file.metadata().map_err(StoreError::Io)?.len() > SEGMENT_BYTES {
        file.sync_all().map_err(StoreError::Io)?;
    }
    Ok(file)
}

/// Records as written in a segment, for tests that put a crash's leavings there.
#[cfg(test)]
pub(super) mod testing {
    use super::*;

    /// A record as [`Journal::append`] writes it under `epoch`; if not `sound`, with its
    /// checksum broken (a record a crash cut short).
    pub(in crate::store) fn record(epoch: u64, seq: u64, writes: &[Write], sound: bool) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(epoch, seq, writes, &mut out).unwrap();
        if !sound {
            out[4] ^= 1;
        }
        out
    }

    /// The epoch in segment `i`'s header.
    pub(in crate::store) fn epoch(dir: &Path, i: usize) -> u64 {
        let mut epoch = [0u8; 8];
        File::open(dir.join(format!("journal-{i}"))).unwrap().read_exact_at(&mut epoch, EPOCH_AT).unwrap();
        u64::from_le_bytes(epoch)
    }

    /// Writes `bytes` where segment `i`'s records begin.
    pub(in crate::store) fn put_records(dir: &Path, i: usize, bytes: &[u8]) {
        OpenOptions::new().write(true).open(dir.join(format!("journal-{i}"))).unwrap().write_all_at(bytes, HEADER).unwrap();
    }
}
