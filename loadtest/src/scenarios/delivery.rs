//! Publish-to-receipt measurement shared by `fanout` and `unicast`: receivers that record
//! latencies, a paced publisher, and the delivery figures.

use std::time::Duration;

use serde_json::{json, Value};

use super::Proto;
use crate::client::{Client, Received};
use crate::stats::{self, now_us};

/// What one receiving connection saw.
#[derive(Default)]
pub(super) struct Seen {
    /// Latencies in µs, merged into one histogram at the end: a full-range histogram per
    /// receiver is ~200 KiB, and recording into a thousand of them missed the cache often
    /// enough to cost the load generator a tenth of its CPU.
    pub(super) latencies_us: Vec<u32>,
    pub(super) ended: bool,
    /// When the last message (not the end marker) arrived, in µs since the Unix epoch.
    pub(super) last_us: u64,
    /// The close code, when the server closed the connection before the end marker.
    pub(super) closed: Option<u16>,
}

/// Receives `kind` messages until the `end` marker, a close, an error or `limit`, recording
/// each message's publish-to-receipt latency and answering `proto`'s own pings.
pub(super) async fn receive(
    mut c: Client,
    proto: Proto,
    kind: &'static str,
    limit: Duration,
) -> anyhow::Result<Seen> {
    let mut seen = Seen {
        latencies_us: Vec::new(),
        ended: false,
        last_us: 0,
        closed: None,
    };
    let run = async {
        loop {
            match c.next().await {
                Ok(Received::Text(t)) => {
                    if let Some(pong) = proto.pong(&t) {
                        let _ = c.send_text(pong).await;
                        continue;
                    }
                    if !t.contains(kind) {
                        continue;
                    }
                    if t.contains("\"end\":true") {
                        seen.ended = true;
                        let _ = c.close(1000, "").await;
                        return;
                    }
                    if let Some(ts) = stats::extract_ts(&t) {
                        let now = now_us();
                        let us = now.saturating_sub(ts).clamp(1, u32::MAX as u64);
                        seen.latencies_us.push(us as u32);
                        seen.last_us = now;
                    }
                }
                Ok(Received::Binary(_)) => {}
                Ok(Received::Close(code, _)) => {
                    seen.closed = Some(code);
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(limit, run).await;
    Ok(seen)
}

/// Sends `rate × duration` payloads at `rate` per second on average, in groups of `burst`
/// (`send(k, payloads)`, `k` the index of the group's first payload), then returns the count.
pub(super) async fn paced<F, Fut>(
    rate: u64,
    duration_secs: f64,
    pad: usize,
    burst: u64,
    mut send: F,
) -> anyhow::Result<u64>
where
    F: FnMut(u64, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let total = (rate as f64 * duration_secs).round() as u64;
    let burst = burst.max(1);
    let pad = "x".repeat(pad);
    let start = tokio::time::Instant::now();
    for k in (0..total).step_by(burst as usize) {
        let due = start + Duration::from_secs_f64(k as f64 / rate.max(1) as f64);
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let group = (k..(k + burst).min(total))
            .map(|i| format!(r#"{{"t":{},"s":{i},"p":"{pad}"}}"#, now_us()))
            .collect();
        send(k, group).await?;
    }
    Ok(total)
}

/// The publisher of `fanout` and `streams`: paced messages on one channel through Redis,
/// then the end marker.
#[derive(clap::Args, Debug)]
pub(crate) struct Publish {
    #[arg(long, default_value = "bench")]
    pub(crate) channel: String,
    /// Redis the publisher uses (PUBLISH <prefix><channel>).
    #[arg(long)]
    pub(crate) redis_url: String,
    /// Channel prefix of the servers' Redis pub/sub.
    #[arg(long, default_value = "gw:ch:")]
    pub(crate) prefix: String,
    /// Messages per second published.
    #[arg(long, default_value_t = 100)]
    pub(crate) rate: u64,
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration_secs: f64,
    /// Padding added to each payload.
    #[arg(long, default_value_t = 64)]
    pub(crate) payload_bytes: usize,
}

impl Publish {
    /// Publishes `rate × duration` messages in groups of `burst` (one pipeline each), with
    /// `FCALL gw_publish` when `fcall` (a history channel), then the end marker; returns how
    /// many it published.
    pub(super) async fn run(&self, burst: u64, fcall: bool) -> anyhow::Result<u64> {
        let mut redis = super::redis_conn(&self.redis_url).await?;
        let key = format!("{}{}", self.prefix, self.channel);
        let channel = &self.channel;
        let published = paced(
            self.rate,
            self.duration_secs,
            self.payload_bytes,
            burst,
            |_, group| {
                let mut r = redis.clone();
                let mut pipe = redis::pipe();
                for p in group {
                    if fcall {
                        pipe.cmd("FCALL")
                            .arg("gw_publish")
                            .arg(1)
                            .arg(channel)
                            .arg(p)
                            .ignore();
                    } else {
                        pipe.cmd("PUBLISH").arg(&key).arg(p).ignore();
                    }
                }
                async move {
                    pipe.query_async::<()>(&mut r).await?;
                    Ok(())
                }
            },
        )
        .await?;
        redis::cmd("PUBLISH")
            .arg(&key)
            .arg(r#"{"end":true}"#)
            .query_async::<i64>(&mut redis)
            .await?;
        Ok(published)
    }
}

pub(super) struct Delivery {
    pub(super) published: u64,
    pub(super) expected: u64,
    pub(super) seen: Vec<Seen>,
    pub(super) secs: f64,
    pub(super) cpu: f64,
}

pub(super) fn delivery_result(d: &Delivery, receivers: usize) -> anyhow::Result<(Value, String)> {
    let mut hist = stats::new_histogram()?;
    let mut delivered = 0;
    let mut ended = 0;
    let mut close_codes: Vec<u16> = Vec::new();
    for s in &d.seen {
        close_codes.extend(s.closed);
        for us in &s.latencies_us {
            let _ = hist.record(u64::from(*us));
        }
        delivered += s.latencies_us.len() as u64;
        ended += usize::from(s.ended);
    }
    let per_sec = delivered as f64 / d.secs.max(1e-9);
    let cpu_per = if delivered > 0 {
        d.cpu / delivered as f64 * 1e6
    } else {
        0.0
    };
    let lat = stats::summarize(&hist);
    let summary = format!(
        "{} published, {delivered}/{} delivered to {receivers} receivers ({ended} saw the end) \
         = {per_sec:.0}/s; latency p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms; \
         server CPU {:.2}s = {cpu_per:.2} µs/delivery",
        d.published,
        d.expected,
        lat["p50_ms"].as_f64().unwrap_or(0.0),
        lat["p99_ms"].as_f64().unwrap_or(0.0),
        lat["p999_ms"].as_f64().unwrap_or(0.0),
        lat["max_ms"].as_f64().unwrap_or(0.0),
        d.cpu
    );
    Ok((
        json!({
            "receivers": receivers,
            "published": d.published,
            "expected": d.expected,
            "delivered": delivered,
            "lost": d.expected.saturating_sub(delivered),
            "receivers_ended": ended,
            "closed_by_server": close_codes.len(),
            "close_codes": close_codes.iter().take(10).collect::<Vec<_>>(),
            "secs": d.secs,
            "deliveries_per_sec": per_sec,
            "server_cpu_secs": d.cpu,
            "cpu_per_delivery_us": cpu_per,
            "latency": lat,
        }),
        summary,
    ))
}
