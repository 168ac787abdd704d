//! The WebSocket connection layer: one reader and one writer loop per connection, two
//! futures polled side by side in the connection's one task ([`Together`]).
//!
//! - The reader loops on [`FrameReader::next`] and hands complete messages to the
//!   [`Handler`]. It is a future of its own, beside the writer rather than inside its
//!   `select!`, so that a slow handler (a Redis round trip) never delays writes and the
//!   writer never has to cancel a read. It shares the writer's task rather than having one
//!   of its own: a task cell per idle connection was the largest item in its memory. It
//!   reassembles fragments itself and closes with 1009 the moment the running total passes
//!   `max_message_bytes`, before buffering any more, and with 1008 when a fragmented
//!   message is not complete `fragment_timeout` after its first fragment.
//! - The writer is the connection's main loop: one `select!` over the outbound queue and
//!   the timers a connection may have (a protocol's heartbeat, the token clock). Pings and
//!   the close at shutdown come through the queue, from the node's registry
//!   ([`crate::conn::registry`]), so an idle connection holds no timer of its own. It
//!   writes pre-encoded frames ([`crate::conn::frame`]) straight to the socket with vectored
//!   writes, so a frame fanned out to many connections is encoded once and shared as
//!   [`Bytes`]. Every write is flushed, which TLS streams need.
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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

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
    /// How long one batch write, or the close handshake, may take.
    pub write_timeout: Duration,
}

/// Serves one upgraded connection until it closes, and returns why it closed.
///
/// Returns the reader and the writer loop joined ([`Together`]), which the caller awaits.
/// Everything the handler wants to send goes through `outbound`, and so does the node's
/// work on every connection: pings, and the close at shutdown ([`crate::conn::registry`]).
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
    token: Option<Arc<TokenClock>>,
) -> impl Future<Output = CloseReason> + Send
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let reader = read_loop(
        FrameReader::new(read_half, limits.max_message_bytes).with_leftover(leftover),
        limits,
        handler,
        outbound.clone(),
    );
    let writer = write_loop(Io(write_half), limits, outbound, token, true);
    Together::new(reader, writer, Some(limits.write_timeout))
}

pin_project_lite::pin_project! {
    /// A connection's reader and writer, run in one task: both futures are polled on each
    /// of its wake-ups, and the writer's end is the connection's end. After the writer's
    /// close, the reader gets `linger` to see the peer's answer (`None`: it is dropped at
    /// once, as it is after a lost connection).
    ///
    /// One task instead of two: a task's cell (header, scheduler, join state, aligned to a
    /// cache line) is paid once per idle connection. It is safe because the reader is
    /// cancel-safe between frames and never waits for the writer, and the handler's
    /// commands are boxed futures inside the reader, so a slow command (a Redis round trip)
    /// does not hold up writes: the writer is polled on every wake-up.
    ///
    /// A struct that holds both futures inline, not an `async` block: a block would keep
    /// its captured futures and the pinned copies it polls, both reserved for the
    /// connection's whole life. Spawned as it is (see [`Spawn`]), the connection's task
    /// cell is its only allocation for them.
    pub struct Together<Rd, Wr> {
        #[pin]
        reader: Option<Rd>,
        #[pin]
        writer: Wr,
        linger: Option<Duration>,
        // Once the writer has ended: why, and how long the reader still has.
        ending: Option<(CloseReason, Pin<Box<tokio::time::Sleep>>)>,
    }
}

impl<Rd, Wr> Together<Rd, Wr>
where
    Rd: Future<Output = ()> + Send,
    Wr: Future<Output = CloseReason> + Send,
{
    pub(super) fn new(reader: Rd, writer: Wr, linger: Option<Duration>) -> Self {
        Together {
            reader: Some(reader),
            writer,
            linger,
            ending: None,
        }
    }
}

impl<Rd, Wr> Future for Together<Rd, Wr>
where
    Rd: Future<Output = ()>,
    Wr: Future<Output = CloseReason>,
{
    type Output = CloseReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let mut this = self.project();
        if let Some(reader) = this.reader.as_mut().as_pin_mut() {
            if reader.poll(cx).is_ready() {
                this.reader.set(None);
            }
        }
        if this.ending.is_none() {
            let Poll::Ready(reason) = this.writer.poll(cx) else {
                return Poll::Pending;
            };
            match *this.linger {
                Some(linger) if this.reader.is_some() && reason != CloseReason::Abnormal => {
                    *this.ending = Some((reason, Box::pin(tokio::time::sleep(linger))));
                }
                _ => {
                    this.reader.set(None);
                    return Poll::Ready(reason);
                }
            }
        }
        let Some((_, deadline)) = this.ending.as_mut() else {
            return Poll::Pending;
        };
        if this.reader.is_some() && deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.reader.set(None);
        match this.ending.take() {
            Some((reason, _)) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }
}

