//! History and recovery with a real `redis-server`, real nodes and real clients (and once
//! with the embedded memory broker): a client that comes back, on any node, with the last
//! position it saw (`recover`) gets exactly what it missed and then live messages, with no
//! gap and no duplicate, or is told it cannot (`recovered: false`, `insufficient_state`).
//!
//! - recovery on another node, with and without a live stream there;
//! - a rolling drain of three processes behind nginx under a 100 msg/s publish;
//! - Redis restarted empty: a new epoch, `recovered: false`, `insufficient_state`;
//! - idempotent publishes (`FCALL gw_publish … <key>`, the admin API's `Idempotency-Key`);
//! - subscribes racing a 1000 msg/s publish;
//! - a plain `PUBLISH` on a history channel;
//! - the v1 `history` request and the admin history endpoint;
//! - a quiet channel past its TTL.

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::nginx::Nginx;
use common::process::GatewayProcess;
use common::redis_server::RedisServer;
use common::*;
use loadtest::client::{Client, Received};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tokio::time::Instant;

/// The channels of these tests: history on `chat:*`, a short one on `chat:small*`.
const SMALL: &str = "chat:small*?history_size=5&history_ttl_secs=600";
const HISTORY: &str = "chat:*?history_size=1000&history_ttl_secs=600";

/// A node of a cluster on `redis` whose `chat:*` channels keep history.
fn node(redis: &RedisServer, node_id: &str) -> gateway::Config {
    gateway::Config {
        node_id: node_id.into(),
        redis_url: Some(redis.url().into()),
        node_heartbeat_ms: 200,
        node_ttl_ms: 1_000,
        rebalance: false,
        channels: vec![SMALL.parse().unwrap(), HISTORY.parse().unwrap()],
        ..config()
    }
}

/// A place in a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pos {
    epoch: String,
    offset: u64,
}

impl Pos {
    /// The position in an ack (of a subscribe or a publish) or a history reply.
    fn of(reply: &Value) -> Pos {
        Pos {
            epoch: reply["epoch"].as_str().expect("epoch").to_owned(),
            offset: reply["offset"].as_u64().expect("offset"),
        }
    }

    fn json(&self) -> Value {
        json!({"epoch": self.epoch, "offset": self.offset})
    }
}

/// Connects (retrying while the node starts) and consumes the welcome frame.
async fn connect(url: &str) -> Client {
    let mut c = connect_eventually(url, &[]).await;
    let welcome = c.recv_json(T).await.expect("welcome");
    assert_eq!(welcome["type"], "welcome");
    c
}

/// Subscribes (from `recover`, when given) and returns the ack.
async fn subscribe(c: &mut Client, channel: &str, recover: Option<&Pos>) -> Value {
    let mut req = json!({"type":"subscribe","channel":channel,"id":1});
    if let Some(p) = recover {
        req["recover"] = p.json();
    }
    c.send_json(&req).await.expect("send");
    let ack = c.recv_json(T).await.expect("subscribe reply");
    assert_eq!(ack["type"], "ack", "subscribe {req} answered {ack}");
    assert_eq!(ack["id"], 1);
    ack
}

/// The next frame, which must be a message of `channel`: its offset and data.
async fn message(c: &mut Client, channel: &str) -> (Option<u64>, Value) {
    let f = c.recv_json(T).await.expect("a message");
    assert_eq!(f["type"], "message", "{f}");
    assert_eq!(f["channel"], channel, "{f}");
    (f["offset"].as_u64(), f["data"].clone())
}

/// Expects the messages with offsets `offsets`, in order, each with data `{"n": offset}`.
async fn expect_offsets(c: &mut Client, channel: &str, offsets: std::ops::RangeInclusive<u64>) {
    for want in offsets {
        let (offset, data) = message(c, channel).await;
        assert_eq!(offset, Some(want), "data {data}");
        assert_eq!(data, json!({ "n": want }));
    }
}

/// A backend's `FCALL gw_publish` (`shared::backend::publish`): the publication's position.
async fn publish(
    r: &mut MultiplexedConnection,
    channel: &str,
    data: &Value,
    key: Option<&str>,
) -> redis::RedisResult<Pos> {
    let text = data.to_string();
    let args = shared::backend::publish(channel, &text, key);
    let (offset, epoch): (u64, String) = redis::cmd(args[0]).arg(&args[1..]).query_async(r).await?;
    Ok(Pos { epoch, offset })
}

/// Publishes `{"n": i}` for each `i` of `ns`, checking that each lands at offset `i`.
async fn publish_numbers(
    r: &mut MultiplexedConnection,
    channel: &str,
    ns: std::ops::RangeInclusive<u64>,
) -> Pos {
    let mut last = None;
    for n in ns {
        let p = publish(r, channel, &json!({ "n": n }), None).await.unwrap();
        assert_eq!(p.offset, n, "only this test publishes on {channel}");
        last = Some(p);
    }
    last.expect("at least one publication")
}

