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
//! Fan-out encodes the `message` frame once per protocol ([`Encoded`]) and pushes the same
//! bytes to every subscriber's [`Outbound`] queue.
//!
//! A history channel (its `[[channels]]` entry keeps history) is a [`Stream`] instead of a
//! plain set of subscribers: it checks offsets, fills gaps and serves joiners from history
//! reads. Those reads are batched per channel: the first request waits `recover_batch_ms`
//! for others to ride along, so a reconnect storm costs one Redis read per channel per
//! batch rather than one per client.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::stream::{Joined, Stream};
use crate::broker::{Broker, Envelope, History, Position, Retention, Since, Sink};
use crate::config::ChannelOptions;
use crate::conn::event::{Encoded, Event};
use crate::conn::outbound::{Outbound, Pushed};
use crate::error::BrokerError;
use crate::metrics::Metrics;

/// A connection's id, unique within the node.
pub type ConnId = u64;

/// A channel's local subscribers.
enum Channel {
    Plain(HashMap<ConnId, Arc<Outbound>>),
    /// Boxed: a stream is far larger than a plain channel's map, and most channels are plain.
    History(Box<Mutex<Stream>>),
}

impl Channel {
    fn len(&self) -> usize {
        match self {
            Channel::Plain(subs) => subs.len(),
            Channel::History(s) => lock(s).len(),
        }
    }
}

struct Shard {
    control: tokio::sync::Mutex<()>,
    channels: RwLock<HashMap<String, Channel>>,
    /// Channels whose first broker subscribe is in flight: a subscriber that finds its
    /// channel here waits for `control` (the broker's answer) instead of joining at once.
    settling: Mutex<HashSet<String>>,
}

/// How the hub is set up.
pub struct Settings {
    pub shards: usize,
    pub broker_timeout: Duration,
    /// The `[[channels]]` entries.
    pub channels: Vec<ChannelOptions>,
    /// How long the first history read request of a channel waits for others.
    pub recover_batch: Duration,
}

/// See the module docs.
pub struct Hub {
    shards: Box<[Shard]>,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    settings: Settings,
    /// Channels whose broker subscription may outlive their last local subscriber: an
    /// unsubscribe failed, or a subscribe timed out (the broker may have subscribed anyway).
    /// [`Hub::reconcile`] unsubscribes them. Bounded by the channels this node ever had.
    stale: Mutex<HashSet<String>>,
    /// Numbers the history streams this hub makes, so that a read started for a stream
    /// that has since been dropped (its last subscriber left) is never applied to the one
    /// that replaced it under the same channel name.
    streams_made: AtomicU64,
    me: Weak<Hub>,
}

/// The outcome of a subscribe.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscribed {
    /// On a history channel: its epoch and top offset, and whether the asked-for position
    /// was recovered.
    pub joined: Option<Joined>,
}

impl Hub {
    /// Builds the hub and its broker. The broker gets a sink that feeds [`Hub::deliver`].
    pub fn new(
        settings: Settings,
        metrics: Arc<Metrics>,
        make_broker: impl FnOnce(Sink) -> Arc<dyn Broker>,
    ) -> Arc<Hub> {
        Arc::new_cyclic(|weak: &Weak<Hub>| {
            let me = weak.clone();
            let sink: Sink = Arc::new(move |channel: &str, data: &str| {
                if let Some(hub) = me.upgrade() {
                    hub.deliver(channel, data);
                }
            });
            Hub {
                shards: (0..settings.shards.max(1))
                    .map(|_| Shard {
                        control: tokio::sync::Mutex::new(()),
                        channels: RwLock::new(HashMap::new()),
                        settling: Mutex::new(HashSet::new()),
                    })
                    .collect(),
                broker: make_broker(sink),
                metrics,
                settings,
                stale: Default::default(),
                streams_made: AtomicU64::new(0),
                me: weak.clone(),
            }
        })
    }

    fn shard(&self, channel: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        channel.hash(&mut h);
        &self.shards[h.finish() as usize % self.shards.len()]
    }

    /// The channel's `[[channels]]` entry, when it keeps history.
    fn history_options(&self, channel: &str) -> Option<&ChannelOptions> {
        crate::config::channels::lookup(&self.settings.channels, channel)
            .filter(|o| o.has_history())
    }

    /// What the broker keeps of a history channel.
    pub fn retention(&self, channel: &str) -> Option<Retention> {
        self.history_options(channel).map(|o| Retention {
            size: o.history_size,
            ttl: Duration::from_secs(o.history_ttl_secs),
        })
    }

    /// [`Hub::subscribe_with`] without inline replays: the tests' shorthand.
    #[cfg(test)]
    pub async fn subscribe(
        &self,
        channel: &str,
        conn: ConnId,
        out: &Arc<Outbound>,
        recover: Option<Position>,
    ) -> Result<Subscribed, BrokerError> {
        self.subscribe_with(channel, conn, out, recover, false)
            .await
    }

