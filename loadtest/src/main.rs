//! `loadtest`: client tools and load scenarios for the gateway.
//!
//! - `listen URL CHANNEL...`: subscribe and print every frame (a manual test client).
//! - `idle`, `fanout`, `unicast`, `connect-storm`, `churn`: load scenarios (see
//!   `loadtest::scenarios`); each prints a summary and writes JSON with `--json FILE`.
//! - `token`: mint an HS256 or RS256 token for benchmarks.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loadtest::client::{Client, Received};
use loadtest::scenarios::{
    self, ChurnArgs, FanoutArgs, HistoryMemoryArgs, IdleArgs, PresenceArgs, RecoveryStormArgs,
    RttArgs, StormArgs, StreamsArgs, UnicastArgs,
};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Client tools and load scenarios for the gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Subscribe to channels and print every frame received.
    Listen { url: String, channels: Vec<String> },
    /// Open N connections, hold them, and report the server's RSS per connection.
    Idle(IdleArgs),
    /// (internal) One client process of `idle --procs`.
    #[command(hide = true)]
    IdleWorker(IdleArgs),
    /// Subscribers on one channel over one or more nodes, a publisher on Redis.
    Fanout(FanoutArgs),
    /// Messages to users through FCALL gw_send_user.
    Unicast(UnicastArgs),
    /// Handshakes per second and server CPU per handshake.
    ConnectStorm(StormArgs),
    /// Connect/subscribe/disconnect cycles; RSS and Redis keys must come back to baseline.
    Churn(ChurnArgs),
    /// What a history publication holds in Redis.
    HistoryMemory(HistoryMemoryArgs),
    /// Clients of a history channel come back at once and recover what they missed.
    RecoveryStorm(RecoveryStormArgs),
    /// Members of a presence channel: presence_stats cost, and join/leave fan-out.
    Presence(PresenceArgs),
    /// Subscribers over Centrifugo's HTTP-streaming or SSE emulation, a publisher on Redis.
    Streams(StreamsArgs),
    /// Posts to /emulation on the stream's node or another: the time to each reply.
    EmulationRtt(RttArgs),
    /// Print a token for `sub`.
    Token {
        #[arg(long)]
        hs256_secret: Option<String>,
        #[arg(long)]
        rs256_key: Option<PathBuf>,
        #[arg(long, default_value = "bench-user")]
        sub: String,
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Listen { url, channels } => listen(&url, &channels).await,
        Cmd::Idle(a) => scenarios::idle(a).await,
        Cmd::IdleWorker(a) => scenarios::idle_worker(a).await,
        Cmd::Fanout(a) => scenarios::fanout(a).await,
        Cmd::HistoryMemory(a) => scenarios::history_memory(a).await,
        Cmd::Unicast(a) => scenarios::unicast(a).await,
        Cmd::ConnectStorm(a) => scenarios::connect_storm(a).await,
        Cmd::Churn(a) => scenarios::churn(a).await,
        Cmd::RecoveryStorm(a) => scenarios::recovery_storm(a).await,
        Cmd::Presence(a) => scenarios::presence(a).await,
        Cmd::Streams(a) => scenarios::streams(a).await,
        Cmd::EmulationRtt(a) => scenarios::emulation_rtt(a).await,
        Cmd::Token {
            hs256_secret,
            rs256_key,
            sub,
            ttl_secs,
        } => {
            let t = scenarios::mint(
                hs256_secret.as_deref(),
                rs256_key.as_deref(),
                &sub,
                ttl_secs,
            )?;
            println!("{t}");
            Ok(())
        }
    }
}

async fn listen(url: &str, channels: &[String]) -> anyhow::Result<()> {
    let mut c = Client::connect(url).await?;
    for (i, ch) in channels.iter().enumerate() {
        c.send_json(&json!({"type": "subscribe", "channel": ch, "id": i}))
            .await?;
    }
    loop {
        match c.recv(Duration::from_secs(3600)).await? {
            Received::Text(t) => println!("{t}"),
            Received::Close(code, reason) => {
                println!("closed {code} {reason}");
                return Ok(());
            }
            Received::Binary(b) => println!("<{} binary bytes>", b.len()),
        }
    }
}
