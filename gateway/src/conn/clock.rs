//! A connection's token clock: when its token expires, and the grace period after that.
//! The writer loop watches it; a `refresh` renews it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A connection's token expiry, watched by its writer loop.
///
/// At `exp` the client is told (`{"type":"token_expired","grace_ms":N}`); if no valid
/// `refresh` arrives within the grace period, the connection is closed with 4002.
pub struct TokenClock {
    /// Token expiry, Unix seconds.
    exp: AtomicU64,
    /// Unix ms at which the grace period ends; 0 while the client has not been warned.
    close_at_ms: AtomicU64,
    grace: Duration,
}

/// What the writer should do when the clock's deadline passes.
#[derive(Debug, PartialEq, Eq)]
pub enum ClockEvent {
    /// Refreshed in the meantime, or not due yet: nothing.
    NotYet,
    /// Tell the client its token expired and how long it has to refresh.
    Warn(u64),
    /// Grace is over: close with 4002.
    Expired,
}

impl TokenClock {
    pub fn new(exp: u64, grace: Duration) -> Self {
        TokenClock {
            exp: AtomicU64::new(exp),
            close_at_ms: AtomicU64::new(0),
            grace,
        }
    }

    /// A refresh moved expiry to `exp`.
    pub fn renew(&self, exp: u64) {
        self.exp.store(exp, Ordering::Release);
        self.close_at_ms.store(0, Ordering::Release);
    }

    /// When the writer should next call [`TokenClock::fire`].
    pub fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
            + Duration::from_millis(self.due_ms().saturating_sub(crate::time::now_ms()))
    }

    /// When [`TokenClock::fire`] is next due, in Unix milliseconds. It changes only when the
    /// token is refreshed or the grace period starts, so a timer is reset only then.
    pub fn due_ms(&self) -> u64 {
        match self.close_at_ms.load(Ordering::Acquire) {
            0 => self.exp.load(Ordering::Acquire) * 1000,
            close_at => close_at,
        }
    }

    pub fn fire(&self) -> ClockEvent {
        let now = crate::time::now_ms();
        if now < self.exp.load(Ordering::Acquire) * 1000 {
            return ClockEvent::NotYet;
        }
        let close_at = self.close_at_ms.load(Ordering::Acquire);
        if close_at == 0 {
            self.close_at_ms
                .store(now + self.grace.as_millis() as u64, Ordering::Release);
            return ClockEvent::Warn(self.grace.as_millis() as u64);
        }
        if now >= close_at {
            ClockEvent::Expired
        } else {
            ClockEvent::NotYet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_warns_then_expires_unless_renewed() {
        let clock = TokenClock::new(crate::time::now_secs() - 1, Duration::from_millis(50));
        assert_eq!(clock.fire(), ClockEvent::Warn(50));
        assert_eq!(clock.fire(), ClockEvent::NotYet);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(clock.fire(), ClockEvent::Expired);
        clock.renew(crate::time::now_secs() + 100);
        assert_eq!(clock.fire(), ClockEvent::NotYet);
        assert!(clock.deadline() > tokio::time::Instant::now() + Duration::from_secs(90));
    }
}
