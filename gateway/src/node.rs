//! State shared by every task of one node: the core's services ([`Core`], which a `Node`
//! derefs to) and what the edge and the shutdown sequence add to them.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::Broker;
use crate::cluster::directory::Directory;
use crate::cluster::inbound::Inbound;
use crate::cluster::presence::Presence;
use crate::cluster::redis::Redis;
use crate::config::Config;
use crate::conn::limiter::KeyedLimiter;
use crate::conn::outbound::Outbound;
use crate::conn::registry::{Entry, Registry};
use crate::conn::socket::Limits;
use crate::core::hub::{ConnId, Hub, Settings};
use crate::core::Core;
use crate::edge::client_ip::TrustedProxies;
use crate::edge::handshake::Refusal;
use crate::edge::handshake_limit::HandshakeLimiter;
use crate::edge::per_ip::{ConnectionsPerIp, IpSlot};
use crate::error::StartError;
use crate::metrics::Metrics;

/// Shared node state. Cheap to reach from any task through an `Arc`.
pub struct Node {
    /// The sessions' services: config, auth, hub, directory, inbound stream, metrics.
    pub core: Arc<Core>,
    pub handshake_limiter: HandshakeLimiter,
    /// Posts to `/emulation` per client IP (`emulation_rate_per_ip`).
    pub post_limiter: HandshakeLimiter,
    /// Open connections per client IP (`max_connections_per_ip`).
    pub per_ip: Arc<ConnectionsPerIp>,
    pub proxies: TrustedProxies,
    /// Cancelled when shutdown starts: readiness turns false at once.
    pub draining: CancellationToken,
    /// On during a drain on demand (`POST /v1/drain`, or the pod annotation): the node
    /// drains as on SIGTERM but keeps running, refusing new connections with 503. Unlike
    /// `draining` it can be ended (`DELETE /v1/drain`, removing the annotation).
    pub maintenance: crate::ops::admin::Maintenance,
    /// Every open connection: the ping sweep, and the close (1001) once the listener is
    /// closed.
    pub conns: Registry,
    open: AtomicUsize,
    next_conn: AtomicU64,
    /// When the node started, Unix milliseconds.
    pub boot_ms: u64,
}

