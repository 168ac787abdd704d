//! Wire protocol v1: one JSON object per WebSocket text frame. See `docs/protocol.md`.
//!
//! Client requests are parsed in two steps: first into a lenient [`Envelope`] that keeps the
//! request `id` even when the rest is wrong, then into a typed [`Request`]. That way every
//! error reply can name the request it answers.
//!
//! Requests are JSON as RFC 8259 defines it: string fields may be written with escapes
//! (PHP's `json_encode` writes `/` as `\/`). They are borrowed from the frame when written
//! plainly, the usual case, and unescaped into their own allocation only when they hold an
//! escape.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Request id chosen by the client, echoed in the `ack` or `error` reply.
pub type RequestId = u64;

/// A parsed client request.
#[derive(Debug, Clone)]
pub enum Request<'a> {
    /// Start receiving a channel's messages; on a history channel, optionally from a
    /// position (`recover`), getting what was missed first.
    Subscribe {
        channel: Cow<'a, str>,
        recover: Option<Position>,
    },
    /// Read a history channel's publications: the last `limit`, or those after `since`.
    History {
        channel: Cow<'a, str>,
        limit: Option<usize>,
        since: Option<Position>,
    },
    /// Stop receiving a channel's messages.
    Unsubscribe { channel: Cow<'a, str> },
    /// Publish `data` (any JSON value, kept as raw text) to a channel.
    Publish {
        channel: Cow<'a, str>,
        data: &'a RawValue,
    },
    /// Replace the connection's token before it expires.
    Refresh { token: Cow<'a, str> },
    /// Send `data` to the backends (the inbound stream).
    Send { data: &'a RawValue },
    /// Who is subscribed to a presence channel.
    Presence { channel: Cow<'a, str> },
    /// How many connections and users are subscribed to a presence channel.
    PresenceStats { channel: Cow<'a, str> },
}

/// A place in a history channel: the epoch and the offset of a publication in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// The lenient first parse of a client frame.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    pub kind: Option<Cow<'a, str>>,
    #[serde(default)]
    pub id: Option<RequestId>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub channel: Option<Cow<'a, str>>,
    /// `Some` whenever the field is present, even when it is `null`.
    #[serde(default, borrow, deserialize_with = "present")]
    pub data: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub token: Option<Cow<'a, str>>,
    #[serde(default)]
    pub recover: Option<Position>,
    #[serde(default)]
    pub since: Option<Position>,
    #[serde(default)]
    pub limit: Option<usize>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// An optional string, borrowed from the input unless it holds escapes. serde's own
/// `Option<Cow<str>>` always allocates (its `borrow` attribute only borrows a bare `Cow`),
/// hence this visitor.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    d.deserialize_option(Text)
}

/// Reads only the `id` of a JSON object whose other fields the [`Envelope`] refused (a field
/// of the wrong type), so that the error reply can still name the request. `Err` when the
/// text is not a JSON object; `Ok(None)` when it has no `id`, or one that is not a
/// [`RequestId`].
struct IdProbe(Option<RequestId>);

impl<'de> Deserialize<'de> for IdProbe {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Probe;
        impl<'de> serde::de::Visitor<'de> for Probe {
            type Value = IdProbe;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<IdProbe, A::Error> {
                let mut id = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "id" {
                        let raw: &'de RawValue = map.next_value()?;
                        id = serde_json::from_str(raw.get()).ok();
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(IdProbe(id))
            }
        }
        d.deserialize_map(Probe)
    }
}

/// Why a client frame was refused. The `code` is the `error.code` on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: String,
}

/// Parses one client text frame. Channel names are validated here, so every later stage can
/// trust them.
pub fn parse_request(text: &str) -> Result<(Option<RequestId>, Request<'_>), ParseError> {
    let env: Envelope<'_> = match serde_json::from_str(text) {
        Ok(env) => env,
        // A JSON object with a field of the wrong type: answer it with its `id`.
        Err(e) => match serde_json::from_str::<IdProbe>(text) {
            Ok(IdProbe(id)) => {
                return Err(ParseError {
                    id,
                    code: ErrorCode::BadRequest,
                    message: format!("a field has the wrong type: {e}"),
                })
            }
            Err(_) => {
                return Err(ParseError {
                    id: None,
                    code: ErrorCode::MalformedJson,
                    message: format!("frame is not a valid request object: {e}"),
                })
            }
        },
    };
    let Envelope {
        kind,
        id,
        channel,
        data,
        token,
        recover,
        since,
        limit,
    } = env;
    let fail = |code: ErrorCode, message: String| ParseError { id, code, message };
    let channel = move || -> Result<Cow<'_, str>, ParseError> {
        let c =
            channel.ok_or_else(|| fail(ErrorCode::BadRequest, "missing field `channel`".into()))?;
        if crate::channel::is_valid(&c) {
            Ok(c)
        } else {
            Err(fail(
                ErrorCode::InvalidChannel,
                "channel must match [A-Za-z0-9_.:@/-]{1,200}".into(),
            ))
        }
    };
    let data = || -> Result<&RawValue, ParseError> {
        let data =
            data.ok_or_else(|| fail(ErrorCode::BadRequest, "missing field `data`".into()))?;
        check_data(data.get()).map_err(|m| fail(ErrorCode::MalformedJson, m.into()))?;
        Ok(data)
    };
    let req = match kind.as_deref() {
        Some("subscribe") => Request::Subscribe {
            channel: channel()?,
            recover,
        },
        Some("history") => Request::History {
            channel: channel()?,
            limit,
            since,
        },
        Some("unsubscribe") => Request::Unsubscribe {
            channel: channel()?,
        },
        Some("publish") => Request::Publish {
            channel: channel()?,
            data: data()?,
        },
        Some("send") => Request::Send { data: data()? },
        Some("presence") => Request::Presence {
            channel: channel()?,
        },
        Some("presence_stats") => Request::PresenceStats {
            channel: channel()?,
        },
        Some("refresh") => Request::Refresh {
            token: token
                .ok_or_else(|| fail(ErrorCode::BadRequest, "missing field `token`".into()))?,
        },
        Some(other) => {
            let shown: String = other.chars().take(40).collect();
            return Err(fail(
                ErrorCode::UnknownType,
                format!("unknown request type `{shown}`"),
            ));
        }
        None => return Err(fail(ErrorCode::BadRequest, "missing field `type`".into())),
    };
    Ok((id, req))
}

