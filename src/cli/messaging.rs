//! Commands that work on messages, contacts and presence. Each asks a running
//! `sotto up` through the control socket when there is one, and otherwise does the
//! work itself with the same library calls.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::commands::{shutdown_signal, Context};
use super::exit::{UntrustedError, UsageError};
use sotto::app::{self, NodeMethods};
use sotto::clock::{rfc3339, unix_now};
use sotto::config::Notify;
use sotto::control;
use sotto::keys::Identity;
use sotto::online::{self, Event, Presence};
use sotto::peer::agent::{Agent, AgentConfig, AgentEvent};
use sotto::peer::session::MAX_BODY;
use sotto::profile::Profile;
use sotto::rendezvous::client::{verify_lookup, RendezvousClient, LOOKUP_SKEW};
use sotto::store::{SledStore, Store};
use sotto::tls::CertKey;
use sotto::username::Username;

/// The profile's peer certificate (made on first use).
fn peer_cert(profile: &Profile) -> Result<CertKey> {
    let dir = profile.home().join("peer");
    CertKey::load_or_create(&dir, "sotto-peer").with_context(|| format!("cannot load or create the peer certificate in {}", dir.display()))
}

fn open_store(profile: &Profile) -> Result<Arc<dyn Store>> {
    let path = profile.history_dir()?;
    match SledStore::open(&path) {
        Ok(store) => Ok(Arc::new(store)),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot open the history in {} (if `sotto up` is starting or stopping for this profile, try again)",
            path.display()
        ))),
    }
}

/// Writes a line to stdout, ignoring a closed pipe (`sotto up | head` must not kill up).
fn say(line: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

fn clock_of(ms: u64) -> String {
    rfc3339(ms)[11..19].to_string()
}

/// A node started by this process: peer agent, control socket, presence to keep.
pub(super) struct LocalNode {
    agent: Agent,
    identity: Arc<Identity>,
    presence: Presence,
    socket: std::path::PathBuf,
}

impl LocalNode {
    /// Unlocks the identity, opens the database, binds the peer endpoint and the
    /// control socket, and starts watching contacts' presence.
    pub(super) async fn start(ctx: &Context, listen: SocketAddr, ttl: u64) -> Result<LocalNode> {
        let profile = ctx.profile()?;
        let (server, username) = ctx.account(&profile)?;
        let identity = Arc::new(ctx.unlock(&profile)?);
        let cert = peer_cert(&profile)?;
        let socket = ctx.socket_path();
        let control = control::bind(&socket).await.with_context(|| format!("cannot open the control socket {}", socket.display()))?;
        let store = open_store(&profile)?;
        let agent =
            Agent::start(identity.clone(), store, &cert, AgentConfig { username: username.clone(), server: server.clone(), listen })?;
        let addrs = agent.advertised_addrs().await;
        agent.watch_contacts();
        tokio::spawn(control::serve(control, Arc::new(NodeMethods::new(agent.clone(), server.clone()))));
        let presence = Presence { server, username, addrs, cert_sha256: cert.sha256(), ttl };
        Ok(LocalNode { agent, identity, presence, socket })
    }

    /// Publishes presence until `stopped` turns true (or a fatal error), then stops.
    pub(super) async fn stay_online(self, stopped: watch::Receiver<bool>, on_event: impl Fn(Event)) -> Result<()> {
        let result = online::stay_online(&self.identity, &self.presence, stopped, on_event).await;
        self.agent.shutdown().await;
        let _ = std::fs::remove_file(&self.socket);
        Ok(result?)
    }
}

/// A watch channel that turns true on SIGINT or SIGTERM.
fn stop_on_signal() -> watch::Receiver<bool> {
    let (stop, stopped) = watch::channel(false);
    let signal = shutdown_signal();
    tokio::spawn(async move {
        signal.await;
        let _ = stop.send(true);
    });
    stopped
}

pub async fn up(ctx: &Context, listen: SocketAddr, ttl: u64, json: bool) -> Result<()> {
    let node = LocalNode::start(ctx, listen, ttl).await?;
    tokio::spawn(print_events(node.agent.subscribe(), json, ctx.config.notify));
    let (server, username, addrs) = (node.presence.server.clone(), node.presence.username.clone(), node.presence.addrs.clone());
    node.stay_online(stop_on_signal(), |event| match event {
        Event::Online { observed, expires_in } if json => {
            say(json!({ "event": "online", "username": username.as_str(), "observed": observed.to_string(), "addrs": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(), "renew_secs": expires_in / 3 }))
        }
        Event::Online { observed, expires_in } => {
            say(format!("{username} is online at {server}"));
            let listening = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
            say(format!("peers reach this machine at {listening}; the node sees it as {observed}; presence renews every {} s. Ctrl-C to go offline.", expires_in / 3));
        }
        Event::Republished { .. } => {}
        Event::Lost { reason, retry_in } => eprintln!("{reason}; retrying in {:.1} s", retry_in.as_secs_f32()),
        Event::Withdrawn if json => say(json!({ "event": "offline", "username": username.as_str() })),
        Event::Withdrawn => say(format!("{username} is offline")),
    })
    .await
}

/// `sotto rpc --stdio`: JSON-RPC on standard input and output, served by the running
/// node, or by one started here for as long as standard input stays open.
pub async fn rpc(ctx: &Context) -> Result<()> {
    if let Some(stream) = control::connect_raw(&ctx.socket_path()).await {
        return proxy(stream).await;
    }
    let node = LocalNode::start(ctx, ([0, 0, 0, 0], 0).into(), 60).await?;
    let stream = control::connect_raw(&node.socket).await.context("cannot reach the node this process started")?;
    let (stop, stopped) = watch::channel(false);
    let mut signal = stop_on_signal();
    let online = tokio::spawn(node.stay_online(stopped, |event| {
        if let Event::Lost { reason, retry_in } = event {
            eprintln!("{reason}; retrying in {:.1} s", retry_in.as_secs_f32());
        }
    }));
    tokio::select! {
        result = proxy(stream) => result?,
        _ = signal.changed() => {}
    }
    let _ = stop.send(true);
    online.await.context("the node task failed")?
}

/// Copies standard input to the control socket and the socket to standard output
/// until standard input ends and the node has answered.
async fn proxy(stream: tokio::net::UnixStream) -> Result<()> {
    let (mut from_node, mut to_node) = stream.into_split();
    let upstream = async {
        tokio::io::copy(&mut tokio::io::stdin(), &mut to_node).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut to_node).await
    };
    let mut stdout = tokio::io::stdout();
    let downstream = tokio::io::copy(&mut from_node, &mut stdout);
    let (up, down) = tokio::join!(upstream, downstream);
    up.context("reading standard input")?;
    down.context("writing standard output")?;
    Ok(())
}

