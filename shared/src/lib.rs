//! Types shared by the gateway, the load generator and backend helpers.
//!
//! - [`protocol`]: the JSON frames of wire protocol v1, both directions.
//! - [`channel`]: channel-name validation and the glob patterns used for permissions.
//! - [`close`]: WebSocket close codes the gateway sends, with their meaning.
//! - [`claims`]: the JWT claims the gateway understands.
//! - [`backend`]: the Redis names, unicast calls and inbound entries backends work with.
//!
//! This crate has no I/O and no async runtime so that any backend can depend on it cheaply.

pub mod backend;
pub mod channel;
pub mod claims;
pub mod close;
pub mod protocol;