/// Deepest nesting of arrays and objects accepted in `data`. serde_json limits the depth of
/// values it builds, but `data` is kept raw and forwarded to every subscriber, so the gateway
/// checks it itself: a JSON bomb must not reach browsers whose parsers recurse.
pub const MAX_DATA_DEPTH: usize = 64;

/// Checks JSON text that the gateway forwards verbatim (client `data`, backend publishes):
/// syntax, nesting depth, and unpaired surrogate escapes. Returns why it is refused.
pub fn check_data(json: &str) -> Result<(), &'static str> {
    if serde_json::from_str::<serde::de::IgnoredAny>(json).is_err() {
        return Err("`data` is not valid JSON");
    }
    if nesting_exceeds(json, MAX_DATA_DEPTH) {
        return Err("`data` nests deeper than 64 levels");
    }
    // Raw values are not checked for lone UTF-16 surrogates (`"\ud800"`), which strict
    // parsers downstream refuse; only text with such escapes pays for a full parse.
    if has_surrogate_escape(json) && serde_json::from_str::<serde_json::Value>(json).is_err() {
        return Err("`data` holds an unpaired UTF-16 surrogate escape");
    }
    Ok(())
}

/// True when the JSON text has a `\uD800`-`\uDFFF` escape (case-insensitive).
fn has_surrogate_escape(json: &str) -> bool {
    json.as_bytes().windows(3).any(|w| {
        w[0] == b'u' && (w[1] | 0x20) == b'd' && matches!(w[2] | 0x20, b'8'..=b'9' | b'a'..=b'f')
    })
}

