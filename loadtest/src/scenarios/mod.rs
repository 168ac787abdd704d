//! Load scenarios. Each prints a human summary and, with `--json FILE`, writes its figures as
//! one JSON object (`scripts/bench.sh` collects them into docs/benchmarks.md).
//!
//! Server-side costs come from /proc of the processes named with `--pid` (the gateway nodes,
//! or the floor): RSS from `VmRSS`, CPU from `utime + stime`.
//!
//! One module per scenario (`idle`, `fanout`, `unicast`, `connect_storm`, `churn`, `streams`...); this one
//! holds the options they share and the connection helpers, and `delivery` the
//! publish-to-receipt measurement of `fanout` and `unicast`.

mod churn;
mod connect_storm;
mod delivery;
mod fanout;
mod history_memory;
mod idle;
mod presence;
mod recovery_storm;
mod streams;
mod unicast;

pub use churn::{churn, ChurnArgs};
pub use connect_storm::{connect_storm, StormArgs};
pub use fanout::{fanout, FanoutArgs};
pub use history_memory::{history_memory, HistoryMemoryArgs};
pub use idle::{idle, idle_worker, IdleArgs};
pub use presence::{presence, PresenceArgs};
pub use recovery_storm::{recovery_storm, RecoveryStormArgs};
pub use streams::{emulation_rtt, streams, RttArgs, StreamsArgs};
pub use unicast::{unicast, UnicastArgs};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::ValueEnum;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Client, Received};
use crate::net::{Connector, Target};
use crate::stats::{self, now_us};

/// Options every scenario takes.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct Common {
    /// Pid of a server process whose RSS and CPU are measured (repeatable: several nodes).
    #[arg(long = "pid")]
    pub(crate) pids: Vec<u32>,
    /// Write the machine-readable result to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Source addresses to spread connections over, comma-separated (127.0.0.2,127.0.0.3).
    #[arg(long, default_value = "")]
    pub(crate) sources: String,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub(crate) concurrency: usize,
    /// Label copied into the JSON (gateway, floor, tls, ...).
    #[arg(long, default_value = "")]
    pub(crate) label: String,
    /// Bearer token sent with every handshake.
    #[arg(long)]
    pub(crate) token: Option<String>,
    /// Wire protocol: `gateway` (JSON frames), `eio` (Engine.IO 4 websocket transport with
    /// Socket.IO packets, to drive the Socket.IO peer: events `subscribe`, `ack`, `message`),
    /// `stomp` (STOMP 1.2: point `--url` at the gateway's `/stomp`, which speaks STOMP
    /// without a subprotocol header; the token goes in the handshake as usual) or
    /// `centrifugo` (Centrifugo's client protocol v2, JSON, as the stock SDKs speak it: point
    /// `--url` at `/connection/websocket`; the token goes in the `connect` command).
    #[arg(long, value_enum, default_value_t = Proto::Gateway)]
    pub(crate) proto: Proto,
}

/// The wire protocol of `--proto` (described there: doc comments on the variants would turn
/// them into possible-value help, which switches `--help` to its long layout).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    Gateway,
    Eio,
    Stomp,
    Centrifugo,
}

impl Proto {
    /// What the text of a channel message contains, for `delivery::receive`.
    pub(crate) fn message_marker(self) -> &'static str {
        match self {
            Proto::Gateway | Proto::Eio => "\"message\"",
            Proto::Stomp => "MESSAGE\n",
            Proto::Centrifugo => "\"pub\"",
        }
    }

    /// The answer to a server ping of the protocol's own, if `text` is one: Engine.IO's
    /// `2` gets `3`, Centrifugo's `{}` gets `{}` (its SDKs answer every ping, and the
    /// server closes a connection that does not with 3012).
    pub(crate) fn pong(self, text: &str) -> Option<&'static str> {
        match (self, text) {
            (Proto::Eio, "2") => Some("3"),
            (Proto::Centrifugo, "{}") => Some("{}"),
            _ => None,
        }
    }
}

/// The `--proto` spelling, so that `idle --procs` can pass it on to its workers.
impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_possible_value()
            .expect("no value is skipped")
            .get_name()
            .fmt(f)
    }
}

