//! The local control socket: newline-delimited JSON-RPC 2.0 over a Unix socket (mode
//! 0600, in a 0700 directory under the runtime dir), served by `sotto up` so that the
//! profile's other commands use the running node instead of the locked database.
//!
//! Requests and responses are one JSON object per line, at most [`MAX_LINE`] bytes.
//! After a `subscribe` call, the connection also receives notifications
//! `{"jsonrpc":"2.0","method":"event","params":{"event_id":N,"type":...}}` with
//! increasing ids. Only the user who owns the process may connect (`SO_PEERCRED`).
//!
//! Nothing secret crosses the socket except what the user asked for (message bodies,
//! history): no passphrase, password or key. The directory must be ours, not a symbolic
//! link, and 0700: an empty one is narrowed to 0700, one that is open to others and
//! already holds something is refused (see [`private_dir`]).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::debug;

use crate::exit::ExitClass;
use crate::profile::private_dir;

/// Longest request or response line.
pub const MAX_LINE: usize = 1 << 20;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// Application errors; `data.exit` carries the exit class.
pub const APP_ERROR: i64 = -32000;

/// An error answer: a JSON-RPC code, a message, and the exit class of the failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub exit: ExitClass,
}

impl RpcError {
    pub fn new(exit: ExitClass, message: impl Into<String>) -> Self {
        Self { code: APP_ERROR, message: message.into(), exit }
    }

    pub fn params(message: impl Into<String>) -> Self {
        Self { code: INVALID_PARAMS, message: message.into(), exit: ExitClass::Usage }
    }

    fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message, "data": { "exit": self.exit as u8 } })
    }
}

/// What the socket serves.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, method: String, params: Value) -> impl std::future::Future<Output = Result<Value, RpcError>> + Send;

    /// Events for `subscribe`, each a JSON object with an increasing `event_id`; `None`
    /// if this handler has none.
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<Value>> {
        None
    }
}

/// A notification line carrying one event.
pub fn event_notification(event: &Value) -> Value {
    json!({ "jsonrpc": "2.0", "method": "event", "params": event })
}

/// `RUNTIME/sotto-<hash of the profile path>.sock`: short enough for `sun_path`, one
/// per profile. `RUNTIME` must be a directory of this user's alone (see [`private_dir`]).
pub fn socket_path(runtime_dir: &Path, home: &Path) -> PathBuf {
    let canonical = home.canonicalize().unwrap_or_else(|_| home.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    runtime_dir.join(format!("sotto-{}.sock", hex::encode(&digest[..8])))
}

/// The effective uid of this process.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Binds the socket. Refuses if a live node already serves it; removes a stale file.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        private_dir(dir, false)?;
    }
    if path.exists() {
        let live = UnixStream::connect(path).await.ok().and_then(|s| s.peer_cred().ok()).map(|c| c.uid());
        if live == Some(own_uid()) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "another `sotto up` is already running for this profile"));
        }
        // Stale, or someone else's: the directory is ours, so the name is too.
        std::fs::remove_file(path)?;
    }
    // The directory is ours and 0700, so nobody else can reach the socket even before
    // its own mode is set; the binary's umask 077 creates it 0700 in the first place.
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections until the listener fails or the task is dropped.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    let uid = own_uid();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait and go on rather than stop serving.
                debug!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let allowed = stream.peer_cred().is_ok_and(|cred| cred.uid() == uid);
        if !allowed {
            debug!("refused a control connection from another user");
            continue;
        }
        tokio::spawn(serve_connection(stream, handler.clone()));
    }
}

async fn serve_connection<H: Handler>(stream: UnixStream, handler: Arc<H>) {
    let (read, write) = stream.into_split();
    let write = Arc::new(tokio::sync::Mutex::new(write));
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    let mut forwarder: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        line.clear();
        let n = match (&mut lines).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await {
            Ok(n) => n,
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        let oversized = line.len() > MAX_LINE;
        let response = if oversized {
            error_response(Value::Null, &RpcError { code: INVALID_REQUEST, message: "request too large".into(), exit: ExitClass::Usage })
        } else if let Some((id, events)) = subscription(&*handler, &line) {
            // Forward events from now on; answer first (unless it came as a
            // notification, which gets no answer) so the client sees the result before
            // the first event.
            if let Some(id) = id {
                let answer = json!({ "jsonrpc": "2.0", "id": id, "result": { "subscribed": events.is_some() } });
                if write_line(&write, &answer).await.is_err() {
                    break;
                }
            }
            if let (Some(events), None) = (events, &forwarder) {
                forwarder = Some(tokio::spawn(forward(events, write.clone())));
            }
            continue;
        } else {
            answer(&*handler, &line).await
        };
        if let Some(response) = response {
            if write_line(&write, &response).await.is_err() {
                break;
            }
        }
        if oversized {
            break;
        }
    }
    if let Some(f) = forwarder {
        f.abort();
    }
}

async fn write_line(write: &tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>, value: &Value) -> io::Result<()> {
    let mut out = value.to_string().into_bytes();
    out.push(b'\n');
    write.lock().await.write_all(&out).await
}

