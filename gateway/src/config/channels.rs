//! Per-channel options (namespaces): history, presence and join/leave, chosen by the first
//! `[[channels]]` entry whose pattern matches the channel. A channel that matches none has
//! no history, no presence and no join/leave.
//!
//! In TOML:
//!
//! ```toml
//! [[channels]]
//! pattern = "chat:*"
//! history_size = 100
//! history_ttl_secs = 600
//! ```
//!
//! As a flag or environment variable (entries separated by spaces, which channel patterns
//! cannot contain): `--channels 'chat:*?history_size=100&history_ttl_secs=600'`.
//!
//! Every node of a cluster must have the same entries: the Redis function `gw_publish`,
//! which backends call, is loaded with them (the last node to start wins).

use std::str::FromStr;

use serde::Deserialize;

/// Most publications a channel's history may keep.
pub const MAX_HISTORY_SIZE: usize = 10_000;

/// The options of the channels one pattern matches.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelOptions {
    /// Glob (`*`, `?`) over channel names.
    pub pattern: String,
    /// Publications kept per channel; 0 means no history.
    #[serde(default)]
    pub history_size: usize,
    /// Publications are dropped this long after the channel's last one (required with
    /// history). The channel's epoch lasts as long after its last publication or read;
    /// nodes read the channels they have subscribers of every `node_heartbeat_ms`.
    #[serde(default)]
    pub history_ttl_secs: u64,
    /// Most publications one subscribe may recover; default `history_size`.
    #[serde(default)]
    pub max_recover: Option<usize>,
    /// Track who is subscribed (presence).
    #[serde(default)]
    pub presence: bool,
    /// Tell subscribers when others join and leave (needs `presence`).
    #[serde(default)]
    pub join_leave: bool,
    /// Like `join_leave`, per user: join on a user's first connection in the channel, leave
    /// on their last (anonymous connections count one each). Needs `presence`.
    #[serde(default)]
    pub user_join_leave: bool,
}

/// Which join and leave frames a presence channel sends its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// None.
    Quiet,
    /// One per connection (`join_leave`).
    Each,
    /// One per user: the first connection's join, the last one's leave (`user_join_leave`).
    PerUser,
}

impl ChannelOptions {
    /// True when the channel keeps history.
    pub fn has_history(&self) -> bool {
        self.history_size > 0
    }

    /// Which join and leave frames the channel sends; `user_join_leave` wins over
    /// `join_leave`.
    pub fn announce(&self) -> Announce {
        if self.user_join_leave {
            Announce::PerUser
        } else if self.join_leave {
            Announce::Each
        } else {
            Announce::Quiet
        }
    }

    /// The most publications a subscribe may recover.
    pub fn max_recover(&self) -> usize {
        self.max_recover.unwrap_or(self.history_size)
    }

    /// Why the entry is invalid, if it is.
    pub fn check(&self) -> Result<(), String> {
        let p = &self.pattern;
        let glob_ok = !p.is_empty()
            && p.len() <= shared::channel::MAX_CHANNEL_LEN
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:@/-*?".contains(&b));
        if !glob_ok {
            return Err(format!(
                "pattern `{p}` must be 1-200 bytes of [A-Za-z0-9_.:@/-] and the wildcards * ?"
            ));
        }
        if self.history_size > MAX_HISTORY_SIZE {
            return Err(format!(
                "`{p}`: history_size {} is over the maximum of {MAX_HISTORY_SIZE}",
                self.history_size
            ));
        }
        if self.has_history() && self.history_ttl_secs == 0 {
            return Err(format!("`{p}`: history needs history_ttl_secs"));
        }
        if self.max_recover.is_some() && !self.has_history() {
            return Err(format!("`{p}`: max_recover needs history"));
        }
        if (self.join_leave || self.user_join_leave) && !self.presence {
            return Err(format!(
                "`{p}`: join_leave and user_join_leave need presence"
            ));
        }
        Ok(())
    }
}