/// True when the (already syntax-checked) JSON text nests arrays/objects deeper than `max`.
pub fn nesting_exceeds(json: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Machine-readable error codes of `error` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a JSON object (or nests too deep).
    MalformedJson,
    /// `type` names no request of this protocol version.
    UnknownType,
    /// A required field is missing or has the wrong type.
    BadRequest,
    /// The channel name breaks the naming rule.
    InvalidChannel,
    /// The connection already holds the maximum number of subscriptions.
    TooManySubscriptions,
    /// The connection may not do this on this channel.
    Forbidden,
    /// The connection sends too fast; further excess closes it with 1008.
    RateLimited,
    /// The broker is unreachable right now; retry later.
    Unavailable,
    /// A token refresh was refused.
    Unauthorized,
    /// The channel does not have this feature (history, presence) in its options.
    NotEnabled,
    /// A part of the request is over its size cap (the `data` of a `send`); the connection
    /// stays open.
    MessageTooBig,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotEnabled => "not_enabled",
            ErrorCode::MessageTooBig => "message_too_big",
        }
    }
}

/// Frames the gateway sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame of every connection.
    Welcome {
        conn_id: String,
        node_id: String,
        user_id: Option<String>,
    },
    /// A request succeeded.
    Ack { id: Option<RequestId> },
    /// A subscribe to (or a publish on) a history channel succeeded: the channel's epoch
    /// and top offset, and, when the subscribe asked to recover, whether it was.
    #[serde(rename = "ack")]
    Positioned {
        id: Option<RequestId>,
        epoch: String,
        offset: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// The answer to `history`.
    #[serde(rename = "ack")]
    History {
        id: Option<RequestId>,
        epoch: String,
        offset: u64,
        publications: Vec<Publication<'a>>,
    },
    /// The node ended a subscription; `code` says why (`insufficient_state`: on a history
    /// channel, it could not keep the subscription gap-free).
    Unsubscribed { channel: &'a str, code: &'a str },
    /// The answer to `presence`: the members by conn_id, at most `presence_max_members`
    /// of them, `truncated` when there are more.
    #[serde(rename = "ack")]
    Presence {
        id: Option<RequestId>,
        presence: std::collections::BTreeMap<&'a str, PresenceMember<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// The answer to `presence_stats`.
    #[serde(rename = "ack")]
    PresenceStats {
        id: Option<RequestId>,
        num_clients: u64,
        num_users: u64,
    },
    /// A connection subscribed to a channel with join/leave.
    Join {
        channel: &'a str,
        conn_id: &'a str,
        user_id: Option<&'a str>,
        info: Option<&'a RawValue>,
    },
    /// A connection unsubscribed from a channel with join/leave, closed, or its node died.
    Leave {
        channel: &'a str,
        conn_id: &'a str,
        user_id: Option<&'a str>,
        info: Option<&'a RawValue>,
    },
    /// A request failed; the connection stays open.
    Error {
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
    },
    /// The connection's token expired; send `refresh` within `grace_ms` or be closed (4002).
    TokenExpired { grace_ms: u64 },
    /// A channel message (the gateway builds it with [`encode_message_at`]).
    Message {
        channel: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        data: &'a RawValue,
    },
}

/// One member of a `presence` reply: its user (`null` when anonymous) and the token's
/// `info` claim (`null` when it has none).
#[derive(Debug, Serialize)]
pub struct PresenceMember<'a> {
    pub user_id: Option<&'a str>,
    pub info: Option<&'a RawValue>,
}

/// One publication of a history reply.
#[derive(Debug, Serialize)]
pub struct Publication<'a> {
    pub offset: u64,
    pub data: &'a RawValue,
}

impl ServerFrame<'_> {
    /// The JSON text of this frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// `{"type":"direct","data":<data>}` for a unicast to a user or connection; `data` must be
