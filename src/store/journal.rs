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

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::StoreError;

/// The size a segment is made at; once one holds this much, the next record goes to the
/// other segment (when a checkpoint has freed it) and a checkpoint of this one begins.
pub(super) const SEGMENT_BYTES: u64 = 2 << 20;

const MAGIC: &[u8; 16] = b"sotto-journal/1\n";
/// Where the epoch is in a segment's header.
const EPOCH_AT: u64 = MAGIC.len() as u64;
/// Where records begin.
const HEADER: u64 = EPOCH_AT + 8;
const RECORD_HEADER: usize = 16;
/// The largest record body written or read back, checked before anything is allocated
/// for it. A batch of frames read together, 256 or more messages of up to 64 KiB,
/// stays far below.
const MAX_BODY: usize = 256 << 20;
/// Record numbers stay below this, so that one more never overflows; a record that
/// claims one as high is not a record.
pub(super) const MAX_SEQ: u64 = 1 << 62;

/// The sled tree a journalled write goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TreeId {
    Chat = 0,
    Contacts = 1,
}

/// One key set to one value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Write {
    pub(super) tree: TreeId,
    pub(super) key: Vec<u8>,
    pub(super) value: Vec<u8>,
}

/// One store operation's writes, applied together.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) seq: u64,
    pub(super) writes: Vec<Write>,
}

