//! Presence with real nodes, real clients and a real `redis-server` (started by the test on
//! a free port): members and counts across nodes, join and leave frames, a node killed
//! with SIGKILL, a Redis restart; and the store conformance suite against the memory and
//! the Redis store.

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::GatewayProcess;
use common::redis_server::RedisServer;
use common::*;
use gateway::test_util::{presence_conformance as conformance, Broker, RedisBroker};
use loadtest::client::Client;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "presence-test-secret-0123456789-abcdef";
const ROOM: &str = "room:*?presence&join_leave";
const LOBBY: &str = "lobby:*?presence&user_join_leave";

fn channels() -> Vec<gateway::test_util::ChannelOptions> {
    [ROOM, LOBBY, "quiet:*?presence"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn node_config(node_id: &str, redis: Option<&RedisServer>) -> gateway::Config {
    gateway::Config {
        node_id: node_id.into(),
        redis_url: redis.map(|r| r.url().into()),
        jwt_secret: Some(SECRET.into()),
        channels: channels(),
        // these tests place clients on purpose
        rebalance: false,
        ..config()
    }
}

fn token(user: &str, info: Value) -> String {
    hs256(
        SECRET,
        &json!({"sub": user, "exp": gateway::test_util::now_secs() + 600, "info": info}),
    )
}

/// A client of `user` (anonymous with `None`) on `url`; returns it and its conn_id.
async fn client(url: &str, user: Option<&str>) -> (Client, String) {
    let mut c = match user {
        Some(u) => {
            let auth = format!("Bearer {}", token(u, json!({"name": u.to_uppercase()})));
            connect_eventually(url, &[("Authorization", &auth)]).await
        }
        None => connect_eventually(url, &[]).await,
    };
    let welcome = c.recv_json(T).await.unwrap();
    assert_eq!(welcome["type"], "welcome");
    (c, welcome["conn_id"].as_str().unwrap().to_owned())
}

/// Sends a request and returns its reply (the frame with its id), skipping any join or
/// leave frames that arrive first; they are kept in `events`.
async fn call_keeping(c: &mut Client, req: Value, events: &mut Vec<Value>) -> Value {
    c.send_json(&req).await.expect("send");
    loop {
        let f = c.recv_json(T).await.expect("reply");
        if f.get("id") == Some(&req["id"]) {
            return f;
        }
        events.push(f);
    }
}

async fn call(c: &mut Client, req: Value) -> Value {
    call_keeping(c, req, &mut Vec::new()).await
}

async fn subscribe(c: &mut Client, channel: &str) {
    let r = call(c, json!({"type":"subscribe","channel":channel,"id":1})).await;
    assert_eq!(r, json!({"type":"ack","id":1}), "subscribe to {channel}");
}

async fn stats(c: &mut Client, channel: &str) -> (u64, u64) {
    let r = call(c, json!({"type":"presence_stats","channel":channel,"id":4})).await;
    assert_eq!(r["type"], "ack", "{r}");
    (
        r["num_clients"].as_u64().unwrap(),
        r["num_users"].as_u64().unwrap(),
    )
}

async fn members(c: &mut Client, channel: &str) -> Value {
    let r = call(c, json!({"type":"presence","channel":channel,"id":3})).await;
    assert_eq!(r["type"], "ack", "{r}");
    r["presence"].clone()
}

/// The next join or leave frame (within `within`).
async fn event(c: &mut Client, within: Duration) -> Value {
    let f = c.recv_json(within).await.expect("a join or leave frame");
    assert!(f["type"] == "join" || f["type"] == "leave", "{f}");
    f
}

/// Asserts that nothing more arrives for a moment.
async fn quiet(c: &mut Client) {
    if let Ok(f) = c.recv_json(Duration::from_millis(300)).await {
        panic!("unexpected frame {f}");
    }
}

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run_all(|| async {
        let heard: conformance::Heard = Arc::default();
        let h = heard.clone();
        let sink: gateway::test_util::Sink = Arc::new(move |c: &str, p: &str| {
            h.lock().unwrap().push((c.to_owned(), p.to_owned()));
        });
        let store = gateway::test_util::MemoryPresence::new("solo", &conformance::channels(), sink);
        conformance::Fixture {
            node_id: "solo".into(),
            store: Arc::new(store),
            heard,
            watch: Box::new(|_| Box::pin(async {})),
            keep: None,
        }
    })
    .await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let server = RedisServer::start().await;
    let n = AtomicUsize::new(0);
    conformance::run_all(|| {
        // a prefix per case: every case starts from empty keys
        let config = gateway::Config {
            node_id: "n1".into(),
            redis_url: Some(server.url().into()),
            redis_prefix: format!("pconf{}:", n.fetch_add(1, Ordering::Relaxed)),
            ..common::config()
        };
        async move {
            let redis = gateway::test_util::Redis::connect(&config, Arc::default())
                .await
                .expect("connect");
            let heard: conformance::Heard = Arc::default();
            let h = heard.clone();
            let sink: gateway::test_util::Sink = Arc::new(move |c: &str, p: &str| {
                h.lock().unwrap().push((c.to_owned(), p.to_owned()));
            });
            let broker = Arc::new(RedisBroker::new(redis.clone(), sink, Arc::default(), &[]));
            let store =
                gateway::test_util::RedisPresence::new(redis, "n1", &conformance::channels());
            gateway::test_util::PresenceStore::start(&store)
                .await
                .expect("load");
            let watcher = broker.clone();
            conformance::Fixture {
                node_id: "n1".into(),
                store: Arc::new(store),
                heard,
                watch: Box::new(move |channel: &str| {
                    let (b, channel) = (watcher.clone(), channel.to_owned());
                    Box::pin(async move { b.subscribe(&channel).await.expect("watch") })
                }),
                keep: Some(Box::new(broker)),
            }
        }
    })
    .await;
}

/// Two users on two nodes; a third connection of one of them; join and leave across nodes.
#[tokio::test]
async fn presence_and_stats_span_nodes_with_join_and_leave() {
    let redis = RedisServer::start().await;
    let a = start(node_config("a", Some(&redis))).await;
    let b = start(node_config("b", Some(&redis))).await;
    let ch = "room:1";
    let (mut alice, alice_id) = client(&a.url(), Some("alice")).await;
    subscribe(&mut alice, ch).await;
    let (mut bob, bob_id) = client(&b.url(), Some("bob")).await;
    subscribe(&mut bob, ch).await;

    let join = event(&mut alice, T).await;
    assert_eq!(
        join,
        json!({"type":"join","channel":ch,"conn_id":bob_id,"user_id":"bob","info":{"name":"BOB"}}),
        "alice on node a hears bob join on node b"
    );
    quiet(&mut bob).await; // not told of its own join
    for c in [&mut alice, &mut bob] {
        let m = members(c, ch).await;
        assert_eq!(
            m,
            json!({
                alice_id.clone(): {"user_id":"alice","info":{"name":"ALICE"}},
                bob_id.clone(): {"user_id":"bob","info":{"name":"BOB"}},
            })
        );
        assert_eq!(stats(c, ch).await, (2, 2));
    }

    // a third connection of alice, on b: 3 clients, 2 users
    let (mut alice2, alice2_id) = client(&b.url(), Some("alice")).await;
    subscribe(&mut alice2, ch).await;
    for c in [&mut alice, &mut bob] {
        let j = event(c, T).await;
        assert_eq!(
            (&j["type"], &j["conn_id"]),
            (&json!("join"), &json!(alice2_id))
        );
    }
    assert_eq!(stats(&mut alice, ch).await, (3, 2));
    assert_eq!(stats(&mut alice2, ch).await, (3, 2));

    // an anonymous subscriber counts as a client, not a user
    let (mut anon, anon_id) = client(&a.url(), None).await;
    subscribe(&mut anon, ch).await;
    let j = event(&mut bob, T).await;
    assert_eq!(
        j,
        json!({"type":"join","channel":ch,"conn_id":anon_id,"user_id":null,"info":null})
    );
    assert_eq!(stats(&mut bob, ch).await, (4, 2));
    anon.close(1000, "").await.unwrap();
    let l = event(&mut bob, T).await;
    assert_eq!(
        (&l["type"], &l["conn_id"]),
        (&json!("leave"), &json!(anon_id))
    );

    // leave on unsubscribe and on disconnect, heard on the other node
    let r = call(
        &mut alice2,
        json!({"type":"unsubscribe","channel":ch,"id":9}),
    )
    .await;
    assert_eq!(r["type"], "ack");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(event(&mut alice, T).await);
    }
    assert_eq!(
        (&got[0]["type"], &got[0]["conn_id"]),
        (&json!("join"), &json!(anon_id))
    );
    assert_eq!(
        (&got[1]["type"], &got[1]["conn_id"]),
        (&json!("leave"), &json!(anon_id))
    );
    assert_eq!(
        got[2],
        json!({"type":"leave","channel":ch,"conn_id":alice2_id,"user_id":"alice","info":{"name":"ALICE"}})
    );
    assert_eq!(stats(&mut alice, ch).await, (2, 2));
    bob.close(1000, "").await.unwrap();
    let l = event(&mut alice, T).await;
    assert_eq!(
        (&l["type"], &l["conn_id"]),
        (&json!("leave"), &json!(bob_id))
    );
    assert_eq!(stats(&mut alice, ch).await, (1, 1));

    // not subscribed any more: forbidden
    let r = call(&mut alice2, json!({"type":"presence","channel":ch,"id":3})).await;
    assert_eq!(r["code"], "forbidden", "{r}");

    // the same numbers from the admin API of either node, and from the keys
    let (status, body) = b
        .admin("GET", "/v1/channels/room:1/presence_stats", "", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"num_clients":1,"num_users":1})
    );
    let mut backend = redis.client().await;
    let (clients, users): (u64, u64) = redis::pipe()
        .cmd("HLEN")
        .arg("gw:pres:{room:1}")
        .cmd("HLEN")
        .arg("gw:presu:{room:1}")
        .query_async(&mut backend)
        .await
        .unwrap();
    assert_eq!((clients, users), (1, 1));
}

