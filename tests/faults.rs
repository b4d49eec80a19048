//! Faults: a receiver killed with SIGKILL while messages arrive, a sender killed while
//! it dials, a rendezvous node killed and restarted under online peers, and packet loss
//! and duplication between two peers in network namespaces.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"))).collect()
}

/// One message as `history --json` shows it.
#[derive(Clone, Debug)]
struct Msg {
    id: String,
    body: String,
    direction: String,
    state: String,
}

fn messages(text: &str) -> Vec<Msg> {
    lines(text)
        .iter()
        .map(|m| Msg {
            id: m["id"].as_str().expect("id").to_string(),
            body: m["body"].as_str().expect("body").to_string(),
            direction: m["direction"].as_str().expect("direction").to_string(),
            state: m["state"].as_str().expect("state").to_string(),
        })
        .collect()
}

/// What one `sotto send` reported: the id it printed when delivered, else its error.
#[derive(Debug)]
struct Sent {
    body: String,
    result: Result<String, String>,
}

fn sent_from(body: String, out: &std::process::Output) -> Sent {
    let result = if out.status.success() {
        let text = stdout(out);
        let id = text.trim().rsplit_once("(id ").and_then(|(_, rest)| rest.strip_suffix(')')).map(str::to_string);
        Ok(id.unwrap_or_else(|| panic!("send said: {text:?}")))
    } else {
        Err(format!("exit {:?}: {}", out.status.code(), stderr(out).trim()))
    };
    Sent { body, result }
}

/// The receiver's side of the invariants every fault must keep:
/// - the receiver stores each message id at most once, as received;
/// - every id the sender shows delivered is in the receiver's history with its body;
/// - the receiver holds nothing the sender did not send;
/// - no sender message is left pending once its `send` returned;
/// - a `send` that said delivered is delivered in the sender's history (a failed one
///   may still turn delivered: an ack that arrives after the sender gave up counts).
fn check_history(sender: &[Msg], receiver: &[Msg], sends: &[Sent]) {
    let mut seen = HashSet::new();
    for m in receiver {
        assert!(seen.insert(m.id.as_str()), "id {} stored twice by the receiver: {receiver:#?}", m.id);
        assert_eq!((m.direction.as_str(), m.state.as_str()), ("in", "received"), "{m:?}");
    }
    let received: HashMap<&str, &Msg> = receiver.iter().map(|m| (m.id.as_str(), m)).collect();
    let out: HashMap<&str, &Msg> = sender.iter().map(|m| (m.id.as_str(), m)).collect();
    assert_eq!(out.len(), sender.len(), "the sender's ids are unique");
    for m in sender {
        assert_eq!(m.direction, "out", "{m:?}");
        assert!(m.state == "delivered" || m.state == "failed", "a returned send left {m:?}");
        if m.state == "delivered" {
            let got = received.get(m.id.as_str()).unwrap_or_else(|| panic!("delivered but not at the receiver: {m:?}"));
            assert_eq!(got.body, m.body);
        }
    }
    for m in receiver {
        let o = out.get(m.id.as_str()).unwrap_or_else(|| panic!("the receiver has a message nobody sent: {m:?}"));
        assert_eq!(o.body, m.body);
    }
    for s in sends {
        match &s.result {
            Ok(id) => {
                let m = out.get(id.as_str()).unwrap_or_else(|| panic!("{s:?} is not in the sender's history"));
                assert_eq!((m.body.as_str(), m.state.as_str()), (s.body.as_str(), "delivered"), "{s:?}");
            }
            Err(_) => assert!(sender.iter().any(|m| m.body == s.body), "{s:?} is not in the sender's history"),
        }
    }
}

