//! Settings that must not appear in logs or in `--check-config`: their `Debug` hides them.

use std::fmt;

use serde::Deserialize;

/// A secret string (token, key, password). `Debug` prints `<redacted>`; the value is only
/// reachable through [`Secret::expose`], so every use of it is greppable. There is
/// deliberately no `Display` and no `PartialEq` (compare tokens in constant time).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

/// A URL, or a comma-separated list of them, that may carry a password
/// (`redis://user:password@host`). `Debug` shows it with every password replaced by
/// `<redacted>`; [`SecretUrl::expose`] gives the URL itself.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL(s) as given, password included.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL(s) with the password of each replaced by `<redacted>`. When the credentials
    /// have no `:` (`redis://secret@host`), all of them are taken for a password.
    pub fn redacted(&self) -> String {
        self.0
            .split(',')
            .map(redact_one)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `scheme://user:password@host/path` → `scheme://user:<redacted>@host/path`.
fn redact_one(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    // The authority ends at the path, query or fragment; its last `@` ends the credentials.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((creds, host)) => {
            let user = creds.split_once(':').map_or("", |(user, _)| user);
            let sep = if creds.contains(':') { ":" } else { "" };
            format!("{head}{user}{sep}<redacted>@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl From<String> for SecretUrl {
    fn from(s: String) -> Self {
        SecretUrl(s)
    }
}

impl From<&str> for SecretUrl {
    fn from(s: &str) -> Self {
        SecretUrl(s.to_owned())
    }
}

/// Compares two byte strings in time that depends on their lengths only, never on where
/// they first differ: an `==` that stops at the first wrong byte lets a caller who can time
/// many requests find the token byte by byte. Every byte is XORed and the differences are
/// ORed together; `black_box` keeps the optimiser from turning the fold back into an early
/// exit. A length mismatch answers at once: the length is not the secret (the token's
/// entropy is), and padding cannot hide it anyway. No crate needed for this one loop.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    let diff = given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| std::hint::black_box(acc | (a ^ b)));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"X3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3crett", b"s3cret"));
    }

    #[test]
    fn debug_hides_the_secret() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2");
        let s: Secret = toml::from_str::<std::collections::HashMap<String, Secret>>("k = \"v\"")
            .expect("toml")
            .remove("k")
            .expect("key");
        assert_eq!(s.expose(), "v");
    }

    #[test]
    fn url_debug_hides_every_password() {
        let cases = [
            ("redis://h:6379", "redis://h:6379"),
            ("redis://:pw@h:6379/0", "redis://:<redacted>@h:6379/0"),
            ("redis://user:pw@h", "redis://user:<redacted>@h"),
            (
                "redis://user:p:w@x@h/1?a=b@c",
                "redis://user:<redacted>@h/1?a=b@c",
            ),
            ("redis://pw@h", "redis://<redacted>@h"),
            (
                "redis://:a@h1:1,redis://h2:2,redis://u:b@h3:3",
                "redis://:<redacted>@h1:1,redis://h2:2,redis://u:<redacted>@h3:3",
            ),
        ];
        for (url, shown) in cases {
            let u = SecretUrl::from(url);
            assert_eq!(u.redacted(), shown, "{url}");
            assert_eq!(format!("{u:?}"), format!("{shown:?}"));
            assert_eq!(u.expose(), url);
        }
    }
}
