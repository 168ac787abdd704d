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
//! written. For that bound to hold for small frames too, the cap counts what a frame costs,
//! not only its bytes:
//!
//! - each frame is charged [`FRAME_COST`] on top of its length: its slot in the queue, the
//!   slack of a queue that doubled to make room, and the allocator's header of its buffer.
//!   A flood of empty frames (2 bytes each) would otherwise hold some 30 times the cap;
//! - a run of pongs not yet written is at most [`PONG_RUN`] pongs: each of the first pings
//!   gets its own, and past that the last pong is replaced by the newest, as RFC 6455
//!   §5.5.3 allows (answering only the most recent ping; [`Outbound::push_pong`]). So a
//!   client that pings without reading holds a few queued pongs, not one per ping (and its
//!   pings count against its message rate, see `core::session`);
//! - the queues give memory back: [`Outbound::take`] hands the queue's buffer to the batch
//!   instead of copying into it, and [`release`] frees the batch once it is written, so an
//!   idle connection holds no frame buffer.

//!
//! A queue may also hold its connection's [`Framer`] (protocols whose frames carry
//! per-connection headers, see [`super::event`]) and carries the keep-alive that such a
//! protocol negotiates after the connection opened ([`Heartbeat`]) to the writer. It
//! closes a connection told to reconnect later on behalf of a protocol whose clients cannot
//! read the hint ([`Outbound::close_with_hint`]).

use std::collections::VecDeque;
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// The connection's token clock was renewed: the writer re-aims its timer.
    clock_moved: AtomicBool,
    /// When the reader last heard from the peer.
    heard: Heard,
}

/// When the reader last saw a frame (`[0]`) and a data frame (`[1]`: text, binary or
/// continuation), in milliseconds of [`Heard::now`]. The reader writes it; the node's ping
/// sweep and the writer's heartbeat read it: it lives here because all of them hold the
/// `Outbound`.
pub struct Heard {
    last: [AtomicU64; 2],
    /// When the ping sweep last queued a ping (the connection's opening before the first).
    pinged: AtomicU64,
    /// The peer is a WebSocket, which must answer pings: the ping sweep closes it once it
    /// has been silent too long. An HTTP stream's client sends nothing on its stream.
    watched: AtomicBool,
}

impl Heard {
    fn new() -> Self {
        let now = Heard::now();
        Heard {
            last: [AtomicU64::new(now), AtomicU64::new(now)],
            pinged: AtomicU64::new(now),
            watched: AtomicBool::new(false),
        }
    }

    /// From now on the peer must answer pings (see [`Outbound::ping`]).
    pub fn watch(&self) {
        self.watched.store(true, Ordering::Relaxed);
    }

    pub fn is_watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// Milliseconds of the process's monotonic clock.
    fn now() -> u64 {
        crate::time::mono_ns() / 1_000_000
    }

    /// The reader saw a frame; `data`: a text, binary or continuation frame.
    pub fn frame(&self, data: bool) {
        let ms = Heard::now();
        self.last[0].store(ms, Ordering::Relaxed);
        if data {
            self.last[1].store(ms, Ordering::Relaxed);
        }
    }

    /// No frame at all for longer than `limit`.
    pub fn longer_than(&self, limit: Duration) -> bool {
        self.silent_ms(0) > limit.as_millis() as u64
    }

    /// No data frame for longer than `limit`.
    pub fn no_data_for(&self, limit: Duration) -> bool {
        self.silent_ms(1) > limit.as_millis() as u64
    }

    fn silent_ms(&self, which: usize) -> u64 {
        Heard::now().saturating_sub(self.last[which].load(Ordering::Relaxed))
    }
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

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// What `frames` costs: their lengths plus [`FRAME_COST`] each (a pong counts as the
    /// longest, [`MAX_PONG`]).
    bytes: usize,
    /// Where in `frames` the last pong not yet taken is, if there is one.
    pong: Option<usize>,
    /// Pongs queued since the writer last took the queue.
    pongs: u8,
    close: Option<CloseReason>,
    /// A close is on its way, after a reconnect hint's delay ([`Outbound::close_with_hint`]).
    leaving: bool,
    /// Broker receipt time of the oldest channel message queued.
    oldest: Option<Instant>,
    /// Writes that carried a channel message, for sampling the latency histogram.
    writes: u32,
    /// A keep-alive for the writer (see [`Outbound::set_heartbeat`]). Boxed: few
    /// connections ever have one, and every idle one would reserve its room.
    heartbeat: Option<Box<Heartbeat>>,
}

