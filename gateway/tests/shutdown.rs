//! Shutdown order: readiness false, listener closed, clients drained with 1012 and a
//! reconnect hint, exit 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

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

#[test]
fn sigterm_exits_zero_after_closing_clients() {
    let bin = env!("CARGO_BIN_EXE_gateway");
    let port = free_port();
    let admin = free_port();
    let mut child = Command::new(bin)
        .args([
            "--allow-anonymous",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--drain-window-ms",
            "1000",
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gateway");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let url = format!("ws://127.0.0.1:{port}/ws");
        let mut client = loop {
            match loadtest::client::Client::connect(&url).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        client.recv_json(T).await.expect("welcome");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        assert_eq!(client.recv_close(T).await.expect("close").0, 1012);
    });
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}
