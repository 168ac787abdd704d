//! `churn`: connect/subscribe/disconnect cycles; the server's RSS and the Redis key count
//! must come back to their baseline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::task::JoinSet;

use super::{connect_one, emit, mint, redis_conn, subscribe, Common};
use crate::net::Target;

#[derive(clap::Args, Debug)]
pub struct ChurnArgs {
    pub(crate) url: String,
    /// How long to keep connecting and disconnecting (at most, with `--cycles`).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration_secs: f64,
    /// Stop after this many cycles (0: run for the whole duration).
    #[arg(long, default_value_t = 0)]
    pub(crate) cycles: usize,
    /// Redis whose key count (DBSIZE) must come back to its baseline.
    #[arg(long)]
    pub(crate) redis_url: Option<String>,
    /// HS256 secret: each cycle then authenticates as one of `--users` users, so the
    /// directory records (and must forget) user routes.
    #[arg(long)]
    pub(crate) jwt_secret: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub(crate) users: usize,
    /// Each cycle subscribes to one of this many channels before disconnecting.
    #[arg(long, default_value_t = 50)]
    pub(crate) channels: usize,
    /// Longest wait for the key count to come back after the last cycle.
    #[arg(long, default_value_t = 15.0)]
    pub(crate) settle_secs: f64,
    #[command(flatten)]
    pub(crate) common: Common,
}

async fn dbsize(r: &mut Option<redis::aio::MultiplexedConnection>) -> anyhow::Result<i64> {
    match r {
        Some(r) => Ok(redis::cmd("DBSIZE").query_async(r).await?),
        None => Ok(0),
    }
}

async fn churn_cycles(
    c: &Common,
    a: &ChurnArgs,
    t: &Target,
    duration: Duration,
    limit: usize,
) -> anyhow::Result<(u64, u64, Option<String>)> {
    let connector = c.connector()?;
    let deadline = Instant::now() + duration;
    let k = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..c.concurrency.max(1) {
        let (t, connector, k, proto) = (t.clone(), connector.clone(), k.clone(), c.proto);
        let (secret, token, users, channels) = (
            a.jwt_secret.clone(),
            c.token.clone(),
            a.users.max(1),
            a.channels.max(1),
        );
        set.spawn(async move {
            let (mut ok, mut failed, mut first_err) = (0u64, 0u64, None);
            while Instant::now() < deadline {
                let i = k.fetch_add(1, Ordering::Relaxed);
                if limit > 0 && i >= limit {
                    break;
                }
                let tok = match &secret {
                    Some(s) => Some(mint(Some(s), None, &format!("bench-c{}", i % users), 3600)?),
                    None => token.clone(),
                };
                let cycle = async {
                    let mut cl = connect_one(&connector, &t, tok, proto).await?;
                    subscribe(&mut cl, &format!("churn:{}", i % channels), proto).await?;
                    cl.close(1000, "").await?;
                    let _ = cl.recv_close(Duration::from_secs(2)).await;
                    Ok::<_, anyhow::Error>(())
                };
                match cycle.await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        first_err.get_or_insert(format!("{e:#}"));
                    }
                }
            }
            Ok::<_, anyhow::Error>((ok, failed, first_err))
        });
    }
    let (mut ok, mut failed, mut first_err) = (0, 0, None);
    while let Some(r) = set.join_next().await {
        let (o, f, e) = r??;
        ok += o;
        failed += f;
        if first_err.is_none() {
            first_err = e;
        }
    }
    Ok((ok, failed, first_err))
}

pub async fn churn(a: ChurnArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = Target::parse(&a.url)?;
    let mut redis = match &a.redis_url {
        Some(u) => Some(redis_conn(u).await?),
        None => None,
    };
    // Warm-up, so that the baseline includes buffers and pools that are kept on purpose.
    churn_cycles(
        c,
        &a,
        &t,
        Duration::from_secs_f64((a.duration_secs / 10.0).clamp(0.5, 5.0)),
        0,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let keys_before = dbsize(&mut redis).await?;
    let rss_before = c.rss()?;
    let cpu0 = c.cpu()?;
    let start = Instant::now();
    let (cycles, failed, first_err) = churn_cycles(
        c,
        &a,
        &t,
        Duration::from_secs_f64(a.duration_secs),
        a.cycles,
    )
    .await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = c.cpu()? - cpu0;
    if let Some(e) = &first_err {
        eprintln!("churn: {failed} failed cycles; first: {e}");
    }
    let rss_peak = c.rss()?;
    let settle = Instant::now();
    let mut keys_after = dbsize(&mut redis).await?;
    while keys_after > keys_before && settle.elapsed().as_secs_f64() < a.settle_secs {
        tokio::time::sleep(Duration::from_millis(200)).await;
        keys_after = dbsize(&mut redis).await?;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_after = c.rss()?;
    let growth = rss_after as i64 - rss_before as i64;
    // "Back" means within 5 % of the baseline (the target), after a warm-up that lets
    // allocator pools and buffers kept on purpose into the baseline.
    let tolerance = (rss_before / 20) as i64;
    let keys_back = keys_after <= keys_before;
    let rss_back = growth <= tolerance;
    let result = json!({
        "tls": t.tls,
        "jwt": a.jwt_secret.is_some() || c.token.is_some(),
        "cycles": cycles,
        "failed": failed,
        "secs": secs,
        "cycles_per_sec": cycles as f64 / secs.max(1e-9),
        "server_cpu_secs": cpu,
        "server_cpu_us_per_cycle": cpu * 1e6 / cycles.max(1) as f64,
        "keys_before": keys_before,
        "keys_after": keys_after,
        "keys_back_to_baseline": keys_back,
        "rss_before_bytes": rss_before,
        "rss_peak_bytes": rss_peak,
        "rss_after_bytes": rss_after,
        "rss_growth_bytes": growth,
        "rss_tolerance_bytes": tolerance,
        "rss_growth_pct": growth as f64 * 100.0 / rss_before.max(1) as f64,
        "rss_back_to_baseline": rss_back,
    });
    let summary =
        format!(
        "{cycles} cycles ({failed} failed) in {secs:.1}s = {:.0}/s; Redis keys {keys_before} -> \
         {keys_after} ({}); server RSS {:.1} -> {:.1} MiB (peak {:.1}) ({} 5 %)",
        cycles as f64 / secs.max(1e-9),
        if keys_back { "back" } else { "NOT back" },
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        rss_peak as f64 / 1048576.0,
        if rss_back { "back within" } else { "NOT back within" },
    );
    emit(c, "churn", result, &summary)?;
    if cycles == 0 {
        bail!("no cycle completed");
    }
    Ok(())
}
