//! Redis pub/sub broker: channel `C` travels on the Redis channel `<prefix>ch:C`, so a backend
//! publishes with `PUBLISH gw:ch:C <json>` (or `SPUBLISH` with sharded pub/sub on Redis
//! Cluster, where the channel's slot picks the shard).
//!
//! The hub calls `subscribe` only for a channel's first local subscriber, so each node holds
//! one Redis subscription per channel. The receive side is here too: the broker registers the
//! `<prefix>ch:` route on the transport when it is built, checks each payload, and hands it to
//! its sink. A body that is not UTF-8 JSON is dropped and counted, never forwarded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redis::Value;

use super::{BoxFuture, Broker, History, Position, Retention, Since, Sink};
use crate::cluster::keys::Keys;
use crate::cluster::redis::Redis;
use crate::config::channels::{lua_pattern, ChannelOptions};
use crate::error::BrokerError;
use crate::metrics::Metrics;

/// The history functions (`gw_publish`, `gw_history`, `gw_history_remove`); see the file
/// for its keys.
const LIBRARY: &str = include_str!("history.lua");

/// See the module docs.
pub struct RedisBroker {
    redis: Arc<Redis>,
    names: Keys,
    library: String,
    /// The `[[channels]]` entries that keep history: with sharded pub/sub their channels
    /// travel on `<prefix>ch:{<channel>}` (see [`RedisBroker::pubsub`]).
    history: Vec<ChannelOptions>,
}

impl RedisBroker {
    /// Loads the history functions, with the options of `channels` built in, so that a
    /// backend's `FCALL gw_publish` applies them as the nodes do. Call once at start.
    pub async fn load(&self) -> Result<(), BrokerError> {
        self.redis.add_library(self.library.clone()).await
    }

    /// Runs an FCALL; when Redis lost the functions (it restarted empty, and the
    /// directory's resync has not run yet), loads them again and retries once.
    async fn fcall(&self, op: &'static str, cmd: redis::Cmd) -> Result<Value, BrokerError> {
        match self.redis.call::<Value>(op, cmd.clone()).await {
            Err(BrokerError::Redis(e)) if e.to_string().contains("Function not found") => {
                self.redis.load_libraries().await?;
                self.redis.call(op, cmd).await
            }
            r => r,
        }
    }

    /// Builds the broker and routes the transport's channel messages to `sink`.
    pub fn new(
        redis: Arc<Redis>,
        sink: Sink,
        metrics: Arc<Metrics>,
        channels: &[ChannelOptions],
    ) -> Self {
        let names = Keys::new(&redis.prefix);
        let receive = Receive {
            sink,
            metrics,
            logged_at: AtomicU64::new(0),
        };
        redis.route(
            &names.channel(""),
            Arc::new(move |name: &[u8], payload: &[u8]| receive.push(name, payload)),
        );
        let options: Vec<String> = channels
            .iter()
            .filter(|o| o.has_history())
            .map(|o| {
                format!(
                    "{{'{}', {}, {}}}",
                    lua_pattern(&o.pattern),
                    o.history_size,
                    o.history_ttl_secs
                )
            })
            .collect();
        let library = LIBRARY
            .replace("__PREFIX__", &redis.prefix)
            .replace(
                "__PUBLISH__",
                if redis.sharded_pubsub() {
                    "SPUBLISH"
                } else {
                    "PUBLISH"
                },
            )
            .replace(
                "__SHARDED__",
                if redis.sharded_pubsub() {
                    "true"
                } else {
                    "false"
                },
            )
            .replace("__OPTIONS__", &options.join(", "));
        RedisBroker {
            redis,
            names,
            library,
            history: channels
                .iter()
                .filter(|o| o.has_history())
                .cloned()
                .collect(),
        }
    }

    /// The pub/sub channel of `channel`. With sharded pub/sub on Redis Cluster a history
    /// channel's is `<prefix>ch:{<channel>}`: its hash tag puts it in the slot of the
    /// channel's history keys (`<prefix>hist:{<channel>}`, `<prefix>meta:{<channel>}`), so that
    /// `gw_publish` can append and publish in one step on one shard.
    fn pubsub(&self, channel: &str) -> String {
        let tagged = self.redis.sharded_pubsub()
            && crate::config::channels::lookup(&self.history, channel).is_some();
        if tagged {
            self.names.channel(&format!("{{{channel}}}"))
        } else {
            self.names.channel(channel)
        }
    }
}

