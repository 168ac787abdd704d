//! Rate limits: per connection, messages and bytes per second with strikes before the
//! connection is closed ([`ConnLimiter`], a GCRA of its own); per key (governor), a rate
//! shared by everything with that key, such as a client IP's handshakes or a user's `send`s
//! ([`KeyedLimiter`]).

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

/// What the per-connection limiter says about one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Over the rate: answer `rate_limited` and drop the message.
    Refuse(&'static str),
    /// Over the rate for too many messages in a row: close with 1008.
    Close(&'static str),
}

/// Messages and bytes per second for one connection.
///
/// Not governor's direct limiter: it keeps 40 bytes per limit (its clock and quota beside
/// the state), and every idle connection holds two. This is the same algorithm (GCRA, the
/// one governor implements) in 16 bytes per limit: the limit's cost per unit, its burst,
/// and the theoretical arrival time of the next unit.
pub struct ConnLimiter {
    messages: Option<Gcra>,
    bytes: Option<Gcra>,
    strikes: u32,
    max_strikes: u32,
}

/// One limit of `rate` units per second with a burst of `burst` units.
struct Gcra {
    /// Nanoseconds per unit, at most ~4.3 s (a rate of at least 1 per second).
    per_unit_ns: u32,
    burst: u32,
    /// When the bucket is next empty, in nanoseconds of [`crate::time::mono_ns`].
    tat: u64,
}

impl Gcra {
    fn new(rate: u32, burst: u32) -> Option<Gcra> {
        (rate > 0).then(|| Gcra {
            per_unit_ns: 1_000_000_000 / rate,
            burst: burst.max(1),
            tat: 0,
        })
    }

    /// Takes `n` units if the bucket holds them; otherwise takes none.
    fn take(&mut self, n: u64, now: u64) -> bool {
        let per = u64::from(self.per_unit_ns);
        let next = self.tat.max(now) + per * n;
        if n > u64::from(self.burst) || next - now > per * u64::from(self.burst) {
            return false;
        }
        self.tat = next;
        true
    }
}

impl ConnLimiter {
    pub fn new(
        message_rate: u32,
        message_burst: u32,
        byte_rate: u32,
        byte_burst: u32,
        max_strikes: u32,
    ) -> Self {
        let burst = |rate: u32, burst: u32| if burst == 0 { rate } else { burst };
        ConnLimiter {
            messages: Gcra::new(message_rate, burst(message_rate, message_burst)),
            bytes: Gcra::new(byte_rate, byte_burst.max(byte_rate)),
            strikes: 0,
            max_strikes,
        }
    }

    /// Accounts one message of `len` bytes.
    pub fn check(&mut self, len: usize) -> Verdict {
        let now = crate::time::mono_ns();
        let kind = if self.messages.as_mut().is_some_and(|l| !l.take(1, now)) {
            Some("messages")
        } else if len > 0
            && self
                .bytes
                .as_mut()
                .is_some_and(|l| !l.take(len as u64, now))
        {
            Some("bytes")
        } else {
            None
        };
        match kind {
            None => {
                self.strikes = 0;
                Verdict::Pass
            }
            Some(kind) => {
                self.strikes += 1;
                if self.strikes > self.max_strikes {
                    Verdict::Close(kind)
                } else {
                    Verdict::Refuse(kind)
                }
            }
        }
    }
}

/// A rate per key. Each key's state lives in a map whose entries are dropped by
/// [`KeyedLimiter::evict`] once their bucket is full again, which is when forgetting them
/// changes nothing; called every minute, it keeps the map to the keys active in the last
/// minute or so, not every key ever seen.
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: Option<RateLimiter<K, HashMapStateStore<K>, DefaultClock>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `rate` per second per key with `burst` (the rate when 0); `rate == 0` disables it.
    pub fn new(rate: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(rate).map(|r| {
            let burst = NonZeroU32::new(burst).unwrap_or(r);
            RateLimiter::hashmap(Quota::per_second(r).allow_burst(burst))
        });
        KeyedLimiter { limiter }
    }

    /// `Err(retry_after)` when `key` is over its rate.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        l.check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Drops the state of keys whose bucket has refilled; called periodically.
    pub fn evict(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_limit_is_per_key_and_evicts() {
        let l = KeyedLimiter::new(10, 2);
        let (a, b) = ("alice".to_owned(), "bob".to_owned());
        assert!(l.check(&a).is_ok());
        assert!(l.check(&a).is_ok());
        assert!(l.check(&a).is_err());
        assert!(l.check(&b).is_ok());
        assert_eq!(l.tracked(), 2);
        std::thread::sleep(Duration::from_millis(600));
        l.evict();
        assert_eq!(l.tracked(), 0, "refilled buckets are dropped");
        assert!(KeyedLimiter::new(0, 0).check(&a).is_ok(), "0 is no limit");
    }

    #[test]
    fn conn_limit_refuses_then_closes() {
        let mut l = ConnLimiter::new(2, 2, 0, 0, 3);
        assert_eq!(l.check(10), Verdict::Pass);
        assert_eq!(l.check(10), Verdict::Pass);
        for _ in 0..3 {
            assert_eq!(l.check(10), Verdict::Refuse("messages"));
        }
        assert_eq!(l.check(10), Verdict::Close("messages"));
        let mut l = ConnLimiter::new(0, 0, 100, 100, 0);
        assert_eq!(l.check(100), Verdict::Pass);
        assert_eq!(l.check(1), Verdict::Close("bytes"));
        let mut l = ConnLimiter::new(0, 0, 100, 100, 0);
        assert_eq!(
            l.check(101),
            Verdict::Close("bytes"),
            "more than the burst at once"
        );
    }

    #[test]
    fn conn_limit_refills_at_its_rate() {
        // 100 messages a second, a burst of 5: the burst goes at once, then one every 10 ms.
        let mut l = ConnLimiter::new(100, 5, 0, 0, 1000);
        for _ in 0..5 {
            assert_eq!(l.check(1), Verdict::Pass);
        }
        assert_eq!(l.check(1), Verdict::Refuse("messages"));
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(l.check(1), Verdict::Pass);
        assert_eq!(l.check(1), Verdict::Pass);
        // refused messages took nothing: after a pause the bucket is full again
        std::thread::sleep(Duration::from_millis(60));
        for _ in 0..5 {
            assert_eq!(l.check(1), Verdict::Pass);
        }
    }
}
