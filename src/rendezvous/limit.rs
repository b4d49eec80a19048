//! Login and registration limits: per account and per source address, in fixed windows;
//! connection counts per source address ([`ConnectionGate`]); request rates per source
//! address ([`RateLimiter`]).
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

/// Bounds on the connections a QUIC server holds: per source address (IPv6 per /64),
/// in all, and handshakes in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionPolicy {
    /// Connections one source address may hold at once.
    pub per_source: usize,
    /// Connections held at once from everywhere.
    pub total: usize,
    /// Handshakes in flight at once from everywhere.
    pub handshakes: usize,
}

/// What to do with a connection attempt.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead; the ticket counts the connection until it is dropped.
    Accept(Ticket),
    /// Ask the client to prove its address first (a QUIC Retry): its source address
    /// may be forged, and is not counted against anyone until it is proven.
    Retry,
    /// Refuse: the (proven) source, or the server, is full.
    Refuse(Crowded),
}

/// Which bound a refused connection hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crowded {
    Source,
    Total,
    Handshakes,
}

#[derive(Debug, Default)]
struct GateState {
    /// Connections whose source address is proven (by a Retry token or a finished
    /// handshake), per source key.
    proven: HashMap<IpAddr, usize>,
    /// Handshakes in flight from addresses not proven yet, per source key.
    unproven: HashMap<IpAddr, usize>,
    handshakes: usize,
    total: usize,
}

fn decrement(map: &mut HashMap<IpAddr, usize>, key: &IpAddr) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Counts connections per source address and in all, and admits or refuses new ones.
///
/// A QUIC Initial's source address can be forged, so an attempt from an address not
/// proven yet is counted apart, in its own per-source allowance, and sent a Retry once
/// that allowance (or half the handshake allowance) is used up. Forged packets can then
/// neither fill a real client's allowance nor more than half of the handshake slots.
/// Cheap to clone; every clone shares the counts. Memory is one map entry per source
/// address with a connection, so it is bounded by `total`.
#[derive(Clone, Debug)]
pub struct ConnectionGate {
    policy: ConnectionPolicy,
    state: std::sync::Arc<std::sync::Mutex<GateState>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Handshake in flight from an address not proven yet.
    Unproven,
    /// Handshake in flight from a proven address.
    Handshake,
    /// Handshake done.
    Open,
}

/// One admitted connection; releases its counts when dropped.
#[derive(Debug)]
pub struct Ticket {
    gate: ConnectionGate,
    source: IpAddr,
    stage: Stage,
}

