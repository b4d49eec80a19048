//! What the commands do with a profile's data, shared by the command line (working on
//! the database directly) and by `sotto up`'s control socket (working through the
//! running node): JSON views of messages, contacts and accounts, contact verification,
//! and the JSON-RPC method table.

use serde_json::{json, Value};

use crate::address::ServerAddress;
use crate::clock::rfc3339;
use crate::control::{Handler, RpcError, METHOD_NOT_FOUND};
use crate::exit::{send_error_class, ExitClass};
use crate::keys::{safety_number, safety_number_matches, IdentityKey};
use crate::peer::agent::{Agent, AgentEvent};
use crate::rendezvous::client::VerifiedAccount;
use crate::store::{Contact, Direction, Store, StoreError, StoredMessage};
use crate::username::Username;

/// Default and largest `--limit` for history.
pub const DEFAULT_HISTORY: usize = 20;
pub const MAX_HISTORY: usize = 10_000;

/// Text from a peer made safe for a terminal: control characters (escape sequences
/// among them) and bidirectional overrides are shown as `\u{..}` escapes, and a line
/// break continues on an indented line, so a message cannot draw over the screen or
/// pass itself off as another line of output.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\n    "),
            '\t' => out.push('\t'),
            c if c.is_control()
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

pub fn message_json(m: &StoredMessage) -> Value {
    json!({
        "id": hex::encode(m.id),
        "peer": m.peer.as_str(),
        "direction": match m.direction { Direction::In => "in", Direction::Out => "out" },
        "body": m.body,
        "sent_at": rfc3339(m.sent_at),
        "stored_at": rfc3339(m.stored_at),
        "state": m.state.as_str(),
    })
}

pub fn contact_json(c: &Contact, online: Option<bool>) -> Value {
    json!({
        "username": c.username.as_str(),
        "fingerprint": c.identity_key.fingerprint().to_string(),
        "identity_key": c.identity_key.to_hex(),
        "verified": c.verified,
        "online": online,
        "key_changed": c.changed_key.is_some(),
        "last_seen": rfc3339(c.last_seen * 1000),
    })
}

pub fn account_json(v: &VerifiedAccount) -> Value {
    let key = &v.info.identity_key;
    let mut out = json!({
        "username": v.info.username.as_str(),
        "fingerprint": key.fingerprint().to_string(),
        "identity_key": key.to_hex(),
        "noise_key": v.info.noise.noise_key.to_hex(),
        "online": v.presence.is_some(),
    });
    if let Some(r) = &v.presence {
        out["addrs"] = json!(r.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        out["cert_sha256"] = json!(hex::encode(r.cert_sha256));
        out["seq"] = json!(r.seq);
        out["issued_at"] = json!(r.issued_at);
        out["expires_at"] = json!(r.expires_at);
    }
    out
}

pub fn history(store: &dyn Store, peer: Option<&Username>, limit: usize) -> Result<Vec<Value>, StoreError> {
    Ok(store.last(peer, limit.min(MAX_HISTORY))?.iter().map(message_json).collect())
}

pub fn contacts(store: &dyn Store, online: Option<&[Username]>) -> Result<Vec<Value>, StoreError> {
    let mut all = store.contacts()?;
    all.sort_by(|a, b| a.username.cmp(&b.username));
    Ok(all.iter().map(|c| contact_json(c, online.map(|o| o.contains(&c.username)))).collect())
}

/// The result of `contact verify`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verification {
    /// No number given: the safety numbers to compare (pinned key, and a changed key).
    Show { pinned: String, changed: Option<String>, verified: bool },
    /// The number matched the pinned key.
    Verified,
    /// The number matched the changed key, which is now pinned and verified.
    Repinned,
}