/// `[offset, epoch]` from `gw_publish`.
fn position(v: Value) -> Result<Position, BrokerError> {
    match v {
        Value::Array(items) if items.len() == 2 => {
            let mut it = items.into_iter();
            let offset = integer(it.next());
            let epoch = text(it.next());
            match (offset, epoch) {
                (Some(offset), Some(epoch)) => Ok(Position { epoch, offset }),
                _ => Err(BrokerError::Malformed("gw_publish reply")),
            }
        }
        _ => Err(BrokerError::Malformed("gw_publish reply")),
    }
}

/// `[epoch, top, offset, data, ...]` from `gw_history`.
fn history(v: Value) -> Result<History, BrokerError> {
    let Value::Array(items) = v else {
        return Err(BrokerError::Malformed("gw_history reply"));
    };
    let mut it = items.into_iter();
    let (Some(epoch), Some(top)) = (text(it.next()), integer(it.next())) else {
        return Err(BrokerError::Malformed("gw_history reply"));
    };
    let mut publications = Vec::new();
    while let Some(offset) = it.next() {
        match (integer(Some(offset)), text(it.next())) {
            (Some(o), Some(d)) => publications.push((o, d)),
            _ => return Err(BrokerError::Malformed("gw_history entry")),
        }
    }
    Ok(History {
        epoch,
        top,
        publications,
    })
}

fn integer(v: Option<Value>) -> Option<u64> {
    match v? {
        Value::Int(i) => u64::try_from(i).ok(),
        Value::BulkString(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: Option<Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// The receive side: checks a pushed payload before the hub sees it.
struct Receive {
    sink: Sink,
    metrics: Arc<Metrics>,
    /// When a dropped message was last logged, in Unix seconds.
    logged_at: AtomicU64,
}

impl Receive {
    fn push(&self, name: &[u8], payload: &[u8]) {
        // A history channel's sharded pub/sub name carries a hash tag: `{<channel>}`.
        let name = name
            .strip_prefix(b"{")
            .and_then(|n| n.strip_suffix(b"}"))
            .unwrap_or(name);
        let (Ok(name), Ok(payload)) = (std::str::from_utf8(name), std::str::from_utf8(payload))
        else {
            return self.drop_message("not UTF-8");
        };
        if let Err(why) = shared::protocol::check_data(super::Envelope::open(payload).data) {
            return self.drop_message(why);
        }
        (self.sink)(name, payload);
    }

    /// Counts a backend message that cannot be forwarded; logs at most once per 10 s.
    fn drop_message(&self, why: &str) {
        self.metrics.broker_dropped.inc([]);
        let now = crate::time::now_secs();
        let last = self.logged_at.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .logged_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                why,
                "dropped a message published on Redis (logged at most every 10 s; see gateway_broker_dropped_total)"
            );
        }
    }
}

impl Broker for RedisBroker {
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.redis.subscribe(&self.pubsub(channel), true).await })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.redis.unsubscribe(&self.pubsub(channel), true).await })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.redis.publish(&self.pubsub(channel), data, true).await })
    }

    fn publish_history<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
        _retention: Retention,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("gw_publish").arg(1).arg(channel).arg(data);
            if let Some(k) = idempotency_key {
                cmd.arg(k);
            }
            position(self.fcall("gw_publish", cmd).await?)
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        _retention: Retention,
        since: Since,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("gw_history").arg(1).arg(channel);
            match since {
                Since::Last(n) => cmd.arg("last").arg(n),
                Since::After(offset, n) => cmd.arg("after").arg(n).arg(offset),
            };
            history(self.fcall("gw_history", cmd).await?)
        })
    }

    fn remove_history<'a>(
        &'a self,
        channel: &'a str,
        _retention: Retention,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("gw_history_remove").arg(1).arg(channel);
            self.fcall("gw_history_remove", cmd).await.map(|_| ())
        })
    }

    fn is_healthy(&self) -> bool {
        self.redis.is_healthy()
    }
}
