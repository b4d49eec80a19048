//! The JSON-RPC surface end to end: `sotto rpc --stdio` against a real node and peer.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A running `sotto rpc --stdio`: write requests, read answers and events.
struct Rpc {
    _child: Running,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    next_id: u64,
    events: Vec<Value>,
}

impl Rpc {
    fn start(user: &User) -> Rpc {
        let mut child = user.cmd(&["rpc", "--stdio"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Rpc { _child: Running(child), stdin, lines, next_id: 1, events: Vec::new() }
    }

    fn recv(&mut self) -> Value {
        self.lines.recv_timeout(Duration::from_secs(20)).expect("an answer from sotto rpc")
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        writeln!(self.stdin, "{}", json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })).unwrap();
        loop {
            let v = self.recv();
            if v["id"] == json!(id) {
                assert_eq!(v["jsonrpc"], "2.0");
                return v;
            }
            assert_eq!(v["method"], "event", "only events come between answers: {v}");
            self.events.push(v["params"].clone());
        }
    }

    /// The next event that `pred` accepts (earlier ones are kept in order).
    fn event(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.events.iter().position(&pred) {
            return self.events.remove(i);
        }
        loop {
            let v = self.recv();
            assert_eq!(v["method"], "event", "unexpected line: {v}");
            if pred(&v["params"]) {
                return v["params"].clone();
            }
            self.events.push(v["params"].clone());
        }
    }
}

#[test]
fn rpc_sends_receives_and_streams_events() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let _bob_up = bob.up();

    // No node runs for alice: `rpc --stdio` starts one for as long as stdin is open.
    let mut rpc = Rpc::start(&alice);
    let status = rpc.call("status", json!({}));
    assert_eq!(status["result"]["username"], "alice");
    assert_eq!(rpc.call("subscribe", json!({}))["result"]["subscribed"], true);

    let sent = rpc.call("send", json!({ "to": "bob", "body": "hi from a program" }));
    assert_eq!(sent["result"]["state"], "delivered", "{sent}");
    let id = sent["result"]["id"].as_str().unwrap().to_string();
    let delivered = rpc.event(|e| e["type"] == "delivered");
    assert_eq!((delivered["peer"].as_str(), delivered["id"].as_str()), (Some("bob"), Some(id.as_str())));

    // bob's running node answers his commands; alice's program hears the reply.
    bob.ok(&["send", "alice", "hello program"]);
    let incoming = rpc.event(|e| e["type"] == "message");
    assert_eq!((incoming["message"]["peer"].as_str(), incoming["message"]["body"].as_str()), (Some("bob"), Some("hello program")));
    assert!(incoming["event_id"].as_u64().unwrap() > delivered["event_id"].as_u64().unwrap(), "event ids increase");

    // Presence is pushed: bob goes offline, alice's program hears it within seconds.
    let contacts = rpc.call("contacts", json!({}));
    assert_eq!(contacts["result"]["contacts"][0]["online"], true);
    let mut bob_up = _bob_up;
    signal(&bob_up.0, "INT");
    wait_exit(&mut bob_up.0, Duration::from_secs(10));
    let gone = rpc.event(|e| e["type"] == "presence" && e["online"] == false);
    assert_eq!(gone["peer"], "bob");

    // Errors carry JSON-RPC codes and the exit class.
    let offline = rpc.call("send", json!({ "to": "bob", "body": "still there?" }));
    assert_eq!((offline["error"]["code"].as_i64(), offline["error"]["data"]["exit"].as_u64()), (Some(-32000), Some(3)));
    assert_eq!(rpc.call("nope", json!({}))["error"]["code"], -32601);
    assert_eq!(rpc.call("send", json!({ "to": "Not Valid", "body": "x" }))["error"]["code"], -32602);
    let history = rpc.call("history", json!({ "peer": "bob", "limit": 10 }));
    let states: Vec<&str> = history["result"]["messages"].as_array().unwrap().iter().map(|m| m["state"].as_str().unwrap()).collect();
    assert_eq!(states, vec!["delivered", "received", "failed"]);
}

#[test]
fn rpc_attaches_to_a_running_node() {
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let _bob_up = bob.up();
    alice.ok(&["send", "bob", "one"]);
    // bob's `up` owns his database; `rpc --stdio` must go through it, without a passphrase.
    let mut cmd = sotto(&bob.home);
    cmd.args(["rpc", "--stdio"]).stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), r#"{{"jsonrpc":"2.0","id":7,"method":"history","params":{{"peer":"alice"}}}}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["id"], 7);
    assert_eq!(answer["result"]["messages"][0]["body"], "one");
}
