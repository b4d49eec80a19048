//! A live session with one peer: the task that seals what senders queue, reads and
//! opens what the peer sends, stores incoming messages and acknowledges each once its
//! flush is done. Several messages and acks go out in one write; frames that arrived
//! whole are read without a copy.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use super::{
    lock, store_for_session, AgentEvent, Inner, Outgoing, SessionHandle, Slot, Waiting, FRAME_TIMEOUT, SESSION_QUEUE, WRITE_BATCH,
};
use crate::clock::unix_now_ms;
use crate::peer::session::{PeerMessage, Transport, CHAT_OVERHEAD, MAX_BODY, MAX_NOISE_MESSAGE, NOISE_TAG_LEN};
use crate::quic::{FrameReader, WRITE_TIMEOUT};
use crate::store::{flush_in_place, Direction, Durability, MessageRef, State, StoredMessage};
use crate::username::Username;
use crate::wire::encode_message;

/// Frames taken together from the reader, at most (more once the first batch alone
/// is bigger): their messages are stored in one go.
const READ_BATCH: usize = 256;

pub(super) fn start_session(
    inner: &Arc<Inner>,
    peer: Username,
    conn: quinn::Connection,
    transport: Transport,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dialed: bool,
) -> SessionHandle {
    let (outgoing, queue) = mpsc::channel(SESSION_QUEUE);
    let handle = SessionHandle { id: inner.next_session.fetch_add(1, Ordering::Relaxed), conn: conn.clone(), outgoing };
    if let Some(old) = lock(&inner.sessions).insert(peer.clone(), handle.clone()) {
        old.conn.close(0u32.into(), b"replaced by a newer session");
    }
    debug!(%peer, dialed, "session open");
    let _ = inner.events.send(AgentEvent::SessionOpened { peer: peer.clone(), dialed });
    tokio::spawn(run_session(inner.clone(), peer, handle.id, conn, transport, send, recv, queue));
    handle
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    inner: Arc<Inner>,
    peer: Username,
    session_id: u64,
    conn: quinn::Connection,
    mut transport: Transport,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut queue: mpsc::Receiver<Outgoing>,
) {
    // Frames are read by their own task: reading is not cancel-safe inside select!.
    // It hands on every frame that one piece of the stream completed, together.
    let (frames_tx, mut incoming) = mpsc::channel::<Vec<Bytes>>(16);
    let reader = tokio::spawn(async move {
        let mut frames = FrameReader::new(MAX_NOISE_MESSAGE).with_min_len(NOISE_TAG_LEN).with_frame_timeout(FRAME_TIMEOUT);
        loop {
            let mut batch = Vec::new();
            if !matches!(frames.read(&mut recv, &mut batch).await, Ok(true)) || frames_tx.send(batch).await.is_err() {
                break;
            }
        }
    });
    let mut waiting: HashMap<[u8; 16], Waiting> = HashMap::new();
    // Acks owed for stored messages, oldest first, each sent once its flush is done.
    let mut owed: VecDeque<(u64, [u8; 16])> = VecDeque::new();
    let mut progress = inner.store.durability();
    let mut prune_at = SESSION_QUEUE;
    // Decrypted plaintext (a reused buffer), and the frames of one write (handed to the
    // stream as they are).
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    let reason = loop {
        tokio::select! {
            batch = incoming.recv() => {
                let Some(mut batch) = batch else { break "stream ended".to_string() };
                // Whatever else the reader has handed on joins this batch.
                while batch.len() < READ_BATCH {
                    let Ok(more) = incoming.try_recv() else { break };
                    batch.extend(more);
                }
                let (mut failed, before, expected) = (None, owed.len(), waiting.len());
                let (mut chats, mut delivered) = (Vec::new(), Vec::new());
                for frame in batch {
                    let message = match transport.open_frame(frame, &mut plain) {
                        Ok(m) => m,
                        Err(e) => { failed = Some(e.to_string()); break }
                    };
                    if let Err(e) = handle_message(&peer, message, &mut waiting, &mut chats, &mut delivered) {
                        failed = Some(e);
                        break;
                    }
                }
                // Senders woken by acks were woken first: their marks are written now.
                if let Err(e) = mark_delivered(&inner, &peer, &delivered) { break e }
                if let Some(e) = failed { break e }
                // Everything this batch brought is stored together, in a few writes.
                if let Err(e) = store_incoming(&inner, chats, &mut owed) { break e }
                if owed.len() > before {
                    // One flush covers everything this batch stored.
                    // With nothing else queued here, flushing on this thread saves the
                    // hand-off to the flusher thread and back; under load the flusher
                    // works alongside while this session reads on. Not when this batch
                    // woke a sender: the task woken last waits in this worker's own
                    // slot, which no other worker takes, and would wait out the flush.
                    let idle = incoming.is_empty() && queue.is_empty() && waiting.len() == expected;
                    let here = if idle { flush_in_place(inner.store.as_ref()) } else { None };
                    let point = here.unwrap_or_else(|| inner.store.written());
                    owed.iter_mut().skip(before).for_each(|(at, _)| *at = point);
                }
                let done = *progress.borrow_and_update();
                if let Err(e) = send_acks(&mut owed, done, &mut transport, &mut send, &mut out).await { break e }
            }
            changed = progress.changed(), if !owed.is_empty() => {
                if changed.is_err() { break "history database closed".to_string() }
                let done = *progress.borrow_and_update();
                if let Err(e) = send_acks(&mut owed, done, &mut transport, &mut send, &mut out).await { break e }
            }
            first = queue.recv() => {
                let Some(first) = first else { break "closed".to_string() };
                // Everything queued meanwhile goes out in the same write.
                let mut items = vec![first];
                let mut bytes = CHAT_OVERHEAD + items[0].msg.body.len();
                while bytes < WRITE_BATCH {
                    let Ok(next) = queue.try_recv() else { break };
                    bytes += CHAT_OVERHEAD + next.msg.body.len();
                    items.push(next);
                }
                let claims = match claim_outgoing(&inner, &items) { Ok(c) => c, Err(e) => break e };
                let mut sealed = Ok(());
                for (o, claim) in items.iter().zip(&claims) {
                    if matches!(claim, Claim::Skip) { continue }
                    sealed = transport.seal_chat(&o.msg.id, o.msg.sent_at, &o.msg.body, &mut out);
                    if sealed.is_err() {
                        break;
                    }
                }
                if let Err(e) = sealed { break e.to_string() }
                // The write goes first and the sender's copy is stored right after: the
                // copy reaches the disk with a later flush either way, and the message
                // need not wait for the store here. A stream that takes only part of it
                // for now gets the rest once the copy is stored.
                let mut rest = Bytes::from(std::mem::take(&mut out));
                if let Err(e) = write_now(&mut send, &mut rest) { break e }
                if rest.is_empty() && claims.iter().any(|c| !matches!(c, Claim::Skip)) {
                    // Let the stream's driver, woken onto this worker, send it first.
                    tokio::task::yield_now().await;
                }
                let places = match store_claimed(&inner, &items, claims) { Ok(p) => p, Err(e) => break e };
                for (o, at) in items.into_iter().zip(places) {
                    // A message whose sender gave up (and keeps it as failed) stays here.
                    let Some(at) = at else { continue };
                    // Senders that gave up leave closed channels behind: drop them.
                    if waiting.len() >= prune_at {
                        waiting.retain(|_, w| !w.acked.is_closed());
                        prune_at = (waiting.len() * 2).max(SESSION_QUEUE);
                    }
                    waiting.insert(at.id, Waiting { at, acked: o.acked });
                }
                if let Err(e) = write_bytes(&mut send, rest).await { break e }
            }
        }
    };
    debug!(%peer, %reason, "session closed");
    reader.abort();
    conn.close(0u32.into(), b"session closed");
    {
        let mut sessions = lock(&inner.sessions);
        if sessions.get(&peer).is_some_and(|s| s.id == session_id) {
            sessions.remove(&peer);
        }
    }
    let _ = inner.events.send(AgentEvent::SessionClosed { peer });
}

