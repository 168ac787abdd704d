//! Echo server on the gateway's own connection layer, for WebSocket conformance testing
//! (`make conformance` runs the Autobahn fuzzingclient against it).
//!
//! Usage: `cargo run -p gateway --example echo -- 127.0.0.1:9001`
//!
//! Every text and binary message is sent back unchanged. Everything else (fragment
//! reassembly, UTF-8 checks, control frames, the close handshake) is exactly what gateway
//! connections get.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gateway::test_util::frame;
use gateway::test_util::CloseReason;
use gateway::test_util::Outbound;
use gateway::test_util::{self as socket, Handler, Limits};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

struct Echo(Arc<Outbound>);

impl Handler for Echo {
    async fn on_text(&mut self, text: String) -> Result<(), CloseReason> {
        self.0.push(frame::text(&text));
        Ok(())
    }

    async fn on_binary(&mut self, data: Vec<u8>) -> Result<(), CloseReason> {
        self.0.push(frame::binary(&data));
        Ok(())
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("echo server on ws://{addr}");
    let limits = Limits {
        max_message_bytes: 64 << 20,
        fragment_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(10),
    };
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req| async move {
                let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
                    Ok(r) => r,
                    Err(_) => {
                        let mut r = hyper::Response::new(Empty::<Bytes>::new());
                        *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                        return Ok::<_, Infallible>(r);
                    }
                };
                tokio::spawn(async move {
                    if let Ok(ws) = fut.await {
                        // The echo server sends no events; any codec would do.
                        let out = Arc::new(Outbound::new(256 << 20, &gateway::test_util::V1));
                        let handler = Echo(out.clone());
                        socket::serve_upgraded(
                            ws.into_inner().into_inner(),
                            limits,
                            handler,
                            out,
                            None,
                            socket::JustSpawn,
                        );
                    }
                });
                Ok(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}
