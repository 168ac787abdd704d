//! The Centrifugo codec: the core's events as Centrifugo pushes, its heartbeat as the
//! protocol's own ping (`{}`), and the gateway's closes as Centrifugo's disconnect codes.
//!
//! Pushes, one JSON object per frame:
//!
//! - a channel message: `{"push":{"channel":"c","pub":{"data":<data>,"offset":N}}}` (the
//!   offset on history channels only);
//! - a unicast: `{"push":{"message":{"data":<data>}}}` (the SDK's `message` event);
//! - the node ending a subscription:
//!   `{"push":{"channel":"c","unsubscribe":{"code":2500,"reason":"insufficient state"}}}`.
//! - a connection joining or leaving a channel with `join_leave`:
//!   `{"push":{"channel":"c","join":{"info":{"client":..,"user":..,"conn_info":..}}}}`
//!   (`leave` likewise).
//!
//! Over WebSocket each is a text frame and a close is a close frame. Over the HTTP
//! transports (bidirectional emulation, `docs/sdk.md`) each is a line of the HTTP stream or
//! a `data:` event, and a close is the disconnect push the SDKs read there,
//! `{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}`, with the same codes. Each
//! transport is a codec of its own, so a message is encoded once per transport.

use std::borrow::Cow;

use bytes::Bytes;

use crate::conn::event::{Codec, Event};
use crate::conn::frame::{self, Transport};
use crate::core::stream::INSUFFICIENT_STATE;
use crate::error::CloseReason;

use super::kind;

/// The Centrifugo codec over WebSocket, id 2 (v1 is 0, STOMP 1).
pub static CODEC: Centrifugo = Centrifugo {
    id: 2,
    transport: Transport::WebSocket,
};

/// Over HTTP-streaming, id 3.
pub static STREAM_CODEC: Centrifugo = Centrifugo {
    id: 3,
    transport: Transport::HttpStream,
};

/// Over server-sent events, id 4.
pub static SSE_CODEC: Centrifugo = Centrifugo {
    id: 4,
    transport: Transport::Sse,
};

/// See [`CODEC`].
pub struct Centrifugo {
    id: usize,
    transport: Transport,
}

impl Centrifugo {
    /// The transport this codec frames for.
    pub fn transport(&self) -> Transport {
        self.transport
    }
}

/// The server ping, and its client's pong: an empty object.
const PING: &str = "{}";

impl Codec for Centrifugo {
    fn id(&self) -> usize {
        self.id
    }

