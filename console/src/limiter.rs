//! Login rate limiting: after [`FAILURES_MAX`] failed logins for one user name, or
//! [`ADDRESS_FAILURES_MAX`] from one client address (higher: many people may share one
//! address behind a proxy or NAT), within [`WINDOW_MS`], further attempts are refused until
//! [`LOCKOUT_MS`] have passed, whatever password they carry (so a guess that happens to be
//! right during a lockout does not get in either). Pure: the caller passes the time;
//! table-tested.
//!
//! The table is bounded: past [`TRACKED_MAX`] keys the oldest are forgotten, so a flood of
//! made-up user names costs bounded memory.

use std::collections::HashMap;

/// Failures that lock a name out.
pub const FAILURES_MAX: u32 = 5;
/// Failures that lock a client address out.
pub const ADDRESS_FAILURES_MAX: u32 = 20;
/// Failures older than this are forgotten.
pub const WINDOW_MS: u64 = 15 * 60 * 1000;
/// How long a lockout lasts.
pub const LOCKOUT_MS: u64 = 15 * 60 * 1000;
/// Names and addresses remembered at most.
pub const TRACKED_MAX: usize = 100_000;

#[derive(Clone, Copy, Debug, Default)]
struct Record {
    failures: u32,
    first_ms: u64,
    locked_until_ms: u64,
}

/// What the limiter says of an attempt before the password is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Check the password.
    Open,
    /// Refuse without checking, until this time (ms since the epoch).
    Locked {
        /// When the lockout ends.
        until_ms: u64,
    },
}

/// What a failure did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// Counted.
    Counted,
    /// This failure locked the name or the address out (log it, count it).
    LockedOut,
}

/// Failures per key (`user:NAME`, `addr:IP`).
#[derive(Default)]
pub struct Limiter {
    records: HashMap<String, Record>,
}

impl Limiter {
    /// Whether an attempt for `user` from `addr` may be checked at `now_ms`.
    pub fn gate(&self, user: &str, addr: &str, now_ms: u64) -> Gate {
        let until = keys(user, addr)
            .iter()
            .filter_map(|k| self.records.get(k))
            .map(|r| r.locked_until_ms)
            .max()
            .unwrap_or(0);
        if until > now_ms {
            Gate::Locked { until_ms: until }
        } else {
            Gate::Open
        }
    }

    /// Counts a failed attempt.
    pub fn failed(&mut self, user: &str, addr: &str, now_ms: u64) -> Failed {
        if self.records.len() >= TRACKED_MAX {
            self.forget_oldest(now_ms);
        }
        let mut locked = false;
        for k in keys(user, addr) {
            let max = if k.starts_with("addr:") {
                ADDRESS_FAILURES_MAX
            } else {
                FAILURES_MAX
            };
            let r = self.records.entry(k).or_default();
            if now_ms.saturating_sub(r.first_ms) > WINDOW_MS {
                *r = Record {
                    failures: 0,
                    first_ms: now_ms,
                    locked_until_ms: r.locked_until_ms,
                };
            }
            r.failures += 1;
            if r.failures >= max && r.locked_until_ms <= now_ms {
                r.locked_until_ms = now_ms + LOCKOUT_MS;
                r.failures = 0;
                r.first_ms = now_ms;
                locked = true;
            }
        }
        if locked {
            Failed::LockedOut
        } else {
            Failed::Counted
        }
    }

    /// A successful login forgets the name's failures (not the address's: one right password
    /// must not reset the count of a client trying many names).
    pub fn succeeded(&mut self, user: &str) {
        self.records.remove(&format!("user:{user}"));
    }

    fn forget_oldest(&mut self, now_ms: u64) {
        self.records
            .retain(|_, r| r.locked_until_ms > now_ms || now_ms - r.first_ms <= WINDOW_MS);
        if self.records.len() >= TRACKED_MAX {
            // Still full of live records: drop the half that started first.
            let mut starts: Vec<u64> = self.records.values().map(|r| r.first_ms).collect();
            starts.sort_unstable();
            let cut = starts[starts.len() / 2];
            self.records
                .retain(|_, r| r.first_ms > cut || r.locked_until_ms > now_ms);
        }
    }
}

fn keys(user: &str, addr: &str) -> [String; 2] {
    [format!("user:{user}"), format!("addr:{addr}")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_lock_the_name_out_for_the_lockout_then_it_opens() {
        let mut l = Limiter::default();
        let t = 1_000_000;
        for i in 0..4 {
            assert_eq!(l.failed("alice", "10.0.0.1", t + i), Failed::Counted);
            assert_eq!(l.gate("alice", "10.0.0.1", t + i), Gate::Open);
        }
        assert_eq!(l.failed("alice", "10.0.0.1", t + 4), Failed::LockedOut);
        let until = t + 4 + LOCKOUT_MS;
        // Locked by name from any address; other names from the same address still try.
        let table = [
            ("alice", "10.0.0.9", t + 5, Gate::Locked { until_ms: until }),
            ("bob", "10.0.0.1", t + 5, Gate::Open),
            ("alice", "10.0.0.1", until, Gate::Open),
        ];
        for (user, addr, now, want) in table {
            assert_eq!(l.gate(user, addr, now), want, "{user} {addr} {now}");
        }
    }

    #[test]
    fn twenty_failures_from_one_address_lock_it_for_every_name() {
        let mut l = Limiter::default();
        for i in 0..(ADDRESS_FAILURES_MAX as u64 - 1) {
            assert_eq!(l.failed(&format!("u{i}"), "10.0.0.1", i), Failed::Counted);
        }
        assert_eq!(l.failed("last", "10.0.0.1", 100), Failed::LockedOut);
        assert!(matches!(
            l.gate("anyone", "10.0.0.1", 101),
            Gate::Locked { .. }
        ));
        assert_eq!(l.gate("anyone", "10.0.0.2", 101), Gate::Open);
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_lock() {
        let mut l = Limiter::default();
        let mut t = 0;
        for _ in 0..20 {
            t += WINDOW_MS / 2 + 1;
            assert_eq!(l.failed("alice", &format!("10.0.0.{}", t % 200), t), {
                Failed::Counted
            });
        }
        assert_eq!(l.gate("alice", "10.0.0.1", t), Gate::Open);
    }

    #[test]
    fn a_success_forgets_the_names_failures_but_not_the_addresses() {
        let mut l = Limiter::default();
        for i in 0..4 {
            l.failed("alice", "10.0.0.1", i);
        }
        l.succeeded("alice");
        assert_eq!(l.failed("alice", "10.0.0.2", 10), Failed::Counted);
        for i in 0..(ADDRESS_FAILURES_MAX as u64 - 5) {
            assert_eq!(
                l.failed(&format!("c{i}"), "10.0.0.1", 11 + i),
                Failed::Counted
            );
        }
        assert_eq!(l.failed("dave", "10.0.0.1", 50), Failed::LockedOut);
    }

    #[test]
    fn a_flood_of_names_stays_bounded() {
        let mut l = Limiter::default();
        for i in 0..(TRACKED_MAX as u64 + 10) {
            l.failed(&format!("u{i}"), "10.0.0.1", i);
        }
        assert!(l.records.len() <= TRACKED_MAX + 2, "{}", l.records.len());
        assert!(matches!(l.gate("x", "10.0.0.1", 100), Gate::Locked { .. }));
    }
}
