//! `cargo bench`: sotto beside the raw stack it is built on, measured in the same run.
//!
//! Prints one JSON object per figure (`name`, `value`, `unit`, `baseline`, `ratio`, and
//! the target from docs/PERFORMANCE.md). Arguments: `--smoke` for a quick pass that only
//! proves every figure still runs (CI), and figure names (substrings) to run only those.
//! The rendezvous node figures (1,000 and 10,000 peers, registration floods) are in the
//! load tool, `sotto-load`.

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "common/report.rs"]
mod report;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::PeerWorld;
use report::{cpu_time, merge, selected, spread, Better, Figure, Samples, Scale};
use serde_json::json;
use sotto::clock::{unix_now_ms, unix_now_ns};
use sotto::keys::Identity;
use sotto::peer::session::{Answer, Dial, PeerMessage, Transport, MAX_BODY, MAX_NOISE_MESSAGE, NOISE_PARAMS};
use sotto::quic::{self, read_frame, write_frame, FrameReader};
use sotto::rendezvous::client::RendezvousClient;
use sotto::store::{Direction, SledStore, State, Store, StoredMessage};
use sotto::tls::{self, CertKey};
use sotto::username::Username;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

fn main() {
    let scale = Scale::from_args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    eprintln!("sotto bench ({scale:?}): one JSON object per figure on stdout");
    if selected("round_trip") || selected("sustained") || selected("first_message") {
        rt.block_on(async {
            // The first-message figure makes a few hundred lookups from 127.0.0.1 in a
            // few seconds; the node's per-address limit is sized for people, so it is off
            // here, as in `sotto-load`.
            let w = common::peer_world_with([127, 0, 0, 1].into(), |c| c.lookup_rate = None).await;
            if selected("round_trip") {
                round_trip(&w, scale).await;
            }
            if selected("sustained") {
                sustained(&w, scale).await;
            }
            if selected("first_message") {
                first_message(&w, scale).await;
            }
            w.alice_agent.shutdown().await;
            w.bob_agent.shutdown().await;
        });
    }
    if selected("bulk") {
        rt.block_on(bulk(scale));
    }
    if selected("send_process") {
        send_process(scale);
    }
    if selected("history") {
        history(scale);
    }
}

/// A raw QUIC server with sotto's TLS and socket settings (as its peers' endpoints
/// have); `serve` runs per connection.
async fn raw_server<F, Fut>(serve: F) -> (quinn::Endpoint, SocketAddr, [u8; 32])
where
    F: Fn(quinn::Connection) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let cert = CertKey::generate("bench").unwrap();
    let config = tls::server_config(&cert, b"bench", 16).unwrap();
    let endpoint = quic::peer_endpoint(([127, 0, 0, 1], 0).into(), Some(config)).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let serving = endpoint.clone();
    tokio::spawn(async move {
        let serve = Arc::new(serve);
        while let Some(incoming) = serving.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    serve(conn).await;
                }
            });
        }
    });
    (endpoint, addr, cert.sha256())
}

async fn raw_connect(addr: SocketAddr, pin: [u8; 32]) -> quinn::Connection {
    let (config, _) = tls::client_config(pin, b"bench").unwrap();
    let mut endpoint = quic::peer_endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
    endpoint.set_default_client_config(config);
    endpoint.connect(addr, "bench").unwrap().await.unwrap()
}

