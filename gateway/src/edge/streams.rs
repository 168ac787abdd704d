//! The HTTP transports, for clients whose network blocks or cuts WebSocket
//! (`docs/sdk.md`, `docs/protocol.md`). Each passes the handshake's checks
//! ([`super::handshake::admit_http`]: rate, Origin, drain, capacity, token) and holds a
//! connection slot like a WebSocket.
//!
//! - **Centrifugo's bidirectional emulation**, for the SDKs' `http_stream` and `sse`
//!   transports. `POST /connection/http_stream` (the body is the `connect` command) and
//!   `GET /connection/sse?cf_connect=<command>` (or `POST` with the command as the body)
//!   answer with one long response carrying the replies and pushes, as lines or as `data:`
//!   events. The client sends every later command with `POST /emulation`
//!   (`{"session":..,"data":<commands>}`) to whichever node the load balancer picks; that
//!   node hands them to the connection, or forwards them to the node that holds it through
//!   the directory (one `FCALL` that checks the session's secret and publishes on the
//!   owner's channel), so no sticky sessions are needed.
//! - **Unidirectional SSE** for a plain `EventSource`: `GET /sse?channel=a&channel=b`, v1
//!   messages as events whose ids let any node recover what the browser missed
//!   (`protocol::sse`).
//!
//! Answers to `/emulation`: 204 when handed over or forwarded; 404 for an unknown, closed
//! or wrong session (the SDK then reconnects); 413 over `max_message_bytes`; 429 over
//! `emulation_rate_per_ip` or with the connection's inbox full; 400 for a body that is not
//! the SDK's JSON; 503 when Redis cannot be asked. Each counts in
//! `gateway_emulation_requests_total{outcome}`.

// Both sides of these handlers' results are responses (a refusal is answered, not raised),
// and each is built once per request: boxing the refusals would only add an allocation.
#![allow(clippy::result_large_err)]

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use super::handshake::{admit_http, client_ip, rate, spawn_until_closed, Refusal, Wire};
use super::http::{json_error, read_body, HttpResponse};
use crate::cluster::directory::{Emulation, Post, SECRET_LEN};
use crate::conn::frame::Transport;
use crate::conn::outbound::Pushed;
use crate::conn::stream;
use crate::core::session::{Command, Done, Session};
use crate::error::CloseReason;
use crate::node::Node;
use crate::protocol::{centrifugo, sse};

/// Room for the JSON around a posted command batch (`session`, `node`, escaping).
const ENVELOPE: usize = 1024;

/// Routes the paths of this module.
pub async fn route(node: Arc<Node>, req: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
    let ip = client_ip(&node, req.headers(), peer);
    let path = req.uri().path();
    let method = req.method().clone();
    let response = match (&method, path) {
        (&Method::OPTIONS, _) => preflight(&node, &req),
        (&Method::POST, "/connection/http_stream") => {
            centrifugo(&node, req, ip, &centrifugo::STREAM_CODEC).await
        }
        (&Method::GET | &Method::POST, "/connection/sse") => {
            centrifugo(&node, req, ip, &centrifugo::SSE_CODEC).await
        }
        (&Method::POST, "/emulation") => emulation(&node, req, ip).await,
        (&Method::GET, "/sse") => eventsource(&node, req, ip).await,
        _ => Err(json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "see docs/sdk.md for the methods of the HTTP transports",
        )),
    };
    response.unwrap_or_else(|r| r)
}

/// The query's parameters, percent-decoded (`+` is a space).
fn query(req: &Request<Incoming>) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decodes a query component; a malformed escape is kept as it is.
fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16)).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], hex(b.get(i + 1)), hex(b.get(i + 2))) {
            (b'+', ..) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 2;
            }
            (c, ..) => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// 128 random bits in hex, from the kernel's generator: a session's secret.
