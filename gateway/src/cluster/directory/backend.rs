//! Where a node records its connections so that unicasts, disconnects and the per-user cap
//! work across nodes: [`Records`], chosen once when the directory is built.
//!
//! - [`LocalRecords`]: a single node without Redis. The local registry is the record, and
//!   the cap is per node.
//! - [`RedisRecords`]: the keys of the module docs of [`super`] and the functions of
//!   `directory.lua`. Unicasts are routed by `FCALL` and reach the nodes through their
//!   channels, where [`RedisRecords::new`] hands them to the local registry.
//!
//! Every implementation must pass [`super::conformance`].

use std::collections::HashMap;
use std::sync::Arc;

use super::codec::{DecodeError, NodeMessage};
use super::local::{LocalConns, Record};
use super::{now_ms, BoxFuture, ConnInfo};
use crate::cluster::keys::Keys;
use crate::cluster::redis::Redis;
use crate::error::BrokerError;
use crate::metrics::Metrics;

const LIBRARY: &str = include_str!("directory.lua");

/// Connections per batch when many records are written or deleted at once (resync, purge):
/// a few hundred commands per round trip, and no batch long enough to hold up a heartbeat
/// that shares the connection.
pub const BATCH: usize = 500;

/// See the module docs. The local registry is the caller's: a connection enters it after
/// [`Records::register`] accepted it and leaves it before [`Records::unregister`].
pub trait Records: Send + Sync {
    /// Records a new connection of this node. `Ok(false)`, recording nothing: `user`
    /// already holds `max_per_user` connections (0: no cap). Anonymous connections (`user`
    /// `None`) are never capped. `secret`: a streaming connection's, which a post to
    /// another node must show.
    fn register<'a>(
        &'a self,
        conn: &'a str,
        user: Option<&'a str>,
        connected_ms: u64,
        max_per_user: usize,
        secret: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// The Redis commands that record an uncapped connection ([`Records::register`] with
    /// `max_per_user` 0), for a caller that sends them in a pipeline of its own, ahead of
    /// its own commands. `None`: this backend records nothing in Redis.
    fn register_cmds(
        &self,
        _conn: &str,
        _user: Option<&str>,
        _connected_ms: u64,
        _secret: Option<&str>,
    ) -> Option<Vec<redis::Cmd>> {
        None
    }

    /// The Redis commands of [`Records::unregister`], as [`Records::register_cmds`].
    fn unregister_cmds(&self, _conn: &str, _user: Option<&str>) -> Option<Vec<redis::Cmd>> {
        None
    }

    /// Sends commands posted for a streaming connection that this node does not hold to the
    /// node that does, if `secret` is the one recorded for it: true when sent.
    fn forward_post<'a>(
        &'a self,
        conn: &'a str,
        secret: &'a str,
        commands: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// Deletes a connection's records. A connection that has none is a no-op.
    fn unregister<'a>(
        &'a self,
        conn: &'a str,
        user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Sends `{"type":"direct","data":data}` to every connection of `user`, on any node.
    /// Returns how many connections it reached.
    fn send_user<'a>(
        &'a self,
        user: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<u64, BrokerError>>;

    /// Sends `{"type":"direct","data":data}` to one connection, on any node: 1 or 0.
    fn send_conn<'a>(
        &'a self,
        conn: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<u64, BrokerError>>;

    /// Closes one connection, on any node, with 4003. False when no such connection exists.
    fn disconnect<'a>(&'a self, conn: &'a str) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// A user's live connections on any node, sorted by id.
    fn user_connections<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ConnInfo>, BrokerError>>;
}

/// A single node: nothing to record beyond the local registry.
pub struct LocalRecords {
    node_id: String,
    local: Arc<LocalConns>,
}

impl LocalRecords {
    pub fn new(node_id: &str, local: Arc<LocalConns>) -> Self {
        LocalRecords {
            node_id: node_id.to_owned(),
            local,
        }
    }
}

