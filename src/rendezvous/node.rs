//! The rendezvous node's QUIC driver: accepts connections, reads one request per
//! stream, applies the account and presence rules, and answers.
//!
//! Rules live in [`super::directory`], [`super::limit`], [`super::auth`] and
//! [`crate::presence`]; this module owns sockets, tasks, timeouts and the clock.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use super::accounts::{Account, Accounts, HashError, PasswordCost, PasswordHasher, StoreError, ACCOUNT_VERSION};
use super::auth::{self, Binding, Purpose};
use super::directory::{Change, ConnId, Directory};
use super::limit::{Admission, ConnectionGate, ConnectionPolicy, LoginLimits, Rate, RateLimiter};
use super::proto::{
    AccountInfo, Credentials, Refusal, Request, Response, ALPN, MAX_FRAME, MAX_ONLINE_LIST, MAX_PASSWORD_BYTES, MIN_PASSWORD_CHARS,
};
use crate::address::ServerAddress;
use crate::clock::{unix_now, unix_now_ms};
use crate::keys::IdentityKey;
use crate::presence::{Freshness, PresenceError};
use crate::quic::write_frame;
use crate::tls::{self, CertKey};
use crate::username::Username;
use crate::wire::{decode_message, encode_frame, encode_message, frame_len, HEADER_LEN};

/// Time a client has to send a whole request on a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a QUIC handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent request streams per connection.
const MAX_STREAMS: u32 = 16;
/// Time a connection has to sign in before the node closes it.
const SIGN_IN_DEADLINE: Duration = Duration::from_secs(30);
/// Requests up to this size are read at once; larger ones (only a long `Watch` list is
/// that large) first take their size from [`LARGE_REQUEST_BUDGET`].
const SMALL_REQUEST: usize = 1024;
/// Bytes of large requests the node holds at once, from all connections together, so
/// clients that send large requests slowly cannot make it hold 16 × 32 KiB per
/// connection. Small requests never wait for it.
const LARGE_REQUEST_BUDGET: usize = 16 << 20;
/// QUIC flow-control window per request stream: one whole request of the largest size.
const REQUEST_WINDOW: u32 = (MAX_FRAME + HEADER_LEN).next_power_of_two() as u32;
/// Sources and rate buckets the lookup limiter remembers.
const RATE_TABLE: usize = 100_000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("cannot use data directory {}", path.display())]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("password hashing: {0}")]
    PasswordCost(#[from] HashError),
}

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Host printed in the server address; defaults to the listen IP (127.0.0.1 when
    /// listening on all interfaces).
    pub public_host: Option<String>,
    pub freshness: Freshness,
    pub password_cost: PasswordCost,
    /// Argon2 jobs run at once.
    pub hash_workers: usize,
    /// Argon2 jobs allowed to wait; more get `Busy`.
    pub hash_queue: usize,
    /// Connections one source address (IPv6: one /64) may hold at once, handshakes
    /// included; more are refused. Default 256: room for a household or an office
    /// behind one address, while one address holds at most a few megabytes of the node.
    pub max_connections_per_address: usize,
    /// Connections the node holds at once from everywhere; more are refused. Default
    /// 20,000 (twice the load the node is measured at; about 33 KB each when idle).
    pub max_connections: usize,
    /// QUIC handshakes in flight at once; more are refused. Past half of them, a client
    /// whose address QUIC has not validated yet is sent a Retry first. Default 256.
    pub max_handshakes: usize,
    /// `Lookup`, `ListOnline` and `Watch` requests per source address (IPv6: per /64):
    /// past the burst, `RateLimited`. `None` turns the limit off. Default 20 a second
    /// with a burst of 200, far above what a person's clients ask, far below what
    /// walking the user list would need.
    pub lookup_rate: Option<Rate>,
}

