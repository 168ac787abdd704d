//! The node's one Redis connection, shared by the broker, the directory and the inbound
//! stream.
//!
//! It is a single multiplexed RESP3 connection (or a Redis Cluster connection): commands and
//! pub/sub travel together, and subscription messages arrive as RESP3 pushes that
//! [`PushRouter`] hands straight to the hub or the directory, with no queue in between. The
//! redis crate reconnects with backoff and re-subscribes every channel by itself; what Redis
//! itself may have lost in a restart (the function library, this node's directory entries) is
//! restored by the directory's heartbeat once [`Redis::take_resync`] says so.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionManager, ConnectionManagerConfig, SendError};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};

use crate::broker::Sink;
use crate::config::Config;
use crate::error::{BrokerError, StartError};
use crate::metrics::Metrics;

/// Handles a message on this node's own channel (unicasts, disconnects).
pub type NodeHandler = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Routes subscription pushes: channel messages to the hub, node messages to the directory.
pub struct PushRouter {
    channel_prefix: String,
    node_channel: String,
    sink: OnceLock<Sink>,
    node_handler: OnceLock<NodeHandler>,
    /// Set when the connection dropped: Redis may have restarted empty.
    lost: AtomicBool,
    dropped_log_ms: AtomicU64,
    metrics: Arc<Metrics>,
}

/// The `AsyncPushSender` the redis crate calls for every push. It must not block: the sink
/// only queues encoded bytes.
#[derive(Clone)]
struct Router(Arc<PushRouter>);

impl AsyncPushSender for Router {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        self.0.route(info);
        Ok(())
    }
}

impl PushRouter {
    fn route(&self, info: PushInfo) {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {}
            PushKind::Disconnection => {
                self.lost.store(true, Ordering::Release);
                self.metrics
                    .inc("gateway_redis_errors_total", &[("op", "disconnected")]);
                tracing::warn!("lost the Redis connection; reconnecting");
                return;
            }
            _ => return,
        }
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
            (info.data.first(), info.data.get(1))
        else {
            return;
        };
        if channel.as_slice() == self.node_channel.as_bytes() {
            if let Some(h) = self.node_handler.get() {
                h(payload);
            }
            return;
        }
        let Some(name) = channel.strip_prefix(self.channel_prefix.as_bytes()) else {
            return;
        };
        let (Ok(name), Ok(data)) = (std::str::from_utf8(name), std::str::from_utf8(payload)) else {
            return self.drop_message("not UTF-8");
        };
        if let Err(why) = shared::protocol::check_data(crate::core::hub::split_trace(data).1) {
            return self.drop_message(why);
        }
        if let Some(sink) = self.sink.get() {
            sink(name, data);
        }
    }

    /// Counts a backend message that cannot be forwarded; logs at most once per 10 s.
    pub fn drop_message(&self, why: &str) {
        self.metrics.inc("gateway_broker_dropped_total", &[]);
        let now = crate::auth::unix_now();
        let last = self.dropped_log_ms.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .dropped_log_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                why,
                "dropped a message published on Redis (logged at most every 10 s; see gateway_broker_dropped_total)"
            );
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// See the module docs.
pub struct Redis {
    conn: Conn,
    pub prefix: String,
    sharded: bool,
    timeout: Duration,
    router: Arc<PushRouter>,
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Redis {
    /// Connects, retrying for up to `10 × redis_timeout_ms` so that a node and its Redis can
    /// start together.
    pub async fn connect(c: &Config, metrics: Arc<Metrics>) -> Result<Arc<Redis>, StartError> {
        let url = c.redis_url.as_deref().unwrap_or_default();
        let router = Arc::new(PushRouter {
            channel_prefix: shared::backend::Names::new(&c.redis_prefix).channel(""),
            node_channel: node_channel(&c.redis_prefix, &c.node_id),
            sink: OnceLock::new(),
            node_handler: OnceLock::new(),
            lost: AtomicBool::new(false),
            dropped_log_ms: AtomicU64::new(0),
            metrics: metrics.clone(),
        });
        let timeout = Duration::from_millis(c.redis_timeout_ms);
        let bad = |e: redis::RedisError| StartError::Redis(e.to_string());
        let deadline = tokio::time::Instant::now() + timeout * 10;
        let conn = loop {
            let attempt = async {
                if c.redis_cluster {
                    let mut seeds = Vec::new();
                    for u in url.split(',') {
                        seeds.push(with_auth(u, c)?);
                    }
                    let client = redis::cluster::ClusterClient::builder(seeds)
                        .use_protocol(ProtocolVersion::RESP3)
                        .push_sender(Router(router.clone()))
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .build()?;
                    Ok(Conn::Cluster(client.get_async_connection().await?))
                } else {
                    let client = redis::Client::open(with_auth(url, c)?)?;
                    let config = ConnectionManagerConfig::new()
                        .set_push_sender(Router(router.clone()))
                        .set_automatic_resubscription()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_max_delay(Duration::from_secs(2));
                    Ok(Conn::Single(
                        ConnectionManager::new_with_config(client, config).await?,
                    ))
                }
            };
            match attempt.await {
                Ok(conn) => break conn,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(bad(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "Redis not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Ok(Arc::new(Redis {
            conn,
            prefix: c.redis_prefix.clone(),
            sharded: c.redis_sharded_pubsub,
            timeout,
            router,
            healthy: AtomicBool::new(true),
            metrics,
        }))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// Where channel messages go. Set once, when the hub is built.
    pub fn set_sink(&self, sink: Sink) {
        let _ = self.router.sink.set(sink);
    }

    /// Where this node's own channel messages go. Set once, by the directory.
    pub fn set_node_handler(&self, handler: NodeHandler) {
        let _ = self.router.node_handler.set(handler);
    }

    /// Counts a dropped backend message (see [`PushRouter::drop_message`]).
    pub fn drop_message(&self, why: &str) {
        self.router.drop_message(why)
    }

    /// True once after the connection dropped (Redis may have restarted empty).
    pub fn take_resync(&self) -> bool {
        self.router.lost.swap(false, Ordering::AcqRel)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn set_healthy(&self, ok: bool) {
        if self.healthy.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                self.metrics.inc("gateway_redis_reconnects_total", &[]);
                tracing::info!("Redis is reachable again");
            } else {
                tracing::warn!("Redis is unreachable; serving local connections only");
            }
        }
    }

    /// `<prefix>ch:<channel>`: the pub/sub channel that carries a gateway channel.
    pub fn channel_key(&self, channel: &str) -> String {
        shared::backend::Names::new(&self.prefix).channel(channel)
    }

    /// Runs one command with the node's Redis timeout. `op` labels the error metric.
    pub async fn call<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: Cmd,
    ) -> Result<T, BrokerError> {
        let run = async {
            match self.conn.clone() {
                Conn::Single(mut c) => cmd.query_async(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
            }
        };
        self.finish(op, tokio::time::timeout(self.timeout, run).await)
    }

    /// Runs many commands, their replies ignored, under one node Redis timeout for the whole
    /// batch; the first failure fails the batch (some commands may have run). `op` labels the
    /// error metric, as for [`Redis::call`].
    ///
    /// A standalone Redis gets them as one pipeline: one round trip, and other commands on
    /// the shared connection (heartbeats) wait for one batch at most, not for all of them.
    /// Redis Cluster refuses a pipeline whose keys are in different slots, so there each
    /// command is sent on its own, all at once; the cluster client routes each to its
    /// primary and pipelines them per connection itself.
    pub async fn batch(&self, op: &'static str, cmds: Vec<Cmd>) -> Result<(), BrokerError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let run = async {
            match self.conn.clone() {
                Conn::Single(mut c) => {
                    let mut pipe = redis::pipe();
                    for cmd in cmds {
                        pipe.add_command(cmd).ignore();
                    }
                    pipe.query_async::<()>(&mut c).await
                }
                Conn::Cluster(c) => {
                    let mut each = tokio::task::JoinSet::new();
                    for cmd in cmds {
                        let mut c = c.clone();
                        each.spawn(async move { cmd.query_async::<Value>(&mut c).await });
                    }
                    while let Some(done) = each.join_next().await {
                        done.map_err(std::io::Error::other)??;
                    }
                    Ok(())
                }
            }
        };
        self.finish(op, tokio::time::timeout(self.timeout, run).await)
    }

    fn finish<T>(
        &self,
        op: &'static str,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, BrokerError> {
        let e = match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => BrokerError::Unavailable(e.to_string()),
            Err(_) => BrokerError::Timeout,
        };
        self.metrics
            .inc("gateway_redis_errors_total", &[("op", op)]);
        tracing::debug!(op, error = %e, "Redis call failed");
        Err(e)
    }