/// Sends the acks whose messages are on disk, in order, in one write; an ack whose
/// flush failed is never sent, and ends the session (the sender will retry).
async fn send_acks(
    owed: &mut VecDeque<(u64, [u8; 16])>,
    done: Durability,
    transport: &mut Transport,
    send: &mut quinn::SendStream,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    while let Some(&(point, id)) = owed.front() {
        match done.covers(point) {
            None => break,
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(())) => {
                owed.pop_front();
                transport.seal_frame(&encode_message(&PeerMessage::Ack { id }), out).map_err(|e| e.to_string())?;
            }
        }
    }
    write_all(send, out).await
}

/// Hands `out` to the stream (nothing to do when it is empty) without copying it, and
/// leaves it empty; gives up if the other side does not take it within
/// [`WRITE_TIMEOUT`].
async fn write_all(send: &mut quinn::SendStream, out: &mut Vec<u8>) -> Result<(), String> {
    write_bytes(send, Bytes::from(std::mem::take(out))).await
}

/// [`write_all`] for bytes already handed over.
async fn write_bytes(send: &mut quinn::SendStream, bytes: Bytes) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(WRITE_TIMEOUT, send.write_chunk(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the other side stopped reading".into()),
    }
}

/// Hands the stream as much of `bytes` as it takes without waiting; `bytes` keeps the
/// rest (all of it when the stream is blocked).
fn write_now(send: &mut quinn::SendStream, bytes: &mut Bytes) -> Result<(), String> {
    use std::future::Future;
    let mut chunks = [std::mem::take(bytes)];
    // `write_chunks` is cancel-safe: when it does not finish at once, nothing was written.
    let polled = std::pin::pin!(send.write_chunks(&mut chunks)).poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    *bytes = std::mem::take(&mut chunks[0]);
    match polled {
        std::task::Poll::Ready(Err(e)) => Err(e.to_string()),
        _ => Ok(()),
    }
}

