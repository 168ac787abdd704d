//! The HTTP transports of Centrifugo's emulation (`docs/sdk.md`):
//!
//! - `streams`: subscribers over `http_stream` or `sse` on one channel, a publisher on
//!   Redis: delivery and server CPU per delivery, to compare with `fanout` over WebSocket
//!   at the same rate;
//! - `emulation-rtt`: one `http_stream` client on one node posting commands to
//!   `/emulation` on a node of choice (the same one, or another that forwards them through
//!   Redis), one at a time: the time from the post to its reply on the stream.
//!
//! HTTP/1.1 is spoken by hand (one request per connection for the streams, a kept-alive
//! connection for the posts): the client must cost little next to the server it measures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::delivery::{delivery_result, Delivery, Publish, Seen};
use super::{emit, Common};
use crate::stats::{self, now_us};

/// Which HTTP transport.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    HttpStream,
    Sse,
}

#[derive(clap::Args, Debug)]
pub struct StreamsArgs {
    /// Node address, `host:port` (the public listener).
    #[arg(long)]
    pub(crate) addr: SocketAddr,
    #[arg(long, value_enum, default_value_t = Transport::HttpStream)]
    pub(crate) transport: Transport,
    /// Subscribers.
    #[arg(short, default_value_t = 100)]
    pub(crate) s: usize,
    #[command(flatten)]
    pub(crate) publish: Publish,
    #[command(flatten)]
    pub(crate) common: Common,
}

#[derive(clap::Args, Debug)]
pub struct RttArgs {
    /// The node that holds the stream.
    #[arg(long)]
    pub(crate) stream_addr: SocketAddr,
    /// The node the posts go to (the same one, or another).
    #[arg(long)]
    pub(crate) post_addr: SocketAddr,
    /// Commands posted, one at a time.
    #[arg(short, default_value_t = 1000)]
    pub(crate) n: usize,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// One long response, read line by line out of its chunks. An SSE stream's `data: ` prefix
/// is taken off; its blank separator lines and comments are skipped.
struct Stream {
    r: BufReader<TcpStream>,
    /// Decoded body bytes not yet handed out.
    pending: Vec<u8>,
    /// Bytes of the current chunk still to read.
    left: usize,
}

impl Stream {
    async fn open(addr: SocketAddr, transport: Transport, connect: &str) -> anyhow::Result<Self> {
        let mut s = TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        let req = match transport {
            Transport::HttpStream => format!(
                "POST /connection/http_stream HTTP/1.1\r\nHost: {addr}\r\n\
                 Content-Length: {}\r\n\r\n{connect}",
                connect.len()
            ),
            Transport::Sse => format!(
                "GET /connection/sse?cf_connect={} HTTP/1.1\r\nHost: {addr}\r\n\r\n",
                encode(connect)
            ),
        };
        s.write_all(req.as_bytes()).await?;
        let mut r = BufReader::new(s);
        let head = read_head(&mut r).await?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("stream refused: {}", head.lines().next().unwrap_or(""));
        }
        Ok(Stream {
            r,
            pending: Vec::new(),
            left: 0,
        })
    }

    /// The next non-empty line of the body, without its `data: ` prefix.
    async fn line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=i).collect();
                line.pop();
                let text = String::from_utf8(line)?;
                let text = text.strip_prefix("data: ").unwrap_or(&text);
                if text.is_empty() || text.starts_with(':') || text.starts_with("retry:") {
                    continue;
                }
                return Ok(text.to_owned());
            }
            if self.left == 0 {
                let mut size = String::new();
                // The CRLF that ends the previous chunk, then the size line.
                while size.trim().is_empty() {
                    size.clear();
                    if self.r.read_line(&mut size).await? == 0 {
                        bail!("stream ended");
                    }
                }
                self.left = usize::from_str_radix(size.trim(), 16)?;
                if self.left == 0 {
                    bail!("stream ended");
                }
            }
            let mut buf = vec![0; self.left.min(64 * 1024)];
            let n = self.r.read(&mut buf).await?;
            if n == 0 {
                bail!("stream ended");
            }
            self.left -= n;
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Lines until the reply with `id`; returns it.
    async fn reply(&mut self, id: u64) -> anyhow::Result<String> {
        loop {
            let l = self.line().await?;
            if l.contains("\"id\":")
                && serde_json::from_str::<serde_json::Value>(&l)?["id"].as_u64() == Some(id)
            {
                return Ok(l);
            }
        }
    }
}

async fn read_head(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            bail!("connection closed in the response head");
        }
        if line == "\r\n" {
            return Ok(head);
        }
        head.push_str(&line);
    }
}

/// Percent-encodes a query component.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A kept-alive connection that posts to `/emulation`.
struct Poster {
    r: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Poster {
    async fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        Ok(Poster {
            r: BufReader::new(s),
            addr,
        })
    }

