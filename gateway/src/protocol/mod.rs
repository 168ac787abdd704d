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
//! - [`stomp`]: STOMP 1.0–1.2 (`docs/stomp.md`), codec id 1, chosen by the handshake's
//!   `Sec-WebSocket-Protocol`. Its MESSAGE frames carry per-connection headers, so its
//!   connections' queues also hold a `conn::event::Framer`.
//! - [`centrifugo`]: Centrifugo's client protocol v2 in JSON, for the stock Centrifugo SDKs
//!   (`docs/sdk.md`), codec ids 2 (WebSocket), 3 (HTTP-streaming) and 4 (SSE).
//! - [`sse`]: v1 frames as server-sent events for a plain `EventSource` (`GET /sse`), codec
//!   id 5, with event ids that let any node recover what a browser missed.

pub mod centrifugo;
pub mod sse;
pub mod stomp;
pub mod v1;
