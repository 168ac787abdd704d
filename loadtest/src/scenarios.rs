//! Load scenarios. Each prints a human summary and, with `--json FILE`, writes its figures as
//! one JSON object (`scripts/bench.sh` collects them into docs/benchmarks.md).
//!
//! Server-side costs come from /proc of the processes named with `--pid` (the gateway nodes,
//! or the floor): RSS from `VmRSS`, CPU from `utime + stime`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Client, Received};
use crate::net::{Connector, Target};
use crate::stats::{self, now_us};

/// Options every scenario takes.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// Pid of a server process whose RSS and CPU are measured (repeatable: several nodes).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Write the machine-readable result to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Source addresses to spread connections over, comma-separated (127.0.0.2,127.0.0.3).
    #[arg(long, default_value = "")]
    pub sources: String,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Label copied into the JSON (gateway, floor, tls, ...).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Bearer token sent with every handshake.
    #[arg(long)]
    pub token: Option<String>,
    /// Wire protocol: `gateway` (JSON frames) or `eio` (Engine.IO 4 websocket transport with
    /// Socket.IO packets, to drive the Socket.IO peer: events `subscribe`, `ack`, `message`).
    #[arg(long, default_value = "gateway")]
    pub proto: String,
}

impl Common {
    fn connector(&self) -> anyhow::Result<Arc<Connector>> {
        Ok(Arc::new(Connector::new(Connector::parse_sources(
            &self.sources,
        )?)?))
    }

    fn eio(&self) -> bool {
        self.proto == "eio"
    }

    fn rss(&self) -> anyhow::Result<u64> {
        stats::rss_total(&self.pids)
    }

    fn cpu(&self) -> anyhow::Result<f64> {
        stats::cpu_total(&self.pids)
    }
}

/// Prints `summary`, then writes `result` (with scenario and label) to `--json`.
fn emit(common: &Common, scenario: &str, mut result: Value, summary: &str) -> anyhow::Result<()> {
    result["scenario"] = json!(scenario);
    result["label"] = json!(common.label);
    result["pids"] = json!(common.pids);
    println!("{scenario} [{}]: {summary}", common.label);
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Mints a token: HS256 with `secret`, or RS256 with a PEM private key file.
pub fn mint(
    hs256_secret: Option<&str>,
    rs256_key: Option<&std::path::Path>,
    sub: &str,
    ttl_secs: u64,
) -> anyhow::Result<String> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let claims = shared::claims::Claims {
        sub: sub.into(),
        exp: now_us() / 1_000_000 + ttl_secs,
        ..Default::default()
    };
    match (hs256_secret, rs256_key) {
        (Some(s), None) => Ok(encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(s.as_bytes()),
        )?),
        (None, Some(p)) => {
            let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(encode(
                &Header::new(Algorithm::RS256),
                &claims,
                &EncodingKey::from_rsa_pem(&pem)?,
            )?)
        }
        _ => bail!("give exactly one of --hs256-secret and --rs256-key"),
    }
}

type TokenFn = Arc<dyn Fn(usize) -> Option<String> + Send + Sync>;

fn fixed_token(t: Option<String>) -> TokenFn {
    Arc::new(move |_| t.clone())
}

/// Connects and waits for the welcome frame.
async fn connect_one(
    connector: &Connector,
    target: &Target,
    token: Option<String>,
    eio: bool,
) -> anyhow::Result<Client> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let mut c = connector.connect(target, &headers).await?;
    if eio {
        // Engine.IO open packet "0{...}", then the Socket.IO connect "40" and its answer.
        eio_expect(&mut c, "0").await?;
        c.send_text("40").await?;
        eio_expect(&mut c, "40").await?;
        return Ok(c);
    }
    let w = c
        .recv_json(Duration::from_secs(30))
        .await
        .context("welcome")?;
    if w["type"] != "welcome" {
        bail!("expected a welcome frame, got {w}");
    }
    Ok(c)
}