/// Tells the user a message arrived, as the config file asks: the terminal bell, or a
/// desktop notification naming the sender (never the text).
pub(super) fn notify(how: Notify, from: &Username) {
    match how {
        Notify::Off => {}
        Notify::Bell => {
            let mut err = std::io::stderr();
            let _ = err.write_all(b"\x07").and_then(|_| err.flush());
        }
        Notify::Desktop => {
            let spawned = std::process::Command::new("notify-send")
                .args(["sotto", &format!("New message from {from}")])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            if let Ok(mut child) = spawned {
                // Reap it in the background; a missing or failing notifier is not an error.
                std::thread::spawn(move || child.wait());
            }
        }
    }
}

async fn print_events(mut events: tokio::sync::broadcast::Receiver<AgentEvent>, json: bool, how: Notify) {
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("({n} events not shown; see `sotto history`)");
                continue;
            }
            Err(_) => return,
        };
        if let AgentEvent::Received(m) = &event {
            notify(how, &m.peer);
        }
        match event {
            AgentEvent::Received(m) if json => {
                let mut v = app::message_json(&m);
                v["event"] = json!("message");
                say(v);
            }
            AgentEvent::Received(m) => say(format!("[{}] {}: {}", clock_of(m.stored_at), m.peer, app::printable(&m.body))),
            AgentEvent::KeyChanged { peer, pinned, presented } => {
                if json {
                    say(
                        json!({ "event": "key_changed", "peer": peer.as_str(), "pinned": pinned.fingerprint().to_string(), "presented": presented.fingerprint().to_string() }),
                    );
                }
                eprintln!("WARNING: {peer}'s identity key CHANGED (pinned {}, presented {}). Refused until you verify: `sotto contact verify {peer}`.", pinned.fingerprint(), presented.fingerprint());
            }
            AgentEvent::Delivered { peer, id } if json => {
                say(json!({ "event": "delivered", "peer": peer.as_str(), "id": hex::encode(id) }))
            }
            AgentEvent::Presence { peer, online } if json => say(json!({ "event": "presence", "peer": peer.as_str(), "online": online })),
            AgentEvent::Presence { peer, online } => {
                say(format!("[{}] {peer} {}", clock_of(sotto::clock::unix_now_ms()), if online { "is online" } else { "went offline" }))
            }
            _ => {}
        }
    }
}

