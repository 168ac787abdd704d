//! Several nodes sharing one real `redis-server` (started by the test on a free port): fan-out
//! across nodes, unicast through the Redis functions and the admin API, remote disconnect,
//! the per-user cap, Redis restarts, a node killed with SIGKILL, and the inbound stream.

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::process::GatewayProcess;
use common::redis_server::RedisServer;
use common::*;
use loadtest::client::Client;
use redis::AsyncCommands;
use serde_json::{json, Value};

const SECRET: &str = "cluster-test-secret-0123456789-abcdef";

fn cluster_config(redis: &RedisServer, node_id: &str) -> gateway::Config {
    gateway::Config {
        node_id: node_id.into(),
        redis_url: Some(redis.url().into()),
        jwt_secret: Some(SECRET.into()),
        node_heartbeat_ms: 200,
        node_ttl_ms: 1_000,
        // these tests place clients on purpose; rebalancing is tested in operations.rs
        rebalance: false,
        ..config()
    }
}

/// A client of `user` on `node`; returns it and its conn_id.
async fn user_client(node: &TestNode, user: &str) -> (Client, String) {
    let auth = format!("Bearer {}", user_token(SECRET, user));
    let mut c = Client::connect_with(&node.url(), &[("Authorization", &auth)])
        .await
        .expect("connect");
    let welcome = c.recv_json(T).await.unwrap();
    assert_eq!(welcome["user_id"], user);
    (c, welcome["conn_id"].as_str().unwrap().to_owned())
}

/// Asserts that nothing more arrives for a moment.
async fn quiet(c: &mut Client) {
    assert!(
        c.recv_json(Duration::from_millis(300)).await.is_err(),
        "unexpected extra frame"
    );
}

#[tokio::test]
async fn channel_messages_reach_every_node_exactly_once() {
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(start(cluster_config(&redis, &format!("n{i}"))).await);
    }
    let mut subs = Vec::new();
    for node in &nodes {
        // two subscribers per node share one Redis subscription
        subs.push(node.subscriber("chat:room").await);
        subs.push(node.subscriber("chat:room").await);
    }
    let mut backend = redis.client().await;
    let numsub: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("gw:ch:chat:room")
        .query_async(&mut backend)
        .await
        .unwrap();
    assert_eq!(numsub[0].1, 3, "one Redis subscription per node");

    // a backend publishes on Redis; a client publishes on n0; the admin API on n2
    let _: i64 = backend
        .publish("gw:ch:chat:room", r#"{"from":"backend"}"#)
        .await
        .unwrap();
    let (mut p, _) = nodes[0].client().await;
    request(
        &mut p,
        json!({"type":"publish","channel":"chat:room","data":{"from":"client"},"id":1}),
    )
    .await;
    let (status, _) = nodes[2]
        .admin(
            "POST",
            "/v1/channels/chat:room/publish",
            r#"{"data":{"from":"admin"}}"#,
            None,
        )
        .await;
    assert_eq!(status, 200);
    // a body that is not JSON is dropped and counted
    let _: i64 = backend
        .publish("gw:ch:chat:room", "not json")
        .await
        .unwrap();
    for s in &mut subs {
        for from in ["backend", "client", "admin"] {
            let m = s.recv_json(T).await.unwrap();
            assert_eq!(
                m,
                json!({"type":"message","channel":"chat:room","data":{"from":from}})
            );
        }
        quiet(s).await;
    }
    for node in &nodes {
        node.wait_metric("gateway_broker_dropped_total 1").await;
    }
}

