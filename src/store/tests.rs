//! Tests of the history store and its group commit, through [`SledStore`].

use super::*;
use std::time::Duration;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

/// Whether an open failed only because the file lock is still held. sled 0.34
/// reports a busy lock as an `Other` error naming it, not as `WouldBlock`.
fn lock_busy(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// Opens a database again right after a store on it was dropped. sled 0.34's
/// background writers can hold the file lock a moment after the store is gone
/// (sled issues 1234 and 1289), so `open` is run again while it fails with a busy
/// file lock, for up to five seconds.
fn while_locked<T, E>(mut open: impl FnMut() -> Result<T, E>, io: impl Fn(&E) -> Option<&std::io::Error>) -> Result<T, E> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match open() {
            Err(e) if io(&e).is_some_and(lock_busy) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => return other,
        }
    }
}

fn open_retrying(dir: &Path) -> Result<SledStore, StoreError> {
    while_locked(
        || SledStore::open(dir),
        |e| match e {
            StoreError::Db(sled::Error::Io(e)) => Some(e),
            _ => None,
        },
    )
}

fn reopen(dir: &Path) -> SledStore {
    open_retrying(dir).unwrap()
}

/// `sled::open`, retried the same way.
fn sled_reopen(dir: &Path) -> sled::Db {
    while_locked(
        || sled::open(dir),
        |e| match e {
            sled::Error::Io(e) => Some(e),
            _ => None,
        },
    )
    .unwrap()
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
    let s = reopen(dir.path());
    assert!(s.insert(&msg("bob", 1, 10, Direction::In)).unwrap());
    let resend = StoredMessage { stored_at: 11, ..msg("bob", 1, 10, Direction::In) };
    assert!(!s.insert(&resend).unwrap(), "a resend is stored once");
    assert!(s.insert(&msg("bob", 1, 12, Direction::Out)).unwrap(), "our own id space is separate");
    assert!(!s.insert(&msg("bob", 1, 12, Direction::Out)).unwrap(), "an outgoing message is stored once");
    assert!(s.insert(&msg("carol", 1, 13, Direction::In)).unwrap(), "another peer's id space is separate");
    assert_eq!(s.last(Some(&name("bob")), 10).unwrap().len(), 2);
}

#[test]
fn last_n_is_oldest_first_and_per_peer() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
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
    let s = reopen(dir.path());
    s.insert(&msg("bob", 1, 10, Direction::Out)).unwrap();
    s.insert(&msg("bob", 2, 11, Direction::In)).unwrap();
    let ours = msg("bob", 1, 10, Direction::Out).at();
    let theirs = msg("bob", 2, 11, Direction::In).at();
    assert!(s.set_state(&ours, State::Delivered).unwrap());
    assert!(!s.set_state(&theirs, State::Delivered).unwrap(), "an incoming message is not ours to ack");
    assert!(!s.set_state(&MessageRef { direction: Direction::Out, ..theirs.clone() }, State::Delivered).unwrap());
    assert!(!s.set_state(&MessageRef { peer: name("carol"), ..ours.clone() }, State::Delivered).unwrap(), "carol cannot ack bob's message");
    assert_eq!(s.message(&ours).unwrap().unwrap().state, State::Delivered);
    assert_eq!(s.incoming(&name("bob"), 11, &[2; 16]).unwrap().unwrap().state, State::Received);
    assert!(s.incoming(&name("bob"), 10, &[1; 16]).unwrap().is_none(), "outgoing ids are not in the incoming index");
}

#[test]
fn a_late_ack_is_not_overwritten_by_the_failure_mark() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    let (delivered, pending) = (msg("bob", 1, 10, Direction::Out), msg("bob", 2, 11, Direction::Out));
    s.insert(&delivered).unwrap();
    s.insert(&pending).unwrap();
    assert!(s.set_state(&delivered.at(), State::Delivered).unwrap());
    assert!(!s.fail_pending(&delivered.at()).unwrap(), "delivered stays delivered");
    assert!(s.fail_pending(&pending.at()).unwrap());
    assert!(!s.fail_pending(&msg("bob", 3, 12, Direction::Out).at()).unwrap(), "no such message");
    assert_eq!(s.message(&delivered.at()).unwrap().unwrap().state, State::Delivered);
    assert_eq!(s.message(&pending.at()).unwrap().unwrap().state, State::Failed);
}

#[test]
fn writes_count_toward_commit_points_and_become_durable() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    assert_eq!(s.written(), 0);
    s.insert(&msg("bob", 1, 10, Direction::Out)).unwrap();
    assert!(!s.insert(&msg("bob", 1, 10, Direction::Out)).unwrap());
    assert_eq!(s.written(), 1, "a duplicate writes nothing");
    s.set_state(&msg("bob", 1, 10, Direction::Out).at(), State::Delivered).unwrap();
    assert!(!s.set_state(&msg("bob", 9, 10, Direction::Out).at(), State::Delivered).unwrap());
    assert_eq!(s.written(), 2, "an unknown id writes nothing");
    let point = s.written();
    s.wait_durable(point).unwrap();
    assert!(s.durability().borrow().flushed >= point);
    assert!(s.durability().borrow().flushes >= 1);
}