/// The message body: the argument, or standard input (at most MAX_BODY bytes).
fn message_body(message: Option<String>) -> Result<String> {
    let body = match message {
        Some(m) => m,
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .lock()
                .take(MAX_BODY as u64 + 1)
                .read_to_end(&mut buf)
                .context("cannot read the message from standard input")?;
            let text = String::from_utf8(buf).map_err(|_| UsageError("the message is not UTF-8 text".into()))?;
            text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_string()
        }
    };
    if body.is_empty() {
        bail!(UsageError("the message is empty".into()));
    }
    if body.len() > MAX_BODY {
        bail!(UsageError(format!("the message is over {MAX_BODY} bytes")));
    }
    Ok(body)
}

pub async fn send(ctx: &Context, user: &str, message: Option<String>) -> Result<()> {
    let to = Username::parse(user)?;
    let body = message_body(message)?;
    if let Some(mut node) = ctx.running_node().await {
        let sent = node.call("send", json!({ "to": to.as_str(), "body": body })).await?;
        say(format!("delivered to {to} (id {})", sent["id"].as_str().unwrap_or("?")));
        return Ok(());
    }
    let profile = ctx.profile()?;
    let (server, username) = ctx.account(&profile)?;
    let identity = Arc::new(ctx.unlock(&profile)?);
    let cert = peer_cert(&profile)?;
    let store = open_store(&profile)?;
    let listen: SocketAddr = ([0, 0, 0, 0], 0).into();
    let agent = Agent::start(identity, store, &cert, AgentConfig { username, server, listen })?;
    let result = agent.send(&to, &body).await;
    agent.shutdown().await;
    let sent = result?;
    say(format!("delivered to {to} (id {})", hex::encode(sent.id)));
    Ok(())
}

fn print_messages(messages: &[Value], json: bool) {
    for m in messages {
        if json {
            say(m);
            continue;
        }
        let arrow = if m["direction"] == "out" { "→" } else { "←" };
        // This machine's clock: a sender's own `sent_at` is theirs to set.
        let at = m["stored_at"].as_str().unwrap_or("");
        let when = at.get(..19).unwrap_or(at).replace('T', " ");
        let state = m["state"].as_str().unwrap_or("");
        let mark = match state {
            "received" | "delivered" => String::new(),
            other => format!("  [{other}]"),
        };
        say(format!("{when} {arrow} {}  {}{mark}", m["peer"].as_str().unwrap_or(""), app::printable(m["body"].as_str().unwrap_or(""))));
    }
}

pub async fn history(ctx: &Context, user: Option<&str>, limit: usize, json: bool) -> Result<()> {
    let peer = user.map(Username::parse).transpose()?;
    let messages = match ctx.running_node().await {
        Some(mut node) => {
            let result = node.call("history", json!({ "peer": peer.as_ref().map(|p| p.as_str()), "limit": limit })).await?;
            result["messages"].as_array().cloned().unwrap_or_default()
        }
        None => app::history(open_store(&ctx.profile()?)?.as_ref(), peer.as_ref(), limit)?,
    };
    if messages.is_empty() && !json {
        eprintln!("no messages{}", peer.map(|p| format!(" with {p}")).unwrap_or_default());
    }
    print_messages(&messages, json);
    Ok(())
}

pub async fn contacts(ctx: &Context, json: bool) -> Result<()> {
    let list = match ctx.running_node().await {
        Some(mut node) => node.call("contacts", json!({})).await?["contacts"].as_array().cloned().unwrap_or_default(),
        None => {
            let profile = ctx.profile()?;
            let store = open_store(&profile)?;
            let online = match signed_in(ctx).await {
                Ok((client, _)) => {
                    let names = client.online().await.ok().map(|(n, _)| n);
                    client.close().await;
                    names
                }
                Err(e) => {
                    eprintln!("(online status unknown: {e:#})");
                    None
                }
            };
            app::contacts(store.as_ref(), online.as_deref())?
        }
    };
    for c in &list {
        if json {
            say(c);
            continue;
        }
        let online = match c["online"].as_bool() {
            Some(true) => "online",
            Some(false) => "offline",
            None => "unknown",
        };
        let verified = if c["verified"] == true { "verified" } else { "unverified" };
        let changed = if c["key_changed"] == true { "  KEY CHANGED: run `sotto contact verify`" } else { "" };
        say(format!(
            "{:<16} {:<8} {:<10} {}{changed}",
            c["username"].as_str().unwrap_or(""),
            online,
            verified,
            c["fingerprint"].as_str().unwrap_or("")
        ));
    }
    if list.is_empty() && !json {
        eprintln!("no contacts yet: they appear when you message someone or they message you");
    }
    Ok(())
}