impl NodeConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Self {
            listen,
            data_dir,
            public_host: None,
            freshness: Freshness::DEFAULT,
            password_cost: PasswordCost::OWASP,
            hash_workers: cores.saturating_sub(1).max(1),
            hash_queue: 64,
            max_connections_per_address: 256,
            max_connections: 20_000,
            max_handshakes: 256,
            lookup_rate: Some(Rate { per_second: 20, burst: 200 }),
        }
    }
}

struct Shared {
    /// Presence changes, for watchers.
    changes: tokio::sync::broadcast::Sender<Change>,
    accounts: Accounts,
    hasher: PasswordHasher,
    directory: Mutex<Directory>,
    limits: Mutex<LoginLimits>,
    next_conn: AtomicU64,
    /// Connections per source address and in all.
    gate: ConnectionGate,
    /// Lookups per source address, when limited.
    lookups: Option<Mutex<RateLimiter>>,
    /// Bytes of large requests being read, node-wide.
    large_requests: tokio::sync::Semaphore,
}

/// A bound, ready node.
pub struct Node {
    endpoint: quinn::Endpoint,
    address: ServerAddress,
    shared: Arc<Shared>,
}

impl Node {
    /// Opens the data directory (certificate, key, accounts) and binds the socket.
    pub fn bind(config: NodeConfig) -> Result<Node, NodeError> {
        let data_err = |source| NodeError::DataDir { path: config.data_dir.clone(), source };
        crate::profile::private_dir(&config.data_dir, true).map_err(data_err)?;
        let cert = CertKey::load_or_create(&config.data_dir, "sotto-rendezvous").map_err(data_err)?;
        let accounts = Accounts::open(&config.data_dir.join("accounts"))?;
        let mut server = tls::server_config(&cert, ALPN, MAX_STREAMS)?;
        server.transport_config(tls::request_transport(MAX_STREAMS, REQUEST_WINDOW));
        let endpoint =
            quinn::Endpoint::server(server, config.listen).map_err(|source| NodeError::Listen { addr: config.listen, source })?;
        let local = endpoint.local_addr().map_err(|source| NodeError::Listen { addr: config.listen, source })?;
        let host = config.public_host.clone().unwrap_or_else(|| {
            if local.ip().is_unspecified() {
                IpAddr::from([127, 0, 0, 1]).to_string()
            } else {
                local.ip().to_string()
            }
        });
        let address = ServerAddress { host, port: local.port(), cert_sha256: cert.sha256() };
        let shared = Arc::new(Shared {
            changes: tokio::sync::broadcast::channel(1024).0,
            accounts,
            hasher: PasswordHasher::new(config.password_cost, config.hash_workers, config.hash_queue)?,
            directory: Mutex::new(Directory::new(config.freshness)),
            limits: Mutex::new(LoginLimits::new(LoginLimits::ACCOUNT, LoginLimits::ADDRESS, 100_000)),
            next_conn: AtomicU64::new(1),
            gate: ConnectionGate::new(ConnectionPolicy {
                per_source: config.max_connections_per_address,
                total: config.max_connections,
                handshakes: config.max_handshakes,
            }),
            lookups: config.lookup_rate.map(|rate| Mutex::new(RateLimiter::new(rate, RATE_TABLE))),
            large_requests: tokio::sync::Semaphore::new(LARGE_REQUEST_BUDGET),
        });
        info!(accounts = shared.accounts.len(), %local, "rendezvous node ready");
        Ok(Node { endpoint, address, shared })
    }

