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

use super::{lock, AgentEvent, Inner, Outgoing, SessionHandle, Slot, Waiting, FRAME_TIMEOUT, SESSION_QUEUE, WRITE_BATCH};
use crate::clock::unix_now_ms;
use crate::peer::session::{PeerMessage, Transport, MAX_BODY, MAX_NOISE_MESSAGE, NOISE_TAG_LEN};
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
                    let message = match transport.open_with(&frame, &mut plain) {
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
                let mut bytes = items[0].plain.len();
                while bytes < WRITE_BATCH {
                    let Ok(next) = queue.try_recv() else { break };
                    bytes += next.plain.len();
                    items.push(next);
                }
                let places = match store_outgoing(&inner, &items) { Ok(p) => p, Err(e) => break e };
                let mut sealed = Ok(());
                for (o, at) in items.into_iter().zip(places) {
                    // A message whose sender gave up (and keeps it as failed) stays here.
                    let Some(at) = at else { continue };
                    sealed = transport.seal_frame(&o.plain, &mut out);
                    if sealed.is_err() {
                        break;
                    }
                    // Senders that gave up leave closed channels behind: drop them.
                    if waiting.len() >= prune_at {
                        waiting.retain(|_, w| !w.acked.is_closed());
                        prune_at = (waiting.len() * 2).max(SESSION_QUEUE);
                    }
                    waiting.insert(at.id, Waiting { at, acked: o.acked });
                }
                if let Err(e) = sealed { break e.to_string() }
                if let Err(e) = write_all(&mut send, &mut out).await { break e }
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
    if out.is_empty() {
        return Ok(());
    }
    let written = tokio::time::timeout(WRITE_TIMEOUT, send.write_chunk(Bytes::from(std::mem::take(out)))).await;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the other side stopped reading".into()),
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

/// Stores (pending, in one go) the messages about to go out that no session stored
/// yet, and says where each is kept: `None` for one whose sender gave up, which does
/// not go out.
fn store_outgoing(inner: &Inner, items: &[Outgoing]) -> Result<Vec<Option<MessageRef>>, String> {
    let _outbox = lock(&inner.outbox);
    let places: Vec<Option<Option<MessageRef>>> = items
        .iter()
        .map(|o| match &*lock(&o.slot) {
            Slot::Unstored => None,
            Slot::Stored { at, .. } => Some(Some(at.clone())),
            Slot::Abandoned => Some(None),
        })
        .collect();
    let fresh: Vec<StoredMessage> = items.iter().zip(&places).filter(|(_, p)| p.is_none()).map(|(o, _)| o.msg.clone()).collect();
    if fresh.is_empty() {
        return Ok(places.into_iter().map(Option::flatten).collect());
    }
    let mut stored = inner.store.store_sent(&fresh).map_err(|e| e.to_string())?.into_iter();
    // The flusher starts on them now, while they travel.
    let point = inner.store.written();
    Ok(items
        .iter()
        .zip(places)
        .map(|(o, place)| match place {
            Some(place) => place,
            None => {
                let at = stored.next().flatten().expect("store_sent places every outgoing message");
                *lock(&o.slot) = Slot::Stored { at: at.clone(), point };
                Some(at)
            }
        })
        .collect())
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
