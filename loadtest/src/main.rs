//! `loadtest`: client tools for the gateway.
//!
//! - `listen URL CHANNEL...`: subscribe and print every frame (a manual test client).
//! - `idle URL -n N`: open N connections, wait for each welcome, hold them for `--hold-secs`.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use loadtest::client::{Client, Received};
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
    /// Open N connections and hold them idle.
    Idle {
        url: String,
        #[arg(short, default_value_t = 100)]
        n: usize,
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Listen { url, channels } => listen(&url, &channels).await,
        Cmd::Idle { url, n, hold_secs } => idle(&url, n, hold_secs).await,
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

async fn idle(url: &str, n: usize, hold_secs: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = Client::connect(url)
            .await
            .with_context(|| format!("connection {i}"))?;
        c.recv_json(Duration::from_secs(10))
            .await
            .context("welcome")?;
        conns.push(c);
    }
    let took = start.elapsed();
    println!(
        "{}",
        json!({"scenario": "idle", "connections": n, "connect_secs": took.as_secs_f64()})
    );
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    Ok(())
}