    pub fn address(&self) -> &ServerAddress {
        &self.address
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `shutdown` completes, then closes every connection and flushes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), NodeError> {
        tokio::pin!(shutdown);
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    self.admit(incoming);
                }
                _ = sweep.tick() => {
                    let mut directory = lock(&self.shared.directory);
                    let gone = directory.expire(unix_now());
                    if !gone.is_empty() {
                        debug!(gone = gone.len(), "expired presence records");
                    }
                    self.shared.announce(gone);
                }
                _ = &mut shutdown => break,
            }
        }
        info!("rendezvous node shutting down");
        self.endpoint.close(0u32.into(), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        self.shared.accounts.flush().await?;
        Ok(())
    }

    /// Accepts, retries or refuses a connection attempt by the counts in the gate.
    fn admit(&self, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        match self.shared.gate.admit(remote.ip(), incoming.remote_address_validated()) {
            Admission::Accept(ticket) => {
                tokio::spawn(serve_connection(self.shared.clone(), incoming, ticket));
            }
            Admission::Retry => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
            }
            Admission::Refuse(crowded) => {
                debug!(%remote, ?crowded, "connection refused");
                incoming.refuse();
            }
        }
    }
}

impl Shared {
    /// Tells watchers about presence changes (nobody listening is fine). Callers hold
    /// the directory lock while they call it, so watchers hear one user's changes in the
    /// order they happened; sending on a broadcast channel never blocks.
    fn announce(&self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            let _ = self.changes.send(change);
        }
    }
}

/// Locks a mutex, recovering the data if a task panicked while holding it: every
/// critical section here leaves the tables consistent at each step.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the node knows about one client connection.
struct Conn {
    id: ConnId,
    /// Set when the connection is gone, before its records are dropped; a publish that
    /// was still in flight checks it under the directory lock and is refused.
    closed: std::sync::atomic::AtomicBool,
    remote: SocketAddr,
    binding: Binding,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    hello: bool,
    user: Option<Username>,
}

async fn serve_connection(shared: Arc<Shared>, incoming: quinn::Incoming, mut ticket: super::limit::Ticket) {
    let remote = incoming.remote_address();
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return debug!(%remote, error = %e, "handshake failed"),
        Err(_) => return debug!(%remote, "handshake timed out"),
    };
    if ticket.handshake_done().is_err() {
        debug!(%remote, "too many connections from this address");
        connection.close(3u32.into(), b"too many connections from this address");
        return;
    }
    if tls::negotiated_alpn(&connection).as_deref() != Some(ALPN) {
        connection.close(1u32.into(), b"wrong ALPN");
        return;
    }
    let Some(channel) = tls::channel_binding(&connection, auth::EXPORTER_LABEL) else {
        connection.close(1u32.into(), b"no channel binding");
        return;
    };
    let mut challenge = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut challenge);
    let conn = Arc::new(Conn {
        id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        closed: std::sync::atomic::AtomicBool::new(false),
        remote,
        binding: Binding { challenge, channel },
        state: Mutex::new(ConnState::default()),
    });
    debug!(conn = conn.id, %remote, "connection open");
    let deadline = {
        let (connection, conn) = (connection.clone(), conn.clone());
        tokio::spawn(async move {
            tokio::time::sleep(SIGN_IN_DEADLINE).await;
            if lock(&conn.state).user.is_none() {
                connection.close(2u32.into(), b"sign in first");
            }
        })
    };
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(shared.clone(), conn.clone(), send, recv));
            }
            Err(e) => {
                debug!(conn = conn.id, %remote, reason = %e, "connection closed");
                break;
            }
        }
    }
    deadline.abort();
    conn.closed.store(true, Ordering::SeqCst);
    let mut directory = lock(&shared.directory);
    let gone = directory.connection_closed(conn.id);
    shared.announce(gone);
}

/// Reads one request: a frame header, then exactly the bytes it names and the end of
/// the stream. A large request first takes its size from the node-wide budget.
async fn read_request(shared: &Shared, recv: &mut quinn::RecvStream) -> Result<Request, String> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|e| e.to_string())?;
    let len = frame_len(header, MAX_FRAME).map_err(|e| e.to_string())?;
    let _budget = match len {
        0..=SMALL_REQUEST => None,
        // `len` is at most MAX_FRAME, so it fits in u32; the semaphore is never closed.
        _ => Some(shared.large_requests.acquire_many(len as u32).await.map_err(|e| e.to_string())?),
    };
    // A register or login request carries a password: its bytes are wiped once decoded.
    let body = zeroize::Zeroizing::new(recv.read_to_end(len).await.map_err(|e| e.to_string())?);
    if body.len() != len {
        return Err(format!("the stream ended {} bytes into a {len}-byte request", body.len()));
    }
    decode_message::<Request>(&body).map_err(|e| e.to_string())
}