/// The last (up to 10,000) messages with `peer`, through `user`'s running node.
fn history_of(user: &User, peer: &str) -> Vec<Msg> {
    messages(&user.ok(&["history", peer, "--limit", "10000", "--json"]))
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn killed_by(status: std::process::ExitStatus, sig: i32) -> bool {
    std::os::unix::process::ExitStatusExt::signal(&status) == Some(sig)
}

#[test]
fn a_receiver_killed_mid_stream_keeps_every_acked_message_once() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let _alice_up = alice.up();
    let mut bob_up = bob.up();

    // Three senders through alice's running node, until told to stop.
    let stop = AtomicBool::new(false);
    let delivered = AtomicUsize::new(0);
    let sends = Mutex::new(Vec::new());
    let (before_kill, after_restart) = std::thread::scope(|s| {
        for t in 0..3 {
            let (stop, delivered, sends, alice) = (&stop, &delivered, &sends, &alice);
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let body = format!("sender {t} message {i}");
                    let sent = sent_from(body.clone(), &run(&mut alice.cmd(&["send", "bob", &body])));
                    if sent.result.is_ok() {
                        delivered.fetch_add(1, Ordering::SeqCst);
                    }
                    sends.lock().unwrap().push(sent);
                    i += 1;
                }
            });
        }
        // The senders stop however this ends, a failed assertion included.
        let _stop = StopOnDrop(&stop);
        let ready = eventually(Duration::from_secs(60), || delivered.load(Ordering::SeqCst) >= 15);
        assert!(ready, "alice could not deliver 15 messages to bob: {:#?}", sends.lock().unwrap());
        // SIGKILL while messages keep arriving: no withdraw, no flush, no clean close.
        signal(&bob_up.0, "KILL");
        let status = wait_exit(&mut bob_up.0, Duration::from_secs(10));
        assert!(killed_by(status, 9), "bob's up ended with {status:?}");
        let before_kill = delivered.load(Ordering::SeqCst);

        // The same profile comes back: the database opens, the control socket left
        // behind is replaced, presence is published again.
        bob_up = bob.up();
        let restarted = eventually(Duration::from_secs(90), || delivered.load(Ordering::SeqCst) >= before_kill + 6);
        stop.store(true, Ordering::SeqCst);
        assert!(restarted, "no deliveries after bob came back: {:#?}", sends.lock().unwrap());
        (before_kill, delivered.load(Ordering::SeqCst))
    });
    let sends = sends.into_inner().unwrap();
    let failed: Vec<&Sent> = sends.iter().filter(|s| s.result.is_err()).collect();

    let alice_history = history_of(&alice, "bob");
    let bob_history = history_of(&bob, "alice");
    assert_eq!(alice_history.len(), sends.len(), "every send is in alice's history");
    check_history(&alice_history, &bob_history, &sends);
    let stored_but_unacked = alice_history.iter().filter(|m| m.state == "failed" && bob_history.iter().any(|b| b.id == m.id)).count();
    eprintln!(
        "{} sends: {before_kill} delivered before the kill, {after_restart} by the end, {} failed ({stored_but_unacked} of them stored by bob, ack lost)",
        sends.len(),
        failed.len()
    );
    for s in &failed {
        eprintln!("  failed: {s:?}");
    }

    // What a user does with a message shown as not delivered: send it again. Each
    // goes through now, as a new message.
    for s in &failed {
        let out = alice.ok(&["send", "bob", &s.body]);
        assert!(out.starts_with("delivered to bob"), "{out}");
    }
    let out = alice.ok(&["send", "bob", "after the crash"]);
    assert!(out.starts_with("delivered to bob"), "{out}");
    let bob_history = history_of(&bob, "alice");
    let alice_history = history_of(&alice, "bob");
    check_history(&alice_history, &bob_history, &[]);
    let bodies: HashSet<&str> = bob_history.iter().map(|m| m.body.as_str()).collect();
    for s in &sends {
        assert!(bodies.contains(s.body.as_str()), "{:?} never reached bob", s.body);
    }
    assert!(bodies.contains("after the crash"));
}

