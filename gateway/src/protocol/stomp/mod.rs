//! STOMP 1.0–1.2 over WebSocket (`docs/stomp.md`), codec id 1.
//!
//! A connection is STOMP when its handshake offered `v12.stomp`, `v11.stomp` or `v10.stomp`
//! in `Sec-WebSocket-Protocol` (or came to `/stomp`); see `edge::handshake`. It must send
//! CONNECT (or STOMP) before anything else, within `handshake_timeout_ms`; only then does it
//! get a core [`Session`]: the directory entry, the inbound `connect` event and every check
//! of the core come at CONNECT, because a browser can only authenticate there.
//!
//! Destinations map onto the core: `/topic/<channel>` is a channel (subscribe and publish
//! with the core's rules), `SEND /app/<x>` goes to the backends' inbound stream with its
//! destination, `SUBSCRIBE /user/queue/<x>` receives the connection's unicast. Everything
//! else is refused. Every refusal is an ERROR frame followed by a close (STOMP has no other
//! way to refuse), 1002 like Spring's, except for the limits that keep their own codes
//! (1008 rate, 1009 size, 4000 slow consumer, 4001 heart-beat, 4002 token expiry).
//!
//! # One encoding per channel message
//!
//! A MESSAGE frame must name the subscription it is for: stompjs and Spring's client route
//! incoming messages by the `subscription` header alone (stompjs: `_subscriptions[
//! frame.headers.subscription]`, else `onUnhandledMessage`), and the id is the client's own
//! choice, so it may differ per connection. The rest is the same for every subscriber. So a
//! MESSAGE is made of two parts:
//!
//! - the shared tail, encoded once per channel message by [`CODEC`] and shared by every
//!   STOMP connection exactly as v1 frames are: `ack` and `message-id`, `content-type`,
//!   `content-length`, the blank line, the body and the NUL ([`frame::message_tail`]). A
//!   subscription without client acks leaves out the `ack` line, the tail's first;
//! - the subscription's prefix, encoded once at SUBSCRIBE and kept in the connection's
//!   [`Routes`] (a [`crate::conn::event::Framer`]): `MESSAGE`, `subscription` and
//!   `destination`, escaped for the connection's version.
//!
//! Per delivery the framer looks the subscription up (a lock of the connection's route table
//! and a hash lookup by channel) and hands both parts to the message's
//! [`crate::conn::event::Joined`]: connections whose prefix is the same (stompjs names every
//! client's first subscription `sub-0`) get one whole frame, joined once per message, as v1
//! connections do; past a few distinct prefixes, a connection gets the WebSocket header
//! (from a static table), its prefix and the tail as three buffers of one vectored write.
//! Nothing is allocated per delivery, and the body is copied a bounded number of times per
//! message whatever the number of subscribers.
//!
//! # Message ids
//!
//! `message-id` is the same for every subscriber of a message, so that it can be in the
//! shared tail: on a history channel the publication's `<epoch>:<offset>`, elsewhere a
//! number from a counter of the node's (`MESSAGE_IDS`), so unique on each connection. `ack`,
//! on client-ack subscriptions, repeats it. Two subscriptions of one connection to one
//! channel get the same message with the same id.
//!
//! Delivery is at-most-once: ACK and NACK are accepted and do nothing.

pub mod frame;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use shared::protocol::ErrorCode;

use self::frame::{Command as Cmd, Frame, Version};
use crate::auth::{AuthError, Identity};
use crate::cluster::directory::AddError;
use crate::conn::clock::TokenClock;
use crate::conn::event::{Codec, Event, Framer, Joined};
use crate::conn::outbound::{Heartbeat, Outbound};
use crate::conn::socket::Handler;
use crate::core::session::{self, Admit, Command, Conn, Ending, Failure, Session};
use crate::core::Core;
use crate::error::CloseReason;

/// The STOMP codec: encodes the shared tail of MESSAGE frames (see the module docs).
pub static CODEC: Stomp = Stomp;

/// See [`CODEC`].
pub struct Stomp;

impl Codec for Stomp {
    fn id(&self) -> usize {
        1
    }

