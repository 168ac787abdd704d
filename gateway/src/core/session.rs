//! One connection's session, whatever protocol it speaks: what its commands do.
//!
//! A protocol adapter decodes a frame into a [`Command`], runs it with [`Session::execute`]
//! and encodes the result in its own terms. The checks (channel permissions, the
//! subscription cap, the publish rules, the token's user on refresh) live here once, so every
//! protocol enforces the same rules.
//!
//! `send` succeeds only once the message is in the backends' Redis stream. It needs a user
//! (unless `anonymous_send`), its `data` is capped at `max_send_bytes`, and a user's sends
//! share one rate (`send_rate_per_user`) over all the user's connections on the node: the
//! stream is shared by every node and every backend, so one client must not fill it.
//!
//! Command failures are answered, not fatal: a client bug should cost one request, not the
//! connection and every subscription on it. Only the per-connection rate limit closes.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use shared::protocol::ErrorCode;

use super::hub::{ConnId, Hub};
use super::stream::Joined;
use super::{Core, Sender};
use crate::auth::Identity;
use crate::broker::{History, Position};
use crate::cluster::inbound::Event as Inbound;
use crate::cluster::presence::{Listing, Member, Stats};
use crate::conn::clock::TokenClock;
use crate::conn::event::Event;
use crate::conn::limiter::{ConnLimiter, Verdict};
use crate::conn::outbound::{Outbound, Pushed};
use crate::error::{Blame, CloseReason};

