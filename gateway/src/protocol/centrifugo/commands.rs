//! Centrifugo's client protocol v2 in JSON, as the stock SDKs speak it: the commands a
//! client sends, the errors the node answers with, and the replies' shapes.
//!
//! A frame carries one or more commands, one JSON object per line. Each command is an
//! object with an `id` (a reply is expected when it is not 0) and one method key:
//! `{"id":1,"connect":{...}}`, `{"id":2,"subscribe":{...}}`, `{"send":{...}}`. An empty
//! object `{}` is the client's pong. Fields this node does not know are ignored, as
//! Centrifugo does, so newer SDKs keep working.

use serde::Deserialize;
use serde_json::value::RawValue;
use shared::protocol::ErrorCode;

use crate::core::session::Failure;

/// A command line of a frame, before its method is looked at.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Command<'a> {
    pub id: u32,
    #[serde(borrow)]
    pub connect: Option<Connect<'a>>,
    #[serde(borrow)]
    pub subscribe: Option<Subscribe<'a>>,
    pub unsubscribe: Option<Channel>,
    #[serde(borrow)]
    pub publish: Option<Publish<'a>>,
    pub presence: Option<Channel>,
    pub presence_stats: Option<Channel>,
    pub history: Option<History>,
    #[serde(borrow)]
    pub send: Option<SendData<'a>>,
    pub rpc: Option<Rpc>,
    pub refresh: Option<Refresh>,
    pub sub_refresh: Option<SubRefresh>,
}

