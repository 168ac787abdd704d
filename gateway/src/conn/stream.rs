//! A connection over one long HTTP response instead of a WebSocket: the HTTP-streaming and
//! server-sent-events transports (`docs/sdk.md`, `docs/protocol.md`).
//!
//! The response body is the connection's downstream: the same writer loop as a WebSocket's
//! ([`super::socket`]) writes the outbound queue into it, with the frames encoded for the
//! transport ([`super::frame::Transport`]) and shared with every subscriber as before. Each
//! queued frame goes to hyper as one body chunk, so nothing is copied on the way.
//!
//! There is no upstream on the stream. A bidirectional client POSTs its commands to any
//! node (`edge::streams`), and the node holding the connection hands them to its
//! [`Inbox`]; the connection (where a WebSocket has its reader) runs them through
//! the protocol's [`Handler`] one at a time, in the order they arrived. A unidirectional one
//! (plain `EventSource`) has an inbox that nothing sends to.
//!
//! Bounds: the outbound queue's byte cap as for any connection, at most [`CHUNKS`] frames
//! handed to hyper and not yet written, and at most [`INBOX`] posted messages waiting (a
//! post finding the inbox full is refused with 429; one forwarded by another node is
//! dropped and counted). A client that stops reading fills hyper's buffer, then
//! [`CHUNKS`], then the queue, and is closed as a slow consumer; one that went away is seen
//! at the next write (a ping at the latest).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::mpsc;

use super::clock::TokenClock;
use super::outbound::Outbound;
use super::socket::{self, Handler, Limits, Sink};
use crate::error::CloseReason;

/// Frames handed to hyper and not yet written, per connection.
pub const CHUNKS: usize = 32;

/// Posted messages waiting for the connection, per connection.
pub const INBOX: usize = 8;

/// Where posted commands for one streaming connection go: see the module docs.
pub type Inbox = mpsc::Sender<String>;

/// The response body of a streaming connection: the frames its writer loop hands over.
pub struct Body {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// The writer's end of a [`Body`].
struct BodySink(Option<mpsc::Sender<Bytes>>);

impl Sink for BodySink {
    async fn write_batch(
        &mut self,
        batch: &mut VecDeque<Bytes>,
        timeout: Duration,
    ) -> std::io::Result<()> {
        let gone = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let tx = self.0.as_ref().ok_or_else(gone)?;
        while let Some(frame) = batch.pop_front() {
            // Most chunks find room at once: no timer then.
            let frame = match tx.try_send(frame) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(gone()),
                Err(mpsc::error::TrySendError::Full(frame)) => frame,
            };
            match Box::pin(tokio::time::timeout(timeout, tx.send(frame))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(gone()),
                Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
        Ok(())
    }

    fn finish(&mut self, _: Duration) -> impl Future<Output = ()> + Send + '_ {
        // Dropping the sender ends the body once hyper has written what it holds.
        self.0 = None;
        std::future::ready(())
    }
}

/// Serves a streaming connection: returns the response body, and the writer loop, which
/// the caller awaits (it returns why the connection closed). Commands sent to `inbox`'s
/// other end are run by `handler` within it.
pub fn serve<H: Handler>(
    inbox: mpsc::Receiver<String>,
    limits: Limits,
    handler: H,
    outbound: Arc<Outbound>,
    token: Option<Arc<TokenClock>>,
) -> (Body, impl Future<Output = CloseReason> + Send) {
    let (tx, rx) = mpsc::channel(CHUNKS);
    // The client's commands are run beside the writer, in the connection's one task, and
    // stopped at the close.
    let reader = run_inbox(inbox, handler, outbound.clone());
    let writer = socket::write_loop(BodySink(Some(tx)), limits, outbound, token, false);
    (Body { rx }, socket::Together::new(reader, writer, None))
}

/// Runs posted messages through the handler until one closes the connection, or the
/// connection's inbox is dropped (it left the directory).
#[allow(clippy::manual_async_fn)] // not `async fn`: see `socket::serve`
fn run_inbox<H: Handler>(
    mut inbox: mpsc::Receiver<String>,
    mut handler: H,
    outbound: Arc<Outbound>,
) -> impl Future<Output = ()> + Send {
    async move {
        while let Some(text) = inbox.recv().await {
            if outbound.is_closing() {
                return;
            }
            // Boxed for the reason the WebSocket reader boxes it (see `socket::read_loop`).
            if let Err(reason) = Box::pin(handler.on_text(text)).await {
                outbound.close(reason);
                return;
            }
        }
    }
}