/// Requests on channels without presence, by non-subscribers, and info claims too large.
#[tokio::test]
async fn presence_rules_and_the_info_claim() {
    let node = start(gateway::Config {
        presence_max_members: 2,
        ..node_config("solo", None)
    })
    .await;
    let (mut c, _) = client(&node.url(), Some("ann")).await;
    subscribe(&mut c, "plain").await;
    for kind in ["presence", "presence_stats"] {
        let r = call(&mut c, json!({"type":kind,"channel":"plain","id":7})).await;
        assert_eq!(r["code"], "not_enabled", "{r}");
        let r = call(&mut c, json!({"type":kind,"channel":"quiet:x","id":8})).await;
        assert_eq!(r["code"], "forbidden", "not subscribed: {r}");
    }
    // presence_max_members = 2: three members, two shown, truncated
    subscribe(&mut c, "quiet:x").await;
    let mut others = Vec::new();
    for _ in 0..2 {
        let (mut o, _) = client(&node.url(), None).await;
        subscribe(&mut o, "quiet:x").await;
        others.push(o);
    }
    let r = call(
        &mut c,
        json!({"type":"presence","channel":"quiet:x","id":3}),
    )
    .await;
    assert_eq!(r["presence"].as_object().unwrap().len(), 2, "{r}");
    assert_eq!(r["truncated"], true);
    assert_eq!(stats(&mut c, "quiet:x").await, (3, 1));
    drop(others.pop());
    let deadline = tokio::time::Instant::now() + T;
    while stats(&mut c, "quiet:x").await != (2, 1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed one stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = call(
        &mut c,
        json!({"type":"presence","channel":"quiet:x","id":3}),
    )
    .await;
    assert_eq!(r["presence"].as_object().unwrap().len(), 2, "{r}");
    assert_eq!(r.get("truncated"), None, "not truncated: {r}");

    // info: an object of at most 1 KiB, or 401 invalid_info at the handshake
    let big = json!({"bio": "x".repeat(1100)});
    for info in [big, json!("a string"), json!([1, 2])] {
        let t = token("ann", info.clone());
        let (status, body) = handshake(&node, &t).await;
        assert_eq!(
            (status, &body["error"]),
            (401, &json!("invalid_info")),
            "{info}"
        );
    }
    let fits = json!({"bio": "x".repeat(1000)});
    assert_eq!(handshake(&node, &token("ann", fits)).await.0, 101);
}

/// user_join_leave: join on a user's first connection, leave on their last.
#[tokio::test]
async fn user_join_leave_announces_a_users_first_and_last() {
    let node = start(node_config("solo", None)).await;
    let ch = "lobby:1";
    let (mut watcher, _) = client(&node.url(), Some("wendy")).await;
    subscribe(&mut watcher, ch).await;
    let (mut u1, u1_id) = client(&node.url(), Some("uma")).await;
    subscribe(&mut u1, ch).await;
    let j = event(&mut watcher, T).await;
    assert_eq!((&j["type"], &j["conn_id"]), (&json!("join"), &json!(u1_id)));
    let (mut u2, u2_id) = client(&node.url(), Some("uma")).await;
    subscribe(&mut u2, ch).await;
    quiet(&mut watcher).await; // uma's second connection: no join
    assert_eq!(stats(&mut watcher, ch).await, (3, 2));
    u1.close(1000, "").await.unwrap();
    quiet(&mut watcher).await; // not uma's last: no leave
    u2.close(1000, "").await.unwrap();
    let l = event(&mut watcher, T).await;
    assert_eq!(
        (&l["type"], &l["conn_id"], &l["user_id"]),
        (&json!("leave"), &json!(u2_id), &json!("uma"))
    );
    assert_eq!(stats(&mut watcher, ch).await, (1, 1));
}

/// The admin API pages through every member, on both stores.
#[tokio::test]
async fn admin_api_pages_through_every_member() {
    let redis = RedisServer::start().await;
    for node in [
        start(node_config("mem", None)).await,
        start(node_config("red", Some(&redis))).await,
    ] {
        let mut clients = Vec::new();
        let mut ids = BTreeSet::new();
        for i in 0..7 {
            let user = format!("u{}", i % 3);
            let (mut c, id) = client(&node.url(), Some(&user)).await;
            subscribe(&mut c, "quiet:many").await;
            clients.push(c);
            ids.insert(id);
        }
        let mut seen = BTreeSet::new();
        let mut cursor = String::new();
        for _ in 0..20 {
            let path = format!("/v1/channels/quiet:many/presence?limit=3&cursor={cursor}");
            let (status, body) = node.admin("GET", &path, "", None).await;
            assert_eq!(status, 200, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            for (conn, m) in v["presence"].as_object().unwrap() {
                assert!(m["user_id"].as_str().unwrap().starts_with('u'));
                assert_eq!(m["info"]["name"].as_str().unwrap().len(), 2);
                seen.insert(conn.clone());
            }
            match v["cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => break,
            }
        }
        assert_eq!(seen, ids, "every member on some page");
        let (status, body) = node
            .admin("GET", "/v1/channels/quiet:many/presence_stats", "", None)
            .await;
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"num_clients":7,"num_users":3}"#)
        );
        let (status, body) = node
            .admin("GET", "/v1/channels/plain/presence", "", None)
            .await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("not_enabled"), "{body}");
    }
}

