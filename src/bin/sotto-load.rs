//! sotto-load: the rendezvous node under load, beside the raw stack, in one run.
//!
//! ```text
//! cargo run --release --bin sotto-load            # the figures in docs/PERFORMANCE.md
//! cargo run --release --bin sotto-load -- --smoke # a quick pass (CI)
//! ```
//!
//! It provisions accounts straight into a fresh node's database (one argon2id hash at
//! full strength, shared: peers sign in with their identity keys, not passwords), starts
//! the node as a child process (so its memory is its own), connects peers that sign in
//! and publish presence, and prints one JSON object per figure:
//!
//! - `lookups_1000_peers`: lookups/s and p99 with 1,000 peers online, against raw QUIC
//!   request/response exchanges of the same sizes;
//! - `lookup_p99_registration_flood`: lookup p99 while a registration flood keeps argon2
//!   busy, against lookup p99 without it;
//! - `online_peers`: how many peers (presence + idle QUIC connection each) the node
//!   holds, and its resident memory per peer.

#[allow(dead_code)]
#[path = "../../benches/common/report.rs"]
mod report;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use report::{selected, Better, Figure, Samples, Scale};
use serde_json::json;
use sotto::address::ServerAddress;
use sotto::clock::unix_now;
use sotto::keys::Identity;
use sotto::presence::{PresenceRecord, SignedPresence, RECORD_VERSION};
use sotto::rendezvous::accounts::{Account, Accounts, PasswordCost, ACCOUNT_VERSION};
use sotto::rendezvous::client::{ClientError, RendezvousClient};
use sotto::rendezvous::node::{Node, NodeConfig};
use sotto::rendezvous::proto::{Refusal, Request, Response};
use sotto::tls::{self, CertKey};
use sotto::username::Username;
use sotto::wire::{encode_frame, encode_message, HEADER_LEN};
use tokio::task::JoinSet;

/// Client sockets the peers share (many connections each, as behind a NAT).
const CLIENT_SOCKETS: usize = 32;
/// Connections opened at once while peers come online.
const CONNECTING: usize = 32;
/// Lookup connections, each with this many requests in flight (the node allows 16
/// streams per connection).
const LOOKERS: usize = 4;
const IN_FLIGHT: usize = 12;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-node") {
        let dir = args.get(2).context("--serve-node DIR")?;
        return serve_node(dir.into());
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: sotto-load [--smoke] [FIGURE...]\nfigures: lookups_1000_peers lookup_p99_registration_flood online_peers");
        return Ok(());
    }
    let scale = Scale::from_args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(scale))
}

/// The node, in its own process: prints its address, serves until stdin closes. Every
/// peer and looker connects from 127.0.0.1, so the per-address limits (connections,
/// lookup rate) are lifted; the node-wide ones stay at their defaults.
fn serve_node(dir: std::path::PathBuf) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let mut config = NodeConfig::new(([127, 0, 0, 1], 0).into(), dir);
        config.max_connections_per_address = usize::MAX;
        config.lookup_rate = None;
        let node = Node::bind(config)?;
        println!("{}", node.address());
        let stdin_closed = async {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
        };
        node.run(stdin_closed).await?;
        Ok(())
    })
}

struct NodeChild {
    child: Child,
    server: ServerAddress,
}

impl NodeChild {
    fn start(dir: &std::path::Path) -> Result<NodeChild> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-node")
            .arg(dir)
            .env_remove("SOTTO_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("node stdout")?).read_line(&mut line)?;
        let server: ServerAddress = line.trim().parse().map_err(|e| anyhow::anyhow!("node printed {line:?}: {e}"))?;
        Ok(NodeChild { child, server })
    }

    /// Resident set size of the node process, bytes.
    fn rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS")?;
        Ok(kib * 1024)
    }
}

impl Drop for NodeChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.wait_timeout_secs(10).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

trait WaitTimeout {
    fn wait_timeout_secs(&mut self, secs: u64) -> Option<std::process::ExitStatus>;
}

