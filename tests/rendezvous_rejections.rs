//! Every refusal of the rendezvous node, proven against a real node running in-process
//! on 127.0.0.1 with a temporary data directory. Each test checks the exact refusal,
//! that the node still serves afterwards, and that the refused request left no trace.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sotto::address::ServerAddress;
use sotto::clock::unix_now;
use sotto::keys::Identity;
use sotto::presence::{Freshness, PresenceRecord, SignedPresence, RECORD_VERSION};
use sotto::rendezvous::accounts::{Account, Accounts, PasswordCost, ACCOUNT_VERSION};
use sotto::rendezvous::auth::{self, Binding, Purpose};
use sotto::rendezvous::client::{ClientError, RendezvousClient};
use sotto::rendezvous::node::{Node, NodeConfig, NodeError};
use sotto::rendezvous::proto::{Refusal, Request, Response, ALPN, MAX_FRAME, MAX_ONLINE_LIST};
use sotto::tls;
use sotto::username::Username;
use sotto::wire::{decode_message, decode_single_frame, encode_frame, encode_message, HEADER_LEN};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PASSWORD: &str = "correct horse battery";
const LOCALHOST: [u8; 4] = [127, 0, 0, 1];
/// A second loopback source address, so the node sees a different client IP.
const OTHER_HOST: [u8; 4] = [127, 0, 0, 2];

// ---------------------------------------------------------------------------------
// Helpers

/// A node serving on 127.0.0.1 from a temporary data directory.
struct TestNode {
    address: ServerAddress,
    local: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), NodeError>>,
    dir: tempfile::TempDir,
}

fn config(dir: &tempfile::TempDir) -> NodeConfig {
    let mut config = NodeConfig::new(SocketAddr::from((LOCALHOST, 0)), dir.path().join("node"));
    // Explicit, non-default option that lowers argon2 cost for test speed; the default
    // (`PasswordCost::OWASP`) is checked by `default_node_config_hashes_at_owasp_cost`.
    config.password_cost = PasswordCost { memory_kib: 64, iterations: 1, parallelism: 1 };
    config
}

async fn start_with(dir: tempfile::TempDir, config: NodeConfig) -> TestNode {
    let node = Node::bind(config).expect("node binds");
    let (address, local) = (node.address().clone(), node.local_addr().unwrap());
    let (shutdown, stop) = oneshot::channel::<()>();
    let task = tokio::spawn(node.run(async move {
        let _ = stop.await;
    }));
    TestNode { address, local, shutdown, task, dir }
}

async fn start() -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    start_with(dir, config).await
}

impl TestNode {
    /// The node is still running and a brand-new client gets through Hello.
    async fn assert_serving(&self) {
        assert!(!self.task.is_finished(), "the node task ended");
        RendezvousClient::connect(&self.address).await.expect("a fresh client connects").close().await;
    }

    /// Shuts the node down and checks that it ran without error or panic.
    async fn stop(self) {
        assert!(!self.task.is_finished(), "the node task ended before shutdown");
        let _ = self.shutdown.send(());
        let ran = tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("node stops in time");
        ran.expect("node task did not panic").expect("node ran without error");
        drop(self.dir);
    }
}

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

/// Registers `user` on a new connection; returns the signed-in client and identity.
async fn registered(node: &TestNode, user: &str) -> (RendezvousClient, Identity) {
    let id = Identity::generate();
    let client = RendezvousClient::connect(&node.address).await.unwrap();
    client.register(&id, &name(user), PASSWORD).await.unwrap();
    (client, id)
}

/// Signs in `user` with its identity key on a new connection.
async fn authenticated(node: &TestNode, id: &Identity, user: &str) -> RendezvousClient {
    let client = RendezvousClient::connect(&node.address).await.unwrap();
    client.authenticate(id, &name(user)).await.unwrap();
    client
}

/// A presence record for `id` as `user`.
fn record(id: &Identity, user: &str, seq: u64, issued_at: u64, expires_at: u64) -> PresenceRecord {
    PresenceRecord {
        version: RECORD_VERSION,
        username: name(user),
        identity_key: id.public(),
        noise: id.binding(),
        addrs: vec!["127.0.0.1:4433".parse().unwrap()],
        cert_sha256: [7; 32],
        seq,
        issued_at,
        expires_at,
    }
}

/// A current record (issued now, one minute to live), signed by `id`.
fn fresh(id: &Identity, user: &str, seq: u64) -> SignedPresence {
    let now = unix_now();
    SignedPresence::sign(&record(id, user, seq, now, now + 60), id.secret())
}

