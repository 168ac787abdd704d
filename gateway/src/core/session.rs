//! Protocol v1 for one connection: turns client requests into hub calls and replies.
//!
//! `send` is acknowledged only once the message is in the backends' Redis stream.
//!
//! Request errors (bad JSON, unknown type, bad channel, too many subscriptions, forbidden)
//! are answered with an `error` frame and leave the connection open: a client bug should cost
//! one request, not the connection and every subscription on it.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use shared::protocol::{parse_request, ErrorCode, Request, RequestId, ServerFrame};

use crate::auth::{Identity, TokenClock};
use crate::conn::frame;
use crate::conn::limiter::{ConnLimiter, Verdict};
use crate::conn::outbound::Outbound;
use crate::conn::socket::Handler;
use crate::core::hub::ConnId;
use crate::error::CloseReason;
use crate::node::Node;

/// The channels a connection is subscribed to. Shared with the connection task so that it can
/// unsubscribe everything when the connection ends, however the reader stopped.
pub type Subscriptions = Arc<Mutex<HashSet<String>>>;

/// One connection's protocol state.
pub struct Session {
    id: ConnId,
    /// The wire id (`welcome.conn_id`), as the directory and the inbound stream know it.
    conn_id: String,
    node: Arc<Node>,
    out: Arc<Outbound>,
    subs: Subscriptions,
    /// The verified token's identity; `None` for anonymous connections.
    identity: Option<Identity>,
    clock: Option<Arc<TokenClock>>,
    limiter: ConnLimiter,
}

type Failure = (ErrorCode, String);

impl Session {
    pub fn new(
        id: ConnId,
        conn_id: String,
        node: Arc<Node>,
        out: Arc<Outbound>,
        identity: Option<Identity>,
        clock: Option<Arc<TokenClock>>,
    ) -> Self {
        let c = &node.config;
        let limiter = ConnLimiter::new(
            c.message_rate,
            c.message_burst,
            c.byte_rate,
            (c.max_message_bytes * 4).min(u32::MAX as usize) as u32,
            c.rate_limit_strikes,
        );
        Session {
            id,
            conn_id,
            node,
            out,
            subs: Subscriptions::default(),
            identity,
            clock,
            limiter,
        }
    }

    /// The subscription set, for cleanup after the connection ends.
    pub fn subscriptions(&self) -> Subscriptions {
        self.subs.clone()
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reply frame to this connection.
    pub fn send(&self, f: &ServerFrame<'_>) {
        let bytes = frame::text(&f.to_json());
        let m = &self.node.metrics;
        m.messages_out.fetch_add(1, Ordering::Relaxed);
        m.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if self.out.push(bytes) == crate::conn::outbound::Pushed::Overflowed {
            m.inc("gateway_slow_consumer_disconnects_total", &[]);
        }
    }

    async fn handle(&mut self, req: Request<'_>) -> Result<(), Failure> {
        match req {
            Request::Subscribe { channel } => self.subscribe(channel).await,
            Request::Unsubscribe { channel } => {
                if self.subs().remove(channel) {
                    self.node
                        .hub
                        .unsubscribe(channel, self.id)
                        .await
                        .map_err(unavailable)?;
                }
                Ok(())
            }
            Request::Publish { channel, data } => {
                let by_claim = self
                    .identity
                    .as_ref()
                    .is_some_and(|i| shared::channel::any_match(&i.publish, channel));
                if !by_claim
                    && !shared::channel::any_match(&self.node.config.publish_allow, channel)
                {
                    return Err((
                        ErrorCode::Forbidden,
                        format!("publishing to `{channel}` is not allowed"),
                    ));
                }
                self.node
                    .hub
                    .publish(channel, data.get())
                    .await
                    .map_err(unavailable)
            }
            Request::Refresh { token } => self.refresh(token).await,
            Request::Send { data } => {
                let user = self.identity.as_ref().map(|i| i.user_id.as_str());
                self.node
                    .inbound
                    .append(
                        crate::cluster::inbound::Event::Message,
                        &self.conn_id,
                        user,
                        data.get(),
                    )
                    .await
                    .map_err(unavailable)
            }
        }
    }

    /// Replaces the connection's token. The new token must name the same user.
    async fn refresh(&mut self, token: &str) -> Result<(), Failure> {
        let (Some(auth), Some(current)) = (&self.node.auth, &self.identity) else {
            return Err((
                ErrorCode::BadRequest,
                "this connection has no token to refresh".into(),
            ));
        };
        let fresh = auth
            .verify(token)
            .await
            .map_err(|e| (ErrorCode::Unauthorized, e.to_string()))?;
        if fresh.user_id != current.user_id {
            return Err((
                ErrorCode::Unauthorized,
                "refresh token names a different sub".into(),
            ));
        }
        if let Some(clock) = &self.clock {
            clock.renew(fresh.exp);
        }
        self.identity = Some(fresh);
        Ok(())
    }

    async fn subscribe(&mut self, channel: &str) -> Result<(), Failure> {
        {
            let mut subs = self.subs();
            if subs.contains(channel) {
                return Ok(());
            }
            let allowed = self
                .identity
                .as_ref()
                .and_then(|i| i.channels.as_ref())
                .is_none_or(|patterns| shared::channel::any_match(patterns, channel));
            if !allowed {
                return Err((
                    ErrorCode::Forbidden,
                    format!("your token does not allow subscribing to `{channel}`"),
                ));
            }
            let max = self.node.config.max_subscriptions;
            if subs.len() >= max {
                return Err((
                    ErrorCode::TooManySubscriptions,
                    format!("a connection may hold at most {max} subscriptions"),
                ));
            }
            subs.insert(channel.to_owned());
        }
        if let Err(e) = self.node.hub.subscribe(channel, self.id, &self.out).await {
            self.subs().remove(channel);
            return Err(unavailable(e));
        }
        Ok(())
    }

    fn reply_error(&self, id: Option<RequestId>, code: ErrorCode, message: String) {
        self.node
            .metrics
            .inc("gateway_request_errors_total", &[("code", code.as_str())]);
        tracing::debug!(conn = self.id, code = code.as_str(), %message, "request refused");
        self.send(&ServerFrame::Error { id, code, message });
    }
}

fn unavailable(e: crate::error::BrokerError) -> Failure {
    (ErrorCode::Unavailable, e.to_string())
}

impl Handler for Session {
    async fn on_text(&mut self, text: String) -> Result<(), CloseReason> {
        let m = &self.node.metrics;
        m.messages_in.fetch_add(1, Ordering::Relaxed);
        m.bytes_in.fetch_add(text.len() as u64, Ordering::Relaxed);
        match self.limiter.check(text.len()) {
            Verdict::Pass => {}
            Verdict::Refuse(kind) => {
                m.inc("gateway_rate_limit_hits_total", &[("kind", kind)]);
                let message = format!("over the {kind} rate; slow down or be disconnected");
                self.reply_error(None, ErrorCode::RateLimited, message);
                return Ok(());
            }
            Verdict::Close(kind) => {
                m.inc("gateway_rate_limit_hits_total", &[("kind", kind)]);
                return Err(CloseReason::Policy(if kind == "bytes" {
                    "byte rate exceeded"
                } else {
                    "message rate exceeded"
                }));
            }
        }
        match parse_request(&text) {
            Err(e) => self.reply_error(e.id, e.code, e.message),
            Ok((id, req)) => match self.handle(req).await {
                Ok(()) => self.send(&ServerFrame::Ack { id }),
                Err((code, message)) => self.reply_error(id, code, message),
            },
        }
        Ok(())
    }
}
