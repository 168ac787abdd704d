//! The protocol-agnostic core: what a connection's commands do ([`session`]), which local
//! connections listen to which channel ([`hub`]), and the services they share ([`Core`]).
//!
//! Nothing here knows a wire protocol. Adapters in `protocol/` decode frames into
//! [`session::Command`]s and encode `conn::event::Event`s into frames.

pub mod hub;
pub mod session;
pub mod stream;

use std::net::IpAddr;
use std::sync::Arc;

use crate::auth::Authenticator;
use crate::cluster::directory::Directory;
use crate::cluster::inbound::Inbound;
use crate::cluster::presence::Presence;
use crate::config::Config;
use crate::conn::limiter::KeyedLimiter;
use crate::metrics::Metrics;

/// The `unsubscribed` code when a backend or an operator ended a subscription (the server
/// API's `unsubscribe`).
pub const SERVER_UNSUBSCRIBE: &str = "server";

/// What the directory does when a server-side unsubscribe reaches one of this node's
/// connections: take it off the channel in the hub (and out of the channel's presence),
/// then tell it (`unsubscribed`, code `server`). A connection no longer on the channel is
/// left alone.
pub fn unsubscriber(
    hub: Arc<hub::Hub>,
    presence: Arc<Presence>,
) -> crate::cluster::directory::Unsubscriber {
    Arc::new(move |id, conn, channel, out| {
        if !hub.contains(channel, id) {
            return;
        }
        let (hub, presence) = (hub.clone(), presence.clone());
        let (conn, channel, out) = (conn.to_owned(), channel.to_owned(), out.clone());
        tokio::spawn(async move {
            let _ = hub.unsubscribe(&channel, id).await;
            if presence.enabled(&channel) {
                presence.leave(&channel, &conn).await;
            }
            out.push_event(&crate::conn::event::Event::Unsubscribed {
                channel: &channel,
                code: SERVER_UNSUBSCRIBE,
            });
        });
    })
}

/// The services every session uses, built once per node.
pub struct Core {
    pub config: Config,
    /// Token verifier; `None` when no key is configured (anonymous only).
    pub auth: Option<Arc<Authenticator>>,
    pub hub: Arc<hub::Hub>,
    /// Where every user and connection of the cluster lives; unicast and disconnects.
    pub directory: Arc<Directory>,
    /// Client `send` messages and lifecycle events to the backends.
    pub inbound: Inbound,
    /// `send_rate_per_user`, shared by a user's connections. Evicted every minute (see
    /// [`KeyedLimiter`]); between evictions it holds at most one key per sender active since
    /// the last one, and senders are users with an open connection (or client IPs).
    pub send_limiter: KeyedLimiter<Sender>,
    /// Who is subscribed to each presence channel, cluster-wide.
    pub presence: Arc<Presence>,
    pub metrics: Arc<Metrics>,
}

/// Who a `send` is counted against: its user, or for anonymous connections (with
/// `anonymous_send`) their client IP, as for handshakes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sender {
    User(String),
    Anonymous(IpAddr),
}
