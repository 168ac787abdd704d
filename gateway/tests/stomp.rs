//! STOMP over raw sockets: subprotocol negotiation, CONNECT, receipts, interop with v1,
//! heart-beats both ways, and hostile input (each answered with an ERROR frame, a close and
//! a metric, without disturbing anyone else).

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::*;
use redis::AsyncCommands;
use serde_json::json;

const SECRET: &str = "stomp-test-secret-0123456789-abcdef";

/// A server STOMP frame, as the test reads it: header values unescaped (STOMP 1.2, except
/// in CONNECTED), `head` as it came.
#[derive(Debug)]
struct Frame {
    command: String,
    headers: HashMap<String, String>,
    body: String,
    head: String,
}

impl Frame {
    fn parse(text: &str) -> Frame {
        let text = text.trim_start_matches(['\r', '\n']);
        let (head, rest) = text.split_once("\n\n").expect("a blank line");
        let mut lines = head.lines();
        let command = lines.next().unwrap().to_owned();
        let mut headers = HashMap::new();
        for l in lines {
            let (k, v) = l.split_once(':').unwrap();
            // ERROR values are raw before CONNECTED (the client knows no version yet)
            let escaped = matches!(command.as_str(), "MESSAGE" | "RECEIPT");
            assert!(!escaped || !v.contains(':'), "unescaped colon: {l}");
            let v = if command == "CONNECTED" {
                v.to_owned()
            } else {
                v.replace("\\c", ":")
                    .replace("\\n", "\n")
                    .replace("\\r", "\r")
                    .replace("\\\\", "\\")
            };
            headers.entry(k.to_owned()).or_insert(v);
        }
        let body = rest.strip_suffix('\0').expect("NUL at the end").to_owned();
        Frame {
            command,
            headers,
            body,
            head: head.to_owned(),
        }
    }

    fn h(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no `{name}` in {self:?}"))
    }
}

/// A STOMP client on a raw socket.
struct Stomp {
    raw: Raw,
}

impl Stomp {
    /// Opens a WebSocket to `path` offering `protocols` (if any); expects 101.
    async fn open(node: &TestNode, path: &str, protocols: Option<&str>) -> (Stomp, String) {
        let extra = protocols
            .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
            .unwrap_or_default();
        let (raw, head) = Raw::handshake(node, path, &extra).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (Stomp { raw }, head)
    }

    /// Opens and connects with `headers` (extra CONNECT header lines); returns CONNECTED.
    async fn connected(node: &TestNode, headers: &str) -> (Stomp, Frame) {
        let (mut c, _) = Stomp::open(node, "/ws", Some("v12.stomp")).await;
        c.send(&format!(
            "CONNECT\naccept-version:1.2\nhost:t\nheart-beat:0,0\n{headers}\n\0"
        ))
        .await;
        let f = c.next().await;
        assert_eq!(f.command, "CONNECTED", "{f:?}");
        (c, f)
    }

    async fn send(&mut self, text: &str) {
        self.raw.send(0x81, text.as_bytes()).await;
    }

    /// The next text frame (pings skipped, not answered), heart-beats included; `None`
    /// when none came within `t`.
    async fn text_within(&mut self, t: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.raw.try_frame_within(left).await.ok()? {
                Some((1, p)) => return Some(String::from_utf8(p).expect("UTF-8")),
                Some((9 | 10, _)) => continue,
                Some((8, p)) => panic!("closed {} instead", u16::from_be_bytes([p[0], p[1]])),
                Some((op, _)) => panic!("unexpected opcode {op}"),
                None => panic!("connection ended"),
            }
        }
    }

    /// The next STOMP frame, heart-beats skipped.
    async fn next(&mut self) -> Frame {
        loop {
            let t = self.text_within(T).await.expect("a frame in time");
            if t != "\n" {
                return Frame::parse(&t);
            }
        }
    }

    /// Expects an ERROR whose `message` is `message`, then a close with `code`; nothing else.
    async fn refused(&mut self, message: &str, code: u16) {
        let f = self.next().await;
        assert_eq!(f.command, "ERROR", "{f:?}");
        assert_eq!(f.h("message"), message, "{f:?}");
        loop {
            match self.raw.frame().await {
                Some((8, p)) => {
                    assert_eq!(u16::from_be_bytes([p[0], p[1]]), code, "{p:?}");
                    // Answer the close, as a client library would: the node then counts it
                    // at once instead of after its close timeout.
                    self.raw.send(0x88, &p[..2]).await;
                    return;
                }
                Some((9 | 10, _)) => continue,
                other => panic!("expected the close, got {other:?}"),
            }
        }
    }

    async fn subscribe(&mut self, id: &str, destination: &str) {
        self.send(&format!(
            "SUBSCRIBE\nid:{id}\ndestination:{destination}\nreceipt:r-{id}\n\n\0"
        ))
        .await;
        let r = self.next().await;
        assert_eq!(
            (r.command.as_str(), r.h("receipt-id")),
            ("RECEIPT", &*format!("r-{id}"))
        );
    }
}