#[test]
fn concurrent_writers_all_reach_disk() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(reopen(dir.path()));
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
    let s = reopen(dir.path());
    assert_eq!(s.last(None, 1000).unwrap().len(), 100);
}

#[test]
fn async_waiters_wake_after_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
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
fn a_flush_in_place_covers_every_write_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    for i in 0..3u8 {
        s.insert(&msg("bob", i, 10 + u64::from(i), Direction::In)).unwrap();
    }
    // Outside a runtime, and on one with a single worker, it is never done here.
    assert_eq!(flush_in_place(&s), None);
    let one = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert_eq!(one.block_on(async { flush_in_place(&s) }), None);
    let two = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let (point, s) = two.block_on(async {
        tokio::spawn(async move {
            // `None` only while the flusher thread is flushing (after the linger).
            loop {
                match flush_in_place(&s) {
                    Some(point) => break (point, s),
                    None => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })
        .await
        .unwrap()
    });
    assert_eq!(point, 3, "the point covers every write so far");
    let done = *s.durability().borrow();
    assert_eq!((done.flushed, done.failed), (3, 0));
    assert!(!s.flushing());
    // The flusher thread still covers points taken afterwards.
    s.insert(&msg("bob", 9, 20, Direction::In)).unwrap();
    s.wait_durable(s.written()).unwrap();
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.last(Some(&name("bob")), 10).unwrap().len(), 4);
}

#[test]
fn under_load_the_next_flush_gathers_and_closing_flushes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A linger and a gather no test machine outlasts: every outcome below is
    // decided by counts, and nothing is flushed but by the calls here.
    let hour = Duration::from_secs(3600);
    let s = SledStore::open_with(dir.path(), hour, hour).unwrap();
    let mut at = 10;
    let mut write = |s: &SledStore, n: u64| {
        for _ in 0..n {
            at += 1;
            assert!(s.insert(&msg("bob", at as u8, at, Direction::In)).unwrap());
        }
    };
    write(&s, 2);
    assert_eq!(s.flush_here(), Some(2));
    write(&s, 1);
    assert_eq!(s.flush_here(), Some(3), "a flush of two writes is no load: the next flushes at once");
    write(&s, 8);
    assert_eq!(s.flush_here(), Some(11));
    write(&s, 1);
    assert_eq!(s.flush_here(), None, "after a flush of eight writes, the flusher thread gathers");
    let mut waiting = s.on_durable(s.written());
    // The flusher thread was woken by the point, and waits out the gather too.
    std::thread::sleep(Duration::from_millis(100));
    assert!(waiting.try_recv().is_err(), "flushed before the gather ended");
    // Closing does not gather: what is left is flushed, and the waiter told.
    drop(s);
    assert!(answer(waiting));
    let s = reopen(dir.path());
    assert_eq!(s.last(Some(&name("bob")), 100).unwrap().len(), 12);
}

#[test]
fn an_async_waiter_is_told_once_its_own_point_is_decided() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    s.insert(&msg("bob", 1, 10, Direction::In)).unwrap();
    let point = s.written();
    let mut next = s.on_durable(point + 1);
    s.wait_durable(point).unwrap();
    assert_eq!(s.on_durable(point).try_recv(), Ok(true), "a point already on disk is answered at once");
    assert!(next.try_recv().is_err(), "a flush short of the point does not answer it");
    s.insert(&msg("bob", 2, 11, Direction::In)).unwrap();
    assert_eq!(s.written(), point + 1);
    assert!(answer(next));
}

/// What a waiter registered with [`Store::on_durable`] was told; fails the test
/// rather than hang if nothing answers within 10 s.
fn answer(mut waiting: tokio::sync::oneshot::Receiver<bool>) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match waiting.try_recv() {
            Ok(told) => return told,
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("the waiter was not answered: {e:?}"),
        }
    }
}