/// Figure 1: one 100-byte message, send → durable on the receiver → ack, on an open
/// session; baseline: a raw QUIC stream ping-pong of 100 bytes with one sled insert and
/// flush on the answering side.
async fn round_trip(w: &PeerWorld, scale: Scale) {
    let (reps, per_rep) = scale.pick((5, 400), (2, 20));
    let db_dir = tempfile::tempdir().unwrap();
    let db = sled::open(db_dir.path()).unwrap();
    let (_server, addr, pin) = raw_server(move |conn| {
        let db = db.clone();
        async move {
            let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
            let mut buf = [0u8; 100];
            let mut n = 0u64;
            while recv.read_exact(&mut buf).await.is_ok() {
                n += 1;
                db.insert(n.to_be_bytes(), &buf[..]).unwrap();
                db.flush().unwrap();
                if send.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
    let conn = raw_connect(addr, pin).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let body = "x".repeat(100);
    let bob = name("bob");
    let (mut sotto_all, mut raw_all, mut sotto_p50s, mut raw_p50s) = (Samples::new(), Samples::new(), Samples::new(), Samples::new());
    // Warm-up, then repetitions.
    for _ in 0..per_rep / 4 {
        w.alice_agent.send(&bob, &body).await.unwrap();
    }
    let mut buf = [0u8; 100];
    send.write_all(&buf).await.unwrap();
    recv.read_exact(&mut buf).await.unwrap();
    for _ in 0..reps {
        // One of each in turn, so both see the same moment of a noisy machine.
        let (mut s, mut r) = (Samples::new(), Samples::new());
        for _ in 0..per_rep {
            let t = Instant::now();
            w.alice_agent.send(&bob, &body).await.unwrap();
            s.push_duration_us(t.elapsed());
            let t = Instant::now();
            send.write_all(&buf).await.unwrap();
            recv.read_exact(&mut buf).await.unwrap();
            r.push_duration_us(t.elapsed());
        }
        sotto_p50s.push(s.median());
        raw_p50s.push(r.median());
        sotto_all.extend(&s);
        raw_all.extend(&r);
    }
    let extra = merge(spread(&sotto_p50s), json!({ "samples": sotto_all.len(), "baseline_p99": raw_all.percentile(99.0) }));
    Figure {
        name: "round_trip_100b_p50",
        value: sotto_all.median(),
        unit: "us",
        baseline: Some(raw_all.median()),
        target: Some("<= 1.3"),
        better: Better::Lower,
        extra,
    }
    .emit();
    Figure {
        name: "round_trip_100b_p99",
        value: sotto_all.percentile(99.0),
        unit: "us",
        baseline: Some(raw_all.percentile(99.0)),
        target: None,
        better: Better::Lower,
        extra: json!({ "samples": sotto_all.len() }),
    }
    .emit();
}

/// Figure 2: many 100-byte messages in flight on one session, each acked only once
/// durable on the receiver and reported only once durable on the sender; baseline:
/// raw sled inserts without flush, for the same time.
async fn sustained(w: &PeerWorld, scale: Scale) {
    let (reps, secs, senders) = scale.pick((3, 3.0, 256), (1, 0.3, 16));
    let bob = name("bob");
    let body = "y".repeat(100);
    let (mut rates, mut raw_rates) = (Samples::new(), Samples::new());
    let flushes_before = w.bob_agent.store().durability().borrow().flushes;
    let (mut total, mut cpu, mut raw_cpu, mut raw_total) = (0u64, Duration::ZERO, Duration::ZERO, 0f64);
    for _ in 0..reps {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (start, cpu_start) = (Instant::now(), cpu_time());
        let tasks: Vec<_> = (0..senders)
            .map(|_| {
                let (alice, bob, body, done, stop) = (w.alice_agent.clone(), bob.clone(), body.clone(), done.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        alice.send(&bob, &body).await.unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let counted = done.load(Ordering::Relaxed);
        let elapsed = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        total += done.load(Ordering::Relaxed);
        cpu += cpu_time() - cpu_start;
        rates.push(counted as f64 / elapsed);
        let raw_cpu_start = cpu_time();
        let raw_rate = tokio::task::spawn_blocking(move || raw_sled_inserts(secs)).await.unwrap();
        raw_cpu += cpu_time() - raw_cpu_start;
        raw_total += raw_rate * secs;
        raw_rates.push(raw_rate);
    }
    let flushes = w.bob_agent.store().durability().borrow().flushes - flushes_before;
    let extra = merge(
        spread(&rates),
        json!({
            "senders": senders,
            "messages": total,
            "receiver_flushes": flushes,
            "messages_per_flush": total as f64 / flushes.max(1) as f64,
            // CPU time per message (both agents, both stores, every thread) and per raw
            // insert: what each costs whatever else shares the machine.
            "cpu_us_per_message": cpu.as_secs_f64() * 1e6 / total.max(1) as f64,
            "baseline_cpu_us_per_insert": raw_cpu.as_secs_f64() * 1e6 / raw_total.max(1.0),
        }),
    );
    Figure {
        name: "sustained_small_messages",
        value: rates.median(),
        unit: "msg/s",
        baseline: Some(raw_rates.median()),
        target: Some(">= 0.25"),
        better: Better::Higher,
        extra,
    }
    .emit();
}

/// Raw sled: 100-byte values under 16-byte keys, no flush, for `secs`.
fn raw_sled_inserts(secs: f64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).mode(sled::Mode::HighThroughput).open().unwrap();
    let tree = db.open_tree("raw").unwrap();
    let value = [7u8; 100];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..256 {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&n.to_be_bytes());
            tree.insert(key, &value[..]).unwrap();
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// A Noise session pair made in memory with sotto's own handshake.
fn session_pair() -> (Transport, Transport) {
    let (a, b) = (Identity::generate(), Identity::generate());
    let (dial, preamble, msg1) = Dial::start(&a, &name("alice"), &name("bob"), &b.noise().public(), unix_now_ns()).unwrap();
    let answer = Answer::read(&b, &name("bob"), &preamble, &msg1).unwrap();
    let (responder, msg2) = answer.accept(&a.public(), None, unix_now_ns()).unwrap();
    (dial.finish(&msg2).unwrap(), responder)
}

/// Figure 3: bulk bytes through a session: the largest chat messages sotto sends (one
/// 64 KiB Noise frame each), sealed, framed and opened; baseline: a raw QUIC stream
/// carrying the same bytes.
async fn bulk(scale: Scale) {
    let (reps, megabytes) = scale.pick((6, 160usize), (1, 8));
    let frames = megabytes * 1_000_000 / MAX_BODY;
    let bytes = (frames * MAX_BODY) as f64;
    let (mut sotto_rates, mut raw_rates) = (Samples::new(), Samples::new());
    // CPU of the whole process (both sides, every thread) per byte carried: steadier
    // than the rates on a shared machine, and what the rates' ratio follows while the
    // cores are busy.
    let (mut sotto_cpu, mut raw_cpu) = (Samples::new(), Samples::new());
    for rep in 0..reps {
        // Each goes first in every other repetition, so neither is always the one that
        // follows the other's wake.
        for sotto in [rep % 2 == 0, rep % 2 == 1] {
            let (elapsed, cpu_used) = if sotto { bulk_sotto(frames).await } else { bulk_raw(frames * MAX_BODY).await };
            let (rates, cpu) = if sotto { (&mut sotto_rates, &mut sotto_cpu) } else { (&mut raw_rates, &mut raw_cpu) };
            rates.push(bytes / elapsed.as_secs_f64() / 1e6);
            cpu.push(cpu_used.as_nanos() as f64 / bytes);
        }
    }
    Figure {
        name: "bulk_session_bytes",
        value: sotto_rates.median(),
        unit: "MB/s",
        baseline: Some(raw_rates.median()),
        target: Some(">= 0.75"),
        better: Better::Higher,
        extra: merge(
            spread(&sotto_rates),
            json!({
                "megabytes": megabytes,
                "frame_body": MAX_BODY,
                "cpu_ns_per_byte": sotto_cpu.median(),
                "baseline_cpu_ns_per_byte": raw_cpu.median(),
            }),
        ),
    }
    .emit();
}

/// Carries `frames` chat messages of [`MAX_BODY`] bytes through a session: seal →
/// frame → QUIC → frame → open. Returns the time and the process's CPU time from the
/// first seal until the receiver has opened every one.
async fn bulk_sotto(frames: usize) -> (Duration, Duration) {
    let (mut sender, receiver) = session_pair();
    let receiver = std::sync::Mutex::new(Some(receiver));
    let (_server, addr, pin) = raw_server(move |conn| {
        let transport = receiver.lock().unwrap().take();
        async move {
            let Some(mut transport) = transport else { return };
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let (mut reader, mut frames, mut plain) = (FrameReader::new(MAX_NOISE_MESSAGE), Vec::new(), Vec::new());
            while let Ok(true) = reader.read(&mut recv, &mut frames).await {
                for frame in frames.drain(..) {
                    let PeerMessage::Chat { body, .. } = transport.open_frame(frame, &mut plain).unwrap() else { panic!("not a chat") };
                    assert_eq!(body.len(), MAX_BODY);
                }
            }
            let _ = send.finish();
        }
    })
    .await;
    let conn = raw_connect(addr, pin).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let body = "z".repeat(MAX_BODY);
    let (start, cpu_start) = (Instant::now(), cpu_time());
    for i in 0..frames {
        let mut out = Vec::with_capacity(MAX_NOISE_MESSAGE + 4);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_be_bytes());
        // As a session sends a chat message: encoded from the stored body straight into
        // the write buffer, and sealed there.
        sender.seal_chat(&id, unix_now_ms(), &body, &mut out).unwrap();
        // Handed to the stream without a copy, as a session does.
        send.write_chunk(out.into()).await.unwrap();
    }
    send.finish().unwrap();
    // The receiver has read everything once the stream is acknowledged as finished.
    let _ = recv.read_to_end(16).await;
    let used = (start.elapsed(), cpu_time() - cpu_start);
    conn.close(0u32.into(), b"done");
    used
}

/// The baseline: `bytes` through a raw QUIC stream in 64 KiB writes; the same
/// measures as [`bulk_sotto`].
async fn bulk_raw(bytes: usize) -> (Duration, Duration) {
    let (_server, addr, pin) = raw_server(|conn| async move {
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(Some(_)) = recv.read(&mut buf).await {}
        let _ = send.finish();
    })
    .await;
    let conn = raw_connect(addr, pin).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    let (start, cpu_start) = (Instant::now(), cpu_time());
    while left > 0 {
        let n = left.min(chunk.len());
        send.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    send.finish().unwrap();
    let _ = recv.read_to_end(16).await;
    let used = (start.elapsed(), cpu_time() - cpu_start);
    conn.close(0u32.into(), b"done");
    used
}

/// Figure 4: the first message to a peer never dialled before (lookup, QUIC, Noise IK,
/// ack): each round dials a stranger, an account that is online and has never been in
/// touch with alice, so the answering side looks alice up too; baseline: a raw QUIC
/// connect, a raw snow IK handshake and one lookup round trip. sotto's TLS settings
/// resume no session, so every raw connect is a full handshake, as a first contact's
/// is. Beside it, the same
/// message to bob, a known contact with no open session (both sides have the other
/// pinned, so only alice looks up), against the same baseline.
async fn first_message(w: &PeerWorld, scale: Scale) {
    let rounds = scale.pick(60, 3);
    let bob = name("bob");
    // The raw side: a QUIC server that answers one Noise IK handshake per connection.
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse().unwrap();
    let responder_keys = snow::Builder::new(params.clone()).generate_keypair().unwrap();
    let responder_private = responder_keys.private.clone();
    let p = params.clone();
    let (_server, addr, pin) = raw_server(move |conn| {
        let (p, key) = (p.clone(), responder_private.clone());
        async move {
            let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
            let mut hs = snow::Builder::new(p).local_private_key(&key).unwrap().build_responder().unwrap();
            let msg1 = read_frame(&mut recv, 1024).await.unwrap().unwrap();
            let mut buf = [0u8; 1024];
            hs.read_message(&msg1, &mut buf).unwrap();
            let n = hs.write_message(&[], &mut buf).unwrap();
            write_frame(&mut send, &buf[..n]).await.unwrap();
            let _ = send.finish();
            let _ = conn.closed().await;
        }
    })
    .await;
    let (config, _) = tls::client_config(pin, b"bench").unwrap();
    let endpoint = quic::peer_endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
    let initiator_keys = snow::Builder::new(params.clone()).generate_keypair().unwrap();
    let node = RendezvousClient::connect(&w.server).await.unwrap();
    node.authenticate(&w.alice, &name("alice")).await.unwrap();
    let (mut stranger, mut known, mut raw) = (Samples::new(), Samples::new(), Samples::new());
    for round in 0..rounds {
        let s = Stranger::new(w, round).await;
        // Each side starts after the same idle pause.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        w.alice_agent.send(&s.name, "first").await.unwrap();
        stranger.push_duration_us(t.elapsed());

        w.alice_agent.disconnect(&bob);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        w.alice_agent.send(&bob, "first").await.unwrap();
        known.push_duration_us(t.elapsed());

        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        node.lookup(&bob).await.unwrap();
        let conn = endpoint.connect_with(config.clone(), addr, "bench").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut hs = snow::Builder::new(params.clone())
            .local_private_key(&initiator_keys.private)
            .unwrap()
            .remote_public_key(&responder_keys.public)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = hs.write_message(&[], &mut buf).unwrap();
        write_frame(&mut send, &buf[..n]).await.unwrap();
        let msg2 = read_frame(&mut recv, 1024).await.unwrap().unwrap();
        hs.read_message(&msg2, &mut buf).unwrap();
        let _transport = hs.into_transport_mode().unwrap();
        raw.push_duration_us(t.elapsed());
        conn.close(0u32.into(), b"done");
        s.agent.shutdown().await;
    }
    for (name, samples, target) in [("first_message_ms", &stranger, Some("<= 1.5")), ("first_message_known_contact_ms", &known, None)] {
        Figure {
            name,
            value: samples.median() / 1000.0,
            unit: "ms",
            baseline: Some(raw.median() / 1000.0),
            target,
            better: Better::Lower,
            extra: json!({ "rounds": rounds, "min": samples.min() / 1000.0, "max": samples.max() / 1000.0 }),
        }
        .emit();
    }
}

/// An account that is online and has never been in touch with alice. It has sent bob
/// one message, so its store, its endpoint and its connection to the rendezvous node are
/// warm, as a running `sotto up`'s are; one lives at a time, as each peer is a process
/// of its own in use.
struct Stranger {
    name: Username,
    agent: sotto::peer::agent::Agent,
    /// Ends its presence when dropped.
    _online: tokio::sync::watch::Sender<bool>,
}

impl Stranger {
    async fn new(w: &PeerWorld, n: usize) -> Stranger {
        // The node takes 20 registrations an hour from one address: 16 from each of
        // 127.0.0.10, 127.0.0.11, ...
        let ip = std::net::Ipv4Addr::new(127, 0, 0, 10 + (n / 16) as u8);
        let endpoint = quinn::Endpoint::client((ip, 0).into()).unwrap();
        let user = format!("stranger{n}");
        let id = Arc::new(Identity::generate());
        common::register(&w.server, Some(&endpoint), &id, &user).await;
        let (agent, cert) = common::start_agent(w.dir.path(), &w.server, &id, &user, [127, 0, 0, 1].into());
        let online = common::go_online(&w.server, &id, &user, agent.local_addr().unwrap(), cert);
        agent.send(&name("bob"), "hello").await.unwrap();
        common::wait_until_visible(&w.alice_agent, &user).await;
        Stranger { name: name(&user), agent, _online: online }
    }
}

/// Figure 5: `sotto send` as a fresh process while `sotto up` holds the unlocked
/// identity; baseline: the same binary running `sotto --version`.
fn send_process(scale: Scale) {
    let rounds = scale.pick(20, 2);
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = common::node_and_users(root.path());
    let _bob_up = bob.up();
    let _alice_up = alice.up();
    let time = |args: &[&str]| {
        let t = Instant::now();
        let out = common::run(&mut alice.cmd(args));
        assert!(out.status.success(), "sotto {args:?}: {}", common::stderr(&out));
        t.elapsed()
    };
    time(&["send", "bob", "warm-up"]);
    let (mut send, mut noop) = (Samples::new(), Samples::new());
    for _ in 0..rounds {
        send.push(time(&["send", "bob", "hello from a fresh process"]).as_secs_f64() * 1e3);
        noop.push(time(&["--version"]).as_secs_f64() * 1e3);
    }
    Figure {
        name: "send_fresh_process_ms",
        value: send.median(),
        unit: "ms",
        baseline: Some(noop.median()),
        target: None,
        better: Better::Lower,
        extra: json!({ "rounds": rounds, "min": send.min(), "max": send.max() }),
    }
    .emit();
}

/// Figure 9: the last 50 messages with one peer out of 1M stored; baseline: a raw
/// reverse range scan of the same sled tree, without decoding.
/// Copies the files of a closed database directory (sled's files and the journal's).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

fn history(scale: Scale) {
    let (total, peers, lookups) = scale.pick((1_000_000u64, 100u64, 2000), (20_000, 20, 50));
    let dir = tempfile::tempdir().unwrap();
    let fill = Instant::now();
    {
        let store = SledStore::open(dir.path()).unwrap();
        for i in 0..total {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&i.to_be_bytes());
            let msg = StoredMessage {
                id,
                peer: name(&format!("peer{}", i % peers)),
                direction: if i % 2 == 0 { Direction::In } else { Direction::Out },
                body: format!("message number {i}, about as long as a line of chat usually is"),
                sent_at: 1_700_000_000_000 + i,
                stored_at: 1_700_000_000_000 + i,
                state: if i % 2 == 0 { State::Received } else { State::Delivered },
            };
            store.insert(&msg).unwrap();
        }
        store.flush().unwrap();
    }
    eprintln!("history: stored {total} messages in {:.1} s", fill.elapsed().as_secs_f64());
    // The raw scan reads a copy of the same database, open at the same time, so that the
    // two take turns, one lookup each, and see the same moments of a noisy machine (run
    // one after the other, each side's time jumped between two speeds on its own).
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let target = name("peer7");
    let (mut sotto, mut raw) = (Samples::new(), Samples::new());
    let store = SledStore::open(dir.path()).unwrap();
    let db = sled::open(copy.path()).unwrap();
    let tree = db.open_tree("chat").unwrap();
    let mut prefix = b"mpeer7".to_vec();
    prefix.push(0);
    let raw_scan = || tree.scan_prefix(&prefix).rev().take(50).collect::<Result<Vec<_>, _>>().unwrap();
    for _ in 0..lookups / 10 {
        store.last(Some(&target), 50).unwrap();
        raw_scan();
    }
    for _ in 0..lookups {
        let t = Instant::now();
        let got = store.last(Some(&target), 50).unwrap();
        sotto.push_duration_us(t.elapsed());
        assert_eq!(got.len(), 50);
        let t = Instant::now();
        let got = raw_scan();
        raw.push_duration_us(t.elapsed());
        assert_eq!(got.len(), 50);
    }
    drop((store, db));
    Figure {
        name: "history_last_50",
        value: sotto.median(),
        unit: "us",
        baseline: Some(raw.median()),
        target: Some("<= 2"),
        better: Better::Lower,
        extra: json!({ "stored": total, "peers": peers, "lookups": lookups, "p99": sotto.percentile(99.0), "baseline_p99": raw.percentile(99.0) }),
    }
    .emit();
}
