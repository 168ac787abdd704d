//! The protocol-agnostic core: a connection's session (what its commands do) and the hub
//! (which local connections listen to which channel).

pub mod hub;
pub mod session;
