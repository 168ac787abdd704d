//! The connection directory: which user and which connection lives on which node.
//!
//! Every node keeps its own connections in a local map (the only place that holds their
//! outbound queues). With Redis, it also records them there, so that any node, or any backend
//! with a Redis client, can reach them without asking every node:
//!
//! - `<P>user:{user}` hash `conn → "node connected_ms"`: unicast to a user, per-user cap;
//! - `<P>conn:{conn}` string `"node connected_ms user"`: unicast to and disconnect of one
//!   connection;
//! - `<P>nodeconns:{node}` hash `conn → user`: what to purge when that node dies;
//! - `<P>nodes` sorted set `node → expiry_ms`: liveness, refreshed every heartbeat.
//! - `<P>load` hash `node → connections`, and `<P>chans:{node}` hash `channel →
//!   subscribers`: each node's share, written every heartbeat (the server API's `info` and
//!   `channels`, rebalancing).
//!
//! Delivery goes through the node's own channel `<P>node:<node>` (see `directory.lua`), so a
//! unicast costs one `FCALL` and one `PUBLISH` per node that holds the user's connections.
//!
//! A node that dies without cleaning up (`kill -9`) stops refreshing its liveness entry; the
//! janitor (one node at a time, elected by a Redis lock) purges its routes once the entry is
//! older than `node_ttl_ms`. A node that loses Redis keeps serving its local connections and,
//! when Redis is back, reloads the functions and re-registers every local connection (Redis
//! may have restarted empty).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::redis::Redis;
use crate::config::Config;
use crate::conn::event::{Encoded, Event};
use crate::conn::outbound::{Outbound, Pushed};
use crate::error::{BrokerError, CloseReason, StartError};
use crate::metrics::Metrics;

const LIBRARY: &str = include_str!("directory.lua");

/// A connection held by this node.
struct Local {
    /// The node-local id (the hub's `ConnId`).
    id: u64,
    out: Arc<Outbound>,
    user: Option<String>,
    connected_ms: u64,
}

/// One connection of a user, as listed by the admin API.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ConnInfo {
    pub conn_id: String,
    pub node_id: String,
    pub connected_ms: u64,
}

/// Why a connection could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("this user already has the maximum number of connections")]
    UserLimit,
    #[error("the directory is unavailable: {0}")]
    Unavailable(#[from] BrokerError),
}

/// Load shedding after scale-out; see [`Directory::rebalance`].
struct Rebalance {
    slack: f64,
    /// Most connections shed per heartbeat (from `rebalance_rate`).
    per_beat: usize,
    /// No shedding before this time: after a round, the shed clients need a few heartbeats
    /// to land on other nodes and show in their counts, or this node would shed on stale
    /// figures and overshoot.
    quiet_until_ms: std::sync::atomic::AtomicU64,
}

/// A reconnect hint: a random delay, so that clients told to leave at the same moment do not
/// come back at the same moment.
pub fn jittered_ms(min: u64, max: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    min + r % (max.saturating_sub(min) + 1)
}

pub use crate::broker::BoxFuture;

/// Takes one of this node's connections off a channel: `(local id, channel, its queue)`.
/// The directory routes a cluster-wide unsubscribe to the right node; what a subscription
/// is belongs to the layer above, which sets this (`Directory::set_unsubscriber`).
pub type Unsubscriber = Arc<dyn Fn(u64, &str, &Arc<Outbound>) + Send + Sync>;

/// One live node of the cluster, as the heartbeats describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    pub node_id: String,
    pub connections: u64,
    /// Channels with subscribers on that node.
    pub channels: u64,
}

/// Picks the one node that runs the janitor. Without one, a Redis lock does.
pub trait Elector: Send + Sync {
    /// Takes or renews leadership; true while this node leads.
    fn acquire(&self) -> BoxFuture<'_, bool>;
}