/// Appends a record to `out`; on an error, `out` is left as it was.
fn encode_record(epoch: u64, seq: u64, writes: &[Write], out: &mut Vec<u8>) -> Result<(), StoreError> {
    let size = writes.iter().map(|w| 9 + w.key.len() + w.value.len()).sum::<usize>();
    if size > MAX_BODY || writes.is_empty() {
        return Err(StoreError::Corrupt("journal record too large or empty"));
    }
    let start = out.len();
    out.reserve(RECORD_HEADER + size);
    out.extend_from_slice(&[0; RECORD_HEADER]);
    for w in writes {
        out.push(w.tree as u8);
        for part in [&w.key, &w.value] {
            // Each part is at most MAX_BODY bytes, checked above.
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    let crc = checksum(epoch, seq, &out[start + RECORD_HEADER..]);
    let header = &mut out[start..start + RECORD_HEADER];
    header[..4].copy_from_slice(&(size as u32).to_le_bytes());
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    header[8..].copy_from_slice(&seq.to_le_bytes());
    Ok(())
}

fn checksum(epoch: u64, seq: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// A record's body, strictly: every byte belongs to a write, and there is at least one.
fn decode_body(mut body: &[u8]) -> Option<Vec<Write>> {
    fn part(body: &mut &[u8]) -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
        let bytes = body.get(4..4usize.checked_add(len)?)?.to_vec();
        *body = &body[4 + len..];
        Some(bytes)
    }
    let mut writes = Vec::new();
    while let Some((&tree, rest)) = body.split_first() {
        let tree = match tree {
            0 => TreeId::Chat,
            1 => TreeId::Contacts,
            _ => return None,
        };
        body = rest;
        let key = part(&mut body)?;
        let value = part(&mut body)?;
        writes.push(Write { tree, key, value });
    }
    (!writes.is_empty()).then_some(writes)
}

/// How a record header read back relates to the pass being read.
enum Next {
    /// A whole record, checksum sound, numbered next: `(seq, body_len)`.
    Record(u64, usize),
    /// The pass ends here.
    End,
}

fn read_header(file: &File, at: u64, len: u64, after: Option<u64>) -> Result<Next, StoreError> {
    if len.saturating_sub(at) < RECORD_HEADER as u64 {
        return Ok(Next::End);
    }
    let mut header = [0u8; RECORD_HEADER];
    file.read_exact_at(&mut header, at).map_err(StoreError::Io)?;
    let body_len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let seq = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    let follows = seq < MAX_SEQ
        && match after {
            Some(prev) => seq == prev + 1,
            None => seq != 0,
        };
    let fits = body_len <= MAX_BODY && (body_len as u64) <= len - at - RECORD_HEADER as u64;
    Ok(if follows && fits { Next::Record(seq, body_len) } else { Next::End })
}

/// The records of a segment's current pass (see the module docs). A record whose
/// checksum holds but whose body is not a list of writes was not cut short by a crash:
/// that is an error.
fn read_pass(file: &File) -> Result<Vec<Record>, StoreError> {
    let len = file.metadata().map_err(StoreError::Io)?.len();
    let mut epoch = [0u8; 8];
    file.read_exact_at(&mut epoch, EPOCH_AT).map_err(StoreError::Io)?;
    let epoch = u64::from_le_bytes(epoch);
    let mut records = Vec::new();
    let mut at = HEADER;
    loop {
        let after = records.last().map(|r: &Record| r.seq);
        let Next::Record(seq, body_len) = read_header(file, at, len, after)? else { break };
        let mut crc = [0u8; 4];
        file.read_exact_at(&mut crc, at + 4).map_err(StoreError::Io)?;
        let mut body = vec![0u8; body_len];
        file.read_exact_at(&mut body, at + RECORD_HEADER as u64).map_err(StoreError::Io)?;
        if checksum(epoch, seq, &body) != u32::from_le_bytes(crc) {
            break;
        }
        let writes = decode_body(&body).ok_or(StoreError::Corrupt("journal record"))?;
        records.push(Record { seq, writes });
        at += (RECORD_HEADER + body_len) as u64;
    }
    Ok(records)
}

/// The records to replay, oldest first: the earlier pass, and the later one if it
/// begins right after it (otherwise what lies past the gap was never synced, and is
/// left out).
fn join_passes(a: Vec<Record>, b: Vec<Record>) -> Vec<Record> {
    let (mut earlier, later) = match (a.first(), b.first()) {
        (Some(x), Some(y)) if y.seq < x.seq => (b, a),
        (None, Some(_)) => (b, a),
        _ => (a, b),
    };
    let joined = match (earlier.last(), later.first()) {
        (Some(end), Some(next)) => end.seq.checked_add(1) == Some(next.seq),
        (None, _) => true,
        (_, None) => false,
    };
    if joined {
        earlier.extend(later);
    }
    earlier
}

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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Checkpoint {
    Idle,
    Running,
}

struct State {
    segments: [Segment; 2],
    /// This open's epoch, in both segments' headers since [`Journal::start`].
    epoch: u64,
    active: usize,
    next_seq: u64,
    /// The other segment's records are all in sled on disk: it may be written over.
    other_free: bool,
    checkpoint: Checkpoint,
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
        let state =
            State { segments, epoch: 0, active: 0, next_seq: highest + 1, other_free: true, checkpoint: Checkpoint::Idle, failed: false };
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
                checkpoint_due = st.checkpoint == Checkpoint::Idle;
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
        let due = !st.other_free && st.checkpoint == Checkpoint::Idle && !st.failed;
        if due {
            st.checkpoint = Checkpoint::Running;
        }
        due
    }

    /// A checkpoint begun by [`begin_checkpoint`](Self::begin_checkpoint) ended; if it
    /// succeeded, the other segment may be written over. A failed one is final, as a
    /// failed sync is: a retry could "succeed" on data an `fsync` already reported lost,
    /// and free a segment whose records sled never got to disk.
    pub(super) fn end_checkpoint(&self, succeeded: bool) {
        let mut st = self.state();
        st.checkpoint = Checkpoint::Idle;
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
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(file) => file,
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
            file
        }
        Err(e) => return Err(StoreError::Io(e)),
    };
    let mut magic = [0u8; MAGIC.len()];
    if file.read_exact_at(&mut magic, 0).is_err() || &magic != MAGIC {
        return Err(StoreError::Corrupt("journal segment header"));
    }
    // Whatever an earlier process wrote and did not sync is made durable before the file
    // is taken as allocated and on disk up to its length.
    file.sync_all().map_err(StoreError::Io)?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Waits until the bytes `[from, to)` are written back to the device.
fn sync_range(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let (offset, len) = (i64::try_from(from).unwrap_or(i64::MAX), i64::try_from(to - from).unwrap_or(i64::MAX));
        // SAFETY: a plain system call on a descriptor this `File` owns and keeps open.
        if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(e);
        }
    }
    let _ = (from, to);
    file.sync_data()
}

/// Whether the file system under `dir` writes over allocated blocks in place, so that
/// writing bytes back is all it takes to make an overwrite durable: ext2/3/4 (unless
/// mounted `data=journal`, where data goes through the file system's journal first) and
/// tmpfs. XFS and the copy-on-write file systems may need a log commit for an overwrite
/// (a reflinked copy shares its blocks), so they get `fdatasync`.
#[cfg(target_os = "linux")]
#[allow(clippy::unnecessary_cast)]
fn overwrites_in_place(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const EXT: i64 = 0xEF53;
    const TMPFS: i64 = 0x0102_1994;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `statfs` fills the zeroed struct it is given; the path is NUL-terminated.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
        return false;
    }
    match fs.f_type as i64 {
        TMPFS => true,
        EXT => {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            std::fs::canonicalize(dir)
                .is_ok_and(|dir| mount_options(&mounts, &dir).is_some_and(|o| !o.split(',').any(|o| o == "data=journal")))
        }
        _ => false,
    }
}