/// Waits until `cond` holds, polling every 20 ms, for at most `within`.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many Redis subscribers (nodes) `gw:ch:<channel>` has.
async fn numsub(r: &mut MultiplexedConnection, channel: &str) -> u64 {
    let v: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("gw:ch:{channel}"))
        .query_async(r)
        .await
        .unwrap_or_default();
    v.first().map_or(0, |(_, n)| *n)
}

// ---- 1. Recovery on another node ---------------------------------------------------------

/// A client on node a holds (E, 10) and disconnects; 50 more are published; on node b it
/// recovers exactly 11..=60, then gets 61.. live. With `warm`, node b already has a live
/// subscriber of the channel (its stream is live); without, the client is b's first.
async fn recover_on_another_node(warm: bool) {
    let redis = RedisServer::start().await;
    let a = start(node(&redis, "a")).await;
    let b = start(node(&redis, "b")).await;
    let mut backend = redis.client().await;
    let ch = if warm { "chat:warm" } else { "chat:cold" };

    let mut watcher = None;
    if warm {
        let mut w = connect(&b.url()).await;
        assert_eq!(subscribe(&mut w, ch, None).await["offset"], 0);
        watcher = Some(w);
    }
    let mut c = connect(&a.url()).await;
    let ack = subscribe(&mut c, ch, None).await;
    let mut held = Pos::of(&ack);
    assert_eq!(held.offset, 0, "nothing published yet: {ack}");
    assert_eq!(ack.get("recovered"), None, "it did not ask to recover");
    let p = publish_numbers(&mut backend, ch, 1..=10).await;
    assert_eq!(
        p.epoch, held.epoch,
        "the subscribe named the channel's epoch"
    );
    expect_offsets(&mut c, ch, 1..=10).await;
    held.offset = 10;
    c.close(1000, "bye").await.unwrap();
    drop(c);

    publish_numbers(&mut backend, ch, 11..=60).await;

    let mut c = connect(&b.url()).await;
    let ack = subscribe(&mut c, ch, Some(&held)).await;
    assert_eq!(
        ack,
        json!({"type":"ack","id":1,"epoch":held.epoch,"offset":60,"recovered":true})
    );
    expect_offsets(&mut c, ch, 11..=60).await;
    publish_numbers(&mut backend, ch, 61..=65).await;
    expect_offsets(&mut c, ch, 61..=65).await;
    if let Some(w) = &mut watcher {
        expect_offsets(w, ch, 1..=65).await;
    }
}

#[tokio::test]
async fn a_client_recovers_on_another_node_exactly_what_it_missed() {
    recover_on_another_node(false).await;
}

#[tokio::test]
async fn a_client_recovers_on_a_node_whose_stream_is_live() {
    recover_on_another_node(true).await;
}

// ---- 2. Rolling drain behind nginx -------------------------------------------------------

const ROLLING_CLIENTS: usize = 200;
/// Publications per second during the rolling drain.
const ROLLING_RATE: u64 = 100;

/// What one client of the rolling drain saw.
#[derive(Default)]
struct Outcome {
    /// Offsets of the messages received, in the order received (replays included).
    offsets: Vec<u64>,
    /// Closes by code.
    closes: BTreeMap<u16, usize>,
    /// Anything else wrong: a data mismatch, a recovery refused, a dropped socket.
    problems: Vec<String>,
}

/// State the rolling drain's clients share with the test.
#[derive(Default)]
struct Tally {
    /// Clients subscribed right now (acked, not closed since).
    subscribed: AtomicUsize,
    /// Recoveries acked `recovered: true`.
    recovered: AtomicUsize,
}