impl Records for LocalRecords {
    fn register<'a>(
        &'a self,
        _conn: &'a str,
        user: Option<&'a str>,
        _connected_ms: u64,
        max_per_user: usize,
        _secret: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        let held = match user {
            Some(u) if max_per_user > 0 => self.local.user_count(u),
            _ => 0,
        };
        Box::pin(async move { Ok(max_per_user == 0 || held < max_per_user) })
    }

    fn unregister<'a>(
        &'a self,
        _conn: &'a str,
        _user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    /// A single node holds every connection: there is nowhere to forward to.
    fn forward_post<'a>(
        &'a self,
        _conn: &'a str,
        _secret: &'a str,
        _commands: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async { Ok(false) })
    }

    fn send_user<'a>(
        &'a self,
        user: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<u64, BrokerError>> {
        let conns = self.local.user_conns(user);
        let n = self.local.deliver(conns.iter().map(String::as_str), data);
        Box::pin(async move { Ok(n) })
    }

    fn send_conn<'a>(
        &'a self,
        conn: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<u64, BrokerError>> {
        let n = self.local.deliver(std::iter::once(conn), data);
        Box::pin(async move { Ok(n) })
    }

    fn disconnect<'a>(&'a self, conn: &'a str) -> BoxFuture<'a, Result<bool, BrokerError>> {
        let kicked = self.local.kick(conn);
        Box::pin(async move { Ok(kicked) })
    }

    fn user_connections<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ConnInfo>, BrokerError>> {
        let v = self.local.user_infos(user, &self.node_id);
        Box::pin(async move { Ok(v) })
    }
}

/// A Redis command from the argument list of a `shared::backend` call, so that the
/// gateway and Rust backends use the same function names.
fn command(args: [&str; 5]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    cmd.arg(&args[1..]);
    cmd
}

/// Records in Redis, shared by every node.
pub struct RedisRecords {
    redis: Arc<Redis>,
    node_id: String,
    keys: Keys,
    metrics: Arc<Metrics>,
}

impl RedisRecords {
    /// Also routes this node's channel (`D`/`K`/`U` messages, see [`super::codec`]) to `local`.
    /// The channel is subscribed by [`RedisRecords::subscribe`].
    pub fn new(
        redis: Arc<Redis>,
        node_id: &str,
        local: Arc<LocalConns>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let m = metrics.clone();
        let channel = Keys::new(&redis.prefix).node_channel(node_id);
        redis.route(
            &channel,
            Arc::new(move |rest: &[u8], payload: &[u8]| {
                // A prefix route: only this node's channel itself, not a longer node id.
                if rest.is_empty() {
                    on_node_message(&local, &m, payload)
                }
            }),
        );
        RedisRecords {
            keys: Keys::new(&redis.prefix),
            redis,
            node_id: node_id.to_owned(),
            metrics,
        }
    }

    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Loads (or reloads, after Redis restarted empty) the function library.
    pub async fn load_functions(&self) -> Result<(), BrokerError> {
        let redis = &self.redis;
        let code = LIBRARY.replace("__PREFIX__", &redis.prefix).replace(
            "__CLUSTER__",
            if redis.is_cluster() { "true" } else { "false" },
        );
        redis.add_library(code).await?;
        // Every library, the broker's too: after an outage Redis may have lost them all.
        redis.load_libraries().await
    }

    /// Subscribes to this node's channel.
    pub async fn subscribe(&self) -> Result<(), BrokerError> {
        let channel = self.keys.node_channel(&self.node_id);
        self.redis.subscribe(&channel, false).await
    }

    /// `FCALL gw_add_conn`: adds `conn` to its user's hash unless the user holds `max`.
    fn add_to_user(&self, user: &str, conn: &str, connected_ms: u64, max: usize) -> redis::Cmd {
        let mut add = redis::cmd("FCALL");
        add.arg("gw_add_conn")
            .arg(1)
            .arg(user)
            .arg(conn)
            .arg(&self.node_id)
            .arg(connected_ms)
            .arg(max);
        add
    }

    /// `SET <P>conn:{conn}`: where the connection lives (and a streaming connection's
    /// secret).
    fn set_conn(
        &self,
        conn: &str,
        user: Option<&str>,
        connected_ms: u64,
        secret: Option<&str>,
    ) -> redis::Cmd {
        let mut record = format!("{} {connected_ms} {}", self.node_id, user.unwrap_or("-"));
        if let Some(s) = secret {
            record.push(' ');
            record.push_str(s);
        }
        let mut set = redis::cmd("SET");
        set.arg(self.keys.conn(conn)).arg(record);
        set
    }

    /// `HSET <P>nodeconns:{node}`: the connection among this node's.
    fn own_conn(&self, conn: &str, user: Option<&str>) -> redis::Cmd {
        let mut own = redis::cmd("HSET");
        own.arg(self.keys.nodeconns(&self.node_id))
            .arg(conn)
            .arg(user.unwrap_or("-"));
        own
    }