#[test]
fn a_state_change_nobody_waits_for_still_reaches_disk() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    let m = msg("bob", 1, 10, Direction::Out);
    s.insert(&m).unwrap();
    s.wait_durable(s.written()).unwrap();
    let before = *s.durability().borrow();
    assert!(s.set_state(&m.at(), State::Delivered).unwrap());
    let mut progress = s.durability();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let flushed = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), progress.wait_for(|d| d.flushed > before.flushed)).await.map(|d| *d.unwrap())
    });
    assert_eq!(flushed.expect("the lazy write was flushed").flushed, before.flushed + 1);
    // And a point taken after a lazy write is flushed at once, not after the linger.
    assert!(s.set_state(&m.at(), State::Failed).unwrap());
    s.wait_durable(s.written()).unwrap();
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.message(&m.at()).unwrap().unwrap().state, State::Failed);
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
    let s = reopen(dir.path());
    let first = msg("bob", 3, 500, Direction::In);
    // What survives a crash after the first of the two writes: the id is recorded,
    // its batch is not.
    let mut seen = Seen::default();
    assert!(seen.set(first.sent_at, first.id, Place { stored_at: 500, id: [9; 16], kind: BATCH }));
    s.chat.insert(seen_key(&first.peer, first.sent_at), encode(&seen)).unwrap();
    assert!(s.last(None, 10).unwrap().is_empty(), "a dangling id is not a message");
    let resent = StoredMessage { stored_at: 900, ..first.clone() };
    assert!(s.insert(&resent).unwrap(), "the resend completes the message");
    assert!(!s.insert(&resent).unwrap(), "and only once");
    assert!(!s.insert(&StoredMessage { stored_at: 950, ..first.clone() }).unwrap(), "whenever it comes");
    let stored = s.last(Some(&name("bob")), 10).unwrap();
    assert_eq!(stored, vec![resent.clone()]);
    assert_eq!(s.incoming(&name("bob"), 500, &[3; 16]).unwrap(), Some(resent));
}

#[test]
fn a_damaged_id_bucket_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    let m = msg("bob", 4, 500, Direction::In);
    s.chat.insert(seen_key(&m.peer, m.sent_at), &b"short"[..]).unwrap();
    assert!(matches!(s.insert(&m), Err(StoreError::Corrupt("id bucket"))));
    // An id that points past the bucket's places.
    let bad = Seen { places: vec![], ids: vec![(m.sent_at, m.id, 7)], full: false };
    s.chat.insert(seen_key(&m.peer, m.sent_at), encode(&bad)).unwrap();
    assert!(matches!(s.insert(&m), Err(StoreError::Corrupt("id bucket"))));
    assert!(s.last(None, 10).unwrap().is_empty(), "nothing was half-written");
}

#[test]
fn a_batch_is_stored_together_in_order_and_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    let written = s.written();
    // 100 messages of 200 bytes, sent 1 ms apart: more than one batch value, and more
    // than one id bucket.
    let batch: Vec<StoredMessage> = (0..100u8)
        .map(|i| StoredMessage { body: "x".repeat(200), stored_at: 7000, ..msg("bob", i, 5000 + u64::from(i), Direction::In) })
        .collect();
    let mut twice = batch[..10].to_vec();
    twice.push(batch[3].clone());
    assert_eq!(s.receive(&twice).unwrap(), [vec![true; 10], vec![false]].concat(), "a repeat within one call counts once");
    assert_eq!(s.receive(&batch).unwrap(), [vec![false; 10], vec![true; 90]].concat(), "the first ten were stored already");
    assert_eq!(s.written() - written, 100, "one commit step per message stored");
    let values = s.chat.scan_prefix(peer_prefix(&name("bob"))).count();
    assert!((2..=10).contains(&values), "100 messages in {values} values");
    let got = s.last(Some(&name("bob")), 1000).unwrap();
    assert_eq!(got.iter().map(|m| m.id[0]).collect::<Vec<_>>(), (0..100).collect::<Vec<_>>(), "in the order they came");
    assert_eq!(s.last(Some(&name("bob")), 5).unwrap(), got[95..].to_vec());
    assert_eq!(s.last(None, 7).unwrap(), got[93..].to_vec());
    // The same id under another time is another message (only its sender could make it).
    let other = StoredMessage { sent_at: 1, ..batch[0].clone() };
    assert_eq!(s.receive(std::slice::from_ref(&other)).unwrap(), vec![true]);
    // Outgoing messages are not received.
    assert_eq!(s.receive(&[msg("bob", 200, 10, Direction::Out)]).unwrap(), vec![false]);
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.receive(&batch).unwrap(), vec![false; 100], "resends after a restart are known");
    assert_eq!(s.last(Some(&name("bob")), 1000).unwrap().len(), 101);
}

