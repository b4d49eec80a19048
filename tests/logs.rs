//! What sotto leaves where others could see it: no secret and no message body in any
//! log at any verbosity, and files and directories private from the moment they exist
//! (refused, with the `chmod` to run, when they are not).
//!
//! The log tests run the whole flow (a node, two users: `id new`, `register`, a wrong
//! password, a wrong passphrase, `up`, messages each way, `history`, `lookup`,
//! `online`, `contacts`) once per verbosity level, capture the standard output and
//! standard error of every process, and look for every secret the test can learn:
//! passphrases, account passwords, message bodies, the identity and Noise secret keys
//! (decrypted here from the identity files), the argon2 key that seals each identity
//! file, and the TLS private keys of the node and the peers, each as text, hex, base64
//! and Rust `Debug` bytes. Logs (standard error) must hold none of them; standard output
//! holds bodies only where they are the command's answer (`up` printing what arrived,
//! `history`), and never anything else secret.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{eventually, signal, wait_exit, BIN};

/// How a process is asked to log.
#[derive(Clone, Copy, Debug)]
enum Verbosity {
    Quiet,
    Default,
    Flags(u8),
    /// `SOTTO_LOG=trace`: every crate, sotto's dependencies included, at trace level.
    EnvTrace,
}

impl Verbosity {
    fn apply(self, cmd: &mut Command) {
        match self {
            Verbosity::Quiet => {
                cmd.arg("-q");
            }
            Verbosity::Default => {}
            Verbosity::Flags(n) => {
                cmd.arg(format!("-{}", "v".repeat(n as usize)));
            }
            Verbosity::EnvTrace => {
                cmd.env("SOTTO_LOG", "trace");
            }
        }
    }
}

/// One process's captured output, and whether its standard output may carry bodies.
struct Captured {
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
    bodies_expected_on_stdout: bool,
}

/// A place for one flow: its processes' output files, their environment.
struct Flow {
    root: PathBuf,
    verbosity: Verbosity,
    captured: Vec<Captured>,
    next: usize,
}

impl Flow {
    fn new(root: &Path, verbosity: Verbosity) -> Flow {
        fs::create_dir_all(root.join("out")).unwrap();
        fs::create_dir_all(root.join("run")).unwrap();
        Flow { root: root.to_path_buf(), verbosity, captured: Vec::new(), next: 0 }
    }

    /// A `sotto` command with a clean environment, this flow's verbosity and runtime
    /// dir, and its output going to two new files.
    fn command(&mut self, what: &str, home: Option<&Path>, args: &[&str], bodies_expected_on_stdout: bool) -> (Command, PathBuf) {
        let mut cmd = clean_command(&self.root);
        self.verbosity.apply(&mut cmd);
        if let Some(home) = home {
            cmd.arg("--home").arg(home);
        }
        cmd.args(args);
        self.next += 1;
        let name = format!("{:02}-{}", self.next, what.replace(' ', "_"));
        let (stdout, stderr) = (self.root.join("out").join(format!("{name}.out")), self.root.join("out").join(format!("{name}.err")));
        cmd.stdout(Stdio::from(fs::File::create(&stdout).unwrap()));
        cmd.stderr(Stdio::from(fs::File::create(&stderr).unwrap()));
        cmd.stdin(Stdio::null());
        self.captured.push(Captured { what: what.to_string(), stdout: stdout.clone(), stderr, bodies_expected_on_stdout });
        (cmd, stdout)
    }

    /// Runs a command to its end and returns its exit status and standard output.
    fn run(&mut self, what: &str, home: Option<&Path>, args: &[&str], bodies: bool) -> (ExitStatus, String) {
        let (mut cmd, stdout) = self.command(what, home, args, bodies);
        let mut child = cmd.spawn().expect("sotto starts");
        let status = wait_exit(&mut child, Duration::from_secs(120));
        (status, fs::read_to_string(stdout).unwrap_or_default())
    }

