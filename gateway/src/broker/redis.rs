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

use super::{BoxFuture, Broker, Sink};
use crate::cluster::redis::Redis;
use crate::error::BrokerError;
use crate::metrics::Metrics;

/// See the module docs.
pub struct RedisBroker {
    redis: Arc<Redis>,
    names: shared::backend::Names,
}

impl RedisBroker {
    /// Builds the broker and routes the transport's channel messages to `sink`.
    pub fn new(redis: Arc<Redis>, sink: Sink, metrics: Arc<Metrics>) -> Self {
        let names = shared::backend::Names::new(&redis.prefix);
        let receive = Receive {
            sink,
            metrics,
            logged_at: AtomicU64::new(0),
        };
        redis.route(
            &names.channel(""),
            Arc::new(move |name: &[u8], payload: &[u8]| receive.push(name, payload)),
        );
        RedisBroker { redis, names }
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
        let (Ok(name), Ok(payload)) = (std::str::from_utf8(name), std::str::from_utf8(payload))
        else {
            return self.drop_message("not UTF-8");
        };
        if let Err(why) = shared::protocol::check_data(super::split_trace(payload).1) {
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
        Box::pin(async move {
            self.redis
                .subscribe(&self.names.channel(channel), true)
                .await
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            self.redis
                .unsubscribe(&self.names.channel(channel), true)
                .await
        })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            self.redis
                .publish(&self.names.channel(channel), data, true)
                .await
        })
    }

    fn is_healthy(&self) -> bool {
        self.redis.is_healthy()
    }
}
