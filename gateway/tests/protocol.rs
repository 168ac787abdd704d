//! Protocol v1 over real sockets: welcome, subscribe, publish, acks and error replies.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn two_clients_talk_through_a_channel() {
    let node = start(config()).await;
    let (mut a, welcome) = node.client().await;
    assert_eq!(welcome["node_id"], "test-node");
    assert_eq!(welcome["user_id"], serde_json::Value::Null);
    assert!(welcome["conn_id"]
        .as_str()
        .is_some_and(|s| s.starts_with("test-node.")));
    let mut b = node.subscriber("chat:room").await;

    request(
        &mut a,
        json!({"type":"publish","channel":"chat:room","data":{"text":"hi","n":[1,2]},"id":5}),
    )
    .await;
    let got = b.recv_json(T).await.expect("message");
    assert_eq!(
        got,
        json!({"type":"message","channel":"chat:room","data":{"text":"hi","n":[1,2]}})
    );

    request(
        &mut b,
        json!({"type":"unsubscribe","channel":"chat:room","id":2}),
    )
    .await;
    request(
        &mut a,
        json!({"type":"publish","channel":"chat:room","data":1,"id":6}),
    )
    .await;
    request(
        &mut b,
        json!({"type":"subscribe","channel":"chat:other","id":3}),
    )
    .await;
    // b's next frame is the ack above, so no message from chat:room was queued in between.
}

#[tokio::test]
async fn bad_requests_get_error_replies_and_the_connection_stays_open() {
    let mut cfg = config();
    cfg.max_subscriptions = 2;
    let node = start(cfg).await;
    let (mut c, _) = node.client().await;

    let cases = [
        ("{not json", json!(null), "malformed_json"),
        (r#"{"type":"dance","id":1}"#, json!(1), "unknown_type"),
        (r#"{"id":2}"#, json!(2), "bad_request"),
        (
            r#"{"type":"subscribe","channel":"bad name","id":3}"#,
            json!(3),
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","channel":"","id":4}"#,
            json!(4),
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","channel":"x\u0000y","id":5}"#,
            json!(5),
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","channel":"bad\u0001","id":6}"#,
            json!(6),
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","channel":["chat:a"],"id":7}"#,
            json!(7),
            "bad_request",
        ),
        (
            r#"{"type":"publish","channel":"news","data":1,"id":6}"#,
            json!(6),
            "forbidden",
        ),
        (
            r#"{"type":"publish","channel":"chat:a","id":7}"#,
            json!(7),
            "bad_request",
        ),
        (r#"[1,2,3]"#, json!(null), "malformed_json"),
    ];
    for (req, id, code) in cases {
        let reply = ask(&mut c, req).await;
        assert_eq!(reply["type"], "error", "{req}");
        assert_eq!(reply["id"], id, "{req}");
        assert_eq!(reply["code"], code, "{req}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let long = "x".repeat(201);
    let reply = ask(
        &mut c,
        &json!({"type":"subscribe","channel":long,"id":8}).to_string(),
    )
    .await;
    assert_eq!(reply["code"], "invalid_channel");

    // a JSON bomb in `data`
    let bomb = format!(
        r#"{{"type":"publish","channel":"chat:a","id":9,"data":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let reply = ask(&mut c, &bomb).await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_u64()),
        (Some("malformed_json"), Some(9))
    );

    // subscription cap
    request(&mut c, json!({"type":"subscribe","channel":"a","id":10})).await;
    request(&mut c, json!({"type":"subscribe","channel":"a","id":11})).await; // idempotent
    request(&mut c, json!({"type":"subscribe","channel":"b","id":12})).await;
    let reply = ask(&mut c, r#"{"type":"subscribe","channel":"c","id":13}"#).await;
    assert_eq!(reply["code"], "too_many_subscriptions");

    // still fully usable
    request(
        &mut c,
        json!({"type":"publish","channel":"chat:ok","data":null,"id":14}),
    )
    .await;
    let m = node.metrics().await;
    for code in [
        "malformed_json",
        "unknown_type",
        "invalid_channel",
        "forbidden",
        "too_many_subscriptions",
        "bad_request",
    ] {
        assert!(
            has_series(
                &m,
                &format!("gateway_request_errors_total{{code=\"{code}\"}}")
            ),
            "{code} missing in\n{m}"
        );
    }
}

/// RFC 8259 lets any string character be escaped; PHP's `json_encode` writes `/` as `\/`.
#[tokio::test]
async fn requests_with_escaped_strings_are_served() {
    let node = start(config()).await;
    let (mut php, _) = node.client().await;
    let reply = ask(
        &mut php,
        r#"{"type":"subscribe","channel":"chat:a\/b","id":1}"#,
    )
    .await;
    assert_eq!(reply, json!({"type":"ack","id":1}));
    let reply = ask(
        &mut php,
        r#"{"type":"publis\u0068","channel":"chat:a\/b","data":"x\/y","id":2}"#,
    )
    .await;
    // the message (we are subscribed) and the ack, in either order
    let other = php.recv_json(T).await.expect("second frame");
    let mut got = [reply, other];
    got.sort_by_key(|v| v["type"].to_string());
    assert_eq!(got[0], json!({"type":"ack","id":2}));
    assert_eq!(
        got[1],
        json!({"type":"message","channel":"chat:a/b","data":"x/y"})
    );
    let (mut plain, _) = node.client().await;
    request(
        &mut plain,
        json!({"type":"publish","channel":"chat:a/b","data":1,"id":3}),
    )
    .await;
    assert_eq!(php.recv_json(T).await.expect("message")["data"], 1);
}

#[tokio::test]
async fn subscribe_flood_is_capped_and_others_are_unaffected() {
    let node = start(config()).await;
    let mut bystander = node.subscriber("chat:calm").await;
    let (mut flood, _) = node.client().await;
    for i in 0..500 {
        flood
            .send_json(&json!({"type":"subscribe","channel":format!("f{i}"),"id":i}))
            .await
            .expect("send");
    }
    let mut refused = 0;
    for _ in 0..500 {
        let r = flood.recv_json(T).await.expect("reply");
        if r["code"] == "too_many_subscriptions" {
            refused += 1;
        }
    }
    assert_eq!(refused, 500 - config().max_subscriptions);
    let (mut p, _) = node.client().await;
    request(
        &mut p,
        json!({"type":"publish","channel":"chat:calm","data":"still here","id":1}),
    )
    .await;
    assert_eq!(
        bystander.recv_json(T).await.expect("msg")["data"],
        "still here"
    );
}
