//! The floor: the least a broadcast server can do, to measure the gateway against.
//!
//! fastwebsockets + tokio + hyper upgrade, no auth, no limits, no broker abstraction, no
//! outbound queue bound. It speaks just enough of the gateway's protocol for the load
//! generator: a `welcome` frame, `subscribe` → `ack`, and `{"type":"message",...}` for every
//! `PUBLISH gw:ch:<channel> <json>` on Redis (one PSUBSCRIBE for all channels).
//!
//! With `--tls-cert C --tls-key K` it serves `wss://` through tokio-rustls with what the
//! gateway uses: the ring provider, TLS 1.3 and 1.2, ALPN `http/1.1`, rustls' defaults
//! otherwise. That is the TLS floor the gateway's TLS handshakes and idle memory are
//! measured against.
//!
//! Usage: `cargo run -p loadtest --example floor -- 127.0.0.1:9100 redis://127.0.0.1:6391
//! [--tls-cert C --tls-key K]`

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use redis::{PushKind, Value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_rustls::TlsAcceptor;

type Subs = Mutex<HashMap<String, Vec<(u64, UnboundedSender<Bytes>)>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mut positional, mut cert, mut key) = (Vec::new(), None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tls-cert" => cert = args.next(),
            "--tls-key" => key = args.next(),
            _ => positional.push(a),
        }
    }
    let mut positional = positional.into_iter();
    let addr = positional.next().unwrap_or_else(|| "127.0.0.1:9100".into());
    let redis_url = positional
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(acceptor(&cert, &key)?),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    let subs: Arc<Subs> = Arc::default();

    // Redis: RESP3 pushes of the pattern subscription fan out to the subscribers' queues.
    let (push_tx, mut push_rx) = unbounded_channel();
    let client = redis::Client::open(format!("{redis_url}/?protocol=resp3"))?;
    let config = redis::AsyncConnectionConfig::new().set_push_sender(push_tx);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    conn.psubscribe("gw:ch:*").await?;
    let s = subs.clone();
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(p) = push_rx.recv().await {
            let (PushKind::PMessage, [_, Value::BulkString(ch), Value::BulkString(data)]) =
                (p.kind, &p.data[..])
            else {
                continue;
            };
            let ch = String::from_utf8_lossy(ch.strip_prefix(b"gw:ch:").unwrap_or(ch));
            let mut msg = format!(r#"{{"type":"message","channel":{:?},"data":"#, ch).into_bytes();
            msg.extend_from_slice(data);
            msg.push(b'}');
            let msg = Bytes::from(msg);
            if let Some(list) = s.lock().ok().as_ref().and_then(|m| m.get(ch.as_ref())) {
                for (_, tx) in list {
                    let _ = tx.send(msg.clone());
                }
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    eprintln!("floor on {scheme}://{addr}/ws, Redis {redis_url}");
    let ids = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (subs, ids, tls) = (subs.clone(), ids.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve(stream, subs, ids).await,
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        serve(stream, subs, ids).await;
                    }
                }
            }
        });
    }
}

/// A tokio-rustls acceptor configured as the gateway's TLS listener.
fn acceptor(cert: &str, key: &str) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// HTTP/1.1 with the WebSocket upgrade on one connection, plain or TLS.
async fn serve<S>(stream: S, subs: Arc<Subs>, ids: Arc<AtomicU64>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req| {
        let (subs, id) = (subs.clone(), ids.fetch_add(1, Ordering::Relaxed));
        async move {
            let Ok((response, fut)) = fastwebsockets::upgrade::upgrade(&mut req) else {
                let mut r = hyper::Response::new(Empty::<Bytes>::new());
                *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                return Ok::<_, Infallible>(r);
            };
            tokio::spawn(async move {
                if let Ok(ws) = fut.await {
                    connection(ws, id, subs).await;
                }
            });
            Ok(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

async fn connection(
    ws: fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
    id: u64,
    subs: Arc<Subs>,
) {
    let (mut rx, mut wx) = ws.split(tokio::io::split);
    let (tx, mut queue) = unbounded_channel::<Bytes>();
    let _ = tx.send(Bytes::from_static(br#"{"type":"welcome"}"#));
    let writer = tokio::spawn(async move {
        while let Some(b) = queue.recv().await {
            if wx
                .write_frame(Frame::text(Payload::Borrowed(&b)))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut channels = Vec::new();
    let mut no_send = |_| async { Ok::<(), Infallible>(()) };
    while let Ok(frame) = rx.read_frame(&mut no_send).await {
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&frame.payload) else {
                    continue;
                };
                if let (Some("subscribe"), Some(ch)) = (v["type"].as_str(), v["channel"].as_str()) {
                    if let Ok(mut m) = subs.lock() {
                        m.entry(ch.to_string()).or_default().push((id, tx.clone()));
                    }
                    channels.push(ch.to_string());
                    let ack = serde_json::json!({"type": "ack", "id": v["id"]}).to_string();
                    let _ = tx.send(Bytes::from(ack));
                }
            }
            _ => {}
        }
    }
    if let Ok(mut m) = subs.lock() {
        for ch in channels {
            if let Some(list) = m.get_mut(&ch) {
                list.retain(|(i, _)| *i != id);
                if list.is_empty() {
                    m.remove(&ch);
                }
            }
        }
    }
    drop(tx);
    writer.abort();
}