/// Stores the messages a batch of frames brought, and owes an ack for each (a resend
/// too: whatever it was stored with is on disk by the time its ack goes).
fn store_incoming(inner: &Inner, chats: Vec<StoredMessage>, owed: &mut VecDeque<(u64, [u8; 16])>) -> Result<(), String> {
    if chats.is_empty() {
        return Ok(());
    }
    let added = inner.store.receive(&chats).map_err(|e| e.to_string())?;
    for (msg, added) in chats.into_iter().zip(added) {
        owed.push_back((0, msg.id));
        if added {
            let _ = inner.events.send(AgentEvent::Received(msg));
        }
    }
    Ok(())
}

/// What a session does with one message it took from its queue.
enum Claim {
    /// Its sender gave up before any session took it, and keeps it: it does not go out.
    Skip,
    /// Stored already (by a session it was handed to before, or for one): it goes out
    /// and keeps that record.
    Stored(MessageRef),
    /// This session sends it, then stores it ([`store_claimed`]).
    Fresh,
}

/// Takes the messages about to go out: those nobody sent yet become this session's to
/// store once they are with the stream. One that another session sent but did not
/// store is stored now, before it goes out again.
fn claim_outgoing(inner: &Inner, items: &[Outgoing]) -> Result<Vec<Claim>, String> {
    let _outbox = lock(&inner.outbox);
    items
        .iter()
        .map(|o| {
            let mut slot = lock(&o.slot);
            Ok(match &*slot {
                Slot::Unstored => {
                    *slot = Slot::Sending;
                    Claim::Fresh
                }
                Slot::Sending => Claim::Stored(store_for_session(inner, &mut slot, &o.msg).map_err(|e| e.to_string())?.0),
                Slot::Stored { at, .. } => Claim::Stored(at.clone()),
                Slot::Kept { at, point } => {
                    let at = at.clone();
                    *slot = Slot::Stored { at: at.clone(), point: *point };
                    Claim::Stored(at)
                }
                Slot::Abandoned => Claim::Skip,
            })
        })
        .collect()
}

