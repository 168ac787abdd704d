//! The connection layer over real sockets: HTTP answers before the upgrade, limits, the close
//! handshake, heartbeats, slow consumers and hostile frames. Each bad input is checked for its
//! exact status or close code, its metric, and for leaving other connections alone.

mod common;

use std::time::Duration;

use common::*;
use loadtest::client::{Client, ConnectError};
use serde_json::json;

#[tokio::test]
async fn plain_http_gets_plain_answers() {
    let node = start(config()).await;
    let (status, body) = http(node.addr, "GET", "/ws", "", "").await;
    assert_eq!(status, 426, "{body}");
    assert_eq!(http(node.addr, "GET", "/nope", "", "").await.0, 404);
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    assert_eq!(
        http(
            node.addr,
            "POST",
            "/ws",
            "",
            &format!("{upgrade}Sec-WebSocket-Version: 13\r\n")
        )
        .await
        .0,
        405
    );
    assert_eq!(
        http(
            node.addr,
            "GET",
            "/ws",
            "",
            &format!("{upgrade}Sec-WebSocket-Version: 8\r\n")
        )
        .await
        .0,
        426
    );
    let no_key = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    assert_eq!(http(node.addr, "GET", "/ws", "", no_key).await.0, 400);
    let (status, page) = http(node.addr, "GET", "/", "", "").await;
    assert_eq!(status, 200);
    assert!(page.contains("new WebSocket"));
    let m = node.metrics().await;
    assert!(
        has_line(&m, "gateway_handshakes_total{outcome=\"bad_request\"} 4"),
        "{m}"
    );
}

#[tokio::test]
async fn connection_cap_answers_503_before_upgrade() {
    let mut cfg = config();
    cfg.max_connections = 2;
    let node = start(cfg).await;
    let (_a, _) = node.client().await;
    let (mut b, _) = node.client().await;
    match Client::connect(&node.url()).await {
        Err(ConnectError::Status(503)) => {}
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("expected 503, got a connection"),
    }
    assert!(has_line(
        &node.metrics().await,
        "gateway_handshakes_total{outcome=\"over_capacity\"} 1"
    ));
    b.close(1000, "bye").await.expect("close");
    b.recv_close(T).await.expect("close echo");
    // the slot is released once the connection is gone
    connect_eventually(&node.url(), &[]).await;
}

#[tokio::test]
async fn slow_handshake_is_cut_off() {
    let mut cfg = config();
    cfg.handshake_timeout_ms = 300;
    let node = start(cfg).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("partial headers");
    let mut buf = Vec::new();
    let started = std::time::Instant::now();
    // slowloris: the headers trickle in, one line at a time, never finishing (the sleeps are
    // the trickle: each line arrives well within the timeout, the whole never does)
    for line in [
        "Upgrade: websocket\r\n",
        "Connection: Upgrade\r\n",
        "X-Slow: 1\r\n",
    ] {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(line.as_bytes()).await.is_err() {
            break;
        }
    }
    // the node closes the connection without an answer, well before our 5 s limit
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .expect("node cut the slow client off")
        .ok();
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    assert!(started.elapsed() < Duration::from_secs(3));
    node.wait_metric("gateway_protocol_violations_total{kind=\"handshake_timeout\"} 1")
        .await;
    // and serves everyone else
    node.client().await;
}

/// Connections that are accepted but never finish their handshake are capped per node
/// (`max_pending_handshakes`): the excess is closed at once, not after the handshake
/// timeout. Upgraded connections do not count.
#[tokio::test]
async fn pending_handshakes_are_capped_and_the_excess_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let mut cfg = config();
    cfg.max_pending_handshakes = 2;
    let node = start(cfg).await;
    let (mut open1, _) = node.client().await;
    let (_open2, _) = node.client().await;
    let (_open3, _) = node.client().await;
    let idle1 = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let idle2 = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let mut excess = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(T, excess.read_to_end(&mut buf))
        .await
        .expect("closed by the node")
        .ok();
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed at once, not after the 10 s handshake timeout"
    );
    node.wait_metric("gateway_pending_handshakes_dropped_total 1")
        .await;
    // open connections are untouched, and once the idle sockets go there is room again
    request(&mut open1, json!({"type":"subscribe","channel":"a","id":1})).await;
    drop((idle1, idle2));
    connect_eventually(&node.url(), &[]).await;
}

