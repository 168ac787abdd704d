//! The load generator's building blocks, also used by the gateway's integration tests so that
//! tests and benchmarks speak to the gateway through the same client.
//!
//! - [`client`]: a WebSocket client on fastwebsockets with JSON helpers.

pub mod client;
