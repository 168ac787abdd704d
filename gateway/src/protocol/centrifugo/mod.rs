//! Centrifugo's client protocol (v2, JSON), so that the stock Centrifugo SDKs connect to
//! `GET /connection/websocket` unchanged (`docs/sdk.md`).
//!
//! It is one more adapter onto the core: commands become [`crate::core::session::Command`]s
//! run by the same [`Session`] as v1's, so the channel permissions, the subscription cap,
//! the rate limits, history and recovery are the ones every protocol gets. What is
//! Centrifugo's own lives here:
//!
//! - [`commands`]: the wire shapes and Centrifugo's error codes;
//! - [`codec`]: pushes, the `{}` ping and the close codes the SDKs understand;
//! - [`presence`]: the one place presence is answered from (the core's presence);
//! - this file: the connection, from the socket opening to its `connect` command and on.
//!
//! A frame may carry several commands, one per line; their replies go back in one frame,
//! in order. The session opens only at `connect` (the token is in the command, unlike v1's
//! handshake), so the `connect` lifecycle event, the directory entry and the per-user cap
//! come then. A socket that sends no `connect` within `handshake_timeout_ms` is closed
//! with 3502 (`stale`).
//!
//! Recovery: Centrifugo returns what a subscriber missed inside its subscribe reply
//! (`publications`), with the stream's top position, and the SDKs rely on it: they emit
//! `subscribed` with `hasRecoveredPublications`, then each publication of the reply, before
//! any push. So the session asks the core to hand the replay back
//! ([`Session::replay_in_reply`]) instead of queueing it as pushes behind the reply (v1's
//! way); the publications that arrived while the history was read (the tail) still follow
//! the reply as pushes, in order, before any live one.
//!
//! The same connection serves the HTTP transports (Centrifugo's bidirectional emulation,
//! `edge::streams`): its frames go down a long response ([`Transport`]) and its commands
//! come through its inbox. Its connect reply then carries the `session` the SDK posts its
//! commands with (a secret, then the connection id), and `pong: false`: a pong would cost
//! the client a POST per ping, and a gone HTTP client shows as a failed write anyway.

pub mod codec;
pub mod commands;
pub mod presence;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::auth::AuthError;
use crate::broker::Position;
use crate::cluster::directory::Emulation;
use crate::conn::clock::TokenClock;
use crate::conn::frame::Transport;
use crate::conn::outbound::{Outbound, Pushed};
use crate::conn::socket::Handler;
use crate::core::session::{
    self, Admit, Command as CoreCommand, Conn, Done, Ending, Session, Subscription,
};
use crate::core::Core;
use crate::error::CloseReason;

pub use codec::{Centrifugo, CODEC, SSE_CODEC, STREAM_CODEC};
use commands::{code, Command, Error, Method, Parsed};

/// The `kind` label of `gateway_protocol_violations_total` for each way a client breaks
/// this protocol; each closes the connection (3502 for a missing connect, 3501 otherwise).
pub mod kind {
    /// A command other than `connect` on a connection that has not connected.
    pub const COMMAND_BEFORE_CONNECT: &str = "centrifugo_command_before_connect";
    /// A second `connect` on a connection.
    pub const SECOND_CONNECT: &str = "centrifugo_second_connect";
    /// More commands in one frame than a connection may send at once.
    pub const BATCH_TOO_LARGE: &str = "centrifugo_batch_too_large";
    /// A line that is not a command object, or a command that needs an id without one.
    pub const MALFORMED_COMMAND: &str = "centrifugo_malformed_command";
    /// No `connect` within `handshake_timeout_ms` of the upgrade.
    pub const CONNECT_TIMEOUT: &str = "centrifugo_connect_timeout";
    /// `connect` refused [`super::MAX_CONNECT_REFUSALS`] times on one connection.
    pub const CONNECT_REFUSED: &str = "centrifugo_connect_refused";
    /// Every kind above.
    pub const ALL: &[&str] = &[
        COMMAND_BEFORE_CONNECT,
        SECOND_CONNECT,
        BATCH_TOO_LARGE,
        MALFORMED_COMMAND,
        CONNECT_TIMEOUT,
        CONNECT_REFUSED,
    ];
}

/// The server version in connect and refresh replies.
const VERSION: &str = concat!("gateway ", env!("CARGO_PKG_VERSION"));

/// Refused `connect`s after which a connection is closed. An SDK closes its socket after
/// one (and reconnects with a new token when it can get one); the bound keeps a client
/// from making the node verify tokens without end on one socket, past the handshake rate.
pub const MAX_CONNECT_REFUSALS: u32 = 3;

