//! What the chat screen holds and how it changes: contacts with presence, unread counts
//! and key warnings; one conversation per contact with each message's delivery state;
//! the input line; notices. Key presses and the node's JSON go in, [`Action`]s for the
//! driver come out. No I/O and no clock: `now_ms` is an argument.

use std::collections::{HashMap, VecDeque};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use serde_json::Value;

use crate::app::printable;
use crate::clock::rfc3339;
use crate::control::RpcError;
use crate::exit::ExitClass;
use crate::peer::session::MAX_BODY;
use crate::username::Username;

/// Messages kept on screen per conversation (history keeps them all).
pub const MAX_MESSAGES: usize = 1000;
/// Notices kept.
const MAX_NOTICES: usize = 100;
/// Messages PageUp and PageDown move by.
const PAGE: usize = 5;

/// What the driver should do after a key press or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `body` to `to`, then report with [`ChatState::apply_send_result`] and `token`.
    Send {
        to: String,
        body: String,
        token: u64,
    },
    /// `peer`'s conversation is now shown: load its history into [`ChatState::apply_history`].
    Select(String),
    /// Events were missed: load the contacts and the shown conversation again.
    Reload,
    Quit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// A message's delivery state, as the node's history names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent, not acknowledged yet.
    Pending,
    /// The peer stored it and acknowledged.
    Delivered,
    /// Could not be delivered (kept in history).
    Failed,
    /// An incoming message.
    Received,
}

