//! The user's path through the real binary: a node and profiles on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn register_go_online_be_seen_go_offline() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(&root.path().join("node"));
    let (alice, bob) = (User::new(root.path(), "alice"), User::new(root.path(), "bob"));
    alice.id_new();
    bob.id_new();
    assert!(alice.register(&node.address).contains("Registered alice"));
    bob.register(&node.address);

    let mut up = bob.up();
    let online = alice.ok(&["online", "--json"]);
    assert_eq!(online.trim(), r#"{"username":"bob"}"#);

    let bob_key: serde_json::Value = serde_json::from_str(&bob.ok(&["id", "show", "--json"])).unwrap();
    let seen: serde_json::Value = serde_json::from_str(&alice.ok(&["lookup", "bob", "--json"])).unwrap();
    assert_eq!(seen["online"], true);
    assert_eq!(seen["identity_key"], bob_key["identity_key"]);
    assert_eq!(seen["noise_key"], bob_key["noise_key"]);
    assert_eq!(seen["fingerprint"], bob_key["fingerprint"]);
    assert!(seen["seq"].as_u64().unwrap() > 0);

    signal(&up.0, "INT");
    assert!(wait_exit(&mut up.0, Duration::from_secs(10)).success(), "up exits cleanly on SIGINT");
    let gone = eventually(Duration::from_secs(5), || alice.ok(&["online", "--json"]).trim().is_empty());
    assert!(gone, "bob still listed online after up stopped");
    let seen: serde_json::Value = serde_json::from_str(&alice.ok(&["lookup", "bob", "--json"])).unwrap();
    assert_eq!(seen["online"], false);
}

#[test]
fn killed_up_disappears_when_its_connection_dies() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let mut up = bob.up();
    up.0.kill().unwrap();
    up.0.wait().unwrap();
    // No withdraw was sent: the node notices the dead connection by its idle timeout.
    let gone = eventually(Duration::from_secs(40), || alice.ok(&["online", "--json"]).trim().is_empty());
    assert!(gone, "a killed peer stays listed");
}

#[test]
fn login_from_a_second_profile_binds_the_new_key() {
    let root = tempfile::tempdir().unwrap();
    let (node, alice, bob) = node_and_users(root.path());

    // alice on a second device: a new profile, the same account password.
    let laptop = User {
        name: "alice".into(),
        home: root.path().join("alice-laptop"),
        passphrase: alice.passphrase.clone(),
        password: alice.password.clone(),
    };
    laptop.id_new();
    let mut login = laptop.cmd(&["login", "alice", "--server", &node.address, "--password-file"]);
    login.arg(&laptop.password);
    let out = run(&mut login);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("this identity now speaks for the account"));

    let new_key: serde_json::Value = serde_json::from_str(&laptop.ok(&["id", "show", "--json"])).unwrap();
    let seen: serde_json::Value = serde_json::from_str(&bob.ok(&["lookup", "alice", "--json"])).unwrap();
    assert_eq!(seen["identity_key"], new_key["identity_key"]);

    // The first device's key no longer speaks for alice: a distinct exit code.
    let out = run(&mut alice.cmd(&["online"]));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("log in again"), "{}", stderr(&out));
}

#[test]
fn wrong_password_and_wrong_passphrase_fail_clearly() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(&root.path().join("node"));
    let alice = User::new(root.path(), "alice");
    alice.id_new();
    alice.register(&node.address);

    let other = User::new(root.path(), "other");
    other.id_new();
    let mut login = other.cmd(&["login", "alice", "--server", &node.address, "--password-file"]);
    login.arg(&other.password);
    let out = run(&mut login);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown user or wrong password"));

    let mut unknown = other.cmd(&["login", "nobody", "--server", &node.address, "--password-file"]);
    unknown.arg(&other.password);
    let out2 = run(&mut unknown);
    assert_eq!(out2.status.code(), Some(5));
    assert_eq!(stderr(&out), stderr(&out2), "unknown user and wrong password read the same");

    let wrong = root.path().join("wrong");
    std::fs::write(&wrong, "not it\n").unwrap();
    let out = run(sotto(&alice.home).arg("--passphrase-file").arg(&wrong).arg("online"));
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("wrong passphrase"), "{}", stderr(&out));
}

