//! `connect-storm`: handshakes per second and server CPU per handshake.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::task::JoinSet;

use super::{connect_one, emit, Common};
use crate::net::Target;
use crate::stats;

#[derive(clap::Args, Debug)]
pub struct StormArgs {
    pub(crate) url: String,
    /// Handshakes in total.
    #[arg(short, default_value_t = 1000)]
    pub(crate) n: usize,
    #[command(flatten)]
    pub(crate) common: Common,
}

pub async fn connect_storm(a: StormArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = Target::parse(&a.url)?;
    let connector = c.connector()?;
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu0 = c.cpu()?;
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..c.concurrency.max(1).min(a.n.max(1)) {
        let proto = c.proto;
        let (t, connector, next, failed, token, n) = (
            t.clone(),
            connector.clone(),
            next.clone(),
            failed.clone(),
            c.token.clone(),
            a.n,
        );
        set.spawn(async move {
            let mut hist = stats::new_histogram()?;
            let mut first_err = None;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t0 = Instant::now();
                match connect_one(&connector, &t, token.clone(), proto).await {
                    Ok(mut cl) => {
                        let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
                        let _ = cl.close(1000, "").await;
                        let _ = cl.recv_close(Duration::from_secs(2)).await;
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_err.get_or_insert(format!("{e:#}"));
                    }
                }
            }
            Ok::<_, anyhow::Error>((hist, first_err))
        });
    }
    let mut hist = stats::new_histogram()?;
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        let (h, e) = r??;
        hist.add(&h)?;
        if first_err.is_none() {
            first_err = e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = c.cpu()? - cpu0;
    let ok = hist.len();
    let failed = failed.load(Ordering::Relaxed);
    if let Some(e) = &first_err {
        eprintln!("connect-storm: {failed} failed; first: {e}");
    }
    let per_sec = ok as f64 / secs.max(1e-9);
    let cpu_per = if ok > 0 { cpu / ok as f64 * 1e6 } else { 0.0 };
    let lat = stats::summarize(&hist);
    let result = json!({
        "tls": t.tls,
        "jwt": c.token.is_some(),
        "handshakes": ok,
        "failed": failed,
        "secs": secs,
        "handshakes_per_sec": per_sec,
        "server_cpu_secs": cpu,
        "cpu_per_handshake_us": cpu_per,
        "latency": lat,
    });
    let summary = format!(
        "{ok} handshakes ({failed} failed) in {secs:.2}s = {per_sec:.0}/s; server CPU \
         {cpu_per:.0} µs/handshake; handshake p50 {:.2} ms p99 {:.2} ms",
        lat["p50_ms"].as_f64().unwrap_or(0.0),
        lat["p99_ms"].as_f64().unwrap_or(0.0)
    );
    emit(c, "connect-storm", result, &summary)?;
    if ok == 0 {
        bail!("no handshake succeeded");
    }
    Ok(())
}
