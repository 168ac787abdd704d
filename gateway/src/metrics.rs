//! Node metrics through the OpenTelemetry SDK, exposed in Prometheus text format at the
//! admin `GET /metrics` (opentelemetry-prometheus).
//!
//! Hot-path counts (per message, per delivery) are plain atomics that observable instruments
//! read at scrape time, so a delivery costs one relaxed add. Labelled counters (per
//! handshake, per close, per error) are OpenTelemetry counters with attributes. Labels are
//! fixed snake_case words, never user input, so cardinality stays low. Every name starts
//! with `gateway_`, is declared once in `families!` (or `observe` for the hot counts) and is listed in `docs/observability.md`.

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

/// A counter family with `N` labels. The label keys are fixed where the family is declared
/// ([`families!`]) and the values are `&'static str`, so a call builds its attributes on the
/// stack and never allocates, and a misspelt family does not compile.
pub struct Family<const N: usize> {
    counter: Counter<u64>,
    keys: [&'static str; N],
}

impl<const N: usize> Family<N> {
    /// Adds 1 to the series with these label values (in declaration order).
    pub fn inc(&self, values: [&'static str; N]) {
        self.add(values, 1)
    }

    /// Adds `n` to the series with these label values.
    pub fn add(&self, values: [&'static str; N], n: u64) {
        let attrs: [KeyValue; N] = std::array::from_fn(|i| KeyValue::new(self.keys[i], values[i]));
        self.counter.add(n, &attrs);
    }
}

/// Counts label keys in [`families!`].
macro_rules! one {
    ($x:literal) => {
        1
    };
}

/// Declares every labelled counter and gauge once: its field, its Prometheus name, its
/// label keys and its help text (also listed in `docs/observability.md`).
macro_rules! families {
    (
        counters { $( $(#[doc = $help:literal])+ $field:ident: $name:literal [$($key:literal),*], )* }
        gauges { $( $(#[doc = $ghelp:literal])+ $gfield:ident: $gname:literal, )* }
    ) => {
        /// The labelled counters and the gauges. See [`families!`].
        pub struct Families {
            $( $(#[doc = $help])+ pub $field: Family<{ 0 $(+ one!($key))* }>, )*
            $( $(#[doc = $ghelp])+ pub $gfield: Gauge<u64>, )*
        }

        impl Families {
            fn new(meter: &Meter) -> Self {
                Families {
                    $( $field: {
                        let keys = [$($key),*];
                        let counter = meter
                            .u64_counter($name)
                            .with_description(concat!($($help),+).trim())
                            .build();
                        // Unlabelled counters start at 0, so that dashboards and alerts see
                        // them at once.
                        if keys.is_empty() {
                            counter.add(0, &[]);
                        }
                        Family { counter, keys }
                    }, )*
                    $( $gfield: meter
                        .u64_gauge($gname)
                        .with_description(concat!($($ghelp),+).trim())
                        .build(), )*
                }
            }
        }

        /// Every family's Prometheus name, for the docs test.
        #[cfg(test)]
        pub const FAMILY_NAMES: &[&str] = &[$($name,)* $($gname,)*];
    };
}

families! {
    counters {
        /// Upgrade attempts by outcome.
        handshakes: "gateway_handshakes_total" ["outcome"],
        /// Closed connections by reason and blame.
        connection_closes: "gateway_connection_closes_total" ["reason", "blame"],
        /// Clients closed with 4000.
        slow_consumer_disconnects: "gateway_slow_consumer_disconnects_total" [],
        /// Error replies to client requests, by code.
        request_errors: "gateway_request_errors_total" ["code"],
        /// Plain HTTP answers on both listeners.
        http_requests: "gateway_http_requests_total" ["listener", "status"],
        /// Failed broker calls by operation.
        broker_errors: "gateway_broker_errors_total" ["op"],
        /// Publishes through the admin API.
        admin_publishes: "gateway_admin_publishes_total" [],
        /// Connections closed for breaking RFC 6455, by kind.
        protocol_violations: "gateway_protocol_violations_total" ["kind"],
        /// Requests refused by a rate limit, by kind (handshake, messages, bytes).
        rate_limit_hits: "gateway_rate_limit_hits_total" ["kind"],
        /// Certificate reloads from disk, by result.
        tls_reloads: "gateway_tls_reloads_total" ["outcome"],
        /// TLS handshakes that failed or timed out.
        tls_handshake_failures: "gateway_tls_handshake_failures_total" [],
        /// Connections closed at accept because `max_pending_handshakes` were under way.
        pending_handshakes_dropped: "gateway_pending_handshakes_dropped_total" [],
        /// JWKS fetches by result.
        jwks_fetches: "gateway_jwks_fetches_total" ["outcome"],
        /// Cached JWKS key sets dropped after `jwks_max_stale_secs` without a successful fetch.
        jwks_keys_expired: "gateway_jwks_keys_expired_total" [],
        /// Connection directory operations, by op.
        directory_ops: "gateway_directory_ops_total" ["op"],
        /// Failed Redis calls and lost connections, by op.
        redis_errors: "gateway_redis_errors_total" ["op"],
        /// Times Redis became reachable again after an outage.
        redis_reconnects: "gateway_redis_reconnects_total" [],
        /// Messages published on Redis that were dropped (not JSON).
        broker_dropped: "gateway_broker_dropped_total" [],
        /// Connections closed with 1013 to rebalance after scale-out.
        rebalance_shed: "gateway_rebalance_shed_total" [],
        /// Entries appended to the inbound stream, by event.
        inbound_appends: "gateway_inbound_appends_total" ["event"],
        /// History-channel subscriptions ended because they could not stay gap-free.
        insufficient_state: "gateway_insufficient_state_total" [],
        /// History reads sent to the broker (batched per channel: joiners, gaps, checks).
        history_reads: "gateway_history_reads_total" [],
        /// Subscribes that asked to recover a position, by whether it was recovered.
        recoveries: "gateway_recoveries_total" ["recovered"],
        /// Centrifugo server API calls (`POST /api/<method>`), by method and outcome.
        api_calls: "gateway_api_calls_total" ["method", "outcome"],
        /// Presence operations by op (join, leave, list, page, stats, resync; purge counts
        /// the entries of dead nodes removed).
        presence_ops: "gateway_presence_ops_total" ["op"],
        /// Connections opened (their session started), by transport: websocket,
        /// http_stream, sse (Centrifugo's emulation) and eventsource (`GET /sse`).
        connections_opened: "gateway_connections_opened_total" ["transport"],
        /// Commands posted to `/emulation`, by outcome (local, forwarded, unknown_session,
        /// inbox_full, too_large, rate_limited, bad_request, unavailable), and commands
        /// forwarded by another node that found their connection gone (forward_gone) or its
        /// inbox full (forward_inbox_full).
        emulation: "gateway_emulation_requests_total" ["outcome"],
    }
    gauges {
        /// Connections on all live nodes, from the last heartbeat.
        cluster_connections: "gateway_cluster_connections",
        /// Live nodes in the cluster, this one included.
        cluster_nodes: "gateway_cluster_nodes",
    }
}

/// An HTTP status as a label value. Label values are `&'static str` (see [`Family`]), so
/// the codes the node answers with are listed; anything else is `other`.
pub fn status_label(status: u16) -> &'static str {
    match status {
        101 => "101",
        200 => "200",
        202 => "202",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        415 => "415",
        422 => "422",
        426 => "426",
        429 => "429",
        431 => "431",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

/// See the module docs.
pub struct Metrics {
    /// The per-message counts.
    pub hot: Arc<Hot>,
    families: Families,
    /// Broker receipt to socket write, per write (`gateway_fanout_latency_seconds`).
    pub fanout_latency: Histogram<f64>,
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

impl Deref for Metrics {
    type Target = Families;
    fn deref(&self) -> &Families {
        &self.families
    }
}

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
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
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
        let families = Families::new(&meter);
        let fanout_latency = meter
            .f64_histogram("gateway_fanout_latency_seconds")
            .with_description(
                "Age of the oldest channel message in a socket write: broker receipt to write.",
            )
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build();
        Metrics {
            hot,
            families,
            fanout_latency,
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

fn observe(meter: &Meter, hot: &Arc<Hot>) {
    let h = hot.clone();
    meter
        .i64_observable_gauge("gateway_connections_open")
        .with_description("Open WebSocket connections.")
        .with_callback(move |o| o.observe(h.connections_open.load(Ordering::Relaxed), &[]))
        .build();
    type Field = fn(&Hot) -> &AtomicU64;
    let counts: [(&'static str, &'static str, Field); 5] = [
        (
            "gateway_messages_in_total",
            "Complete client messages received.",
            |h| &h.messages_in,
        ),
        (
            "gateway_bytes_in_total",
            "Bytes of complete client messages received.",
            |h| &h.bytes_in,
        ),
        (
            "gateway_messages_out_total",
            "Frames queued to clients.",
            |h| &h.messages_out,
        ),
        (
            "gateway_bytes_out_total",
            "Bytes of frames queued to clients.",
            |h| &h.bytes_out,
        ),
        (
            "gateway_deliveries_total",
            "Channel messages queued to subscribers.",
            |h| &h.deliveries,
        ),
    ];
    for (name, help, field) in counts {
        let h = hot.clone();
        meter
            .u64_observable_counter(name)
            .with_description(help)
            .with_callback(move |o| o.observe(field(&h).load(Ordering::Relaxed), &[]))
            .build();
    }
}

impl Metrics {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_documented_and_served() {
        let docs = include_str!("../../docs/observability.md");
        let m = Metrics::new(None);
        m.handshakes.inc(["ok"]);
        m.connection_closes.inc(["drain", "none"]);
        let text = m.render();
        for name in FAMILY_NAMES {
            assert!(
                docs.contains(name),
                "{name} is missing from docs/observability.md"
            );
        }
        assert!(text
            .lines()
            .any(|l| l == r#"gateway_handshakes_total{outcome="ok"} 1"#));
        assert!(text
            .lines()
            .any(|l| l == r#"gateway_connection_closes_total{blame="none",reason="drain"} 1"#));
        assert!(text
            .lines()
            .any(|l| l == "gateway_slow_consumer_disconnects_total 0"));
    }
}
