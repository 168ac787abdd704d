//! Centrifugo's server API (v5/v6 JSON), on the admin listener, so that Centrifugo API
//! clients (the `cent` package on PyPI, `gocent`, …) work unchanged: `POST /api/<method>`
//! with the method's JSON object as the body, answered `200 {"result":{...}}` or
//! `200 {"error":{"code":N,"message":".."}}` (Centrifugo's codes, see
//! `protocol::centrifugo::commands::code`).
//!
//! With `admin_token` set, a call needs it as `X-API-Key: <token>` or
//! `Authorization: apikey <token>` (401 otherwise), compared in constant time as `/v1/*`.
//!
//! Methods: `publish`, `broadcast`, `history`, `history_remove`, `presence`,
//! `presence_stats` (108 on a channel without presence), `disconnect`, `unsubscribe`,
//! `channels`, `info`. Any other is answered 404 with `method not found` (104). Each call is served by
//! the node it reaches, through the directory and the broker, as the `/v1/*` API is.

use std::collections::HashMap;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::edge::http::{json, HttpResponse};
use crate::node::Node;
use crate::protocol::centrifugo::commands::{self, code, Error, StreamPosition};
use crate::protocol::centrifugo::presence;

/// The server version `info` reports.
const VERSION: &str = concat!("gateway ", env!("CARGO_PKG_VERSION"));

/// The methods, as `gateway_api_calls_total{method}` labels them.
const METHODS: &[&str] = &[
    "publish",
    "broadcast",
    "history",
    "history_remove",
    "presence",
    "presence_stats",
    "disconnect",
    "unsubscribe",
    "channels",
    "info",
];

/// Serves `POST /api/<method>`.
pub async fn serve(node: &Node, req: Request<Incoming>, method: &str) -> HttpResponse {
    let label = METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown");
    let (status, outcome) = match authorized(node, &req) {
        false => {
            node.metrics.api_calls.inc([label, "unauthorized"]);
            tracing::info!("api request refused: missing or wrong API key");
            return error_response(
                StatusCode::UNAUTHORIZED,
                &Error::new(code::UNAUTHORIZED, "unauthorized", "unauthorized"),
            );
        }
        true if req.method() != Method::POST => {
            let mut r = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &Error::bad_request("use POST"),
            );
            r.headers_mut()
                .insert("allow", HeaderValue::from_static("POST"));
            node.metrics.api_calls.inc([label, "bad_request"]);
            return r;
        }
        true if label == "unknown" => (StatusCode::NOT_FOUND, Err(Error::method_not_found())),
        true => match body(node, req).await {
            Ok(body) => (StatusCode::OK, call(node, label, &body).await),
            Err(e) => (StatusCode::OK, Err(e)),
        },
    };
    match outcome {
        Ok(result) => {
            node.metrics.api_calls.inc([label, "ok"]);
            json(status, &json!({ "result": result }))
        }
        Err(e) => {
            node.metrics.api_calls.inc([label, e.label]);
            tracing::debug!(method = label, code = e.code, message = %e.message, "api call refused");
            error_response(status, &e)
        }
    }
}

fn error_response(status: StatusCode, e: &Error) -> HttpResponse {
    json(status, &json!({ "error": e.to_value() }))
}

/// True without an admin token, or when the request has it as `X-API-Key: <token>` or
/// `Authorization: apikey <token>`.
fn authorized(node: &Node, req: &Request<Incoming>) -> bool {
    let Some(token) = node.config.admin_token.as_ref().map(|t| t.expose()) else {
        return true;
    };
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let given = header("x-api-key").or_else(|| {
        header(AUTHORIZATION.as_str()).and_then(|v| {
            v.strip_prefix("apikey ")
                .or_else(|| v.strip_prefix("Apikey "))
        })
    });
    given.is_some_and(|g| crate::config::secret::constant_time_eq(g.as_bytes(), token.as_bytes()))
}

