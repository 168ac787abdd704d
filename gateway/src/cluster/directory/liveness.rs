//! Node liveness with Redis: the heartbeat, the resync after an outage, and the janitor
//! that purges dead nodes.
//!
//! Two tasks, so that nothing slow stands between two heartbeats:
//!
//! - the heartbeat loop only writes this node's liveness entry and load every
//!   `node_heartbeat_ms`, notes when the records need rewriting (the connection dropped, or
//!   a write failed) and wakes the other task;
//! - the maintenance task then does the rest: the resync, a janitor pass and a rebalancing
//!   pass.
//!
//! A node must never let its liveness entry lapse while it lives: another node's janitor
//! would purge its routes. Rewriting 15k connections one at a time after a Redis restart
//! took longer than `node_ttl_ms`, which is why the resync and the purge go in batches
//! ([`super::backend::BATCH`] connections per round trip) and off the heartbeat's path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::backend::{RedisRecords, BATCH};
use super::local::LocalConns;
use super::rebalance::Rebalancer;
use super::{now_ms, BoxFuture};
use crate::config::Config;
use crate::error::{BrokerError, StartError};
use crate::metrics::Metrics;

/// Picks the one node that runs the janitor. Without one, a Redis lock does.
pub trait Elector: Send + Sync {
    /// Takes or renews leadership; true while this node leads.
    fn acquire(&self) -> BoxFuture<'_, bool>;
}

/// More of a node's state in Redis beside its connections (presence): written under the
/// node's name, written again by the resync after an outage, and purged with the node when
/// it dies, before its liveness entry goes (so that a failed purge is tried again).
pub trait NodeData: Send + Sync {
    /// True once after a write failed: the next heartbeat schedules a resync.
    fn take_dirty(&self) -> bool;
    /// Writes this node's state again; returns how many entries.
    fn resync(&self) -> BoxFuture<'_, Result<usize, BrokerError>>;
    /// Removes what `node` wrote; returns how many entries.
    fn purge<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<usize, BrokerError>>;
}

/// Directory writes that could not reach Redis, for the next resync.
#[derive(Default)]
pub struct Pending {
    /// A registration failed while Redis was away: re-register everything.
    dirty: AtomicBool,
    /// Connections that closed while Redis was away, whose records are still to delete
    /// (Redis may have kept them), as `(conn, user)`.
    orphans: Mutex<Vec<(String, Option<String>)>>,
}

impl Pending {
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// A connection's records could not be deleted.
    pub fn orphan(&self, conn: &str, user: Option<String>) {
        self.orphans().push((conn.to_owned(), user));
        self.mark_dirty();
    }

    fn orphans(&self) -> std::sync::MutexGuard<'_, Vec<(String, Option<String>)>> {
        self.orphans.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See the module docs.
pub struct Liveness {
    records: Arc<RedisRecords>,
    local: Arc<LocalConns>,
    pending: Arc<Pending>,
    rebalancer: Rebalancer,
    node_id: String,
    heartbeat: Duration,
    ttl: Duration,
    elector: OnceLock<Arc<dyn Elector>>,
    /// The records must be rewritten: set by the heartbeat loop, cleared by a resync that
    /// starts (and set again if it fails).
    resync_due: AtomicBool,
    /// A heartbeat succeeded: the maintenance task runs a pass. One stored permit, so beats
    /// during a long pass ask for one more pass, not for one each.
    beaten: Notify,
    /// The node left the cluster: no more beats or writes, which would put it back.
    left: AtomicBool,
    /// State beside the connections, purged and resynced with them.
    attached: RwLock<Vec<Arc<dyn NodeData>>>,
    metrics: Arc<Metrics>,
}

impl Liveness {
    pub fn new(
        c: &Config,
        records: Arc<RedisRecords>,
        local: Arc<LocalConns>,
        pending: Arc<Pending>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Liveness {
            records,
            local,
            pending,
            rebalancer: Rebalancer::new(c, metrics.clone()),
            node_id: c.node_id.clone(),
            heartbeat: Duration::from_millis(c.node_heartbeat_ms),
            ttl: Duration::from_millis(c.node_ttl_ms),
            elector: OnceLock::new(),
            resync_due: AtomicBool::new(false),
            beaten: Notify::new(),
            left: AtomicBool::new(false),
            attached: RwLock::new(Vec::new()),
            metrics,
        }
    }