#[test]
fn a_message_is_kept_when_its_sender_is_killed_while_dialling() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let mut alice_up = alice.up();
    let mut bob_up = bob.up();
    // Killed, bob leaves his record at the node with an address nothing answers at any
    // more: a dial there waits for its timeout (5 s), and the send with it.
    signal(&bob_up.0, "KILL");
    assert!(killed_by(wait_exit(&mut bob_up.0, Duration::from_secs(10)), 9));
    let lookup: Value = serde_json::from_str(&alice.ok(&["lookup", "bob", "--json"])).unwrap();
    assert_eq!(lookup["online"], true, "bob's record is still up: {lookup}");

    let body = "written while bob could not be reached";
    let sending = alice.cmd(&["send", "bob", body]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let _sending = Running(sending);
    // No session with bob: the message is in history, pending, while bob is dialled.
    let seen = eventually(Duration::from_secs(4), || history_of(&alice, "bob").iter().any(|m| m.body == body));
    let during = history_of(&alice, "bob");
    assert!(seen, "the message is not in history while it is dialled: {during:?}");
    assert_eq!(during.iter().map(|m| (m.body.as_str(), m.state.as_str())).collect::<Vec<_>>(), [(body, "pending")]);
    // Its flush started with the dial; give it far longer than it takes, well inside
    // the dial's timeout, then kill the sender's node mid-dial.
    std::thread::sleep(Duration::from_millis(500));
    signal(&alice_up.0, "KILL");
    assert!(killed_by(wait_exit(&mut alice_up.0, Duration::from_secs(10)), 9));
    let after = history_of(&alice, "bob");
    assert_eq!(after.iter().map(|m| (m.body.as_str(), m.state.as_str())).collect::<Vec<_>>(), [(body, "pending")], "{after:?}");
}

#[test]
fn peers_come_back_by_themselves_after_the_node_is_killed() {
    let root = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut node = NodeProcess::start_at(&root.path().join("node"), &listen);
    let (alice, bob) = (User::new(root.path(), "alice"), User::new(root.path(), "bob"));
    for u in [&alice, &bob] {
        u.id_new();
        u.register(&node.address);
    }
    let _alice_up = alice.up();
    let _bob_up = bob.up();
    let sees = |who: &User, other: &str| {
        let online = run(&mut who.cmd(&["online"]));
        let lookup = run(&mut who.cmd(&["lookup", other, "--json"]));
        online.status.success()
            && stdout(&online).lines().any(|l| l == other)
            && lookup.status.success()
            && serde_json::from_str::<Value>(&stdout(&lookup)).is_ok_and(|v| v["online"] == true)
    };
    assert!(eventually(Duration::from_secs(30), || sees(&alice, "bob") && sees(&bob, "alice")), "both online at first");
    assert!(alice.ok(&["send", "bob", "before"]).starts_with("delivered"));

    // SIGKILL: presence (memory only) is gone, connections die without a close.
    node.child.kill().unwrap();
    let status = node.child.wait().unwrap();
    assert!(killed_by(status, 9), "{status:?}");
    let address = node.address.clone();
    drop(node);

    let restarted_at = Instant::now();
    let node = NodeProcess::start_at(&root.path().join("node"), &listen);
    assert_eq!(node.address, address, "same data directory, same certificate, same address");

    // No user action: each `up` notices the lost connection and publishes again.
    let back = eventually(Duration::from_secs(90), || sees(&alice, "bob") && sees(&bob, "alice"));
    assert!(back, "peers did not republish within 90 s of the node's restart");
    eprintln!("both peers visible again {:.1} s after the node restarted", restarted_at.elapsed().as_secs_f32());

    let out = alice.ok(&["send", "bob", "after the node came back"]);
    assert!(out.starts_with("delivered to bob"), "{out}");
    let out = bob.ok(&["send", "alice", "and back"]);
    assert!(out.starts_with("delivered to alice"), "{out}");
    let bob_history = history_of(&bob, "alice");
    assert_eq!(
        bob_history.iter().map(|m| (m.direction.as_str(), m.body.as_str())).collect::<Vec<_>>(),
        [("in", "before"), ("in", "after the node came back"), ("out", "and back")]
    );
}

// ---- Network namespaces ---------------------------------------------------------

/// Why this machine cannot run the namespace test, if it cannot.
fn netns_unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("network namespaces need root".into());
    }
    for (tool, arg) in [("ip", "-V"), ("nft", "--version")] {
        let ok = Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("`{tool}` is missing (install iproute2 and nftables)"));
        }
    }
    None
}

