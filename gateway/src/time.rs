//! Wall-clock time, in one place. Token expiry (`exp`), directory records and node liveness
//! are all compared across processes, so they use Unix time rather than `Instant`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch, the unit of JWT `exp` and `nbf`.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}