fn auth_config() -> gateway::Config {
    gateway::Config {
        jwt_secret: Some(SECRET.into()),
        allow_anonymous: false,
        ..config()
    }
}

#[tokio::test]
async fn negotiates_the_subprotocol_and_connects() {
    let node = start(config()).await;
    let (mut c, head) = Stomp::open(&node, "/ws", Some("mqtt, v10.stomp, v12.stomp")).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: v12.stomp"),
        "{head}"
    );
    // Frames may end in CRLF; heart-beat EOLs may come before.
    c.send("\r\nCONNECT\r\naccept-version:1.0,1.1,1.2\r\nheart-beat:0,0\r\n\r\n\0")
        .await;
    let f = c.next().await;
    assert_eq!(f.command, "CONNECTED");
    assert_eq!(f.h("version"), "1.2");
    assert!(f.h("session").starts_with("test-node."), "{f:?}");
    assert!(f.h("server").starts_with("gateway/"));
    assert!(!f.headers.contains_key("user-name"), "anonymous");

    // Only v11 offered: the 101 names it.
    let (_, head) = Stomp::open(&node, "/ws", Some("v11.stomp")).await;
    assert!(head
        .to_ascii_lowercase()
        .contains("sec-websocket-protocol: v11.stomp"));
    // /stomp speaks STOMP without the header; /ws without it speaks v1.
    let (mut s, head) = Stomp::open(&node, "/stomp", None).await;
    assert!(!head.to_ascii_lowercase().contains("sec-websocket-protocol"));
    s.send("STOMP\naccept-version:1.1\n\n\0").await;
    let f = s.next().await;
    assert_eq!((f.command.as_str(), f.h("version")), ("CONNECTED", "1.1"));
    let (mut v1, _) = node.client().await;
    request(
        &mut v1,
        json!({"type":"subscribe","channel":"chat:x","id":1}),
    )
    .await;
}

