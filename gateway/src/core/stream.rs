//! One history channel on this node: its position, its live subscribers, and the ones
//! joining. The hub keeps one [`Stream`] per history channel with local subscribers; all of
//! its state sits behind one mutex, taken by the broker's push callback and by subscribes.
//!
//! The promise: within one epoch, each subscriber gets strictly consecutive offsets, no gap
//! and no duplicate, or is told it cannot (`unsubscribed` / `insufficient_state`).
//!
//! - `position` is (epoch, top): every live subscriber has received everything up to `top`.
//!   A publication with offset `top + 1` goes out live; one at or below `top` is a duplicate
//!   and is dropped; one above `top + 1` reveals a gap (a lost pub/sub message, a Redis
//!   reconnect). Then publications wait in `pending` while the gap is read from history,
//!   and go out after it. A gap history cannot fill ends the live subscriptions with
//!   `insufficient_state`; a new epoch does too.
//! - A joining subscriber waits for a history read that *started after it joined*, so that
//!   the read and the publications it sees live (its `tail`) overlap and nothing falls
//!   between them. The read gives its replay (what it missed, when it asked to recover) and
//!   its start position; the tail, less what the read already had, follows the replay.
//!   The subscriber goes live when its protocol has sent the subscribe reply
//!   ([`Stream::activate`]), so the reply always comes before the replay, and before an
//!   `unsubscribed` that ends the subscription in between. A protocol that carries the
//!   replay inside its subscribe reply (Centrifugo) joins with `inline`: the replay comes
//!   back in [`Joined::replay`] instead, and only the tail follows the reply.
//! - Reads are coalesced: all the joiners and the gap of one channel share one read, which
//!   the hub batches for `recover_batch_ms` (see `core::hub`).
//!
//! Bounds: `pending` holds at most `2 × history_size` publications (beyond that the gap
//! cannot be filled from history anyway, and the live subscriptions end with
//! `insufficient_state`); a joiner's tail is bounded by its outbound queue's byte cap (past
//! it the joiner is closed as a slow consumer, as a live one would be).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::hub::{fan_out, ConnId};
use crate::broker::{Envelope, History, Position, Since};
use crate::config::ChannelOptions;
use crate::conn::event::{Encoded, Event};
use crate::conn::outbound::{Outbound, Parts, Pushed};
use crate::error::CloseReason;
use crate::metrics::Metrics;

/// The code of the `unsubscribed` event when a subscription cannot stay gap-free.
pub const INSUFFICIENT_STATE: &str = "insufficient_state";

/// What a joining subscriber learns once its read is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The channel's epoch and top offset when it joined.
    pub position: Position,
    /// Whether the asked-for position was recovered (`None`: it did not ask).
    pub recovered: Option<bool>,
    /// For an `inline` joiner that recovered: what it missed, `(offset, data)` in order,
    /// for its protocol to put in the subscribe reply. Empty otherwise.
    pub replay: Vec<(u64, String)>,
}

/// A publication held back: it waits for a gap to be filled, or for the position.
struct Held {
    offset: Option<u64>,
    epoch: Option<Arc<str>>,
    data: String,
}

enum Join {
    /// Waits for a read that started after `after_read` reads had started.
    Waiting {
        after_read: u64,
        recover: Option<Position>,
        /// Hand the replay back in [`Joined::replay`] rather than queue it.
        inline: bool,
        reply: oneshot::Sender<Joined>,
    },
    /// Read done; its frames (replay, then tail) go out on activation.
    Ready,
    /// Ended (`insufficient_state`) after its read but before its activation, so before
    /// its subscribe reply went out: on activation its frames go out with the
    /// `unsubscribed` event last, after the reply, and it does not go live.
    Ended,
}

struct Joiner {
    out: Arc<Outbound>,
    state: Join,
    /// Frames to send on activation: the replay, then live publications since it joined.
    frames: Vec<(Option<u64>, Parts)>,
    bytes: usize,
}

/// See the module docs.
pub struct Stream {
    /// Unique among the hub's streams (see [`Stream::id`]).
    id: u64,
    options: ChannelOptions,
    position: Option<(Arc<str>, u64)>,
    live: HashMap<ConnId, Arc<Outbound>>,
    joiners: HashMap<ConnId, Joiner>,
    pending: Vec<Held>,
    /// A read is wanted or running for a gap; `pending` waits for it.
    filling: bool,
    /// Reads started so far.
    reads: u64,
    /// A read is scheduled or running; more requests ride along.
    reading: bool,
    /// When the last publication arrived: a channel that keeps publishing reveals a gap or
    /// a new epoch by itself, so only a quiet one needs the heartbeat's check.
    last_publish: Option<Instant>,
}