#[tokio::test]
async fn client_close_is_echoed_and_bad_close_frames_get_1002() {
    let node = start(config()).await;
    let (mut c, _) = node.client().await;
    c.close(1000, "done").await.expect("close");
    assert_eq!(c.recv_close(T).await.expect("echo").0, 1000);

    let mut raw = Raw::connect(&node).await;
    raw.send(0x88, &[0x03, 0xe7]).await; // 999 is not a valid close code
    assert_eq!(raw.close_code().await, 1002);

    let mut raw = Raw::connect(&node).await;
    raw.send(0x88, &[0x03]).await; // 1-byte close payload
    assert_eq!(raw.close_code().await, 1002);

    let mut raw = Raw::connect(&node).await;
    raw.send(0x88, &[0x03, 0xe8, 0xff, 0xfe]).await; // reason not UTF-8
    assert_eq!(raw.close_code().await, 1007);
}

#[tokio::test]
async fn hostile_frames_get_exact_close_codes_and_spare_bystanders() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    let node = start(cfg).await;
    let mut bystander = node.subscriber("chat:by").await;
    let (mut publisher, _) = node.client().await;

    let big = vec![b'x'; 2000];
    let cases: Vec<(&str, Vec<Vec<u8>>, u16, &str)> = vec![
        (
            "binary frame",
            vec![masked(0x82, b"\x01\x02")],
            1003,
            "binary_frame",
        ),
        (
            "invalid utf-8",
            vec![masked(0x81, b"\xff\xfe")],
            1007,
            "invalid_utf8",
        ),
        (
            "invalid utf-8 across fragments",
            vec![masked(0x01, b"\xce"), masked(0x80, b"\xff")],
            1007,
            "invalid_utf8",
        ),
        (
            "oversized frame",
            vec![masked(0x81, &big)],
            1009,
            "message_too_big",
        ),
        (
            "endless continuation",
            (0..10)
                .map(|i| masked(if i == 0 { 0x01 } else { 0x00 }, &[b' '; 200]))
                .collect(),
            1009,
            "message_too_big",
        ),
        (
            "continuation without start",
            vec![masked(0x80, b"x")],
            1002,
            "protocol_error",
        ),
        (
            "new message inside a fragmented one",
            vec![masked(0x01, b"{"), masked(0x81, b"{}")],
            1002,
            "protocol_error",
        ),
        (
            "unmasked frame",
            vec![vec![0x81, 0x02, b'{', b'}']],
            1002,
            "protocol_error",
        ),
        (
            "reserved opcode",
            vec![masked(0x83, b"")],
            1002,
            "protocol_error",
        ),
        (
            "RSV1 set",
            vec![masked(0xC1, b"{}")],
            1002,
            "protocol_error",
        ),
        (
            "fragmented ping",
            vec![masked(0x09, b"x")],
            1002,
            "protocol_error",
        ),
        (
            "ping over 125 bytes",
            vec![masked(0x89, &[0u8; 126])],
            1002,
            "protocol_error",
        ),
        (
            "close over 125 bytes",
            vec![masked(0x88, &[&[0x03, 0xe8][..], &[b'x'; 124]].concat())],
            1002,
            "protocol_error",
        ),
        (
            "pong over 125 bytes",
            vec![masked(0x8A, &[0u8; 126])],
            1002,
            "protocol_error",
        ),
    ];
    for (name, frames, code, label) in cases {
        let before = node.metrics().await;
        let mut raw = Raw::connect(&node).await;
        for f in frames {
            use tokio::io::AsyncWriteExt;
            if raw.s.write_all(&f).await.is_err() {
                break; // the node may already have closed
            }
        }
        assert_eq!(raw.close_code().await, code, "{name}");
        drop(raw);
        let metric =
            format!("gateway_connection_closes_total{{blame=\"client\",reason=\"{label}\"}}");
        let deadline = tokio::time::Instant::now() + T;
        while count(&node.metrics().await, &metric) <= count(&before, &metric) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: {metric} did not move"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // a bystander still gets messages
        request(
            &mut publisher,
            json!({"type":"publish","channel":"chat:by","data":name,"id":1}),
        )
        .await;
        assert_eq!(
            bystander.recv_json(T).await.expect("bystander")["data"],
            name
        );
    }
}

