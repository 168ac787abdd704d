//! The edge: what a client meets before its connection is open. TLS, the real client
//! address, the HTTP routes of the public listener and the handshake checks.

pub mod client_ip;
pub mod handshake;
pub mod handshake_limit;
pub mod http;
pub mod origin;
pub mod per_ip;
pub mod streams;
pub mod tls;