impl WaitTimeout for Child {
    fn wait_timeout_secs(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            if let Ok(Some(status)) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

struct Peer {
    name: Username,
    identity: Identity,
}

fn peer_name(i: usize) -> Username {
    Username::parse(&format!("peer{i}")).expect("valid username")
}

/// Writes `peers` accounts into the node's database before it starts.
async fn provision(dir: &std::path::Path, peers: &[Peer]) -> Result<()> {
    let accounts = Accounts::open(&dir.join("accounts"))?;
    let salt = argon2::password_hash::SaltString::generate(&mut rand::rngs::OsRng);
    let argon2 = PasswordCost::OWASP.argon2().context("argon2 cost")?;
    let phc = argon2::PasswordHasher::hash_password(&argon2, b"load test password", &salt).map_err(|e| anyhow::anyhow!("{e}"))?;
    let phc = phc.to_string();
    let now = unix_now();
    let mut set = JoinSet::new();
    for chunk in peers.chunks(256) {
        for p in chunk {
            let account = Account {
                version: ACCOUNT_VERSION,
                password_phc: phc.clone(),
                identity_key: p.identity.public(),
                noise: p.identity.binding(),
                created_at: now,
                key_set_at: now,
            };
            let (accounts, name) = (accounts.clone(), p.name.clone());
            set.spawn(async move { accounts.create(&name, &account).await });
        }
        while let Some(done) = set.join_next().await {
            done??;
        }
    }
    accounts.flush().await?;
    Ok(())
}

/// Signs in as `peer` and publishes a presence record; the connection stays open.
async fn bring_online(endpoint: &quinn::Endpoint, server: &ServerAddress, peer: &Peer) -> Result<RendezvousClient, ClientError> {
    let client = RendezvousClient::connect_via(Some(endpoint), server).await?;
    client.authenticate(&peer.identity, &peer.name).await?;
    let now = client.server_time.max(unix_now());
    let record = PresenceRecord {
        version: RECORD_VERSION,
        username: peer.name.clone(),
        identity_key: peer.identity.public(),
        noise: peer.identity.binding(),
        addrs: vec![SocketAddr::from(([127, 0, 0, 1], 40_000))],
        cert_sha256: [7; 32],
        seq: 1,
        issued_at: now,
        expires_at: now + client.max_ttl.min(600),
    };
    client.publish(SignedPresence::sign(&record, peer.identity.secret())).await?;
    Ok(client)
}

/// Brings `peers[range]` online, `CONNECTING` at a time.
async fn connect_peers(
    endpoints: &[quinn::Endpoint],
    server: &ServerAddress,
    peers: &Arc<Vec<Peer>>,
    range: std::ops::Range<usize>,
) -> Result<Vec<RendezvousClient>> {
    let mut out = Vec::with_capacity(range.len());
    let mut set = JoinSet::new();
    let mut next = range.start;
    while next < range.end || !set.is_empty() {
        while next < range.end && set.len() < CONNECTING {
            let (endpoint, server, peers, i) = (endpoints[next % endpoints.len()].clone(), server.clone(), peers.clone(), next);
            set.spawn(async move {
                // A handshake can time out while thousands arrive at once on two cores:
                // try again, as a real client would.
                let mut attempt = 0;
                loop {
                    match bring_online(&endpoint, &server, &peers[i]).await {
                        Ok(client) => return Ok(client),
                        Err(e) if attempt == 4 => return Err(e).with_context(|| format!("peer{i}")),
                        Err(_) => attempt += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            out.push(done??);
        }
    }
    Ok(out)
}

/// Runs `op(worker, n)` over and over on each of `LOOKERS * IN_FLIGHT` tasks for `secs`:
/// (completed per second, latency samples in µs).
async fn timed_window<F, Fut>(secs: f64, op: F) -> (f64, Samples)
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for worker in 0..LOOKERS * IN_FLIGHT {
        let (op, stop, count) = (op.clone(), stop.clone(), count.clone());
        set.spawn(async move {
            let mut samples = Samples::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                op(worker, n).await;
                samples.push_duration_us(t.elapsed());
                count.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            samples
        });
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let done = count.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut all = Samples::new();
    while let Some(s) = set.join_next().await {
        all.extend(&s.expect("measured task"));
    }
    (done as f64 / elapsed, all)
}

/// Lookups of online peers from `LOOKERS` connections with `IN_FLIGHT` each.
async fn lookups(lookers: &[Arc<RendezvousClient>], online: usize, secs: f64) -> (f64, Samples) {
    let lookers = lookers.to_vec();
    timed_window(secs, move |worker, n| {
        let looker = lookers[worker % lookers.len()].clone();
        async move {
            looker.lookup(&peer_name((worker * 104_729 + n * 7) % online)).await.expect("lookup");
        }
    })
    .await
}

/// The raw baseline: a QUIC server that answers each stream's request with `answer`
/// bytes, and the same client pattern (a stream per request, same concurrency).
async fn raw_exchanges(request: usize, answer: usize, secs: f64) -> Result<(f64, Samples)> {
    let cert = CertKey::generate("raw")?;
    let endpoint = quinn::Endpoint::server(tls::server_config(&cert, b"raw", 16)?, ([127, 0, 0, 1], 0).into())?;
    let addr = endpoint.local_addr()?;
    let serving = endpoint.clone();
    let server = tokio::spawn(async move {
        while let Some(incoming) = serving.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        if recv.read_to_end(HEADER_LEN + 64 * 1024).await.is_ok() {
                            let _ = send.write_all(&vec![0u8; answer]).await;
                            let _ = send.finish();
                        }
                    });
                }
            });
        }
    });
    let (config, _) = tls::client_config(cert.sha256(), b"raw")?;
    let mut conns = Vec::new();
    for _ in 0..LOOKERS {
        let client = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
        conns.push(client.connect_with(config.clone(), addr, "raw")?.await?);
    }
    let body = Arc::new(vec![1u8; request]);
    let measured = timed_window(secs, move |worker, _| {
        let (conn, body) = (conns[worker % conns.len()].clone(), body.clone());
        async move {
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            send.write_all(&body).await.expect("write");
            send.finish().expect("finish");
            recv.read_to_end(HEADER_LEN + 64 * 1024).await.expect("answer");
        }
    })
    .await;
    server.abort();
    Ok(measured)
}