fn refused(result: Result<impl std::fmt::Debug, ClientError>) -> Refusal {
    match result {
        Err(ClientError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn online(client: &RendezvousClient) -> Vec<Username> {
    client.online().await.unwrap().0
}

/// A hand-driven QUIC connection to the node, for bytes the client would never send.
struct Raw {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    binding: Binding,
}

impl Raw {
    /// Connects from `from` (port 0) without saying Hello.
    async fn connect(node: &TestNode, from: [u8; 4]) -> Raw {
        let endpoint = quinn::Endpoint::client(SocketAddr::from((from, 0))).unwrap();
        Raw::open(endpoint, node.address.cert_sha256, node.local).await
    }

    /// Connects over `endpoint` to the node at `to` with certificate `pin`.
    async fn open(endpoint: quinn::Endpoint, pin: [u8; 32], to: SocketAddr) -> Raw {
        let (config, _) = tls::client_config(pin, ALPN).unwrap();
        let conn = endpoint.connect_with(config, to, "sotto-rendezvous").unwrap().await.expect("raw connection");
        let channel = tls::channel_binding(&conn, auth::EXPORTER_LABEL).unwrap();
        Raw { _endpoint: endpoint, conn, binding: Binding { challenge: [0; 32], channel } }
    }

    /// Connects and says Hello.
    async fn hello(node: &TestNode, from: [u8; 4]) -> Raw {
        Raw::connect(node, from).await.say_hello().await
    }

    async fn say_hello(mut self) -> Raw {
        match self.call(&Request::Hello).await {
            Response::Challenge { challenge, .. } => self.binding.challenge = challenge,
            other => panic!("expected a challenge, got {other:?}"),
        }
        self
    }

    /// Sends `bytes` as the whole request stream; returns the node's answer, or how
    /// the stream ended without one.
    async fn send(&self, bytes: &[u8]) -> Result<Response, quinn::ReadToEndError> {
        let (mut send, mut recv) = self.conn.open_bi().await.expect("stream opens");
        // The node may stop reading an oversized request early; its answer still counts.
        if send.write_all(bytes).await.is_ok() {
            let _ = send.finish();
        }
        let bytes =
            tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(HEADER_LEN + MAX_FRAME)).await.expect("node answers in time")?;
        Ok(decode_single_frame(&bytes, MAX_FRAME).and_then(decode_message::<Response>).expect("node answers with a valid frame"))
    }

    /// Sends one message payload (`WIRE_VERSION ‖ postcard`) in a well-formed frame.
    async fn send_payload(&self, payload: &[u8]) -> Response {
        self.send(&encode_frame(payload)).await.expect("node answers")
    }

    async fn call(&self, request: &Request) -> Response {
        self.send_payload(&encode_message(request)).await
    }

    fn authenticate_request(&self, id: &Identity, user: &str, binding: &Binding) -> Request {
        Request::Authenticate {
            username: name(user),
            identity_key: id.public(),
            proof: auth::prove(id.secret(), Purpose::Authenticate, binding, &name(user)),
        }
    }

    fn login_request(&self, id: &Identity, user: &str, password: &str) -> Request {
        self.credentials_request(Purpose::Login, id, user, password)
    }

    /// A `Register` or `Login` with a valid proof for this connection.
    fn credentials_request(&self, purpose: Purpose, id: &Identity, user: &str, password: &str) -> Request {
        let credentials = sotto::rendezvous::proto::Credentials {
            username: name(user),
            password: password.to_string(),
            identity_key: id.public(),
            noise: id.binding(),
            proof: auth::prove(id.secret(), purpose, &self.binding, &name(user)),
        };
        match purpose {
            Purpose::Register => Request::Register(credentials),
            _ => Request::Login(credentials),
        }
    }
}

// ---------------------------------------------------------------------------------
// Defaults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_node_config_hashes_at_owasp_cost() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::new(SocketAddr::from((LOCALHOST, 0)), dir.path().join("node"));
    assert_eq!(config.password_cost, PasswordCost::OWASP);
    assert_eq!(PasswordCost::OWASP, PasswordCost { memory_kib: 19_456, iterations: 2, parallelism: 1 });
    let data = config.data_dir.clone();
    let node = start_with(dir, config).await;
    let (client, _) = registered(&node, "alice").await;
    client.close().await;
    // Stop the node but keep its data directory, to read what it stored.
    let TestNode { shutdown, task, dir, .. } = node;
    let _ = shutdown.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
    // The node's last tasks may hold the database for a moment after it stops.
    let mut accounts = None;
    for _ in 0..50 {
        match Accounts::open(&data.join("accounts")) {
            Ok(a) => {
                accounts = Some(a);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let account = accounts.expect("account store reopens").get(&name("alice")).unwrap().expect("alice was stored");
    assert!(account.password_phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{}", account.password_phc);
    drop(dir);
}

// ---------------------------------------------------------------------------------
// Presence records

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_signature_is_bad_record() {
    let node = start().await;
    let (alice, id) = registered(&node, "alice").await;
    let (bob, _) = registered(&node, "bob").await;

    let mut forged = fresh(&id, "alice", 1);
    forged.signature[17] ^= 0x04;
    assert_eq!(refused(alice.publish(forged).await), Refusal::BadRecord);
    let mut tampered = fresh(&id, "alice", 1);
    let last = tampered.payload.len() - 1;
    tampered.payload[last] ^= 0x01;
    assert_eq!(refused(alice.publish(tampered).await), Refusal::BadRecord);

    // Nothing was stored: alice is not online and has no presence.
    assert!(online(&bob).await.is_empty());
    assert_eq!(bob.lookup(&name("alice")).await.unwrap().presence, None);
    // The forgery did not use up seq 1: the honest record with seq 1 is accepted.
    let honest = fresh(&id, "alice", 1);
    let observed = alice.publish(honest.clone()).await.unwrap();
    assert_eq!(observed.ip(), IpAddr::from(LOCALHOST));
    assert_eq!(bob.lookup(&name("alice")).await.unwrap().presence, Some(honest));
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_of_another_account_is_bad_record() {
    let node = start().await;
    let (alice, alice_id) = registered(&node, "alice").await;
    let (bob, bob_id) = registered(&node, "bob").await;

    // Bob's own genuine record, published over alice's connection.
    assert_eq!(refused(alice.publish(fresh(&bob_id, "bob", 1)).await), Refusal::BadRecord);
    // A record signed by bob's key that claims to be alice's.
    assert_eq!(refused(alice.publish(fresh(&bob_id, "alice", 1)).await), Refusal::BadRecord);
    // Signed by alice's key but naming bob.
    assert_eq!(refused(alice.publish(fresh(&alice_id, "bob", 1)).await), Refusal::BadRecord);
    // Signed by alice's key, naming alice, but carrying bob's identity key.
    let mut rec = record(&alice_id, "alice", 1, unix_now(), unix_now() + 60);
    rec.identity_key = bob_id.public();
    assert_eq!(refused(alice.publish(SignedPresence::sign(&rec, alice_id.secret())).await), Refusal::BadRecord);
    // Alice's key with bob's Noise binding.
    let mut rec = record(&alice_id, "alice", 1, unix_now(), unix_now() + 60);
    rec.noise = bob_id.binding();
    assert_eq!(refused(alice.publish(SignedPresence::sign(&rec, alice_id.secret())).await), Refusal::BadRecord);

    // Neither account got a presence out of it.
    assert!(online(&bob).await.is_empty());
    assert_eq!(alice.lookup(&name("bob")).await.unwrap().presence, None);
    assert_eq!(bob.lookup(&name("alice")).await.unwrap().presence, None);
    // Both can still publish their own records with seq 1.
    alice.publish(fresh(&alice_id, "alice", 1)).await.unwrap();
    bob.publish(fresh(&bob_id, "bob", 1)).await.unwrap();
    assert_eq!(online(&alice).await, vec![name("alice"), name("bob")]);
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_record_is_stale_even_after_reconnecting() {
    let node = start().await;
    let (alice, id) = registered(&node, "alice").await;
    let (bob, _) = registered(&node, "bob").await;

    let five = fresh(&id, "alice", 5);
    alice.publish(five.clone()).await.unwrap();
    assert_eq!(refused(alice.publish(five.clone()).await), Refusal::StaleRecord);
    let four = fresh(&id, "alice", 4);
    assert_eq!(refused(alice.publish(four.clone()).await), Refusal::StaleRecord);
    // The accepted record is still the one served.
    assert_eq!(bob.lookup(&name("alice")).await.unwrap().presence, Some(five.clone()));
    let six = fresh(&id, "alice", 6);
    alice.publish(six.clone()).await.unwrap();

    // After the publishing connection is gone, its records cannot be replayed either.
    alice.close().await;
    let alice = authenticated(&node, &id, "alice").await;
    for old in [six.clone(), five, four] {
        assert_eq!(refused(alice.publish(old).await), Refusal::StaleRecord);
    }
    assert!(!online(&bob).await.contains(&name("alice")), "a refused replay must not bring alice back online");
    // A replay from a connection that is not alice's is refused before any seq check.
    assert_eq!(refused(bob.publish(six).await), Refusal::BadRecord);
    let seven = fresh(&id, "alice", 7);
    alice.publish(seven.clone()).await.unwrap();
    assert_eq!(bob.lookup(&name("alice")).await.unwrap().presence, Some(seven));
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_record_is_refused() {
    let node = start().await;
    let (alice, id) = registered(&node, "alice").await;
    let now = unix_now();
    // Issued within the node's clock-skew allowance, but already expired.
    let expired = SignedPresence::sign(&record(&id, "alice", 10, now - 50, now - 10), id.secret());
    assert_eq!(refused(alice.publish(expired).await), Refusal::RecordExpired);
    assert!(online(&alice).await.is_empty());
    // The refused record did not raise the seq floor.
    alice.publish(fresh(&id, "alice", 1)).await.unwrap();
    assert_eq!(online(&alice).await, vec![name("alice")]);
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_from_the_future_or_the_past_is_clock_skew() {
    let node = start().await;
    let (alice, id) = registered(&node, "alice").await;
    let now = unix_now();
    let future = SignedPresence::sign(&record(&id, "alice", 10, now + 600, now + 660), id.secret());
    assert_eq!(refused(alice.publish(future).await), Refusal::ClockSkew);
    // Still unexpired, but issued longer ago than the skew allows.
    let old = SignedPresence::sign(&record(&id, "alice", 11, now - 200, now + 60), id.secret());
    assert_eq!(refused(alice.publish(old).await), Refusal::ClockSkew);
    assert!(online(&alice).await.is_empty());
    alice.publish(fresh(&id, "alice", 1)).await.unwrap();
    assert_eq!(online(&alice).await, vec![name("alice")]);
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_living_longer_than_the_node_allows_is_ttl_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir);
    config.freshness = Freshness { max_ttl: 120, max_skew: 30 };
    let node = start_with(dir, config).await;
    let (alice, id) = registered(&node, "alice").await;
    assert_eq!(alice.max_ttl, 120, "the node announces its configured max TTL");
    let now = unix_now();
    let long = SignedPresence::sign(&record(&id, "alice", 10, now, now + 121), id.secret());
    assert_eq!(refused(alice.publish(long).await), Refusal::TtlTooLong);
    let zero = SignedPresence::sign(&record(&id, "alice", 11, now, now), id.secret());
    assert_eq!(refused(alice.publish(zero).await), Refusal::TtlTooLong);
    let backwards = SignedPresence::sign(&record(&id, "alice", 12, now, now - 1), id.secret());
    assert_eq!(refused(alice.publish(backwards).await), Refusal::TtlTooLong);
    assert!(online(&alice).await.is_empty());
    // Exactly the max TTL is fine, and seq 1 is still free.
    let longest = SignedPresence::sign(&record(&id, "alice", 1, now, now + 120), id.secret());
    alice.publish(longest).await.unwrap();
    assert_eq!(online(&alice).await, vec![name("alice")]);
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_goes_away_when_the_publishing_connection_closes() {
    let node = start().await;
    let (alice, id) = registered(&node, "alice").await;
    let (bob, _) = registered(&node, "bob").await;
    // A record that would otherwise live for minutes.
    let now = unix_now();
    alice.publish(SignedPresence::sign(&record(&id, "alice", 1, now, now + 300), id.secret())).await.unwrap();
    assert_eq!(online(&bob).await, vec![name("alice")]);
    assert!(bob.lookup(&name("alice")).await.unwrap().presence.is_some());

    alice.close().await;
    let started = std::time::Instant::now();
    while online(&bob).await.contains(&name("alice")) {
        assert!(started.elapsed() < Duration::from_secs(5), "alice still listed online 5 s after her connection closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bob.lookup(&name("alice")).await.unwrap().presence, None);
    // The account itself is untouched: alice signs in again and is online again.
    let alice = authenticated(&node, &id, "alice").await;
    alice.publish(fresh(&id, "alice", 2)).await.unwrap();
    assert_eq!(online(&bob).await, vec![name("alice")]);
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// Frames and transport

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused_without_harm() {
    let node = start().await;
    let raw = Raw::hello(&node, LOCALHOST).await;
    let malformed_or_reset = |answer: Result<Response, quinn::ReadToEndError>| match answer {
        Ok(Response::Refused(Refusal::Malformed)) | Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_))) => {}
        other => panic!("expected Refused(Malformed) or a reset stream, got {other:?}"),
    };

    // A header that claims more than MAX_FRAME, followed by a short body.
    let mut lying = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    lying.extend_from_slice(&encode_message(&Request::ListOnline));
    malformed_or_reset(raw.send(&lying).await);
    // The largest possible claim.
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[1, 7]);
    malformed_or_reset(raw.send(&huge).await);
    // An honest header over a body larger than MAX_FRAME.
    let body = vec![0xAB; MAX_FRAME + 4096];
    malformed_or_reset(raw.send(&encode_frame(&body)).await);
    // A body of exactly MAX_FRAME + 1 bytes with a matching header.
    malformed_or_reset(raw.send(&encode_frame(&vec![1; MAX_FRAME + 1])).await);

    // The same connection still works, and so does a new client.
    assert!(matches!(raw.call(&Request::Hello).await, Response::Challenge { .. }));
    node.assert_serving().await;
    registered(&node, "alice").await.0.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_are_malformed() {
    let node = start().await;
    let raw = Raw::hello(&node, LOCALHOST).await;
    // Not a frame at all (the "length" would be b"GET " = 1.2 GB).
    assert_eq!(raw.send(b"GET / HTTP/1.1\r\nHost: sotto\r\n\r\n").await.unwrap(), Response::Refused(Refusal::Malformed));
    // A frame whose payload is noise: wrong wire version.
    let noise: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80).collect();
    assert_eq!(raw.send_payload(&noise).await, Response::Refused(Refusal::Malformed));
    // Right version, a known variant, then noise instead of its fields.
    let mut register = vec![1, 1];
    register.extend_from_slice(&noise);
    assert_eq!(raw.send_payload(&register).await, Response::Refused(Refusal::Malformed));
    // A valid request with a byte too many.
    let mut trailing = encode_message(&Request::ListOnline);
    trailing.push(0);
    assert_eq!(raw.send_payload(&trailing).await, Response::Refused(Refusal::Malformed));
    // A frame cut short, and an empty stream.
    let frame = encode_frame(&encode_message(&Request::Hello));
    assert_eq!(raw.send(&frame[..frame.len() - 1]).await.unwrap(), Response::Refused(Refusal::Malformed));
    assert_eq!(raw.send(&[]).await.unwrap(), Response::Refused(Refusal::Malformed));
    assert_eq!(raw.send_payload(&[]).await, Response::Refused(Refusal::Malformed));

    assert!(matches!(raw.call(&Request::Hello).await, Response::Challenge { .. }));
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_alpn_fails_the_connection() {
    let node = start().await;
    let (config, mismatch) = tls::client_config(node.address.cert_sha256, b"wrong/1").unwrap();
    let endpoint = quinn::Endpoint::client(SocketAddr::from((LOCALHOST, 0))).unwrap();
    let attempt = tokio::time::timeout(Duration::from_secs(10), endpoint.connect_with(config, node.local, "sotto-rendezvous").unwrap())
        .await
        .expect("the node answers the handshake");
    let err = attempt.expect_err("a connection with the wrong ALPN must fail");
    assert!(!mismatch.load(std::sync::atomic::Ordering::SeqCst), "the certificate was right; only the ALPN is wrong");
    assert!(matches!(err, quinn::ConnectionError::ConnectionClosed(_)), "the node closes the handshake: {err:?}");
    // ALPN is the only difference: the same pin with the right ALPN works.
    let (config, _) = tls::client_config(node.address.cert_sha256, ALPN).unwrap();
    let conn = endpoint.connect_with(config, node.local, "sotto-rendezvous").unwrap().await.expect("right ALPN connects");
    assert_eq!(tls::negotiated_alpn(&conn).as_deref(), Some(ALPN));
    drop(conn);
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_pin_is_pin_mismatch() {
    let node = start().await;
    let mut wrong = node.address.clone();
    wrong.cert_sha256[0] ^= 1;
    match RendezvousClient::connect(&wrong).await {
        Err(ClientError::PinMismatch(_)) => {}
        Err(other) => panic!("expected PinMismatch, got {other:?}"),
        Ok(_) => panic!("a client pinned to another certificate must not connect"),
    }
    // The pin from another node's certificate is refused just the same.
    let other = start().await;
    let crossed = ServerAddress { cert_sha256: other.address.cert_sha256, ..node.address.clone() };
    assert!(matches!(RendezvousClient::connect(&crossed).await, Err(ClientError::PinMismatch(_))));
    node.assert_serving().await;
    other.stop().await;
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// Accounts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_username_is_taken_and_keeps_the_first_key() {
    let node = start().await;
    let (alice, alice_id) = registered(&node, "alice").await;
    alice.close().await;

    let squatter = Identity::generate();
    let client = RendezvousClient::connect(&node.address).await.unwrap();
    assert_eq!(refused(client.register(&squatter, &name("alice"), "another password").await), Refusal::UsernameTaken);
    // Case does not make a new name.
    assert_eq!(refused(client.register(&squatter, &name("ALICE"), "another password").await), Refusal::UsernameTaken);
    // The refused registration did not sign this connection in.
    assert_eq!(refused(client.online().await), Refusal::NotAuthenticated);
    // ... nor replace alice's key or password.
    assert_eq!(refused(client.authenticate(&squatter, &name("alice")).await), Refusal::KeyChanged);
    assert_eq!(refused(client.login(&squatter, &name("alice"), "another password").await), Refusal::InvalidCredentials);

    let (bob, _) = registered(&node, "bob").await;
    let info = bob.lookup(&name("alice")).await.unwrap();
    assert_eq!(info.identity_key, alice_id.public());
    assert_eq!(info.noise, alice_id.binding());
    let alice = authenticated(&node, &alice_id, "alice").await;
    assert!(!alice.login(&alice_id, &name("alice"), PASSWORD).await.unwrap(), "alice's password and key are unchanged");
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_usernames_are_refused() {
    for bad in ["ab", "Bad Name", &"x".repeat(33), "", "alice!", "ålice", "bob\n", "../etc"] {
        assert!(Username::parse(bad).is_err(), "{bad:?} must not parse");
    }
    assert_eq!(Username::parse(&"x".repeat(32)).unwrap().as_str(), "x".repeat(32));

    let node = start().await;
    let (_alice, alice_id) = registered(&node, "alice").await;
    let raw = Raw::hello(&node, LOCALHOST).await;
    let req = raw.authenticate_request(&alice_id, "alice", &raw.binding);
    assert_eq!(raw.call(&req).await, Response::Authenticated);

    // Lookup (variant 6) of "Alice": not canonical, so not even decoded.
    assert_eq!(raw.send_payload(b"\x01\x06\x05Alice").await, Response::Refused(Refusal::Malformed));
    for bad in ["ab", "Bad Name", &"x".repeat(33), "al ice", "\u{e5}lice"] {
        let mut payload = vec![1, 6, bad.len() as u8];
        payload.extend_from_slice(bad.as_bytes());
        assert_eq!(raw.send_payload(&payload).await, Response::Refused(Refusal::Malformed), "{bad:?}");
    }
    // The same bytes with the canonical name are a lookup that works.
    match raw.send_payload(b"\x01\x06\x05alice").await {
        Response::Account(info) => assert_eq!(info.identity_key, alice_id.public()),
        other => panic!("expected alice's account, got {other:?}"),
    }

    // A registration whose username bytes are upper-cased after signing is refused as
    // malformed, and the canonical name stays free.
    let fresh_raw = Raw::hello(&node, LOCALHOST).await;
    let carol = Identity::generate();
    let creds = sotto::rendezvous::proto::Credentials {
        username: name("carol"),
        password: PASSWORD.to_string(),
        identity_key: carol.public(),
        noise: carol.binding(),
        proof: auth::prove(carol.secret(), Purpose::Register, &fresh_raw.binding, &name("carol")),
    };
    let good = encode_message(&Request::Register(creds));
    assert_eq!(&good[..8], b"\x01\x01\x05carol");
    let mut shouting = good.clone();
    shouting[3..8].copy_from_slice(b"CAROL");
    assert_eq!(fresh_raw.send_payload(&shouting).await, Response::Refused(Refusal::Malformed));
    assert_eq!(refused(_alice.lookup(&name("carol")).await), Refusal::NotFound);
    assert_eq!(fresh_raw.send_payload(&good).await, Response::Registered);
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_get_the_same_answer() {
    let node = start().await;
    let (alice, alice_id) = registered(&node, "alice").await;
    alice.close().await;

    // A new key with the wrong password: refused, and alice's key is not replaced.
    let intruder = Identity::generate();
    let client = RendezvousClient::connect(&node.address).await.unwrap();
    let wrong = refused(client.login(&intruder, &name("alice"), "not the password").await);
    assert_eq!(wrong, Refusal::InvalidCredentials);
    let unknown = refused(client.login(&intruder, &name("nobody"), PASSWORD).await);
    assert_eq!(unknown, wrong, "unknown user and wrong password must look the same");
    // Even alice's own key does not help with the wrong password.
    assert_eq!(refused(client.login(&alice_id, &name("alice"), "not the password").await), Refusal::InvalidCredentials);
    // Nothing signed this connection in.
    assert_eq!(refused(client.lookup(&name("alice")).await), Refusal::NotAuthenticated);
    // A key-only sign-in for a user that does not exist is refused too.
    assert_eq!(refused(client.authenticate(&intruder, &name("nobody")).await), Refusal::InvalidCredentials);

    // The account is as it was: the right password logs in without a key change.
    assert!(!client.login(&alice_id, &name("alice"), PASSWORD).await.unwrap());
    let info = client.lookup(&name("alice")).await.unwrap();
    assert_eq!(info.identity_key, alice_id.public());
    assert_eq!(refused(client.lookup(&name("nobody")).await), Refusal::NotFound);
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_flood_is_rate_limited_but_key_sign_in_still_works() {
    let node = start().await;
    // Alice registers from 127.0.0.1; the attacker guesses from 127.0.0.2.
    let (alice, alice_id) = registered(&node, "alice").await;
    alice.close().await;
    let attacker_id = Identity::generate();
    let attacker = Raw::hello(&node, OTHER_HOST).await;
    for attempt in 1..=10 {
        let answer = attacker.call(&attacker.login_request(&attacker_id, "alice", &format!("guess number {attempt}"))).await;
        assert_eq!(answer, Response::Refused(Refusal::InvalidCredentials), "attempt {attempt}");
    }
    let limited = |answer: Response| match answer {
        Response::Refused(Refusal::RateLimited { retry_after_secs }) => {
            assert!((1..=300).contains(&retry_after_secs), "{retry_after_secs}")
        }
        other => panic!("expected RateLimited, got {other:?}"),
    };
    limited(attacker.call(&attacker.login_request(&attacker_id, "alice", "guess number 11")).await);
    // Even the right password from a new connection is refused during the lockout.
    let again = Raw::hello(&node, OTHER_HOST).await;
    limited(again.call(&again.login_request(&attacker_id, "alice", PASSWORD)).await);
    limited(again.call(&again.login_request(&alice_id, "alice", PASSWORD)).await);
    // The lockout is per account: another user from the same address is not locked.
    let (_bob, _) = registered(&node, "bob").await;
    let bob_id = Identity::generate();
    assert_eq!(again.call(&again.login_request(&bob_id, "bob", "wrong password")).await, Response::Refused(Refusal::InvalidCredentials));

    // The real user is not locked out: key-based sign-in works during the lockout ...
    let alice = authenticated(&node, &alice_id, "alice").await;
    alice.publish(fresh(&alice_id, "alice", 1)).await.unwrap();
    // ... and so does her password from the address she registered from.
    assert!(!alice.login(&alice_id, &name("alice"), PASSWORD).await.unwrap());
    // The flood changed nothing: alice's key is still hers.
    assert_eq!(alice.lookup(&name("alice")).await.unwrap().identity_key, alice_id.public());
    node.assert_serving().await;
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// Protocol state

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_sign_in_are_refused() {
    let node = start().await;
    let (_alice, alice_id) = registered(&node, "alice").await;

    // Nothing but Hello before Hello.
    let raw = Raw::connect(&node, LOCALHOST).await;
    assert_eq!(raw.call(&Request::Lookup { username: name("alice") }).await, Response::Refused(Refusal::NeedHello));
    assert_eq!(raw.call(&Request::ListOnline).await, Response::Refused(Refusal::NeedHello));

    // After Hello, but before signing in.
    let client = RendezvousClient::connect(&node.address).await.unwrap();
    assert_eq!(refused(client.publish(fresh(&alice_id, "alice", 1)).await), Refusal::NotAuthenticated);
    assert_eq!(refused(client.lookup(&name("alice")).await), Refusal::NotAuthenticated);
    assert_eq!(refused(client.online().await), Refusal::NotAuthenticated);
    assert_eq!(refused(client.withdraw().await), Refusal::NotAuthenticated);
    // The unauthenticated publish did not put alice online.
    assert!(online(&_alice).await.is_empty());

    // The same connection works once signed in.
    client.authenticate(&alice_id, &name("alice")).await.unwrap();
    client.publish(fresh(&alice_id, "alice", 1)).await.unwrap();
    assert_eq!(online(&client).await, vec![name("alice")]);
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_request_variant_is_unknown_request() {
    let node = start().await;
    let (_alice, alice_id) = registered(&node, "alice").await;
    let raw = Raw::hello(&node, LOCALHOST).await;
    // Variant 200 (postcard varint C8 01), from some future client.
    assert_eq!(raw.send_payload(&[1, 0xC8, 0x01]).await, Response::Refused(Refusal::UnknownRequest));
    // With a body the node cannot know the shape of.
    assert_eq!(raw.send_payload(&[1, 0xC8, 0x01, 9, 9, 9]).await, Response::Refused(Refusal::UnknownRequest));
    // The connection goes on: sign in and list.
    let req = raw.authenticate_request(&alice_id, "alice", &raw.binding);
    assert_eq!(raw.call(&req).await, Response::Authenticated);
    assert_eq!(raw.send_payload(&[1, 0xC8, 0x01]).await, Response::Refused(Refusal::UnknownRequest));
    assert_eq!(raw.call(&Request::ListOnline).await, Response::Online { usernames: vec![], truncated: false });
    node.assert_serving().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_for_another_connection_is_bad_proof() {
    let node = start().await;
    let (_alice, alice_id) = registered(&node, "alice").await;
    let a = Raw::hello(&node, LOCALHOST).await;
    let b = Raw::hello(&node, LOCALHOST).await;
    assert_ne!(a.binding, b.binding);

    // A proof made on connection A, relayed to connection B.
    let for_a = a.authenticate_request(&alice_id, "alice", &a.binding);
    assert_eq!(b.call(&for_a).await, Response::Refused(Refusal::BadProof));
    // B's challenge with A's TLS channel, and A's challenge with B's channel.
    let mixed = a.authenticate_request(&alice_id, "alice", &Binding { challenge: b.binding.challenge, channel: a.binding.channel });
    assert_eq!(b.call(&mixed).await, Response::Refused(Refusal::BadProof));
    let mixed = a.authenticate_request(&alice_id, "alice", &Binding { challenge: a.binding.challenge, channel: b.binding.channel });
    assert_eq!(b.call(&mixed).await, Response::Refused(Refusal::BadProof));
    // A proof over B's binding but for another purpose (Login).
    let login_proof = auth::prove(alice_id.secret(), Purpose::Login, &b.binding, &name("alice"));
    let wrong_purpose = Request::Authenticate { username: name("alice"), identity_key: alice_id.public(), proof: login_proof };
    assert_eq!(b.call(&wrong_purpose).await, Response::Refused(Refusal::BadProof));
    // B was not signed in by any of them.
    assert_eq!(b.call(&Request::ListOnline).await, Response::Refused(Refusal::NotAuthenticated));

    // Through the client: a proof over a made-up binding.
    let client = RendezvousClient::connect(&node.address).await.unwrap();
    let made_up = Binding { challenge: [0x11; 32], channel: [0x22; 32] };
    let proof = auth::prove(alice_id.secret(), Purpose::Authenticate, &made_up, &name("alice"));
    let answer = client.raw_call(&Request::Authenticate { username: name("alice"), identity_key: alice_id.public(), proof }).await;
    assert_eq!(refused(answer), Refusal::BadProof);
    assert_eq!(refused(client.online().await), Refusal::NotAuthenticated);

    // The proof is good where it was made, and B's own proof works on B.
    assert_eq!(a.call(&for_a).await, Response::Authenticated);
    let for_b = b.authenticate_request(&alice_id, "alice", &b.binding);
    assert_eq!(b.call(&for_b).await, Response::Authenticated);
    node.assert_serving().await;
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// Regressions: each test below failed before its fix (sled flush lock-up, list size,
// a publish racing the connection's close).

#[test]
fn concurrent_account_writes_all_complete() {
    // A lock-up leaves threads stuck for good, so the writes run in a child process
    // (this same test, marked by the variable) that is killed if it hangs.
    const CHILD: &str = "SOTTO_TEST_ACCOUNT_WRITES_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            // The node's own account store, written as 32 simultaneous registrations
            // would write it (`Accounts::create` is "durable when it returns").
            let dir = tempfile::tempdir().unwrap();
            let accounts = Accounts::open(&dir.path().join("accounts")).unwrap();
            let id = Identity::generate();
            for wave in 0..3 {
                let tasks: Vec<_> = (0..32)
                    .map(|i| {
                        let accounts = accounts.clone();
                        let account = Account {
                            version: ACCOUNT_VERSION,
                            password_phc: "$argon2id$x".into(),
                            identity_key: id.public(),
                            noise: id.binding(),
                            created_at: 1,
                            key_set_at: 1,
                        };
                        tokio::spawn(async move { accounts.create(&name(&format!("user{wave}-{i:02}")), &account).await.unwrap() })
                    })
                    .collect();
                for task in tasks {
                    assert!(task.await.unwrap(), "every name is new");
                }
            }
            println!("ALL-WRITTEN");
        });
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "concurrent_account_writes_all_complete", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(
        out.contains("ALL-WRITTEN"),
        "3 waves of 32 simultaneous account creations did not complete within 30 s: the account store locked up"
    );
}

#[test]
fn the_longest_online_list_fits_in_one_frame() {
    // 500 names of 32 characters: what the node sends for `ListOnline` when that many
    // such users are online (src/rendezvous/node.rs caps the list only by count), and
    // what a client may put in `Watch`. A client reads at most MAX_FRAME bytes.
    let longest: Vec<Username> = (0..MAX_ONLINE_LIST).map(|i| name(&format!("{i:0>32}"))).collect();
    let messages = [
        ("Online answer", encode_message(&Response::Online { usernames: longest.clone(), truncated: true })),
        ("Watching answer", encode_message(&Response::Watching { online: longest.clone() })),
        ("Watch request", encode_message(&Request::Watch { usernames: longest })),
    ];
    for (what, payload) in messages {
        assert!(
            payload.len() <= MAX_FRAME,
            "a {what} naming {MAX_ONLINE_LIST} users of 32 characters is {} bytes; frames carry at most {MAX_FRAME}",
            payload.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_published_as_the_connection_closes_does_not_linger() {
    // The node runs on this runtime's two workers; the publisher runs on its own
    // runtime. While both workers are held, the publisher sends a Publish and then
    // closes its connection, so the node reads the request and the close in one go:
    // the request's stream is still handled after the connection is gone.
    let node = start().await;
    let (observer, _) = registered(&node, "observer").await;
    let (client, alice) = registered(&node, "alice").await;
    client.close().await;
    let alice = Arc::new(alice);
    let publisher = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (pin, to) = (node.address.cert_sha256, node.local);
    for round in 1..=3u64 {
        let id = alice.clone();
        let raw = publisher
            .spawn(async move {
                let endpoint = quinn::Endpoint::client(SocketAddr::from((LOCALHOST, 0))).unwrap();
                let raw = Raw::open(endpoint, pin, to).await.say_hello().await;
                assert_eq!(raw.call(&raw.authenticate_request(&id, "alice", &raw.binding)).await, Response::Authenticated);
                raw
            })
            .await
            .unwrap();

        // Hold both of the node's workers.
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let holds: Vec<_> = (0..2)
            .map(|_| {
                let held = held.clone();
                tokio::spawn(async move {
                    held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let since = Instant::now();
                    while held.load(std::sync::atomic::Ordering::SeqCst) < 2 && since.elapsed() < Duration::from_secs(2) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    std::thread::sleep(Duration::from_millis(300));
                })
            })
            .collect();
        let since = Instant::now();
        while held.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(since.elapsed() < Duration::from_secs(2), "could not hold both node workers");
            std::thread::sleep(Duration::from_millis(1));
        }
        let id = alice.clone();
        publisher
            .spawn(async move {
                let (mut send, _recv) = raw.conn.open_bi().await.unwrap();
                send.write_all(&encode_frame(&encode_message(&Request::Publish(fresh(&id, "alice", round))))).await.unwrap();
                send.finish().unwrap();
                // Let the request leave, then close without waiting for the answer.
                tokio::time::sleep(Duration::from_millis(30)).await;
                raw.conn.close(0u32.into(), b"bye");
                tokio::time::sleep(Duration::from_millis(30)).await;
            })
            .await
            .unwrap();
        for hold in holds {
            hold.await.unwrap();
        }

        tokio::time::sleep(Duration::from_millis(500)).await;
        if online(&observer).await.is_empty() {
            continue;
        }
        // Generous time for slow close handling before calling the record a ghost.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let ghosts = online(&observer).await;
        assert!(
            ghosts.is_empty(),
            "round {round}: {ghosts:?} still online 3.5 s after the connection closed; the record stays until it expires"
        );
    }
    publisher.shutdown_background();
    node.stop().await;
}
