//! The WebSocket handshake: every check that can run before the upgrade does, so a refused
//! client costs one HTTP response rather than a held socket. Cheap checks run first; the
//! token signature (the costliest) and the directory's per-user cap (a Redis round trip)
//! run last.
//!
//! Each way to refuse is a [`Refusal`]: it decides the HTTP status, the JSON error code, the
//! `outcome` label of `gateway_handshakes_total` and the log line, in one place.
//!
//! The handshake also picks the wire protocol ([`Wire`]): STOMP when the client offers
//! `v12.stomp`, `v11.stomp` or `v10.stomp` in `Sec-WebSocket-Protocol` (the best one is
//! echoed in the 101) or comes to `/stomp`; Centrifugo's client protocol on
//! `/connection/websocket`; else v1. A STOMP client may authenticate in its CONNECT frame
//! instead (browsers cannot set handshake headers), and a Centrifugo client in its
//! `connect` command, so such a handshake without a token is not refused, and its
//! directory entry (with the per-user cap) waits for CONNECT or `connect`; a token it does
//! carry is checked here as for v1.
//!
//! The HTTP transports (`super::streams`) run the same checks, but for the upgrade's own,
//! through [`admit_http`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::http::request::Parts;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};

use super::http::{full, json_error, HttpResponse};
use super::origin::OriginError;
use crate::auth::{AuthError, Identity};
use crate::broker::BoxFuture;
use crate::cluster::directory::AddError;
use crate::conn::clock::TokenClock;
use crate::conn::outbound::Outbound;
use crate::conn::socket;
use crate::conn::socket::Handler;
use crate::core::session::{Conn, Session};
use crate::error::CloseReason;
use crate::node::{Node, Slot};
use crate::protocol::{centrifugo, sse, stomp, v1};

/// The wire protocol a handshake chose, and its transport.
pub(super) enum Wire {
    V1,
    /// Centrifugo's client protocol (`docs/sdk.md`) over the codec's transport: WebSocket
    /// at `GET /connection/websocket`, or an HTTP one (`super::streams`).
    Centrifugo(&'static centrifugo::Centrifugo),
    /// v1 frames as server-sent events (`GET /sse`), with the connection's event ids.
    Sse(Arc<sse::Ids>),
    /// STOMP: the subprotocol to echo (`None` on `/stomp` without one), and the
    /// connection's subscriptions as its fan-out sees them.
    Stomp {
        subprotocol: Option<&'static str>,
        routes: Arc<stomp::Routes>,
    },
}

impl Wire {
    fn choose(req: &Parts) -> Wire {
        if req.uri.path() == "/connection/websocket" {
            return Wire::Centrifugo(&centrifugo::CODEC);
        }
        let offered = req
            .headers
            .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok());
        match stomp::negotiate(offered) {
            Some(p) => Wire::Stomp {
                subprotocol: Some(p),
                routes: Arc::default(),
            },
            None if req.uri.path() == "/stomp" => Wire::Stomp {
                subprotocol: None,
                routes: Arc::default(),
            },
            None => Wire::V1,
        }
    }
}