pub fn verify_contact(store: &dyn Store, me: &IdentityKey, user: &Username, number: Option<&str>) -> Result<Verification, RpcError> {
    let failed = |e: StoreError| RpcError::new(ExitClass::Failure, e.to_string());
    let mut contact = store
        .contact(user)
        .map_err(failed)?
        .ok_or_else(|| RpcError::new(ExitClass::Usage, format!("{user} is not a contact yet: send them a message first")))?;
    let Some(number) = number else {
        return Ok(Verification::Show {
            pinned: safety_number(me, &contact.identity_key),
            changed: contact.changed_key.map(|k| safety_number(me, &k)),
            verified: contact.verified,
        });
    };
    let outcome = if safety_number_matches(number, me, &contact.identity_key) {
        Verification::Verified
    } else if contact.changed_key.is_some_and(|k| safety_number_matches(number, me, &k)) {
        // The user compared the new key's number out of band: trust the new key.
        contact.identity_key = contact.changed_key.take().unwrap_or(contact.identity_key);
        contact.highest_seq = 0;
        contact.last_handshake = 0;
        Verification::Repinned
    } else {
        return Err(RpcError::new(
            ExitClass::Untrusted,
            format!("that safety number does not match {user}'s key; the contact stays unverified"),
        ));
    };
    contact.verified = true;
    contact.changed_key = None;
    store.put_contact(&contact).and_then(|()| store.flush()).map_err(failed)?;
    Ok(outcome)
}

impl Verification {
    pub fn to_json(&self, user: &Username) -> Value {
        match self {
            Verification::Show { pinned, changed, verified } => {
                json!({ "username": user.as_str(), "safety_number": pinned, "changed_key_safety_number": changed, "verified": verified })
            }
            Verification::Verified => json!({ "username": user.as_str(), "verified": true, "repinned": false }),
            Verification::Repinned => json!({ "username": user.as_str(), "verified": true, "repinned": true }),
        }
    }
}

/// Parses JSON-RPC params into the values the methods take.
fn string_param<'a>(params: &'a Value, name: &str) -> Result<Option<&'a str>, RpcError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::params(format!("{name} must be a string"))),
    }
}

fn user_param(params: &Value, name: &str) -> Result<Option<Username>, RpcError> {
    string_param(params, name)?.map(|u| Username::parse(u).map_err(|e| RpcError::params(e.to_string()))).transpose()
}

fn required_user(params: &Value, name: &str) -> Result<Username, RpcError> {
    user_param(params, name)?.ok_or_else(|| RpcError::params(format!("{name} is required")))
}

/// A control-socket request with its params checked, before anything touches the node.
/// Parsing needs nothing live, so every method's params are validated here, in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Status,
    Send { to: Username, body: String },
    History { peer: Option<Username>, limit: usize },
    Contacts,
    Online,
    Lookup { user: Username },
    Verify { user: Username, safety_number: Option<String> },
}

impl Call {
    /// The method named `method` with `params`; an unknown method or bad params are the
    /// JSON-RPC errors the socket answers with.
    pub fn parse(method: &str, params: &Value) -> Result<Call, RpcError> {
        Ok(match method {
            "status" => Call::Status,
            "send" => {
                let to = required_user(params, "to")?;
                let body = string_param(params, "body")?.ok_or_else(|| RpcError::params("body is required"))?;
                Call::Send { to, body: body.to_string() }
            }
            "history" => {
                let peer = user_param(params, "peer")?;
                let limit = match params.get("limit") {
                    None | Some(Value::Null) => DEFAULT_HISTORY,
                    Some(v) => v.as_u64().filter(|n| *n > 0).ok_or_else(|| RpcError::params("limit must be a positive integer"))? as usize,
                };
                Call::History { peer, limit }
            }
            "contacts" => Call::Contacts,
            "online" => Call::Online,
            "lookup" => Call::Lookup { user: required_user(params, "user")? },
            "contact.verify" => {
                let user = required_user(params, "user")?;
                Call::Verify { user, safety_number: string_param(params, "safety_number")?.map(str::to_string) }
            }
            _ => return Err(RpcError { code: METHOD_NOT_FOUND, message: format!("no method {method:?}"), exit: ExitClass::Usage }),
        })
    }
}

/// The control-socket methods of a running node.
pub struct NodeMethods {
    agent: Agent,
    server: ServerAddress,
    events: tokio::sync::broadcast::Sender<Value>,
}