    fn ok(&mut self, what: &str, home: Option<&Path>, args: &[&str], bodies: bool) -> String {
        let (status, out) = self.run(what, home, args, bodies);
        let err = fs::read_to_string(&self.captured.last().unwrap().stderr).unwrap_or_default();
        assert!(status.success(), "{what} failed ({status}): {out}{err}");
        out
    }

    /// Starts a long-running command and waits until its standard output holds `ready`.
    fn start(&mut self, what: &str, home: Option<&Path>, args: &[&str], bodies: bool, ready: &str) -> Kill {
        let (mut cmd, stdout) = self.command(what, home, args, bodies);
        let child = Kill(cmd.spawn().expect("sotto starts"));
        let up = eventually(Duration::from_secs(60), || fs::read_to_string(&stdout).unwrap_or_default().contains(ready));
        let err = fs::read_to_string(&self.captured.last().unwrap().stderr).unwrap_or_default();
        assert!(up, "{what} never said {ready:?}: {}{err}", fs::read_to_string(&stdout).unwrap_or_default());
        child
    }
}

/// A child killed if the test ends before it does.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Kill {
    fn stop(&mut self, sig: &str) {
        signal(&self.0, sig);
        assert!(wait_exit(&mut self.0, Duration::from_secs(30)).success(), "a process did not stop cleanly on SIG{sig}");
    }
}

/// A marker no log line could contain by accident.
fn marker(what: &str) -> String {
    let mut bytes = [0u8; 6];
    getrandom(&mut bytes);
    format!("{what}-{}", hex::encode(bytes))
}

fn getrandom(buf: &mut [u8]) {
    use rand::RngCore;
    rand::rngs::OsRng.fill_bytes(buf);
}

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 without padding: the padded form starts with it.
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The ways a secret could show up in text: as is, hex (either case), base64 (both
/// alphabets), and the `Debug` of its first bytes. Unless `whole` (a passphrase, a
/// body, a key file), every 8-byte window in hex too, so a log of part of a key is
/// caught.
fn forms(secret: &[u8], whole: bool) -> Vec<Vec<u8>> {
    let mut forms = vec![hex::encode(secret).into_bytes(), hex::encode_upper(secret).into_bytes()];
    forms.push(base64(secret, B64_STD).into_bytes());
    forms.push(base64(secret, B64_URL).into_bytes());
    let debug = format!("{:?}", &secret[..secret.len().min(8)]);
    forms.push(debug.trim_end_matches(']').as_bytes().to_vec());
    // A raw key would be binary in a log; look for it anyway.
    forms.push(secret.to_vec());
    if !whole {
        for window in secret.windows(8) {
            forms.push(hex::encode(window).into_bytes());
        }
    }
    forms
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Bytes as text, one char per byte (Latin-1), so that the standard library's fast
/// substring search finds binary needles too: trace logs run to megabytes.
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// If `needle` occurs in `haystack` (both as [`latin1`]), the text around it.
fn occurs(haystack: &str, needle: &str) -> Option<String> {
    let at = haystack.find(needle)?;
    let (mut start, mut end) = (at.saturating_sub(300), (at + needle.len() + 150).min(haystack.len()));
    while !haystack.is_char_boundary(start) {
        start -= 1;
    }
    while !haystack.is_char_boundary(end) {
        end += 1;
    }
    Some(haystack[start..end].to_string())
}

/// The 32-byte P-256 private scalar in a PKCS#8 key made by rcgen (inside the
/// ECPrivateKey: `version 1, OCTET STRING (32)`).
fn p256_scalar(pkcs8: &[u8]) -> Vec<u8> {
    let at = find(pkcs8, &[0x02, 0x01, 0x01, 0x04, 0x20]).expect("an EC private key");
    pkcs8[at + 5..at + 37].to_vec()
}

/// The identity file's secrets, opened with the passphrase, and the argon2 key that
/// seals them, recomputed from the file's header.
fn identity_secrets(home: &Path, passphrase: &str) -> Vec<(String, Vec<u8>)> {
    let file = fs::read(home.join("identity.sotto")).unwrap();
    let identity = sotto::idfile::open(&file, passphrase.as_bytes()).expect("the test opens the identity file");
    let header = sotto::idfile::Header::parse(&file).unwrap();
    let params = argon2::Params::new(header.kdf.memory_kib, header.kdf.iterations, header.kdf.parallelism, Some(32)).unwrap();
    let mut key = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), &header.salt, &mut key)
        .unwrap();
    // Check the recomputed key really is the file's key.
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    let cipher = chacha20poly1305::XChaCha20Poly1305::new((&key).into());
    let nonce = chacha20poly1305::XNonce::from_slice(&header.nonce);
    let plain = cipher.decrypt(nonce, Payload { msg: &file[sotto::idfile::HEADER_LEN..], aad: &file[..sotto::idfile::HEADER_LEN] });
    assert_eq!(plain.expect("the recomputed key opens the file")[..32], identity.secret().seed()[..]);
    vec![
        ("identity seed".into(), identity.secret().seed().to_vec()),
        ("noise secret".into(), identity.noise().as_bytes().to_vec()),
        ("identity-file key".into(), key.to_vec()),
    ]
}

