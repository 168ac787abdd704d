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
        if self.max_pending_handshakes == 0 {
            return bad("max_pending_handshakes", "must be at least 1");
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
        if self.fragment_timeout_ms == 0 {
            return bad("fragment_timeout_ms", "must be > 0");
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
            // Over plain HTTP anyone on the path can hand the node their own keys.
            let plain_ok = self.jwks_allow_http && u.starts_with("http://");
            if !(u.starts_with("https://") || plain_ok) {
                return bad(
                    "jwks_url",
                    "must be an https:// URL (http:// needs jwks_allow_http = true)",
                );
            }
        }
        if self.jwks_min_refresh_secs == 0 {
            return bad("jwks_min_refresh_secs", "must be at least 1");
        }
        if self.jwks_max_stale_secs <= self.jwks_refresh_secs.max(1) {
            return bad(
                "jwks_max_stale_secs",
                "must be greater than jwks_refresh_secs",
            );
        }
        // An issuer's public keys usually sign tokens for several applications; without an
        // audience, a token minted for any of them would open a connection here. A secret
        // (HS*) is this gateway's own, so it needs no audience.
        let shared_keys = !self.jwt_public_key.is_empty() || self.jwks_url.is_some();
        if shared_keys && self.jwt_audience.is_none() && !self.jwt_allow_any_audience {
            return bad(
                "jwt_audience",
                "required with jwt_public_key or jwks_url (or set jwt_allow_any_audience = true)",
            );
        }
        if self.jwt_allow_any_audience && self.jwt_audience.is_some() {
            return bad(
                "jwt_allow_any_audience",
                "contradicts jwt_audience; set one of them",
            );
        }
        for cidr in &self.trusted_proxies {
            if crate::config::cidr::Cidr::parse(cidr).is_none() {
                return bad("trusted_proxies", &format!("`{cidr}` is not a CIDR"));
            }
        }
        if self.handshake_rate_per_ip > 0 && self.handshake_burst_per_ip == 0 {
            return bad("handshake_burst_per_ip", "must be at least 1");
        }
        if self.emulation_rate_per_ip > 0 && self.emulation_burst_per_ip == 0 {
            return bad("emulation_burst_per_ip", "must be at least 1");
        }
        if self.message_rate > 0 && self.message_burst == 0 {
            return bad("message_burst", "must be at least 1");
        }
        // The prefix is pasted into the Lua source of the directory's functions, and braces
        // would make a Redis Cluster hash tag: only a plain key alphabet is safe.
        let key_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
        if self.redis_prefix.is_empty() || !self.redis_prefix.bytes().all(key_byte) {
            return bad("redis_prefix", "must be non-empty, of [A-Za-z0-9_.:-] only");
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
        if self.max_send_bytes == 0 {
            return bad("max_send_bytes", "must be at least 1");
        }
        if self.redis_timeout_ms == 0 {
            return bad("redis_timeout_ms", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(c: &Config) -> Option<&'static str> {
        match c.validate() {
            Err(ConfigError::Invalid(field, _)) => Some(field),
            _ => None,
        }
    }

    fn anonymous() -> Config {
        Config {
            allow_anonymous: true,
            ..Config::default()
        }
    }

    /// The prefix goes into Lua source as a string literal: quotes, newlines, brackets and
    /// anything else outside the key alphabet are refused.
    #[test]
    fn redis_prefix_is_a_plain_key_alphabet() {
        for ok in ["gw:", "app.gw-1_:", "A"] {
            let c = Config {
                redis_prefix: ok.into(),
                ..anonymous()
            };
            assert_eq!(field(&c), None, "{ok}");
        }
        for bad in [
            "", "gw\"", "gw'", "gw]]", "gw\n", "{gw}", "g w", "gw\\", "gw\u{e9}",
        ] {
            let c = Config {
                redis_prefix: bad.into(),
                ..anonymous()
            };
            assert_eq!(field(&c), Some("redis_prefix"), "{bad:?}");
        }
    }

    /// Public keys and JWKS are usually shared by an issuer's applications: the audience is
    /// required with them unless waived explicitly, and never with a secret (HS*) alone.
    #[test]
    fn shared_keys_need_an_audience_or_an_explicit_waiver() {
        let pem = Config {
            jwt_public_key: vec!["k.pem".into()],
            ..Config::default()
        };
        assert_eq!(field(&pem), Some("jwt_audience"));
        let jwks = Config {
            jwks_url: Some("https://auth.example.com/jwks.json".into()),
            ..Config::default()
        };
        assert_eq!(field(&jwks), Some("jwt_audience"));
        for c in [pem, jwks] {
            let with_aud = Config {
                jwt_audience: Some("gateway".into()),
                ..c.clone()
            };
            assert_eq!(field(&with_aud), None);
            let waived = Config {
                jwt_allow_any_audience: true,
                ..c.clone()
            };
            assert_eq!(field(&waived), None);
            let both = Config {
                jwt_allow_any_audience: true,
                ..with_aud
            };
            assert_eq!(field(&both), Some("jwt_allow_any_audience"));
        }
        let secret = Config {
            jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
            ..Config::default()
        };
        assert_eq!(field(&secret), None);
    }

    #[test]
    fn jwks_needs_https_a_refetch_floor_and_a_staleness_above_the_refresh() {
        let jwks = |url: &str| Config {
            jwks_url: Some(url.into()),
            jwt_audience: Some("gateway".into()),
            ..Config::default()
        };
        assert_eq!(field(&jwks("https://a.example/jwks.json")), None);
        assert_eq!(field(&jwks("http://a.example/jwks.json")), Some("jwks_url"));
        assert_eq!(field(&jwks("ftp://a.example/jwks.json")), Some("jwks_url"));
        let plain = Config {
            jwks_allow_http: true,
            ..jwks("http://127.0.0.1:8000/jwks.json")
        };
        assert_eq!(field(&plain), None);
        let hammer = Config {
            jwks_min_refresh_secs: 0,
            ..jwks("https://a.example/jwks.json")
        };
        assert_eq!(field(&hammer), Some("jwks_min_refresh_secs"));
        let stale = Config {
            jwks_refresh_secs: 300,
            jwks_max_stale_secs: 300,
            ..jwks("https://a.example/jwks.json")
        };
        assert_eq!(field(&stale), Some("jwks_max_stale_secs"));
    }

    #[test]
    fn pending_handshakes_need_room_for_one() {
        let c = Config {
            max_pending_handshakes: 0,
            ..anonymous()
        };
        assert_eq!(field(&c), Some("max_pending_handshakes"));
    }
}
