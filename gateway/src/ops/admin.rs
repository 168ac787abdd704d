//! The admin listener: probes, metrics and the HTTP API for backends.
//!
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 when ready for new connections; 503 while draining or while the
//!   broker is unreachable.
//! - `GET /metrics`: Prometheus text.
//! - `POST /v1/channels/{channel}/publish` with `{"data": <json>}`: publishes cluster-wide.
//! - `POST /v1/users/{user}/send`, `POST /v1/connections/{conn}/send` with
//!   `{"data": <json>}`: unicast, answered with `{"delivered": n}`.
//! - `DELETE /v1/connections/{conn}`: closes that connection (4003) on whichever node.
//! - `GET /v1/users/{user}/connections`: the user's live connections.
//! - `POST /v1/drain`: drain this node as on SIGTERM, but keep the process up.
//!
//! Each call is one directory lookup in Redis on whichever node receives it: no call asks
//! the other nodes.
//!
//! With `admin_token` set, `/v1/*` requires `Authorization: Bearer <token>`. Probes and
//! metrics stay open because kubelet and scrapers reach them on this internal port only.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::edge::http::{json, json_error, HttpResponse};
use crate::node::Node;

/// Accepts admin connections until `stop` is cancelled.
pub async fn serve(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let node = node.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(node, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn route(node: Arc<Node>, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_owned();
    let response = match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readiness(&node),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(node.metrics.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (_, p) if p.starts_with("/v1/") => match refuse_unauthorized(&node, &req) {
            Some(refusal) => refusal,
            None => api(&node, req, &path).await,
        },
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    };
    node.metrics.inc(
        "gateway_http_requests_total",
        &[
            ("listener", "admin"),
            ("status", response.status().as_str()),
        ],
    );
    response
}

fn readiness(node: &Node) -> HttpResponse {
    let (status, state) = if node.draining.is_cancelled() || node.maintenance.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !node.hub.broker_healthy() {
        (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable")
    } else {
        (StatusCode::OK, "ready")
    };
    json(
        status,
        &serde_json::json!({ "status": state, "connections": node.open_connections() }),
    )
}

/// The 401 answer when an admin token is configured and the request lacks it.
fn refuse_unauthorized(node: &Node, req: &Request<Incoming>) -> Option<HttpResponse> {
    let token = node.config.admin_token.as_ref()?.expose();
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare in constant time so the token cannot be guessed byte by byte from timings.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    });
    if ok {
        return None;
    }
    tracing::info!("admin request refused: missing or wrong bearer token");
    let mut r = json_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "admin token required",
    );
    r.headers_mut()
        .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    Some(r)
}

#[derive(Deserialize)]
struct DataBody {
    data: Box<RawValue>,
}

fn not_found() -> HttpResponse {
    json_error(StatusCode::NOT_FOUND, "not_found", "no such path")
}

fn unavailable(e: crate::error::BrokerError) -> HttpResponse {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &e.to_string(),
    )
}

/// Routes `/v1/...` inside an `admin` span that carries the caller's `traceparent`.
async fn api(node: &Node, req: Request<Incoming>, path: &str) -> HttpResponse {
    let method = req.method().clone();
    // W3C trace context: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            v.len() == 55
                && v.bytes().enumerate().all(|(i, b)| {
                    matches!(i, 2 | 35 | 52) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
                })
        })
        .map(str::to_owned);
    let span = tracing::info_span!(
        "admin",
        method = %method,
        path,
        traceparent = traceparent.as_deref().unwrap_or("")
    );
    use tracing::Instrument;
    call(node, req, path, method, traceparent)
        .instrument(span)
        .await
}

/// Ids in paths are checked with the channel-name rule: user and connection ids use the
/// same safe alphabet.
async fn call(
    node: &Node,
    req: Request<Incoming>,
    path: &str,
    method: Method,
    traceparent: Option<String>,
) -> HttpResponse {
    if path == "/v1/drain" {
        if method != Method::POST {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST",
            );
        }
        tracing::info!("drain requested through the admin API");
        node.maintenance.cancel();
        return json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "status": "draining", "connections": node.open_connections() }),
        );
    }
    // Ids may contain '/', so the action is matched as a suffix.
    let Some((kind, rest)) = path.trim_start_matches("/v1/").split_once('/') else {
        return not_found();
    };
    let (id, action) = ["publish", "send", "connections"]
        .iter()
        .find_map(|a| Some((rest.strip_suffix(a)?.strip_suffix('/')?, *a)))
        .unwrap_or((rest, ""));
    let allowed = match (kind, action) {
        ("channels", "publish") | ("users", "send") | ("connections", "send") => Method::POST,
        ("users", "connections") => Method::GET,
        ("connections", "") => Method::DELETE,
        _ => return not_found(),
    };
    if method != allowed {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("use {allowed}"),
        );
    }
    if !shared::channel::is_valid(id) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "ids must match [A-Za-z0-9_.:@/-]{1,200}",
        );
    }
    let dir = &node.directory;
    match (kind, action) {
        ("users", "connections") => match dir.user_connections(id).await {
            Ok(conns) => json(StatusCode::OK, &serde_json::json!({ "connections": conns })),
            Err(e) => unavailable(e),
        },
        ("connections", "") => match dir.disconnect(id).await {
            Ok(true) => json(
                StatusCode::OK,
                &serde_json::json!({ "status": "disconnecting" }),
            ),
            Ok(false) => json_error(StatusCode::NOT_FOUND, "not_found", "no such connection"),
            Err(e) => unavailable(e),
        },
        _ => {
            let data = match read_data(node, req).await {
                Ok(d) => d,
                Err(r) => return r,
            };
            let sent = match (kind, &traceparent) {
                ("channels", Some(tp)) => node
                    .hub
                    .publish_traced(id, data.get(), tp)
                    .await
                    .map(|()| None),
                ("channels", None) => node.hub.publish(id, data.get()).await.map(|()| None),
                ("users", _) => dir.send_user(id, data.get()).await.map(Some),
                _ => dir.send_conn(id, data.get()).await.map(Some),
            };
            match sent {
                Ok(None) => {
                    node.metrics.inc("gateway_admin_publishes_total", &[]);
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "status": "published" }),
                    )
                }
                Ok(Some(n)) => json(StatusCode::OK, &serde_json::json!({ "delivered": n })),
                Err(e) => unavailable(e),
            }
        }
    }
}

/// Reads `{"data": <json>}`, bounded by `max_message_bytes`, with the same checks as a
/// client's `data`.
async fn read_data(node: &Node, req: Request<Incoming>) -> Result<Box<RawValue>, HttpResponse> {
    let max = node.config.max_message_bytes;
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("body over {max} bytes"),
            ))
        }
    };
    let parsed: DataBody = serde_json::from_slice(&body).map_err(|e| {
        json_error(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            &format!("expected {{\"data\": <json>}}: {e}"),
        )
    })?;
    shared::protocol::check_data(parsed.data.get())
        .map_err(|why| json_error(StatusCode::BAD_REQUEST, "malformed_json", why))?;
    Ok(parsed.data)
}
