//! Events to the backends: client `send` messages and connection lifecycle, appended to the
//! Redis stream `<prefix>inbound` (capped with `MAXLEN ~ inbound_maxlen`). Backends read it
//! with consumer groups (`XREADGROUP`); see `docs/backends.md`.
//!
//! Entries of one connection are appended in order: `connect` before the connection reads
//! its first frame, each `message` before its `ack`, and `disconnect` after the last one.
//! Without Redis there is no stream: `send` is refused with `unavailable`, and lifecycle
//! events are not recorded.

use std::sync::Arc;

use crate::cluster::directory::now_ms;
use crate::cluster::redis::Redis;
use crate::error::BrokerError;
use crate::metrics::Metrics;

pub use shared::backend::Event;

/// See the module docs.
pub struct Inbound {
    redis: Option<Arc<Redis>>,
    /// The stream's key, built once rather than per entry.
    key: String,
    node_id: String,
    maxlen: usize,
    metrics: Arc<Metrics>,
}

impl Inbound {
    pub fn new(
        redis: Option<Arc<Redis>>,
        node_id: &str,
        maxlen: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let key = redis
            .as_ref()
            .map(|r| crate::cluster::keys::Keys::new(&r.prefix).inbound())
            .unwrap_or_default();
        Inbound {
            redis,
            key,
            node_id: node_id.to_owned(),
            maxlen,
            metrics,
        }
    }

    /// Appends one entry. `data` is JSON text (`""` for connect). `destination`, when given,
    /// becomes the entry's `destination` field (STOMP's `SEND /app/<x>`).
    pub async fn append(
        &self,
        event: Event,
        conn_id: &str,
        user_id: Option<&str>,
        data: &str,
        destination: Option<&str>,
    ) -> Result<(), BrokerError> {
        let Some(redis) = &self.redis else {
            return Err(BrokerError::NotConfigured("no Redis is configured"));
        };
        let xadd = self.xadd(event, conn_id, user_id, data, destination);
        let r = redis.call::<String>("xadd", xadd).await.map(|_| ());
        if r.is_ok() {
            self.metrics.inbound_appends.inc([event.as_str()]);
        }
        r
    }

    fn xadd(
        &self,
        event: Event,
        conn_id: &str,
        user_id: Option<&str>,
        data: &str,
        destination: Option<&str>,
    ) -> redis::Cmd {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&self.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.maxlen)
            .arg("*")
            .arg("event")
            .arg(event.as_str())
            .arg("conn_id")
            .arg(conn_id)
            .arg("user_id")
            .arg(user_id.unwrap_or(""))
            .arg("node_id")
            .arg(&self.node_id)
            .arg("ts")
            .arg(now_ms())
            .arg("data")
            .arg(data);
        if let Some(destination) = destination {
            xadd.arg("destination").arg(destination);
        }
        xadd
    }

    /// [`Inbound::lifecycle`] after `before` (the directory's writes for the connection,
    /// `op` labels their errors): Redis runs `before` first, then the append, in one round
    /// trip on a standalone Redis (`Redis::in_order`). Returns the outcome of `before`, or
    /// `None` without Redis (then neither ran).
    pub async fn lifecycle_after(
        &self,
        op: &'static str,
        before: Vec<redis::Cmd>,
        event: Event,
        conn_id: &str,
        user_id: Option<&str>,
        data: &str,
    ) -> Option<Result<(), BrokerError>> {
        let redis = self.redis.as_ref()?;
        let xadd = self.xadd(event, conn_id, user_id, data, None);
        let (before, appended) = redis.in_order(op, before, "xadd", xadd).await;
        match appended {
            Ok(_) => self.metrics.inbound_appends.inc([event.as_str()]),
            Err(e) => {
                tracing::warn!(conn = conn_id, event = event.as_str(), error = %e, "inbound event lost")
            }
        }
        Some(before)
    }

    /// Appends a lifecycle event; failures are logged, never fatal to the connection.
    pub async fn lifecycle(&self, event: Event, conn_id: &str, user_id: Option<&str>, data: &str) {
        if self.redis.is_none() {
            return;
        }
        if let Err(e) = self.append(event, conn_id, user_id, data, None).await {
            tracing::warn!(conn = conn_id, event = event.as_str(), error = %e, "inbound event lost");
        }
    }
}
