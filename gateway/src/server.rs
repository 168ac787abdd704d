//! The node's top level: accept loop, background tasks and the shutdown sequence.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::StartError;
use crate::node::Node;

/// Runs a node on already-bound listeners until `shutdown` is cancelled (SIGTERM in
/// `main`), then drains in order:
///
/// 1. readiness turns false (`/readyz` answers 503) the moment `shutdown` is cancelled;
/// 2. the node keeps serving, and accepting, for `pre_stop_delay_ms`, so that the load
///    balancer notices and stops routing here;
/// 3. the public listener is closed, and connections are closed gradually over 80 % of
///    `drain_window_ms` with 1012 and a jittered `retry_after_ms` hint, oldest first, so
///    that clients do not all reconnect elsewhere at the same moment (a protocol whose
///    clients cannot read the hint has its connections closed once it has passed, within
///    the window: `Outbound::close_with_hint`);
/// 4. each closing connection leaves the directory and appends its `disconnect` event;
/// 5. whatever is still open when the window ends gets 1001 and `shutdown_grace_ms` to
///    finish; then the node leaves the cluster and this function returns.
///
pub async fn run(
    listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::edge::tls::acceptor(cert, key)?),
        _ => None,
    };
    let node = Node::new(config, shutdown.clone()).await?;
    let background = CancellationToken::new();
    spawn_background(&node, tls.as_ref().map(|(_, r)| r.clone()), &background);
    let admin_addr = admin_listener.local_addr().ok();
    let admin = tokio::spawn(crate::ops::admin::serve(
        admin_listener,
        node.clone(),
        background.clone(),
    ));
    let acceptor = tls.map(|(a, _)| a);
    tracing::info!(
        node = %node.config.node_id,
        listen = ?listener.local_addr().ok(),
        tls = acceptor.is_some(),
        admin = ?admin_addr,
        auth = node.auth.is_some(),
        "gateway serving"
    );

    let stop_accepting = async {
        shutdown.cancelled().await;
        tracing::info!(
            delay_ms = node.config.pre_stop_delay_ms,
            "draining: readiness is false; still serving during the pre-stop delay"
        );
        tokio::time::sleep(Duration::from_millis(node.config.pre_stop_delay_ms)).await;
    };
    tokio::pin!(stop_accepting);
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    match Pending::try_new(&pending, node.config.max_pending_handshakes) {
                        Some(p) => {
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(accept(node.clone(), acceptor.clone(), stream, peer, p));
                        }
                        None => {
                            drop(stream);
                            node.metrics.pending_handshakes_dropped.inc([]);
                            tracing::info!(
                                %peer,
                                max = node.config.max_pending_handshakes,
                                "too many handshakes under way; connection closed"
                            );
                        }
                    }
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut stop_accepting => break,
        }
    }
    drop(listener);
    drain(&node).await;
    shutdown_connections(&node).await;
    node.directory.leave().await;
    background.cancel();
    let _ = admin.await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// A connection accepted and not yet upgraded, counted against `max_pending_handshakes`.
