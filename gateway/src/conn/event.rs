//! What the node tells a connection, whatever wire protocol it speaks, and the [`Codec`]
//! that turns it into that protocol's bytes.
//!
//! The hub and the directory hold connections as [`Outbound`] queues, and each queue knows
//! its connection's codec. They never build a frame themselves: they hand an [`Event`] to an
//! [`Encoded`], which encodes it once per protocol on first use and shares the bytes with
//! every later subscriber of that protocol. A channel message fanned out to ten thousand
//! connections of two protocols is encoded twice.
//!
//! [`Outbound`]: super::outbound::Outbound

use bytes::Bytes;

use super::frame;
use crate::error::CloseReason;

/// An event for one connection, borrowed from whoever produced it.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A message on a channel the connection subscribed to; `data` is JSON text. On a
    /// history channel, `position` is its `(offset, epoch)`.
    Message {
        channel: &'a str,
        data: &'a str,
        position: Option<(u64, &'a str)>,
    },
    /// The node ended the connection's subscription to `channel`; `code` says why
    /// (`insufficient_state`: it could not keep the stream gap-free).
    Unsubscribed { channel: &'a str, code: &'a str },
    /// A unicast to the connection's user or to the connection itself; `data` is JSON text.
    Direct { data: &'a str },
    /// The connection's token has expired; it has `grace_ms` to refresh it.
    TokenExpiring { grace_ms: u64 },
}

/// How many wire protocols can exist at once: the size of [`Encoded`]'s cache.
pub const MAX_CODECS: usize = 8;

/// Encodes [`Event`]s for one wire protocol. One `static` instance per protocol.
pub trait Codec: Send + Sync + 'static {
    /// A distinct number below [`MAX_CODECS`], the codec's slot in [`Encoded`].
    fn id(&self) -> usize;
    /// The event as bytes ready for the connection's transport (a WebSocket frame, say).
    fn encode(&self, event: &Event<'_>) -> Bytes;

    /// The heartbeat the writer sends every ping interval: a WebSocket ping, unless the
    /// protocol has pings of its own. Never empty.
    fn ping(&self) -> Bytes {
        frame::ping()
    }

    /// The close frame for `reason`: its code and reason text in this protocol's terms.
    /// By default the gateway's own codes (`shared::close`).
    fn close(&self, reason: &CloseReason) -> Bytes {
        frame::close(reason.code(), &reason.to_string())
    }
}

/// An event being delivered to many connections: encoded at most once per protocol.
pub struct Encoded<'a> {
    event: Event<'a>,
    cache: [Option<Bytes>; MAX_CODECS],
}

impl<'a> Encoded<'a> {
    pub fn new(event: Event<'a>) -> Self {
        Encoded {
            event,
            cache: Default::default(),
        }
    }

    /// The event's bytes for `codec`, encoded on first use.
    pub fn bytes(&mut self, codec: &dyn Codec) -> Bytes {
        self.cache[codec.id()]
            .get_or_insert_with(|| codec.encode(&self.event))
            .clone()
    }
}