#[test]
fn messages_sent_together_are_kept_together_and_marked_in_one_go() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    let written = s.written();
    // Three peers' messages in one write, bob's more than one batch value's worth.
    let msgs: Vec<StoredMessage> = (0..60u8)
        .map(|i| StoredMessage { body: "y".repeat(150), ..msg(["bob", "carol", "bob"][usize::from(i % 3)], i, 3000, Direction::Out) })
        .chain([msg("bob", 99, 3000, Direction::In)])
        .collect();
    let refs = s.store_sent(&msgs.iter().collect::<Vec<_>>()).unwrap();
    assert!(refs[60].is_none(), "an incoming message is not stored as sent");
    let refs: Vec<MessageRef> = refs.into_iter().flatten().collect();
    assert_eq!(refs.len(), 60);
    assert_eq!(s.written() - written, 60, "one commit step per message");
    assert!(refs.iter().all(|r| r.batch.is_some() && r.direction == Direction::Out));
    let bob_values = s.chat.scan_prefix(peer_prefix(&name("bob"))).count();
    assert!((2..=8).contains(&bob_values), "40 of bob's in {bob_values} values");
    let bob = s.last(Some(&name("bob")), 100).unwrap();
    let want: Vec<u8> = (0..60).filter(|i| i % 3 != 1).collect();
    assert_eq!(bob.iter().map(|m| m.id[0]).collect::<Vec<_>>(), want, "in the order they went");
    assert!(bob.iter().all(|m| m.state == State::Pending));
    assert_eq!(s.message(&refs[4]).unwrap().unwrap().id, [4; 16]);
    // Acks for some of bob's and carol's, and one for a message that is not there.
    let mut acked: Vec<MessageRef> = refs.iter().filter(|r| r.id[0] % 2 == 0).cloned().collect();
    acked.push(MessageRef { id: [200; 16], ..refs[0].clone() });
    let before = s.written();
    assert_eq!(s.mark_delivered(&acked).unwrap(), 30, "every acked message found, once");
    assert!(s.written() - before <= 8, "one write per value touched, not per message");
    assert!(s.fail_pending(&refs[1]).unwrap(), "a pending one fails");
    assert!(!s.fail_pending(&refs[2]).unwrap(), "a delivered one stays delivered");
    assert!(!s.set_state(&MessageRef { direction: Direction::In, ..refs[3].clone() }, State::Delivered).unwrap());
    drop(s);
    let s = reopen(dir.path());
    for (i, r) in refs.iter().enumerate() {
        let state = s.message(r).unwrap().unwrap().state;
        let want = if i % 2 == 0 {
            State::Delivered
        } else if i == 1 {
            State::Failed
        } else {
            State::Pending
        };
        assert_eq!(state, want, "message {i}");
    }
    assert_eq!(s.last(None, 1000).unwrap().len(), 60);
}

#[test]
fn a_batch_after_a_restart_never_overwrites_one_from_before() {
    let dir = tempfile::tempdir().unwrap();
    // Two messages whose ids share their first 8 bytes, stored in the same millisecond
    // by two runs (the clock went back between them), each the run's first batch.
    let with_id = |tail: u8| StoredMessage { id: [[1u8; 8], [tail; 8]].concat().try_into().unwrap(), ..msg("bob", 0, 7000, Direction::In) };
    assert_eq!(reopen(dir.path()).receive(&[with_id(2)]).unwrap(), vec![true]);
    let s = reopen(dir.path());
    assert_eq!(s.receive(&[with_id(3)]).unwrap(), vec![true]);
    assert_eq!(s.last(Some(&name("bob")), 10).unwrap(), vec![with_id(2), with_id(3)]);
    // Sent batches alike.
    let out = StoredMessage { direction: Direction::Out, state: State::Pending, ..with_id(4) };
    let first = s.store_sent(&[&out]).unwrap();
    drop(s);
    let s = reopen(dir.path());
    let out2 = StoredMessage { id: [[1u8; 8], [5; 8]].concat().try_into().unwrap(), ..out.clone() };
    let second = s.store_sent(&[&out2]).unwrap();
    assert_ne!(first, second);
    assert_eq!(s.last(Some(&name("bob")), 10).unwrap().len(), 4);
}

#[test]
fn an_id_moved_by_a_repair_leaves_no_place_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    let m = msg("bob", 6, 800, Direction::In);
    let key = seen_key(&m.peer, m.sent_at);
    for round in 0..5u8 {
        // A batch cut short by a crash: the id points at a place that holds nothing.
        let mut seen = s.chat.get(&key).unwrap().map(|v| Seen::read(&v).unwrap()).unwrap_or_default();
        assert!(seen.set(m.sent_at, m.id, Place { stored_at: 1, id: [round; 16], kind: BATCH }));
        s.chat.insert(&key, encode(&seen)).unwrap();
        s.chat.remove(s.chat.scan_prefix(peer_prefix(&m.peer)).next().map(|i| i.unwrap().0).unwrap_or_default()).unwrap();
        assert!(s.insert(&m).unwrap(), "round {round}: the resend completes it");
        let seen = Seen::read(&s.chat.get(&key).unwrap().unwrap()).unwrap();
        assert_eq!((seen.ids.len(), seen.places.len()), (1, 1), "round {round}");
    }
    assert_eq!(s.last(None, 10).unwrap(), vec![StoredMessage { stored_at: 800, ..m }]);
}