/// What a queued frame costs on top of its length: its `Bytes` in the queue, as much again
/// for a queue that has just doubled, and 32 bytes for the allocator's header and rounding of
/// the frame's own buffer (counted for shared fan-out frames too, which overstates them).
pub const FRAME_COST: usize = 2 * size_of::<Bytes>() + 32;

/// Pongs queued at most between two writes; past them, the last is replaced by the newest.
pub const PONG_RUN: usize = 16;

/// The longest pong: a control frame's 125 bytes of payload and its 2-byte header. A queued
/// pong is charged this much, so that replacing it with the next one never moves the count
/// past the cap.
const MAX_PONG: usize = 127;

/// Frees a drained batch's buffer: the writer calls it after each write. The queue and the
/// batch swap buffers at each [`Outbound::take`], so with this a connection holds at most
/// one frame buffer, and none once it has written what it had: an idle connection holds no
/// queue at all. It costs one small allocation per write (the queue's next buffer), which
/// is lost in the write's own cost; keeping the buffers cost every idle connection both.
pub fn release(batch: &mut VecDeque<Bytes>) {
    if batch.is_empty() {
        *batch = VecDeque::new();
    }
}

/// One write in this many (per connection) that carried a channel message records its
/// latency: the histogram is shared by every connection of the node, and recording every
/// write cost about 2 % of the node's CPU at one delivery per write.
pub const LATENCY_SAMPLE: u32 = 8;

