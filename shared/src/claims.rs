//! JWT claims the gateway reads. Unknown claims are ignored.

use serde::{Deserialize, Serialize};

/// The claims of a connection token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: becomes the connection's `user_id`.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer, checked when the node has `--jwt-issuer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, checked when the node has `--jwt-audience`. One string or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Glob patterns limiting what this connection may subscribe to. Absent means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// Glob patterns this connection may publish to, on top of `--publish-allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// A subscription token's channel: the token grants subscribing to this one channel
    /// (the Centrifugo endpoint's `subscribe` with a `token`, see `docs/sdk.md`). A
    /// connection token has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// What the connection shows in presence and join/leave frames: a JSON object of at most
    /// [`MAX_INFO_BYTES`] (compact). Anything else is refused with 401 `invalid_info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// The largest `info` claim, in bytes of compact JSON.
pub const MAX_INFO_BYTES: usize = 1024;

/// The `aud` claim: a single audience or a list (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}
