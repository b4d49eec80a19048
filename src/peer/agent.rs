//! The running peer: a QUIC endpoint that dials and accepts `sotto-peer/1`, runs the
//! Noise handshake from [`super::session`], keeps one session per contact, stores
//! incoming messages before acknowledging them, and pins contacts' identity keys.
//!
//! `sotto up` runs one for as long as it stays online; `sotto send` without a running
//! node runs one for a single message.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use super::session::{Answer, Dial, SessionError, Transport, ALPN, MAX_BODY, MAX_HANDSHAKE_MESSAGE};
use crate::address::ServerAddress;
use crate::clock::{unix_now, unix_now_ms, unix_now_ns};
use crate::keys::{Identity, IdentityKey, NoiseBinding};
use crate::presence::PresenceRecord;
use crate::quic::{read_frame, write_frame, write_frames};
use crate::rendezvous::client::{verify_lookup, ClientError, RendezvousClient, VerifiedAccount, WatchEvent, LOOKUP_SKEW};
use crate::rendezvous::proto::Refusal;
use crate::store::{durable, Contact, Direction, MessageRef, State, Store, StoreError, StoredMessage};
use crate::tls::{self, CertKey};
use crate::username::Username;

mod handshake;
mod live;
use handshake::{accept_loop, dial};
use live::start_session;

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest preamble frame.
const MAX_PREAMBLE: usize = 128;
/// Outgoing messages queued per session before senders wait.
const SESSION_QUEUE: usize = 64;
/// Queued messages are sealed into one write until it holds this many bytes (counting
/// each chat's encoding at its most, `CHAT_OVERHEAD` over its body).
const WRITE_BATCH: usize = 64 * 1024;
/// Incoming handshakes in progress at once; more are refused until some finish.
const MAX_HANDSHAKES: usize = 64;
/// Incoming handshakes in progress at once from one source address (IPv6: one /64), so
/// one address cannot take all of [`MAX_HANDSHAKES`].
const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;
/// Time the rest of a transport frame has to arrive once its first byte has.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("cannot listen for peers on {addr}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a message was not delivered. Every variant leaves the message in history.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("the message is empty")]
    Empty,
    #[error("the message is {0} bytes; the limit is {MAX_BODY}")]
    TooLong(usize),
    #[error("you cannot message yourself")]
    ToSelf,
    #[error("no user {0} on the rendezvous node")]
    NoSuchUser(Username),
    #[error("{0} is not online; the message is kept in history as not delivered")]
    Offline(Username),
    #[error("{user} could not be reached ({reason}); the message is kept in history as not delivered")]
    Unreachable { user: Username, reason: String },
    #[error(
        "WARNING: {user}'s identity key CHANGED.\n  pinned fingerprint:    {pinned}\n  presented fingerprint: {presented}\n\
         This can mean a new device, or someone impersonating {user}. Nothing was sent to the new key.\n\
         Compare safety numbers with {user} in person, then run `sotto contact verify {user} SAFETY_NUMBER`."
    )]
    KeyChanged { user: Username, pinned: String, presented: String },
    #[error("the rendezvous node's answer for {user} does not verify: {reason}")]
    Untrusted { user: Username, reason: String },
    #[error("rendezvous node: {0}")]
    Rendezvous(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What happens in the agent, for `up` to print and for subscribers.
#[derive(Clone, Debug)]
pub enum AgentEvent {
    Received(StoredMessage),
    Delivered {
        peer: Username,
        id: [u8; 16],
    },
    KeyChanged {
        peer: Username,
        pinned: IdentityKey,
        presented: IdentityKey,
    },
    SessionOpened {
        peer: Username,
        dialed: bool,
    },
    SessionClosed {
        peer: Username,
    },
    /// A contact came online or went offline (pushed by the rendezvous node).
    Presence {
        peer: Username,
        online: bool,
    },
}

/// How to reach the rendezvous node and who we are there.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub username: Username,
    pub server: ServerAddress,
    pub listen: SocketAddr,
}

/// The handle a sender uses to put a message on a session.
#[derive(Clone)]
struct SessionHandle {
    id: u64,
    conn: quinn::Connection,
    outgoing: mpsc::Sender<Outgoing>,
}

