//! The journal's bytes: the segment header, the record format (see the parent module's
//! docs), encoding and checksums, and reading a segment's pass back. No state, and no
//! file is written here.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::store::StoreError;

pub(super) const MAGIC: &[u8; 16] = b"sotto-journal/1\n";
/// Where the epoch is in a segment's header.
pub(super) const EPOCH_AT: u64 = MAGIC.len() as u64;
/// Where records begin.
pub(super) const HEADER: u64 = EPOCH_AT + 8;
pub(super) const RECORD_HEADER: usize = 16;
/// The largest record body written or read back, checked before anything is allocated
/// for it. A batch of frames read together, 256 or more messages of up to 64 KiB,
/// stays far below.
pub(super) const MAX_BODY: usize = 256 << 20;
/// Record numbers stay below this, so that one more never overflows; a record that
/// claims one as high is not a record.
pub(in crate::store) const MAX_SEQ: u64 = 1 << 62;

/// The sled tree a journalled write goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::store) enum TreeId {
    Chat = 0,
    Contacts = 1,
}

/// One key set to one value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::store) struct Write {
    pub(in crate::store) tree: TreeId,
    pub(in crate::store) key: Vec<u8>,
    pub(in crate::store) value: Vec<u8>,
}

/// One store operation's writes, applied together.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::store) struct Record {
    pub(in crate::store) seq: u64,
    pub(in crate::store) writes: Vec<Write>,
}

/// Appends a record to `out`; on an error, `out` is left as it was.
pub(super) fn encode_record(epoch: u64, seq: u64, writes: &[Write], out: &mut Vec<u8>) -> Result<(), StoreError> {
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

pub(super) fn checksum(epoch: u64, seq: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// A record's body, strictly: every byte belongs to a write, and there is at least one.
pub(super) fn decode_body(mut body: &[u8]) -> Option<Vec<Write>> {
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
pub(super) enum Next {
    /// A whole record, checksum sound, numbered next: `(seq, body_len)`.
    Record(u64, usize),
    /// The pass ends here.
    End,
}

pub(super) fn read_header(file: &File, at: u64, len: u64, after: Option<u64>) -> Result<Next, StoreError> {
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
pub(super) fn read_pass(file: &File) -> Result<Vec<Record>, StoreError> {
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
pub(super) fn join_passes(a: Vec<Record>, b: Vec<Record>) -> Vec<Record> {
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
