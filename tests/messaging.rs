//! Direct encrypted messages between real `sotto` processes on 127.0.0.1.

mod common;

use std::process::Stdio;

use common::*;
use serde_json::Value;

fn lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"))).collect()
}

#[test]
fn message_each_way_with_delivery_and_history() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let _bob_up = bob.up();

    let out = alice.ok(&["send", "bob", "hello bob"]);
    assert!(out.starts_with("delivered to bob"), "{out}");

    let bob_history = lines(&bob.ok(&["history", "--json"]));
    assert_eq!(bob_history.len(), 1);
    let m = &bob_history[0];
    assert_eq!(
        (m["peer"].as_str(), m["direction"].as_str(), m["body"].as_str(), m["state"].as_str()),
        (Some("alice"), Some("in"), Some("hello bob"), Some("received"))
    );
    assert!(m["sent_at"].as_str().unwrap().ends_with('Z') && m["sent_at"].as_str().unwrap().contains('T'), "RFC 3339: {m}");
    assert_eq!(m["id"].as_str().unwrap().len(), 32);

    let alice_history = lines(&alice.ok(&["history", "bob", "--json"]));
    assert_eq!(alice_history.len(), 1);
    assert_eq!((alice_history[0]["direction"].as_str(), alice_history[0]["state"].as_str()), (Some("out"), Some("delivered")));
    assert_eq!(alice_history[0]["id"], m["id"], "both sides keep the same message id");

    // The reply: alice goes online too, and bob's running node sends for him.
    let _alice_up = alice.up();
    let out = bob.ok(&["send", "alice", "hi alice"]);
    assert!(out.starts_with("delivered to alice"), "{out}");
    let alice_history = lines(&alice.ok(&["history", "bob", "--json"]));
    assert_eq!(alice_history.len(), 2);
    assert_eq!((alice_history[1]["direction"].as_str(), alice_history[1]["body"].as_str()), (Some("in"), Some("hi alice")));
    let bob_history = lines(&bob.ok(&["history", "alice", "--json"]));
    assert_eq!((bob_history[1]["direction"].as_str(), bob_history[1]["state"].as_str()), (Some("out"), Some("delivered")));

    // The message from stdin, through alice's running node, on the reused session.
    let mut send = alice.cmd(&["send", "bob"]);
    send.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = send.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"from stdin\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let last = lines(&bob.ok(&["history", "alice", "--limit", "1", "--json"]));
    assert_eq!(last.len(), 1, "--limit 1 gives one message");
    assert_eq!(last[0]["body"], "from stdin");
}

