//! `idle`: open connections, hold them, and report the server's RSS per connection; with
//! `--procs`, spread them over worker processes (`idle-worker`).

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;

use super::{
    emit, fixed_token, key_memory, open_many, redis_conn, redis_memory, subscribe, targets, Common,
};
use crate::client::{Client, Received};
use crate::net::Connector;

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    pub(crate) url: String,
    /// Connections in total (over all worker processes).
    #[arg(short, default_value_t = 100)]
    pub(crate) n: usize,
    /// Client processes to spread the connections over (one holds at most ~19,900 sockets).
    #[arg(long, default_value_t = 1)]
    pub(crate) procs: usize,
    /// Time to wait after the last connection before reading the RSS.
    #[arg(long, default_value_t = 1000)]
    pub(crate) settle_ms: u64,
    /// Time to keep the connections open after the measurement.
    #[arg(long, default_value_t = 0)]
    pub(crate) hold_secs: u64,
    /// Each connection subscribes to this channel (and waits for the ack) before the
    /// measurement: the cost of a subscription, with whatever the channel has (history,
    /// presence).
    #[arg(long)]
    pub(crate) subscribe: Option<String>,
    /// Also report what the connections hold in this Redis (`used_memory`, keys): the
    /// directory records, and the presence entries of `--subscribe`.
    #[arg(long)]
    pub(crate) redis_url: Option<String>,
    /// The gateway's Redis key prefix: its inbound stream (`<prefix>inbound`, which gets an
    /// event per connect) is reported apart from the directory records.
    #[arg(long, default_value = "gw:")]
    pub(crate) redis_prefix: String,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// A worker process of `idle --procs`: opens its share, prints `ready OPENED FAILED`, and
/// holds the connections until its standard input closes.
pub async fn idle_worker(a: IdleArgs) -> anyhow::Result<()> {
    let t = targets(std::slice::from_ref(&a.url))?;
    let (clients, failed, err) = open_many(
        a.common.connector()?,
        t,
        a.n,
        a.common.concurrency,
        fixed_token(a.common.token.clone()),
        a.common.proto,
    )
    .await?;
    if let Some(e) = err {
        eprintln!("idle worker: {failed} failed; first: {e}");
    }
    let clients = subscribe_all(clients, a.subscribe.as_deref(), &a.common).await?;
    let opened = clients.len();
    let holders: Vec<_> = clients
        .into_iter()
        .map(|(_, c)| tokio::spawn(hold(c)))
        .collect();
    println!("ready {opened} {failed}");
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await?;
    drop(holders);
    Ok(())
}

