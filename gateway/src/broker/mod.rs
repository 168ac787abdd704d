//! The `Broker` carries channel messages between nodes.
//!
//! The [`crate::core::hub::Hub`] is the only caller: it subscribes on a channel's first local
//! subscriber and unsubscribes on its last, so a node holds one broker subscription per
//! channel however many clients listen. Messages for subscribed channels come back through the
//! [`Sink`] given when the broker is built.
//!
//! Implementations: [`memory::MemoryBroker`] (single node, the default) and
//! [`redis::RedisBroker`] (a cluster of nodes sharing Redis). Every implementation must pass
//! [`conformance`].

pub mod conformance;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::BrokerError;

/// A boxed future, so that `Broker` can be used as a trait object (the node picks its broker
/// at run time from the config).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Called by the broker for every message on a subscribed channel: `(channel, data)`, where
/// `data` is the JSON text of the message's `data`. Must not block.
pub type Sink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// See the module docs.
pub trait Broker: Send + Sync + 'static {
    /// Starts delivering `channel`'s messages to the sink. Idempotent.
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Stops delivering `channel`'s messages. Idempotent.
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Publishes `data` (JSON text) to every node subscribed to `channel`, this one included.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// False while the broker cannot reach its backend (drives `/readyz`).
    fn is_healthy(&self) -> bool {
        true
    }
}
