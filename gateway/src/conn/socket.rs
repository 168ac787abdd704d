//! The WebSocket connection layer: one reader task and one writer loop per connection.
//!
//! - The reader task loops on [`FrameReader::next`] and hands complete messages to the
//!   [`Handler`]. It is a task of its own so that a slow handler (a Redis round trip) never
//!   delays writes, and so that the writer's `select!` never has to cancel a read. It
//!   reassembles fragments itself and closes with 1009 the moment the running total passes
//!   `max_message_bytes`, before buffering any more, and with 1008 when a fragmented
//!   message is not complete `fragment_timeout` after its first fragment.
//! - The writer is the connection's main loop: one `select!` over the outbound queue, the
//!   heartbeat tick and the shutdown token. It writes pre-encoded frames ([`crate::conn::frame`])
//!   straight to the socket with vectored writes, so a frame fanned out to many connections
//!   is encoded once and shared as [`Bytes`]. Every write is flushed, which TLS streams need.
//!
//! Control frames the reader sees (ping → pong, close → our close) are answered through the
//! same outbound queue, keeping a single writer per socket. A ping is first offered to the
//! handler ([`Handler::on_ping`]), which counts it against the connection's rate limits, and
//! pongs not yet written are coalesced into one ([`Outbound::push_pong`]).
//!
//! A protocol with a keep-alive of its own (STOMP's heart-beats) hands the writer a
//! [`Heartbeat`] through the outbound queue once negotiated; the writer then also sends that
//! protocol's beat and closes with 4001 when no data message arrived in time (pongs answer
//! our pings whatever the application does, so they do not count there). Before closing,
//! the writer writes the queue's farewell frame, if its protocol has one (STOMP's ERROR).
//!
//! A plain-TCP connection is unwrapped from hyper's `Upgraded` back to its socket
//! ([`serve_upgraded`]): the halves are owned (no split lock, no boxed I/O on every call) and
//! the writer sends with `sendmsg`, which skips the file layer that `writev` goes through.
//! With one frame per write, that layer was about a tenth of the gateway's CPU. A TLS stream
//! ([`crate::conn::tls`]) is unwrapped likewise, and its reader and writer own a clone each.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::conn::clock::{ClockEvent, TokenClock};
use crate::conn::event::Event;
use crate::conn::frame::{self, FrameReader, OpCode};
use crate::conn::outbound::{self, Heartbeat, Outbound};
use crate::conn::tls::TlsStream;
use crate::error::CloseReason;

/// What the application does with complete messages.
pub trait Handler: Send + 'static {
    /// A complete text message: fragments reassembled, size and UTF-8 checked.
    fn on_text(&mut self, text: String) -> impl Future<Output = Result<(), CloseReason>> + Send;

    /// A complete binary message. Protocol v1 has none, so the default closes with 1003.
    fn on_binary(&mut self, data: Vec<u8>) -> impl Future<Output = Result<(), CloseReason>> + Send {
        let _ = data;
        async { Err(CloseReason::Binary) }
    }

    /// A ping with `len` bytes of payload: `Ok(true)` answers it with a pong, `Ok(false)`
    /// drops it (over a rate limit), `Err` closes. Pings cost the node a pong each, so a
    /// handler with rate limits counts them; the default answers every ping.
    fn on_ping(&mut self, len: usize) -> Result<bool, CloseReason> {
        let _ = len;
        Ok(true)
    }
}

/// Per-connection limits and timers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message after reassembly.
    pub max_message_bytes: usize,
    /// Time from a fragmented message's first fragment to its last.
    pub fragment_timeout: Duration,
    /// Interval between server pings.
    pub ping_interval: Duration,
    /// Silence (no frame at all) after which the peer is closed with 4001.
    pub ping_timeout: Duration,
    /// How long one batch write, or the close handshake, may take.
    pub write_timeout: Duration,
}

