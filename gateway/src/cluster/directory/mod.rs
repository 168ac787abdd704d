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
//!
//! The parts, by job:
//!
//! - [`local`]: the node's own connections, with a by-user index, and local delivery;
//! - [`backend`]: the [`Records`] trait, where connections are recorded for unicasts,
//!   disconnects and the per-user cap: [`LocalRecords`] (one node, no Redis) or
//!   [`RedisRecords`], chosen once here; held to [`conformance`];
//! - [`codec`]: the `D`/`K`/`U`/`E` messages on a node's channel;
//! - [`channels`]: each node's channel counts (with Redis only);
//! - [`liveness`]: heartbeat, resync and janitor (with Redis only);
//! - [`rebalance`]: load shedding after scale-out.

pub mod backend;
pub mod channels;
pub mod codec;
#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod liveness;
pub mod local;
pub mod rebalance;

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cluster::inbound::{Event, Inbound};
use crate::cluster::redis::Redis;
use crate::config::Config;
use crate::conn::outbound::Outbound;
use crate::error::{BrokerError, CloseReason, StartError};
use crate::metrics::Metrics;

pub use backend::{LocalRecords, Records, RedisRecords};
pub use channels::NodeLoad;
pub use liveness::{Elector, NodeData};
pub use local::{Emulation, LocalConns, Posted, SECRET_LEN};
pub use rebalance::jittered_ms;

/// One connection of a user, as listed by the admin API.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ConnInfo {
    pub conn_id: String,
    pub node_id: String,
    pub connected_ms: u64,
}

/// What [`Directory::post`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Post {
    /// In the inbox of a connection of this node.
    Local,
    /// Sent to the node that holds the connection.
    Forwarded,
    /// The connection's inbox is full.
    Full,
    /// No such session.
    Unknown,
}

/// A connection's records that [`Directory::add_unwritten`] left to be written with its
/// `connect` event ([`Directory::write_with`]).
pub struct Unwritten(Vec<redis::Cmd>);

/// Why a connection could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("this user already has the maximum number of connections")]
    UserLimit,
    #[error("the directory is unavailable: {0}")]
    Unavailable(#[from] BrokerError),
}

pub use crate::broker::BoxFuture;

/// Takes one of this node's connections off a channel: `(local id, connection id, channel,
/// its queue)`.
/// The directory routes a cluster-wide unsubscribe to the right node; what a subscription
/// is belongs to the layer above, which sets this (`Directory::set_unsubscriber`).
pub type Unsubscriber = Arc<dyn Fn(u64, &str, &str, &Arc<Outbound>) + Send + Sync>;

pub use crate::time::now_ms;

/// See the module docs.
pub struct Directory {
    local: Arc<LocalConns>,
    records: Arc<dyn Records>,
    /// With Redis only.
    liveness: Option<Arc<liveness::Liveness>>,
    pending: Arc<liveness::Pending>,
    /// With Redis only.
    channels: Option<Arc<channels::ChannelCounts>>,
    node_id: String,
    max_per_user: usize,
    metrics: Arc<Metrics>,
}

impl Directory {
    pub fn new(c: &Config, redis: Option<Arc<Redis>>, metrics: Arc<Metrics>) -> Arc<Directory> {
        let local = Arc::new(LocalConns::new(metrics.clone()));
        let pending = Arc::new(liveness::Pending::default());
        let (records, liveness, counts): (Arc<dyn Records>, _, _) = match redis {
            Some(redis) => {
                let counts = Arc::new(channels::ChannelCounts::new(redis.clone(), &c.node_id));
                let records = Arc::new(RedisRecords::new(
                    redis,
                    &c.node_id,
                    local.clone(),
                    metrics.clone(),
                ));
                let liveness = liveness::Liveness::new(
                    c,
                    records.clone(),
                    local.clone(),
                    pending.clone(),
                    metrics.clone(),
                );
                liveness.attach(counts.clone());
                (records, Some(Arc::new(liveness)), Some(counts))
            }
            None => (
                Arc::new(LocalRecords::new(&c.node_id, local.clone())) as Arc<dyn Records>,
                None,
                None,
            ),
        };
        Arc::new(Directory {
            local,
            records,
            liveness,
            pending,
            channels: counts,
            node_id: c.node_id.clone(),
            max_per_user: c.max_connections_per_user,
            metrics,
        })
    }