#[tokio::test]
async fn receipts_messages_and_v1_interop() {
    let node = start(config()).await;
    let (mut c, _) = Stomp::connected(&node, "").await;
    c.subscribe("sub-0", "/topic/chat:1").await;
    // two subscriptions of one channel: each gets its MESSAGE
    c.subscribe("b", "/topic/chat:1").await;

    // a v1 client publishes
    let (mut v1, _) = node.client().await;
    request(
        &mut v1,
        json!({"type":"publish","channel":"chat:1","data":{"from":"v1"},"id":1}),
    )
    .await;
    let mut subs = Vec::new();
    for _ in 0..2 {
        let m = c.next().await;
        assert_eq!(m.command, "MESSAGE");
        assert_eq!(m.h("destination"), "/topic/chat:1");
        assert!(
            m.head.contains("\ndestination:/topic/chat\\c1\n"),
            "escaped in 1.2"
        );
        assert_eq!(m.h("content-type"), "application/json");
        assert_eq!(m.h("content-length"), m.body.len().to_string());
        assert_eq!(m.body, r#"{"from":"v1"}"#);
        subs.push(m.h("subscription").to_owned());
        assert!(!m.headers.contains_key("ack"), "auto ack");
    }
    subs.sort();
    assert_eq!(subs, ["b", "sub-0"]);
    c.send("UNSUBSCRIBE\nid:b\nreceipt:u\n\n\0").await;
    assert_eq!(c.next().await.h("receipt-id"), "u");

    // the admin API publishes
    let (status, _) = node
        .admin(
            "POST",
            "/v1/channels/chat:1/publish",
            r#"{"data":{"from":"admin"}}"#,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let m = c.next().await;
    assert_eq!(
        (m.h("subscription"), m.body.as_str()),
        ("sub-0", r#"{"from":"admin"}"#)
    );

    // a STOMP SEND reaches the v1 subscriber (and the sender's own subscription)
    request(
        &mut v1,
        json!({"type":"subscribe","channel":"chat:1","id":2}),
    )
    .await;
    c.send("SEND\ndestination:/topic/chat\\c1\ncontent-type:application/json\nreceipt:s\n\n{\"from\":\"stomp\"}\0")
        .await;
    let got = v1.recv_json(T).await.unwrap();
    assert_eq!(
        got,
        json!({"type":"message","channel":"chat:1","data":{"from":"stomp"}})
    );
    let (mut receipt, mut message) = (false, false);
    for _ in 0..2 {
        let f = c.next().await;
        match f.command.as_str() {
            "RECEIPT" => receipt = f.h("receipt-id") == "s",
            "MESSAGE" => message = f.body == r#"{"from":"stomp"}"#,
            other => panic!("{other}"),
        }
    }
    assert!(receipt && message);

    // client acks are accepted (delivery is at-most-once) and MESSAGE carries `ack`
    c.subscribe("c", "/topic/chat:2").await;
    c.send("SUBSCRIBE\nid:ca\ndestination:/topic/chat:3\nack:client-individual\n\n\0")
        .await;
    c.send("SEND\ndestination:/topic/chat:3\n\n[1]\0").await;
    let m = c.next().await;
    assert_eq!(m.h("ack"), m.h("message-id"));
    c.send(&format!(
        "ACK\nid:{}\nreceipt:a\n\n\0NACK\nid:x\n\n\0",
        m.h("ack")
    ))
    .await;
    assert_eq!(c.next().await.h("receipt-id"), "a");

    // DISCONNECT: RECEIPT, then a normal close
    c.send("DISCONNECT\nreceipt:bye\n\n\0").await;
    assert_eq!(c.next().await.h("receipt-id"), "bye");
    assert_eq!(c.raw.close_code().await, 1000);
    c.raw.send(0x88, &1000u16.to_be_bytes()).await;
    node.wait_metric(r#"gateway_connection_closes_total{blame="none",reason="client_closed"} 1"#)
        .await;
}

#[tokio::test]
async fn hostile_input_gets_an_error_a_close_and_a_metric() {
    let mut cfg = auth_config();
    cfg.publish_allow = vec!["chat:*".into()];
    let node = start(cfg).await;
    let token = user_token(SECRET, "ann");
    let login = format!("passcode:{token}\n");
    // a bystander, subscribed before and checked after
    let (mut bystander, f) = Stomp::connected(&node, &login).await;
    assert_eq!(f.h("user-name"), "ann");
    bystander.subscribe("0", "/topic/chat:calm").await;

    let many = "a:b\n".repeat(10_000);
    let cases: Vec<(bool, String, &str, &str)> = vec![
        (
            true,
            "SEND\ndestination:/topic/chat:a\n\n{}".into(),
            "SEND frame has no NUL terminator: end every frame with a NUL byte",
            "stomp_missing_nul",
        ),
        (
            true,
            "SEND\ndestination:/topic/chat:a\ncontent-length:100\n\n{}\0".into(),
            "content-length 100 is larger than the 3 bytes after the headers",
            "stomp_bad_content_length",
        ),
        (
            true,
            format!("SEND\ndestination:/topic/chat:a\n{many}\n{{}}\0"),
            "more than 64 headers in a SEND frame",
            "stomp_too_many_headers",
        ),
        (
            false,
            "SUBSCRIBE\nid:0\ndestination:/topic/chat:a\n\n\0".into(),
            "SUBSCRIBE before CONNECT: send CONNECT first",
            "stomp_not_connected",
        ),
        (
            true,
            "LAUNCH\n\n\0".into(),
            "unknown command `LAUNCH`",
            "stomp_unknown_command",
        ),
        (
            true,
            "SUBSCRIBE\nid:1\ndestination:/queue/secret\n\n\0".into(),
            "cannot SUBSCRIBE to `/queue/secret`: use /topic/<channel> or /user/queue/<name>",
            "stomp_bad_destination",
        ),
        (
            true,
            "SEND\ndestination:/topic/news\n\n{}\0".into(),
            "publishing to `news` is not allowed",
            "stomp_forbidden",
        ),
        (
            false,
            "CONNECT\naccept-version:1.2\npasscode:not-a-jwt\n\n\0".into(),
            "CONNECT refused: token is not a well-formed JWT",
            "stomp_unauthorized",
        ),
        (
            false,
            "CONNECT\naccept-version:1.2\n\n\0".into(),
            "CONNECT refused: no token: send `Authorization: Bearer <jwt>` or `?access_token=<jwt>`",
            "stomp_unauthorized",
        ),
    ];
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for (connect_first, wire, message, kind) in &cases {
        let mut c = if *connect_first {
            Stomp::connected(&node, &login).await.0
        } else {
            Stomp::open(&node, "/ws", Some("v12.stomp")).await.0
        };
        c.send(wire).await;
        c.refused(message, 1002).await;
        let n = seen.entry(kind).or_default();
        *n += 1;
        node.wait_metric(&format!(
            r#"gateway_protocol_violations_total{{kind="{kind}"}} {n}"#
        ))
        .await;
    }
    // the bystander noticed nothing
    let (mut p, _) = Stomp::connected(&node, &login).await;
    p.send("SEND\ndestination:/topic/chat:calm\n\n\"still here\"\0")
        .await;
    let m = bystander.next().await;
    assert_eq!(
        (m.command.as_str(), m.body.as_str()),
        ("MESSAGE", "\"still here\"")
    );
}

#[tokio::test]
async fn limits_close_with_their_own_codes() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    cfg.message_rate = 1;
    cfg.message_burst = 2;
    cfg.rate_limit_strikes = 1;
    let node = start(cfg).await;

    // message size: ERROR, then 1009
    let (mut c, _) = Stomp::connected(&node, "").await;
    let big = format!(
        "SEND\ndestination:/topic/chat:a\n\n\"{}\"\0",
        "x".repeat(2000)
    );
    c.send(&big).await;
    c.refused("message exceeds 1024 bytes", 1009).await;
    node.wait_metric(
        r#"gateway_connection_closes_total{blame="client",reason="message_too_big"} 1"#,
    )
    .await;

    // rate: ERROR, then 1008
    let (mut c, _) = Stomp::connected(&node, "").await;
    for _ in 0..3 {
        c.send("SEND\ndestination:/topic/chat:a\n\n1\0").await;
    }
    c.refused("over the messages rate; slow down or be disconnected", 1008)
        .await;
    node.wait_metric(r#"gateway_rate_limit_hits_total{kind="messages"} 1"#)
        .await;
}

#[tokio::test]
async fn connect_must_come_within_the_handshake_timeout() {
    let mut cfg = config();
    cfg.handshake_timeout_ms = 300;
    let node = start(cfg).await;
    let (mut c, _) = Stomp::open(&node, "/ws", Some("v12.stomp")).await;
    // heart-beats before CONNECT do not extend the deadline
    c.send("\n").await;
    c.refused("no CONNECT frame within 300 ms", 1002).await;
    node.wait_metric(r#"gateway_protocol_violations_total{kind="stomp_connect_timeout"} 1"#)
        .await;
}

#[tokio::test]
async fn heart_beats_flow_both_ways() {
    let mut cfg = config();
    cfg.ping_interval_ms = 100;
    let node = start(cfg).await;
    let (mut c, _) = Stomp::open(&node, "/ws", Some("v12.stomp")).await;
    c.send("CONNECT\naccept-version:1.2\nheart-beat:300,300\n\n\0")
        .await;
    let f = c.next().await;
    // ours is the ping interval; each side then uses the larger of the two
    assert_eq!(f.h("heart-beat"), "100,100");

    // The server beats every 300 ms. The client's beats (EOLs, and nothing else: the
    // WebSocket pings are not answered) keep the connection open past 2 × 300 ms.
    let start = Instant::now();
    let mut beats = Vec::new();
    let mut next_beat = start + Duration::from_millis(250);
    while start.elapsed() < Duration::from_millis(1600) {
        if Instant::now() >= next_beat {
            c.send("\n").await;
            next_beat += Duration::from_millis(250);
        }
        if c.text_within(Duration::from_millis(50))
            .await
            .is_some_and(|t| t == "\n")
        {
            beats.push(start.elapsed());
        }
    }
    assert!(beats.len() >= 4, "{beats:?}");
    for w in beats.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(250) && gap <= Duration::from_millis(450),
            "server beats every 300 ms: {beats:?}"
        );
    }
    // The client stops: closed with 4001 after 2 × 300 ms (and at most a quarter more),
    // after an ERROR.
    let stopped = Instant::now();
    c.refused("no frame within heartbeat timeout", 4001).await;
    let waited = stopped.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited <= Duration::from_millis(1200),
        "{waited:?}"
    );
    node.wait_metric(
        r#"gateway_connection_closes_total{blame="client",reason="heartbeat_timeout"} 1"#,
    )
    .await;
}

#[tokio::test]
async fn app_sends_and_user_queues_go_through_redis() {
    let redis = RedisServer::start().await;
    let node = start(gateway::Config {
        redis_url: Some(redis.url().into()),
        node_heartbeat_ms: 200,
        ..auth_config()
    })
    .await;
    let token = user_token(SECRET, "bob");
    let (mut c, f) = Stomp::connected(&node, &format!("Authorization:Bearer {token}\n")).await;
    let conn_id = f.h("session").to_owned();
    c.subscribe("replies", "/user/queue/replies").await;

    // SEND /app/orders: in gw:inbound with its destination, RECEIPT once stored
    c.send("SEND\ndestination:/app/orders\nreceipt:o\n\n{\"order\":42}\0")
        .await;
    assert_eq!(c.next().await.h("receipt-id"), "o");
    let mut backend = redis.client().await;
    let r: redis::streams::StreamRangeReply = backend.xrange_all("gw:inbound").await.unwrap();
    let entries: Vec<shared::backend::Inbound> = r
        .ids
        .iter()
        .map(|e| {
            let field = |k: &str| e.get::<String>(k).map(|v| (k.to_owned(), v));
            let fields = [
                "event",
                "conn_id",
                "user_id",
                "node_id",
                "ts",
                "data",
                "destination",
            ];
            shared::backend::Inbound::from_fields(fields.into_iter().filter_map(field)).unwrap()
        })
        .collect();
    let events: Vec<_> = entries.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["connect", "message"]);
    let m = &entries[1];
    assert_eq!(m.conn_id, conn_id);
    assert_eq!(m.user_id.as_deref(), Some("bob"));
    assert_eq!(m.data, r#"{"order":42}"#);
    assert_eq!(m.destination.as_deref(), Some("/app/orders"));
    assert_eq!(entries[0].destination, None);

    // a unicast to the user arrives on /user/queue/replies
    let (status, body) = node
        .admin(
            "POST",
            "/v1/users/bob/send",
            r#"{"data":{"reply":1}}"#,
            None,
        )
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"delivered":1}"#));
    let m = c.next().await;
    assert_eq!(m.command, "MESSAGE");
    assert_eq!(m.h("subscription"), "replies");
    assert_eq!(m.h("destination"), "/user/queue/replies");
    assert_eq!(m.body, r#"{"reply":1}"#);
}

/// A token that comes in CONNECT sets the connection's token clock (idle until then): when
/// it expires and the grace period ends, ERROR and 4002, as v1's expiry.
#[tokio::test]
async fn a_token_from_connect_expires_with_an_error_and_4002() {
    let node = start(gateway::Config {
        token_grace_ms: 200,
        ..auth_config()
    })
    .await;
    let exp = gateway::test_util::now_secs() + 1;
    let token = hs256(SECRET, &json!({"sub": "eve", "exp": exp}));
    let (mut c, _) = Stomp::connected(&node, &format!("passcode:{token}\n")).await;
    let started = Instant::now();
    c.refused("token expired and was not refreshed", 4002).await;
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "not before the grace"
    );
    node.wait_metric(r#"gateway_connection_closes_total{blame="client",reason="token_expired"} 1"#)
        .await;
}