#[test]
fn a_bucket_that_does_not_add_up_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    let m = msg("bob", 4, 500, Direction::In);
    let place = Place { stored_at: 1, id: [0; 16], kind: BATCH };
    let too_many_places = Seen { places: vec![place; 70_000], ids: vec![(m.sent_at, m.id, 0)], full: false };
    let too_many_ids = Seen { places: vec![place], ids: vec![(1, [0; 16], 0); SEEN_CAP + 1], full: true };
    for bad in [too_many_places, too_many_ids] {
        s.chat.insert(seen_key(&m.peer, m.sent_at), encode(&bad)).unwrap();
        assert!(matches!(s.insert(&m), Err(StoreError::Corrupt("id bucket"))));
        assert!(matches!(s.incoming(&m.peer, m.sent_at, &m.id), Err(StoreError::Corrupt("id bucket"))));
    }
    assert!(s.last(None, 10).unwrap().is_empty(), "nothing was half-written");
}

#[test]
fn ids_past_a_full_bucket_are_still_found() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    // A sender whose clock stands still: every message in one bucket.
    let batch: Vec<StoredMessage> = (0..200u8).map(|i| msg("bob", i, 42, Direction::In)).collect();
    assert_eq!(s.receive(&batch[..150]).unwrap(), vec![true; 150]);
    for m in &batch[..150] {
        assert!(!s.insert(m).unwrap(), "id {} is known", m.id[0]);
        assert_eq!(s.incoming(&name("bob"), 42, &m.id).unwrap().as_ref(), Some(m));
    }
    assert_eq!(s.receive(&batch).unwrap(), [vec![false; 150], vec![true; 50]].concat());
    let bucket: Seen = decode(&s.chat.get(seen_key(&name("bob"), 42)).unwrap().unwrap(), "id bucket").unwrap();
    assert!(bucket.full && bucket.ids.len() == SEEN_CAP, "the bucket stays bounded");
    assert_eq!(s.last(Some(&name("bob")), 1000).unwrap().len(), 200);
}

/// Writes five messages (three with bob, two with carol, one of carol's ours) in an
/// older schema's layout.
fn old_database(dir: &Path, schema: u64) {
    let db = sled::open(dir).unwrap();
    db.open_tree("meta").unwrap().insert("schema", &schema.to_be_bytes()).unwrap();
    let (messages, ids, times) = match schema {
        1 => (db.open_tree("messages").unwrap(), db.open_tree("ids").unwrap(), db.open_tree("by_time").unwrap()),
        2 => {
            let history = db.open_tree("history").unwrap();
            (history.clone(), history.clone(), history)
        }
        _ => {
            let chat = db.open_tree("chat").unwrap();
            (chat.clone(), chat.clone(), chat)
        }
    };
    let kind = |k: u8| if schema == 1 { vec![] } else { vec![k] };
    for i in 0..5u8 {
        let m = msg(if i < 3 { "bob" } else { "carol" }, i, 100 + u64::from(i), if i == 4 { Direction::Out } else { Direction::In });
        let mut key = [&kind(b'm')[..], m.peer.as_str().as_bytes(), &[0], &m.stored_at.to_be_bytes(), &m.id].concat();
        if schema == 3 {
            key.push(m.direction as u8);
            if m.direction == Direction::In {
                ids.insert([b"i", m.peer.as_str().as_bytes(), &[0], &m.id].concat(), &m.stored_at.to_be_bytes()).unwrap();
            }
            messages.insert(&key, encode(&m)).unwrap();
            continue;
        }
        messages.insert(&key, encode(&m)).unwrap();
        let id = [&kind(b'i')[..], m.peer.as_str().as_bytes(), &[0, m.direction as u8], &m.id].concat();
        ids.insert(id, key.as_slice()).unwrap();
        let time = [&kind(b't')[..], &m.stored_at.to_be_bytes(), &m.id, &[m.direction as u8]].concat();
        times.insert(time, key.as_slice()).unwrap();
    }
    if schema == 3 {
        // An index entry whose message a crash cut short.
        ids.insert([&b"ibob"[..], &[0], &[9; 16]].concat(), &100u64.to_be_bytes()).unwrap();
    }
    db.flush().unwrap();
}