impl Stream {
    pub fn new(id: u64, options: ChannelOptions) -> Self {
        Stream {
            id,
            options,
            position: None,
            live: HashMap::new(),
            joiners: HashMap::new(),
            pending: Vec::new(),
            filling: false,
            reads: 0,
            reading: false,
            last_publish: None,
        }
    }

    /// The number the hub gave this stream: a read it scheduled applies only to the stream
    /// it was scheduled for, not to a later one of the same channel.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Subscribers, joining ones included.
    pub fn len(&self) -> usize {
        self.live.len() + self.joiners.len()
    }

    /// The live subscribers (not the joining ones), for presence announcements.
    pub fn live(&self) -> impl Iterator<Item = &Arc<Outbound>> {
        self.live.values()
    }

    /// True while `conn` is subscribed: live, or joining and not ended.
    pub fn contains(&self, conn: ConnId) -> bool {
        self.live.contains_key(&conn)
            || self
                .joiners
                .get(&conn)
                .is_some_and(|j| !matches!(j.state, Join::Ended))
    }

    /// What a read must fetch to serve everyone waiting: what follows our position, or,
    /// for a joiner that recovers (or before we know the position), all that history keeps.
    pub fn wanted(&self) -> Since {
        let size = self.options.history_size;
        match self.position {
            Some((_, top)) if !self.joiners_recovering() => Since::After(top, size),
            _ => Since::Last(size),
        }
    }

    fn joiners_recovering(&self) -> bool {
        self.joiners.values().any(|j| {
            matches!(
                j.state,
                Join::Waiting {
                    recover: Some(_),
                    ..
                }
            )
        })
    }

    /// Adds a joining subscriber (`inline`: see [`Joined::replay`]). Returns true when the
    /// caller must schedule a read.
    pub fn join(
        &mut self,
        conn: ConnId,
        out: Arc<Outbound>,
        recover: Option<Position>,
        inline: bool,
        reply: oneshot::Sender<Joined>,
    ) -> bool {
        self.joiners.insert(
            conn,
            Joiner {
                out,
                state: Join::Waiting {
                    after_read: self.reads,
                    recover,
                    inline,
                    reply,
                },
                frames: Vec::new(),
                bytes: 0,
            },
        );
        self.want_read()
    }

    /// True when a read must be scheduled (none is scheduled or running).
    fn want_read(&mut self) -> bool {
        !std::mem::replace(&mut self.reading, true)
    }

    /// A scheduled read starts now. Returns its number.
    pub fn read_started(&mut self) -> u64 {
        self.reads += 1;
        self.reads
    }

    /// Removes a subscriber. True when it was there.
    pub fn leave(&mut self, conn: ConnId) -> bool {
        self.live.remove(&conn).is_some() || self.joiners.remove(&conn).is_some()
    }

    /// A joiner whose reply went out goes live: its replay and tail first. One that ended
    /// meanwhile gets its frames and the `unsubscribed` event instead, and is gone.
    pub fn activate(&mut self, conn: ConnId, metrics: &Metrics) {
        let Some(j) = self.joiners.remove(&conn) else {
            return;
        };
        let ended = match j.state {
            Join::Ready => false,
            Join::Ended => true,
            Join::Waiting { .. } => {
                // Not read yet (cannot happen: activation follows the reply). Keep it
                // waiting.
                self.joiners.insert(conn, j);
                return;
            }
        };
        for (_, frame) in j.frames {
            if j.out.push_parts(frame) == Pushed::Overflowed {
                metrics.slow_consumer_disconnects.inc([]);
            }
        }
        if !ended {
            self.live.insert(conn, j.out);
        }
    }

    /// A live publication from the broker.
    /// Returns true when the caller must schedule a read (a gap, or a new epoch).
    pub fn publish(&mut self, channel: &str, env: &Envelope<'_>, metrics: &Metrics) -> bool {
        self.last_publish = Some(Instant::now());
        let (offset, epoch) = env
            .position
            .map_or((None, None), |(o, e)| (Some(o), Some(e)));
        if self.position.is_none() || self.filling {
            return self.hold(channel, offset, epoch, env.data, metrics);
        }
        self.advance(channel, offset, epoch, env.data, metrics)
    }