/// Stores (pending, in one go) the messages this session just sent that nobody stored
/// meanwhile, and says where each sent message is kept (`None` for one not sent).
fn store_claimed(inner: &Inner, items: &[Outgoing], claims: Vec<Claim>) -> Result<Vec<Option<MessageRef>>, String> {
    let _outbox = lock(&inner.outbox);
    let mut places: Vec<Option<MessageRef>> = Vec::with_capacity(items.len());
    let mut fresh = Vec::new();
    for (i, (o, claim)) in items.iter().zip(claims).enumerate() {
        places.push(match claim {
            Claim::Skip => None,
            Claim::Stored(at) => Some(at),
            Claim::Fresh => match &*lock(&o.slot) {
                // Its sender gave up meanwhile, or another session took it over: they
                // stored it.
                Slot::Stored { at, .. } => Some(at.clone()),
                // Still this session's to store (anyone else moves it on from
                // `Sending` only to `Stored`).
                slot => {
                    debug_assert!(matches!(slot, Slot::Sending), "a claimed message left Sending other than to Stored");
                    fresh.push(i);
                    None
                }
            },
        });
    }
    if fresh.is_empty() {
        return Ok(places);
    }
    let msgs: Vec<&StoredMessage> = fresh.iter().map(|&i| &*items[i].msg).collect();
    let stored = inner.store.store_sent(&msgs).map_err(|e| e.to_string())?;
    // The flusher starts on them now, while they travel.
    let point = inner.store.written();
    for (i, at) in fresh.into_iter().zip(stored) {
        let at = at.expect("store_sent places every outgoing message");
        *lock(&items[i].slot) = Slot::Stored { at: at.clone(), point };
        places[i] = Some(at);
    }
    Ok(places)
}

/// Marks the messages acked in one batch delivered, in one go.
fn mark_delivered(inner: &Inner, peer: &Username, delivered: &[MessageRef]) -> Result<(), String> {
    if delivered.is_empty() {
        return Ok(());
    }
    inner.store.mark_delivered(delivered).map_err(|e| e.to_string())?;
    for at in delivered {
        let _ = inner.events.send(AgentEvent::Delivered { peer: peer.clone(), id: at.id });
    }
    Ok(())
}

