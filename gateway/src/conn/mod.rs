//! One connection's mechanics, whatever protocol it speaks: WebSocket frames, the reader
//! task and the writer loop, the byte-bounded outbound queue, the per-connection limiter, the TLS stream.

pub mod clock;
pub mod event;
pub mod frame;
pub mod limiter;
pub mod outbound;
pub mod socket;
pub mod stream;
pub mod tls;