/// Why a handshake was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the per-IP handshake rate; retry after this many seconds.
    RateLimited {
        retry_after_secs: u64,
    },
    /// Not a GET.
    NotGet,
    /// A plain HTTP request on the WebSocket path.
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13.
    BadVersion,
    Origin(OriginError),
    /// The node is draining (SIGTERM or drain on demand).
    Draining,
    /// The node is at `max_connections`.
    OverCapacity,
    /// The client IP (its /64 for IPv6) is at `max_connections_per_ip`.
    IpLimit,
    Unauthorized(AuthError),
    /// The user is at `max_connections_per_user`.
    UserLimit,
    /// The per-user cap cannot be checked: Redis is away.
    DirectoryUnavailable,
    /// The upgrade headers are malformed.
    BadUpgrade(String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::RateLimited { .. } | Refusal::IpLimit | Refusal::UserLimit => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refusal::NotGet => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::NotUpgrade | Refusal::BadVersion => StatusCode::UPGRADE_REQUIRED,
            Refusal::Origin(_) => StatusCode::FORBIDDEN,
            Refusal::Draining | Refusal::OverCapacity | Refusal::DirectoryUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::Unauthorized(AuthError::KeysUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Refusal::BadUpgrade(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The `outcome` label of `gateway_handshakes_total`.
    fn outcome(&self) -> &'static str {
        match self {
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::NotGet
            | Refusal::NotUpgrade
            | Refusal::BadVersion
            | Refusal::BadUpgrade(_) => "bad_request",
            Refusal::Origin(_) => "forbidden_origin",
            Refusal::Draining | Refusal::OverCapacity => "over_capacity",
            Refusal::IpLimit => "ip_limit",
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::UserLimit => "user_limit",
            Refusal::DirectoryUnavailable => "directory_unavailable",
        }
    }

    /// The `error` code of the JSON body.
    fn code(&self) -> &'static str {
        match self {
            Refusal::Draining => "draining",
            Refusal::IpLimit => "ip_connection_limit",
            Refusal::UserLimit => "user_connection_limit",
            Refusal::Unauthorized(e) => e.code(),
            other => other.outcome(),
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::RateLimited { .. } => "too many handshakes from this address".into(),
            Refusal::NotGet => "use GET to open a WebSocket".into(),
            Refusal::NotUpgrade => "this endpoint only speaks WebSocket".into(),
            Refusal::BadVersion => "unsupported Sec-WebSocket-Version; use 13".into(),
            Refusal::Origin(OriginError::Missing) => "an Origin header is required".into(),
            Refusal::Origin(OriginError::NotAllowed) => "this Origin is not allowed".into(),
            Refusal::Draining => {
                "this node is draining; connect through the load balancer to another node".into()
            }
            Refusal::OverCapacity => "node is at its connection limit; retry another node".into(),
            Refusal::IpLimit => "too many open connections from this address".into(),
            Refusal::Unauthorized(e) => e.to_string(),
            Refusal::UserLimit => "this user already has the maximum number of connections".into(),
            Refusal::DirectoryUnavailable => {
                "cannot check the per-user connection cap right now; retry".into()
            }
            Refusal::BadUpgrade(e) => e.clone(),
        }
    }

    /// Counts, logs and answers the refusal.
    pub(super) fn respond(&self, node: &Node, ip: IpAddr) -> HttpResponse {
        let (status, outcome, code, message) =
            (self.status(), self.outcome(), self.code(), self.message());
        node.metrics.handshakes.inc([outcome]);
        tracing::Span::current().record("outcome", outcome);
        tracing::info!(%ip, outcome, code, status = status.as_u16(), %message, "handshake refused");
        let mut r = json_error(status, code, &message);
        let headers = r.headers_mut();
        match self {
            Refusal::RateLimited { retry_after_secs } => {
                headers.insert("retry-after", HeaderValue::from(*retry_after_secs));
            }
            Refusal::NotUpgrade => {
                headers.insert("upgrade", HeaderValue::from_static("websocket"));
            }
            Refusal::BadVersion => {
                headers.insert("sec-websocket-version", HeaderValue::from_static("13"));
            }
            Refusal::Unauthorized(_) => {
                headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        r
    }
}

/// The client's address: the peer's, or the one a trusted proxy forwarded.
pub(super) fn client_ip(node: &Node, headers: &hyper::HeaderMap, peer: SocketAddr) -> IpAddr {
    let forwarded = headers.get_all("x-forwarded-for");
    node.proxies
        .client_ip(peer.ip(), forwarded.iter().map(HeaderValue::as_bytes))
}

/// Checks the handshake and, if it passes, answers 101 and spawns the connection.
pub async fn upgrade(node: Arc<Node>, req: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
    let ip = client_ip(&node, req.headers(), peer);
    if let Err(refusal) = check_upgrade(&node, &req, ip) {
        return refusal.respond(&node, ip);
    }
    let (parts, body) = req.into_parts();
    let wire = Wire::choose(&parts);
    let (conn, slot) = match admit_http(&node, &parts, ip, &wire).await {
        Ok(a) => a,
        Err(refusal) => return refusal.respond(&node, ip),
    };
    let mut req = Request::from_parts(parts, body);
    let (mut response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(e) => {
            node.directory.remove(&conn.conn_id).await;
            return Refusal::BadUpgrade(e.to_string()).respond(&node, ip);
        }
    };
    if let Wire::Stomp {
        subprotocol: Some(p),
        ..
    } = &wire
    {
        response.headers_mut().insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(p),
        );
    }
    node.metrics.handshakes.inc(["ok"]);
    node.metrics.connections_opened.inc(["websocket"]);
    let span = tracing::Span::current();
    span.record("outcome", "ok");
    if let Some(i) = &conn.identity {
        span.record("user", i.user_id.as_str());
    }
    tracing::debug!(%ip, user = conn.identity.as_ref().map(|i| i.user_id.as_str()), "handshake ok");
    tokio::spawn(async move {
        match fut.await {
            Ok(ws) => open_connection(node, conn, slot, wire, ws.into_inner().into_inner()).await,
            Err(e) => {
                tracing::debug!(%ip, error = %e, "upgrade did not complete");
                node.directory.remove(&conn.conn_id).await;
            }
        }
    });
    response.map(|_| full(Bytes::new()))
}

/// A client's handshakes (or posts) per second, over the per-IP rate: 429 with the wait.
pub(super) fn rate(
    limiter: &crate::edge::handshake_limit::HandshakeLimiter,
    node: &Node,
    ip: IpAddr,
    kind: &'static str,
) -> Result<(), Refusal> {
    limiter.check(ip).map_err(|wait| {
        node.metrics.rate_limit_hits.inc([kind]);
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Refusal::RateLimited {
            retry_after_secs: secs.max(1),
        }
    })
}

/// The checks of an upgrade's own, before [`admit_http`]'s: the rate first (cheapest).
fn check_upgrade(node: &Node, req: &Request<Incoming>, ip: IpAddr) -> Result<(), Refusal> {
    rate(&node.handshake_limiter, node, ip, "handshake")?;
    if req.method() != Method::GET {
        return Err(Refusal::NotGet);
    }
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return Err(Refusal::NotUpgrade);
    }
    if req
        .headers()
        .get("sec-websocket-version")
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(Refusal::BadVersion);
    }
    Ok(())
}

