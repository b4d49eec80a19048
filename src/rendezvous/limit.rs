//! Login and registration limits: per account and per source address, in fixed windows.
//!
//! Every password attempt counts *before* it is checked (a success takes it back), so
//! concurrent attempts cannot slip past the limit while argon2 runs. A key that reaches
//! `max_failures` within a window is refused until the window ends: a lockout is always
//! temporary. An address from which the account signed in successfully (while this
//! node runs) is exempt from that account's lockout, and key-based `Authenticate` is
//! never limited by password failures, so guessing cannot keep the user's existing
//! devices out; a *new* device on a *new* address can be delayed by a window at a time
//! while someone keeps guessing. IPv6 sources count per /64. Memory is bounded: each
//! table holds at most `capacity` keys and sheds expired, then oldest, entries.

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

    /// Takes back one counted attempt.
    pub fn forgive(&mut self, key: &K) {
        if let Some(w) = self.windows.get_mut(key) {
            w.failures = w.failures.saturating_sub(1);
        }
    }
}

/// The key an address counts under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by /64,
/// since one host usually holds a whole /64.
pub fn source_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
        },
    }
}

/// The node's login and registration limits.
#[derive(Debug)]
pub struct LoginLimits {
    per_account: FailureCounter<Username>,
    per_address: FailureCounter<IpAddr>,
    registrations: FailureCounter<IpAddr>,
    /// (account, address) pairs that signed in successfully, with when.
    known: HashMap<(Username, IpAddr), u64>,
    known_ttl: u64,
    capacity: usize,
}

impl LoginLimits {
    pub const ACCOUNT: Policy = Policy { window_secs: 300, max_failures: 10 };
    pub const ADDRESS: Policy = Policy { window_secs: 300, max_failures: 30 };
    pub const REGISTRATIONS: Policy = Policy { window_secs: 3600, max_failures: 20 };

    pub fn new(account: Policy, address: Policy, capacity: usize) -> Self {
        Self {
            per_account: FailureCounter::new(account, capacity),
            per_address: FailureCounter::new(address, capacity),
            registrations: FailureCounter::new(Self::REGISTRATIONS, capacity),
            known: HashMap::new(),
            known_ttl: 30 * 24 * 3600,
            capacity,
        }
    }

    /// Admits a password attempt on `user` from `addr` and counts it, or says how many
    /// seconds to wait. Call [`LoginLimits::succeeded`] if the password was right.
    pub fn attempt(&mut self, user: &Username, addr: IpAddr, now: u64) -> Result<(), u64> {
        let source = source_key(addr);
        self.per_address.check(&source, now)?;
        let known = self.is_known(user, source, now);
        if !known {
            self.per_account.check(user, now)?;
            self.per_account.fail(user, now);
        }
        self.per_address.fail(&source, now);
        Ok(())
    }

    /// Admits and counts a registration from `addr`.
    pub fn register(&mut self, addr: IpAddr, now: u64) -> Result<(), u64> {
        let source = source_key(addr);
        self.registrations.check(&source, now)?;
        self.registrations.fail(&source, now);
        Ok(())
    }

    /// The attempt succeeded: it no longer counts, and the address becomes known.
    pub fn succeeded(&mut self, user: &Username, addr: IpAddr, now: u64) {
        let source = source_key(addr);
        self.per_account.clear(user);
        self.per_address.forgive(&source);
        self.remember(user, source, now);
    }

    /// A key-based sign-in from `addr`: the address becomes known for `user`.
    pub fn remember(&mut self, user: &Username, addr: IpAddr, now: u64) {
        let source = source_key(addr);
        if self.known.len() >= self.capacity && !self.known.contains_key(&(user.clone(), source)) {
            let ttl = self.known_ttl;
            self.known.retain(|_, at| now < *at + ttl);
            if self.known.len() >= self.capacity {
                // Shed the oldest eighth rather than everything.
                let mut times: Vec<u64> = self.known.values().copied().collect();
                let cut = times.len() / 8;
                let (_, threshold, _) = times.select_nth_unstable(cut);
                let threshold = *threshold;
                self.known.retain(|_, at| *at > threshold);
            }
        }
        self.known.insert((user.clone(), source), now);
    }

    fn is_known(&self, user: &Username, source: IpAddr, now: u64) -> bool {
        self.known.get(&(user.clone(), source)).is_some_and(|at| now < at + self.known_ttl)
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
    fn account_locks_after_attempts_and_unlocks_after_window() {
        let mut l = limits();
        let bob = Username::parse("bob").unwrap();
        for i in 0..3 {
            assert!(l.attempt(&bob, ip(i), NOW).is_ok());
        }
        assert_eq!(l.attempt(&bob, ip(9), NOW + 10), Err(50));
        assert!(l.attempt(&bob, ip(9), NOW + 60).is_ok());
    }

    #[test]
    fn attempts_count_before_they_are_checked() {
        // Three attempts in flight at once (none finished): the fourth is refused.
        let mut l = limits();
        let bob = Username::parse("bob").unwrap();
        for _ in 0..3 {
            l.attempt(&bob, ip(1), NOW).unwrap();
        }
        assert!(l.attempt(&bob, ip(1), NOW).is_err());
    }

    #[test]
    fn success_takes_the_attempt_back() {
        let mut l = limits();
        let bob = Username::parse("bob").unwrap();
        for _ in 0..2 {
            l.attempt(&bob, ip(1), NOW).unwrap();
        }
        l.attempt(&bob, ip(1), NOW).unwrap();
        l.succeeded(&bob, ip(1), NOW);
        assert!(l.attempt(&bob, ip(1), NOW).is_ok());
    }

    #[test]
    fn address_locks_across_accounts() {
        let mut l = limits();
        for i in 0..5 {
            l.attempt(&Username::parse(&format!("user{i}")).unwrap(), ip(1), NOW).unwrap();
        }
        assert!(l.attempt(&Username::parse("fresh").unwrap(), ip(1), NOW).is_err());
        assert!(l.attempt(&Username::parse("fresh").unwrap(), ip(2), NOW).is_ok());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        assert_eq!(source_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_known_address_is_not_locked_out_by_others_guesses() {
        let mut l = limits();
        let bob = Username::parse("bob").unwrap();
        l.remember(&bob, ip(1), NOW);
        for i in 10..20 {
            let _ = l.attempt(&bob, ip(i), NOW);
        }
        assert!(l.attempt(&bob, ip(50), NOW).is_err());
        assert!(l.attempt(&bob, ip(1), NOW).is_ok());
    }

    #[test]
    fn registrations_are_limited_per_address() {
        let mut l = limits();
        for _ in 0..LoginLimits::REGISTRATIONS.max_failures {
            l.register(ip(1), NOW).unwrap();
        }
        assert!(l.register(ip(1), NOW).is_err());
        assert!(l.register(ip(2), NOW).is_ok());
    }

    #[test]
    fn tables_stay_bounded() {
        let mut c = FailureCounter::new(Policy { window_secs: 60, max_failures: 1 }, 10);
        for i in 0..1000u32 {
            c.fail(&i, NOW);
        }
        assert!(c.windows.len() <= 10);
        let mut l = LoginLimits::new(LoginLimits::ACCOUNT, LoginLimits::ADDRESS, 16);
        for i in 0..200u32 {
            l.remember(&Username::parse(&format!("user{i}")).unwrap(), ip(1), NOW + u64::from(i));
        }
        assert!(l.known.len() <= 16);
        assert!(l.is_known(&Username::parse("user199").unwrap(), ip(1), NOW + 200), "the newest entries stay");
    }
}
