//! A connection's outbound queue, bounded in bytes.
//!
//! Producers (the hub's fan-out, the connection's own replies) never wait: [`Outbound::push`]
//! either queues the already-encoded frame or, when the queued bytes would pass the cap,
//! drops everything queued and marks the connection for closing as a slow consumer
//! (close 4000). Waiting on one slow socket would stall fan-out for every other subscriber,
//! and dropping single messages silently would hand clients a gap they cannot see, so the
//! policy is: disconnect, and let the client reconnect and resync.
//!
//! The writer takes the whole queue at once ([`Outbound::take`]) and writes it with one
//! vectored write, so a burst costs one syscall rather than one per frame. Memory per
//! connection is therefore bounded by twice the cap: one queue being filled, one batch being
//! written.
//!
//! A queue may also hold its connection's [`Framer`] (protocols whose frames carry
//! per-connection headers, see [`super::event`]) and carries the keep-alive that such a
//! protocol negotiates after the connection opened ([`Heartbeat`]) to the writer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use std::time::Instant;

use tokio::sync::Notify;

use super::event::{Codec, Encoded, Event, Framer};
use crate::error::CloseReason;

/// See the module docs.
pub struct Outbound {
    state: Mutex<State>,
    notify: Notify,
    cap: usize,
    /// How events for this connection are encoded: its wire protocol.
    codec: &'static dyn Codec,
    /// Where [`Outbound::written`] records the fan-out latency; `None` in tools and tests.
    latency: Option<opentelemetry::metrics::Histogram<f64>>,
    /// The connection's own part of its frames; `None` for protocols without one (v1).
    framer: Option<Arc<dyn Framer>>,
    /// A [`Heartbeat`] is waiting in `State` for the writer: checked without the lock.
    heartbeat_set: AtomicBool,
}

/// A keep-alive that the connection's protocol negotiated after it opened (STOMP's
/// `heart-beat`), run by the writer loop on top of the WebSocket pings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Queue this frame at this interval; `None`: the server sends none.
    pub send: Option<(Duration, Bytes)>,
    /// Close with 4001 once no data message (text or binary: pongs do not count) arrived for
    /// this long; `None`: only the WebSocket ping timeout applies.
    pub expect: Option<Duration>,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    close: Option<CloseReason>,
    /// Broker receipt time of the oldest channel message queued.
    oldest: Option<Instant>,
    /// Writes that carried a channel message, for sampling the latency histogram.
    writes: u32,
    /// Set by the protocol, taken by the writer.
    heartbeat: Option<Heartbeat>,
}

/// One write in this many (per connection) that carried a channel message records its
/// latency: the histogram is shared by every connection of the node, and recording every
/// write cost about 2 % of the node's CPU at one delivery per write.
pub const LATENCY_SAMPLE: u32 = 8;

/// The bytes of one event for one connection, queued together.
pub enum Parts {
    /// One buffer (a connection without a framer).
    One(Bytes),
    /// The framer's buffers, in order (none: the connection does not want the event).
    Many(Vec<Bytes>),
}

impl Parts {
    pub fn len(&self) -> usize {
        match self {
            Parts::One(b) => b.len(),
            Parts::Many(p) => p.iter().map(Bytes::len).sum(),
        }
    }
}

/// What [`Outbound::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue overflowed just now: the connection is being closed as a slow consumer.
    Overflowed,
    /// The connection is already closing; the frame was dropped.
    Closing,
    /// The connection's framer had no frame for the event (a STOMP connection without a
    /// subscription for it): nothing was queued.
    Unwanted,
}

impl Outbound {
    /// A queue of at most `cap` bytes for a connection that speaks `codec`.
    pub fn new(cap: usize, codec: &'static dyn Codec) -> Self {
        Outbound {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            cap,
            codec,
            latency: None,
            framer: None,
            heartbeat_set: AtomicBool::new(false),
        }
    }

    /// Frames every event for this connection with `framer` (see [`super::event`]).
    pub fn with_framer(self, framer: Arc<dyn Framer>) -> Self {
        Outbound {
            framer: Some(framer),
            ..self
        }
    }

    /// Records broker-receipt-to-write latency in `latency`.
    pub fn with_latency(self, latency: opentelemetry::metrics::Histogram<f64>) -> Self {
        Outbound {
            latency: Some(latency),
            ..self
        }
    }

    /// The byte cap of the queue.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Encodes `event` for this connection and queues it.
    pub fn push_event(&self, event: &Event<'_>) -> Pushed {
        self.push_encoded(&mut Encoded::new(*event), None).0
    }

