//! The HTTP transports over raw sockets: Centrifugo's HTTP-streaming emulation (the stream,
//! `/emulation` posts on the same node and forwarded from another one through Redis) and
//! what hostile posts get (a wrong or expired session, a connection id without its secret,
//! an oversized or malformed body, a flood), each with its status and metric; the
//! connection cap; and `GET /sse` refusals. The stock SDKs and a real browser run these
//! transports in `e2e/transports.test.mjs`.

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use loadtest::http_stream::Stream;
use serde_json::{json, Value};

/// A request to a streaming route: the response head read, the body to come.
async fn open(addr: SocketAddr, method: &str, path: &str, body: &str) -> Stream {
    Stream::request(addr, method, path, body)
        .await
        .expect("a response head")
}

/// The next reply or push of an HTTP stream, pings (`{}`) skipped; `None` when none came
/// within `within` or the body ended.
async fn line_within(s: &mut Stream, within: Duration) -> Option<Value> {
    let next = async {
        loop {
            let l = s.line().await.ok()?;
            let v: Value = serde_json::from_str(&l).expect("a JSON line");
            if !v.as_object().is_some_and(|o| o.is_empty()) {
                return Some(v);
            }
        }
    };
    tokio::time::timeout(within, next).await.ok().flatten()
}

async fn line(s: &mut Stream) -> Value {
    line_within(s, T).await.expect("a line")
}

/// The body's next bytes as text.
async fn body_text(s: &mut Stream) -> String {
    let b = tokio::time::timeout(T, s.bytes()).await.expect("in time");
    String::from_utf8(b.expect("more body")).expect("utf-8")
}

/// `POST /emulation` with `{"session":..,"data":..}`: the status.
async fn post(addr: SocketAddr, session: &str, data: &str) -> u16 {
    let body = json!({ "session": session, "node": "", "data": data }).to_string();
    http(addr, "POST", "/emulation", &body, "").await.0
}

