//! Node configuration: one table of settings, from which the [`Config`] struct, its
//! `Default`, the command-line flags ([`Cli`]) and the layering are all generated, so that a
//! setting cannot lack its flag, its environment variable or its TOML key.
//!
//! Settings are layered: built-in defaults, then the TOML file named by `--config`, then
//! environment variables `GATEWAY_<KEY>`, then command-line flags. clap reads the
//! environment itself, so [`Cli`] holds "flag or env" and the file fills what both leave
//! unset. Every setting is listed with its default in `docs/configuration.md` (a test checks
//! that none is missing there).
//!
//! - `mod.rs`: the table, [`Config`], its `Default` and accessors;
//! - `validate.rs`: [`Config::validate`];
//! - `cli.rs`: [`Cli`], the layering and [`Config::load`];
//! - `secret.rs`: [`Secret`] and [`SecretUrl`], whose `Debug` redacts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The settings table: every setting once, with its doc, type and default. The name is the
/// struct field and the TOML key, `--name-with-dashes` the flag, `GATEWAY_NAME` the
/// environment variable, and the doc is also the flag's `--help`. An entry has one of three
/// shapes:
///
/// - `name: Type = default;` the flag, when given, overrides the file;
/// - `name: Option<Type>;` unset by default; the flag, when given, sets it;
/// - `name: switch;` a `bool`, false by default, whose flag takes no value: the flag and the
///   variable can only switch it on.
///
/// `#[arg(...)]` lines after the doc are extra clap attributes of the flag.
///
/// `settings!(emit)` hands the table, rewritten by `normalize!`, to the generator `emit`:
/// `config_struct!` below and `cli_struct!` in `cli.rs`.
macro_rules! settings {
    ($emit:ident) => {
        normalize! { $emit []
            /// Public WebSocket listener (`GET /ws`, `GET /connection/websocket` for Centrifugo
            /// SDKs, demo page at `/`).
            listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8080));
            /// Internal listener: probes, metrics and the admin API. Never expose it publicly.
            admin_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9090));
            /// This node's id in welcome frames and logs. Defaults to `$HOSTNAME` or `node-<pid>`.
            node_id: String = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("node-{}", std::process::id()));
            /// Accept connections without a token (user_id null). Required when no JWT key is set.
            allow_anonymous: switch;
            /// Glob patterns of channels any client may publish to (comma-separated in a flag).
            /// Empty: clients cannot publish.
            #[arg(value_delimiter = ',')]
            publish_allow: Vec<String> = Vec::new();
            /// Open WebSocket connections per node; more get HTTP 503 before the upgrade.
            max_connections: usize = 100_000;
            /// Open WebSocket connections from one client IP (an IPv6 client's /64), counted
            /// per node; more get HTTP 429 before the upgrade (0 = unlimited).
            max_connections_per_ip: usize = 1000;
            /// TCP connections accepted but not yet upgraded (PROXY header, TLS and HTTP
            /// still under way), per node; more are closed at once.
            max_pending_handshakes: usize = 10_000;
            /// Largest client message (after reassembling fragments); larger closes with 1009.
            max_message_bytes: usize = 64 * 1024;
            /// Time a fragmented message has from its first fragment to its last; later closes
            /// with 1008, so that a client cannot hold a reassembly buffer open forever.
            fragment_timeout_ms: u64 = 10_000;
            /// Subscriptions per connection; more get error `too_many_subscriptions`.
            max_subscriptions: usize = 128;
            /// Bytes queued for one client before it is disconnected as a slow consumer
            /// (close 4000).
            outbound_queue_bytes: usize = 1024 * 1024;
            /// Time allowed to receive the HTTP upgrade request headers (and a STOMP CONNECT,
            /// and, on the Centrifugo endpoint, the `connect` command after the upgrade).
            handshake_timeout_ms: u64 = 10_000;
            /// Interval between server pings (and the heart-beat offered to STOMP clients).
            ping_interval_ms: u64 = 25_000;
            /// A peer silent (no frame of any kind) for this long is closed with 4001.
            ping_timeout_ms: u64 = 60_000;
            /// On shutdown, time clients get to complete the close handshake after close 1001.
            shutdown_grace_ms: u64 = 5_000;
            /// Bearer token the admin API (`/v1/*`) requires when set, and the Centrifugo server
            /// API (`/api/*`) as its API key; probes and metrics stay open.
            #[arg(hide_env_values = true)]
            admin_token: Option<Secret>;
            /// Log format.
            log_format: LogFormat = LogFormat::Pretty;

            // ---- TLS ----
            /// PEM certificate chain; with `tls_key`, the public listener serves `wss://`.
            tls_cert: Option<PathBuf>;
            /// PEM private key (PKCS#8, PKCS#1 or SEC1).
            tls_key: Option<PathBuf>;
            /// How often the certificate files are checked for changes (cert-manager rotation).
            tls_reload_interval_ms: u64 = 5_000;

            // ---- JWT ----
            /// HMAC secret for HS256/HS384/HS512 tokens.
            #[arg(hide_env_values = true)]
            jwt_secret: Option<Secret>;
            /// PEM public keys (RSA, EC P-256/P-384 or Ed25519) for RS*/PS*/ES*/EdDSA tokens
            /// (comma-separated in a flag). Several keys may be live at once during a rotation.
            #[arg(value_delimiter = ',')]
            jwt_public_key: Vec<PathBuf> = Vec::new();
            /// JWKS URL (`https://`, or `http://` with `jwks_allow_http`); keys are chosen by
            /// `kid`.
            jwks_url: Option<String>;
            /// Accept an `http://` JWKS URL (tests, or a sidecar on localhost): anyone on the
            /// path could swap the keys.
            jwks_allow_http: switch;
            /// Periodic JWKS refresh interval.
            jwks_refresh_secs: u64 = 300;
            /// Minimum time between two JWKS fetches caused by unknown `kid`s; at least 1.
            jwks_min_refresh_secs: u64 = 10;
            /// Cached JWKS keys are dropped after this long without a successful fetch;
            /// handshakes then get 503 `keys_unavailable`.
            jwks_max_stale_secs: u64 = 86_400;
            /// CA bundle used to verify an https JWKS URL.
            jwks_ca_file: PathBuf = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
            /// Required `iss` claim.
            jwt_issuer: Option<String>;
            /// Required `aud` claim. Required itself with `jwt_public_key` or `jwks_url`, unless
            /// `jwt_allow_any_audience`.
            jwt_audience: Option<String>;
            /// With public keys or a JWKS and no `jwt_audience`: accept tokens whatever their
            /// `aud`, including tokens the same issuer minted for other applications.
            jwt_allow_any_audience: switch;
            /// Clock skew allowed on `exp` and `nbf`.
            jwt_leeway_secs: u64 = 30;
            /// After a connection's token expires, time it has to send `refresh` before close 4002.
            token_grace_ms: u64 = 30_000;

            // ---- Origin ----
            /// Allowed `Origin`s (comma-separated in a flag): exact (`https://app.example.com`),
            /// wildcard (`https://*.example.com`) or `*`. Empty: same-origin only (Origin host =
            /// Host header).
            #[arg(value_delimiter = ',')]
            allowed_origins: Vec<String> = Vec::new();
            /// Accept handshakes without an `Origin` header (non-browser clients);
            /// `--allow-missing-origin=false` refuses them.
            #[arg(num_args = 0..=1, default_missing_value = "true")]
            allow_missing_origin: bool = true;

            // ---- Rate limits ----
            /// Handshakes per second per client IP (0 = unlimited); excess gets 429.
            handshake_rate_per_ip: u32 = 20;
            /// Burst of handshakes per client IP.
            handshake_burst_per_ip: u32 = 50;
            /// Posts to `/emulation` (the commands of HTTP-streaming and SSE clients) per
            /// second per client IP (0 = unlimited); excess gets 429.
            emulation_rate_per_ip: u32 = 100;
            /// Burst of posts to `/emulation` per client IP.
            emulation_burst_per_ip: u32 = 200;
            /// Messages per second per connection (0 = unlimited).
            message_rate: u32 = 100;
            /// Burst of messages per connection.
            message_burst: u32 = 200;
            /// Bytes per second per connection (0 = unlimited); the burst is the larger of
            /// 4 × `max_message_bytes` and the rate.
            byte_rate: u32 = 1024 * 1024;
            /// Consecutive rate-limited messages answered with `rate_limited` before close 1008.
            rate_limit_strikes: u32 = 10;

            // ---- Client IP ----
            /// CIDRs of load balancers whose `X-Forwarded-For` and PROXY headers are believed
            /// (comma-separated in a flag).
            #[arg(value_delimiter = ',')]
            trusted_proxies: Vec<String> = Vec::new();
            /// Expect a PROXY protocol v2 header on connections from `trusted_proxies`.
            proxy_protocol: switch;

            // ---- Cluster (Redis) ----
            /// Redis URL (`redis://[:password@]host:port[/db]`); unset runs one node with the
            /// in-process broker. With `redis_cluster`, a comma-separated list of seed nodes.
            redis_url: Option<SecretUrl>;
            /// Password, when it is not in the URL (so it can come from a Secret via env).
            #[arg(hide_env_values = true)]
            redis_password: Option<Secret>;
            /// Prefix of every Redis key and channel this gateway uses; `[A-Za-z0-9_.:-]` only.
            redis_prefix: String = "gw:".into();
            /// `redis_url` names Redis Cluster seed nodes.
            redis_cluster: switch;
            /// With `redis_cluster`: channel messages use sharded pub/sub (SSUBSCRIBE/SPUBLISH).
            redis_sharded_pubsub: switch;
            /// Timeout of every Redis call, in milliseconds.
            redis_timeout_ms: u64 = 2_000;
            /// How often a node refreshes its liveness record, in milliseconds.
            node_heartbeat_ms: u64 = 2_000;
            /// A node whose liveness record is older than this is dead and its routes are purged.
            node_ttl_ms: u64 = 10_000;
            /// Cluster-wide cap on one user's connections (0: no cap). Anonymous clients are
            /// exempt.
            max_connections_per_user: usize = 0;
            /// Approximate length cap of the inbound stream (`XADD ... MAXLEN ~`). With
            /// `max_send_bytes`, it bounds the stream's memory in Redis.
            inbound_maxlen: usize = 100_000;
            /// Let anonymous connections `send` to the inbound stream; without it they get
            /// error `forbidden`, so that every entry names a user.
            anonymous_send: switch;
            /// Largest `data` of a `send`, in bytes; larger gets error `message_too_big`. The
            /// stream holds at most about `inbound_maxlen` × this.
            max_send_bytes: usize = 16 * 1024;
            /// `send`s per second per user, over all of the user's connections on this node
            /// (anonymous ones: per client IP), burst the same; more get `rate_limited`
            /// (0 = unlimited).
            send_rate_per_user: u32 = 20;

            // ---- Channels ----
            /// Per-channel options: history, presence, join/leave (`[[channels]]` in TOML;
            /// space-separated `pattern?key=value&...` entries in a flag). The first entry
            /// whose pattern matches applies. See docs/configuration.md#channels.
            #[arg(value_delimiter = ' ')]
            channels: Vec<ChannelOptions> = Vec::new();
            /// How long a node waits to batch history reads of one channel, so that a
            /// reconnect storm costs one Redis read per channel per batch, not one per client.
            recover_batch_ms: u64 = 5;
            /// Most members one `presence` request returns; more set `truncated` (the admin API
            /// pages through all of them).
            presence_max_members: usize = 1000;

            // ---- Drain and rebalancing ----
            /// After SIGTERM, keep serving (and accepting) this long with `/readyz` failing, so
            /// the load balancer stops routing here first. 0 when a Kubernetes preStop hook
            /// already waits.
            pre_stop_delay_ms: u64 = 0;
            /// Connections are closed with 1012 gradually over this window, not all at once.
            drain_window_ms: u64 = 10_000;
            /// Shed connections (close 1013) when this node holds more than the cluster mean by
            /// `rebalance_slack`, so that new nodes get a share after scale-out.
            /// `--rebalance false` turns it off.
            #[arg(num_args = 0..=1, default_missing_value = "true")]
            rebalance: bool = true;
            /// Tolerated excess over the cluster mean, as a fraction (0.1: 10 %).
            rebalance_slack: f64 = 0.1;
            /// Most connections shed per second.
            rebalance_rate: u32 = 20;

            // ---- Telemetry ----
            /// Also push metrics over OTLP/HTTP (protobuf) to this URL, e.g.
            /// `http://otel-collector:4318/v1/metrics` (needs the `otlp` build feature).
            otlp_endpoint: Option<String>;
            /// How often to push, in milliseconds.
            otlp_interval_ms: u64 = 10_000;
        }
    };
}

