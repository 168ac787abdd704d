//! A small WebSocket client: connect (with extra headers), send and receive JSON, close.
//!
//! Pings are answered and close frames echoed automatically (fastwebsockets'
//! `FragmentCollector`), as a browser would.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload, WebSocketError};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// One received message, or the peer's close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, String),
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the handshake with this HTTP status instead of 101.
    Status(u16),
    /// Anything else (TCP, HTTP, protocol).
    Other(anyhow::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Status(s) => write!(f, "handshake answered with HTTP {s}"),
            ConnectError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// See the module docs.
pub struct Client {
    ws: FragmentCollector<TokioIo<Upgraded>>,
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

impl Client {
    /// Connects to `ws://host:port/path?query`.
    pub async fn connect(url: &str) -> Result<Client, ConnectError> {
        Self::connect_with(url, &[]).await
    }

    /// Connects with extra request headers (Authorization, Origin, ...).
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Client, ConnectError> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| ConnectError::Other(anyhow::anyhow!("only ws:// URLs: {url}")))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let tcp = TcpStream::connect(host)
            .await
            .with_context(|| format!("connecting to {host}"))
            .map_err(ConnectError::Other)?;
        let _ = tcp.set_nodelay(true);
        Self::handshake(tcp, host, path, headers).await
    }

    /// Runs the WebSocket handshake over an already-open stream (plain TCP, TLS, or a socket
    /// that already carried a PROXY header).
    pub async fn handshake<S>(
        stream: S,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, ConnectError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let mut req = Request::builder()
            .method("GET")
            .uri(path)
            .header("Host", host)
            .header("Upgrade", "websocket")
            .header("Connection", "upgrade")
            .header(
                "Sec-WebSocket-Key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("Sec-WebSocket-Version", "13");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| ConnectError::Other(e.into()))?;
        match fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await {
            Ok((ws, _)) => Ok(Client {
                ws: FragmentCollector::new(ws),
            }),
            Err(WebSocketError::InvalidStatusCode(s)) => Err(ConnectError::Status(s)),
            Err(e) => Err(ConnectError::Other(e.into())),
        }
    }

    /// Sends one text frame.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws
            .write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
            .await?;
        Ok(())
    }

    /// Sends a JSON value as one text frame.
    pub async fn send_json(&mut self, v: &Value) -> anyhow::Result<()> {
        self.send_text(&v.to_string()).await
    }

    /// Sends a raw frame (tests use this for binary and control frames).
    pub async fn send_frame(&mut self, frame: Frame<'_>) -> anyhow::Result<()> {
        self.ws.write_frame(frame).await?;
        Ok(())
    }

    /// Receives the next message or close, waiting at most `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Received> {
        tokio::time::timeout(timeout, self.next())
            .await
            .context("timed out waiting for a frame")?
    }

    /// Receives the next message or close, with no time limit of its own: for loops that
    /// bound their whole run instead (a timer per frame costs a measurable share of a load
    /// client's CPU).
    pub async fn next(&mut self) -> anyhow::Result<Received> {
        let frame = self.ws.read_frame().await?;
        Ok(match frame.opcode {
            OpCode::Text => Received::Text(String::from_utf8(frame.payload.to_vec())?),
            OpCode::Binary => Received::Binary(frame.payload.to_vec()),
            OpCode::Close => {
                let p = &frame.payload[..];
                let code = if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                };
                let reason = String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into_owned();
                Received::Close(code, reason)
            }
            other => bail!("unexpected {other:?} frame"),
        })
    }

    /// Receives the next text message as JSON; a close is an error naming its code.
    pub async fn recv_json(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        match self.recv(timeout).await? {
            Received::Text(t) => Ok(serde_json::from_str(&t)?),
            other => bail!("expected a text frame, got {other:?}"),
        }
    }

    /// Receives until a close frame arrives and returns its code and reason.
    pub async fn recv_close(&mut self, timeout: Duration) -> anyhow::Result<(u16, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Received::Close(code, reason) = self.recv(left).await? {
                return Ok((code, reason));
            }
        }
    }

    /// Sends a close frame with `code`.
    pub async fn close(&mut self, code: u16, reason: &str) -> anyhow::Result<()> {
        self.ws
            .write_frame(Frame::close(code, reason.as_bytes()))
            .await?;
        Ok(())
    }
}