    fn encode(&self, event: &Event<'_>) -> Bytes {
        match *event {
            // On a history channel the message id is the publication's place; otherwise a
            // number of the node's. Either is the same for every subscriber.
            Event::Message {
                data,
                position: Some((offset, epoch)),
                ..
            } => frame::message_tail(&format_args!("{epoch}:{offset}"), data),
            Event::Message { data, .. } | Event::Direct { data } => {
                let id = MESSAGE_IDS.fetch_add(1, Ordering::Relaxed) + 1;
                frame::message_tail(&id, data)
            }
            // STOMP has no refresh: the connection is closed (with an ERROR) when the grace
            // period ends. Nothing to say before. An ended subscription is framed per
            // connection (an ERROR naming it).
            Event::TokenExpiring { .. } | Event::Unsubscribed { .. } => Bytes::new(),
            // STOMP has no presence frames: join and leave are not sent.
            Event::Join { .. } | Event::Leave { .. } => Bytes::new(),
        }
    }
}

/// The last `message-id` the node handed out to a message without a position: one counter
/// for every STOMP connection of the node, so that an id is unique on each of them and
/// encoded once per message, in the shared tail.
static MESSAGE_IDS: AtomicU64 = AtomicU64::new(0);

/// The WebSocket subprotocols we speak, best first.
pub const SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];

/// The best STOMP subprotocol among those a client offered (`Sec-WebSocket-Protocol`
/// values, each a comma-separated list).
pub fn negotiate<'a>(offered: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    let offered: Vec<&str> = offered.flat_map(|v| v.split(',')).map(str::trim).collect();
    SUBPROTOCOLS.into_iter().find(|p| offered.contains(p))
}

/// The header value of our `server` header.
const SERVER: &str = concat!("gateway/", env!("CARGO_PKG_VERSION"));

/// Server heart-beat frame: one EOL.
fn beat() -> Bytes {
    Bytes::from_static(&[0x81, 1, b'\n'])
}

/// One subscription as the fan-out sees it.
struct Route {
    /// `MESSAGE\nsubscription:…\ndestination:…\n`, escaped for the connection's version:
    /// everything of a MESSAGE frame that is the subscription's own, encoded at SUBSCRIBE.
    prefix: Bytes,
    /// The subscription asked for client acks: MESSAGE frames carry `ack`.
    ack: bool,
}

#[derive(Default)]
struct Table {
    /// Channel → the connection's subscriptions to it (usually one), by subscription id.
    topics: HashMap<String, Vec<(String, Route)>>,
    /// The `/user/queue/…` subscriptions: each gets the connection's unicast.
    user: Vec<(String, Route)>,
}

/// A STOMP connection's own part of its frames: its subscriptions, read by the fan-out to
/// build each MESSAGE's head, and whether it already sent an ERROR. Shared by the
/// connection's [`Outbound`] (as its [`Framer`]) and its [`Connection`].
#[derive(Default)]
pub struct Routes {
    table: Mutex<Table>,
    version: OnceLock<Version>,
    /// An ERROR went out: the close needs no farewell.
    errored: AtomicBool,
    /// A CONNECT arrived (the CONNECT deadline no longer applies).
    connecting: AtomicBool,
    /// CONNECTED went out: the client knows the version, and ERROR values are escaped.
    open: AtomicBool,
}

impl Routes {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn version(&self) -> Version {
        self.version.get().copied().unwrap_or(Version::V1_2)
    }

    /// An ERROR frame, marked as sent. Before CONNECTED the client cannot know which
    /// version's escaping applies (stompjs unescapes only once connected with 1.2), so the
    /// values are then written as 1.0 does: raw, line breaks replaced.
    fn error(&self, message: &str, receipt: Option<&str>) -> Bytes {
        self.errored.store(true, Ordering::Release);
        let mut headers = vec![("message", message), ("content-type", "text/plain")];
        if let Some(r) = receipt {
            headers.push(("receipt-id", r));
        }
        let version = match self.open.load(Ordering::Acquire) {
            true => self.version(),
            false => Version::V1_0,
        };
        frame::encode("ERROR", &headers, message, version)
    }

    fn route(&self, sub: &str, destination: &str, ack: bool) -> Route {
        let v = self.version();
        let mut h = String::with_capacity(40 + sub.len() + destination.len());
        let _ = write!(
            h,
            "MESSAGE\nsubscription:{}\ndestination:{}\n",
            frame::escape(sub, v, true),
            frame::escape(destination, v, true)
        );
        Route {
            prefix: Bytes::from(h),
            ack,
        }
    }
}

