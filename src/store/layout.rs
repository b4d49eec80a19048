//! How the history store lays its data out in sled (see the parent module's table):
//! the keys, the batch values, the buckets of incoming ids, and the migration from
//! older schemas.

use serde::{Deserialize, Serialize};

use super::{Direction, MessageRef, StoreError, StoredMessage, SCHEMA_VERSION};
use crate::username::Username;

pub(super) const MESSAGE: u8 = b'm';
pub(super) const SEEN: u8 = b's';
/// Schema 3's incoming id index, replaced by [`SEEN`].
pub(super) const OLD_INDEX: u8 = b'i';

/// The last byte of a message key: [`Direction`] as u8 for one message, or one of these
/// for a batch of incoming or outgoing messages stored together.
pub(super) const BATCH: u8 = 2;
pub(super) const SENT_BATCH: u8 = 3;
/// A batch of incoming messages is cut at about this many encoded bytes. sled writes a
/// leaf (up to 17 values) whole when it consolidates it, and a leaf over 128 KiB goes to
/// a file of its own, a system call or more per write.
pub(super) const BATCH_BYTES: usize = 4096;
/// Incoming ids are recorded in buckets of the sender's clock this coarse (`sent_at >>
/// SEEN_SHIFT`, 2 ms): the messages a batch brings were sent close together, so one
/// batch updates one bucket or two.
pub(super) const SEEN_SHIFT: u32 = 1;
/// Ids a bucket holds in itself; past this (a sender whose clock stands still, or more
/// than 64 messages in 2 ms), each further id is an entry of its own.
pub(super) const SEEN_CAP: usize = 64;

pub(super) fn peer_prefix(peer: &Username) -> Vec<u8> {
    keyed(MESSAGE, peer)
}

pub(super) fn keyed(kind: u8, peer: &Username) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.push(kind);
    k.extend_from_slice(peer.as_str().as_bytes());
    k.push(0);
    k
}

pub(super) fn message_key(at: &MessageRef) -> Vec<u8> {
    match at.batch {
        Some(batch) => Place { stored_at: at.stored_at, id: batch, kind: SENT_BATCH }.key(&at.peer),
        None => Place { stored_at: at.stored_at, id: at.id, kind: at.direction as u8 }.key(&at.peer),
    }
}

/// Where an incoming message was stored: the rest of its message key after the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Place {
    pub(super) stored_at: u64,
    pub(super) id: [u8; 16],
    /// [`BATCH`], or `Direction::In` for a message stored alone by schema 3 or before.
    pub(super) kind: u8,
}

impl Place {
    pub(super) fn key(&self, peer: &Username) -> Vec<u8> {
        let mut k = peer_prefix(peer);
        k.extend_from_slice(&self.stored_at.to_be_bytes());
        k.extend_from_slice(&self.id);
        k.push(self.kind);
        k
    }
}

/// The incoming ids of one peer whose `sent_at` falls in one bucket.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Seen {
    pub(super) places: Vec<Place>,
    /// `sent_at`, id, and the index of its place.
    pub(super) ids: Vec<(u64, [u8; 16], u16)>,
    /// The bucket reached [`SEEN_CAP`]: later ids are entries of their own.
    pub(super) full: bool,
}

impl Seen {
    pub(super) fn find(&self, sent_at: u64, id: &[u8; 16]) -> Result<Option<Place>, StoreError> {
        let Some(&(_, _, p)) = self.ids.iter().find(|(t, i, _)| *t == sent_at && i == id) else { return Ok(None) };
        self.places.get(usize::from(p)).copied().map(Some).ok_or(StoreError::Corrupt("id bucket"))
    }

    /// Records where an id is stored (replacing a place recorded before); `false` if
    /// the bucket is full and the id is not in it.
    pub(super) fn set(&mut self, sent_at: u64, id: [u8; 16], place: Place) -> bool {
        let existing = self.ids.iter().position(|(t, i, _)| *t == sent_at && *i == id);
        if existing.is_none() && (self.full || self.ids.len() >= SEEN_CAP) {
            self.full = true;
            return false;
        }
        let p = match self.places.iter().position(|q| *q == place) {
            Some(p) => p,
            None => {
                self.places.push(place);
                self.places.len() - 1
            }
        };
        // At most SEEN_CAP + 1 places: one per id, and the one just added.
        let p = u16::try_from(p).expect("a bucket holds at most SEEN_CAP + 1 places");
        match existing {
            Some(e) => {
                self.ids[e].2 = p;
                // The place it had may now be nobody's: keep only places in use.
                let mut used = vec![false; self.places.len()];
                self.ids.iter().for_each(|&(_, _, p)| used[usize::from(p)] = true);
                let mut renumber = vec![0u16; self.places.len()];
                let mut kept = 0u16;
                for (q, in_use) in used.iter().enumerate() {
                    renumber[q] = kept;
                    kept += u16::from(*in_use);
                }
                let places = std::mem::take(&mut self.places);
                self.places = places.into_iter().zip(&used).filter(|(_, in_use)| **in_use).map(|(place, _)| place).collect();
                self.ids.iter_mut().for_each(|e| e.2 = renumber[usize::from(e.2)]);
            }
            None => self.ids.push((sent_at, id, p)),
        }
        true
    }

