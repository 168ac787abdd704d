//! Presence, in Centrifugo's terms: the one place both the client protocol (`presence`,
//! `presence_stats` commands) and the server API (`/api/presence`, `/api/presence_stats`)
//! answer from, out of the core's presence (`cluster::presence`).
//!
//! `presence` is `{"presence":{"<client>":{"client":..,"user":..,"conn_info":..}}}` (at most
//! `presence_max_members` members), `presence_stats` is `{"num_clients":N,"num_users":M}`.
//! A channel without presence answers Centrifugo's `not available` (108), as Centrifugo
//! does. A client must be subscribed to the channel (103 otherwise); the server API may ask
//! about any channel. Join and leave pushes are in the codec.

use serde_json::{json, Map, Value};

use super::commands::Error;
use crate::cluster::presence::{Listing, Member, Stats};
use crate::core::session::{Command, Done, Session};
use crate::core::Core;

/// A member as Centrifugo's `ClientInfo`: `user` is empty for an anonymous connection.
pub fn client_info(conn_id: &str, user_id: Option<&str>, info: Option<&str>) -> Value {
    let mut v = json!({ "client": conn_id, "user": user_id.unwrap_or("") });
    if let Some(info) = info.and_then(|i| serde_json::from_str::<Value>(i).ok()) {
        v["conn_info"] = info;
    }
    v
}

fn listing(l: Listing) -> Value {
    let members: Map<String, Value> = l
        .members
        .into_iter()
        .map(
            |Member {
                 conn_id,
                 user_id,
                 info,
             }| {
                let v = client_info(&conn_id, user_id.as_deref(), info.as_deref());
                (conn_id, v)
            },
        )
        .collect();
    json!({ "presence": members })
}

fn stats(s: Stats) -> Value {
    json!({ "num_clients": s.num_clients, "num_users": s.num_users })
}

fn not_kept(channel: &str) -> Error {
    Error::not_available(format!("`{channel}` has no presence"))
}

fn unavailable(e: crate::error::BrokerError) -> Error {
    Error::new(
        super::commands::code::INTERNAL,
        "unavailable",
        e.to_string(),
    )
    .temporary()
}

/// A client's `presence`: only on a channel it is subscribed to.
pub async fn client_presence(session: &mut Session, channel: &str) -> Result<Value, Error> {
    match session.execute(Command::Presence { channel }).await? {
        Done::Presence(l) => Ok(listing(l)),
        _ => Ok(json!({ "presence": {} })),
    }
}

/// A client's `presence_stats`: only on a channel it is subscribed to.
pub async fn client_presence_stats(session: &mut Session, channel: &str) -> Result<Value, Error> {
    match session.execute(Command::PresenceStats { channel }).await? {
        Done::PresenceStats(s) => Ok(stats(s)),
        _ => Ok(json!({ "num_clients": 0, "num_users": 0 })),
    }
}

/// The server API's `presence`: `{"presence":{...}}` for `channel`.
pub async fn presence(core: &Core, channel: &str) -> Result<Value, Error> {
    if !core.presence.enabled(channel) {
        return Err(not_kept(channel));
    }
    let max = core.config.presence_max_members;
    core.presence
        .list(channel, max)
        .await
        .map(listing)
        .map_err(unavailable)
}

/// The server API's `presence_stats`: `{"num_clients":N,"num_users":M}` for `channel`.
pub async fn presence_stats(core: &Core, channel: &str) -> Result<Value, Error> {
    if !core.presence.enabled(channel) {
        return Err(not_kept(channel));
    }
    core.presence
        .stats(channel)
        .await
        .map(stats)
        .map_err(unavailable)
}
