//! Three gateway processes behind a real nginx (Debian's package), once round-robin
//! (non-sticky) and once with `ip_hash` (sticky). One node is killed with SIGKILL; its clients
//! reconnect through nginx to the survivors, resubscribe, and keep receiving channel messages
//! and unicasts. Nothing a client needs lives only in the dead node.

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::nginx::Nginx;
use common::process::GatewayProcess;
use common::redis_server::RedisServer;
use common::*;
use loadtest::client::Client;
use redis::AsyncCommands;
use serde_json::json;

const SECRET: &str = "lb-test-secret-0123456789-abcdefghij";

async fn start_gateway(id: &str, redis: &RedisServer) -> GatewayProcess {
    GatewayProcess::start(
        &[
            "--node-id",
            id,
            "--redis-url",
            &redis.url(),
            "--jwt-secret",
            SECRET,
            "--trusted-proxies",
            "127.0.0.1/32",
            "--node-heartbeat-ms",
            "200",
            "--node-ttl-ms",
            "1000",
            // failover is under test here; rebalancing (which would also move clients, and
            // loops under ip_hash) is tested in operations.rs
            "--rebalance",
            "false",
        ],
        Stdio::null(),
    )
    .await
}

/// A client as an application would write it: connect through the load balancer, subscribe,
/// and on loss reconnect and resubscribe.
struct App {
    user: String,
    client: Client,
    node: String,
}

impl App {
    async fn connect(lb: &Nginx, user: &str) -> App {
        let url = lb.url();
        let auth = format!("Bearer {}", user_token(SECRET, user));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut client) = Client::connect_with(&url, &[("Authorization", &auth)]).await {
                if let Ok(welcome) = client.recv_json(T).await {
                    request(
                        &mut client,
                        json!({"type":"subscribe","channel":"chat:lb","id":1}),
                    )
                    .await;
                    return App {
                        user: user.into(),
                        node: welcome["node_id"].as_str().unwrap().into(),
                        client,
                    };
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no reconnect");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn survive_a_node_kill(balance: &str, name: &str) {
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push((
            format!("g{i}"),
            start_gateway(&format!("g{i}"), &redis).await,
        ));
    }
    let ports: Vec<u16> = nodes.iter().map(|(_, g)| g.port).collect();
    let lb = Nginx::start(balance, &ports, name).await;
    let mut apps = Vec::new();
    for i in 0..6 {
        apps.push(App::connect(&lb, &format!("user{i}")).await);
    }
    let mut spread: Vec<&str> = apps.iter().map(|a| a.node.as_str()).collect();
    spread.sort();
    spread.dedup();
    if balance.is_empty() {
        assert_eq!(spread.len(), 3, "round-robin spreads clients");
    } else {
        assert_eq!(spread.len(), 1, "ip_hash keeps one address on one node");
    }
    let mut backend = redis.client().await;
    let _: i64 = backend.publish("gw:ch:chat:lb", "1").await.unwrap();
    for app in &mut apps {
        assert_eq!(app.client.recv_json(T).await.unwrap()["data"], 1);
    }

    // kill the node that holds the first client
    let victim = apps[0].node.clone();
    nodes
        .iter_mut()
        .find(|(id, _)| *id == victim)
        .unwrap()
        .1
        .kill();
    let mut moved = 0;
    for app in &mut apps {
        if app.node == victim {
            // the socket dies with the node; the app notices and reconnects through nginx
            assert!(app.client.recv_json(T).await.is_err());
            *app = App::connect(&lb, &app.user.clone()).await;
            assert_ne!(app.node, victim);
            moved += 1;
        }
    }
    assert!(moved >= 1);
    eprintln!(
        "{name}: {moved} of {} clients moved off {victim}",
        apps.len()
    );

    // channel messages and unicasts reach every client, on whichever node it now is
    let _: i64 = backend.publish("gw:ch:chat:lb", "2").await.unwrap();
    for app in &mut apps {
        assert_eq!(app.client.recv_json(T).await.unwrap()["data"], 2);
    }
    for app in &mut apps {
        let reached: i64 = fcall(
            &mut backend,
            shared::backend::send_user(&app.user, r#""hi""#),
        )
        .await
        .unwrap();
        assert_eq!(reached, 1, "{} on {}", app.user, app.node);
        assert_eq!(
            app.client.recv_json(T).await.unwrap(),
            json!({"type":"direct","data":"hi"})
        );
    }
}

#[tokio::test]
async fn non_sticky_round_robin_survives_a_node_kill() {
    survive_a_node_kill("", "rr").await;
}

#[tokio::test]
async fn sticky_ip_hash_survives_a_node_kill() {
    survive_a_node_kill("ip_hash;", "iphash").await;
}
