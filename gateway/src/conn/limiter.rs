//! The per-connection rate limits (governor): messages and bytes per second, with strikes
//! before the connection is closed.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

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
pub struct ConnLimiter {
    messages: Option<DefaultDirectRateLimiter>,
    bytes: Option<DefaultDirectRateLimiter>,
    strikes: u32,
    max_strikes: u32,
}

impl ConnLimiter {
    pub fn new(
        message_rate: u32,
        message_burst: u32,
        byte_rate: u32,
        byte_burst: u32,
        max_strikes: u32,
    ) -> Self {
        let direct = |rate: u32, burst: u32| {
            NonZeroU32::new(rate).map(|r| {
                RateLimiter::direct(
                    Quota::per_second(r).allow_burst(NonZeroU32::new(burst).unwrap_or(r)),
                )
            })
        };
        ConnLimiter {
            messages: direct(message_rate, message_burst),
            bytes: direct(byte_rate, byte_burst.max(byte_rate)),
            strikes: 0,
            max_strikes,
        }
    }

    /// Accounts one message of `len` bytes.
    pub fn check(&mut self, len: usize) -> Verdict {
        let kind = if self.messages.as_ref().is_some_and(|l| l.check().is_err()) {
            Some("messages")
        } else {
            let n = NonZeroU32::new(len.min(u32::MAX as usize) as u32);
            match (&self.bytes, n) {
                (Some(l), Some(n)) if !matches!(l.check_n(n), Ok(Ok(()))) => Some("bytes"),
                _ => None,
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
