//! `sotto chat [USER]`: the full-screen chat. Attaches to the running `sotto up` through
//! the control socket, or starts a node for as long as the screen is open; reads the
//! terminal on a thread; feeds key presses, events and call results to
//! [`sotto::chat::ChatState`] and draws it. Nothing is printed while the screen is up:
//! logs go to a file ([`log_writer`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use ratatui::crossterm::event::{self, Event as TermEvent};
use ratatui::DefaultTerminal;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::commands::{shutdown_signal, Context};
use super::messaging::{notify, LocalNode};
use sotto::chat::{self, Action, ChatState};
use sotto::clock::unix_now_ms;
use sotto::control::{ControlClient, RpcError};
use sotto::exit::ExitClass;
use sotto::online::Event as OnlineEvent;
use sotto::username::Username;

/// Messages loaded when a conversation opens.
const HISTORY: u64 = 200;
/// How often contacts (verification, key warnings) are read again; presence is pushed.
const REFRESH: Duration = Duration::from_secs(30);
/// How long the terminal reader waits before checking whether to stop.
const POLL: Duration = Duration::from_millis(100);

/// Where `sotto chat` logs: `HOME/chat.log` (0600, appended). If it cannot be opened
/// the logs are dropped: they must never be written over the screen.
pub fn log_writer(path: &Path) -> Mutex<Box<dyn Write + Send>> {
    let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path);
    Mutex::new(match file {
        Ok(file) => Box::new(file),
        Err(e) => {
            eprintln!("sotto: cannot open the log file {}: {e}; chat logs are discarded", path.display());
            Box::new(std::io::sink())
        }
    })
}

/// The log file of `sotto chat` for the profile in `home`.
pub fn log_path(home: &Path) -> PathBuf {
    home.join("chat.log")
}

/// A node this process started; stopped (presence withdrawn) when the chat ends.
struct Started {
    stop: watch::Sender<bool>,
    /// `None` once it ended (and the screen reported how).
    task: Option<JoinHandle<Result<()>>>,
    events: mpsc::UnboundedReceiver<OnlineEvent>,
}

/// Answers to calls made while the screen runs.
enum Reply {
    Sent { token: u64, result: Result<Value, RpcError> },
    History { peer: String, result: Result<Value, RpcError> },
    Contacts(Result<Value, RpcError>),
}

/// Makes calls without blocking the screen: each on its own connection, its answer
/// coming back as a [`Reply`].
#[derive(Clone)]
struct Caller {
    socket: PathBuf,
    replies: mpsc::UnboundedSender<Reply>,
}

impl Caller {
    fn call(&self, method: &'static str, params: Value, reply: impl FnOnce(Result<Value, RpcError>) -> Reply + Send + 'static) {
        let this = self.clone();
        tokio::spawn(async move {
            let result = match ControlClient::connect(&this.socket).await {
                Some(mut node) => node.call(method, params).await,
                None => Err(RpcError::new(ExitClass::Failure, "the sotto node is not running")),
            };
            let _ = this.replies.send(reply(result));
        });
    }

    fn act(&self, action: Action, state: &ChatState) {
        match action {
            Action::Send { to, body, token } => {
                self.call("send", json!({ "to": to, "body": body }), move |result| Reply::Sent { token, result })
            }
            Action::Select(peer) => self.history(peer),
            Action::Reload => {
                self.contacts();
                if let Some(peer) = state.selected() {
                    self.history(peer.to_string());
                }
            }
            Action::Quit => {}
        }
    }

    fn history(&self, peer: String) {
        let params = json!({ "peer": peer, "limit": HISTORY });
        self.call("history", params, move |result| Reply::History { peer, result });
    }

    fn contacts(&self) {
        self.call("contacts", json!({}), Reply::Contacts);
    }
}