enum State {
    /// Upgraded, waiting for `connect`.
    Pending(Conn),
    /// Between the two, while `connect` runs.
    Opening,
    Open(Session),
}

/// What must happen after the socket closed: the session's cleanup, or, for a connection
/// that never connected, counting its close.
pub struct Cleanup {
    core: Arc<Core>,
    ending: Arc<Mutex<Option<Ending>>>,
    ip: IpAddr,
    conn_id: Arc<str>,
}

impl Cleanup {
    pub async fn close(self, reason: &CloseReason) {
        let ending = self.ending.lock().unwrap_or_else(|p| p.into_inner()).take();
        match ending {
            Some(ending) => ending.close(&self.core, reason).await,
            None => {
                // A connect may have stopped between its directory entry and its session.
                self.core.directory.remove(&self.conn_id).await;
                session::closed_unopened(&self.core, self.ip, &self.conn_id, reason);
            }
        }
    }
}

/// A Centrifugo connection: see the module docs.
pub struct Connection {
    core: Arc<Core>,
    state: State,
    out: Arc<Outbound>,
    /// The clock the writer watches; renewed by `connect` and `refresh`.
    clock: Arc<TokenClock>,
    ending: Arc<Mutex<Option<Ending>>>,
    connected: Arc<AtomicBool>,
    max_batch: usize,
    refusals: u32,
    transport: Transport,
    /// Over an HTTP transport: the connection's secret and inbox, until `connect` registers
    /// them in the directory.
    emulation: Option<Emulation>,
}

/// The replies of one frame, and the subscriptions whose replay follows them.
#[derive(Default)]
struct Batch {
    replies: Vec<String>,
    guards: Vec<Subscription>,
}

impl Batch {
    fn reply(&mut self, id: u32, key: &str, result: Value) {
        let mut m = Map::new();
        m.insert("id".into(), id.into());
        m.insert(key.into(), result);
        self.replies.push(Value::Object(m).to_string());
    }

    fn error(&mut self, core: &Core, id: u32, e: Error) {
        core.metrics.request_errors.inc([e.label]);
        tracing::debug!(code = e.code, label = e.label, message = %e.message, "centrifugo command refused");
        if id > 0 {
            self.replies
                .push(json!({ "id": id, "error": e.to_value() }).to_string());
        }
    }
}

impl Connection {
    /// A connection waiting for its `connect`, its cleanup, and the token clock its writer
    /// must watch. Starts the connect timeout. `emulation`: over an HTTP transport.
    pub fn open(
        core: Arc<Core>,
        conn: Conn,
        codec: &'static Centrifugo,
        emulation: Option<Emulation>,
    ) -> (Connection, Cleanup, Arc<TokenClock>) {
        let clock = Arc::new(TokenClock::idle(core.config.token_grace()));
        let connected = Arc::new(AtomicBool::new(false));
        let ending = Arc::new(Mutex::new(None));
        let (weak, flag, wait) = (
            Arc::downgrade(&conn.out),
            connected.clone(),
            core.config.handshake_timeout(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if !flag.load(Ordering::Acquire) {
                if let Some(out) = weak.upgrade() {
                    out.close(CloseReason::Protocol(kind::CONNECT_TIMEOUT));
                }
            }
        });
        let c = &core.config;
        let max_batch = c.max_subscriptions.saturating_add(8).max(256);
        let cleanup = Cleanup {
            core: core.clone(),
            ending: ending.clone(),
            ip: conn.ip,
            conn_id: conn.conn_id.clone(),
        };
        let connection = Connection {
            core,
            out: conn.out.clone(),
            state: State::Pending(conn),
            clock: clock.clone(),
            ending,
            connected,
            max_batch,
            refusals: 0,
            transport: codec.transport(),
            emulation,
        };
        (connection, cleanup, clock)
    }

    /// Queues the frame of a batch's replies, then lets its subscriptions' replays go.
    fn flush(&self, batch: Batch) {
        if !batch.replies.is_empty() {
            let bytes = self.transport.text(&batch.replies.join("\n"));
            match &self.state {
                State::Open(s) => s.reply(bytes),
                _ => {
                    let m = &self.core.metrics;
                    m.hot.messages_out.fetch_add(1, Ordering::Relaxed);
                    m.hot
                        .bytes_out
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if self.out.push(bytes) == Pushed::Overflowed {
                        m.slow_consumer_disconnects.inc([]);
                    }
                }
            }
        }
        drop(batch.guards);
    }

