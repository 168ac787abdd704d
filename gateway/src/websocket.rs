//! The WebSocket connection layer: one reader task and one writer loop per connection.
//!
//! Two facts about fastwebsockets shape this module:
//!
//! - `read_frame` is not cancel-safe (a half-read frame is lost if its future is dropped), so
//!   it never sits inside a `select!`. Each connection gets its own reader task that loops on
//!   `read_frame` and nothing else.
//! - fastwebsockets caps single frames but not the total of a fragmented message, so the
//!   reader reassembles fragments itself and closes with 1009 the moment the running total
//!   passes `max_message_bytes`, before buffering any more.
//!
//! The writer is the connection's main loop: one `select!` over the outbound queue, the
//! heartbeat tick and the shutdown token. It writes pre-encoded frames ([`frame`]) straight to
//! the socket with vectored writes, so a frame fanned out to many connections is encoded once
//! and shared as [`Bytes`]. Every write is flushed, which TLS streams need.
//!
//! The reader uses fastwebsockets with automatic pong and close disabled: control frames are
//! answered through the same outbound queue, keeping a single writer per socket.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use fastwebsockets::{OpCode, Role, WebSocketError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::auth::{ClockEvent, TokenClock};
use crate::error::CloseReason;
use crate::outbound::Outbound;

/// What the application does with complete messages.
pub trait Handler: Send + 'static {
    /// A complete text message: fragments reassembled, size and UTF-8 checked.
    fn on_text(&mut self, text: String) -> impl Future<Output = Result<(), CloseReason>> + Send;

    /// A complete binary message. Protocol v1 has none, so the default closes with 1003.
    fn on_binary(&mut self, data: Vec<u8>) -> impl Future<Output = Result<(), CloseReason>> + Send {
        let _ = data;
        async { Err(CloseReason::Binary) }
    }
}

/// Per-connection limits and timers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message after reassembly.
    pub max_message_bytes: usize,
    /// Interval between server pings.
    pub ping_interval: Duration,
    /// Silence (no frame at all) after which the peer is closed with 4001.
    pub ping_timeout: Duration,
    /// How long one batch write, or the close handshake, may take.
    pub write_timeout: Duration,
}

