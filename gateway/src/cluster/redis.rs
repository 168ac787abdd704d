//! The node's Redis transport, shared by the broker, the directory and the inbound stream.
//!
//! It is two multiplexed RESP3 connections (or two Redis Cluster connections), one for
//! pub/sub and one for commands. Subscription messages arrive on the first as RESP3 pushes,
//! and fan-out runs inside its push callback; on one shared connection, a large fan-out
//! delayed every command queued behind it (the directory's calls, the heartbeat that keeps
//! the node alive in the cluster), and Redis closing the connection for its pub/sub output
//! buffer limit (`client-output-buffer-limit pubsub`) took the commands down with it. Apart,
//! a busy or killed subscriber connection costs the commands nothing. [`Redis::subscribe`]
//! and [`Redis::unsubscribe`] use the pub/sub connection, everything else the command one.
//!
//! The transport knows nothing of what travels on it: whoever subscribes registers a
//! [`PushHandler`] for a channel-name prefix ([`Redis::route`]) and gets that channel's
//! pushes, called straight from the redis crate's push callback with no queue in between.
//! The broker registers `<prefix>ch:` at construction, the directory its own node channel.
//!
//! The redis crate reconnects each connection with backoff, and re-subscribes every channel
//! of the pub/sub one by itself; what Redis itself may have lost in a restart (the function
//! library, this node's directory entries) is restored by the directory's heartbeat once
//! [`Redis::take_resync`] says so, which it does after either connection dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionManager, ConnectionManagerConfig, SendError};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};

use crate::config::Config;
use crate::error::{BrokerError, StartError};
use crate::metrics::Metrics;

/// Called for every pub/sub message on a routed channel, with the channel name after the
/// registered prefix and the raw payload. Runs inside the redis crate's push callback, so it
/// must not block: it only queues already-encoded bytes.
pub type PushHandler = Arc<dyn Fn(&[u8], &[u8]) + Send + Sync>;

/// Pushes by channel prefix. Routes are registered before their first SUBSCRIBE, so a push
/// never arrives for a route that does not exist yet; the lock is read once per push and
/// written only at start-up.
struct Routes {
    by_prefix: RwLock<Vec<(Vec<u8>, PushHandler)>>,
    /// Set when the connection dropped: Redis may have restarted empty.
    lost: AtomicBool,
    metrics: Arc<Metrics>,
}

/// The `AsyncPushSender` the redis crate calls for every push.
#[derive(Clone)]
struct Router(Arc<Routes>);

impl AsyncPushSender for Router {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        self.0.route(info);
        Ok(())
    }
}