struct Outgoing {
    /// The message as it is kept here, pending; the session encodes it where it seals
    /// it. Shared with its sender, and with every session it is handed to.
    msg: Arc<StoredMessage>,
    /// Whether a session has taken or stored it, shared by every session it is handed
    /// to.
    slot: Arc<Mutex<Slot>>,
    acked: oneshot::Sender<()>,
}

/// What became of an outgoing message here. Changed only under [`Inner::outbox`].
enum Slot {
    /// Not stored yet, and no session has sent it.
    Unstored,
    /// A session has taken it to send: it seals it, hands it to its stream and stores
    /// it right after, before it reads another frame (or before it waits for a stream
    /// that takes no more for now). It may already be on its way, or never leave if the
    /// session ends first. Anyone else who finds it here and needs its record (its
    /// sender giving up, a session it is handed to next) stores it first
    /// ([`store_for_session`]); the session then keeps to that record.
    Sending,
    /// Stored there, by the write that commit point covers.
    Stored { at: MessageRef, point: u64 },
    /// Stored there by its sender before it dialled, and not taken by any session yet:
    /// a session that takes it keeps to that record (it becomes [`Slot::Stored`]). If
    /// its sender gives up first, it is marked failed and abandoned, and does not go out
    /// (a session may still hold it in its queue).
    Kept { at: MessageRef, point: u64 },
    /// Its sender gave up before any session took it, and keeps it as failed itself:
    /// it does not go out.
    Abandoned,
}

/// Stores, pending, a message no session has stored yet (most often [`Slot::Sending`]:
/// taken but not stored), for someone who needs its record now: its sender giving up
/// or about to dial, or another session taking it over. Called under
/// [`Inner::outbox`].
fn store_for_session(inner: &Inner, slot: &mut Slot, msg: &StoredMessage) -> Result<(MessageRef, u64), StoreError> {
    let at = inner.store.store_sent(&[msg])?.pop().flatten().expect("store_sent places an outgoing message");
    let point = inner.store.written();
    *slot = Slot::Stored { at: at.clone(), point };
    Ok((at, point))
}

/// No session to put `msg` on: it is stored now, pending, so that its flush runs while
/// the peer is looked up and dialled (rather than after it has gone out, beside the
/// recipient's), and a crash meanwhile leaves it in history.
fn keep_before_dial(inner: &Inner, slot: &Mutex<Slot>, msg: &StoredMessage) -> Result<(), StoreError> {
    let _outbox = lock(&inner.outbox);
    let mut slot = lock(slot);
    match &*slot {
        Slot::Unstored => {
            let (at, point) = store_for_session(inner, &mut slot, msg)?;
            *slot = Slot::Kept { at, point };
        }
        Slot::Sending => _ = store_for_session(inner, &mut slot, msg)?,
        Slot::Stored { .. } | Slot::Kept { .. } | Slot::Abandoned => {}
    }
    Ok(())
}

/// Keeps a message in history as failed when its `send` is dropped before it finished
/// delivering (a task aborted at shutdown, a caller that stopped waiting): what the
/// user wrote is never silently lost. Not taken by a session yet: it is stored alone,
/// as failed, and no session sends it. Taken (stored or not yet): it is marked failed
/// unless its ack came first (a later ack still marks it delivered). Defused once
/// delivery has an outcome.
struct KeepIfCancelled<'a> {
    inner: &'a Inner,
    slot: &'a Mutex<Slot>,
    msg: &'a StoredMessage,
    armed: bool,
}

impl KeepIfCancelled<'_> {
    fn defuse(mut self) {
        self.armed = false;
    }
}

impl Drop for KeepIfCancelled<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let kept = {
            let _outbox = lock(&self.inner.outbox);
            let mut slot = lock(self.slot);
            match &*slot {
                Slot::Stored { at, .. } => self.inner.store.fail_pending(at).map(drop),
                Slot::Kept { at, .. } => {
                    let at = at.clone();
                    *slot = Slot::Abandoned;
                    self.inner.store.fail_pending(&at).map(drop)
                }
                Slot::Sending => {
                    store_for_session(self.inner, &mut slot, self.msg).and_then(|(at, _)| self.inner.store.fail_pending(&at).map(drop))
                }
                Slot::Abandoned => Ok(()),
                Slot::Unstored => {
                    *slot = Slot::Abandoned;
                    self.inner.store.insert(&StoredMessage { state: State::Failed, ..self.msg.clone() }).map(drop)
                }
            }
        };
        match kept {
            // On disk with the next flush, or when the store closes.
            Ok(()) => debug!(peer = %self.msg.peer, "send cancelled; the message is kept as failed"),
            Err(e) => warn!(peer = %self.msg.peer, error = %e, "send cancelled, and the message could not be kept as failed"),
        }
    }
}

