//! Who is online: the node's in-memory table of signed presence records.
//!
//! Pure state machine: every method takes `now` (Unix seconds) and returns the presence
//! [`Change`]s it caused, which the node pushes to watchers. The node driver calls
//! [`Directory::connection_closed`] when a publishing connection ends and
//! [`Directory::expire`] on a timer, so "online" is honest within seconds.

use std::collections::HashMap;

use crate::keys::IdentityKey;
use crate::presence::{Freshness, PresenceError, SignedPresence};
use crate::username::Username;

/// Identifies one client connection to the node.
pub type ConnId = u64;

#[derive(Debug)]
struct Entry {
    signed: SignedPresence,
    expires_at: u64,
    conn: ConnId,
}

/// A user came online or went offline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub username: Username,
    pub online: bool,
}

impl Change {
    fn offline(username: Username) -> Change {
        Change { username, online: false }
    }
}

#[derive(Debug)]
pub struct Directory {
    freshness: Freshness,
    online: HashMap<Username, Entry>,
    /// Who each connection published for, so a close does not scan every record.
    by_conn: HashMap<ConnId, Vec<Username>>,
    /// Highest accepted `seq` per user, kept after the record goes away so that an old
    /// record cannot be published again while this node runs.
    last_seq: HashMap<Username, u64>,
}

impl Directory {
    pub fn new(freshness: Freshness) -> Self {
        Self { freshness, online: HashMap::new(), by_conn: HashMap::new(), last_seq: HashMap::new() }
    }

    pub fn freshness(&self) -> Freshness {
        self.freshness
    }

    /// Accepts `signed` for `user` (whose account key is `key`), published over `conn`.
    /// Returns the change if `user` was not online before.
    pub fn publish(
        &mut self,
        user: &Username,
        key: &IdentityKey,
        signed: SignedPresence,
        conn: ConnId,
        now: u64,
    ) -> Result<Option<Change>, PresenceError> {
        let record = signed.verify(key)?;
        if &record.username != user {
            return Err(PresenceError::WrongUser);
        }
        self.freshness.check_publish(&record, now, self.last_seq.get(user).copied())?;
        self.last_seq.insert(user.clone(), record.seq);
        let previous = self.online.insert(user.clone(), Entry { signed, expires_at: record.expires_at, conn });
        if let Some(old) = &previous {
            if old.conn != conn {
                self.unindex(old.conn, user);
            }
        }
        let names = self.by_conn.entry(conn).or_default();
        if !names.contains(user) {
            names.push(user.clone());
        }
        Ok(previous.is_none().then(|| Change { username: user.clone(), online: true }))
    }