/// A connection's command, decoded by its protocol adapter. Borrowed from the frame.
#[derive(Debug, Clone)]
pub enum Command<'a> {
    /// Start receiving a channel's messages; on a history channel, optionally from
    /// `recover`, with what was missed first.
    Subscribe {
        channel: &'a str,
        recover: Option<Position>,
    },
    /// Read a history channel's history: the last `limit` publications (all it keeps by
    /// default), or those after `since`.
    History {
        channel: &'a str,
        limit: Option<usize>,
        since: Option<Position>,
    },
    /// Stop receiving a channel's messages.
    Unsubscribe { channel: &'a str },
    /// Publish `data` (JSON text) to a channel.
    Publish { channel: &'a str, data: &'a str },
    /// Send `data` (JSON text) to the backends' inbound stream. `destination` is recorded
    /// with it when the protocol names one (STOMP's `SEND /app/<x>`); v1 has none.
    Send {
        data: &'a str,
        destination: Option<&'a str>,
    },
    /// Replace the connection's token before it expires.
    Refresh { token: &'a str },
    /// Who is subscribed to a presence channel: at most `presence_max_members` members.
    /// Only for a subscriber of the channel.
    Presence { channel: &'a str },
    /// How many connections and users are subscribed to a presence channel, in O(1). Only
    /// for a subscriber of the channel.
    PresenceStats { channel: &'a str },
}

/// What a command did, for the adapter's reply.
pub enum Done {
    Ok,
    /// A publish on a history channel: the publication's position.
    Published(Position),
    /// A subscribe; see [`Subscription`].
    Subscribed(Subscription),
    History(History),
    /// The answer to [`Command::Presence`].
    Presence(Listing),
    /// The answer to [`Command::PresenceStats`].
    PresenceStats(Stats),
}

/// A subscribe that went through. On a history channel, the subscriber starts receiving
/// (what it missed, then live publications) when this is dropped: the adapter queues its
/// subscribe reply first, so that the reply comes before the replay.
pub struct Subscription {
    hub: Arc<Hub>,
    channel: String,
    conn: ConnId,
    /// On a history channel: its position, and whether the asked-for one was recovered.
    pub joined: Option<Joined>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.joined.is_some() {
            self.hub.activate(&self.channel, self.conn);
        }
    }
}

/// Why a command failed: a code every protocol maps onto its own errors, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// What the per-connection rate limit says about one incoming frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Handle the frame.
    Yes,
    /// Refuse it with this failure (`rate_limited`); the connection stays open.
    Refuse(Failure),
}

/// The channels a connection is subscribed to. Shared with the connection's task so that it
/// can unsubscribe everything when the connection ends, however the reader stopped.
pub type Subscriptions = Arc<Mutex<ChannelSet>>;

/// The channels a connection is subscribed to: a plain list, searched in order. A
/// connection holds a few (at most `max_subscriptions`, 128 by default), and a hash set's
/// smallest table is about 120 bytes on the heap where a one-entry list is 24: paid by
/// every subscribed connection.
#[derive(Default)]
pub struct ChannelSet(Vec<String>);

impl ChannelSet {
    pub fn contains(&self, channel: &str) -> bool {
        self.0.iter().any(|c| c == channel)
    }

    /// Adds `channel`; false when it was there already.
    pub fn insert(&mut self, channel: String) -> bool {
        if self.contains(&channel) {
            return false;
        }
        self.0.push(channel);
        true
    }

    /// Removes `channel`; false when it was not there.
    pub fn remove(&mut self, channel: &str) -> bool {
        match self.0.iter().position(|c| c == channel) {
            Some(i) => {
                self.0.swap_remove(i);
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn retain(&mut self, keep: impl FnMut(&String) -> bool) {
        self.0.retain(keep);
    }

    /// Empties the set, handing its channels over.
    pub fn drain(&mut self) -> std::vec::Drain<'_, String> {
        self.0.drain(..)
    }
}

/// A connection admitted at the handshake, as the core knows it.
pub struct Conn {
    pub id: ConnId,
    /// The wire id, as the directory and the inbound stream know it.
    /// Shared by the session, its cleanup and the directory: one allocation.
    pub conn_id: Arc<str>,
    pub out: Arc<Outbound>,
    pub ip: IpAddr,
    /// The verified token's identity; `None` for anonymous connections.
    pub identity: Option<Identity>,
    /// The connection's records in Redis, when the handshake left them to be written with
    /// the `connect` event (`Directory::add_unwritten`).
    pub unwritten: Option<crate::cluster::directory::Unwritten>,
}

/// See the module docs.
pub struct Session {
    id: ConnId,
    conn_id: Arc<str>,
    core: Arc<Core>,
    out: Arc<Outbound>,
    subs: Subscriptions,
    /// Boxed: `None` for an anonymous connection, which would otherwise reserve its 128
    /// bytes for its whole life.
    identity: Option<Box<Identity>>,
    clock: Option<Arc<TokenClock>>,
    limiter: ConnLimiter,
    /// Channels a subscription token granted beyond the connection token's `channels`.
    /// Boxed, and only once there is one: few connections have any, and an empty set is
    /// 48 bytes in every idle session.
    #[allow(clippy::box_collection)] // the point: 8 bytes while absent, not an empty set's 48
    granted: Option<Box<HashSet<String>>>,
    /// The protocol puts a subscription's replay in its subscribe reply.
    replay_in_reply: bool,
    /// The key of this connection's `send`s in the node's send limiter.
    sender: Sender,
}

/// What outlives the session for the cleanup after the socket closed.
pub struct Ending {
    id: ConnId,
    ip: IpAddr,
    conn_id: Arc<str>,
    user_id: Option<String>,
    subs: Subscriptions,
}

impl Session {
    /// Opens a session: appends the `connect` event to the inbound stream first, so that it
    /// comes before anything the connection sends, and, in the same round trip and just
    /// before it, writes the connection's records if the handshake left them.
    pub async fn open(core: Arc<Core>, conn: Conn) -> (Session, Ending) {
        let Conn {
            id,
            conn_id,
            out,
            identity,
            ip,
            unwritten,
        } = conn;
        let clock = identity
            .as_ref()
            .map(|i| Arc::new(TokenClock::new(i.exp, core.config.token_grace())));
        let user_id = identity.as_ref().map(|i| i.user_id.clone());
        match unwritten {
            Some(records) => {
                core.directory
                    .write_with(
                        records,
                        &core.inbound,
                        Inbound::Connect,
                        &conn_id,
                        user_id.as_deref(),
                        "",
                    )
                    .await
            }
            None => {
                core.inbound
                    .lifecycle(Inbound::Connect, &conn_id, user_id.as_deref(), "")
                    .await
            }
        }
        let c = &core.config;
        let limiter = ConnLimiter::new(
            c.message_rate,
            c.message_burst,
            c.byte_rate,
            (c.max_message_bytes * 4).min(u32::MAX as usize) as u32,
            c.rate_limit_strikes,
        );
        let subs = Subscriptions::default();
        let sender = match &user_id {
            Some(user) => Sender::User(user.clone()),
            None => Sender::Anonymous(ip),
        };
        let ending = Ending {
            id,
            ip,
            conn_id: conn_id.clone(),
            user_id,
            subs: subs.clone(),
        };
        let session = Session {
            id,
            conn_id,
            core,
            out,
            subs,
            identity: identity.map(Box::new),
            clock,
            limiter,
            granted: None,
            replay_in_reply: false,
            sender,
        };
        (session, ending)
    }

    /// The wire id of the connection.
    pub fn conn_id(&self) -> &str {
        &self.conn_id
    }

    /// The connection's user; `None` when anonymous.
    pub fn user_id(&self) -> Option<&str> {
        self.identity.as_ref().map(|i| i.user_id.as_str())
    }

    /// The node's id, for welcome frames.
    pub fn node_id(&self) -> &str {
        &self.core.config.node_id
    }

    /// When the connection's token expires (Unix seconds); `None` without a token.
    pub fn expires(&self) -> Option<u64> {
        self.identity.as_ref().map(|i| i.exp)
    }

    /// Lets this connection subscribe to `channel` (and read its history) whatever its
    /// token's `channels` claim says: a protocol adapter verified a subscription token for
    /// it. Granted until [`Session::revoke`].
    pub fn grant(&mut self, channel: &str) {
        self.granted
            .get_or_insert_with(Box::default)
            .insert(channel.to_owned());
    }

    /// From now on, a subscribe that recovers hands its missed publications back in
    /// [`Subscription::joined`] (`replay`) for the reply, rather than queueing them behind
    /// it: for a protocol whose subscribe reply carries them (Centrifugo).
    pub fn replay_in_reply(&mut self) {
        self.replay_in_reply = true;
    }

    fn is_granted(&self, channel: &str) -> bool {
        self.granted.as_ref().is_some_and(|g| g.contains(channel))
    }

    /// Takes back a [`Session::grant`].
    pub fn revoke(&mut self, channel: &str) {
        if let Some(g) = self.granted.as_mut() {
            g.remove(channel);
        }
    }

    /// The token clock, which the writer watches; `None` without a token.
    pub fn clock(&self) -> Option<Arc<TokenClock>> {
        self.clock.clone()
    }

    /// Queues a reply that the adapter encoded.
    pub fn reply(&self, bytes: bytes::Bytes) {
        let m = &self.core.metrics;
        m.hot.messages_out.fetch_add(1, Ordering::Relaxed);
        m.hot
            .bytes_out
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if self.out.push(bytes) == Pushed::Overflowed {
            m.slow_consumer_disconnects.inc([]);
        }
    }

    /// Encodes `event` in the connection's protocol and queues it as a reply.
    fn notify(&self, event: &Event<'_>) {
        if self.out.push_event(event) == Pushed::Overflowed {
            self.core.metrics.slow_consumer_disconnects.inc([]);
        }
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, ChannelSet> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an incoming frame of `len` bytes and applies the connection's rate limits.
    /// Past `rate_limit_strikes` refusals in a row the connection closes with 1008.
    pub fn admit(&mut self, len: usize) -> Result<Admit, CloseReason> {
        let m = &self.core.metrics;
        m.hot.messages_in.fetch_add(1, Ordering::Relaxed);
        m.hot.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
        self.limit(len)
    }

    /// Applies the connection's rate limits to a ping of `len` bytes, as to a message: each
    /// ping costs a pong, so a ping flood is a message flood. Not counted as a message in
    /// the traffic metrics.
    pub fn admit_ping(&mut self, len: usize) -> Result<Admit, CloseReason> {
        self.limit(len)
    }

    fn limit(&mut self, len: usize) -> Result<Admit, CloseReason> {
        let m = &self.core.metrics;
        match self.limiter.check(len) {
            Verdict::Pass => Ok(Admit::Yes),
            Verdict::Refuse(kind) => {
                m.rate_limit_hits.inc([kind]);
                let message = format!("over the {kind} rate; slow down or be disconnected");
                Ok(Admit::Refuse(Failure::new(ErrorCode::RateLimited, message)))
            }
            Verdict::Close(kind) => {
                m.rate_limit_hits.inc([kind]);
                Err(CloseReason::Policy(if kind == "bytes" {
                    "byte rate exceeded"
                } else {
                    "message rate exceeded"
                }))
            }
        }
    }

    /// Counts and logs a refused command; the adapter then answers it in its own terms.
    pub fn refused(&self, failure: &Failure) {
        self.core
            .metrics
            .request_errors
            .inc([failure.code.as_str()]);
        tracing::debug!(conn = self.id, code = failure.code.as_str(), message = %failure.message, "request refused");
    }

    /// Runs one command.
    pub async fn execute(&mut self, cmd: Command<'_>) -> Result<Done, Failure> {
        match cmd {
            Command::Subscribe { channel, recover } => self.subscribe(channel, recover).await,
            Command::History {
                channel,
                limit,
                since,
            } => self.history(channel, limit, since).await,
            Command::Unsubscribe { channel } => {
                if self.subs().remove(channel) {
                    let r = self.core.hub.unsubscribe(channel, self.id).await;
                    let presence = &self.core.presence;
                    if presence.enabled(channel) {
                        presence.leave(channel, &self.conn_id).await;
                    }
                    r.map_err(unavailable)?;
                }
                Ok(Done::Ok)
            }
            Command::Presence { channel } => {
                self.may_see_presence(channel)?;
                let max = self.core.config.presence_max_members;
                let listing = self.core.presence.list(channel, max).await;
                listing.map(Done::Presence).map_err(unavailable)
            }
            Command::PresenceStats { channel } => {
                self.may_see_presence(channel)?;
                let stats = self.core.presence.stats(channel).await;
                stats.map(Done::PresenceStats).map_err(unavailable)
            }
            Command::Publish { channel, data } => {
                let by_claim = self
                    .identity
                    .as_deref()
                    .is_some_and(|i| shared::channel::any_match(&i.publish, channel));
                if !by_claim
                    && !shared::channel::any_match(&self.core.config.publish_allow, channel)
                {
                    return Err(Failure::new(
                        ErrorCode::Forbidden,
                        format!("publishing to `{channel}` is not allowed"),
                    ));
                }
                let at = self
                    .core
                    .hub
                    .publish(channel, data, None)
                    .await
                    .map_err(unavailable)?;
                Ok(at.map_or(Done::Ok, Done::Published))
            }
            Command::Refresh { token } => self.refresh(token).await.map(|()| Done::Ok),
            Command::Send { data, destination } => {
                self.send(data, destination).await.map(|()| Done::Ok)
            }
        }
    }

    /// True when the token's `channels` claim (if any) allows `channel`.
    fn may_subscribe(&self, channel: &str) -> Result<(), Failure> {
        let allowed = self.is_granted(channel)
            || self
                .identity
                .as_deref()
                .and_then(|i| i.channels.as_ref())
                .is_none_or(|patterns| shared::channel::any_match(patterns, channel));
        if allowed {
            Ok(())
        } else {
            Err(Failure::new(
                ErrorCode::Forbidden,
                format!("your token does not allow subscribing to `{channel}`"),
            ))
        }
    }

    /// Presence reads: `not_enabled` on a channel without presence, `forbidden` unless
    /// this connection is subscribed to it.
    fn may_see_presence(&self, channel: &str) -> Result<(), Failure> {
        if !self.core.presence.enabled(channel) {
            return Err(Failure::new(
                ErrorCode::NotEnabled,
                format!("`{channel}` has no presence"),
            ));
        }
        let subscribed = self.subs().contains(channel) && self.core.hub.contains(channel, self.id);
        if !subscribed {
            return Err(Failure::new(
                ErrorCode::Forbidden,
                format!("subscribe to `{channel}` to see its presence"),
            ));
        }
        Ok(())
    }

    /// A history read, allowed to whoever may subscribe to the channel. Publications after
    /// a position of another epoch mean nothing: then the reply has the current epoch and
    /// none.
    async fn history(
        &self,
        channel: &str,
        limit: Option<usize>,
        since: Option<Position>,
    ) -> Result<Done, Failure> {
        self.may_subscribe(channel)?;
        match self.core.hub.history(channel, limit, since.as_ref()).await {
            Ok(Some(h)) => Ok(Done::History(h)),
            Ok(None) => Err(Failure::new(
                ErrorCode::NotEnabled,
                format!("`{channel}` keeps no history"),
            )),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Appends a `send` to the inbound stream, after its own checks: a user (unless
    /// `anonymous_send`), `max_send_bytes`, and the user's `send_rate_per_user`.
    async fn send(&self, data: &str, destination: Option<&str>) -> Result<(), Failure> {
        let c = &self.core.config;
        let user = self.identity.as_ref().map(|i| i.user_id.as_str());
        if user.is_none() && !c.anonymous_send {
            return Err(Failure::new(
                ErrorCode::Forbidden,
                "anonymous connections may not send; connect with a token",
            ));
        }
        if data.len() > c.max_send_bytes {
            return Err(Failure::new(
                ErrorCode::MessageTooBig,
                format!(
                    "the data of a send may hold at most {} bytes",
                    c.max_send_bytes
                ),
            ));
        }
        if self.core.send_limiter.check(&self.sender).is_err() {
            self.core.metrics.rate_limit_hits.inc(["send"]);
            return Err(Failure::new(
                ErrorCode::RateLimited,
                format!(
                    "over the send rate of {} per second for this user",
                    c.send_rate_per_user
                ),
            ));
        }
        self.core
            .inbound
            .append(Inbound::Message, &self.conn_id, user, data, destination)
            .await
            .map_err(unavailable)
    }

    /// Replaces the connection's token. The new token must name the same user. Its claims
    /// replace the old ones at once: a subscription that its `channels` claim no longer allows
    /// is ended, and the client is told so (`unsubscribed`, `forbidden`) before the ack.
    async fn refresh(&mut self, token: &str) -> Result<(), Failure> {
        let (Some(auth), Some(current)) = (&self.core.auth, self.identity.as_deref()) else {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "this connection has no token to refresh",
            ));
        };
        let fresh = auth
            .verify(token)
            .await
            .map_err(|e| Failure::new(ErrorCode::Unauthorized, e.to_string()))?;
        if fresh.user_id != current.user_id {
            return Err(Failure::new(
                ErrorCode::Unauthorized,
                "refresh token names a different sub",
            ));
        }
        if let Some(clock) = &self.clock {
            clock.renew(fresh.exp, &self.out);
        }
        let mut revoked = Vec::new();
        let granted = self.granted.as_deref();
        self.subs().retain(|channel| {
            // A subscription token's grant outlives the connection token's refresh.
            let keep = granted.is_some_and(|g| g.contains(channel))
                || may_subscribe(Some(&fresh), channel);
            if !keep {
                revoked.push(channel.clone());
            }
            keep
        });
        self.identity = Some(Box::new(fresh));
        for channel in &revoked {
            // Locally the subscription is gone whatever the broker says; a failed broker
            // unsubscribe is left to the hub's reconcile.
            let _ = self.core.hub.unsubscribe(channel, self.id).await;
            self.notify(&Event::Unsubscribed {
                channel,
                code: ErrorCode::Forbidden.as_str(),
            });
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        channel: &str,
        recover: Option<Position>,
    ) -> Result<Done, Failure> {
        let hub = &self.core.hub;
        {
            let mut subs = self.subs();
            // The hub may have ended a history subscription (`insufficient_state`): then the
            // name is still in our set, and the client subscribes again to resume.
            if subs.contains(channel) && hub.contains(channel, self.id) {
                return Ok(Done::Ok);
            }
            self.may_subscribe(channel)?;
            let max = self.core.config.max_subscriptions;
            if !subs.contains(channel) && subs.len() >= max {
                return Err(Failure::new(
                    ErrorCode::TooManySubscriptions,
                    format!("a connection may hold at most {max} subscriptions"),
                ));
            }
            subs.insert(channel.to_owned());
        }
        let asked = recover.is_some();
        // Into presence before the hub: the subscriber is not told of its own join.
        let presence = self.core.presence.enabled(channel);
        if presence {
            let member = Member {
                conn_id: self.conn_id.to_string(),
                user_id: self.user_id().map(str::to_owned),
                info: self.identity.as_ref().and_then(|i| i.info.clone()),
            };
            self.core.presence.join(channel, member).await;
        }
        match hub
            .subscribe_with(channel, self.id, &self.out, recover, self.replay_in_reply)
            .await
        {
            Ok(s) => {
                if let (true, Some(j)) = (asked, &s.joined) {
                    let label = if j.recovered == Some(true) {
                        "true"
                    } else {
                        "false"
                    };
                    self.core.metrics.recoveries.inc([label]);
                }
                Ok(Done::Subscribed(Subscription {
                    hub: hub.clone(),
                    channel: channel.to_owned(),
                    conn: self.id,
                    joined: s.joined,
                }))
            }
            Err(e) => {
                self.subs().remove(channel);
                if presence {
                    self.core.presence.leave(channel, &self.conn_id).await;
                }
                Err(unavailable(e))
            }
        }
    }
}

/// True when the token (if any) allows subscribing to `channel`: no `channels` claim, or a
/// pattern in it that matches.
fn may_subscribe(identity: Option<&Identity>, channel: &str) -> bool {
    identity
        .and_then(|i| i.channels.as_ref())
        .is_none_or(|patterns| shared::channel::any_match(patterns, channel))
}

fn unavailable(e: crate::error::BrokerError) -> Failure {
    Failure::new(ErrorCode::Unavailable, e.to_string())
}

impl Ending {
    /// After the socket closed: unsubscribe (and leave presence), leave the directory,
    /// append `disconnect`, and count and log the close.
    pub async fn close(self, core: &Core, reason: &CloseReason) {
        let channels: Vec<String> = self
            .subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for channel in channels {
            let _ = core.hub.unsubscribe(&channel, self.id).await;
            if core.presence.enabled(&channel) {
                core.presence.leave(&channel, &self.conn_id).await;
            }
        }
        let close =
            serde_json::json!({"code": reason.code(), "reason": reason.label()}).to_string();
        // Out of the directory, then `disconnect`: in one round trip where Redis allows.
        core.directory
            .remove_with(
                &self.conn_id,
                &core.inbound,
                Inbound::Disconnect,
                self.user_id.as_deref(),
                &close,
            )
            .await;
        closed(core, self.ip, &self.conn_id, reason);
    }
}

/// Counts and logs a connection that closed before its protocol opened a session (a STOMP
/// connection before its CONNECT): it never was in the directory or the inbound stream.
pub fn closed_unopened(core: &Core, peer: IpAddr, conn_id: &str, reason: &CloseReason) {
    closed(core, peer, conn_id, reason);
}

/// Counts and logs a closed connection.
fn closed(core: &Core, peer: IpAddr, conn_id: &str, reason: &CloseReason) {
    let (label, blame) = (reason.label(), reason.blame());
    if let CloseReason::Protocol(kind) = reason {
        core.metrics.protocol_violations.inc([kind]);
    }
    core.metrics.connection_closes.inc([label, blame.as_str()]);
    let code = reason.code();
    match blame {
        Blame::Client => {
            tracing::info!(%peer, conn = %conn_id, code, reason = label, detail = %reason, "connection closed")
        }
        Blame::None => {
            tracing::debug!(%peer, conn = %conn_id, code, reason = label, "connection closed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ChannelSet;

    #[test]
    fn a_channel_set_holds_each_channel_once() {
        let mut s = ChannelSet::default();
        assert!(s.insert("a".into()));
        assert!(s.insert("b".into()));
        assert!(!s.insert("a".into()), "already there");
        assert_eq!(s.len(), 2);
        assert!(s.contains("b") && !s.contains("c"));
        assert!(s.remove("a") && !s.remove("a"));
        s.retain(|c| c != "b");
        assert_eq!(s.len(), 0);
        s.insert("c".into());
        assert_eq!(s.drain().collect::<Vec<_>>(), ["c"]);
        assert_eq!(s.len(), 0);
    }
}