    /// What deletes one connection's records: its `conn` key, its entry among this node's
    /// and its user's.
    fn delete_conn(&self, conn: &str, user: Option<&str>) -> Vec<redis::Cmd> {
        let mut del = redis::cmd("DEL");
        del.arg(self.keys.conn(conn));
        let mut own = redis::cmd("HDEL");
        own.arg(self.keys.nodeconns(&self.node_id)).arg(conn);
        let mut cmds = vec![del, own];
        if let Some(u) = user {
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(self.keys.user(u)).arg(conn);
            cmds.push(hdel);
        }
        cmds
    }

    /// Writes the records of many connections of this node, uncapped, [`BATCH`] at a time:
    /// after an outage every local connection is re-registered this way.
    pub async fn register_many(&self, conns: &[Record]) -> Result<(), BrokerError> {
        for chunk in conns.chunks(BATCH) {
            let mut cmds = Vec::with_capacity(chunk.len() * 2 + 1);
            let mut own = redis::cmd("HSET");
            own.arg(self.keys.nodeconns(&self.node_id));
            for r in chunk {
                let (conn, user, at) = (&r.conn, r.user.as_deref(), r.connected_ms);
                if let Some(u) = user {
                    cmds.push(self.add_to_user(u, conn, at, 0));
                }
                cmds.push(self.set_conn(conn, user, at, r.secret.as_deref()));
                own.arg(conn).arg(user.unwrap_or("-"));
            }
            cmds.push(own);
            self.redis.batch("add", cmds).await?;
        }
        Ok(())
    }

    /// Deletes the records of many connections of this node, [`BATCH`] at a time.
    pub async fn unregister_many(
        &self,
        conns: &[(String, Option<String>)],
    ) -> Result<(), BrokerError> {
        for chunk in conns.chunks(BATCH) {
            let mut cmds = Vec::with_capacity(chunk.len() * 2 + 1);
            let mut own = redis::cmd("HDEL");
            own.arg(self.keys.nodeconns(&self.node_id));
            for (conn, user) in chunk {
                let mut del = redis::cmd("DEL");
                del.arg(self.keys.conn(conn));
                cmds.push(del);
                if let Some(u) = user {
                    let mut hdel = redis::cmd("HDEL");
                    hdel.arg(self.keys.user(u)).arg(conn);
                    cmds.push(hdel);
                }
                own.arg(conn);
            }
            cmds.push(own);
            self.redis.batch("remove", cmds).await?;
        }
        Ok(())
    }

    /// Deletes every route of `node` and its liveness entry, [`BATCH`] connections per round
    /// trip. Returns how many connections it had.
    pub async fn purge_node(&self, node: &str) -> Result<usize, BrokerError> {
        let redis = &self.redis;
        let own_key = self.keys.nodeconns(node);
        let mut all = redis::cmd("HGETALL");
        all.arg(&own_key);
        let conns: Vec<(String, String)> = redis
            .call::<HashMap<String, String>>("purge", all)
            .await?
            .into_iter()
            .collect();
        for chunk in conns.chunks(BATCH) {
            let mut by_user: HashMap<&str, Vec<&str>> = HashMap::new();
            let mut cmds = Vec::with_capacity(chunk.len() * 2);
            for (conn, user) in chunk {
                if user != "-" {
                    by_user.entry(user).or_default().push(conn);
                }
                let mut del = redis::cmd("DEL");
                del.arg(self.keys.conn(conn));
                cmds.push(del);
            }
            for (user, conns) in by_user {
                let mut hdel = redis::cmd("HDEL");
                hdel.arg(self.keys.user(user)).arg(conns);
                cmds.push(hdel);
            }
            redis.batch("purge", cmds).await?;
        }
        let mut del = redis::cmd("DEL");
        del.arg(&own_key);
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.keys.nodes()).arg(node);
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(self.keys.load()).arg(node);
        redis.batch("purge", vec![del, zrem, hdel]).await?;
        self.metrics
            .directory_ops
            .add(["purge"], conns.len() as u64);
        Ok(conns.len())
    }
}

