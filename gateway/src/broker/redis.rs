//! Redis pub/sub broker: channel `C` travels on the Redis channel `<prefix>ch:C`, so a backend
//! publishes with `PUBLISH gw:ch:C <json>` (or `SPUBLISH` with sharded pub/sub on Redis
//! Cluster, where the channel's slot picks the shard).
//!
//! The hub calls `subscribe` only for a channel's first local subscriber, so each node holds
//! one Redis subscription per channel. Incoming messages reach the hub through
//! [`crate::cluster::redis::PushRouter`], which drops (and counts) bodies that are not JSON.

use std::sync::Arc;

use super::{BoxFuture, Broker};
use crate::cluster::redis::Redis;
use crate::error::BrokerError;

/// See the module docs.
pub struct RedisBroker(pub Arc<Redis>);

impl Broker for RedisBroker {
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.0.subscribe(&self.0.channel_key(channel), true).await })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.0.unsubscribe(&self.0.channel_key(channel), true).await })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            self.0
                .publish(&self.0.channel_key(channel), data, true)
                .await
        })
    }

    fn is_healthy(&self) -> bool {
        self.0.is_healthy()
    }
}
