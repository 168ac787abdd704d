//! The protocol-agnostic core: what a connection's commands do ([`session`]), which local
//! connections listen to which channel ([`hub`]), and the services they share ([`Core`]).
//!
//! Nothing here knows a wire protocol. Adapters in `protocol/` decode frames into
//! [`session::Command`]s and encode `conn::event::Event`s into frames.

pub mod hub;
pub mod session;
pub mod stream;

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::cluster::directory::Directory;
use crate::cluster::inbound::Inbound;
use crate::cluster::presence::Presence;
use crate::config::Config;
use crate::metrics::Metrics;

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
    /// Who is subscribed to each presence channel, cluster-wide.
    pub presence: Arc<Presence>,
    pub metrics: Arc<Metrics>,
}