/// An http_stream connection that has connected: the stream and its session.
async fn connected(addr: SocketAddr) -> (Stream, String, String) {
    let mut s = open(
        addr,
        "POST",
        "/connection/http_stream",
        r#"{"id":1,"connect":{}}"#,
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(
        s.head
            .to_ascii_lowercase()
            .contains("x-accel-buffering: no"),
        "{}",
        s.head
    );
    let reply = line(&mut s).await;
    assert_eq!(reply["id"], 1, "{reply}");
    let c = &reply["connect"];
    assert_eq!(c["pong"], false, "no pongs over emulation: {reply}");
    let session = c["session"].as_str().expect("a session").to_owned();
    let client = c["client"].as_str().expect("a client id").to_owned();
    assert!(
        session.ends_with(&client) && session.len() == client.len() + 32,
        "{session}"
    );
    (s, session, client)
}

#[tokio::test]
async fn posts_reach_their_session_and_bad_posts_get_their_status() {
    let node = start(config()).await;
    let (mut s, session, client) = connected(node.addr).await;

    let subscribe = json!({"id":2,"subscribe":{"channel":"chat:1"}}).to_string();
    assert_eq!(post(node.addr, &session, &subscribe).await, 204);
    assert_eq!(line(&mut s).await, json!({"id":2,"subscribe":{}}));

    // A wrong secret, the connection id alone, a closed or unknown one: 404, nothing runs.
    let wrong = format!("{}{client}", "f".repeat(32));
    let publish =
        |id: u32| json!({"id":id,"publish":{"channel":"chat:1","data":{"n":id}}}).to_string();
    assert_eq!(post(node.addr, &wrong, &publish(3)).await, 404);
    assert_eq!(post(node.addr, &client, &publish(4)).await, 404);
    assert_eq!(post(node.addr, "", &publish(5)).await, 404);
    // Oversized, malformed.
    let big = "x".repeat(node_max_message_bytes() + 1);
    assert_eq!(post(node.addr, &session, &big).await, 413);
    let (status, _) = http(node.addr, "POST", "/emulation", "{not json", "").await;
    assert_eq!(status, 400);
    // Only the good post after them runs: its reply and its publication are the next lines.
    assert_eq!(post(node.addr, &session, &publish(6)).await, 204);
    let next = line(&mut s).await;
    let after = line(&mut s).await;
    let mut got = [next, after];
    got.sort_by_key(|v| v.get("id").is_none());
    assert_eq!(got[0], json!({"id":6,"publish":{}}));
    assert_eq!(got[1]["push"]["pub"]["data"], json!({"n":6}), "{}", got[1]);

    let m = node.metrics().await;
    for (outcome, n) in [
        ("local", 2),
        ("unknown_session", 3),
        ("too_large", 1),
        ("bad_request", 1),
    ] {
        let line = format!("gateway_emulation_requests_total{{outcome=\"{outcome}\"}} {n}");
        assert!(has_line(&m, &line), "no `{line}` in\n{m}");
    }
    assert!(
        has_line(
            &m,
            "gateway_connections_opened_total{transport=\"http_stream\"} 1"
        ),
        "{m}"
    );

    // The client goes away: its session is gone for posts too.
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while post(node.addr, &session, &publish(7)).await != 404 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session outlived its stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node's `max_message_bytes` in [`config`].
fn node_max_message_bytes() -> usize {
    config().max_message_bytes
}

#[tokio::test]
async fn a_flood_of_posts_is_rate_limited() {
    let node = start(gateway::Config {
        emulation_rate_per_ip: 5,
        emulation_burst_per_ip: 5,
        ..config()
    })
    .await;
    let (_s, session, _) = connected(node.addr).await;
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses.push(
            post(
                node.addr,
                &session,
                &json!({"id":10 + i,"presence":{}}).to_string(),
            )
            .await,
        );
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses[..5].iter().all(|s| *s == 204),
        "the burst passes: {statuses:?}"
    );
    node.wait_metric("gateway_rate_limit_hits_total{kind=\"emulation\"} 15")
        .await;
    let m = node.metrics().await;
    assert!(
        has_line(
            &m,
            "gateway_emulation_requests_total{outcome=\"rate_limited\"} 15"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn posts_to_another_node_are_forwarded_only_with_the_secret() {
    let redis = RedisServer::start().await;
    let cfg = |id: &str| gateway::Config {
        node_id: id.into(),
        redis_url: Some(redis.url().into()),
        ..config()
    };
    let (a, b) = (start(cfg("a")).await, start(cfg("b")).await);
    let (mut s, session, client) = connected(a.addr).await;
    assert!(client.starts_with("a."));

    let subscribe = json!({"id":2,"subscribe":{"channel":"chat:x"}}).to_string();
    assert_eq!(post(b.addr, &session, &subscribe).await, 204);
    assert_eq!(line(&mut s).await, json!({"id":2,"subscribe":{}}));
    let wrong = format!("{}{client}", "0".repeat(32));
    let refused = json!({"id":3,"subscribe":{"channel":"chat:y"}}).to_string();
    assert_eq!(post(b.addr, &wrong, &refused).await, 404);
    assert_eq!(post(b.addr, &client, &refused).await, 404);
    assert_eq!(
        line_within(&mut s, Duration::from_millis(500)).await,
        None,
        "a refused post ran"
    );

    let m = b.metrics().await;
    assert!(
        has_line(
            &m,
            "gateway_emulation_requests_total{outcome=\"forwarded\"} 1"
        ),
        "{m}"
    );
    assert!(
        has_line(
            &m,
            "gateway_emulation_requests_total{outcome=\"unknown_session\"} 2"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn streams_count_against_max_connections_and_sse_refusals_have_statuses() {
    let node = start(gateway::Config {
        max_connections: 1,
        channels: vec!["h:*?history_size=10&history_ttl_secs=60"
            .parse()
            .expect("valid")],
        ..config()
    })
    .await;
    let (_s, _, _) = connected(node.addr).await;
    let over = open(
        node.addr,
        "POST",
        "/connection/http_stream",
        r#"{"id":1,"connect":{}}"#,
    )
    .await;
    assert_eq!(over.status, 503, "{}", over.head);
    let es = open(node.addr, "GET", "/sse?channel=chat:1", "").await;
    assert_eq!(es.status, 503, "{}", es.head);
    for path in [
        "/sse",
        "/sse?channel=bad%20name",
        &format!("/sse?{}", "channel=c&".repeat(17)),
    ] {
        let (status, body) = http(node.addr, "GET", path, "", "").await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    let (status, _) = http(node.addr, "PUT", "/emulation", "", "").await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn sse_events_carry_the_positions_of_history_channels() {
    let node = start(gateway::Config {
        channels: vec!["h:*?history_size=10&history_ttl_secs=60"
            .parse()
            .expect("valid")],
        publish_allow: vec!["h:*".into()],
        ..config()
    })
    .await;
    let mut s = open(node.addr, "GET", "/sse?channel=chat:plain&channel=h:1", "").await;
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(s.head.contains("text/event-stream"), "{}", s.head);
    let mut text = String::new();
    while !text.contains(r#""channel":"h:1","epoch""#) {
        text.push_str(&body_text(&mut s).await);
    }
    assert!(text.starts_with("retry: 1000\n\n"), "{text}");
    let (status, _) = node
        .admin(
            "POST",
            "/v1/channels/h:1/publish",
            r#"{"data":{"n":1}}"#,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let mut more = String::new();
    while !more.contains("\"n\":1") {
        more.push_str(&body_text(&mut s).await);
    }
    // `id: 1:<offset>:<epoch>`: place 1 in the URL, offset 1.
    let id = more
        .lines()
        .find(|l| l.starts_with("id: "))
        .expect("an id line");
    assert!(id.starts_with("id: 1:1:"), "{more}");
}