/// The method of a [`Command`], once exactly one key was found.
#[derive(Debug)]
pub enum Method<'a> {
    Connect(Connect<'a>),
    Subscribe(Subscribe<'a>),
    Unsubscribe(Channel),
    Publish(Publish<'a>),
    Presence(Channel),
    PresenceStats(Channel),
    History(History),
    Send(SendData<'a>),
    Rpc(Rpc),
    Refresh(Refresh),
    SubRefresh(SubRefresh),
}

impl Method<'_> {
    /// The key of the method in replies (`{"id":1,"<key>":{...}}`).
    pub fn key(&self) -> &'static str {
        match self {
            Method::Connect(_) => "connect",
            Method::Subscribe(_) => "subscribe",
            Method::Unsubscribe(_) => "unsubscribe",
            Method::Publish(_) => "publish",
            Method::Presence(_) => "presence",
            Method::PresenceStats(_) => "presence_stats",
            Method::History(_) => "history",
            Method::Send(_) => "send",
            Method::Rpc(_) => "rpc",
            Method::Refresh(_) => "refresh",
            Method::SubRefresh(_) => "sub_refresh",
        }
    }
}

/// What a command line is.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// `{}`: the client's answer to a server ping.
    Pong,
    /// One method, and the id its reply carries (0: none expected).
    Call(u32, Method<'a>),
    /// No method this node knows (a newer SDK's); answered with `method not found`.
    Unknown(u32),
    /// Several method keys in one command.
    Ambiguous(u32),
}

impl<'a> Command<'a> {
    /// Parses one line. `Err` when it is not a JSON object of the right shape.
    pub fn parse(line: &'a str) -> Result<Parsed<'a>, serde_json::Error> {
        // serde reads a struct from an array too; a command is an object.
        if !line.trim_start().starts_with('{') {
            return Err(serde::de::Error::custom("a command is a JSON object"));
        }
        let c: Command<'a> = serde_json::from_str(line)?;
        let id = c.id;
        let mut methods: Vec<Method<'a>> = Vec::with_capacity(1);
        methods.extend(c.connect.map(Method::Connect));
        methods.extend(c.subscribe.map(Method::Subscribe));
        methods.extend(c.unsubscribe.map(Method::Unsubscribe));
        methods.extend(c.publish.map(Method::Publish));
        methods.extend(c.presence.map(Method::Presence));
        methods.extend(c.presence_stats.map(Method::PresenceStats));
        methods.extend(c.history.map(Method::History));
        methods.extend(c.send.map(Method::Send));
        methods.extend(c.rpc.map(Method::Rpc));
        methods.extend(c.refresh.map(Method::Refresh));
        methods.extend(c.sub_refresh.map(Method::SubRefresh));
        Ok(match (methods.len(), id) {
            (0, 0) if is_empty_object(line) => Parsed::Pong,
            (0, id) => Parsed::Unknown(id),
            (1, id) => match methods.pop() {
                Some(m) => Parsed::Call(id, m),
                None => Parsed::Unknown(id),
            },
            (_, id) => Parsed::Ambiguous(id),
        })
    }
}

fn is_empty_object(line: &str) -> bool {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
        .is_ok_and(|m| m.is_empty())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Connect<'a> {
    pub token: String,
    /// Connect data, name, version, headers and server-side `subs` are accepted and not
    /// used (no connect proxy, no server-side subscriptions).
    #[serde(borrow)]
    pub data: Option<&'a RawValue>,
    pub name: String,
    pub version: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Subscribe<'a> {
    pub channel: String,
    /// A subscription token (`getToken` of an SDK subscription).
    pub token: String,
    pub recover: bool,
    pub epoch: String,
    pub offset: u64,
    pub positioned: bool,
    pub recoverable: bool,
    pub join_leave: bool,
    /// Bit 1: channel compaction (ignored: pushes always name the channel). Bit 2: refuse
    /// with `unrecoverable position` instead of `recovered: false`.
    pub flag: u64,
    #[serde(borrow)]
    pub data: Option<&'a RawValue>,
}

/// `flag` bit asking for error 112 instead of `recovered: false`.
pub const FLAG_REJECT_UNRECOVERED: u64 = 2;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Channel {
    pub channel: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Publish<'a> {
    pub channel: String,
    #[serde(borrow)]
    pub data: Option<&'a RawValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct History {
    pub channel: String,
    /// 0 (or absent): only the stream position; -1: everything kept; N: the last N (or
    /// the first N after `since`).
    pub limit: i64,
    pub since: Option<StreamPosition>,
    pub reverse: bool,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SendData<'a> {
    #[serde(borrow)]
    pub data: Option<&'a RawValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Rpc {
    pub method: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Refresh {
    pub token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SubRefresh {
    pub channel: String,
    pub token: String,
}

/// An error reply: Centrifugo's code and message, `temporary` when retrying may succeed.
/// `label` is the `code` label of `gateway_request_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: u32,
    pub message: String,
    pub temporary: bool,
    pub label: &'static str,
}

/// Centrifugo's error codes (the client protocol and the server API share them).
pub mod code {
    pub const INTERNAL: u32 = 100;
    pub const UNAUTHORIZED: u32 = 101;
    pub const UNKNOWN_CHANNEL: u32 = 102;
    pub const PERMISSION_DENIED: u32 = 103;
    pub const METHOD_NOT_FOUND: u32 = 104;
    pub const ALREADY_SUBSCRIBED: u32 = 105;
    pub const LIMIT_EXCEEDED: u32 = 106;
    pub const BAD_REQUEST: u32 = 107;
    pub const NOT_AVAILABLE: u32 = 108;
    pub const TOKEN_EXPIRED: u32 = 109;
    pub const TOO_MANY_REQUESTS: u32 = 111;
    pub const UNRECOVERABLE_POSITION: u32 = 112;
}

impl Error {
    pub fn new(code: u32, label: &'static str, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            temporary: false,
            label,
        }
    }

    pub fn temporary(mut self) -> Self {
        self.temporary = true;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::new(code::BAD_REQUEST, "bad_request", message)
    }

    pub fn method_not_found() -> Self {
        Error::new(
            code::METHOD_NOT_FOUND,
            "method_not_found",
            "method not found",
        )
    }

    pub fn not_available(message: impl Into<String>) -> Self {
        Error::new(code::NOT_AVAILABLE, "not_available", message)
    }

    /// The reply object: `{"code":..,"message":..}` (and `"temporary":true`).
    pub fn to_value(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "code": self.code, "message": self.message });
        if self.temporary {
            v["temporary"] = true.into();
        }
        v
    }
}

