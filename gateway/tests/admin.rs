//! The admin listener: probes, metrics, publish API and its bearer token.

mod common;

use common::*;
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
    // probes stay open for kubelet
    assert_eq!(node.admin("GET", "/readyz", "", None).await.0, 200);
}
