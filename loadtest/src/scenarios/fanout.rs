//! `fanout`: subscribers on one channel over one or more nodes, a publisher on Redis.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::task::JoinSet;

use super::delivery::{delivery_result, receive, Delivery, Publish};
use super::{emit, fixed_token, open_many, subscribe, targets, Common};

#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    /// Node URL (repeatable); subscribers are spread round-robin over them.
    #[arg(long = "url", required = true)]
    pub(crate) urls: Vec<String>,
    /// Subscribers.
    #[arg(short, default_value_t = 100)]
    pub(crate) s: usize,
    #[command(flatten)]
    pub(crate) publish: Publish,
    /// Messages published back to back in one Redis pipeline at each tick (the rate stays
    /// the average), so that several frames queue per socket: the burst case of vectored
    /// writes.
    #[arg(long, default_value_t = 1)]
    pub(crate) burst: u64,
    /// Publish with `FCALL gw_publish 1 <channel> <json>` (a history channel's atomic
    /// append-and-publish) instead of `PUBLISH`.
    #[arg(long)]
    pub(crate) fcall: bool,
    #[command(flatten)]
    pub(crate) common: Common,
}

pub async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = targets(&a.urls)?;
    let (clients, failed, err) = open_many(
        c.connector()?,
        t,
        a.s,
        c.concurrency,
        fixed_token(c.token.clone()),
        c.proto,
    )
    .await?;
    if let Some(e) = err {
        bail!("{failed} subscribers failed to connect; first: {e}");
    }
    // Subscribe everyone and wait for every ack before publishing.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(a.s.max(1));
    let p = &a.publish;
    let idle = Duration::from_secs_f64(p.duration_secs + 30.0);
    let mut set = JoinSet::new();
    for (_, mut cl) in clients {
        let (ch, ready) = (p.channel.clone(), ready_tx.clone());
        let proto = c.proto;
        set.spawn(async move {
            subscribe(&mut cl, &ch, proto).await?;
            let _ = ready.send(()).await;
            receive(cl, proto, proto.message_marker(), idle).await
        });
    }
    drop(ready_tx);
    let mut acked = 0;
    while acked < a.s && ready_rx.recv().await.is_some() {
        acked += 1;
    }
    if acked < a.s {
        bail!("only {acked} of {} subscribers got their ack", a.s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cpu0 = c.cpu()?;
    let start = Instant::now();
    let published = p.run(a.burst, a.fcall).await?;
    let mut seen = Vec::new();
    while let Some(r) = set.join_next().await {
        seen.push(r??);
    }
    let d = Delivery {
        published,
        expected: published * a.s as u64,
        seen,
        secs: start.elapsed().as_secs_f64(),
        cpu: c.cpu()? - cpu0,
    };
    let (mut result, summary) = delivery_result(&d, a.s)?;
    result["nodes"] = json!(a.urls.len());
    result["rate"] = json!(p.rate);
    result["offered_deliveries_per_sec"] = json!(p.rate * a.s as u64);
    result["payload_bytes"] = json!(p.payload_bytes);
    result["burst"] = json!(a.burst);
    result["fcall"] = json!(a.fcall);
    emit(c, "fanout", result, &summary)
}
