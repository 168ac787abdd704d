//! [`Config::validate`]: the settings a node cannot run with.

use super::Config;
use crate::error::ConfigError;

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
        for entry in &self.channels {
            if let Err(why) = entry.check() {
                return Err(ConfigError::Invalid("channels", why));
            }
        }
        if self.presence_max_members == 0 {
            return bad("presence_max_members", "must be at least 1");
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
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| t.expose().is_empty())
        {
            return bad("admin_token", "must not be empty when set");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "tls_cert and tls_key must be set together");
        }
        if self
            .jwt_secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < 32)
        {
            return bad("jwt_secret", "must be at least 32 bytes");
        }
        if let Some(u) = &self.jwks_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return bad("jwks_url", "must be an http:// or https:// URL");
            }
        }
        for cidr in &self.trusted_proxies {
            if crate::config::cidr::Cidr::parse(cidr).is_none() {
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
}