#[test]
fn older_schemas_are_migrated_on_open() {
    for schema in [1, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        old_database(dir.path(), schema);
        let s = reopen(dir.path());
        let bob = s.last(Some(&name("bob")), 10).unwrap();
        assert_eq!(bob.iter().map(|m| m.id[0]).collect::<Vec<_>>(), vec![0, 1, 2], "schema {schema}");
        assert_eq!(s.last(None, 10).unwrap().iter().map(|m| m.id[0]).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        let resend = StoredMessage { stored_at: 999, ..msg("carol", 3, 103, Direction::In) };
        assert!(!s.insert(&resend).unwrap(), "the incoming ids came across");
        assert_eq!(s.incoming(&name("bob"), 101, &[1; 16]).unwrap().unwrap().stored_at, 101);
        assert!(s.chat.scan_prefix([OLD_INDEX]).next().is_none(), "schema 3's index is gone");
        let cut_short = StoredMessage { stored_at: 999, ..msg("bob", 9, 100, Direction::In) };
        assert!(s.insert(&cut_short).unwrap(), "a message a crash cut short is taken when it comes again");
        assert!(s.set_state(&msg("carol", 4, 104, Direction::Out).at(), State::Delivered).unwrap(), "ours can still be acked");
        drop(s);
        let db = sled_reopen(dir.path());
        let names = db.tree_names();
        for old in ["messages", "ids", "by_time", "history"] {
            assert!(!names.iter().any(|t| t.as_ref() == old.as_bytes()), "schema {schema}: {old} is gone");
        }
        assert_eq!(db.open_tree("meta").unwrap().get("schema").unwrap().unwrap().as_ref(), &SCHEMA_VERSION.to_be_bytes());
    }
}

#[test]
fn last_overall_merges_every_peer_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    // Interleaved in time across peers whose names prefix one another.
    let peers = ["bob", "bobby", "al_ice", "zed"];
    for i in 0..40u8 {
        let direction = if i % 3 == 0 { Direction::Out } else { Direction::In };
        s.insert(&msg(peers[usize::from(i) * 7 % 4], i, 1000 + u64::from(i) * 10, direction)).unwrap();
    }
    // Two at the same millisecond: both kept, ordered by id.
    s.insert(&msg("zed", 200, 5000, Direction::In)).unwrap();
    s.insert(&msg("bob", 201, 5000, Direction::In)).unwrap();
    let all = s.last(None, 12).unwrap();
    let mut want: Vec<u8> = (30..40).collect();
    want.extend([200, 201]);
    assert_eq!(all.iter().map(|m| m.id[0]).collect::<Vec<_>>(), want);
    assert_eq!(s.last(None, 1000).unwrap().len(), 42);
    assert!(s.last(None, 0).unwrap().is_empty());
}

#[test]
fn survives_reopen_and_checks_schema() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = reopen(dir.path());
        s.insert(&msg("bob", 1, 10, Direction::In)).unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(s.last(None, 10).unwrap().len(), 1);
    drop(s);
    sled_reopen(dir.path()).open_tree("meta").unwrap().insert("schema", &9u64.to_be_bytes()).unwrap();
    assert!(matches!(open_retrying(dir.path()), Err(StoreError::Schema(9))));
}

#[test]
fn a_history_open_elsewhere_is_refused_and_the_retry_sees_it_free_up() {
    let dir = tempfile::tempdir().unwrap();
    let first = reopen(dir.path());
    first.insert(&msg("bob", 1, 10, Direction::In)).unwrap();
    // A second open while the first is alive fails on the lock, as an error.
    match SledStore::open(dir.path()) {
        Err(StoreError::Db(sled::Error::Io(e))) => assert!(lock_busy(&e), "{e}"),
        Err(e) => panic!("expected a busy lock, got {e}"),
        Ok(_) => panic!("the same history was opened twice"),
    }
    // The retry used by the tests above waits for the first to go.
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(first);
    });
    let s = reopen(dir.path());
    holder.join().unwrap();
    assert_eq!(s.last(None, 10).unwrap().len(), 1);
}

/// Set in a child process of the crash tests below: the directory of the store it
/// writes to before it aborts.
const CRASH_CHILD: &str = "SOTTO_TEST_STORE_CRASH_CHILD";

/// Round `round` of the crashing child: `n` incoming and `n` outgoing messages, half of
/// the outgoing ones marked delivered, a contact, all flushed, then abort (no `Drop`,
/// no checkpoint: sled alone has none of it on disk).
fn crash_child(dir: &Path, round: u8, n: u8) -> ! {
    let s = SledStore::open(dir).unwrap();
    if round == 2 {
        // sled ahead of the journal: a write the journal never synced is in sled's log
        // on disk (as when sled writes out a full buffer of its own accord).
        s.insert(&msg("erin", 1, 4000, Direction::Out)).unwrap();
        s.wait_durable(s.written()).unwrap();
        s.insert(&msg("erin", 2, 4001, Direction::Out)).unwrap();
        s.disk.db.flush().unwrap();
        println!("child done");
        std::process::abort()
    }
    if round == 3 {
        s.insert(&msg("erin", 3, 4002, Direction::Out)).unwrap();
        s.wait_durable(s.written()).unwrap();
        println!("child done");
        std::process::abort()
    }
    let base = round * n;
    let incoming: Vec<StoredMessage> = (0..n).map(|i| msg("bob", base + i, 1000 + u64::from(base + i), Direction::In)).collect();
    s.receive(&incoming).unwrap();
    for i in 0..n {
        let out = msg("carol", base + i, 2000 + u64::from(base + i), Direction::Out);
        s.insert(&out).unwrap();
        if i % 2 == 0 {
            s.set_state(&out.at(), State::Delivered).unwrap();
        }
    }
    s.update_contact(&name("carol"), &mut |_| Some(contact("carol", round))).unwrap();
    s.wait_durable(s.written()).unwrap();
    // Written after the flush, and not waited for: it may or may not survive.
    s.insert(&msg("dave", base, 3000, Direction::Out)).unwrap();
    println!("child done");
    std::process::abort()
}