fn count(metrics: &str, series: &str) -> u64 {
    metric(metrics, series)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn ping_is_answered_and_message_at_the_cap_passes() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    let node = start(cfg).await;
    let mut raw = Raw::connect(&node).await;
    raw.send(0x89, b"hello").await;
    assert_eq!(raw.frame().await, Some((0xA, b"hello".to_vec())));
    // exactly max_message_bytes, in three fragments
    let msg = format!(
        r#"{{"type":"subscribe","channel":"a","id":1{}}}"#,
        " ".repeat(1024 - 41)
    );
    assert_eq!(msg.len(), 1024);
    let (a, rest) = msg.as_bytes().split_at(300);
    let (b, c) = rest.split_at(300);
    raw.send(0x01, a).await;
    raw.send(0x89, b"mid").await; // control frames may interleave with fragments
    raw.send(0x00, b).await;
    raw.send(0x80, c).await;
    assert_eq!(raw.frame().await, Some((0xA, b"mid".to_vec())));
    let (op, reply) = raw.frame().await.expect("ack");
    assert_eq!(
        (op, String::from_utf8(reply).unwrap()),
        (1, r#"{"type":"ack","id":1}"#.to_string())
    );
}

/// A fragmented message must be complete within `fragment_timeout_ms`, whether the client
/// goes silent after its first fragment or keeps the connection busy with pings and more
/// fragments that never finish it.
#[tokio::test]
async fn fragmented_message_must_complete_in_time() {
    let mut cfg = config();
    cfg.fragment_timeout_ms = 300;
    let node = start(cfg).await;
    for busy in [false, true] {
        let mut raw = Raw::connect(&node).await;
        let started = std::time::Instant::now();
        raw.send(0x01, br#"{"type":"subscribe","#).await;
        let code = loop {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "busy={busy}: still open after 2 s"
            );
            if busy {
                raw.send(0x89, b"still here").await;
                raw.send(0x00, b" ").await;
            }
            // (a read cut off by the timeout loses nothing: Raw buffers what it has read)
            match tokio::time::timeout(Duration::from_millis(100), raw.frame()).await {
                Err(_) => {}
                Ok(Some((0xA, _))) => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(Some((8, p))) => break u16::from_be_bytes([p[0], p[1]]),
                Ok(other) => panic!("busy={busy}: {other:?}"),
            }
        };
        assert_eq!(code, 1008, "busy={busy}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
    node.wait_metric(
        "gateway_connection_closes_total{blame=\"client\",reason=\"fragment_timeout\"} 2",
    )
    .await;
    // a message in fragments that completes in time passes
    let mut raw = Raw::connect(&node).await;
    raw.send(0x01, br#"{"type":"subscribe","#).await;
    raw.send(0x80, br#""channel":"a","id":1}"#).await;
    assert_eq!(
        raw.frame().await,
        Some((1, br#"{"type":"ack","id":1}"#.to_vec()))
    );
}

/// Every ping costs the node a pong, so pings count against the message rate: a ping flood
/// gets what a message flood gets, pongs for the burst, then 1008. The pongs of a run of
/// pings the writer has not caught up with are coalesced, so there may be fewer.
#[tokio::test]
async fn ping_flood_is_rate_limited_like_messages() {
    let mut cfg = config();
    cfg.message_rate = 2;
    cfg.message_burst = 5;
    cfg.rate_limit_strikes = 3;
    let node = start(cfg).await;
    let mut raw = Raw::connect(&node).await;
    let flood: Vec<u8> = (0..50u8).flat_map(|i| masked(0x89, &[i])).collect();
    use tokio::io::AsyncWriteExt;
    raw.s.write_all(&flood).await.expect("flood");
    let mut pongs = Vec::new();
    let code = loop {
        match raw.frame().await {
            Some((0xA, p)) => pongs.push(p[0]),
            Some((8, p)) => break u16::from_be_bytes([p[0], p[1]]),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 1008);
    assert!(!pongs.is_empty() && pongs.len() <= 5, "pongs {pongs:?}");
    assert!(
        pongs.iter().all(|&p| p < 5),
        "only the burst is answered: {pongs:?}"
    );
    node.wait_metric("gateway_rate_limit_hits_total{kind=\"messages\"} 4")
        .await;
}

#[tokio::test]
async fn server_pings_and_closes_silent_peers() {
    let mut cfg = config();
    cfg.ping_interval_ms = 100;
    cfg.ping_timeout_ms = 350;
    let node = start(cfg).await;
    // A polite client answers pings and survives well past the timeout.
    let mut polite = Raw::connect(&node).await;
    let mut silent = Raw::connect(&node).await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(800) {
        let (op, payload) = polite.frame().await.expect("ping");
        assert_eq!(op, 0x9);
        polite.send(0x8A, &payload).await;
    }
    // The silent one got pings and then a 4001 close.
    assert_eq!(silent.close_code().await, 4001);
    node.wait_metric(
        "gateway_connection_closes_total{blame=\"client\",reason=\"heartbeat_timeout\"} 1",
    )
    .await;
    polite
        .send(0x81, br#"{"type":"subscribe","channel":"a","id":1}"#)
        .await;
    loop {
        let (op, p) = polite.frame().await.expect("polite still served");
        if op == 1 {
            assert_eq!(p, br#"{"type":"ack","id":1}"#);
            break;
        }
    }
}

#[tokio::test]
async fn slow_consumer_is_disconnected_with_4000() {
    let mut cfg = config();
    cfg.outbound_queue_bytes = 64 * 1024;
    let node = start(cfg).await;
    let mut fast = node.subscriber("chat:firehose").await;
    // The slow client subscribes, then never reads again; its socket buffers fill up.
    let mut slow = Raw::connect(&node).await;
    slow.send(
        0x81,
        br#"{"type":"subscribe","channel":"chat:firehose","id":1}"#,
    )
    .await;
    assert_eq!(
        slow.frame().await,
        Some((1, br#"{"type":"ack","id":1}"#.to_vec()))
    );

    let payload = json!({"data": "y".repeat(16000)}).to_string();
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < 1000 {
            let m = fast
                .recv_json(T)
                .await
                .expect("fast client keeps receiving");
            assert_eq!(m["type"], "message");
            n += 1;
        }
        n
    });
    for _ in 0..1000 {
        let (status, _) = node
            .admin("POST", "/v1/channels/chat:firehose/publish", &payload, None)
            .await;
        assert_eq!(status, 200);
    }
    assert_eq!(reader.await.expect("reader"), 1000);
    assert!(has_line(
        &node.metrics().await,
        "gateway_slow_consumer_disconnects_total 1"
    ));
    // Whatever was in flight drains first; the close frame follows if the peer started
    // reading again within the write timeout. If it did not, the node gave up writing to it
    // (that is the point of the policy) and the socket just ends.
    loop {
        match slow.frame().await {
            Some((8, p)) => {
                assert_eq!(u16::from_be_bytes([p[0], p[1]]), 4000);
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    node.wait_metric(
        "gateway_connection_closes_total{blame=\"client\",reason=\"slow_consumer\"} 1",
    )
    .await;
}