    /// Purges and resyncs `data` with the node's connections. Attach before `start`.
    pub fn attach(&self, data: Arc<dyn NodeData>) {
        self.attached
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(data);
    }

    fn attached(&self) -> Vec<Arc<dyn NodeData>> {
        self.attached
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Purges what `node` left beside its connections, then its routes and liveness entry.
    async fn purge(&self, node: &str) -> Result<usize, BrokerError> {
        for data in self.attached() {
            data.purge(node).await?;
        }
        self.records.purge_node(node).await
    }

    /// Loads the function library, clears what a previous run of this node left behind,
    /// subscribes to this node's channel and writes the first heartbeat.
    pub async fn start(&self) -> Result<(), StartError> {
        let fail = |e: BrokerError| StartError::Redis("registering the node", e);
        self.records.load_functions().await.map_err(fail)?;
        self.purge(&self.node_id).await.map_err(fail)?;
        self.records.subscribe().await.map_err(fail)?;
        self.beat().await.map_err(fail)
    }

    /// Elects the janitor through `elector` (a Kubernetes Lease) instead of the Redis lock.
    #[cfg_attr(not(feature = "kube"), allow(dead_code))]
    pub fn set_elector(&self, elector: Arc<dyn Elector>) {
        let _ = self.elector.set(elector);
    }

    fn has_left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }

    /// The heartbeat loop, with the maintenance task beside it (rebalancing not while
    /// `draining`), until `stop`.
    pub async fn run(self: Arc<Self>, draining: CancellationToken, stop: CancellationToken) {
        let maintenance = tokio::spawn(self.clone().maintain(draining, stop.clone()));
        let redis = self.records.redis().clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.heartbeat) => {}
                _ = stop.cancelled() => break,
            }
            if self.has_left() {
                break;
            }
            let attached_dirty = self
                .attached()
                .iter()
                .fold(false, |any, d| d.take_dirty() | any);
            let lost = redis.take_resync()
                | self.pending.dirty.swap(false, Ordering::AcqRel)
                | attached_dirty;
            let ok = self.beat().await.is_ok();
            redis.set_healthy(ok);
            if lost || !ok {
                self.resync_due.store(true, Ordering::Release);
            }
            if ok {
                self.beaten.notify_one();
            }
        }
        let _ = maintenance.await;
    }

    /// After each successful heartbeat: resync when due, a janitor pass and a rebalancing
    /// pass.
    async fn maintain(self: Arc<Self>, draining: CancellationToken, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.beaten.notified() => {}
                _ = stop.cancelled() => return,
            }
            tokio::select! {
                _ = self.pass(&draining) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn pass(&self, draining: &CancellationToken) {
        if self.has_left() {
            return;
        }
        if self.resync_due.swap(false, Ordering::AcqRel) {
            match self.resync().await {
                Ok(n) => tracing::info!(connections = n, "directory restored in Redis"),
                Err(e) => {
                    self.resync_due.store(true, Ordering::Release);
                    tracing::warn!(error = %e, "directory resync failed; retrying");
                }
            }
        }
        if let Err(e) = self.janitor().await {
            tracing::debug!(error = %e, "janitor pass failed");
        }
        if !draining.is_cancelled() {
            let redis = self.records.redis();
            if let Err(e) = self
                .rebalancer
                .pass(redis, self.records.keys(), &self.local)
                .await
            {
                tracing::debug!(error = %e, "rebalance pass failed");
            }
        }
    }

    /// Marks this node alive until now + ttl and publishes its connection count.
    pub async fn beat(&self) -> Result<(), BrokerError> {
        let (redis, keys) = (self.records.redis(), self.records.keys());
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(keys.nodes())
            .arg(now_ms() + self.ttl.as_millis() as u64)
            .arg(&self.node_id);
        let mut load = redis::cmd("HSET");
        load.arg(keys.load())
            .arg(&self.node_id)
            .arg(self.local.len());
        let (a, b) = tokio::join!(
            redis.call::<()>("heartbeat", zadd),
            redis.call::<()>("heartbeat", load)
        );
        a.and(b)
    }

    /// Reloads the functions, deletes the records of connections that closed during the
    /// outage, and re-registers every local connection, in batches. Returns how many it
    /// re-registered.
    pub async fn resync(&self) -> Result<usize, BrokerError> {
        self.records.load_functions().await?;
        let orphans = std::mem::take(&mut *self.pending.orphans());
        if let Err(e) = self.records.unregister_many(&orphans).await {
            // deleting twice is harmless: put them all back
            self.pending.orphans().extend(orphans);
            return Err(e);
        }
        let conns = self.local.snapshot();
        for chunk in conns.chunks(BATCH) {
            if self.has_left() {
                return Ok(0);
            }
            self.records.register_many(chunk).await?;
        }
        // A connection that closed after the snapshot may have deleted its records before
        // the batch above wrote them again: delete those once more.
        let closed: Vec<(String, Option<String>)> = conns
            .iter()
            .filter(|r| !self.local.contains(&r.conn))
            .map(|r| (r.conn.clone(), r.user.clone()))
            .collect();
        if let Err(e) = self.records.unregister_many(&closed).await {
            self.pending.orphans().extend(closed);
            return Err(e);
        }
        for data in self.attached() {
            if self.has_left() {
                return Ok(0);
            }
            data.resync().await?;
        }
        self.metrics.directory_ops.inc(["resync"]);
        Ok(conns.len())
    }

    /// One janitor pass, on the elected node: purges nodes whose liveness entry expired.
    async fn janitor(&self) -> Result<(), BrokerError> {
        let mine = match self.elector.get() {
            Some(e) => e.acquire().await,
            None => self.redis_lock().await?,
        };
        if !mine {
            return Ok(());
        }
        let mut dead = redis::cmd("ZRANGEBYSCORE");
        dead.arg(self.records.keys().nodes())
            .arg("-inf")
            .arg(now_ms());
        let dead: Vec<String> = self.records.redis().call("janitor", dead).await?;
        for node in dead.iter().filter(|n| **n != self.node_id) {
            let n = self.purge(node).await?;
            tracing::info!(node, routes = n, "purged the routes of a dead node");
        }
        Ok(())
    }

    /// The janitor lock in Redis: `SET <P>janitor <node> NX PX ttl`, renewed by its holder.
    async fn redis_lock(&self) -> Result<bool, BrokerError> {
        let redis = self.records.redis();
        let lock = self.records.keys().janitor();
        let mut take = redis::cmd("SET");
        take.arg(&lock)
            .arg(&self.node_id)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl.as_millis() as u64);
        let mine = redis
            .call::<Option<String>>("janitor", take)
            .await?
            .is_some()
            || {
                let mut get = redis::cmd("GET");
                get.arg(&lock);
                let holder: Option<String> = redis.call("janitor", get).await?;
                if holder.as_deref() == Some(&self.node_id) {
                    let mut extend = redis::cmd("PEXPIRE");
                    extend.arg(&lock).arg(self.ttl.as_millis() as u64);
                    redis.call::<()>("janitor", extend).await?;
                    true
                } else {
                    false
                }
            };
        Ok(mine)
    }

    /// Removes this node from the cluster's routing (graceful shutdown). Stops the
    /// heartbeat and any resync first, so that neither writes the node back.
    pub async fn leave(&self) {
        self.left.store(true, Ordering::Release);
        let _ = self.purge(&self.node_id).await;
    }
}
