//! A WebSocket gateway node. `docs/architecture.md` tells the whole story; this is the map.
//!
//! Folders are layers. A module uses its own layer and the ones below, never one above
//! (`tests/layers.rs` checks it), so the return path never runs back up:
//!
//! 1. `server`: `run(listener, admin_listener, config, shutdown)`, the accept loop, the
//!    background tasks and the shutdown order.
//! 2. `edge` (TLS, client IP, Origin, the handshake and its `Refusal`s, the public HTTP
//!    routes), `ops` (probes, metrics, the admin API, Centrifugo's server API `ops::api`,
//!    drain; `kube` with its feature), `edge::streams` (the HTTP transports: Centrifugo's
//!    HTTP-streaming and SSE emulation with `/emulation`, and `GET /sse`) and `node` (the
//!    state they share; derefs to the core's services).
//! 3. `protocol`: one adapter per wire protocol: frames to commands, events to frames.
//!    `protocol::v1` is our JSON protocol, `protocol::stomp` STOMP, `protocol::centrifugo`
//!    Centrifugo's client protocol for the stock SDKs (`docs/sdk.md`).
//! 4. `core` (the protocol-agnostic session, the hub of local subscribers, the history
//!    streams) and `auth` (JWT and JWKS).
//! 5. `broker` (the `Broker` trait, memory and Redis, one conformance suite) and
//!    `cluster` (the Redis transport, with its pub/sub and command connections, the
//!    connection directory, presence, the inbound stream).
//! 6. `conn`: one connection's mechanics whatever its protocol: frames, the reader and
//!    the writer loop (into a socket, or into an HTTP response: `conn::stream`), the
//!    byte-bounded outbound queue, the events and their codecs, the token clock, the rate
//!    limiter.
//! 7. The foundation: `config` (one table of settings), `error` (who is to blame),
//!    `metrics` (typed families), `time`.
//!
//! Design drivers, in brief: an idle connection costs a few KiB, so its futures are small
//! and boxed where they are large and short-lived; one reader and one `select!`
//! writer per connection, in one task; a message is encoded once per protocol and the bytes shared by
//! every subscriber; every queue and map has a bound and a stated policy.
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
