//! Channel names and glob patterns.
//!
//! A channel name is 1 to 200 bytes of `[A-Za-z0-9_.:@/-]`. The alphabet is small on purpose:
//! names go into Redis keys, metrics-free log lines and JSON without any escaping, so a name
//! that passes [`is_valid`] can never smuggle a quote, a space or a control byte anywhere.

/// Longest accepted channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 200;

/// True when `name` is a valid channel name.
pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-')
        })
}

/// Matches `text` against a glob `pattern` where `*` matches any run of bytes (including
/// none) and `?` matches exactly one byte. Everything else matches itself.
///
/// Used for `--publish-allow`, the JWT `channels` and `publish` claims and allowed origins.
/// Iterative with single-star backtracking, so a hostile pattern cannot blow the stack or take
/// exponential time.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// True when any of `patterns` matches `text`.
pub fn any_match<S: AsRef<str>>(patterns: &[S], text: &str) -> bool {
    patterns.iter().any(|p| glob_match(p.as_ref(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        assert!(is_valid("chat:lobby"));
        assert!(is_valid("a"));
        assert!(is_valid("user@example.com/x-y_z.1"));
        assert!(is_valid(&"x".repeat(200)));
        assert!(!is_valid(&"x".repeat(201)));
        assert!(!is_valid(""));
        assert!(!is_valid("has space"));
        assert!(!is_valid("quote\""));
        assert!(!is_valid("nul\0"));
        assert!(!is_valid("é"));
        assert!(!is_valid("star*"));
    }

    #[test]
    fn globs() {
        assert!(glob_match("chat:*", "chat:lobby"));
        assert!(glob_match("chat:*", "chat:"));
        assert!(!glob_match("chat:*", "chatx"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*.example.com", "a.b.example.com"));
        assert!(!glob_match("*.example.com", "example.com"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("", "x"));
        // pathological pattern finishes quickly
        assert!(!glob_match(&"*a".repeat(50), &"a".repeat(40)));
    }
}