/// Registrations at full argon2 strength from many loopback source addresses (each
/// address may register 20 an hour), as fast as the node takes them, until `stop`.
async fn registration_flood(server: ServerAddress, stop: Arc<AtomicBool>) -> (u64, u64) {
    let (accepted, busy) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut set = JoinSet::new();
    for worker in 0..16u8 {
        let (server, stop, accepted, busy) = (server.clone(), stop.clone(), accepted.clone(), busy.clone());
        set.spawn(async move {
            let mut source = 0u8;
            while !stop.load(Ordering::Relaxed) {
                source = source.wrapping_add(1);
                let ip = IpAddr::V4(Ipv4Addr::new(127, 1, worker, source));
                let Ok(endpoint) = quinn::Endpoint::client(SocketAddr::new(ip, 0)) else { continue };
                for n in 0..20u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(client) = RendezvousClient::connect_via(Some(&endpoint), &server).await else { break };
                    let identity = Identity::generate();
                    let name = Username::parse(&format!("flood{worker}_{source}_{n}_{}", rand::random::<u32>())).expect("name");
                    match client.register(&identity, &name, "flood password 123").await {
                        Ok(()) => accepted.fetch_add(1, Ordering::Relaxed),
                        Err(ClientError::Refused(Refusal::Busy)) => busy.fetch_add(1, Ordering::Relaxed),
                        Err(_) => 0,
                    };
                    drop(client);
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    (accepted.load(Ordering::Relaxed), busy.load(Ordering::Relaxed))
}

async fn run(scale: Scale) -> Result<()> {
    let (lookup_peers, max_peers, secs) = scale.pick((1_000usize, 10_000usize, 5.0), (50, 200, 0.5));
    eprintln!("sotto-load ({scale:?}): one JSON object per figure on stdout");
    let dir = ScratchDir::new()?;
    let data = dir.0.join("node");
    std::fs::DirBuilder::new().mode_private().create(&data)?;
    let started = Instant::now();
    let peers: Arc<Vec<Peer>> =
        Arc::new((0..max_peers + LOOKERS).map(|i| Peer { name: peer_name(i), identity: Identity::generate() }).collect());
    provision(&data, &peers).await?;
    eprintln!("provisioned {} accounts in {:.1} s", peers.len(), started.elapsed().as_secs_f64());
    let node = NodeChild::start(&data)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_empty = node.rss()?;
    let endpoints: Vec<quinn::Endpoint> =
        (0..CLIENT_SOCKETS).map(|_| quinn::Endpoint::client(([127, 0, 0, 1], 0).into())).collect::<Result<_, _>>()?;

    let t = Instant::now();
    let mut online = connect_peers(&endpoints, &node.server, &peers, 0..lookup_peers).await?;
    eprintln!("{lookup_peers} peers online in {:.1} s", t.elapsed().as_secs_f64());
    let lookers: Vec<Arc<RendezvousClient>> =
        connect_peers(&endpoints, &node.server, &peers, max_peers..max_peers + LOOKERS).await?.into_iter().map(Arc::new).collect();

    if selected("lookups_1000_peers") {
        // The sizes a lookup puts on the wire, for the raw exchange.
        let request = encode_frame(&encode_message(&Request::Lookup { username: peer_name(7) })).len();
        let answer = match lookers[0].raw_call(&Request::Lookup { username: peer_name(7) }).await? {
            r @ Response::Account(_) => encode_frame(&encode_message(&r)).len(),
            other => bail!("lookup answered {other:?}"),
        };
        let (mut rates, mut raw_rates, mut lat, mut raw_lat) = (Samples::new(), Samples::new(), Samples::new(), Samples::new());
        for _ in 0..scale.pick(3, 1) {
            let (rate, samples) = lookups(&lookers, lookup_peers, secs).await;
            rates.push(rate);
            lat.extend(&samples);
            let (rate, samples) = raw_exchanges(request, answer, secs).await?;
            raw_rates.push(rate);
            raw_lat.extend(&samples);
        }
        Figure {
            name: "lookups_1000_peers",
            value: rates.median(),
            unit: "lookups/s",
            baseline: Some(raw_rates.median()),
            target: Some(">= 0.5"),
            better: Better::Higher,
            extra: json!({
                "peers_online": lookup_peers, "connections": LOOKERS, "in_flight": LOOKERS * IN_FLIGHT,
                "min": rates.min(), "max": rates.max(),
                "p99_us": lat.percentile(99.0), "baseline_p99_us": raw_lat.percentile(99.0),
                "request_bytes": request, "answer_bytes": answer,
            }),
        }
        .emit();
    }

    if selected("online_peers") {
        // Measured before the flood: argon2's 19 MiB buffers stay in the allocator.
        let rss_before = node.rss()?;
        let t = Instant::now();
        online.extend(connect_peers(&endpoints, &node.server, &peers, lookup_peers..max_peers).await?);
        let took = t.elapsed().as_secs_f64();
        // Let the handshakes' transient buffers settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let still_open = online.iter().filter(|c| c.is_open()).count();
        let rss = node.rss()?;
        Figure {
            name: "online_peers",
            value: still_open as f64,
            unit: "peers",
            baseline: None,
            target: None,
            better: Better::Higher,
            extra: json!({
                "rss_bytes_per_peer": (rss.saturating_sub(rss_before)) as f64 / (still_open - lookup_peers.min(still_open)).max(1) as f64,
                "rss_bytes_per_peer_from_empty": (rss.saturating_sub(rss_empty)) as f64 / still_open.max(1) as f64,
                "rss_empty_bytes": rss_empty, "rss_bytes": rss,
                "connect_seconds": took,
            }),
        }
        .emit();
    }
    if selected("lookup_p99_registration_flood") {
        let (_, quiet) = lookups(&lookers, lookup_peers, secs).await;
        let stop = Arc::new(AtomicBool::new(false));
        let flood = tokio::spawn(registration_flood(node.server.clone(), stop.clone()));
        // Let the flood fill the hashing queue first.
        tokio::time::sleep(Duration::from_secs_f64(secs.min(2.0))).await;
        let (rate, flooded) = lookups(&lookers, lookup_peers, secs).await;
        stop.store(true, Ordering::Relaxed);
        let (accepted, busy) = flood.await?;
        Figure {
            name: "lookup_p99_registration_flood",
            value: flooded.percentile(99.0),
            unit: "us",
            baseline: Some(quiet.percentile(99.0)),
            target: Some("<= 2"),
            better: Better::Lower,
            extra: json!({
                "lookups_per_s_during_flood": rate, "p50_us": flooded.median(), "baseline_p50_us": quiet.median(),
                "registrations_accepted": accepted, "registrations_refused_busy": busy,
            }),
        }
        .emit();
    }

    drop(online);
    drop(lookers);
    Ok(())
}

/// A private directory under the system's temp dir, removed when dropped.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!("sotto-load-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        std::fs::DirBuilder::new().mode_private().create(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

trait PrivateDir {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateDir for std::fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::DirBuilderExt::mode(self, 0o700)
    }
}