/// The file system options (the last field of `/proc/self/mountinfo`) of the mount
/// `path` is on: the one with the longest mount point that holds it.
#[cfg(target_os = "linux")]
fn mount_options<'m>(mountinfo: &'m str, path: &Path) -> Option<&'m str> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let point = unescape_mount_point(line.split(' ').nth(4)?);
            let (_, after) = line.split_once(" - ")?;
            let options = after.split(' ').nth(2)?;
            path.starts_with(&point).then_some((point.as_os_str().len(), options))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, options)| options)
}

/// A mount point as `/proc/self/mountinfo` writes it: space, tab, newline and backslash
/// as octal escapes.
#[cfg(target_os = "linux")]
fn unescape_mount_point(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(not(target_os = "linux"))]
fn overwrites_in_place(_: &Path) -> bool {
    false
}

/// The history database's files: sled, and the journal in front of it.
pub(super) struct Disk {
    pub(super) db: sled::Db,
    pub(super) journal: Journal,
    dir: PathBuf,
    /// sled's other files (its blob files, `conf`, snapshots), by path and length, as
    /// they were when last synced.
    synced: Mutex<HashSet<(PathBuf, u64)>>,
}

impl Disk {
    pub(super) fn new(db: sled::Db, journal: Journal, dir: &Path) -> Self {
        Self { db, journal, dir: dir.to_path_buf(), synced: Mutex::new(HashSet::new()) }
    }

    /// Makes every record appended so far durable ([`Journal::sync`]).
    pub(super) fn sync(&self) -> Result<(), StoreError> {
        self.journal.sync()
    }