impl Records for RedisRecords {
    fn register<'a>(
        &'a self,
        conn: &'a str,
        user: Option<&'a str>,
        connected_ms: u64,
        max_per_user: usize,
        secret: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async move {
            let redis = &self.redis;
            if let Some(u) = user {
                let add = self.add_to_user(u, conn, connected_ms, max_per_user);
                if redis.call::<i64>("add", add).await? == 0 {
                    return Ok(false);
                }
            }
            let set = self.set_conn(conn, user, connected_ms, secret);
            // One pipeline: one write and one wake-up per handshake, not one per command.
            redis
                .batch("add", vec![set, self.own_conn(conn, user)])
                .await
                .map(|_| true)
        })
    }

    fn register_cmds(
        &self,
        conn: &str,
        user: Option<&str>,
        connected_ms: u64,
        secret: Option<&str>,
    ) -> Option<Vec<redis::Cmd>> {
        let mut cmds = Vec::with_capacity(3);
        if let Some(u) = user {
            cmds.push(self.add_to_user(u, conn, connected_ms, 0));
        }
        cmds.push(self.set_conn(conn, user, connected_ms, secret));
        cmds.push(self.own_conn(conn, user));
        Some(cmds)
    }

    fn unregister<'a>(
        &'a self,
        conn: &'a str,
        user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let cmds = self.delete_conn(conn, user);
            self.redis.batch("remove", cmds).await
        })
    }

    fn unregister_cmds(&self, conn: &str, user: Option<&str>) -> Option<Vec<redis::Cmd>> {
        Some(self.delete_conn(conn, user))
    }

    fn forward_post<'a>(
        &'a self,
        conn: &'a str,
        secret: &'a str,
        commands: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("gw_emulate")
                .arg(1)
                .arg(conn)
                .arg(secret)
                .arg(commands);
            Ok(self.redis.call::<i64>("emulate", cmd).await? == 1)
        })
    }

    fn send_user<'a>(
        &'a self,
        user: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(
            self.redis
                .call("send_user", command(shared::backend::send_user(user, data))),
        )
    }

    fn send_conn<'a>(
        &'a self,
        conn: &'a str,
        data: &'a str,
    ) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(
            self.redis
                .call("send_conn", command(shared::backend::send_conn(conn, data))),
        )
    }

    fn disconnect<'a>(&'a self, conn: &'a str) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async move {
            let redis = &self.redis;
            let mut get = redis::cmd("GET");
            get.arg(self.keys.conn(conn));
            let Some(entry) = redis.call::<Option<String>>("disconnect", get).await? else {
                return Ok(false);
            };
            let node = entry.split(' ').next().unwrap_or_default();
            let channel = Keys::new(&redis.prefix).node_channel(node);
            redis
                .publish(&channel, &NodeMessage::Kick { conn }.encode(), false)
                .await?;
            Ok(true)
        })
    }

    fn user_connections<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ConnInfo>, BrokerError>> {
        Box::pin(async move {
            let redis = &self.redis;
            let mut all = redis::cmd("HGETALL");
            all.arg(self.keys.user(user));
            let entries: HashMap<String, String> = redis.call("list", all).await?;
            let mut live: HashMap<String, bool> = HashMap::new();
            let mut out = Vec::new();
            for (conn_id, entry) in entries {
                let mut parts = entry.split(' ');
                let node_id = parts.next().unwrap_or_default().to_owned();
                let connected_ms = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                if !live.contains_key(&node_id) {
                    let mut score = redis::cmd("ZSCORE");
                    score.arg(self.keys.nodes()).arg(&node_id);
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
        })
    }
}

/// A message on this node's channel, from `gw_send_user`/`gw_send_conn` or another node's
/// disconnect or unsubscribe.
fn on_node_message(local: &LocalConns, metrics: &Metrics, payload: &[u8]) {
    match NodeMessage::decode(payload) {
        Ok(NodeMessage::Deliver { conns, data }) => match shared::protocol::check_data(data) {
            Ok(()) => {
                local.deliver(conns.iter(), data);
            }
            Err(why) => {
                metrics.broker_dropped.inc([]);
                tracing::warn!(why, "dropped a unicast published on Redis");
            }
        },
        Ok(NodeMessage::Kick { conn }) => {
            local.kick(conn);
        }
        Ok(NodeMessage::Post { conn, commands }) => {
            let posted = local.post(conn, None, commands.to_owned());
            if posted != super::local::Posted::Queued {
                metrics.emulation.inc([match posted {
                    super::local::Posted::Full => "forward_inbox_full",
                    _ => "forward_gone",
                }]);
                tracing::debug!(conn, ?posted, "dropped commands forwarded by another node");
            }
        }
        Ok(NodeMessage::Unsubscribe { conns, channel }) => {
            if shared::channel::is_valid(channel) {
                local.unsubscribe(conns.into_iter(), channel);
            } else {
                tracing::debug!("dropped an unsubscribe for an invalid channel");
            }
        }
        Err(DecodeError::NotUtf8) => {}
        Err(DecodeError::Unknown(head)) => tracing::debug!(head, "unknown node message"),
    }
}