/// Reads Engine.IO packets (answering pings) until one starts with `prefix`.
async fn eio_expect(c: &mut Client, prefix: &str) -> anyhow::Result<String> {
    loop {
        match c.recv(Duration::from_secs(30)).await? {
            Received::Text(t) if t == "2" => c.send_text("3").await?,
            Received::Text(t) if t.starts_with(prefix) => return Ok(t),
            Received::Text(_) | Received::Binary(_) => {}
            Received::Close(code, r) => bail!("closed {code} {r}"),
        }
    }
}

/// Subscribes and waits for the ack, in either protocol.
async fn subscribe(c: &mut Client, channel: &str, eio: bool) -> anyhow::Result<()> {
    if eio {
        c.send_text(&format!(r#"42["subscribe",{}]"#, json!(channel)))
            .await?;
        eio_expect(c, r#"42["ack""#).await?;
        return Ok(());
    }
    c.send_json(&json!({"type": "subscribe", "channel": channel, "id": 1}))
        .await?;
    loop {
        let v = c.recv_json(Duration::from_secs(30)).await?;
        match v["type"].as_str() {
            Some("ack") => return Ok(()),
            Some("error") => bail!("subscribe refused: {v}"),
            _ => {}
        }
    }
}

/// Opens `n` connections (connection `i` to `targets[i % len]`), `concurrency` at a time.
/// Returns the clients by index, the number of failures and the first error.
async fn open_many(
    connector: Arc<Connector>,
    targets: Arc<Vec<Target>>,
    n: usize,
    concurrency: usize,
    token: TokenFn,
    eio: bool,
) -> anyhow::Result<(Vec<(usize, Client)>, usize, Option<String>)> {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (connector, targets, token) = (connector.clone(), targets.clone(), token.clone());
        set.spawn(async move {
            let _permit = permit;
            let t = &targets[i % targets.len()];
            connect_one(&connector, t, token(i), eio)
                .await
                .map(|c| (i, c))
                .map_err(|e| format!("connection {i}: {e:#}"))
        });
    }
    let mut clients = Vec::with_capacity(n);
    let (mut failed, mut first_err) = (0, None);
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(c) => clients.push(c),
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
        }
    }
    clients.sort_by_key(|(i, _)| *i);
    Ok((clients, failed, first_err))
}

fn targets(urls: &[String]) -> anyhow::Result<Arc<Vec<Target>>> {
    if urls.is_empty() {
        bail!("give at least one --url");
    }
    Ok(Arc::new(
        urls.iter()
            .map(|u| Target::parse(u))
            .collect::<anyhow::Result<_>>()?,
    ))
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

// ---------------------------------------------------------------------------------------- idle

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    pub url: String,
    /// Connections in total (over all worker processes).
    #[arg(short, default_value_t = 100)]
    pub n: usize,
    /// Client processes to spread the connections over (one holds at most ~19,900 sockets).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Time to wait after the last connection before reading the RSS.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Time to keep the connections open after the measurement.
    #[arg(long, default_value_t = 0)]
    pub hold_secs: u64,
    #[command(flatten)]
    pub common: Common,
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
        a.common.eio(),
    )
    .await?;
    if let Some(e) = err {
        eprintln!("idle worker: {failed} failed; first: {e}");
    }
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
    let rss_before = c.rss()?;
    let start = Instant::now();
    let (opened, failed, mut children, mut holders) = if a.procs <= 1 {
        let (clients, failed, err) = open_many(
            c.connector()?,
            t.clone(),
            a.n,
            c.concurrency,
            fixed_token(c.token.clone()),
            c.eio(),
        )
        .await?;
        if let Some(e) = err {
            eprintln!("idle: {failed} failed; first: {e}");
        }
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
                .arg(&c.proto)
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
    let result = json!({
        "tls": t[0].tls,
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
    emit(c, "idle", result, &summary)?;
    if opened == 0 {
        bail!("no connection opened");
    }
    Ok(())
}

// ------------------------------------------------------------------------ fanout and unicast

#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    /// Node URL (repeatable); subscribers are spread round-robin over them.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Subscribers.
    #[arg(short, default_value_t = 100)]
    pub s: usize,
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// Redis the publisher uses (PUBLISH gw:ch:<channel>).
    #[arg(long)]
    pub redis_url: String,
    /// Channel prefix of the servers' Redis pub/sub.
    #[arg(long, default_value = "gw:ch:")]
    pub prefix: String,
    /// Messages per second published.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    #[arg(long, default_value_t = 5.0)]
    pub duration_secs: f64,
    /// Padding added to each payload.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Messages published back to back in one Redis pipeline at each tick (the rate stays
    /// the average), so that several frames queue per socket: the burst case of vectored
    /// writes.
    #[arg(long, default_value_t = 1)]
    pub burst: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Debug)]
