//! The HTTP transports of Centrifugo's emulation (`docs/sdk.md`):
//!
//! - `streams`: subscribers over `http_stream` or `sse` on one channel, a publisher on
//!   Redis: delivery and server CPU per delivery, to compare with `fanout` over WebSocket
//!   at the same rate;
//! - `emulation-rtt`: one `http_stream` client on one node posting commands to
//!   `/emulation` on a node of choice (the same one, or another that forwards them through
//!   Redis), one at a time: the time from the post to its reply on the stream.
//!
//! The client is [`crate::http_stream`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use tokio::task::JoinSet;

use super::delivery::{delivery_result, Delivery, Publish, Seen};
use super::{emit, Common};
use crate::http_stream::{encode, Poster, Stream};
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

/// A connected stream: the stream and its session.
async fn connected(addr: SocketAddr, transport: Transport) -> anyhow::Result<(Stream, String)> {
    let connect = r#"{"id":1,"connect":{}}"#;
    let mut s = match transport {
        Transport::HttpStream => {
            Stream::request(addr, "POST", "/connection/http_stream", connect).await?
        }
        Transport::Sse => {
            let path = format!("/connection/sse?cf_connect={}", encode(connect));
            Stream::request(addr, "GET", &path, "").await?
        }
    };
    if s.status != 200 {
        bail!("stream refused: {}", s.head.lines().next().unwrap_or(""));
    }
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
