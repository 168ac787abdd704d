//! Presence: who is subscribed to each presence channel (its `[[channels]]` entry has
//! `presence = true`), cluster-wide, with O(1) counts, and the join and leave announcements.
//!
//! A [`Store`] holds the members of every channel: [`MemoryStore`] for a single node
//! without Redis, [`RedisStore`] (the functions of `presence.lua`) for a cluster. Both are
//! held to [`conformance`]. The store announces a join or leave by publishing the member on
//! the channel's own broker channel behind the header line `event=join` / `event=leave`
//! (`broker::Envelope`), so that every node's hub fans it out to its local subscribers of the
//! channel; a node with none is not even subscribed.
//!
//! [`Presence`] is what the session uses: it keeps this node's own entries in a local map
//! too, so that after an outage (Redis restarted empty, or writes failed) the directory's
//! resync writes them again, and it removes the entries of dead nodes when the directory's
//! janitor purges them ([`NodeData`]). A dead node's members therefore leave within the
//! directory's purge bound, about `node_ttl_ms` + `node_heartbeat_ms` (12 s by default).

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod memory;
pub mod redis;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::broker::{BoxFuture, Sink};
use crate::cluster::directory::liveness::NodeData;
use crate::cluster::redis::Redis;
use crate::config::channels::{lookup, Announce};
use crate::config::{ChannelOptions, Config};
use crate::error::BrokerError;
use crate::metrics::Metrics;

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// One subscribed connection of a presence channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub conn_id: String,
    /// `None` for an anonymous connection.
    pub user_id: Option<String>,
    /// The token's `info` claim, as compact JSON text (an object).
    pub info: Option<String>,
}

impl Member {
    /// The member as stored and announced:
    /// `{"conn_id":…,"user_id":…,"info":…,"node":…}`.
    pub fn entry(&self, node: &str) -> String {
        let text = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let mut e = String::with_capacity(64 + self.info.as_ref().map_or(4, String::len));
        e.push_str("{\"conn_id\":");
        e.push_str(&text(&self.conn_id));
        e.push_str(",\"user_id\":");
        match &self.user_id {
            Some(u) => e.push_str(&text(u)),
            None => e.push_str("null"),
        }
        e.push_str(",\"info\":");
        e.push_str(self.info.as_deref().unwrap_or("null"));
        e.push_str(",\"node\":");
        e.push_str(&text(node));
        e.push('}');
        e
    }

    /// A stored entry read back; `None` when it is not one.
    pub fn parse(entry: &str) -> Option<Member> {
        let e = Entry::parse(entry)?;
        Some(Member {
            conn_id: e.conn_id.into_owned(),
            user_id: e.user_id.map(Cow::into_owned),
            info: e.info.map(|i| i.get().to_owned()),
        })
    }
}

/// A stored or announced entry, borrowed (the hub reads one per announcement).
#[derive(Debug, Deserialize)]
pub struct Entry<'a> {
    #[serde(borrow)]
    pub conn_id: Cow<'a, str>,
    #[serde(borrow, default)]
    pub user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub info: Option<&'a RawValue>,
    /// The node that wrote it.
    #[serde(borrow, default)]
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    pub node: Option<Cow<'a, str>>,
}

impl<'a> Entry<'a> {
    pub fn parse(entry: &'a str) -> Option<Entry<'a>> {
        serde_json::from_str(entry).ok()
    }
}

/// A channel's counts: connections, and distinct users among them (anonymous connections
/// are clients, not users).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Stats {
    pub num_clients: u64,
    pub num_users: u64,
}

/// At most so many members of a channel, and whether there were more.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listing {
    pub members: Vec<Member>,
    pub truncated: bool,
}

/// One page of a channel's members, and the cursor of the next (`None`: this was the last).
/// A member may appear on two pages while the channel changes; one that stays all along
/// appears on at least one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub members: Vec<Member>,
    pub cursor: Option<String>,
}