/// The checks every transport runs, in order: Origin, drain, capacity, the token. On
/// success the connection holds a slot and (v1, on WebSocket or SSE) is in the directory.
/// STOMP and Centrifugo connections name their user in their CONNECT frame or `connect`
/// command, so their token is optional here, and their directory entry (with the per-user
/// cap) comes then.
pub(super) async fn admit_http(
    node: &Arc<Node>,
    req: &Parts,
    ip: IpAddr,
    wire: &Wire,
) -> Result<(Conn, Slot), Refusal> {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    super::origin::check(&node.config, header("origin"), header("host"))
        .map_err(Refusal::Origin)?;
    if node.maintenance.is_on() {
        return Err(Refusal::Draining);
    }
    let mut slot = node.try_admit(ip)?;
    // Only v1 connections name their user at the handshake; the others may bring their
    // token later (STOMP's CONNECT, Centrifugo's `connect`).
    let later = !matches!(wire, Wire::V1 | Wire::Sse(_));
    let identity = authenticate(node, req, later)
        .await
        .map_err(Refusal::Unauthorized)?;
    let (id, conn_id) = node.next_conn_id();
    let cap = node.config.outbound_queue_bytes;
    let latency = node.metrics.fanout_latency.clone();
    let out = match wire {
        Wire::V1 => Outbound::new(cap, &v1::CODEC),
        Wire::Sse(ids) => Outbound::new(cap, &v1::SSE_CODEC).with_framer(ids.clone()),
        Wire::Centrifugo(codec) => Outbound::new(cap, *codec),
        Wire::Stomp { routes, .. } => Outbound::new(cap, &stomp::CODEC).with_framer(routes.clone()),
    };
    let out = Arc::new(out.with_latency(latency));
    slot.register(&out);
    let mut unwritten = None;
    if !later {
        // Uncapped, the records in Redis are written with the session's `connect` event, in
        // one round trip (`Session::open`): still before the welcome and the first frame.
        let user = identity.as_ref().map(|i| i.user_id.as_str());
        match node
            .directory
            .add_unwritten(&conn_id, id, user, out.clone())
            .await
        {
            Ok(cmds) => unwritten = cmds,
            Err(AddError::UserLimit) => return Err(Refusal::UserLimit),
            Err(AddError::Unavailable(_)) => return Err(Refusal::DirectoryUnavailable),
        }
    }
    let conn = Conn {
        id,
        conn_id,
        out,
        ip,
        identity,
        unwritten,
    };
    Ok((conn, slot))
}