    /// A bucket as read from disk, checked: at most [`SEEN_CAP`] ids, each with a place.
    pub(super) fn read(value: &[u8]) -> Result<Seen, StoreError> {
        let seen: Seen = decode(value, "id bucket")?;
        let sound = seen.ids.len() <= SEEN_CAP
            && seen.places.len() <= seen.ids.len()
            && seen.ids.iter().all(|&(_, _, p)| usize::from(p) < seen.places.len());
        if sound {
            Ok(seen)
        } else {
            Err(StoreError::Corrupt("id bucket"))
        }
    }
}

pub(super) fn seen_key(peer: &Username, sent_at: u64) -> Vec<u8> {
    let mut k = keyed(SEEN, peer);
    k.extend_from_slice(&(sent_at >> SEEN_SHIFT).to_be_bytes());
    k
}

/// The entry of its own an id gets once its bucket is full.
pub(super) fn overflow_key(bucket: &[u8], sent_at: u64, id: &[u8; 16]) -> Vec<u8> {
    [bucket, &sent_at.to_be_bytes(), id].concat()
}

/// The messages a message key's value holds, oldest first.
pub(super) fn messages_in(key: &[u8], value: &[u8]) -> Result<Vec<StoredMessage>, StoreError> {
    if key.last().is_some_and(|&k| k == BATCH || k == SENT_BATCH) {
        decode(value, "message batch")
    } else {
        Ok(vec![decode(value, "message")?])
    }
}

/// Records an incoming message's id in the buckets a migration builds.
pub(super) fn migrate_seen(seen: &mut std::collections::BTreeMap<Vec<u8>, Seen>, batch: &mut sled::Batch, msg: &StoredMessage) {
    if msg.direction != Direction::In {
        return;
    }
    let bucket = seen_key(&msg.peer, msg.sent_at);
    let place = Place { stored_at: msg.stored_at, id: msg.id, kind: Direction::In as u8 };
    if !seen.entry(bucket.clone()).or_default().set(msg.sent_at, msg.id, place) {
        batch.insert(overflow_key(&bucket, msg.sent_at, &msg.id), encode(&place));
    }
}

/// Brings an older database to schema 4's layout (and schema 5's number): messages of schemas 1 and 2 move into the
/// `chat` tree, and the incoming ids (schema 3's `i` index, or found in the messages)
/// go into the buckets of [`SEEN`]. Safe to run again after a crash part way: it
/// rebuilds the same keys from the messages, and the old trees go only after the new
/// schema number is on disk.
pub(super) fn migrate(db: &sled::Db, chat: &sled::Tree, meta: &sled::Tree, from: u64) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut seen = std::collections::BTreeMap::new();
    let old_trees: &[&str] = match from {
        1 | 2 => {
            let (source, prefix, old_trees): (&str, &[u8], &[&str]) = match from {
                1 => ("messages", b"", &["messages", "ids", "by_time"]),
                _ => ("history", &[MESSAGE], &["history"]),
            };
            for item in db.open_tree(source)?.scan_prefix(prefix) {
                let msg: StoredMessage = decode(&item?.1, "message")?;
                migrate_seen(&mut seen, &mut batch, &msg);
                batch.insert(message_key(&msg.at()), encode(&msg));
            }
            old_trees
        }
        _ => {
            for item in chat.scan_prefix([MESSAGE]) {
                let (key, value) = item?;
                for msg in messages_in(&key, &value)? {
                    migrate_seen(&mut seen, &mut batch, &msg);
                }
            }
            for item in chat.scan_prefix([OLD_INDEX]) {
                batch.remove(item?.0);
            }
            &[]
        }
    };
    for (bucket, ids) in seen {
        batch.insert(bucket, encode(&ids));
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

pub(super) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes into a Vec")
}
