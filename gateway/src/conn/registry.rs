//! Every open connection of the node, for the work the node does to all of them at once:
//! the pings (and the ping timeout) and the close at shutdown.
//!
//! Why not a timer and a shutdown token in each connection: those are the largest items an
//! idle connection would hold for nothing (a tokio timer entry of about 110 bytes on the
//! heap, a cancellation future of 72 bytes, and their places in the writer's `select!`).
//! One node-wide pass ([`Registry::sweep`]) does the same for a `Weak` per connection.
//!
//! Bounded: one slot per open connection (the node admits at most `max_connections`), and a
//! freed slot is reused before the table grows. The table is split into [`SHARDS`] shards,
//! each with its own lock, so that handshakes on different threads rarely meet, and a sweep
//! takes one shard's lock at a time, only long enough to copy out its live connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use super::outbound::Outbound;
use crate::error::CloseReason;

/// Shards of the table; also how many steps one ping interval's sweep takes.
pub const SHARDS: usize = 16;

/// See the module docs.
pub struct Registry {
    shards: Box<[Mutex<Shard>]>,
    next: AtomicUsize,
    /// Set by [`Registry::close_all`]: a connection that registers later is closed at once.
    closed: OnceLock<CloseReason>,
}

#[derive(Default)]
struct Shard {
    slots: Vec<Option<Weak<Outbound>>>,
    free: Vec<u32>,
}

/// A connection's place in the [`Registry`]; give it back with [`Registry::remove`].
#[derive(Debug)]
pub struct Entry {
    shard: u32,
    index: u32,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next: AtomicUsize::new(0),
            closed: OnceLock::new(),
        }
    }
}

impl Registry {
    fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a connection, in the shards in turn.
    pub fn insert(&self, out: &Arc<Outbound>) -> Entry {
        let shard = self.next.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let mut s = self.shard(shard);
        let weak = Some(Arc::downgrade(out));
        let index = match s.free.pop() {
            Some(i) => {
                s.slots[i as usize] = weak;
                i
            }
            None => {
                s.slots.push(weak);
                (s.slots.len() - 1) as u32
            }
        };
        drop(s);
        // After the insert: either `close_all` found this connection in its shard, or it had
        // set `closed` before it looked, and it is seen here.
        if let Some(reason) = self.closed.get() {
            out.close(reason.clone());
        }
        Entry {
            shard: shard as u32,
            index,
        }
    }

    /// Forgets a connection.
    pub fn remove(&self, entry: Entry) {
        let mut s = self.shard(entry.shard as usize);
        if let Some(slot) = s.slots.get_mut(entry.index as usize) {
            *slot = None;
            s.free.push(entry.index);
        }
    }

    /// The live connections of one shard (`shard` modulo [`SHARDS`]), copied out of its lock.
    fn live(&self, shard: usize) -> Vec<Arc<Outbound>> {
        self.shard(shard % SHARDS)
            .slots
            .iter()
            .filter_map(|w| w.as_ref()?.upgrade())
            .collect()
    }

    /// One step of the node's ping sweep over shard `step`: a connection not pinged for
    /// `ping_after` (or opened that long ago) gets a ping, and a WebSocket peer silent for longer than
    /// `ping_timeout` is closed with 4001 ([`Outbound::ping`]). The node takes a step every
    /// ping interval / [`SHARDS`], so that each connection is visited once per interval,
    /// and the pings of a whole node are spread over the interval rather than sent at once.
    /// Returns how many connections it visited.
    fn sweep(&self, step: usize, ping_after: Duration, ping_timeout: Duration) -> usize {
        let live = self.live(step);
        for out in &live {
            out.ping(ping_after, ping_timeout);
        }
        live.len()
    }