impl Framer for Routes {
    fn frame(
        &self,
        event: &Event<'_>,
        shared: &Bytes,
        joined: &mut Joined,
        part: &mut dyn FnMut(Bytes),
    ) {
        let table = self.table();
        let routes = match event {
            Event::Message { channel, .. } => match table.topics.get(*channel) {
                Some(r) => r.as_slice(),
                None => return,
            },
            Event::Direct { .. } => table.user.as_slice(),
            Event::TokenExpiring { .. } | Event::Join { .. } | Event::Leave { .. } => return,
            Event::Unsubscribed { channel, code } => {
                // STOMP has no frame that ends one subscription: the client hears it as an
                // ERROR, as it would any other end of its stream, and subscribes again.
                let m = format!("subscription to /topic/{channel} ended: {code}");
                drop(table);
                part(self.error(&m, None));
                return;
            }
        };
        // The subscription's prefix and the shared tail, with or without its `ack` line.
        let ack_line = frame::ack_line_len(shared);
        for (_, route) in routes {
            let skip = if route.ack { 0 } else { ack_line };
            joined.text_frame(&route.prefix, shared, skip, part);
        }
    }

    fn farewell(&self, reason: &CloseReason) -> Option<Bytes> {
        match reason {
            CloseReason::ClientClosed(_) | CloseReason::Abnormal => None,
            _ if self.errored.load(Ordering::Acquire) => None,
            other => Some(self.error(&other.to_string(), None)),
        }
    }
}

/// What a subscription id points at, for UNSUBSCRIBE.
enum Target {
    Topic(String),
    User,
}

/// Where the connection is in its life.
enum Phase {
    /// Admitted at the handshake, waiting for CONNECT.
    Waiting(Conn),
    Open(Session),
    /// CONNECT failed half-way; the connection is closing.
    Gone,
}

/// The connection's [`Ending`], once CONNECT opened its session, for [`Cleanup`].
type EndingSlot = Arc<Mutex<Option<Ending>>>;

/// A STOMP connection: its frames in, replies out. See the module docs.
pub struct Connection {
    core: Arc<Core>,
    out: Arc<Outbound>,
    routes: Arc<Routes>,
    phase: Phase,
    /// Subscription id → what it points at.
    subs: HashMap<String, Target>,
    /// The token clock the writer watches: far in the future until CONNECT names a token.
    clock: Arc<TokenClock>,
    ending: EndingSlot,
}

/// What runs after the socket closed: the session's cleanup, or (before CONNECT) only the
/// close's metrics and log line.
pub struct Cleanup {
    conn_id: std::sync::Arc<str>,
    ip: std::net::IpAddr,
    ending: EndingSlot,
}

impl Cleanup {
    pub async fn close(self, core: &Core, reason: &CloseReason) {
        let ending = self.ending.lock().unwrap_or_else(|p| p.into_inner()).take();
        match ending {
            Some(ending) => ending.close(core, reason).await,
            None => {
                // CONNECT may have registered the connection before it failed; a no-op if not.
                core.directory.remove(&self.conn_id).await;
                session::closed_unopened(core, self.ip, &self.conn_id, reason);
            }
        }
    }
}

/// A token clock that never fires, for connections whose token (if any) comes at CONNECT.
pub fn idle_clock(grace: Duration) -> Arc<TokenClock> {
    Arc::new(TokenClock::idle(grace))
}

