//! `presence`: members of one presence channel spread over the nodes, then
//!
//! - `presence_stats` asked `calls` times by one member: latency percentiles, and the Redis
//!   commands each call cost (`INFO stats`), which must not grow with the members;
//! - join/leave fan-out: a churner subscribes and leaves `cycles` times while every member
//!   counts the `join` and `leave` frames it gets: deliveries per second.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use tokio::task::JoinSet;

use super::{emit, fixed_token, open_many, redis_commands, redis_conn, subscribe, targets, Common};
use crate::client::Client;
use crate::stats;

#[derive(clap::Args, Debug)]
pub struct PresenceArgs {
    /// Node URL (repeatable); members are spread round-robin over them.
    #[arg(long = "url", required = true)]
    pub(crate) urls: Vec<String>,
    /// Members.
    #[arg(short, default_value_t = 1000)]
    pub(crate) n: usize,
    /// A channel whose `[[channels]]` entry has `presence` (and `join_leave` for the
    /// fan-out part).
    #[arg(long, default_value = "pres:bench")]
    pub(crate) channel: String,
    /// `presence_stats` calls.
    #[arg(long, default_value_t = 1000)]
    pub(crate) calls: usize,
    /// Subscribe-and-leave cycles of the churner.
    #[arg(long, default_value_t = 200)]
    pub(crate) cycles: usize,
    #[arg(long)]
    pub(crate) redis_url: String,
    #[command(flatten)]
    pub(crate) common: Common,
}

pub async fn presence(a: PresenceArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = targets(&a.urls)?;
    let connector = c.connector()?;
    let (clients, failed, err) = open_many(
        connector.clone(),
        t.clone(),
        a.n,
        c.concurrency,
        fixed_token(c.token.clone()),
        c.proto,
    )
    .await?;
    if let Some(e) = err {
        bail!("{failed} members failed to connect; first: {e}");
    }
    let mut members = Vec::with_capacity(a.n);
    for (_, mut cl) in clients {
        subscribe(&mut cl, &a.channel, c.proto).await?;
        members.push(cl);
    }
    let mut asker = members.pop().context("no member")?;
    // Let the joins of everyone settle before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drain(&mut asker).await;

    // presence_stats: latency and Redis commands per call.
    let mut redis = redis_conn(&a.redis_url).await?;
    let cmds0 = redis_commands(&mut redis).await?;
    let mut hist = stats::new_histogram()?;
    let mut clients_seen = 0;
    for i in 0..a.calls {
        let t0 = Instant::now();
        asker
            .send_json(&json!({"type":"presence_stats","channel":a.channel,"id":i}))
            .await?;
        loop {
            let v = asker.recv_json(Duration::from_secs(10)).await?;
            if v["type"] == "ack" && v["id"] == i {
                clients_seen = v["num_clients"].as_u64().unwrap_or(0);
                break;
            }
            if v["type"] == "error" {
                bail!("presence_stats refused: {v}");
            }
        }
        let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
    }
    let cmds = redis_commands(&mut redis).await? - cmds0;

    // join/leave fan-out: every member counts what it gets while a churner comes and goes,
    // after it read the joins of the members that subscribed after it.
    let mut counters = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(members.len().max(1));
    let waiting = members.len();
    for mut m in members {
        let ready = ready_tx.clone();
        counters.spawn(async move {
            drain(&mut m).await;
            let _ = ready.send(()).await;
            let mut got = Vec::new();
            while let Ok(Ok(v)) =
                tokio::time::timeout(Duration::from_secs(2), m.recv_json(Duration::from_secs(3)))
                    .await
            {
                if v["type"] == "join" || v["type"] == "leave" {
                    got.push(v["conn_id"].as_str().unwrap_or_default().to_owned());
                }
            }
            got
        });
    }
    drop(ready_tx);
    for _ in 0..waiting {
        ready_rx.recv().await.context("a member ended early")?;
    }
    let cpu0 = c.cpu()?;
    let start = Instant::now();
    // Only the churner's joins and leaves count: a member may still be reading the others'.
    let mut churners = std::collections::HashSet::new();
    for i in 0..a.cycles {
        let target = &t[i % t.len()];
        let mut churner: Client = connector.connect(target, &[]).await?;
        let welcome = churner.recv_json(Duration::from_secs(10)).await?;
        churners.insert(welcome["conn_id"].as_str().unwrap_or_default().to_owned());
        subscribe(&mut churner, &a.channel, c.proto).await?;
        let _ = churner.close(1000, "").await;
    }
    let churn_secs = start.elapsed().as_secs_f64();
    let mut delivered = 0u64;
    while let Some(r) = counters.join_next().await {
        delivered += r?.iter().filter(|id| churners.contains(*id)).count() as u64;
    }
    let cpu = c.cpu()? - cpu0;
    let expected = 2 * a.cycles as u64 * (a.n as u64 - 1);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let result = json!({
        "members": a.n,
        "nodes": a.urls.len(),
        "num_clients_seen": clients_seen,
        "calls": a.calls,
        "stats_p50_ms": ms(0.5),
        "stats_p99_ms": ms(0.99),
        "redis_commands_per_call": cmds as f64 / a.calls as f64,
        "cycles": a.cycles,
        "join_leave_delivered": delivered,
        "join_leave_expected": expected,
        "join_leave_deliveries_per_sec": delivered as f64 / churn_secs.max(1e-9),
        "server_cpu_secs": cpu,
    });
    let summary = format!(
        "{} members on {} node(s): presence_stats p50 {:.2} ms, p99 {:.2} ms, {:.2} Redis \
         commands/call; join/leave {delivered}/{expected} delivered, {:.0}/s",
        a.n,
        a.urls.len(),
        ms(0.5),
        ms(0.99),
        cmds as f64 / a.calls as f64,
        delivered as f64 / churn_secs.max(1e-9)
    );
    emit(c, "presence", result, &summary)
}

/// Reads whatever is queued (the joins of the others) until 300 ms pass quietly.
async fn drain(c: &mut Client) {
    while let Ok(Ok(_)) = tokio::time::timeout(
        Duration::from_millis(300),
        c.recv_json(Duration::from_secs(1)),
    )
    .await
    {}
}