/// An agent event as a JSON object, or `None` for events subscribers do not see.
pub fn event_json(event: &AgentEvent) -> Option<Value> {
    Some(match event {
        AgentEvent::Received(m) => json!({ "type": "message", "message": message_json(m) }),
        AgentEvent::Delivered { peer, id } => json!({ "type": "delivered", "peer": peer.as_str(), "id": hex::encode(id) }),
        AgentEvent::KeyChanged { peer, pinned, presented } => json!({
            "type": "key_changed",
            "peer": peer.as_str(),
            "pinned": pinned.fingerprint().to_string(),
            "presented": presented.fingerprint().to_string(),
        }),
        AgentEvent::Presence { peer, online } => json!({ "type": "presence", "peer": peer.as_str(), "online": online }),
        AgentEvent::SessionOpened { .. } | AgentEvent::SessionClosed { .. } => return None,
    })
}

impl NodeMethods {
    /// Serves `agent`; numbers its events from 1 for subscribers.
    pub fn new(agent: Agent, server: ServerAddress) -> NodeMethods {
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let mut source = agent.subscribe();
        let sink = events.clone();
        tokio::spawn(async move {
            let mut next_id = 1u64;
            loop {
                let event = match source.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = sink.send(json!({ "event_id": next_id, "type": "lagged", "missed": n }));
                        next_id += 1;
                        continue;
                    }
                    Err(_) => return,
                };
                if let Some(mut value) = event_json(&event) {
                    value["event_id"] = json!(next_id);
                    next_id += 1;
                    let _ = sink.send(value);
                }
            }
        });
        NodeMethods { agent, server, events }
    }
}

impl Handler for NodeMethods {
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<Value>> {
        Some(self.events.subscribe())
    }

    async fn call(&self, method: String, params: Value) -> Result<Value, RpcError> {
        let store = self.agent.store().as_ref();
        let failed = |e: StoreError| RpcError::new(ExitClass::Failure, e.to_string());
        let node_failed = |e: crate::rendezvous::client::ClientError| RpcError::new(crate::exit::client_error_class(&e), e.to_string());
        match Call::parse(&method, &params)? {
            Call::Status => Ok(json!({
                "username": self.agent.username().as_str(),
                "server": self.server.to_string(),
                "fingerprint": self.agent.identity().public().fingerprint().to_string(),
            })),
            Call::Send { to, body } => {
                let msg = self.agent.send(&to, &body).await.map_err(|e| RpcError::new(send_error_class(&e), e.to_string()))?;
                Ok(message_json(&msg))
            }
            Call::History { peer, limit } => Ok(json!({ "messages": history(store, peer.as_ref(), limit).map_err(failed)? })),
            Call::Contacts => {
                let mut list = store.contacts().map_err(failed)?;
                list.sort_by(|a, b| a.username.cmp(&b.username));
                // Pushed presence where the watch has it; otherwise ask the node once.
                let asked =
                    if list.iter().any(|c| self.agent.presence_of(&c.username).is_none()) { self.agent.online().await.ok() } else { None };
                let rows: Vec<Value> = list
                    .iter()
                    .map(|c| {
                        let online = self.agent.presence_of(&c.username).or_else(|| asked.as_ref().map(|o| o.contains(&c.username)));
                        contact_json(c, online)
                    })
                    .collect();
                Ok(json!({ "contacts": rows }))
            }
            Call::Online => {
                let names = self.agent.online().await.map_err(node_failed)?;
                Ok(json!({ "usernames": names.iter().map(|n| n.as_str()).collect::<Vec<_>>() }))
            }
            Call::Lookup { user } => {
                let verified = self.agent.lookup(&user).await.map_err(|e| RpcError::new(send_error_class(&e), e.to_string()))?;
                Ok(account_json(&verified))
            }
            Call::Verify { user, safety_number } => {
                Ok(verify_contact(store, &self.agent.identity().public(), &user, safety_number.as_deref())?.to_json(&user))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_neutralises_terminal_tricks() {
        assert_eq!(printable("hi there"), "hi there");
        assert_eq!(printable("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\n[12:00:00] carol: hi"), "x\n    [12:00:00] carol: hi");
        assert_eq!(printable("\u{202e}abc"), "\\u{202e}abc");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("héllo ✓"), "héllo ✓");
    }
}
