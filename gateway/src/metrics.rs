//! Node metrics through the OpenTelemetry SDK, exposed in Prometheus text format at the
//! admin `GET /metrics` (opentelemetry-prometheus).
//!
//! Hot-path counts (per message, per delivery) are plain atomics that observable instruments
//! read at scrape time, so a delivery costs one relaxed add. Labelled counters (per
//! handshake, per close, per error) are OpenTelemetry counters with attributes. Labels are
//! fixed snake_case words, never user input, so cardinality stays low. Every name starts
//! with `gateway_`, is declared in `HELP` below and is listed in `docs/observability.md`.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// The per-message counts, read by observable instruments.
#[derive(Default)]
pub struct Hot {
    pub connections_open: AtomicI64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub deliveries: AtomicU64,
}

/// See the module docs.
pub struct Metrics {
    hot: Arc<Hot>,
    counters: HashMap<&'static str, Counter<u64>>,
    gauges: HashMap<&'static str, Gauge<u64>>,
    /// Broker receipt to socket write, per write (see `HELP`).
    pub fanout_latency: Histogram<f64>,
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

impl Deref for Metrics {
    type Target = Hot;
    fn deref(&self) -> &Hot {
        &self.hot
    }
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
        "gateway_fanout_latency_seconds",
        "histogram",
        "Age of the oldest channel message in a socket write: broker receipt to write.",
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

/// Latency buckets, in seconds: 100 µs to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None)
    }
}

/// Where and how often to push metrics over OTLP/HTTP (feature `otlp`).
#[derive(Debug, Clone)]
pub struct OtlpPush {
    /// The collector's metrics URL, e.g. `http://otel-collector:4318/v1/metrics`.
    pub endpoint: String,
    pub interval: std::time::Duration,
}

impl Metrics {
    /// Metrics served at `/metrics`, and also pushed over OTLP when `otlp` is given. Must run
    /// inside the Tokio runtime when pushing (the exporter runs on it).
    pub fn new(otlp: Option<OtlpPush>) -> Self {
        let registry = prometheus::Registry::new();
        // Names are declared in full (`..._total`), without scope labels or unit suffixes,
        // so that they read the same in Prometheus as in the docs.
        let reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_counter_suffixes()
            .without_units()
            .scope_info_enabled(false)
            .without_target_info()
            .build();
        let mut builder = SdkMeterProvider::builder();
        match reader {
            Ok(reader) => builder = builder.with_reader(reader),
            Err(e) => {
                tracing::error!(error = %e, "metrics exporter failed to start; /metrics is empty")
            }
        }
        if let Some(push) = otlp {
            builder = with_otlp(builder, &push);
        }
        let provider = builder.build();
        let meter = provider.meter("gateway");
        let hot = Arc::new(Hot::default());
        observe(&meter, &hot);
        let (mut counters, mut gauges) = (HashMap::new(), HashMap::new());
        let mut fanout_latency = None;
        for (name, kind, help) in HELP {
            if HOT.contains(name) {
                continue;
            }
            match *kind {
                "counter" => {
                    counters.insert(
                        *name,
                        meter.u64_counter(*name).with_description(*help).build(),
                    );
                }
                "gauge" => {
                    gauges.insert(
                        *name,
                        meter.u64_gauge(*name).with_description(*help).build(),
                    );
                }
                _ => {
                    fanout_latency = Some(
                        meter
                            .f64_histogram(*name)
                            .with_description(*help)
                            .with_boundaries(LATENCY_BUCKETS.to_vec())
                            .build(),
                    )
                }
            }
        }
        // Unlabelled counters start at 0, so that dashboards and alerts see them at once.
        for (name, c) in &counters {
            if UNLABELLED.contains(name) {
                c.add(0, &[]);
            }
        }
        Metrics {
            hot,
            counters,
            gauges,
            fanout_latency: fanout_latency
                .unwrap_or_else(|| meter.f64_histogram("gateway_unused").build()),
            registry,
            provider,
        }
    }
}

#[cfg(feature = "otlp")]
fn with_otlp(
    builder: opentelemetry_sdk::metrics::MeterProviderBuilder,
    push: &OtlpPush,
) -> opentelemetry_sdk::metrics::MeterProviderBuilder {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&push.endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build();
    match exporter {
        Ok(exporter) => {
            tracing::info!(endpoint = %push.endpoint, "pushing metrics over OTLP/HTTP");
            builder.with_reader(
                PeriodicReader::builder(exporter, opentelemetry_sdk::runtime::Tokio)
                    .with_interval(push.interval)
                    .build(),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "OTLP metrics exporter failed to start");
            builder
        }
    }
}

/// Without the `otlp` feature `Config::validate` refuses an OTLP endpoint, so this is never
/// reached with one.
#[cfg(not(feature = "otlp"))]
fn with_otlp(
    builder: opentelemetry_sdk::metrics::MeterProviderBuilder,
    _push: &OtlpPush,
) -> opentelemetry_sdk::metrics::MeterProviderBuilder {
    builder
}

/// Counters without labels.
const UNLABELLED: &[&str] = &[
    "gateway_slow_consumer_disconnects_total",
    "gateway_admin_publishes_total",
    "gateway_tls_handshake_failures_total",
    "gateway_redis_reconnects_total",
    "gateway_broker_dropped_total",
    "gateway_rebalance_shed_total",
];

/// Names served by observable instruments over [`Hot`].
const HOT: &[&str] = &[
    "gateway_connections_open",
    "gateway_messages_in_total",
    "gateway_bytes_in_total",
    "gateway_messages_out_total",
    "gateway_bytes_out_total",
    "gateway_deliveries_total",
];

fn observe(meter: &Meter, hot: &Arc<Hot>) {
    let help = |name: &str| {
        HELP.iter()
            .find(|(n, _, _)| *n == name)
            .map_or("", |(_, _, h)| *h)
    };
    let h = hot.clone();
    meter
        .i64_observable_gauge("gateway_connections_open")
        .with_description(help("gateway_connections_open"))
        .with_callback(move |o| o.observe(h.connections_open.load(Ordering::Relaxed), &[]))
        .build();
    type Field = fn(&Hot) -> &AtomicU64;
    let counts: [(&'static str, Field); 5] = [
        ("gateway_messages_in_total", |h| &h.messages_in),
        ("gateway_bytes_in_total", |h| &h.bytes_in),
        ("gateway_messages_out_total", |h| &h.messages_out),
        ("gateway_bytes_out_total", |h| &h.bytes_out),
        ("gateway_deliveries_total", |h| &h.deliveries),
    ];
    for (name, field) in counts {
        let h = hot.clone();
        meter
            .u64_observable_counter(name)
            .with_description(help(name))
            .with_callback(move |o| o.observe(field(&h).load(Ordering::Relaxed), &[]))
            .build();
    }
}

fn attributes(labels: &[(&str, &str)]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue::new(k.to_string(), v.to_string()))
        .collect()
}

impl Metrics {
    /// Adds 1 to `name{labels}`.
    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1)
    }

    /// Adds `n` to the counter `name{labels}`.
    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], n: u64) {
        match self.counters.get(name) {
            Some(c) => c.add(n, &attributes(labels)),
            None => debug_assert!(false, "{name} needs a HELP entry as a counter"),
        }
    }

    /// Sets the gauge `name{labels}`.
    pub fn set(&self, name: &'static str, labels: &[(&str, &str)], v: u64) {
        match self.gauges.get(name) {
            Some(g) => g.record(v, &attributes(labels)),
            None => debug_assert!(false, "{name} needs a HELP entry as a gauge"),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let _ = &self.provider;
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}