/// The token from `Authorization: Bearer` or the `access_token` query parameter (browsers
/// cannot set headers on a WebSocket), verified. `Ok(None)` for an anonymous client, and
/// for a STOMP client without a token (`later`): it may bring one in its CONNECT frame.
async fn authenticate(
    node: &Node,
    req: &Parts,
    later: bool,
) -> Result<Option<Identity>, AuthError> {
    let from_header = req
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let from_query = req
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=")));
    let token = from_header.or(from_query).filter(|t| !t.is_empty());
    match (token, &node.auth) {
        (Some(token), Some(auth)) => auth.verify(token).await.map(Some),
        // A token on a node without keys cannot be checked: refuse rather than ignore it.
        (Some(_), None) => Err(AuthError::UnsupportedAlgorithm),
        (None, _) if node.config.allow_anonymous || later => Ok(None),
        (None, _) => Err(AuthError::Missing),
    }
}

/// Opens an upgraded connection: the session (`connect` event), the protocol's greeting,
/// then the connection's own task.
///
/// This runs in the short-lived task that awaited the upgrade. The long-lived task that it
/// spawns captures only what the connection needs until cleanup, because whatever a task's
/// future holds is reserved for every idle connection's whole life.
async fn open_connection(node: Arc<Node>, conn: Conn, slot: Slot, wire: Wire, upgraded: Upgraded) {
    let out = conn.out.clone();
    tracing::debug!(peer = %conn.ip, conn = %conn.conn_id, "connection open");
    if let Wire::Centrifugo(_) = wire {
        open_centrifugo(node, conn, slot, upgraded);
        return;
    }
    if let Wire::Stomp { routes, .. } = wire {
        // The session opens at CONNECT; until then the writer's token clock idles.
        let clock = stomp::idle_clock(node.config.token_grace());
        let (connection, cleanup) =
            stomp::Connection::new(node.core.clone(), conn, routes, clock.clone());
        let close = move |node: Arc<Node>, reason: CloseReason| -> BoxFuture<'static, ()> {
            Box::pin(async move { cleanup.close(&node.core, &reason).await })
        };
        return spawn_served(node, upgraded, connection, out, Some(clock), slot, close);
    }
    let (session, ending) = Session::open(node.core.clone(), conn).await;
    let clock = session.clock();
    let connection = v1::Connection::open(session);
    let close = move |node: Arc<Node>, reason: CloseReason| -> BoxFuture<'static, ()> {
        Box::pin(async move { ending.close(&node.core, &reason).await })
    };
    spawn_served(node, upgraded, connection, out, clock, slot, close);
}

