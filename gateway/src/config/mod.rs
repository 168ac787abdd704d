//! Node configuration: one documented struct with defaults and [`Config::validate`].
//!
//! Settings are layered: built-in defaults, then the TOML file named by `--config`, then
//! environment variables `GATEWAY_<FLAG>`, then command-line flags. clap reads the
//! environment itself, so [`Cli`] holds "flag or env" and the file fills what both leave
//! unset. Every field is listed with its default in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::error::ConfigError;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The node's settings. Field names are the TOML keys; flags are the same names in kebab-case.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Public WebSocket listener (`GET /ws`, demo page at `/`).
    pub listen: SocketAddr,
    /// Internal listener: probes, metrics and the admin API. Never expose it publicly.
    pub admin_listen: SocketAddr,
    /// This node's id in welcome frames and logs. Defaults to `$HOSTNAME` or `node-<pid>`.
    pub node_id: String,
    /// Accept connections without a token (user_id null). Required when no JWT key is set.
    pub allow_anonymous: bool,
    /// Glob patterns of channels any client may publish to. Empty: clients cannot publish.
    pub publish_allow: Vec<String>,
    /// Open WebSocket connections per node; more get HTTP 503 before the upgrade.
    pub max_connections: usize,
    /// Largest client message (after reassembling fragments); larger closes with 1009.
    pub max_message_bytes: usize,
    /// Subscriptions per connection; more get error `too_many_subscriptions`.
    pub max_subscriptions: usize,
    /// Bytes queued for one client before it is disconnected as a slow consumer (close 4000).
    pub outbound_queue_bytes: usize,
    /// Time allowed to receive the HTTP upgrade request headers.
    pub handshake_timeout_ms: u64,
    /// Interval between server pings.
    pub ping_interval_ms: u64,
    /// A peer silent (no frame of any kind) for this long is closed with 4001.
    pub ping_timeout_ms: u64,
    /// On shutdown, time clients get to complete the close handshake after close 1001.
    pub shutdown_grace_ms: u64,
    /// Bearer token required by the admin API (`/v1/*`) when set. Probes and `/metrics`
    /// never need it.
    pub admin_token: Option<String>,
    /// Log format.
    pub log_format: LogFormat,

    // ---- TLS ----
    /// PEM certificate chain; with `tls_key`, the public listener serves `wss://`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for changes (cert-manager rotation).
    pub tls_reload_interval_ms: u64,

    // ---- JWT ----
    /// HMAC secret for HS256/HS384/HS512 tokens.
    pub jwt_secret: Option<String>,
    /// PEM public keys (RSA, EC P-256/P-384 or Ed25519) for RS*/PS*/ES*/EdDSA tokens. Several
    /// keys may be live at once during a rotation.
    pub jwt_public_key: Vec<PathBuf>,
    /// JWKS URL (http or https); keys are chosen by `kid`.
    pub jwks_url: Option<String>,
    /// Periodic JWKS refresh interval.
    pub jwks_refresh_secs: u64,
    /// Minimum time between two JWKS fetches caused by unknown `kid`s.
    pub jwks_min_refresh_secs: u64,
    /// CA bundle used to verify an https JWKS URL.
    pub jwks_ca_file: PathBuf,
    /// Required `iss` claim.
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub jwt_leeway_secs: u64,
    /// After a connection's token expires, time it has to send `refresh` before close 4002.
    pub token_grace_ms: u64,

    // ---- Origin ----
    /// Allowed `Origin`s: exact (`https://app.example.com`), wildcard
    /// (`https://*.example.com`) or `*`. Empty: same-origin only (Origin host = Host header).
    pub allowed_origins: Vec<String>,
    /// Accept handshakes without an `Origin` header (non-browser clients).
    pub allow_missing_origin: bool,

    // ---- Rate limits ----
    /// Handshakes per second per client IP (0 = unlimited); excess gets 429.
    pub handshake_rate_per_ip: u32,
    /// Burst of handshakes per client IP.
    pub handshake_burst_per_ip: u32,
    /// Messages per second per connection (0 = unlimited).
    pub message_rate: u32,
    /// Burst of messages per connection.
    pub message_burst: u32,
    /// Bytes per second per connection (0 = unlimited); the burst is `max_message_bytes` × 4.
    pub byte_rate: u32,
    /// Consecutive rate-limited messages answered with `rate_limited` before close 1008.
    pub rate_limit_strikes: u32,

    // ---- Client IP ----
    /// CIDRs of load balancers whose `X-Forwarded-For` and PROXY headers are believed.
    pub trusted_proxies: Vec<String>,
    /// Expect a PROXY protocol v2 header on connections from `trusted_proxies`.
    pub proxy_protocol: bool,

    // ---- Cluster (Redis) ----
    /// Redis URL (`redis://[:password@]host:port[/db]`); unset runs one node with the
    /// in-process broker. With `redis_cluster`, a comma-separated list of seed nodes.
    pub redis_url: Option<String>,
    /// Password, when it is not in the URL (so it can come from a Secret via env).
    pub redis_password: Option<String>,
    /// Prefix of every Redis key and channel this gateway uses.
    pub redis_prefix: String,
    /// `redis_url` names Redis Cluster seed nodes.
    pub redis_cluster: bool,
    /// With `redis_cluster`: channel messages use sharded pub/sub (SSUBSCRIBE/SPUBLISH).
    pub redis_sharded_pubsub: bool,
    /// Timeout of every Redis call, in milliseconds.
    pub redis_timeout_ms: u64,
    /// How often a node refreshes its liveness record, in milliseconds.
    pub node_heartbeat_ms: u64,
    /// A node whose liveness record is older than this is dead and its routes are purged.
    pub node_ttl_ms: u64,
    /// Cluster-wide cap on one user's connections (0: no cap). Anonymous clients are exempt.
    pub max_connections_per_user: usize,
    /// Approximate length cap of the inbound stream (`XADD ... MAXLEN ~`).
    pub inbound_maxlen: usize,

    // ---- Drain and rebalancing ----
    /// After SIGTERM, keep serving (and accepting) this long with `/readyz` failing, so the
    /// load balancer stops routing here first. 0 when a Kubernetes preStop hook already waits.
    pub pre_stop_delay_ms: u64,
    /// Connections are closed with 1012 gradually over this window, not all at once.
    pub drain_window_ms: u64,
    /// Shed connections (close 1013) when this node holds more than the cluster mean by
    /// `rebalance_slack`, so that new nodes get a share after scale-out.
    pub rebalance: bool,
    /// Tolerated excess over the cluster mean, as a fraction (0.1: 10 %).
    pub rebalance_slack: f64,
    /// Most connections shed per second.
    pub rebalance_rate: u32,

    // ---- Telemetry ----
    /// Also push metrics over OTLP/HTTP (protobuf) to this URL, e.g.
    /// `http://otel-collector:4318/v1/metrics` (needs the `otlp` build feature).
    pub otlp_endpoint: Option<String>,
    /// How often to push, in milliseconds.
    pub otlp_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            node_id: std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("node-{}", std::process::id())),
            allow_anonymous: false,
            publish_allow: Vec::new(),
            max_connections: 100_000,
            max_message_bytes: 64 * 1024,
            max_subscriptions: 128,
            outbound_queue_bytes: 1024 * 1024,
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            ping_timeout_ms: 60_000,
            shutdown_grace_ms: 5_000,
            admin_token: None,
            log_format: LogFormat::Pretty,
            tls_cert: None,
            tls_key: None,
            tls_reload_interval_ms: 5_000,
            jwt_secret: None,
            jwt_public_key: Vec::new(),
            jwks_url: None,
            jwks_refresh_secs: 300,
            jwks_min_refresh_secs: 10,
            jwks_ca_file: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_secs: 30,
            token_grace_ms: 30_000,
            allowed_origins: Vec::new(),
            allow_missing_origin: true,
            handshake_rate_per_ip: 20,
            handshake_burst_per_ip: 50,
            message_rate: 100,
            message_burst: 200,
            byte_rate: 1024 * 1024,
            rate_limit_strikes: 10,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            redis_url: None,
            redis_password: None,
            redis_prefix: "gw:".into(),
            redis_cluster: false,
            redis_sharded_pubsub: false,
            redis_timeout_ms: 2_000,
            node_heartbeat_ms: 2_000,
            node_ttl_ms: 10_000,
            max_connections_per_user: 0,
            inbound_maxlen: 100_000,
            pre_stop_delay_ms: 0,
            drain_window_ms: 10_000,
            rebalance: true,
            rebalance_slack: 0.1,
            rebalance_rate: 20,
            otlp_endpoint: None,
            otlp_interval_ms: 10_000,
        }
    }
}

