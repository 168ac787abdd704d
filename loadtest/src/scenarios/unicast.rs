//! `unicast`: one connection per user, messages to users through FCALL gw_send_user.
//!
//! The publisher is pipelined: every tick (1 ms at most) it sends the messages due as one
//! pipeline on a multiplexed Redis connection, without waiting for the replies of the
//! previous ones (up to `--in-flight` pipelines at once), so the offered rate is `--rate`
//! rather than one FCALL per Redis round trip.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use super::delivery::{delivery_result, paced, receive, Delivery};
use super::{emit, mint, open_many, redis_conn, targets, Common, Proto, TokenFn};
use crate::stats;

#[derive(clap::Args, Debug)]
pub struct UnicastArgs {
    /// Node URL (repeatable); users are spread round-robin over them.
    #[arg(long = "url", required = true)]
    pub(crate) urls: Vec<String>,
    /// Users, one connection each (user ids bench-u0, bench-u1, ...).
    #[arg(long, default_value_t = 100)]
    pub(crate) users: usize,
    /// HS256 secret of the gateway, to mint one token per user.
    #[arg(long)]
    pub(crate) jwt_secret: String,
    #[arg(long)]
    pub(crate) redis_url: String,
    /// Messages per second sent with FCALL gw_send_user (round-robin over the users).
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u64,
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration_secs: f64,
    #[arg(long, default_value_t = 64)]
    pub(crate) payload_bytes: usize,
    /// FCALLs per pipeline; 0: what one millisecond of `--rate` holds (at least 1).
    #[arg(long, default_value_t = 0)]
    pub(crate) batch: u64,
    /// Pipelines awaiting their replies at once; the publisher waits beyond that.
    #[arg(long, default_value_t = 64)]
    pub(crate) in_flight: usize,
    /// Pid of the redis-server, whose CPU per delivery is reported too (from /proc).
    #[arg(long)]
    pub(crate) redis_pid: Option<u32>,
    #[command(flatten)]
    pub(crate) common: Common,
}

pub async fn unicast(a: UnicastArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let t = targets(&a.urls)?;
    let secret = a.jwt_secret.clone();
    let token: TokenFn =
        Arc::new(move |i| mint(Some(&secret), None, &format!("bench-u{i}"), 3600).ok());
    // FCALL gw_send_user is the gateway's own Redis function: unicast always speaks the
    // gateway protocol, whatever `--proto` says.
    let (clients, failed, err) = open_many(
        c.connector()?,
        t,
        a.users,
        c.concurrency,
        token,
        Proto::Gateway,
    )
    .await?;
    if let Some(e) = err {
        bail!("{failed} users failed to connect; first: {e}");
    }
    let idle = Duration::from_secs_f64(a.duration_secs + 30.0);
    let mut set = JoinSet::new();
    for (_, cl) in clients {
        set.spawn(receive(cl, Proto::Gateway, "\"direct\"", idle));
    }
    // Give the directory a moment to record the last connections.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis = redis_conn(&a.redis_url).await?;
    let users = a.users.max(1) as u64;
    let batch = if a.batch > 0 {
        a.batch
    } else {
        (a.rate / 1000).max(1)
    };
    let in_flight = a.in_flight.max(1);
    let slots = Arc::new(Semaphore::new(in_flight));
    type Sent = JoinHandle<redis::RedisResult<Vec<i64>>>;
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let redis_cpu = |pid: Option<u32>| pid.map(stats::cpu_secs).transpose();
    let (cpu0, rcpu0) = (c.cpu()?, redis_cpu(a.redis_pid)?);
    let (start, start_us) = (Instant::now(), stats::now_us());
    let published = paced(
        a.rate,
        a.duration_secs,
        a.payload_bytes,
        batch,
        |k, group| {
            let mut pipe = redis::pipe();
            for (j, p) in group.into_iter().enumerate() {
                pipe.cmd("FCALL")
                    .arg("gw_send_user")
                    .arg(1)
                    .arg(format!("bench-u{}", (k + j as u64) % users))
                    .arg(p);
            }
            let (mut r, slots, sent) = (redis.clone(), slots.clone(), sent.clone());
            async move {
                let slot = slots.acquire_owned().await?;
                let h = tokio::spawn(async move {
                    let reached = pipe.query_async::<Vec<i64>>(&mut r).await;
                    drop(slot);
                    reached
                });
                sent.lock().unwrap_or_else(|p| p.into_inner()).push(h);
                Ok(())
            }
        },
    )
    .await?;
    let offered_secs = start.elapsed().as_secs_f64();
    let mut unreached = 0;
    let handles = std::mem::take(&mut *sent.lock().unwrap_or_else(|p| p.into_inner()));
    for h in handles {
        unreached += h.await??.iter().filter(|n| **n < 1).count() as u64;
    }
    // Every message has been through Redis: the end markers come after all of them.
    let mut end = redis::pipe();
    for u in 0..users {
        end.cmd("FCALL")
            .arg("gw_send_user")
            .arg(1)
            .arg(format!("bench-u{u}"))
            .arg(r#"{"end":true}"#)
            .ignore();
    }
    end.query_async::<()>(&mut redis.clone()).await?;
    let mut seen = Vec::new();
    while let Some(r) = set.join_next().await {
        seen.push(r??);
    }
    // CPU until everything is in, the end markers included; the rate over the time from
    // the first send to the last message's receipt (the end markers are not deliveries).
    let cpu = c.cpu()? - cpu0;
    let last_us = seen.iter().map(|s| s.last_us).max().unwrap_or(0);
    let secs = match last_us.checked_sub(start_us) {
        Some(us) if us > 0 => us as f64 / 1e6,
        _ => start.elapsed().as_secs_f64(),
    };
    let d = Delivery {
        published,
        expected: published,
        seen,
        secs,
        cpu,
    };
    let (mut result, mut summary) = delivery_result(&d, a.users)?;
    let delivered = result["delivered"].as_u64().unwrap_or(0);
    result["nodes"] = json!(a.urls.len());
    result["rate"] = json!(a.rate);
    result["offered_per_sec"] = json!(published as f64 / offered_secs.max(1e-9));
    result["batch"] = json!(batch);
    result["in_flight"] = json!(in_flight);
    result["unreached"] = json!(unreached);
    if let (Some(pid), Some(r0)) = (a.redis_pid, rcpu0) {
        let rcpu = stats::cpu_secs(pid)? - r0;
        let per = if delivered > 0 {
            rcpu / delivered as f64 * 1e6
        } else {
            0.0
        };
        result["redis_cpu_secs"] = json!(rcpu);
        result["redis_cpu_per_delivery_us"] = json!(per);
        summary += &format!("; Redis CPU {rcpu:.2}s = {per:.2} µs/delivery");
    }
    summary += &format!(
        "; offered {:.0}/s in pipelines of {batch}, {unreached} FCALLs reached no one",
        published as f64 / offered_secs.max(1e-9)
    );
    emit(c, "unicast", result, &summary)
}