    /// Adds `conn` to `channel`; the first local subscriber makes the node subscribe to the
    /// broker. Idempotent per connection.
    ///
    /// On a history channel the subscriber joins: this returns once its history read is
    /// done, with the channel's position (and, when `recover` was given, whether it was
    /// recovered). It gets nothing until [`Hub::activate`], which its protocol calls once
    /// the subscribe reply is queued; then the missed publications, then live ones. With
    /// `inline`, the missed publications come back in [`Joined::replay`] instead, for a
    /// protocol whose subscribe reply carries them, and only the live ones follow.
    pub async fn subscribe_with(
        &self,
        channel: &str,
        conn: ConnId,
        out: &Arc<Outbound>,
        recover: Option<Position>,
        inline: bool,
    ) -> Result<Subscribed, BrokerError> {
        let shard = self.shard(channel);
        if out.is_closing() {
            // Its cleanup may already have run: added now, it would never be removed.
            return Ok(Subscribed::default());
        }
        // A channel the broker already delivers is joined under the map lock alone: such a
        // subscriber must not wait behind the shard's broker calls (a slow Redis makes each
        // as long as its timeout).
        let settled = {
            let mut map = write(&shard.channels);
            let ready = map.contains_key(channel) && !lock(&shard.settling).contains(channel);
            ready.then(|| self.register(&mut map, channel, conn, out, recover.clone(), inline))
        };
        let (joined, _order) = match settled {
            Some((_, joined)) => (joined, None),
            None => {
                let order = self.control(shard, "subscribe").await?;
                let (first, joined) = {
                    let mut map = write(&shard.channels);
                    self.register(&mut map, channel, conn, out, recover, inline)
                };
                if first {
                    lock(&shard.settling).insert(channel.to_owned());
                    // Cut off mid-call (the caller dropped), the channel is left to
                    // `reconcile`: the broker may have subscribed anyway.
                    let unsettled = Unsettled(self, shard, channel);
                    let r = self
                        .broker_call("subscribe", self.broker.subscribe(channel))
                        .await;
                    unsettled.settled();
                    if let Err(e) = r {
                        self.remove(channel, conn);
                        return Err(e);
                    }
                }
                (joined, Some(order))
            }
        };
        drop(_order);
        let Some(rx) = joined else {
            return Ok(Subscribed::default());
        };
        let wait = self.settings.broker_timeout * 2 + self.settings.recover_batch;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(joined)) => Ok(Subscribed {
                joined: Some(joined),
            }),
            Ok(Err(_)) => {
                self.remove(channel, conn);
                Err(BrokerError::NotConfigured("the history read failed"))
            }
            Err(_) => {
                self.remove(channel, conn);
                Err(BrokerError::Timeout)
            }
        }
    }

    /// Adds `conn` to `channel` in `map`. Returns whether it is the channel's first
    /// subscriber, and, on a history channel, where its join will be answered.
    fn register(
        &self,
        map: &mut HashMap<String, Channel>,
        channel: &str,
        conn: ConnId,
        out: &Arc<Outbound>,
        recover: Option<Position>,
        inline: bool,
    ) -> (bool, Option<oneshot::Receiver<Joined>>) {
        let entry =
            map.entry(channel.to_owned())
                .or_insert_with(|| match self.history_options(channel) {
                    Some(o) => {
                        let id = self.streams_made.fetch_add(1, Ordering::Relaxed);
                        Channel::History(Box::new(Mutex::new(Stream::new(id, o.clone()))))
                    }
                    None => Channel::Plain(HashMap::new()),
                });
        let mut joined = None;
        match entry {
            Channel::Plain(subs) => {
                subs.insert(conn, out.clone());
            }
            Channel::History(stream) => {
                let mut s = lock(stream);
                if !s.contains(conn) {
                    let (tx, rx) = oneshot::channel();
                    if s.join(conn, out.clone(), recover, inline, tx) {
                        self.schedule_read(channel, s.id());
                    }
                    joined = Some(rx);
                }
            }
        }
        (entry.len() == 1, joined)
    }

    /// The shard's `control`, waited for at most the broker timeout: however many broker
    /// calls queue ahead, a subscribe or unsubscribe answers `unavailable` in bounded time.
    async fn control<'s>(
        &self,
        shard: &'s Shard,
        op: &'static str,
    ) -> Result<tokio::sync::MutexGuard<'s, ()>, BrokerError> {
        match tokio::time::timeout(self.settings.broker_timeout, shard.control.lock()).await {
            Ok(guard) => Ok(guard),
            Err(_) => {
                self.metrics.broker_errors.inc([op]);
                tracing::warn!(op, "timed out waiting behind the hub shard's broker calls");
                Err(BrokerError::Timeout)
            }
        }
    }

    /// Takes `conn` off `channel` without the broker (a failed subscribe); a channel left
    /// empty is marked stale for [`Hub::reconcile`].
    fn remove(&self, channel: &str, conn: ConnId) {
        let shard = self.shard(channel);
        let mut map = write(&shard.channels);
        let emptied = map.get_mut(channel).is_some_and(|c| {
            match c {
                Channel::Plain(subs) => {
                    subs.remove(&conn);
                }
                Channel::History(s) => {
                    lock(s).leave(conn);
                }
            }
            c.len() == 0
        });
        if emptied {
            map.remove(channel);
            drop(map);
            self.mark_stale(channel);
        }
    }

    /// Drops `channel`'s local subscribers and leaves its broker subscription to
    /// [`Hub::reconcile`] (a first subscribe cut off mid-call).
    fn remove_all(&self, channel: &str) {
        write(&self.shard(channel).channels).remove(channel);
        self.mark_stale(channel);
    }

    /// A joined subscriber of a history channel goes live (see [`Hub::subscribe`]).
    pub fn activate(&self, channel: &str, conn: ConnId) {
        self.with_stream(channel, |s| s.activate(conn, &self.metrics));
    }

    /// Runs `f` on the stream of a history channel with local subscribers.
    fn with_stream<R>(&self, channel: &str, f: impl FnOnce(&mut Stream) -> R) -> Option<R> {
        let map = self
            .shard(channel)
            .channels
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match map.get(channel) {
            Some(Channel::History(s)) => Some(f(&mut lock(s))),
            _ => None,
        }
    }

    /// True while `conn` is subscribed to `channel` (a history channel may end a
    /// subscription itself, with `insufficient_state`).
    pub fn contains(&self, channel: &str, conn: ConnId) -> bool {
        let map = self
            .shard(channel)
            .channels
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match map.get(channel) {
            Some(Channel::Plain(subs)) => subs.contains_key(&conn),
            Some(Channel::History(s)) => lock(s).contains(conn),
            None => false,
        }
    }

    /// Removes `conn` from `channel`; the last local subscriber leaving makes the node
    /// unsubscribe from the broker. Removing an absent subscriber is a no-op.
    pub async fn unsubscribe(&self, channel: &str, conn: ConnId) -> Result<(), BrokerError> {
        let shard = self.shard(channel);
        // Leaving others behind (or an absent subscriber) needs no broker call, and so no
        // wait behind the shard's.
        {
            let mut map = write(&shard.channels);
            match map.get_mut(channel) {
                None => return Ok(()),
                Some(c) if c.len() > 1 => {
                    match c {
                        Channel::Plain(subs) => {
                            subs.remove(&conn);
                        }
                        Channel::History(s) => {
                            lock(s).leave(conn);
                        }
                    }
                    return Ok(());
                }
                Some(_) => {}
            }
        }
        let _order = match self.control(shard, "unsubscribe").await {
            Ok(order) => order,
            Err(e) => {
                // The last subscriber leaves anyway (a closing connection must); the broker
                // unsubscribe is left to `reconcile`.
                self.remove(channel, conn);
                return Err(e);
            }
        };
        let last = {
            let mut map = write(&shard.channels);
            let emptied = map.get_mut(channel).is_some_and(|c| {
                let removed = match c {
                    Channel::Plain(subs) => subs.remove(&conn).is_some(),
                    Channel::History(s) => lock(s).leave(conn),
                };
                removed && c.len() == 0
            });
            if emptied {
                map.remove(channel);
            }
            emptied
        };
        if last {
            let r = self
                .broker_call("unsubscribe", self.broker.unsubscribe(channel))
                .await;
            if r.is_err() {
                self.mark_stale(channel);
            }
            r?;
        }
        Ok(())
    }

    fn mark_stale(&self, channel: &str) {
        let mut stale = self.stale.lock().unwrap_or_else(|p| p.into_inner());
        stale.insert(channel.to_owned());
    }

    /// Unsubscribes the broker from every stale channel (see `stale`) that still has no
    /// local subscriber, and drops history channels whose subscriptions all ended with
    /// `insufficient_state`. A channel whose unsubscribe fails again stays for the next
    /// round. Returns how many stale channels remain.
    pub async fn reconcile(&self) -> usize {
        for shard in self.shards.iter() {
            let mut map = write(&shard.channels);
            let empty: Vec<String> = map
                .iter()
                .filter(|(_, c)| c.len() == 0)
                .map(|(name, _)| name.clone())
                .collect();
            for name in empty {
                map.remove(&name);
                self.mark_stale(&name);
            }
        }
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

    /// Publishes through the broker, reaching subscribers on every node. On a history
    /// channel the publication is appended to history first, in the same step, and its
    /// position returned.
    pub async fn publish(
        &self,
        channel: &str,
        data: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Option<Position>, BrokerError> {
        match self.retention(channel) {
            Some(r) => {
                let call = self
                    .broker
                    .publish_history(channel, data, r, idempotency_key);
                self.timed("publish", call).await.map(Some)
            }
            None => self
                .broker_call("publish", self.broker.publish(channel, data))
                .await
                .map(|()| None),
        }
    }

    /// Publishes with a W3C `traceparent`: it travels in front of the data (see
    /// [`crate::broker::Envelope`]) so that every node's delivery log line carries it.
    /// Plain channels only: a history publication's payload is written by the broker, so
    /// there the traceparent is left out and the publish is [`Hub::publish`]'s, with its
    /// idempotency key.
    pub async fn publish_traced(
        &self,
        channel: &str,
        data: &str,
        traceparent: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Option<Position>, BrokerError> {
        if self.retention(channel).is_some() {
            return self.publish(channel, data, idempotency_key).await;
        }
        let payload = crate::broker::traced(data, traceparent);
        self.broker_call("publish", self.broker.publish(channel, &payload))
            .await
            .map(|()| None)
    }

    /// Reads a history channel's history (`None`: the channel keeps none).
    ///
    /// The last `limit` publications (all the channel keeps by default), or at most `limit`
    /// after `since`. Publications after a position of another epoch mean nothing: then the
    /// reply has the current epoch and none. Every protocol's history request and the
    /// admin APIs read through here.
    pub async fn history(
        &self,
        channel: &str,
        limit: Option<usize>,
        since: Option<&Position>,
    ) -> Result<Option<History>, BrokerError> {
        let Some(r) = self.retention(channel) else {
            return Ok(None);
        };
        let n = limit.unwrap_or(usize::MAX).min(r.size);
        let read = match since {
            Some(p) => Since::After(p.offset, n),
            None => Since::Last(n),
        };
        let call = self.broker.history(channel, r, read);
        let mut h = self.timed("history", call).await?;
        if since.is_some_and(|p| p.epoch != h.epoch) {
            h.publications.clear();
        }
        Ok(Some(h))
    }

    /// Removes a history channel's stored publications, keeping its position (`false`: the
    /// channel keeps no history).
    pub async fn remove_history(&self, channel: &str) -> Result<bool, BrokerError> {
        let Some(r) = self.retention(channel) else {
            return Ok(false);
        };
        let call = self.broker.remove_history(channel, r);
        self.timed("history_remove", call).await.map(|()| true)
    }

    /// Every channel with local subscribers and how many (joining ones included), for the
    /// server API's `channels` and the node's heartbeat.
    pub fn channel_counts(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.channels.read().unwrap_or_else(|p| p.into_inner());
            out.extend(
                map.iter()
                    .map(|(name, c)| (name.clone(), c.len()))
                    .filter(|(_, n)| *n > 0),
            );
        }
        out
    }

    /// Queues a channel message to every local subscriber. The frame is encoded once per
    /// protocol.
    pub fn deliver(&self, channel: &str, payload: &str) {
        let env = Envelope::open(payload);
        let shard = self.shard(channel);
        let map = shard.channels.read().unwrap_or_else(|p| p.into_inner());
        let Some(c) = map.get(channel) else { return };
        if let Some(traceparent) = env.traceparent {
            tracing::info!(
                traceparent,
                channel,
                subscribers = c.len(),
                "delivering traced message"
            );
        }
        if let Some(kind) = env.event {
            return announce(c, channel, kind, env.data, &self.metrics);
        }
        match c {
            Channel::Plain(subs) => {
                let mut encoded = Encoded::new(Event::Message {
                    channel,
                    data: env.data,
                    position: None,
                });
                fan_out(subs.values(), &mut encoded, &self.metrics, Instant::now());
            }
            Channel::History(s) => {
                let mut s = lock(s);
                if s.publish(channel, &env, &self.metrics) {
                    self.schedule_read(channel, s.id());
                }
            }
        }
    }

    /// Asks every history channel with live subscribers and no publication for `quiet`
    /// whether its epoch still holds and whether it missed anything; runs every heartbeat
    /// (see `server`), so a quiet channel costs one read per heartbeat.
    pub fn check_streams(&self, quiet: Duration) {
        let mut due = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.channels.read().unwrap_or_else(|p| p.into_inner());
            for (name, c) in map.iter() {
                if let Channel::History(s) = c {
                    let mut s = lock(s);
                    if s.check(quiet) {
                        due.push((name.clone(), s.id()));
                    }
                }
            }
        }
        for (name, id) in due {
            self.schedule_read(&name, id);
        }
    }

    /// Starts a batched history read of `channel`'s stream number `stream`: after
    /// `recover_batch`, one read serves every request made meanwhile. The read is dropped
    /// if that stream is gone by then (or by the time the read is answered): a stream
    /// made since under the same name asked for its own read, which must start after its
    /// joiners joined.
    fn schedule_read(&self, channel: &str, stream: u64) {
        let Some(hub) = self.me.upgrade() else { return };
        let channel = channel.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(hub.settings.recover_batch).await;
            loop {
                let started = hub.with_stream(&channel, |s| {
                    (s.id() == stream).then(|| (s.read_started(), s.wanted()))
                });
                let Some(Some((read, since))) = started else {
                    return;
                };
                let result = match hub.retention(&channel) {
                    Some(r) => {
                        hub.metrics.history_reads.inc([]);
                        let call = hub.broker.history(&channel, r, since);
                        hub.timed("history", call).await
                    }
                    None => return,
                };
                let again = hub.with_stream(&channel, |s| {
                    s.id() == stream && s.apply(&channel, read, result, &hub.metrics)
                });
                if again != Some(true) {
                    return;
                }
            }
        });
    }

    /// Number of local subscribers of `channel`, joining ones included.
    pub fn subscribers(&self, channel: &str) -> usize {
        let map = self
            .shard(channel)
            .channels
            .read()
            .unwrap_or_else(|p| p.into_inner());
        map.get(channel).map_or(0, Channel::len)
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
        self.timed(op, call).await
    }

    /// A broker call bounded by the broker timeout; failures are counted and logged.
    async fn timed<T>(
        &self,
        op: &'static str,
        call: crate::broker::BoxFuture<'_, Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let result = match tokio::time::timeout(self.settings.broker_timeout, call).await {
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

/// A first subscribe's broker call in flight: the channel is `settling` until
/// [`Unsettled::settled`]; dropped before (the call was cut off), the channel goes to
/// `reconcile`, since the broker may have subscribed anyway.
struct Unsettled<'a>(&'a Hub, &'a Shard, &'a str);