impl Delivery {
    fn parse(s: &str) -> Option<Delivery> {
        Some(match s {
            "pending" => Delivery::Pending,
            "delivered" => Delivery::Delivered,
            "failed" => Delivery::Failed,
            "received" => Delivery::Received,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The node's id (hex); `None` while this screen's send is in flight.
    pub id: Option<String>,
    /// This screen's token for a send in flight.
    pub token: Option<u64>,
    pub direction: Direction,
    /// As sent or received; show it only through [`printable`].
    pub body: String,
    /// When it was stored on this machine, RFC 3339 UTC (sorts as text).
    pub stored_at: String,
    pub state: Delivery,
}

impl Message {
    /// Reads the node's message JSON (`history` rows, `send` results, `message` events).
    pub fn from_json(v: &Value) -> Option<(String, Message)> {
        let peer = Username::parse(v.get("peer")?.as_str()?).ok()?.as_str().to_string();
        let direction = match v.get("direction")?.as_str()? {
            "in" => Direction::In,
            "out" => Direction::Out,
            _ => return None,
        };
        let message = Message {
            id: Some(v.get("id")?.as_str()?.to_string()),
            token: None,
            direction,
            body: v.get("body")?.as_str()?.to_string(),
            stored_at: v.get("stored_at")?.as_str()?.to_string(),
            state: Delivery::parse(v.get("state")?.as_str()?)?,
        };
        Some((peer, message))
    }

    /// `HH:MM:SS` of [`Message::stored_at`].
    pub fn clock(&self) -> &str {
        clock(&self.stored_at)
    }
}

/// `HH:MM:SS` of an RFC 3339 time.
fn clock(rfc3339: &str) -> &str {
    rfc3339.get(11..19).unwrap_or(rfc3339)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub name: String,
    /// `None` until the node knows.
    pub online: Option<bool>,
    pub verified: bool,
    /// The contact presented an identity key other than the pinned one.
    pub key_changed: bool,
    pub unread: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `HH:MM:SS`.
    pub time: String,
    pub text: String,
    /// A warning to show loudly.
    pub loud: bool,
}

/// Everything the chat screen shows.
#[derive(Debug)]
pub struct ChatState {
    me: Option<String>,
    /// Sorted by name.
    contacts: Vec<Contact>,
    selected: Option<String>,
    conversations: HashMap<String, Vec<Message>>,
    input: String,
    notices: VecDeque<Notice>,
    next_token: u64,
    /// How many of the newest messages are scrolled out below.
    scroll: usize,
    colour: bool,
}

impl Default for ChatState {
    fn default() -> Self {
        ChatState {
            me: None,
            contacts: Vec::new(),
            selected: None,
            conversations: HashMap::new(),
            input: String::new(),
            notices: VecDeque::new(),
            next_token: 1,
            scroll: 0,
            colour: true,
        }
    }
}

impl ChatState {
    pub fn new() -> ChatState {
        ChatState::default()
    }

    /// Whether to draw with colours (off for `NO_COLOR`; warnings stay bold and reversed).
    pub fn set_colour(&mut self, colour: bool) {
        self.colour = colour;
    }

    pub fn colour(&self) -> bool {
        self.colour
    }

    pub fn me(&self) -> Option<&str> {
        self.me.as_deref()
    }

    pub fn contacts(&self) -> &[Contact] {
        &self.contacts
    }

    pub fn selected(&self) -> Option<&str> {
        self.selected.as_deref()
    }

    pub fn contact(&self, name: &str) -> Option<&Contact> {
        self.contacts.iter().find(|c| c.name == name)
    }

    /// The conversation with `peer`, oldest first.
    pub fn conversation(&self, peer: &str) -> &[Message] {
        self.conversations.get(peer).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn input(&self) -> &str {
        &self.input
    }

    pub fn scroll(&self) -> usize {
        self.scroll
    }

    /// The newest notice.
    pub fn notice(&self) -> Option<&Notice> {
        self.notices.back()
    }

    /// Contacts whose identity key changed, for the banner.
    pub fn changed_keys(&self) -> impl Iterator<Item = &str> {
        self.contacts.iter().filter(|c| c.key_changed).map(|c| c.name.as_str())
    }

    /// Adds a notice to the status line.
    pub fn add_notice(&mut self, text: impl Into<String>, loud: bool, now_ms: u64) {
        if self.notices.len() == MAX_NOTICES {
            self.notices.pop_front();
        }
        self.notices.push_back(Notice { time: clock(&rfc3339(now_ms)).to_string(), text: text.into(), loud });
    }

    fn contact_mut(&mut self, name: &str) -> &mut Contact {
        let at = match self.contacts.binary_search_by(|c| c.name.as_str().cmp(name)) {
            Ok(at) => at,
            Err(at) => {
                let contact = Contact { name: name.to_string(), online: None, verified: false, key_changed: false, unread: 0 };
                self.contacts.insert(at, contact);
                at
            }
        };
        &mut self.contacts[at]
    }

    /// Shows `peer`'s conversation (adding `peer` to the list if new).
    pub fn select(&mut self, peer: &str) -> Action {
        self.contact_mut(peer).unread = 0;
        self.selected = Some(peer.to_string());
        self.scroll = 0;
        Action::Select(peer.to_string())
    }

    /// Opens a conversation with a user named on the command line or with `/chat`.
    pub fn open(&mut self, user: &str) -> Result<Action, crate::username::InvalidUsername> {
        let user = Username::parse(user)?;
        Ok(self.select(user.as_str()))
    }

    /// A key press; `now_ms` stamps a message being sent.
    pub fn handle_key(&mut self, key: KeyEvent, now_ms: u64) -> Option<Action> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        match key.code {
            KeyCode::Esc => Some(Action::Quit),
            KeyCode::Char('c') if ctrl => Some(Action::Quit),
            KeyCode::Char('u') if ctrl => {
                self.input.clear();
                None
            }
            KeyCode::Char('w') if ctrl => {
                let kept = self.input.trim_end().rfind(' ').map_or(0, |i| i + 1);
                self.input.truncate(kept);
                None
            }
            KeyCode::Char(c) if !ctrl && !alt => {
                if self.input.len() + c.len_utf8() <= MAX_BODY {
                    self.input.push(c);
                }
                None
            }
            KeyCode::Backspace => {
                self.input.pop();
                None
            }
            KeyCode::Enter => self.submit(now_ms),
            KeyCode::Up | KeyCode::BackTab => self.step(false),
            KeyCode::Down | KeyCode::Tab => self.step(true),
            KeyCode::PageUp => {
                let len = self.selected.as_deref().map_or(0, |p| self.conversation(p).len());
                self.scroll = (self.scroll + PAGE).min(len.saturating_sub(1));
                None
            }
            KeyCode::PageDown => {
                self.scroll = self.scroll.saturating_sub(PAGE);
                None
            }
            _ => None,
        }
    }

    /// Selects the next or previous contact.
    fn step(&mut self, forward: bool) -> Option<Action> {
        let n = self.contacts.len();
        if n == 0 {
            return None;
        }
        let at = self.selected.as_deref().and_then(|s| self.contacts.iter().position(|c| c.name == s));
        let next = match (at, forward) {
            (None, true) => 0,
            (None, false) => n - 1,
            (Some(i), true) => (i + 1) % n,
            (Some(i), false) => (i + n - 1) % n,
        };
        let name = self.contacts[next].name.clone();
        Some(self.select(&name))
    }

    /// Enter: a command, or a message to the shown contact.
    fn submit(&mut self, now_ms: u64) -> Option<Action> {
        let line = std::mem::take(&mut self.input);
        if line.trim().is_empty() {
            return None;
        }
        let body = match line.strip_prefix('/') {
            // `//text` sends `/text`.
            Some(rest) if rest.starts_with('/') => rest.to_string(),
            Some(command) => return self.command(command.trim(), now_ms),
            None => line,
        };
        let Some(to) = self.selected.clone() else {
            self.add_notice("no conversation open: pick a contact with ↑/↓ or type /chat USER", false, now_ms);
            self.input = body;
            return None;
        };
        let token = self.next_token;
        self.next_token += 1;
        let message = Message {
            id: None,
            token: Some(token),
            direction: Direction::Out,
            body: body.clone(),
            stored_at: rfc3339(now_ms),
            state: Delivery::Pending,
        };
        self.push(&to, message);
        self.scroll = 0;
        Some(Action::Send { to, body, token })
    }

    fn command(&mut self, command: &str, now_ms: u64) -> Option<Action> {
        let (name, arg) = command.split_once(' ').map_or((command, ""), |(n, a)| (n, a.trim()));
        match name {
            "quit" | "q" | "exit" => Some(Action::Quit),
            "chat" | "open" if arg.is_empty() => {
                self.add_notice(format!("usage: /{name} USER"), false, now_ms);
                None
            }
            "chat" | "open" => match self.open(arg) {
                Ok(action) => Some(action),
                Err(e) => {
                    self.add_notice(e.to_string(), false, now_ms);
                    None
                }
            },
            "help" => {
                let help = "Enter sends · ↑/↓ or Tab switch contact · PgUp/PgDn scroll · /chat USER opens a conversation · //text sends /text · Esc, Ctrl-C or /quit quits";
                self.add_notice(help, false, now_ms);
                None
            }
            _ => {
                self.add_notice(format!("unknown command /{}: try /help", printable(name)), false, now_ms);
                None
            }
        }
    }

    /// Adds a message to `peer`'s conversation, in time order, once per id; false if
    /// it was there already.
    fn push(&mut self, peer: &str, message: Message) -> bool {
        let list = self.conversations.entry(peer.to_string()).or_default();
        if message.id.is_some() && list.iter().any(|m| m.id == message.id) {
            return false;
        }
        let at = list.partition_point(|m| m.stored_at <= message.stored_at);
        list.insert(at, message);
        if list.len() > MAX_MESSAGES {
            list.drain(..list.len() - MAX_MESSAGES);
        }
        true
    }

    /// The `status` result: who this profile is.
    pub fn apply_status(&mut self, status: &Value) {
        self.me = status.get("username").and_then(Value::as_str).map(printable);
    }

    /// The `contacts` result: presence, verification and key warnings. Contacts added
    /// here (by a message, or `/chat`) stay in the list.
    pub fn apply_contacts(&mut self, result: &Value) {
        for c in result.get("contacts").and_then(Value::as_array).into_iter().flatten() {
            let Some(name) = c.get("username").and_then(Value::as_str).and_then(|n| Username::parse(n).ok()) else { continue };
            let contact = self.contact_mut(name.as_str());
            contact.online = c.get("online").and_then(Value::as_bool);
            contact.verified = c.get("verified").and_then(Value::as_bool).unwrap_or(false);
            contact.key_changed = c.get("key_changed").and_then(Value::as_bool).unwrap_or(false);
        }
    }

    /// The `history` result for `peer`, merged with what arrived or was sent meanwhile.
    pub fn apply_history(&mut self, peer: &str, result: &Value) {
        for row in result.get("messages").and_then(Value::as_array).into_iter().flatten() {
            let Some((p, message)) = Message::from_json(row) else { continue };
            if p != peer {
                continue;
            }
            let list = self.conversations.entry(p).or_default();
            // A state learnt since (delivered) is not replaced by an older snapshot.
            if list.iter().any(|m| m.id == message.id) {
                continue;
            }
            // A message sent from this screen, whose id the send result did not carry (a
            // failure) or has not carried yet: the node stored it after it was typed.
            let typed_here = list.iter_mut().find(|m| {
                m.id.is_none()
                    && m.direction == Direction::Out
                    && message.direction == Direction::Out
                    && m.body == message.body
                    && message.stored_at >= m.stored_at
            });
            if let Some(local) = typed_here {
                local.id = message.id;
                if local.token.is_none() {
                    local.state = message.state;
                }
                continue;
            }
            self.push(peer, message);
        }
    }

    /// An event from the node's `subscribe` stream.
    pub fn apply_event(&mut self, event: &Value, now_ms: u64) -> Option<Action> {
        let peer = || event.get("peer").and_then(Value::as_str).and_then(|p| Username::parse(p).ok());
        match event.get("type").and_then(Value::as_str)? {
            "message" => {
                let (peer, message) = Message::from_json(event.get("message")?)?;
                self.contact_mut(&peer);
                if !self.push(&peer, message) {
                    return None;
                }
                match self.selected.as_deref() {
                    Some(shown) if shown == peer => None,
                    Some(_) => {
                        self.contact_mut(&peer).unread += 1;
                        self.add_notice(format!("new message from {peer}"), false, now_ms);
                        None
                    }
                    None => Some(self.select(&peer)),
                }
            }
            "delivered" => {
                let (peer, id) = (peer()?, event.get("id")?.as_str()?);
                let message = self.conversations.get_mut(peer.as_str())?.iter_mut().find(|m| m.id.as_deref() == Some(id))?;
                message.state = Delivery::Delivered;
                None
            }
            "presence" => {
                let (peer, online) = (peer()?, event.get("online")?.as_bool()?);
                let contact = self.contact_mut(peer.as_str());
                let changed = contact.online != Some(online);
                contact.online = Some(online);
                if changed {
                    self.add_notice(format!("{peer} {}", if online { "is online" } else { "went offline" }), false, now_ms);
                }
                None
            }
            "key_changed" => {
                let peer = peer()?;
                self.contact_mut(peer.as_str()).key_changed = true;
                // The fingerprints are long; `sotto contact verify` shows the numbers to compare.
                self.add_notice(format!("WARNING: {peer}'s identity key CHANGED; run sotto contact verify {peer}"), true, now_ms);
                None
            }
            "lagged" => {
                self.add_notice("missed some events; reloading", false, now_ms);
                Some(Action::Reload)
            }
            _ => None,
        }
    }

    /// The outcome of [`Action::Send`]: the stored message, or why it failed.
    pub fn apply_send_result(&mut self, token: u64, result: Result<&Value, &RpcError>, now_ms: u64) {
        let found = self.conversations.iter_mut().find_map(|(peer, list)| {
            let at = list.iter().position(|m| m.token == Some(token))?;
            Some((peer.clone(), list.remove(at)))
        });
        let Some((peer, mut message)) = found else { return };
        message.token = None;
        match result {
            Ok(stored) => match Message::from_json(stored) {
                Some((_, stored)) => message = stored,
                None => message.state = Delivery::Delivered,
            },
            Err(e) => {
                message.state = Delivery::Failed;
                self.add_notice(format!("not delivered to {peer}: {}", printable(&e.message)), e.exit == ExitClass::Untrusted, now_ms);
            }
        }
        // Once per id: a history loaded meanwhile may hold it already, in an older state.
        if let Some(list) = self.conversations.get_mut(&peer) {
            list.retain(|m| m.id.is_none() || m.id != message.id);
        }
        self.push(&peer, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn type_text(state: &mut ChatState, text: &str) {
        for c in text.chars() {
            assert_eq!(state.handle_key(key(KeyCode::Char(c)), 0), None);
        }
    }

    fn contacts() -> Value {
        json!({ "contacts": [
            { "username": "bob", "verified": true, "online": true, "key_changed": false },
            { "username": "carol", "verified": false, "online": false, "key_changed": false },
        ]})
    }

    fn message(peer: &str, id: &str, direction: &str, body: &str, state: &str, at: &str) -> Value {
        json!({ "id": id, "peer": peer, "direction": direction, "body": body, "sent_at": at, "stored_at": at, "state": state })
    }

    #[test]
    fn typing_and_enter_send_to_the_selected_contact() {
        let mut s = ChatState::new();
        s.apply_contacts(&contacts());
        type_text(&mut s, "hi");
        assert_eq!(s.handle_key(key(KeyCode::Enter), 0), None, "nothing selected: nothing sent");
        assert_eq!(s.input(), "hi", "the text is kept");
        assert_eq!(s.handle_key(key(KeyCode::Down), 0), Some(Action::Select("bob".into())));
        assert_eq!(s.handle_key(key(KeyCode::Backspace), 0), None);
        type_text(&mut s, "ello");
        let sent = s.handle_key(key(KeyCode::Enter), 1_000);
        assert_eq!(sent, Some(Action::Send { to: "bob".into(), body: "hello".into(), token: 1 }));
        assert_eq!(s.input(), "");
        assert_eq!(s.conversation("bob")[0].state, Delivery::Pending);
        assert_eq!(s.handle_key(key(KeyCode::Enter), 0), None, "an empty line sends nothing");

        s.apply_send_result(1, Ok(&message("bob", "aa", "out", "hello", "delivered", "2026-01-01T10:00:01.000Z")), 2_000);
        let list = s.conversation("bob");
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].id.as_deref(), list[0].state, list[0].clock()), (Some("aa"), Delivery::Delivered, "10:00:01"));
    }

    #[test]
    fn a_failed_send_stays_in_the_conversation_marked_failed() {
        let mut s = ChatState::new();
        s.open("carol").unwrap();
        type_text(&mut s, "are you there");
        let Some(Action::Send { token, .. }) = s.handle_key(key(KeyCode::Enter), 0) else { panic!("no send") };
        s.apply_send_result(token, Err(&RpcError::new(ExitClass::Unreachable, "carol is not online")), 0);
        assert_eq!(s.conversation("carol")[0].state, Delivery::Failed);
        let notice = s.notice().unwrap();
        assert_eq!((notice.text.as_str(), notice.loud), ("not delivered to carol: carol is not online", false));

        // The history, loaded again, holds the same message: shown once, with its id.
        let typed_at = s.conversation("carol")[0].stored_at.clone();
        let stored = message("carol", "f1", "out", "are you there", "failed", "1970-01-01T00:00:00.002Z");
        let older = message("carol", "f0", "out", "are you there", "delivered", "1969-12-31T23:59:00.000Z");
        s.apply_history("carol", &json!({ "messages": [older, stored] }));
        let list = s.conversation("carol");
        assert_eq!(list.len(), 2, "{list:?}");
        assert_eq!((list[0].id.as_deref(), list[0].state), (Some("f0"), Delivery::Delivered), "an older one is its own");
        assert_eq!((list[1].id.as_deref(), list[1].state, list[1].stored_at.as_str()), (Some("f1"), Delivery::Failed, typed_at.as_str()));

        // A history loaded while a send is in flight does not duplicate it either.
        type_text(&mut s, "again");
        let Some(Action::Send { token, .. }) = s.handle_key(key(KeyCode::Enter), 10_000) else { panic!("no send") };
        s.apply_history("carol", &json!({ "messages": [message("carol", "g1", "out", "again", "pending", "1970-01-01T00:00:10.001Z")] }));
        assert_eq!(s.conversation("carol").len(), 3);
        assert_eq!(s.conversation("carol")[2].state, Delivery::Pending, "still in flight");
        s.apply_send_result(token, Ok(&message("carol", "g1", "out", "again", "delivered", "1970-01-01T00:00:10.001Z")), 0);
        let list = s.conversation("carol");
        assert_eq!((list.len(), list[2].id.as_deref(), list[2].state), (3, Some("g1"), Delivery::Delivered));
    }

    #[test]
    fn switching_contacts_wraps_and_clears_unread() {
        let mut s = ChatState::new();
        s.apply_contacts(&contacts());
        assert_eq!(s.handle_key(key(KeyCode::Up), 0), Some(Action::Select("carol".into())));
        let event = json!({ "type": "message", "message": message("bob", "b1", "in", "psst", "received", "2026-01-01T10:00:00.000Z") });
        assert_eq!(s.apply_event(&event, 0), None);
        assert_eq!(s.apply_event(&event, 0), None, "a repeated event is counted once");
        assert_eq!(s.contact("bob").unwrap().unread, 1);
        assert_eq!(s.handle_key(key(KeyCode::Tab), 0), Some(Action::Select("bob".into())));
        assert_eq!(s.contact("bob").unwrap().unread, 0);
        assert_eq!(s.conversation("bob").len(), 1);
    }

    #[test]
    fn history_merges_with_live_messages_in_time_order() {
        let mut s = ChatState::new();
        s.open("bob").unwrap();
        let live = json!({ "type": "message", "message": message("bob", "c", "in", "third", "received", "2026-01-01T10:00:03.000Z") });
        s.apply_event(&live, 0);
        let history = json!({ "messages": [
            message("bob", "a", "out", "first", "delivered", "2026-01-01T10:00:01.000Z"),
            message("bob", "b", "in", "second", "received", "2026-01-01T10:00:02.000Z"),
            message("bob", "c", "in", "third", "received", "2026-01-01T10:00:03.000Z"),
            message("carol", "d", "in", "elsewhere", "received", "2026-01-01T10:00:04.000Z"),
        ]});
        s.apply_history("bob", &history);
        let bodies: Vec<&str> = s.conversation("bob").iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, ["first", "second", "third"]);
    }

    #[test]
    fn events_update_presence_delivery_and_key_warnings() {
        let mut s = ChatState::new();
        s.apply_contacts(&contacts());
        s.apply_history("bob", &json!({ "messages": [message("bob", "a", "out", "x", "pending", "2026-01-01T10:00:01.000Z")] }));
        s.apply_event(&json!({ "type": "delivered", "peer": "bob", "id": "a" }), 0);
        assert_eq!(s.conversation("bob")[0].state, Delivery::Delivered);

        s.apply_event(&json!({ "type": "presence", "peer": "carol", "online": true }), 0);
        assert_eq!((s.contact("carol").unwrap().online, s.notice().unwrap().text.as_str()), (Some(true), "carol is online"));
        s.apply_event(&json!({ "type": "presence", "peer": "carol", "online": false }), 0);
        assert_eq!(s.notice().unwrap().text, "carol went offline");

        assert_eq!(s.changed_keys().count(), 0);
        s.apply_event(&json!({ "type": "key_changed", "peer": "bob", "pinned": "1 2", "presented": "3 4" }), 0);
        assert_eq!(s.changed_keys().collect::<Vec<_>>(), ["bob"]);
        assert!(s.notice().unwrap().loud);

        assert_eq!(s.apply_event(&json!({ "type": "lagged", "missed": 3 }), 0), Some(Action::Reload));
        assert_eq!(s.apply_event(&json!({ "type": "presence", "peer": "../x", "online": true }), 0), None);
        assert!(s.contact("../x").is_none(), "a malformed name is ignored");
    }

    #[test]
    fn commands_quit_open_and_escape() {
        let mut s = ChatState::new();
        type_text(&mut s, "/chat Dave");
        assert_eq!(s.handle_key(key(KeyCode::Enter), 0), Some(Action::Select("dave".into())));
        type_text(&mut s, "//shrug");
        assert!(matches!(s.handle_key(key(KeyCode::Enter), 0), Some(Action::Send { body, .. }) if body == "/shrug"));
        type_text(&mut s, "/chat no way");
        assert_eq!(s.handle_key(key(KeyCode::Enter), 0), None);
        type_text(&mut s, "/bogus");
        assert_eq!(s.handle_key(key(KeyCode::Enter), 0), None);
        assert!(s.notice().unwrap().text.contains("unknown command /bogus"));
        type_text(&mut s, "/quit");
        assert_eq!(s.handle_key(key(KeyCode::Enter), 0), Some(Action::Quit));
        assert_eq!(s.handle_key(key(KeyCode::Esc), 0), Some(Action::Quit));
        assert_eq!(s.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL), 0), Some(Action::Quit));
        type_text(&mut s, "one two");
        s.handle_key(KeyEvent::new(KeyCode::Char('w'), KeyModifiers::CONTROL), 0);
        assert_eq!(s.input(), "one ");
    }
}