/// Where [`serve_upgraded`] hands the served connection: the caller's spawn, generic over
/// the connection's future so that it is spawned as it is, not boxed (plain TCP and TLS
/// connections are different futures).
pub trait Spawn {
    fn spawn<F: Future<Output = CloseReason> + Send + 'static>(self, served: F);
}

/// Spawns the connection with nothing after it (tools such as the Autobahn echo server).
#[cfg(feature = "test-util")]
pub struct JustSpawn;

#[cfg(feature = "test-util")]
impl Spawn for JustSpawn {
    fn spawn<F: Future<Output = CloseReason> + Send + 'static>(self, served: F) {
        tokio::spawn(served);
    }
}

/// Where the writer loop writes: a socket ([`Io`]), or the body of an HTTP streaming
/// response (`conn::stream`).
pub(super) trait Sink: Send + 'static {
    /// Writes every frame in `batch` (emptying it), within `timeout`.
    fn write_batch<'a>(
        &'a mut self,
        batch: &'a mut VecDeque<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a;

    /// Ends the stream after the close frame (a socket's FIN, the end of a body), within
    /// `timeout`.
    fn finish(&mut self, timeout: Duration) -> impl Future<Output = ()> + Send + '_;

    /// Writes the last batch (ending with the close frame), best effort, and ends the stream.
    fn close<'a>(
        &'a mut self,
        last: &'a mut VecDeque<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send + 'a {
        async move {
            let _ = self.write_batch(last, timeout).await;
            self.finish(timeout).await;
        }
    }
}

/// A socket (or TLS stream) as the writer's [`Sink`].
struct Io<W>(W);

impl<W: AsyncWrite + Unpin + Send + 'static> Sink for Io<W> {
    fn write_batch<'a>(
        &'a mut self,
        batch: &'a mut VecDeque<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
        write_batch(&mut self.0, batch, timeout, true)
    }

    async fn finish(&mut self, timeout: Duration) {
        // Boxed: only a closing connection needs the timer.
        let _ = Box::pin(tokio::time::timeout(timeout, self.0.shutdown())).await;
    }

    /// Without a flush between the last batch and the shutdown, which flushes: a TLS stream
    /// sends the close frame with its `close_notify` in one write.
    async fn close(&mut self, last: &mut VecDeque<Bytes>, timeout: Duration) {
        let _ = write_batch(&mut self.0, last, timeout, false).await;
        self.finish(timeout).await;
    }
}