    fn unindex(&mut self, conn: ConnId, user: &Username) {
        if let Some(names) = self.by_conn.get_mut(&conn) {
            names.retain(|n| n != user);
            if names.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
    }

    fn remove(&mut self, user: &Username) -> Option<Change> {
        let entry = self.online.remove(user)?;
        self.unindex(entry.conn, user);
        Some(Change::offline(user.clone()))
    }

    /// Removes `user`'s record if `conn` published it.
    pub fn withdraw(&mut self, user: &Username, conn: ConnId) -> Option<Change> {
        if self.online.get(user).is_some_and(|e| e.conn == conn) {
            return self.remove(user);
        }
        None
    }

    /// Forgets everything about `user` (their identity key changed).
    pub fn forget(&mut self, user: &Username) -> Option<Change> {
        self.last_seq.remove(user);
        self.remove(user)
    }

    /// Drops the records that `conn` published.
    pub fn connection_closed(&mut self, conn: ConnId) -> Vec<Change> {
        let mut changes = Vec::new();
        for user in self.by_conn.remove(&conn).unwrap_or_default() {
            if self.online.get(&user).is_some_and(|e| e.conn == conn) {
                self.online.remove(&user);
                changes.push(Change::offline(user));
            }
        }
        changes
    }

    /// Drops expired records.
    pub fn expire(&mut self, now: u64) -> Vec<Change> {
        let gone: Vec<Username> = self.online.iter().filter(|(_, e)| e.expires_at <= now).map(|(u, _)| u.clone()).collect();
        gone.iter().filter_map(|u| self.remove(u)).collect()
    }

    pub fn is_online(&self, user: &Username, now: u64) -> bool {
        self.current(user, now).is_some()
    }

    pub fn current(&self, user: &Username, now: u64) -> Option<&SignedPresence> {
        self.online.get(user).filter(|e| e.expires_at > now).map(|e| &e.signed)
    }

    /// Usernames online at `now`, sorted, at most `limit`; the flag says if cut.
    pub fn online(&self, now: u64, limit: usize) -> (Vec<Username>, bool) {
        let mut names: Vec<Username> = self.online.iter().filter(|(_, e)| e.expires_at > now).map(|(u, _)| u.clone()).collect();
        names.sort();
        let truncated = names.len() > limit;
        names.truncate(limit);
        (names, truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::tests::{identity, record};

    const NOW: u64 = 1_800_000_000;

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    #[test]
    fn publish_lookup_expire() {
        let alice = identity(1);
        let mut dir = Directory::new(Freshness::DEFAULT);
        let signed = SignedPresence::sign(&record(&alice, "alice", 1, NOW, 60), alice.secret());
        assert_eq!(
            dir.publish(&name("alice"), &alice.public(), signed.clone(), 7, NOW),
            Ok(Some(Change { username: name("alice"), online: true }))
        );
        let again = SignedPresence::sign(&record(&alice, "alice", 2, NOW, 60), alice.secret());
        assert_eq!(dir.publish(&name("alice"), &alice.public(), again.clone(), 7, NOW), Ok(None), "a republish is no change");
        assert_eq!(dir.current(&name("alice"), NOW + 59), Some(&again));
        assert_eq!(dir.online(NOW, 10).0, vec![name("alice")]);
        assert_eq!(dir.current(&name("alice"), NOW + 60), None);
        assert_eq!(dir.expire(NOW + 60), vec![Change { username: name("alice"), online: false }]);
        assert!(dir.online(NOW, 10).0.is_empty());
    }

    #[test]
    fn record_for_another_account_is_refused() {
        let (alice, bob) = (identity(1), identity(2));
        let mut dir = Directory::new(Freshness::DEFAULT);
        // Alice, signed in as alice, publishes a record naming bob: wrong user.
        let rec = record(&alice, "bob", 1, NOW, 60);
        let signed = SignedPresence::sign(&rec, alice.secret());
        assert_eq!(dir.publish(&name("alice"), &alice.public(), signed.clone(), 1, NOW), Err(PresenceError::WrongUser));
        // The same record checked against bob's account key fails on the signature.
        assert_eq!(dir.publish(&name("bob"), &bob.public(), signed, 1, NOW), Err(PresenceError::BadSignature));
    }

    #[test]
    fn replayed_record_is_refused_even_after_it_went_offline() {
        let alice = identity(1);
        let mut dir = Directory::new(Freshness::DEFAULT);
        let first = SignedPresence::sign(&record(&alice, "alice", 10, NOW, 60), alice.secret());
        dir.publish(&name("alice"), &alice.public(), first.clone(), 1, NOW).unwrap();
        dir.connection_closed(1);
        assert_eq!(dir.current(&name("alice"), NOW), None);
        assert_eq!(dir.publish(&name("alice"), &alice.public(), first, 2, NOW + 1), Err(PresenceError::StaleSeq));
    }

    #[test]
    fn closing_or_withdrawing_drops_only_that_connections_record() {
        let (alice, bob) = (identity(1), identity(2));
        let mut dir = Directory::new(Freshness::DEFAULT);
        dir.publish(&name("alice"), &alice.public(), SignedPresence::sign(&record(&alice, "alice", 1, NOW, 60), alice.secret()), 1, NOW)
            .unwrap();
        dir.publish(&name("bob"), &bob.public(), SignedPresence::sign(&record(&bob, "bob", 1, NOW, 60), bob.secret()), 2, NOW).unwrap();
        assert_eq!(dir.withdraw(&name("alice"), 2), None);
        assert_eq!(dir.online(NOW, 10).0.len(), 2);
        assert_eq!(dir.connection_closed(1), vec![Change { username: name("alice"), online: false }]);
        assert_eq!(dir.online(NOW, 10).0, vec![name("bob")]);
        assert_eq!(dir.withdraw(&name("bob"), 2), Some(Change { username: name("bob"), online: false }));
        assert!(dir.connection_closed(2).is_empty());
        assert!(dir.online(NOW, 10).0.is_empty());
    }

    #[test]
    fn online_list_is_capped() {
        let mut dir = Directory::new(Freshness::DEFAULT);
        for i in 0..5u8 {
            let id = identity(10 + i);
            let user = format!("user{i}");
            dir.publish(&name(&user), &id.public(), SignedPresence::sign(&record(&id, &user, 1, NOW, 60), id.secret()), i.into(), NOW)
                .unwrap();
        }
        let (names, truncated) = dir.online(NOW, 3);
        assert_eq!((names.len(), truncated), (3, true));
    }
}
