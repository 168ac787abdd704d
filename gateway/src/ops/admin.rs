//! The admin listener: probes, metrics and the HTTP API for backends.
//!
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 when ready for new connections; 503 while draining or while the
//!   broker is unreachable.
//! - `GET /metrics`: Prometheus text.
//! - `POST /v1/channels/{channel}/publish` with `{"data": <json>}`: publishes cluster-wide.
//!   On a history channel the answer has the publication's `offset` and `epoch`, and a
//!   retry with the same `Idempotency-Key` header publishes nothing and answers the first.
//! - `GET /v1/channels/{channel}/history?limit=N[&since_epoch=E&since_offset=K]`: a history
//!   channel's publications.
//! - `POST /v1/users/{user}/send`, `POST /v1/connections/{conn}/send` with
//!   `{"data": <json>}`: unicast, answered with `{"delivered": n}`.
//! - `DELETE /v1/connections/{conn}`: closes that connection (4003) on whichever node.
//! - `GET /v1/users/{user}/connections`: the user's live connections.
//! - `GET /v1/channels/{channel}/presence[?cursor=…&limit=N]`: a page of a presence
//!   channel's members and the cursor of the next page (`null` after the last);
//!   `GET /v1/channels/{channel}/presence_stats`: its counts.
//! - `POST /v1/drain`: drain this node as on SIGTERM, but keep the process up.
//! - `DELETE /v1/drain`: end that drain (started here or by the pod annotation): readiness
//!   and new handshakes come back. A shutdown drain (SIGTERM) cannot be ended.
//! - `POST /api/<method>`: Centrifugo's server API (`super::api`), with its own key header.
//!
//! Each call is one directory lookup in Redis on whichever node receives it: no call asks
//! the other nodes.
//!
//! With `admin_token` set, `/v1/*` requires `Authorization: Bearer <token>`. Probes
//! (`/healthz`, `/readyz`) and `/metrics` never ask for it: kubelet and scrapers reach them
//! on this internal port only, and a NetworkPolicy is what keeps other pods away.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::watch;
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
        let timeout = node.config.handshake_timeout();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(node, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
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
            let mut r = Response::new(crate::edge::http::full(node.metrics.render()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (_, p) if p.starts_with("/api/") => {
            let method = p.trim_start_matches("/api/");
            super::api::serve(&node, req, method).await
        }
        (_, p) if p.starts_with("/v1/") => match refuse_unauthorized(&node, &req) {
            Some(refusal) => refusal,
            None => api(&node, req, &path).await,
        },
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    };
    let status = crate::metrics::status_label(response.status().as_u16());
    node.metrics.http_requests.inc(["admin", status]);
    response
}

fn readiness(node: &Node) -> HttpResponse {
    let (status, state) = if node.draining.is_cancelled() || node.maintenance.is_on() {
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
    let ok = given
        .is_some_and(|g| crate::config::secret::constant_time_eq(g.as_bytes(), token.as_bytes()));
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

/// A drain on demand (`POST /v1/drain`, the pod annotation) that can be ended again
/// (`DELETE /v1/drain`, removing the annotation). It cannot be a `CancellationToken`,
/// which stays cancelled for good; a watch channel holds the state and wakes waiters on
/// every change. Clones share the state.
#[derive(Clone)]
pub struct Maintenance(watch::Sender<bool>);

impl Default for Maintenance {
    fn default() -> Self {
        Maintenance(watch::Sender::new(false))
    }
}

impl Maintenance {
    /// Starts a drain. `false` when one was already on.
    pub fn start(&self) -> bool {
        self.0.send_if_modified(|on| !std::mem::replace(on, true))
    }

    /// Ends the drain. `false` when none was on.
    pub fn end(&self) -> bool {
        self.0.send_if_modified(|on| std::mem::replace(on, false))
    }

    /// Whether a drain on demand is on.
    pub fn is_on(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once the drain is on (`true`) or off (`false`); at once if it already is.
    pub async fn wait(&self, on: bool) {
        let mut rx = self.0.subscribe();
        // Fails only once the sender is gone, and `self` holds it.
        let _ = rx.wait_for(|v| *v == on).await;
    }
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
        return drain(node, &method);
    }
    // Ids may contain '/', so the action is matched as a suffix.
    let Some((kind, rest)) = path.trim_start_matches("/v1/").split_once('/') else {
        return not_found();
    };
    let (id, action) = [
        "publish",
        "send",
        "connections",
        "history",
        "presence",
        "presence_stats",
    ]
    .iter()
    .find_map(|a| Some((rest.strip_suffix(a)?.strip_suffix('/')?, *a)))
    .unwrap_or((rest, ""));
    let allowed = match (kind, action) {
        ("channels", "publish") | ("users", "send") | ("connections", "send") => Method::POST,
        ("users", "connections")
        | ("channels", "history")
        | ("channels", "presence")
        | ("channels", "presence_stats") => Method::GET,
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
        ("channels", "history") => history(node, id, req.uri().query().unwrap_or("")).await,
        ("channels", "presence") => presence(node, id, req.uri().query().unwrap_or("")).await,
        ("channels", "presence_stats") => presence_stats(node, id).await,
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
            // A retried publish with the same key is published once (history channels).
            // A key that cannot be used is refused rather than ignored: ignoring it would
            // turn the caller's retry into a second publication. Sends take no key.
            let header = req.headers().get("idempotency-key");
            let key = match header.filter(|_| kind == "channels") {
                None => None,
                Some(v) => match v.to_str().ok().filter(|k| shared::channel::is_valid(k)) {
                    Some(k) => Some(k.to_owned()),
                    None => {
                        return json_error(
                            StatusCode::BAD_REQUEST,
                            "invalid_idempotency_key",
                            "Idempotency-Key must match [A-Za-z0-9_.:@/-]{1,200}",
                        )
                    }
                },
            };
            let data = match read_data(node, req).await {
                Ok(d) => d,
                Err(r) => return r,
            };
            if kind == "channels" {
                let key = key.as_deref();
                let published = match &traceparent {
                    Some(tp) => node.hub.publish_traced(id, data.get(), tp, key).await,
                    None => node.hub.publish(id, data.get(), key).await,
                };
                return match published {
                    Ok(at) => {
                        node.metrics.admin_publishes.inc([]);
                        let mut body = serde_json::json!({ "status": "published" });
                        if let Some(p) = at {
                            body["offset"] = p.offset.into();
                            body["epoch"] = p.epoch.into();
                        }
                        json(StatusCode::OK, &body)
                    }
                    Err(e) => unavailable(e),
                };
            }
            let sent = match kind {
                "users" => dir.send_user(id, data.get()).await,
                _ => dir.send_conn(id, data.get()).await,
            };
            match sent {
                Ok(n) => json(StatusCode::OK, &serde_json::json!({ "delivered": n })),
                Err(e) => unavailable(e),
            }
        }
    }
}

/// `GET /v1/channels/{ch}/history?limit=N[&since_epoch=E&since_offset=K]`: the last
/// `limit` publications (all the channel keeps by default), or those after the position.
async fn history(node: &Node, channel: &str, query: &str) -> HttpResponse {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let limit = param("limit").and_then(|v| v.parse::<usize>().ok());
    let since = match (param("since_epoch"), param("since_offset")) {
        (Some(epoch), Some(offset)) => match offset.parse::<u64>() {
            Ok(offset) => Some(crate::broker::Position {
                epoch: epoch.to_owned(),
                offset,
            }),
            Err(_) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "since_offset must be a number",
                )
            }
        },
        (None, None) => None,
        _ => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give both since_epoch and since_offset, or neither",
            )
        }
    };
    match node.hub.history(channel, limit, since.as_ref()).await {
        Ok(Some(h)) => {
            let publications: Vec<serde_json::Value> = h
                .publications
                .iter()
                .map(|(offset, data)| {
                    let data: serde_json::Value =
                        serde_json::from_str(data).unwrap_or(serde_json::Value::Null);
                    serde_json::json!({ "offset": offset, "data": data })
                })
                .collect();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "epoch": h.epoch, "offset": h.top, "publications": publications
                }),
            )
        }
        Ok(None) => json_error(
            StatusCode::NOT_FOUND,
            "not_enabled",
            "this channel keeps no history",
        ),
        Err(e) => unavailable(e),
    }
}