/// Connects through the balancer; a draining node answers 503 and the balancer's next pick
/// is another node, so the client tries again shortly, as an application would.
async fn connect_through(url: &str) -> Result<Client, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(url).await {
            Ok(mut c) => match c.recv_json(T).await {
                Ok(w) if w["type"] == "welcome" => return Ok(c),
                other => {
                    if Instant::now() >= deadline {
                        return Err(format!("no welcome: {other:?}"));
                    }
                }
            },
            Err(e) if Instant::now() >= deadline => return Err(format!("no connection: {e}")),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One application of the rolling drain: subscribes, and on 1012 (or any loss) waits the
/// hinted `retry_after_ms`, reconnects through nginx and recovers from the last offset it
/// saw. Stops at the publication whose data is `{"end": true}`.
async fn rolling_client(url: String, channel: &'static str, tally: Arc<Tally>) -> Outcome {
    let mut out = Outcome::default();
    let deadline = Instant::now() + Duration::from_secs(50);
    let mut c = match connect_through(&url).await {
        Ok(c) => c,
        Err(e) => {
            out.problems.push(e);
            return out;
        }
    };
    let ack = subscribe(&mut c, channel, None).await;
    let mut at = Pos::of(&ack);
    tally.subscribed.fetch_add(1, Ordering::SeqCst);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let lost = match c.recv(left).await {
            Ok(Received::Text(t)) => {
                let f: Value = serde_json::from_str(&t).unwrap();
                if f["type"] != "message" {
                    out.problems.push(format!("unexpected frame {f}"));
                    continue;
                }
                let offset = f["offset"]
                    .as_u64()
                    .expect("history messages carry offsets");
                out.offsets.push(offset);
                if offset > at.offset {
                    at.offset = offset;
                }
                if f["data"]["end"] == true {
                    break;
                }
                if f["data"]["n"] != offset {
                    out.problems
                        .push(format!("offset {offset} carried {}", f["data"]));
                }
                continue;
            }
            Ok(Received::Close(code, reason)) => {
                *out.closes.entry(code).or_default() += 1;
                Some(reason)
            }
            Ok(other) => {
                out.problems.push(format!("unexpected {other:?}"));
                continue;
            }
            Err(e) if Instant::now() >= deadline => {
                out.problems
                    .push(format!("gave up at offset {}: {e}", at.offset));
                break;
            }
            Err(e) => {
                out.problems
                    .push(format!("socket lost without a close: {e}"));
                None
            }
        };
        tally.subscribed.fetch_sub(1, Ordering::SeqCst);
        // `service restart; retry_after_ms=<n>`: wait as told (the drain window of these
        // nodes keeps n within 500-1000 ms), then reconnect through the balancer.
        let hint = lost
            .as_deref()
            .and_then(|r| r.split("retry_after_ms=").nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(100);
        tokio::time::sleep(Duration::from_millis(hint.min(2_000))).await;
        c = match connect_through(&url).await {
            Ok(c) => c,
            Err(e) => {
                out.problems.push(e);
                return out;
            }
        };
        let ack = subscribe(&mut c, channel, Some(&at)).await;
        if ack["recovered"] == true && ack["epoch"] == at.epoch.as_str() {
            tally.recovered.fetch_add(1, Ordering::SeqCst);
        } else {
            out.problems
                .push(format!("recovery from {at:?} refused: {ack}"));
            at = Pos::of(&ack);
        }
        tally.subscribed.fetch_add(1, Ordering::SeqCst);
    }
    out
}

/// The `connections` a node's `/readyz` reports.
async fn open_connections(g: &GatewayProcess) -> u64 {
    let (_, body) = http(g.admin, "GET", "/readyz", "", "").await;
    serde_json::from_str::<Value>(&body).unwrap()["connections"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_drain_behind_nginx_loses_and_duplicates_nothing() {
    let started = Instant::now();
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let id = format!("r{i}");
        nodes.push(
            GatewayProcess::start(
                &[
                    "--node-id",
                    &id,
                    "--redis-url",
                    &redis.url(),
                    "--allow-anonymous",
                    "--channels",
                    HISTORY,
                    "--node-heartbeat-ms",
                    "200",
                    "--node-ttl-ms",
                    "1000",
                    "--rebalance",
                    "false",
                    // closes spread over 0.8 s, hints of 500-1000 ms
                    "--drain-window-ms",
                    "1000",
                    "--handshake-rate-per-ip",
                    "0",
                    "--trusted-proxies",
                    "127.0.0.1/32",
                ],
                Stdio::null(),
            )
            .await,
        );
    }
    let ports: Vec<u16> = nodes.iter().map(|g| g.port).collect();
    let lb = Nginx::start("", &ports, "history-rr").await;
    let ch = "chat:rolling";

    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..ROLLING_CLIENTS)
        .map(|_| tokio::spawn(rolling_client(lb.url(), ch, tally.clone())))
        .collect();
    wait_for(
        "every client subscribed",
        Duration::from_secs(30),
        || async { tally.subscribed.load(Ordering::SeqCst) == ROLLING_CLIENTS },
    )
    .await;
    let spread = {
        let mut v = Vec::new();
        for g in &nodes {
            v.push(open_connections(g).await);
        }
        v
    };
    assert!(spread.iter().all(|n| *n > 0), "round robin: {spread:?}");

    // the backend: FCALL gw_publish at 100 msg/s until told to stop, then {"end": true}
    let top = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (top, stop) = (top.clone(), stop.clone());
        let mut backend = redis.client().await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / ROLLING_RATE));
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                n += 1;
                let p = publish(&mut backend, ch, &json!({ "n": n }), None)
                    .await
                    .unwrap();
                assert_eq!(p.offset, n);
                top.store(n, Ordering::SeqCst);
            }
            publish(&mut backend, ch, &json!({"end": true}), None)
                .await
                .unwrap()
                .offset
        })
    };
    let published_past = |n: u64| {
        let top = top.clone();
        async move {
            let want = top.load(Ordering::SeqCst) + n;
            wait_for("publications", Duration::from_secs(10), || async {
                top.load(Ordering::SeqCst) >= want
            })
            .await;
        }
    };
    published_past(50).await;

    for (i, g) in nodes.iter().enumerate() {
        let had = open_connections(g).await;
        let (status, body) = http(g.admin, "POST", "/v1/drain", "", "").await;
        assert_eq!(status, 202, "{body}");
        wait_for("the node to drain", Duration::from_secs(15), || async {
            open_connections(g).await == 0
        })
        .await;
        let (status, body) = http(g.admin, "DELETE", "/v1/drain", "", "").await;
        assert_eq!(
            (status, body.contains("drain_ended")),
            (200, true),
            "{body}"
        );
        wait_for("every client back", Duration::from_secs(20), || async {
            tally.subscribed.load(Ordering::SeqCst) == ROLLING_CLIENTS
        })
        .await;
        eprintln!(
            "node r{i}: drained {had} clients, all {ROLLING_CLIENTS} subscribed again at offset {}",
            top.load(Ordering::SeqCst)
        );
        published_past(50).await;
    }
    stop.store(true, Ordering::SeqCst);
    let end = publisher.await.unwrap();

    let (mut lost, mut duplicated, mut disordered, mut closes) = (0, 0, 0, BTreeMap::new());
    let mut problems = Vec::new();
    for c in clients {
        let o = c.await.unwrap();
        let distinct: HashSet<u64> = o.offsets.iter().copied().collect();
        duplicated += o.offsets.len() - distinct.len();
        lost += (1..=end).filter(|n| !distinct.contains(n)).count();
        disordered += o.offsets.windows(2).filter(|w| w[1] <= w[0]).count();
        for (code, n) in o.closes {
            *closes.entry(code).or_insert(0) += n;
        }
        problems.extend(o.problems);
    }
    eprintln!(
        "rolling drain: {ROLLING_CLIENTS} clients x {end} publications, closes by code {closes:?}, \
         {} recoveries; lost {lost}, duplicated {duplicated}, out of order {disordered}; {:.1} s",
        tally.recovered.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!((lost, duplicated, disordered), (0, 0, 0));
    assert_eq!(
        closes.keys().copied().collect::<Vec<_>>(),
        vec![1012],
        "only drain closes"
    );
    assert_eq!(
        closes[&1012],
        tally.recovered.load(Ordering::SeqCst),
        "every close was followed by a recovery"
    );
    assert!(
        closes[&1012] >= ROLLING_CLIENTS,
        "every client was drained at least once"
    );
}

