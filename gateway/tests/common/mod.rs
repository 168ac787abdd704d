//! Helpers for integration tests: a real node on 127.0.0.1:0, real clients, raw sockets.
#![allow(dead_code, clippy::unwrap_used)]

pub mod nginx;
pub mod process;
pub mod redis_server;

use std::net::SocketAddr;
use std::time::Duration;

use gateway::Config;
use loadtest::client::Client;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const T: Duration = Duration::from_secs(5);

/// A node running in this process on ephemeral ports.
pub struct TestNode {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), gateway::StartError>>,
}

/// Defaults for tests: anonymous clients, publishing allowed on `chat:*`, rate limits high
/// enough that only the tests about rate limits meet them.
pub fn config() -> Config {
    Config {
        allow_anonymous: true,
        publish_allow: vec!["chat:*".into()],
        node_id: "test-node".into(),
        handshake_rate_per_ip: 1000,
        handshake_burst_per_ip: 1000,
        message_rate: 0,
        byte_rate: 0,
        drain_window_ms: 500,
        ..Config::default()
    }
}

pub async fn start(config: Config) -> TestNode {
    config.validate().expect("test config is valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gateway::run(listener, admin, config, shutdown.clone()));
    TestNode {
        addr,
        admin: admin_addr,
        shutdown,
        task,
    }
}

impl TestNode {
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connects and consumes the welcome frame.
    pub async fn client(&self) -> (Client, Value) {
        let mut c = Client::connect(&self.url()).await.expect("connect");
        let welcome = c.recv_json(T).await.expect("welcome");
        assert_eq!(welcome["type"], "welcome");
        (c, welcome)
    }

    /// A client subscribed to `channel`.
    pub async fn subscriber(&self, channel: &str) -> Client {
        let (mut c, _) = self.client().await;
        request(&mut c, json!({"type":"subscribe","channel":channel,"id":1})).await;
        c
    }

    /// Plain HTTP/1.1 request to the admin listener; returns status and body.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> (u16, String) {
        http(
            self.admin,
            method,
            path,
            body,
            token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default()
                .as_str(),
        )
        .await
    }

    pub async fn metrics(&self) -> String {
        self.admin("GET", "/metrics", "", None).await.1
    }

    /// Waits until `/metrics` has the whole line `series` (counters are bumped after the
    /// close frame goes out, so a test may see the close first).
    pub async fn wait_metric(&self, series: &str) {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let m = self.metrics().await;
            if has_line(&m, series) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no `{series}` in\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// True when the Prometheus text `metrics` has the whole line `line`, series and value:
/// `… 1` does not match `… 12`.
pub fn has_line(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

/// True when `metrics` has the series `series` (name and labels, exactly as exposed) with
/// any value.
pub fn has_series(metrics: &str, series: &str) -> bool {
    metric(metrics, series).is_some()
}

/// The value of the series `series` (name and labels, exactly as exposed) in `metrics`: the
/// text after the last space of the line that is that series and a value.
pub fn metric<'a>(metrics: &'a str, series: &str) -> Option<&'a str> {
    metrics.lines().find_map(|l| {
        l.rsplit_once(' ')
            .filter(|(s, _)| *s == series)
            .map(|(_, v)| v)
    })
}

/// Runs `spawn` on random unprivileged ports until one binds, for servers that cannot be told
/// to pick an ephemeral port themselves and report it (`redis-server`, nginx). `spawn`
/// returns `None` when the server could not bind its port (it exited, or logged a bind
/// error), so that a port lost to someone else costs a retry instead of the test.
pub async fn on_random_port<S, F, Fut>(mut spawn: F) -> S
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = Option<S>>,
{
    const ATTEMPTS: usize = 20;
    for _ in 0..ATTEMPTS {
        if let Some(server) = spawn(random_port()).await {
            return server;
        }
    }
    panic!("no port bound in {ATTEMPTS} attempts");
}

/// A port in 20000..32000: below Linux's ephemeral range (32768..), where in-process nodes
/// and outgoing connections get theirs, and away from 6379.
fn random_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // every RandomState has fresh keys, so this hash of nothing is a fresh random number
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    20_000 + (r % 12_000) as u16
}

/// An HS256 token for `claims`.
pub fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// An HS256 token naming user `sub`, valid for ten minutes.
pub fn user_token(secret: &str, sub: &str) -> String {
    hs256(
        secret,
        &json!({"sub": sub, "exp": gateway::test_util::now_secs() + 600}),
    )
}

