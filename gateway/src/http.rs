//! The public listener: HTTP/1.1 with `GET /ws` upgrading to WebSocket, the demo chat page at
//! `/`, and a plain HTTP answer for anything else.
//!
//! Every check that can run before the upgrade does, so a refused client costs one HTTP
//! response rather than a held socket: method, upgrade headers, WebSocket version and the
//! node's connection cap (503).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use shared::protocol::ServerFrame;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::{AuthError, Identity, TokenClock};
use crate::directory::AddError;
use crate::error::{Blame, CloseReason};
use crate::hub::ConnId;
use crate::inbound::Event;
use crate::node::{Node, Slot};
use crate::outbound::Outbound;
use crate::session::Session;
use crate::websocket;

/// Response type of both listeners.
pub type HttpResponse = Response<Full<Bytes>>;

const DEMO_PAGE: &str = include_str!("../static/chat.html");

/// Serves one connection (plain TCP or TLS) of the public listener. The header read timeout
/// bounds how long a client may take to send its handshake (slowloris). `peer` is the
/// client address, already taken from a PROXY header when one was trusted.
pub async fn serve_connection<S>(node: Arc<Node>, io: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let timeout = node.config.handshake_timeout();
    let metrics = node.metrics.clone();
    let service = hyper::service::service_fn(move |req| {
        let node = node.clone();
        async move { Ok::<_, Infallible>(route(node, req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        // hyper answers a malformed request itself (400, or 431 for oversized headers) and
        // drops a client that trickles its headers past the timeout; count both here.
        let kind = if e.is_timeout() {
            Some("handshake_timeout")
        } else if e.is_parse() || e.is_parse_too_large() {
            Some("malformed_http")
        } else {
            None
        };
        match kind {
            Some(kind) => {
                metrics.inc("gateway_protocol_violations_total", &[("kind", kind)]);
                tracing::info!(%peer, kind, error = %e, "http request refused");
            }
            None => tracing::debug!(%peer, error = %e, "http connection ended with an error"),
        }
    }
}

async fn route(node: Arc<Node>, req: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
    let response = match (req.method(), req.uri().path()) {
        (_, "/ws") => {
            let span = tracing::info_span!(
                "handshake",
                node = %node.config.node_id,
                %peer,
                user = tracing::field::Empty,
                outcome = tracing::field::Empty,
            );
            use tracing::Instrument;
            upgrade(node.clone(), req, peer).instrument(span).await
        }
        (&Method::GET, "/") => {
            let mut r = Response::new(Full::new(Bytes::from_static(DEMO_PAGE.as_bytes())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    };
    let status = response.status();
    node.metrics.inc(
        "gateway_http_requests_total",
        &[("listener", "public"), ("status", status.as_str())],
    );
    response
}

/// Checks the handshake and, if it passes, answers 101 and spawns the connection. Cheap
/// checks run first; the token signature (the costliest) runs last.
async fn upgrade(node: Arc<Node>, mut req: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let ip = node.proxies.client_ip(peer.ip(), forwarded);
    let refuse = |status: StatusCode, outcome: &'static str, code: &str, message: &str| {
        node.metrics
            .inc("gateway_handshakes_total", &[("outcome", outcome)]);
        tracing::Span::current().record("outcome", outcome);
        tracing::info!(%ip, outcome, code, status = status.as_u16(), message, "handshake refused");
        json_error(status, code, message)
    };
    if let Err(wait) = node.handshake_limiter.check(ip) {
        node.metrics
            .inc("gateway_rate_limit_hits_total", &[("kind", "handshake")]);
        let mut r = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "rate_limited",
            "too many handshakes from this address",
        );
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        r.headers_mut()
            .insert("retry-after", HeaderValue::from(secs.max(1)));
        return r;
    }
    if req.method() != Method::GET {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "bad_request",
            "bad_request",
            "use GET to open a WebSocket",
        );
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut r = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "bad_request",
            "bad_request",
            "this endpoint only speaks WebSocket",
        );
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("websocket"));
        return r;
    }
    if req
        .headers()
        .get("sec-websocket-version")
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut r = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "bad_request",
            "bad_request",
            "unsupported Sec-WebSocket-Version; use 13",
        );
        r.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return r;
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Err(e) = crate::origin::check(&node.config, header("origin"), header("host")) {
        let message = match e {
            crate::origin::OriginError::Missing => "an Origin header is required",
            crate::origin::OriginError::NotAllowed => "this Origin is not allowed",
        };
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "forbidden_origin",
            message,
        );
    }
    if node.maintenance.is_on() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "over_capacity",
            "draining",
            "this node is draining; connect through the load balancer to another node",
        );
    }
    let Some(slot) = node.try_admit() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "over_capacity",
            "over_capacity",
            "node is at its connection limit; retry another node",
        );
    };
    let identity = match authenticate(&node, &req).await {
        Ok(identity) => identity,
        Err(e) => {
            let status = if e == AuthError::KeysUnavailable {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNAUTHORIZED
            };
            let mut r = refuse(status, "unauthorized", e.code(), &e.to_string());
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return r;
        }
    };
    let (id, conn_id) = node.next_conn_id();
    let out = Arc::new(Outbound::with_latency(
        node.config.outbound_queue_bytes,
        node.metrics.fanout_latency.clone(),
    ));
    let user = identity.as_ref().map(|i| i.user_id.as_str());
    match node.directory.add(&conn_id, user, out.clone()).await {
        Ok(()) => {}
        Err(AddError::UserLimit) => {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "user_limit",
                "user_connection_limit",
                "this user already has the maximum number of connections",
            )
        }
        Err(AddError::Unavailable(_)) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "directory_unavailable",
                "directory_unavailable",
                "cannot check the per-user connection cap right now; retry",
            )
        }
    }
    let conn = Conn {
        id,
        conn_id,
        out,
        slot,
        ip,
        identity,
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(e) => {
            node.directory.remove(&conn.conn_id).await;
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "bad_request",
                &e.to_string(),
            );
        }
    };
    node.metrics
        .inc("gateway_handshakes_total", &[("outcome", "ok")]);
    let span = tracing::Span::current();
    span.record("outcome", "ok");
    if let Some(i) = &conn.identity {
        span.record("user", i.user_id.as_str());
    }
    tracing::debug!(%ip, user = conn.identity.as_ref().map(|i| i.user_id.as_str()), "handshake ok");
    tokio::spawn(async move {
        match fut.await {
            Ok(ws) => open_connection(node, conn, ws.into_inner().into_inner()).await,
            Err(e) => {
                tracing::debug!(%ip, error = %e, "upgrade did not complete");
                node.directory.remove(&conn.conn_id).await;
            }
        }
    });
    response.map(|_| Full::new(Bytes::new()))
}

