//! The load generator's building blocks, also used by the gateway's integration tests so that
//! tests and benchmarks speak to the gateway through the same client.
//!
//! - [`client`]: a WebSocket client on fastwebsockets with JSON helpers.
//! - [`http_stream`]: a client for the HTTP transports (streams and `/emulation` posts).
//! - [`net`]: `ws://`/`wss://` targets, source-address spreading, a TLS client for
//!   self-signed benchmark certificates.
//! - [`stats`]: server RSS and CPU from /proc, latency histograms.
//! - [`scenarios`]: idle, fanout, unicast, connect-storm, churn.

pub mod client;
pub mod http_stream;
pub mod net;
pub mod scenarios;
pub mod stats;