impl FromStr for ChannelOptions {
    type Err = String;

    /// `pattern?key=value&key=value`; `presence`, `join_leave` and `user_join_leave` may
    /// stand alone for true.
    fn from_str(s: &str) -> Result<Self, String> {
        let (pattern, query) = s.split_once('?').unwrap_or((s, ""));
        let mut o = ChannelOptions {
            pattern: pattern.to_owned(),
            history_size: 0,
            history_ttl_secs: 0,
            max_recover: None,
            presence: false,
            join_leave: false,
            user_join_leave: false,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("`{key}` must be a number, not `{value}`"))
            };
            let flag = || {
                value
                    .parse::<bool>()
                    .map_err(|_| format!("`{key}` must be true or false, not `{value}`"))
            };
            match key {
                "history_size" => o.history_size = number()? as usize,
                "history_ttl_secs" => o.history_ttl_secs = number()?,
                "max_recover" => o.max_recover = Some(number()? as usize),
                "presence" => o.presence = flag()?,
                "join_leave" => o.join_leave = flag()?,
                "user_join_leave" => o.user_join_leave = flag()?,
                other => return Err(format!("unknown channel option `{other}`")),
            }
        }
        o.check()?;
        Ok(o)
    }
}

/// The options of `channel`: the first entry whose pattern matches.
pub fn lookup<'a>(entries: &'a [ChannelOptions], channel: &str) -> Option<&'a ChannelOptions> {
    entries
        .iter()
        .find(|o| shared::channel::glob_match(&o.pattern, channel))
}

/// The pattern as an anchored Lua pattern, for the Redis functions that apply the options.
/// Only `*` and `?` are wildcards; every other byte of the alphabet that is magic in Lua
/// (`.`, `-`) is escaped with `%`.
pub fn lua_pattern(glob: &str) -> String {
    let mut out = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '.' | '-' => {
                out.push('%');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push('$');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag_form_and_checks_it() {
        let o: ChannelOptions = "chat:*?history_size=100&history_ttl_secs=600&presence"
            .parse()
            .expect("valid");
        assert_eq!(o.history_size, 100);
        assert_eq!(o.history_ttl_secs, 600);
        assert!(o.presence && !o.join_leave);
        assert_eq!(o.max_recover(), 100);
        assert!(
            "chat:*?history_size=100".parse::<ChannelOptions>().is_err(),
            "no ttl"
        );
        assert!("chat:*?history_size=10001&history_ttl_secs=1"
            .parse::<ChannelOptions>()
            .is_err());
        assert!("chat *".parse::<ChannelOptions>().is_err(), "bad pattern");
        assert!("chat:*?colour=red".parse::<ChannelOptions>().is_err());
        assert!(
            "chat:*?join_leave".parse::<ChannelOptions>().is_err(),
            "join_leave without presence"
        );
        let o: ChannelOptions = "lobby:*?presence&join_leave&user_join_leave"
            .parse()
            .expect("valid");
        assert_eq!(o.announce(), Announce::PerUser);
        let o: ChannelOptions = "room:*?presence&join_leave".parse().expect("valid");
        assert_eq!(o.announce(), Announce::Each);
    }

    #[test]
    fn first_match_wins_and_lua_patterns_agree() {
        let entries: Vec<ChannelOptions> = [
            "chat:vip?history_size=5&history_ttl_secs=9",
            "chat:*?presence",
        ]
        .iter()
        .map(|s| s.parse().expect("valid"))
        .collect();
        assert_eq!(
            lookup(&entries, "chat:vip").map(|o| o.history_size),
            Some(5)
        );
        assert_eq!(lookup(&entries, "chat:x").map(|o| o.presence), Some(true));
        assert!(lookup(&entries, "news").is_none());
        assert_eq!(lua_pattern("a.b-c:*?"), "^a%.b%-c:.*.$");
    }
}