/// Connects, retrying for up to `T` (a node starting, or a slot being released).
pub async fn connect_eventually(url: &str, headers: &[(&str, &str)]) -> Client {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match Client::connect_with(url, headers).await {
            Ok(c) => return c,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("no connection to {url} in time: {e}"),
        }
    }
}

/// Runs a backend call built by `shared::backend` (`send_user`, `send_conn`).
pub async fn fcall<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    args: [&str; 5],
) -> redis::RedisResult<i64> {
    redis::cmd(args[0]).arg(&args[1..]).query_async(conn).await
}

/// Sends a request and expects its ack.
pub async fn request(c: &mut Client, req: Value) {
    c.send_json(&req).await.expect("send");
    let reply = c.recv_json(T).await.expect("reply");
    assert_eq!(reply, json!({"type":"ack","id":req["id"]}), "request {req}");
}

/// Sends a request and returns its (error) reply.
pub async fn ask(c: &mut Client, req: &str) -> Value {
    c.send_text(req).await.expect("send");
    c.recv_json(T).await.expect("reply")
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    extra_headers: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A raw WebSocket connection: handshake done by hand, frames written byte by byte, so tests
/// can send what no well-behaved client library would.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(node: &TestNode) -> Raw {
        let mut raw = Raw::upgrade(node, "/ws").await;
        let (op, payload) = raw.frame().await.expect("welcome");
        assert_eq!(op, 1);
        assert!(String::from_utf8_lossy(&payload).contains("welcome"));
        raw
    }

    /// Upgrades `path` and reads nothing after the 101.
    pub async fn upgrade(node: &TestNode, path: &str) -> Raw {
        let (raw, head) = Raw::handshake(node, path, "").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw
    }

    /// A handshake to `path` with extra header lines (each ending in CRLF); returns the
    /// connection and the response head, whatever its status. No frame is read.
    pub async fn handshake(node: &TestNode, path: &str, extra: &str) -> (Raw, String) {
        let mut s = TcpStream::connect(node.addr).await.expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write handshake");
        let mut raw = Raw { s, buf: Vec::new() };
        let head = raw.read_until_headers().await;
        (raw, head)
    }

    async fn read_until_headers(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 4);
                return head;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(T, self.s.read(&mut chunk))
                .await
                .expect("headers in time")
                .expect("read");
            assert!(n > 0, "eof before headers");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Writes a masked frame with explicit first byte (FIN/RSV/opcode).
    pub async fn send(&mut self, b0: u8, payload: &[u8]) {
        self.s
            .write_all(&masked(b0, payload))
            .await
            .expect("write frame");
    }

    /// Reads the next server frame: (opcode, payload). None on EOF.
    pub async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        self.frame_within(T).await
    }

    pub async fn frame_within(&mut self, t: Duration) -> Option<(u8, Vec<u8>)> {
        self.try_frame_within(t).await.expect("frame in time")
    }

    /// Like [`Raw::frame_within`], but `Err` when no frame came in time: for polling. A
    /// frame cut off by the deadline stays buffered for the next call.
    pub async fn try_frame_within(
        &mut self,
        t: Duration,
    ) -> Result<Option<(u8, Vec<u8>)>, tokio::time::error::Elapsed> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            if self.buf.len() >= 2 {
                let len7 = (self.buf[1] & 0x7f) as usize;
                let (hdr, len) = match len7 {
                    126 if self.buf.len() >= 4 => {
                        (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize)
                    }
                    127 if self.buf.len() >= 10 => (
                        10,
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (2, n),
                };
                if hdr != usize::MAX && self.buf.len() >= hdr + len {
                    let op = self.buf[0] & 0x0f;
                    let payload = self.buf[hdr..hdr + len].to_vec();
                    self.buf.drain(..hdr + len);
                    return Ok(Some((op, payload)));
                }
            }
            // Straight into the buffer: a 64 KiB array here would sit in every caller's future.
            self.buf.reserve(65536);
            let n = tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf))
                .await?
                .unwrap_or(0);
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads frames until a close arrives; returns its code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.frame().await {
                Some((8, p)) => return u16::from_be_bytes([p[0], p[1]]),
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// Encodes a client frame with a fixed mask.
pub fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![b0];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 65535 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}
