//! What the node tells a connection, whatever wire protocol it speaks, and the [`Codec`]
//! that turns it into that protocol's bytes.
//!
//! The hub and the directory hold connections as [`Outbound`] queues, and each queue knows
//! its connection's codec. They never build a frame themselves: they hand an [`Event`] to an
//! [`Encoded`], which encodes it once per protocol on first use and shares the bytes with
//! every later subscriber of that protocol. A channel message fanned out to ten thousand
//! connections of two protocols is encoded twice.
//!
//! A protocol whose frames also carry something of the connection's own (STOMP's
//! `subscription` header) adds a [`Framer`] to each of its connections' queues: the codec
//! still encodes the shared part once, and the framer puts a part of the connection's own
//! in front of it. Connections whose own part is the same (every stompjs client names its
//! first subscription `sub-0`) then share one whole frame, joined once per event by
//! [`Joined`], as v1 connections share theirs; any other connection gets its own part and
//! the shared part as separate buffers of one vectored write, so the shared part is never
//! copied for it.
//!
//! [`Outbound`]: super::outbound::Outbound

use bytes::{BufMut, Bytes, BytesMut};

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
    /// (`insufficient_state`: it could not keep the stream gap-free; `forbidden`: a refreshed
    /// token no longer allows it).
    Unsubscribed { channel: &'a str, code: &'a str },
    /// A unicast to the connection's user or to the connection itself; `data` is JSON text.
    Direct { data: &'a str },
    /// The connection's token has expired; it has `grace_ms` to refresh it.
    TokenExpiring { grace_ms: u64 },
    /// A connection subscribed to a presence channel with join/leave. `user_id` is `None`
    /// for an anonymous connection; `info` is the token's `info` claim (JSON text).
    Join {
        channel: &'a str,
        conn_id: &'a str,
        user_id: Option<&'a str>,
        info: Option<&'a str>,
    },
    /// A connection left a presence channel with join/leave: it unsubscribed, closed, or
    /// its node died. The same fields as its join.
    Leave {
        channel: &'a str,
        conn_id: &'a str,
        user_id: Option<&'a str>,
        info: Option<&'a str>,
    },
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

    /// Whether this protocol's clients wait as a close's reconnect hint
    /// ([`CloseReason::retry_after_ms`]) asks before they reconnect. When they cannot read
    /// it, the node serves the hint itself: such a connection told to leave by a drain or a
    /// rebalancing is closed once its delay has passed rather than at once
    /// ([`Outbound::close_with_hint`](super::outbound::Outbound::close_with_hint)).
    fn takes_retry_hint(&self) -> bool {
        true
    }
}

/// The per-connection half of a protocol whose frames differ per connection, held by each
/// of its connections' [`Outbound`](super::outbound::Outbound) queues. See the module docs.
pub trait Framer: Send + Sync + 'static {
    /// Hands `part`, in order, the buffers that make up this connection's frame(s) for
    /// `event`: `shared` (what the codec encoded, shared by every connection of the protocol)
    /// among them, or frames of `shared` joined with the connection's own part by `joined`.
    /// Called with the connection's queue locked (when queueing), so the parts are queued
    /// together and the framer must not push to that queue itself. Handing over nothing
    /// drops the event for this connection (a STOMP connection holding no subscription for
    /// it).
    fn frame(
        &self,
        event: &Event<'_>,
        shared: &Bytes,
        joined: &mut Joined,
        part: &mut dyn FnMut(Bytes),
    );

    /// A last frame to write before the close frame (STOMP's ERROR naming the reason).
    fn farewell(&self, reason: &CloseReason) -> Option<Bytes> {
        let _ = reason;
        None
    }
}

/// How many distinct whole frames [`Joined`] builds for one event: each costs a copy of the
/// shared part, so the copies per event stay bounded whatever the number of connections.
pub const JOINED_FRAMES: usize = 4;

