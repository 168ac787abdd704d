//! Error types. Each records who caused it ([`Blame`]): that decides the close code sent to
//! the client, the log level and the `blame` label on `gateway_connection_closes_total`.

use std::path::PathBuf;

use shared::close;

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something wrong or behaved badly; logged at debug.
    Client,
    /// Nobody: a normal close (client goodbye, shutdown, drain).
    None,
}

impl Blame {
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Client => "client",
            Blame::None => "none",
        }
    }
}

/// Why a WebSocket connection ends. Maps one-to-one to a close frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("client closed with {0}")]
    ClientClosed(u16),
    /// The payload is a snake_case slug naming the violation (metric label).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("binary frames are not supported")]
    Binary,
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    #[error("message exceeds {0} bytes")]
    TooBig(usize),
    #[error("outbound queue over {0} bytes")]
    SlowConsumer(usize),
    #[error("no frame within heartbeat timeout")]
    HeartbeatTimeout,
    #[error("policy violation: {0}")]
    Policy(&'static str),
    /// A fragmented message was not completed within `fragment_timeout_ms`.
    #[error("policy violation: fragmented message not completed in time")]
    FragmentTimeout,
    #[error("token expired and was not refreshed")]
    TokenExpired,
    #[error("node shutting down")]
    Shutdown,
    /// Graceful drain: reconnect (to another node) after the hinted delay.
    #[error("service restart; retry_after_ms={0}")]
    Restart(u64),
    /// Rebalancing after scale-out: this node sheds load; reconnect after the hinted delay.
    #[error("rebalancing; retry_after_ms={0}")]
    Rebalance(u64),
    #[error("disconnected by operator")]
    Disconnected,
    /// The transport ended without a close handshake; nothing can be sent.
    #[error("connection lost")]
    Abnormal,
}

impl CloseReason {
    /// The close code sent to the peer.
    pub fn code(&self) -> u16 {
        match self {
            CloseReason::ClientClosed(c) => *c,
            CloseReason::Protocol(_) => close::PROTOCOL_ERROR,
            CloseReason::Binary => close::UNSUPPORTED_DATA,
            CloseReason::InvalidUtf8 => close::INVALID_PAYLOAD,
            CloseReason::TooBig(_) => close::MESSAGE_TOO_BIG,
            CloseReason::SlowConsumer(_) => close::SLOW_CONSUMER,
            CloseReason::HeartbeatTimeout => close::HEARTBEAT_TIMEOUT,
            CloseReason::Policy(_) | CloseReason::FragmentTimeout => close::POLICY_VIOLATION,
            CloseReason::TokenExpired => close::TOKEN_EXPIRED,
            CloseReason::Shutdown => close::GOING_AWAY,
            CloseReason::Restart(_) => close::SERVICE_RESTART,
            CloseReason::Rebalance(_) => close::TRY_AGAIN_LATER,
            CloseReason::Disconnected => close::DISCONNECTED,
            CloseReason::Abnormal => 1006,
        }
    }

    /// The reconnect hint a drain or a rebalancing gives with its close: wait this long before
    /// reconnecting.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            CloseReason::Restart(ms) | CloseReason::Rebalance(ms) => Some(*ms),
            _ => None,
        }
    }

    /// Short snake_case label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::ClientClosed(_) => "client_closed",
            CloseReason::Protocol(_) => "protocol_error",
            CloseReason::Binary => "binary_frame",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::TooBig(_) => "message_too_big",
            CloseReason::SlowConsumer(_) => "slow_consumer",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::Policy(_) => "rate_limited",
            CloseReason::FragmentTimeout => "fragment_timeout",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Restart(_) => "drain",
            CloseReason::Rebalance(_) => "rebalance",
            CloseReason::Disconnected => "disconnected",
            CloseReason::Abnormal => "connection_lost",
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            CloseReason::ClientClosed(_)
            | CloseReason::Shutdown
            | CloseReason::Restart(_)
            | CloseReason::Rebalance(_)
            | CloseReason::Disconnected
            | CloseReason::Abnormal => Blame::None,
            _ => Blame::Client,
        }
    }
}

/// Broker and Redis failures. Blamed on upstream: the client is told `unavailable`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// Redis answered with an error, or the connection failed. The source is kept (behind an
    /// `Arc`, as callers clone the error into replies and logs) so logs show the cause.
    #[error("Redis: {0}")]
    Redis(#[source] std::sync::Arc<redis::RedisError>),
    /// The operation needs a backend this node does not have (no Redis configured).
    #[error("{0}")]
    NotConfigured(&'static str),
    #[error("broker call timed out")]
    Timeout,
    /// Redis answered in a shape our own function never returns.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

impl From<redis::RedisError> for BrokerError {
    fn from(e: redis::RedisError) -> Self {
        BrokerError::Redis(std::sync::Arc::new(e))
    }
}

/// Invalid or unreadable configuration. Blamed on the operator; `main` prints it and exits 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no client authentication is configured: set a JWT key, or pass --allow-anonymous \
         (GATEWAY_ALLOW_ANONYMOUS=true) to accept clients without tokens"
    )]
    NoAuth,
    #[error("invalid setting `{0}`: {1}")]
    Invalid(&'static str, String),
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot parse config file {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
}

/// The cause of a [`StartError`].
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Failures while starting a node (bad key material, unreachable files or Redis). `main`
/// prints the chain of causes and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot load JWT key {0}")]
    Key(PathBuf, #[source] Cause),
    #[error("JWKS: {0}")]
    Jwks(String, #[source] Cause),
    #[error("TLS: {0}")]
    Tls(String, #[source] Cause),
    #[error("Redis: {0}")]
    Redis(&'static str, #[source] BrokerError),
}