impl ConnectionGate {
    pub fn new(policy: ConnectionPolicy) -> Self {
        Self { policy, state: Default::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides on an attempt from `addr`; `proven` is whether QUIC validated the
    /// address (the attempt carries a Retry or address-validation token).
    pub fn admit(&self, addr: IpAddr, proven: bool) -> Admission {
        let source = source_key(addr);
        let p = self.policy;
        let mut s = self.state();
        let held = s.proven.get(&source).copied().unwrap_or(0);
        let stage = if proven {
            if held >= p.per_source {
                return Admission::Refuse(Crowded::Source);
            }
            if s.handshakes >= p.handshakes {
                return Admission::Refuse(Crowded::Handshakes);
            }
            if s.total >= p.total {
                return Admission::Refuse(Crowded::Total);
            }
            *s.proven.entry(source).or_default() += 1;
            Stage::Handshake
        } else {
            let unproven = s.unproven.get(&source).copied().unwrap_or(0);
            if held >= p.per_source || unproven >= p.per_source || s.handshakes >= p.handshakes.div_ceil(2) || s.total >= p.total {
                return Admission::Retry;
            }
            *s.unproven.entry(source).or_default() += 1;
            Stage::Unproven
        };
        s.handshakes += 1;
        s.total += 1;
        drop(s);
        Admission::Accept(Ticket { gate: self.clone(), source, stage })
    }

    /// Connections counted now (handshakes included).
    pub fn connections(&self) -> usize {
        self.state().total
    }

    /// Handshakes in flight now.
    pub fn handshakes(&self) -> usize {
        self.state().handshakes
    }
}

impl Ticket {
    /// The handshake finished, which proves the source address. Fails, leaving the
    /// ticket to be dropped, if that source already holds its allowance.
    pub fn handshake_done(&mut self) -> Result<(), Crowded> {
        let per_source = self.gate.policy.per_source;
        let mut s = self.gate.state();
        match self.stage {
            Stage::Open => return Ok(()),
            Stage::Handshake => {}
            Stage::Unproven => {
                if s.proven.get(&self.source).copied().unwrap_or(0) >= per_source {
                    return Err(Crowded::Source);
                }
                decrement(&mut s.unproven, &self.source);
                *s.proven.entry(self.source).or_default() += 1;
            }
        }
        s.handshakes = s.handshakes.saturating_sub(1);
        self.stage = Stage::Open;
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.state();
        match self.stage {
            Stage::Unproven => decrement(&mut s.unproven, &self.source),
            Stage::Handshake | Stage::Open => decrement(&mut s.proven, &self.source),
        }
        if self.stage != Stage::Open {
            s.handshakes = s.handshakes.saturating_sub(1);
        }
        s.total = s.total.saturating_sub(1);
    }
}

/// A request rate: a sustained number per second, and a burst allowed on top of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens left, in thousandths.
    milli: u64,
    at_ms: u64,
}

/// A token bucket per source address (IPv6 per /64). Memory is bounded: at most
/// `capacity` buckets, shedding full (idle) ones, then the least recently used.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    capacity: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    pub fn new(rate: Rate, capacity: usize) -> Self {
        Self { rate, capacity, buckets: HashMap::new() }
    }

    fn refilled(rate: Rate, b: &Bucket, now_ms: u64) -> u64 {
        let full = u64::from(rate.burst) * 1000;
        b.milli.saturating_add(now_ms.saturating_sub(b.at_ms).saturating_mul(u64::from(rate.per_second))).min(full)
    }

    /// Takes one request from `addr`'s bucket, or says how many seconds to wait.
    pub fn allow(&mut self, addr: IpAddr, now_ms: u64) -> Result<(), u64> {
        let source = source_key(addr);
        let rate = self.rate;
        let full = u64::from(rate.burst) * 1000;
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.capacity {
            self.buckets.retain(|_, b| Self::refilled(rate, b, now_ms) < full);
            if self.buckets.len() >= self.capacity {
                if let Some(stale) = self.buckets.iter().min_by_key(|(_, b)| b.at_ms).map(|(k, _)| *k) {
                    self.buckets.remove(&stale);
                }
            }
        }
        let b = self.buckets.entry(source).or_insert(Bucket { milli: full, at_ms: now_ms });
        b.milli = Self::refilled(rate, b, now_ms);
        b.at_ms = b.at_ms.max(now_ms);
        if b.milli >= 1000 {
            b.milli -= 1000;
            return Ok(());
        }
        let per_ms = u64::from(rate.per_second.max(1));
        Err((1000 - b.milli).div_ceil(per_ms).div_ceil(1000).max(1))
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

    fn gate(per_source: usize, total: usize, handshakes: usize) -> ConnectionGate {
        ConnectionGate::new(ConnectionPolicy { per_source, total, handshakes })
    }

    fn accepted(a: Admission) -> Ticket {
        match a {
            Admission::Accept(t) => t,
            other => panic!("expected Accept, got {other:?}"),
        }
    }

    #[test]
    fn proven_sources_are_capped_and_released() {
        let g = gate(2, 100, 100);
        let mut held: Vec<Ticket> = (0..2).map(|_| accepted(g.admit(ip(1), true))).collect();
        assert!(matches!(g.admit(ip(1), true), Admission::Refuse(Crowded::Source)));
        assert!(matches!(g.admit(ip(1), false), Admission::Retry), "an unproven attempt from a full source gets a Retry");
        let _other = accepted(g.admit(ip(2), true));
        for t in &mut held {
            t.handshake_done().unwrap();
        }
        assert_eq!((g.connections(), g.handshakes()), (3, 1));
        held.pop();
        let _again = accepted(g.admit(ip(1), true));
        drop(held);
        drop(_again);
        drop(_other);
        assert_eq!((g.connections(), g.handshakes()), (0, 0));
        assert!(g.state().proven.is_empty() && g.state().unproven.is_empty(), "no entries left behind");
    }

    #[test]
    fn forged_sources_cannot_fill_a_real_clients_allowance() {
        let g = gate(2, 100, 100);
        // Two unproven attempts claiming 127.0.0.1 never finish their handshakes.
        let _forged: Vec<Ticket> = (0..2).map(|_| accepted(g.admit(ip(1), false))).collect();
        assert!(matches!(g.admit(ip(1), false), Admission::Retry));
        // The real client answers the Retry and gets in, twice.
        let mut real: Vec<Ticket> = (0..2).map(|_| accepted(g.admit(ip(1), true))).collect();
        for t in &mut real {
            t.handshake_done().unwrap();
        }
        assert!(matches!(g.admit(ip(1), true), Admission::Refuse(Crowded::Source)));
    }

    #[test]
    fn a_finished_unproven_handshake_counts_against_its_source() {
        let g = gate(1, 100, 100);
        let mut a = accepted(g.admit(ip(1), false));
        let mut b = accepted(g.admit(ip(1), true));
        b.handshake_done().unwrap();
        assert_eq!(a.handshake_done(), Err(Crowded::Source));
        drop(a);
        assert_eq!((g.connections(), g.handshakes()), (1, 0));
    }

    #[test]
    fn handshakes_and_total_are_capped() {
        let g = gate(100, 5, 4);
        let _unproven: Vec<Ticket> = (0..2).map(|i| accepted(g.admit(ip(10 + i), false))).collect();
        assert!(matches!(g.admit(ip(20), false), Admission::Retry), "past half the handshake slots, addresses must be proven");
        let mut proven: Vec<Ticket> = (0..2).map(|i| accepted(g.admit(ip(30 + i), true))).collect();
        assert!(matches!(g.admit(ip(40), true), Admission::Refuse(Crowded::Handshakes)));
        for t in &mut proven {
            t.handshake_done().unwrap();
        }
        let _fifth = accepted(g.admit(ip(41), true));
        assert!(matches!(g.admit(ip(42), true), Admission::Refuse(Crowded::Total)));
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_the_rate() {
        let mut r = RateLimiter::new(Rate { per_second: 10, burst: 5 }, 100);
        for _ in 0..5 {
            r.allow(ip(1), NOW).unwrap();
        }
        assert_eq!(r.allow(ip(1), NOW), Err(1));
        assert!(r.allow(ip(2), NOW).is_ok(), "each address has its own bucket");
        assert_eq!(r.allow(ip(1), NOW + 50), Err(1), "half a token is not enough");
        assert!(r.allow(ip(1), NOW + 100).is_ok());
        assert!(r.allow(ip(1), NOW + 100).is_err());
        for _ in 0..5 {
            r.allow(ip(1), NOW + 10_000).unwrap();
        }
        assert!(r.allow(ip(1), NOW + 10_000).is_err(), "idle time refills only up to the burst");
        let mut small = RateLimiter::new(Rate { per_second: 1, burst: 1 }, 8);
        for i in 0..200u64 {
            let _ = small.allow(IpAddr::from([10, 0, (i >> 8) as u8, i as u8]), NOW + i);
        }
        assert!(small.buckets.len() <= 8);
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
