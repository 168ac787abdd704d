//! The admin listener: probes, metrics, publish API, drain and its bearer token.

mod common;

use common::*;
use loadtest::client::{Client, ConnectError};
use serde_json::json;

#[tokio::test]
async fn probes_metrics_and_publish() {
    let node = start(config()).await;
    assert_eq!(node.admin("GET", "/healthz", "", None).await.0, 200);
    let (status, body) = node.admin("GET", "/readyz", "", None).await;
    assert_eq!((status, body.contains("ready")), (200, true));

    let mut sub = node.subscriber("news/eu:1").await;
    let (status, body) = node
        .admin(
            "POST",
            "/v1/channels/news/eu:1/publish",
            r#"{"data":{"headline":"x"}}"#,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sub.recv_json(T).await.expect("message"),
        json!({"type":"message","channel":"news/eu:1","data":{"headline":"x"}})
    );

    let m = node.metrics().await;
    for name in [
        "gateway_connections_open 1",
        "gateway_deliveries_total 1",
        "gateway_admin_publishes_total 1",
        "gateway_handshakes_total{outcome=\"ok\"} 1",
    ] {
        assert!(m.contains(name), "{name} missing in\n{m}");
    }
}

#[tokio::test]
async fn bad_admin_requests() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    let node = start(cfg).await;
    let p = "/v1/channels/chat:a/publish";
    assert_eq!(node.admin("POST", p, "not json", None).await.0, 400);
    assert_eq!(node.admin("POST", p, r#"{"nodata":1}"#, None).await.0, 400);
    assert_eq!(
        node.admin(
            "POST",
            p,
            &format!(r#"{{"data":"{}"}}"#, "x".repeat(2000)),
            None
        )
        .await
        .0,
        413
    );
    let bomb = format!(r#"{{"data":{}{}}}"#, "[".repeat(100), "]".repeat(100));
    assert_eq!(node.admin("POST", p, &bomb, None).await.0, 400);
    assert_eq!(
        node.admin(
            "POST",
            "/v1/channels/bad%20name/publish",
            r#"{"data":1}"#,
            None
        )
        .await
        .0,
        400
    );
    assert_eq!(node.admin("GET", p, "", None).await.0, 405);
    assert_eq!(node.admin("GET", "/v1/nope", "", None).await.0, 404);
    assert_eq!(node.admin("GET", "/nope", "", None).await.0, 404);
}

/// A caller that sends the head of a publish and then trickles the body gets 408 once the
/// read timeout (`handshake_timeout_ms`) has passed, and is counted.
#[tokio::test]
async fn a_trickled_admin_body_gets_408() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = config();
    cfg.handshake_timeout_ms = 300;
    let node = start(cfg).await;
    let (mut r, mut w) = tokio::net::TcpStream::connect(node.admin)
        .await
        .unwrap()
        .into_split();
    w.write_all(
        b"POST /v1/channels/chat:a/publish HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if w.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(T, async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = r.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("an answer while the body still trickles in");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2));
    trickle.abort();
    node.wait_metric("gateway_http_requests_total{listener=\"admin\",status=\"408\"} 1")
        .await;
}

#[tokio::test]
async fn admin_token_guards_the_api() {
    let mut cfg = config();
    cfg.admin_token = Some("s3cret".into());
    let node = start(cfg).await;
    let p = "/v1/channels/chat:a/publish";
    let body = r#"{"data":1}"#;
    assert_eq!(node.admin("POST", p, body, None).await.0, 401);
    assert_eq!(node.admin("POST", p, body, Some("wrong!")).await.0, 401);
    assert_eq!(node.admin("POST", p, body, Some("s3cret")).await.0, 200);
    // probes and metrics never need the token (kubelet and Prometheus have none)
    assert_eq!(node.admin("GET", "/healthz", "", None).await.0, 200);
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 200);
    assert_eq!(node.admin("GET", "/metrics", "", None).await.0, 200);
    // the drain API is guarded like the rest of /v1/*
    for method in ["POST", "DELETE"] {
        assert_eq!(node.admin(method, "/v1/drain", "", None).await.0, 401);
        assert_eq!(
            node.admin(method, "/v1/drain", "", Some("s3cre")).await.0,
            401
        );
    }
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 200);
    assert_eq!(
        node.admin("POST", "/v1/drain", "", Some("s3cret")).await.0,
        202
    );
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 503);
    assert_eq!(
        node.admin("DELETE", "/v1/drain", "", Some("s3cret"))
            .await
            .0,
        200
    );
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 200);
}

/// New handshakes are refused with 503 while the node drains.
async fn assert_refused(node: &TestNode) {
    assert!(matches!(
        Client::connect(&node.url()).await,
        Err(ConnectError::Status(503))
    ));
}

#[tokio::test]
async fn delete_drain_ends_a_drain_on_demand() {
    let node = start(config()).await;
    let (mut before, _) = node.client().await;

    let (status, body) = node.admin("POST", "/v1/drain", "", None).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(before.recv_close(T).await.unwrap().0, 1012);
    let (status, body) = node.admin("GET", "/readyz", "", None).await;
    assert_eq!((status, body.contains("draining")), (503, true), "{body}");
    assert_refused(&node).await;
    // liveness stays 200: the kubelet does not restart a drained pod
    assert_eq!(node.admin("GET", "/healthz", "", None).await.0, 200);

    let (status, body) = node.admin("DELETE", "/v1/drain", "", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("drain_ended"), "{body}");
    let (status, body) = node.admin("GET", "/readyz", "", None).await;
    assert_eq!((status, body.contains("ready")), (200, true), "{body}");
    let (mut after, _) = node.client().await;
    // a connection accepted after the drain ended outlives the old drain window (500 ms)
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    request(
        &mut after,
        json!({"type":"subscribe","channel":"chat:a","id":1}),
    )
    .await;

    // idempotent, and a drain can be started again afterwards
    let (status, body) = node.admin("DELETE", "/v1/drain", "", None).await;
    assert_eq!(
        (status, body.contains("not_draining")),
        (200, true),
        "{body}"
    );
    assert_eq!(node.admin("POST", "/v1/drain", "", None).await.0, 202);
    assert_eq!(node.admin("POST", "/v1/drain", "", None).await.0, 202);
    assert_eq!(after.recv_close(T).await.unwrap().0, 1012);
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 503);
    assert_refused(&node).await;
    assert_eq!(node.admin("DELETE", "/v1/drain", "", None).await.0, 200);
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 200);
    node.client().await;

    assert_eq!(node.admin("GET", "/v1/drain", "", None).await.0, 405);
    assert!(!node.task.is_finished(), "the process stays up throughout");
}

#[tokio::test]
async fn a_shutdown_drain_cannot_be_ended() {
    let node = start(gateway::Config {
        pre_stop_delay_ms: 2000,
        ..config()
    })
    .await;
    node.shutdown.cancel();
    // during the pre-stop delay the admin listener still answers
    let deadline = tokio::time::Instant::now() + T;
    while node.admin("GET", "/readyz", "", None).await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never turned 503"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, body) = node.admin("DELETE", "/v1/drain", "", None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("shutting_down"), "{body}");
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 503);
}
