//! Shutdown order: readiness false, listener closed, clients drained with 1012 and a
//! reconnect hint, exit 0.

mod common;

use std::process::{Command, Stdio};

use common::process::GatewayProcess;
use common::*;

#[tokio::test]
async fn shutdown_drains_clients_with_1012_and_stops_accepting() {
    let node = start(config()).await;
    let (mut a, _) = node.client().await;
    let (mut b, _) = node.client().await;
    node.shutdown.cancel();
    for c in [&mut a, &mut b] {
        let (code, reason) = c.recv_close(T).await.expect("close");
        assert_eq!(code, 1012);
        assert!(reason.contains("retry_after_ms="), "{reason}");
    }
    tokio::time::timeout(T, node.task)
        .await
        .expect("run returns within the grace")
        .expect("no panic")
        .expect("run returned Ok");
    assert!(
        tokio::net::TcpStream::connect(node.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn readiness_turns_false_before_clients_are_closed() {
    let mut cfg = config();
    cfg.shutdown_grace_ms = 3000;
    let node = start(cfg).await;
    // This raw client never answers the close, so the node waits on it during the grace,
    // which gives the test time to look at /readyz while shutdown is in progress.
    let mut raw = Raw::connect(&node).await;
    node.shutdown.cancel();
    assert_eq!(raw.close_code().await, 1012);
    let (status, body) = node.admin("GET", "/readyz", "", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"));
}

#[tokio::test]
async fn sigterm_exits_zero_after_closing_clients() {
    let mut gateway = GatewayProcess::start(
        &["--allow-anonymous", "--drain-window-ms", "1000"],
        Stdio::null(),
    )
    .await;
    let mut client = loadtest::client::Client::connect(&gateway.url())
        .await
        .expect("connect");
    client.recv_json(T).await.expect("welcome");
    gateway.terminate();
    assert_eq!(client.recv_close(T).await.expect("close").0, 1012);
    assert_eq!(gateway.exit_status(T).await.code(), Some(0));
}

#[test]
fn check_config_and_refusal_without_auth() {
    let bin = env!("CARGO_BIN_EXE_gateway");
    let out = Command::new(bin)
        .env_remove("GATEWAY_ALLOW_ANONYMOUS")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-anonymous"));
    let out = Command::new(bin)
        .args(["--allow-anonymous", "--check-config", "--admin-token", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("configuration OK") && !text.contains("\"x\""),
        "{text}"
    );
    let out = Command::new(bin)
        .args(["--check-config", "--max-connections", "0"])
        .env("GATEWAY_ALLOW_ANONYMOUS", "true")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_connections"));
}
