//! Load shedding after scale-out. Long-lived sockets stay on the nodes they first landed on,
//! so new nodes get no share of the existing load unless the old ones let some go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::local::LocalConns;
use super::now_ms;
use crate::cluster::keys::Keys;
use crate::cluster::redis::Redis;
use crate::config::Config;
use crate::error::{BrokerError, CloseReason};
use crate::metrics::Metrics;

/// A reconnect hint: a random delay, so that clients told to leave at the same moment do not
/// come back at the same moment.
pub fn jittered_ms(min: u64, max: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    min + r % (max.saturating_sub(min) + 1)
}

/// The shedding policy (`rebalance = true`).
struct Policy {
    slack: f64,
    /// Most connections shed per heartbeat (from `rebalance_rate`).
    per_beat: usize,
    /// No shedding before this time: after a round, the shed clients need a few heartbeats
    /// to land on other nodes and show in their counts, or this node would shed on stale
    /// figures and overshoot.
    quiet_until_ms: AtomicU64,
}

/// One pass per heartbeat: publishes the cluster's figures and, with the policy on, sheds.
pub struct Rebalancer {
    policy: Option<Policy>,
    heartbeat: Duration,
    metrics: Arc<Metrics>,
}

impl Rebalancer {
    pub fn new(c: &Config, metrics: Arc<Metrics>) -> Self {
        Rebalancer {
            policy: c.rebalance.then_some(Policy {
                slack: c.rebalance_slack,
                per_beat: ((c.rebalance_rate as u64 * c.node_heartbeat_ms) / 1000).max(1) as usize,
                quiet_until_ms: Default::default(),
            }),
            heartbeat: Duration::from_millis(c.node_heartbeat_ms),
            metrics,
        }
    }

    /// After scale-out, long-lived sockets stay on the old nodes. A node above the cluster
    /// mean by more than the slack closes its excess with 1013 and a reconnect hint, at most
    /// `per_beat` per round and then quiet for three heartbeats, so the load balancer moves
    /// them to the new nodes gradually and the figures settle before the next round.
    pub async fn pass(
        &self,
        redis: &Redis,
        keys: &Keys,
        local: &LocalConns,
    ) -> Result<(), BrokerError> {
        let load = cluster_load(redis, keys).await?;
        let total: u64 = load.iter().map(|(_, c)| c).sum();
        let nodes = load.len().max(1) as u64;
        self.metrics.cluster_connections.record(total, &[]);
        self.metrics.cluster_nodes.record(nodes, &[]);
        let Some(r) = &self.policy else {
            return Ok(());
        };
        if now_ms() < r.quiet_until_ms.load(Ordering::Acquire) {
            return Ok(());
        }
        let limit = (total as f64 / nodes as f64 * (1.0 + r.slack)).ceil();
        if nodes < 2 || local.len() as f64 <= limit {
            return Ok(());
        }
        // Connections shed earlier may still be waiting out their hint: they are going, so
        // shedding more for them would overshoot.
        let mine = local.staying() as f64;
        if mine <= limit {
            return Ok(());
        }
        let excess = (mine - limit) as usize;
        // No deadline: a connection that waits out its hint is gone within 5 s.
        let shed = local.close_oldest(
            excess.min(r.per_beat),
            || CloseReason::Rebalance(jittered_ms(500, 5_000)),
            None,
        );
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
}

/// The cluster's live nodes and their connection counts (at their last heartbeat).
pub async fn cluster_load(redis: &Redis, keys: &Keys) -> Result<Vec<(String, u64)>, BrokerError> {
    let mut live = redis::cmd("ZRANGEBYSCORE");
    live.arg(keys.nodes()).arg(now_ms()).arg("+inf");
    let live: Vec<String> = redis.call("heartbeat", live).await?;
    let mut all = redis::cmd("HGETALL");
    all.arg(keys.load());
    let load: HashMap<String, u64> = redis.call("heartbeat", all).await?;
    Ok(live
        .into_iter()
        .map(|n| {
            let c = load.get(&n).copied().unwrap_or(0);
            (n, c)
        })
        .collect())
}
