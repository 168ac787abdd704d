//! One connection's mechanics, whatever protocol it speaks: WebSocket frames, the reader
//! and the writer loop, the byte-bounded outbound queue, the per-connection limiter, the TLS
//! stream, and the node's registry of open connections (pings and the close at shutdown).

pub mod clock;
pub mod event;
pub mod frame;
pub mod limiter;
pub mod outbound;
pub mod registry;
pub mod socket;
pub mod stream;
pub mod tls;
