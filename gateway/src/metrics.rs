//! Node metrics in Prometheus text format, served at the admin `GET /metrics`.
//!
//! Hot-path counters (per message, per delivery) are plain atomics; labelled counters (per
//! handshake, per close, per error) sit behind a mutex because they are rare. Labels are
//! fixed snake_case words, never user input, so cardinality stays low. Names and meanings are
//! listed in `docs/observability.md`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// See the module docs.
#[derive(Default)]
pub struct Metrics {
    pub connections_open: AtomicI64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub deliveries: AtomicU64,
    labelled: Mutex<BTreeMap<(&'static str, String), u64>>,
}

const HELP: &[(&str, &str, &str)] = &[
    (
        "gateway_connections_open",
        "gauge",
        "Open WebSocket connections.",
    ),
    (
        "gateway_messages_in_total",
        "counter",
        "Complete client messages received.",
    ),
    (
        "gateway_bytes_in_total",
        "counter",
        "Bytes of complete client messages received.",
    ),
    (
        "gateway_messages_out_total",
        "counter",
        "Frames queued to clients.",
    ),
    (
        "gateway_bytes_out_total",
        "counter",
        "Bytes of frames queued to clients.",
    ),
    (
        "gateway_deliveries_total",
        "counter",
        "Channel messages queued to subscribers.",
    ),
    (
        "gateway_handshakes_total",
        "counter",
        "Upgrade attempts by outcome.",
    ),
    (
        "gateway_connection_closes_total",
        "counter",
        "Closed connections by reason and blame.",
    ),
    (
        "gateway_slow_consumer_disconnects_total",
        "counter",
        "Clients closed with 4000.",
    ),
    (
        "gateway_request_errors_total",
        "counter",
        "Error replies to client requests, by code.",
    ),
    (
        "gateway_http_requests_total",
        "counter",
        "Plain HTTP answers on both listeners.",
    ),
    (
        "gateway_broker_errors_total",
        "counter",
        "Failed broker calls by operation.",
    ),
    (
        "gateway_admin_publishes_total",
        "counter",
        "Publishes through the admin API.",
    ),
    (
        "gateway_protocol_violations_total",
        "counter",
        "Connections closed for breaking RFC 6455, by kind.",
    ),
    (
        "gateway_rate_limit_hits_total",
        "counter",
        "Requests refused by a rate limit, by kind (handshake, messages, bytes).",
    ),
    (
        "gateway_tls_reloads_total",
        "counter",
        "Certificate reloads from disk, by result.",
    ),
    (
        "gateway_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed or timed out.",
    ),
    (
        "gateway_jwks_fetches_total",
        "counter",
        "JWKS fetches by result.",
    ),
    (
        "gateway_directory_ops_total",
        "counter",
        "Connection directory operations, by op.",
    ),
    (
        "gateway_redis_errors_total",
        "counter",
        "Failed Redis calls and lost connections, by op.",
    ),
    (
        "gateway_redis_reconnects_total",
        "counter",
        "Times Redis became reachable again after an outage.",
    ),
    (
        "gateway_broker_dropped_total",
        "counter",
        "Messages published on Redis that were dropped (not JSON).",
    ),
    (
        "gateway_cluster_connections",
        "gauge",
        "Connections on all live nodes, from the last heartbeat.",
    ),
    (
        "gateway_cluster_nodes",
        "gauge",
        "Live nodes in the cluster, this one included.",
    ),
    (
        "gateway_rebalance_shed_total",
        "counter",
        "Connections closed with 1013 to rebalance after scale-out.",
    ),
    (
        "gateway_inbound_appends_total",
        "counter",
        "Entries appended to the inbound stream, by event.",
    ),
];

impl Metrics {
    /// Adds 1 to `name{labels}`.
    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1)
    }

    /// Adds `n` to `name{labels}`.
    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], n: u64) {
        let mut m = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((name, label_key(labels))).or_default() += n;
    }

    /// Sets a labelled gauge.
    pub fn set(&self, name: &'static str, labels: &[(&str, &str)], v: u64) {
        let mut m = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        m.insert((name, label_key(labels)), v);
    }

    /// Current value of a labelled counter (tests and `/metrics`).
    pub fn get(&self, name: &str, labels: &str) -> u64 {
        let m = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|((n, l), _)| *n == name && l == labels)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let plain = [
            (
                "gateway_connections_open",
                self.connections_open.load(Ordering::Relaxed) as u64,
            ),
            (
                "gateway_messages_in_total",
                self.messages_in.load(Ordering::Relaxed),
            ),
            (
                "gateway_bytes_in_total",
                self.bytes_in.load(Ordering::Relaxed),
            ),
            (
                "gateway_messages_out_total",
                self.messages_out.load(Ordering::Relaxed),
            ),
            (
                "gateway_bytes_out_total",
                self.bytes_out.load(Ordering::Relaxed),
            ),
            (
                "gateway_deliveries_total",
                self.deliveries.load(Ordering::Relaxed),
            ),
        ];
        let labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if let Some((_, v)) = plain.iter().find(|(n, _)| n == name) {
                let _ = writeln!(out, "{name} {v}");
            }
            for ((n, labels), v) in labelled.iter().filter(|((n, _), _)| n == name) {
                if labels.is_empty() {
                    let _ = writeln!(out, "{n} {v}");
                } else {
                    let _ = writeln!(out, "{n}{{{labels}}} {v}");
                }
            }
        }
        debug_assert!(
            labelled
                .keys()
                .all(|(n, _)| HELP.iter().any(|(h, _, _)| h == n)),
            "every metric needs a HELP entry"
        );
        out
    }
}

/// `k1="v1",k2="v2"`.
fn label_key(labels: &[(&str, &str)]) -> String {
    let mut key = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(key, "{sep}{k}=\"{v}\"");
    }
    key
}
