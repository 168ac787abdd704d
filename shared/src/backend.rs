//! The backend contract in code, for Rust backends: the Redis names the gateway uses and the
//! shape of inbound stream entries. It has no Redis dependency: pass the names and arguments
//! to whichever Redis client the backend already uses. See `docs/backends.md`.
//!
//! ```
//! use shared::backend::{Names, Inbound};
//! let names = Names::new("gw:");
//! // PUBLISH gw:ch:chat:1 {"text":"hi"}
//! assert_eq!(names.channel("chat:1"), "gw:ch:chat:1");
//! // FCALL gw_send_user 1 alice {"n":1}
//! assert_eq!(shared::backend::send_user("alice", "{\"n\":1}"), ["FCALL", "gw_send_user", "1", "alice", "{\"n\":1}"]);
//! // FCALL gw_publish 1 chat:1 {"text":"hi"} order-17   (a history channel: replies [offset, epoch])
//! assert_eq!(shared::backend::publish("chat:1", "{\"text\":\"hi\"}", Some("order-17")),
//!     ["FCALL", "gw_publish", "1", "chat:1", "{\"text\":\"hi\"}", "order-17"]);
//! // an entry read with XREADGROUP from names.inbound()
//! let e = Inbound::from_fields([("event", "message"), ("conn_id", "n1.1.1"), ("user_id", "alice"),
//!     ("node_id", "n1"), ("ts", "1700000000000"), ("data", "{\"order\":1}")]).unwrap();
//! assert_eq!(e.event, shared::backend::Event::Message);
//! assert_eq!(e.destination, None); // set on a STOMP client's SEND /app/<x>
//! ```

/// The Redis key and channel names under one prefix (`--redis-prefix`, default `gw:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
        }
    }

    /// The pub/sub channel carrying gateway channel `channel`: `PUBLISH` (or `SPUBLISH` with
    /// sharded pub/sub) a JSON body there to reach every subscriber on every node.
    pub fn channel(&self, channel: &str) -> String {
        format!("{}ch:{channel}", self.prefix)
    }

    /// The stream of client messages and lifecycle events (`XREADGROUP` it).
    pub fn inbound(&self) -> String {
        format!("{}inbound", self.prefix)
    }
}

/// `FCALL gw_send_user 1 <user_id> <json>`: returns the number of connections reached.
pub fn send_user<'a>(user_id: &'a str, json: &'a str) -> [&'a str; 5] {
    ["FCALL", "gw_send_user", "1", user_id, json]
}

/// `FCALL gw_send_conn 1 <conn_id> <json>`: returns 1 or 0.
pub fn send_conn<'a>(conn_id: &'a str, json: &'a str) -> [&'a str; 5] {
    ["FCALL", "gw_send_conn", "1", conn_id, json]
}

/// `FCALL gw_publish 1 <channel> <json> <idempotency_key>`: publishes to every subscriber
/// of `channel` and, on a channel whose `[[channels]]` entry keeps history, appends to its
/// history first, in one step. Returns `[offset, epoch]` (`[0, ""]` on a channel without
/// history). A repeated `idempotency_key` on the same history channel, within its
/// `history_ttl_secs`, publishes nothing and returns the first call's `[offset, epoch]`;
/// `None` (sent as an empty key) means no key.
pub fn publish<'a>(
    channel: &'a str,
    json: &'a str,
    idempotency_key: Option<&'a str>,
) -> [&'a str; 6] {
    [
        "FCALL",
        "gw_publish",
        "1",
        channel,
        json,
        idempotency_key.unwrap_or(""),
    ]
}

/// The `event` field of an inbound entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Connect,
    Message,
    Disconnect,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Connect => "connect",
            Event::Message => "message",
            Event::Disconnect => "disconnect",
        }
    }

    pub fn parse(s: &str) -> Option<Event> {
        match s {
            "connect" => Some(Event::Connect),
            "message" => Some(Event::Message),
            "disconnect" => Some(Event::Disconnect),
            _ => None,
        }
    }
}

/// One inbound stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub event: Event,
    pub conn_id: String,
    /// `None` for anonymous connections (the field is empty).
    pub user_id: Option<String>,
    pub node_id: String,
    /// Unix milliseconds on the gateway node.
    pub ts: u64,
    /// `message`: the client's `data` (JSON text). `disconnect`: `{"code":..,"reason":..}`.
    /// `connect`: empty.
    pub data: String,
    /// `message` from a STOMP `SEND /app/<x>`: that destination (`/app/orders`). `None` for
    /// v1 `send`s and lifecycle events (the field is absent).
    pub destination: Option<String>,
}

impl Inbound {
    /// Builds an entry from its field/value pairs; `None` when a field is missing or wrong.
    pub fn from_fields<K: AsRef<str>, V: AsRef<str>>(
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Option<Inbound> {
        let (mut event, mut conn, mut user, mut node, mut ts, mut data) =
            (None, None, None, None, None, None);
        let mut destination = None;
        for (k, v) in fields {
            let v = v.as_ref();
            match k.as_ref() {
                "event" => event = Event::parse(v),
                "conn_id" => conn = Some(v.to_owned()),
                "user_id" => user = Some((!v.is_empty()).then(|| v.to_owned())),
                "node_id" => node = Some(v.to_owned()),
                "ts" => ts = v.parse().ok(),
                "data" => data = Some(v.to_owned()),
                "destination" => destination = Some(v.to_owned()),
                _ => {}
            }
        }
        Some(Inbound {
            event: event?,
            conn_id: conn?,
            user_id: user?,
            node_id: node?,
            ts: ts?,
            data: data?,
            destination,
        })
    }
}