fn no_presence() -> HttpResponse {
    json_error(
        StatusCode::NOT_FOUND,
        "not_enabled",
        "this channel has no presence",
    )
}

/// `GET /v1/channels/{ch}/presence[?cursor=C&limit=N]`: a page of about `limit` members
/// (default `presence_max_members`), and the next page's cursor, `null` after the last.
async fn presence(node: &Node, channel: &str, query: &str) -> HttpResponse {
    if !node.presence.enabled(channel) {
        return no_presence();
    }
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let cursor = param("cursor").filter(|c| !c.is_empty() && c.len() <= 256);
    let limit = param("limit")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(node.config.presence_max_members)
        .clamp(1, 10_000);
    match node.presence.page(channel, cursor, limit).await {
        Ok(page) => {
            let mut members = serde_json::Map::new();
            for m in page.members {
                let info = m
                    .info
                    .as_deref()
                    .and_then(|i| serde_json::from_str(i).ok())
                    .unwrap_or(serde_json::Value::Null);
                members.insert(
                    m.conn_id,
                    serde_json::json!({ "user_id": m.user_id, "info": info }),
                );
            }
            json(
                StatusCode::OK,
                &serde_json::json!({ "presence": members, "cursor": page.cursor }),
            )
        }
        Err(e) => unavailable(e),
    }
}