/// A user of the flow: profile, secrets, marker files.
struct Person {
    name: &'static str,
    home: PathBuf,
    passphrase: String,
    passphrase_file: PathBuf,
    password: String,
    password_file: PathBuf,
}

impl Person {
    fn new(root: &Path, name: &'static str) -> Person {
        let passphrase = marker(&format!("passphrase-of-{name}"));
        let password = marker(&format!("password-of-{name}"));
        let (passphrase_file, password_file) = (root.join(format!("{name}.pp")), root.join(format!("{name}.pw")));
        fs::write(&passphrase_file, format!("{passphrase}\n")).unwrap();
        fs::write(&password_file, format!("{password}\n")).unwrap();
        Person { name, home: root.join(name), passphrase, passphrase_file, password, password_file }
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--passphrase-file", self.passphrase_file.to_str().unwrap()];
        all.extend_from_slice(args);
        all
    }
}

/// Every file and directory under `dir` (not following links), with its mode.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32, bool)>) {
    let meta = fs::symlink_metadata(dir).unwrap();
    out.push((dir.to_path_buf(), meta.permissions().mode() & 0o777, meta.is_dir()));
    if meta.is_dir() {
        for entry in fs::read_dir(dir).unwrap() {
            walk(&entry.unwrap().path(), out);
        }
    }
}