impl Common {
    fn connector(&self) -> anyhow::Result<Arc<Connector>> {
        Ok(Arc::new(Connector::new(Connector::parse_sources(
            &self.sources,
        )?)?))
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
    proto: Proto,
) -> anyhow::Result<Client> {
    // A Centrifugo client sends its token in `connect`, as the SDKs do, not in the handshake.
    let in_handshake = token.as_ref().filter(|_| proto != Proto::Centrifugo);
    let auth = in_handshake.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let mut c = connector.connect(target, &headers).await?;
    match proto {
        Proto::Gateway => {
            let w = c
                .recv_json(Duration::from_secs(30))
                .await
                .context("welcome")?;
            if w["type"] != "welcome" {
                bail!("expected a welcome frame, got {w}");
            }
        }
        Proto::Eio => {
            // Engine.IO open packet "0{...}", then the Socket.IO connect "40" and its answer.
            eio_expect(&mut c, "0").await?;
            c.send_text("40").await?;
            eio_expect(&mut c, "40").await?;
        }
        Proto::Stomp => {
            c.send_text("CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\0")
                .await?;
            stomp_expect(&mut c, "CONNECTED\n").await?;
        }
        Proto::Centrifugo => {
            let token = token.unwrap_or_default();
            c.send_json(&json!({"id": 1, "connect": {"token": token, "name": "loadtest"}}))
                .await?;
            centrifugo_reply(&mut c, 1).await?;
        }
    }
    Ok(c)
}

/// Reads Centrifugo frames (answering pings) until the reply to command `id`; an error
/// reply fails. A frame may hold several replies and pushes, one per line.
async fn centrifugo_reply(c: &mut Client, id: u64) -> anyhow::Result<Value> {
    loop {
        match c.recv(Duration::from_secs(30)).await? {
            Received::Text(t) => {
                for line in t.lines() {
                    if let Some(pong) = Proto::Centrifugo.pong(line) {
                        c.send_text(pong).await?;
                        continue;
                    }
                    let v: Value =
                        serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
                    if v["id"] != id {
                        continue;
                    }
                    if !v["error"].is_null() {
                        bail!("Centrifugo error reply: {v}");
                    }
                    return Ok(v);
                }
            }
            Received::Binary(_) => {}
            Received::Close(code, r) => bail!("closed {code} {r}"),
        }
    }
}

/// Reads STOMP frames until one starts with `command` (an ERROR fails).
async fn stomp_expect(c: &mut Client, command: &str) -> anyhow::Result<String> {
    loop {
        match c.recv(Duration::from_secs(30)).await? {
            Received::Text(t) if t.starts_with(command) => return Ok(t),
            Received::Text(t) if t.starts_with("ERROR\n") => bail!("STOMP error: {t}"),
            Received::Text(_) | Received::Binary(_) => {}
            Received::Close(code, r) => bail!("closed {code} {r}"),
        }
    }
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

/// Subscribes and waits for the ack, in any protocol.
async fn subscribe(c: &mut Client, channel: &str, proto: Proto) -> anyhow::Result<()> {
    match proto {
        Proto::Gateway => {
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
        Proto::Eio => {
            c.send_text(&format!(r#"42["subscribe",{}]"#, json!(channel)))
                .await?;
            eio_expect(c, r#"42["ack""#).await?;
            Ok(())
        }
        Proto::Stomp => {
            c.send_text(&format!(
                "SUBSCRIBE\nid:0\ndestination:/topic/{channel}\nreceipt:sub\n\n\0"
            ))
            .await?;
            stomp_expect(c, "RECEIPT\n").await?;
            Ok(())
        }
        Proto::Centrifugo => {
            c.send_json(&json!({"id": 2, "subscribe": {"channel": channel}}))
                .await?;
            centrifugo_reply(c, 2).await?;
            Ok(())
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
    proto: Proto,
) -> anyhow::Result<(Vec<(usize, Client)>, usize, Option<String>)> {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (connector, targets, token) = (connector.clone(), targets.clone(), token.clone());
        set.spawn(async move {
            let _permit = permit;
            let t = &targets[i % targets.len()];
            connect_one(&connector, t, token(i), proto)
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

async fn redis_conn(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// `used_memory` from `INFO memory`, and the number of keys (`DBSIZE`): what a scenario
/// holds in Redis.
async fn redis_memory(r: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<(u64, u64)> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(r).await?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO memory has no used_memory")?;
    let keys: u64 = redis::cmd("DBSIZE").query_async(r).await?;
    Ok((used, keys))
}

/// `MEMORY USAGE key` (0 for a missing key).
async fn key_memory(r: &mut redis::aio::MultiplexedConnection, key: &str) -> anyhow::Result<u64> {
    let used: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(r)
        .await?;
    Ok(used.unwrap_or(0))
}

/// `total_commands_processed` from `INFO stats`: what a scenario cost Redis.
async fn redis_commands(r: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(r).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO stats has no total_commands_processed")
}
