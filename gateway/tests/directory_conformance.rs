//! The directory conformance suite, run against both backends: the local one (a single node,
//! no Redis), and the Redis one on a real `redis-server` that this test starts on a free
//! port. Also: a resync of many connections after Redis restarted empty keeps the node
//! alive throughout.

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis_server::RedisServer;
use gateway::test_util::Outbound;
use gateway::test_util::{directory_conformance as conformance, now_ms, Directory};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn local_records_conform() {
    conformance::run_all(|| async {
        let config = gateway::Config {
            node_id: "solo".into(),
            ..common::config()
        };
        let dir = Directory::new(&config, None, Arc::default());
        dir.start().await.expect("start");
        conformance::Fixture::of(dir, "solo")
    })
    .await;
}

#[tokio::test]
async fn redis_records_conform() {
    let server = RedisServer::start().await;
    let n = AtomicUsize::new(0);
    conformance::run_all(|| {
        // a prefix per case: every case starts from empty records
        let config = gateway::Config {
            node_id: "n1".into(),
            redis_url: Some(server.url().into()),
            redis_prefix: format!("conf{}:", n.fetch_add(1, Ordering::Relaxed)),
            ..common::config()
        };
        async move {
            let redis = gateway::test_util::Redis::connect(&config, Arc::default())
                .await
                .expect("connect");
            let dir = Directory::new(&config, Some(redis), Arc::default());
            dir.start().await.expect("start");
            conformance::Fixture::of(dir, "n1")
        }
    })
    .await;
}

/// 15,000 connections on one node, Redis restarted empty: the heartbeat keeps the node's
/// liveness entry in the future while the resync rewrites them all, and the resync ends
/// well within `node_ttl_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_of_15k_connections_never_lets_the_heartbeat_lapse() {
    const CONNS: usize = 15_000;
    let mut server = RedisServer::start().await;
    let config = gateway::Config {
        node_id: "big".into(),
        redis_url: Some(server.url().into()),
        node_heartbeat_ms: 200,
        node_ttl_ms: 1_000,
        rebalance: false,
        ..common::config()
    };
    let redis = gateway::test_util::Redis::connect(&config, Arc::default())
        .await
        .expect("connect");
    let dir = Directory::new(&config, Some(redis.clone()), Arc::default());
    dir.start().await.expect("start");
    // three connections per user, one in six anonymous
    let user = |i: usize| (i % 6 != 5).then(|| format!("u{}", i / 3));
    let mut adds = tokio::task::JoinSet::new();
    for w in 0..8 {
        let dir = dir.clone();
        adds.spawn(async move {
            for i in (w..CONNS).step_by(8) {
                let out = Arc::new(Outbound::new(1 << 16, &gateway::test_util::V1));
                dir.add(
                    &format!("big.c.{i}").into(),
                    i as u64,
                    user(i).as_deref(),
                    out,
                    None,
                )
                .await
                .expect("add");
            }
        });
    }
    while let Some(r) = adds.join_next().await {
        r.unwrap();
    }
    assert_eq!(dir.local_count(), CONNS);

    let stop = CancellationToken::new();
    let run = tokio::spawn(dir.clone().run(CancellationToken::new(), stop.clone()));
    server.restart().await;
    let restarted = tokio::time::Instant::now();
    let mut backend = server.client().await;

    // the first heartbeat after the restart writes the liveness entry again
    let deadline = restarted + Duration::from_secs(10);
    let expiry = loop {
        let e: Option<f64> = backend.zscore("gw:nodes", "big").await.unwrap();
        if let Some(e) = e {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no heartbeat after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(expiry as u64 > now_ms());

    // from then on, every 100 ms: the entry is in the future, until the resync is done
    let mut samples = 0;
    let done = loop {
        let e: Option<f64> = backend.zscore("gw:nodes", "big").await.unwrap();
        let now = now_ms();
        assert!(
            e.is_some_and(|e| e as u64 > now),
            "liveness lapsed during the resync: expiry {e:?}, now {now}"
        );
        samples += 1;
        let recorded: usize = backend.hlen("gw:nodeconns:{big}").await.unwrap();
        let users: usize = backend.hlen("gw:user:{u4999}").await.unwrap();
        if recorded == CONNS && users == 2 {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "resync incomplete after 30 s: {recorded} of {CONNS}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // a few more beats' worth of samples after it, still alive
    for _ in 0..5 {
        let e: Option<f64> = backend.zscore("gw:nodes", "big").await.unwrap();
        assert!(
            e.is_some_and(|e| e as u64 > now_ms()),
            "liveness lapsed after the resync"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("resync of {CONNS} connections done {done:?} after the restart; {samples} samples");
    assert!(
        done < Duration::from_millis(config.node_ttl_ms * 5),
        "resync took {done:?}"
    );

    // the records are whole: a unicast reaches all of a user's connections
    let entry: Option<String> = backend.get("gw:conn:{big.c.14998}").await.unwrap();
    assert_eq!(
        entry.as_deref().map(|e| e.split(' ').next()),
        Some(Some("big"))
    );
    assert_eq!(dir.send_user("u4999", "1").await.unwrap(), 2);
    let listed = dir.user_connections("u0").await.unwrap();
    assert_eq!(listed.len(), 3);

    stop.cancel();
    run.await.unwrap();
}