/// [`serve`] for a connection that hyper upgraded, handed to `spawn`: plain TCP directly on
/// its socket, TLS on clones of its [`TlsStream`], any other stream through `Upgraded`.
#[allow(clippy::too_many_arguments)] // `serve`'s, and where it goes
pub fn serve_upgraded<H: Handler>(
    upgraded: Upgraded,
    limits: Limits,
    handler: H,
    outbound: Arc<Outbound>,
    token: Option<Arc<TokenClock>>,
    spawn: impl Spawn,
) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read_half, write_half) = parts.io.into_inner().into_split();
            // Copied into the reader, so hyper's read buffer is freed now.
            let leftover = parts.read_buf;
            spawn.spawn(serve(
                read_half,
                TcpWriter(write_half),
                &leftover,
                limits,
                handler,
                outbound,
                token,
            ));
        }
        Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream>>() {
            Ok(parts) => {
                // The reader and the writer each own a clone of the stream, as the halves of
                // a plain socket; hyper's read buffer is freed here too.
                let write_half = parts.io.into_inner();
                let leftover = parts.read_buf;
                spawn.spawn(serve(
                    write_half.clone(),
                    write_half,
                    &leftover,
                    limits,
                    handler,
                    outbound,
                    token,
                ));
            }
            // Any other stream (none the server makes today), split with tokio's lock.
            Err(upgraded) => {
                let (read_half, write_half) = tokio::io::split(TokioIo::new(upgraded));
                spawn.spawn(serve(
                    read_half,
                    write_half,
                    &[],
                    limits,
                    handler,
                    outbound,
                    token,
                ));
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
    fn fire(&mut self, outbound: &Outbound) -> bool {
        let now = tokio::time::Instant::now();
        if let (Some(at), Some((every, frame))) = (self.next_send, &self.heartbeat.send) {
            if now >= at {
                outbound.push(frame.clone());
                self.next_send = Some(now + *every);
            }
        }
        if let (Some(at), Some(limit)) = (self.next_check, self.heartbeat.expect) {
            if now >= at {
                if outbound.heard().is_watched() && outbound.heard().no_data_for(limit) {
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
/// `watch_silence`: the peer is a WebSocket, which must answer pings, and is closed when the
/// reader heard nothing for too long ([`Outbound::heard`]). An HTTP stream's client sends
/// nothing on the stream (a gone client shows as a failed write).
#[allow(clippy::manual_async_fn)] // not `async fn`: see [`serve`]
pub(super) fn write_loop<S: Sink>(
    mut sink: S,
    limits: Limits,
    outbound: Arc<Outbound>,
    token: Option<Arc<TokenClock>>,
    watch_silence: bool,
) -> impl Future<Output = CloseReason> + Send {
    // Only what the writer uses: the future keeps it for the connection's whole life.
    let write_timeout = limits.write_timeout;
    if watch_silence {
        outbound.heard().watch();
    }
    async move {
        let mut batch = VecDeque::new();
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
                if sink.write_batch(&mut batch, write_timeout).await.is_err() {
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
                _ = beat_due => {
                    if beat.as_mut().is_some_and(|b| !b.fire(&outbound)) {
                        break CloseReason::HeartbeatTimeout;
                    }
                }
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
            // since the last write: a close through the queue (a drain's, shutdown's, the ping
            // timeout's) comes through `take` and has none left, but the timers end the loop
            // from the `select!`, which can win over frames queued a moment before. The queue
            // is closed now, so nothing joins later.
            let mut last = std::mem::take(&mut batch);
            outbound.take(&mut last);
            last.extend(outbound.farewell(&reason));
            last.push_back(outbound.close_frame(&reason));
            // Boxed: only a closing connection needs this future, and inline it would be
            // the writer's largest state.
            Box::pin(sink.close(&mut last, write_timeout)).await;
        }
        reason
    }
}

/// Writes every frame in `batch` with vectored writes, then flushes if `flush`. Bounded by
/// `timeout`: a peer that does not read for that long is gone.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut VecDeque<Bytes>,
    timeout: Duration,
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
    // Boxed: the timer is needed only by a write that blocks, and inline it would take room
    // in every idle connection's writer.
    match Box::pin(tokio::time::timeout(timeout, io)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The reader: the only reader of this connection's socket.
#[allow(clippy::manual_async_fn)] // not `async fn`: see [`serve`]
fn read_loop<R, H>(
    mut frames: FrameReader<R>,
    limits: Limits,
    mut handler: H,
    outbound: Arc<Outbound>,
) -> impl Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send + 'static,
    H: Handler,
{
    // Only what the reader uses: the future keeps it for the connection's whole life.
    let mut state = Reassembly {
        partial: None,
        fragment_timeout: limits.fragment_timeout,
        max_message_bytes: limits.max_message_bytes,
    };
    async move {
        let reason = loop {
            let next = match state.due() {
                // Boxed: only a connection in the middle of a fragmented message pays for the
                // timer; inline, it would be reserved in every idle connection's task.
                Some(due) => match Box::pin(tokio::time::timeout_at(due, frames.next())).await {
                    Ok(next) => next,
                    Err(_) => break CloseReason::FragmentTimeout,
                },
                None => frames.next().await,
            };
            // A plain function: the frame and its handling are gone before the handler's
            // await, so only the finished message is kept across it.
            let message = match next.and_then(|f| state.frame(f, &mut handler, &outbound)) {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(reason) => break reason,
            };
            // Once the writer is closing, messages are read (to reach the peer's close
            // frame) but no longer handled.
            if outbound.is_closing() {
                continue;
            }
            // Boxed: a request's future (hub and Redis calls) is large and short-lived;
            // inline, it would be reserved in every idle connection's task.
            let result = match message {
                Message::Text(text) => Box::pin(handler.on_text(text)).await,
                Message::Binary(bytes) => Box::pin(handler.on_binary(bytes)).await,
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

/// A complete message for the handler.
enum Message {
    Text(String),
    Binary(Vec<u8>),
}

/// The reader's state between frames: the message being reassembled from fragments, and
/// its limits.
struct Reassembly {
    /// The message so far. Boxed: most connections never fragment a message, and an idle
    /// one would otherwise reserve its room.
    partial: Option<Box<Partial>>,
    fragment_timeout: Duration,
    max_message_bytes: usize,
}

/// A message arriving in fragments.
struct Partial {
    opcode: OpCode,
    bytes: Vec<u8>,
    /// How far a text message is known to be valid UTF-8 (checked per fragment, so a bad
    /// byte fails fast instead of after the whole message arrived).
    utf8_checked: usize,
    /// When the message must be complete. Checked on two paths, so that neither a silent
    /// client nor one that keeps sending (pings, more fragments) can hold the buffer past
    /// it: the read is timed out at the deadline (it is cancel-safe, so nothing is lost),
    /// and every frame that arrives is checked against it, since a read that finds bytes
    /// already buffered completes before its timer is looked at.
    due: tokio::time::Instant,
}

impl Reassembly {
    fn due(&self) -> Option<tokio::time::Instant> {
        self.partial.as_ref().map(|p| p.due)
    }

    /// Takes one frame: a complete message, nothing yet (a fragment, a control frame), or
    /// why the connection must close. Pings are answered here, through the outbound queue.
    fn frame<H: Handler>(
        &mut self,
        frame: frame::Frame,
        handler: &mut H,
        outbound: &Outbound,
    ) -> Result<Option<Message>, CloseReason> {
        outbound.heard().frame(matches!(
            frame.opcode,
            OpCode::Text | OpCode::Binary | OpCode::Continuation
        ));
        if self
            .due()
            .is_some_and(|due| tokio::time::Instant::now() >= due)
        {
            return Err(CloseReason::FragmentTimeout);
        }
        let complete = match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(CloseReason::Protocol("interleaved_message"));
                }
                // `Vec::from` reuses the payload's allocation when the reader no longer
                // shares it (the usual case: one frame per read).
                let buf = Vec::from(frame.payload);
                if frame.fin {
                    (frame.opcode, buf)
                } else {
                    let mut utf8_checked = 0;
                    if frame.opcode == OpCode::Text && !utf8_prefix_ok(&buf, &mut utf8_checked) {
                        return Err(CloseReason::InvalidUtf8);
                    }
                    self.partial = Some(Box::new(Partial {
                        opcode: frame.opcode,
                        bytes: buf,
                        utf8_checked,
                        due: tokio::time::Instant::now() + self.fragment_timeout,
                    }));
                    return Ok(None);
                }
            }
            OpCode::Continuation => {
                let Some(p) = self.partial.as_mut() else {
                    return Err(CloseReason::Protocol("continuation_without_start"));
                };
                if p.bytes.len() + frame.payload.len() > self.max_message_bytes {
                    return Err(CloseReason::TooBig(self.max_message_bytes));
                }
                p.bytes.extend_from_slice(&frame.payload);
                if p.opcode == OpCode::Text && !utf8_prefix_ok(&p.bytes, &mut p.utf8_checked) {
                    return Err(CloseReason::InvalidUtf8);
                }
                if !frame.fin {
                    return Ok(None);
                }
                match self.partial.take() {
                    Some(done) => (done.opcode, done.bytes),
                    None => return Ok(None),
                }
            }
            OpCode::Ping => {
                if handler.on_ping(frame.payload.len())? {
                    outbound.push_pong(frame::pong(&frame.payload));
                }
                return Ok(None);
            }
            OpCode::Pong => return Ok(None),
            OpCode::Close => return Err(close_reason(&frame.payload)),
        };
        match complete {
            (OpCode::Text, bytes) => String::from_utf8(bytes)
                .map(|t| Some(Message::Text(t)))
                .map_err(|_| CloseReason::InvalidUtf8),
            (_, bytes) => Ok(Some(Message::Binary(bytes))),
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

    /// Frames queued when shutdown comes (the registry closes every connection's queue) are
    /// written before the close frame, whether the writer was waiting or writing.
    #[tokio::test]
    async fn shutdown_writes_what_was_queued_before_the_close_frame() {
        let limits = Limits {
            max_message_bytes: 1024,
            fragment_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_millis(20),
        };
        for round in 0..32 {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let (read_half, write_half) = tokio::io::split(server);
            let out = Arc::new(Outbound::new(1 << 20, &NoCodec));
            let serving = tokio::spawn(serve(
                read_half,
                write_half,
                &[],
                limits,
                Quiet,
                out.clone(),
                None,
            ));
            // The writer waits in its `select!`; then frames and shutdown come together.
            tokio::time::sleep(Duration::from_millis(2)).await;
            for n in ["1", "2", "3"] {
                out.push(frame::text(n));
            }
            out.close(CloseReason::Shutdown);
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