impl Connection {
    /// A connection waiting for its CONNECT. `conn.identity` is the handshake's token, if
    /// it had one; `clock` is the one the writer watches ([`idle_clock`]). Closes the
    /// connection if no CONNECT arrives within `handshake_timeout_ms`.
    pub fn new(
        core: Arc<Core>,
        conn: Conn,
        routes: Arc<Routes>,
        clock: Arc<TokenClock>,
    ) -> (Connection, Cleanup) {
        let ending = EndingSlot::default();
        let cleanup = Cleanup {
            conn_id: conn.conn_id.clone(),
            ip: conn.ip,
            ending: ending.clone(),
        };
        let out = conn.out.clone();
        let timeout = core.config.handshake_timeout();
        let (r, o) = (routes.clone(), out.clone());
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if !r.connecting.load(Ordering::Acquire) && !o.is_closing() {
                let ms = timeout.as_millis();
                o.push(r.error(&format!("no CONNECT frame within {ms} ms"), None));
                o.close(CloseReason::Protocol("stomp_connect_timeout"));
            }
        });
        let c = Connection {
            core,
            out,
            routes,
            phase: Phase::Waiting(conn),
            subs: HashMap::new(),
            clock,
            ending,
        };
        (c, cleanup)
    }

    fn version(&self) -> Version {
        self.routes.version()
    }

    /// Queues a reply: through the session once there is one (it counts them).
    fn send(&self, bytes: Bytes) {
        match &self.phase {
            Phase::Open(s) => s.reply(bytes),
            _ => {
                self.out.push(bytes);
            }
        }
    }

    /// Sends an ERROR and closes with 1002; `kind` labels the close's metric.
    fn fail(
        &mut self,
        kind: &'static str,
        message: &str,
        receipt: Option<&str>,
    ) -> Result<(), CloseReason> {
        self.send(self.routes.error(message, receipt));
        Err(CloseReason::Protocol(kind))
    }

    /// A core command failed: counted as a refused request, then ERROR and close.
    fn refused(&mut self, failure: Failure, receipt: Option<&str>) -> Result<(), CloseReason> {
        if let Phase::Open(s) = &self.phase {
            s.refused(&failure);
        }
        let kind = match failure.code {
            ErrorCode::Forbidden => "stomp_forbidden",
            ErrorCode::TooManySubscriptions => "stomp_too_many_subscriptions",
            ErrorCode::InvalidChannel => "stomp_invalid_channel",
            ErrorCode::Unavailable => "stomp_unavailable",
            ErrorCode::Unauthorized => "stomp_unauthorized",
            ErrorCode::MalformedJson => "stomp_bad_body",
            _ => "stomp_refused",
        };
        self.fail(kind, &failure.message, receipt)
    }

    fn receipt(&self, f: &Frame<'_>) {
        if let Some(r) = f.header("receipt") {
            self.send(frame::encode(
                "RECEIPT",
                &[("receipt-id", r)],
                "",
                self.version(),
            ));
        }
    }

    async fn on_message(&mut self, message: &[u8]) -> Result<(), CloseReason> {
        if let Phase::Open(session) = &mut self.phase {
            if let Admit::Refuse(failure) = session.admit(message.len())? {
                session.refused(&failure);
                self.send(self.routes.error(&failure.message, None));
                return Err(CloseReason::Policy("message rate exceeded"));
            }
        }
        let mut input = message;
        loop {
            let version = self.routes.version.get().copied();
            let f = match frame::next(&mut input, version) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return self.fail(e.kind, &e.message, None),
            };
            self.on_frame(f).await?;
        }
    }

    async fn on_frame(&mut self, f: Frame<'_>) -> Result<(), CloseReason> {
        let receipt = f.header("receipt");
        match (&self.phase, f.command) {
            (Phase::Waiting(_), Cmd::Connect | Cmd::Stomp) => return self.connect(&f).await,
            (Phase::Waiting(_), other) => {
                let m = format!("{} before CONNECT: send CONNECT first", other.as_str());
                return self.fail("stomp_not_connected", &m, receipt);
            }
            (Phase::Gone, _) => return Err(CloseReason::Protocol("stomp_not_connected")),
            (Phase::Open(_), _) => {}
        }
        match f.command {
            Cmd::Connect | Cmd::Stomp => {
                self.fail("stomp_already_connected", "already connected", receipt)
            }
            Cmd::Send => self.send_frame(&f).await,
            Cmd::Subscribe => self.subscribe(&f).await,
            Cmd::Unsubscribe => self.unsubscribe(&f).await,
            // At-most-once delivery: acknowledgements change nothing.
            Cmd::Ack | Cmd::Nack => {
                self.receipt(&f);
                Ok(())
            }
            Cmd::Begin | Cmd::Commit | Cmd::Abort => {
                let m = format!(
                    "{} is not supported: this server has no transactions",
                    f.command.as_str()
                );
                self.fail("stomp_unsupported", &m, receipt)
            }
            Cmd::Disconnect => {
                self.receipt(&f);
                Err(CloseReason::ClientClosed(shared::close::NORMAL))
            }
        }
    }

    async fn connect(&mut self, f: &Frame<'_>) -> Result<(), CloseReason> {
        self.routes.connecting.store(true, Ordering::Release);
        let Some(version) = Version::negotiate(f.header("accept-version")) else {
            self.send(frame::encode(
                "ERROR",
                &[
                    ("version", "1.0,1.1,1.2"),
                    ("message", "no supported version in accept-version"),
                ],
                "this server speaks STOMP 1.0, 1.1 and 1.2",
                Version::V1_0,
            ));
            self.routes.errored.store(true, Ordering::Release);
            return Err(CloseReason::Protocol("stomp_bad_version"));
        };
        let _ = self.routes.version.set(version);
        let heart_beat = match f.header("heart-beat").map(parse_heart_beat) {
            None => (0, 0),
            Some(Some(hb)) => hb,
            Some(None) => {
                let m = format!(
                    "heart-beat `{}` is not two comma-separated numbers of milliseconds",
                    frame::shown(f.header("heart-beat").unwrap_or_default().as_bytes())
                );
                return self.fail("stomp_bad_heart_beat", &m, None);
            }
        };
        let identity = match self.identity(f).await {
            Ok(i) => i,
            Err(e) => {
                let m = format!("CONNECT refused: {e}");
                return self.fail("stomp_unauthorized", &m, None);
            }
        };
        let Phase::Waiting(mut conn) = std::mem::replace(&mut self.phase, Phase::Gone) else {
            return Err(CloseReason::Protocol("stomp_already_connected"));
        };
        let user = identity.as_ref().map(|i| i.user_id.clone());
        match self
            .core
            .directory
            .add(
                &conn.conn_id,
                conn.id,
                user.as_deref(),
                self.out.clone(),
                None,
            )
            .await
        {
            Ok(()) => {}
            Err(AddError::UserLimit) => {
                let m = "this user already has the maximum number of connections";
                return self.fail("stomp_user_limit", m, None);
            }
            Err(AddError::Unavailable(_)) => {
                let m = "cannot check the per-user connection cap right now; retry";
                return self.fail("stomp_unavailable", m, None);
            }
        }
        if let Some(i) = &identity {
            self.clock.renew(i.exp, &self.out);
        }
        conn.identity = identity;
        let (session, ending) = Session::open(self.core.clone(), conn).await;
        *self.ending.lock().unwrap_or_else(|p| p.into_inner()) = Some(ending);
        let conn_id = session.conn_id().to_owned();
        self.phase = Phase::Open(session);

        let ours = self.core.config.ping_interval_ms;
        let mut headers = vec![("version", version.as_str())];
        let hb_value = format!("{ours},{ours}");
        if version >= Version::V1_1 {
            headers.push(("heart-beat", hb_value.as_str()));
            let (cx, cy) = heart_beat;
            let negotiated = |theirs: u64| (theirs > 0 && ours > 0).then(|| theirs.max(ours));
            let (send, expect) = (negotiated(cy), negotiated(cx));
            if send.is_some() || expect.is_some() {
                self.out.set_heartbeat(Heartbeat {
                    send: send.map(|ms| (Duration::from_millis(ms), beat())),
                    // The same tolerance as stompjs: two intervals.
                    expect: expect.map(|ms| Duration::from_millis(ms * 2)),
                });
            }
        }
        headers.push(("session", &conn_id));
        headers.push(("server", SERVER));
        if let Some(u) = user.as_deref() {
            headers.push(("user-name", u));
        }
        self.send(frame::encode("CONNECTED", &headers, "", version));
        self.routes.open.store(true, Ordering::Release);
        Ok(())
    }

    /// The connection's identity: a token in CONNECT (`passcode`, or `Authorization:
    /// Bearer`), else the handshake's, else anonymous when the node allows it.
    async fn identity(&self, f: &Frame<'_>) -> Result<Option<Identity>, AuthError> {
        let Phase::Waiting(conn) = &self.phase else {
            return Err(AuthError::Missing);
        };
        let bearer = f
            .header("Authorization")
            .or(f.header("authorization"))
            .and_then(|v| v.strip_prefix("Bearer "));
        let token = bearer.or(f.header("passcode")).filter(|t| !t.is_empty());
        match (token, &self.core.auth) {
            (Some(token), Some(auth)) => auth.verify(token.trim()).await.map(Some),
            (Some(_), None) => Err(AuthError::UnsupportedAlgorithm),
            (None, _) if conn.identity.is_some() => Ok(conn.identity.clone()),
            (None, _) if self.core.config.allow_anonymous => Ok(None),
            (None, _) => Err(AuthError::Missing),
        }
    }

    /// The session; frames other than CONNECT reach here only once it is open.
    fn session(&mut self) -> Result<&mut Session, CloseReason> {
        match &mut self.phase {
            Phase::Open(s) => Ok(s),
            _ => Err(CloseReason::Protocol("stomp_not_connected")),
        }
    }

    async fn send_frame(&mut self, f: &Frame<'_>) -> Result<(), CloseReason> {
        let receipt = f.header("receipt");
        let Some(destination) = f.header("destination") else {
            return self.fail(
                "stomp_bad_frame",
                "SEND without a destination header",
                receipt,
            );
        };
        let data = match std::str::from_utf8(f.body) {
            Ok(d) => d,
            Err(_) => return self.fail("stomp_bad_body", "the body is not UTF-8 JSON", receipt),
        };
        if let Err(why) = shared::protocol::check_data(data) {
            let m = format!("the body must be JSON: {}", why.replace("`data`", "body"));
            return self.fail("stomp_bad_body", &m, receipt);
        }
        let command = if let Some(channel) = destination.strip_prefix("/topic/") {
            if !shared::channel::is_valid(channel) {
                return self.invalid_channel(channel, receipt);
            }
            Command::Publish { channel, data }
        } else if destination.len() > "/app/".len() && destination.starts_with("/app/") {
            Command::Send {
                data,
                destination: Some(destination),
            }
        } else {
            let m = format!(
                "cannot SEND to `{}`: use /topic/<channel> or /app/<name>",
                frame::shown(destination.as_bytes())
            );
            return self.fail("stomp_bad_destination", &m, receipt);
        };
        match self.session()?.execute(command).await {
            Ok(_) => {
                self.receipt(f);
                Ok(())
            }
            Err(failure) => self.refused(failure, receipt),
        }
    }

    fn invalid_channel(&mut self, channel: &str, receipt: Option<&str>) -> Result<(), CloseReason> {
        let m = format!(
            "`{}` is not a channel: names match [A-Za-z0-9_.:@/-]{{1,200}}",
            frame::shown(channel.as_bytes())
        );
        self.fail("stomp_invalid_channel", &m, receipt)
    }

    async fn subscribe(&mut self, f: &Frame<'_>) -> Result<(), CloseReason> {
        let receipt = f.header("receipt");
        let Some(destination) = f.header("destination") else {
            return self.fail(
                "stomp_bad_frame",
                "SUBSCRIBE without a destination header",
                receipt,
            );
        };
        // STOMP 1.0 makes the id optional; the destination then stands for it.
        let id = match f.header("id") {
            Some(id) => id,
            None if self.version() == Version::V1_0 => destination,
            None => return self.fail("stomp_bad_frame", "SUBSCRIBE without an id header", receipt),
        };
        let ack = match f.header("ack").unwrap_or("auto") {
            "auto" => false,
            "client" | "client-individual" => true,
            other => {
                let m = format!(
                    "ack `{}` is not auto, client or client-individual",
                    frame::shown(other.as_bytes())
                );
                return self.fail("stomp_bad_frame", &m, receipt);
            }
        };
        if self.subs.contains_key(id) {
            let m = format!(
                "subscription id `{}` is already in use",
                frame::shown(id.as_bytes())
            );
            return self.fail("stomp_duplicate_subscription", &m, receipt);
        }
        let max = self.core.config.max_subscriptions;
        if self.subs.len() >= max {
            let m = format!("a connection may hold at most {max} subscriptions");
            return self.fail("stomp_too_many_subscriptions", &m, receipt);
        }
        let route = self.routes.route(id, destination, ack);
        let mut joined = None;
        if let Some(channel) = destination.strip_prefix("/topic/") {
            if !shared::channel::is_valid(channel) {
                return self.invalid_channel(channel, receipt);
            }
            // Routed before the hub delivers, so no message finds the connection without it.
            let first = {
                let mut t = self.routes.table();
                let subs = t.topics.entry(channel.to_owned()).or_default();
                subs.push((id.to_owned(), route));
                subs.len() == 1
            };
            if first {
                match self
                    .session()?
                    .execute(Command::Subscribe {
                        channel,
                        recover: None,
                    })
                    .await
                {
                    // Held until the RECEIPT is queued: on a history channel, live messages
                    // start when it drops.
                    Ok(done) => joined = Some(done),
                    Err(failure) => {
                        self.unroute(channel, id);
                        return self.refused(failure, receipt);
                    }
                }
            }
            self.subs
                .insert(id.to_owned(), Target::Topic(channel.to_owned()));
        } else if destination.len() > "/user/queue/".len()
            && destination.starts_with("/user/queue/")
        {
            self.routes.table().user.push((id.to_owned(), route));
            self.subs.insert(id.to_owned(), Target::User);
        } else {
            let m = format!(
                "cannot SUBSCRIBE to `{}`: use /topic/<channel> or /user/queue/<name>",
                frame::shown(destination.as_bytes())
            );
            return self.fail("stomp_bad_destination", &m, receipt);
        }
        self.receipt(f);
        drop(joined);
        Ok(())
    }

    /// Removes subscription `id` of `channel` from the routes; true when it was the last.
    fn unroute(&self, channel: &str, id: &str) -> bool {
        let mut t = self.routes.table();
        let Some(subs) = t.topics.get_mut(channel) else {
            return false;
        };
        subs.retain(|(s, _)| s != id);
        let last = subs.is_empty();
        if last {
            t.topics.remove(channel);
        }
        last
    }

    async fn unsubscribe(&mut self, f: &Frame<'_>) -> Result<(), CloseReason> {
        let receipt = f.header("receipt");
        let id = match f.header("id") {
            Some(id) => id,
            None if self.version() == Version::V1_0 => f.header("destination").unwrap_or_default(),
            None => {
                return self.fail(
                    "stomp_bad_frame",
                    "UNSUBSCRIBE without an id header",
                    receipt,
                )
            }
        };
        match self.subs.remove(id) {
            Some(Target::Topic(channel)) => {
                // The hub stops first; a message in flight meanwhile finds no route and is dropped.
                let last = self
                    .routes
                    .table()
                    .topics
                    .get(&channel)
                    .is_some_and(|s| s.len() == 1);
                if last {
                    if let Err(failure) = self
                        .session()?
                        .execute(Command::Unsubscribe { channel: &channel })
                        .await
                    {
                        return self.refused(failure, receipt);
                    }
                }
                self.unroute(&channel, id);
            }
            Some(Target::User) => self.routes.table().user.retain(|(s, _)| s != id),
            // Unsubscribing what is not held changes nothing, as in v1.
            None => {}
        }
        self.receipt(f);
        Ok(())
    }
}