/// kill -9 of a node: its members leave presence within the purge bound (node_ttl_ms +
/// node_heartbeat_ms, 12 s with the defaults used here), and the other node's subscriber
/// gets a leave frame for each.
#[tokio::test]
async fn a_killed_nodes_members_leave_within_the_purge_bound() {
    let redis = RedisServer::start().await;
    // default heartbeat (2 s) and ttl (10 s): the documented bound is about 12 s
    let a = start(node_config("survivor", Some(&redis))).await;
    let mut doomed = GatewayProcess::start(
        &[
            "--node-id",
            "doomed",
            "--redis-url",
            &redis.url(),
            "--jwt-secret",
            SECRET,
            "--allow-anonymous",
            "--rebalance",
            "false",
            "--channels",
            ROOM,
        ],
        std::process::Stdio::null(),
    )
    .await;
    let ch = "room:k";
    let (mut watcher, watcher_id) = client(&a.url(), Some("wanda")).await;
    subscribe(&mut watcher, ch).await;
    let mut doomed_ids = BTreeSet::new();
    let mut doomed_clients = Vec::new();
    for user in [Some("carl"), Some("carl"), None] {
        let (mut c, id) = client(&doomed.url(), user).await;
        subscribe(&mut c, ch).await;
        let j = event(&mut watcher, T).await;
        assert_eq!(j["conn_id"], id.as_str());
        doomed_ids.insert(id);
        doomed_clients.push(c);
    }
    assert_eq!(stats(&mut watcher, ch).await, (4, 2));

    doomed.kill(); // SIGKILL
    let killed = Instant::now();
    let bound = Duration::from_millis(10_000 + 2_000);
    let slack = Duration::from_secs(4); // a loaded machine
    let mut left = BTreeSet::new();
    let mut events = Vec::new();
    let gone_at = loop {
        let s = {
            let r = call_keeping(
                &mut watcher,
                json!({"type":"presence_stats","channel":ch,"id":4}),
                &mut events,
            )
            .await;
            (r["num_clients"].as_u64(), r["num_users"].as_u64())
        };
        if s == (Some(1), Some(1)) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < bound + slack,
            "still {s:?} after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // the leaves were published in the same step as the removals
    let deadline = tokio::time::Instant::now() + T;
    while left.len() < 3 && tokio::time::Instant::now() < deadline {
        for e in events.drain(..) {
            assert_eq!(e["type"], "leave", "{e}");
            left.insert(e["conn_id"].as_str().unwrap().to_owned());
        }
        if left.len() < 3 {
            if let Ok(e) = watcher.recv_json(Duration::from_millis(200)).await {
                events.push(e);
            }
        }
    }
    let leaves_at = killed.elapsed();
    assert_eq!(
        left, doomed_ids,
        "a leave for each of the dead node's members"
    );
    let m = members(&mut watcher, ch).await;
    assert_eq!(
        m.as_object().unwrap().keys().collect::<Vec<_>>(),
        [&watcher_id]
    );
    println!(
        "kill -9: presence clean after {gone_at:?}, all leaves by {leaves_at:?} (bound {bound:?})"
    );
    let mut backend = redis.client().await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg("gw:nodepres:{doomed}")
        .query_async(&mut backend)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the dead node's presence record is gone");
}

/// A Redis restart (empty): presence is rebuilt from the live nodes.
#[tokio::test]
async fn presence_is_rebuilt_after_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let a = start(node_config("a", Some(&redis))).await;
    let b = start(node_config("b", Some(&redis))).await;
    let ch = "room:r";
    let (mut alice, _) = client(&a.url(), Some("alice")).await;
    subscribe(&mut alice, ch).await;
    let (mut bob, _) = client(&b.url(), Some("bob")).await;
    subscribe(&mut bob, ch).await;
    let (mut bob2, _) = client(&b.url(), Some("bob")).await;
    subscribe(&mut bob2, ch).await;
    assert_eq!(stats(&mut alice, ch).await, (3, 2));

    redis.restart().await;
    let restarted = Instant::now();
    let mut backend = redis.client().await;
    let rebuilt = loop {
        let r = call(
            &mut alice,
            json!({"type":"presence_stats","channel":ch,"id":4}),
        )
        .await;
        if (r["num_clients"].as_u64(), r["num_users"].as_u64()) == (Some(3), Some(2)) {
            let n: u64 = redis::cmd("SCARD")
                .arg("gw:nodepres:{b}")
                .query_async(&mut backend)
                .await
                .unwrap();
            if n == 2 {
                break restarted.elapsed();
            }
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "presence not rebuilt in 30 s: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("presence rebuilt {rebuilt:?} after the Redis restart");
    let m = members(&mut bob, ch).await;
    assert_eq!(m.as_object().unwrap().len(), 3, "{m}");
    // and it keeps working: a leave after the restart reaches the other node
    bob2.close(1000, "").await.unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let f = alice.recv_json(T).await.expect("leave");
        if f["type"] == "leave" {
            break;
        }
        // joins written back by the resync may come first
        assert_eq!(f["type"], "join", "{f}");
        assert!(tokio::time::Instant::now() < deadline);
    }
    assert_eq!(stats(&mut alice, ch).await, (2, 2));
}

/// An upgrade request with `token`; the status and, when refused, the JSON body.
async fn handshake(node: &TestNode, token: &str) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(T, s.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap_or(0);
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        if status == 101 {
            return (101, Value::Null);
        }
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            if let Ok(v) = serde_json::from_str::<Value>(body) {
                return (status, v);
            }
        }
        assert!(n > 0, "connection closed: {text}");
    }
}