#[test]
fn usage_errors_and_unreachable_nodes_have_their_own_codes() {
    let root = tempfile::tempdir().unwrap();
    let alice = User::new(root.path(), "alice");
    alice.id_new();
    let pin = "00".repeat(32);

    let out = run(&mut alice.cmd(&["register", "Not Valid", "--server", &format!("sotto://127.0.0.1:9#sha256:{pin}")]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("invalid username"), "{}", stderr(&out));

    let out = run(&mut alice.cmd(&["register", "alice", "--server", "127.0.0.1:9"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("sotto://"), "{}", stderr(&out));

    // Nothing listens on this port: unreachable, exit 3.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    drop(socket);
    let mut cmd = alice.cmd(&["register", "alice", "--server", &format!("sotto://127.0.0.1:{port}#sha256:{pin}"), "--password-file"]);
    cmd.arg(&alice.password);
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("is it running"), "{}", stderr(&out));

    // A running node, but the wrong fingerprint: untrusted, exit 4.
    let node = NodeProcess::start(&root.path().join("node"));
    let (hostport, _) = node.address.split_once('#').unwrap();
    let mut cmd = alice.cmd(&["register", "alice", "--server", &format!("{hostport}#sha256:{pin}"), "--password-file"]);
    cmd.arg(&alice.password);
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("fingerprint differs"), "{}", stderr(&out));

    // Commands that need an account say what to do first.
    let out = run(&mut alice.cmd(&["up"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("sotto register"), "{}", stderr(&out));
}

#[test]
fn identity_is_never_overwritten_and_shows_without_passphrase() {
    let root = tempfile::tempdir().unwrap();
    let alice = User::new(root.path(), "alice");
    alice.id_new();
    let before = std::fs::read(alice.home.join("identity.sotto")).unwrap();
    let out = run(&mut alice.cmd(&["id", "new"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("will not overwrite"));
    assert_eq!(std::fs::read(alice.home.join("identity.sotto")).unwrap(), before);

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(alice.home.join("identity.sotto")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let shown: serde_json::Value = serde_json::from_str(&stdout(&run(sotto(&alice.home).args(["id", "show", "--json"])))).unwrap();
    assert_eq!(shown["identity_key"].as_str().unwrap().len(), 64);
    assert_eq!(shown["noise_key"].as_str().unwrap().len(), 64);
    assert_eq!(shown["fingerprint"].as_str().unwrap().replace(' ', "").len(), 30);
}

#[test]
fn node_keeps_accounts_and_certificate_across_restarts_and_up_reconnects() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("node");
    let mut node = NodeProcess::start(&data);
    let first_address = node.address.clone();
    let (alice, bob) = (User::new(root.path(), "alice"), User::new(root.path(), "bob"));
    alice.id_new();
    bob.id_new();
    alice.register(&node.address);
    bob.register(&node.address);
    let _up = bob.up();
    assert!(node.stop().success(), "node exits cleanly on SIGTERM");

    // Same data dir, same port: same certificate, same accounts; bob republishes by himself.
    let port = first_address.split(':').nth(2).unwrap().split('#').next().unwrap().to_string();
    let node = NodeProcess::start_at(&data, &format!("127.0.0.1:{port}"));
    assert_eq!(node.address, first_address);
    let back =
        eventually(Duration::from_secs(40), || run(&mut alice.cmd(&["online", "--json"])).stdout.starts_with(br#"{"username":"bob"}"#));
    assert!(back, "bob did not republish after the node restarted");
}

#[test]
fn demo_runs_and_exits_zero() {
    let out = run(std::process::Command::new(BIN).arg("demo").env_remove("SOTTO_HOME"));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    for expected in [
        "registered alice",
        "registered bob",
        "online now: alice, bob",
        "alice sent \"Hi bob! Only you can read this.\": delivered",
        "bob received from alice",
        "alice received from bob",
        "[delivered]",
        "[received]",
        "bob is not online",
    ] {
        assert!(text.contains(expected), "demo output lacks {expected:?}:\n{text}");
    }
}

#[test]
fn completions_man_page_and_config_defaults() {
    let root = tempfile::tempdir().unwrap();
    let out = run(sotto(root.path()).args(["completions", "bash"]));
    assert!(out.status.success() && stdout(&out).contains("complete") && stdout(&out).contains("sotto"));
    let out = run(sotto(root.path()).arg("man"));
    assert!(out.status.success() && stdout(&out).contains(".TH sotto 1"), "{}", stderr(&out));

    // The config file's server is the default for register; a bad key is a usage error.
    let node = NodeProcess::start(&root.path().join("node"));
    let alice = User::new(root.path(), "alice");
    alice.id_new();
    let config = root.path().join("config.toml");
    std::fs::write(&config, format!("server = \"{}\"\nnotify = \"bell\"\n", node.address)).unwrap();
    let mut register = alice.cmd(&["register", "alice", "--password-file"]);
    register.arg(&alice.password).arg("--config").arg(&config);
    let out = run(&mut register);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Registered alice"));

    std::fs::write(&config, "sever = \"typo\"\n").unwrap();
    let out = run(alice.cmd(&["id", "show"]).arg("--config").arg(&config));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown field `sever`"), "{}", stderr(&out));

    let out = run(&mut alice.cmd(&["login", "alice", "--password-file", "/dev/null"]));
    assert_eq!(out.status.code(), Some(2), "no --server and no config: a usage error");
}

#[test]
fn a_node_stopped_as_soon_as_it_prints_its_address_exits_cleanly() {
    let root = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut node = NodeProcess::start(&root.path().join("node"));
        let status = node.stop();
        assert!(status.success(), "round {round}: SIGTERM right after the address line gave {status:?}");
    }
}