pub async fn chat(ctx: &Context, user: Option<&str>) -> Result<()> {
    let user = user.map(Username::parse).transpose()?;
    let socket = ctx.socket_path();
    let mut started = match ctx.running_node().await {
        Some(_) => None,
        None => {
            let listen = ctx.config.listen.unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
            let node = LocalNode::start(ctx, listen, 60).await?;
            let (stop, stopped) = watch::channel(false);
            let (tell, events) = mpsc::unbounded_channel();
            let task = tokio::spawn(node.stay_online(stopped, move |event| {
                let _ = tell.send(event);
            }));
            Some(Started { stop, task: Some(task), events })
        }
    };
    let result = attach(ctx, &socket, user, &mut started).await;
    let Some(node) = started else { return result };
    let _ = node.stop.send(true);
    // Without a task it stopped by itself (say, this identity was replaced), and `result`
    // says why.
    let Some(task) = node.task else { return result };
    let stopped = task.await.context("the node task failed")?;
    result.and(stopped)
}

/// Loads the first screen before taking over the terminal (so that a failure is
/// printed plainly), then runs the screen until the user quits.
async fn attach(ctx: &Context, socket: &Path, user: Option<Username>, started: &mut Option<Started>) -> Result<()> {
    let connect = || async { ControlClient::connect(socket).await.context("cannot reach the sotto node's control socket") };
    let mut events_conn = connect().await?;
    events_conn.call("subscribe", json!({})).await?;
    let mut calls = connect().await?;
    let mut state = ChatState::new();
    state.set_colour(std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()));
    state.apply_status(&calls.call("status", json!({})).await?);
    state.apply_contacts(&calls.call("contacts", json!({})).await?);
    // The named user, else whoever wrote last, else the first contact.
    let newest = calls.call("history", json!({ "limit": 1 })).await?;
    let first = match user {
        Some(user) => Some(user.as_str().to_string()),
        None => newest.pointer("/messages/0/peer").and_then(Value::as_str).map(String::from),
    }
    .or_else(|| state.contacts().first().map(|c| c.name.clone()));
    if let Some(peer) = first {
        state.select(&peer);
        state.apply_history(&peer, &calls.call("history", json!({ "peer": peer, "limit": HISTORY })).await?);
    }
    let now = unix_now_ms();
    match started {
        Some(_) => state.add_notice("started a node for this chat: you are online while it is open", false, now),
        None => state.add_notice("attached to the running sotto node", false, now),
    }
    drop(calls);

    let (events_tx, events) = mpsc::unbounded_channel();
    let forward = tokio::spawn(async move {
        while let Ok(event) = events_conn.next_event().await {
            if events_tx.send(event).is_err() {
                return;
            }
        }
    });
    // Our own node only: a running `sotto up` notifies by itself.
    let notify_how = if started.is_some() { ctx.config.notify } else { sotto::config::Notify::Off };

    let terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let mut screen = Screen { terminal: Some(terminal), stop_reader: Arc::new(AtomicBool::new(false)), reader: None };
    let (keys_tx, keys) = mpsc::unbounded_channel();
    screen.reader = Some(read_terminal(keys_tx, screen.stop_reader.clone()));
    let (replies_tx, replies) = mpsc::unbounded_channel();
    let caller = Caller { socket: socket.to_path_buf(), replies: replies_tx };
    let inputs = Inputs { keys, events, replies, started };
    let result = run(&mut screen, &mut state, &caller, inputs, notify_how).await;
    screen.close().await;
    forward.abort();
    result
}

/// The terminal while the chat owns it; restored on every way out (a panic too:
/// ratatui's hook restores it).
struct Screen {
    terminal: Option<DefaultTerminal>,
    stop_reader: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Screen {
    async fn close(&mut self) {
        self.stop_reader.store(true, Ordering::Relaxed);
        if self.terminal.take().is_some() {
            ratatui::restore();
        }
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop_reader.store(true, Ordering::Relaxed);
        if self.terminal.take().is_some() {
            ratatui::restore();
        }
    }
}

/// Reads terminal events on a thread (crossterm's reads block) until told to stop or
/// the receiver is gone.
fn read_terminal(tx: mpsc::UnboundedSender<TermEvent>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match event::poll(POLL) {
                Ok(false) => {}
                Ok(true) => {
                    let Ok(e) = event::read() else { return };
                    if tx.send(e).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    })
}

struct Inputs<'a> {
    keys: mpsc::UnboundedReceiver<TermEvent>,
    events: mpsc::UnboundedReceiver<Value>,
    replies: mpsc::UnboundedReceiver<Reply>,
    started: &'a mut Option<Started>,
}

