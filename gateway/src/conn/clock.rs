//! A connection's token clock: when its token expires, and the grace period after that.
//! The writer loop watches it; a `refresh` renews it.
//!
//! The writer does not read the clock on every turn of its loop: the clock is a separate
//! allocation, cold by the time the next message comes, and a fan-out turns every writer
//! once per message. It re-aims its timer only when the timer fired or the clock was
//! renewed, which [`TokenClock::renew`] tells it through the connection's queue (a flag on
//! memory the writer reads anyway). An [idle](TokenClock::idle) clock, a connection's
//! whose token may come later, has no timer at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::outbound::Outbound;

/// The expiry of an idle clock, Unix seconds: in 2106, far enough never to come, near
/// enough that its milliseconds and its deadline stay far from overflowing.
const IDLE_EXP: u64 = u32::MAX as u64;

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

    /// A clock without a token yet, for a protocol whose token comes in a command after the
    /// upgrade (STOMP's CONNECT, Centrifugo's `connect`): it never fires, and the writer arms
    /// no timer for it until it is renewed.
    pub fn idle(grace: Duration) -> Self {
        TokenClock::new(IDLE_EXP, grace)
    }

    /// Still [idle](TokenClock::idle): no token has set it.
    pub fn is_idle(&self) -> bool {
        self.exp.load(Ordering::Acquire) == IDLE_EXP
    }

    /// A refresh (or a connect) moved expiry to `exp`; `out`, the connection's queue, tells
    /// its writer to re-aim its timer.
    pub fn renew(&self, exp: u64, out: &Outbound) {
        self.exp.store(exp, Ordering::Release);
        self.close_at_ms.store(0, Ordering::Release);
        out.clock_moved();
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
        let out = Outbound::new(1 << 10, &crate::conn::event::DebugCodec);
        clock.renew(crate::time::now_secs() + 100, &out);
        assert_eq!(clock.fire(), ClockEvent::NotYet);
        assert!(clock.deadline() > tokio::time::Instant::now() + Duration::from_secs(90));
        assert!(
            out.take_clock_moved() && !out.take_clock_moved(),
            "told once"
        );
    }

    #[test]
    fn an_idle_clock_never_fires_until_renewed() {
        let clock = TokenClock::idle(Duration::from_millis(50));
        assert!(clock.is_idle());
        assert_eq!(clock.fire(), ClockEvent::NotYet);
        let out = Outbound::new(1 << 10, &crate::conn::event::DebugCodec);
        clock.renew(crate::time::now_secs() - 1, &out);
        assert!(!clock.is_idle());
        assert_eq!(clock.fire(), ClockEvent::Warn(50));
    }
}
