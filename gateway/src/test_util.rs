//! What the integration tests and the examples use of the node's internals, behind the
//! `test-util` feature as tokio does it: the modules stay `pub(crate)`, and this list is the
//! whole of what escapes. The workspace's own tests turn the feature on (the crate is its
//! own dev-dependency); a build of the binary does not.

pub use crate::broker::memory::{Bus, MemoryBroker};
pub use crate::broker::redis::RedisBroker;
pub use crate::broker::{conformance, Broker, Sink};
pub use crate::cluster::directory::{conformance as directory_conformance, Directory};
pub use crate::cluster::presence::{
    conformance as presence_conformance, Member, MemoryStore as MemoryPresence,
    RedisStore as RedisPresence, Store as PresenceStore,
};
pub use crate::cluster::redis::Redis;
pub use crate::config::ChannelOptions;
pub use crate::conn::frame;
pub use crate::conn::outbound::Outbound;
pub use crate::conn::socket::{serve, serve_upgraded, Handler, JustSpawn, Limits};
pub use crate::edge::client_ip::encode_proxy_v2;
pub use crate::error::CloseReason;
pub use crate::ops::admin::Maintenance;
#[cfg(feature = "kube")]
pub use crate::ops::kube::{watch_drain, LeaseElector, DRAIN_ANNOTATION};
/// The v1 codec, for queues in tools that never send events.
pub use crate::protocol::v1::CODEC as V1;
pub use crate::time::{now_ms, now_secs};