// ---- 3. Redis restarted empty ------------------------------------------------------------

#[tokio::test]
async fn redis_restarted_empty_starts_a_new_epoch() {
    let mut redis = RedisServer::start().await;
    let heartbeat = Duration::from_millis(500);
    let n = start(gateway::Config {
        node_heartbeat_ms: heartbeat.as_millis() as u64,
        node_ttl_ms: 5_000,
        ..node(&redis, "e")
    })
    .await;
    let ch = "chat:epoch";
    let mut backend = redis.client().await;
    let mut live = connect(&n.url()).await;
    let old = Pos::of(&subscribe(&mut live, ch, None).await);
    let mut gone = connect(&n.url()).await;
    subscribe(&mut gone, ch, None).await;
    publish_numbers(&mut backend, ch, 1..=5).await;
    expect_offsets(&mut live, ch, 1..=5).await;
    expect_offsets(&mut gone, ch, 1..=5).await;
    let held = Pos {
        epoch: old.epoch.clone(),
        offset: 5,
    };
    drop(gone);

    redis.restart().await;
    let mut backend = redis.client().await;
    // the node is back once its Redis client has reconnected and subscribed again
    wait_for("the node to resubscribe", Duration::from_secs(10), || {
        let mut b = backend.clone();
        async move { numsub(&mut b, ch).await == 1 }
    })
    .await;
    let back = Instant::now();
    let f = live
        .recv_json(heartbeat + Duration::from_secs(2))
        .await
        .expect("told within a heartbeat");
    let took = back.elapsed();
    assert_eq!(
        f,
        json!({"type":"unsubscribed","channel":ch,"code":"insufficient_state"})
    );
    eprintln!(
        "insufficient_state {} ms after the node was back (heartbeat {} ms)",
        took.as_millis(),
        heartbeat.as_millis()
    );
    // found by the heartbeat's check (nothing was published since the restart), so within
    // one heartbeat, plus the read and the scheduling of a busy machine
    assert!(
        took <= heartbeat + Duration::from_millis(500),
        "within one heartbeat, took {took:?}"
    );

    // a client coming back with its old position is told it was not recovered
    let mut c = connect(&n.url()).await;
    let ack = subscribe(&mut c, ch, Some(&held)).await;
    assert_eq!(ack["recovered"], false, "{ack}");
    let new = Pos::of(&ack);
    assert_ne!(new.epoch, old.epoch, "a new epoch");
    assert_eq!(new.offset, 0);
    // so is the live subscriber, subscribing again
    let ack = subscribe(&mut live, ch, Some(&held)).await;
    assert_eq!(
        (ack["recovered"].clone(), Pos::of(&ack)),
        (json!(false), new.clone())
    );

    // and live delivery goes on in the new epoch (the backend's FCALL works once a node
    // has loaded the functions into the empty Redis again)
    let deadline = Instant::now() + Duration::from_secs(10);
    let p = loop {
        match publish(&mut backend, ch, &json!({"n": 1}), None).await {
            Ok(p) => break p,
            Err(e) if Instant::now() < deadline => {
                assert!(e.to_string().contains("Function not found"), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(p, Pos { offset: 1, ..new });
    expect_offsets(&mut c, ch, 1..=1).await;
    expect_offsets(&mut live, ch, 1..=1).await;
}

// ---- 4. Idempotency ----------------------------------------------------------------------

#[tokio::test]
async fn a_retried_publish_with_the_same_key_is_delivered_once() {
    let redis = RedisServer::start().await;
    let n = start(node(&redis, "i")).await;
    let ch = "chat:idem";
    let mut backend = redis.client().await;
    let mut c = connect(&n.url()).await;
    subscribe(&mut c, ch, None).await;

    // FCALL gw_publish … order-1, twice: the second returns the first's position
    let first = publish(&mut backend, ch, &json!({"n": 1}), Some("order-1"))
        .await
        .unwrap();
    let again = publish(&mut backend, ch, &json!({"n": 1}), Some("order-1"))
        .await
        .unwrap();
    assert_eq!((first.offset, &again), (1, &first));
    // the key is per channel
    let elsewhere = publish(
        &mut backend,
        "chat:idem2",
        &json!({"n": 1}),
        Some("order-1"),
    )
    .await
    .unwrap();
    assert_eq!(elsewhere.offset, 1);
    publish(&mut backend, ch, &json!({"n": 2}), None)
        .await
        .unwrap();
    expect_offsets(&mut c, ch, 1..=2).await;

    // the admin API with Idempotency-Key, twice
    let path = format!("/v1/channels/{ch}/publish");
    let mut replies = Vec::new();
    for _ in 0..2 {
        let (status, body) = http(
            n.admin,
            "POST",
            &path,
            r#"{"data":{"n":3}}"#,
            "Idempotency-Key: pay-7\r\n",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        replies.push(serde_json::from_str::<Value>(&body).unwrap());
    }
    assert_eq!(
        replies[0],
        json!({"status":"published","offset":3,"epoch":first.epoch})
    );
    assert_eq!(replies[1], replies[0], "the retry answers the first result");
    // the key is honoured with a traceparent too
    let traced = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n";
    let (status, body) = http(
        n.admin,
        "POST",
        &path,
        r#"{"data":{"n":3}}"#,
        &format!("Idempotency-Key: pay-7\r\n{traced}"),
    )
    .await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (200, replies[0].clone())
    );
    // a key the gateway cannot use is refused, not ignored
    let (status, body) = http(
        n.admin,
        "POST",
        &path,
        r#"{"data":{"n":3}}"#,
        "Idempotency-Key: not a key\r\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_idempotency_key"), "{body}");
    publish(&mut backend, ch, &json!({"n": 4}), None)
        .await
        .unwrap();
    expect_offsets(&mut c, ch, 3..=4).await;

    let (_, body) = http(
        n.admin,
        "GET",
        &format!("/v1/channels/{ch}/history"),
        "",
        "",
    )
    .await;
    let h: Value = serde_json::from_str(&body).unwrap();
    let offsets: Vec<u64> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![1, 2, 3, 4], "history holds each once: {h}");
}

// ---- 5. Subscribes racing a fast publish --------------------------------------------------

/// Publications per second while the joiners subscribe.
const RACE_RATE: u64 = 1000;
const RACE_JOINERS: usize = 50;

/// One joiner: subscribes (from `recover`, if given), then checks that its messages are
/// the replay and then live offsets, consecutive, until `until` says stop. Returns the
/// offsets it checked.
async fn join_and_check(
    url: String,
    channel: &'static str,
    recover: Option<Pos>,
    mut until: impl FnMut(u64, &Value) -> bool,
) -> (u64, u64) {
    let mut c = connect(&url).await;
    let ack = subscribe(&mut c, channel, recover.as_ref()).await;
    let at = Pos::of(&ack);
    let mut next = match &recover {
        Some(r) => {
            assert_eq!(ack["recovered"], true, "recover from {r:?}: {ack}");
            assert_eq!(at.epoch, r.epoch);
            assert!(at.offset >= r.offset, "{ack}");
            r.offset + 1
        }
        None => {
            assert_eq!(ack.get("recovered"), None, "{ack}");
            at.offset + 1
        }
    };
    let first = next;
    loop {
        let (offset, data) = message(&mut c, channel).await;
        assert_eq!(
            offset,
            Some(next),
            "joiner acked at {} (recover {recover:?}): a gap or a duplicate",
            at.offset
        );
        if until(next, &data) {
            return (first, next);
        }
        assert_eq!(data["n"], next);
        next += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_racing_a_fast_publish_lose_and_duplicate_nothing() {
    let redis = RedisServer::start().await;
    let a = start(node(&redis, "race-a")).await;
    let b = start(node(&redis, "race-b")).await;
    let ch = "chat:race";
    let watch = redis.client().await;

    // a standing subscriber keeps a's stream live, so joiners on a join a live stream;
    // on b each joiner is the only subscriber (the node subscribes to Redis for it)
    let mut standing = connect(&a.url()).await;
    let epoch = Pos::of(&subscribe(&mut standing, ch, None).await).epoch;
    let standing = tokio::spawn(async move {
        let mut next = 1;
        loop {
            let (offset, data) = message(&mut standing, ch).await;
            assert_eq!(offset, Some(next), "standing subscriber");
            if data["end"] == true {
                return next;
            }
            next += 1;
        }
    });

    let top = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (top, stop) = (top.clone(), stop.clone());
        let mut backend = redis.client().await;
        tokio::spawn(async move {
            // ten publications every 10 ms
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                for _ in 0..RACE_RATE / 100 {
                    n += 1;
                    let p = publish(&mut backend, ch, &json!({ "n": n }), None)
                        .await
                        .unwrap();
                    assert_eq!(p.offset, n);
                    top.store(n, Ordering::SeqCst);
                }
            }
            publish(&mut backend, ch, &json!({"end": true}), None)
                .await
                .unwrap()
                .offset
        })
    };
    wait_for("the first publications", Duration::from_secs(5), || async {
        top.load(Ordering::SeqCst) >= 100
    })
    .await;
    // every other joiner recovers from 25 publications back
    let recover_from = |i: usize| {
        (i % 2 == 1).then(|| Pos {
            epoch: epoch.clone(),
            offset: top.load(Ordering::SeqCst).saturating_sub(25),
        })
    };

    // on a: joiners every 50 ms that stay until the end
    let mut on_a = Vec::new();
    // on b: one joiner at a time; each takes 50 live messages and leaves, and the next
    // waits until b has unsubscribed from Redis
    let mut checked_b = 0;
    for i in 0..RACE_JOINERS / 2 {
        on_a.push(tokio::spawn(join_and_check(
            a.url(),
            ch,
            recover_from(i),
            |_, data| data["end"] == true,
        )));
        let recover = recover_from(i);
        let from = recover.as_ref().map(|r| r.offset);
        let (first, last) = join_and_check(b.url(), ch, recover, {
            let mut live = 0;
            move |_, _| {
                live += 1;
                live > 50
            }
        })
        .await;
        if let Some(r) = from {
            assert_eq!(first, r + 1);
        }
        checked_b += last - first;
        wait_for("b to leave the channel", Duration::from_secs(5), || {
            let mut w = watch.clone();
            async move { numsub(&mut w, ch).await == 1 }
        })
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    let end = publisher.await.unwrap();
    let mut checked_a = 0;
    for j in on_a {
        let (first, last) = j.await.unwrap();
        assert_eq!(last, end);
        checked_a += last - first;
    }
    assert_eq!(standing.await.unwrap(), end);
    eprintln!(
        "{RACE_JOINERS} joiners during {end} publications at {RACE_RATE}/s: \
         {checked_a} offsets checked on a, {checked_b} on b; lost 0, duplicated 0"
    );
}

// ---- 6. Plain PUBLISH on a history channel -----------------------------------------------

#[tokio::test]
async fn a_plain_publish_on_a_history_channel_is_live_only() {
    let redis = RedisServer::start().await;
    let n = start(node(&redis, "p")).await;
    let ch = "chat:plain";
    let mut backend = redis.client().await;
    let mut c = connect(&n.url()).await;
    let epoch = Pos::of(&subscribe(&mut c, ch, None).await).epoch;

    publish_numbers(&mut backend, ch, 1..=1).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("gw:ch:{ch}"))
        .arg(r#"{"plain":true}"#)
        .query_async(&mut backend)
        .await
        .unwrap();
    publish_numbers(&mut backend, ch, 2..=2).await;
    expect_offsets(&mut c, ch, 1..=1).await;
    let f = c.recv_json(T).await.unwrap();
    assert_eq!(
        f,
        json!({"type":"message","channel":ch,"data":{"plain":true}}),
        "live, without an offset"
    );
    expect_offsets(&mut c, ch, 2..=2).await;

    // it cannot be recovered: history never held it
    let mut late = connect(&n.url()).await;
    let zero = Pos { epoch, offset: 0 };
    let ack = subscribe(&mut late, ch, Some(&zero)).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    expect_offsets(&mut late, ch, 1..=2).await;
    publish_numbers(&mut backend, ch, 3..=3).await;
    expect_offsets(&mut late, ch, 3..=3).await;
    expect_offsets(&mut c, ch, 3..=3).await;
}

// ---- 7. Without Redis --------------------------------------------------------------------

#[tokio::test]
async fn recovery_works_on_the_memory_broker() {
    let n = start(gateway::Config {
        channels: vec![HISTORY.parse().unwrap()],
        ..config()
    })
    .await;
    let ch = "chat:mem";
    let mut p = connect(&n.url()).await;
    // a client's publish on a history channel is acked with its position
    async fn publish_v1(p: &mut Client, ch: &str, i: u64) -> Pos {
        let req = json!({"type":"publish","channel":ch,"data":{"n": i},"id": 100 + i});
        p.send_json(&req).await.unwrap();
        let ack = p.recv_json(T).await.unwrap();
        assert_eq!(
            (&ack["type"], &ack["id"], &ack["offset"]),
            (&json!("ack"), &req["id"], &json!(i)),
            "{ack}"
        );
        Pos::of(&ack)
    }

    let mut c = connect(&n.url()).await;
    let ack = subscribe(&mut c, ch, None).await;
    let epoch = Pos::of(&ack).epoch;
    assert_eq!(ack["offset"], 0);
    for i in 1..=3 {
        assert_eq!(publish_v1(&mut p, ch, i).await.epoch, epoch);
    }
    expect_offsets(&mut c, ch, 1..=3).await;
    drop(c);
    for i in 4..=8 {
        publish_v1(&mut p, ch, i).await;
    }

    let held = Pos {
        epoch: epoch.clone(),
        offset: 3,
    };
    let mut c = connect(&n.url()).await;
    let ack = subscribe(&mut c, ch, Some(&held)).await;
    assert_eq!(
        ack,
        json!({"type":"ack","id":1,"epoch":epoch,"offset":8,"recovered":true})
    );
    expect_offsets(&mut c, ch, 4..=8).await;
    publish_v1(&mut p, ch, 9).await;
    expect_offsets(&mut c, ch, 9..=9).await;

    // a position of another epoch is not recovered: the current position, then live only
    let mut stale = connect(&n.url()).await;
    let other = Pos {
        epoch: "not-this-one".into(),
        offset: 3,
    };
    let ack = subscribe(&mut stale, ch, Some(&other)).await;
    assert_eq!(
        ack,
        json!({"type":"ack","id":1,"epoch":epoch,"offset":9,"recovered":false})
    );
    publish_v1(&mut p, ch, 10).await;
    expect_offsets(&mut stale, ch, 10..=10).await;
    expect_offsets(&mut c, ch, 10..=10).await;
}

// ---- 8. The history request and the admin history endpoint --------------------------------

/// Sends a `history` request and returns its ack.
async fn ask_history(c: &mut Client, req: Value) -> Value {
    c.send_json(&req).await.unwrap();
    let reply = c.recv_json(T).await.unwrap();
    assert_eq!(
        (&reply["type"], &reply["id"]),
        (&json!("ack"), &req["id"]),
        "{req}: {reply}"
    );
    reply
}

/// The offsets of a history reply's publications, checking each one's data.
fn offsets_of(reply: &Value) -> Vec<u64> {
    reply["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("no publications in {reply}"))
        .iter()
        .map(|p| {
            let o = p["offset"].as_u64().unwrap();
            assert_eq!(p["data"], json!({ "n": o }), "{p}");
            o
        })
        .collect()
}

#[tokio::test]
async fn history_requests_return_the_right_publications() {
    let redis = RedisServer::start().await;
    let n = start(node(&redis, "h")).await;
    let ch = "chat:hist";
    let mut backend = redis.client().await;
    // the node serves once it has loaded the functions that backends call
    let mut c = connect(&n.url()).await;
    let epoch = publish_numbers(&mut backend, ch, 1..=8).await.epoch;

    let since = |offset: u64| json!({"epoch": epoch, "offset": offset});
    let r = ask_history(&mut c, json!({"type":"history","channel":ch,"id":2})).await;
    assert_eq!(
        Pos::of(&r),
        Pos {
            epoch: epoch.clone(),
            offset: 8
        }
    );
    assert_eq!(offsets_of(&r), (1..=8).collect::<Vec<_>>(), "all it keeps");
    let r = ask_history(
        &mut c,
        json!({"type":"history","channel":ch,"limit":3,"id":3}),
    )
    .await;
    assert_eq!(offsets_of(&r), vec![6, 7, 8], "the last three");
    let r = ask_history(
        &mut c,
        json!({"type":"history","channel":ch,"since":since(5),"id":4}),
    )
    .await;
    assert_eq!(offsets_of(&r), vec![6, 7, 8], "after 5");
    let r = ask_history(
        &mut c,
        json!({"type":"history","channel":ch,"since":since(2),"limit":2,"id":5}),
    )
    .await;
    assert_eq!(offsets_of(&r), vec![3, 4], "the first two after 2");
    let r = ask_history(
        &mut c,
        json!({"type":"history","channel":ch,"since":{"epoch":"gone","offset":2},"id":6}),
    )
    .await;
    assert_eq!(
        r,
        json!({"type":"ack","id":6,"epoch":epoch,"offset":8,"publications":[]}),
        "another epoch: the current one and nothing"
    );
    let r = ask(&mut c, r#"{"type":"history","channel":"news:1","id":7}"#).await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("not_enabled")),
        "{r}"
    );

    // a short history: the oldest are gone, and recovering past them is refused
    let small = "chat:small1";
    let small_epoch = publish_numbers(&mut backend, small, 1..=8).await.epoch;
    let r = ask_history(&mut c, json!({"type":"history","channel":small,"id":8})).await;
    assert_eq!(offsets_of(&r), vec![4, 5, 6, 7, 8], "history_size 5");
    let old = Pos {
        epoch: small_epoch.clone(),
        offset: 1,
    };
    let ack = subscribe(&mut c, small, Some(&old)).await;
    assert_eq!(
        ack,
        json!({"type":"ack","id":1,"epoch":small_epoch,"offset":8,"recovered":false})
    );

    // the admin endpoint
    let get = |query: String| {
        let admin = n.admin;
        async move {
            let (status, body) = http(
                admin,
                "GET",
                &format!("/v1/channels/{ch}/history{query}"),
                "",
                "",
            )
            .await;
            (status, serde_json::from_str::<Value>(&body).unwrap())
        }
    };
    let (status, r) = get(String::new()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        Pos::of(&r),
        Pos {
            epoch: epoch.clone(),
            offset: 8
        }
    );
    assert_eq!(offsets_of(&r), (1..=8).collect::<Vec<_>>());
    let (_, r) = get("?limit=2".into()).await;
    assert_eq!(offsets_of(&r), vec![7, 8]);
    let (_, r) = get(format!("?since_epoch={epoch}&since_offset=6")).await;
    assert_eq!(offsets_of(&r), vec![7, 8]);
    let (_, r) = get(format!("?since_epoch={epoch}&since_offset=1&limit=1")).await;
    assert_eq!(offsets_of(&r), vec![2]);
    let (_, r) = get("?since_epoch=gone&since_offset=6".into()).await;
    assert_eq!(r, json!({"epoch":epoch,"offset":8,"publications":[]}));
    let (status, _) = get("?since_epoch=gone".into()).await;
    assert_eq!(status, 400);
    let (status, r) = http(n.admin, "GET", "/v1/channels/news:1/history", "", "").await;
    assert_eq!(status, 404, "{r}");
}

// ---- A quiet channel -------------------------------------------------------------------------

/// A channel with live subscribers that nobody publishes on for longer than its
/// `history_ttl_secs` lost nothing: its subscribers keep their subscription and the
/// offsets go on in the same epoch. Only the publications older than the TTL are gone.
#[tokio::test]
async fn a_quiet_channel_keeps_its_subscribers_past_the_ttl() {
    let redis = RedisServer::start().await;
    let n = start(gateway::Config {
        channels: vec!["chat:brief*?history_size=10&history_ttl_secs=1"
            .parse()
            .unwrap()],
        ..node(&redis, "q")
    })
    .await;
    let ch = "chat:brief";
    let mut backend = redis.client().await;
    let mut c = connect(&n.url()).await;
    let epoch = Pos::of(&subscribe(&mut c, ch, None).await).epoch;
    publish_numbers(&mut backend, ch, 1..=1).await;
    expect_offsets(&mut c, ch, 1..=1).await;
    // the point of the case: the TTL passes (twice) with nothing published, while the
    // node checks the channel at every heartbeat
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let p = publish(&mut backend, ch, &json!({"n": 2}), None)
        .await
        .unwrap();
    assert_eq!(
        p,
        Pos {
            epoch: epoch.clone(),
            offset: 2
        },
        "same epoch, next offset"
    );
    expect_offsets(&mut c, ch, 2..=2).await;

    // offset 1 expired with the TTL; what came after it is still recoverable
    let mut late = connect(&n.url()).await;
    let from = |offset| Pos {
        epoch: epoch.clone(),
        offset,
    };
    let ack = subscribe(&mut late, ch, Some(&from(1))).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    expect_offsets(&mut late, ch, 2..=2).await;
    let mut later = connect(&n.url()).await;
    let ack = subscribe(&mut later, ch, Some(&from(0))).await;
    assert_eq!(ack["recovered"], false, "offset 1 expired: {ack}");
}
