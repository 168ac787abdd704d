//! Wire protocols. Each is one adapter between a connection's frames and the core:
//!
//! - it decodes a frame into [`crate::core::session::Command`]s, runs them on its
//!   [`crate::core::session::Session`] and encodes the replies (a `conn::socket::Handler`);
//! - it encodes the core's [`crate::conn::event::Event`]s into frames (a
//!   [`crate::conn::event::Codec`], a `static` with its own id).
//!
//! Adding a protocol is a new module here and a route in `edge::http` that picks it; the hub,
//! the brokers and the directory do not change, because they only see `Outbound` queues and
//! hand events to each queue's codec.
//!
//! - [`v1`]: our JSON protocol (`docs/protocol.md`), codec id 0.
//! - [`centrifugo`]: Centrifugo's client protocol v2 in JSON, for the stock Centrifugo SDKs
//!   (`docs/sdk.md`), codec id 2. (Id 1 is kept for STOMP.)

pub mod centrifugo;
pub mod v1;
