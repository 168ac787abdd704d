//! The Centrifugo endpoint (`GET /connection/websocket`) over raw frames: what the stock
//! SDKs send and get (connect, batches, recovery in the subscribe reply, subscription
//! tokens, refresh, close codes), what hostile clients get (each way of breaking the
//! protocol has its close code and metric), one channel shared with v1 clients, and the
//! server API on the admin listener. The SDKs themselves run in `e2e/` (JS) and
//! `scripts/sdk-test.sh` (Python).

// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use loadtest::client::{Client, Received};
use serde_json::{json, Value};

const SECRET: &str = "centrifugo-test-secret-0123456789-abc";

fn cf_config() -> gateway::Config {
    gateway::Config {
        jwt_secret: Some(SECRET.into()),
        allow_anonymous: false,
        channels: vec!["h:*?history_size=10&history_ttl_secs=60"
            .parse()
            .expect("valid")],
        publish_allow: vec!["chat:*".into(), "h:*".into()],
        ..config()
    }
}

fn cf_url(node: &TestNode) -> String {
    format!("ws://{}/connection/websocket", node.addr)
}

fn token(claims: Value) -> String {
    hs256(SECRET, &claims)
}

fn user(sub: &str) -> String {
    user_token(SECRET, sub)
}

/// The commands of one frame, one per line.
async fn send(c: &mut Client, commands: &[Value]) {
    let text: Vec<String> = commands.iter().map(Value::to_string).collect();
    c.send_text(&text.join("\n")).await.expect("send");
}

