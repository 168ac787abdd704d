//! The local hub: which connections of this node listen to which channel.
//!
//! Sharded by channel name so that fan-out on one busy channel does not contend with
//! subscribes on others. Each shard has two locks with different jobs:
//!
//! - `channels` (a std `RwLock`) is what fan-out reads. It is never held across an await.
//! - `control` (a tokio mutex) serialises subscribe/unsubscribe transitions of the shard, so
//!   that "first local subscriber → broker subscribe" and "last one left → broker unsubscribe"
//!   happen in the order they were decided, even though the broker calls are async.
//!
//! A channel is in `channels` only while the node's broker subscription to it stands: its
//! first subscriber adds it once the broker call succeeded, its last one removes it before
//! the broker unsubscribe. So a subscriber of a channel already there joins it under the
//! `channels` lock alone, and one that leaves others behind leaves the same way: neither
//! waits behind the shard's broker calls, which a slow Redis makes as long as its timeout.
//! Who does need `control` waits for it at most the broker timeout, then gets
//! [`BrokerError::Timeout`] (the client's `unavailable`), however many transitions queue.
//!
//! Fan-out encodes the `message` frame once and pushes the same [`Bytes`] to every
//! subscriber's [`Outbound`] queue.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use crate::broker::{Broker, Sink};
use crate::conn::event::{Encoded, Event};
use crate::conn::outbound::{Outbound, Pushed};
use crate::error::BrokerError;
use crate::metrics::Metrics;

/// A connection's id, unique within the node.
pub type ConnId = u64;

type Subscribers = HashMap<ConnId, Arc<Outbound>>;

struct Shard {
    control: tokio::sync::Mutex<()>,
    channels: RwLock<HashMap<String, Subscribers>>,
}

/// See the module docs.
pub struct Hub {
    shards: Box<[Shard]>,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    broker_timeout: Duration,
    /// Channels whose broker subscription may outlive their last local subscriber: an
    /// unsubscribe failed, or a subscribe timed out (the broker may have subscribed anyway).
    /// [`Hub::reconcile`] unsubscribes them. Bounded by the channels this node ever had.
    stale: std::sync::Mutex<HashSet<String>>,
}

impl Hub {
    /// Builds the hub and its broker. The broker gets a sink that feeds [`Hub::deliver`].
    pub fn new(
        shards: usize,
        metrics: Arc<Metrics>,
        broker_timeout: Duration,
        make_broker: impl FnOnce(Sink) -> Arc<dyn Broker>,
    ) -> Arc<Hub> {
        Arc::new_cyclic(|weak: &Weak<Hub>| {
            let weak = weak.clone();
            let sink: Sink = Arc::new(move |channel: &str, data: &str| {
                if let Some(hub) = weak.upgrade() {
                    hub.deliver(channel, data);
                }
            });
            Hub {
                shards: (0..shards.max(1))
                    .map(|_| Shard {
                        control: tokio::sync::Mutex::new(()),
                        channels: RwLock::new(HashMap::new()),
                    })
                    .collect(),
                broker: make_broker(sink),
                metrics,
                broker_timeout,
                stale: Default::default(),
            }
        })
    }

    fn shard(&self, channel: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        channel.hash(&mut h);
        &self.shards[h.finish() as usize % self.shards.len()]
    }

    /// Adds `conn` to `channel`; the first local subscriber makes the node subscribe to the
    /// broker. Idempotent per connection.
    pub async fn subscribe(
        &self,
        channel: &str,
        conn: ConnId,
        out: &Arc<Outbound>,
    ) -> Result<(), BrokerError> {
        let shard = self.shard(channel);
        if join(shard, channel, conn, out) {
            return Ok(());
        }
        let _order = self.control(shard, "subscribe").await?;
        // Another first subscriber may have finished while this one waited.
        if join(shard, channel, conn, out) {
            return Ok(());
        }
        let unsettled = Unsettled(self, channel);
        self.broker_call("subscribe", self.broker.subscribe(channel))
            .await?;
        let mut map = write(&shard.channels);
        if out.is_closing() {
            // See `join`; the broker subscription goes with the next `reconcile`.
            return Ok(());
        }
        unsettled.settled();
        map.entry(channel.to_owned())
            .or_default()
            .insert(conn, out.clone());
        Ok(())
    }