/// `GET /v1/channels/{ch}/presence_stats`: `{"num_clients": N, "num_users": M}`.
async fn presence_stats(node: &Node, channel: &str) -> HttpResponse {
    if !node.presence.enabled(channel) {
        return no_presence();
    }
    match node.presence.stats(channel).await {
        Ok(s) => json(
            StatusCode::OK,
            &serde_json::json!({ "num_clients": s.num_clients, "num_users": s.num_users }),
        ),
        Err(e) => unavailable(e),
    }
}

/// `POST` starts a drain on demand, `DELETE` ends it (whoever started it: this API or the
/// pod annotation). Both are idempotent.
fn drain(node: &Node, method: &Method) -> HttpResponse {
    let connections = node.open_connections();
    match *method {
        Method::POST => {
            if node.maintenance.start() {
                tracing::info!("drain requested through the admin API");
            }
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "status": "draining", "connections": connections }),
            )
        }
        Method::DELETE if node.draining.is_cancelled() => json_error(
            StatusCode::CONFLICT,
            "shutting_down",
            "the node is shutting down; that drain cannot be ended",
        ),
        Method::DELETE => {
            let ended = node.maintenance.end();
            if ended {
                tracing::info!("drain ended through the admin API: accepting connections again");
            }
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "status": if ended { "drain_ended" } else { "not_draining" },
                    "connections": connections,
                }),
            )
        }
        _ => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST or DELETE",
        ),
    }
}

/// Reads `{"data": <json>}`, bounded by `max_message_bytes` and in time (see
/// [`crate::edge::http::read_body`]), with the same checks as a client's `data`.
async fn read_data(node: &Node, req: Request<Incoming>) -> Result<Box<RawValue>, HttpResponse> {
    let max = node.config.max_message_bytes;
    let body = crate::edge::http::read_body(req.into_body(), max, node.config.handshake_timeout())
        .await
        .inspect_err(|r| {
            tracing::info!(status = r.status().as_u16(), "admin request body refused")
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn maintenance_can_be_ended_and_started_again() {
        let m = Maintenance::default();
        assert!(!m.is_on());
        m.wait(false).await;
        assert!(m.start());
        assert!(!m.start(), "already on");
        let waiter = m.clone();
        let off = tokio::spawn(async move { waiter.wait(false).await });
        m.wait(true).await;
        assert!(m.end());
        assert!(!m.end(), "already off");
        off.await.unwrap();
        assert!(m.start());
        assert!(m.is_on());
    }
}