impl Unsettled<'_> {
    fn settled(self) {
        lock(&self.1.settling).remove(self.2);
        std::mem::forget(self);
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        lock(&self.1.settling).remove(self.2);
        self.0.remove_all(self.2);
    }
}

/// A presence announcement (`join`, `leave`; see `cluster::presence`) to every live local
/// subscriber of the channel, encoded once per protocol. Anything else is dropped.
fn announce(c: &Channel, channel: &str, kind: &str, member: &str, metrics: &Metrics) {
    let Some(e) = crate::cluster::presence::Entry::parse(member) else {
        metrics.broker_dropped.inc([]);
        return;
    };
    let (conn_id, user_id, info) = (&*e.conn_id, e.user_id.as_deref(), e.info.map(|i| i.get()));
    let event = match kind {
        "join" => Event::Join {
            channel,
            conn_id,
            user_id,
            info,
        },
        "leave" => Event::Leave {
            channel,
            conn_id,
            user_id,
            info,
        },
        _ => return,
    };
    let mut encoded = Encoded::new(event);
    match c {
        Channel::Plain(subs) => fan_out(subs.values(), &mut encoded, metrics, Instant::now()),
        Channel::History(s) => fan_out(lock(s).live(), &mut encoded, metrics, Instant::now()),
    }
}