    /// Keeps a publication for after the read that fills the gap (or learns the position).
    /// Only here is it copied: the usual publication, the next in order, is sent from the
    /// broker's buffer.
    fn hold(
        &mut self,
        channel: &str,
        offset: Option<u64>,
        epoch: Option<&str>,
        data: &str,
        metrics: &Metrics,
    ) -> bool {
        if self.pending.len() >= 2 * self.options.history_size.max(1) {
            // The gap is longer than history could ever fill.
            self.give_up(channel, metrics);
            self.position = None;
        }
        self.pending.push(Held {
            offset,
            epoch: epoch.map(Arc::from),
            data: data.to_owned(),
        });
        self.want_read()
    }

    /// Delivers a publication if it is next, drops it if it is old, or starts filling a gap.
    fn advance(
        &mut self,
        channel: &str,
        offset: Option<u64>,
        epoch: Option<&str>,
        data: &str,
        metrics: &Metrics,
    ) -> bool {
        let Some((ours, top)) = self.position.clone() else {
            return self.hold(channel, offset, epoch, data, metrics);
        };
        let Some(offset) = offset else {
            // A plain PUBLISH on a history channel: live only, no position.
            self.send(channel, None, data, metrics);
            return false;
        };
        if epoch != Some(&*ours) {
            // History was lost (Redis restarted empty, it expired): nobody can stay gap-free.
            self.give_up(channel, metrics);
            self.position = None;
            return self.hold(channel, Some(offset), epoch, data, metrics);
        }
        if offset <= top {
            return false;
        }
        if offset > top + 1 {
            self.filling = true;
            return self.hold(channel, Some(offset), epoch, data, metrics);
        }
        self.send(channel, Some((offset, &ours)), data, metrics);
        self.position = Some((ours, offset));
        false
    }

    /// Sends one publication to the live subscribers and queues it in every joiner's tail.
    fn send(&mut self, channel: &str, at: Option<(u64, &str)>, data: &str, metrics: &Metrics) {
        let mut encoded = Encoded::new(Event::Message {
            channel,
            data,
            position: at,
        });
        fan_out(self.live.values(), &mut encoded, metrics, Instant::now());
        let mut overflowed = Vec::new();
        for (conn, j) in self.joiners.iter_mut() {
            if matches!(j.state, Join::Ended) {
                continue;
            }
            let frame = j.out.frame_encoded(&mut encoded);
            j.bytes += frame.len();
            j.frames.push((at.map(|(o, _)| o), frame));
            if j.bytes > j.out.cap() {
                overflowed.push(*conn);
            }
        }
        for conn in overflowed {
            if let Some(j) = self.joiners.remove(&conn) {
                j.out.close(CloseReason::SlowConsumer(j.out.cap()));
                metrics.slow_consumer_disconnects.inc([]);
            }
        }
    }

    /// Ends every subscription that has been promised a gap-free stream: the live ones and
    /// the joiners whose read is done. A joiner whose reply may not have gone out yet is
    /// told on activation, after the reply (see [`Join::Ended`]): told now, it would read
    /// `unsubscribed` before the subscribe's ack and take the ack for a live subscription.
    /// Waiting joiners will learn the new state from their read.
    fn give_up(&mut self, channel: &str, metrics: &Metrics) {
        let mut event = Encoded::new(Event::Unsubscribed {
            channel,
            code: INSUFFICIENT_STATE,
        });
        let mut n = 0;
        for out in self.live.values() {
            out.push_encoded(&mut event, None);
            n += 1;
        }
        self.live.clear();
        for j in self.joiners.values_mut() {
            match j.state {
                Join::Ready => {
                    j.frames.push((None, j.out.frame_encoded(&mut event)));
                    j.state = Join::Ended;
                    n += 1;
                }
                Join::Waiting { .. } => {
                    j.frames.clear();
                    j.bytes = 0;
                }
                Join::Ended => {}
            }
        }
        if n > 0 {
            metrics.insufficient_state.add([], n);
            tracing::info!(
                channel,
                subscribers = n,
                "cannot keep the stream gap-free; told the subscribers"
            );
        }
        self.pending.clear();
        self.filling = false;
    }