    /// Puts everything applied to sled so far on disk, sled's way and then all the way:
    /// sled's flush writes its log out, but does not sync the file's size or make the
    /// device write back its cache, and never syncs the files it writes beside its log
    /// (a value or a node too large for the log goes to a blob file of its own). Here
    /// the log is synced, and every other file of sled's that is new or has changed
    /// length since the last checkpoint, and the directories.
    pub(super) fn checkpoint(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        File::open(self.dir.join("db")).and_then(|f| f.sync_all()).map_err(StoreError::Io)?;
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = HashSet::new();
        for dir in [self.dir.clone(), self.dir.join("blobs")] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::Io(e)),
            };
            for entry in entries {
                let entry = entry.map_err(StoreError::Io)?;
                let name = entry.file_name();
                // The log is synced above; the journal's segments are the journal's.
                if name == "db" || name.to_string_lossy().starts_with("journal-") {
                    continue;
                }
                let path = entry.path();
                // A file sled removed meanwhile is no longer needed.
                let len = match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => meta.len(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::Io(e)),
                };
                let key = (path, len);
                if !synced.contains(&key) {
                    match File::open(&key.0).and_then(|f| f.sync_all()) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(StoreError::Io(e)),
                    }
                }
                now.insert(key);
            }
            sync_dir(&dir).map_err(StoreError::Io)?;
        }
        *synced = now;
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(tree: TreeId, key: &[u8], value: &[u8]) -> Write {
        Write { tree, key: key.to_vec(), value: value.to_vec() }
    }

    fn writes(n: u8) -> Vec<Write> {
        vec![write(TreeId::Chat, &[b'm', n], &[n; 40]), write(TreeId::Contacts, b"bob", &[])]
    }

    fn reopen(dir: &Path) -> Recovered {
        Journal::open(dir).unwrap()
    }

    /// A journal in a new directory, begun at record 1.
    fn started() -> (tempfile::TempDir, Recovered) {
        let dir = tempfile::tempdir().unwrap();
        let r = reopen(dir.path());
        r.journal.start(1).unwrap();
        (dir, r)
    }

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn a_record_encodes_as_documented() {
        let mut out = Vec::new();
        encode_record(7, 0x0102, &[write(TreeId::Contacts, b"k", b"vv")], &mut out).unwrap();
        let body = [1, 1, 0, 0, 0, b'k', 2, 0, 0, 0, b'v', b'v'];
        let crc = checksum(7, 0x0102, &body);
        assert_ne!(crc, checksum(8, 0x0102, &body), "the epoch is checksummed");
        let mut h = crc32fast::Hasher::new();
        h.update(&[7, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        h.update(&body);
        assert_eq!(crc, h.finalize(), "crc32 of epoch ‖ seq ‖ body");
        let mut expected = vec![12, 0, 0, 0];
        expected.extend_from_slice(&crc.to_le_bytes());
        expected.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&body);
        assert_eq!(out, expected);
        assert_eq!(decode_body(&body), Some(vec![write(TreeId::Contacts, b"k", b"vv")]));
        // Strict: an unknown tree, a short part, trailing bytes or no write at all.
        for bad in [&[2u8, 0, 0, 0, 0, 0, 0, 0, 0][..], &body[..11], &[&body[..], &[0][..]].concat(), &[]] {
            assert_eq!(decode_body(bad), None, "{bad:?}");
        }
        let before = out.clone();
        assert!(encode_record(7, 1, &[], &mut out).is_err(), "an empty record is refused");
        assert_eq!(out, before, "and nothing is left of it");
    }

    #[test]
    fn records_come_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let r = reopen(dir.path());
        assert!(r.records.is_empty() && r.highest == 0);
        r.journal.start(1).unwrap();
        for n in 1..=5 {
            assert_eq!(r.journal.append(&writes(n)).unwrap().seq, u64::from(n));
            if n == 3 {
                r.journal.sync().unwrap();
            }
        }
        // Appended records reach the file with the next sync, not before.
        assert_eq!(seqs(&Journal::open(dir.path()).unwrap().records), [1, 2, 3]);
        r.journal.sync().unwrap();
        drop(r);
        let again = reopen(dir.path());
        assert_eq!(seqs(&again.records), [1, 2, 3, 4, 5]);
        assert_eq!(again.records[2].writes, writes(3));
        assert_eq!(again.highest, 5);
        // Starting again, with the numbers after them, leaves nothing to read back.
        again.journal.start(6).unwrap();
        assert!(reopen(dir.path()).records.is_empty());
        assert_eq!(again.journal.append(&writes(9)).unwrap().seq, 6);
        again.journal.sync().unwrap();
        drop(again);
        let third = reopen(dir.path());
        assert_eq!(seqs(&third.records), [6]);
    }

    #[test]
    fn a_record_cut_short_or_damaged_ends_the_pass() {
        let (dir, r) = started();
        for n in 1..=4 {
            r.journal.append(&writes(n)).unwrap();
        }
        r.journal.sync().unwrap();
        drop(r);
        let path = dir.path().join("journal-0");
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut header = [0u8; 4];
        file.read_exact_at(&mut header, HEADER).unwrap();
        let record = RECORD_HEADER as u64 + u64::from(u32::from_le_bytes(header));
        // A flipped byte in the third record's body: the first two come back.
        let third = HEADER + 2 * record;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, third + RECORD_HEADER as u64 + 3).unwrap();
        file.write_all_at(&[byte[0] ^ 1], third + RECORD_HEADER as u64 + 3).unwrap();
        assert_eq!(seqs(&reopen(dir.path()).records), [1, 2]);
        // A body length past the end of the file: nothing is allocated for it.
        file.write_all_at(&u32::MAX.to_le_bytes(), HEADER + record).unwrap();
        assert_eq!(seqs(&reopen(dir.path()).records), [1]);
        // A header of zeros: nothing.
        file.write_all_at(&[0; RECORD_HEADER], HEADER).unwrap();
        assert!(reopen(dir.path()).records.is_empty());
    }

    #[test]
    fn a_sound_checksum_over_a_body_that_is_not_writes_is_an_error() {
        let (dir, r) = started();
        r.journal.append(&writes(1)).unwrap();
        r.journal.sync().unwrap();
        drop(r);
        let file = OpenOptions::new().read(true).write(true).open(dir.path().join("journal-0")).unwrap();
        let body = [9u8, 0, 0];
        let mut record = vec![3, 0, 0, 0];
        record.extend_from_slice(&checksum(testing::epoch(dir.path(), 0), 1, &body).to_le_bytes());
        record.extend_from_slice(&1u64.to_le_bytes());
        record.extend_from_slice(&body);
        file.write_all_at(&record, HEADER).unwrap();
        assert!(matches!(Journal::open(dir.path()), Err(StoreError::Corrupt("journal record"))));
    }

    #[test]
    fn the_mount_a_path_is_on_is_the_longest_that_holds_it() {
        let mounts = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n\
                      30 22 8:2 / /home rw shared:2 - ext4 /dev/sda2 rw,data=journal\n\
                      31 22 0:5 / /home/a\\040b rw shared:3 - tmpfs tmpfs rw,size=10k\n";
        assert_eq!(mount_options(mounts, Path::new("/var/lib")), Some("rw,errors=remount-ro"));
        assert_eq!(mount_options(mounts, Path::new("/home/alice/.local")), Some("rw,data=journal"));
        assert_eq!(mount_options(mounts, Path::new("/home/a b/x")), Some("rw,size=10k"));
        assert_eq!(mount_options(mounts, Path::new("/homework")), Some("rw,errors=remount-ro"), "a prefix of the name is not the mount");
        assert_eq!(unescape_mount_point("/a\\040b\\134c\\09"), PathBuf::from("/a b\\c\\09"));
    }

    #[test]
    fn segments_are_made_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        drop(reopen(dir.path()));
        for i in 0..2 {
            let meta = std::fs::metadata(dir.path().join(format!("journal-{i}"))).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert_eq!(meta.len(), SEGMENT_BYTES, "made at full size");
        }
        assert!(!dir.path().join("journal-0.new").exists());
    }

    #[test]
    fn a_segment_that_is_not_a_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(reopen(dir.path()));
        std::fs::write(dir.path().join("journal-1"), b"something else").unwrap();
        assert!(matches!(Journal::open(dir.path()), Err(StoreError::Corrupt("journal segment header"))));
    }

    /// Fills the active segment until the next record goes to the other one.
    fn fill_until_switch(j: &Journal, from: u8) -> u8 {
        let big = vec![write(TreeId::Chat, b"k", &vec![7; 64 * 1024])];
        let mut n = from;
        loop {
            n = n.wrapping_add(1);
            if j.append(&big).unwrap().checkpoint_due {
                return n;
            }
        }
    }

    #[test]
    fn a_full_segment_hands_over_to_the_other_and_passes_join_across_it() {
        let (dir, r) = started();
        let j = &r.journal;
        fill_until_switch(j, 0);
        let first_in_other = j.state().next_seq - 1;
        assert_eq!(j.state().active, 1);
        j.append(&writes(1)).unwrap();
        j.sync().unwrap();
        // The first segment is not free until its checkpoint: filling the second one
        // grows it instead of writing over the first, and asks for the checkpoint again.
        let last = fill_until_switch(j, 1);
        assert_eq!(j.state().active, 1, "no switch while the other is not free");
        assert!(last > 0);
        let highest = j.state().next_seq - 1;
        j.sync().unwrap();
        drop(r);
        let again = reopen(dir.path());
        let got = seqs(&again.records);
        assert_eq!(got, (1..=highest).collect::<Vec<_>>(), "both passes, joined");
        assert_eq!(again.highest, highest);
        assert!(first_in_other > 1);
    }

    #[test]
    fn a_checkpoint_frees_the_other_segment_for_the_next_switch() {
        let (dir, r) = started();
        let j = &r.journal;
        assert!(!j.begin_checkpoint(), "nothing to checkpoint while the other is free");
        fill_until_switch(j, 0);
        assert!(j.begin_checkpoint());
        assert!(!j.begin_checkpoint(), "one at a time");
        j.end_checkpoint(true);
        fill_until_switch(j, 0);
        assert_eq!(j.state().active, 0, "back to the first segment, from its start");
        let first = j.state().next_seq - 1;
        j.sync().unwrap();
        drop(r);
        // The first segment's new pass begins after the second's: both are read, joined.
        let again = reopen(dir.path());
        assert_eq!(*seqs(&again.records).last().unwrap(), first);
        assert!(seqs(&again.records).windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn passes_with_a_gap_between_them_are_not_joined() {
        let rec = |seq| Record { seq, writes: writes(1) };
        assert_eq!(seqs(&join_passes(vec![rec(5), rec(6)], vec![rec(7)])), [5, 6, 7]);
        assert_eq!(seqs(&join_passes(vec![rec(7)], vec![rec(5), rec(6)])), [5, 6, 7]);
        assert_eq!(seqs(&join_passes(vec![rec(5)], vec![rec(7)])), [5]);
        assert_eq!(seqs(&join_passes(vec![], vec![rec(7)])), [7]);
        assert_eq!(seqs(&join_passes(vec![rec(3)], vec![])), [3]);
    }

    #[test]
    fn a_failed_checkpoint_is_final() {
        let (_dir, r) = started();
        let j = &r.journal;
        fill_until_switch(j, 0);
        assert!(j.begin_checkpoint());
        j.end_checkpoint(false);
        assert!(!j.begin_checkpoint(), "not tried again");
        assert!(matches!(j.append(&writes(1)), Err(StoreError::NotDurable)));
        assert!(matches!(j.sync(), Err(StoreError::NotDurable)));
    }

    #[test]
    fn records_of_an_earlier_epoch_are_not_read_back() {
        let (dir, r) = started();
        let old = testing::epoch(dir.path(), 0);
        assert_eq!(old, testing::epoch(dir.path(), 1), "one epoch for both segments");
        r.journal.append(&writes(1)).unwrap();
        r.journal.sync().unwrap();
        // Written under this epoch, number 2 follows: it is read.
        testing::put_records(
            dir.path(),
            0,
            &[testing::record(old, 1, &writes(1), true), testing::record(old, 2, &writes(2), true)].concat(),
        );
        assert_eq!(seqs(&reopen(dir.path()).records), [1, 2]);
        // A new epoch (the next open): the same bytes are no records at all.
        r.journal.start(3).unwrap();
        assert_ne!(testing::epoch(dir.path(), 0), old);
        testing::put_records(
            dir.path(),
            0,
            &[testing::record(old, 3, &writes(1), true), testing::record(old, 4, &writes(2), true)].concat(),
        );
        assert!(reopen(dir.path()).records.is_empty());
        // A number at the top of the range is not a record either.
        let epoch = testing::epoch(dir.path(), 0);
        testing::put_records(dir.path(), 0, &testing::record(epoch, MAX_SEQ, &writes(1), true));
        assert!(reopen(dir.path()).records.is_empty());
        assert!(r.journal.start(MAX_SEQ).is_err());
    }

    fn arbitrary_writes() -> impl proptest::strategy::Strategy<Value = Vec<Write>> {
        use proptest::prelude::*;
        let write = (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(chat, key, value)| Write { tree: if chat { TreeId::Chat } else { TreeId::Contacts }, key, value });
        proptest::collection::vec(write, 1..6)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn records_round_trip(records in proptest::collection::vec(arbitrary_writes(), 1..12)) {
            let (dir, r) = started();
            for writes in &records {
                r.journal.append(writes).unwrap();
            }
            r.journal.sync().unwrap();
            let back = reopen(dir.path()).records;
            proptest::prop_assert_eq!(back.iter().map(|r| &r.writes).collect::<Vec<_>>(), records.iter().collect::<Vec<_>>());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever a segment holds past its header, reading it back ends cleanly: no
        /// panic, records numbered one after another, and an error only for a record
        /// whose checksum holds over a body that is not writes. Sound records are mixed
        /// in so that the reading gets past the first one.
        #[test]
        fn any_segment_bytes_read_back_cleanly(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            sound in proptest::collection::vec(arbitrary_writes(), 0..3),
            cut in 0usize..2000,
        ) {
            use std::sync::OnceLock;
            static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
            let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
            let path = dir.path().join("segment");
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&5u64.to_le_bytes());
            for (i, writes) in sound.iter().enumerate() {
                encode_record(5, i as u64 + 1, writes, &mut bytes).unwrap();
            }
            bytes.extend_from_slice(&junk);
            bytes.truncate(HEADER as usize + cut.min(bytes.len() - HEADER as usize));
            std::fs::write(&path, &bytes).unwrap();
            match read_pass(&File::open(&path).unwrap()) {
                Ok(records) => {
                    proptest::prop_assert!(records.windows(2).all(|w| w[1].seq == w[0].seq + 1));
                    proptest::prop_assert!(records.iter().all(|r| r.seq != 0 && r.seq < MAX_SEQ && !r.writes.is_empty()));
                }
                Err(e) => proptest::prop_assert!(matches!(e, StoreError::Corrupt("journal record")), "{e}"),
            }
        }
    }

    #[test]
    fn a_failed_journal_takes_no_more_records() {
        let (_dir, r) = started();
        r.journal.append(&writes(1)).unwrap();
        r.journal.fail();
        assert!(matches!(r.journal.append(&writes(2)), Err(StoreError::NotDurable)));
        assert!(matches!(r.journal.sync(), Err(StoreError::NotDurable)));
        assert!(!r.journal.begin_checkpoint());
    }
}