impl Node {
    /// Builds the node; connects to Redis first when `redis_url` is set.
    pub async fn new(config: Config, draining: CancellationToken) -> Result<Arc<Node>, StartError> {
        let metrics = Arc::new(Metrics::new(config.otlp_endpoint.as_ref().map(
            |endpoint| crate::metrics::OtlpPush {
                endpoint: endpoint.clone(),
                interval: Duration::from_millis(config.otlp_interval_ms),
            },
        )));
        let auth = Authenticator::from_config(&config, metrics.clone())?;
        let handshake_limiter =
            HandshakeLimiter::new(config.handshake_rate_per_ip, config.handshake_burst_per_ip);
        let post_limiter =
            HandshakeLimiter::new(config.emulation_rate_per_ip, config.emulation_burst_per_ip);
        let per_ip = ConnectionsPerIp::new(config.max_connections_per_ip);
        let proxies = TrustedProxies::new(&config.trusted_proxies);
        let redis = match &config.redis_url {
            Some(_) => Some(Redis::connect(&config, metrics.clone()).await?),
            None => None,
        };
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get() * 4);
        let timeout = Duration::from_millis(config.redis_timeout_ms);
        let settings = Settings {
            shards,
            broker_timeout: timeout,
            channels: config.channels.clone(),
            recover_batch: Duration::from_millis(config.recover_batch_ms),
        };
        let mut redis_broker = None;
        let hub = Hub::new(settings, metrics.clone(), |sink| match &redis {
            Some(r) => {
                let b = Arc::new(RedisBroker::new(
                    r.clone(),
                    sink,
                    metrics.clone(),
                    &config.channels,
                ));
                redis_broker = Some(b.clone());
                b as Arc<dyn Broker>
            }
            None => Arc::new(MemoryBroker::new(sink)) as Arc<dyn Broker>,
        });
        if let Some(b) = redis_broker {
            b.load()
                .await
                .map_err(|e| StartError::Redis("loading the history functions", e))?;
        }
        let directory = Directory::new(&config, redis.clone(), metrics.clone());
        let weak = Arc::downgrade(&hub);
        let deliver: crate::broker::Sink = Arc::new(move |channel: &str, payload: &str| {
            if let Some(hub) = weak.upgrade() {
                hub.deliver(channel, payload);
            }
        });
        let presence = Presence::new(&config, redis.clone(), deliver, metrics.clone());
        if redis.is_some() {
            presence
                .start()
                .await
                .map_err(|e| StartError::Redis("loading the presence functions", e))?;
            directory.attach(presence.clone());
        }
        directory.set_unsubscriber(crate::core::unsubscriber(hub.clone(), presence.clone()));
        directory.start().await?;
        let inbound = Inbound::new(
            redis.clone(),
            &config.node_id,
            config.inbound_maxlen,
            metrics.clone(),
        );
        let send_limiter = KeyedLimiter::new(config.send_rate_per_user, config.send_rate_per_user);
        let boot_ms = crate::time::now_ms();
        Ok(Arc::new(Node {
            core: Arc::new(Core {
                config,
                auth,
                hub,
                directory,
                inbound,
                send_limiter,
                presence,
                metrics,
            }),
            handshake_limiter,
            post_limiter,
            per_ip,
            proxies,
            draining,
            maintenance: crate::ops::admin::Maintenance::default(),
            conns: Registry::default(),
            open: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            boot_ms,
        }))
    }

    /// Reserves a connection slot for a client at `ip`: refused when the node is at
    /// `max_connections`, or that IP at `max_connections_per_ip`.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.config.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::OverCapacity);
        }
        self.metrics
            .hot
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        // Built before the per-IP check, so that a refusal there gives the node slot back.
        let mut slot = Slot(self.clone(), None, None);
        slot.1 = Some(self.per_ip.try_add(ip).ok_or(Refusal::IpLimit)?);
        Ok(slot)
    }

    /// Connections currently holding a slot.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// A new connection id and its wire form. The wire form includes the node and its boot
    /// time, so ids stay unique across nodes and restarts. The numbers are in base 36: the id
    /// is stored twice per connection in Redis (its record's key and its node's hash), so
    /// every character is paid for in every connection's records.
    pub fn next_conn_id(&self) -> (ConnId, Arc<str>) {
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(self.config.node_id.len() + 16);
        id.push_str(&self.config.node_id);
        id.push('.');
        push_base36(&mut id, self.boot_ms);
        id.push('.');
        push_base36(&mut id, n);
        (n, id.into())
    }

    /// Per-connection limits from the config.
    pub fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.config.max_message_bytes,
            fragment_timeout: self.config.fragment_timeout(),
            write_timeout: Duration::from_secs(2).min(self.config.ping_timeout()),
        }
    }
}

/// Appends `n` in base 36 (digits, then lower-case letters).
fn push_base36(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 13];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[i..].iter().map(|&d| char::from(d)));
}

/// Everything a node offers, the core's services included: `node.hub`, `node.config`.
impl std::ops::Deref for Node {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

/// A reserved connection slot, on the node and in its IP's count, and the connection's
/// place in the node's registry; released on drop.
pub struct Slot(Arc<Node>, Option<IpSlot>, Option<Entry>);

impl Slot {
    /// Puts the connection in the node's registry ([`Node::conns`]) until the slot goes.
    pub fn register(&mut self, out: &Arc<Outbound>) {
        self.2 = Some(self.0.conns.insert(out));
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(entry) = self.2.take() {
            self.0.conns.remove(entry);
        }
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0
            .metrics
            .hot
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base36_is_short_and_exact() {
        let s = |n| {
            let mut out = String::new();
            super::push_base36(&mut out, n);
            out
        };
        assert_eq!(s(0), "0");
        assert_eq!(s(35), "z");
        assert_eq!(s(36), "10");
        assert_eq!(s(u64::MAX), "3w5e11264sgsf");
        // a boot time in milliseconds: 8 characters, against 11 in hex
        assert_eq!(s(1_796_348_431_234).len(), 8);
    }
}