/// Serves one upgraded connection until it closes, and returns why it closed.
///
/// Everything the handler wants to send goes through `outbound`; `shutdown` closes the
/// connection with 1001.
pub async fn serve<S, H>(
    io: S,
    limits: Limits,
    handler: H,
    outbound: Arc<Outbound>,
    shutdown: CancellationToken,
    token: Option<Arc<TokenClock>>,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: Handler,
{
    let (read_half, mut write_half) = tokio::io::split(io);
    let started = Instant::now();
    let last_seen = Arc::new(AtomicU64::new(0));
    let mut reader = tokio::spawn(read_loop(
        RequireMask::new(read_half),
        limits,
        handler,
        outbound.clone(),
        last_seen.clone(),
        started,
    ));

    let mut batch = VecDeque::new();
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + limits.ping_interval,
        limits.ping_interval,
    );
    let reason = loop {
        let closing = outbound.take(&mut batch);
        if !batch.is_empty() {
            if write_batch(&mut write_half, &mut batch, limits)
                .await
                .is_err()
            {
                // A write that timed out on a peer that stopped reading, whose queue then
                // overflowed, is a slow consumer, not a lost connection.
                break outbound.close_reason().unwrap_or(CloseReason::Abnormal);
            }
            outbound.written();
        }
        if let Some(reason) = closing {
            break reason;
        }
        let token_due = token.as_ref().map_or_else(far_future, |t| t.deadline());
        tokio::select! {
            _ = outbound.changed() => {}
            _ = ping.tick() => {
                let silent_ms = (started.elapsed().as_millis() as u64)
                    .saturating_sub(last_seen.load(Ordering::Relaxed));
                if silent_ms > limits.ping_timeout.as_millis() as u64 {
                    break CloseReason::HeartbeatTimeout;
                }
                outbound.push(frame::ping());
            }
            _ = shutdown.cancelled() => break CloseReason::Shutdown,
            _ = tokio::time::sleep_until(token_due), if token.is_some() => {
                match token.as_ref().map(|t| t.fire()) {
                    Some(ClockEvent::Warn(grace_ms)) => {
                        let note = shared::protocol::ServerFrame::TokenExpired { grace_ms };
                        outbound.push(frame::text(&note.to_json()));
                    }
                    Some(ClockEvent::Expired) => break CloseReason::TokenExpired,
                    _ => {}
                }
            }
        }
    };
    // Make the reason visible to the reader and to producers, so they stop queueing.
    outbound.close(reason.clone());

    if reason != CloseReason::Abnormal {
        // Best effort: the peer may be gone or not reading (slow consumer); bounded by timeout.
        let mut last = VecDeque::from([frame::close(reason.code(), &reason.to_string())]);
        let _ = write_batch(&mut write_half, &mut last, limits).await;
        let _ = tokio::time::timeout(limits.write_timeout, write_half.shutdown()).await;
        // Give the peer a moment to answer our close so the reader ends cleanly.
        if tokio::time::timeout(limits.write_timeout, &mut reader)
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

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Refuses unmasked client frames (RFC 6455 §5.1), which fastwebsockets accepts silently.
///
/// It follows frame boundaries in the byte stream as it passes through (headers are parsed,
/// payloads skipped) and fails the read with `InvalidData` at the first header whose mask
/// bit is clear; the reader maps that to close 1002.
struct RequireMask<R> {
    inner: R,
    header: [u8; 10],
    have: usize,
    need: usize,
    skip: u64,
}

impl<R> RequireMask<R> {
    fn new(inner: R) -> Self {
        RequireMask {
            inner,
            header: [0; 10],
            have: 0,
            need: 2,
            skip: 0,
        }
    }

    fn scan(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(bytes.len() as u64)) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have == 2 {
                if self.header[1] & 0x80 == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "unmasked client frame",
                    ));
                }
                self.need = match self.header[1] & 0x7f {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
            }
            if self.have == self.need {
                let len = match self.need {
                    4 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                    10 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or_default()),
                    _ => u64::from(self.header[1] & 0x7f),
                };
                self.skip = len.saturating_add(4); // the mask key, then the payload
                self.have = 0;
                self.need = 2;
            }
        }
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for RequireMask<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                std::task::Poll::Ready(this.scan(&buf.filled()[before..]))
            }
            other => other,
        }
    }
}

/// Writes every frame in `batch` with vectored writes, then flushes. Bounded by
/// `limits.write_timeout`: a peer that does not read for that long is gone.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut VecDeque<Bytes>,
    limits: Limits,
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
        w.flush().await
    };
    match tokio::time::timeout(limits.write_timeout, io).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The reader task: the only place `read_frame` is awaited for this connection.