/// Serves one upgraded connection until it closes, and returns why it closed.
///
/// Spawns the reader task at once and returns the writer loop, which the caller awaits.
/// Everything the handler wants to send goes through `outbound`; `shutdown` closes the
/// connection with 1001.
///
/// The connection's futures are built as `async move` blocks returned from plain functions
/// rather than as `async fn`s: an `async fn` keeps a second copy of each argument for its
/// whole life (its parameters are moved into locals), and these futures live as long as the
/// connection, so every byte here is paid once per idle connection.
#[allow(clippy::too_many_arguments)] // the connection's parts; a struct would only rename them
pub fn serve<R, W, H>(
    read_half: R,
    write_half: W,
    leftover: &[u8],
    limits: Limits,
    handler: H,
    outbound: Arc<Outbound>,
    shutdown: CancellationToken,
    token: Option<Arc<TokenClock>>,
) -> impl Future<Output = CloseReason> + Send
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let silence = Silence {
        last_seen: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
        started: Instant::now(),
    };
    let reader = tokio::spawn(read_loop(
        FrameReader::new(read_half, limits.max_message_bytes).with_leftover(leftover),
        limits,
        handler,
        outbound.clone(),
        silence.clone(),
    ));
    write_loop(
        Io(write_half),
        reader,
        limits,
        outbound,
        shutdown,
        token,
        Some(silence),
    )
}

/// Where the writer loop writes: a socket ([`Io`]), or the body of an HTTP streaming
/// response (`conn::stream`).
pub(super) trait Sink: Send + 'static {
    /// Writes every frame in `batch` (emptying it), within `limits.write_timeout`.
    fn write_batch<'a>(
        &'a mut self,
        batch: &'a mut VecDeque<Bytes>,
        limits: Limits,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a;

    /// Ends the stream after the close frame: a socket's FIN, the end of a body.
    fn finish(&mut self, limits: Limits) -> impl Future<Output = ()> + Send + '_;

    /// Writes the last batch (ending with the close frame), best effort, and ends the stream.
    fn close<'a>(
        &'a mut self,
        last: &'a mut VecDeque<Bytes>,
        limits: Limits,
    ) -> impl Future<Output = ()> + Send + 'a {
        async move {
            let _ = self.write_batch(last, limits).await;
            self.finish(limits).await;
        }
    }
}

/// A socket (or TLS stream) as the writer's [`Sink`].
struct Io<W>(W);

impl<W: AsyncWrite + Unpin + Send + 'static> Sink for Io<W> {
    fn write_batch<'a>(
        &'a mut self,
        batch: &'a mut VecDeque<Bytes>,
        limits: Limits,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
        write_batch(&mut self.0, batch, limits, true)
    }

    async fn finish(&mut self, limits: Limits) {
        let _ = tokio::time::timeout(limits.write_timeout, self.0.shutdown()).await;
    }

    /// Without a flush between the last batch and the shutdown, which flushes: a TLS stream
    /// sends the close frame with its `close_notify` in one write.
    async fn close(&mut self, last: &mut VecDeque<Bytes>, limits: Limits) {
        let _ = write_batch(&mut self.0, last, limits, false).await;
        self.finish(limits).await;
    }
}

/// [`serve`] for a connection that hyper upgraded: plain TCP directly on its socket, TLS on
/// clones of its [`TlsStream`], any other stream through `Upgraded`. Boxed: they are
/// different futures, and the caller keeps it for the connection's whole life anyway.
pub fn serve_upgraded<H: Handler>(
    upgraded: Upgraded,
    limits: Limits,
    handler: H,
    outbound: Arc<Outbound>,
    shutdown: CancellationToken,
    token: Option<Arc<TokenClock>>,
) -> Pin<Box<dyn Future<Output = CloseReason> + Send>> {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read_half, write_half) = parts.io.into_inner().into_split();
            // Copied into the reader, so hyper's read buffer is freed now.
            let leftover = parts.read_buf;
            Box::pin(serve(
                read_half,
                TcpWriter(write_half),
                &leftover,
                limits,
                handler,
                outbound,
                shutdown,
                token,
            ))
        }
        Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream>>() {
            Ok(parts) => {
                // The reader and the writer each own a clone of the stream, as the halves of
                // a plain socket; hyper's read buffer is freed here too.
                let write_half = parts.io.into_inner();
                let leftover = parts.read_buf;
                Box::pin(serve(
                    write_half.clone(),
                    write_half,
                    &leftover,
                    limits,
                    handler,
                    outbound,
                    shutdown,
                    token,
                ))
            }
            // Any other stream (none the server makes today), split with tokio's lock.
            Err(upgraded) => {
                let (read_half, write_half) = tokio::io::split(TokioIo::new(upgraded));
                Box::pin(serve(
                    read_half,
                    write_half,
                    &[],
                    limits,
                    handler,
                    outbound,
                    shutdown,
                    token,
                ))
            }
        },
    }
}