    /// Pings every connection each `interval`, and closes WebSocket peers silent for longer
    /// than `timeout`, one shard per `interval` / [`SHARDS`] ([`Registry::sweep`]); never
    /// ends.
    pub async fn ping_all(&self, interval: Duration, timeout: Duration) {
        let step = (interval / SHARDS as u32).max(Duration::from_millis(1));
        // Pinged when the last ping is about an interval old: less one step, so that each
        // visit (one per interval) pings, whatever the sweep's jitter.
        let after = interval.saturating_sub(step);
        let mut tick = tokio::time::interval(step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for shard in 0.. {
            tick.tick().await;
            self.sweep(shard, after, timeout);
        }
    }

    /// Closes every connection with `reason` (1001 at shutdown): each writer writes what is
    /// queued, then the close frame.
    pub fn close_all(&self, reason: &CloseReason) {
        let _ = self.closed.set(reason.clone());
        for shard in 0..SHARDS {
            for out in self.live(shard) {
                out.close(reason.clone());
            }
        }
    }

    /// Open connections (slots in use).
    #[cfg(test)]
    fn len(&self) -> usize {
        (0..SHARDS)
            .map(|i| {
                let s = self.shard(i);
                s.slots.len() - s.free.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::event::DebugCodec;

    fn out() -> Arc<Outbound> {
        Arc::new(Outbound::new(1 << 16, &DebugCodec))
    }

    #[test]
    fn slots_are_reused_and_the_table_stays_bounded() {
        let r = Registry::default();
        let conns: Vec<_> = (0..100).map(|_| out()).collect();
        for _ in 0..50 {
            let entries: Vec<_> = conns.iter().map(|o| r.insert(o)).collect();
            assert_eq!(r.len(), 100);
            for e in entries {
                r.remove(e);
            }
            assert_eq!(r.len(), 0);
        }
        // Round robin puts at most ceil(100 / SHARDS) of each round in a shard: freed slots
        // are reused, the table does not grow with the rounds.
        let slots: usize = (0..SHARDS).map(|i| r.shard(i).slots.len()).sum();
        assert!(slots <= 100usize.div_ceil(SHARDS) * SHARDS, "{slots} slots");
    }

    #[test]
    fn a_sweep_pings_one_shard_and_closes_the_silent() {
        let r = Registry::default();
        let conns: Vec<_> = (0..SHARDS * 2).map(|_| out()).collect();
        let _entries: Vec<_> = conns.iter().map(|o| r.insert(o)).collect();
        let (soon, never) = (Duration::from_millis(2), Duration::from_secs(60));
        // Just opened: visited, not pinged yet.
        assert_eq!(r.sweep(3, never, never), 2);
        assert!(conns.iter().all(|o| o.queued() == 0));
        // Every shard got two; a step pings one shard's two.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(r.sweep(3, soon, never), 2);
        let queued: Vec<usize> = conns.iter().map(|o| o.queued()).collect();
        assert_eq!(queued.iter().filter(|&&q| q > 0).count(), 2, "{queued:?}");
        // Pinged just now: not again until `ping_after` has passed, whatever the peer says.
        let before = conns[3 + SHARDS].queued();
        r.sweep(3, Duration::from_secs(1), never);
        assert_eq!(conns[3 + SHARDS].queued(), before);
        std::thread::sleep(Duration::from_millis(5));
        conns[3 + SHARDS].heard().frame(true);
        r.sweep(3, soon, never);
        assert!(
            conns[3 + SHARDS].queued() > before,
            "a talking peer is pinged too"
        );
        // A WebSocket peer that has said nothing for longer than the timeout is closed.
        conns[0].heard().watch();
        r.sweep(0, soon, Duration::from_millis(1));
        assert_eq!(conns[0].close_reason(), Some(CloseReason::HeartbeatTimeout));
        // One whose peer is not watched (an HTTP stream) is only pinged.
        assert_eq!(conns[SHARDS].close_reason(), None);
        assert!(conns[SHARDS].queued() > 0);
    }

    #[test]
    fn close_all_closes_every_live_connection() {
        let r = Registry::default();
        let conns: Vec<_> = (0..40).map(|_| out()).collect();
        let entries: Vec<_> = conns.iter().map(|o| r.insert(o)).collect();
        let mut entries = entries.into_iter();
        r.remove(entries.next().expect("one"));
        r.close_all(&CloseReason::Shutdown);
        assert_eq!(conns[0].close_reason(), None, "removed before the close");
        assert!(conns[1..]
            .iter()
            .all(|o| o.close_reason() == Some(CloseReason::Shutdown)));
        // One that registers after the close is closed at once.
        let late = out();
        r.insert(&late);
        assert_eq!(late.close_reason(), Some(CloseReason::Shutdown));
    }
}
