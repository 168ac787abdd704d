//! What the nodes share through Redis: the transport, the connection directory, presence
//! and the backends' inbound stream.

pub mod directory;
pub mod inbound;
pub mod keys;
pub mod presence;
pub mod redis;