/// The request body, bounded: `max_message_bytes` of data plus room for the rest.
async fn body(node: &Node, req: Request<Incoming>) -> Result<bytes::Bytes, Error> {
    let max = node.config.max_message_bytes + 64 * 1024;
    match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(Error::new(
            code::BAD_REQUEST,
            "too_large",
            format!("body over {max} bytes"),
        )),
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| Error::bad_request(format!("bad request: {e}")))
}

fn parse_owned<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    parse(body)
}

fn unavailable(e: crate::error::BrokerError) -> Error {
    Error::new(code::INTERNAL, "unavailable", e.to_string()).temporary()
}

#[derive(Deserialize)]
struct Publish<'a> {
    #[serde(default)]
    channel: String,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    b64data: Option<String>,
}

#[derive(Deserialize)]
struct Broadcast<'a> {
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    b64data: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChannelReq {
    channel: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HistoryReq {
    channel: String,
    limit: i64,
    since: Option<StreamPosition>,
    reverse: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct UserReq {
    user: String,
    client: Option<String>,
    channel: String,
    whitelist: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChannelsReq {
    pattern: Option<String>,
}

async fn call(node: &Node, method: &str, body: &[u8]) -> Result<Value, Error> {
    match method {
        "publish" => {
            let req: Publish<'_> = parse(body)?;
            let data = data(req.data, req.b64data.as_deref())?;
            let key = idempotency_key(req.idempotency_key.as_deref())?;
            publish(node, &req.channel, data, key).await
        }
        "broadcast" => {
            let req: Broadcast<'_> = parse(body)?;
            let data = data(req.data, req.b64data.as_deref())?;
            let key = idempotency_key(req.idempotency_key.as_deref())?;
            if req.channels.is_empty() {
                return Err(Error::bad_request("channels required"));
            }
            let mut responses = Vec::with_capacity(req.channels.len());
            for channel in &req.channels {
                responses.push(match publish(node, channel, data, key).await {
                    Ok(result) => json!({ "result": result }),
                    Err(e) => json!({ "error": e.to_value() }),
                });
            }
            Ok(json!({ "responses": responses }))
        }
        "history" => history(node, parse_owned(body)?).await,
        "history_remove" => {
            let req: ChannelReq = parse_owned(body)?;
            let channel = commands::channel(&req.channel)?;
            match node.hub.remove_history(channel).await {
                Ok(true) => Ok(json!({})),
                Ok(false) => Err(no_history()),
                Err(e) => Err(unavailable(e)),
            }
        }
        "presence" => {
            let req: ChannelReq = parse_owned(body)?;
            presence::presence(&node.core, commands::channel(&req.channel)?).await
        }
        "presence_stats" => {
            let req: ChannelReq = parse_owned(body)?;
            presence::presence_stats(&node.core, commands::channel(&req.channel)?).await
        }
        "disconnect" => {
            let req: UserReq = parse_owned(body)?;
            if req.user.is_empty() {
                return Err(Error::bad_request("user required"));
            }
            let conns = node
                .directory
                .user_connections(&req.user)
                .await
                .map_err(unavailable)?;
            for c in conns {
                let wanted = req.client.as_deref().is_none_or(|w| w == c.conn_id);
                if wanted && !req.whitelist.contains(&c.conn_id) {
                    node.directory
                        .disconnect(&c.conn_id)
                        .await
                        .map_err(unavailable)?;
                }
            }
            Ok(json!({}))
        }
        "unsubscribe" => {
            let req: UserReq = parse_owned(body)?;
            if req.user.is_empty() {
                return Err(Error::bad_request("user required"));
            }
            let channel = commands::channel(&req.channel)?;
            node.directory
                .unsubscribe(&req.user, req.client.as_deref(), channel)
                .await
                .map_err(unavailable)?;
            Ok(json!({}))
        }
        "channels" => {
            let req: ChannelsReq = parse_owned(body)?;
            let counts = match node.directory.channels().await.map_err(unavailable)? {
                Some(all) => all,
                None => node
                    .hub
                    .channel_counts()
                    .into_iter()
                    .map(|(c, n)| (c, n as u64))
                    .collect::<HashMap<_, _>>(),
            };
            let pattern = req.pattern.filter(|p| !p.is_empty());
            let channels: serde_json::Map<String, Value> = counts
                .into_iter()
                .filter(|(c, _)| {
                    pattern
                        .as_deref()
                        .is_none_or(|p| shared::channel::glob_match(p, c))
                })
                .map(|(c, n)| (c, json!({ "num_clients": n })))
                .collect();
            Ok(json!({ "channels": channels }))
        }
        "info" => {
            let mine = &node.config.node_id;
            let local_channels = node.hub.channel_counts();
            let nodes = node
                .directory
                .nodes(local_channels.len() as u64)
                .await
                .map_err(unavailable)?;
            let nodes: Vec<Value> = nodes
                .into_iter()
                .map(|n| {
                    let mut v = json!({
                        "uid": n.node_id,
                        "name": n.node_id,
                        "version": VERSION,
                        "num_clients": n.connections,
                        "num_channels": n.channels,
                    });
                    if n.node_id == *mine {
                        // What only this node knows of itself, counted now.
                        let subs: usize = local_channels.iter().map(|(_, c)| c).sum();
                        v["num_clients"] = node.directory.local_count().into();
                        v["num_users"] = node.directory.local_users().into();
                        v["num_subs"] = subs.into();
                        v["num_channels"] = local_channels.len().into();
                        v["uptime"] =
                            ((crate::time::now_ms().saturating_sub(node.boot_ms)) / 1000).into();
                    }
                    v
                })
                .collect();
            Ok(json!({ "nodes": nodes }))
        }
        _ => Err(Error::method_not_found()),
    }
}

fn no_history() -> Error {
    Error::not_available("this channel keeps no history")
}

fn data<'a>(data: Option<&'a RawValue>, b64data: Option<&str>) -> Result<&'a str, Error> {
    if data.is_none() && b64data.is_some() {
        return Err(Error::bad_request(
            "b64data is not supported: channels carry JSON, send data",
        ));
    }
    commands::data(data)
}

fn idempotency_key(key: Option<&str>) -> Result<Option<&str>, Error> {
    match key.filter(|k| !k.is_empty()) {
        Some(k) if shared::channel::is_valid(k) => Ok(Some(k)),
        Some(_) => Err(Error::bad_request(
            "idempotency_key must match [A-Za-z0-9_.:@/-]{1,200}",
        )),
        None => Ok(None),
    }
}

async fn publish(
    node: &Node,
    channel: &str,
    data: &str,
    key: Option<&str>,
) -> Result<Value, Error> {
    let channel = commands::channel(channel)?;
    match node.hub.publish(channel, data, key).await {
        Ok(at) => {
            node.metrics.admin_publishes.inc([]);
            Ok(match at {
                Some(p) => json!({ "offset": p.offset, "epoch": p.epoch }),
                None => json!({}),
            })
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// `limit`: absent or 0, only the position; -1, everything kept; N, the last N (or the
/// first N after `since`). `reverse`: newest first (not with `since`).
async fn history(node: &Node, req: HistoryReq) -> Result<Value, Error> {
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
    let since = req.since.map(|p| crate::broker::Position {
        epoch: p.epoch,
        offset: p.offset,
    });
    match node.hub.history(channel, limit, since.as_ref()).await {
        Ok(Some(h)) => {
            let mut publications = commands::publications(&h.publications);
            if req.reverse {
                publications.reverse();
            }
            Ok(json!({ "publications": publications, "offset": h.top, "epoch": h.epoch }))
        }
        Ok(None) => Err(no_history()),
        Err(e) => Err(unavailable(e)),
    }
}
