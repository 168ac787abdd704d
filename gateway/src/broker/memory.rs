//! In-process broker: `make run` works without Redis.
//!
//! Brokers built on one [`Bus`] behave like nodes sharing one Redis: a publish on any of them
//! reaches every broker of the bus that subscribed to the channel. A node builds its own bus
//! ([`MemoryBroker::new`]); tests build several brokers on one bus to hold the memory broker
//! to the cross-node part of the conformance suite.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use super::{BoxFuture, Broker, Sink};
use crate::error::BrokerError;

/// The brokers that share publishes, like nodes on one Redis.
#[derive(Clone, Default)]
pub struct Bus(Arc<RwLock<Vec<Arc<Member>>>>);

struct Member {
    subscribed: Mutex<HashSet<String>>,
    sink: Sink,
}

/// Delivers a publish to the sink of every broker on the bus that subscribed to the channel.
pub struct MemoryBroker {
    bus: Bus,
    me: Arc<Member>,
}

impl MemoryBroker {
    /// A broker alone on its own bus: a single node.
    pub fn new(sink: Sink) -> Self {
        MemoryBroker::on(&Bus::default(), sink)
    }

    /// A broker that joins `bus`.
    pub fn on(bus: &Bus, sink: Sink) -> Self {
        let me = Arc::new(Member {
            subscribed: Mutex::new(HashSet::new()),
            sink,
        });
        bus.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(me.clone());
        MemoryBroker {
            bus: bus.clone(),
            me,
        }
    }
}

impl Member {
    fn channels(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.subscribed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        let mut members = self.bus.0.write().unwrap_or_else(|p| p.into_inner());
        members.retain(|m| !Arc::ptr_eq(m, &self.me));
    }
}

impl Broker for MemoryBroker {
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.me.channels().insert(channel.to_owned());
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.me.channels().remove(channel);
        Box::pin(async { Ok(()) })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let members = self.bus.0.read().unwrap_or_else(|p| p.into_inner());
        for m in members.iter() {
            if m.channels().contains(channel) {
                (m.sink)(channel, data);
            }
        }
        Box::pin(async { Ok(()) })
    }
}