/// The replies and pushes of the next text frame (pings `{}` skipped).
async fn frame(c: &mut Client) -> Vec<Value> {
    loop {
        match c.recv(T).await.expect("a frame") {
            Received::Text(t) => {
                let lines: Vec<Value> = t
                    .split('\n')
                    .map(|l| serde_json::from_str(l).expect("json line"))
                    .filter(|v: &Value| v.as_object().is_some_and(|o| !o.is_empty()))
                    .collect();
                if !lines.is_empty() {
                    return lines;
                }
            }
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The next reply or push, alone in its frame.
async fn one(c: &mut Client) -> Value {
    let mut f = frame(c).await;
    assert_eq!(f.len(), 1, "{f:?}");
    f.remove(0)
}

/// Connects and sends `connect` with `token`; returns the client and the reply.
async fn connect(node: &TestNode, token: &str) -> (Client, Value) {
    let mut c = Client::connect(&cf_url(node)).await.expect("upgrade");
    send(
        &mut c,
        &[json!({"id":1,"connect":{"token":token,"name":"test"}})],
    )
    .await;
    let reply = one(&mut c).await;
    (c, reply)
}

async fn connected(node: &TestNode, sub: &str) -> (Client, String) {
    let (c, reply) = connect(node, &user(sub)).await;
    let client = reply["connect"]["client"]
        .as_str()
        .unwrap_or_else(|| panic!("connect refused: {reply}"))
        .to_owned();
    (c, client)
}

/// Asserts the connection is closed with `code`, and the metric line `series` shows up.
async fn closed_with(node: &TestNode, c: &mut Client, code: u16, series: &str) {
    let (got, reason) = c.recv_close(T).await.expect("close");
    assert_eq!(got, code, "close reason `{reason}`");
    node.wait_metric(series).await;
}

#[tokio::test]
async fn connect_subscribe_publish_and_batched_replies() {
    let node = start(cf_config()).await;
    let (mut c, reply) = connect(&node, &user("alice")).await;
    let r = &reply["connect"];
    assert_eq!(reply["id"], 1);
    assert!(r["client"].as_str().unwrap().starts_with("test-node."));
    assert_eq!(
        (r["pong"].clone(), r["expires"].clone()),
        (json!(true), json!(true))
    );
    assert!(r["ttl"].as_u64().unwrap() > 500, "{r}");
    assert_eq!(r["ping"], 25);
    assert!(r["version"].as_str().unwrap().starts_with("gateway "));

    // Several commands in one frame: one frame of replies, in order, with their ids.
    send(
        &mut c,
        &[
            json!({"id":2,"subscribe":{"channel":"chat:room"}}),
            json!({"id":3,"publish":{"channel":"chat:room","data":{"text":"hi"}}}),
            json!({}),
            json!({"id":4,"rpc":{"method":"m","data":{}}}),
            json!({"id":5,"presence":{"channel":"chat:room"}}),
            json!({"id":6,"presence_stats":{"channel":"chat:room"}}),
            json!({"id":7,"publish":{"channel":"news","data":1}}),
            json!({"id":8,"history":{"channel":"chat:room"}}),
            json!({"id":9,"subscribe":{"channel":"chat:room"}}),
        ],
    )
    .await;
    // The publication is queued while the batch runs, so its push comes first.
    let mut seen = Vec::new();
    let replies = loop {
        let f = frame(&mut c).await;
        if f[0].get("id").is_some() {
            break f;
        }
        seen.extend(f);
    };
    let ids: Vec<u64> = replies.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![2, 3, 4, 5, 6, 7, 8, 9], "{replies:?}");
    assert_eq!(replies[0]["subscribe"], json!({}));
    assert_eq!(replies[1]["publish"], json!({}));
    assert_eq!(replies[2]["error"]["code"], 104, "rpc: method not found");
    assert_eq!(replies[3]["error"]["code"], 108, "presence: not available");
    assert_eq!(replies[4]["error"]["code"], 108);
    assert_eq!(replies[5]["error"]["code"], 103, "publish not allowed");
    assert_eq!(replies[6]["error"]["code"], 108, "no history kept");
    assert_eq!(replies[7]["error"]["code"], 105, "already subscribed");
    node.wait_metric(r#"gateway_request_errors_total{code="method_not_found"} 1"#)
        .await;

    // Unicast to the user reaches the SDK's `message` event.
    let (status, body) = node
        .admin(
            "POST",
            "/v1/users/alice/send",
            r#"{"data":{"dm":true}}"#,
            None,
        )
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"delivered":1}"#));
    while seen.len() < 2 {
        seen.extend(frame(&mut c).await);
    }
    assert!(
        seen.contains(&json!({"push":{"channel":"chat:room","pub":{"data":{"text":"hi"}}}})),
        "{seen:?}"
    );
    assert!(seen.contains(&json!({"push":{"message":{"data":{"dm":true}}}})));
}

#[tokio::test]
async fn a_v1_client_and_an_sdk_client_share_a_channel() {
    let node = start(gateway::Config {
        allow_anonymous: true,
        ..cf_config()
    })
    .await;
    let mut v1 = node.subscriber("chat:mixed").await;
    let (mut cf, _) = connect(&node, "").await;
    send(
        &mut cf,
        &[json!({"id":2,"subscribe":{"channel":"chat:mixed"}})],
    )
    .await;
    assert_eq!(one(&mut cf).await, json!({"id":2,"subscribe":{}}));

    send(
        &mut cf,
        &[json!({"id":3,"publish":{"channel":"chat:mixed","data":{"from":"sdk"}}})],
    )
    .await;
    let got = v1.recv_json(T).await.unwrap();
    assert_eq!(
        got,
        json!({"type":"message","channel":"chat:mixed","data":{"from":"sdk"}})
    );
    v1.send_json(&json!({"type":"publish","channel":"chat:mixed","data":{"from":"v1"},"id":9}))
        .await
        .unwrap();
    // Its own message and its ack, in either order.
    let two = [
        v1.recv_json(T).await.unwrap(),
        v1.recv_json(T).await.unwrap(),
    ];
    assert!(two.contains(&json!({"type":"ack","id":9})), "{two:?}");
    let mut seen = Vec::new();
    while !seen.contains(&json!({"push":{"channel":"chat:mixed","pub":{"data":{"from":"v1"}}}})) {
        seen.extend(frame(&mut cf).await);
    }
    assert!(seen.contains(&json!({"id":3,"publish":{}})), "{seen:?}");
}

#[tokio::test]
async fn recovery_returns_the_missed_publications_in_the_subscribe_reply() {
    let node = start(cf_config()).await;
    let (mut a, _) = connected(&node, "alice").await;
    send(
        &mut a,
        &[json!({"id":2,"subscribe":{"channel":"h:r","recoverable":true,"positioned":true}})],
    )
    .await;
    let r = one(&mut a).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        r["subscribe"],
        json!({"recoverable":true,"positioned":true,"epoch":epoch,"offset":0})
    );
    for i in 1..=3 {
        let body = format!(r#"{{"channel":"h:r","data":{{"n":{i}}}}}"#);
        let (status, reply) = node.admin("POST", "/api/publish", &body, None).await;
        assert_eq!(status, 200);
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply, json!({"result":{"offset":i,"epoch":epoch}}));
        assert_eq!(
            one(&mut a).await,
            json!({"push":{"channel":"h:r","pub":{"data":{"n":i},"offset":i}}})
        );
    }

    // A client that saw offset 1 comes back: 2 and 3 are in the reply, the top position
    // too; the next publication is a push.
    let (mut b, _) = connected(&node, "bob").await;
    send(
        &mut b,
        &[
            json!({"id":2,"subscribe":{"channel":"h:r","recoverable":true,"positioned":true,
                 "recover":true,"epoch":epoch,"offset":1}}),
        ],
    )
    .await;
    let r = one(&mut b).await;
    assert_eq!(
        r["subscribe"],
        json!({"recoverable":true,"positioned":true,"epoch":epoch,"offset":3,
               "was_recovering":true,"recovered":true,
               "publications":[{"data":{"n":2},"offset":2},{"data":{"n":3},"offset":3}]})
    );
    node.admin(
        "POST",
        "/api/publish",
        r#"{"channel":"h:r","data":4}"#,
        None,
    )
    .await;
    assert_eq!(
        one(&mut b).await,
        json!({"push":{"channel":"h:r","pub":{"data":4,"offset":4}}})
    );

    // Another epoch: not recovered; with flag 2 (getState in the SDK), error 112.
    send(
        &mut b,
        &[
            json!({"id":3,"subscribe":{"channel":"h:s","recoverable":true,"recover":true,
                   "epoch":"gone","offset":1}}),
            json!({"id":4,"subscribe":{"channel":"h:t","recoverable":true,"recover":true,
                   "epoch":"gone","offset":1,"flag":3}}),
        ],
    )
    .await;
    let replies = frame(&mut b).await;
    assert_eq!(replies[0]["subscribe"]["recovered"], false);
    assert_eq!(replies[0]["subscribe"]["was_recovering"], true);
    assert_eq!(replies[1]["error"]["code"], 112);
    node.wait_metric(r#"gateway_recoveries_total{recovered="true"} 1"#)
        .await;

    // History, in Centrifugo's terms: no limit is the position only, -1 all of it.
    send(
        &mut b,
        &[
            json!({"id":5,"history":{"channel":"h:r"}}),
            json!({"id":6,"history":{"channel":"h:r","limit":-1}}),
            json!({"id":7,"history":{"channel":"h:r","limit":2,"reverse":true}}),
            json!({"id":8,"history":{"channel":"h:r","limit":10,"since":{"offset":3,"epoch":epoch}}}),
        ],
    )
    .await;
    let h = frame(&mut b).await;
    assert_eq!(
        h[0]["history"],
        json!({"publications":[],"epoch":epoch,"offset":4})
    );
    assert_eq!(h[1]["history"]["publications"].as_array().unwrap().len(), 4);
    assert_eq!(
        h[2]["history"]["publications"],
        json!([{"data":4,"offset":4},{"data":{"n":3},"offset":3}])
    );
    assert_eq!(
        h[3]["history"]["publications"],
        json!([{"data":4,"offset":4}])
    );
}

#[tokio::test]
async fn a_subscription_token_grants_one_channel() {
    let node = start(cf_config()).await;
    let exp = gateway::test_util::now_secs() + 600;
    let limited = token(json!({"sub":"alice","exp":exp,"channels":["public:*"]}));
    let (mut c, reply) = connect(&node, &limited).await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    let grant = |channel: &str, sub: &str| token(json!({"sub":sub,"exp":exp,"channel":channel}));
    send(
        &mut c,
        &[
            json!({"id":2,"subscribe":{"channel":"secret:a"}}),
            json!({"id":3,"subscribe":{"channel":"secret:a","token":grant("secret:b","alice")}}),
            json!({"id":4,"subscribe":{"channel":"secret:a","token":grant("secret:a","bob")}}),
            json!({"id":5,"subscribe":{"channel":"secret:a","token":limited}}),
            json!({"id":6,"subscribe":{"channel":"secret:a","token":grant("secret:a","alice")}}),
            json!({"id":7,"sub_refresh":{"channel":"secret:a","token":grant("secret:a","alice")}}),
        ],
    )
    .await;
    let r = frame(&mut c).await;
    assert_eq!(
        r[0]["error"]["code"], 103,
        "the connection token does not allow it"
    );
    assert_eq!(r[1]["error"]["code"], 103, "a token for another channel");
    assert_eq!(r[2]["error"]["code"], 103, "a token for another user");
    assert_eq!(r[3]["error"]["code"], 101, "a connection token is no grant");
    assert_eq!(r[4], json!({"id":6,"subscribe":{}}));
    assert_eq!(r[5], json!({"id":7,"sub_refresh":{}}));

    // A subscription token cannot open a connection.
    let (_, reply) = connect(&node, &grant("secret:a", "alice")).await;
    assert_eq!(reply["error"]["code"], 101, "{reply}");
}

#[tokio::test]
async fn connect_errors_and_token_refresh() {
    let node = start(gateway::Config {
        token_grace_ms: 300,
        ..cf_config()
    })
    .await;
    let now = gateway::test_util::now_secs();
    // A missing token, an expired one (109: the SDK calls getToken).
    let (mut c, reply) = connect(&node, "").await;
    assert_eq!(reply["error"]["code"], 101);
    let expired = token(json!({"sub":"alice","exp":now - 120}));
    send(&mut c, &[json!({"id":3,"connect":{"token":expired}})]).await;
    assert_eq!(
        one(&mut c).await,
        json!({"id":3,"error":{"code":109,"message":"token expired"}})
    );
    // The connection waited for a good one.
    send(&mut c, &[json!({"id":4,"connect":{"token":user("alice")}})]).await;
    assert!(one(&mut c).await["connect"]["client"].is_string());
    // Not without end: the third refusal on one socket closes it.
    let (mut c, _) = connect(&node, "not.a.jwt").await;
    send(&mut c, &[json!({"id":2,"connect":{"token":"x"}})]).await;
    assert_eq!(one(&mut c).await["error"]["code"], 101);
    send(&mut c, &[json!({"id":3,"connect":{"token":"y"}})]).await;
    closed_with(
        &node,
        &mut c,
        3501,
        r#"gateway_protocol_violations_total{kind="centrifugo_connect_refused"} 1"#,
    )
    .await;

    // A token that runs out in a second: refreshed, the connection stays; not refreshed,
    // it closes with 3005 after the grace period.
    let short = || token(json!({"sub":"carol","exp":gateway::test_util::now_secs() + 1}));
    let (mut kept, r) = connect(&node, &short()).await;
    assert!(r["connect"]["ttl"].as_u64().unwrap() <= 1);
    let (mut lapsed, _) = connect(&node, &short()).await;
    send(
        &mut kept,
        &[json!({"id":2,"refresh":{"token":token(json!({"sub":"carol","exp":now + 600}))}})],
    )
    .await;
    let r = one(&mut kept).await;
    assert_eq!(r["refresh"]["expires"], true, "{r}");
    assert!(r["refresh"]["ttl"].as_u64().unwrap() > 500);
    send(
        &mut kept,
        &[json!({"id":3,"refresh":{"token":user("mallory")}})],
    )
    .await;
    assert_eq!(one(&mut kept).await["error"]["code"], 101, "another user");
    let (code, reason) = lapsed.recv_close(Duration::from_secs(5)).await.unwrap();
    assert_eq!((code, reason.as_str()), (3005, "connection expired"));
    // Past the first token's expiry and grace, the refreshed connection still serves.
    send(
        &mut kept,
        &[json!({"id":4,"subscribe":{"channel":"chat:k"}})],
    )
    .await;
    assert_eq!(one(&mut kept).await, json!({"id":4,"subscribe":{}}));
}

#[tokio::test]
async fn a_command_before_connect_closes_with_3501() {
    let node = start(cf_config()).await;
    let mut c = Client::connect(&cf_url(&node)).await.unwrap();
    send(&mut c, &[json!({"id":1,"subscribe":{"channel":"chat:a"}})]).await;
    closed_with(
        &node,
        &mut c,
        3501,
        r#"gateway_protocol_violations_total{kind="centrifugo_command_before_connect"} 1"#,
    )
    .await;
    node.wait_metric(
        r#"gateway_connection_closes_total{blame="client",reason="protocol_error"} 1"#,
    )
    .await;
}

#[tokio::test]
async fn a_second_connect_closes_with_3501() {
    let node = start(cf_config()).await;
    let (mut c, _) = connected(&node, "alice").await;
    send(&mut c, &[json!({"id":2,"connect":{"token":user("alice")}})]).await;
    closed_with(
        &node,
        &mut c,
        3501,
        r#"gateway_protocol_violations_total{kind="centrifugo_second_connect"} 1"#,
    )
    .await;
}

#[tokio::test]
async fn an_oversized_batch_closes_with_3501_and_an_oversized_frame_with_1009() {
    let node = start(gateway::Config {
        max_message_bytes: 64 * 1024,
        ..cf_config()
    })
    .await;
    let mut by = bystander(&node).await;
    let (mut c, _) = connected(&node, "alice").await;
    let batch: Vec<Value> = (0..300)
        .map(|i| json!({"id":i + 2,"history":{"channel":"h:x"}}))
        .collect();
    send(&mut c, &batch).await;
    closed_with(
        &node,
        &mut c,
        3501,
        r#"gateway_protocol_violations_total{kind="centrifugo_batch_too_large"} 1"#,
    )
    .await;
    // Over max_message_bytes: the SDKs stop on 1009 (no reconnect).
    let mut raw = Raw::upgrade(&node, "/connection/websocket").await;
    let connect = json!({"id":1,"connect":{"token":user("alice")}}).to_string();
    raw.send(0x81, connect.as_bytes()).await;
    let (op, _) = raw.frame().await.expect("connect reply");
    assert_eq!(op, 1);
    raw.send(0x81, &vec![b' '; 70 * 1024]).await;
    assert_eq!(raw.close_code().await, 1009);
    node.wait_metric(
        r#"gateway_connection_closes_total{blame="client",reason="message_too_big"} 1"#,
    )
    .await;
    still_served(&node, &mut by).await;
}

#[tokio::test]
async fn malformed_lines_close_with_3501() {
    let node = start(cf_config()).await;
    let mut bystander = bystander(&node).await;
    for (i, bad) in [
        "{not json",
        "[1,2]",
        r#"{"id":"one","connect":{}}"#,
        // a method that needs a reply without an id
        r#"{"subscribe":{"channel":"chat:a"}}"#,
    ]
    .iter()
    .enumerate()
    {
        let (mut c, _) = connected(&node, "alice").await;
        // The bad line after a good one: the good one's reply comes before the close.
        c.send_text(&format!(
            "{}\n{bad}",
            json!({"id":2,"subscribe":{"channel":"chat:ok"}})
        ))
        .await
        .unwrap();
        assert_eq!(one(&mut c).await, json!({"id":2,"subscribe":{}}), "{bad}");
        let series = format!(
            r#"gateway_protocol_violations_total{{kind="centrifugo_malformed_command"}} {}"#,
            i + 1
        );
        closed_with(&node, &mut c, 3501, &series).await;
    }
    // A binary frame: this endpoint speaks JSON only.
    let (mut c, _) = connected(&node, "alice").await;
    c.send_frame(fastwebsockets::Frame::binary(
        fastwebsockets::Payload::Borrowed(b"\x0a\x00"),
    ))
    .await
    .unwrap();
    let (code, _) = c.recv_close(T).await.unwrap();
    assert_eq!(code, 3506);
    // Unknown methods of newer SDKs are answered, not fatal.
    let (mut c, _) = connected(&node, "alice").await;
    send(&mut c, &[json!({"id":2,"sub_map":{"channel":"x"}})]).await;
    assert_eq!(one(&mut c).await["error"]["code"], 104);
    still_served(&node, &mut bystander).await;
}

/// A connected SDK client on `chat:by`, to show that hostile clients cost only themselves.
async fn bystander(node: &TestNode) -> Client {
    let (mut c, _) = connected(node, "bystander").await;
    send(&mut c, &[json!({"id":2,"subscribe":{"channel":"chat:by"}})]).await;
    assert_eq!(one(&mut c).await, json!({"id":2,"subscribe":{}}));
    c
}

async fn still_served(node: &TestNode, c: &mut Client) {
    let (status, _) = node
        .admin(
            "POST",
            "/api/publish",
            r#"{"channel":"chat:by","data":"ok"}"#,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        one(c).await,
        json!({"push":{"channel":"chat:by","pub":{"data":"ok"}}})
    );
}

#[tokio::test]
async fn no_connect_within_the_handshake_timeout_closes_with_3502() {
    let node = start(gateway::Config {
        handshake_timeout_ms: 300,
        ..cf_config()
    })
    .await;
    let mut idle = Client::connect(&cf_url(&node)).await.unwrap();
    let (mut ok, _) = connected(&node, "alice").await;
    // The point of the case: waiting out the timeout.
    let (code, reason) = idle.recv_close(Duration::from_secs(3)).await.unwrap();
    assert_eq!((code, reason.as_str()), (3502, "stale"));
    node.wait_metric(r#"gateway_protocol_violations_total{kind="centrifugo_connect_timeout"} 1"#)
        .await;
    // A connected client is not touched by its connect timeout.
    tokio::time::sleep(Duration::from_millis(400)).await;
    send(&mut ok, &[json!({"id":2,"subscribe":{"channel":"chat:a"}})]).await;
    assert_eq!(one(&mut ok).await, json!({"id":2,"subscribe":{}}));
}

#[tokio::test]
async fn rate_limits_answer_111_then_close_with_3013() {
    let node = start(gateway::Config {
        message_rate: 1,
        message_burst: 3,
        rate_limit_strikes: 5,
        ..cf_config()
    })
    .await;
    let (mut c, _) = connected(&node, "alice").await;
    let batch: Vec<Value> = (0..5)
        .map(|i| json!({"id":i + 2,"history":{"channel":"h:x"}}))
        .collect();
    send(&mut c, &batch).await;
    let replies = frame(&mut c).await;
    let codes: Vec<u64> = replies
        .iter()
        .map(|r| r["error"]["code"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(codes, vec![0, 0, 0, 111, 111], "{replies:?}");
    let more: Vec<Value> = (0..10)
        .map(|i| json!({"id":i + 10,"history":{"channel":"h:x"}}))
        .collect();
    send(&mut c, &more).await;
    let (code, reason) = c.recv_close(T).await.unwrap();
    assert_eq!((code, reason.as_str()), (3013, "too many requests"));
}

#[tokio::test]
async fn operator_disconnect_is_3503_and_a_drain_is_3001_with_a_hint() {
    let node = start(cf_config()).await;
    let (mut a, client) = connected(&node, "alice").await;
    let (status, _) = node
        .admin("DELETE", &format!("/v1/connections/{client}"), "", None)
        .await;
    assert_eq!(status, 200);
    let (code, reason) = a.recv_close(T).await.unwrap();
    assert_eq!((code, reason.as_str()), (3503, "force disconnect"));

    let (mut b, _) = connected(&node, "bob").await;
    let (status, _) = node.admin("POST", "/v1/drain", "", None).await;
    assert_eq!(status, 202);
    let (code, reason) = b.recv_close(T).await.unwrap();
    assert_eq!(code, 3001, "reconnect range");
    assert!(reason.starts_with("shutdown; retry_after_ms="), "{reason}");
    // A draining node refuses the upgrade, as on /ws.
    assert!(matches!(
        Client::connect(&cf_url(&node)).await,
        Err(loadtest::client::ConnectError::Status(503))
    ));
}

/// The `retry_after_ms` a drain's close reason carries.
fn hint_ms(reason: &str) -> u64 {
    let ms = reason.rsplit_once("retry_after_ms=").map(|(_, ms)| ms);
    ms.and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no hint in `{reason}`"))
}

/// The SDKs cannot read a drain's reconnect hint, so the node waits it out before it closes
/// an SDK connection (which keeps receiving meanwhile); a v1 connection is closed at once,
/// the hint in its close reason for the client to wait out.
#[tokio::test]
async fn a_drain_closes_an_sdk_connection_after_its_hint_and_a_v1_connection_at_once() {
    // 2 s: hints between 500 ms and 2 s, and the window bounds every close.
    let window = Duration::from_millis(2_000);
    let node = start(gateway::Config {
        drain_window_ms: window.as_millis() as u64,
        ..cf_config()
    })
    .await;
    let drain = |on: bool| {
        let node = &node;
        async move {
            let method = if on { "POST" } else { "DELETE" };
            let (status, _) = node.admin(method, "/v1/drain", "", None).await;
            assert_eq!(status, if on { 202 } else { 200 });
        }
    };

    // v1: closed in the drain's first tick, long before any hint could have passed.
    let url = format!("{}?access_token={}", node.url(), user("v"));
    let mut v1 = Client::connect(&url).await.expect("upgrade");
    assert_eq!(v1.recv_json(T).await.unwrap()["type"], "welcome");
    let asked = tokio::time::Instant::now();
    drain(true).await;
    let (code, reason) = v1.recv_close(T).await.unwrap();
    let at = asked.elapsed();
    assert_eq!(code, 1012, "{reason}");
    assert!(
        reason.starts_with("service restart; retry_after_ms="),
        "{reason}"
    );
    assert!(
        at < Duration::from_millis(hint_ms(&reason).min(500)),
        "closed after {at:?}"
    );
    drain(false).await;

    // An SDK connection: told in the first tick too, still served, closed once its hint
    // has passed and within the window.
    let (mut c, _) = connected(&node, "alice").await;
    send(&mut c, &[json!({"id":2,"subscribe":{"channel":"chat:d"}})]).await;
    assert_eq!(one(&mut c).await, json!({"id":2,"subscribe":{}}));
    let asked = tokio::time::Instant::now();
    drain(true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = node
        .admin(
            "POST",
            "/v1/channels/chat:d/publish",
            r#"{"data":{"n":1}}"#,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        one(&mut c).await,
        json!({"push":{"channel":"chat:d","pub":{"data":{"n":1}}}}),
        "still served while it waits out its hint"
    );
    let (code, reason) = c.recv_close(T).await.unwrap();
    let at = asked.elapsed();
    assert_eq!(code, 3001, "{reason}");
    assert!(reason.starts_with("shutdown; retry_after_ms="), "{reason}");
    let hint = Duration::from_millis(hint_ms(&reason));
    assert!(
        at >= hint,
        "closed after {at:?}, before its hint of {hint:?}"
    );
    assert!(
        at < window + Duration::from_millis(500),
        "closed after {at:?}"
    );
    node.wait_metric(r#"gateway_connection_closes_total{blame="none",reason="drain"} 2"#)
        .await;
}

/// One HTTP request with a header of our choosing.
async fn api(node: &TestNode, method: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let headers = key
        .map(|k| format!("X-API-Key: {k}\r\n"))
        .unwrap_or_default();
    let (status, body) = http(
        node.admin,
        "POST",
        &format!("/api/{method}"),
        body,
        &headers,
    )
    .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_server_api_speaks_centrifugo() {
    let node = start(gateway::Config {
        admin_token: Some("api-key-0123456789".into()),
        ..cf_config()
    })
    .await;
    let key = Some("api-key-0123456789");
    assert_eq!(api(&node, "info", "{}", None).await.0, 401);
    assert_eq!(api(&node, "info", "{}", Some("wrong")).await.0, 401);
    let (status, _) = http(
        node.admin,
        "POST",
        "/api/info",
        "{}",
        "Authorization: apikey api-key-0123456789\r\n",
    )
    .await;
    assert_eq!(status, 200, "the Authorization form");

    let (mut c, client) = connected(&node, "alice").await;
    send(
        &mut c,
        &[json!({"id":2,"subscribe":{"channel":"chat:api"}})],
    )
    .await;
    one(&mut c).await;

    let (s, r) = api(
        &node,
        "publish",
        r#"{"channel":"chat:api","data":{"a":1}}"#,
        key,
    )
    .await;
    assert_eq!((s, r), (200, json!({"result":{}})));
    assert_eq!(
        one(&mut c).await,
        json!({"push":{"channel":"chat:api","pub":{"data":{"a":1}}}})
    );
    let (_, r) = api(
        &node,
        "broadcast",
        r#"{"channels":["chat:api","h:b","bad name"],"data":2}"#,
        key,
    )
    .await;
    let responses = r["result"]["responses"].as_array().unwrap();
    assert_eq!(responses[0], json!({"result":{}}));
    assert_eq!(
        one(&mut c).await,
        json!({"push":{"channel":"chat:api","pub":{"data":2}}})
    );
    assert_eq!(responses[1]["result"]["offset"], 1);
    assert_eq!(responses[2]["error"]["code"], 102);

    let (_, r) = api(&node, "history", r#"{"channel":"h:b","limit":10}"#, key).await;
    assert_eq!(r["result"]["publications"], json!([{"data":2,"offset":1}]));
    let epoch = r["result"]["epoch"].clone();
    let (_, r) = api(&node, "history_remove", r#"{"channel":"h:b"}"#, key).await;
    assert_eq!(r, json!({"result":{}}));
    let (_, r) = api(&node, "history", r#"{"channel":"h:b","limit":-1}"#, key).await;
    assert_eq!(
        r,
        json!({"result":{"publications":[],"offset":1,"epoch":epoch}}),
        "the position survives"
    );
    for (method, body, code) in [
        ("history", r#"{"channel":"chat:api"}"#, 108),
        ("history_remove", r#"{"channel":"chat:api"}"#, 108),
        ("presence", r#"{"channel":"chat:api"}"#, 108),
        ("presence_stats", r#"{"channel":"chat:api"}"#, 108),
        ("publish", r#"{"channel":"chat:api"}"#, 107),
        ("publish", r#"{"channel":"chat:api","b64data":"AA=="}"#, 107),
        ("publish", "{not json", 107),
        ("publish", r#"{"channel":"","data":1}"#, 107),
        ("disconnect", "{}", 107),
    ] {
        let (s, r) = api(&node, method, body, key).await;
        assert_eq!(
            (s, r["error"]["code"].clone()),
            (200, json!(code)),
            "{method} {body}"
        );
    }
    let (s, r) = api(&node, "no_such_method", "{}", key).await;
    assert_eq!((s, r["error"]["code"].clone()), (404, json!(104)));

    let (_, r) = api(&node, "channels", "{}", key).await;
    assert_eq!(
        r["result"]["channels"]["chat:api"],
        json!({"num_clients":1})
    );
    let (_, r) = api(&node, "channels", r#"{"pattern":"nothing:*"}"#, key).await;
    assert_eq!(r["result"]["channels"], json!({}));
    let (_, r) = api(&node, "info", "{}", key).await;
    let nodes = r["result"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0]["uid"].clone(), nodes[0]["num_clients"].clone()),
        (json!("test-node"), json!(1))
    );

    let (_, r) = api(
        &node,
        "unsubscribe",
        r#"{"user":"alice","channel":"chat:api"}"#,
        key,
    )
    .await;
    assert_eq!(r, json!({"result":{}}));
    assert_eq!(
        one(&mut c).await,
        json!({"push":{"channel":"chat:api","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}})
    );
    let body = format!(r#"{{"user":"alice","whitelist":["{client}"]}}"#);
    api(&node, "disconnect", &body, key).await;
    let (_, r) = api(&node, "disconnect", r#"{"user":"alice"}"#, key).await;
    assert_eq!(r, json!({"result":{}}));
    let (code, _) = c.recv_close(T).await.unwrap();
    assert_eq!(code, 3503, "after the whitelisted call did nothing");
    node.wait_metric(r#"gateway_api_calls_total{method="publish",outcome="ok"} 1"#)
        .await;
}

#[tokio::test]
async fn server_api_calls_reach_every_node() {
    let redis = RedisServer::start().await;
    let node_config = |id: &str| gateway::Config {
        node_id: id.into(),
        redis_url: Some(redis.url().into()),
        node_heartbeat_ms: 100,
        node_ttl_ms: 1_000,
        rebalance: false,
        ..cf_config()
    };
    let a = start(node_config("a")).await;
    let b = start(node_config("b")).await;
    let (mut c, _) = connected(&b, "alice").await;
    send(
        &mut c,
        &[json!({"id":2,"subscribe":{"channel":"chat:far"}})],
    )
    .await;
    one(&mut c).await;

    // The counts come with the heartbeats.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (_, r) = api(&a, "channels", "{}", None).await;
        if r["result"]["channels"]["chat:far"] == json!({"num_clients":1}) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, r) = api(&a, "info", "{}", None).await;
    let nodes: Vec<(Value, Value)> = r["result"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["uid"].clone(), n["num_clients"].clone()))
        .collect();
    assert_eq!(nodes, vec![(json!("a"), json!(0)), (json!("b"), json!(1))]);

    api(&a, "publish", r#"{"channel":"chat:far","data":"x"}"#, None).await;
    assert_eq!(
        one(&mut c).await,
        json!({"push":{"channel":"chat:far","pub":{"data":"x"}}})
    );
    api(
        &a,
        "unsubscribe",
        r#"{"user":"alice","channel":"chat:far"}"#,
        None,
    )
    .await;
    assert_eq!(one(&mut c).await["push"]["unsubscribe"]["code"], 2000);
    api(&a, "disconnect", r#"{"user":"alice"}"#, None).await;
    let (code, _) = c.recv_close(T).await.unwrap();
    assert_eq!(code, 3503);
}

/// Presence on the Centrifugo endpoint: `presence` and `presence_stats` from the core's
/// presence, join and leave pushes with the token's `info`, and the server API's answers.
#[tokio::test]
async fn presence_join_and_leave_for_the_sdks() {
    let node = start(gateway::Config {
        admin_token: Some("api-key-0123456789".into()),
        channels: vec!["room:*?presence&join_leave".parse().expect("valid")],
        ..cf_config()
    })
    .await;
    let key = Some("api-key-0123456789");
    let exp = gateway::test_util::now_secs() + 600;
    let (mut a, ra) = connect(
        &node,
        &token(json!({"sub":"alice","exp":exp,"info":{"name":"Alice"}})),
    )
    .await;
    let a_id = ra["connect"]["client"].as_str().expect("client").to_owned();
    send(&mut a, &[json!({"id":2,"subscribe":{"channel":"room:1"}})]).await;
    assert_eq!(one(&mut a).await["subscribe"], json!({}));

    // Not subscribed: 103; a channel without presence: 108.
    let (mut b, b_id) = connected(&node, "bob").await;
    send(
        &mut b,
        &[
            json!({"id":2,"presence":{"channel":"room:1"}}),
            json!({"id":3,"presence_stats":{"channel":"chat:x"}}),
        ],
    )
    .await;
    let replies = frame(&mut b).await;
    assert_eq!(replies[0]["error"]["code"], 103, "{replies:?}");
    assert_eq!(replies[1]["error"]["code"], 108, "{replies:?}");

    // Bob joins: Alice gets a join push with Bob's client info.
    send(&mut b, &[json!({"id":4,"subscribe":{"channel":"room:1"}})]).await;
    assert_eq!(one(&mut b).await["subscribe"], json!({}));
    let join = one(&mut a).await;
    assert_eq!(
        join,
        json!({"push":{"channel":"room:1","join":{"info":{"client":b_id,"user":"bob"}}}})
    );

    send(
        &mut b,
        &[
            json!({"id":5,"presence":{"channel":"room:1"}}),
            json!({"id":6,"presence_stats":{"channel":"room:1"}}),
        ],
    )
    .await;
    let replies = frame(&mut b).await;
    let members = &replies[0]["presence"]["presence"];
    assert_eq!(
        members[&a_id],
        json!({"client":a_id,"user":"alice","conn_info":{"name":"Alice"}}),
        "{replies:?}"
    );
    assert_eq!(members[&b_id]["user"], "bob");
    assert_eq!(
        replies[1]["presence_stats"],
        json!({"num_clients":2,"num_users":2})
    );

    // The server API reads the same presence.
    let (status, v) = api(&node, "presence_stats", r#"{"channel":"room:1"}"#, key).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"], json!({"num_clients":2,"num_users":2}));
    let (_, v) = api(&node, "presence", r#"{"channel":"room:1"}"#, key).await;
    assert_eq!(v["result"]["presence"][&a_id]["user"], "alice", "{v}");

    // Bob leaves: Alice gets a leave push.
    send(
        &mut b,
        &[json!({"id":7,"unsubscribe":{"channel":"room:1"}})],
    )
    .await;
    assert_eq!(one(&mut b).await["unsubscribe"], json!({}));
    let leave = one(&mut a).await;
    assert_eq!(
        leave,
        json!({"push":{"channel":"room:1","leave":{"info":{"client":b_id,"user":"bob"}}}})
    );
}