    fn encode(&self, event: &Event<'_>) -> Bytes {
        let json = match *event {
            Event::Message {
                channel,
                data,
                position,
            } => publication(channel, data, position.map(|(o, _)| o)),
            Event::Unsubscribed { channel, code } => {
                let (code, reason) = unsubscribe_code(code);
                // Channel names need no escaping (see `shared::channel`).
                format!(
                    r#"{{"push":{{"channel":"{channel}","unsubscribe":{{"code":{code},"reason":"{reason}"}}}}}}"#
                )
            }
            Event::Direct { data } => {
                let mut s = String::with_capacity(32 + data.len());
                s.push_str(r#"{"push":{"message":{"data":"#);
                s.push_str(data);
                s.push_str("}}}");
                s
            }
            Event::Join {
                channel,
                conn_id,
                user_id,
                info,
            } => join_leave("join", channel, conn_id, user_id, info),
            Event::Leave {
                channel,
                conn_id,
                user_id,
                info,
            } => join_leave("leave", channel, conn_id, user_id, info),
            // Centrifugo has no push for it: an SDK refreshes its token on its own when the
            // connect reply's `ttl` runs out. A ping keeps the frame harmless.
            Event::TokenExpiring { .. } => PING.to_owned(),
        };
        self.transport.text(&json)
    }

    fn ping(&self) -> Bytes {
        self.transport.text(PING)
    }

    fn close(&self, reason: &CloseReason) -> Bytes {
        let (code, text) = close(reason);
        match self.transport {
            Transport::WebSocket => frame::close(code, &text),
            _ => self.transport.text(
                &serde_json::json!({"push": {"disconnect": {"code": code, "reason": text}}})
                    .to_string(),
            ),
        }
    }

    /// The stock SDKs reconnect after their own backoff (centrifuge-js: 0.5–1 s for the
    /// first attempt) whatever the close says: the hint's text reaches only the application.
    fn takes_retry_hint(&self) -> bool {
        false
    }
}

/// `{"push":{"channel":..,"pub":{"data":..,"offset":..}}}` built without a serializer pass
/// over `data` (checked JSON text), as v1's `message`.
fn publication(channel: &str, data: &str, offset: Option<u64>) -> String {
    debug_assert!(shared::channel::is_valid(channel));
    let mut s = String::with_capacity(64 + channel.len() + data.len());
    s.push_str(r#"{"push":{"channel":""#);
    s.push_str(channel);
    s.push_str(r#"","pub":{"data":"#);
    s.push_str(data);
    if let Some(o) = offset {
        s.push_str(r#","offset":"#);
        s.push_str(&o.to_string());
    }
    s.push_str("}}}");
    s
}

/// `{"push":{"channel":..,"join":{"info":<ClientInfo>}}}` (or `leave`).
fn join_leave(
    kind: &str,
    channel: &str,
    conn_id: &str,
    user_id: Option<&str>,
    info: Option<&str>,
) -> String {
    let info = super::presence::client_info(conn_id, user_id, info);
    serde_json::json!({ "push": { "channel": channel, kind: { "info": info } } }).to_string()
}

/// The `unsubscribe` push's code and reason for the core's `unsubscribed` codes. Codes
/// from 2500 make the SDK subscribe again (recovering from its position); below 2500 the
/// subscription ends.
pub fn unsubscribe_code(code: &str) -> (u16, &'static str) {
    match code {
        INSUFFICIENT_STATE => (2500, "insufficient state"),
        _ => (2000, "server unsubscribe"),
    }
}

/// The close code and reason a Centrifugo client gets for each way a connection ends.
///
/// The SDKs decide from the code alone (the reason is not JSON): 3000–3499 and 4000–4499
/// reconnect, 3500–3999 and 4500–4999 do not; a code below 3000 reconnects too (as a
/// transport failure), except 1009. The table is in `docs/sdk.md`.
pub fn close(reason: &CloseReason) -> (u16, Cow<'static, str>) {
    match reason {
        CloseReason::ClientClosed(c) => (*c, Cow::Borrowed("")),
        CloseReason::Protocol(kind::CONNECT_TIMEOUT) => (3502, Cow::Borrowed("stale")),
        CloseReason::Protocol(k) if kind::ALL.contains(k) => (3501, Cow::Borrowed("bad request")),
        // RFC 6455 violations stay WebSocket closes: the transport is what broke.
        CloseReason::Protocol(_) => (reason.code(), Cow::Owned(reason.to_string())),
        CloseReason::Binary => (3506, Cow::Borrowed("inappropriate protocol")),
        CloseReason::InvalidUtf8 | CloseReason::TooBig(_) | CloseReason::FragmentTimeout => {
            (reason.code(), Cow::Owned(reason.to_string()))
        }
        CloseReason::SlowConsumer(_) => (3008, Cow::Borrowed("slow")),
        CloseReason::HeartbeatTimeout => (3012, Cow::Borrowed("no pong")),
        CloseReason::Policy(_) => (3013, Cow::Borrowed("too many requests")),
        CloseReason::TokenExpired => (3005, Cow::Borrowed("connection expired")),
        CloseReason::Shutdown => (3001, Cow::Borrowed("shutdown")),
        CloseReason::Restart(ms) => (3001, Cow::Owned(format!("shutdown; retry_after_ms={ms}"))),
        CloseReason::Rebalance(ms) => (
            3011,
            Cow::Owned(format!("force reconnect: rebalancing; retry_after_ms={ms}")),
        ),
        CloseReason::Disconnected => (3503, Cow::Borrowed("force disconnect")),
        CloseReason::Abnormal => (1006, Cow::Borrowed("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: Bytes) -> String {
        String::from_utf8(b[2..].to_vec()).expect("utf-8")
    }

    #[test]
    fn join_and_leave_are_pushes_with_client_info() {
        let join = CODEC.encode(&Event::Join {
            channel: "room:1",
            conn_id: "n1.a.1",
            user_id: Some("bob"),
            info: Some(r#"{"name":"Bob"}"#),
        });
        let v: serde_json::Value = serde_json::from_str(&text(join)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"push":{"channel":"room:1","join":{"info":{
                "client":"n1.a.1","user":"bob","conn_info":{"name":"Bob"}}}}})
        );
        let leave = CODEC.encode(&Event::Leave {
            channel: "room:1",
            conn_id: "n1.a.2",
            user_id: None,
            info: None,
        });
        let v: serde_json::Value = serde_json::from_str(&text(leave)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"push":{"channel":"room:1","leave":{"info":{
                "client":"n1.a.2","user":""}}}})
        );
    }

    #[test]
    fn pushes_are_centrifugo_json() {
        let pub_ = CODEC.encode(&Event::Message {
            channel: "c",
            data: r#"{"a":1}"#,
            position: Some((7, "e")),
        });
        let v: serde_json::Value = serde_json::from_str(&text(pub_)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"push":{"channel":"c","pub":{"data":{"a":1},"offset":7}}})
        );
        let plain = text(CODEC.encode(&Event::Message {
            channel: "c",
            data: "1",
            position: None,
        }));
        assert_eq!(plain, r#"{"push":{"channel":"c","pub":{"data":1}}}"#);
        let direct = text(CODEC.encode(&Event::Direct { data: "[2]" }));
        assert_eq!(direct, r#"{"push":{"message":{"data":[2]}}}"#);
        let unsub = text(CODEC.encode(&Event::Unsubscribed {
            channel: "c",
            code: INSUFFICIENT_STATE,
        }));
        let v: serde_json::Value = serde_json::from_str(&unsub).expect("json");
        assert_eq!(v["push"]["unsubscribe"]["code"], 2500);
        assert_eq!(text(CODEC.ping()), "{}");
    }

    #[test]
    fn closes_land_in_the_sdk_ranges() {
        let reconnects = |c: u16| !((3500..4000).contains(&c) || (4500..5000).contains(&c));
        for r in [
            CloseReason::Restart(700),
            CloseReason::Rebalance(900),
            CloseReason::Shutdown,
            CloseReason::SlowConsumer(1),
            CloseReason::HeartbeatTimeout,
            CloseReason::TokenExpired,
        ] {
            let (code, _) = close(&r);
            assert!((3000..3500).contains(&code) && reconnects(code), "{r:?}");
        }
        assert!(close(&CloseReason::Restart(700))
            .1
            .contains("retry_after_ms=700"));
        for r in [
            CloseReason::Disconnected,
            CloseReason::Protocol(kind::SECOND_CONNECT),
            CloseReason::Protocol(kind::CONNECT_TIMEOUT),
            CloseReason::Binary,
        ] {
            assert!(!reconnects(close(&r).0), "{r:?}");
        }
        assert_eq!(close(&CloseReason::Protocol("reserved_opcode")).0, 1002);
        assert_eq!(close(&CloseReason::TooBig(10)).0, 1009);
    }
}