    /// One command line.
    async fn command(&mut self, line: &str, batch: &mut Batch) -> Result<(), CloseReason> {
        let parsed =
            Command::parse(line).map_err(|_| CloseReason::Protocol(kind::MALFORMED_COMMAND))?;
        let session = match &mut self.state {
            State::Open(s) => s,
            _ => {
                return match parsed {
                    Parsed::Pong => Ok(()),
                    Parsed::Call(id, Method::Connect(req)) if id > 0 => {
                        self.connect(id, req, batch).await
                    }
                    Parsed::Call(_, Method::Connect(_)) => {
                        Err(CloseReason::Protocol(kind::MALFORMED_COMMAND))
                    }
                    _ => Err(CloseReason::Protocol(kind::COMMAND_BEFORE_CONNECT)),
                };
            }
        };
        let id = match &parsed {
            Parsed::Pong => 0,
            Parsed::Call(id, _) | Parsed::Unknown(id) | Parsed::Ambiguous(id) => *id,
        };
        if let Admit::Refuse(failure) = session.admit(line.len())? {
            batch.error(&self.core, id, failure.into());
            return Ok(());
        }
        let core = &self.core;
        match parsed {
            Parsed::Pong => Ok(()),
            Parsed::Unknown(id) => {
                batch.error(core, id, Error::method_not_found());
                Ok(())
            }
            Parsed::Ambiguous(id) => {
                batch.error(core, id, Error::bad_request("one method per command"));
                Ok(())
            }
            Parsed::Call(_, Method::Connect(_)) => Err(CloseReason::Protocol(kind::SECOND_CONNECT)),
            Parsed::Call(_, Method::Send(req)) => {
                // No reply: a failed send is counted and logged only.
                let result = match commands::data(req.data) {
                    Ok(data) => session
                        .execute(CoreCommand::Send {
                            data,
                            destination: None,
                        })
                        .await
                        .map(drop)
                        .map_err(Error::from),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    batch.error(core, 0, e);
                }
                Ok(())
            }
            Parsed::Call(0, _) => Err(CloseReason::Protocol(kind::MALFORMED_COMMAND)),
            Parsed::Call(id, method) => {
                let key = method.key();
                match call(core, session, &self.clock, &self.out, method).await {
                    Ok((result, guard)) => {
                        batch.reply(id, key, result);
                        batch.guards.extend(guard);
                    }
                    Err(e) => batch.error(core, id, e),
                }
                Ok(())
            }
        }
    }

    /// `connect`: checks the token, registers the connection and opens its session. A
    /// refused connect leaves the connection waiting (and its connect timeout running), up
    /// to [`MAX_CONNECT_REFUSALS`].
    async fn connect(
        &mut self,
        id: u32,
        req: commands::Connect<'_>,
        batch: &mut Batch,
    ) -> Result<(), CloseReason> {
        let State::Pending(conn) = std::mem::replace(&mut self.state, State::Opening) else {
            return Ok(());
        };
        let session_id = self
            .emulation
            .as_ref()
            .map(|e| format!("{}{}", e.secret, conn.conn_id));
        match open_session(&self.core, conn, &req.token, &self.emulation).await {
            Ok((mut session, ending)) => {
                // The directory holds it now; this copy was only for a refused connect's retry.
                self.emulation = None;
                session.replay_in_reply();
                *self.ending.lock().unwrap_or_else(|p| p.into_inner()) = Some(ending);
                self.connected.store(true, Ordering::Release);
                if let Some(exp) = session.expires() {
                    self.clock.renew(exp, &self.out);
                }
                let c = &self.core.config;
                let mut reply = json!({
                    "client": session.conn_id(),
                    "version": VERSION,
                    "ping": c.ping_interval_ms.div_ceil(1000).max(1),
                    "pong": session_id.is_none(),
                    "node": c.node_id,
                });
                if let Some(id) = session_id {
                    reply["session"] = id.into();
                }
                expiry(&mut reply, session.expires());
                self.state = State::Open(session);
                batch.reply(id, "connect", reply);
            }
            Err((conn, e)) => {
                self.state = State::Pending(conn);
                batch.error(&self.core, id, e);
                self.refusals += 1;
                if self.refusals >= MAX_CONNECT_REFUSALS {
                    return Err(CloseReason::Protocol(kind::CONNECT_REFUSED));
                }
            }
        }
        Ok(())
    }
}

/// `"expires":true,"ttl":<seconds left>` for a token with an expiry. Rounded down, so the
/// SDK's refresh (due after `ttl`) comes before the token expires, not up to a second late.
fn expiry(reply: &mut Value, exp: Option<u64>) {
    if let Some(exp) = exp {
        let left_ms = exp
            .saturating_mul(1000)
            .saturating_sub(crate::time::now_ms());
        reply["expires"] = true.into();
        reply["ttl"] = (left_ms / 1000).into();
    }
}