fn contact(user: &str, n: u8) -> Contact {
    let key = crate::presence::tests::identity(1);
    Contact {
        username: name(user),
        identity_key: key.public(),
        noise: key.binding(),
        verified: false,
        first_seen: u64::from(n),
        last_seen: u64::from(n),
        highest_seq: u64::from(n),
        last_handshake: 0,
        changed_key: None,
    }
}

/// Runs this test again in a child process that writes round `round` and aborts.
fn run_crashing_child(dir: &Path, round: u8) {
    run_child("store::tests::a_crash_loses_nothing_a_flush_covered", dir, round);
}

#[test]
fn a_crash_loses_nothing_a_flush_covered() {
    const N: u8 = 40;
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        let round = std::env::var("SOTTO_TEST_STORE_CRASH_ROUND").unwrap().parse().unwrap();
        crash_child(Path::new(&dir), round, N);
    }
    let dir = tempfile::tempdir().unwrap();
    run_crashing_child(dir.path(), 0);
    {
        // sled by itself lost the round: only the journal has it.
        let db = sled_reopen(dir.path());
        assert!(db.open_tree("chat").unwrap().is_empty(), "sled was flushed before the crash; this test shows nothing");
    }
    // The second round opens the store (replaying the first), writes more and aborts
    // again before any checkpoint of its own.
    run_crashing_child(dir.path(), 1);
    let s = reopen(dir.path());
    let bob = s.last(Some(&name("bob")), 1000).unwrap();
    assert_eq!(bob.iter().map(|m| m.id[0]).collect::<Vec<_>>(), (0..2 * N).collect::<Vec<_>>(), "every incoming message, once");
    let carol = s.last(Some(&name("carol")), 1000).unwrap();
    assert_eq!(carol.len(), usize::from(2 * N));
    for m in &carol {
        let expected = if (m.id[0] % N) % 2 == 0 { State::Delivered } else { State::Pending };
        assert_eq!(m.state, expected, "message {}", m.id[0]);
    }
    assert_eq!(s.contact(&name("carol")).unwrap(), Some(contact("carol", 1)));
    // A resend of a recovered message is still recognised.
    assert!(!s.receive(&[msg("bob", 3, 1003, Direction::In)]).unwrap()[0]);
    drop(s);
    // sled ahead of what the journal synced: what sled has stands, nothing is replayed
    // over it, and the journal's numbering goes on past it.
    run_crashing_child(dir.path(), 2);
    assert_eq!(reopen(dir.path()).last(Some(&name("erin")), 10).unwrap().len(), 2);
    // The next crash after it: the journal's records after sled's are replayed.
    run_crashing_child(dir.path(), 3);
    assert_eq!(reopen(dir.path()).last(Some(&name("erin")), 10).unwrap().len(), 3);
    // Closed cleanly: the journal is empty, and sled holds everything by itself.
    let db = sled_reopen(dir.path());
    assert_eq!(db.open_tree("chat").unwrap().scan_prefix(b"merin").count(), 3);
}

#[test]
fn a_journal_older_than_the_database_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = msg("bob", 1, 10, Direction::Out);
    let s = reopen(dir.path());
    s.insert(&m).unwrap();
    s.wait_durable(s.written()).unwrap();
    // The journal as it is now, holding the pending message.
    let saved: Vec<Vec<u8>> = (0..2).map(|i| std::fs::read(dir.path().join(format!("journal-{i}"))).unwrap()).collect();
    s.set_state(&m.at(), State::Delivered).unwrap();
    drop(s);
    // Put back, it would replay the pending state over the delivered one; its records
    // are all at or below the last one sled applied, so none is replayed.
    for (i, bytes) in saved.iter().enumerate() {
        std::fs::write(dir.path().join(format!("journal-{i}")), bytes).unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(s.message(&m.at()).unwrap().unwrap().state, State::Delivered);
}

#[test]
fn a_journal_that_skips_records_the_database_lacks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    s.insert(&msg("bob", 1, 10, Direction::Out)).unwrap();
    drop(s);
    let applied = applied_record(&sled_reopen(dir.path()).open_tree("meta").unwrap()).unwrap();
    assert!(applied >= 1);
    // Records from a later point than the database has reached, with a gap before them.
    let journal = Journal::open(dir.path()).unwrap().journal;
    journal.start(applied + 5).unwrap();
    journal.append(&[Write { tree: TreeId::Chat, key: b"x".to_vec(), value: b"y".to_vec() }]).unwrap();
    journal.sync().unwrap();
    drop(journal);
    assert!(matches!(open_retrying(dir.path()), Err(StoreError::Corrupt(_))));
    // So is a last-applied number no record can have.
    let dir = tempfile::tempdir().unwrap();
    drop(reopen(dir.path()));
    sled_reopen(dir.path()).open_tree("meta").unwrap().insert(APPLIED, &u64::MAX.to_be_bytes()).unwrap();
    assert!(matches!(open_retrying(dir.path()), Err(StoreError::Corrupt("journal number"))));
}