#[test]
fn running_node_prints_incoming_messages_as_json() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let mut up = bob.cmd(&["up", "--json"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut reader = std::io::BufReader::new(up.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let online: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(online["event"], "online");
    let _guard = Running(up);

    alice.ok(&["send", "bob", "json please"]);
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (event["event"].as_str(), event["peer"].as_str(), event["body"].as_str()),
        (Some("message"), Some("alice"), Some("json please"))
    );
}

#[test]
fn sending_to_an_offline_user_fails_cleanly_and_keeps_the_message() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, _bob) = node_and_users(root.path());
    let out = run(&mut alice.cmd(&["send", "bob", "are you there?"]));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("bob is not online"), "{}", stderr(&out));
    let history = lines(&alice.ok(&["history", "--json"]));
    assert_eq!(history.len(), 1);
    assert_eq!((history[0]["body"].as_str(), history[0]["state"].as_str()), (Some("are you there?"), Some("failed")));

    let out = run(&mut alice.cmd(&["send", "nobody", "hi"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = run(&mut alice.cmd(&["send", "bob", ""]));
    assert_eq!(out.status.code(), Some(2));
    let out = run(&mut alice.cmd(&["send", "bob", &"x".repeat(60_001)]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("60000"), "{}", stderr(&out));
}

#[test]
fn a_pinned_contact_whose_key_changed_is_refused_until_verified() {
    let root = tempfile::tempdir().unwrap();
    let (node, alice, bob) = node_and_users(root.path());
    {
        let _bob_up = bob.up();
        alice.ok(&["send", "bob", "first contact pins bob's key"]);
    }

    // bob "gets a new phone": a new identity logs in to his account.
    let bob2 =
        User { name: "bob".into(), home: root.path().join("bob-new"), passphrase: bob.passphrase.clone(), password: bob.password.clone() };
    bob2.id_new();
    let mut login = bob2.cmd(&["login", "bob", "--server", &node.address, "--password-file"]);
    login.arg(&bob2.password);
    assert!(run(&mut login).status.success());
    let _bob2_up = bob2.up();

    let out = run(&mut alice.cmd(&["send", "bob", "secret for the old bob"]));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("identity key CHANGED") && err.contains("sotto contact verify bob"), "{err}");
    assert!(lines(&bob2.ok(&["history", "--json"])).is_empty(), "nothing reached the new key");
    let history = lines(&alice.ok(&["history", "bob", "--json"]));
    assert_eq!(history.last().unwrap()["state"], "failed");

    let contacts = lines(&alice.ok(&["contacts", "--json"]));
    assert_eq!(contacts[0]["key_changed"], true);

    // Still refused on a second try: the warning stays until the user acts.
    assert_eq!(run(&mut alice.cmd(&["send", "bob", "again"])).status.code(), Some(4));

    // A wrong safety number does not help; the new key's number, compared out of band, does.
    let shown: Value = serde_json::from_str(&alice.ok(&["contact", "verify", "bob", "--json"])).unwrap();
    let new_number = shown["changed_key_safety_number"].as_str().unwrap().to_string();
    let out = run(&mut alice.cmd(&["contact", "verify", "bob", "12345 67890"]));
    assert_eq!(out.status.code(), Some(4));
    alice.ok(&["contact", "verify", "bob", &new_number]);
    let out = alice.ok(&["send", "bob", "hello new bob"]);
    assert!(out.starts_with("delivered"), "{out}");
    let contacts = lines(&alice.ok(&["contacts", "--json"]));
    assert_eq!((contacts[0]["verified"].as_bool(), contacts[0]["key_changed"].as_bool()), (Some(true), Some(false)));
}

#[test]
fn safety_numbers_match_on_both_sides_and_verify() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let _bob_up = bob.up();
    alice.ok(&["send", "bob", "hi"]);
    let a: Value = serde_json::from_str(&alice.ok(&["contact", "verify", "bob", "--json"])).unwrap();
    let b: Value = serde_json::from_str(&bob.ok(&["contact", "verify", "alice", "--json"])).unwrap();
    assert_eq!(a["safety_number"], b["safety_number"]);
    assert_eq!(a["safety_number"].as_str().unwrap().replace(' ', "").len(), 60);
    alice.ok(&["contact", "verify", "bob", a["safety_number"].as_str().unwrap()]);
    assert_eq!(lines(&alice.ok(&["contacts", "--json"]))[0]["verified"], true);
}

#[test]
fn second_up_for_the_same_profile_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let (_node, _alice, bob) = node_and_users(root.path());
    let _up = bob.up();
    let mut second = bob.cmd(&["up"]);
    let out = second.output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
}

#[test]
fn messages_sent_together_to_a_new_contact_all_arrive() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let _bob_up = bob.up();
    let _alice_up = alice.up();
    // No session yet: every one of these needs it, and they share one dial.
    let sends: Vec<_> = (0..6)
        .map(|i| {
            let mut cmd = alice.cmd(&["send", "bob", &format!("together {i}")]);
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for child in sends {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
    let mut bodies: Vec<String> =
        lines(&bob.ok(&["history", "alice", "--json"])).iter().map(|m| m["body"].as_str().unwrap().to_string()).collect();
    bodies.sort();
    assert_eq!(bodies, (0..6).map(|i| format!("together {i}")).collect::<Vec<_>>());
}