    /// Subscribes to a pub/sub channel (sharded when configured). The redis crate restores
    /// the subscription after a reconnect.
    pub async fn subscribe(&self, channel: &str, sharded: bool) -> Result<(), BrokerError> {
        let run = async {
            match self.conn.clone() {
                Conn::Single(mut c) => c.subscribe(channel).await,
                Conn::Cluster(mut c) if sharded && self.sharded => c.ssubscribe(channel).await,
                Conn::Cluster(mut c) => c.subscribe(channel).await,
            }
        };
        self.finish("subscribe", tokio::time::timeout(self.timeout, run).await)
    }

    pub async fn unsubscribe(&self, channel: &str, sharded: bool) -> Result<(), BrokerError> {
        let run = async {
            match self.conn.clone() {
                Conn::Single(mut c) => c.unsubscribe(channel).await,
                Conn::Cluster(mut c) if sharded && self.sharded => c.sunsubscribe(channel).await,
                Conn::Cluster(mut c) => c.unsubscribe(channel).await,
            }
        };
        self.finish("unsubscribe", tokio::time::timeout(self.timeout, run).await)
    }

    /// Publishes on a channel: SPUBLISH when sharded pub/sub is on, else PUBLISH.
    pub async fn publish(
        &self,
        channel: &str,
        payload: &str,
        sharded: bool,
    ) -> Result<(), BrokerError> {
        let verb = if sharded && self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let mut cmd = redis::cmd(verb);
        cmd.arg(channel).arg(payload);
        self.call::<i64>("publish", cmd).await.map(|_| ())
    }

    /// Loads a function library on every primary (`FUNCTION LOAD REPLACE`).
    pub async fn load_functions(&self, code: &str) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(code);
        let run = async {
            match self.conn.clone() {
                Conn::Single(mut c) => cmd.query_async::<Value>(&mut c).await.map(|_| ()),
                Conn::Cluster(mut c) => {
                    use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
                    c.route_command(
                        cmd,
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                    )
                    .await
                    .map(|_| ())
                }
            }
        };
        self.finish(
            "function_load",
            tokio::time::timeout(self.timeout, run).await,
        )
    }
}

/// `<prefix>node:<node_id>`: the channel that carries unicasts and disconnects to one node.
pub fn node_channel(prefix: &str, node_id: &str) -> String {
    format!("{prefix}node:{node_id}")
}

fn with_auth(url: &str, c: &Config) -> redis::RedisResult<redis::ConnectionInfo> {
    let info = url.trim().into_connection_info()?;
    let mut settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    if let Some(pw) = &c.redis_password {
        settings = settings.set_password(pw);
    }
    Ok(info.set_redis_settings(settings))
}
