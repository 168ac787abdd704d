//! `recovery-storm`: many clients of one history channel go away together, miss some
//! publications, and come back at once asking to recover them.
//!
//! It reports how long until every client has recovered, and what the storm cost Redis:
//! the node's history reads (`gateway_history_reads_total`) and all Redis commands
//! (`INFO stats`, which also counts the reconnects' directory registrations) per client.
//! A node that batches the reads of one channel needs far fewer than one read per client.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use tokio::task::JoinSet;

use super::{emit, fixed_token, open_many, redis_conn, targets, Common};
use crate::client::Client;

#[derive(clap::Args, Debug)]
pub struct RecoveryStormArgs {
    /// Node URL (repeatable); clients are spread round-robin over them.
    #[arg(long = "url", required = true)]
    pub(crate) urls: Vec<String>,
    /// The nodes' admin URLs, for their metrics (repeatable).
    #[arg(long = "admin", required = true)]
    pub(crate) admins: Vec<String>,
    /// Clients.
    #[arg(short, default_value_t = 1000)]
    pub(crate) n: usize,
    /// A channel whose `[[channels]]` entry keeps at least `missed` publications.
    #[arg(long, default_value = "hist:storm")]
    pub(crate) channel: String,
    /// Publications made while the clients are away.
    #[arg(long, default_value_t = 100)]
    pub(crate) missed: u64,
    #[arg(long)]
    pub(crate) redis_url: String,
    #[command(flatten)]
    pub(crate) common: Common,
}

pub async fn recovery_storm(a: RecoveryStormArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = targets(&a.urls)?;
    let connector = c.connector()?;
    let mut redis = redis_conn(&a.redis_url).await?;
    // Where the channel stands: one publication, so that it has an epoch and an offset.
    let (top, epoch): (u64, String) = redis::cmd("FCALL")
        .arg("gw_publish")
        .arg(1)
        .arg(&a.channel)
        .arg(r#"{"before":true}"#)
        .query_async(&mut redis)
        .await
        .context("FCALL gw_publish: is the channel a history channel?")?;
    for i in 0..a.missed {
        let _: (u64, String) = redis::cmd("FCALL")
            .arg("gw_publish")
            .arg(1)
            .arg(&a.channel)
            .arg(json!({ "missed": i }).to_string())
            .query_async(&mut redis)
            .await?;
    }
    // Everyone comes back at once.
    let reads0 = history_reads(&a.admins).await?;
    let cmds0 = redis_commands(&mut redis).await?;
    let cpu0 = c.cpu()?;
    let start = Instant::now();
    let (clients, failed, err) = open_many(
        connector,
        t,
        a.n,
        c.concurrency,
        fixed_token(c.token.clone()),
        c.proto,
    )
    .await?;
    if let Some(e) = err {
        bail!("{failed} clients failed to connect; first: {e}");
    }
    let mut set = JoinSet::new();
    for (_, cl) in clients {
        let (ch, ep) = (a.channel.clone(), epoch.clone());
        set.spawn(recover(cl, ch, ep, top, a.missed));
    }
    let (mut recovered, mut complete) = (0usize, 0usize);
    while let Some(r) = set.join_next().await {
        let (ok, all) = r??;
        recovered += usize::from(ok);
        complete += usize::from(all);
    }
    let secs = start.elapsed().as_secs_f64();
    let reads = history_reads(&a.admins).await? - reads0;
    let cmds = redis_commands(&mut redis).await? - cmds0;
    let cpu = c.cpu()? - cpu0;
    let n = a.n as f64;
    let result = json!({
        "clients": a.n,
        "missed": a.missed,
        "recovered": recovered,
        "complete": complete,
        "secs_until_all_recovered": secs,
        "history_reads": reads,
        "history_reads_per_client": reads as f64 / n,
        "redis_commands": cmds,
        "redis_commands_per_client": cmds as f64 / n,
        "server_cpu_ms_per_client": cpu * 1000.0 / n,
    });
    let summary = format!(
        "{recovered}/{} recovered ({complete} with all {} publications) in {secs:.2} s; \
         {reads} history reads ({:.4}/client), {cmds} Redis commands ({:.2}/client)",
        a.n,
        a.missed,
        reads as f64 / n,
        cmds as f64 / n
    );
    emit(c, "recovery-storm", result, &summary)
}

/// Subscribes with `recover` and reads until every missed publication arrived. Returns
/// (recovered, got all of them in order).
async fn recover(
    mut c: Client,
    channel: String,
    epoch: String,
    top: u64,
    missed: u64,
) -> anyhow::Result<(bool, bool)> {
    c.send_json(&json!({
        "type": "subscribe", "channel": channel, "id": 1,
        "recover": { "epoch": epoch, "offset": top },
    }))
    .await?;
    let limit = Duration::from_secs(60);
    let ack = loop {
        let v = c.recv_json(limit).await?;
        if v["type"] == "ack" {
            break v;
        }
        if v["type"] == "error" {
            bail!("subscribe refused: {v}");
        }
    };
    if ack["recovered"] != true {
        return Ok((false, false));
    }
    let mut next = top + 1;
    while next <= top + missed {
        let v = c.recv_json(limit).await?;
        if v["type"] != "message" {
            continue;
        }
        if v["offset"].as_u64() != Some(next) {
            return Ok((true, false));
        }
        next += 1;
    }
    let _ = c.close(1000, "").await;
    Ok((true, true))
}

/// The sum of `gateway_history_reads_total` over the nodes.
async fn history_reads(admins: &[String]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for url in admins {
        let text = http_get(url, "/metrics").await?;
        sum += text
            .lines()
            .find_map(|l| l.strip_prefix("gateway_history_reads_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    Ok(sum)
}

/// `total_commands_processed` from `INFO stats`.
async fn redis_commands(r: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(r).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO stats has no total_commands_processed")
}

/// A plain `GET` over HTTP/1.0 (`base` is `http://host:port`); returns the body.
async fn http_get(base: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf)).await??;
    Ok(buf
        .split_once("\r\n\r\n")
        .map_or(buf.clone(), |(_, b)| b.to_owned()))
}
