//! Who is online: the node's in-memory table of signed presence records.
//!
//! Pure state machine: every method takes `now` (Unix seconds). The node driver calls
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

#[derive(Debug)]
pub struct Directory {
    freshness: Freshness,
    online: HashMap<Username, Entry>,
    /// Highest accepted `seq` per user, kept after the record goes away so that an old
    /// record cannot be published again while this node runs.
    last_seq: HashMap<Username, u64>,
}

impl Directory {
    pub fn new(freshness: Freshness) -> Self {
        Self { freshness, online: HashMap::new(), last_seq: HashMap::new() }
    }

    pub fn freshness(&self) -> Freshness {
        self.freshness
    }

    /// Accepts `signed` for `user` (whose account key is `key`), published over `conn`.
    pub fn publish(
        &mut self,
        user: &Username,
        key: &IdentityKey,
        signed: SignedPresence,
        conn: ConnId,
        now: u64,
    ) -> Result<(), PresenceError> {
        let record = signed.verify(key)?;
        if &record.username != user {
            return Err(PresenceError::WrongUser);
        }
        self.freshness.check_publish(&record, now, self.last_seq.get(user).copied())?;
        self.last_seq.insert(user.clone(), record.seq);
        self.online.insert(user.clone(), Entry { signed, expires_at: record.expires_at, conn });
        Ok(())
    }

    /// Removes `user`'s record if `conn` published it.
    pub fn withdraw(&mut self, user: &Username, conn: ConnId) {
        if self.online.get(user).is_some_and(|e| e.conn == conn) {
            self.online.remove(user);
        }
    }

    /// Forgets everything about `user` (their identity key changed).
    pub fn forget(&mut self, user: &Username) {
        self.online.remove(user);
        self.last_seq.remove(user);
    }

    /// Drops the records that `conn` published.
    pub fn connection_closed(&mut self, conn: ConnId) {
        self.online.retain(|_, e| e.conn != conn);
    }

    /// Drops expired records; returns how many went.
    pub fn expire(&mut self, now: u64) -> usize {
        let before = self.online.len();
        self.online.retain(|_, e| e.expires_at > now);
        before - self.online.len()
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
        let signed = SignedPresence::sign(&record(&alice, "alice", 1, NOW, 60), &alice.secret);
        dir.publish(&name("alice"), &alice.public(), signed.clone(), 7, NOW).unwrap();
        assert_eq!(dir.current(&name("alice"), NOW + 59), Some(&signed));
        assert_eq!(dir.online(NOW, 10).0, vec![name("alice")]);
        assert_eq!(dir.current(&name("alice"), NOW + 60), None);
        assert_eq!(dir.expire(NOW + 60), 1);
        assert!(dir.online(NOW, 10).0.is_empty());
    }

    #[test]
    fn record_for_another_account_is_refused() {
        let (alice, bob) = (identity(1), identity(2));
        let mut dir = Directory::new(Freshness::DEFAULT);
        // Alice, signed in as alice, publishes a record naming bob: wrong user.
        let rec = record(&alice, "bob", 1, NOW, 60);
        let signed = SignedPresence::sign(&rec, &alice.secret);
        assert_eq!(dir.publish(&name("alice"), &alice.public(), signed.clone(), 1, NOW), Err(PresenceError::WrongUser));
        // The same record checked against bob's account key fails on the signature.
        assert_eq!(dir.publish(&name("bob"), &bob.public(), signed, 1, NOW), Err(PresenceError::BadSignature));
    }

    #[test]
    fn replayed_record_is_refused_even_after_it_went_offline() {
        let alice = identity(1);
        let mut dir = Directory::new(Freshness::DEFAULT);
        let first = SignedPresence::sign(&record(&alice, "alice", 10, NOW, 60), &alice.secret);
        dir.publish(&name("alice"), &alice.public(), first.clone(), 1, NOW).unwrap();
        dir.connection_closed(1);
        assert_eq!(dir.current(&name("alice"), NOW), None);
        assert_eq!(dir.publish(&name("alice"), &alice.public(), first, 2, NOW + 1), Err(PresenceError::StaleSeq));
    }

    #[test]
    fn closing_or_withdrawing_drops_only_that_connections_record() {
        let (alice, bob) = (identity(1), identity(2));
        let mut dir = Directory::new(Freshness::DEFAULT);
        dir.publish(&name("alice"), &alice.public(), SignedPresence::sign(&record(&alice, "alice", 1, NOW, 60), &alice.secret), 1, NOW)
            .unwrap();
        dir.publish(&name("bob"), &bob.public(), SignedPresence::sign(&record(&bob, "bob", 1, NOW, 60), &bob.secret), 2, NOW).unwrap();
        dir.withdraw(&name("alice"), 2);
        assert_eq!(dir.online(NOW, 10).0.len(), 2);
        dir.connection_closed(1);
        assert_eq!(dir.online(NOW, 10).0, vec![name("bob")]);
        dir.withdraw(&name("bob"), 2);
        assert!(dir.online(NOW, 10).0.is_empty());
    }

    #[test]
    fn online_list_is_capped() {
        let mut dir = Directory::new(Freshness::DEFAULT);
        for i in 0..5u8 {
            let id = identity(10 + i);
            let user = format!("user{i}");
            dir.publish(&name(&user), &id.public(), SignedPresence::sign(&record(&id, &user, 1, NOW, 60), &id.secret), i.into(), NOW)
                .unwrap();
        }
        let (names, truncated) = dir.online(NOW, 3);
        assert_eq!((names.len(), truncated), (3, true));
    }
}
