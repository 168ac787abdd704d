//! The Origin check at the handshake.
//!
//! Browsers always send `Origin` on WebSocket handshakes, and a page from another site can
//! open a socket to us with the user's cookies: checking it is what stops cross-site
//! WebSocket hijacking. Policy:
//!
//! - `allowed_origins` empty: same-origin only (the Origin's host:port equals `Host`);
//! - otherwise the Origin must match an entry: exact (`https://app.example.com`), a
//!   subdomain wildcard (`https://*.example.com`), or `*` for any;
//! - no `Origin` header (non-browser clients, which cannot be hijacked this way): accepted
//!   unless `allow_missing_origin` is false.

use crate::config::Config;

/// Why an Origin was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum OriginError {
    Missing,
    NotAllowed,
}

/// Checks the request's `Origin` against the policy above.
pub fn check(config: &Config, origin: Option<&str>, host: Option<&str>) -> Result<(), OriginError> {
    let Some(origin) = origin else {
        return if config.allow_missing_origin {
            Ok(())
        } else {
            Err(OriginError::Missing)
        };
    };
    let ok = if config.allowed_origins.is_empty() {
        let origin_host = origin.split_once("://").map(|(_, h)| h);
        origin_host.is_some() && origin_host == host
    } else {
        config
            .allowed_origins
            .iter()
            .any(|pattern| matches(pattern, origin))
    };
    if ok {
        Ok(())
    } else {
        Err(OriginError::NotAllowed)
    }
}

fn matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.split_once("://*.") {
        // https://*.example.com: same scheme, and a host that ends in .example.com with a
        // non-empty label in front made only of host characters (no '/', '@' or ':' tricks).
        Some((scheme, domain)) => origin
            .strip_prefix(scheme)
            .and_then(|r| r.strip_prefix("://"))
            .and_then(|host| host.strip_suffix(domain))
            .and_then(|sub| sub.strip_suffix('.'))
            .is_some_and(|sub| {
                !sub.is_empty()
                    && sub
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            }),
        None => pattern.eq_ignore_ascii_case(origin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(origins: &[&str], allow_missing: bool) -> Config {
        Config {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_missing_origin: allow_missing,
            ..Config::default()
        }
    }

    #[test]
    fn policy() {
        let c = cfg(&["https://app.example.com", "https://*.example.org"], true);
        assert_eq!(check(&c, Some("https://app.example.com"), None), Ok(()));
        assert_eq!(check(&c, Some("https://a.b.example.org"), None), Ok(()));
        assert_eq!(
            check(&c, Some("https://example.org"), None),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&c, Some("http://a.example.org"), None),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&c, Some("https://evil.com/.example.org"), None),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&c, Some("https://evil.com:1@x.example.org"), None),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&c, Some("https://evil.com"), None),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(check(&c, None, None), Ok(()));
        assert_eq!(
            check(&cfg(&[], false), None, None),
            Err(OriginError::Missing)
        );
        // same-origin default
        let same = cfg(&[], true);
        assert_eq!(
            check(&same, Some("http://localhost:8080"), Some("localhost:8080")),
            Ok(())
        );
        assert_eq!(
            check(&same, Some("http://evil:8080"), Some("localhost:8080")),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(check(&cfg(&["*"], true), Some("https://any"), None), Ok(()));
    }
}