/// Everything sotto made under `dir` is the user's alone: directories 0700, files 0600.
fn assert_private_tree(dir: &Path) {
    let mut all = Vec::new();
    walk(dir, &mut all);
    for (path, mode, is_dir) in all {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", path.display());
    }
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The whole flow at one verbosity; then the checks.
fn flow(verbosity: Verbosity) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut flow = Flow::new(root, verbosity);
    let data = root.join("node");
    let (alice, bob) = (Person::new(root, "alice"), Person::new(root, "bob"));
    let wrong_passphrase = marker("wrong-passphrase");
    let wrong_password = marker("wrong-password");
    let wrong_pp_file = root.join("wrong.pp");
    let wrong_pw_file = root.join("wrong.pw");
    fs::write(&wrong_pp_file, format!("{wrong_passphrase}\n")).unwrap();
    fs::write(&wrong_pw_file, format!("{wrong_password}\n")).unwrap();
    let bodies = [marker("body-alice-to-bob"), marker("body-bob-to-alice"), marker("body-from-stdin"), marker("body-to-the-offline")];

    let mut node =
        flow.start("rendezvous", None, &["rendezvous", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()], false, "#sha256:");
    let address = fs::read_to_string(&flow.captured[0].stdout).unwrap().lines().next().unwrap().trim().to_string();

    for p in [&alice, &bob] {
        flow.ok("id new", Some(&p.home), &p.args(&["id", "new"]), false);
        flow.ok(
            "register",
            Some(&p.home),
            &p.args(&["register", p.name, "--server", &address, "--password-file", p.password_file.to_str().unwrap()]),
            false,
        );
    }
    // A wrong account password, and a wrong identity passphrase: refused, exit code 5.
    let (status, _) = flow.run(
        "login with a wrong password",
        Some(&bob.home),
        &bob.args(&["login", "bob", "--server", &address, "--password-file", wrong_pw_file.to_str().unwrap()]),
        false,
    );
    assert_eq!(status.code(), Some(5), "a wrong password");
    let (status, _) = flow.run(
        "lookup with a wrong passphrase",
        Some(&alice.home),
        &["--passphrase-file", wrong_pp_file.to_str().unwrap(), "lookup", "bob"],
        false,
    );
    assert_eq!(status.code(), Some(5), "a wrong passphrase");
    // One-shot commands that unlock the identity themselves (no `up` running).
    flow.ok("lookup", Some(&alice.home), &alice.args(&["lookup", "bob"]), false);
    let (status, _) = flow.run("send to the offline", Some(&alice.home), &alice.args(&["send", "bob", &bodies[3]]), false);
    assert_eq!(status.code(), Some(3), "bob is not online yet");

    let listen = ["up", "--listen", "127.0.0.1:0"];
    // Each waits for its own presence ("NAME is online at"), not a contact's.
    let mut up_alice = flow.start("up", Some(&alice.home), &alice.args(&listen), true, &format!("{} is online at", alice.name));
    let mut up_bob = flow.start("up", Some(&bob.home), &bob.args(&listen), true, &format!("{} is online at", bob.name));
    let (alice_up_out, bob_up_out) = (flow.captured[flow.captured.len() - 2].stdout.clone(), flow.captured.last().unwrap().stdout.clone());

    assert!(flow.ok("send", Some(&alice.home), &alice.args(&["send", "bob", &bodies[0]]), false).contains("delivered to bob"));
    assert!(flow.ok("send", Some(&bob.home), &bob.args(&["send", "alice", &bodies[1]]), false).contains("delivered to alice"));
    {
        let (mut cmd, out) = flow.command("send from stdin", Some(&alice.home), &alice.args(&["send", "bob"]), false);
        let stdin_file = root.join("stdin-body");
        fs::write(&stdin_file, &bodies[2]).unwrap();
        cmd.stdin(Stdio::from(fs::File::open(&stdin_file).unwrap()));
        let status = wait_exit(&mut cmd.spawn().unwrap(), Duration::from_secs(120));
        assert!(status.success() && fs::read_to_string(out).unwrap().contains("delivered to bob"), "send from stdin");
    }
    let arrived = eventually(Duration::from_secs(30), || {
        let (a, b) = (fs::read_to_string(&alice_up_out).unwrap(), fs::read_to_string(&bob_up_out).unwrap());
        b.contains(&bodies[0]) && b.contains(&bodies[2]) && a.contains(&bodies[1])
    });
    assert!(arrived, "up printed what arrived");

    // Through the running nodes (control socket).
    for p in [&alice, &bob] {
        let history = flow.ok("history via up", Some(&p.home), &p.args(&["history"]), true);
        assert!(history.contains(&bodies[0]) && history.contains(&bodies[1]), "{history}");
        flow.ok("history json via up", Some(&p.home), &p.args(&["history", "--json"]), true);
        flow.ok("lookup via up", Some(&p.home), &p.args(&["lookup", if p.name == "alice" { "bob" } else { "alice" }]), false);
        flow.ok("online via up", Some(&p.home), &p.args(&["online"]), false);
        flow.ok("contacts via up", Some(&p.home), &p.args(&["contacts"]), false);
    }

    // While `up` runs: everything it made is private, the control socket included.
    let runtime = root.join("run").join("sotto");
    assert_eq!(mode_of(&runtime), 0o700);
    let sockets: Vec<_> = fs::read_dir(&runtime).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(sockets.len(), 2, "one control socket per profile: {sockets:?}");
    for socket in &sockets {
        assert_eq!(mode_of(socket), 0o600, "{}", socket.display());
    }
    for p in [&alice, &bob] {
        assert_private_tree(&p.home);
    }

    up_alice.stop("INT");
    up_bob.stop("INT");
    // The same commands doing the work themselves.
    for p in [&alice, &bob] {
        let history = flow.ok("history", Some(&p.home), &p.args(&["history"]), true);
        assert!(history.contains(&bodies[0]) && history.contains(&bodies[1]), "{history}");
        flow.ok("contacts", Some(&p.home), &p.args(&["contacts"]), false);
    }
    node.stop("TERM");

    for p in [&alice, &bob] {
        assert_private_tree(&p.home);
    }
    assert_private_tree(&data);

    // Every secret the test can learn, in every form.
    let mut secrets: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for p in [&alice, &bob] {
        secrets.push((format!("{}'s passphrase", p.name), p.passphrase.clone().into_bytes(), true));
        secrets.push((format!("{}'s password", p.name), p.password.clone().into_bytes(), true));
        for (what, bytes) in identity_secrets(&p.home, &p.passphrase) {
            secrets.push((format!("{}'s {what}", p.name), bytes, false));
        }
        let key = fs::read(p.home.join("peer").join("key.der")).unwrap();
        secrets.push((format!("{}'s peer TLS key", p.name), p256_scalar(&key), false));
        secrets.push((format!("{}'s peer TLS key file", p.name), key, true));
    }
    secrets.push(("the wrong passphrase".into(), wrong_passphrase.into_bytes(), true));
    secrets.push(("the wrong password".into(), wrong_password.into_bytes(), true));
    let node_key = fs::read(data.join("key.der")).unwrap();
    secrets.push(("the node's TLS key".into(), p256_scalar(&node_key), false));
    secrets.push(("the node's TLS key file".into(), node_key, true));
    let bodies: Vec<(String, Vec<u8>)> = bodies.iter().map(|b| (format!("message body {b}"), b.clone().into_bytes())).collect();

    let secret_forms: Vec<(String, Vec<String>)> =
        secrets.iter().map(|(what, secret, text)| (what.clone(), forms(secret, *text).iter().map(|f| latin1(f)).collect())).collect();
    let body_forms: Vec<(String, Vec<String>)> =
        bodies.iter().map(|(what, body)| (what.clone(), forms(body, true).iter().map(|f| latin1(f)).collect())).collect();
    let mut log_bytes = 0;
    for c in &flow.captured {
        let (out, err) = (latin1(&fs::read(&c.stdout).unwrap()), latin1(&fs::read(&c.stderr).unwrap()));
        log_bytes += err.len();
        for (what, forms) in &secret_forms {
            for form in forms {
                for (stream, text) in [("log (stderr)", &err), ("stdout", &out)] {
                    if let Some(context) = occurs(text, form) {
                        panic!("{what} appears in the {stream} of `{}` at {verbosity:?}:\n{context}", c.what);
                    }
                }
            }
        }
        for (what, forms) in &body_forms {
            for form in forms {
                if let Some(context) = occurs(&err, form) {
                    panic!("{what} appears in the log (stderr) of `{}` at {verbosity:?}:\n{context}", c.what);
                }
                if !c.bodies_expected_on_stdout {
                    if let Some(context) = occurs(&out, form) {
                        panic!("{what} appears in the stdout of `{}` at {verbosity:?}:\n{context}", c.what);
                    }
                }
            }
        }
    }
    // The logs this test read are real logs: at trace level there is plenty to read.
    if matches!(verbosity, Verbosity::EnvTrace | Verbosity::Flags(3)) {
        assert!(log_bytes > 1000, "only {log_bytes} bytes of logs at {verbosity:?}");
    }
}

