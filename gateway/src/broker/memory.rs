//! In-process broker for a single node: `make run` works without Redis.

use std::collections::HashSet;
use std::sync::Mutex;

use super::{BoxFuture, Broker, Sink};
use crate::error::BrokerError;

/// Delivers a publish to the sink right away if this node subscribed to the channel.
pub struct MemoryBroker {
    subscribed: Mutex<HashSet<String>>,
    sink: Sink,
}

impl MemoryBroker {
    pub fn new(sink: Sink) -> Self {
        MemoryBroker {
            subscribed: Mutex::new(HashSet::new()),
            sink,
        }
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.subscribed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Broker for MemoryBroker {
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.channels().insert(channel.to_owned());
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.channels().remove(channel);
        Box::pin(async { Ok(()) })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let subscribed = self.channels().contains(channel);
        if subscribed {
            (self.sink)(channel, data);
        }
        Box::pin(async { Ok(()) })
    }
}