    /// Posts `data` (commands) for `session`; the status.
    async fn post(&mut self, session: &str, data: &str) -> anyhow::Result<u16> {
        let body = json!({ "session": session, "node": "", "data": data }).to_string();
        let req = format!(
            "POST /emulation HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.r.get_mut().write_all(req.as_bytes()).await?;
        let head = read_head(&mut self.r).await?;
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut rest = vec![0; len];
        self.r.read_exact(&mut rest).await?;
        Ok(status)
    }
}

/// A connected stream: the stream and its session.
async fn connected(addr: SocketAddr, transport: Transport) -> anyhow::Result<(Stream, String)> {
    let mut s = Stream::open(addr, transport, r#"{"id":1,"connect":{}}"#).await?;
    let reply: serde_json::Value = serde_json::from_str(&s.reply(1).await?)?;
    let session = reply["connect"]["session"]
        .as_str()
        .ok_or_else(|| anyhow!("no session in {reply}"))?
        .to_owned();
    Ok((s, session))
}

/// Receives publications until the end marker, recording their latencies.
async fn receive(mut s: Stream, limit: Duration) -> Seen {
    let mut seen = Seen::default();
    let run = async {
        while let Ok(l) = s.line().await {
            if !l.contains("\"pub\"") {
                continue;
            }
            if l.contains("\"end\":true") {
                seen.ended = true;
                return;
            }
            if let Some(ts) = stats::extract_ts(&l) {
                let us = now_us().saturating_sub(ts).clamp(1, u32::MAX as u64);
                seen.latencies_us.push(us as u32);
            }
        }
    };
    let _ = tokio::time::timeout(limit, run).await;
    seen
}

pub async fn streams(a: StreamsArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let mut set = JoinSet::new();
    let p = &a.publish;
    let idle = Duration::from_secs_f64(p.duration_secs + 30.0);
    let subscribe = json!({"id": 2, "subscribe": {"channel": p.channel}}).to_string();
    let mut opened = Vec::with_capacity(a.s);
    for chunk in (0..a.s).collect::<Vec<_>>().chunks(c.concurrency.max(1)) {
        let mut opening = JoinSet::new();
        for _ in chunk {
            let (addr, t, sub) = (a.addr, a.transport, subscribe.clone());
            opening.spawn(async move {
                let (mut s, session) = connected(addr, t).await?;
                let mut p = Poster::new(addr).await?;
                let status = p.post(&session, &sub).await?;
                if status != 204 {
                    bail!("subscribe post answered {status}");
                }
                s.reply(2).await?;
                anyhow::Ok(s)
            });
        }
        while let Some(r) = opening.join_next().await {
            opened.push(r?.context("opening a subscriber")?);
        }
    }
    for s in opened {
        set.spawn(receive(s, idle));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cpu0 = c.cpu()?;
    let start = Instant::now();
    let published = p.run(1, false).await?;
    let mut seen = Vec::new();
    while let Some(r) = set.join_next().await {
        seen.push(r?);
    }
    let d = Delivery {
        published,
        expected: published * a.s as u64,
        seen,
        secs: start.elapsed().as_secs_f64(),
        cpu: c.cpu()? - cpu0,
    };
    let (mut result, summary) = delivery_result(&d, a.s)?;
    result["transport"] = json!(format!("{:?}", a.transport));
    result["rate"] = json!(p.rate);
    result["payload_bytes"] = json!(p.payload_bytes);
    emit(c, "streams", result, &summary)
}

pub async fn emulation_rtt(a: RttArgs) -> anyhow::Result<()> {
    let (mut s, session) = connected(a.stream_addr, Transport::HttpStream).await?;
    let mut p = Poster::new(a.post_addr).await?;
    let mut hist = stats::new_histogram()?;
    // A command that needs no Redis on the owning node: `rpc` is answered 104 at once, so
    // the figure is the emulation path alone.
    for i in 0..a.n as u64 {
        let id = 10 + i;
        let cmd = json!({"id": id, "rpc": {"method": "bench"}}).to_string();
        let t0 = Instant::now();
        let status = p.post(&session, &cmd).await?;
        if status != 204 {
            bail!("post {id} answered {status}");
        }
        s.reply(id).await?;
        let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
    }
    let lat = stats::summarize(&hist);
    let summary = format!(
        "{} posts: p50 {:.3} ms p99 {:.3} ms",
        a.n,
        lat["p50_ms"].as_f64().unwrap_or(0.0),
        lat["p99_ms"].as_f64().unwrap_or(0.0)
    );
    let result = json!({
        "posts": a.n,
        "forwarded": a.stream_addr != a.post_addr,
        "latency": lat,
    });
    emit(&a.common, "emulation_rtt", result, &summary)
}
