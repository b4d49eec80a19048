//! Tests of the journal: its format, passes, epochs, switches and failures.

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
    testing::put_records(dir.path(), 0, &[testing::record(old, 1, &writes(1), true), testing::record(old, 2, &writes(2), true)].concat());
    assert_eq!(seqs(&reopen(dir.path()).records), [1, 2]);
    // A new epoch (the next open): the same bytes are no records at all.
    r.journal.start(3).unwrap();
    assert_ne!(testing::epoch(dir.path(), 0), old);
    testing::put_records(dir.path(), 0, &[testing::record(old, 3, &writes(1), true), testing::record(old, 4, &writes(2), true)].concat());
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
