//! The handshake rate per client IP: a [`KeyedLimiter`] keyed by IP, whose entries are
//! evicted every minute once their bucket is full again ([`HandshakeLimiter::evict`]), so
//! memory follows the number of IPs active in the last few seconds, not every IP ever seen.

use std::net::IpAddr;
use std::time::Duration;

use crate::conn::limiter::KeyedLimiter;

/// Handshake rate per client IP.
pub struct HandshakeLimiter {
    limiter: KeyedLimiter<IpAddr>,
}

impl HandshakeLimiter {
    /// `rate` handshakes per second with `burst`; `rate == 0` disables the limit.
    pub fn new(rate: u32, burst: u32) -> Self {
        HandshakeLimiter {
            limiter: KeyedLimiter::new(rate, burst),
        }
    }

    /// `Err(retry_after)` when `ip` is over its rate.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.limiter.check(&ip)
    }

    /// Drops state of IPs whose bucket has refilled; called periodically.
    pub fn evict(&self) {
        self.limiter.evict()
    }

    /// IPs currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.limiter.tracked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_limit_is_per_ip_and_evicts() {
        let l = HandshakeLimiter::new(10, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(l.check(a).is_ok());
        assert!(l.check(a).is_ok());
        let wait = l.check(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert!(l.check(b).is_ok());
        assert_eq!(l.tracked(), 2);
        std::thread::sleep(Duration::from_millis(600));
        l.evict();
        assert_eq!(l.tracked(), 0, "refilled buckets are dropped");
    }
}
