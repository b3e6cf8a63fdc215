//! Failed logins, counted per username and per client address, and the
//! growing pause they earn.
//!
//! Each username and each [`ClientAddr`] has a count of failed logins. The
//! first few failures are free; from the `free`-th on, each failure blocks
//! that username (or address) for a pause that starts at `backoff` and
//! doubles with every further failure, up to `backoff_max`. While either
//! the username or the address of a login is blocked, the login is refused
//! with 429 `rate_limited` and how long to wait, before any password is
//! checked (so a blocked guess costs no hash). A username's count ends with
//! a successful login; any count is forgotten once it has had no failure
//! for `window` and its pause is over. Unknown usernames count like known
//! ones, so the answer never tells which exist.
//!
//! Blocking by username lets a stranger lock an account out for at most
//! `backoff_max` at a time; blocking by address alone would let a botnet
//! guess freely. Both are bounded and both are settings.
//!
//! This module only counts and answers "wait this long". It never checks
//! a password, never touches the store, keeps at most [`MAX_TRACKED`]
//! records of each kind (so a flood of names or addresses cannot grow it
//! without bound) and keeps no username in clear.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use std::time::Instant;

use sha2::{Digest, Sha256};

use super::peer::ClientAddr;

/// The most usernames, and the most addresses, remembered at once. Beyond
/// it the records whose time is over are dropped, then the oldest.
pub const MAX_TRACKED: usize = 100_000;

/// When failed logins start to cost a pause, and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// Failures of one username before it is blocked; 0 turns this off.
    pub failures_per_user: u32,
    /// Failures from one address before it is blocked; 0 turns this off.
    pub failures_per_address: u32,
    /// A count is forgotten after this long without a failure.
    pub window: Duration,
    /// The first pause; every further failure doubles it.
    pub backoff: Duration,
    /// The longest pause.
    pub backoff_max: Duration,
}

impl ThrottlePolicy {
    pub fn from_config(config: &crate::config::Config) -> ThrottlePolicy {
        ThrottlePolicy {
            failures_per_user: config.login_failures_per_user,
            failures_per_address: config.login_failures_per_address,
            window: config.login_failure_window,
            backoff: config.login_backoff,
            backoff_max: config.login_backoff_max,
        }
    }

    /// The pause earned by the `failures`-th failure when `free` are free.
    fn pause(&self, failures: u32, free: u32) -> Duration {
        let doublings = failures.saturating_sub(free).min(31);
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }
}

/// The failed-login counts of a node.
#[derive(Debug)]
pub struct LoginThrottle {
    policy: ThrottlePolicy,
    users: Mutex<Failures<[u8; 32]>>,
    addresses: Mutex<Failures<ClientAddr>>,
}

impl LoginThrottle {
    pub fn new(policy: ThrottlePolicy) -> LoginThrottle {
        LoginThrottle {
            policy,
            users: Mutex::new(Failures::new(policy.failures_per_user)),
            addresses: Mutex::new(Failures::new(policy.failures_per_address)),
        }
    }

    /// Before a password is checked: `Err(wait)` while the username or the
    /// address is blocked.
    pub fn check(&self, username: &str, addr: ClientAddr) -> Result<(), Duration> {
        self.check_at(username, addr, Instant::now())
    }

