//! A WebSocket gateway node.
//!
//! Map of the modules, from the socket inwards:
//!
//! - [`server`]: `run(listener, admin_listener, config, shutdown)`, the accept loop and the
//!   shutdown order.
//! - [`tls`]: rustls acceptor and certificate hot reload.
//! - [`client_ip`]: the real client address (trusted proxies, X-Forwarded-For, PROXY v2).
//! - [`http`]: the public listener: handshake checks, `GET /ws` and
//!   `GET /connection/websocket` upgrades, demo page, 404s.
//! - [`origin`], [`auth`], [`ratelimit`]: the handshake's Origin, JWT and rate checks (auth
//!   also holds the JWKS cache and the per-connection token clock).
//! - [`websocket`]: the connection layer: reader task, writer loop, heartbeat, close
//!   handshake, message cap.
//! - [`frame`]: WebSocket frames on the wire: server frames encoded once, client frames
//!   decoded without a standing read buffer.
//! - [`outbound`]: a connection's byte-bounded outbound queue and slow-consumer policy.
//! - [`session`]: one connection's commands (subscribe, unsubscribe, publish), whatever
//!   its protocol.
//! - [`protocol`]: the wire protocols' adapters onto sessions: `v1` (`docs/protocol.md`)
//!   and `centrifugo` (Centrifugo's client protocol for the stock SDKs, `docs/sdk.md`).
//! - [`hub`]: channel → local subscribers, sharded; drives broker subscriptions.
//! - [`broker`]: the `Broker` trait, the in-memory and Redis brokers, the conformance suite.
//! - [`redis`]: the node's one Redis connection and the router of its pub/sub pushes.
//! - [`directory`]: which user and connection lives on which node; unicast, remote
//!   disconnect, per-user caps, node liveness and the janitor.
//! - [`inbound`]: client `send` messages and lifecycle events to the backends' stream.
//! - `kube` (feature `kube`): drain on a pod annotation, and the janitor's Lease election.
//! - [`admin`]: probes, metrics and the admin HTTP API; `api`: Centrifugo's server API.
//! - [`node`]: state shared by a node's tasks.
//! - [`config`]: the settings struct, its layering and validation.
//! - [`metrics`]: counters and gauges in Prometheus text.
//! - [`error`]: error enums and who is to blame for each.
//!
//! Wire types (requests, replies, close codes, channel names) live in the `shared` crate.

pub(crate) mod auth;
pub(crate) mod broker;
pub(crate) mod cluster;
pub(crate) mod config;
pub(crate) mod conn;
pub(crate) mod core;
pub(crate) mod edge;
pub(crate) mod error;
pub(crate) mod metrics;
pub(crate) mod node;
pub(crate) mod ops;
pub(crate) mod protocol;
pub(crate) mod server;
pub(crate) mod time;

#[cfg(feature = "test-util")]
pub mod test_util;

pub use config::{Config, LogFormat};
pub use error::StartError;
pub use server::run;
