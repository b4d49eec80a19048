//! `sotto demo`: the whole flow on this machine, in a temporary directory, through the
//! same library calls the commands make. Nothing to set up, nothing left behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::RngCore;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use sotto::address::ServerAddress;
use sotto::idfile::KdfParams;
use sotto::keys::{safety_number, Identity};
use sotto::online::{self, Event, Presence};
use sotto::peer::agent::{Agent, AgentConfig, AgentEvent};
use sotto::profile::{Profile, ProfileConfig};
use sotto::rendezvous::client::RendezvousClient;
use sotto::rendezvous::node::{Node, NodeConfig};
use sotto::store::{Direction, SledStore, Store};
use sotto::tls::CertKey;
use sotto::username::Username;

/// Removes the demo directory however the demo ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn random_secret() -> zeroize::Zeroizing<String> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 16]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    zeroize::Zeroizing::new(hex::encode(bytes.as_ref()))
}

/// A demo user: a profile directory with an identity, a username and a password.
struct User {
    name: Username,
    profile: Profile,
    identity: Identity,
    password: zeroize::Zeroizing<String>,
}

/// A demo user who is online: their peer agent and presence keeper.
struct Online {
    name: Username,
    agent: Agent,
    events: broadcast::Receiver<AgentEvent>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), sotto::rendezvous::client::ClientError>>,
}

impl Online {
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("presence task failed")??;
        self.agent.shutdown().await;
        Ok(())
    }
}

async fn go_online(user: User, server: &ServerAddress) -> Result<Online> {
    let cert = CertKey::load_or_create(&user.profile.home().join("peer"), "sotto-peer")?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&user.profile.history_dir()?)?);
    let identity = Arc::new(user.identity);
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let agent = Agent::start(identity.clone(), store, &cert, AgentConfig { username: user.name.clone(), server: server.clone(), listen })?;
    let events = agent.subscribe();
    let presence = Presence {
        server: server.clone(),
        username: user.name.clone(),
        addrs: agent.advertised_addrs().await,
        cert_sha256: cert.sha256(),
        ttl: 60,
    };
    let (stop, stopped) = watch::channel(false);
    let (online_tx, mut online_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        online::stay_online(&identity, &presence, stopped, move |e| {
            let _ = online_tx.send(e);
        })
        .await
    });
    match tokio::time::timeout(Duration::from_secs(10), online_rx.recv()).await {
        Ok(Some(Event::Online { observed, .. })) => {
            println!("    {:<6} online; peers reach it at {}; the node sees {observed}", user.name.as_str(), agent.local_addr()?)
        }
        other => bail!("{} did not come online: {other:?}", user.name),
    }
    Ok(Online { name: user.name, agent, events, stop, task })
}

async fn expect_received(events: &mut broadcast::Receiver<AgentEvent>, who: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(AgentEvent::Received(m))) => {
                println!("    {who} received from {}: {:?} (stored, then acknowledged)", m.peer, m.body);
                return Ok(());
            }
            Ok(Ok(_)) => continue,
            other => bail!("{who} did not receive the message: {other:?}"),
        }
    }
}

fn make_user(root: &Path, name: &str) -> Result<User> {
    let profile = Profile::open(&root.join(name))?;
    let identity = Identity::generate();
    profile.create_identity(&identity, random_secret().as_bytes(), KdfParams::DEFAULT)?;
    println!("    {name:<6} fingerprint {}", identity.public().fingerprint());
    Ok(User { name: Username::parse(name)?, profile, identity, password: random_secret() })
}

pub async fn run() -> Result<()> {
    let mut nonce = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let root = TempDir(std::env::temp_dir().join(format!("sotto-demo-{}", hex::encode(nonce))));
    std::fs::create_dir_all(&root.0).with_context(|| format!("cannot create {}", root.0.display()))?;
    println!("sotto demo: a rendezvous node and two users on this machine, in {}", root.0.display());

    step(1, "Start a rendezvous node on 127.0.0.1 (QUIC, self-signed certificate, pinned by clients)");
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let node = Node::bind(NodeConfig::new(listen, root.0.join("node")))?;
    let server = node.address().clone();
    println!("    server address {server}");
    let (stop_node, node_stopped) = oneshot::channel::<()>();
    let node_task = tokio::spawn(node.run(async move {
        let _ = node_stopped.await;
    }));

    step(2, "Make identities: Ed25519 identity key + X25519 Noise key, encrypted at rest (argon2id, XChaCha20-Poly1305)");
    let alice = make_user(&root.0, "alice")?;
    let bob = make_user(&root.0, "bob")?;

    step(3, "Register both accounts (password hashed with argon2id on the node; identity proven by signature)");
    for user in [&alice, &bob] {
        let client = RendezvousClient::connect(&server).await?;
        client.register(&user.identity, &user.name, &user.password).await?;
        client.close().await;
        user.profile.save_config(&ProfileConfig { server: Some(server.to_string()), username: Some(user.name.to_string()) })?;
        println!("    registered {}", user.name);
    }

    step(4, "Both go online: each opens a peer QUIC endpoint and publishes a signed presence record");
    let mut alice = go_online(alice, &server).await?;
    let mut bob = go_online(bob, &server).await?;

    step(5, "alice looks bob up and verifies his record herself (signature, Noise-key binding, expiry)");
    let verified = alice.agent.lookup(&bob.name).await?;
    let record = verified.presence.context("bob's presence record is missing")?;
    println!("    online now: {}", alice.agent.online().await?.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "));
    println!(
        "    bob's record #{} verifies under key {}…; peer certificate sha256:{}…",
        record.seq,
        &verified.info.identity_key.to_hex()[..16],
        &hex::encode(record.cert_sha256)[..16]
    );

    step(6, &format!("alice → bob, directly: QUIC pinned to bob's certificate, then {}", sotto::peer::session::NOISE_PARAMS));
    let sent = alice.agent.send(&bob.name, "Hi bob! Only you can read this.").await?;
    println!("    alice sent {:?}: {}", sent.body, sent.state.as_str());
    expect_received(&mut bob.events, "bob").await?;

    step(7, "bob → alice, on the same session (sessions are reused while both stay up)");
    let reply = bob.agent.send(&alice.name, "Hi alice, received loud and clear.").await?;
    println!("    bob sent {:?}: {}", reply.body, reply.state.as_str());
    expect_received(&mut alice.events, "alice").await?;

    step(8, "Each side's local history (sled), newest last");
    for user in [&alice, &bob] {
        println!("    {}:", user.name);
        for m in user.agent.store().last(None, 10)? {
            let arrow = if m.direction == Direction::Out { "→" } else { "←" };
            println!("      {arrow} {:<6} {:<40} [{}]", m.peer.as_str(), m.body, m.state.as_str());
        }
    }
    let safety = safety_number(&alice.agent.identity().public(), &bob.agent.identity().public());
    println!("    both would compare the safety number {safety}");

    step(9, "bob goes offline; a message to him now fails cleanly and stays in history as failed");
    let bob_name = bob.name.clone();
    bob.stop().await?;
    match alice.agent.send(&bob_name, "Are you still there?").await {
        Err(e) => println!("    alice: {e}"),
        Ok(_) => bail!("a message to an offline user was reported delivered"),
    }
    alice.stop().await?;

    step(10, "Stop the node and clean up");
    let _ = stop_node.send(());
    node_task.await.context("node task failed")??;
    println!("    done: everything ran on 127.0.0.1 and the temporary directory is removed");
    Ok(())
}
