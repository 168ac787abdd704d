//! The handshake rate per client IP: a [`KeyedLimiter`] keyed like every per-IP limit (IPv6
//! clients by their /64, [`super::per_ip::key`]), whose entries are evicted every minute
//! once their bucket is full again ([`HandshakeLimiter::evict`]), so memory follows the
//! number of IPs active in the last few seconds, not every IP ever seen.

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
        self.limiter.check(&super::per_ip::key(ip))
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

    #[test]
    fn an_ipv6_64_shares_one_bucket() {
        let l = HandshakeLimiter::new(1, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(l.check(ip("2001:db8:0:1::1")).is_ok());
        assert!(l.check(ip("2001:db8:0:1:ffff::2")).is_ok());
        assert!(l.check(ip("2001:db8:0:1::3")).is_err(), "same /64");
        assert!(l.check(ip("2001:db8:0:2::1")).is_ok(), "another /64");
        assert_eq!(l.tracked(), 2);
    }
}