/// See the module docs.
pub struct Directory {
    node_id: String,
    redis: Option<Arc<Redis>>,
    local: Mutex<HashMap<String, Local>>,
    max_per_user: usize,
    heartbeat: Duration,
    ttl: Duration,
    /// A registration failed while Redis was away: re-register everything on the next beat.
    dirty: AtomicBool,
    /// Connections that closed while Redis was away, whose records are still to delete
    /// (Redis may have kept them), as `(conn, user)`.
    orphans: Mutex<Vec<(String, Option<String>)>>,
    rebalance: Option<Rebalance>,
    elector: std::sync::OnceLock<Arc<dyn Elector>>,
    unsubscriber: std::sync::OnceLock<Unsubscriber>,
    /// This node's channel counts as last written to `<P>chans:{node}`.
    channels_written: Mutex<HashMap<String, u64>>,
    metrics: Arc<Metrics>,
}

/// A Redis command from the argument list of a `shared::backend` call, so that the
/// gateway and Rust backends use the same function names.
fn command(args: [&str; 5]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    cmd.arg(&args[1..]);
    cmd
}

pub use crate::time::now_ms;

impl Directory {
    pub fn new(c: &Config, redis: Option<Arc<Redis>>, metrics: Arc<Metrics>) -> Arc<Directory> {
        let dir = Arc::new(Directory {
            node_id: c.node_id.clone(),
            redis,
            local: Mutex::new(HashMap::new()),
            max_per_user: c.max_connections_per_user,
            heartbeat: Duration::from_millis(c.node_heartbeat_ms),
            ttl: Duration::from_millis(c.node_ttl_ms),
            dirty: AtomicBool::new(false),
            orphans: Mutex::new(Vec::new()),
            elector: std::sync::OnceLock::new(),
            unsubscriber: std::sync::OnceLock::new(),
            channels_written: Mutex::new(HashMap::new()),
            rebalance: c.rebalance.then_some(Rebalance {
                slack: c.rebalance_slack,
                per_beat: ((c.rebalance_rate as u64 * c.node_heartbeat_ms) / 1000).max(1) as usize,
                quiet_until_ms: Default::default(),
            }),
            metrics,
        });
        if let Some(redis) = &dir.redis {
            let weak: Weak<Directory> = Arc::downgrade(&dir);
            let channel = crate::cluster::redis::node_channel(&redis.prefix, &dir.node_id);
            redis.route(
                &channel,
                Arc::new(move |rest: &[u8], payload: &[u8]| {
                    if let Some(dir) = weak.upgrade().filter(|_| rest.is_empty()) {
                        dir.on_node_message(payload);
                    }
                }),
            );
        }
        dir
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, Local>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, kind: &str, id: &str) -> String {
        let p = self.redis.as_ref().map_or("", |r| r.prefix.as_str());
        format!("{p}{kind}:{{{id}}}")
    }

    fn count(&self, op: &'static str) {
        self.metrics.directory_ops.inc([op]);
    }