#[test]
fn no_secret_or_body_in_logs_quiet() {
    flow(Verbosity::Quiet);
}

#[test]
fn no_secret_or_body_in_logs_default() {
    flow(Verbosity::Default);
}

#[test]
fn no_secret_or_body_in_logs_v() {
    flow(Verbosity::Flags(1));
}

#[test]
fn no_secret_or_body_in_logs_vv() {
    flow(Verbosity::Flags(2));
}

#[test]
fn no_secret_or_body_in_logs_vvv() {
    flow(Verbosity::Flags(3));
}

#[test]
fn no_secret_or_body_in_logs_sotto_log_trace_all_crates() {
    flow(Verbosity::EnvTrace);
}

#[test]
fn the_base64_and_forms_used_above_are_right() {
    assert_eq!(base64(b"foobar", B64_STD), "Zm9vYmFy");
    assert_eq!(base64(b"fooba", B64_STD), "Zm9vYmE");
    assert_eq!(base64(&[0xfb, 0xff], B64_URL), "-_8");
    assert!(forms(b"hunter22", true).contains(&b"68756e7465723232".to_vec()));
    assert!(forms(&[1, 2, 3], false).contains(&b"[1, 2, 3".to_vec()));
}

/// Secret types print nothing secret with `Debug`, whatever holds them.
#[test]
fn debug_of_secret_holders_prints_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cert = sotto::tls::CertKey::load_or_create(dir.path(), "sotto-peer").unwrap();
    let scalar = p256_scalar(&fs::read(dir.path().join("key.der")).unwrap());
    let shown = format!("{cert:?} {cert:#?}");
    for form in forms(&scalar, false) {
        assert!(find(shown.as_bytes(), &form).is_none(), "{shown}");
    }

    let identity = sotto::keys::Identity::generate();
    let credentials = sotto::rendezvous::proto::Credentials {
        username: sotto::username::Username::parse("alice").unwrap(),
        password: "a-password-to-hide".into(),
        identity_key: identity.public(),
        noise: identity.binding(),
        proof: [9; 64],
    };
    for shown in [
        format!("{credentials:?}"),
        format!("{:?}", sotto::rendezvous::proto::Request::Register(credentials.clone())),
        format!("{:#?}", sotto::rendezvous::proto::Request::Login(credentials.clone())),
        format!("{identity:?}"),
    ] {
        assert!(!shown.contains("a-password-to-hide"), "{shown}");
        for secret in [identity.secret().seed().to_vec(), identity.noise().as_bytes().to_vec()] {
            for form in forms(&secret, false) {
                assert!(find(shown.as_bytes(), &form).is_none(), "{shown}");
            }
        }
    }
}