/// Runs `ip ARGS`, or `nft -f -` with `input`, failing the test on error.
fn sh(program: &str, args: &[&str], input: Option<&str>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    if let Some(text) = input {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{program} {args:?} failed: {}", stderr(&out));
    stdout(&out)
}

/// Namespaces made for one test, deleted (with the veth pair inside) when dropped,
/// whether the test passed or not.
struct Namespaces(Vec<String>);

impl Namespaces {
    /// Adds namespace `name` with its loopback up; `Err` if this machine refuses.
    fn add(&mut self, name: &str) -> Result<(), String> {
        let out = Command::new("ip").args(["netns", "add", name]).stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(stderr(&out).trim().to_string());
        }
        self.0.push(name.to_string());
        sh("ip", &["-n", name, "link", "set", "lo", "up"], None);
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}

/// `cmd` run inside network namespace `ns`, with the same arguments and environment.
fn in_netns(ns: &str, cmd: &Command) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped.args(["netns", "exec", ns]).arg(cmd.get_program()).args(cmd.get_args()).stdin(Stdio::null());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => wrapped.env(key, v),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

fn ok_in(ns: &str, user: &User, args: &[&str]) -> String {
    let out = run(&mut in_netns(ns, &user.cmd(args)));
    assert!(out.status.success(), "{} {args:?} in {ns} failed: {}{}", user.name, stdout(&out), stderr(&out));
    stdout(&out)
}

/// `sotto up --listen ADDR` in `ns`, once it says it is online.
fn up_in(ns: &str, user: &User, listen: &str) -> Running {
    let mut child = in_netns(ns, &user.cmd(&["up", "--listen", listen])).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let running = Running(child);
    wait_until_online(&mut reader, &user.name);
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    running
}

/// Packets a named nft counter has seen.
fn counted(ns: &str, name: &str) -> u64 {
    let text = sh("ip", &["netns", "exec", ns, "nft", "list", "counter", "ip", "sotto_faults", name], None);
    let packets = text.split_whitespace().skip_while(|w| *w != "packets").nth(1);
    packets.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("counter {name}: {text}"))
}

const A_IP: &str = "10.231.0.1";
const B_IP: &str = "10.231.0.2";

