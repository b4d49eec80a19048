//! Failed-login limits: per account and per source address, in fixed windows.
//!
//! A key that reaches `max_failures` within a window is refused until the window ends,
//! so a lockout is always temporary. An address from which an account last signed in
//! successfully is exempt from that account's lockout, so an attacker hammering a
//! password cannot keep the real user's own machine out. Key-based `Authenticate` is
//! never limited by password failures. Memory is bounded: each table holds at most
//! `capacity` keys and sheds expired ones first.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use crate::username::Username;

#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub window_secs: u64,
    pub max_failures: u32,
}

#[derive(Debug)]
struct Window {
    started: u64,
    failures: u32,
}

/// Counts failures per key in fixed windows.
#[derive(Debug)]
pub struct FailureCounter<K> {
    policy: Policy,
    capacity: usize,
    windows: HashMap<K, Window>,
}

impl<K: Eq + Hash + Clone> FailureCounter<K> {
    pub fn new(policy: Policy, capacity: usize) -> Self {
        Self { policy, capacity, windows: HashMap::new() }
    }

    /// `Err(seconds)` while `key` is locked out.
    pub fn check(&self, key: &K, now: u64) -> Result<(), u64> {
        match self.windows.get(key) {
            Some(w) if w.failures >= self.policy.max_failures && now < w.started + self.policy.window_secs => {
                Err(w.started + self.policy.window_secs - now)
            }
            _ => Ok(()),
        }
    }

    pub fn fail(&mut self, key: &K, now: u64) {
        if !self.windows.contains_key(key) && self.windows.len() >= self.capacity {
            let window = self.policy.window_secs;
            self.windows.retain(|_, w| now < w.started + window);
            if self.windows.len() >= self.capacity {
                // Still full of live windows: drop the oldest one to stay bounded.
                if let Some(oldest) = self.windows.iter().min_by_key(|(_, w)| w.started).map(|(k, _)| k.clone()) {
                    self.windows.remove(&oldest);
                }
            }
        }
        let w = self.windows.entry(key.clone()).or_insert(Window { started: now, failures: 0 });
        if now >= w.started + self.policy.window_secs {
            *w = Window { started: now, failures: 0 };
        }
        w.failures = w.failures.saturating_add(1);
    }

    pub fn clear(&mut self, key: &K) {
        self.windows.remove(key);
    }
}

/// The node's login limits.
#[derive(Debug)]
pub struct LoginLimits {
    per_account: FailureCounter<Username>,
    per_address: FailureCounter<IpAddr>,
    /// (account, address) pairs that signed in successfully, with when.
    known: HashMap<(Username, IpAddr), u64>,
    known_ttl: u64,
    capacity: usize,
}

impl LoginLimits {
    pub const ACCOUNT: Policy = Policy { window_secs: 300, max_failures: 10 };
    pub const ADDRESS: Policy = Policy { window_secs: 300, max_failures: 30 };

    pub fn new(account: Policy, address: Policy, capacity: usize) -> Self {
        Self {
            per_account: FailureCounter::new(account, capacity),
            per_address: FailureCounter::new(address, capacity),
            known: HashMap::new(),
            known_ttl: 30 * 24 * 3600,
            capacity,
        }
    }

    /// `Err(seconds to wait)` if an attempt on `user` from `addr` must be refused now.
    pub fn check(&self, user: &Username, addr: IpAddr, now: u64) -> Result<(), u64> {
        self.per_address.check(&addr, now)?;
        if self.is_known(user, addr, now) {
            return Ok(());
        }
        self.per_account.check(user, now)
    }

    pub fn failed(&mut self, user: &Username, addr: IpAddr, now: u64) {
        self.per_address.fail(&addr, now);
        if !self.is_known(user, addr, now) {
            self.per_account.fail(user, now);
        }
    }

    pub fn succeeded(&mut self, user: &Username, addr: IpAddr, now: u64) {
        if self.known.len() >= self.capacity {
            let ttl = self.known_ttl;
            self.known.retain(|_, at| now < *at + ttl);
            if self.known.len() >= self.capacity {
                self.known.clear();
            }
        }
        self.known.insert((user.clone(), addr), now);
    }

    fn is_known(&self, user: &Username, addr: IpAddr, now: u64) -> bool {
        self.known.get(&(user.clone(), addr)).is_some_and(|at| now < at + self.known_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn limits() -> LoginLimits {
        LoginLimits::new(Policy { window_secs: 60, max_failures: 3 }, Policy { window_secs: 60, max_failures: 5 }, 100)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn account_locks_after_failures_and_unlocks_after_window() {
        let mut l = limits();
        let bob = Username::parse("bob").unwrap();
        for i in 0..3 {
            assert!(l.check(&bob, ip(i), NOW).is_ok());
            l.failed(&bob, ip(i), NOW);
        }
        assert_eq!(l.check(&bob, ip(9), NOW + 10), Err(50));
        assert!(l.check(&bob, ip(9), NOW + 60).is_ok());
    }

    #[test]
    fn address_locks_across_accounts() {
        let mut l = limits();
        for i in 0..5 {
            l.failed(&Username::parse(&format!("user{i}")).unwrap(), ip(1), NOW);
        }
        assert!(l.check(&Username::parse("fresh").unwrap(), ip(1), NOW).is_err());
        assert!(l.check(&Username::parse("fresh").unwrap(), ip(2), NOW).is_ok());
    }

    #[test]
    fn a_known_address_is_not_locked_out_by_others_failures() {
        let mut l = limits();
        let bob = Username::parse("bob").unwrap();
        l.succeeded(&bob, ip(1), NOW);
        for i in 10..20 {
            l.failed(&bob, ip(i), NOW);
        }
        assert!(l.check(&bob, ip(50), NOW).is_err());
        assert!(l.check(&bob, ip(1), NOW).is_ok());
    }

    #[test]
    fn tables_stay_bounded() {
        let mut c = FailureCounter::new(Policy { window_secs: 60, max_failures: 1 }, 10);
        for i in 0..1000u32 {
            c.fail(&i, NOW);
        }
        assert!(c.windows.len() <= 10);
    }
}