/// Queues one encoded event to each of `subs` and counts the deliveries.
pub(super) fn fan_out<'a>(
    subs: impl Iterator<Item = &'a Arc<Outbound>>,
    encoded: &mut Encoded<'_>,
    metrics: &Metrics,
    received: Instant,
) {
    let (mut delivered, mut bytes) = (0u64, 0u64);
    for out in subs {
        let (pushed, len) = out.push_encoded(encoded, Some(received));
        match pushed {
            Pushed::Queued => {
                delivered += 1;
                bytes += len as u64;
            }
            Pushed::Overflowed => metrics.slow_consumer_disconnects.inc([]),
            Pushed::Closing | Pushed::Unwanted => {}
        }
    }
    let hot = &metrics.hot;
    hot.deliveries.fetch_add(delivered, Ordering::Relaxed);
    hot.messages_out.fetch_add(delivered, Ordering::Relaxed);
    hot.bytes_out.fetch_add(bytes, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write(
    lock: &RwLock<HashMap<String, Channel>>,
) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Channel>> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::conn::frame;
    use crate::protocol::v1;
    use std::collections::VecDeque;

    fn settings() -> Settings {
        Settings {
            shards: 4,
            broker_timeout: Duration::from_secs(1),
            channels: vec!["h:*?history_size=10&history_ttl_secs=60"
                .parse()
                .expect("valid")],
            recover_batch: Duration::from_millis(1),
        }
    }

    fn hub() -> Arc<Hub> {
        Hub::new(settings(), Arc::default(), |sink| {
            Arc::new(MemoryBroker::new(sink)) as Arc<dyn Broker>
        })
    }

    /// The texts of the frames queued to `out` (server frames: no mask).
    fn texts(out: &Outbound) -> Vec<String> {
        let mut q = VecDeque::new();
        out.take(&mut q);
        q.iter()
            .map(|f| {
                let skip = match f[1] & 0x7f {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
                String::from_utf8(f[skip..].to_vec()).expect("text")
            })
            .collect()
    }

    fn offsets(texts: &[String]) -> Vec<u64> {
        texts
            .iter()
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(t).ok()?["offset"].as_u64())
            .collect()
    }

    fn out() -> Arc<Outbound> {
        Arc::new(Outbound::new(1 << 20, &v1::CODEC))
    }

    #[tokio::test]
    async fn a_lost_publication_is_filled_from_history() {
        // The sink drops offset 4, as a lost pub/sub message would be.
        let hub = Hub::new(settings(), Arc::default(), |sink| {
            let lossy: Sink = Arc::new(move |c: &str, p: &str| {
                if Envelope::open(p).position.map(|(o, _)| o) != Some(4) {
                    sink(c, p)
                }
            });
            Arc::new(MemoryBroker::new(lossy)) as Arc<dyn Broker>
        });
        let a = out();
        let s = hub.subscribe("h:gap", 1, &a, None).await.expect("sub");
        assert_eq!(s.joined.as_ref().map(|j| j.position.offset), Some(0));
        hub.activate("h:gap", 1);
        for i in 1..=6 {
            hub.publish("h:gap", &i.to_string(), None)
                .await
                .expect("publish");
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // the fill's read
        assert_eq!(
            offsets(&texts(&a)),
            vec![1, 2, 3, 4, 5, 6],
            "4 came from history, in order"
        );
    }

    #[tokio::test]
    async fn a_joiner_recovers_what_it_missed_then_goes_live() {
        let hub = hub();
        let a = out();
        hub.subscribe("h:r", 1, &a, None).await.expect("sub a");
        hub.activate("h:r", 1);
        let mut last = None;
        for i in 1..=5 {
            last = hub
                .publish("h:r", &i.to_string(), None)
                .await
                .expect("publish");
        }
        let epoch = last.expect("history channel").epoch;
        let b = out();
        let want = Position {
            epoch: epoch.clone(),
            offset: 2,
        };
        let s = hub
            .subscribe("h:r", 2, &b, Some(want))
            .await
            .expect("sub b");
        let j = s.joined.expect("history channel");
        assert_eq!((j.position.offset, j.recovered), (5, Some(true)));
        assert!(texts(&b).is_empty(), "nothing before activation");
        hub.publish("h:r", "6", None).await.expect("publish");
        hub.activate("h:r", 2);
        hub.publish("h:r", "7", None).await.expect("publish");
        assert_eq!(
            offsets(&texts(&b)),
            vec![3, 4, 5, 6, 7],
            "replay, tail, then live"
        );
        assert_eq!(offsets(&texts(&a)), vec![1, 2, 3, 4, 5, 6, 7]);
        let c = out();
        let stale = Position {
            epoch: "other".into(),
            offset: 2,
        };
        let s = hub
            .subscribe("h:r", 3, &c, Some(stale))
            .await
            .expect("sub c");
        assert_eq!(
            s.joined.and_then(|j| j.recovered),
            Some(false),
            "another epoch"
        );
        hub.activate("h:r", 3);
        assert!(
            offsets(&texts(&c)).is_empty(),
            "nothing replayed when not recovered"
        );
    }

    /// A memory broker whose history reads wait for the test's permits (one per read, in
    /// the order the reads arrive) and count how many have arrived.
    struct Gated {
        inner: MemoryBroker,
        gate: tokio::sync::Semaphore,
        arrived: std::sync::atomic::AtomicUsize,
    }

    impl Broker for Gated {
        fn subscribe<'a>(
            &'a self,
            channel: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            self.inner.subscribe(channel)
        }
        fn unsubscribe<'a>(
            &'a self,
            channel: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            self.inner.unsubscribe(channel)
        }
        fn publish<'a>(
            &'a self,
            channel: &'a str,
            data: &'a str,
        ) -> crate::broker::BoxFuture<'a, Result<(), BrokerError>> {
            self.inner.publish(channel, data)
        }
        fn publish_history<'a>(
            &'a self,
            channel: &'a str,
            data: &'a str,
            retention: Retention,
            key: Option<&'a str>,
        ) -> crate::broker::BoxFuture<'a, Result<Position, BrokerError>> {
            self.inner.publish_history(channel, data, retention, key)
        }
        fn history<'a>(
            &'a self,
            channel: &'a str,
            retention: Retention,
            since: Since,
        ) -> crate::broker::BoxFuture<'a, Result<History, BrokerError>> {
            Box::pin(async move {
                self.arrived.fetch_add(1, Ordering::SeqCst);
                self.gate.acquire().await.expect("open").forget();
                self.inner.history(channel, retention, since).await
            })
        }
    }

    fn gated_hub() -> (Arc<Hub>, Arc<Gated>) {
        let slot: Arc<std::sync::OnceLock<Arc<Gated>>> = Default::default();
        let s = slot.clone();
        let hub = Hub::new(settings(), Arc::default(), move |sink| {
            let b = Arc::new(Gated {
                inner: MemoryBroker::new(sink),
                gate: tokio::sync::Semaphore::new(0),
                arrived: 0.into(),
            });
            let _ = s.set(b.clone());
            b as Arc<dyn Broker>
        });
        let broker = slot.get().expect("built").clone();
        (hub, broker)
    }

    async fn reads_arrived(broker: &Gated, n: usize) {
        for _ in 0..500 {
            if broker.arrived.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("{n} history reads did not arrive");
    }

    #[tokio::test]
    async fn a_read_that_outlives_its_stream_does_not_serve_the_next_one() {
        let (hub, broker) = gated_hub();
        let a = out();
        let sub = {
            let (hub, a) = (hub.clone(), a.clone());
            tokio::spawn(async move { hub.subscribe("h:s", 1, &a, None).await })
        };
        reads_arrived(&broker, 1).await;
        broker.gate.add_permits(1);
        let epoch = sub
            .await
            .unwrap()
            .expect("sub a")
            .joined
            .unwrap()
            .position
            .epoch;
        hub.activate("h:s", 1);
        for i in 1..=5 {
            hub.publish("h:s", &i.to_string(), None)
                .await
                .expect("publish");
        }
        // a heartbeat check starts a read of what follows offset 5, which Redis is slow
        // to answer; meanwhile the only subscriber leaves, and the stream with it
        hub.check_streams(Duration::ZERO);
        reads_arrived(&broker, 2).await;
        hub.unsubscribe("h:s", 1).await.expect("unsub");
        for i in 6..=8 {
            hub.publish("h:s", &i.to_string(), None)
                .await
                .expect("publish");
        }
        // a new subscriber recovers from 2: a new stream, with a read of its own
        let b = out();
        let sub = {
            let (hub, b) = (hub.clone(), b.clone());
            let from = Position {
                epoch: epoch.clone(),
                offset: 2,
            };
            tokio::spawn(async move { hub.subscribe("h:s", 2, &b, Some(from)).await })
        };
        reads_arrived(&broker, 3).await;
        // the old read is answered first (publications after 5 only), then the new one
        broker.gate.add_permits(2);
        let j = sub.await.unwrap().expect("sub b").joined.unwrap();
        assert_eq!(
            (j.position.offset, j.recovered),
            (8, Some(true)),
            "served by its own read, not by the old stream's"
        );
        hub.activate("h:s", 2);
        assert_eq!(offsets(&texts(&b)), vec![3, 4, 5, 6, 7, 8]);
    }

    #[tokio::test]
    async fn a_joiner_ended_before_its_reply_is_told_after_it() {
        let hub = hub();
        let a = out();
        hub.subscribe("h:e", 1, &a, None).await.expect("sub");
        hub.publish("h:e", "1", None).await.expect("publish");
        // before the protocol has sent the reply (and activated the subscriber), a
        // publication of another epoch arrives: the subscription cannot stay gap-free
        hub.deliver("h:e", &crate::broker::positioned("2", 7, "another"));
        assert!(texts(&a).is_empty(), "nothing may come before the reply");
        assert!(!hub.contains("h:e", 1), "the subscription is over");
        hub.activate("h:e", 1);
        let t = texts(&a);
        assert_eq!(offsets(&t), vec![1], "what it had, then the end");
        assert_eq!(
            t.last().map(String::as_str),
            Some(r#"{"type":"unsubscribed","channel":"h:e","code":"insufficient_state"}"#)
        );
        hub.publish("h:e", "3", None).await.expect("publish");
        assert!(texts(&a).is_empty(), "not live");
    }

    #[tokio::test]
    async fn an_inline_joiner_gets_its_replay_back_and_only_live_ones_queued() {
        let hub = hub();
        let mut last = None;
        for i in 1..=4 {
            last = hub
                .publish("h:in", &i.to_string(), None)
                .await
                .expect("publish");
        }
        let epoch = last.expect("history channel").epoch;
        let b = out();
        let want = Position { epoch, offset: 1 };
        let s = hub
            .subscribe_with("h:in", 2, &b, Some(want), true)
            .await
            .expect("sub");
        let j = s.joined.expect("history channel");
        assert_eq!((j.position.offset, j.recovered), (4, Some(true)));
        assert_eq!(
            j.replay,
            vec![
                (2, "2".to_owned()),
                (3, "3".to_owned()),
                (4, "4".to_owned())
            ],
            "what it missed, for the reply"
        );
        hub.activate("h:in", 2);
        hub.publish("h:in", "5", None).await.expect("publish");
        assert_eq!(offsets(&texts(&b)), vec![5], "no replay queued, live after");
    }

    #[tokio::test]
    async fn fan_out_shares_one_encoding() {
        let hub = hub();
        let (a, b) = (
            Arc::new(Outbound::new(1 << 16, &v1::CODEC)),
            Arc::new(Outbound::new(1 << 16, &v1::CODEC)),
        );
        hub.subscribe("c", 1, &a, None).await.expect("sub a");
        hub.subscribe("c", 2, &b, None).await.expect("sub b");
        hub.publish("c", "[1]", None).await.expect("publish");
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
        fn publish_history<'a>(
            &'a self,
            channel: &'a str,
            data: &'a str,
            retention: Retention,
            key: Option<&'a str>,
        ) -> crate::broker::BoxFuture<'a, Result<Position, BrokerError>> {
            self.inner.publish_history(channel, data, retention, key)
        }
        fn history<'a>(
            &'a self,
            channel: &'a str,
            retention: Retention,
            since: Since,
        ) -> crate::broker::BoxFuture<'a, Result<History, BrokerError>> {
            self.inner.history(channel, retention, since)
        }
    }

    #[tokio::test]
    async fn failed_unsubscribe_is_reconciled() {
        let flaky: std::sync::Arc<std::sync::OnceLock<Arc<Flaky>>> = Default::default();
        let slot = flaky.clone();
        let hub = Hub::new(settings(), Arc::default(), move |sink| {
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
        hub.subscribe("a", 1, &out, None).await.expect("sub a");
        hub.subscribe("b", 1, &out, None).await.expect("sub b");
        assert!(
            hub.unsubscribe("a", 1).await.is_err(),
            "first unsubscribe fails"
        );
        assert!(subscribed("a"), "the broker still holds a");
        // b gets a subscriber again before the reconcile: its subscription must stay.
        assert!(hub.unsubscribe("b", 1).await.is_err());
        hub.subscribe("b", 2, &out, None)
            .await
            .expect("sub b again");
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
        hub.subscribe("c", 1, &out, None).await.expect("sub");
        hub.subscribe("c", 2, &out, None).await.expect("sub");
        hub.unsubscribe("c", 1).await.expect("unsub");
        assert_eq!(hub.subscribers("c"), 1);
        hub.publish("c", "1", None).await.expect("publish");
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
        hub.publish("c", "2", None).await.expect("publish");
        out.take(&mut q);
        assert_eq!(q.len(), 1, "no delivery after the last subscriber left");
    }

    /// A memory broker whose subscribe to a `slow*` channel never answers, as a Redis that
    /// hangs; records its unsubscribes.
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
        fn publish_history<'a>(
            &'a self,
            channel: &'a str,
            data: &'a str,
            retention: Retention,
            key: Option<&'a str>,
        ) -> crate::broker::BoxFuture<'a, Result<Position, BrokerError>> {
            self.inner.publish_history(channel, data, retention, key)
        }
        fn history<'a>(
            &'a self,
            channel: &'a str,
            retention: Retention,
            since: Since,
        ) -> crate::broker::BoxFuture<'a, Result<History, BrokerError>> {
            self.inner.history(channel, retention, since)
        }
    }

    /// One shard, so that every channel shares its `control`.
    fn stalling_hub(timeout: Duration) -> (Arc<Hub>, Arc<Stalling>) {
        let slot: Arc<std::sync::OnceLock<Arc<Stalling>>> = Default::default();
        let set = slot.clone();
        let settings = Settings {
            shards: 1,
            broker_timeout: timeout,
            ..settings()
        };
        let hub = Hub::new(settings, Arc::default(), move |sink| {
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
        hub.subscribe("busy", 1, &out, None).await.expect("sub");
        // a first subscriber whose broker call hangs holds the shard's transitions
        let (h, o) = (hub.clone(), out.clone());
        let stalled = tokio::spawn(async move { h.subscribe("slow", 2, &o, None).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        at_once(hub.subscribe("busy", 3, &out, None))
            .await
            .expect("join");
        assert_eq!(hub.subscribers("busy"), 2);
        at_once(hub.unsubscribe("busy", 3)).await.expect("leave");
        at_once(hub.unsubscribe("never", 3)).await.expect("no-op");
        stalled.abort();
    }

    #[tokio::test]
    async fn the_wait_for_a_shards_broker_calls_is_bounded_and_a_cut_off_subscribe_reconciled() {
        let (hub, broker) = stalling_hub(Duration::from_millis(100));
        let out = Arc::new(Outbound::new(1 << 16, &v1::CODEC));
        hub.subscribe("busy", 1, &out, None).await.expect("sub");
        // as a queue of broker calls that each take their whole timeout would
        let held = hub.shards[0].control.lock().await;
        let r = tokio::time::timeout(Duration::from_secs(3), hub.subscribe("new", 2, &out, None))
            .await
            .expect("bounded");
        assert!(matches!(r, Err(BrokerError::Timeout)), "{r:?}");
        assert_eq!(hub.subscribers("new"), 0);
        // the last subscriber leaves anyway; the broker unsubscribe is left to reconcile
        let r = tokio::time::timeout(Duration::from_secs(3), hub.unsubscribe("busy", 1))
            .await
            .expect("bounded");
        assert!(matches!(r, Err(BrokerError::Timeout)), "{r:?}");
        assert_eq!(hub.subscribers("busy"), 0);
        drop(held);
        assert_eq!(hub.reconcile().await, 0);
        assert_eq!(*broker.unsubscribed.lock().unwrap(), ["busy"]);
        // a first subscribe cut off mid-call leaves its channel to reconcile
        let (h, o) = (hub.clone(), out.clone());
        let cut = tokio::spawn(async move { h.subscribe("slow", 3, &o, None).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        cut.abort();
        let _ = cut.await;
        assert_eq!(hub.subscribers("slow"), 0);
        assert_eq!(hub.reconcile().await, 0);
        assert!(broker
            .unsubscribed
            .lock()
            .unwrap()
            .contains(&"slow".to_owned()));
        // a closing connection is not added
        let closing = Arc::new(Outbound::new(1 << 16, &v1::CODEC));
        closing.close(crate::error::CloseReason::Abnormal);
        hub.subscribe("c", 4, &closing, None).await.expect("sub");
        assert_eq!(hub.subscribers("c"), 0);
    }
}