#[test]
fn lossy_duplicating_link_delivers_each_message_once() {
    if let Some(why) = netns_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let pid = std::process::id();
    let (ns_a, ns_b) = (format!("sotto-faults-{pid}-a"), format!("sotto-faults-{pid}-b"));
    let (veth_a, veth_b) = (format!("sfa{pid}"), format!("sfb{pid}"));
    // Declared first, so it is dropped last: after every process in the namespaces.
    let mut spaces = Namespaces(Vec::new());
    if let Err(why) = spaces.add(&ns_a) {
        eprintln!("skipped: cannot make a network namespace here: {why}");
        return;
    }
    spaces.add(&ns_b).expect("a second namespace");
    sh("ip", &["link", "add", &veth_a, "netns", &ns_a, "type", "veth", "peer", "name", &veth_b, "netns", &ns_b], None);
    for (ns, dev, ip) in [(&ns_a, &veth_a, A_IP), (&ns_b, &veth_b, B_IP)] {
        sh("ip", &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev], None);
        sh("ip", &["-n", ns, "link", "set", dev, "up"], None);
    }

    // The node and alice in A, bob in B; the node's address names A's veth address,
    // so bob's node traffic crosses the faulty link too.
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("node");
    let mut node_cmd = Command::new(BIN);
    node_cmd.env_remove("SOTTO_LOG").args(["rendezvous", "--listen", &format!("{A_IP}:7070"), "--data"]).arg(&data);
    let mut child = in_netns(&ns_a, &node_cmd).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let node = NodeProcess { child, address: line.trim().to_string(), data };
    assert!(node.address.starts_with(&format!("sotto://{A_IP}:7070#sha256:")), "{}", node.address);

    let (alice, bob) = (User::new(root.path(), "alice"), User::new(root.path(), "bob"));
    for (u, ns) in [(&alice, &ns_a), (&bob, &ns_b)] {
        u.id_new();
        let pw = u.password.to_str().unwrap();
        ok_in(ns, u, &["register", &u.name, "--server", &node.address, "--password-file", pw]);
    }
    let _alice_up = up_in(&ns_a, &alice, &format!("{A_IP}:0"));
    let _bob_up = up_in(&ns_b, &bob, &format!("{B_IP}:0"));

    // Faults on the link, on both ends: 15% of UDP packets dropped each way, and 10%
    // of those that survive sent twice.
    let rules = |dev: &str, other: &str| {
        format!(
            "table ip sotto_faults {{
                counter dropped {{}}
                counter duplicated {{}}
                chain input {{
                    type filter hook input priority 0; policy accept;
                    iifname \"{dev}\" meta l4proto udp numgen random mod 100 < 15 counter name \"dropped\" drop
                }}
                chain output {{
                    type filter hook output priority 0; policy accept;
                    oifname \"{dev}\" meta l4proto udp numgen random mod 100 < 15 counter name \"dropped\" drop
                    oifname \"{dev}\" ip daddr {other} meta l4proto udp numgen random mod 100 < 10 counter name \"duplicated\" dup to {other} device \"{dev}\"
                }}
            }}\n"
        )
    };
    sh("ip", &["netns", "exec", &ns_a, "nft", "-f", "-"], Some(&rules(&veth_a, B_IP)));
    sh("ip", &["netns", "exec", &ns_b, "nft", "-f", "-"], Some(&rules(&veth_b, A_IP)));

    // Fifty messages, each sent again (as a new message) if its send fails, as a user
    // would; five senders at a time.
    let sends = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..5 {
            let (sends, alice, ns_a) = (&sends, &alice, &ns_a);
            s.spawn(move || {
                for i in (t..50).step_by(5) {
                    let body = format!("message {i:02}");
                    for attempt in 0..5 {
                        let sent = sent_from(body.clone(), &run(&mut in_netns(ns_a, &alice.cmd(&["send", "bob", &body]))));
                        let ok = sent.result.is_ok();
                        sends.lock().unwrap().push((attempt, sent));
                        if ok {
                            break;
                        }
                    }
                }
            });
        }
    });
    let sends: Vec<(u32, Sent)> = sends.into_inner().unwrap();
    let (dropped, duplicated) =
        (counted(&ns_a, "dropped") + counted(&ns_b, "dropped"), counted(&ns_a, "duplicated") + counted(&ns_b, "duplicated"));
    let retries = sends.iter().filter(|(attempt, _)| *attempt > 0).count();
    eprintln!("{} sends ({retries} retries); the link dropped {dropped} and duplicated {duplicated} packets", sends.len());
    for (_, s) in sends.iter().filter(|(_, s)| s.result.is_err()) {
        eprintln!("  retried: {s:?}");
    }
    assert!(dropped > 0 && duplicated > 0, "the faults did not fire: dropped {dropped}, duplicated {duplicated}");

    let alice_history = messages(&ok_in(&ns_a, &alice, &["history", "bob", "--limit", "10000", "--json"]));
    let bob_history = messages(&ok_in(&ns_b, &bob, &["history", "alice", "--limit", "10000", "--json"]));
    let plain: Vec<Sent> = sends.into_iter().map(|(_, s)| s).collect();
    check_history(&alice_history, &bob_history, &plain);
    for i in 0..50 {
        let body = format!("message {i:02}");
        let delivered = alice_history.iter().filter(|m| m.body == body && m.state == "delivered").count();
        assert!(delivered >= 1, "{body:?} was never delivered: {:#?}", plain.iter().filter(|s| s.body == body).collect::<Vec<_>>());
        let attempts = plain.iter().filter(|s| s.body == body).count();
        let at_bob = bob_history.iter().filter(|m| m.body == body).count();
        // Each attempt is its own message (own id): stored once at most, so a body sent
        // once is at bob exactly once, whatever the link repeated or lost.
        assert!((1..=attempts).contains(&at_bob), "{body:?}: {at_bob} copies at bob from {attempts} sends");
    }
}