/// `heart-beat: cx,cy`.
fn parse_heart_beat(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl Handler for Connection {
    async fn on_text(&mut self, text: String) -> Result<(), CloseReason> {
        self.on_message(text.as_bytes()).await
    }

    async fn on_binary(&mut self, data: Vec<u8>) -> Result<(), CloseReason> {
        self.on_message(&data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::event::{Encoded, JOINED_FRAMES};
    use std::collections::VecDeque;

    #[test]
    fn picks_the_best_offered_subprotocol() {
        assert_eq!(
            negotiate(["v10.stomp, v12.stomp"].into_iter()),
            Some("v12.stomp")
        );
        assert_eq!(
            negotiate(["mqtt", "v11.stomp"].into_iter()),
            Some("v11.stomp")
        );
        assert_eq!(negotiate(["mqtt"].into_iter()), None);
        assert_eq!(negotiate(std::iter::empty()), None);
    }

    #[test]
    fn heart_beats() {
        assert_eq!(parse_heart_beat("10000,0"), Some((10000, 0)));
        assert_eq!(parse_heart_beat(" 1 , 2 "), Some((1, 2)));
        assert_eq!(parse_heart_beat("1"), None);
        assert_eq!(parse_heart_beat("a,b"), None);
    }

    fn subscribed(sub: &str, channel: &str, ack: bool) -> (Arc<Outbound>, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        let out = Arc::new(Outbound::new(1 << 16, &CODEC).with_framer(routes.clone()));
        let _ = routes.version.set(Version::V1_2);
        let route = routes.route(sub, &format!("/topic/{channel}"), ack);
        routes
            .table()
            .topics
            .entry(channel.into())
            .or_default()
            .push((sub.into(), route));
        (out, routes)
    }

    fn payload(parts: &VecDeque<Bytes>) -> Vec<u8> {
        let all: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        // One text frame whose header counts every part.
        assert_eq!(all[0], 0x81);
        let (len, at) = match all[1] {
            126 => (u16::from_be_bytes([all[2], all[3]]) as usize, 4),
            n => (n as usize, 2),
        };
        assert_eq!(all.len(), at + len, "the header covers both parts");
        all[at..].to_vec()
    }

    #[test]
    fn message_frames_share_the_body_and_name_each_subscription() {
        let (a, _ra) = subscribed("sub-0", "chat:1", false);
        let (b, _rb) = subscribed("mine", "chat:1", true);
        let mut encoded = Encoded::new(Event::Message {
            position: Some((17, "e")),
            channel: "chat:1",
            data: r#"{"text":"hi"}"#,
        });
        for out in [&a, &b] {
            assert_eq!(
                out.push_encoded(&mut encoded, None).0,
                crate::conn::outbound::Pushed::Queued
            );
        }
        let (mut qa, mut qb) = (VecDeque::new(), VecDeque::new());
        a.take(&mut qa);
        b.take(&mut qb);
        assert_eq!(
            (qa.len(), qb.len()),
            (1, 1),
            "whole frames, while the event has few"
        );
        assert_eq!(
            String::from_utf8(payload(&qa)).unwrap(),
            "MESSAGE\nsubscription:sub-0\ndestination:/topic/chat\\c1\nmessage-id:e:17\n\
             content-type:application/json\ncontent-length:13\n\n{\"text\":\"hi\"}\0"
        );
        assert_eq!(
            String::from_utf8(payload(&qb)).unwrap(),
            "MESSAGE\nsubscription:mine\ndestination:/topic/chat\\c1\nack:e:17\nmessage-id:e:17\n\
             content-type:application/json\ncontent-length:13\n\n{\"text\":\"hi\"}\0"
        );
        // A channel the connection holds no route for is dropped for it.
        let mut other = Encoded::new(Event::Message {
            position: None,
            channel: "x",
            data: "1",
        });
        assert_eq!(
            a.push_encoded(&mut other, None).0,
            crate::conn::outbound::Pushed::Unwanted
        );
    }

    #[test]
    fn subscriptions_alike_share_a_frame_and_the_rest_share_the_tail() {
        let mut encoded = Encoded::new(Event::Message {
            position: None,
            channel: "c",
            data: "[1]",
        });
        let mut queued = |sub: &str| {
            let (out, _routes) = subscribed(sub, "c", false);
            out.push_encoded(&mut encoded, None);
            let mut q = VecDeque::new();
            out.take(&mut q);
            q
        };
        let first = queued("sub-0");
        let alike = queued("sub-0");
        assert_eq!(first[0].as_ptr(), alike[0].as_ptr(), "one frame for both");
        let distinct: Vec<_> = (1..=JOINED_FRAMES)
            .map(|i| queued(&format!("s{i}")))
            .collect();
        let last = distinct.last().expect("some");
        assert_eq!(
            last.len(),
            3,
            "past the joined frames: the header, the prefix, the tail"
        );
        assert_eq!(&last[2][..], &first[0][first[0].len() - last[2].len()..]);
        assert_eq!(
            String::from_utf8(payload(last)).unwrap(),
            String::from_utf8(payload(&first))
                .unwrap()
                .replace("sub-0", &format!("s{JOINED_FRAMES}"))
        );
    }

    /// The `message-id` of a MESSAGE frame as `payload` returns it.
    fn message_id(frame: &[u8]) -> String {
        let text = String::from_utf8_lossy(frame);
        let line = text.lines().find_map(|l| l.strip_prefix("message-id:"));
        line.expect("a message-id").to_owned()
    }

    #[test]
    fn message_ids_are_per_message_the_same_for_every_subscriber() {
        let (a, _ra) = subscribed("s", "c", true);
        let (b, _rb) = subscribed("t", "c", false);
        let mut ids = Vec::new();
        for data in ["1", "2"] {
            let mut encoded = Encoded::new(Event::Message {
                position: None,
                channel: "c",
                data,
            });
            let mut got = Vec::new();
            for out in [&a, &b] {
                out.push_encoded(&mut encoded, None);
                let mut q = VecDeque::new();
                out.take(&mut q);
                got.push(message_id(&payload(&q)));
            }
            assert_eq!(got[0], got[1], "one id for both subscribers");
            ids.push(got.swap_remove(0));
        }
        assert_ne!(ids[0], ids[1], "a new id for the next message");
    }

    #[test]
    fn long_bodies_get_a_long_frame_header() {
        let (a, _r) = subscribed("s", "c", false);
        let data = format!("\"{}\"", "x".repeat(300));
        a.push_encoded(
            &mut Encoded::new(Event::Message {
                position: None,
                channel: "c",
                data: &data,
            }),
            None,
        );
        let mut q = VecDeque::new();
        a.take(&mut q);
        let p = payload(&q);
        assert!(p.ends_with(b"xx\"\0"));
    }

    #[test]
    fn errors_are_escaped_once_connected() {
        let routes = Routes::default();
        let before = routes.error("a: b", None);
        assert!(String::from_utf8_lossy(&before).contains("\nmessage:a: b\n"));
        let _ = routes.version.set(Version::V1_2);
        routes.open.store(true, Ordering::Release);
        let after = routes.error("a: b", Some("r:1"));
        let text = String::from_utf8_lossy(&after);
        assert!(text.contains("\nmessage:a\\c b\n"), "{text}");
        assert!(text.contains("\nreceipt-id:r\\c1\n"), "{text}");
        assert!(
            text.ends_with("\n\na: b\0"),
            "the body is not escaped: {text}"
        );
    }

    #[test]
    fn farewell_is_an_error_unless_one_was_sent() {
        let (_, routes) = subscribed("s", "c", false);
        let f = routes.farewell(&CloseReason::TooBig(10)).expect("an ERROR");
        assert!(String::from_utf8_lossy(&f).contains("message:message exceeds 10 bytes"));
        assert!(
            routes.farewell(&CloseReason::SlowConsumer(1)).is_none(),
            "only once"
        );
        let (_, routes) = subscribed("s", "c", false);
        assert!(routes.farewell(&CloseReason::ClientClosed(1000)).is_none());
    }
}