/// `sotto` with nothing from the machine's environment: its runtime and config
/// directories under `root`.
fn clean_command(root: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("SOTTO_HOME")
        .env_remove("SOTTO_PASSPHRASE_FILE")
        .env_remove("SOTTO_LOG")
        .env_remove("SOTTO_CONFIG")
        .env("NO_COLOR", "1")
        .env("XDG_RUNTIME_DIR", root.join("run"))
        .env("XDG_CONFIG_HOME", root.join("no-config"));
    cmd
}

/// Runs `sotto` to its end with a clean environment; status and standard error.
fn sotto_err(root: &Path, home: Option<&Path>, args: &[&str]) -> (ExitStatus, String) {
    let mut cmd = clean_command(root);
    if let Some(home) = home {
        cmd.arg("--home").arg(home);
    }
    // Output to a file and a deadline: a command that wrongly goes on serving must not
    // hang the test.
    let err_file = tempfile::NamedTempFile::new().unwrap();
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(err_file.reopen().unwrap()));
    let mut child = Kill(cmd.spawn().unwrap());
    let status = wait_exit(&mut child.0, Duration::from_secs(60));
    (status, fs::read_to_string(err_file.path()).unwrap())
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts a node on `data` (which makes its key, certificate and accounts), waits for
/// its address, stops it. A signal this early may end it before its handler is in
/// place, so how it exits is not asserted here.
fn node_once(data: &Path) -> String {
    let mut node = common::NodeProcess::start(data);
    let address = node.address.clone();
    node.stop();
    address
}