///
/// Every such connection holds a task, buffers and, with TLS, a handshake's state, and the
/// handshake timeout alone does not bound how many there are at once: without a cap, a
/// flood of connections that send nothing holds memory for the whole timeout. Upgraded
/// connections are bounded by `max_connections` instead.
struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn try_new(count: &Arc<AtomicUsize>, max: usize) -> Option<Pending> {
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Pending(count.clone()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// PROXY header (from trusted proxies), TLS handshake (when configured), then HTTP. Both
/// steps are bounded by the handshake timeout. `_pending` is given back when this returns:
/// when the connection closes, or once it is upgraded (hyper's connection future ends at
/// the hand-over, and the WebSocket lives on in its own task).
async fn accept(
    node: Arc<Node>,
    tls: Option<crate::edge::tls::Acceptor>,
    mut stream: TcpStream,
    mut peer: SocketAddr,
    _pending: Pending,
) {
    let timeout = node.config.handshake_timeout();
    if node.config.proxy_protocol && node.proxies.trusts(peer.ip()) {
        match crate::edge::client_ip::read_proxy_v2(&mut stream, timeout).await {
            Ok(Some(source)) => peer = source,
            Ok(None) => {}
            Err(e) => {
                node.metrics.handshakes.inc(["bad_request"]);
                tracing::info!(%peer, error = %e, "bad PROXY header; connection dropped");
                return;
            }
        }
    }
    match tls {
        None => crate::edge::http::serve_connection(node, stream, peer).await,
        Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => crate::edge::http::serve_connection(node, tls_stream, peer).await,
            Ok(Err(e)) => {
                node.metrics.tls_handshake_failures.inc([]);
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                node.metrics.tls_handshake_failures.inc([]);
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        },
    }
}

fn spawn_background(
    node: &Arc<Node>,
    resolver: Option<Arc<crate::edge::tls::Resolver>>,
    stop: &CancellationToken,
) {
    if let (Some(resolver), Some(cert), Some(key)) =
        (resolver, &node.config.tls_cert, &node.config.tls_key)
    {
        tokio::spawn(crate::edge::tls::watch(
            resolver,
            cert.clone(),
            key.clone(),
            Duration::from_millis(node.config.tls_reload_interval_ms.max(100)),
            node.metrics.clone(),
            stop.clone(),
        ));
    }
    tokio::spawn(
        node.directory
            .clone()
            .run(node.draining.clone(), stop.clone()),
    );
    // Drain on demand: as on SIGTERM, but the process stays up, and the drain can be ended.
    let (n, s) = (node.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = n.maintenance.wait(true) => {}
                _ = s.cancelled() => return,
            }
            tracing::info!("drain requested: readiness is false; draining connections, staying up");
            tokio::select! {
                _ = async {
                    tokio::time::sleep(Duration::from_millis(n.config.pre_stop_delay_ms)).await;
                    drain(&n).await;
                } => {}
                _ = n.maintenance.wait(false) => {}
                _ = s.cancelled() => return,
            }
            tokio::select! {
                _ = n.maintenance.wait(false) => {}
                _ = s.cancelled() => return,
            }
            tracing::info!("drain ended: ready for new connections again");
        }
    });
    #[cfg(feature = "kube")]
    {
        let (n, s) = (node.clone(), stop.clone());
        tokio::spawn(async move { crate::ops::kube::start(&n, &s).await });
    }
    if let Some(jwks) = node.auth.as_ref().and_then(|a| a.jwks()) {
        tokio::spawn(crate::auth::refresh_jwks(jwks, stop.clone()));
    }
    // Pings: one node-wide sweep instead of a timer in every connection.
    let (n, s) = (node.clone(), stop.clone());
    tokio::spawn(async move {
        let (interval, timeout) = (n.config.ping_interval(), n.config.ping_timeout());
        tokio::select! {
            _ = n.conns.ping_all(interval, timeout) => {}
            _ = s.cancelled() => {}
        }
    });
    let (n, s) = (node.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => {
                    n.handshake_limiter.evict();
                    n.post_limiter.evict();
                    n.send_limiter.evict();
                }
                _ = s.cancelled() => return,
            }
        }
    });
    // Every heartbeat: history channels are checked (a lost publication or a new epoch is
    // found within one heartbeat), and broker subscriptions whose unsubscribe failed or
    // timed out are retried until they go.
    let (node, stop) = (node.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(node.config.node_heartbeat_ms)) => {
                    // History channels: is the epoch still ours, did we miss anything?
                    node.hub
                        .check_streams(Duration::from_millis(node.config.node_heartbeat_ms));
                    // This node's channel counts, for the server API's `channels` and `info`.
                    if let Err(e) = node.directory.record_channels(|| node.hub.channel_counts()).await {
                        tracing::debug!(error = %e, "channel counts not written");
                    }
                    let left = node.hub.reconcile().await;
                    if left > 0 {
                        tracing::debug!(left, "broker subscriptions still to reconcile");
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// Closes the node's connections gradually: the share of connections closed grows linearly
/// to all of them at 80 % of the drain window; the rest of the window lets the last close
/// handshakes finish. Returns early once no connection is left.
async fn drain(node: &Arc<Node>) {
    let window = Duration::from_millis(node.config.drain_window_ms);
    let spread = window.mul_f64(0.8);
    let total = node.directory.local_count();
    tracing::info!(
        connections = total,
        window_ms = window.as_millis() as u64,
        "draining connections with 1012"
    );
    let started = tokio::time::Instant::now();
    let mut closed = 0usize;
    while node.open_connections() > 0 && started.elapsed() < window {
        let due = if started.elapsed() >= spread {
            total
        } else {
            (total as f64 * started.elapsed().as_secs_f64() / spread.as_secs_f64()).ceil() as usize
        };
        if due > closed {
            // The closes are already spread over the window; the hint only has to keep
            // the clients closed in one tick from reconnecting in the same instant.
            let max_hint = node.config.drain_window_ms.clamp(1_000, 5_000);
            // A connection whose client cannot read the hint waits it out before its close
            // (`Outbound::close_with_hint`), within the window all the same.
            closed += node.directory.close_oldest(
                due - closed,
                || {
                    crate::error::CloseReason::Restart(crate::cluster::directory::jittered_ms(
                        500, max_hint,
                    ))
                },
                Some(started + window),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shutdown_connections(node: &Arc<Node>) {
    let open = node.open_connections();
    if open == 0 {
        return;
    }
    tracing::info!(open, "drain window over; closing the rest with 1001");
    node.conns.close_all(&crate::error::CloseReason::Shutdown);
    let deadline = tokio::time::Instant::now() + node.config.shutdown_grace();
    while node.open_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = node.open_connections();
    if left > 0 {
        tracing::warn!(left, "shutdown grace over; dropping remaining connections");
    }
}