/// A token refused, in Centrifugo's codes: 109 sends the SDK to `getToken`.
fn auth_error(e: AuthError) -> Error {
    match e {
        AuthError::Expired => Error::new(code::TOKEN_EXPIRED, "token_expired", "token expired"),
        AuthError::KeysUnavailable => {
            Error::new(code::INTERNAL, "unavailable", e.to_string()).temporary()
        }
        other => Error::new(code::UNAUTHORIZED, "unauthorized", other.to_string()),
    }
}

/// The identity of a `connect` (its token, else the handshake's, else anonymous when
/// allowed), the directory entry, then the session.
async fn open_session(
    core: &Arc<Core>,
    mut conn: Conn,
    token: &str,
    emulation: &Option<Emulation>,
) -> Result<(Session, Ending), (Conn, Error)> {
    let unauthorized = |m: &str| Error::new(code::UNAUTHORIZED, "unauthorized", m);
    let identity = if !token.is_empty() {
        let Some(auth) = &core.auth else {
            return Err((conn, unauthorized("this server checks no tokens")));
        };
        match auth.verify(token).await {
            Ok(i) => Some(i),
            Err(e) => return Err((conn, auth_error(e))),
        }
    } else if conn.identity.is_some() {
        conn.identity.take()
    } else if core.config.allow_anonymous {
        None
    } else {
        return Err((conn, unauthorized("a token is required")));
    };
    let user = identity.as_ref().map(|i| i.user_id.as_str());
    match core
        .directory
        .add(
            &conn.conn_id,
            conn.id,
            user,
            conn.out.clone(),
            emulation.clone(),
        )
        .await
    {
        Ok(()) => {}
        Err(crate::cluster::directory::AddError::UserLimit) => {
            let e = Error::new(
                code::LIMIT_EXCEEDED,
                "user_connection_limit",
                "this user already has the maximum number of connections",
            );
            return Err((conn, e));
        }
        Err(crate::cluster::directory::AddError::Unavailable(e)) => {
            let e = Error::new(code::INTERNAL, "unavailable", e.to_string()).temporary();
            return Err((conn, e));
        }
    }
    conn.identity = identity;
    Ok(Session::open(core.clone(), conn).await)
}

/// A command with a reply, on an open session: its result, and for a subscribe the guard
/// whose drop starts the replay. `clock` is the connection's token clock, which `refresh`
/// renews, and `out` its queue.
async fn call(
    core: &Core,
    session: &mut Session,
    clock: &TokenClock,
    out: &Outbound,
    method: Method<'_>,
) -> Result<(Value, Option<Subscription>), Error> {
    let empty = || Value::Object(Map::new());
    match method {
        Method::Subscribe(req) => subscribe(core, session, req).await,
        Method::Unsubscribe(req) => {
            let channel = commands::channel(&req.channel)?;
            session
                .execute(CoreCommand::Unsubscribe { channel })
                .await?;
            session.revoke(channel);
            Ok((empty(), None))
        }
        Method::Publish(req) => {
            let channel = commands::channel(&req.channel)?;
            let data = commands::data(req.data)?;
            session
                .execute(CoreCommand::Publish { channel, data })
                .await?;
            Ok((empty(), None))
        }
        Method::History(req) => {
            let channel = commands::channel(&req.channel)?;
            if req.reverse && req.since.is_some() {
                return Err(Error::not_available(
                    "history in reverse from a position is not supported",
                ));
            }
            let limit = match req.limit {
                n if n < 0 => None,
                n => Some(n as usize),
            };
            let since = req.since.map(|p| Position {
                epoch: p.epoch,
                offset: p.offset,
            });
            let done = session
                .execute(CoreCommand::History {
                    channel,
                    limit,
                    since,
                })
                .await?;
            let Done::History(h) = done else {
                return Ok((empty(), None));
            };
            let mut publications = commands::publications(&h.publications);
            if req.reverse {
                publications.reverse();
            }
            let result = json!({ "publications": publications, "epoch": h.epoch, "offset": h.top });
            Ok((result, None))
        }
        Method::Presence(req) => {
            let channel = commands::channel(&req.channel)?;
            Ok((presence::client_presence(session, channel).await?, None))
        }
        Method::PresenceStats(req) => {
            let channel = commands::channel(&req.channel)?;
            Ok((
                presence::client_presence_stats(session, channel).await?,
                None,
            ))
        }
        Method::Rpc(req) => {
            tracing::debug!(method = %req.method, "centrifugo rpc: no rpc methods here");
            Err(Error::method_not_found())
        }
        Method::Refresh(req) => {
            if req.token.is_empty() {
                return Err(Error::bad_request("token required"));
            }
            session
                .execute(CoreCommand::Refresh { token: &req.token })
                .await
                .map_err(|f| {
                    if f.message == AuthError::Expired.to_string() {
                        auth_error(AuthError::Expired)
                    } else {
                        Error::from(f)
                    }
                })?;
            if let Some(exp) = session.expires() {
                clock.renew(exp, out);
            }
            let mut reply = json!({ "client": session.conn_id(), "version": VERSION });
            expiry(&mut reply, session.expires());
            Ok((reply, None))
        }
        Method::SubRefresh(req) => {
            let channel = commands::channel(&req.channel)?;
            verify_subscription(core, session, channel, &req.token).await?;
            Ok((empty(), None))
        }
        // Answered by the caller: they carry no reply, or open the session.
        Method::Send(_) | Method::Connect(_) => Err(Error::bad_request("unexpected command")),
    }
}