/// The write half of a plain TCP connection, writing with `sendmsg`. The same vectored
/// write as `writev`, without the file layer (`vfs_writev`, `fdget_pos`) that `writev`
/// goes through on every call. Like `writev`, it relies on the Rust runtime ignoring
/// SIGPIPE, so a peer that reset the connection yields `EPIPE` rather than a signal.
struct TcpWriter(OwnedWriteHalf);

impl AsyncWrite for TcpWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let stream: &TcpStream = self.0.as_ref();
        loop {
            std::task::ready!(stream.poll_write_ready(cx))?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                socket2::SockRef::from(stream).send_vectored(bufs)
            });
            match sent {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// When the reader last saw a frame (`[0]`) and a data frame (`[1]`: text, binary or
/// continuation), in milliseconds since `started`.
#[derive(Clone)]
pub(super) struct Silence {
    last_seen: Arc<[AtomicU64; 2]>,
    started: Instant,
}

impl Silence {
    fn heard(&self, data: bool) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_seen[0].store(ms, Ordering::Relaxed);
        if data {
            self.last_seen[1].store(ms, Ordering::Relaxed);
        }
    }

    /// No frame at all for longer than `limit`.
    fn longer_than(&self, limit: Duration) -> bool {
        self.silent_ms(0) > limit.as_millis() as u64
    }

    /// No data frame for longer than `limit`.
    fn no_data_for(&self, limit: Duration) -> bool {
        self.silent_ms(1) > limit.as_millis() as u64
    }

    fn silent_ms(&self, which: usize) -> u64 {
        (self.started.elapsed().as_millis() as u64)
            .saturating_sub(self.last_seen[which].load(Ordering::Relaxed))
    }
}

/// The timers of a protocol's [`Heartbeat`]. Boxed in the writer, so that connections
/// without one do not reserve room for it.
struct Beat {
    heartbeat: Heartbeat,
    next_send: Option<tokio::time::Instant>,
    next_check: Option<tokio::time::Instant>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Beat {
    fn new(heartbeat: Heartbeat) -> Box<Beat> {
        let now = tokio::time::Instant::now();
        let mut b = Box::new(Beat {
            next_send: heartbeat.send.as_ref().map(|(every, _)| now + *every),
            next_check: heartbeat.expect.map(|limit| now + check_every(limit)),
            heartbeat,
            timer: Box::pin(tokio::time::sleep_until(now)),
        });
        b.aim();
        b
    }

    fn aim(&mut self) {
        let next = match (self.next_send, self.next_check) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or_else(far_future),
        };
        self.timer.as_mut().reset(next);
    }

    /// The timer fired: queues the beat when due, and returns false when the peer has been
    /// silent for longer than the protocol allows.
    fn fire(&mut self, outbound: &Outbound, silence: Option<&Silence>) -> bool {
        let now = tokio::time::Instant::now();
        if let (Some(at), Some((every, frame))) = (self.next_send, &self.heartbeat.send) {
            if now >= at {
                outbound.push(frame.clone());
                self.next_send = Some(now + *every);
            }
        }
        if let (Some(at), Some(limit)) = (self.next_check, self.heartbeat.expect) {
            if now >= at {
                if silence.is_some_and(|s| s.no_data_for(limit)) {
                    return false;
                }
                self.next_check = Some(now + check_every(limit));
            }
        }
        self.aim();
        true
    }
}

/// How often a heartbeat's silence limit is checked: a peer is closed between `limit` and
/// 1.25 × `limit` after its last data message.
fn check_every(limit: Duration) -> Duration {
    (limit / 4).max(Duration::from_millis(10))
}