    /// Removes `conn` from `channel`; the last local subscriber leaving makes the node
    /// unsubscribe from the broker. Removing an absent subscriber is a no-op.
    pub async fn unsubscribe(&self, channel: &str, conn: ConnId) -> Result<(), BrokerError> {
        let shard = self.shard(channel);
        {
            let mut map = write(&shard.channels);
            match map.get_mut(channel) {
                None => return Ok(()),
                Some(subs) if subs.len() > 1 || !subs.contains_key(&conn) => {
                    subs.remove(&conn);
                    return Ok(());
                }
                Some(_) => {}
            }
        }
        // The last subscriber (unless one joined meanwhile). It leaves even when the wait for
        // `control` times out, as a closing connection must: the broker subscription is then
        // left to `reconcile`, like one whose unsubscribe failed.
        let order = self.control(shard, "unsubscribe").await;
        let last = {
            let mut map = write(&shard.channels);
            let emptied = map
                .get_mut(channel)
                .is_some_and(|subs| subs.remove(&conn).is_some() && subs.is_empty());
            if emptied {
                map.remove(channel);
            }
            emptied
        };
        if last {
            let unsettled = Unsettled(self, channel);
            let _order = order?;
            self.broker_call("unsubscribe", self.broker.unsubscribe(channel))
                .await?;
            unsettled.settled();
        }
        Ok(())
    }

    /// The shard's `control`, waited for at most the broker timeout.
    async fn control<'s>(
        &self,
        shard: &'s Shard,
        op: &'static str,
    ) -> Result<tokio::sync::MutexGuard<'s, ()>, BrokerError> {
        match tokio::time::timeout(self.broker_timeout, shard.control.lock()).await {
            Ok(guard) => Ok(guard),
            Err(_) => {
                self.metrics.broker_errors.inc([op]);
                tracing::warn!(op, "timed out waiting behind the hub shard's broker calls");
                Err(BrokerError::Timeout)
            }
        }
    }

    fn mark_stale(&self, channel: &str) {
        let mut stale = self.stale.lock().unwrap_or_else(|p| p.into_inner());
        stale.insert(channel.to_owned());
    }

    /// Unsubscribes the broker from every stale channel (see `stale`) that still has no
    /// local subscriber. A channel whose unsubscribe fails again stays for the next round.
    /// Returns how many stale channels remain.
    pub async fn reconcile(&self) -> usize {
        let channels: Vec<String> = {
            let mut stale = self.stale.lock().unwrap_or_else(|p| p.into_inner());
            stale.drain().collect()
        };
        for channel in channels {
            let shard = self.shard(&channel);
            let _order = shard.control.lock().await;
            if self.subscribers(&channel) > 0 {
                // A later subscribe went through the broker: its subscription is wanted.
                continue;
            }
            if self
                .broker_call("unsubscribe", self.broker.unsubscribe(&channel))
                .await
                .is_err()
            {
                self.mark_stale(&channel);
            }
        }
        self.stale.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Publishes through the broker, reaching subscribers on every node.
    pub async fn publish(&self, channel: &str, data: &str) -> Result<(), BrokerError> {
        self.broker_call("publish", self.broker.publish(channel, data))
            .await
    }

    /// Publishes with a W3C `traceparent`: it travels in front of the data (see
    /// [`split_trace`]) so that every node's delivery log line carries it.
    pub async fn publish_traced(
        &self,
        channel: &str,
        data: &str,
        traceparent: &str,
    ) -> Result<(), BrokerError> {
        self.publish(channel, &crate::broker::traced(data, traceparent))
            .await
    }

    /// Queues a channel message to every local subscriber. The frame is encoded once.
    pub fn deliver(&self, channel: &str, payload: &str) {
        let (trace, data) = crate::broker::split_trace(payload);
        let shard = self.shard(channel);
        let map = shard.channels.read().unwrap_or_else(|p| p.into_inner());
        let Some(subs) = map.get(channel) else { return };
        if let Some(traceparent) = trace {
            tracing::info!(
                traceparent,
                channel,
                subscribers = subs.len(),
                "delivering traced message"
            );
        }
        let mut encoded = Encoded::new(Event::Message { channel, data });
        let received = std::time::Instant::now();
        let (mut delivered, mut bytes) = (0u64, 0u64);
        for out in subs.values() {
            let frame = encoded.bytes(out.codec());
            let len = frame.len() as u64;
            match out.push_received(frame, received) {
                Pushed::Queued => {
                    delivered += 1;
                    bytes += len;
                }
                Pushed::Overflowed => {
                    self.metrics.slow_consumer_disconnects.inc([]);
                }
                Pushed::Closing => {}
            }
        }
        drop(map);
        self.metrics
            .hot
            .deliveries
            .fetch_add(delivered, Ordering::Relaxed);
        self.metrics
            .hot
            .messages_out
            .fetch_add(delivered, Ordering::Relaxed);
        self.metrics
            .hot
            .bytes_out
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Number of local subscribers of `channel`.
    pub fn subscribers(&self, channel: &str) -> usize {
        let map = self
            .shard(channel)
            .channels
            .read()
            .unwrap_or_else(|p| p.into_inner());
        map.get(channel).map_or(0, HashMap::len)
    }

    /// False while the broker cannot reach its backend.
    pub fn broker_healthy(&self) -> bool {
        self.broker.is_healthy()
    }

    async fn broker_call(
        &self,
        op: &'static str,
        call: crate::broker::BoxFuture<'_, Result<(), BrokerError>>,
    ) -> Result<(), BrokerError> {
        let result = match tokio::time::timeout(self.broker_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Timeout),
        };
        if let Err(e) = &result {
            self.metrics.broker_errors.inc([op]);
            tracing::warn!(op, error = %e, "broker call failed");
        }
        result
    }
}

