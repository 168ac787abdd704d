//! Metrics pushed over OTLP/HTTP (protobuf) to a collector: here a real HTTP listener on
//! loopback that records what it receives, as an OpenTelemetry Collector would.
#![cfg(feature = "otlp")]
// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One received export: request line, content type, body.
type Export = (String, String, Vec<u8>);

async fn collector() -> (String, mpsc::UnboundedReceiver<Export>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/metrics", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // one request: headers, then Content-Length bytes of body
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                            .unwrap_or_default()
                    };
                    let len: usize = header("content-length:").parse().unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[head_end..head_end + len].to_vec();
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    let _ = tx.send((line, header("content-type:"), body));
                    buf.drain(..head_end + len);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn metrics_are_pushed_over_otlp_http_protobuf() {
    let (url, mut exports) = collector().await;
    let node = start(gateway::Config {
        otlp_endpoint: Some(url),
        otlp_interval_ms: 200,
        ..config()
    })
    .await;
    let _client = node.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (line, content_type, body) = tokio::time::timeout_at(deadline, exports.recv())
            .await
            .expect("an export in time")
            .expect("collector running");
        assert_eq!(line, "post /v1/metrics http/1.1");
        assert_eq!(content_type, "application/x-protobuf");
        // protobuf carries metric names as plain UTF-8 strings
        let has = |name: &str| body.windows(name.len()).any(|w| w == name.as_bytes());
        if has("gateway_connections_open") && has("gateway_handshakes_total") {
            break;
        }
    }
    // the Prometheus endpoint keeps working alongside
    assert!(has_line(
        &node.metrics().await,
        "gateway_connections_open 1"
    ));
}
