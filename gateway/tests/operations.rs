//! Operations over a real `redis-server`: a drained node closes its clients with 1012 spread
//! over the drain window, and they carry on on another node; after scale-out, an overloaded
//! node sheds its excess with 1013 until the cluster is balanced within the slack.

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::process::GatewayProcess;
use common::redis_server::RedisServer;
use common::*;
use loadtest::client::Client;
use redis::AsyncCommands;

fn on(redis: &RedisServer, id: &str) -> gateway::Config {
    gateway::Config {
        node_id: id.into(),
        redis_url: Some(redis.url().into()),
        node_heartbeat_ms: 200,
        node_ttl_ms: 1_000,
        ..config()
    }
}

fn retry_hint(reason: &str) -> u64 {
    reason
        .split("retry_after_ms=")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry_after_ms in {reason:?}"))
}

#[tokio::test]
async fn drain_closes_gradually_with_1012_and_clients_move_on() {
    let redis = RedisServer::start().await;
    let window = 2_000u64;
    let a = start(gateway::Config {
        drain_window_ms: window,
        rebalance: false,
        ..on(&redis, "a")
    })
    .await;
    let b = start(gateway::Config {
        rebalance: false,
        ..on(&redis, "b")
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(a.subscriber("chat:d").await);
    }
    let started = Instant::now();
    a.shutdown.cancel();
    let mut closes = Vec::new();
    let mut hints = Vec::new();
    for c in &mut clients {
        let (code, reason) = c.recv_close(T).await.unwrap();
        assert_eq!(code, 1012, "{reason}");
        hints.push(retry_hint(&reason));
        closes.push(started.elapsed());
    }
    closes.sort();
    let (first, last) = (closes[0], closes[closes.len() - 1]);
    assert!(
        last < Duration::from_millis(window),
        "all closed within the window: {last:?}"
    );
    assert!(
        last - first > Duration::from_millis(window / 2),
        "spread over time, not at once: {first:?}..{last:?}"
    );
    hints.sort();
    hints.dedup();
    assert!(hints.len() > 1, "jittered hints: {hints:?}");
    tokio::time::timeout(T, a.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // the clients reconnect to another node and keep receiving
    let mut moved = Vec::new();
    for _ in 0..clients.len() {
        moved.push(b.subscriber("chat:d").await);
    }
    let mut backend = redis.client().await;
    let _: i64 = backend.publish("gw:ch:chat:d", "1").await.unwrap();
    for c in &mut moved {
        assert_eq!(c.recv_json(T).await.unwrap()["data"], 1);
    }
    // the drained node left the cluster
    let live: Vec<String> = backend.zrange("gw:nodes", 0, -1).await.unwrap();
    assert_eq!(live, ["b"]);
}

/// A client that, like one behind a load balancer after scale-out, lands on the new node
/// when it reconnects.
async fn reconnect(node: &TestNode) -> Client {
    node.subscriber("chat:r").await
}

#[tokio::test]
async fn scale_out_rebalances_within_the_slack() {
    let redis = RedisServer::start().await;
    let rebalancing = |id: &str| gateway::Config {
        rebalance_slack: 0.1,
        rebalance_rate: 25, // 5 per 200 ms heartbeat
        ..on(&redis, id)
    };
    let a = start(rebalancing("a")).await;
    let n = 20;
    let mut on_a = Vec::new();
    for _ in 0..n {
        on_a.push(a.subscriber("chat:r").await);
    }
    a.wait_metric("gateway_cluster_nodes 1").await;

    let b = start(rebalancing("b")).await;
    let mut on_b = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    // limit = ceil(20 / 2 * 1.1) = 11: a keeps at most 11, b gets at least 9
    while on_a.len() > 11 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a kept {}",
            on_a.len()
        );
        let mut kept = Vec::new();
        for mut c in on_a.drain(..) {
            match c.recv(Duration::from_millis(20)).await {
                Ok(loadtest::client::Received::Close(code, reason)) => {
                    assert_eq!(code, 1013, "{reason}");
                    retry_hint(&reason);
                    on_b.push(reconnect(&b).await);
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => kept.push(c), // nothing yet
            }
        }
        on_a = kept;
    }
    // it settles: no further shedding once within the slack (a check that nothing happens,
    // so it waits: several heartbeats, at each of which a would shed if it still meant to)
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for c in &mut on_a {
        assert!(
            c.recv(Duration::from_millis(10)).await.is_err(),
            "over-shed"
        );
    }
    assert!(
        on_a.len() >= 9 && on_b.len() <= 11,
        "{} / {}",
        on_a.len(),
        on_b.len()
    );
    let m = a.metrics().await;
    assert!(
        has_line(&m, &format!("gateway_rebalance_shed_total {}", on_b.len())),
        "{m}"
    );
    assert!(has_line(&m, "gateway_cluster_nodes 2"), "{m}");

    // every client, moved or not, still gets channel messages
    let mut backend = redis.client().await;
    let _: i64 = backend.publish("gw:ch:chat:r", "2").await.unwrap();
    for c in on_a.iter_mut().chain(on_b.iter_mut()) {
        assert_eq!(c.recv_json(T).await.unwrap()["data"], 2);
    }
}

#[tokio::test]
async fn metrics_show_every_required_family_after_real_traffic() {
    let mut redis = RedisServer::start().await;
    let node = start(gateway::Config {
        handshake_rate_per_ip: 1,
        handshake_burst_per_ip: 2,
        anonymous_send: true,
        ..on(&redis, "m")
    })
    .await;
    let mut sub = node.subscriber("chat:m").await;
    let (mut publisher, _) = node.client().await;
    request(
        &mut publisher,
        serde_json::json!({"type":"publish","channel":"chat:m","data":1,"id":1}),
    )
    .await;
    sub.recv_json(T).await.unwrap();
    request(
        &mut publisher,
        serde_json::json!({"type":"send","data":{"x":1},"id":2}),
    )
    .await;
    // rate limited handshake
    assert!(Client::connect(&node.url()).await.is_err());
    // a Redis outage and its recovery
    redis.kill();
    let deadline = tokio::time::Instant::now() + T;
    while node.admin("GET", "/readyz", "", None).await.0 != 503 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.restart().await;
    node.wait_metric("gateway_redis_reconnects_total 1").await;
    let m = node.metrics().await;
    for line in [
        "gateway_connections_open 2",
        "gateway_handshakes_total{outcome=\"ok\"} 2",
        "gateway_handshakes_total{outcome=\"rate_limited\"} 1",
        "gateway_deliveries_total 1",
        "gateway_fanout_latency_seconds_count 1",
        "gateway_slow_consumer_disconnects_total 0",
        "gateway_rate_limit_hits_total{kind=\"handshake\"} 1",
        "gateway_redis_reconnects_total 1",
        "gateway_directory_ops_total{op=\"add\"} 2",
        "gateway_inbound_appends_total{event=\"message\"} 1",
        "gateway_inbound_appends_total{event=\"connect\"} 2",
    ] {
        assert!(has_line(&m, line), "{line} missing in\n{m}");
    }
    // traffic counters, whatever their values; and the failed heartbeats that made /readyz
    // answer 503 above
    for series in [
        "gateway_messages_in_total",
        "gateway_bytes_in_total",
        "gateway_messages_out_total",
        "gateway_bytes_out_total",
        "gateway_redis_errors_total{op=\"heartbeat\"}",
    ] {
        assert!(has_series(&m, series), "{series} missing in\n{m}");
    }
    for line in m.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("gateway_"), "{line}");
    }
}

