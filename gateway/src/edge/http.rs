//! The public listener: HTTP/1.1 with `GET /ws` (and `GET /stomp`, for STOMP clients)
//! upgrading to WebSocket, `GET /connection/websocket` upgrading to WebSocket with
//! Centrifugo's client protocol (for the stock Centrifugo SDKs), the HTTP transports
//! (`POST /connection/http_stream`, `/connection/sse`, `POST /emulation` and `GET /sse`, in
//! [`super::streams`]), the demo chat page at `/`, and a plain HTTP answer for anything else.
//!
//! The upgrade itself, and every check before it, is in [`super::handshake`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::node::Node;

/// Response type of both listeners: a whole body, or a streaming connection's.
pub type HttpResponse = Response<Body>;

/// See [`HttpResponse`].
pub type Body = Either<Full<Bytes>, crate::conn::stream::Body>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// Reads a request body of at most `max` bytes within `timeout` (`handshake_timeout_ms`,
/// as the request head: hyper's header timeout ends with the head, and a caller that sends
/// the head and then trickles the body would otherwise hold the connection for as long as
/// it likes). Refused with 413 or 408.
pub async fn read_body(
    body: Incoming,
    max: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, HttpResponse> {
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("body over {max} bytes"),
        )),
        Err(_) => Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "request body not received in time",
        )),
    }
}

const DEMO_PAGE: &str = include_str!("../../static/chat.html");

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
                metrics.protocol_violations.inc([kind]);
                tracing::info!(%peer, kind, error = %e, "http request refused");
            }
            None => tracing::debug!(%peer, error = %e, "http connection ended with an error"),
        }
    }
}

async fn route(node: Arc<Node>, req: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
    let response = match (req.method(), req.uri().path()) {
        (_, "/ws" | "/stomp" | "/connection/websocket") => {
            let span = tracing::info_span!(
                "handshake",
                node = %node.config.node_id,
                %peer,
                user = tracing::field::Empty,
                outcome = tracing::field::Empty,
            );
            use tracing::Instrument;
            super::handshake::upgrade(node.clone(), req, peer)
                .instrument(span)
                .await
        }
        (_, "/connection/http_stream" | "/connection/sse" | "/emulation" | "/sse") => {
            super::streams::route(node.clone(), req, peer).await
        }
        (&Method::GET, "/") => {
            let mut r = Response::new(full(Bytes::from_static(DEMO_PAGE.as_bytes())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    };
    let status = response.status();
    node.metrics
        .http_requests
        .inc(["public", crate::metrics::status_label(status.as_u16())]);
    response
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
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