/// Whole text frames built for one event, each from a connection's own part and a shared
/// part, for every other connection whose parts are the same.
///
/// A connection given its own part and the shared part as separate buffers costs, per
/// delivery, a frame header, a reference count on its own part and a copy of that part
/// from memory only it uses (two more slices in the writer's vectored write, read cold by
/// the kernel). A connection given a joined frame costs what a v1 connection costs: one
/// reference count on bytes that stay in cache. Own parts usually repeat (a subscription
/// id is the client library's, `sub-0` for stompjs), so a few frames serve most
/// connections; past [`JOINED_FRAMES`] distinct ones, the parts are sent separately.
#[derive(Default)]
pub struct Joined {
    /// (own part, the shared bytes used, their frame): the own part by content, the shared
    /// bytes by where they are and their length (the same memory, so the same content: they
    /// are the event's, alive and unchanged as long as this is).
    frames: Vec<(Bytes, (*const u8, usize), Bytes)>,
}

impl Joined {
    /// Hands `part` the text frame of `own` followed by `shared` from byte `skip` on (a
    /// framer may leave out the start of the shared part: STOMP's `ack` line): one buffer
    /// when a frame of the same parts exists for this event or may still be built, else the
    /// frame header, `own` and the shared bytes as three.
    pub fn text_frame(
        &mut self,
        own: &Bytes,
        shared: &Bytes,
        skip: usize,
        part: &mut dyn FnMut(Bytes),
    ) {
        let tail = &shared[skip..];
        let at = (tail.as_ptr(), tail.len());
        let same = |(o, s, _): &&(Bytes, (*const u8, usize), Bytes)| *s == at && o == own;
        if let Some((_, _, frame)) = self.frames.iter().find(same) {
            return part(frame.clone());
        }
        let header = frame::text_header(own.len() + tail.len());
        if self.frames.len() == JOINED_FRAMES {
            part(header);
            part(own.clone());
            part(shared.slice(skip..));
            return;
        }
        let mut whole = BytesMut::with_capacity(header.len() + own.len() + tail.len());
        whole.put_slice(&header);
        whole.put_slice(own);
        whole.put_slice(tail);
        let whole = whole.freeze();
        self.frames.push((own.clone(), at, whole.clone()));
        part(whole);
    }
}

/// An event being delivered to many connections: encoded at most once per protocol.
pub struct Encoded<'a> {
    event: Event<'a>,
    cache: [Option<Bytes>; MAX_CODECS],
    joined: Joined,
}

impl<'a> Encoded<'a> {
    pub fn new(event: Event<'a>) -> Self {
        Encoded {
            event,
            cache: Default::default(),
            joined: Joined::default(),
        }
    }

    /// The event's bytes for `codec`, encoded on first use.
    pub fn bytes(&mut self, codec: &dyn Codec) -> Bytes {
        self.framing(codec).1.clone()
    }

    /// What a [`Framer`] needs for the event: the event, its bytes for `codec` (borrowed, so
    /// that a framer that shares them counts one reference per delivery, not three) and the
    /// event's [`Joined`] frames.
    pub fn framing(&mut self, codec: &dyn Codec) -> (&Event<'a>, &Bytes, &mut Joined) {
        let shared = self.cache[codec.id()].get_or_insert_with(|| codec.encode(&self.event));
        (&self.event, shared, &mut self.joined)
    }
}

/// A codec for tests of the queues, the hub and the directory that need no wire protocol:
/// each event is its `Debug` text. Its id is the last slot, which no protocol takes.
#[cfg(any(test, feature = "test-util"))]
pub struct DebugCodec;

#[cfg(any(test, feature = "test-util"))]
impl Codec for DebugCodec {
    fn id(&self) -> usize {
        MAX_CODECS - 1
    }
    fn encode(&self, event: &Event<'_>) -> Bytes {
        Bytes::from(format!("{event:?}"))
    }
}

/// [`DebugCodec`] for a protocol whose clients cannot read a reconnect hint, as
/// Centrifugo's SDKs: for tests of the delayed close.
#[cfg(test)]
pub struct HintlessCodec;

#[cfg(test)]
impl Codec for HintlessCodec {
    fn id(&self) -> usize {
        DebugCodec.id()
    }
    fn encode(&self, event: &Event<'_>) -> Bytes {
        DebugCodec.encode(event)
    }
    fn takes_retry_hint(&self) -> bool {
        false
    }
}