impl Config {
    /// Rejects settings the node cannot run with, naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, why: &str| Err(ConfigError::Invalid(field, why.into()));
        if !self.allow_anonymous && !self.has_auth() {
            return Err(ConfigError::NoAuth);
        }
        if self.node_id.is_empty() || !shared::channel::is_valid(&self.node_id) {
            return bad("node_id", "must be 1-200 bytes of [A-Za-z0-9_.:@/-]");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if self.max_message_bytes < 128 {
            return bad("max_message_bytes", "must be at least 128");
        }
        if self.outbound_queue_bytes < self.max_message_bytes {
            return bad("outbound_queue_bytes", "must be at least max_message_bytes");
        }
        if self.ping_interval_ms == 0 || self.ping_timeout_ms <= self.ping_interval_ms {
            return bad(
                "ping_timeout_ms",
                "must be greater than ping_interval_ms (> 0)",
            );
        }
        if self.handshake_timeout_ms == 0 {
            return bad("handshake_timeout_ms", "must be > 0");
        }
        if self.admin_token.as_deref() == Some("") {
            return bad("admin_token", "must not be empty when set");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "tls_cert and tls_key must be set together");
        }
        if self.jwt_secret.as_deref().is_some_and(|s| s.len() < 32) {
            return bad("jwt_secret", "must be at least 32 bytes");
        }
        if let Some(u) = &self.jwks_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return bad("jwks_url", "must be an http:// or https:// URL");
            }
        }
        for cidr in &self.trusted_proxies {
            if crate::edge::client_ip::Cidr::parse(cidr).is_none() {
                return bad("trusted_proxies", &format!("`{cidr}` is not a CIDR"));
            }
        }
        if self.handshake_rate_per_ip > 0 && self.handshake_burst_per_ip == 0 {
            return bad("handshake_burst_per_ip", "must be at least 1");
        }
        if self.message_rate > 0 && self.message_burst == 0 {
            return bad("message_burst", "must be at least 1");
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}', ' ']) {
            return bad(
                "redis_prefix",
                "must be non-empty, without braces or spaces",
            );
        }
        if self.redis_sharded_pubsub && !self.redis_cluster {
            return bad("redis_sharded_pubsub", "needs redis_cluster");
        }
        if self.node_heartbeat_ms == 0 || self.node_ttl_ms < 2 * self.node_heartbeat_ms {
            return bad("node_ttl_ms", "must be at least twice node_heartbeat_ms");
        }
        if !(0.0..=10.0).contains(&self.rebalance_slack) {
            return bad("rebalance_slack", "must be between 0 and 10");
        }
        if self.rebalance && self.rebalance_rate == 0 {
            return bad(
                "rebalance_rate",
                "must be at least 1 (or set rebalance = false)",
            );
        }
        if self.otlp_endpoint.is_some() && !cfg!(feature = "otlp") {
            return bad(
                "otlp_endpoint",
                "this build has no OTLP support (feature `otlp`)",
            );
        }
        if self.otlp_interval_ms < 100 {
            return bad("otlp_interval_ms", "must be at least 100");
        }
        if self.drain_window_ms < 100 {
            return bad("drain_window_ms", "must be at least 100");
        }
        if self.redis_timeout_ms == 0 {
            return bad("redis_timeout_ms", "must be at least 1");
        }
        Ok(())
    }

    /// True when some way of authenticating clients is configured.
    pub fn has_auth(&self) -> bool {
        self.jwt_secret.is_some() || !self.jwt_public_key.is_empty() || self.jwks_url.is_some()
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.ping_timeout_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
    pub fn token_grace(&self) -> Duration {
        Duration::from_millis(self.token_grace_ms)
    }

    /// Builds the configuration from the command line, environment and optional file.
    pub fn load() -> Result<(Config, bool), ConfigError> {
        Self::from_cli(Cli::parse())
    }

    /// Layers `cli` (flags and env) over the file it names over the defaults. Returns the
    /// config and whether `--check-config` was given.
    pub fn from_cli(cli: Cli) -> Result<(Config, bool), ConfigError> {
        let mut c = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.clone(), e))?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse(path.clone(), e))?
            }
            None => Config::default(),
        };
        macro_rules! layer {
            ($($f:ident),*) => { $( if let Some(v) = cli.$f { c.$f = v; } )* };
        }
        layer!(
            listen,
            admin_listen,
            node_id,
            publish_allow,
            max_connections,
            max_message_bytes,
            max_subscriptions,
            outbound_queue_bytes,
            handshake_timeout_ms,
            ping_interval_ms,
            ping_timeout_ms,
            shutdown_grace_ms,
            log_format,
            tls_reload_interval_ms,
            jwks_refresh_secs,
            jwks_min_refresh_secs,
            jwks_ca_file,
            jwt_leeway_secs,
            token_grace_ms,
            allowed_origins,
            allow_missing_origin,
            handshake_rate_per_ip,
            handshake_burst_per_ip,
            message_rate,
            message_burst,
            byte_rate,
            rate_limit_strikes,
            trusted_proxies,
            jwt_public_key,
            redis_prefix,
            redis_timeout_ms,
            node_heartbeat_ms,
            node_ttl_ms,
            max_connections_per_user,
            inbound_maxlen,
            pre_stop_delay_ms,
            drain_window_ms,
            rebalance,
            rebalance_slack,
            rebalance_rate,
            otlp_interval_ms
        );
        macro_rules! layer_opt {
            ($($f:ident),*) => { $( if cli.$f.is_some() { c.$f = cli.$f; } )* };
        }
        layer_opt!(
            tls_cert,
            tls_key,
            jwt_secret,
            jwks_url,
            jwt_issuer,
            jwt_audience,
            redis_url,
            redis_password,
            otlp_endpoint
        );
        if cli.redis_cluster {
            c.redis_cluster = true;
        }
        if cli.redis_sharded_pubsub {
            c.redis_sharded_pubsub = true;
        }
        if cli.proxy_protocol {
            c.proxy_protocol = true;
        }
        if cli.allow_anonymous {
            c.allow_anonymous = true;
        }
        if cli.admin_token.is_some() {
            c.admin_token = cli.admin_token;
        }
        c.validate()?;
        Ok((c, cli.check_config))
    }
}