/// valid JSON text (see [`check_data`]).
pub fn encode_direct(data: &str) -> String {
    let (head, tail) = DIRECT_PARTS;
    let mut s = String::with_capacity(head.len() + data.len() + tail.len());
    s.push_str(head);
    s.push_str(data);
    s.push_str(tail);
    s
}

/// What comes before and after `data` in [`encode_direct`]'s text, for encoders that write
/// it straight into a frame.
pub const DIRECT_PARTS: (&str, &str) = (r#"{"type":"direct","data":"#, "}");

/// The JSON text of a `message` frame, built without a serializer pass over `data`.
///
/// `channel` must be a valid channel name (no escaping needed) and `data` valid JSON text;
/// the gateway checks both before anything reaches a subscriber. Equal to serializing
/// [`ServerFrame::Message`].
pub fn encode_message(channel: &str, data: &str) -> String {
    encode_message_at(channel, data, None)
}

/// [`encode_message`] with the publication's `offset` on a history channel.
pub fn encode_message_at(channel: &str, data: &str, offset: Option<u64>) -> String {
    debug_assert!(crate::channel::is_valid(channel));
    let mut s = String::with_capacity(60 + channel.len() + data.len());
    s.push_str(r#"{"type":"message","channel":""#);
    s.push_str(channel);
    if let Some(o) = offset {
        s.push_str(r#"","offset":"#);
        s.push_str(&o.to_string());
        s.push_str(r#","data":"#);
    } else {
        s.push_str(r#"","data":"#);
    }
    s.push_str(data);
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        let (id, r) = parse_request(r#"{"type":"subscribe","channel":"a:b","id":7}"#).unwrap();
        assert_eq!(id, Some(7));
        assert!(matches!(
            r,
            Request::Subscribe {
                channel: Cow::Borrowed("a:b"),
                recover: None
            }
        ));
        let (_, r) =
            parse_request(r#"{"type":"publish","channel":"c","data":{"x":[1,2]},"id":1}"#).unwrap();
        match r {
            Request::Publish { data, .. } => assert_eq!(data.get(), r#"{"x":[1,2]}"#),
            _ => panic!("wrong request"),
        }
    }

    #[test]
    fn errors_keep_the_id() {
        let e = parse_request(r#"{"type":"nope","id":3}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(3), ErrorCode::UnknownType));
        let e = parse_request(r#"{"type":"subscribe","channel":"bad name","id":4}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(4), ErrorCode::InvalidChannel));
        let e = parse_request(r#"{"type":"publish","channel":"ok","id":5}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(5), ErrorCode::BadRequest));
        let e = parse_request("{not json").unwrap_err();
        assert_eq!((e.id, e.code), (None, ErrorCode::MalformedJson));
        let e = parse_request("[1,2]").unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedJson);
        // An escaped control character is read, then refused as a channel, with its id.
        let e = parse_request(r#"{"type":"subscribe","channel":"bad\u0001","id":6}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(6), ErrorCode::InvalidChannel));
        // A field of the wrong type still lets the id be read.
        let e = parse_request(r#"{"type":"subscribe","channel":7,"id":8}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(8), ErrorCode::BadRequest));
        let e = parse_request(r#"{"type":5,"id":"nine"}"#).unwrap_err();
        assert_eq!((e.id, e.code), (None, ErrorCode::BadRequest));
        let e = parse_request(r#"{"id":10,"type":"subscribe""#).unwrap_err();
        assert_eq!((e.id, e.code), (None, ErrorCode::MalformedJson));
    }

    /// RFC 8259 allows any character of a string to be escaped; PHP writes `/` as `\/`.
    #[test]
    fn escaped_strings_are_accepted() {
        let (id, r) =
            parse_request(r#"{"type":"subscrib\u0065","channel":"chat\/room","id":1}"#).unwrap();
        assert_eq!(id, Some(1));
        match r {
            Request::Subscribe { channel, .. } => assert_eq!(channel, "chat/room"),
            other => panic!("wrong request {other:?}"),
        }
        let (_, r) = parse_request(r#"{"type":"refresh","token":"a.b\/c","id":2}"#).unwrap();
        assert!(matches!(r, Request::Refresh { token } if token == "a.b/c"));
        let (_, r) =
            parse_request(r#"{"type":"publish","channel":"a\/b","data":"x\/y","id":3}"#).unwrap();
        match r {
            // `data` is forwarded as written, escapes included.
            Request::Publish { channel, data } => {
                assert_eq!((&*channel, data.get()), ("a/b", r#""x\/y""#))
            }
            other => panic!("wrong request {other:?}"),
        }
        // Plain strings are borrowed, not copied.
        let (_, r) = parse_request(r#"{"type":"unsubscribe","channel":"c"}"#).unwrap();
        assert!(matches!(
            r,
            Request::Unsubscribe {
                channel: Cow::Borrowed("c")
            }
        ));
    }

    #[test]
    fn json_bomb_is_rejected_not_overflowed() {
        let deep = format!(
            r#"{{"type":"publish","channel":"c","id":1,"data":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            parse_request(&deep).unwrap_err().code,
            ErrorCode::MalformedJson
        );
        // brackets inside strings (including after an escaped quote) do not count
        let inner = format!("{}{}{}", "[".repeat(64), r#""[[\"{""#, "]".repeat(64));
        let ok = format!(r#"{{"type":"publish","channel":"c","id":1,"data":{inner}}}"#);
        assert!(parse_request(&ok).is_ok(), "{ok}");
    }

    #[test]
    fn presence_requests_and_frames() {
        let (id, r) = parse_request(r#"{"type":"presence","channel":"c:1","id":3}"#).unwrap();
        assert_eq!(id, Some(3));
        assert!(matches!(r, Request::Presence { channel } if channel == "c:1"));
        let (_, r) = parse_request(r#"{"type":"presence_stats","channel":"c:1"}"#).unwrap();
        assert!(matches!(r, Request::PresenceStats { channel } if channel == "c:1"));
        let e = parse_request(r#"{"type":"presence","id":1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let info = RawValue::from_string(r#"{"name":"Ann"}"#.into()).unwrap();
        let j = ServerFrame::Join {
            channel: "c",
            conn_id: "n.1.2",
            user_id: Some("ann"),
            info: Some(&info),
        };
        assert_eq!(
            j.to_json(),
            r#"{"type":"join","channel":"c","conn_id":"n.1.2","user_id":"ann","info":{"name":"Ann"}}"#
        );
        let mut members = std::collections::BTreeMap::new();
        members.insert(
            "n.1.3",
            PresenceMember {
                user_id: None,
                info: None,
            },
        );
        let p = ServerFrame::Presence {
            id: Some(3),
            presence: members,
            truncated: false,
        };
        assert_eq!(
            p.to_json(),
            r#"{"type":"ack","id":3,"presence":{"n.1.3":{"user_id":null,"info":null}}}"#
        );
        let s = ServerFrame::PresenceStats {
            id: Some(4),
            num_clients: 3,
            num_users: 2,
        };
        assert_eq!(
            s.to_json(),
            r#"{"type":"ack","id":4,"num_clients":3,"num_users":2}"#
        );
    }

    #[test]
    fn message_encoding() {
        let data = RawValue::from_string("{\"a\":1}".into()).unwrap();
        let f = ServerFrame::Message {
            channel: "c".into(),
            offset: None,
            data: &data,
        };
        assert_eq!(
            f.to_json(),
            r#"{"type":"message","channel":"c","data":{"a":1}}"#
        );
        assert_eq!(encode_message("c", data.get()), f.to_json());
        let at = ServerFrame::Message {
            channel: "c".into(),
            offset: Some(42),
            data: &data,
        };
        assert_eq!(encode_message_at("c", data.get(), Some(42)), at.to_json());
        let e = ServerFrame::Error {
            id: None,
            code: ErrorCode::Forbidden,
            message: "m".into(),
        };
        assert_eq!(
            e.to_json(),
            r#"{"type":"error","id":null,"code":"forbidden","message":"m"}"#
        );
    }
}