/// Rewrites each entry of the table to the one shape the generators take,
/// `{ [doc] [clap attributes] name: FieldType, FlagType = default, layering }`, where the
/// layering is `value`, `option` or `switch` (see `layer!` in `cli.rs`), then calls `$emit!`.
macro_rules! normalize {
    ($emit:ident [$($done:tt)*]) => { $emit! { $($done)* } };
    ($emit:ident [$($done:tt)*]
        $(#[doc = $doc:literal])* $(#[arg($($arg:tt)*)])*
        $name:ident: switch; $($rest:tt)*
    ) => { normalize! { $emit [$($done)*
        { [$(#[doc = $doc])*] [$(#[arg($($arg)*)])*] $name: bool, bool = false, switch }
    ] $($rest)* } };
    ($emit:ident [$($done:tt)*]
        $(#[doc = $doc:literal])* $(#[arg($($arg:tt)*)])*
        $name:ident: Option<$ty:ty>; $($rest:tt)*
    ) => { normalize! { $emit [$($done)*
        { [$(#[doc = $doc])*] [$(#[arg($($arg)*)])*]
          $name: Option<$ty>, Option<$ty> = None, option }
    ] $($rest)* } };
    ($emit:ident [$($done:tt)*]
        $(#[doc = $doc:literal])* $(#[arg($($arg:tt)*)])*
        $name:ident: $ty:ty = $default:expr; $($rest:tt)*
    ) => { normalize! { $emit [$($done)*
        { [$(#[doc = $doc])*] [$(#[arg($($arg)*)])*] $name: $ty, Option<$ty> = $default, value }
    ] $($rest)* } };
}

/// Generates [`Config`] and its `Default` from the normalised table.
macro_rules! config_struct {
    ($({ [$($doc:tt)*] [$($arg:tt)*]
         $name:ident: $ty:ty, $flag:ty = $default:expr, $layer:ident })*) => {
        /// The node's settings. Field names are the TOML keys; flags are the same names in
        /// kebab-case, environment variables `GATEWAY_` and the name in upper case.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( $($doc)* pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $name: $default, )* }
            }
        }

        #[cfg(test)]
        impl Config {
            /// Every setting's name (TOML key), in table order.
            pub(crate) const KEYS: &'static [&'static str] = &[$(stringify!($name)),*];
        }
    };
}

settings!(config_struct);

pub mod channels;
pub mod cidr;
mod cli;
pub mod secret;
mod validate;

pub use channels::ChannelOptions;
pub use secret::{Secret, SecretUrl};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

impl Config {
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
    pub fn fragment_timeout(&self) -> Duration {
        Duration::from_millis(self.fragment_timeout_ms)
    }
    pub fn token_grace(&self) -> Duration {
        Duration::from_millis(self.token_grace_ms)
    }
    /// The options of `channel` (see `config::channels`); `None` for a plain channel.
    pub fn channel(&self, channel: &str) -> Option<&ChannelOptions> {
        channels::lookup(&self.channels, channel)
    }
}