/// Command-line flags; each also reads `GATEWAY_<FLAG>` from the environment.
/// Unset flags leave the file's or the default value in place.
#[derive(Debug, Default, Parser)]
#[command(name = "gateway", version, about = "WebSocket gateway node")]
pub struct Cli {
    /// TOML file with settings (keys as in docs/configuration.md).
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the settings, print them, and exit.
    #[arg(long)]
    pub check_config: bool,
    #[arg(long, env = "GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    #[arg(long, env = "GATEWAY_NODE_ID")]
    pub node_id: Option<String>,
    /// Accept clients without a token.
    #[arg(long, env = "GATEWAY_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
    /// Comma-separated glob patterns of channels clients may publish to.
    #[arg(long, env = "GATEWAY_PUBLISH_ALLOW", value_delimiter = ',')]
    pub publish_allow: Option<Vec<String>>,
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    #[arg(long, env = "GATEWAY_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    #[arg(long, env = "GATEWAY_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    #[arg(long, env = "GATEWAY_OUTBOUND_QUEUE_BYTES")]
    pub outbound_queue_bytes: Option<usize>,
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_PING_INTERVAL_MS")]
    pub ping_interval_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_PING_TIMEOUT_MS")]
    pub ping_timeout_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    #[arg(long, env = "GATEWAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    #[arg(long, env = "GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    #[arg(long, env = "GATEWAY_TLS_RELOAD_INTERVAL_MS")]
    pub tls_reload_interval_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key file(s), comma-separated.
    #[arg(long, env = "GATEWAY_JWT_PUBLIC_KEY", value_delimiter = ',')]
    pub jwt_public_key: Option<Vec<PathBuf>>,
    #[arg(long, env = "GATEWAY_JWKS_URL")]
    pub jwks_url: Option<String>,
    #[arg(long, env = "GATEWAY_JWKS_REFRESH_SECS")]
    pub jwks_refresh_secs: Option<u64>,
    #[arg(long, env = "GATEWAY_JWKS_MIN_REFRESH_SECS")]
    pub jwks_min_refresh_secs: Option<u64>,
    #[arg(long, env = "GATEWAY_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    #[arg(long, env = "GATEWAY_JWT_LEEWAY_SECS")]
    pub jwt_leeway_secs: Option<u64>,
    #[arg(long, env = "GATEWAY_TOKEN_GRACE_MS")]
    pub token_grace_ms: Option<u64>,
    /// Allowed origins, comma-separated (exact, `https://*.example.com`, or `*`).
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Accept handshakes without an Origin header (`--allow-missing-origin=false` to refuse).
    #[arg(long, env = "GATEWAY_ALLOW_MISSING_ORIGIN", num_args = 0..=1, default_missing_value = "true")]
    pub allow_missing_origin: Option<bool>,
    #[arg(long, env = "GATEWAY_HANDSHAKE_RATE_PER_IP")]
    pub handshake_rate_per_ip: Option<u32>,
    #[arg(long, env = "GATEWAY_HANDSHAKE_BURST_PER_IP")]
    pub handshake_burst_per_ip: Option<u32>,
    #[arg(long, env = "GATEWAY_MESSAGE_RATE")]
    pub message_rate: Option<u32>,
    #[arg(long, env = "GATEWAY_MESSAGE_BURST")]
    pub message_burst: Option<u32>,
    #[arg(long, env = "GATEWAY_BYTE_RATE")]
    pub byte_rate: Option<u32>,
    #[arg(long, env = "GATEWAY_RATE_LIMIT_STRIKES")]
    pub rate_limit_strikes: Option<u32>,
    /// Trusted proxy CIDRs, comma-separated.
    #[arg(long, env = "GATEWAY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Expect PROXY protocol v2 from trusted proxies.
    #[arg(long, env = "GATEWAY_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
    /// Redis URL (or cluster seed list); unset: single node, in-process broker.
    #[arg(long, env = "GATEWAY_REDIS_URL")]
    pub redis_url: Option<String>,
    #[arg(long, env = "GATEWAY_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    #[arg(long, env = "GATEWAY_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Treat --redis-url as Redis Cluster seed nodes.
    #[arg(long, env = "GATEWAY_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// Use sharded pub/sub for channel messages (Redis Cluster only).
    #[arg(long, env = "GATEWAY_REDIS_SHARDED_PUBSUB")]
    pub redis_sharded_pubsub: bool,
    #[arg(long, env = "GATEWAY_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_NODE_HEARTBEAT_MS")]
    pub node_heartbeat_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_NODE_TTL_MS")]
    pub node_ttl_ms: Option<u64>,
    /// Cluster-wide cap on one user's connections (0: none).
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,
    #[arg(long, env = "GATEWAY_INBOUND_MAXLEN")]
    pub inbound_maxlen: Option<usize>,
    #[arg(long, env = "GATEWAY_PRE_STOP_DELAY_MS")]
    pub pre_stop_delay_ms: Option<u64>,
    #[arg(long, env = "GATEWAY_DRAIN_WINDOW_MS")]
    pub drain_window_ms: Option<u64>,
    /// Shed load after scale-out (`--rebalance false` turns it off).
    #[arg(long, env = "GATEWAY_REBALANCE", num_args = 0..=1, default_missing_value = "true")]
    pub rebalance: Option<bool>,
    #[arg(long, env = "GATEWAY_REBALANCE_SLACK")]
    pub rebalance_slack: Option<f64>,
    #[arg(long, env = "GATEWAY_REBALANCE_RATE")]
    pub rebalance_rate: Option<u32>,
    /// Push metrics over OTLP/HTTP to this URL (build feature `otlp`).
    #[arg(long, env = "GATEWAY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[arg(long, env = "GATEWAY_OTLP_INTERVAL_MS")]
    pub otlp_interval_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
            .expect("flags parse")
    }

    #[test]
    fn refuses_to_start_without_auth() {
        let err = Config::from_cli(cli(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::NoAuth), "{err}");
        assert!(err.to_string().contains("--allow-anonymous"));
    }

    #[test]
    fn flags_override_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let file = dir.join("g.toml");
        std::fs::write(
            &file,
            "allow_anonymous = true\nmax_connections = 7\npublish_allow = [\"a:*\"]\n",
        )
        .expect("write");
        let f = file.to_str().expect("utf8 path");
        let (c, check) = Config::from_cli(cli(&["--config", f, "--max-connections", "9"]))
            .expect("valid config");
        assert!(!check);
        assert_eq!(c.max_connections, 9);
        assert_eq!(c.publish_allow, vec!["a:*"]);
        assert_eq!(c.max_message_bytes, Config::default().max_message_bytes);

        std::fs::write(&file, "allow_anonymous = true\nmax_conections = 7\n").expect("write");
        let err = Config::from_cli(cli(&["--config", f])).unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let err =
            Config::from_cli(cli(&["--allow-anonymous", "--max-message-bytes", "10"])).unwrap_err();
        assert!(err.to_string().contains("max_message_bytes"), "{err}");
        let err = Config::from_cli(cli(&[
            "--allow-anonymous",
            "--ping-interval-ms",
            "100",
            "--ping-timeout-ms",
            "50",
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("ping_timeout_ms"), "{err}");
    }
}