async fn serve_stream(shared: Arc<Shared>, conn: Arc<Conn>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&shared, &mut recv)).await {
        Ok(Ok(Request::Watch { usernames })) => return watch(&shared, &conn, usernames, send).await,
        Ok(Ok(request)) => handle(&shared, &conn, request).await,
        Ok(Err(e)) => {
            debug!(conn = conn.id, error = %e, "request not read");
            Response::Refused(Refusal::Malformed)
        }
        Err(_) => {
            debug!(conn = conn.id, "request timed out");
            let _ = send.reset(1u32.into());
            return;
        }
    };
    let frame = encode_frame(&encode_message(&response));
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
    }
}

async fn handle(shared: &Shared, conn: &Conn, request: Request) -> Response {
    let result = match request {
        Request::Hello => Ok(hello(shared, conn)),
        _ if !lock(&conn.state).hello => Err(Refusal::NeedHello),
        Request::Register(c) => register(shared, conn, c).await,
        Request::Login(c) => login(shared, conn, c).await,
        Request::Authenticate { username, identity_key, proof } => authenticate(shared, conn, username, identity_key, proof),
        Request::Publish(signed) => signed_in(conn).and_then(|user| publish(shared, conn, &user, signed)),
        Request::Withdraw => signed_in(conn).map(|user| {
            let mut directory = lock(&shared.directory);
            let gone = directory.withdraw(&user, conn.id);
            shared.announce(gone);
            Response::Withdrawn
        }),
        Request::Lookup { username } => signed_in(conn).and_then(|_| rate_limited(shared, conn)).and_then(|_| lookup(shared, &username)),
        Request::ListOnline => signed_in(conn).and_then(|_| rate_limited(shared, conn)).map(|_| {
            let (usernames, truncated) = lock(&shared.directory).online(unix_now(), MAX_ONLINE_LIST);
            Response::Online { usernames, truncated }
        }),
        // Watches are served by `watch`, which keeps the stream.
        Request::Watch { .. } | Request::Unknown => Err(Refusal::UnknownRequest),
    };
    result.unwrap_or_else(Response::Refused)
}