    /// A read that started as number `read` finished. Returns true when another read is
    /// needed (joiners that joined after it started, or a gap it did not cover).
    pub fn apply(
        &mut self,
        channel: &str,
        read: u64,
        result: Result<History, crate::error::BrokerError>,
        metrics: &Metrics,
    ) -> bool {
        self.reading = false;
        let h = match result {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(channel, error = %e, "history read failed");
                // The joiners this read was for fail now (`unavailable`); later ones wait
                // for the next read.
                let before = self.joiners.len();
                self.joiners.retain(|_, j| match j.state {
                    Join::Waiting { after_read, .. } => after_read >= read,
                    Join::Ready | Join::Ended => true,
                });
                let again = self.joiners.len() < before
                    && self
                        .joiners
                        .values()
                        .any(|j| matches!(j.state, Join::Waiting { .. }));
                if self.filling || self.position.is_none() {
                    self.give_up(channel, metrics);
                    self.position = None;
                }
                self.pending.clear();
                self.reading = again;
                return again;
            }
        };
        let epoch: Arc<str> = Arc::from(h.epoch.as_str());
        // The stream's own position first: a new epoch, or a gap to fill.
        match self.position.clone() {
            Some((ours, _)) if *ours != *epoch => {
                self.give_up(channel, metrics);
                self.position = Some((epoch.clone(), h.top));
            }
            Some((_, top)) if h.top > top => {
                let covered = h.publications.first().is_some_and(|(o, _)| *o <= top + 1);
                if covered {
                    for (o, d) in h.publications.iter().filter(|(o, _)| *o > top) {
                        self.send(channel, Some((*o, &epoch)), d, metrics);
                    }
                } else {
                    self.give_up(channel, metrics);
                }
                self.position = Some((epoch.clone(), h.top));
            }
            Some(_) => {}
            None => self.position = Some((epoch.clone(), h.top)),
        }
        self.filling = false;
        // Then the joiners this read serves.
        let mut encodings: Vec<Encoded<'_>> = h
            .publications
            .iter()
            .map(|(o, d)| {
                Encoded::new(Event::Message {
                    channel,
                    data: d,
                    position: Some((*o, &h.epoch)),
                })
            })
            .collect();
        let mut again = false;
        for j in self.joiners.values_mut() {
            let after = match &j.state {
                Join::Waiting { after_read, .. } => *after_read,
                Join::Ready | Join::Ended => continue,
            };
            if after >= read {
                again = true;
                continue;
            }
            let Join::Waiting {
                recover,
                inline,
                reply,
                ..
            } = std::mem::replace(&mut j.state, Join::Ready)
            else {
                continue;
            };
            let recovered = recover.map(|want| {
                let ok = *want.epoch == *epoch
                    && want.offset <= h.top
                    && h.top - want.offset <= self.options.max_recover() as u64
                    && (want.offset == h.top
                        || h.publications
                            .first()
                            .is_some_and(|(o, _)| *o <= want.offset + 1));
                (ok, want.offset)
            });
            let mut frames = Vec::new();
            let mut replay = Vec::new();
            if let Some((true, from)) = recovered {
                for (i, (o, d)) in h.publications.iter().enumerate() {
                    if *o <= from {
                        continue;
                    }
                    if inline {
                        replay.push((*o, d.clone()));
                    } else {
                        frames.push((Some(*o), j.out.frame_encoded(&mut encodings[i])));
                    }
                }
            }
            // The tail, less what the read already had.
            frames.extend(
                j.frames
                    .drain(..)
                    .filter(|(o, _)| o.is_none_or(|o| o > h.top)),
            );
            j.bytes = frames.iter().map(|(_, f)| f.len()).sum();
            j.frames = frames;
            let _ = reply.send(Joined {
                position: Position {
                    epoch: h.epoch.clone(),
                    offset: h.top,
                },
                recovered: recovered.map(|(ok, _)| ok),
                replay,
            });
        }
        drop(encodings);
        // Then what waited for this read, in order.
        for held in std::mem::take(&mut self.pending) {
            if self.advance(
                channel,
                held.offset,
                held.epoch.as_deref(),
                &held.data,
                metrics,
            ) {
                again = true;
            }
        }
        if again {
            self.reading = true;
        }
        again
    }

    /// A periodic check of a channel quiet for `quiet`: is the epoch still ours (Redis may
    /// have restarted empty), and did we miss anything (a last publication lost, with no
    /// later one to reveal the gap)? Live delivery goes on while the read runs: what it
    /// finds beyond our position is sent, and the live copies that arrive later are dropped
    /// as duplicates. True when the caller must schedule a read.
    pub fn check(&mut self, quiet: std::time::Duration) -> bool {
        let idle = self.last_publish.is_none_or(|t| t.elapsed() >= quiet);
        if idle && self.position.is_some() && !self.live.is_empty() {
            return self.want_read();
        }
        false
    }
}