/// Serves a connection in a task of its own, then runs its protocol's cleanup.
fn spawn_served<H: Handler>(
    node: Arc<Node>,
    upgraded: Upgraded,
    connection: H,
    out: Arc<Outbound>,
    clock: Option<Arc<TokenClock>>,
    slot: Slot,
    cleanup: impl FnOnce(Arc<Node>, CloseReason) -> BoxFuture<'static, ()> + Send + 'static,
) {
    let limits = node.limits();
    let spawn = UntilClosedSpawn {
        node,
        slot,
        cleanup,
    };
    socket::serve_upgraded(upgraded, limits, connection, out, clock, spawn);
}

/// [`spawn_until_closed`] as the [`socket::Spawn`] that `serve_upgraded` hands its
/// connection to.
struct UntilClosedSpawn<C> {
    node: Arc<Node>,
    slot: Slot,
    cleanup: C,
}

impl<C> socket::Spawn for UntilClosedSpawn<C>
where
    C: FnOnce(Arc<Node>, CloseReason) -> BoxFuture<'static, ()> + Send + 'static,
{
    fn spawn<F: Future<Output = CloseReason> + Send + 'static>(self, served: F) {
        spawn_until_closed(self.node, served, self.slot, self.cleanup);
    }
}

/// Runs a served connection (its writer loop, over a socket or an HTTP body) to its close
/// in a task of its own, then its protocol's cleanup; the connection's slot goes back last.
pub(super) fn spawn_until_closed<F, C>(node: Arc<Node>, served: F, slot: Slot, cleanup: C)
where
    F: Future<Output = CloseReason> + Send + 'static,
    C: FnOnce(Arc<Node>, CloseReason) -> BoxFuture<'static, ()> + Send + 'static,
{
    tokio::spawn(UntilClosed {
        served: Some(served),
        after: Some((node, cleanup)),
        cleaning: None,
        slot: Some(slot),
    });
}

pin_project_lite::pin_project! {
    /// A connection's task: its served future, then its cleanup. A struct rather than an
    /// `async` block, which would keep both the captured `served` and the copy it awaits,
    /// each for the connection's whole life.
    struct UntilClosed<F, C> {
        #[pin]
        served: Option<F>,
        after: Option<(Arc<Node>, C)>,
        // Boxed (by `cleanup`): inline, its Redis calls would be reserved in every idle
        // connection.
        cleaning: Option<BoxFuture<'static, ()>>,
        slot: Option<Slot>,
    }
}

impl<F, C> Future for UntilClosed<F, C>
where
    F: Future<Output = CloseReason>,
    C: FnOnce(Arc<Node>, CloseReason) -> BoxFuture<'static, ()>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Some(served) = this.served.as_mut().as_pin_mut() {
            let Poll::Ready(reason) = served.poll(cx) else {
                return Poll::Pending;
            };
            // The connection's state goes before its cleanup runs.
            this.served.set(None);
            if let Some((node, cleanup)) = this.after.take() {
                *this.cleaning = Some(cleanup(node, reason));
            }
        }
        if let Some(cleaning) = this.cleaning.as_mut() {
            if cleaning.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *this.cleaning = None;
        }
        this.slot.take();
        Poll::Ready(())
    }
}

/// Opens an upgraded Centrifugo connection: it waits for its `connect` command, which
/// opens the session (see `protocol::centrifugo`).
fn open_centrifugo(node: Arc<Node>, conn: Conn, slot: Slot, upgraded: Upgraded) {
    let out = conn.out.clone();
    tracing::debug!(peer = %conn.ip, conn = %conn.conn_id, "centrifugo connection open");
    let (connection, cleanup, clock) =
        centrifugo::Connection::open(node.core.clone(), conn, &centrifugo::CODEC, None);
    let close = move |_: Arc<Node>, reason: CloseReason| -> BoxFuture<'static, ()> {
        Box::pin(async move { cleanup.close(&reason).await })
    };
    spawn_served(node, upgraded, connection, out, Some(clock), slot, close);
}
