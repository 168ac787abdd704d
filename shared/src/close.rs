//! Close codes the gateway sends. Standard codes come from RFC 6455 §7.4.1; codes in the
//! 4000–4999 range are ours and documented in `docs/protocol.md`.
//!
//! A client library should reconnect (with backoff) after 1001, 1011, 1012, 1013 and 4000,
//! and should not reconnect blindly after 1002, 1003, 1007, 1008 or 1009, which mean the
//! client itself sent something the gateway will refuse again.

/// Normal closure, also the echo of a client's own close.
pub const NORMAL: u16 = 1000;
/// The node is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// The peer broke the WebSocket protocol (bad frame, bad close code, stray continuation).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A binary frame: protocol v1 is JSON text only.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A text message that is not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation: rate limits and similar.
pub const POLICY_VIOLATION: u16 = 1008;
/// A message larger than the node's `max_message_bytes`.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The node hit an internal error.
pub const INTERNAL_ERROR: u16 = 1011;
/// The node is draining for a restart; reconnect elsewhere.
pub const SERVICE_RESTART: u16 = 1012;
/// The node is shedding load; reconnect elsewhere.
pub const TRY_AGAIN_LATER: u16 = 1013;

/// The client read too slowly: its outbound queue went over the byte cap.
pub const SLOW_CONSUMER: u16 = 4000;
/// The client did not answer pings (or send anything) within the heartbeat timeout.
pub const HEARTBEAT_TIMEOUT: u16 = 4001;
/// The connection's token expired and was not refreshed in time.
pub const TOKEN_EXPIRED: u16 = 4002;
/// An operator disconnected this connection through the admin API.
pub const DISCONNECTED: u16 = 4003;

/// True for codes a peer may legitimately put in a close frame (RFC 6455 §7.4).
pub fn is_valid_received(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    #[test]
    fn received_codes() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(super::is_valid_received(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!super::is_valid_received(bad), "{bad}");
        }
    }
}