#[tokio::test]
async fn unicast_reaches_a_users_connections_on_every_node() {
    let redis = RedisServer::start().await;
    let a = start(cluster_config(&redis, "a")).await;
    let b = start(cluster_config(&redis, "b")).await;
    let c = start(cluster_config(&redis, "c")).await;
    let (mut on_a, conn_a) = user_client(&a, "alice").await;
    let (mut on_b, conn_b) = user_client(&b, "alice").await;
    let (mut bob, _) = user_client(&c, "bob").await;

    // a backend: one FCALL, any Redis client
    let mut backend = redis.client().await;
    let reached: i64 = fcall(
        &mut backend,
        shared::backend::send_user("alice", r#"{"n":1}"#),
    )
    .await
    .unwrap();
    assert_eq!(reached, 2);
    for cl in [&mut on_a, &mut on_b] {
        assert_eq!(
            cl.recv_json(T).await.unwrap(),
            json!({"type":"direct","data":{"n":1}})
        );
    }
    quiet(&mut bob).await;
    let one: i64 = fcall(
        &mut backend,
        shared::backend::send_conn(&conn_b, r#""just b""#),
    )
    .await
    .unwrap();
    assert_eq!(one, 1);
    assert_eq!(on_b.recv_json(T).await.unwrap()["data"], "just b");
    let none: i64 = fcall(
        &mut backend,
        shared::backend::send_conn("no-such-conn", "1"),
    )
    .await
    .unwrap();
    assert_eq!(none, 0);
    let bad: redis::RedisResult<i64> =
        fcall(&mut backend, shared::backend::send_user("alice", "{oops")).await;
    assert!(bad.is_err(), "non-JSON is refused by the function");

    // the admin API on a third node
    let (status, body) = c
        .admin("POST", "/v1/users/alice/send", r#"{"data":[2]}"#, None)
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"delivered":2}"#));
    for cl in [&mut on_a, &mut on_b] {
        assert_eq!(cl.recv_json(T).await.unwrap()["data"], json!([2]));
    }
    let (status, body) = c
        .admin(
            "POST",
            &format!("/v1/connections/{conn_a}/send"),
            r#"{"data":3}"#,
            None,
        )
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"delivered":1}"#));
    assert_eq!(on_a.recv_json(T).await.unwrap()["data"], 3);
    let (status, body) = c
        .admin("GET", "/v1/users/alice/connections", "", None)
        .await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&body).unwrap();
    let mut pairs: Vec<(String, String)> = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c["connected_ms"].as_u64().unwrap() > 0);
            (
                c["conn_id"].as_str().unwrap().to_owned(),
                c["node_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    pairs.sort();
    let mut expected = vec![(conn_a.clone(), "a".to_owned()), (conn_b, "b".to_owned())];
    expected.sort();
    assert_eq!(pairs, expected);

    // disconnect a connection held by another node
    let (status, _) = c
        .admin("DELETE", &format!("/v1/connections/{conn_a}"), "", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(on_a.recv_close(T).await.unwrap().0, 4003);
    let (status, _) = c.admin("DELETE", "/v1/connections/gone", "", None).await;
    assert_eq!(status, 404);
    // once closed, the connection leaves the directory
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (_, body) = b
            .admin("GET", "/v1/users/alice/connections", "", None)
            .await;
        if !body.contains(&conn_a) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    quiet(&mut bob).await;
}

#[tokio::test]
async fn per_user_cap_holds_across_nodes() {
    let redis = RedisServer::start().await;
    let capped = |id: &str| gateway::Config {
        max_connections_per_user: 2,
        ..cluster_config(&redis, id)
    };
    let a = start(capped("a")).await;
    let b = start(capped("b")).await;
    let (mut first, _) = user_client(&a, "carol").await;
    let (_second, _) = user_client(&b, "carol").await;
    let auth = format!("Bearer {}", user_token(SECRET, "carol"));
    let (status, body) = http(
        a.addr,
        "GET",
        "/ws",
        "",
        &format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nAuthorization: {auth}\r\n"
        ),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("user_connection_limit"), "{body}");
    // other users are not affected
    user_client(&b, "dave").await;
    // a slot frees up when a connection closes
    first.close(1000, "bye").await.unwrap();
    first.recv_close(T).await.unwrap();
    connect_eventually(&a.url(), &[("Authorization", &auth)]).await;
    assert!(has_series(
        &a.metrics().await,
        "gateway_handshakes_total{outcome=\"user_limit\"}"
    ));
}

#[tokio::test]
async fn redis_restart_is_survived_without_node_restarts() {
    let mut redis = RedisServer::start().await;
    let a = start(cluster_config(&redis, "a")).await;
    let b = start(cluster_config(&redis, "b")).await;
    let mut sub_a = a.subscriber("chat:r").await;
    let mut sub_b = b.subscriber("chat:r").await;
    let (mut alice, _) = user_client(&b, "alice").await;

    redis.kill();
    for node in [&a, &b] {
        let deadline = tokio::time::Instant::now() + T;
        while node.admin("GET", "/readyz", "", None).await.0 != 503 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "readyz never failed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // local connections stay up; requests that need Redis get a clear error
    let reply = ask(
        &mut sub_a,
        r#"{"type":"publish","channel":"chat:r","data":1,"id":5}"#,
    )
    .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let (status, _) = a
        .admin("POST", "/v1/users/alice/send", r#"{"data":1}"#, None)
        .await;
    assert_eq!(status, 503);

    redis.restart().await;
    for node in [&a, &b] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while node.admin("GET", "/readyz", "", None).await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "readyz never recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // subscriptions, functions and the directory are back, in a Redis that restarted empty
    let mut backend = redis.client().await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let reached: redis::RedisResult<i64> = fcall(
            &mut backend,
            shared::backend::send_user("alice", r#""back""#),
        )
        .await;
        if reached == Ok(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{reached:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(alice.recv_json(T).await.unwrap()["data"], "back");
    let _: i64 = backend.publish("gw:ch:chat:r", "42").await.unwrap();
    assert_eq!(sub_a.recv_json(T).await.unwrap()["data"], 42);
    assert_eq!(sub_b.recv_json(T).await.unwrap()["data"], 42);
    assert!(!a.task.is_finished() && !b.task.is_finished());
    a.wait_metric("gateway_redis_reconnects_total 1").await;
}

#[tokio::test]
async fn a_killed_node_vanishes_from_routing_within_the_ttl() {
    let redis = RedisServer::start().await;
    let survivor = start(cluster_config(&redis, "survivor")).await;
    let mut doomed = GatewayProcess::start(
        &[
            "--node-id",
            "doomed",
            "--redis-url",
            &redis.url(),
            "--jwt-secret",
            SECRET,
            "--node-heartbeat-ms",
            "200",
            "--node-ttl-ms",
            "1000",
        ],
        std::process::Stdio::null(),
    )
    .await;
    let auth = format!("Bearer {}", user_token(SECRET, "erin"));
    let mut c = connect_eventually(&doomed.url(), &[("Authorization", &auth)]).await;
    let conn = c.recv_json(T).await.unwrap()["conn_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, body) = survivor
        .admin("GET", "/v1/users/erin/connections", "", None)
        .await;
    assert!(body.contains(&conn), "{body}");

    doomed.kill(); // SIGKILL
    let killed = std::time::Instant::now();
    let mut backend = redis.client().await;
    loop {
        let left: i64 = redis::cmd("EXISTS")
            .arg(format!("gw:conn:{{{conn}}}"))
            .arg("gw:user:{erin}")
            .arg("gw:nodeconns:{doomed}")
            .query_async(&mut backend)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        // bound: ttl (1 s) + one janitor period (200 ms) + slack for a loaded machine
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "routes not purged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = survivor
        .admin("GET", "/v1/users/erin/connections", "", None)
        .await;
    assert_eq!(body, r#"{"connections":[]}"#);
    let score: Option<f64> = backend.zscore("gw:nodes", "doomed").await.unwrap();
    assert_eq!(score, None);
}

#[tokio::test]
async fn inbound_stream_gets_connect_message_disconnect_in_order() {
    let redis = RedisServer::start().await;
    let node = start(cluster_config(&redis, "n1")).await;
    let (mut c, conn) = user_client(&node, "frank").await;
    request(&mut c, json!({"type":"send","data":{"order":42},"id":1})).await;
    c.close(1000, "done").await.unwrap();
    c.recv_close(T).await.unwrap();
    let mut backend = redis.client().await;
    let deadline = tokio::time::Instant::now() + T;
    let entries = loop {
        let r: redis::streams::StreamRangeReply = backend.xrange_all("gw:inbound").await.unwrap();
        if r.ids.len() >= 3 || tokio::time::Instant::now() > deadline {
            break r.ids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let field = |e: &redis::streams::StreamId, k: &str| -> String {
        e.get::<String>(k).unwrap_or_default()
    };
    let events: Vec<String> = entries.iter().map(|e| field(e, "event")).collect();
    assert_eq!(events, ["connect", "message", "disconnect"]);
    for e in &entries {
        assert_eq!(field(e, "conn_id"), conn);
        assert_eq!(field(e, "user_id"), "frank");
        assert_eq!(field(e, "node_id"), "n1");
        assert!(field(e, "ts").parse::<u64>().unwrap() > 0);
    }
    assert_eq!(field(&entries[1], "data"), r#"{"order":42}"#);
    let close: Value = serde_json::from_str(&field(&entries[2], "data")).unwrap();
    assert_eq!(close["code"], 1000);
    // a consumer group reads it as a backend would
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("gw:inbound")
        .arg("backend")
        .arg("0")
        .query_async(&mut backend)
        .await
        .unwrap();
    let read: redis::streams::StreamReadReply = backend
        .xread_options(
            &["gw:inbound"],
            &[">"],
            &redis::streams::StreamReadOptions::default().group("backend", "worker-1"),
        )
        .await
        .unwrap();
    assert_eq!(read.keys[0].ids.len(), 3);
}

/// Pub/sub has a connection of its own: Redis dropping it (as it does a subscriber over its
/// `client-output-buffer-limit pubsub`) leaves the directory's commands unharmed, and the
/// node resubscribes.
#[tokio::test]
async fn pubsub_has_its_own_connection_and_losing_it_spares_the_commands() {
    let redis = RedisServer::start().await;
    let node = start(cluster_config(&redis, "n1")).await;
    let mut sub = node.subscriber("chat:k").await;
    let (_alice, conn) = user_client(&node, "alice").await;
    let mut backend = redis.client().await;
    let me: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut backend)
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut backend)
        .await
        .unwrap();
    let node_clients: Vec<&str> = list
        .lines()
        .filter(|l| !l.starts_with(&format!("id={me} ")))
        .collect();
    assert_eq!(node_clients.len(), 2, "{node_clients:#?}");
    let subscribers = node_clients
        .iter()
        .filter(|l| l.contains(" flags=P "))
        .count();
    assert_eq!(subscribers, 1, "one pub/sub connection: {node_clients:#?}");

    // directory commands keep flowing while the pub/sub connection is killed under them
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let askers: Vec<_> = (0..8)
        .map(|_| {
            let (admin, stop, conn) = (node.admin, stop.clone(), conn.clone());
            tokio::spawn(async move {
                let mut asked = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, body) =
                        http(admin, "GET", "/v1/users/alice/connections", "", "").await;
                    assert_eq!(status, 200, "{body}");
                    assert!(body.contains(&conn), "{body}");
                    asked += 1;
                }
                asked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut backend)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for asker in askers {
        assert!(asker.await.expect("every directory command succeeded") > 0);
    }
    let reached: i64 = fcall(&mut backend, shared::backend::send_user("alice", "1"))
        .await
        .unwrap();
    assert_eq!(reached, 1);
    // the pub/sub connection comes back with its subscriptions
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let receivers: i64 = backend.publish("gw:ch:chat:k", "7").await.unwrap();
        if receivers == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never resubscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sub.recv_json(T).await.unwrap()["data"], 7);
    node.wait_metric("gateway_redis_errors_total{op=\"disconnected\"} 1")
        .await;
}

#[tokio::test]
async fn send_needs_a_user_fits_its_cap_and_shares_the_users_rate() {
    let redis = RedisServer::start().await;
    let node = start(gateway::Config {
        max_send_bytes: 64,
        send_rate_per_user: 3,
        ..cluster_config(&redis, "n1")
    })
    .await;
    // anonymous: refused before anything reaches the stream
    let (mut anon, _) = node.client().await;
    let reply = ask(&mut anon, r#"{"type":"send","data":1,"id":1}"#).await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_u64()),
        (Some("forbidden"), Some(1))
    );
    // too big: refused, and the connection stays open
    let (mut a, _) = user_client(&node, "hank").await;
    let big = json!({"type":"send","data":"x".repeat(63),"id":2}).to_string();
    let reply = ask(&mut a, &big).await;
    assert_eq!(reply["code"], "message_too_big", "{reply}");
    request(&mut a, json!({"type":"send","data":"x".repeat(62),"id":3})).await;
    // the rate is the user's, whichever connection sends
    let (mut b, _) = user_client(&node, "hank").await;
    request(&mut b, json!({"type":"send","data":1,"id":4})).await;
    request(&mut a, json!({"type":"send","data":2,"id":5})).await;
    let reply = ask(&mut b, r#"{"type":"send","data":3,"id":6}"#).await;
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    // another user has a rate of its own
    let (mut other, _) = user_client(&node, "ivy").await;
    request(&mut other, json!({"type":"send","data":4,"id":7})).await;
    node.wait_metric("gateway_rate_limit_hits_total{kind=\"send\"} 1")
        .await;
    let mut backend = redis.client().await;
    let r: redis::streams::StreamRangeReply = backend.xrange_all("gw:inbound").await.unwrap();
    let messages = r
        .ids
        .iter()
        .filter(|e| e.get::<String>("event").as_deref() == Some("message"))
        .count();
    assert_eq!(messages, 4, "only the accepted sends reach the stream");
}

/// A 3-master Redis Cluster on free ports, made with `redis-cli --cluster create`.
struct RedisCluster {
    servers: Vec<RedisServer>,
    _dir: std::path::PathBuf,
}

impl RedisCluster {
    async fn start() -> RedisCluster {
        // one folder per cluster: tests in this process may run two at once
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gw-cluster-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut servers = Vec::new();
        for _ in 0..3 {
            let d = dir.to_str().unwrap();
            servers.push(
                RedisServer::start_with(|port| {
                    let conf = format!("nodes-{port}.conf");
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--dir",
                        d,
                    ]
                    .map(String::from)
                    .to_vec()
                })
                .await,
            );
        }
        let addrs: Vec<String> = servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // wait until every node agrees the cluster is up
        for s in &servers {
            let mut c = s.client().await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "{info}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        RedisCluster { servers, _dir: dir }
    }

    fn seeds(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[tokio::test]
async fn sharded_pubsub_and_unicast_on_a_three_master_cluster() {
    let cluster = RedisCluster::start().await;
    let on_cluster = |id: &str| gateway::Config {
        node_id: id.into(),
        redis_url: Some(cluster.seeds().into()),
        redis_cluster: true,
        redis_sharded_pubsub: true,
        jwt_secret: Some(SECRET.into()),
        rebalance: false,
        ..config()
    };
    let a = start(on_cluster("a")).await;
    let b = start(on_cluster("b")).await;
    // channels whose slots land on different masters
    let channels: Vec<String> = (0..6).map(|i| format!("chat:c{i}")).collect();
    let mut subs = Vec::new();
    for ch in &channels {
        subs.push((ch.clone(), a.subscriber(ch).await));
        subs.push((ch.clone(), b.subscriber(ch).await));
    }
    let backend = redis::cluster::ClusterClient::new(
        cluster.servers.iter().map(|s| s.url()).collect::<Vec<_>>(),
    )
    .unwrap();
    let mut backend = backend.get_async_connection().await.unwrap();
    for ch in &channels {
        let _: i64 = redis::cmd("SPUBLISH")
            .arg(format!("gw:ch:{ch}"))
            .arg(format!(r#"{{"on":"{ch}"}}"#))
            .query_async(&mut backend)
            .await
            .unwrap();
    }
    let (mut p, _) = a.client().await;
    request(
        &mut p,
        json!({"type":"publish","channel":"chat:c0","data":"client","id":1}),
    )
    .await;
    for (ch, s) in &mut subs {
        assert_eq!(s.recv_json(T).await.unwrap()["data"]["on"], ch.as_str());
    }
    for (ch, s) in &mut subs {
        if ch == "chat:c0" {
            assert_eq!(s.recv_json(T).await.unwrap()["data"], "client");
        }
    }
    // unicast through the functions, loaded on every master
    let (mut on_a, _) = user_client(&a, "gina").await;
    let (mut on_b, _) = user_client(&b, "gina").await;
    let reached: i64 = fcall(&mut backend, shared::backend::send_user("gina", "7"))
        .await
        .unwrap();
    assert_eq!(reached, 2);
    assert_eq!(on_a.recv_json(T).await.unwrap()["data"], 7);
    assert_eq!(on_b.recv_json(T).await.unwrap()["data"], 7);
    let (status, body) = b
        .admin("POST", "/v1/users/gina/send", r#"{"data":8}"#, None)
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"delivered":2}"#));
    assert_eq!(on_a.recv_json(T).await.unwrap()["data"], 8);
}

/// History channels on Redis Cluster with sharded pub/sub: a backend's `FCALL gw_publish`
/// (routed by the channel's slot) appends and publishes on one shard, since the channel's
/// keys and its pub/sub channel `gw:ch:{<channel>}` share that slot; subscribers on both
/// nodes get the offsets, and a client recovers on the other node.
#[tokio::test]
async fn history_on_a_three_master_cluster_with_sharded_pubsub() {
    let cluster = RedisCluster::start().await;
    let on_cluster = |id: &str| gateway::Config {
        node_id: id.into(),
        redis_url: Some(cluster.seeds().into()),
        redis_cluster: true,
        redis_sharded_pubsub: true,
        channels: vec!["hist:*?history_size=10&history_ttl_secs=60"
            .parse()
            .unwrap()],
        rebalance: false,
        ..config()
    };
    let a = start(on_cluster("a")).await;
    let b = start(on_cluster("b")).await;
    let backend = redis::cluster::ClusterClient::new(
        cluster.servers.iter().map(|s| s.url()).collect::<Vec<_>>(),
    )
    .unwrap();
    let mut backend = backend.get_async_connection().await.unwrap();
    // channels whose slots land on different masters
    for i in 0..4 {
        let ch = format!("hist:c{i}");
        let (mut s, _) = b.client().await;
        s.send_json(&json!({"type":"subscribe","channel":ch,"id":1}))
            .await
            .unwrap();
        let ack = s.recv_json(T).await.unwrap();
        assert_eq!(
            (ack["type"].as_str(), ack["offset"].as_u64()),
            (Some("ack"), Some(0))
        );
        let epoch = ack["epoch"].as_str().unwrap().to_owned();
        for n in 1..=3 {
            let (offset, e): (u64, String) = redis::cmd("FCALL")
                .arg("gw_publish")
                .arg(1)
                .arg(&ch)
                .arg(format!(r#"{{"n":{n}}}"#))
                .query_async(&mut backend)
                .await
                .unwrap();
            assert_eq!((offset, e.as_str()), (n, epoch.as_str()));
        }
        for n in 1..=3u64 {
            let m = s.recv_json(T).await.unwrap();
            assert_eq!(
                (m["offset"].as_u64(), m["data"]["n"].as_u64()),
                (Some(n), Some(n))
            );
        }
        // a client that saw offset 1 recovers 2 and 3 on the other node
        let (mut r, _) = a.client().await;
        r.send_json(&json!({"type":"subscribe","channel":ch,"id":2,
            "recover":{"epoch":epoch,"offset":1}}))
            .await
            .unwrap();
        let ack = r.recv_json(T).await.unwrap();
        assert_eq!(ack["recovered"], true, "{ack}");
        for n in 2..=3u64 {
            assert_eq!(r.recv_json(T).await.unwrap()["offset"].as_u64(), Some(n));
        }
    }
}

/// The directory's batched writes (resync after Redis lost everything, and the purge of a
/// node's routes) on Redis Cluster, where a batch's keys span every master.
#[tokio::test]
async fn batched_resync_and_purge_on_a_three_master_cluster() {
    use gateway::test_util::Directory;
    use std::sync::Arc;
    const CONNS: usize = 1_200;
    let cluster = RedisCluster::start().await;
    let config = gateway::Config {
        node_id: "big".into(),
        redis_url: Some(cluster.seeds().into()),
        redis_cluster: true,
        rebalance: false,
        ..config()
    };
    let redis = gateway::test_util::Redis::connect(&config, Arc::default())
        .await
        .unwrap();
    let dir = Directory::new(&config, Some(redis), Arc::default());
    dir.start().await.unwrap();
    for i in 0..CONNS {
        let user = (i % 4 != 3).then(|| format!("u{}", i / 4));
        let out = Arc::new(gateway::test_util::Outbound::new(
            1 << 16,
            &gateway::test_util::V1,
        ));
        dir.add(
            &format!("big.c.{i}").into(),
            i as u64,
            user.as_deref(),
            out,
            None,
        )
        .await
        .unwrap();
    }
    for s in &cluster.servers {
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut s.client().await)
            .await
            .unwrap();
    }
    let backend = redis::cluster::ClusterClient::new(
        cluster.servers.iter().map(|s| s.url()).collect::<Vec<_>>(),
    )
    .unwrap();
    let mut backend = backend.get_async_connection().await.unwrap();
    let recorded: usize = backend.hlen("gw:nodeconns:{big}").await.unwrap();
    assert_eq!(recorded, 0, "FLUSHALL left records");

    assert_eq!(dir.resync().await.unwrap(), CONNS);
    let recorded: usize = backend.hlen("gw:nodeconns:{big}").await.unwrap();
    assert_eq!(recorded, CONNS);
    let entry: Option<String> = backend.get("gw:conn:{big.c.1198}").await.unwrap();
    assert!(entry.unwrap().starts_with("big "));
    // every user's hash is back, on whichever master owns it (the heartbeat is not running:
    // write the liveness entry that listing checks)
    let _: () = backend
        .zadd("gw:nodes", "big", gateway::test_util::now_ms() + 60_000)
        .await
        .unwrap();
    for u in [0, 150, 299] {
        let listed = dir.user_connections(&format!("u{u}")).await.unwrap();
        assert_eq!(listed.len(), 3, "u{u}: {listed:?}");
    }

    dir.leave().await;
    let recorded: usize = backend.hlen("gw:nodeconns:{big}").await.unwrap();
    assert_eq!(recorded, 0);
    for u in [0, 150, 299] {
        let left: usize = backend.hlen(format!("gw:user:{{u{u}}}")).await.unwrap();
        assert_eq!(left, 0, "u{u} kept routes");
    }
    let entry: Option<String> = backend.get("gw:conn:{big.c.1198}").await.unwrap();
    assert_eq!(entry, None);
    let live: Option<f64> = backend.zscore("gw:nodes", "big").await.unwrap();
    assert_eq!(live, None);
}