/// A `subscribe` request's id (`None` for a notification) and the handler's events.
type Subscription = (Option<Value>, Option<tokio::sync::broadcast::Receiver<Value>>);

/// If `line` is a `subscribe` request: its id and the handler's events.
fn subscription<H: Handler>(handler: &H, line: &[u8]) -> Option<Subscription> {
    let request: Value = serde_json::from_slice(line).ok()?;
    if request.get("jsonrpc")?.as_str()? != "2.0" || request.get("method")?.as_str()? != "subscribe" {
        return None;
    }
    let id = request.get("id").cloned();
    // Any other id makes it an invalid request, which `answer` refuses.
    if id.as_ref().is_some_and(|id| !(id.is_number() || id.is_string() || id.is_null())) {
        return None;
    }
    Some((id, handler.events()))
}

async fn forward(mut events: tokio::sync::broadcast::Receiver<Value>, write: Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            // A slow reader misses events; it learns so and can re-read state.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => json!({ "type": "lagged", "missed": n }),
            Err(_) => return,
        };
        if write_line(&write, &event_notification(&event)).await.is_err() {
            return;
        }
    }
}

fn error_response(id: Value, e: &RpcError) -> Option<Value> {
    Some(json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }))
}

/// Answers one request line; `None` for a notification (no id). `subscribe` is served
/// by the connection loop before it gets here.
pub async fn answer<H: Handler>(handler: &H, line: &[u8]) -> Option<Value> {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => {
            return error_response(Value::Null, &RpcError { code: PARSE_ERROR, message: "parse error".into(), exit: ExitClass::Usage })
        }
    };
    let id = request.get("id").cloned();
    let invalid = |msg: &str| {
        // An id that is not a number or a string cannot be answered to: JSON-RPC 2.0 says null.
        let id = id.clone().filter(|i| i.is_number() || i.is_string()).unwrap_or(Value::Null);
        error_response(id, &RpcError { code: INVALID_REQUEST, message: msg.into(), exit: ExitClass::Usage })
    };
    if request.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("not a JSON-RPC 2.0 request");
    }
    let Some(method) = request.get("method").and_then(Value::as_str) else { return invalid("no method") };
    if id.as_ref().is_some_and(|i| !(i.is_number() || i.is_string() || i.is_null())) {
        return invalid("id must be a number or a string");
    }
    let params = request.get("params").cloned().unwrap_or(Value::Object(Default::default()));
    let result = handler.call(method.to_string(), params).await;
    let id = id?;
    Some(match result {
        Ok(value) => json!({ "jsonrpc": "2.0", "id": id, "result": value }),
        Err(e) => json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
    })
}

/// Connects to a running node's socket; `None` if none runs. A socket in a directory
/// that is not ours, or served by another user, is never talked to.
pub async fn connect_raw(path: &Path) -> Option<UnixStream> {
    private_dir(path.parent()?, false).ok()?;
    let stream = UnixStream::connect(path).await.ok()?;
    stream.peer_cred().is_ok_and(|cred| cred.uid() == own_uid()).then_some(stream)
}

/// A client of a running node's control socket.
pub struct ControlClient {
    lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
    next_id: u64,
    /// Notifications that arrived while waiting for a response.
    pending: std::collections::VecDeque<Value>,
}

impl ControlClient {
    /// Connects if a node is running for this socket; `None` if none is.
    pub async fn connect(path: &Path) -> Option<ControlClient> {
        let (read, write) = connect_raw(path).await?.into_split();
        Some(ControlClient { lines: BufReader::new(read), write, next_id: 1, pending: Default::default() })
    }