fn write(
    lock: &RwLock<HashMap<String, Subscribers>>,
) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Subscribers>> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Adds `conn` to `channel` if the channel is there, that is, subscribed at the broker.
///
/// A closing connection is not added: its cleanup may already have left every channel (a
/// reader task that is being aborted can still finish a subscribe), and it would stay here
/// for good. Checked under the `channels` lock, which the cleanup's unsubscribe takes after
/// the connection was marked closing, so one of the two always sees the other.
fn join(shard: &Shard, channel: &str, conn: ConnId, out: &Arc<Outbound>) -> bool {
    let mut map = write(&shard.channels);
    let Some(subs) = map.get_mut(channel) else {
        return false;
    };
    if !out.is_closing() {
        subs.insert(conn, out.clone());
    }
    true
}

/// A broker call in flight for a channel, which may leave the broker subscribed to it with
/// no local subscriber: dropped before it is forgotten (the call failed, timed out, or its
/// future was dropped with the connection), it marks the channel stale for
/// [`Hub::reconcile`].
struct Unsettled<'a>(&'a Hub, &'a str);

impl Unsettled<'_> {
    /// The call succeeded and its result is recorded in `channels`.
    fn settled(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        self.0.mark_stale(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::conn::frame;
    use crate::protocol::v1;
    use std::collections::VecDeque;

    fn hub() -> Arc<Hub> {
        Hub::new(4, Arc::default(), Duration::from_secs(1), |sink| {
            Arc::new(MemoryBroker::new(sink)) as Arc<dyn Broker>
        })
    }

    #[tokio::test]
    async fn fan_out_shares_one_encoding() {
        let hub = hub();
        let (a, b) = (
            Arc::new(Outbound::new(1 << 16, &v1::CODEC)),
            Arc::new(Outbound::new(1 << 16, &v1::CODEC)),
        );
        hub.subscribe("c", 1, &a).await.expect("sub a");
        hub.subscribe("c", 2, &b).await.expect("sub b");
        hub.publish("c", "[1]").await.expect("publish");
        let (mut qa, mut qb) = (VecDeque::new(), VecDeque::new());
        a.take(&mut qa);
        b.take(&mut qb);
        assert_eq!(
            qa[0],
            frame::text(r#"{"type":"message","channel":"c","data":[1]}"#)
        );
        assert_eq!(
            qa[0].as_ptr(),
            qb[0].as_ptr(),
            "both subscribers share one buffer"
        );
    }

    /// A memory broker whose next `unsubscribe` calls fail, as a Redis that timed out.
    struct Flaky {
        inner: MemoryBroker,
        failures: std::sync::atomic::AtomicU32,
        subscribed: std::sync::Mutex<HashSet<String>>,
    }

    impl Broker for Flaky {
        fn subscribe<'a>(
            &'a self,
            channel: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            self.subscribed.lock().unwrap().insert(channel.to_owned());
            self.inner.subscribe(channel)
        }
        fn unsubscribe<'a>(
            &'a self,
            channel: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Box::pin(async { Err(BrokerError::Timeout) });
            }
            self.subscribed.lock().unwrap().remove(channel);
            self.inner.unsubscribe(channel)
        }
        fn publish<'a>(
            &'a self,
            channel: &'a str,
            data: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            self.inner.publish(channel, data)
        }
    }

    #[tokio::test]
    async fn failed_unsubscribe_is_reconciled() {
        let flaky: std::sync::Arc<std::sync::OnceLock<Arc<Flaky>>> = Default::default();
        let slot = flaky.clone();
        let hub = Hub::new(4, Arc::default(), Duration::from_secs(1), move |sink| {
            let b = Arc::new(Flaky {
                inner: MemoryBroker::new(sink),
                failures: 2.into(),
                subscribed: Default::default(),
            });
            let _ = slot.set(b.clone());
            b as Arc<dyn Broker>
        });
        let broker = flaky.get().expect("built").clone();
        let subscribed = |c: &str| broker.subscribed.lock().unwrap().contains(c);
        let out = Arc::new(Outbound::new(1 << 16, &v1::CODEC));
        hub.subscribe("a", 1, &out).await.expect("sub a");
        hub.subscribe("b", 1, &out).await.expect("sub b");
        assert!(
            hub.unsubscribe("a", 1).await.is_err(),
            "first unsubscribe fails"
        );
        assert!(subscribed("a"), "the broker still holds a");
        // b gets a subscriber again before the reconcile: its subscription must stay.
        assert!(hub.unsubscribe("b", 1).await.is_err());
        hub.subscribe("b", 2, &out).await.expect("sub b again");
        assert_eq!(hub.reconcile().await, 0, "nothing left stale");
        assert!(!subscribed("a"), "reconcile unsubscribed the orphan");
        assert!(
            subscribed("b"),
            "a channel with a subscriber keeps its subscription"
        );
    }

    #[tokio::test]
    async fn broker_subscription_follows_first_and_last_subscriber() {
        let hub = hub();
        let out = Arc::new(Outbound::new(1 << 16, &v1::CODEC));
        hub.subscribe("c", 1, &out).await.expect("sub");
        hub.subscribe("c", 2, &out).await.expect("sub");
        hub.unsubscribe("c", 1).await.expect("unsub");
        assert_eq!(hub.subscribers("c"), 1);
        hub.publish("c", "1").await.expect("publish");
        let mut q = VecDeque::new();
        out.take(&mut q);
        assert_eq!(
            q.len(),
            1,
            "broker still subscribed while one subscriber is left"
        );
        hub.unsubscribe("c", 2).await.expect("unsub");
        hub.unsubscribe("c", 2)
            .await
            .expect("unsub twice is a no-op");
        assert_eq!(hub.subscribers("c"), 0);
        hub.publish("c", "2").await.expect("publish");
        out.take(&mut q);
        assert_eq!(q.len(), 1, "no delivery after the last subscriber left");
    }

    /// A memory broker whose subscribe to channels named `slow*` never answers, as a Redis
    /// that stalls; it records the unsubscribes it gets.
    struct Stalling {
        inner: MemoryBroker,
        unsubscribed: std::sync::Mutex<Vec<String>>,
    }

    impl Broker for Stalling {
        fn subscribe<'a>(
            &'a self,
            channel: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            if channel.starts_with("slow") {
                return Box::pin(std::future::pending());
            }
            self.inner.subscribe(channel)
        }
        fn unsubscribe<'a>(
            &'a self,
            channel: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            self.unsubscribed.lock().unwrap().push(channel.to_owned());
            self.inner.unsubscribe(channel)
        }
        fn publish<'a>(
            &'a self,
            channel: &'a str,
            data: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            self.inner.publish(channel, data)
        }
    }

    /// One shard, so that every channel shares its `control`.
    fn stalling_hub(timeout: Duration) -> (Arc<Hub>, Arc<Stalling>) {
        let slot: Arc<std::sync::OnceLock<Arc<Stalling>>> = Default::default();
        let set = slot.clone();
        let hub = Hub::new(1, Arc::default(), timeout, move |sink| {
            let b = Arc::new(Stalling {
                inner: MemoryBroker::new(sink),
                unsubscribed: Default::default(),
            });
            let _ = set.set(b.clone());
            b as Arc<dyn Broker>
        });
        let broker = slot.get().expect("built").clone();
        (hub, broker)
    }

    /// Done within 3 s, far longer than the hubs' broker timeout here.
    async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(3), f)
            .await
            .expect("bounded by the broker timeout")
    }

    /// Ready on its first poll: it did not wait for anything.
    async fn at_once<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::ZERO, f)
            .await
            .expect("completes without waiting")
    }

    #[tokio::test]
    async fn joining_or_leaving_a_subscribed_channel_does_not_wait_for_the_broker() {
        let (hub, _) = stalling_hub(Duration::from_secs(5));
        let out = Arc::new(Outbound::new(1 << 16, &v1::CODEC));
        hub.subscribe("busy", 1, &out).await.expect("sub");
        // a first subscriber whose broker call hangs holds the shard's transitions
        let (h, o) = (hub.clone(), out.clone());
        let stalled = tokio::spawn(async move { h.subscribe("slow", 2, &o).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        at_once(hub.subscribe("busy", 3, &out)).await.expect("join");
        assert_eq!(hub.subscribers("busy"), 2);
        at_once(hub.unsubscribe("busy", 3)).await.expect("leave");
        at_once(hub.unsubscribe("never", 3)).await.expect("no-op");
        assert_eq!(
            hub.subscribers("slow"),
            0,
            "not subscribed before the broker is"
        );
        stalled.abort();
    }

    #[tokio::test]
    async fn the_wait_for_a_shards_broker_calls_is_bounded_by_the_broker_timeout() {
        let (hub, broker) = stalling_hub(Duration::from_millis(100));
        let out = Arc::new(Outbound::new(1 << 16, &v1::CODEC));
        hub.subscribe("busy", 1, &out).await.expect("sub");
        // as a queue of broker calls that each take their whole timeout would
        let held = hub.shards[0].control.lock().await;
        let r = bounded(hub.subscribe("new", 2, &out)).await;
        assert!(matches!(r, Err(BrokerError::Timeout)), "{r:?}");
        assert_eq!(hub.subscribers("new"), 0);
        // the last subscriber leaves anyway (a closing connection must); the broker
        // unsubscribe is left to reconcile
        let r = bounded(hub.unsubscribe("busy", 1)).await;
        assert!(matches!(r, Err(BrokerError::Timeout)), "{r:?}");
        assert_eq!(hub.subscribers("busy"), 0);
        drop(held);
        assert_eq!(hub.reconcile().await, 0);
        assert_eq!(*broker.unsubscribed.lock().unwrap(), ["busy"]);
        // and the channel comes back through the broker for its next subscriber
        hub.subscribe("busy", 3, &out).await.expect("sub again");
        hub.publish("busy", "1").await.expect("publish");
        let mut q = VecDeque::new();
        out.take(&mut q);
        assert_eq!(q.len(), 1);
    }

    #[tokio::test]
    async fn a_first_subscribe_cut_off_mid_call_is_reconciled() {
        let (hub, broker) = stalling_hub(Duration::from_secs(5));
        let out = Arc::new(Outbound::new(1 << 16, &v1::CODEC));
        let (h, o) = (hub.clone(), out.clone());
        let cut = tokio::spawn(async move { h.subscribe("slow", 1, &o).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        cut.abort();
        let _ = cut.await;
        assert_eq!(hub.reconcile().await, 0);
        assert_eq!(*broker.unsubscribed.lock().unwrap(), ["slow"]);
        // a closing connection is not added, to a subscribed channel or a new one
        let closing = Arc::new(Outbound::new(1 << 16, &v1::CODEC));
        closing.close(crate::error::CloseReason::Abnormal);
        hub.subscribe("c", 2, &out).await.expect("sub");
        hub.subscribe("c", 3, &closing).await.expect("sub");
        hub.subscribe("d", 3, &closing).await.expect("sub");
        assert_eq!((hub.subscribers("c"), hub.subscribers("d")), (1, 0));
    }
}