pub async fn verify(ctx: &Context, user: &str, number: Option<&str>, json: bool) -> Result<()> {
    let user = Username::parse(user)?;
    let result = match ctx.running_node().await {
        Some(mut node) => node.call("contact.verify", json!({ "user": user.as_str(), "safety_number": number })).await?,
        None => {
            let profile = ctx.profile()?;
            let me = profile.identity_header()?.identity_key()?;
            app::verify_contact(open_store(&profile)?.as_ref(), &me, &user, number)?.to_json(&user)
        }
    };
    if json {
        say(&result);
        return Ok(());
    }
    match (result["verified"].as_bool(), result["safety_number"].as_str(), result["repinned"].as_bool()) {
        (_, Some(number), _) => {
            say(format!("safety number with {user}:"));
            say(format!("  {number}"));
            if let Some(changed) = result["changed_key_safety_number"].as_str() {
                say(format!("{user} presented a CHANGED key; its safety number would be:"));
                say(format!("  {changed}"));
                say(format!("Compare the new number with {user} in person, then run `sotto contact verify {user} NUMBER`."));
                return Ok(());
            }
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) && result["verified"] != true {
                // A person at the keyboard: compare now and confirm.
                if confirm(&format!("Does {user} see exactly this number? [y/N] "))? {
                    return Box::pin(verify(ctx, user.as_str(), Some(number), false)).await;
                }
                say(format!("{user} stays unverified."));
            } else {
                say(format!("Compare it with {user} in person or on a call; if it matches, run `sotto contact verify {user} NUMBER`."));
            }
        }
        (Some(true), None, Some(true)) => say(format!("{user}'s new key is now pinned and verified")),
        (Some(true), None, _) => say(format!("{user} is verified")),
        _ => say(&result),
    }
    Ok(())
}

/// Asks a yes/no question on the terminal; only "y" or "yes" is yes.
fn confirm(question: &str) -> Result<bool> {
    use std::io::BufRead;
    let mut out = std::io::stdout().lock();
    out.write_all(question.as_bytes())?;
    out.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

/// Connects and signs in with this profile's identity.
async fn signed_in(ctx: &Context) -> Result<(RendezvousClient, Username)> {
    let profile = ctx.profile()?;
    let (server, username) = ctx.account(&profile)?;
    let identity = ctx.unlock(&profile)?;
    let client = RendezvousClient::connect(&server).await?;
    client.authenticate(&identity, &username).await?;
    Ok((client, username))
}

pub async fn online(ctx: &Context, json: bool) -> Result<()> {
    let names: Vec<String> = match ctx.running_node().await {
        Some(mut node) => {
            let result = node.call("online", json!({})).await?;
            result["usernames"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default()
        }
        None => {
            let (client, _) = signed_in(ctx).await?;
            let (names, truncated) = client.online().await?;
            client.close().await;
            if truncated {
                eprintln!("(the node listed only the first {})", names.len());
            }
            names.into_iter().map(|n| n.to_string()).collect()
        }
    };
    for name in &names {
        if json {
            say(json!({ "username": name }));
        } else {
            say(name);
        }
    }
    if names.is_empty() && !json {
        eprintln!("nobody is online");
    }
    Ok(())
}

pub async fn lookup(ctx: &Context, user: &str, json: bool) -> Result<()> {
    let target = Username::parse(user)?;
    let account = match ctx.running_node().await {
        Some(mut node) => node.call("lookup", json!({ "user": target.as_str() })).await?,
        None => {
            let (client, _) = signed_in(ctx).await?;
            let info = client.lookup(&target).await.map_err(|e| match e {
                sotto::rendezvous::client::ClientError::Refused(sotto::rendezvous::proto::Refusal::NotFound) => {
                    anyhow::Error::new(UsageError(format!("no user {target} on this node")))
                }
                other => other.into(),
            })?;
            client.close().await;
            let verified = verify_lookup(info, unix_now(), LOOKUP_SKEW)
                .map_err(|e| UntrustedError(format!("the node's answer for {target} does not verify: {e}")))?;
            app::account_json(&verified)
        }
    };
    if json {
        say(&account);
        return Ok(());
    }
    let field = |k: &str| account[k].as_str().unwrap_or("").to_string();
    say(format!("user          {}", field("username")));
    say(format!("fingerprint   {}", field("fingerprint")));
    say(format!("identity key  {}", field("identity_key")));
    say(format!("noise key     {}", field("noise_key")));
    if account["online"] == true {
        let left = account["expires_at"].as_u64().unwrap_or(0).saturating_sub(unix_now());
        say(format!("presence      online (signed record #{}, expires in {left} s)", account["seq"]));
        say(format!("peer cert     sha256:{}", field("cert_sha256")));
        for a in account["addrs"].as_array().into_iter().flatten() {
            say(format!("address       {}", a.as_str().unwrap_or("")));
        }
    } else {
        say("presence      offline");
    }
    Ok(())
}
