//! `sotto chat` in a real terminal: tmux runs it against a real node and peer, the test
//! types into it and reads the screen back.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A tmux server of this test's own (`-L`), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn available() -> bool {
        Command::new("tmux").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).stdin(Stdio::null()).output().expect("tmux runs")
    }

    /// Starts `command` (a shell line) in a detached 100x24 window.
    fn start(name: &str, command: &str) -> Tmux {
        let tmux = Tmux { socket: format!("sotto-test-{name}-{}", std::process::id()) };
        let out = tmux.run(&["-f", "/dev/null", "new-session", "-d", "-s", "chat", "-x", "100", "-y", "24", command]);
        assert!(out.status.success(), "tmux new-session failed: {}", stderr(&out));
        tmux
    }

    fn screen(&self) -> String {
        stdout(&self.run(&["capture-pane", "-p", "-t", "chat"]))
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "chat"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success(), "tmux send-keys {keys:?}");
    }

    /// Waits until the screen shows `text`; fails showing the screen.
    #[track_caller]
    fn wait_for(&self, text: &str) -> String {
        let mut last = String::new();
        let seen = eventually(Duration::from_secs(20), || {
            last = self.screen();
            last.contains(text)
        });
        assert!(seen, "the screen never showed {text:?}; it shows:\n{last}");
        last
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn chat_sends_and_receives_in_a_real_terminal() {
    if !Tmux::available() {
        eprintln!("SKIPPED chat_sends_and_receives_in_a_real_terminal: tmux is not installed (apt-get install tmux)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    let _bob_up = bob.up();

    // alice has no `sotto up`: chat starts her node and withdraws it on quit.
    let command = format!(
        "env -u SOTTO_HOME -u SOTTO_PASSPHRASE_FILE -u SOTTO_LOG -u SOTTO_CONFIG XDG_CONFIG_HOME={} NO_COLOR=1 {} --home {} --passphrase-file {} chat bob; echo EXIT=$?; sleep 60",
        quoted(&alice.home.join(".no-config")),
        quoted(Path::new(BIN)),
        quoted(&alice.home),
        quoted(&alice.passphrase)
    );
    let tmux = Tmux::start("send-receive", &command);
    let screen = tmux.wait_for("you are online");
    assert!(screen.contains("┌ alice · contacts"), "{screen}");
    assert!(screen.contains("┌ message to bob"), "{screen}");

    tmux.keys(&["hello bob", "Enter"]);
    let screen = tmux.wait_for("alice: hello bob ✓");
    assert!(!screen.contains("sending"), "{screen}");
    assert!(eventually(Duration::from_secs(20), || bob.ok(&["history", "alice"]).contains("← alice  hello bob")));

    let out = bob.ok(&["send", "alice", "hi alice \u{1b}[2J"]);
    assert!(out.contains("delivered to alice"), "{out}");
    let screen = tmux.wait_for("bob: hi alice");
    assert!(screen.contains(r"bob: hi alice \u{1b}[2J"), "escapes are shown, not obeyed:\n{screen}");
    assert!(screen.contains("│● bob "), "bob is online in the list:\n{screen}");
    let sent = screen.find("alice: hello bob ✓").unwrap();
    assert!(sent < screen.find("bob: hi alice").unwrap(), "in order:\n{screen}");

    tmux.keys(&["Escape"]);
    let screen = tmux.wait_for("EXIT=");
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(!screen.contains("contacts ┐"), "the terminal was restored:\n{screen}");
    assert!(
        eventually(Duration::from_secs(20), || !bob.ok(&["online"]).lines().any(|l| l == "alice")),
        "alice's presence is withdrawn when the chat ends"
    );
    assert!(alice.home.join("chat.log").exists(), "logs go to a file");
}

#[test]
fn contact_verify_asks_at_a_terminal_and_marks_verified() {
    if !Tmux::available() {
        eprintln!("SKIPPED contact_verify_asks_at_a_terminal_and_marks_verified: tmux is not installed (apt-get install tmux)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (_node, alice, bob) = node_and_users(root.path());
    {
        let _bob_up = bob.up();
        alice.ok(&["send", "bob", "first contact"]);
    }
    let shown: serde_json::Value = serde_json::from_str(&alice.ok(&["contact", "verify", "bob", "--json"])).unwrap();
    let number = shown["safety_number"].as_str().unwrap().to_string();
    let verify = |answer: &str, name: &str| {
        let command = format!(
            "env -u SOTTO_HOME -u SOTTO_CONFIG XDG_CONFIG_HOME={} {} --home {} contact verify bob; echo EXIT=$?; sleep 60",
            quoted(&alice.home.join(".no-config")),
            quoted(Path::new(BIN)),
            quoted(&alice.home)
        );
        let tmux = Tmux::start(name, &command);
        let screen = tmux.wait_for("[y/N]");
        assert!(screen.contains(&number), "the number to compare is on screen:\n{screen}");
        tmux.keys(&[answer, "Enter"]);
        tmux.wait_for("EXIT=")
    };
    let screen = verify("n", "verify-no");
    assert!(screen.contains("bob stays unverified") && screen.contains("EXIT=0"), "{screen}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(alice.ok(&["contacts", "--json"]).trim()).unwrap()["verified"], false);
    let screen = verify("y", "verify-yes");
    assert!(screen.contains("bob is verified") && screen.contains("EXIT=0"), "{screen}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(alice.ok(&["contacts", "--json"]).trim()).unwrap()["verified"], true);
}
