//! Attacks on a running peer over real QUIC on 127.0.0.1: forged dialers, replayed
//! initiations, tampered frames. The peer must refuse each and keep serving.

mod common;

use std::time::Duration;

use sotto::clock::unix_now_ns;
use sotto::keys::Identity;
use sotto::peer::agent::AgentEvent;
use sotto::peer::session::{Dial, ALPN, MAX_HANDSHAKE_MESSAGE};
use sotto::tls;
use sotto::username::Username;
use sotto::wire::{encode_frame, frame_len, HEADER_LEN};

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

type World = common::PeerWorld;

/// A node; alice and bob registered; bob online; alice has sent bob one message, so
/// bob has pinned her key.
async fn world() -> World {
    common::peer_world([127, 0, 0, 1].into()).await
}

/// Dials bob over QUIC with his pinned certificate and sends `frames` on one stream;
/// returns bob's first frame back, if any arrives.
async fn raw_dial(w: &World, frames: &[Vec<u8>]) -> Option<Vec<u8>> {
    let (config, _) = tls::client_config(w.bob_cert, ALPN).unwrap();
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(w.bob_addr, "sotto-peer").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    for f in frames {
        send.write_all(&encode_frame(f)).await.unwrap();
    }
    let answer = async {
        let mut header = [0u8; HEADER_LEN];
        recv.read_exact(&mut header).await.ok()?;
        let mut body = vec![0u8; frame_len(header, MAX_HANDSHAKE_MESSAGE).ok()?];
        recv.read_exact(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(5), answer).await.ok().flatten()
}

use common::{raw_session, read_frame, RawSession};

#[tokio::test]
async fn an_unvouched_dialer_claiming_a_contact_raises_no_key_change() {
    let w = world().await;
    let mut events = w.bob_agent.subscribe();
    let mallory = Identity::generate();
    let (_, preamble, msg1) = Dial::start(&mallory, &name("alice"), &name("bob"), &w.bob_noise, unix_now_ns()).unwrap();
    // Answered like any dialer bob has not pinned under the key it presents (so the
    // answer shows nobody whether "alice" is a contact of his), then closed unread.
    assert!(raw_dial(&w, &[preamble, msg1]).await.is_some(), "bob answers as he answers a first contact");
    let contact = w.bob_agent.store().contact(&name("alice")).unwrap().unwrap();
    assert_eq!(contact.identity_key, w.alice.public(), "alice's pinned key is untouched");
    assert_eq!(contact.changed_key, None, "no key change recorded for a claim the node does not back");
    while let Ok(event) = events.try_recv() {
        assert!(!matches!(event, AgentEvent::KeyChanged { .. }), "no warning raised");
    }
    // The real alice still gets through.
    w.alice_agent.send(&name("bob"), "still me").await.unwrap();
}

#[tokio::test]
async fn a_presence_record_older_than_one_seen_is_refused_and_changes_nothing() {
    use sotto::peer::agent::SendError;
    let w = world().await;
    let bob = name("bob");
    let store = w.alice_agent.store();
    let seen = store.contact(&bob).unwrap().expect("alice pinned bob").highest_seq;
    assert!(seen > 0, "the first message recorded bob's record");
    // As if alice had since seen a newer record of bob's than the node now serves: the
    // node's answer is a replay.
    let pinned = store
        .update_contact(&bob, &mut |c| c.map(|c| sotto::store::Contact { highest_seq: seen + 1_000, last_seen: 1, ..c }))
        .unwrap()
        .unwrap();
    w.alice_agent.disconnect(&bob);
    let body = "sent against a replayed record";
    let refused = w.alice_agent.send(&bob, body).await;
    assert!(matches!(&refused, Err(SendError::Untrusted { reason, .. }) if reason.contains("older presence record")), "{refused:?}");
    assert_eq!(store.contact(&bob).unwrap().unwrap(), pinned, "the replayed record changed the contact");
    let kept = store.last(Some(&bob), 10).unwrap();
    assert_eq!(kept.iter().filter(|m| m.body == body).map(|m| m.state).collect::<Vec<_>>(), [sotto::store::State::Failed]);
    let at_bob = w.bob_agent.store().last(Some(&name("alice")), 10).unwrap();
    assert!(!at_bob.iter().any(|m| m.body == body), "the message went out");
}

#[tokio::test]
async fn a_replayed_initiation_gets_no_answer() {
    let w = world().await;
    let (_, preamble, msg1) = Dial::start(&w.alice, &name("alice"), &name("bob"), &w.bob_noise, unix_now_ns()).unwrap();
    assert!(raw_dial(&w, &[preamble.clone(), msg1.clone()]).await.is_some(), "the first initiation is answered");
    assert!(raw_dial(&w, &[preamble, msg1]).await.is_none(), "the same bytes again are refused");
    w.alice_agent.send(&name("bob"), "fresh sessions still work").await.unwrap();
    let _ = &w.server;
}

#[tokio::test]
async fn a_tampered_frame_closes_only_that_session() {
    let w = world().await;
    let RawSession { _endpoint, conn, mut send, recv: _recv, mut transport } = raw_session(&w).await;
    let mut sealed = transport.seal(&sotto::peer::session::PeerMessage::Chat { id: [9; 16], sent_at: 1, body: "x".into() }).unwrap();
    sealed[0] ^= 0x80;
    send.write_all(&encode_frame(&sealed)).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(closed.is_ok(), "bob closes a session whose frame fails to decrypt");
    assert!(w.bob_agent.store().last(None, 10).unwrap().iter().all(|m| m.id != [9; 16]), "nothing from the tampered frame is stored");
    w.alice_agent.send(&name("bob"), "after the tampering").await.unwrap();
}

#[tokio::test]
async fn a_resent_message_is_acked_each_time_and_stored_once() {
    let w = world().await;
    let RawSession { _endpoint, conn: _conn, mut send, mut recv, mut transport } = raw_session(&w).await;
    let chat = sotto::peer::session::PeerMessage::Chat { id: [5; 16], sent_at: 1, body: "only once".into() };
    for _ in 0..2 {
        send.write_all(&encode_frame(&transport.seal(&chat).unwrap())).await.unwrap();
        let body = read_frame(&mut recv, sotto::peer::session::MAX_NOISE_MESSAGE).await;
        assert_eq!(transport.open(&body).unwrap(), sotto::peer::session::PeerMessage::Ack { id: [5; 16] });
    }
    let stored: Vec<_> = w.bob_agent.store().last(Some(&name("alice")), 10).unwrap().into_iter().filter(|m| m.id == [5; 16]).collect();
    assert_eq!(stored.len(), 1, "a resend is stored once");
}

#[tokio::test]
async fn an_unvouched_first_contact_dialer_is_never_read_and_leaves_nothing() {
    use sotto::peer::session::PeerMessage;
    let w = world().await;
    common::register(&w.server, None, &Identity::generate(), "carol").await;
    let mut events = w.bob_agent.subscribe();
    let mallory = Identity::generate();
    let before = w.bob_agent.store().contact(&name("alice")).unwrap();
    // "alice" is bob's contact, "carol" an account bob has not pinned, "nobody" no
    // account at all: mallory's key is none of theirs, and each claim goes the same way.
    let claims = ["alice", "carol", "nobody"];
    for claim in claims {
        let (dial, preamble, msg1) = Dial::start(&mallory, &name(claim), &name("bob"), &w.bob_noise, unix_now_ns()).unwrap();
        let (config, _) = tls::client_config(w.bob_cert, ALPN).unwrap();
        let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
        endpoint.set_default_client_config(config);
        let conn = endpoint.connect(w.bob_addr, "sotto-peer").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&encode_frame(&preamble)).await.unwrap();
        send.write_all(&encode_frame(&msg1)).await.unwrap();
        // Message 2 goes out while bob checks the claim with the node; the check decides
        // whether anything the dialer sends is ever read.
        let msg2 = read_frame(&mut recv, MAX_HANDSHAKE_MESSAGE).await;
        let mut transport = dial.finish(&msg2).unwrap();
        // Whatever bob sends back from now on (an ack would come before his close).
        let answers = tokio::spawn(async move {
            let mut frames = 0;
            let mut header = [0u8; HEADER_LEN];
            while recv.read_exact(&mut header).await.is_ok() {
                frames += 1;
            }
            frames
        });
        let chat = PeerMessage::Chat { id: [7; 16], sent_at: 1, body: "from mallory".into() };
        let _ = send.write_all(&encode_frame(&transport.seal(&chat).unwrap())).await;
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        assert!(closed.is_ok(), "bob closes the connection of a dialer claiming {claim}");
        assert_eq!(answers.await.unwrap(), 0, "bob answered the claim to be {claim} after message 2");
    }
    assert_eq!(w.bob_agent.store().contact(&name("alice")).unwrap(), before, "alice's contact is untouched");
    for claim in ["carol", "nobody"] {
        assert_eq!(w.bob_agent.store().contact(&name(claim)).unwrap(), None, "nothing pinned for {claim}");
    }
    assert!(w.bob_agent.store().last(None, 100).unwrap().iter().all(|m| m.id != [7; 16]), "nothing mallory sent is stored");
    while let Ok(event) = events.try_recv() {
        let peer = match &event {
            AgentEvent::Received(m) => &m.peer,
            AgentEvent::Delivered { peer, .. }
            | AgentEvent::KeyChanged { peer, .. }
            | AgentEvent::SessionOpened { peer, .. }
            | AgentEvent::SessionClosed { peer }
            | AgentEvent::Presence { peer, .. } => peer,
        };
        assert!(!claims.contains(&peer.as_str()), "bob reported {event:?}");
    }
    w.alice_agent.send(&name("bob"), "still answered").await.unwrap();
}