    fn check_at(&self, username: &str, addr: ClientAddr, now: Instant) -> Result<(), Duration> {
        let user = lock(&self.users).blocked_for(&user_key(username), now);
        let address = lock(&self.addresses).blocked_for(&addr, now);
        match user.max(address) {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// A wrong password (or an unknown username) from `addr`.
    pub fn failed(&self, username: &str, addr: ClientAddr) {
        self.failed_at(username, addr, Instant::now());
    }

    fn failed_at(&self, username: &str, addr: ClientAddr, now: Instant) {
        if let Some(pause) = lock(&self.users).failed(user_key(username), now, &self.policy) {
            tracing::warn!(
                username,
                pause_ms = pause.as_millis(),
                "failed logins: username paused"
            );
        }
        if let Some(pause) = lock(&self.addresses).failed(addr, now, &self.policy) {
            tracing::warn!(address = %addr, pause_ms = pause.as_millis(), "failed logins: address paused");
        }
    }

    /// A successful login: the username's count starts again. The
    /// address's count does not (one good account must not wash an
    /// address's guesses at others).
    pub fn succeeded(&self, username: &str) {
        lock(&self.users).records.remove(&user_key(username));
    }
}

/// Usernames are kept as their SHA-256: bounded in size whatever a client
/// sends, and not in clear.
fn user_key(username: &str) -> [u8; 32] {
    Sha256::digest(username.as_bytes()).into()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One kind of count (usernames or addresses).
#[derive(Debug)]
struct Failures<K> {
    /// Failures that cost nothing; 0: this kind is not counted.
    free: u32,
    records: HashMap<K, Record>,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last_failure: Instant,
    blocked_until: Instant,
}

impl Record {
    /// Whether the record no longer matters: no failure for `window` and
    /// no pause running.
    fn over(&self, now: Instant, window: Duration) -> bool {
        now >= self.blocked_until && now.saturating_duration_since(self.last_failure) >= window
    }
}

impl<K: Hash + Eq + Clone> Failures<K> {
    fn new(free: u32) -> Self {
        Failures {
            free,
            records: HashMap::new(),
        }
    }

    fn blocked_for(&self, key: &K, now: Instant) -> Option<Duration> {
        let record = self.records.get(key)?;
        (record.blocked_until > now).then(|| record.blocked_until - now)
    }

    /// Counts a failure; returns the pause it earned, if any.
    fn failed(&mut self, key: K, now: Instant, policy: &ThrottlePolicy) -> Option<Duration> {
        if self.free == 0 {
            return None;
        }
        if !self.records.contains_key(&key) {
            self.make_room(now, policy.window);
        }
        let record = self.records.entry(key).or_insert(Record {
            failures: 0,
            last_failure: now,
            blocked_until: now,
        });
        if record.over(now, policy.window) {
            record.failures = 0;
        }
        record.failures = record.failures.saturating_add(1);
        record.last_failure = now;
        if record.failures < self.free {
            return None;
        }
        let pause = policy.pause(record.failures, self.free);
        record.blocked_until = now + pause;
        Some(pause)
    }

    /// Keeps the table under [`MAX_TRACKED`]: drops the records that are
    /// over, and if that is not enough, the one with the oldest failure.
    fn make_room(&mut self, now: Instant, window: Duration) {
        if self.records.len() < MAX_TRACKED {
            return;
        }
        self.records.retain(|_, record| !record.over(now, window));
        if self.records.len() >= MAX_TRACKED {
            let oldest = self
                .records
                .iter()
                .min_by_key(|(_, record)| record.last_failure)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.records.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ThrottlePolicy {
        ThrottlePolicy {
            failures_per_user: 3,
            failures_per_address: 5,
            window: Duration::from_secs(60),
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(4),
        }
    }

    fn addr(last: u8) -> ClientAddr {
        ClientAddr::of(std::net::IpAddr::from([192, 0, 2, last]))
    }

    #[test]
    fn a_username_is_paused_from_its_third_failure_for_doubling_times_up_to_the_cap() {
        let throttle = LoginThrottle::new(policy());
        let mut now = Instant::now();
        for n in 0..2u8 {
            // Each from another address: only the username counts here.
            throttle.failed_at("ada", addr(n), now);
            assert_eq!(throttle.check_at("ada", addr(9), now), Ok(()));
        }
        let mut pauses = Vec::new();
        for n in 2..6u8 {
            throttle.failed_at("ada", addr(n), now);
            let wait = throttle.check_at("ada", addr(9), now).expect_err("paused");
            pauses.push(wait.as_secs());
            now += wait;
            assert_eq!(throttle.check_at("ada", addr(9), now), Ok(()));
        }
        assert_eq!(pauses, [1, 2, 4, 4]);
        assert_eq!(
            throttle.check_at("bob", addr(9), now),
            Ok(()),
            "other names are free"
        );
        throttle.succeeded("ada");
        throttle.failed_at("ada", addr(9), now);
        assert_eq!(
            throttle.check_at("ada", addr(8), now),
            Ok(()),
            "a success starts over"
        );
    }

    #[test]
    fn an_address_is_paused_whatever_names_it_tries_and_a_success_does_not_clear_it() {
        let throttle = LoginThrottle::new(policy());
        let now = Instant::now();
        for n in 0..5 {
            throttle.failed_at(&format!("user{n}"), addr(1), now);
            throttle.succeeded("someone-else");
        }
        let wait = throttle
            .check_at("fresh", addr(1), now)
            .expect_err("address paused");
        assert_eq!(wait, Duration::from_secs(1));
        assert_eq!(
            throttle.check_at("fresh", addr(2), now),
            Ok(()),
            "other addresses are free"
        );
    }

    #[test]
    fn counts_are_forgotten_after_a_quiet_window() {
        let throttle = LoginThrottle::new(policy());
        let now = Instant::now();
        throttle.failed_at("ada", addr(1), now);
        throttle.failed_at("ada", addr(1), now);
        let later = now + Duration::from_secs(61);
        throttle.failed_at("ada", addr(1), later);
        assert_eq!(
            throttle.check_at("ada", addr(1), later),
            Ok(()),
            "the count started over"
        );
    }

    #[test]
    fn zero_turns_a_kind_off() {
        let throttle = LoginThrottle::new(ThrottlePolicy {
            failures_per_user: 0,
            failures_per_address: 0,
            ..policy()
        });
        let now = Instant::now();
        for _ in 0..50 {
            throttle.failed_at("ada", addr(1), now);
        }
        assert_eq!(throttle.check_at("ada", addr(1), now), Ok(()));
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut failures = Failures::new(3);
        let now = Instant::now();
        for n in 0..(MAX_TRACKED as u32 + 10) {
            failures.failed(n, now, &policy());
        }
        assert!(failures.records.len() <= MAX_TRACKED);
    }
}