    async fn read_message(&mut self) -> Result<Value, RpcError> {
        let lost = |_| RpcError::new(ExitClass::Failure, "lost the connection to the running sotto node");
        let mut line = Vec::new();
        let n = (&mut self.lines).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await.map_err(lost)?;
        if n == 0 || line.len() > MAX_LINE {
            return Err(RpcError::new(ExitClass::Failure, "the running sotto node closed the control connection"));
        }
        serde_json::from_slice(&line).map_err(|_| RpcError::new(ExitClass::Failure, "unreadable answer from the running sotto node"))
    }

    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, RpcError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string().into_bytes();
        out.push(b'\n');
        self.write.write_all(&out).await.map_err(|_| RpcError::new(ExitClass::Failure, "lost the connection to the running sotto node"))?;
        let response = loop {
            let message = self.read_message().await?;
            if message.get("id").is_some_and(|i| i == &json!(id)) {
                break message;
            }
            if message.get("method").is_some() {
                self.pending.push_back(message);
            }
        };
        if let Some(error) = response.get("error") {
            let exit =
                error.pointer("/data/exit").and_then(Value::as_u64).map(|c| ExitClass::from_code(c as u8)).unwrap_or(ExitClass::Failure);
            let message = error.get("message").and_then(Value::as_str).unwrap_or("error").to_string();
            let code = error.get("code").and_then(Value::as_i64).unwrap_or(APP_ERROR);
            return Err(RpcError { code, message, exit });
        }
        Ok(response.get("result").cloned().unwrap_or(Value::Null))
    }

    /// The next event after `subscribe` (its `params`).
    pub async fn next_event(&mut self) -> Result<Value, RpcError> {
        loop {
            let message = match self.pending.pop_front() {
                Some(m) => m,
                None => self.read_message().await?,
            };
            if message.get("method").and_then(Value::as_str) == Some("event") {
                return Ok(message.get("params").cloned().unwrap_or(Value::Null));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(tokio::sync::broadcast::Sender<Value>);

    impl Handler for Echo {
        fn events(&self) -> Option<tokio::sync::broadcast::Receiver<Value>> {
            Some(self.0.subscribe())
        }

        async fn call(&self, method: String, params: Value) -> Result<Value, RpcError> {
            match method.as_str() {
                "echo" => Ok(params),
                "fail" => Err(RpcError::new(ExitClass::Unreachable, "bob is offline")),
                _ => Err(RpcError { code: METHOD_NOT_FOUND, message: "no such method".into(), exit: ExitClass::Usage }),
            }
        }
    }

    #[tokio::test]
    async fn round_trip_errors_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir.path().join("run"), Path::new("/some/profile"));
        let listener = bind(&path).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let events = tokio::sync::broadcast::channel(8).0;
        tokio::spawn(serve(listener, Arc::new(Echo(events.clone()))));

        let mut client = ControlClient::connect(&path).await.unwrap();
        assert_eq!(client.call("echo", json!({"a": 1})).await.unwrap(), json!({"a": 1}));
        assert_eq!(client.call("subscribe", json!({})).await.unwrap(), json!({"subscribed": true}));
        events.send(json!({"event_id": 1, "type": "presence"})).unwrap();
        events.send(json!({"event_id": 2, "type": "message"})).unwrap();
        // A call made while events arrive still gets its own answer; the events wait.
        assert_eq!(client.call("echo", json!(7)).await.unwrap(), json!(7));
        assert_eq!(client.next_event().await.unwrap()["event_id"], 1);
        assert_eq!(client.next_event().await.unwrap()["event_id"], 2);
        let e = client.call("fail", json!({})).await.unwrap_err();
        assert_eq!((e.code, e.exit, e.message.as_str()), (APP_ERROR, ExitClass::Unreachable, "bob is offline"));
        assert_eq!(client.call("nope", json!({})).await.unwrap_err().code, METHOD_NOT_FOUND);

        // Raw garbage, a wrong version, an oversized line: answered, connection stays usable
        // (except after the oversized line, which closes it).
        let stream = UnixStream::connect(&path).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"{not json\n").await.unwrap();
        let v: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(v["error"]["code"], PARSE_ERROR);
        write.write_all(b"{\"jsonrpc\":\"1.0\",\"id\":3,\"method\":\"echo\"}\n").await.unwrap();
        let v: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (json!(3), json!(INVALID_REQUEST)));
        // `subscribe` as a notification: no answer, but the events come.
        write.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"subscribe\"}\n").await.unwrap();
        write.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"echo\",\"params\":[]}\n").await.unwrap();
        let v: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(v["id"], 4, "the next line answers the next request: {v}");
        events.send(json!({"event_id": 3, "type": "presence"})).unwrap();
        let v: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(v.get("id").is_none() && v["params"]["event_id"] == 3, "{v}");
        write.write_all(&vec![b'x'; MAX_LINE + 10]).await.unwrap();
        let v: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(v["error"]["message"], "request too large");
    }

    #[tokio::test]
    async fn second_server_is_refused_and_stale_socket_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("s.sock");
        let listener = bind(&path).await.unwrap();
        assert_eq!(bind(&path).await.unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        assert!(bind(&path).await.is_ok(), "a stale socket file is replaced");
        assert_eq!(std::fs::metadata(dir.path().join("run")).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[tokio::test]
    async fn the_socket_directory_is_closed_and_never_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let loose = dir.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
        let _listener = bind(&loose.join("s.sock")).await.unwrap();
        assert_eq!(std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777, 0o700, "narrowed to 0700");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&loose, &link).unwrap();
        assert_eq!(bind(&link.join("t.sock")).await.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert!(ControlClient::connect(&link.join("s.sock")).await.is_none(), "never talks through a symlinked directory");
    }

    #[tokio::test]
    async fn a_socket_directory_opened_to_others_after_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let path = run.join("s.sock");
        let listener = bind(&path).await.unwrap();
        drop(listener);
        // Someone could have planted a socket or swapped ours while the directory was open.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o733)).unwrap();
        let e = bind(&path).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let shown = e.to_string();
        assert!(shown.contains(&format!("chmod 700 {}", run.display())) && shown.contains("mode 733"), "{shown}");
        assert!(ControlClient::connect(&path).await.is_none(), "a client does not use it either");
        assert_eq!(std::fs::metadata(&run).unwrap().permissions().mode() & 0o777, 0o733, "left as found");
    }
}
