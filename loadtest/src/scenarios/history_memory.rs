//! `history-memory`: what a history publication holds in Redis. Fills `--channels` fresh
//! history channels with `-n` publications each (`FCALL gw_publish`, a `--payload-bytes`
//! payload), and reports Redis' `used_memory` growth per publication. `-n` should be the
//! channels' `history_size`, so that what is measured is a full history, as it stands
//! once a channel has been busy for a while.

use anyhow::Context;
use serde_json::json;

use super::{emit, redis_conn, redis_memory, Common};

#[derive(clap::Args, Debug)]
pub struct HistoryMemoryArgs {
    #[arg(long)]
    pub(crate) redis_url: String,
    /// Channel names are this prefix and a number; it must match a history pattern of the
    /// gateway's `--channels`.
    #[arg(long, default_value = "hist:mem")]
    pub(crate) prefix: String,
    #[arg(long, default_value_t = 50)]
    pub(crate) channels: usize,
    /// Publications per channel.
    #[arg(short, default_value_t = 100)]
    pub(crate) n: usize,
    #[arg(long, default_value_t = 100)]
    pub(crate) payload_bytes: usize,
    #[command(flatten)]
    pub(crate) common: Common,
}

pub async fn history_memory(a: HistoryMemoryArgs) -> anyhow::Result<()> {
    let mut redis = redis_conn(&a.redis_url).await?;
    // Fresh names per run, so that an earlier run's histories are not counted.
    let run = std::process::id();
    let (mem0, keys0) = redis_memory(&mut redis).await?;
    // `{"p":"xxx…"}` is exactly `payload_bytes` long.
    let payload = json!({ "p": "x".repeat(a.payload_bytes.saturating_sub(8)) }).to_string();
    for c in 0..a.channels {
        let channel = format!("{}-{run}-{c}", a.prefix);
        let mut pipe = redis::pipe();
        for _ in 0..a.n {
            pipe.cmd("FCALL")
                .arg("gw_publish")
                .arg(1)
                .arg(&channel)
                .arg(&payload)
                .ignore();
        }
        let () = pipe
            .query_async(&mut redis)
            .await
            .context("FCALL gw_publish: is the prefix a history channel?")?;
    }
    let (mem1, keys1) = redis_memory(&mut redis).await?;
    let publications = (a.channels * a.n) as f64;
    let per = (mem1 as f64 - mem0 as f64) / publications.max(1.0);
    let result = json!({
        "channels": a.channels,
        "per_channel": a.n,
        "payload_bytes": payload.len(),
        "redis_used_memory_before": mem0,
        "redis_used_memory_after": mem1,
        "redis_keys_before": keys0,
        "redis_keys_after": keys1,
        "redis_bytes_per_publication": per,
    });
    let summary = format!(
        "{} channels x {} publications of {} B: Redis {mem0} -> {mem1} B = {per:.0} B per \
         publication (keys {keys0} -> {keys1})",
        a.channels,
        a.n,
        payload.len()
    );
    emit(&a.common, "history-memory", result, &summary)
}