/// Applies one decrypted message: an ack wakes its sender and joins `delivered`, and a
/// chat message joins `chats`, to be stored with the rest of its batch.
fn handle_message(
    peer: &Username,
    message: PeerMessage,
    waiting: &mut HashMap<[u8; 16], Waiting>,
    chats: &mut Vec<StoredMessage>,
    delivered: &mut Vec<MessageRef>,
) -> Result<(), String> {
    match message {
        PeerMessage::Chat { id, sent_at, body } => {
            if body.len() > MAX_BODY {
                return Err("oversized message".into());
            }
            // Messages stored together share their time.
            let stored_at = chats.first().map_or_else(unix_now_ms, |m| m.stored_at);
            chats.push(StoredMessage {
                id,
                peer: peer.clone(),
                direction: Direction::In,
                body,
                sent_at,
                stored_at,
                state: State::Received,
            });
            Ok(())
        }
        PeerMessage::Ack { id } => {
            if let Some(Waiting { at, acked }) = waiting.remove(&id) {
                let _ = acked.send(());
                delivered.push(at);
            }
            Ok(())
        }
        PeerMessage::Unknown => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::{Agent, AgentConfig, KeepIfCancelled};
    use super::*;
    use crate::address::ServerAddress;
    use crate::store::SledStore;
    use crate::tls::CertKey;

    /// An agent that never dials: only its outbox and history are used.
    fn agent(dir: &std::path::Path) -> Agent {
        let store: Arc<dyn crate::store::Store> = Arc::new(SledStore::open(&dir.join("db")).unwrap());
        let config = AgentConfig {
            username: Username::parse("alice").unwrap(),
            server: ServerAddress::new(([127, 0, 0, 1], 9).into(), [0; 32]),
            listen: ([127, 0, 0, 1], 0).into(),
        };
        let id = Arc::new(crate::presence::tests::identity(1));
        Agent::start(id, store, &CertKey::generate("sotto-peer").unwrap(), config).unwrap()
    }

    fn outgoing(n: u8) -> Outgoing {
        let msg = StoredMessage {
            id: [n; 16],
            peer: Username::parse("bob").unwrap(),
            direction: Direction::Out,
            body: format!("message {n}"),
            sent_at: 1_000 + u64::from(n),
            stored_at: 1_000 + u64::from(n),
            state: State::Pending,
        };
        Outgoing { msg: Arc::new(msg), slot: Arc::new(Mutex::new(Slot::Unstored)), acked: tokio::sync::oneshot::channel().0 }
    }

    fn history(agent: &Agent) -> Vec<(String, State)> {
        let bob = Username::parse("bob").unwrap();
        agent.store().last(Some(&bob), 100).unwrap().into_iter().map(|m| (m.body, m.state)).collect()
    }

    #[tokio::test]
    async fn a_sent_message_is_stored_once_whoever_needs_its_record_first() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        let inner = &agent.inner;
        let items = vec![outgoing(1), outgoing(2), outgoing(3)];
        *lock(&items[2].slot) = Slot::Abandoned;
        let claims = claim_outgoing(inner, &items).unwrap();
        assert!(matches!(claims[..], [Claim::Fresh, Claim::Fresh, Claim::Skip]));
        // Nothing is stored before the write.
        assert!(history(&agent).is_empty());
        // Before the session stores them, message 2's sender gives up and needs its
        // record: it stores it for the session.
        let (given_up, _) = {
            let _outbox = lock(&inner.outbox);
            store_for_session(inner, &mut lock(&items[1].slot), &items[1].msg).unwrap()
        };
        let places = store_claimed(inner, &items, claims).unwrap();
        assert_eq!(places[1].as_ref(), Some(&given_up), "the session keeps to the record stored for it");
        assert!(places[0].is_some() && places[2].is_none());
        assert!(matches!(&*lock(&items[0].slot), Slot::Stored { at, .. } if Some(at) == places[0].as_ref()));
        assert_eq!(history(&agent), [("message 1".into(), State::Pending), ("message 2".into(), State::Pending)]);

        // Handed to another session: a stored message keeps its record, and one a
        // session sent but never stored (it ended first) is stored before it goes out.
        let again = vec![outgoing(4)];
        *lock(&again[0].slot) = Slot::Sending;
        let claims = claim_outgoing(inner, &items[..2]).unwrap().into_iter().chain(claim_outgoing(inner, &again).unwrap());
        let claims: Vec<Claim> = claims.collect();
        assert!(matches!(&claims[0], Claim::Stored(at) if Some(at) == places[0].as_ref()));
        assert!(matches!(&claims[1], Claim::Stored(at) if *at == given_up));
        assert!(matches!(&claims[2], Claim::Stored(_)));
        assert_eq!(history(&agent).len(), 3, "{:?}", history(&agent));
        agent.shutdown().await;
    }

    #[tokio::test]
    async fn a_message_kept_before_the_dial_goes_out_with_its_record_unless_its_sender_gave_up() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        let inner = &agent.inner;
        let items = vec![outgoing(5), outgoing(6)];
        for o in &items {
            crate::peer::agent::keep_before_dial(inner, &o.slot, &o.msg).unwrap();
        }
        assert_eq!(history(&agent), [("message 5".into(), State::Pending), ("message 6".into(), State::Pending)]);
        let kept = match &*lock(&items[0].slot) {
            Slot::Kept { at, .. } => at.clone(),
            _ => panic!("not kept"),
        };
        // Message 6's sender gives up (its dial failed, or it was dropped) while the
        // message still waits in a session's queue: it is failed, and stays here.
        drop(KeepIfCancelled { inner, slot: &items[1].slot, msg: &items[1].msg, armed: true });
        let claims = claim_outgoing(inner, &items).unwrap();
        assert!(matches!(&claims[..], [Claim::Stored(at), Claim::Skip] if *at == kept));
        assert!(matches!(&*lock(&items[0].slot), Slot::Stored { at, .. } if *at == kept));
        assert!(matches!(&*lock(&items[1].slot), Slot::Abandoned));
        let places = store_claimed(inner, &items, claims).unwrap();
        assert_eq!(places, [Some(kept), None]);
        inner.store.flush().unwrap();
        assert_eq!(history(&agent), [("message 5".into(), State::Pending), ("message 6".into(), State::Failed)]);
        agent.shutdown().await;
    }

    #[tokio::test]
    async fn a_send_dropped_while_its_session_has_it_unstored_keeps_it_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        let inner = &agent.inner;
        let items = vec![outgoing(1)];
        let claims = claim_outgoing(inner, &items).unwrap();
        // The send is dropped between the session's write and its store.
        drop(KeepIfCancelled { inner, slot: &items[0].slot, msg: &items[0].msg, armed: true });
        assert_eq!(history(&agent), [("message 1".into(), State::Failed)]);
        // The session then keeps to that record: an ack still marks it delivered.
        let places = store_claimed(inner, &items, claims).unwrap();
        inner.store.mark_delivered(&[places[0].clone().unwrap()]).unwrap();
        assert_eq!(history(&agent), [("message 1".into(), State::Delivered)]);
        agent.shutdown().await;
    }
}