/// Serves a `Watch`: the watched users online now, then each change, until the client
/// stops the stream or the connection ends.
async fn watch(shared: &Shared, conn: &Conn, usernames: Vec<Username>, mut send: quinn::SendStream) {
    let refusal = match signed_in(conn) {
        _ if !lock(&conn.state).hello => Some(Refusal::NeedHello),
        Err(r) => Some(r),
        Ok(_) if usernames.len() > MAX_ONLINE_LIST => Some(Refusal::Malformed),
        Ok(_) => rate_limited(shared, conn).err(),
    };
    if let Some(r) = refusal {
        let _ = write_frame(&mut send, &encode_message(&Response::Refused(r))).await;
        let _ = send.finish();
        return;
    }
    // Subscribe before reading the current state, so no change falls in between.
    let mut changes = shared.changes.subscribe();
    let watched: std::collections::HashSet<Username> = usernames.into_iter().collect();
    let snapshot = |shared: &Shared| {
        let dir = lock(&shared.directory);
        let now = unix_now();
        let mut online: Vec<Username> = watched.iter().filter(|u| dir.is_online(u, now)).cloned().collect();
        online.sort();
        Response::Watching { online }
    };
    if write_frame(&mut send, &encode_message(&snapshot(shared))).await.is_err() {
        return;
    }
    loop {
        let response = tokio::select! {
            change = changes.recv() => match change {
                Ok(c) if watched.contains(&c.username) => Response::PresenceChanged { username: c.username, online: c.online },
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => snapshot(shared),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = send.stopped() => return,
        };
        if write_frame(&mut send, &encode_message(&response)).await.is_err() {
            return;
        }
    }
}

fn hello(shared: &Shared, conn: &Conn) -> Response {
    lock(&conn.state).hello = true;
    let f = lock(&shared.directory).freshness();
    Response::Challenge { challenge: conn.binding.challenge, server_time: unix_now(), max_ttl: f.max_ttl, max_skew: f.max_skew }
}

/// Takes one request from the connection's source address's lookup allowance.
fn rate_limited(shared: &Shared, conn: &Conn) -> Result<(), Refusal> {
    let Some(limiter) = &shared.lookups else { return Ok(()) };
    lock(limiter).allow(conn.remote.ip(), unix_now_ms()).map_err(|retry_after_secs| {
        debug!(conn = conn.id, remote = %conn.remote, "lookup rate limited");
        Refusal::RateLimited { retry_after_secs }
    })
}

fn signed_in(conn: &Conn) -> Result<Username, Refusal> {
    lock(&conn.state).user.clone().ok_or(Refusal::NotAuthenticated)
}

fn store_failed(e: StoreError) -> Refusal {
    warn!(error = %e, "account store failed");
    Refusal::Internal
}

fn hash_failed(e: HashError) -> Refusal {
    match e {
        HashError::Busy => Refusal::Busy,
        HashError::Failed | HashError::BadCost => Refusal::Internal,
    }
}

fn password_ok(password: &str) -> bool {
    password.len() <= MAX_PASSWORD_BYTES && password.chars().count() >= MIN_PASSWORD_CHARS
}

/// Checks that the request's keys belong together and that the client holds them.
fn check_keys(conn: &Conn, c: &Credentials, purpose: Purpose) -> Result<(), Refusal> {
    c.noise.verify(&c.identity_key).map_err(|_| Refusal::BadProof)?;
    auth::check(&c.identity_key, &c.proof, purpose, &conn.binding, &c.username).map_err(|_| Refusal::BadProof)
}

async fn register(shared: &Shared, conn: &Conn, c: Credentials) -> Result<Response, Refusal> {
    let password = Zeroizing::new(c.password.clone());
    if !password_ok(&password) {
        return Err(Refusal::WeakPassword);
    }
    check_keys(conn, &c, Purpose::Register)?;
    if let Err(retry_after_secs) = lock(&shared.limits).register(conn.remote.ip(), unix_now()) {
        info!(remote = %conn.remote, "registration rate limited");
        return Err(Refusal::RateLimited { retry_after_secs });
    }
    if shared.accounts.get(&c.username).map_err(store_failed)?.is_some() {
        return Err(Refusal::UsernameTaken);
    }
    let phc = shared.hasher.hash(password).await.map_err(hash_failed)?;
    let now = unix_now();
    let account = Account {
        version: ACCOUNT_VERSION,
        password_phc: phc,
        identity_key: c.identity_key,
        noise: c.noise,
        created_at: now,
        key_set_at: now,
    };
    if !shared.accounts.create(&c.username, &account).await.map_err(store_failed)? {
        return Err(Refusal::UsernameTaken);
    }
    info!(user = %c.username, remote = %conn.remote, "registered");
    lock(&shared.limits).remember(&c.username, conn.remote.ip(), now);
    lock(&conn.state).user = Some(c.username.clone());
    Ok(Response::Registered)
}

async fn login(shared: &Shared, conn: &Conn, c: Credentials) -> Result<Response, Refusal> {
    let ip = conn.remote.ip();
    check_keys(conn, &c, Purpose::Login)?;
    // Counted now, before argon2 runs, so parallel guesses cannot overtake the count.
    if let Err(retry_after_secs) = lock(&shared.limits).attempt(&c.username, ip, unix_now()) {
        info!(user = %c.username, remote = %conn.remote, "login rate limited");
        return Err(Refusal::RateLimited { retry_after_secs });
    }
    let password = Zeroizing::new(c.password.clone());
    let account = shared.accounts.get(&c.username).map_err(store_failed)?;
    let ok = password.len() <= MAX_PASSWORD_BYTES
        && shared.hasher.verify(password, account.as_ref().map(|a| a.password_phc.clone())).await.map_err(hash_failed)?;
    let now = unix_now();
    let Some(account) = account.filter(|_| ok) else {
        info!(user = %c.username, remote = %conn.remote, "login failed");
        return Err(Refusal::InvalidCredentials);
    };
    let key_changed = !account.identity_key.ct_eq(&c.identity_key);
    if key_changed || account.noise != c.noise {
        let rebound = Account { identity_key: c.identity_key, noise: c.noise, key_set_at: now, ..account.clone() };
        if !shared.accounts.replace(&c.username, &account, &rebound).await.map_err(store_failed)? {
            return Err(Refusal::Busy);
        }
        let mut directory = lock(&shared.directory);
        let gone = directory.forget(&c.username);
        shared.announce(gone);
        drop(directory);
    }
    info!(user = %c.username, remote = %conn.remote, key_changed, "logged in");
    lock(&shared.limits).succeeded(&c.username, ip, now);
    lock(&conn.state).user = Some(c.username.clone());
    Ok(Response::LoggedIn { key_changed })
}

fn authenticate(shared: &Shared, conn: &Conn, username: Username, key: IdentityKey, proof: [u8; 64]) -> Result<Response, Refusal> {
    auth::check(&key, &proof, Purpose::Authenticate, &conn.binding, &username).map_err(|_| Refusal::BadProof)?;
    let Some(account) = shared.accounts.get(&username).map_err(store_failed)? else {
        return Err(Refusal::InvalidCredentials);
    };
    if !account.identity_key.ct_eq(&key) {
        info!(user = %username, remote = %conn.remote, "authentication with a replaced key");
        return Err(Refusal::KeyChanged);
    }
    debug!(user = %username, remote = %conn.remote, "authenticated");
    lock(&shared.limits).remember(&username, conn.remote.ip(), unix_now());
    lock(&conn.state).user = Some(username);
    Ok(Response::Authenticated)
}

fn publish(shared: &Shared, conn: &Conn, user: &Username, signed: crate::presence::SignedPresence) -> Result<Response, Refusal> {
    // Read the account each time: a login elsewhere may have replaced the key.
    let account = shared.accounts.get(user).map_err(store_failed)?.ok_or(Refusal::NotAuthenticated)?;
    let result = {
        let mut directory = lock(&shared.directory);
        if conn.closed.load(Ordering::SeqCst) {
            return Err(Refusal::NotAuthenticated);
        }
        let result = directory.publish(user, &account.identity_key, signed, conn.id, unix_now());
        if let Ok(change) = &result {
            shared.announce(change.clone());
        }
        result
    };
    match result {
        Ok(_) => Ok(Response::Published { observed: conn.remote }),
        Err(e) => {
            info!(user = %user, remote = %conn.remote, reason = %e, "presence refused");
            Err(match e {
                PresenceError::StaleSeq => Refusal::StaleRecord,
                PresenceError::FromTheFuture | PresenceError::TooOld => Refusal::ClockSkew,
                PresenceError::Expired => Refusal::RecordExpired,
                PresenceError::TtlTooLong => Refusal::TtlTooLong,
                _ => Refusal::BadRecord,
            })
        }
    }
}

fn lookup(shared: &Shared, username: &Username) -> Result<Response, Refusal> {
    let (identity_key, noise) = shared.accounts.public_keys(username).map_err(store_failed)?.ok_or(Refusal::NotFound)?;
    let presence = lock(&shared.directory).current(username, unix_now()).cloned();
    Ok(Response::Account(AccountInfo { username: username.clone(), identity_key, noise, presence }))
}