    /// Loads the function library, clears what a previous run of this node left behind,
    /// subscribes to this node's channel and writes the first heartbeat.
    pub async fn start(&self) -> Result<(), StartError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let fail = |e: BrokerError| StartError::Redis("registering the node", e);
        self.load_functions(redis).await.map_err(fail)?;
        self.purge_node(redis, &self.node_id).await.map_err(fail)?;
        redis
            .subscribe(
                &crate::cluster::redis::node_channel(&redis.prefix, &self.node_id),
                false,
            )
            .await
            .map_err(fail)?;
        self.beat(redis).await.map_err(fail)
    }

    async fn load_functions(&self, redis: &Redis) -> Result<(), BrokerError> {
        let code = LIBRARY.replace("__PREFIX__", &redis.prefix).replace(
            "__CLUSTER__",
            if redis.is_cluster() { "true" } else { "false" },
        );
        redis.add_library(code).await?;
        // Every library, the broker's too: after an outage Redis may have lost them all.
        redis.load_libraries().await
    }

    /// Registers a new connection of this node (`id`: its node-local id). Fails only on the
    /// per-user cap, or when the cap cannot be checked because Redis is away. Without a cap,
    /// a connection opened during an outage is registered when Redis comes back.
    pub async fn add(
        &self,
        conn: &str,
        id: u64,
        user: Option<&str>,
        out: Arc<Outbound>,
    ) -> Result<(), AddError> {
        let connected_ms = now_ms();
        let capped = self.max_per_user > 0 && user.is_some();
        match (&self.redis, user) {
            (None, Some(u)) if capped => {
                let held = self
                    .local()
                    .values()
                    .filter(|l| l.user.as_deref() == Some(u))
                    .count();
                if held >= self.max_per_user {
                    return Err(AddError::UserLimit);
                }
            }
            (Some(redis), _) => {
                match self.register(redis, conn, user, connected_ms, capped).await {
                    Ok(true) => {}
                    Ok(false) => return Err(AddError::UserLimit),
                    Err(e) if capped => return Err(e.into()),
                    Err(_) => self.dirty.store(true, Ordering::Release),
                }
            }
            _ => {}
        }
        self.local().insert(
            conn.to_owned(),
            Local {
                id,
                out,
                user: user.map(str::to_owned),
                connected_ms,
            },
        );
        self.count("add");
        Ok(())
    }

    /// Writes one connection's records. `Ok(false)`: the user is at the cap.
    async fn register(
        &self,
        redis: &Redis,
        conn: &str,
        user: Option<&str>,
        connected_ms: u64,
        capped: bool,
    ) -> Result<bool, BrokerError> {
        if let Some(u) = user {
            let mut add = redis::cmd("FCALL");
            add.arg("gw_add_conn")
                .arg(1)
                .arg(u)
                .arg(conn)
                .arg(&self.node_id)
                .arg(connected_ms)
                .arg(if capped { self.max_per_user } else { 0 });
            if redis.call::<i64>("add", add).await? == 0 {
                return Ok(false);
            }
        }
        let mut set = redis::cmd("SET");
        set.arg(self.key("conn", conn)).arg(format!(
            "{} {connected_ms} {}",
            self.node_id,
            user.unwrap_or("-")
        ));
        let mut own = redis::cmd("HSET");
        own.arg(self.key("nodeconns", &self.node_id))
            .arg(conn)
            .arg(user.unwrap_or("-"));
        let (a, b) = tokio::join!(redis.call::<()>("add", set), redis.call::<()>("add", own));
        a.and(b).map(|_| true)
    }

    /// Forgets a connection of this node (it closed).
    pub async fn remove(&self, conn: &str) {
        let Some(local) = self.local().remove(conn) else {
            return;
        };
        self.count("remove");
        let Some(redis) = &self.redis else { return };
        if self
            .unregister(redis, conn, local.user.as_deref())
            .await
            .is_err()
        {
            self.orphans
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((conn.to_owned(), local.user));
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Deletes one connection's records.
    async fn unregister(
        &self,
        redis: &Redis,
        conn: &str,
        user: Option<&str>,
    ) -> Result<(), BrokerError> {
        let mut del = redis::cmd("DEL");
        del.arg(self.key("conn", conn));
        let mut own = redis::cmd("HDEL");
        own.arg(self.key("nodeconns", &self.node_id)).arg(conn);
        let by_user = async {
            match user {
                Some(u) => {
                    let mut hdel = redis::cmd("HDEL");
                    hdel.arg(self.key("user", u)).arg(conn);
                    redis.call::<()>("remove", hdel).await
                }
                None => Ok(()),
            }
        };
        let (a, b, c) = tokio::join!(
            redis.call::<()>("remove", del),
            redis.call::<()>("remove", own),
            by_user
        );
        a.and(b).and(c)
    }

    /// Sends `{"type":"direct","data":data}` to every connection of `user`, on any node.
    /// Returns how many connections it reached.
    pub async fn send_user(&self, user: &str, data: &str) -> Result<u64, BrokerError> {
        self.count("send_user");
        match &self.redis {
            Some(redis) => {
                redis
                    .call("send_user", command(shared::backend::send_user(user, data)))
                    .await
            }
            None => {
                let conns: Vec<String> = self
                    .local()
                    .iter()
                    .filter(|(_, l)| l.user.as_deref() == Some(user))
                    .map(|(c, _)| c.clone())
                    .collect();
                Ok(self.deliver(conns.iter().map(String::as_str), data))
            }
        }
    }

    /// Sends `{"type":"direct","data":data}` to one connection, on any node: 1 or 0.
    pub async fn send_conn(&self, conn: &str, data: &str) -> Result<u64, BrokerError> {
        self.count("send_conn");
        match &self.redis {
            Some(redis) => {
                redis
                    .call("send_conn", command(shared::backend::send_conn(conn, data)))
                    .await
            }
            None => Ok(self.deliver(std::iter::once(conn), data)),
        }
    }

    /// Closes one connection, on any node, with 4003. False when no such connection exists.
    pub async fn disconnect(&self, conn: &str) -> Result<bool, BrokerError> {
        self.count("disconnect");
        let Some(redis) = &self.redis else {
            return Ok(self.kick(conn));
        };
        let mut get = redis::cmd("GET");
        get.arg(self.key("conn", conn));
        let Some(entry) = redis.call::<Option<String>>("disconnect", get).await? else {
            return Ok(false);
        };
        let node = entry.split(' ').next().unwrap_or_default();
        let channel = crate::cluster::redis::node_channel(&redis.prefix, node);
        redis
            .publish(&channel, &format!("K {conn}\n"), false)
            .await?;
        Ok(true)
    }

    /// Sets what [`Directory::unsubscribe`] does to a local connection. Set once.
    pub fn set_unsubscriber(&self, unsubscriber: Unsubscriber) {
        let _ = self.unsubscriber.set(unsubscriber);
    }

    /// Unsubscribes `user`'s connections (only `conn`, when given and the user's) from
    /// `channel`, on whichever nodes hold them. Returns how many connections were asked.
    pub async fn unsubscribe(
        &self,
        user: &str,
        conn: Option<&str>,
        channel: &str,
    ) -> Result<u64, BrokerError> {
        self.count("unsubscribe");
        let Some(redis) = &self.redis else {
            let ids: Vec<String> = self
                .local()
                .iter()
                .filter(|(c, l)| {
                    l.user.as_deref() == Some(user) && conn.is_none_or(|want| want == c.as_str())
                })
                .map(|(c, _)| c.clone())
                .collect();
            self.unsubscribe_local(ids.iter().map(String::as_str), channel);
            return Ok(ids.len() as u64);
        };
        let mut by_node: HashMap<String, Vec<String>> = HashMap::new();
        for c in self.user_connections(user).await? {
            if conn.is_none_or(|want| want == c.conn_id) {
                by_node.entry(c.node_id).or_default().push(c.conn_id);
            }
        }
        let mut n = 0;
        for (node, conns) in by_node {
            let channel_name = crate::cluster::redis::node_channel(&redis.prefix, &node);
            let message = format!("U {}\n{channel}", conns.join(" "));
            redis.publish(&channel_name, &message, false).await?;
            n += conns.len() as u64;
        }
        Ok(n)
    }

    fn unsubscribe_local<'a>(&self, conns: impl Iterator<Item = &'a str>, channel: &str) {
        let Some(unsubscribe) = self.unsubscriber.get() else {
            return;
        };
        let local = self.local();
        for conn in conns {
            if let Some(l) = local.get(conn) {
                unsubscribe(l.id, channel, &l.out);
            }
        }
    }

    /// Writes this node's channel counts to `<P>chans:{node}`: only what changed since the
    /// last write, so a quiet node costs nothing. Called every heartbeat.
    pub async fn record_channels(
        &self,
        counts: impl FnOnce() -> Vec<(String, usize)>,
    ) -> Result<(), BrokerError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let now: HashMap<String, u64> = counts().into_iter().map(|(c, n)| (c, n as u64)).collect();
        let (changed, gone) = {
            let written = self
                .channels_written
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let changed: Vec<(&String, &u64)> = now
                .iter()
                .filter(|(c, n)| written.get(*c) != Some(n))
                .collect();
            let gone: Vec<String> = written
                .keys()
                .filter(|c| !now.contains_key(*c))
                .cloned()
                .collect();
            (
                changed
                    .into_iter()
                    .map(|(c, n)| (c.clone(), *n))
                    .collect::<Vec<_>>(),
                gone,
            )
        };
        let key = self.key("chans", &self.node_id);
        for chunk in changed.chunks(256) {
            let mut hset = redis::cmd("HSET");
            hset.arg(&key);
            for (c, n) in chunk {
                hset.arg(c).arg(n);
            }
            redis.call::<()>("heartbeat", hset).await?;
        }
        for chunk in gone.chunks(256) {
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(&key).arg(chunk);
            redis.call::<()>("heartbeat", hdel).await?;
        }
        *self
            .channels_written
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = now;
        Ok(())
    }

    /// The cluster's channels with subscribers, and how many on all nodes together, from
    /// what each live node wrote at its last heartbeat. `None` without Redis: then the
    /// caller asks its own hub.
    pub async fn channels(&self) -> Result<Option<HashMap<String, u64>>, BrokerError> {
        let Some(redis) = &self.redis else {
            return Ok(None);
        };
        let mut all: HashMap<String, u64> = HashMap::new();
        for (node, _) in self.cluster_load(redis).await? {
            let mut get = redis::cmd("HGETALL");
            get.arg(self.key("chans", &node));
            let counts: HashMap<String, u64> = redis.call("list", get).await?;
            for (c, n) in counts {
                *all.entry(c).or_default() += n;
            }
        }
        Ok(Some(all))
    }

    /// The cluster's live nodes with their connection and channel counts (at their last
    /// heartbeat). Without Redis, this node alone, counted now.
    pub async fn nodes(&self, local_channels: u64) -> Result<Vec<NodeLoad>, BrokerError> {
        let Some(redis) = &self.redis else {
            return Ok(vec![NodeLoad {
                node_id: self.node_id.clone(),
                connections: self.local_count() as u64,
                channels: local_channels,
            }]);
        };
        let mut out = Vec::new();
        for (node_id, connections) in self.cluster_load(redis).await? {
            let mut len = redis::cmd("HLEN");
            len.arg(self.key("chans", &node_id));
            let channels: u64 = redis.call("list", len).await?;
            out.push(NodeLoad {
                node_id,
                connections,
                channels,
            });
        }
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(out)
    }

    /// The distinct users among this node's connections.
    pub fn local_users(&self) -> usize {
        let local = self.local();
        let users: std::collections::HashSet<&str> =
            local.values().filter_map(|l| l.user.as_deref()).collect();
        users.len()
    }

    /// Lists a user's live connections, from any node.
    pub async fn user_connections(&self, user: &str) -> Result<Vec<ConnInfo>, BrokerError> {
        self.count("list");
        let Some(redis) = &self.redis else {
            let mut v: Vec<ConnInfo> = self
                .local()
                .iter()
                .filter(|(_, l)| l.user.as_deref() == Some(user))
                .map(|(c, l)| ConnInfo {
                    conn_id: c.clone(),
                    node_id: self.node_id.clone(),
                    connected_ms: l.connected_ms,
                })
                .collect();
            v.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
            return Ok(v);
        };
        let mut all = redis::cmd("HGETALL");
        all.arg(self.key("user", user));
        let entries: HashMap<String, String> = redis.call("list", all).await?;
        let mut live: HashMap<String, bool> = HashMap::new();
        let mut out = Vec::new();
        for (conn_id, entry) in entries {
            let mut parts = entry.split(' ');
            let node_id = parts.next().unwrap_or_default().to_owned();
            let connected_ms = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
            if !live.contains_key(&node_id) {
                let mut score = redis::cmd("ZSCORE");
                score.arg(format!("{}nodes", redis.prefix)).arg(&node_id);
                let expiry: Option<f64> = redis.call("list", score).await?;
                live.insert(node_id.clone(), expiry.is_some_and(|e| e as u64 > now_ms()));
            }
            if live[&node_id] {
                out.push(ConnInfo {
                    conn_id,
                    node_id,
                    connected_ms,
                });
            }
        }
        out.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
        Ok(out)
    }

    /// Queues a direct frame, encoded once, to local connections. Returns how many got it.
    fn deliver<'a>(&self, conns: impl Iterator<Item = &'a str>, data: &str) -> u64 {
        let mut encoded = Encoded::new(Event::Direct { data });
        let local = self.local();
        let mut n = 0;
        for conn in conns {
            if let Some(l) = local.get(conn) {
                match l.out.push(encoded.bytes(l.out.codec())) {
                    Pushed::Queued => n += 1,
                    Pushed::Overflowed => self.metrics.slow_consumer_disconnects.inc([]),
                    Pushed::Closing => {}
                }
            }
        }
        self.metrics.hot.deliveries.fetch_add(n, Ordering::Relaxed);
        n
    }

    fn kick(&self, conn: &str) -> bool {
        match self.local().get(conn) {
            Some(l) => {
                l.out.close(CloseReason::Disconnected);
                true
            }
            None => false,
        }
    }

    /// A message on this node's channel: `D conns\njson`, `K conn\n` or
    /// `U conns\nchannel` (unsubscribe those connections from the channel).
    fn on_node_message(&self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let (head, body) = text.split_once('\n').unwrap_or((text, ""));
        match head.split_once(' ') {
            Some(("D", conns)) => match shared::protocol::check_data(body) {
                Ok(()) => {
                    self.deliver(conns.split(' '), body);
                }
                Err(why) => {
                    self.metrics.broker_dropped.inc([]);
                    tracing::warn!(why, "dropped a unicast published on Redis");
                }
            },
            Some(("K", conn)) => {
                self.kick(conn);
            }
            Some(("U", conns)) if shared::channel::is_valid(body) => {
                self.unsubscribe_local(conns.split(' '), body);
            }
            _ => tracing::debug!(head, "unknown node message"),
        }
    }

    /// Connections held by this node.
    pub fn local_count(&self) -> usize {
        self.local().len()
    }

    /// Closes up to `n` of this node's connections, oldest first, with the reason `why`
    /// gives each. Returns how many it closed. Oldest first because a connection that has
    /// just arrived (perhaps just shed by another node) should not be bounced again.
    pub fn close_oldest(&self, n: usize, why: impl Fn() -> CloseReason) -> usize {
        let local = self.local();
        let mut open: Vec<(&u64, &Arc<Outbound>)> = local
            .values()
            .filter(|l| !l.out.is_closing())
            .map(|l| (&l.connected_ms, &l.out))
            .collect();
        open.sort_by_key(|(at, _)| **at);
        for (_, out) in open.iter().take(n) {
            out.close(why());
        }
        n.min(open.len())
    }

    /// Heartbeat, resync after an outage, the janitor and rebalancing (not while
    /// `draining`), until `stop`.
    pub async fn run(self: Arc<Self>, draining: CancellationToken, stop: CancellationToken) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        let mut resync = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.heartbeat) => {}
                _ = stop.cancelled() => return,
            }
            resync |= redis.take_resync() | self.dirty.swap(false, Ordering::AcqRel);
            let ok = self.beat(&redis).await.is_ok();
            resync |= !ok;
            redis.set_healthy(ok);
            if !ok {
                continue;
            }
            if resync {
                match self.resync(&redis).await {
                    Ok(n) => {
                        resync = false;
                        tracing::info!(connections = n, "directory restored in Redis");
                    }
                    Err(e) => tracing::warn!(error = %e, "directory resync failed; retrying"),
                }
            }
            if let Err(e) = self.janitor(&redis).await {
                tracing::debug!(error = %e, "janitor pass failed");
            }
            if !draining.is_cancelled() {
                if let Err(e) = self.rebalance(&redis).await {
                    tracing::debug!(error = %e, "rebalance pass failed");
                }
            }
        }
    }

    /// Marks this node alive until now + ttl and publishes its connection count.
    async fn beat(&self, redis: &Redis) -> Result<(), BrokerError> {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(format!("{}nodes", redis.prefix))
            .arg(now_ms() + self.ttl.as_millis() as u64)
            .arg(&self.node_id);
        let mut load = redis::cmd("HSET");
        load.arg(format!("{}load", redis.prefix))
            .arg(&self.node_id)
            .arg(self.local_count());
        let (a, b) = tokio::join!(
            redis.call::<()>("heartbeat", zadd),
            redis.call::<()>("heartbeat", load)
        );
        a.and(b)
    }

    /// The cluster's live nodes and their connection counts.
    async fn cluster_load(&self, redis: &Redis) -> Result<Vec<(String, u64)>, BrokerError> {
        let mut live = redis::cmd("ZRANGEBYSCORE");
        live.arg(format!("{}nodes", redis.prefix))
            .arg(now_ms())
            .arg("+inf");
        let live: Vec<String> = redis.call("heartbeat", live).await?;
        let mut all = redis::cmd("HGETALL");
        all.arg(format!("{}load", redis.prefix));
        let load: HashMap<String, u64> = redis.call("heartbeat", all).await?;
        Ok(live
            .into_iter()
            .map(|n| {
                let c = load.get(&n).copied().unwrap_or(0);
                (n, c)
            })
            .collect())
    }

    /// After scale-out, long-lived sockets stay on the old nodes. A node above the cluster
    /// mean by more than the slack closes its excess with 1013 and a reconnect hint, at most
    /// `per_beat` per round and then quiet for three heartbeats, so the load balancer moves
    /// them to the new nodes gradually and the figures settle before the next round.
    async fn rebalance(&self, redis: &Redis) -> Result<(), BrokerError> {
        let load = self.cluster_load(redis).await?;
        let total: u64 = load.iter().map(|(_, c)| c).sum();
        let nodes = load.len().max(1) as u64;
        self.metrics.cluster_connections.record(total, &[]);
        self.metrics.cluster_nodes.record(nodes, &[]);
        let Some(r) = &self.rebalance else {
            return Ok(());
        };
        if now_ms() < r.quiet_until_ms.load(Ordering::Acquire) {
            return Ok(());
        }
        let mine = self.local_count() as f64;
        let limit = (total as f64 / nodes as f64 * (1.0 + r.slack)).ceil();
        if nodes < 2 || mine <= limit {
            return Ok(());
        }
        let excess = (mine - limit) as usize;
        let shed = self.close_oldest(excess.min(r.per_beat), || {
            CloseReason::Rebalance(jittered_ms(500, 5_000))
        });
        if shed > 0 {
            r.quiet_until_ms.store(
                now_ms() + 3 * self.heartbeat.as_millis() as u64,
                Ordering::Release,
            );
            self.metrics.rebalance_shed.add([], shed as u64);
            tracing::info!(
                shed,
                mine,
                limit,
                nodes,
                total,
                "shedding connections to rebalance"
            );
        }
        Ok(())
    }

    /// Reloads the functions, deletes the records of connections that closed during the
    /// outage, and re-registers every local connection.
    async fn resync(&self, redis: &Redis) -> Result<usize, BrokerError> {
        self.load_functions(redis).await?;
        // Redis may have lost the channel counts: the next heartbeat writes them all.
        self.channels_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let orphans = std::mem::take(&mut *self.orphans.lock().unwrap_or_else(|p| p.into_inner()));
        for (i, (conn, user)) in orphans.iter().enumerate() {
            if let Err(e) = self.unregister(redis, conn, user.as_deref()).await {
                self.orphans
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(orphans[i..].iter().cloned());
                return Err(e);
            }
        }
        let conns: Vec<(String, Option<String>, u64)> = self
            .local()
            .iter()
            .map(|(c, l)| (c.clone(), l.user.clone(), l.connected_ms))
            .collect();
        for (conn, user, at) in &conns {
            self.register(redis, conn, user.as_deref(), *at, false)
                .await?;
        }
        self.count("resync");
        Ok(conns.len())
    }

    /// Elects the janitor through `elector` (a Kubernetes Lease) instead of the Redis lock.
    #[cfg_attr(not(feature = "kube"), allow(dead_code))]
    pub fn set_elector(&self, elector: Arc<dyn Elector>) {
        let _ = self.elector.set(elector);
    }

    /// One janitor pass, on the elected node: purges nodes whose liveness entry expired.
    async fn janitor(&self, redis: &Redis) -> Result<(), BrokerError> {
        let mine = match self.elector.get() {
            Some(e) => e.acquire().await,
            None => self.redis_lock(redis).await?,
        };
        if !mine {
            return Ok(());
        }
        let mut dead = redis::cmd("ZRANGEBYSCORE");
        dead.arg(format!("{}nodes", redis.prefix))
            .arg("-inf")
            .arg(now_ms());
        let dead: Vec<String> = redis.call("janitor", dead).await?;
        for node in dead.iter().filter(|n| **n != self.node_id) {
            let n = self.purge_node(redis, node).await?;
            tracing::info!(node, routes = n, "purged the routes of a dead node");
        }
        Ok(())
    }

    /// The janitor lock in Redis: `SET <P>janitor <node> NX PX ttl`, renewed by its holder.
    async fn redis_lock(&self, redis: &Redis) -> Result<bool, BrokerError> {
        let lock = format!("{}janitor", redis.prefix);
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

    /// Deletes every route of `node` and its liveness entry. Returns how many connections
    /// it had.
    async fn purge_node(&self, redis: &Redis, node: &str) -> Result<usize, BrokerError> {
        let own_key = self.key("nodeconns", node);
        let mut all = redis::cmd("HGETALL");
        all.arg(&own_key);
        let conns: HashMap<String, String> = redis.call("purge", all).await?;
        for (conn, user) in &conns {
            if user != "-" {
                let mut hdel = redis::cmd("HDEL");
                hdel.arg(self.key("user", user)).arg(conn);
                redis.call::<()>("purge", hdel).await?;
            }
            let mut del = redis::cmd("DEL");
            del.arg(self.key("conn", conn));
            redis.call::<()>("purge", del).await?;
        }
        let mut del = redis::cmd("DEL");
        del.arg(&own_key);
        redis.call::<()>("purge", del).await?;
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(format!("{}nodes", redis.prefix)).arg(node);
        redis.call::<()>("purge", zrem).await?;
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(format!("{}load", redis.prefix)).arg(node);
        redis.call::<()>("purge", hdel).await?;
        let mut del = redis::cmd("DEL");
        del.arg(self.key("chans", node));
        redis.call::<()>("purge", del).await?;
        if node == self.node_id {
            self.channels_written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        self.metrics
            .directory_ops
            .add(["purge"], conns.len() as u64);
        Ok(conns.len())
    }

    /// Removes this node from the cluster's routing (graceful shutdown).
    pub async fn leave(&self) {
        if let Some(redis) = &self.redis {
            let _ = self.purge_node(redis, &self.node_id).await;
        }
    }
}
