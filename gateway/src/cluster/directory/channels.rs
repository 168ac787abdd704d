//! Each node's channels with local subscribers, in `<P>chans:{node}` (hash `channel →
//! subscribers`), for the server API's `channels` and `info`: written every heartbeat
//! (only what changed since the last write, so a quiet node costs nothing), purged with the
//! node when it dies, and written again in full after an outage (Redis may have lost it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::liveness::NodeData;
use super::rebalance::cluster_load;
use super::BoxFuture;
use crate::cluster::keys::Keys;
use crate::cluster::redis::Redis;
use crate::error::BrokerError;

/// One live node of the cluster, as the heartbeats describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    pub node_id: String,
    pub connections: u64,
    /// Channels with subscribers on that node.
    pub channels: u64,
}

/// See the module docs.
pub struct ChannelCounts {
    redis: Arc<Redis>,
    keys: Keys,
    node_id: String,
    /// This node's counts as last written.
    written: Mutex<HashMap<String, u64>>,
    /// A write failed: the next heartbeat schedules a resync.
    dirty: AtomicBool,
}

impl ChannelCounts {
    pub fn new(redis: Arc<Redis>, node_id: &str) -> Self {
        ChannelCounts {
            keys: Keys::new(&redis.prefix),
            redis,
            node_id: node_id.to_owned(),
            written: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
        }
    }

    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes this node's counts: what changed since the last write.
    pub async fn record(&self, counts: Vec<(String, usize)>) -> Result<(), BrokerError> {
        let now: HashMap<String, u64> = counts.into_iter().map(|(c, n)| (c, n as u64)).collect();
        let (changed, gone) = {
            let written = self.written();
            let changed: Vec<(String, u64)> = now
                .iter()
                .filter(|(c, n)| written.get(*c) != Some(n))
                .map(|(c, n)| (c.clone(), *n))
                .collect();
            let gone: Vec<String> = written
                .keys()
                .filter(|c| !now.contains_key(*c))
                .cloned()
                .collect();
            (changed, gone)
        };
        let key = self.keys.channels_of(&self.node_id);
        let r = async {
            for chunk in changed.chunks(256) {
                let mut hset = redis::cmd("HSET");
                hset.arg(&key);
                for (c, n) in chunk {
                    hset.arg(c).arg(n);
                }
                self.redis.call::<()>("heartbeat", hset).await?;
            }
            for chunk in gone.chunks(256) {
                let mut hdel = redis::cmd("HDEL");
                hdel.arg(&key).arg(chunk);
                self.redis.call::<()>("heartbeat", hdel).await?;
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => *self.written() = now,
            Err(_) => self.dirty.store(true, Ordering::Release),
        }
        r
    }

    /// The cluster's channels with subscribers, and how many on all live nodes together.
    pub async fn all(&self) -> Result<HashMap<String, u64>, BrokerError> {
        let mut all: HashMap<String, u64> = HashMap::new();
        for (node, _) in cluster_load(&self.redis, &self.keys).await? {
            let mut get = redis::cmd("HGETALL");
            get.arg(self.keys.channels_of(&node));
            let counts: HashMap<String, u64> = self.redis.call("list", get).await?;
            for (c, n) in counts {
                *all.entry(c).or_default() += n;
            }
        }
        Ok(all)
    }

    /// The cluster's live nodes with their connection and channel counts.
    pub async fn nodes(&self) -> Result<Vec<NodeLoad>, BrokerError> {
        let mut out = Vec::new();
        for (node_id, connections) in cluster_load(&self.redis, &self.keys).await? {
            let mut len = redis::cmd("HLEN");
            len.arg(self.keys.channels_of(&node_id));
            let channels: u64 = self.redis.call("list", len).await?;
            out.push(NodeLoad {
                node_id,
                connections,
                channels,
            });
        }
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(out)
    }
}

impl NodeData for ChannelCounts {
    fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// Forgets what was written: the next heartbeat writes every count again.
    fn resync(&self) -> BoxFuture<'_, Result<usize, BrokerError>> {
        let n = {
            let mut w = self.written();
            let n = w.len();
            w.clear();
            n
        };
        Box::pin(async move { Ok(n) })
    }

    fn purge<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<usize, BrokerError>> {
        Box::pin(async move {
            let mut del = redis::cmd("DEL");
            del.arg(self.keys.channels_of(node));
            let n: usize = self.redis.call("purge", del).await?;
            if node == self.node_id {
                self.written().clear();
            }
            Ok(n)
        })
    }
}