pub async fn idle(a: IdleArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = targets(std::slice::from_ref(&a.url))?;
    let mut redis = match &a.redis_url {
        Some(url) => Some(redis_conn(url).await?),
        None => None,
    };
    let inbound = format!("{}inbound", a.redis_prefix);
    let redis_before = match redis.as_mut() {
        Some(r) => Some((redis_memory(r).await?, key_memory(r, &inbound).await?)),
        None => None,
    };
    let rss_before = c.rss()?;
    let start = Instant::now();
    let (opened, failed, mut children, mut holders) = if a.procs <= 1 {
        let (clients, failed, err) = open_many(
            c.connector()?,
            t.clone(),
            a.n,
            c.concurrency,
            fixed_token(c.token.clone()),
            c.proto,
        )
        .await?;
        if let Some(e) = err {
            eprintln!("idle: {failed} failed; first: {e}");
        }
        let clients = subscribe_all(clients, a.subscribe.as_deref(), c).await?;
        let opened = clients.len();
        let holders: Vec<_> = clients
            .into_iter()
            .map(|(_, c)| tokio::spawn(hold(c)))
            .collect();
        (opened, failed, Vec::new(), holders)
    } else {
        let sources = Connector::parse_sources(&c.sources)?;
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for j in 0..a.procs {
            let share = a.n / a.procs + usize::from(j < a.n % a.procs);
            // Each worker gets its own slice of the source addresses when there are enough.
            let mine: Vec<String> = if sources.len() >= a.procs {
                sources
                    .iter()
                    .skip(j)
                    .step_by(a.procs)
                    .map(|s| s.to_string())
                    .collect()
            } else {
                sources.iter().map(|s| s.to_string()).collect()
            };
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("idle-worker")
                .arg(&a.url)
                .arg("-n")
                .arg(share.to_string())
                .arg("--sources")
                .arg(mine.join(","))
                .arg("--concurrency")
                .arg(c.concurrency.to_string())
                .arg("--proto")
                .arg(c.proto.to_string())
                .args(
                    a.subscribe
                        .iter()
                        .flat_map(|ch| ["--subscribe", ch.as_str()]),
                )
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped());
            if let Some(tok) = &c.token {
                cmd.arg("--token").arg(tok);
            }
            children.push(cmd.spawn().context("spawning an idle worker")?);
        }
        let (mut opened, mut failed) = (0, 0);
        for ch in &mut children {
            let out = ch
                .stdout
                .take()
                .ok_or_else(|| anyhow!("no worker stdout"))?;
            let line = tokio::task::spawn_blocking(move || {
                let mut l = String::new();
                std::io::BufReader::new(out).read_line(&mut l).map(|_| l)
            })
            .await??;
            let f: Vec<usize> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            if f.len() != 2 {
                bail!("idle worker said {line:?}");
            }
            opened += f[0];
            failed += f[1];
        }
        (opened, failed, children, Vec::new())
    };
    let connect_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
    let rss_after = c.rss()?;
    let redis_after = match redis.as_mut() {
        Some(r) => Some((redis_memory(r).await?, key_memory(r, &inbound).await?)),
        None => None,
    };
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let closed_early: usize = holders.iter().filter(|h| h.is_finished()).count();
    for h in holders.drain(..) {
        h.abort();
    }
    for ch in &mut children {
        drop(ch.stdin.take());
        let _ = ch.wait();
    }
    let per_conn = if opened > 0 {
        (rss_after as f64 - rss_before as f64) / opened as f64
    } else {
        0.0
    };
    let mut result = json!({
        "tls": t[0].tls,
        "subscribe": a.subscribe,
        "connections": opened,
        "failed": failed,
        "closed_early": closed_early,
        "procs": a.procs.max(1),
        "sources": c.sources,
        "connect_secs": connect_secs,
        "handshakes_per_sec": opened as f64 / connect_secs.max(1e-9),
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_per_conn_bytes": per_conn,
    });
    let summary = format!(
        "{opened} connections ({failed} failed) in {connect_secs:.2}s over {} process(es); \
         server RSS {:.1} -> {:.1} MiB = {:.0} B/connection",
        a.procs.max(1),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        per_conn
    );
    let mut summary = summary;
    if let (Some(((m0, k0), i0)), Some(((m1, k1), i1))) = (redis_before, redis_after) {
        let n = opened.max(1) as f64;
        let per = (m1 as f64 - m0 as f64) / n;
        let inbound_per = (i1 as f64 - i0 as f64) / n;
        result["redis_used_memory_before"] = json!(m0);
        result["redis_used_memory_after"] = json!(m1);
        result["redis_keys_before"] = json!(k0);
        result["redis_keys_after"] = json!(k1);
        result["redis_bytes_per_conn"] = json!(per);
        result["redis_inbound_bytes_per_conn"] = json!(inbound_per);
        result["redis_records_bytes_per_conn"] = json!(per - inbound_per);
        summary += &format!(
            "; Redis {per:.0} B/connection ({:.0} B records, {inbound_per:.0} B inbound \
             stream), keys {k0} -> {k1}",
            per - inbound_per
        );
    }
    emit(c, "idle", result, &summary)?;
    if opened == 0 {
        bail!("no connection opened");
    }
    Ok(())
}

/// Subscribes every client to `channel` (when given), `common.concurrency` at a time;
/// a client whose subscribe fails is dropped and counted as failed by the caller.
async fn subscribe_all(
    clients: Vec<(usize, Client)>,
    channel: Option<&str>,
    common: &Common,
) -> anyhow::Result<Vec<(usize, Client)>> {
    let Some(channel) = channel else {
        return Ok(clients);
    };
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(common.concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let proto = common.proto;
    for (i, mut cl) in clients {
        let permit = sem.clone().acquire_owned().await?;
        let channel = channel.to_owned();
        set.spawn(async move {
            let _permit = permit;
            subscribe(&mut cl, &channel, proto).await.map(|()| (i, cl))
        });
    }
    let (mut out, mut first_err) = (Vec::new(), None);
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(c) => out.push(c),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        bail!("subscribing to {channel}: {e:#}");
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out)
}

/// Keeps a connection alive (answering pings) until the peer closes it; returns 1 then.
async fn hold(mut c: Client) -> u64 {
    loop {
        match c.recv(Duration::from_secs(86_400)).await {
            Ok(Received::Close(..)) | Err(_) => return 1,
            Ok(Received::Text(t)) if t == "2" => {
                let _ = c.send_text("3").await;
            }
            Ok(_) => {}
        }
    }
}
