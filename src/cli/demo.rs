//! `sotto demo`: the whole flow on this machine, in a temporary directory, through the
//! same library calls the commands make. Nothing to set up, nothing left behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::RngCore;
use tokio::sync::{mpsc, oneshot, watch};

use sotto::clock::unix_now;
use sotto::idfile::KdfParams;
use sotto::keys::{safety_number, Identity};
use sotto::online::{self, Event, Presence};
use sotto::profile::{Profile, ProfileConfig};
use sotto::rendezvous::client::{verify_lookup, RendezvousClient};
use sotto::rendezvous::node::{Node, NodeConfig};
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

fn random_secret() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A demo user: a profile directory with an identity, a username and a password.
struct User {
    name: Username,
    profile: Profile,
    identity: Identity,
    password: String,
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
    println!("    safety number of the pair (both sides compute the same):");
    println!("    {}", safety_number(&alice.identity.public(), &bob.identity.public()));

    step(3, "Register both accounts (password hashed with argon2id on the node; identity proven by signature)");
    for user in [&alice, &bob] {
        let client = RendezvousClient::connect(&server).await?;
        client.register(&user.identity, &user.name, &user.password).await?;
        client.close().await;
        user.profile.save_config(&ProfileConfig { server: Some(server.to_string()), username: Some(user.name.to_string()) })?;
        println!("    registered {}", user.name);
    }

    step(4, "bob goes online: signs a presence record (seq, expiry, peer certificate hash) and publishes it");
    let cert = CertKey::load_or_create(&bob.profile.home().join("peer"), "sotto-peer")?;
    let presence = Presence { server: server.clone(), username: bob.name.clone(), addrs: Vec::new(), cert_sha256: cert.sha256(), ttl: 60 };
    let (stop_bob, bob_stopped) = watch::channel(false);
    let (events, mut bob_events) = mpsc::unbounded_channel();
    let bob_identity = bob.identity;
    let bob_task = tokio::spawn(async move {
        online::stay_online(&bob_identity, &presence, bob_stopped, move |e| {
            let _ = events.send(e);
        })
        .await
    });
    match tokio::time::timeout(Duration::from_secs(10), bob_events.recv()).await {
        Ok(Some(Event::Online { observed, expires_in })) => {
            println!("    bob is online; the node sees him at {observed}; record valid {expires_in} s")
        }
        other => bail!("bob did not come online: {other:?}"),
    }

    step(5, "alice signs in with her identity key and looks bob up; she verifies his record herself");
    let client = RendezvousClient::connect(&server).await?;
    client.authenticate(&alice.identity, &alice.name).await?;
    let (names, _) = client.online().await?;
    println!("    online now: {}", names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "));
    let verified = verify_lookup(client.lookup(&bob.name).await?, unix_now(), 60)?;
    let record = verified.presence.context("bob's presence record is missing")?;
    println!("    bob's identity key {}", verified.info.identity_key.to_hex());
    println!("    bob's record #{} verifies under that key; peer certificate sha256:{}", record.seq, hex::encode(record.cert_sha256));

    step(6, "bob goes offline: he withdraws, and the node drops his record at once");
    let _ = stop_bob.send(true);
    bob_task.await.context("bob's task failed")??;
    let (names, _) = client.online().await?;
    let still = names.contains(&bob.name);
    println!(
        "    online now: {}",
        if names.is_empty() { "nobody".to_string() } else { names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ") }
    );
    client.close().await;
    if still {
        bail!("bob is still listed online after going offline");
    }

    step(7, "Stop the node and clean up");
    let _ = stop_node.send(());
    node_task.await.context("node task failed")??;
    println!("    done: everything ran on 127.0.0.1 and the temporary directory is removed");
    Ok(())
}