#[tokio::test]
async fn traceparent_travels_from_admin_publish_to_the_delivery_log_line() {
    let redis = RedisServer::start().await;
    let a = start(on(&redis, "a")).await;
    let log = std::env::temp_dir().join(format!("gw-trace-{}.log", std::process::id()));
    let b = GatewayProcess::start(
        &[
            "--node-id",
            "b",
            "--redis-url",
            &redis.url(),
            "--allow-anonymous",
        ],
        // its log lines, JSON as GatewayProcess runs it
        std::fs::File::create(&log).unwrap().into(),
    )
    .await;
    let mut sub = connect_eventually(&b.url(), &[]).await;
    sub.recv_json(T).await.unwrap();
    request(
        &mut sub,
        serde_json::json!({"type":"subscribe","channel":"news","id":1}),
    )
    .await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, _) = http(
        a.admin,
        "POST",
        "/v1/channels/news/publish",
        r#"{"data":{"n":1}}"#,
        &format!("traceparent: {tp}\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    // the client sees the data only; the log line on the other node carries the trace
    assert_eq!(
        sub.recv_json(T).await.unwrap(),
        serde_json::json!({"type":"message","channel":"news","data":{"n":1}})
    );
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("delivering traced message"))
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["fields"]["traceparent"], tp, "{line}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery log line:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
}

#[tokio::test]
async fn drain_on_demand_empties_the_node_and_keeps_it_running() {
    let node = start(gateway::Config {
        drain_window_ms: 600,
        ..config()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(node.client().await.0);
    }
    let (status, body) = node.admin("POST", "/v1/drain", "", None).await;
    assert_eq!(status, 202, "{body}");
    for c in &mut clients {
        let (code, reason) = c.recv_close(T).await.unwrap();
        assert_eq!(code, 1012);
        retry_hint(&reason);
    }
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 503);
    assert!(matches!(
        Client::connect(&node.url()).await,
        Err(loadtest::client::ConnectError::Status(503))
    ));
    // a check that nothing happens (the node does not stop after the drain), so it waits
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!node.task.is_finished(), "the process stays up");
    assert_eq!(node.admin("GET", "/healthz", "", None).await.0, 200);
}
