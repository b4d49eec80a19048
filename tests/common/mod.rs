//! Helpers for tests that drive the `sotto` binary as a user would.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sotto");

/// A `sotto` command with no environment leaking in from the machine.
pub fn sotto(home: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("SOTTO_HOME")
        .env_remove("SOTTO_PASSPHRASE_FILE")
        .env_remove("SOTTO_LOG")
        .env_remove("SOTTO_CONFIG")
        .env("NO_COLOR", "1");
    // Never the machine's own config file.
    cmd.env("XDG_CONFIG_HOME", home.join(".no-config"));
    cmd.arg("--home").arg(home).stdin(Stdio::null());
    cmd
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("sotto runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Sends SIGTERM or SIGINT to a child.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().expect("kill runs").success();
    assert!(ok, "kill -{sig} failed");
}

/// Waits for a child to exit, killing it after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rendezvous node process; stopped with SIGTERM when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub address: String,
    pub data: PathBuf,
}

impl NodeProcess {
    pub fn start(data: &Path) -> NodeProcess {
        Self::start_at(data, "127.0.0.1:0")
    }

    pub fn start_at(data: &Path, listen: &str) -> NodeProcess {
        let mut child = Command::new(BIN)
            .env_remove("SOTTO_LOG")
            .args(["rendezvous", "--listen", listen, "--data"])
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("node starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("node prints its address");
        let address = line.trim().to_string();
        assert!(address.starts_with("sotto://127.0.0.1:") && address.contains("#sha256:"), "address line: {address:?}");
        NodeProcess { child, address, data: data.to_path_buf() }
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        signal(&self.child, "TERM");
        wait_exit(&mut self.child, Duration::from_secs(10))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A profile directory with its passphrase and password files.
pub struct User {
    pub name: String,
    pub home: PathBuf,
    pub passphrase: PathBuf,
    pub password: PathBuf,
}

impl User {
    pub fn new(root: &Path, name: &str) -> User {
        let home = root.join(name);
        let passphrase = root.join(format!("{name}.passphrase"));
        let password = root.join(format!("{name}.password"));
        std::fs::write(&passphrase, format!("{name} passphrase\n")).unwrap();
        std::fs::write(&password, format!("{name} password 123\n")).unwrap();
        User { name: name.to_string(), home, passphrase, password }
    }

    /// `sotto --home H --passphrase-file P ARGS...`
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = sotto(&self.home);
        cmd.arg("--passphrase-file").arg(&self.passphrase).args(args);
        cmd
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = run(&mut self.cmd(args));
        assert!(out.status.success(), "sotto {args:?} failed: {}{}", stdout(&out), stderr(&out));
        stdout(&out)
    }

    pub fn id_new(&self) -> String {
        self.ok(&["id", "new"])
    }

    pub fn register(&self, server: &str) -> String {
        let mut cmd = self.cmd(&["register", &self.name, "--server", server, "--password-file"]);
        cmd.arg(&self.password);
        let out = run(&mut cmd);
        assert!(out.status.success(), "register {} failed: {}", self.name, stderr(&out));
        stdout(&out)
    }

    /// Starts `sotto up` and waits until it says that this user is online.
    pub fn up(&self) -> Running {
        let mut child = self.cmd(&["up"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("up starts");
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        wait_until_online(&mut reader, &self.name);
        // Keep draining its output so it never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Running(child)
    }
}

/// Reads `sotto up`'s output until it says that `name` is online ("NAME is online at
/// SERVER"). Lines about contacts ("[12:00:00] bob is online") can come first: the
/// contact watch and the presence publish run side by side.
pub fn wait_until_online(reader: &mut impl BufRead, name: &str) {
    let online = format!("{name} is online at ");
    let mut said = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("up prints");
        assert!(n > 0, "up ended before saying {online:?}; it said: {said:?}");
        if line.starts_with(&online) {
            return;
        }
        said.push_str(&line);
    }
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A child process that is killed if the test ends before it exits.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A node and two users, alice and bob, each with an identity and an account.
pub fn node_and_users(root: &Path) -> (NodeProcess, User, User) {
    let node = NodeProcess::start(&root.join("node"));
    let (alice, bob) = (User::new(root, "alice"), User::new(root, "bob"));
    for u in [&alice, &bob] {
        u.id_new();
        u.register(&node.address);
    }
    (node, alice, bob)
}

/// A rendezvous node inside the test process, running until the test ends. It hashes
/// passwords at the explicit, non-default low cost tests may use; the default is OWASP's.
pub async fn node_in_process(dir: &Path) -> sotto::address::ServerAddress {
    node_in_process_with(dir, |_| {}).await
}

/// [`node_in_process`], with its configuration adjusted first.
pub async fn node_in_process_with(
    dir: &Path,
    adjust: impl FnOnce(&mut sotto::rendezvous::node::NodeConfig),
) -> sotto::address::ServerAddress {
    let mut config = sotto::rendezvous::node::NodeConfig::new(([127, 0, 0, 1], 0).into(), dir.join("node"));
    config.password_cost = sotto::rendezvous::accounts::PasswordCost { memory_kib: 64, iterations: 1, parallelism: 1 };
    adjust(&mut config);
    let node = sotto::rendezvous::node::Node::bind(config).expect("node binds");
    let server = node.address().clone();
    tokio::spawn(node.run(std::future::pending()));
    server
}

/// A node and two running agents in this process: alice and bob registered, bob's
/// agent listening on `bob_ip` and online, and one message sent from alice to bob, so
/// the session is open and each side has pinned the other.
pub struct PeerWorld {
    pub dir: tempfile::TempDir,
    pub server: sotto::address::ServerAddress,
    pub alice: std::sync::Arc<sotto::keys::Identity>,
    pub bob: std::sync::Arc<sotto::keys::Identity>,
    pub alice_agent: sotto::peer::agent::Agent,
    pub bob_agent: sotto::peer::agent::Agent,
    pub bob_addr: std::net::SocketAddr,
    pub bob_cert: [u8; 32],
    pub bob_noise: sotto::keys::NoiseKey,
    /// Ends bob's presence when dropped.
    pub stop: tokio::sync::watch::Sender<bool>,
}

pub const WORLD_PASSWORD: &str = "password123";

pub async fn peer_world(bob_ip: std::net::IpAddr) -> PeerWorld {
    peer_world_with(bob_ip, |_| {}).await
}

/// [`peer_world`], with the node's configuration adjusted first.
pub async fn peer_world_with(bob_ip: std::net::IpAddr, adjust: impl FnOnce(&mut sotto::rendezvous::node::NodeConfig)) -> PeerWorld {
    use std::sync::Arc;
    let name = |s: &str| sotto::username::Username::parse(s).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = node_in_process_with(dir.path(), adjust).await;
    let (alice, bob) = (Arc::new(sotto::keys::Identity::generate()), Arc::new(sotto::keys::Identity::generate()));
    for (id, user) in [(&alice, "alice"), (&bob, "bob")] {
        register(&server, None, id, user).await;
    }
    let (bob_agent, bob_cert) = start_agent(dir.path(), &server, &bob, "bob", bob_ip);
    let (alice_agent, _) = start_agent(dir.path(), &server, &alice, "alice", [127, 0, 0, 1].into());
    let bob_addr = bob_agent.local_addr().unwrap();
    let stop = go_online(&server, &bob, "bob", bob_addr, bob_cert);
    wait_until_visible(&alice_agent, "bob").await;
    alice_agent.send(&name("bob"), "first contact").await.expect("first contact");
    PeerWorld { dir, server, bob_noise: bob.noise().public(), alice, bob, alice_agent, bob_agent, bob_addr, bob_cert, stop }
}

/// Registers `user` with `id` at `server`, with [`WORLD_PASSWORD`], from `endpoint`'s
/// address or a socket of its own (the node allows 20 registrations an hour from one
/// address).
pub async fn register(server: &sotto::address::ServerAddress, endpoint: Option<&quinn::Endpoint>, id: &sotto::keys::Identity, user: &str) {
    let c = sotto::rendezvous::client::RendezvousClient::connect_via(endpoint, server).await.unwrap();
    c.register(id, &sotto::username::Username::parse(user).unwrap(), WORLD_PASSWORD).await.unwrap();
    c.close().await;
}

/// An agent for `user` with its home under `root`, listening on `ip`; returns it and
/// the SHA-256 of its QUIC certificate.
pub fn start_agent(
    root: &Path,
    server: &sotto::address::ServerAddress,
    id: &std::sync::Arc<sotto::keys::Identity>,
    user: &str,
    ip: std::net::IpAddr,
) -> (sotto::peer::agent::Agent, [u8; 32]) {
    use sotto::peer::agent::{Agent, AgentConfig};
    use sotto::store::{SledStore, Store};
    let home = root.join(user);
    let cert = sotto::tls::CertKey::load_or_create(&home.join("peer"), "sotto-peer").unwrap();
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(SledStore::open(&home.join("db")).unwrap());
    let username = sotto::username::Username::parse(user).unwrap();
    let config = AgentConfig { username, server: server.clone(), listen: (ip, 0).into() };
    (Agent::start(id.clone(), store, &cert, config).unwrap(), cert.sha256())
}

/// Publishes `user`'s signed presence at `addr` and keeps it fresh until the returned
/// sender is dropped.
pub fn go_online(
    server: &sotto::address::ServerAddress,
    id: &std::sync::Arc<sotto::keys::Identity>,
    user: &str,
    addr: std::net::SocketAddr,
    cert_sha256: [u8; 32],
) -> tokio::sync::watch::Sender<bool> {
    let username = sotto::username::Username::parse(user).unwrap();
    let presence = sotto::online::Presence { server: server.clone(), username, addrs: vec![addr], cert_sha256, ttl: 60 };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let id = id.clone();
    tokio::spawn(async move { sotto::online::stay_online(&id, &presence, stopped, |_| {}).await });
    stop
}

/// Waits (up to 5 s) until `agent` can look up `user`'s presence record.
pub async fn wait_until_visible(agent: &sotto::peer::agent::Agent, user: &str) {
    let user = sotto::username::Username::parse(user).unwrap();
    for _ in 0..100 {
        if agent.lookup(&user).await.is_ok_and(|v| v.presence.is_some()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A session with bob made by hand as alice, for sending what a real client would not.
pub struct RawSession {
    pub _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub transport: sotto::peer::session::Transport,
}

/// Dials bob from 127.0.0.1 and runs alice's side of the handshake by hand.
pub async fn raw_session(w: &PeerWorld) -> RawSession {
    use sotto::peer::session::{Dial, ALPN, MAX_HANDSHAKE_MESSAGE};
    let name = |s: &str| sotto::username::Username::parse(s).unwrap();
    let (dial, preamble, msg1) = Dial::start(&w.alice, &name("alice"), &name("bob"), &w.bob_noise, sotto::clock::unix_now_ns()).unwrap();
    let (config, _) = sotto::tls::client_config(w.bob_cert, ALPN).unwrap();
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(w.bob_addr, "sotto-peer").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&sotto::wire::encode_frame(&preamble)).await.unwrap();
    send.write_all(&sotto::wire::encode_frame(&msg1)).await.unwrap();
    let msg2 = read_frame(&mut recv, MAX_HANDSHAKE_MESSAGE).await;
    let transport = dial.finish(&msg2).unwrap();
    RawSession { _endpoint: endpoint, conn, send, recv, transport }
}

/// Reads one frame of at most `cap` bytes.
pub async fn read_frame(recv: &mut quinn::RecvStream, cap: usize) -> Vec<u8> {
    let mut header = [0u8; sotto::wire::HEADER_LEN];
    recv.read_exact(&mut header).await.unwrap();
    let mut body = vec![0u8; sotto::wire::frame_len(header, cap).unwrap()];
    recv.read_exact(&mut body).await.unwrap();
    body
}