/// A presence record for `user` (registered with `id`) whose one address is a bare UDP
/// socket of the test's: anything a dialer sends there shows up on it.
async fn listening_post(w: &World, id: &std::sync::Arc<Identity>, user: &str) -> (std::net::UdpSocket, tokio::sync::watch::Sender<bool>) {
    common::register(&w.server, None, id, user).await;
    let post = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    post.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let online = common::go_online(&w.server, id, user, post.local_addr().unwrap(), [3; 32]);
    common::wait_until_visible(&w.alice_agent, user).await;
    (post, online)
}

fn heard(post: &std::net::UdpSocket) -> bool {
    let mut buf = [0u8; 2048];
    post.recv(&mut buf).is_ok()
}

#[tokio::test]
async fn a_changed_key_or_a_replayed_record_is_refused_before_any_packet_leaves() {
    use sotto::peer::agent::SendError;
    use sotto::store::Contact;
    let w = world().await;
    let dave = std::sync::Arc::new(Identity::generate());
    let (post, _online) = listening_post(&w, &dave, "dave").await;
    let store = w.alice_agent.store().clone();
    let pin = |key: &Identity, highest_seq: u64| {
        let contact = Contact {
            username: name("dave"),
            identity_key: key.public(),
            noise: key.binding(),
            verified: false,
            first_seen: 1,
            last_seen: 1,
            highest_seq,
            last_handshake: 0,
            changed_key: None,
        };
        store.update_contact(&name("dave"), &mut |_| Some(contact.clone())).unwrap();
    };
    // Pinned under another key: refused as a key change, and nothing reaches the address.
    pin(&Identity::generate(), 0);
    let refused = w.alice_agent.send(&name("dave"), "to a changed key").await;
    assert!(matches!(refused, Err(SendError::KeyChanged { .. })), "{refused:?}");
    assert!(!heard(&post), "a packet went to the address of a record signed by a changed key");
    // The right key, but a newer record seen than the node serves: refused as replayed.
    pin(&dave, u64::MAX);
    let refused = w.alice_agent.send(&name("dave"), "against a replayed record").await;
    assert!(matches!(&refused, Err(SendError::Untrusted { reason, .. }) if reason.contains("older presence record")), "{refused:?}");
    assert!(!heard(&post), "a packet went to the address of a replayed record");
    // The same record, trusted: the dial does go out (the post hears it).
    pin(&dave, 0);
    let agent = w.alice_agent.clone();
    let sending = tokio::spawn(async move { agent.send(&name("dave"), "trusted").await });
    let heard_it = tokio::task::spawn_blocking(move || heard(&post)).await.unwrap();
    sending.abort();
    assert!(heard_it, "a trusted record's address hears the dial");
}