/// The token from `Authorization: Bearer` or the `access_token` query parameter (browsers
/// cannot set headers on a WebSocket), verified. `Ok(None)` for an anonymous client.
async fn authenticate(node: &Node, req: &Request<Incoming>) -> Result<Option<Identity>, AuthError> {
    let from_header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let from_query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=")));
    let token = from_header.or(from_query).filter(|t| !t.is_empty());
    match (token, &node.auth) {
        (Some(token), Some(auth)) => auth.verify(token).await.map(Some),
        // A token on a node without keys cannot be checked: refuse rather than ignore it.
        (Some(_), None) => Err(AuthError::UnsupportedAlgorithm),
        (None, _) if node.config.allow_anonymous => Ok(None),
        (None, _) => Err(AuthError::Missing),
    }
}

/// A connection admitted at the handshake: slot taken, registered in the directory.
struct Conn {
    id: ConnId,
    conn_id: String,
    out: Arc<Outbound>,
    slot: Slot,
    ip: IpAddr,
    identity: Option<Identity>,
}

/// After the socket closed: unsubscribe, leave the directory, append `disconnect`.
async fn cleanup(
    node: &Node,
    id: ConnId,
    conn_id: &str,
    user_id: Option<&str>,
    subs: &crate::session::Subscriptions,
    reason: &CloseReason,
) {
    let channels: Vec<String> = subs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    for channel in channels {
        let _ = node.hub.unsubscribe(&channel, id).await;
    }
    node.directory.remove(conn_id).await;
    let close = serde_json::json!({"code": reason.code(), "reason": reason.label()}).to_string();
    node.inbound
        .lifecycle(Event::Disconnect, conn_id, user_id, &close)
        .await;
}

/// Opens an upgraded connection: `connect` event, welcome, then the connection's own task.
///
/// This runs in the short-lived task that awaited the upgrade. The long-lived task that it
/// spawns captures only what the connection needs until cleanup, because whatever a task's
/// future holds is reserved for every idle connection's whole life.
async fn open_connection(node: Arc<Node>, conn: Conn, upgraded: hyper::upgrade::Upgraded) {
    let Conn {
        id,
        conn_id,
        out,
        slot,
        ip: peer,
        identity,
    } = conn;
    let clock = identity
        .as_ref()
        .map(|i| Arc::new(TokenClock::new(i.exp, node.config.token_grace())));
    let user_id = identity.as_ref().map(|i| i.user_id.clone());
    node.inbound
        .lifecycle(Event::Connect, &conn_id, user_id.as_deref(), "")
        .await;
    let session = Session::new(
        id,
        conn_id.clone(),
        node.clone(),
        out.clone(),
        identity,
        clock.clone(),
    );
    session.send(&ServerFrame::Welcome {
        conn_id: conn_id.clone(),
        node_id: node.config.node_id.clone(),
        user_id: user_id.clone(),
    });
    let subs = session.subscriptions();
    tracing::debug!(%peer, conn = %conn_id, "connection open");
    // Boxed so that the task holds it once: awaiting a captured future moves it, and both
    // places would stay reserved for the connection's whole life.
    let served = websocket::serve_upgraded(
        upgraded,
        node.limits(),
        session,
        out,
        // A child token per connection: polling the shared one locks a mutex that every
        // connection's writer contends for on each turn of its loop.
        node.close_all.child_token(),
        clock,
    );
    tokio::spawn(async move {
        let reason = served.await;
        // Boxed: inline, cleanup's Redis calls would be reserved in every idle connection.
        Box::pin(cleanup(
            &node,
            id,
            &conn_id,
            user_id.as_deref(),
            &subs,
            &reason,
        ))
        .await;
        closed(&node, peer, &conn_id, &reason);
        drop(slot);
    });
}

/// Counts and logs a closed connection.
fn closed(node: &Node, peer: IpAddr, conn_id: &str, reason: &CloseReason) {
    let (label, blame) = (reason.label(), reason.blame());
    if let CloseReason::Protocol(kind) = reason {
        node.metrics
            .inc("gateway_protocol_violations_total", &[("kind", kind)]);
    }
    node.metrics.inc(
        "gateway_connection_closes_total",
        &[("reason", label), ("blame", blame.as_str())],
    );
    let code = reason.code();
    match blame {
        Blame::Client => {
            tracing::info!(%peer, conn = %conn_id, code, reason = label, detail = %reason, "connection closed")
        }
        Blame::Internal => {
            tracing::error!(%peer, conn = %conn_id, code, reason = label, "connection closed")
        }
        _ => tracing::debug!(%peer, conn = %conn_id, code, reason = label, "connection closed"),
    }
}

/// A JSON error body: `{"error": code, "message": message}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

/// A JSON response.
pub fn json(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
