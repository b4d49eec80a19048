//! What becomes of a message whose sender stops waiting before delivery has an outcome:
//! it stays in history, as failed, and does not go out later behind the user's back.

mod common;

use std::time::Duration;

use sotto::store::State;
use sotto::username::Username;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_dropped_while_dialling_is_kept_as_failed_and_never_goes_out() {
    let w = common::peer_world([127, 0, 0, 1].into()).await;
    let bob = name("bob");
    // Bob now advertises an address where nothing answers: a dial there waits for its
    // timeout (seconds), so the send below is still dialling when it is dropped.
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent = black_hole.local_addr().unwrap();
    let _ = w.stop.send(true);
    let presence =
        sotto::online::Presence { server: w.server.clone(), username: bob.clone(), addrs: vec![silent], cert_sha256: w.bob_cert, ttl: 60 };
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let id = w.bob.clone();
    tokio::spawn(async move { sotto::online::stay_online(&id, &presence, stopped, |_| {}).await });
    let mut advertised = false;
    for _ in 0..100 {
        if w.alice_agent.lookup(&bob).await.is_ok_and(|v| v.presence.is_some_and(|p| p.addrs == [silent])) {
            advertised = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(advertised, "bob's new address never showed");
    w.alice_agent.disconnect(&bob);

    let body = "written while bob could not be reached";
    let dropped = tokio::time::timeout(Duration::from_millis(500), w.alice_agent.send(&bob, body)).await;
    assert!(dropped.is_err(), "the send was to be dropped while dialling, but ended: {dropped:?}");

    let store = w.alice_agent.store();
    store.flush().unwrap();
    let kept: Vec<_> = store.last(Some(&bob), 10).unwrap().into_iter().filter(|m| m.body == body).collect();
    assert_eq!(kept.len(), 1, "the message is in history once");
    assert_eq!(kept[0].state, State::Failed);

    // Bob comes back at his real address: the dropped message is not delivered behind
    // the user's back, and a new one is.
    let _ = _stop.send(true);
    let presence = sotto::online::Presence {
        server: w.server.clone(),
        username: bob.clone(),
        addrs: vec![w.bob_addr],
        cert_sha256: w.bob_cert,
        ttl: 60,
    };
    let (_back, stopped) = tokio::sync::watch::channel(false);
    let id = w.bob.clone();
    tokio::spawn(async move { sotto::online::stay_online(&id, &presence, stopped, |_| {}).await });
    let mut sent = None;
    for _ in 0..100 {
        match w.alice_agent.send(&bob, "and this one after").await {
            Ok(m) => {
                sent = Some(m);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(sent.is_some(), "bob never became reachable again");
    let at_bob: Vec<String> = w.bob_agent.store().last(Some(&name("alice")), 10).unwrap().into_iter().map(|m| m.body).collect();
    assert!(at_bob.iter().any(|b| b == "and this one after"), "{at_bob:?}");
    assert!(!at_bob.iter().any(|b| b == body), "the dropped message went out: {at_bob:?}");
    let mine = store.last(Some(&bob), 10).unwrap();
    assert_eq!(mine.iter().filter(|m| m.body == body).map(|m| m.state).collect::<Vec<_>>(), [State::Failed]);
}
