//! Presence, in Centrifugo's terms: the one place both the client protocol (`presence`,
//! `presence_stats` commands) and the server API (`/api/presence`, `/api/presence_stats`)
//! answer from.
//!
//! The core keeps no presence yet, so both answer Centrifugo's `not available` (108), as
//! Centrifugo does on a channel without presence. When the core has it, these two
//! functions read it and return Centrifugo's shapes: `presence` as
//! `{"presence":{"<client>":{"client":..,"user":..}}}`, `presence_stats` as
//! `{"num_clients":N,"num_users":M}`; join and leave pushes go in the codec.

use super::commands::Error;
use crate::core::Core;

/// `{"presence":{...}}` for `channel`.
pub async fn presence(core: &Core, channel: &str) -> Result<serde_json::Value, Error> {
    let _ = (core, channel);
    Err(not_kept())
}

/// `{"num_clients":N,"num_users":M}` for `channel`.
pub async fn presence_stats(core: &Core, channel: &str) -> Result<serde_json::Value, Error> {
    let _ = (core, channel);
    Err(not_kept())
}

fn not_kept() -> Error {
    Error::not_available("presence is not available on this server yet")
}
