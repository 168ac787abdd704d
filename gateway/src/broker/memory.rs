//! In-process broker: `make run` works without Redis.
//!
//! Brokers built on one [`Bus`] behave like nodes sharing one Redis: a publish on any of them
//! reaches every broker of the bus that subscribed to the channel. A node builds its own bus
//! ([`MemoryBroker::new`]); tests build several brokers on one bus to hold the memory broker
//! to the cross-node part of the conformance suite.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use super::{BoxFuture, Broker, History, Position, Retention, Since, Sink};
use crate::error::BrokerError;

/// The brokers that share publishes (and history), like nodes on one Redis.
#[derive(Clone, Default)]
pub struct Bus(Arc<RwLock<Vec<Arc<Member>>>>, Arc<Mutex<Streams>>);

/// Every history channel's stream. Bounded like Redis: each stream holds at most its
/// retention's size; its publications are dropped once the TTL has passed since the last
/// one, and the stream itself (its epoch and offset, with its idempotency keys) once the
/// TTL has passed since its last publication or read, when it is next touched or by the
/// sweep on every write. Reads keep the epoch of a quiet channel alive, as `gw_history`
/// does in Redis: the nodes read the channels they have subscribers of every heartbeat.
/// Each idempotency key is forgotten once the TTL has passed since it was first used,
/// as Redis expires it, even while the channel stays busy.
#[derive(Default)]
struct Streams {
    by_channel: HashMap<String, Stream>,
    /// Epochs made so far, so that each new one differs from every earlier one.
    epochs: u64,
    writes: u64,
}

struct Stream {
    epoch: String,
    top: u64,
    entries: VecDeque<(u64, String)>,
    /// The first result of each idempotency key.
    keys: HashMap<String, Position>,
    /// When each key of `keys` expires, oldest first (the TTL is the channel's, so the
    /// order of first use is the order of expiry).
    key_expiry: VecDeque<(Instant, String)>,
    /// When the publications expire: the TTL after the last one.
    entries_expire: Instant,
    /// When the stream expires (a new epoch next time): the TTL after the last
    /// publication or read.
    expires: Instant,
}

impl Stream {
    /// Forgets the idempotency keys whose TTL has passed.
    fn expire_keys(&mut self, now: Instant) {
        while let Some((at, key)) = self.key_expiry.front() {
            if *at > now {
                break;
            }
            self.keys.remove(key);
            self.key_expiry.pop_front();
        }
    }
}

impl Streams {
    /// The channel's live stream, made anew (new epoch) when absent or expired.
    fn stream(&mut self, channel: &str, retention: Retention) -> &mut Stream {
        let now = Instant::now();
        let expired = self
            .by_channel
            .get(channel)
            .is_some_and(|s| s.expires <= now);
        if expired || !self.by_channel.contains_key(channel) {
            self.epochs += 1;
            let epoch = format!("m{:x}{}", crate::time::now_ms(), self.epochs);
            self.by_channel.insert(
                channel.to_owned(),
                Stream {
                    epoch,
                    top: 0,
                    entries: VecDeque::new(),
                    keys: HashMap::new(),
                    key_expiry: VecDeque::new(),
                    entries_expire: now + retention.ttl,
                    expires: now + retention.ttl,
                },
            );
        }
        let s = self
            .by_channel
            .get_mut(channel)
            .unwrap_or_else(|| unreachable!("inserted above"));
        if s.entries_expire <= now {
            s.entries.clear();
        }
        s
    }

    /// Drops expired streams every so many writes, so that channels nobody touches again
    /// do not stay forever.
    fn sweep(&mut self) {
        self.writes += 1;
        if self.writes.is_multiple_of(1024) {
            let now = Instant::now();
            self.by_channel.retain(|_, s| s.expires > now);
        }
    }
}

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

impl MemoryBroker {
    fn fan_out(&self, channel: &str, payload: &str) {
        let members = self.bus.0.read().unwrap_or_else(|p| p.into_inner());
        for m in members.iter() {
            if m.channels().contains(channel) {
                (m.sink)(channel, payload);
            }
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
        self.fan_out(channel, data);
        Box::pin(async { Ok(()) })
    }

    fn publish_history<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
        retention: Retention,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        // The streams' lock is held across the fan-out, as a Redis function runs: the next
        // publication's offset cannot overtake this one's delivery.
        let mut streams = self.bus.1.lock().unwrap_or_else(|p| p.into_inner());
        streams.sweep();
        let stream = streams.stream(channel, retention);
        let now = Instant::now();
        stream.expire_keys(now);
        if let Some(first) = idempotency_key.and_then(|k| stream.keys.get(k)) {
            let first = first.clone();
            return Box::pin(async { Ok(first) });
        }
        stream.top += 1;
        stream.expires = now + retention.ttl;
        stream.entries_expire = stream.expires;
        stream.entries.push_back((stream.top, data.to_owned()));
        while stream.entries.len() > retention.size {
            stream.entries.pop_front();
        }
        let position = Position {
            epoch: stream.epoch.clone(),
            offset: stream.top,
        };
        if let Some(k) = idempotency_key {
            stream.keys.insert(k.to_owned(), position.clone());
            stream
                .key_expiry
                .push_back((now + retention.ttl, k.to_owned()));
        }
        self.fan_out(
            channel,
            &super::positioned(data, position.offset, &position.epoch),
        );
        drop(streams);
        Box::pin(async { Ok(position) })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        retention: Retention,
        since: Since,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        let mut streams = self.bus.1.lock().unwrap_or_else(|p| p.into_inner());
        let s = streams.stream(channel, retention);
        s.expires = Instant::now() + retention.ttl;
        let publications = match since {
            Since::Last(n) => {
                let skip = s.entries.len().saturating_sub(n);
                s.entries.iter().skip(skip).cloned().collect()
            }
            Since::After(offset, n) => s
                .entries
                .iter()
                .filter(|(o, _)| *o > offset)
                .take(n)
                .cloned()
                .collect(),
        };
        let history = History {
            epoch: s.epoch.clone(),
            top: s.top,
            publications,
        };
        drop(streams);
        Box::pin(async { Ok(history) })
    }

    fn remove_history<'a>(
        &'a self,
        channel: &'a str,
        retention: Retention,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let mut streams = self.bus.1.lock().unwrap_or_else(|p| p.into_inner());
        streams.stream(channel, retention).entries.clear();
        drop(streams);
        Box::pin(async { Ok(()) })
    }
}
