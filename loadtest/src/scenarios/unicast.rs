//! `unicast`: one connection per user, messages to users through FCALL gw_send_user.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::task::JoinSet;

use super::delivery::{delivery_result, paced, receive, Delivery};
use super::{emit, mint, open_many, redis_conn, targets, Common, Proto, TokenFn};

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