/// Completes when the node this process started stops by itself (and forgets its
/// task); never without one.
async fn node_stopped(task: Option<&mut Option<JoinHandle<Result<()>>>>) -> Result<()> {
    let Some(slot) = task else { return std::future::pending().await };
    let Some(handle) = slot.as_mut() else { return std::future::pending().await };
    let ended = handle.await;
    *slot = None;
    ended.context("the node task failed")?
}

/// A notice for what the node this process started reports.
fn online_notice(event: OnlineEvent) -> Option<String> {
    match event {
        OnlineEvent::Online { expires_in, .. } => Some(format!("you are online; presence renews every {} s", expires_in / 3)),
        OnlineEvent::Republished { .. } => None,
        OnlineEvent::Lost { reason, retry_in } => Some(format!("{reason}; retrying in {:.1} s", retry_in.as_secs_f32())),
        OnlineEvent::Withdrawn => Some("you are offline".into()),
    }
}

/// One thing that happened while the screen waited.
enum Input {
    Terminal(TermEvent),
    Event(Value),
    Reply(Reply),
    Node(OnlineEvent),
    Refresh,
}

async fn run(
    screen: &mut Screen,
    state: &mut ChatState,
    caller: &Caller,
    mut inputs: Inputs<'_>,
    notify_how: sotto::config::Notify,
) -> Result<()> {
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let (mut node_task, mut node_events) = match inputs.started {
        Some(node) => (Some(&mut node.task), Some(&mut node.events)),
        None => (None, None),
    };
    loop {
        if let Some(terminal) = screen.terminal.as_mut() {
            terminal.draw(|frame| chat::render(frame, state)).context("cannot draw the screen")?;
        }
        let input = tokio::select! {
            key = inputs.keys.recv() => match key {
                Some(key) => Input::Terminal(key),
                None => bail!("lost the terminal"),
            },
            event = inputs.events.recv() => match event {
                Some(event) => Input::Event(event),
                None if node_task.as_ref().is_some_and(|t| t.is_some()) => {
                    // Our own node closed the socket: it is stopping; its task says why.
                    node_stopped(node_task.as_deref_mut()).await?;
                    bail!("the node stopped");
                }
                None => bail!("the running sotto node stopped"),
            },
            Some(reply) = inputs.replies.recv() => Input::Reply(reply),
            Some(event) = async { node_events.as_deref_mut()?.recv().await } => Input::Node(event),
            result = node_stopped(node_task.as_deref_mut()) => {
                result?;
                bail!("the node stopped");
            },
            _ = refresh.tick() => Input::Refresh,
            _ = &mut signal => return Ok(()),
        };
        let now = unix_now_ms();
        let action = match input {
            Input::Terminal(TermEvent::Key(key)) => state.handle_key(key, now),
            // A resize (or anything else) only redraws.
            Input::Terminal(_) => None,
            Input::Event(event) => {
                if event.get("type").and_then(Value::as_str) == Some("message") {
                    let from = event.pointer("/message/peer").and_then(Value::as_str).and_then(|p| Username::parse(p).ok());
                    if let Some(from) = from {
                        notify(notify_how, &from);
                    }
                }
                state.apply_event(&event, now)
            }
            Input::Reply(Reply::Sent { token, result }) => {
                state.apply_send_result(token, result.as_ref(), now);
                None
            }
            Input::Reply(Reply::History { peer, result: Ok(history) }) => {
                state.apply_history(&peer, &history);
                None
            }
            Input::Reply(Reply::Contacts(Ok(contacts))) => {
                state.apply_contacts(&contacts);
                None
            }
            Input::Reply(Reply::History { result: Err(e), .. } | Reply::Contacts(Err(e))) => {
                state.add_notice(e.message, false, now);
                None
            }
            Input::Node(event) => {
                if let Some(text) = online_notice(event) {
                    state.add_notice(text, false, now);
                }
                None
            }
            Input::Refresh => Some(Action::Reload),
        };
        match action {
            Some(Action::Quit) => return Ok(()),
            Some(action) => caller.act(action, state),
            None => {}
        }
    }
}