/// Aims the writer's token timer at `clock`'s next due time, or drops it while the clock is
/// idle (a connection whose token has not come yet).
fn aim_token_timer(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>, clock: &TokenClock) {
    if clock.is_idle() {
        *timer = None;
        return;
    }
    match timer {
        Some(t) => t.as_mut().reset(clock.deadline()),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(clock.deadline()))),
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// The writer: the connection's main loop. See the module docs.
///
/// `silence` is what the reader heard from a WebSocket peer, which must answer pings. An
/// HTTP stream has none (its client sends nothing on the stream; a gone client shows as a
/// failed write), and its `reader` (the task that runs the commands posted for it) is
/// stopped at the close rather than left to read the peer's close frame.
#[allow(clippy::manual_async_fn)] // not `async fn`: see [`serve`]
pub(super) fn write_loop<S: Sink>(
    mut sink: S,
    mut reader: tokio::task::JoinHandle<()>,
    limits: Limits,
    outbound: Arc<Outbound>,
    shutdown: CancellationToken,
    token: Option<Arc<TokenClock>>,
    silence: Option<Silence>,
) -> impl Future<Output = CloseReason> + Send {
    async move {
        let mut batch = VecDeque::new();
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + limits.ping_interval,
            limits.ping_interval,
        );
        // Registered once, not per loop turn.
        let mut cancelled = std::pin::pin!(shutdown.cancelled());
        // Only connections with a token have a token timer; it is boxed so that the others
        // do not reserve room for one. It is re-aimed only when it fired or the clock was
        // renewed (see `conn::clock`).
        let mut token_timer = None;
        let mut aim = token.is_some();
        let mut beat: Option<Box<Beat>> = None;
        let reason = loop {
            if let Some(heartbeat) = outbound.take_heartbeat() {
                beat = Some(Beat::new(heartbeat));
            }
            let (closing, oldest) = outbound.take(&mut batch);
            if !batch.is_empty() {
                if sink.write_batch(&mut batch, limits).await.is_err() {
                    // A write that timed out on a peer that stopped reading, whose queue then
                    // overflowed, is a slow consumer, not a lost connection.
                    break outbound.close_reason().unwrap_or(CloseReason::Abnormal);
                }
                outbound::release(&mut batch);
                outbound.written(oldest);
            }
            if let Some(reason) = closing {
                break reason;
            }
            if let Some(clock) = &token {
                if std::mem::take(&mut aim) | outbound.take_clock_moved() {
                    aim_token_timer(&mut token_timer, clock);
                }
            }
            let token_due = async {
                match token_timer.as_mut() {
                    Some(timer) => timer.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            let beat_due = async {
                match beat.as_mut() {
                    Some(b) => b.timer.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = outbound.changed() => {}
                _ = ping.tick() => {
                    if silence.as_ref().is_some_and(|s| s.longer_than(limits.ping_timeout)) {
                        break CloseReason::HeartbeatTimeout;
                    }
                    outbound.push(outbound.ping_frame());
                }
                _ = beat_due => {
                    if beat.as_mut().is_some_and(|b| !b.fire(&outbound, silence.as_ref())) {
                        break CloseReason::HeartbeatTimeout;
                    }
                }
                _ = &mut cancelled => break CloseReason::Shutdown,
                _ = token_due => {
                    aim = true;
                    match token.as_ref().map(|t| t.fire()) {
                        Some(ClockEvent::Warn(grace_ms)) => {
                            outbound.push_event(&Event::TokenExpiring { grace_ms });
                        }
                        Some(ClockEvent::Expired) => break CloseReason::TokenExpired,
                        // Early, or the grace period started: the timer is re-aimed above.
                        _ => {}
                    }
                }
            }
        };
        // Make the reason visible to the reader and to producers, so they stop queueing.
        outbound.close(reason.clone());

        if reason != CloseReason::Abnormal {
            // Best effort: the peer may be gone or not reading (slow consumer); bounded by
            // timeout. Before the close frame go what is left of a batch whose write failed (so
            // that the peer never sees half a frame and then a close), and the frames queued
            // since the last write: a drain's close comes through `take` and has none left,
            // but shutdown and the timers end the loop from the `select!`, which can win over
            // frames queued a moment before. The queue is closed now, so nothing joins later.
            let mut last = std::mem::take(&mut batch);
            outbound.take(&mut last);
            last.extend(outbound.farewell(&reason));
            last.push_back(outbound.close_frame(&reason));
            sink.close(&mut last, limits).await;
            // Give a WebSocket peer a moment to answer our close so the reader ends cleanly.
            if silence.is_none()
                || tokio::time::timeout(limits.write_timeout, &mut reader)
                    .await
                    .is_err()
            {
                reader.abort();
            }
        } else {
            reader.abort();
        }
        reason
    }
}

/// Writes every frame in `batch` with vectored writes, then flushes if `flush`. Bounded by
/// `limits.write_timeout`: a peer that does not read for that long is gone.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut VecDeque<Bytes>,
    limits: Limits,
    flush: bool,
) -> std::io::Result<()> {
    let io = async {
        while !batch.is_empty() {
            // The slices live only inside each poll, not across the await, so they take no
            // room in the connection's task while it is idle.
            let mut written = std::future::poll_fn(|cx| {
                let mut slices = [IoSlice::new(&[]); 64];
                let n = batch.len().min(slices.len());
                for (slot, frame) in slices.iter_mut().zip(batch.iter()) {
                    *slot = IoSlice::new(frame);
                }
                std::pin::Pin::new(&mut *w).poll_write_vectored(cx, &slices[..n])
            })
            .await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let Some(front) = batch.front_mut() else {
                    break;
                };
                if written >= front.len() {
                    written -= front.len();
                    batch.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        if flush {
            w.flush().await?;
        }
        Ok(())
    };
    // Most writes complete at once (the socket buffer has room): try once before arming
    // the timer, which costs a clock read and a timer-wheel entry per write otherwise.
    let mut io = std::pin::pin!(io);
    if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(io.as_mut().poll(cx))).await {
        return r;
    }
    match tokio::time::timeout(limits.write_timeout, io).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The reader task: the only reader of this connection's socket.
#[allow(clippy::manual_async_fn)] // not `async fn`: see [`serve`]
fn read_loop<R, H>(
    mut frames: FrameReader<R>,
    limits: Limits,
    mut handler: H,
    outbound: Arc<Outbound>,
    silence: Silence,
) -> impl Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send + 'static,
    H: Handler,
{
    async move {
        // The message being reassembled from fragments: its opcode and bytes so far, and how far
        // a text message is known to be valid UTF-8 (checked per fragment, so a bad byte fails
        // fast instead of after the whole message arrived).
        let mut partial: Option<(OpCode, Vec<u8>)> = None;
        let mut utf8_checked = 0;
        // When the message in `partial` must be complete. Checked on two paths, so that
        // neither a silent client nor one that keeps sending (pings, more fragments) can hold
        // the buffer past it: the read is timed out at the deadline (it is cancel-safe, so
        // nothing is lost), and every frame that arrives is checked against it, since a read
        // that finds bytes already buffered completes before its timer is looked at.
        let mut fragment_due: Option<tokio::time::Instant> = None;
        let reason = loop {
            let next = match fragment_due {
                // Boxed: only a connection in the middle of a fragmented message pays for the
                // timer; inline, it would be reserved in every idle connection's reader task.
                Some(due) => match Box::pin(tokio::time::timeout_at(due, frames.next())).await {
                    Ok(next) => next,
                    Err(_) => break CloseReason::FragmentTimeout,
                },
                None => frames.next().await,
            };
            let frame = match next {
                Ok(f) => f,
                Err(reason) => break reason,
            };
            silence.heard(matches!(
                frame.opcode,
                OpCode::Text | OpCode::Binary | OpCode::Continuation
            ));
            if fragment_due.is_some_and(|due| tokio::time::Instant::now() >= due) {
                break CloseReason::FragmentTimeout;
            }
            let complete = match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    if partial.is_some() {
                        break CloseReason::Protocol("interleaved_message");
                    }
                    // `Vec::from` reuses the payload's allocation when the reader no longer
                    // shares it (the usual case: one frame per read).
                    if frame.fin {
                        Some((frame.opcode, Vec::from(frame.payload)))
                    } else {
                        let buf = Vec::from(frame.payload);
                        utf8_checked = 0;
                        if frame.opcode == OpCode::Text && !utf8_prefix_ok(&buf, &mut utf8_checked)
                        {
                            break CloseReason::InvalidUtf8;
                        }
                        partial = Some((frame.opcode, buf));
                        fragment_due = Some(tokio::time::Instant::now() + limits.fragment_timeout);
                        None
                    }
                }
                OpCode::Continuation => {
                    let Some((op, buf)) = partial.as_mut() else {
                        break CloseReason::Protocol("continuation_without_start");
                    };
                    if buf.len() + frame.payload.len() > limits.max_message_bytes {
                        break CloseReason::TooBig(limits.max_message_bytes);
                    }
                    buf.extend_from_slice(&frame.payload);
                    if *op == OpCode::Text && !utf8_prefix_ok(buf, &mut utf8_checked) {
                        break CloseReason::InvalidUtf8;
                    }
                    if frame.fin {
                        fragment_due = None;
                        partial.take()
                    } else {
                        None
                    }
                }
                OpCode::Ping => {
                    match handler.on_ping(frame.payload.len()) {
                        Ok(true) => {
                            outbound.push_pong(frame::pong(&frame.payload));
                        }
                        Ok(false) => {}
                        Err(reason) => break reason,
                    }
                    None
                }
                OpCode::Pong => None,
                OpCode::Close => break close_reason(&frame.payload),
            };
            let result = match complete {
                // Once the writer is closing, messages are read (to reach the peer's close
                // frame) but no longer handled.
                _ if outbound.is_closing() => Ok(()),
                // Boxed: a request's future (hub and Redis calls) is large and short-lived;
                // inline, it would be reserved in every idle connection's reader task.
                Some((OpCode::Text, bytes)) => match String::from_utf8(bytes) {
                    Ok(text) => Box::pin(handler.on_text(text)).await,
                    Err(_) => Err(CloseReason::InvalidUtf8),
                },
                Some((_, bytes)) => handler.on_binary(bytes).await,
                None => Ok(()),
            };
            if let Err(reason) = result {
                break reason;
            }
        };
        let lost = reason == CloseReason::Abnormal;
        outbound.close(reason);
        // Keep reading until the peer's close frame or EOF (the writer aborts this task after its
        // close timeout). Closing a socket with unread input makes the kernel send RST, which can
        // destroy our close frame before the peer reads it.
        if !lost {
            while let Ok(f) = frames.next().await {
                if f.opcode == OpCode::Close {
                    break;
                }
            }
        }
    }
}

/// Checks `buf[*checked..]` for UTF-8 and advances `checked`. A sequence cut off at the end
/// is fine (the next fragment may complete it); an invalid byte is not.
fn utf8_prefix_ok(buf: &[u8], checked: &mut usize) -> bool {
    match std::str::from_utf8(&buf[*checked..]) {
        Ok(_) => {
            *checked = buf.len();
            true
        }
        Err(e) if e.error_len().is_none() => {
            *checked += e.valid_up_to();
            true
        }
        Err(_) => false,
    }
}

/// Validates a client's close frame and picks the code we echo.
fn close_reason(payload: &[u8]) -> CloseReason {
    match payload {
        [] => CloseReason::ClientClosed(shared::close::NORMAL),
        [_] => CloseReason::Protocol("bad_close_payload"),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !shared::close::is_valid_received(code) {
                CloseReason::Protocol("bad_close_code")
            } else if std::str::from_utf8(reason).is_err() {
                CloseReason::InvalidUtf8
            } else {
                CloseReason::ClientClosed(code)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::event::DebugCodec as NoCodec;
    use tokio::io::AsyncReadExt;

    struct Quiet;
    impl Handler for Quiet {
        async fn on_text(&mut self, _: String) -> Result<(), CloseReason> {
            Ok(())
        }
    }

    /// Server frames (unmasked, short) as (opcode, payload).
    fn frames(mut wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let [b0, len, rest @ ..] = wire {
            let len = usize::from(*len);
            out.push((b0 & 0x0f, rest[..len].to_vec()));
            wire = &rest[len..];
        }
        out
    }

    /// Frames queued when shutdown comes are written before the close frame. The writer's
    /// `select!` picks among ready branches at random, so the case where shutdown wins over
    /// the queued frames comes up in about half the rounds.
    #[tokio::test]
    async fn shutdown_writes_what_was_queued_before_the_close_frame() {
        let limits = Limits {
            max_message_bytes: 1024,
            fragment_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_millis(20),
        };
        for round in 0..32 {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let (read_half, write_half) = tokio::io::split(server);
            let out = Arc::new(Outbound::new(1 << 20, &NoCodec));
            let stop = CancellationToken::new();
            let serving = tokio::spawn(serve(
                read_half,
                write_half,
                &[],
                limits,
                Quiet,
                out.clone(),
                stop.clone(),
                None,
            ));
            // The writer waits in its `select!`; then frames and shutdown come together.
            tokio::time::sleep(Duration::from_millis(2)).await;
            for n in ["1", "2", "3"] {
                out.push(frame::text(n));
            }
            stop.cancel();
            assert_eq!(serving.await.expect("served"), CloseReason::Shutdown);
            let mut wire = Vec::new();
            client.read_to_end(&mut wire).await.expect("read");
            let text = |s: &str| (1, s.as_bytes().to_vec());
            let close = (
                8,
                [&1001u16.to_be_bytes()[..], b"node shutting down"].concat(),
            );
            assert_eq!(
                frames(&wire),
                [text("1"), text("2"), text("3"), close],
                "round {round}"
            );
        }
    }
}