    /// Queues an event being delivered to many connections: its bytes for this connection's
    /// codec (encoded once per protocol), framed by the connection's [`Framer`] when it has
    /// one. `received` is when the broker handed over a channel message. Returns what
    /// happened and how many bytes were queued.
    pub fn push_encoded(
        &self,
        encoded: &mut Encoded<'_>,
        received: Option<Instant>,
    ) -> (Pushed, usize) {
        let shared = encoded.bytes(self.codec);
        let Some(framer) = &self.framer else {
            let len = shared.len();
            return (self.push_at(shared, received), len);
        };
        let mut s = self.lock();
        if s.close.is_some() {
            return (Pushed::Closing, 0);
        }
        let (mut parts, mut added) = (0, 0);
        framer.frame(encoded.event(), &shared, &mut |part: Bytes| {
            parts += 1;
            added += part.len();
            s.frames.push_back(part);
        });
        if parts == 0 {
            return (Pushed::Unwanted, 0);
        }
        if s.oldest.is_none() {
            s.oldest = received;
        }
        if s.bytes + added > self.cap {
            return (self.overflow(s), 0);
        }
        s.bytes += added;
        let first = s.frames.len() == parts;
        drop(s);
        if first {
            self.notify.notify_one();
        }
        (Pushed::Queued, added)
    }

    /// The bytes `push_encoded` would queue for this event, without queueing them: for a
    /// subscriber that buffers until it goes live (a history channel's joiner). Empty when
    /// the connection's framer does not want the event.
    pub fn frame_encoded(&self, encoded: &mut Encoded<'_>) -> Parts {
        let shared = encoded.bytes(self.codec);
        let Some(framer) = &self.framer else {
            return Parts::One(shared);
        };
        let mut parts = Vec::new();
        framer.frame(encoded.event(), &shared, &mut |part: Bytes| {
            parts.push(part)
        });
        Parts::Many(parts)
    }