/// Where the members of every presence channel are kept. Each store knows its node (the
/// `node` of the entries it writes) and the `[[channels]]` entries, which say how each
/// channel announces (`join_leave`, `user_join_leave`).
pub trait Store: Send + Sync {
    /// Adds a connection to a channel; announces its join when it is new there and the
    /// channel's options say so. Adding it again replaces its entry and announces nothing.
    fn add<'a>(
        &'a self,
        channel: &'a str,
        member: &'a Member,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Removes a connection from a channel, announcing its leave as the options say. An
    /// absent connection is a no-op.
    fn remove<'a>(
        &'a self,
        channel: &'a str,
        conn: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Adds many of this node's entries, as [`Store::add`] each (the resync).
    fn add_many<'a>(
        &'a self,
        entries: &'a [(String, Member)],
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Removes many `(channel, conn)` entries, as [`Store::remove`] each.
    fn remove_many<'a>(
        &'a self,
        entries: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// At most `max` members of a channel.
    fn list<'a>(
        &'a self,
        channel: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, BrokerError>>;

    /// A page of about `count` members, from `cursor` (`None`: the start).
    fn page<'a>(
        &'a self,
        channel: &'a str,
        cursor: Option<&'a str>,
        count: usize,
    ) -> BoxFuture<'a, Result<Page, BrokerError>>;

    /// The channel's counts, in O(1).
    fn stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Stats, BrokerError>>;

    /// Removes every entry that `node` wrote, announcing the leaves. Returns how many.
    fn purge_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<usize, BrokerError>>;

    /// Gets ready (loads the Redis functions). Call once, before the first write.
    fn start(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// How `channel` announces, from the `[[channels]]` entries.
pub(crate) fn announce_of(channels: &[ChannelOptions], channel: &str) -> Announce {
    lookup(channels, channel).map_or(Announce::Quiet, ChannelOptions::announce)
}

/// What the session uses; see the module docs.
pub struct Presence {
    store: Arc<dyn Store>,
    channels: Vec<ChannelOptions>,
    /// This node's entries, by channel and connection: what a resync writes again.
    mine: Mutex<HashMap<String, HashMap<String, Member>>>,
    /// A write failed: the next heartbeat schedules a resync.
    dirty: AtomicBool,
    /// `(channel, conn)` entries whose removal failed, to remove in the resync.
    orphans: Mutex<Vec<(String, String)>>,
    metrics: Arc<Metrics>,
}

impl Presence {
    /// With Redis, the Redis store (call [`Presence::start`] before the directory starts);
    /// without, the memory store, which announces through `sink` (the hub's delivery).
    pub fn new(
        c: &Config,
        redis: Option<Arc<Redis>>,
        sink: Sink,
        metrics: Arc<Metrics>,
    ) -> Arc<Presence> {
        let store: Arc<dyn Store> = match redis {
            Some(r) => Arc::new(RedisStore::new(r, &c.node_id, &c.channels)),
            None => Arc::new(MemoryStore::new(&c.node_id, &c.channels, sink)),
        };
        Arc::new(Presence::with_store(store, &c.channels, metrics))
    }

    pub fn with_store(
        store: Arc<dyn Store>,
        channels: &[ChannelOptions],
        metrics: Arc<Metrics>,
    ) -> Presence {
        Presence {
            store,
            channels: channels.to_vec(),
            mine: Default::default(),
            dirty: AtomicBool::new(false),
            orphans: Default::default(),
            metrics,
        }
    }

    /// Gets the store ready (with Redis: loads the functions, which the directory's resync
    /// loads again after an outage).
    pub async fn start(&self) -> Result<(), BrokerError> {
        self.store.start().await
    }

    /// True when `channel` tracks presence.
    pub fn enabled(&self, channel: &str) -> bool {
        lookup(&self.channels, channel).is_some_and(|o| o.presence)
    }

    fn mine(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Member>>> {
        self.mine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn orphans(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.orphans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection of this node subscribed to a presence channel. A failed write is not
    /// the subscriber's problem: the entry is written again by the next resync.
    pub async fn join(&self, channel: &str, member: Member) {
        self.metrics.presence_ops.inc(["join"]);
        let written = self.store.add(channel, &member).await;
        self.mine()
            .entry(channel.to_owned())
            .or_default()
            .insert(member.conn_id.clone(), member);
        if let Err(e) = written {
            self.dirty.store(true, Ordering::Release);
            tracing::warn!(channel, error = %e, "presence join not recorded; resyncing later");
        }
    }

    /// A connection of this node left a presence channel (unsubscribed or closed).
    pub async fn leave(&self, channel: &str, conn: &str) {
        let held = {
            let mut mine = self.mine();
            let held = mine
                .get_mut(channel)
                .is_some_and(|m| m.remove(conn).is_some());
            if mine.get(channel).is_some_and(HashMap::is_empty) {
                mine.remove(channel);
            }
            held
        };
        if !held {
            return;
        }
        self.metrics.presence_ops.inc(["leave"]);
        if let Err(e) = self.store.remove(channel, conn).await {
            self.orphans().push((channel.to_owned(), conn.to_owned()));
            self.dirty.store(true, Ordering::Release);
            tracing::warn!(channel, error = %e, "presence leave not recorded; resyncing later");
        }
    }

    /// At most `max` members of `channel`.
    pub async fn list(&self, channel: &str, max: usize) -> Result<Listing, BrokerError> {
        self.metrics.presence_ops.inc(["list"]);
        self.store.list(channel, max).await
    }

    /// A page of `channel`'s members (the admin API).
    pub async fn page(
        &self,
        channel: &str,
        cursor: Option<&str>,
        count: usize,
    ) -> Result<Page, BrokerError> {
        self.metrics.presence_ops.inc(["page"]);
        self.store.page(channel, cursor, count).await
    }

    /// `channel`'s counts.
    pub async fn stats(&self, channel: &str) -> Result<Stats, BrokerError> {
        self.metrics.presence_ops.inc(["stats"]);
        self.store.stats(channel).await
    }

    /// True while this node holds `conn`'s entry in `channel`.
    fn holds(&self, channel: &str, conn: &str) -> bool {
        self.mine()
            .get(channel)
            .is_some_and(|m| m.contains_key(conn))
    }

    /// Writes this node's entries again, in batches, after removing the orphans. Returns
    /// how many it wrote.
    pub async fn resync(&self) -> Result<usize, BrokerError> {
        let orphans = std::mem::take(&mut *self.orphans());
        for chunk in orphans.chunks(crate::cluster::directory::backend::BATCH) {
            if let Err(e) = self.store.remove_many(chunk).await {
                self.orphans().extend(orphans);
                return Err(e);
            }
        }
        let snapshot: Vec<(String, Member)> = self
            .mine()
            .iter()
            .flat_map(|(ch, members)| members.values().map(|m| (ch.clone(), m.clone())))
            .collect();
        for chunk in snapshot.chunks(crate::cluster::directory::backend::BATCH) {
            self.store.add_many(chunk).await?;
        }
        // An entry removed after the snapshot may have been written back above.
        let gone: Vec<(String, String)> = snapshot
            .iter()
            .filter(|(ch, m)| !self.holds(ch, &m.conn_id))
            .map(|(ch, m)| (ch.clone(), m.conn_id.clone()))
            .collect();
        if let Err(e) = self.store.remove_many(&gone).await {
            self.orphans().extend(gone);
            return Err(e);
        }
        self.metrics.presence_ops.inc(["resync"]);
        Ok(snapshot.len())
    }
}

impl NodeData for Presence {
    fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    fn resync(&self) -> BoxFuture<'_, Result<usize, BrokerError>> {
        Box::pin(async move {
            let n = Presence::resync(self).await?;
            tracing::info!(entries = n, "presence restored in Redis");
            Ok(n)
        })
    }

    fn purge<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<usize, BrokerError>> {
        Box::pin(async move {
            let n = self.store.purge_node(node).await?;
            if n > 0 {
                self.metrics.presence_ops.add(["purge"], n as u64);
                tracing::info!(node, entries = n, "purged the presence of a dead node");
            }
            Ok(n)
        })
    }
}