/// What [`Outbound::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue overflowed just now: the connection is being closed as a slow consumer.
    Overflowed,
    /// The connection is already closing; the frame was dropped.
    Closing,
    /// The connection's framer had no frame for the event (a STOMP connection without a
    /// subscription that wants it); nothing was queued.
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
            clock_moved: AtomicBool::new(false),
            heard: Heard::new(),
        }
    }

    /// When the reader last heard from the peer.
    pub fn heard(&self) -> &Heard {
        &self.heard
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
        let Some(framer) = &self.framer else {
            let shared = encoded.bytes(self.codec);
            let len = shared.len();
            return (self.push_at(shared, received), len);
        };
        let (event, shared, joined) = encoded.framing(self.codec);
        // The framer's parts go straight into the queue, under its lock: a fan-out builds no
        // list of parts per delivery. All or none still holds: parts past the cap overflow
        // the queue, which drops everything queued.
        let mut s = self.lock();
        if s.close.is_some() {
            return (Pushed::Closing, 0);
        }
        let before = s.frames.len();
        let (mut len, mut cost) = (0, 0);
        framer.frame(event, shared, joined, &mut |part: Bytes| {
            len += part.len();
            cost += part.len() + FRAME_COST;
            s.frames.push_back(part);
        });
        if s.frames.len() == before {
            return (Pushed::Unwanted, 0);
        }
        if s.oldest.is_none() {
            s.oldest = received;
        }
        if s.bytes + cost > self.cap {
            return (self.overflow(s), len);
        }
        s.bytes += cost;
        drop(s);
        if before == 0 {
            self.notify.notify_one();
        }
        (Pushed::Queued, len)
    }

    /// The bytes `push_encoded` would queue for this event, without queueing them: for a
    /// subscriber that buffers until it goes live (a history channel's joiner).
    pub fn frame_encoded(&self, encoded: &mut Encoded<'_>) -> Parts {
        let Some(framer) = &self.framer else {
            return Parts::One(encoded.bytes(self.codec));
        };
        let (event, shared, joined) = encoded.framing(self.codec);
        let mut parts = Vec::new();
        framer.frame(event, shared, joined, &mut |part: Bytes| parts.push(part));
        Parts::Many(parts)
    }

    /// Queues what [`Outbound::frame_encoded`] made: all of its parts, or none.
    pub fn push_parts(&self, parts: Parts) -> Pushed {
        match parts {
            Parts::One(b) => self.push(b),
            Parts::Many(p) => self.queue_parts(self.lock(), p, None),
        }
    }

    /// Queues a framer's parts together (each charged as a frame), or none of them.
    fn queue_parts(
        &self,
        mut s: std::sync::MutexGuard<'_, State>,
        parts: Vec<Bytes>,
        received: Option<Instant>,
    ) -> Pushed {
        if parts.is_empty() {
            return Pushed::Unwanted;
        }
        if s.close.is_some() {
            return Pushed::Closing;
        }
        if s.oldest.is_none() {
            s.oldest = received;
        }
        let cost: usize = parts.iter().map(|p| p.len() + FRAME_COST).sum();
        if s.bytes + cost > self.cap {
            return self.overflow(s);
        }
        s.bytes += cost;
        let first = s.frames.is_empty();
        s.frames.extend(parts);
        drop(s);
        if first {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Drops everything queued and closes the connection as a slow consumer. Freed at once:
    /// the connection is closing and will never write them.
    fn overflow(&self, mut s: std::sync::MutexGuard<'_, State>) -> Pushed {
        s.frames = VecDeque::new();
        s.bytes = 0;
        s.pong = None;
        s.pongs = 0;
        s.close = Some(CloseReason::SlowConsumer(self.cap));
        drop(s);
        self.notify.notify_one();
        Pushed::Overflowed
    }

    /// The heartbeat frame the writer sends every ping interval, in the connection's
    /// protocol ([`Codec::ping`]).
    pub fn ping_frame(&self) -> Bytes {
        self.codec.ping()
    }

    /// The node's ping sweep at this connection (`conn::registry`): closes a WebSocket peer
    /// that has sent nothing for longer than `timeout` (4001), and otherwise queues a ping in
    /// the connection's protocol once `after` has passed since the last one (or since the
    /// connection opened). Pings go whether or not the peer is talking: Centrifugo's SDKs
    /// reconnect when the server's pings stop, whatever else arrives.
    pub fn ping(&self, after: Duration, timeout: Duration) {
        if self.heard.is_watched() && self.heard.longer_than(timeout) {
            self.close(CloseReason::HeartbeatTimeout);
            return;
        }
        let now = Heard::now();
        let last = self.heard.pinged.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= after.as_millis() as u64 {
            self.heard.pinged.store(now, Ordering::Relaxed);
            self.push(self.ping_frame());
        }
    }

    /// The close frame for `reason`, in the connection's protocol ([`Codec::close`]).
    pub fn close_frame(&self, reason: &CloseReason) -> Bytes {
        self.codec.close(reason)
    }

    /// The last frame before the close frame, from the connection's framer.
    pub fn farewell(&self, reason: &CloseReason) -> Option<Bytes> {
        self.framer.as_ref()?.farewell(reason)
    }

    /// Hands the writer a keep-alive to run from now on (replacing any earlier one).
    pub fn set_heartbeat(&self, heartbeat: Heartbeat) {
        self.lock().heartbeat = Some(Box::new(heartbeat));
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
        self.lock().heartbeat.take().map(|b| *b)
    }

    /// Tells the writer that the connection's token clock was renewed
    /// ([`TokenClock::renew`](super::clock::TokenClock::renew) calls it).
    pub fn clock_moved(&self) {
        self.clock_moved.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// True once after each [`Outbound::clock_moved`]. For the writer: one load when not.
    pub fn take_clock_moved(&self) -> bool {
        self.clock_moved.load(Ordering::Acquire) && self.clock_moved.swap(false, Ordering::AcqRel)
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

    /// Queues a pong; once [`PONG_RUN`] are queued and not yet taken by the writer, replaces
    /// the last of them instead: a long run of pings ends with a pong for the last of them
    /// (RFC 6455 §5.5.3), and a short one (the reader handles all the pings one read
    /// brought before the writer runs) gets a pong for each.
    pub fn push_pong(&self, frame: Bytes) -> Pushed {
        let mut s = self.lock();
        if let Some(at) = s
            .pong
            .filter(|_| s.close.is_none() && usize::from(s.pongs) >= PONG_RUN)
        {
            s.frames[at] = frame;
            return Pushed::Queued;
        }
        self.queue(s, frame, None, true)
    }

    fn push_at(&self, frame: Bytes, received: Option<Instant>) -> Pushed {
        self.queue(self.lock(), frame, received, false)
    }

    /// Queues `frame` under the lock `s`; `pong` marks it as the pong [`Outbound::push_pong`]
    /// may replace.
    fn queue(
        &self,
        mut s: std::sync::MutexGuard<'_, State>,
        frame: Bytes,
        received: Option<Instant>,
        pong: bool,
    ) -> Pushed {
        if s.oldest.is_none() {
            s.oldest = received;
        }
        if s.close.is_some() {
            return Pushed::Closing;
        }
        let cost = if pong { MAX_PONG } else { frame.len() } + FRAME_COST;
        if s.bytes + cost > self.cap {
            return self.overflow(s);
        }
        s.bytes += cost;
        if pong {
            s.pongs = s.pongs.saturating_add(1);
            s.pong = Some(s.frames.len());
        }
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

    /// Closes the connection with `reason`, a drain's or a rebalancing's, which carries a
    /// reconnect hint: at once when the connection's protocol tells its clients the hint
    /// ([`Codec::takes_retry_hint`]); otherwise once the hint's delay has passed, but no later
    /// than `deadline` (a drain's window), so that a client that reconnects after its own
    /// backoff comes back after the hint all the same. Until then the connection is served
    /// as before (it receives, and its requests are answered); it only counts as leaving
    /// ([`Outbound::is_leaving`]), so that it is not picked again.
    ///
    /// The delayed close is a timer task holding the queue weakly: a connection that ends
    /// meanwhile is not kept, and a close that comes meanwhile (the shutdown at the end of a
    /// drain, an overflow) wins, as the first close always does.
    pub fn close_with_hint(
        self: &Arc<Self>,
        reason: CloseReason,
        deadline: Option<tokio::time::Instant>,
    ) {
        let wait = match reason.retry_after_ms() {
            Some(ms) if !self.codec.takes_retry_hint() => Duration::from_millis(ms),
            _ => return self.close(reason),
        };
        {
            let mut s = self.lock();
            if s.close.is_some() || s.leaving {
                return;
            }
            s.leaving = true;
        }
        let now = tokio::time::Instant::now();
        let at = deadline.map_or(now + wait, |d| d.min(now + wait));
        let out = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(out) = out.upgrade() {
                out.close(reason);
            }
        });
    }

    /// True once a close was requested, or is on its way ([`Outbound::close_with_hint`]).
    pub fn is_leaving(&self) -> bool {
        let s = self.lock();
        s.close.is_some() || s.leaving
    }

    /// What the queued frames cost against the cap (see `State::bytes`).
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.lock().bytes
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
    ///
    /// An empty `batch` (the writer's, after a write) trades buffers with the queue rather
    /// than taking a copy, so the frames' slots are held once, not once in each.
    pub fn take(&self, batch: &mut VecDeque<Bytes>) -> (Option<CloseReason>, Option<Instant>) {
        let mut s = self.lock();
        if batch.is_empty() {
            std::mem::swap(batch, &mut s.frames);
        } else {
            batch.append(&mut s.frames);
        }
        s.bytes = 0;
        s.pong = None;
        s.pongs = 0;
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
    use crate::conn::event::{DebugCodec as NoCodec, HintlessCodec, Joined};
    use crate::conn::frame;

    /// A framer that sends every event as a head of its own plus the shared part, or
    /// nothing for direct messages.
    struct TwoParts;
    impl Framer for TwoParts {
        fn frame(
            &self,
            event: &Event<'_>,
            shared: &Bytes,
            _: &mut Joined,
            part: &mut dyn FnMut(Bytes),
        ) {
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
        let cap = 8 + 2 * FRAME_COST + 4;
        let q = Outbound::new(cap, &Body).with_framer(Arc::new(TwoParts));
        let message = Event::Message {
            position: None,
            channel: "c",
            data: "1",
        };
        let mut e = Encoded::new(message);
        assert_eq!(q.push_encoded(&mut e, None), (Pushed::Queued, 8));
        let mut direct = Encoded::new(Event::Direct { data: "1" });
        assert_eq!(q.push_encoded(&mut direct, None), (Pushed::Unwanted, 0));
        // a second message does not fit: both of its parts go, with everything else
        assert_eq!(q.push_encoded(&mut e, None).0, Pushed::Overflowed);
        let mut batch = VecDeque::new();
        assert_eq!(q.take(&mut batch).0, Some(CloseReason::SlowConsumer(cap)));
        assert!(batch.is_empty());
        assert_eq!(
            q.farewell(&CloseReason::Shutdown).as_deref(),
            Some(&b"bye"[..])
        );
        assert!(Outbound::new(1, &Body)
            .farewell(&CloseReason::Shutdown)
            .is_none());
    }

    #[tokio::test]
    async fn a_hint_is_waited_out_for_clients_that_cannot_read_it() {
        let told = tokio::time::Instant::now();
        // A client that reads the hint is closed at once, with it.
        let reads = Arc::new(Outbound::new(1 << 10, &NoCodec));
        reads.close_with_hint(CloseReason::Restart(300), None);
        assert_eq!(reads.close_reason(), Some(CloseReason::Restart(300)));

        let waits = Arc::new(Outbound::new(1 << 10, &HintlessCodec));
        waits.close_with_hint(CloseReason::Restart(300), None);
        assert!(waits.is_leaving() && !waits.is_closing());
        assert_eq!(waits.push(Bytes::from_static(b"still")), Pushed::Queued);
        // Told again (a second drain tick), nothing changes: the first delay stands.
        waits.close_with_hint(CloseReason::Restart(10), None);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waits.is_closing(), "closed before its hint");
        while !waits.is_closing() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(told.elapsed() >= Duration::from_millis(300));
        assert_eq!(waits.close_reason(), Some(CloseReason::Restart(300)));

        // A deadline comes first: closed by then, the hint cut short.
        let capped = Arc::new(Outbound::new(1 << 10, &HintlessCodec));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        capped.close_with_hint(CloseReason::Rebalance(5_000), Some(deadline));
        while !capped.is_closing() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(told.elapsed() < Duration::from_secs(2));
        // Reasons without a hint close at once whatever the protocol.
        let other = Arc::new(Outbound::new(1 << 10, &HintlessCodec));
        other.close_with_hint(CloseReason::Shutdown, None);
        assert!(other.is_closing());
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
        let cap = 2 * (5 + FRAME_COST);
        let q = Outbound::new(cap, &NoCodec);
        assert_eq!(q.push(Bytes::from_static(b"12345")), Pushed::Queued);
        assert_eq!(q.push(Bytes::from_static(b"12345")), Pushed::Queued);
        assert_eq!(q.push(Bytes::from_static(b"1")), Pushed::Overflowed);
        assert_eq!(q.push(Bytes::from_static(b"1")), Pushed::Closing);
        let mut batch = VecDeque::new();
        assert_eq!(q.take(&mut batch).0, Some(CloseReason::SlowConsumer(cap)));
        assert!(batch.is_empty());
    }

    #[test]
    fn take_frees_room_and_first_close_wins() {
        let q = Outbound::new(10 + FRAME_COST, &NoCodec);
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

    /// The heap that `frames` holds, as far as it can be seen from here: the slot array at
    /// its capacity, and each frame's buffer as glibc's malloc sizes it (the request plus an
    /// 8-byte header, rounded up to 16, at least 32).
    fn held(frames: &VecDeque<Bytes>) -> usize {
        let buffers: usize = frames
            .iter()
            .map(|f| (f.len() + 8).next_multiple_of(16).max(32))
            .sum();
        frames.capacity() * size_of::<Bytes>() + buffers
    }

    /// The documented bound, against the worst client for it: the writer holds a full batch
    /// of the smallest frames it can be given (empty text frames, 2 bytes each) that it
    /// cannot write because the client does not read, and the client floods pings.
    #[test]
    fn a_client_that_floods_pings_and_never_reads_holds_at_most_twice_the_cap() {
        const CAP: usize = 64 * 1024;
        let accepted = {
            let probe = Outbound::new(CAP, &NoCodec);
            let mut n = 0;
            while probe.push(frame::text("")) == Pushed::Queued {
                n += 1;
            }
            n
        };
        let q = Outbound::new(CAP, &NoCodec);
        for _ in 0..accepted {
            assert_eq!(q.push(frame::text("")), Pushed::Queued);
        }
        let mut batch = VecDeque::new();
        q.take(&mut batch);
        assert_eq!(batch.len(), accepted);
        for i in 0..100_000u32 {
            q.push_pong(frame::pong(&i.to_be_bytes()));
        }
        assert!(
            !q.is_closing(),
            "a ping flood alone does not overflow the queue"
        );
        let total = held(&batch) + held(&q.lock().frames);
        assert!(total <= 2 * CAP, "{total} bytes held for a cap of {CAP}");
        let mut pongs = VecDeque::new();
        q.take(&mut pongs);
        let mut want: Vec<_> = (0..PONG_RUN as u32 - 1)
            .map(|i| frame::pong(&i.to_be_bytes()))
            .collect();
        want.push(frame::pong(&99_999u32.to_be_bytes()));
        assert_eq!(Vec::from(pongs), want);
    }

    #[test]
    fn a_long_run_of_pongs_ends_in_one_replaced_in_place_until_taken() {
        let q = Outbound::new(1 << 20, &NoCodec);
        q.push(frame::text("a"));
        let runs: Vec<Bytes> = (0..PONG_RUN).map(|i| frame::pong(&[i as u8])).collect();
        for p in &runs[..PONG_RUN - 1] {
            q.push_pong(p.clone());
        }
        q.push_pong(frame::pong(b"1"));
        q.push(frame::text("b"));
        q.push_pong(frame::pong(b"2"));
        q.push_pong(frame::pong(b"3"));
        let pongs = PONG_RUN * (MAX_PONG + FRAME_COST);
        assert_eq!(q.queued(), 3 + 3 + 2 * FRAME_COST + pongs);
        let mut batch = VecDeque::new();
        q.take(&mut batch);
        let mut want = vec![frame::text("a")];
        want.extend(runs[..PONG_RUN - 1].iter().cloned());
        want.extend([frame::pong(b"3"), frame::text("b")]);
        assert_eq!(Vec::from(std::mem::take(&mut batch)), want);
        // once taken (being written), the next ping gets a pong of its own
        q.push_pong(frame::pong(b"4"));
        q.take(&mut batch);
        assert_eq!(Vec::from(batch), [frame::pong(b"4")]);
    }

    #[test]
    fn queues_give_memory_back_after_each_write() {
        let q = Outbound::new(1 << 30, &NoCodec);
        let mut batch = VecDeque::new();
        for _ in 0..10_000 {
            q.push(frame::text("x"));
        }
        q.take(&mut batch);
        assert_eq!(batch.len(), 10_000);
        assert_eq!(
            q.lock().frames.capacity(),
            0,
            "the queue's buffer went to the batch, not a copy"
        );
        batch.clear(); // written
        release(&mut batch);
        assert_eq!(batch.capacity(), 0);
        // a connection's usual few frames: after the write, neither side holds a buffer
        q.push(frame::text("x"));
        q.take(&mut batch);
        assert!(batch.capacity() > 0);
        batch.clear();
        release(&mut batch);
        assert_eq!((batch.capacity(), q.lock().frames.capacity()), (0, 0));
    }
}