    /// Queues what [`Outbound::frame_encoded`] made: all of its parts, or none.
    pub fn push_parts(&self, parts: Parts) -> Pushed {
        let parts = match parts {
            Parts::One(b) => return self.push(b),
            Parts::Many(p) if p.is_empty() => return Pushed::Unwanted,
            Parts::Many(p) => p,
        };
        let mut s = self.lock();
        if s.close.is_some() {
            return Pushed::Closing;
        }
        let added: usize = parts.iter().map(Bytes::len).sum();
        if s.bytes + added > self.cap {
            return self.overflow(s);
        }
        s.bytes += added;
        let first = s.frames.is_empty();
        s.frames.extend(parts);
        drop(s);
        if first {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// The last frame before the close frame, from the connection's framer.
    pub fn farewell(&self, reason: &CloseReason) -> Option<Bytes> {
        self.framer.as_ref()?.farewell(reason)
    }

    /// Hands the writer a keep-alive to run from now on (replacing any earlier one).
    pub fn set_heartbeat(&self, heartbeat: Heartbeat) {
        self.lock().heartbeat = Some(heartbeat);
        self.heartbeat_set.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// The keep-alive set since the last call, if any. For the writer: cheap when none was.
    pub fn take_heartbeat(&self) -> Option<Heartbeat> {
        // A plain load first: this runs on every turn of every writer.
        if !self.heartbeat_set.load(Ordering::Acquire)
            || !self.heartbeat_set.swap(false, Ordering::AcqRel)
        {
            return None;
        }
        self.lock().heartbeat.take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent (every update is a
        // single push/assignment), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one encoded frame. Never blocks.
    pub fn push(&self, frame: Bytes) -> Pushed {
        self.push_at(frame, None)
    }

    fn push_at(&self, frame: Bytes, received: Option<Instant>) -> Pushed {
        let mut s = self.lock();
        if s.oldest.is_none() {
            s.oldest = received;
        }
        if s.close.is_some() {
            return Pushed::Closing;
        }
        if s.bytes + frame.len() > self.cap {
            return self.overflow(s);
        }
        s.bytes += frame.len();
        s.frames.push_back(frame);
        let first = s.frames.len() == 1;
        drop(s);
        // Only the first frame since the writer's last `take` needs a wake-up: the writer
        // takes the whole queue at once, so the later ones ride along.
        if first {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Drops everything queued and closes the connection as a slow consumer.
    fn overflow(&self, mut s: std::sync::MutexGuard<'_, State>) -> Pushed {
        s.frames.clear();
        s.bytes = 0;
        s.close = Some(CloseReason::SlowConsumer(self.cap));
        drop(s);
        self.notify.notify_one();
        Pushed::Overflowed
    }

    /// Asks the writer to close the connection. The first reason given wins; frames already
    /// queued are still written before the close frame.
    pub fn close(&self, reason: CloseReason) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.close = Some(reason);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// True once a close was requested.
    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// The close requested so far, if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().close.clone()
    }

    /// Moves every queued frame into `batch`. Returns the close reason, if one is set, and
    /// for one write in [`LATENCY_SAMPLE`] the broker receipt time of the batch's oldest
    /// channel message, which the writer hands to [`Outbound::written`].
    pub fn take(&self, batch: &mut VecDeque<Bytes>) -> (Option<CloseReason>, Option<Instant>) {
        let mut s = self.lock();
        batch.append(&mut s.frames);
        s.bytes = 0;
        let oldest = s.oldest.take();
        // The first such write is sampled, then every LATENCY_SAMPLE-th.
        let sampled = oldest.is_some() && {
            let n = s.writes;
            s.writes = n.wrapping_add(1);
            n.is_multiple_of(LATENCY_SAMPLE)
        };
        (s.close.clone(), oldest.filter(|_| sampled))
    }

    /// The writer wrote a batch whose oldest channel message the broker handed over at
    /// `oldest` (when sampled): records how long it waited.
    pub fn written(&self, oldest: Option<Instant>) {
        if let (Some(h), Some(at)) = (&self.latency, oldest) {
            h.record(at.elapsed().as_secs_f64(), &[]);
        }
    }

    /// Resolves after the next push or close (or at once if one happened since the last wait).
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::conn::event::DebugCodec as NoCodec;

    /// A framer that sends every event as a head of its own plus the shared part, or
    /// nothing for direct messages.
    struct TwoParts;
    impl Framer for TwoParts {
        fn frame(&self, event: &Event<'_>, shared: &Bytes, part: &mut dyn FnMut(Bytes)) {
            if let Event::Message { .. } = event {
                part(Bytes::from_static(b"head"));
                part(shared.clone());
            }
        }
        fn farewell(&self, _: &CloseReason) -> Option<Bytes> {
            Some(Bytes::from_static(b"bye"))
        }
    }

    struct Body;
    impl Codec for Body {
        fn id(&self) -> usize {
            0
        }
        fn encode(&self, _: &Event<'_>) -> Bytes {
            Bytes::from_static(b"body")
        }
    }

    #[test]
    fn a_framer_queues_its_parts_together_or_not_at_all() {
        let q = Outbound::new(12, &Body).with_framer(Arc::new(TwoParts));
        let message = Event::Message {
            position: None,
            channel: "c",
            data: "1",
        };
        let mut e = Encoded::new(message);
        assert_eq!(q.push_encoded(&mut e, None), (Pushed::Queued, 8));
        let mut direct = Encoded::new(Event::Direct { data: "1" });
        assert_eq!(q.push_encoded(&mut direct, None), (Pushed::Unwanted, 0));
        // 8 + 8 > 12: both parts of the second go, with everything else
        assert_eq!(q.push_encoded(&mut e, None).0, Pushed::Overflowed);
        let mut batch = VecDeque::new();
        assert_eq!(q.take(&mut batch).0, Some(CloseReason::SlowConsumer(12)));
        assert!(batch.is_empty());
        assert_eq!(
            q.farewell(&CloseReason::Shutdown).as_deref(),
            Some(&b"bye"[..])
        );
        assert!(Outbound::new(1, &Body)
            .farewell(&CloseReason::Shutdown)
            .is_none());
    }

    #[test]
    fn a_heartbeat_is_taken_once() {
        let q = Outbound::new(10, &NoCodec);
        assert_eq!(q.take_heartbeat(), None);
        let hb = Heartbeat {
            send: Some((Duration::from_secs(1), Bytes::from_static(b"\n"))),
            expect: None,
        };
        q.set_heartbeat(hb.clone());
        assert_eq!(q.take_heartbeat(), Some(hb));
        assert_eq!(q.take_heartbeat(), None);
    }

    #[test]
    fn overflow_drops_queue_and_closes() {
        let q = Outbound::new(10, &NoCodec);
        assert_eq!(q.push(Bytes::from_static(b"12345")), Pushed::Queued);
        assert_eq!(q.push(Bytes::from_static(b"12345")), Pushed::Queued);
        assert_eq!(q.push(Bytes::from_static(b"1")), Pushed::Overflowed);
        assert_eq!(q.push(Bytes::from_static(b"1")), Pushed::Closing);
        let mut batch = VecDeque::new();
        assert_eq!(q.take(&mut batch).0, Some(CloseReason::SlowConsumer(10)));
        assert!(batch.is_empty());
    }

    #[test]
    fn take_frees_room_and_first_close_wins() {
        let q = Outbound::new(10, &NoCodec);
        q.push(Bytes::from_static(b"1234567890"));
        let mut batch = VecDeque::new();
        assert_eq!(q.take(&mut batch).0, None);
        assert_eq!(batch.len(), 1);
        assert_eq!(q.push(Bytes::from_static(b"1234567890")), Pushed::Queued);
        q.close(CloseReason::Shutdown);
        q.close(CloseReason::Disconnected);
        assert_eq!(q.take(&mut batch).0, Some(CloseReason::Shutdown));
        assert_eq!(batch.len(), 2);
    }
}