    fn count(&self, op: &'static str) {
        self.metrics.directory_ops.inc([op]);
    }

    /// Where this node's connections are recorded.
    #[cfg(any(test, feature = "test-util"))]
    pub fn records(&self) -> &Arc<dyn Records> {
        &self.records
    }

    /// This node's own connections.
    #[cfg(any(test, feature = "test-util"))]
    pub fn local(&self) -> &Arc<LocalConns> {
        &self.local
    }

    /// With Redis: loads the function library, clears what a previous run of this node left
    /// behind, subscribes to this node's channel and writes the first heartbeat.
    pub async fn start(&self) -> Result<(), StartError> {
        match &self.liveness {
            Some(l) => l.start().await,
            None => Ok(()),
        }
    }

    /// Registers a new connection of this node (`id`: its node-local id; `emulation`: a
    /// connection over an HTTP stream, whose client posts its commands). Fails only on the
    /// per-user cap, or when the cap cannot be checked because Redis is away. Without a cap,
    /// a connection opened during an outage is registered when Redis comes back.
    pub async fn add(
        &self,
        conn: &Arc<str>,
        id: u64,
        user: Option<&str>,
        out: Arc<Outbound>,
        emulation: Option<Emulation>,
    ) -> Result<(), AddError> {
        let connected_ms = now_ms();
        let capped = self.max_per_user > 0 && user.is_some();
        let secret = emulation.as_ref().map(|e| e.secret.as_str());
        match self
            .records
            .register(conn, user, connected_ms, self.max_per_user, secret)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(AddError::UserLimit),
            Err(e) if capped => return Err(e.into()),
            Err(_) => self.pending.mark_dirty(),
        }
        self.local
            .insert(conn.clone(), id, user, out, connected_ms, emulation);
        self.count("add");
        Ok(())
    }

    /// [`Directory::add`] for a connection without a per-user cap (anonymous, or no cap
    /// set), leaving its records in Redis to be written with its `connect` event, in one
    /// round trip ([`Directory::write_with`]). The connection is in this node's table at
    /// once. `Ok(None)`: nothing is left to write (a capped user, registered here as by
    /// `add`, or no Redis).
    pub async fn add_unwritten(
        &self,
        conn: &Arc<str>,
        id: u64,
        user: Option<&str>,
        out: Arc<Outbound>,
    ) -> Result<Option<Unwritten>, AddError> {
        let capped = self.max_per_user > 0 && user.is_some();
        let connected_ms = now_ms();
        let cmds = match capped {
            true => None,
            false => self.records.register_cmds(conn, user, connected_ms, None),
        };
        let Some(cmds) = cmds else {
            return self.add(conn, id, user, out, None).await.map(|()| None);
        };
        self.local
            .insert(conn.clone(), id, user, out, connected_ms, None);
        self.count("add");
        Ok(Some(Unwritten(cmds)))
    }

    /// Writes what [`Directory::add_unwritten`] left, then appends `event` for `conn` to the
    /// inbound stream: Redis runs them in that order, in one round trip where it can
    /// (`Inbound::lifecycle_after`). Records that were not written are written when Redis
    /// comes back, as an uncapped `add` during an outage is.
    pub async fn write_with(
        &self,
        unwritten: Unwritten,
        inbound: &Inbound,
        event: Event,
        conn: &str,
        user: Option<&str>,
        data: &str,
    ) {
        let written = inbound
            .lifecycle_after("add", unwritten.0, event, conn, user, data)
            .await;
        if !matches!(written, Some(Ok(()))) {
            self.pending.mark_dirty();
        }
    }

    /// [`Directory::remove`], then `event` appended to the inbound stream for `conn`: the
    /// deletion and the append go in one round trip where Redis allows, in that order.
    /// Records left undeleted are deleted when Redis comes back, as after `remove`.
    pub async fn remove_with(
        &self,
        conn: &str,
        inbound: &Inbound,
        event: Event,
        user: Option<&str>,
        data: &str,
    ) {
        let Some(local) = self.local.remove(conn) else {
            return inbound.lifecycle(event, conn, user, data).await;
        };
        self.count("remove");
        let Some(cmds) = self.records.unregister_cmds(conn, local.user.as_deref()) else {
            self.unregister(conn, local.user).await;
            return inbound.lifecycle(event, conn, user, data).await;
        };
        match inbound
            .lifecycle_after("remove", cmds, event, conn, user, data)
            .await
        {
            Some(Ok(())) => {}
            Some(Err(_)) => self.pending.orphan(conn, local.user),
            // No Redis for the inbound stream: the deletion runs on its own.
            None => self.unregister(conn, local.user).await,
        }
    }

    async fn unregister(&self, conn: &str, user: Option<String>) {
        if self
            .records
            .unregister(conn, user.as_deref())
            .await
            .is_err()
        {
            self.pending.orphan(conn, user);
        }
    }

    /// Hands commands posted with `session` (a streaming connection's secret, then its id)
    /// to that connection, on whichever node holds it. `Ok(None)`: no such session (unknown,
    /// closed, or the wrong secret); else whether it was held here and the inbox took it.
    pub async fn post(&self, session: &str, commands: String) -> Result<Post, BrokerError> {
        let (Some(secret), Some(conn)) = (session.get(..SECRET_LEN), session.get(SECRET_LEN..))
        else {
            return Ok(Post::Unknown);
        };
        if self.local.contains(conn) {
            return Ok(match self.local.post(conn, Some(secret), commands) {
                Posted::Queued => Post::Local,
                Posted::Full => Post::Full,
                Posted::Unknown => Post::Unknown,
            });
        }
        self.count("post");
        Ok(
            match self.records.forward_post(conn, secret, &commands).await? {
                true => Post::Forwarded,
                false => Post::Unknown,
            },
        )
    }

    /// Forgets a connection of this node (it closed).
    pub async fn remove(&self, conn: &str) {
        let Some(local) = self.local.remove(conn) else {
            return;
        };
        self.count("remove");
        self.unregister(conn, local.user).await;
    }

    /// Sends `{"type":"direct","data":data}` to every connection of `user`, on any node.
    /// Returns how many connections it reached.
    pub async fn send_user(&self, user: &str, data: &str) -> Result<u64, BrokerError> {
        self.count("send_user");
        self.records.send_user(user, data).await
    }

    /// Sends `{"type":"direct","data":data}` to one connection, on any node: 1 or 0.
    pub async fn send_conn(&self, conn: &str, data: &str) -> Result<u64, BrokerError> {
        self.count("send_conn");
        self.records.send_conn(conn, data).await
    }

    /// Closes one connection, on any node, with 4003. False when no such connection exists.
    pub async fn disconnect(&self, conn: &str) -> Result<bool, BrokerError> {
        self.count("disconnect");
        self.records.disconnect(conn).await
    }

    /// Lists a user's live connections, from any node.
    pub async fn user_connections(&self, user: &str) -> Result<Vec<ConnInfo>, BrokerError> {
        self.count("list");
        self.records.user_connections(user).await
    }

    /// Sets what [`Directory::unsubscribe`] does to a local connection. Set once.
    pub fn set_unsubscriber(&self, unsubscriber: Unsubscriber) {
        self.local.set_unsubscriber(unsubscriber);
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
        let Some(counts) = &self.channels else {
            let conns: Vec<String> = self
                .local
                .user_conns(user)
                .into_iter()
                .filter(|c| conn.is_none_or(|want| want == c))
                .collect();
            return Ok(self
                .local
                .unsubscribe(conns.iter().map(String::as_str), channel));
        };
        let mut by_node: HashMap<String, Vec<String>> = HashMap::new();
        for c in self.records.user_connections(user).await? {
            if conn.is_none_or(|want| want == c.conn_id) {
                by_node.entry(c.node_id).or_default().push(c.conn_id);
            }
        }
        let mut n = 0;
        for (node, conns) in by_node {
            let message = codec::NodeMessage::Unsubscribe {
                conns: conns.iter().map(String::as_str).collect(),
                channel,
            };
            let node_channel = counts.keys().node_channel(&node);
            counts
                .redis()
                .publish(&node_channel, &message.encode(), false)
                .await?;
            n += conns.len() as u64;
        }
        Ok(n)
    }

    /// Writes this node's channel counts to `<P>chans:{node}` (with Redis only). Called
    /// every heartbeat.
    pub async fn record_channels(
        &self,
        counts: impl FnOnce() -> Vec<(String, usize)>,
    ) -> Result<(), BrokerError> {
        match &self.channels {
            Some(c) => c.record(counts()).await,
            None => Ok(()),
        }
    }

    /// The cluster's channels with subscribers, and how many on all nodes together, from
    /// what each live node wrote at its last heartbeat. `None` without Redis: then the
    /// caller asks its own hub.
    pub async fn channels(&self) -> Result<Option<HashMap<String, u64>>, BrokerError> {
        match &self.channels {
            Some(c) => c.all().await.map(Some),
            None => Ok(None),
        }
    }

    /// The cluster's live nodes with their connection and channel counts (at their last
    /// heartbeat). Without Redis, this node alone, counted now.
    pub async fn nodes(&self, local_channels: u64) -> Result<Vec<NodeLoad>, BrokerError> {
        match &self.channels {
            Some(c) => c.nodes().await,
            None => Ok(vec![NodeLoad {
                node_id: self.node_id.clone(),
                connections: self.local_count() as u64,
                channels: local_channels,
            }]),
        }
    }

    /// The distinct users among this node's connections.
    pub fn local_users(&self) -> usize {
        self.local.users()
    }

    /// Connections held by this node.
    pub fn local_count(&self) -> usize {
        self.local.len()
    }

    /// Closes up to `n` of this node's connections, oldest first, with the reason `why`
    /// gives each, by `deadline` at the latest. Returns how many it closed. See
    /// [`LocalConns::close_oldest`].
    pub fn close_oldest(
        &self,
        n: usize,
        why: impl Fn() -> CloseReason,
        deadline: Option<tokio::time::Instant>,
    ) -> usize {
        self.local.close_oldest(n, why, deadline)
    }

    /// Heartbeat, resync after an outage, the janitor and rebalancing (not while
    /// `draining`), until `stop`. Returns at once without Redis.
    pub async fn run(self: Arc<Self>, draining: CancellationToken, stop: CancellationToken) {
        if let Some(l) = self.liveness.clone() {
            l.run(draining, stop).await;
        }
    }

    /// Re-registers every local connection in Redis now, as after an outage; returns how
    /// many. For tests and tools; the heartbeat schedules this by itself.
    #[cfg(any(test, feature = "test-util"))]
    pub async fn resync(&self) -> Result<usize, BrokerError> {
        match &self.liveness {
            Some(l) => l.resync().await,
            None => Ok(0),
        }
    }

    /// Purges `data` with this node's routes when the node dies, and writes it again in the
    /// resync after an outage (with Redis only). Attach before [`Directory::start`].
    pub fn attach(&self, data: Arc<dyn NodeData>) {
        if let Some(l) = &self.liveness {
            l.attach(data);
        }
    }

    /// Elects the janitor through `elector` (a Kubernetes Lease) instead of the Redis lock.
    pub fn set_elector(&self, elector: Arc<dyn Elector>) {
        if let Some(l) = &self.liveness {
            l.set_elector(elector);
        }
    }

    /// Removes this node from the cluster's routing (graceful shutdown).
    pub async fn leave(&self) {
        if let Some(l) = &self.liveness {
            l.leave().await;
        }
    }
}