fn secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; SECRET_LEN / 2];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The headers of a long response: no caching, and no buffering by nginx (which would hold
/// the events back until its buffer fills).
fn streaming(
    body: stream::Body,
    content_type: &'static str,
    cors: Option<HeaderValue>,
) -> HttpResponse {
    let mut r = Response::new(Either::Right(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    allow_origin(&mut r, cors);
    r
}

/// The `Origin` a cross-origin client sent, once the handshake checks let it through: the
/// SDK's `fetch` calls are `mode: 'cors'`.
fn cors(req: &Request<Incoming>) -> Option<HeaderValue> {
    req.headers().get(hyper::header::ORIGIN).cloned()
}

fn allow_origin(r: &mut HttpResponse, origin: Option<HeaderValue>) {
    if let Some(o) = origin {
        let h = r.headers_mut();
        h.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.insert(hyper::header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// A CORS preflight: allowed for an Origin the handshake would allow.
fn preflight(node: &Node, req: &Request<Incoming>) -> Result<HttpResponse, HttpResponse> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Err(e) = super::origin::check(&node.config, header("origin"), header("host")) {
        return Err(Refusal::Origin(e).respond(node, IpAddr::from([0, 0, 0, 0])));
    }
    let mut r = no_content();
    let h = r.headers_mut();
    h.insert(
        hyper::header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        hyper::header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type, authorization, last-event-id"),
    );
    h.insert(
        hyper::header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    allow_origin(&mut r, cors(req));
    Ok(r)
}

/// Counts and logs the answer to a post.
fn posted(node: &Node, ip: IpAddr, outcome: &'static str, r: HttpResponse) -> HttpResponse {
    node.metrics.emulation.inc([outcome]);
    match r.status().is_success() {
        true => tracing::debug!(%ip, outcome, "emulation post"),
        false => {
            tracing::info!(%ip, outcome, status = r.status().as_u16(), "emulation post refused")
        }
    }
    r
}

/// `POST /emulation`: see the module docs.
async fn emulation(
    node: &Node,
    req: Request<Incoming>,
    ip: IpAddr,
) -> Result<HttpResponse, HttpResponse> {
    if let Err(refusal) = rate(&node.post_limiter, node, ip, "emulation") {
        let r = refusal.respond(node, ip);
        return Err(posted(node, ip, "rate_limited", r));
    }
    let origin = cors(&req);
    let max = node.config.max_message_bytes;
    let timeout = node.config.handshake_timeout();
    let body = read_body(req.into_body(), max + ENVELOPE, timeout)
        .await
        .map_err(|r| {
            let outcome = match r.status() {
                StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                _ => "bad_request",
            };
            posted(node, ip, outcome, r)
        })?;
    #[derive(serde::Deserialize)]
    struct Posted {
        session: String,
        data: String,
    }
    let p: Posted = serde_json::from_slice(&body).map_err(|e| {
        let msg = format!("expected {{\"session\":..,\"data\":<commands>}}: {e}");
        let r = json_error(StatusCode::BAD_REQUEST, "bad_request", &msg);
        posted(node, ip, "bad_request", r)
    })?;
    if p.data.len() > max {
        let msg = format!("commands over {max} bytes");
        let r = json_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &msg);
        return Err(posted(node, ip, "too_large", r));
    }
    let (outcome, mut r) = match node.directory.post(&p.session, p.data).await {
        Ok(Post::Local) => ("local", no_content()),
        Ok(Post::Forwarded) => ("forwarded", no_content()),
        Ok(Post::Full) => (
            "inbox_full",
            json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "inbox_full",
                "the connection has too many commands waiting; retry",
            ),
        ),
        Ok(Post::Unknown) => (
            "unknown_session",
            json_error(
                StatusCode::NOT_FOUND,
                "unknown_session",
                "no such session: it closed or never existed; reconnect",
            ),
        ),
        Err(e) => (
            "unavailable",
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &format!("cannot reach the session's node: {e}"),
            ),
        ),
    };
    allow_origin(&mut r, origin);
    Ok(posted(node, ip, outcome, r))
}

fn no_content() -> HttpResponse {
    let mut r = Response::new(super::http::full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// `POST /connection/http_stream`, `GET|POST /connection/sse`: a Centrifugo connection
/// whose first command came with the request.
async fn centrifugo(
    node: &Arc<Node>,
    req: Request<Incoming>,
    ip: IpAddr,
    codec: &'static centrifugo::Centrifugo,
) -> Result<HttpResponse, HttpResponse> {
    rate(&node.handshake_limiter, node, ip, "handshake").map_err(|r| r.respond(node, ip))?;
    let origin = cors(&req);
    let from_query = query(&req)
        .into_iter()
        .find(|(k, _)| k == "cf_connect")
        .map(|(_, v)| v.into_owned());
    let (parts, body) = req.into_parts();
    let wire = Wire::Centrifugo(codec);
    let (conn, slot) = admit_http(node, &parts, ip, &wire)
        .await
        .map_err(|r| r.respond(node, ip))?;
    let max = node.config.max_message_bytes;
    let first = match from_query {
        Some(q) if parts.method == Method::GET => q,
        _ => {
            let body = read_body(body, max, node.config.handshake_timeout()).await?;
            String::from_utf8(body.to_vec()).map_err(|_| {
                json_error(StatusCode::BAD_REQUEST, "bad_request", "body is not UTF-8")
            })?
        }
    };
    if first.len() > max {
        let msg = format!("command over {max} bytes");
        return Err(json_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &msg));
    }
    let secret = secret().map_err(|e| {
        tracing::error!(error = %e, "no random source for a session secret");
        json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no session secret",
        )
    })?;
    node.metrics.handshakes.inc(["ok"]);
    node.metrics
        .connections_opened
        .inc([codec.transport().label()]);
    let (inbox, commands) = mpsc::channel(stream::INBOX);
    // Room for it: the channel is new.
    let _ = inbox.try_send(first);
    let out = conn.out.clone();
    tracing::debug!(%ip, conn = %conn.conn_id, transport = codec.transport().label(), "centrifugo stream open");
    let emulation = Emulation { secret, inbox };
    let (connection, cleanup, clock) =
        centrifugo::Connection::open(node.core.clone(), conn, codec, Some(emulation));
    let (body, served) = stream::serve(commands, node.limits(), connection, out, Some(clock));
    spawn_until_closed(node.clone(), served, slot, move |_, reason| {
        Box::pin(async move { cleanup.close(&reason).await })
    });
    let content_type = match codec.transport() {
        Transport::Sse => "text/event-stream",
        _ => "application/x-ndjson",
    };
    Ok(streaming(body, content_type, origin))
}

/// `GET /sse?channel=..`: see `protocol::sse`.
async fn eventsource(
    node: &Arc<Node>,
    req: Request<Incoming>,
    ip: IpAddr,
) -> Result<HttpResponse, HttpResponse> {
    rate(&node.handshake_limiter, node, ip, "handshake").map_err(|r| r.respond(node, ip))?;
    let bad = |m: &str| json_error(StatusCode::BAD_REQUEST, "bad_request", m);
    let params = query(&req);
    let param = |name: &'static str| {
        params
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v)
    };
    let channels: Vec<String> = param("channel").map(|v| v.clone().into_owned()).collect();
    if channels.is_empty() || channels.len() > sse::MAX_CHANNELS {
        let m = format!(
            "name 1 to {} channels: /sse?channel=a&channel=b",
            sse::MAX_CHANNELS
        );
        return Err(bad(&m));
    }
    if let Some(c) = channels.iter().find(|c| !shared::channel::is_valid(c)) {
        return Err(bad(&format!("invalid channel name {c:?}")));
    }
    let history: Vec<(usize, String)> = channels
        .iter()
        .enumerate()
        .filter(|(_, c)| node.config.channel(c).is_some_and(|o| o.has_history()))
        .map(|(i, c)| (i, c.clone()))
        .collect();
    let last_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            param("last_event_id")
                .next()
                .map(|v| v.clone().into_owned())
        });
    let origin = cors(&req);
    let ids = Arc::new(sse::Ids::new(history));
    let (parts, _) = req.into_parts();
    let (conn, slot) = admit_http(node, &parts, ip, &Wire::Sse(ids.clone()))
        .await
        .map_err(|r| r.respond(node, ip))?;
    node.metrics.handshakes.inc(["ok"]);
    node.metrics.connections_opened.inc(["eventsource"]);
    let out = conn.out.clone();
    let (mut session, ending) = Session::open(node.core.clone(), conn).await;
    out.push(sse::opening());
    let welcome = shared::protocol::ServerFrame::Welcome {
        conn_id: session.conn_id().to_owned(),
        node_id: session.node_id().to_owned(),
        user_id: session.user_id().map(str::to_owned),
    };
    session.reply(Transport::Sse.text(&welcome.to_json()));
    let recover = last_id
        .as_deref()
        .map(|id| sse::parse_id(id, channels.len()))
        .unwrap_or_else(|| vec![None; channels.len()]);
    for (i, channel) in channels.iter().enumerate() {
        let recover = recover[i].clone().or_else(|| {
            // A reconnect that names no position for a history channel still asks for
            // one it cannot have, so that its `subscribed` says `recovered: false`.
            last_id
                .as_ref()
                .and(ids.is_history(channel).then(|| crate::broker::Position {
                    epoch: String::new(),
                    offset: 0,
                }))
        });
        match session
            .execute(Command::Subscribe { channel, recover })
            .await
        {
            Ok(Done::Subscribed(s)) => {
                let mut event = serde_json::json!({ "type": "subscribed", "channel": channel });
                let mut id = None;
                if let Some(j) = &s.joined {
                    event["epoch"] = j.position.epoch.clone().into();
                    event["offset"] = j.position.offset.into();
                    if let Some(r) = j.recovered {
                        event["recovered"] = r.into();
                    }
                    ids.advance(channel, j.position.offset, &j.position.epoch);
                    id = Some(ids.id_line());
                }
                let data = Transport::Sse.text(&event.to_string());
                let queued = match id {
                    Some(id) => out.push_parts(crate::conn::outbound::Parts::Many(vec![id, data])),
                    None => out.push(data),
                };
                if queued == Pushed::Overflowed {
                    node.metrics.slow_consumer_disconnects.inc([]);
                }
                // The replay (when it recovered) and live messages follow from here.
                drop(s);
            }
            Ok(_) => {}
            Err(f) => {
                session.refused(&f);
                drop(session);
                let reason = CloseReason::Protocol("sse_subscribe_refused");
                ending.close(&node.core, &reason).await;
                drop(slot);
                use shared::protocol::ErrorCode;
                let status = match f.code {
                    ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                    ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_REQUEST,
                };
                let m = format!("channel {channel:?}: {}", f.message);
                return Err(json_error(status, f.code.as_str(), &m));
            }
        }
    }
    let clock = session.clock();
    // Nothing posts to a unidirectional stream; the inbox's sender lives as long as the
    // connection, so that its task holds the session until the close.
    let (posts, commands) = mpsc::channel(1);
    let (body, served) = stream::serve(commands, node.limits(), Listener(session), out, clock);
    spawn_until_closed(node.clone(), served, slot, move |node, reason| {
        Box::pin(async move {
            drop(posts);
            ending.close(&node.core, &reason).await
        })
    });
    Ok(streaming(body, "text/event-stream", origin))
}

/// The handler of a unidirectional stream: it holds the session and gets no commands.
struct Listener(#[allow(dead_code)] Session);

impl crate::conn::socket::Handler for Listener {
    async fn on_text(&mut self, _: String) -> Result<(), CloseReason> {
        Err(CloseReason::Protocol("sse_unidirectional"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_components_are_percent_decoded() {
        assert_eq!(decode("a%3Ab"), "a:b");
        assert_eq!(decode("%7B%22id%22%3A1%7D"), r#"{"id":1}"#);
        assert_eq!(decode("a+b"), "a b");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("plain"), "plain");
    }

    #[test]
    fn secrets_are_hex_of_the_expected_length_and_differ() {
        let (a, b) = (secret().unwrap(), secret().unwrap());
        assert_eq!(a.len(), SECRET_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