pub struct UnicastArgs {
    /// Node URL (repeatable); users are spread round-robin over them.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Users, one connection each (user ids bench-u0, bench-u1, ...).
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// HS256 secret of the gateway, to mint one token per user.
    #[arg(long)]
    pub jwt_secret: String,
    #[arg(long)]
    pub redis_url: String,
    /// Messages per second sent with FCALL gw_send_user (round-robin over the users).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    #[arg(long, default_value_t = 5.0)]
    pub duration_secs: f64,
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    #[command(flatten)]
    pub common: Common,
}

/// What one receiving connection saw.
struct Seen {
    /// Latencies in µs, merged into one histogram at the end: a full-range histogram per
    /// receiver is ~200 KiB, and recording into a thousand of them missed the cache often
    /// enough to cost the load generator a tenth of its CPU.
    latencies_us: Vec<u32>,
    ended: bool,
    /// The close code, when the server closed the connection before the end marker.
    closed: Option<u16>,
}

/// Receives `kind` messages until the `end` marker, a close, an error or `limit`, recording
/// each message's publish-to-receipt latency.
async fn receive(mut c: Client, kind: &'static str, limit: Duration) -> anyhow::Result<Seen> {
    let mut seen = Seen {
        latencies_us: Vec::new(),
        ended: false,
        closed: None,
    };
    let run = async {
        loop {
            match c.next().await {
                Ok(Received::Text(t)) => {
                    if t == "2" {
                        let _ = c.send_text("3").await;
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
                        let us = now_us().saturating_sub(ts).clamp(1, u32::MAX as u64);
                        seen.latencies_us.push(us as u32);
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

async fn redis_conn(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// Sends `rate × duration` payloads at `rate` per second on average, in groups of `burst`
/// (`send(k, payloads)`, `k` the index of the group's first payload), then returns the count.
async fn paced<F, Fut>(
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

struct Delivery {
    published: u64,
    expected: u64,
    seen: Vec<Seen>,
    secs: f64,
    cpu: f64,
}

fn delivery_result(d: &Delivery, receivers: usize) -> anyhow::Result<(Value, String)> {
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

pub async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = targets(&a.urls)?;
    let (clients, failed, err) = open_many(
        c.connector()?,
        t,
        a.s,
        c.concurrency,
        fixed_token(c.token.clone()),
        c.eio(),
    )
    .await?;
    if let Some(e) = err {
        bail!("{failed} subscribers failed to connect; first: {e}");
    }
    // Subscribe everyone and wait for every ack before publishing.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(a.s.max(1));
    let idle = Duration::from_secs_f64(a.duration_secs + 30.0);
    let mut set = JoinSet::new();
    for (_, mut cl) in clients {
        let (ch, ready) = (a.channel.clone(), ready_tx.clone());
        let eio = c.eio();
        set.spawn(async move {
            subscribe(&mut cl, &ch, eio).await?;
            let _ = ready.send(()).await;
            receive(cl, "\"message\"", idle).await
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

    let mut redis = redis_conn(&a.redis_url).await?;
    let key = format!("{}{}", a.prefix, a.channel);
    let cpu0 = c.cpu()?;
    let start = Instant::now();
    let published = paced(
        a.rate,
        a.duration_secs,
        a.payload_bytes,
        a.burst,
        |_, group| {
            let mut r = redis.clone();
            let mut pipe = redis::pipe();
            for p in group {
                pipe.cmd("PUBLISH").arg(&key).arg(p).ignore();
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
    result["rate"] = json!(a.rate);
    result["offered_deliveries_per_sec"] = json!(a.rate * a.s as u64);
    result["payload_bytes"] = json!(a.payload_bytes);
    result["burst"] = json!(a.burst);
    emit(c, "fanout", result, &summary)
}

pub async fn unicast(a: UnicastArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = targets(&a.urls)?;
    let secret = a.jwt_secret.clone();
    let token: TokenFn =
        Arc::new(move |i| mint(Some(&secret), None, &format!("bench-u{i}"), 3600).ok());
    let (clients, failed, err) =
        open_many(c.connector()?, t, a.users, c.concurrency, token, false).await?;
    if let Some(e) = err {
        bail!("{failed} users failed to connect; first: {e}");
    }
    let idle = Duration::from_secs_f64(a.duration_secs + 30.0);
    let mut set = JoinSet::new();
    for (_, cl) in clients {
        set.spawn(receive(cl, "\"direct\"", idle));
    }
    // Give the directory a moment to record the last connections.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut redis = redis_conn(&a.redis_url).await?;
    let users = a.users.max(1) as u64;
    let cpu0 = c.cpu()?;
    let start = Instant::now();
    let published = paced(
        a.rate,
        a.duration_secs,
        a.payload_bytes,
        1,
        |k, mut group| {
            let mut r = redis.clone();
            let p = group.pop().unwrap_or_default();
            async move {
                redis::cmd("FCALL")
                    .arg("gw_send_user")
                    .arg(1)
                    .arg(format!("bench-u{}", k % users))
                    .arg(p)
                    .query_async::<i64>(&mut r)
                    .await?;
                Ok(())
            }
        },
    )
    .await?;
    for u in 0..users {
        redis::cmd("FCALL")
            .arg("gw_send_user")
            .arg(1)
            .arg(format!("bench-u{u}"))
            .arg(r#"{"end":true}"#)
            .query_async::<i64>(&mut redis)
            .await?;
    }
    let mut seen = Vec::new();
    while let Some(r) = set.join_next().await {
        seen.push(r??);
    }
    let d = Delivery {
        published,
        expected: published,
        seen,
        secs: start.elapsed().as_secs_f64(),
        cpu: c.cpu()? - cpu0,
    };
    let (mut result, summary) = delivery_result(&d, a.users)?;
    result["nodes"] = json!(a.urls.len());
    result["rate"] = json!(a.rate);
    emit(c, "unicast", result, &summary)
}

// ------------------------------------------------------------------------------ connect-storm

#[derive(clap::Args, Debug)]
pub struct StormArgs {
    pub url: String,
    /// Handshakes in total.
    #[arg(short, default_value_t = 1000)]
    pub n: usize,
    #[command(flatten)]
    pub common: Common,
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
        let eio = c.eio();
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
                match connect_one(&connector, &t, token.clone(), eio).await {
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

// -------------------------------------------------------------------------------------- churn

#[derive(clap::Args, Debug)]
pub struct ChurnArgs {
    pub url: String,
    /// How long to keep connecting and disconnecting (at most, with `--cycles`).
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Stop after this many cycles (0: run for the whole duration).
    #[arg(long, default_value_t = 0)]
    pub cycles: usize,
    /// Redis whose key count (DBSIZE) must come back to its baseline.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// HS256 secret: each cycle then authenticates as one of `--users` users, so the
    /// directory records (and must forget) user routes.
    #[arg(long)]
    pub jwt_secret: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Each cycle subscribes to one of this many channels before disconnecting.
    #[arg(long, default_value_t = 50)]
    pub channels: usize,
    /// Longest wait for the key count to come back after the last cycle.
    #[arg(long, default_value_t = 15.0)]
    pub settle_secs: f64,
    #[command(flatten)]
    pub common: Common,
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
        let (t, connector, k, eio) = (t.clone(), connector.clone(), k.clone(), c.eio());
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
                    let mut cl = connect_one(&connector, &t, tok, eio).await?;
                    subscribe(&mut cl, &format!("churn:{}", i % channels), eio).await?;
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