/// Runs `test` again in a child process, with `CRASH_CHILD` set to `dir` (and the
/// round it is to write), and checks that it got as far as its flush and aborted.
fn run_child(test: &str, dir: &Path, round: u8) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD, dir)
        .env("SOTTO_TEST_STORE_CRASH_ROUND", round.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("child done"), "the child did not get as far as its flush: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the child was to abort");
}

#[test]
fn a_record_left_past_a_torn_one_is_never_replayed_after_a_restart() {
    let carol = |n| Write { tree: TreeId::Contacts, key: b"carol".to_vec(), value: encode(&contact("carol", n)) };
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        // The next run writes a record as long as the torn one, where it was.
        let s = SledStore::open(Path::new(&dir)).unwrap();
        s.put_contact(&contact("carol", 2)).unwrap();
        s.wait_durable(s.written()).unwrap();
        println!("child done");
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    s.put_contact(&contact("carol", 1)).unwrap();
    drop(s);
    let applied = applied_record(&sled_reopen(dir.path()).open_tree("meta").unwrap()).unwrap();
    // What a power cut in the middle of a sync can leave: the next record torn (its page
    // lost), and the one after it whole.
    let epoch = journal::testing::epoch(dir.path(), 0);
    let torn = journal::testing::record(epoch, applied + 1, &[carol(2)], false);
    let whole = journal::testing::record(epoch, applied + 2, &[carol(7)], true);
    journal::testing::put_records(dir.path(), 0, &[torn, whole].concat());
    run_child("store::tests::a_record_left_past_a_torn_one_is_never_replayed_after_a_restart", dir.path(), 0);
    // The new record now sits right before the old one, numbered just before it: the
    // epoch keeps it out.
    assert_eq!(reopen(dir.path()).contact(&name("carol")).unwrap(), Some(contact("carol", 2)));
}

#[test]
fn records_past_a_gap_are_dropped_and_the_store_opens_after_the_next_crash() {
    let put = |key: &[u8]| Write { tree: TreeId::Chat, key: key.to_vec(), value: b"v".to_vec() };
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        let s = SledStore::open(Path::new(&dir)).unwrap();
        s.insert(&msg("erin", 9, 5000, Direction::Out)).unwrap();
        s.wait_durable(s.written()).unwrap();
        println!("child done");
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let s = reopen(dir.path());
    s.insert(&msg("bob", 1, 10, Direction::Out)).unwrap();
    drop(s);
    let applied = applied_record(&sled_reopen(dir.path()).open_tree("meta").unwrap()).unwrap();
    // The first segment holds the next two records; the second one, the record after a
    // lost one (a pass that never synced whole).
    let (epoch, record) = (journal::testing::epoch(dir.path(), 0), journal::testing::record);
    journal::testing::put_records(
        dir.path(),
        0,
        &[record(epoch, applied + 1, &[put(b"x1")], true), record(epoch, applied + 2, &[put(b"x2")], true)].concat(),
    );
    journal::testing::put_records(dir.path(), 1, &record(epoch, applied + 4, &[put(b"x4")], true));
    // Opened, it replays the two and crashes after a write of its own; opened again, it
    // has all of that and nothing past the gap.
    run_child("store::tests::records_past_a_gap_are_dropped_and_the_store_opens_after_the_next_crash", dir.path(), 0);
    let s = reopen(dir.path());
    assert!(s.chat.get(b"x1").unwrap().is_some() && s.chat.get(b"x2").unwrap().is_some());
    assert!(s.chat.get(b"x4").unwrap().is_none());
    assert_eq!(s.last(Some(&name("erin")), 10).unwrap().len(), 1);
}

#[test]
fn a_schema_4_database_is_taken_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let m = msg("bob", 1, 10, Direction::In);
    let s = reopen(dir.path());
    s.insert(&m).unwrap();
    drop(s);
    sled_reopen(dir.path()).open_tree("meta").unwrap().insert("schema", &4u64.to_be_bytes()).unwrap();
    let s = reopen(dir.path());
    assert_eq!(s.last(None, 10).unwrap(), [m]);
    drop(s);
    let meta = sled_reopen(dir.path()).open_tree("meta").unwrap();
    assert_eq!(meta.get("schema").unwrap().unwrap().as_ref(), &SCHEMA_VERSION.to_be_bytes());
}
