//! Time, in one place. Token expiry (`exp`), directory records and node liveness are all
//! compared across processes, so they use Unix time rather than `Instant`. Within the
//! process, what a connection keeps in an atomic (when it was last heard, its rate
//! limiter's state) is a monotonic count from one process-wide epoch ([`mono_ns`]).

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Nanoseconds of a monotonic clock since the process first asked: an `Instant` that fits
/// in a `u64` (good for 584 years).
pub fn mono_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Seconds since the Unix epoch, the unit of JWT `exp` and `nbf`.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}