/// The core's failures in Centrifugo's codes: one table for the client protocol and the
/// server API.
impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        let label = f.code.as_str();
        let (code, temporary) = match f.code {
            ErrorCode::MalformedJson | ErrorCode::BadRequest => (code::BAD_REQUEST, false),
            ErrorCode::UnknownType => (code::METHOD_NOT_FOUND, false),
            ErrorCode::InvalidChannel => (code::UNKNOWN_CHANNEL, false),
            ErrorCode::TooManySubscriptions => (code::LIMIT_EXCEEDED, false),
            ErrorCode::Forbidden => (code::PERMISSION_DENIED, false),
            ErrorCode::RateLimited => (code::TOO_MANY_REQUESTS, false),
            ErrorCode::Unavailable => (code::INTERNAL, true),
            ErrorCode::Unauthorized => (code::UNAUTHORIZED, false),
            ErrorCode::NotEnabled => (code::NOT_AVAILABLE, false),
            ErrorCode::MessageTooBig => (code::LIMIT_EXCEEDED, false),
        };
        Error {
            code,
            message: f.message,
            temporary,
            label,
        }
    }
}

/// Checks a channel name: 107 when absent, 102 when it breaks the naming rule.
pub fn channel(name: &str) -> Result<&str, Error> {
    if name.is_empty() {
        Err(Error::bad_request("channel required"))
    } else if shared::channel::is_valid(name) {
        Ok(name)
    } else {
        Err(Error::new(
            code::UNKNOWN_CHANNEL,
            "invalid_channel",
            "channel must match [A-Za-z0-9_.:@/-]{1,200}",
        ))
    }
}

/// Checks `data` that will be forwarded verbatim (as v1 does): 107 when absent or refused.
pub fn data(data: Option<&RawValue>) -> Result<&str, Error> {
    let data = data.ok_or_else(|| Error::bad_request("data required"))?;
    shared::protocol::check_data(data.get())
        .map_err(|why| Error::new(code::BAD_REQUEST, "malformed_json", why))?;
    Ok(data.get())
}

/// The publications of a history read as Centrifugo's `{"data":..,"offset":..}` objects.
/// Stored data was checked as JSON when it was published.
pub fn publications(publications: &[(u64, String)]) -> Vec<serde_json::Value> {
    publications
        .iter()
        .filter_map(|(offset, data)| {
            let data: serde_json::Value = serde_json::from_str(data).ok()?;
            Some(serde_json::json!({ "data": data, "offset": offset }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_commands_the_sdks_send() {
        let line = r#"{"id":1,"connect":{"token":"t","name":"js","subs":{}}}"#;
        match Command::parse(line).expect("parses") {
            Parsed::Call(1, Method::Connect(c)) => assert_eq!(c.token, "t"),
            other => panic!("{other:?}"),
        }
        let line = r#"{"id":2,"subscribe":{"channel":"c","recover":true,"offset":5,"epoch":"e","flag":3,"tf":{"x":1}}}"#;
        match Command::parse(line).expect("parses") {
            Parsed::Call(2, Method::Subscribe(s)) => {
                assert_eq!(
                    (s.channel.as_str(), s.recover, s.offset, s.flag),
                    ("c", true, 5, 3)
                );
            }
            other => panic!("{other:?}"),
        }
        let line = r#"{"send":{"data":{"a":[1]}}}"#;
        match Command::parse(line).expect("parses") {
            Parsed::Call(0, Method::Send(s)) => {
                assert_eq!(s.data.map(|d| d.get()), Some(r#"{"a":[1]}"#))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(Command::parse("{}"), Ok(Parsed::Pong)));
        assert!(matches!(
            Command::parse(r#"{"id":3,"future_method":{}}"#),
            Ok(Parsed::Unknown(3))
        ));
        assert!(matches!(
            Command::parse(r#"{"id":4,"publish":{},"rpc":{}}"#),
            Ok(Parsed::Ambiguous(4))
        ));
        assert!(Command::parse("{not json").is_err());
        assert!(Command::parse("[1]").is_err());
        assert!(Command::parse(r#"{"id":"x"}"#).is_err());
    }

    #[test]
    fn failures_map_onto_centrifugo_codes() {
        let e = Error::from(Failure::new(ErrorCode::Forbidden, "no"));
        assert_eq!((e.code, e.label), (103, "forbidden"));
        let e = Error::from(Failure::new(ErrorCode::Unavailable, "redis"));
        assert_eq!(
            e.to_value(),
            serde_json::json!({"code":100,"message":"redis","temporary":true})
        );
        assert_eq!(
            Error::from(Failure::new(ErrorCode::RateLimited, "")).code,
            111
        );
    }
}