#[test]
fn a_node_refuses_a_data_directory_or_key_open_to_others() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("node");
    node_once(&data);
    let start = |data: &Path| sotto_err(root.path(), None, &["rendezvous", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()]);

    chmod(&data, 0o755);
    let (status, err) = start(&data);
    assert!(!status.success(), "a node served from a data directory open to others");
    assert!(err.contains(&format!("chmod 700 {}", data.display())) && err.contains("mode 755"), "{err}");
    assert_eq!(mode_of(&data), 0o755, "left for the operator to look at");

    chmod(&data, 0o700);
    chmod(&data.join("key.der"), 0o640);
    let (status, err) = start(&data);
    assert!(!status.success(), "a node used a key readable by others");
    assert!(err.contains(&format!("chmod 600 {}", data.join("key.der").display())), "{err}");

    chmod(&data.join("key.der"), 0o600);
    node_once(&data);
}

#[test]
fn a_profile_refuses_what_others_could_read_or_replace() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("node");
    let mut node = common::NodeProcess::start(&data);
    let user = common::User::new(root.path(), "carol");
    user.id_new();
    user.register(&node.address);
    let with_pp = |args: &[&str]| {
        let mut all = vec!["--passphrase-file", user.passphrase.to_str().unwrap()];
        all.extend_from_slice(args);
        sotto_err(root.path(), Some(&user.home), &all)
    };
    // `up` makes the peer certificate and the history, all private.
    let mut cmd = user.cmd(&["up", "--listen", "127.0.0.1:0"]);
    let out_file = root.path().join("up.out");
    cmd.env("XDG_RUNTIME_DIR", root.path().join("run")).stdout(Stdio::from(fs::File::create(&out_file).unwrap())).stderr(Stdio::null());
    let mut up = Kill(cmd.spawn().unwrap());
    let online = format!("{} is online at", user.name);
    assert!(eventually(Duration::from_secs(60), || fs::read_to_string(&out_file).unwrap().contains(&online)));
    up.stop("INT");
    assert_private_tree(&user.home);

    // The profile directory.
    chmod(&user.home, 0o750);
    let (status, err) = with_pp(&["id", "show"]);
    assert!(!status.success(), "a profile open to others was used");
    assert!(err.contains(&format!("chmod 700 {}", user.home.display())) && err.contains("mode 750"), "{err}");
    chmod(&user.home, 0o700);

    // The identity file.
    let identity = user.home.join("identity.sotto");
    chmod(&identity, 0o644);
    let (status, err) = with_pp(&["lookup", "carol"]);
    assert!(!status.success(), "an identity file readable by others was used");
    assert!(err.contains(&format!("chmod 600 {}", identity.display())), "{err}");
    chmod(&identity, 0o600);

    // The peer certificate's key.
    let key = user.home.join("peer").join("key.der");
    chmod(&key, 0o604);
    let (status, err) = with_pp(&["up", "--listen", "127.0.0.1:0"]);
    assert!(!status.success(), "a peer key readable by others was used");
    assert!(err.contains(&format!("chmod 600 {}", key.display())), "{err}");
    chmod(&key, 0o600);

    // Inner directories of a private profile (as older versions left them) are narrowed.
    chmod(&user.home.join("db"), 0o755);
    chmod(&user.home.join("peer"), 0o755);
    let (status, err) = with_pp(&["history"]);
    assert!(status.success(), "{err}");
    assert_eq!(mode_of(&user.home.join("db")), 0o700);

    // The control socket's directory, once it holds something (here what a killed `up`
    // could leave behind).
    let runtime = root.path().join("run").join("sotto");
    fs::write(runtime.join("left-behind"), b"").unwrap();
    chmod(&runtime, 0o777);
    let (status, err) = with_pp(&["up", "--listen", "127.0.0.1:0"]);
    assert!(!status.success(), "a control socket directory open to others was used");
    assert!(err.contains(&format!("chmod 700 {}", runtime.display())), "{err}");
    chmod(&runtime, 0o700);
    assert!(node.stop().success());
}