/// A subscription token: signed by a key of this node, naming this connection's user
/// (`""` for an anonymous one) and, in its `channel` claim, this channel.
async fn verify_subscription(
    core: &Core,
    session: &Session,
    channel: &str,
    token: &str,
) -> Result<(), Error> {
    let denied = |m: &str| Error::new(code::PERMISSION_DENIED, "forbidden", m);
    let Some(auth) = &core.auth else {
        return Err(denied("this server checks no subscription tokens"));
    };
    let grant = auth.verify_subscription(token).await.map_err(auth_error)?;
    if grant.channel.as_deref() != Some(channel) {
        return Err(denied("the subscription token is for another channel"));
    }
    if grant.user_id != session.user_id().unwrap_or("") {
        return Err(denied("the subscription token names another user"));
    }
    Ok(())
}

async fn subscribe(
    core: &Core,
    session: &mut Session,
    req: commands::Subscribe<'_>,
) -> Result<(Value, Option<Subscription>), Error> {
    let channel = commands::channel(&req.channel)?;
    let granted = !req.token.is_empty();
    if granted {
        verify_subscription(core, session, channel, &req.token).await?;
        session.grant(channel);
    }
    let recover = req.recover.then(|| Position {
        epoch: req.epoch.clone(),
        offset: req.offset,
    });
    let s = match session
        .execute(CoreCommand::Subscribe { channel, recover })
        .await
    {
        Ok(Done::Subscribed(s)) => s,
        Ok(_) => {
            return Err(Error::new(
                code::ALREADY_SUBSCRIBED,
                "already_subscribed",
                "already subscribed",
            ))
        }
        Err(f) => {
            if granted {
                session.revoke(channel);
            }
            return Err(f.into());
        }
    };
    let mut reply = Map::new();
    if let Some(j) = &s.joined {
        let recovered = j.recovered == Some(true);
        if req.recover && !recovered && req.flag & commands::FLAG_REJECT_UNRECOVERED != 0 {
            // Off the channel before the guard goes, so that no replay or tail follows.
            let _ = session.execute(CoreCommand::Unsubscribe { channel }).await;
            drop(s);
            session.revoke(channel);
            return Err(Error::new(
                code::UNRECOVERABLE_POSITION,
                "unrecoverable_position",
                "unrecoverable position",
            ));
        }
        if req.recoverable {
            reply.insert("recoverable".into(), true.into());
        }
        if req.positioned || req.recoverable {
            reply.insert("positioned".into(), true.into());
            reply.insert("epoch".into(), j.position.epoch.clone().into());
            reply.insert("offset".into(), j.position.offset.into());
        }
        if req.recover {
            reply.insert("was_recovering".into(), true.into());
            reply.insert("recovered".into(), recovered.into());
            if !j.replay.is_empty() {
                reply.insert(
                    "publications".into(),
                    commands::publications(&j.replay).into(),
                );
            }
        }
    }
    Ok((Value::Object(reply), Some(s)))
}

impl Handler for Connection {
    async fn on_text(&mut self, text: String) -> Result<(), CloseReason> {
        let lines: Vec<&str> = text.split('\n').filter(|l| !l.trim().is_empty()).collect();
        if lines.len() > self.max_batch {
            return Err(CloseReason::Protocol(kind::BATCH_TOO_LARGE));
        }
        let mut batch = Batch::default();
        let mut result = Ok(());
        for line in lines {
            if let Err(reason) = self.command(line, &mut batch).await {
                result = Err(reason);
                break;
            }
        }
        self.flush(batch);
        result
    }
}
