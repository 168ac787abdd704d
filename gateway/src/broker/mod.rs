//! The `Broker` carries channel messages between nodes.
//!
//! The hub (`core::hub`) is the only caller: it subscribes on a channel's first local
//! subscriber and unsubscribes on its last, so a node holds one broker subscription per
//! channel however many clients listen. Messages for subscribed channels come back through the
//! [`Sink`] given when the broker is built.
//!
//! Implementations: [`memory::MemoryBroker`] (single node, the default) and
//! [`redis::RedisBroker`] (a cluster of nodes sharing Redis). Every implementation must pass
//! [`conformance`].

#[cfg(any(test, feature = "test-util"))]
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

/// Called by the broker for every message on a subscribed channel: `(channel, payload)`,
/// where `payload` is the JSON text of the message's `data`, perhaps behind a trace envelope
/// ([`split_trace`]). Must not block.
pub type Sink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Marks a payload that starts with trace context: `\x1etraceparent=<value>\n<json>`. JSON
/// text cannot start with U+001E, so a backend's plain JSON is never mistaken for it.
const TRACE_MARK: char = '\u{1e}';

/// A payload that carries a W3C `traceparent` in front of the data, so that every node's
/// delivery log line can carry it. Plain JSON from a backend has no such envelope.
pub fn traced(data: &str, traceparent: &str) -> String {
    format!("{TRACE_MARK}traceparent={traceparent}\n{data}")
}

/// Splits a broker payload into its optional `traceparent` and the JSON data.
pub fn split_trace(payload: &str) -> (Option<&str>, &str) {
    payload
        .strip_prefix(TRACE_MARK)
        .and_then(|r| r.strip_prefix("traceparent="))
        .and_then(|r| r.split_once('\n'))
        .map_or((None, payload), |(tp, data)| (Some(tp), data))
}

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