async fn read_loop<R, H>(
    read: R,
    limits: Limits,
    mut handler: H,
    outbound: Arc<Outbound>,
    last_seen: Arc<AtomicU64>,
    started: Instant,
) where
    R: AsyncRead + Unpin,
    H: Handler,
{
    let (mut ws, _) = fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
    ws.set_auto_close(false);
    ws.set_auto_pong(false);
    // fastwebsockets refuses frames with len >= this, so +1 admits exactly the cap.
    ws.set_max_message_size(limits.max_message_bytes + 1);

    // The message being reassembled from fragments: its opcode and bytes so far, and how far
    // a text message is known to be valid UTF-8 (checked per fragment, so a bad byte fails
    // fast instead of after the whole message arrived).
    let mut partial: Option<(OpCode, Vec<u8>)> = None;
    let mut utf8_checked = 0;
    let mut no_send = |_| async { Ok::<(), std::convert::Infallible>(()) };
    let reason = loop {
        let frame = match ws.read_frame(&mut no_send).await {
            Ok(f) => f,
            Err(e) => break read_error(e, limits),
        };
        last_seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let complete = match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                if partial.is_some() {
                    break CloseReason::Protocol("interleaved_message");
                }
                if frame.fin {
                    Some((frame.opcode, frame.payload.to_vec()))
                } else {
                    let buf = frame.payload.to_vec();
                    utf8_checked = 0;
                    if frame.opcode == OpCode::Text && !utf8_prefix_ok(&buf, &mut utf8_checked) {
                        break CloseReason::InvalidUtf8;
                    }
                    partial = Some((frame.opcode, buf));
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
                    partial.take()
                } else {
                    None
                }
            }
            OpCode::Ping | OpCode::Pong | OpCode::Close if frame.payload.len() > 125 => {
                break CloseReason::Protocol("control_frame_too_long");
            }
            OpCode::Ping => {
                outbound.push(frame::pong(&frame.payload));
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
        while let Ok(f) = ws.read_frame(&mut no_send).await {
            if f.opcode == OpCode::Close {
                break;
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

/// Maps a fastwebsockets read error to the close we answer with.
fn read_error(e: WebSocketError, limits: Limits) -> CloseReason {
    match e {
        WebSocketError::InvalidUTF8 => CloseReason::InvalidUtf8,
        WebSocketError::FrameTooLarge => CloseReason::TooBig(limits.max_message_bytes),
        WebSocketError::ReservedBitsNotZero => CloseReason::Protocol("reserved_bits"),
        WebSocketError::ControlFrameFragmented => CloseReason::Protocol("fragmented_control_frame"),
        WebSocketError::PingFrameTooLarge => CloseReason::Protocol("control_frame_too_long"),
        WebSocketError::InvalidValue => CloseReason::Protocol("reserved_opcode"),
        WebSocketError::IoError(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            CloseReason::Protocol("unmasked_frame")
        }
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => CloseReason::Abnormal,
        _ => CloseReason::Protocol("invalid_frame"),
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

/// Server frame encoding. Server frames are never masked, so a frame's bytes depend only on
/// its content: encode once, share the [`Bytes`] with every connection.
pub mod frame {
    use bytes::{BufMut, Bytes, BytesMut};

    const FIN: u8 = 0x80;

    /// Encodes one unfragmented frame.
    pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
        let len = payload.len();
        let mut buf = BytesMut::with_capacity(len + 10);
        buf.put_u8(FIN | opcode);
        if len < 126 {
            buf.put_u8(len as u8);
        } else if len <= u16::MAX as usize {
            buf.put_u8(126);
            buf.put_u16(len as u16);
        } else {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
        buf.put_slice(payload);
        buf.freeze()
    }

    /// A text frame.
    pub fn text(s: &str) -> Bytes {
        encode(0x1, s.as_bytes())
    }

    /// A binary frame.
    pub fn binary(b: &[u8]) -> Bytes {
        encode(0x2, b)
    }

    /// A close frame. The reason is cut to fit the 125-byte control-frame limit on a char
    /// boundary, so it stays valid UTF-8.
    pub fn close(code: u16, reason: &str) -> Bytes {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut p = Vec::with_capacity(2 + end);
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(&reason.as_bytes()[..end]);
        encode(0x8, &p)
    }

    /// An empty ping.
    pub fn ping() -> Bytes {
        Bytes::from_static(&[FIN | 0x9, 0])
    }

    /// A pong echoing `payload`.
    pub fn pong(payload: &[u8]) -> Bytes {
        encode(0xA, payload)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn lengths() {
            assert_eq!(&super::text("hi")[..], &[0x81, 2, b'h', b'i']);
            let f = super::text(&"x".repeat(300));
            assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
            let f = super::text(&"x".repeat(70_000));
            assert_eq!(&f[..2], &[0x81, 127]);
            assert_eq!(f.len(), 70_010);
            let c = super::close(1000, &"é".repeat(100));
            assert!(c.len() <= 127);
            assert!(std::str::from_utf8(&c[4..]).is_ok());
        }
    }
}