/// The dialling state of one peer, held by the sender whose turn it is to dial.
#[derive(Default)]
struct DialTurn {
    /// When the last dial failed, and why.
    last_failure: Option<(std::time::Instant, String)>,
}

/// A sent message whose ack the session is waiting for.
struct Waiting {
    at: MessageRef,
    acked: oneshot::Sender<()>,
}

struct Inner {
    identity: Arc<Identity>,
    config: AgentConfig,
    store: Arc<dyn Store>,
    endpoint: quinn::Endpoint,
    node: tokio::sync::Mutex<Option<Arc<RendezvousClient>>>,
    sessions: Mutex<HashMap<Username, SessionHandle>>,
    /// One dial per peer at a time: senders that find no session queue here and use
    /// the one the first of them opened, instead of racing it with dials of their own
    /// (each new session replaces, and so closes, the one before).
    dialing: Mutex<HashMap<Username, Arc<tokio::sync::Mutex<DialTurn>>>>,
    events: broadcast::Sender<AgentEvent>,
    /// Held while outgoing messages' [`Slot`]s change.
    outbox: Mutex<()>,
    next_session: AtomicU64,
    last_timestamp: AtomicU64,
    /// Contacts' presence as last pushed by the node.
    presence: Mutex<HashMap<Username, bool>>,
    /// Wakes the presence watch when a contact is added.
    contacts_changed: tokio::sync::Notify,
    /// Background tasks to stop on shutdown.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A running peer. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Binds the peer endpoint and starts accepting sessions.
    pub fn start(identity: Arc<Identity>, store: Arc<dyn Store>, cert: &CertKey, config: AgentConfig) -> Result<Agent, AgentError> {
        let server = tls::server_config(cert, ALPN, 2)?;
        let endpoint =
            crate::quic::peer_endpoint(config.listen, Some(server)).map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let (events, _) = broadcast::channel(256);
        let inner = Arc::new(Inner {
            identity,
            config,
            store,
            endpoint,
            node: tokio::sync::Mutex::new(None),
            sessions: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            outbox: Mutex::new(()),
            events,
            next_session: AtomicU64::new(1),
            last_timestamp: AtomicU64::new(0),
            presence: Mutex::new(HashMap::new()),
            contacts_changed: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
        });
        tokio::spawn(accept_loop(inner.clone()));
        Ok(Agent { inner })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Addresses to put in the presence record: the listen address, or, when listening
    /// on all interfaces, the local address the OS routes towards the node.
    pub async fn advertised_addrs(&self) -> Vec<SocketAddr> {
        let Ok(local) = self.local_addr() else { return Vec::new() };
        if !local.ip().is_unspecified() {
            return vec![local];
        }
        let node = self.inner.config.server.resolve().await.ok().and_then(|a| a.first().copied());
        let ip = node.and_then(route_ip).unwrap_or(IpAddr::from([127, 0, 0, 1]));
        vec![SocketAddr::new(ip, local.port())]
    }

    /// Keeps watching the contacts' presence at the node for as long as the agent runs,
    /// reconnecting with backoff; changes arrive as [`AgentEvent::Presence`].
    pub fn watch_contacts(&self) {
        let task = tokio::spawn(watch_contacts(self.inner.clone()));
        lock(&self.inner.tasks).push(task);
    }

    /// Whether `user` is online, as last pushed by the node (`None` before the first push).
    pub fn presence_of(&self, user: &Username) -> Option<bool> {
        lock(&self.inner.presence).get(user).copied()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.inner.events.subscribe()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn identity(&self) -> &Arc<Identity> {
        &self.inner.identity
    }

    pub fn username(&self) -> &Username {
        &self.inner.config.username
    }

    /// Stores `body` for `to`, delivers it and waits for the ack; returns once the
    /// message is on disk on both sides. On failure the message stays in history as
    /// `failed`, and so it does if this future is dropped before the ack came. Many
    /// sends may run at once: they share the session and its flushes.
    pub async fn send(&self, to: &Username, body: &str) -> Result<StoredMessage, SendError> {
        if body.is_empty() {
            return Err(SendError::Empty);
        }
        if body.len() > MAX_BODY {
            return Err(SendError::TooLong(body.len()));
        }
        if to == &self.inner.config.username {
            return Err(SendError::ToSelf);
        }
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let now = unix_now_ms();
        let msg = Arc::new(StoredMessage {
            id,
            peer: to.clone(),
            direction: Direction::Out,
            body: body.to_string(),
            sent_at: now,
            stored_at: now,
            state: State::Pending,
        });
        // The session that takes the message stores it, pending, with everything else
        // it sends in that write, as soon as the write is with its stream (or whoever
        // needs its record first does: `deliver` when it must dial, below, or a later
        // session); it marks it delivered when the ack arrives, just after it wakes us
        // (an ack that comes after we gave up still marks it).
        let slot = Arc::new(Mutex::new(Slot::Unstored));
        let cancelled = KeepIfCancelled { inner: &self.inner, slot: &slot, msg: &msg, armed: true };
        let outcome = self.deliver(&msg, &slot).await;
        cancelled.defuse();
        let stored = {
            let _outbox = lock(&self.inner.outbox);
            let mut slot = lock(&slot);
            match &*slot {
                Slot::Stored { at, point } => Some((at.clone(), *point)),
                // No session took it: it does not go out now that we have given up.
                Slot::Kept { at, point } => {
                    let kept = Some((at.clone(), *point));
                    *slot = Slot::Abandoned;
                    kept
                }
                // Taken (maybe sent) by a session that has not stored it yet.
                Slot::Sending => Some(store_for_session(&self.inner, &mut slot, &msg)?),
                Slot::Unstored | Slot::Abandoned => {
                    *slot = Slot::Abandoned;
                    None
                }
            }
        };
        let store = &self.inner.store;
        let point = match stored {
            Some((at, point)) => {
                if outcome.is_err() {
                    store.fail_pending(&at)?;
                }
                point
            }
            None => {
                // No session took it: it never went out, and is kept as failed.
                let state = if outcome.is_ok() { State::Delivered } else { State::Failed };
                store.insert(&StoredMessage { state, ..(*msg).clone() })?;
                store.written()
            }
        };
        // Report only once the message itself is on disk here (the recipient acked only
        // once it was on disk there). The delivered or failed mark reaches the disk with
        // the next flush, which starts at once; `shutdown` waits for it.
        durable(store.as_ref(), point).await?;
        outcome.map(|()| StoredMessage { state: State::Delivered, ..Arc::unwrap_or_clone(msg) })
    }

    /// Closes the session with `peer`, if there is one; the next message dials again.
    pub fn disconnect(&self, peer: &Username) {
        if let Some(session) = lock(&self.inner.sessions).remove(peer) {
            session.conn.close(0u32.into(), b"closed");
        }
    }

    /// Puts `msg` on a session (dialling one if needed) and waits for its ack; `slot`
    /// says whether a session has taken or stored it.
    async fn deliver(&self, msg: &Arc<StoredMessage>, slot: &Arc<Mutex<Slot>>) -> Result<(), SendError> {
        let session_now = || lock(&self.inner.sessions).get(&msg.peer).cloned();
        let mut failed = None;
        if let Some(session) = session_now() {
            // A reused session may have died quietly; the same id makes a retry safe.
            if push(&session, msg, slot).await.is_ok() {
                return Ok(());
            }
            debug!(peer = %msg.peer, "session failed; dialing again");
            failed = Some(session.id);
        }
        keep_before_dial(&self.inner, slot, msg)?;
        let unreachable = |reason| SendError::Unreachable { user: msg.peer.clone(), reason };
        let gate = lock(&self.inner.dialing).entry(msg.peer.clone()).or_default().clone();
        let waiting_since = std::time::Instant::now();
        let session = {
            let mut turn = gate.lock().await;
            // Another sender (or the peer) may have opened a session while we waited.
            match session_now().filter(|s| Some(s.id) != failed) {
                Some(session) => session,
                None => {
                    // The dial we waited for failed: its answer is ours too, rather than
                    // each waiting sender timing out on a dial of its own in turn.
                    if let Some((at, reason)) = &turn.last_failure {
                        if *at >= waiting_since {
                            return Err(unreachable(reason.clone()));
                        }
                    }
                    let verified = self.resolve(&msg.peer).await?;
                    let record = verified.presence.ok_or_else(|| SendError::Offline(msg.peer.clone()))?;
                    match dial(&self.inner, &msg.peer, &record).await {
                        Ok(session) => session,
                        Err(reason) => {
                            turn.last_failure = Some((std::time::Instant::now(), reason.clone()));
                            return Err(unreachable(reason));
                        }
                    }
                }
            }
        };
        push(&session, msg, slot).await.map_err(unreachable)
    }

    /// Looks `user` up, verifies the answer, and checks it against the pinned contact
    /// (pinning it on first contact).
    pub async fn resolve(&self, user: &Username) -> Result<VerifiedAccount, SendError> {
        let info = match self.with_node(|node| async move { node.lookup(user).await }).await {
            Err(ClientError::Refused(Refusal::NotFound)) => return Err(SendError::NoSuchUser(user.clone())),
            other => other?,
        };
        let verified =
            verify_lookup(info, unix_now(), LOOKUP_SKEW).map_err(|e| SendError::Untrusted { user: user.clone(), reason: e.to_string() })?;
        let seq = verified.presence.as_ref().map(|r| r.seq);
        check_trust(&self.inner, user, &verified.info.identity_key, &verified.info.noise, seq)?;
        Ok(verified)
    }

    /// Looks `user` up and verifies the answer, without pinning anything.
    pub async fn lookup(&self, user: &Username) -> Result<VerifiedAccount, SendError> {
        let info = match self.with_node(|node| async move { node.lookup(user).await }).await {
            Err(ClientError::Refused(Refusal::NotFound)) => return Err(SendError::NoSuchUser(user.clone())),
            other => other?,
        };
        verify_lookup(info, unix_now(), LOOKUP_SKEW).map_err(|e| SendError::Untrusted { user: user.clone(), reason: e.to_string() })
    }

    /// Users online now, as the node says.
    pub async fn online(&self) -> Result<Vec<Username>, ClientError> {
        self.with_node(|node| async move { node.online().await.map(|(names, _)| names) }).await
    }

    /// Runs `f` with a signed-in node connection, reconnecting once if it went away.
    async fn with_node<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Arc<RendezvousClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let node = node_client(&self.inner).await?;
        match f(node).await {
            Err(ClientError::Connection(_) | ClientError::Timeout) => {
                *self.inner.node.lock().await = None;
                f(node_client(&self.inner).await?).await
            }
            other => other,
        }
    }

    /// Closes every session and the endpoint.
    pub async fn shutdown(&self) {
        for task in lock(&self.inner.tasks).drain(..) {
            task.abort();
        }
        let sessions: Vec<_> = lock(&self.inner.sessions).drain().map(|(_, s)| s).collect();
        for s in sessions {
            s.conn.close(0u32.into(), b"bye");
        }
        if let Some(node) = self.inner.node.lock().await.take() {
            if let Ok(node) = Arc::try_unwrap(node) {
                node.close().await;
            }
        }
        self.inner.endpoint.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
        let _ = self.inner.store.flush();
    }
}

/// The source address the OS would use towards `target` (no packet is sent).
fn route_ip(target: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

async fn node_client(inner: &Inner) -> Result<Arc<RendezvousClient>, ClientError> {
    let mut cached = inner.node.lock().await;
    if let Some(node) = cached.as_ref().filter(|n| n.is_open()) {
        return Ok(node.clone());
    }
    let node = RendezvousClient::connect(&inner.config.server).await?;
    node.authenticate(&inner.identity, &inner.config.username).await?;
    let node = Arc::new(node);
    *cached = Some(node.clone());
    Ok(node)
}

/// TOFU: pins a first-seen key, refreshes a matching one, refuses a changed one (and
/// records it for `contact verify`). `seq`, from the presence record the key came with,
/// must not be older than one already seen (a replayed record changes nothing). One
/// atomic update of the contact.
fn check_trust(inner: &Inner, user: &Username, key: &IdentityKey, noise: &NoiseBinding, seq: Option<u64>) -> Result<Contact, SendError> {
    let now = unix_now();
    let (mut created, mut changed_from, mut stale) = (false, None, false);
    let contact = inner.store.update_contact(user, &mut |current| {
        (created, changed_from, stale) = (false, None, false);
        Some(match current {
            None => {
                created = true;
                Contact {
                    username: user.clone(),
                    identity_key: *key,
                    noise: *noise,
                    verified: false,
                    first_seen: now,
                    last_seen: now,
                    highest_seq: seq.unwrap_or(0),
                    last_handshake: 0,
                    changed_key: None,
                }
            }
            Some(mut c) if c.identity_key.ct_eq(key) => {
                if seq.is_some_and(|seq| seq < c.highest_seq) {
                    stale = true;
                    return None;
                }
                c.noise = *noise;
                c.last_seen = now;
                c.highest_seq = seq.unwrap_or(c.highest_seq);
                c
            }
            Some(mut c) => {
                changed_from = Some(c.identity_key);
                c.changed_key = Some(*key);
                c
            }
        })
    })?;
    let contact = contact.ok_or(StoreError::Corrupt("contact update"))?;
    if let Some(pinned) = changed_from {
        warn!(peer = %user, "identity key changed; refusing until verified");
        let _ = inner.events.send(AgentEvent::KeyChanged { peer: user.clone(), pinned, presented: *key });
        return Err(SendError::KeyChanged {
            user: user.clone(),
            pinned: pinned.fingerprint().to_string(),
            presented: key.fingerprint().to_string(),
        });
    }
    if stale {
        return Err(SendError::Untrusted {
            user: user.clone(),
            reason: "an older presence record than one already seen (replayed)".into(),
        });
    }
    if created {
        info!(peer = %user, "pinned identity key on first contact");
        inner.contacts_changed.notify_one();
    }
    Ok(contact)
}

/// Records a contact's presence and announces it if it changed.
fn set_presence(inner: &Inner, user: Username, online: bool) {
    let before = lock(&inner.presence).insert(user.clone(), online);
    // A first look that finds a contact offline is no news.
    if before != Some(online) && (before.is_some() || online) {
        let _ = inner.events.send(AgentEvent::Presence { peer: user, online });
    }
}

async fn watch_contacts(inner: Arc<Inner>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let names: Vec<Username> = match inner.store.contacts() {
            Ok(contacts) => contacts.into_iter().map(|c| c.username).take(crate::rendezvous::proto::MAX_ONLINE_LIST).collect(),
            Err(e) => {
                warn!(error = %e, "cannot read contacts for the presence watch");
                Vec::new()
            }
        };
        if names.is_empty() {
            inner.contacts_changed.notified().await;
            continue;
        }
        debug!(contacts = names.len(), "watching contacts' presence");
        let watch = match node_client(&inner).await {
            Ok(node) => node.watch(&names).await,
            Err(e) => Err(e),
        };
        match watch {
            Ok((online, mut watch)) => {
                debug!(online = online.len(), "presence watch open");
                backoff = Duration::from_secs(1);
                for name in &names {
                    set_presence(&inner, name.clone(), online.contains(name));
                }
                loop {
                    tokio::select! {
                        event = watch.next() => match event {
                            Ok(WatchEvent::Online(online)) => {
                                for name in &names {
                                    set_presence(&inner, name.clone(), online.contains(name));
                                }
                            }
                            Ok(WatchEvent::Changed { username, online }) => set_presence(&inner, username, online),
                            Err(e) => {
                                debug!(error = %e, "presence watch ended");
                                break;
                            }
                        },
                        _ = inner.contacts_changed.notified() => {
                            debug!("contacts changed; watching the new list");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                debug!(error = %e, retry_in = ?backoff, "presence watch failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Queues one message on a session, calls `queued`, and waits for the message's ack,
/// all within [`ACK_TIMEOUT`].
async fn push(session: &SessionHandle, msg: &Arc<StoredMessage>, slot: &Arc<Mutex<Slot>>) -> Result<(), String> {
    let (acked, ack) = oneshot::channel();
    let attempt = async {
        let outgoing = Outgoing { msg: msg.clone(), slot: slot.clone(), acked };
        session.outgoing.send(outgoing).await.map_err(|_| "session closed".to_string())?;
        ack.await.map_err(|_| "session closed before the acknowledgement".to_string())
    };
    tokio::time::timeout(ACK_TIMEOUT, attempt).await.map_err(|_| "no acknowledgement in time".to_string())?
}