impl Routes {
    fn route(&self, info: PushInfo) {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {}
            PushKind::Disconnection => {
                self.lost.store(true, Ordering::Release);
                self.metrics.redis_errors.inc(["disconnected"]);
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
        let routes = self.by_prefix.read().unwrap_or_else(|p| p.into_inner());
        for (prefix, handler) in routes.iter() {
            if let Some(rest) = channel.strip_prefix(prefix.as_slice()) {
                return handler(rest, payload);
            }
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
    /// SUBSCRIBE and UNSUBSCRIBE, and the pushes they bring.
    pubsub: Conn,
    /// Every other command.
    commands: Conn,
    pub prefix: String,
    sharded: bool,
    timeout: Duration,
    router: Arc<Routes>,
    /// Function libraries by name, loaded at start and again after Redis came back.
    libraries: std::sync::Mutex<Vec<(String, String)>>,
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Redis {
    /// Connects, retrying for up to `10 × redis_timeout_ms` so that a node and its Redis can
    /// start together.
    pub async fn connect(c: &Config, metrics: Arc<Metrics>) -> Result<Arc<Redis>, StartError> {
        let url = c.redis_url.as_ref().map_or("", |u| u.expose());
        let router = Arc::new(Routes {
            by_prefix: RwLock::new(Vec::new()),
            lost: AtomicBool::new(false),
            metrics: metrics.clone(),
        });
        let timeout = Duration::from_millis(c.redis_timeout_ms);
        let bad = |e: redis::RedisError| StartError::Redis("connecting", e.into());
        let deadline = tokio::time::Instant::now() + timeout * 10;
        let (pubsub, commands) = loop {
            let attempt = async {
                Ok::<_, redis::RedisError>((
                    open(c, url, &router, timeout).await?,
                    open(c, url, &router, timeout).await?,
                ))
            };
            match attempt.await {
                Ok(conns) => break conns,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(bad(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "Redis not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Ok(Arc::new(Redis {
            pubsub,
            commands,
            prefix: c.redis_prefix.clone(),
            sharded: c.redis_sharded_pubsub,
            timeout,
            router,
            libraries: Default::default(),
            healthy: AtomicBool::new(true),
            metrics,
        }))
    }

    /// True when channels travel over sharded pub/sub (SPUBLISH).
    pub fn sharded_pubsub(&self) -> bool {
        self.sharded
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.commands, Conn::Cluster(_))
    }

    /// Sends the pushes of every channel whose name starts with `prefix` to `handler`.
    /// Register before subscribing to such a channel. Prefixes must not overlap.
    pub fn route(&self, prefix: &str, handler: PushHandler) {
        let mut routes = self
            .router
            .by_prefix
            .write()
            .unwrap_or_else(|p| p.into_inner());
        routes.push((prefix.as_bytes().to_vec(), handler));
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
                self.metrics.redis_reconnects.inc([]);
                tracing::info!("Redis is reachable again");
            } else {
                tracing::warn!("Redis is unreachable; serving local connections only");
            }
        }
    }

    /// Runs one command with the node's Redis timeout. `op` labels the error metric.
    pub async fn call<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: Cmd,
    ) -> Result<T, BrokerError> {
        let run = async {
            match self.commands.clone() {
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
    /// the command connection (heartbeats) wait for one batch at most, not for all of them.
    /// Redis Cluster refuses a pipeline whose keys are in different slots, so there each
    /// command is sent on its own, all at once; the cluster client routes each to its
    /// primary and pipelines them per connection itself.
    pub async fn batch(&self, op: &'static str, cmds: Vec<Cmd>) -> Result<(), BrokerError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let run = async {
            match self.commands.clone() {
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

    /// Runs `first` (as [`Redis::batch`], replies ignored) and then `then`, Redis executing
    /// them in that order, and returns each part's outcome (`op_first` and `op_then` label
    /// the error metric). A standalone Redis gets them as one pipeline: one write, one
    /// reply and one wake-up instead of two round trips. On Redis Cluster (a pipeline's keys
    /// would have to share a slot) `then` is sent once `first` is done.
    pub async fn in_order(
        &self,
        op_first: &'static str,
        first: Vec<Cmd>,
        op_then: &'static str,
        then: Cmd,
    ) -> (Result<(), BrokerError>, Result<Value, BrokerError>) {
        let mut c = match self.commands.clone() {
            Conn::Single(c) => c,
            Conn::Cluster(_) => {
                let first = self.batch(op_first, first).await;
                return (first, self.call(op_then, then).await);
            }
        };
        let n = first.len();
        let mut pipe = redis::pipe();
        // One result per command, errors included, so that each part gets its own.
        pipe.ignore_errors();
        for cmd in first {
            pipe.add_command(cmd);
        }
        pipe.add_command(then);
        let run = pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut c);
        let (first, then) = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(mut replies)) if replies.len() == n + 1 => {
                let then = replies.pop().unwrap_or(Ok(Value::Nil));
                let first = replies
                    .into_iter()
                    .find(Result::is_err)
                    .unwrap_or(Ok(Value::Nil));
                (
                    first.map(|_| ()).map_err(BrokerError::from),
                    then.map_err(BrokerError::from),
                )
            }
            Ok(Ok(_)) => {
                let e = BrokerError::Malformed("pipeline reply");
                (Err(e.clone()), Err(e))
            }
            Ok(Err(e)) => {
                let e = BrokerError::from(e);
                (Err(e.clone()), Err(e))
            }
            Err(_) => (Err(BrokerError::Timeout), Err(BrokerError::Timeout)),
        };
        (self.settle(op_first, first), self.settle(op_then, then))
    }

    /// Counts and logs a failed outcome, as [`Redis::finish`] does.
    fn settle<T>(&self, op: &'static str, r: Result<T, BrokerError>) -> Result<T, BrokerError> {
        if let Err(e) = &r {
            self.metrics.redis_errors.inc([op]);
            tracing::debug!(op, error = %e, "Redis call failed");
        }
        r
    }

    fn finish<T>(
        &self,
        op: &'static str,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, BrokerError> {
        let e = match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => BrokerError::from(e),
            Err(_) => BrokerError::Timeout,
        };
        self.metrics.redis_errors.inc([op]);
        tracing::debug!(op, error = %e, "Redis call failed");
        Err(e)
    }

    /// Subscribes to a pub/sub channel (sharded when configured). The redis crate restores
    /// the subscription after a reconnect.
    pub async fn subscribe(&self, channel: &str, sharded: bool) -> Result<(), BrokerError> {
        let run = async {
            match self.pubsub.clone() {
                Conn::Single(mut c) => c.subscribe(channel).await,
                Conn::Cluster(mut c) if sharded && self.sharded => c.ssubscribe(channel).await,
                Conn::Cluster(mut c) => c.subscribe(channel).await,
            }
        };
        self.finish("subscribe", tokio::time::timeout(self.timeout, run).await)
    }

    pub async fn unsubscribe(&self, channel: &str, sharded: bool) -> Result<(), BrokerError> {
        let run = async {
            match self.pubsub.clone() {
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

    /// Registers a function library (`#!lua name=<name>` on its first line) and loads it.
    /// Registered libraries are loaded again by [`Redis::load_libraries`], which the
    /// directory's resync calls after Redis came back (it may have restarted empty).
    pub async fn add_library(&self, code: String) -> Result<(), BrokerError> {
        let name = code
            .lines()
            .next()
            .and_then(|l| l.split("name=").nth(1))
            .unwrap_or_default()
            .trim()
            .to_owned();
        {
            let mut libs = self.libraries.lock().unwrap_or_else(|p| p.into_inner());
            libs.retain(|(n, _)| *n != name);
            libs.push((name, code.clone()));
        }
        self.load_functions(&code).await
    }

    /// Loads every registered library again.
    pub async fn load_libraries(&self) -> Result<(), BrokerError> {
        let libs = self
            .libraries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (_, code) in libs {
            self.load_functions(&code).await?;
        }
        Ok(())
    }

    /// Loads a function library on every primary (`FUNCTION LOAD REPLACE`).
    async fn load_functions(&self, code: &str) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(code);
        let run = async {
            match self.commands.clone() {
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

/// One connection to the node's Redis, or to its Redis Cluster, that reconnects by itself.
/// Both of the node's connections report to `router`: the pub/sub one its pushes, and both
/// their drops, which set the resync flag.
async fn open(
    c: &Config,
    url: &str,
    router: &Arc<Routes>,
    timeout: Duration,
) -> redis::RedisResult<Conn> {
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
}

fn with_auth(url: &str, c: &Config) -> redis::RedisResult<redis::ConnectionInfo> {
    let info = url.trim().into_connection_info()?;
    let mut settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    if let Some(pw) = &c.redis_password {
        settings = settings.set_password(pw.expose());
    }
    Ok(info.set_redis_settings(settings))
}
