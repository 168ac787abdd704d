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
/// where `payload` is the JSON text of the message's `data`, perhaps behind header lines
/// ([`Envelope`]). Must not block.
pub type Sink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Marks a header line in front of a payload: `\x1e<key>=<value>\n`. JSON text cannot start
/// with U+001E, so a backend's plain JSON is never mistaken for one. Keys: `traceparent` (W3C
/// trace context, so every node's delivery log line can carry it), `pos`
/// (`<offset>:<epoch>`, a history channel's position, written by `gw_publish`) and `event`
/// (`join` or `leave`: the data is a presence member, written by the presence functions;
/// the hub sends it as a join or leave frame, not as a message).
const MARK: char = '\u{1e}';

/// A payload that carries a W3C `traceparent` in front of the data.
pub fn traced(data: &str, traceparent: &str) -> String {
    format!("{MARK}traceparent={traceparent}\n{data}")
}

/// A payload that carries a history position in front of the data.
pub fn positioned(data: &str, offset: u64, epoch: &str) -> String {
    format!("{MARK}pos={offset}:{epoch}\n{data}")
}

/// A payload that announces a presence event (`join`, `leave`) with the member's JSON.
pub fn announced(event: &str, member: &str) -> String {
    format!("{MARK}event={event}\n{member}")
}

/// A broker payload taken apart: its header lines and the JSON data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Envelope<'a> {
    pub traceparent: Option<&'a str>,
    /// `(offset, epoch)` on a history channel.
    pub position: Option<(u64, &'a str)>,
    /// A presence event (`join`, `leave`): `data` is the member, not a message.
    pub event: Option<&'a str>,
    pub data: &'a str,
}

impl<'a> Envelope<'a> {
    /// Splits off the header lines; unknown keys are skipped.
    pub fn open(payload: &'a str) -> Self {
        let mut e = Envelope::default();
        let mut rest = payload;
        while let Some(line) = rest.strip_prefix(MARK) {
            let Some((header, tail)) = line.split_once('\n') else {
                break;
            };
            rest = tail;
            match header.split_once('=') {
                Some(("traceparent", v)) => e.traceparent = Some(v),
                Some(("event", v)) => e.event = Some(v),
                Some(("pos", v)) => {
                    e.position = v
                        .split_once(':')
                        .and_then(|(o, ep)| Some((o.parse().ok()?, ep)));
                }
                _ => {}
            }
        }
        e.data = rest;
        e
    }
}

/// A channel's place in its history: the offset of a publication within an epoch. Offsets
/// start at 1 and grow by one per publication; the epoch changes whenever the history may
/// have been lost (Redis restarted empty, or nobody published or read the channel for its
/// TTL).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// What a history channel keeps, from its `[[channels]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Publications kept.
    pub size: usize,
    /// Dropped this long after the last publication.
    pub ttl: std::time::Duration,
}

/// A read of a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub epoch: String,
    /// The offset of the channel's last publication (0: none yet in this epoch).
    pub top: u64,
    /// `(offset, data)` in ascending order.
    pub publications: Vec<(u64, String)>,
}

/// Which publications a history read returns (`Last(0)`: only the epoch and top offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// The last `n`.
    Last(usize),
    /// Those after this offset, at most `n` of them.
    After(u64, usize),
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
    /// Appends `data` to the channel's history and publishes it with its position, in one
    /// atomic step: no subscriber can receive a publication that history does not hold, and
    /// pub/sub order is offset order. A repeated `idempotency_key` within the retention's
    /// TTL returns the first result and publishes nothing.
    fn publish_history<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
        retention: Retention,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Position, BrokerError>>;
    /// Reads a channel's history. A channel without an epoch gets a new one here, so that a
    /// reader always learns the epoch it must later compare. A read keeps the epoch (and
    /// the last offset) for another TTL, though not the publications: the nodes read the
    /// channels they have subscribers of every heartbeat, so a quiet channel keeps its
    /// epoch while anyone listens.
    fn history<'a>(
        &'a self,
        channel: &'a str,
        retention: Retention,
        since: Since,
    ) -> BoxFuture<'a, Result<History, BrokerError>>;
    /// Removes a channel's stored publications, keeping its epoch and top offset: positions
    /// clients hold stay valid, but nothing before the next publication can be recovered
    /// or read. The next publication gets the next offset.
    fn remove_history<'a>(
        &'a self,
        channel: &'a str,
        retention: Retention,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let _ = (channel, retention);
        Box::pin(async {
            Err(BrokerError::NotConfigured(
                "this broker cannot remove history",
            ))
        })
    }
    /// False while the broker cannot reach its backend (drives `/readyz`).
    fn is_healthy(&self) -> bool {
        true
    }
}
