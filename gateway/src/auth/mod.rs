//! JWT verification at the handshake, JWKS caching, and the per-connection token clock.
//!
//! Keys come from `jwt_secret` (HS*), `jwt_public_key` PEM files (RS*, PS*, ES256/384,
//! EdDSA) and/or a JWKS URL. Several keys may be live at once, which is how rotation works:
//! publish the new key next to the old one, switch the signer, drop the old key later.
//! JWKS keys are chosen by `kid`; an unknown `kid` triggers a refetch, at most once per
//! `jwks_min_refresh_secs`, so a flood of forged `kid`s cannot turn the node into a JWKS
//! hammer. A JWK that says what it is for (`use`, `alg`) verifies only that, and a cached
//! set that could not be refreshed for `jwks_max_stale_secs` is dropped.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use shared::claims::Claims;

use crate::config::Config;
use crate::error::StartError;
use crate::metrics::Metrics;

/// Why a token was refused. `code()` is the `error` field of the 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <jwt>` or `?access_token=<jwt>`")]
    Missing,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token algorithm is not accepted by this node")]
    UnsupportedAlgorithm,
    #[error("no key with this token's kid")]
    UnknownKey,
    #[error("signing keys are unavailable right now")]
    KeysUnavailable,
    /// A subscription token (one with a `channel` claim) where a connection token is
    /// expected, or the other way round.
    #[error(
        "wrong kind of token: a subscription token has a `channel` claim, a connection token none"
    )]
    WrongKind,
    #[error("token sub must be 1-200 bytes without control characters, `{{` or `}}`")]
    InvalidSubject,
    #[error("the token's info claim must be a JSON object of at most 1024 bytes")]
    InvalidInfo,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "token_missing",
            AuthError::Malformed => "token_malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::UnsupportedAlgorithm => "unsupported_algorithm",
            AuthError::UnknownKey => "unknown_key",
            AuthError::KeysUnavailable => "keys_unavailable",
            AuthError::WrongKind => "wrong_token_kind",
            AuthError::InvalidSubject => "invalid_subject",
            AuthError::InvalidInfo => "invalid_info",
        }
    }
}

/// A verified token's meaning for the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    /// Subscribe patterns; `None` means no limit.
    pub channels: Option<Vec<String>>,
    /// Extra publish patterns on top of `publish_allow`.
    pub publish: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// A subscription token's `channel` claim: the one channel it grants.
    pub channel: Option<String>,
    /// The `info` claim as compact JSON text (an object of at most
    /// `shared::claims::MAX_INFO_BYTES`); shown in presence and join/leave frames.
    pub info: Option<String>,
}

/// See the module docs.
pub struct Authenticator {
    secret: Option<DecodingKey>,
    public: Vec<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
    leeway: u64,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Authenticator {
    /// Builds the verifier from the config, or `None` when no key is configured.
    pub fn from_config(c: &Config, metrics: Arc<Metrics>) -> Result<Option<Arc<Self>>, StartError> {
        if !c.has_auth() {
            return Ok(None);
        }
        let mut public = Vec::new();
        for path in &c.jwt_public_key {
            public.push(load_public_key(path)?);
        }
        let jwks = match &c.jwks_url {
            Some(url) => Some(Arc::new(Jwks::new(url, c, metrics)?)),
            None => None,
        };
        Ok(Some(Arc::new(Authenticator {
            secret: c
                .jwt_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            public,
            jwks,
            leeway: c.jwt_leeway_secs,
            issuer: c.jwt_issuer.clone(),
            audience: c.jwt_audience.clone(),
        })))
    }

    /// The JWKS cache, for the refresh task.
    pub fn jwks(&self) -> Option<Arc<Jwks>> {
        self.jwks.clone()
    }

    /// Verifies a connection token and returns who it names and what it allows. A
    /// subscription token (with a `channel` claim) is refused: it grants one channel, and
    /// must not open a connection free of the `channels` limit.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let identity = self.decode(token).await?;
        if identity.channel.is_some() {
            return Err(AuthError::WrongKind);
        }
        Ok(identity)
    }

    /// Verifies a subscription token: its `channel` claim is the one channel it grants.
    pub async fn verify_subscription(&self, token: &str) -> Result<Identity, AuthError> {
        let identity = self.decode(token).await?;
        if identity.channel.is_none() {
            return Err(AuthError::WrongKind);
        }
        Ok(identity)
    }

    /// Checks a token's signature and claims, whatever its kind.
    async fn decode(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let alg = header.alg;
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let mut candidates: Vec<DecodingKey> = Vec::new();
        if hmac {
            candidates.extend(self.secret.clone());
        } else {
            candidates.extend(
                self.public
                    .iter()
                    .filter(|k| k.family() == alg.family())
                    .cloned(),
            );
            if let Some(jwks) = &self.jwks {
                candidates.extend(jwks.keys_for(header.kid.as_deref(), alg).await?);
            }
        }
        if candidates.is_empty() {
            return Err(if hmac || self.jwks.is_none() {
                AuthError::UnsupportedAlgorithm
            } else {
                AuthError::UnknownKey
            });
        }
        let validation = self.validation(alg);
        let mut last = AuthError::BadSignature;
        for key in &candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    let c = data.claims;
                    if !valid_subject(&c.sub) {
                        return Err(AuthError::InvalidSubject);
                    }
                    return Ok(Identity {
                        info: info_text(c.info)?,
                        user_id: c.sub,
                        channels: c.channels,
                        publish: c.publish,
                        exp: c.exp,
                        channel: c.channel,
                    });
                }
                Err(e) => {
                    last = map_error(e.kind());
                    if last != AuthError::BadSignature {
                        // The signature verified (claims are checked after it): this key is
                        // the right one and the claims are what is wrong.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        // jsonwebtoken checks iss/aud only when the token has them: require them whenever
        // they are configured, or a token without them would pass.
        let mut required = vec!["exp", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
        }
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        v
    }
}

/// A `sub` the gateway can carry: it becomes the user id in Redis keys (where `{` and `}`
/// would make a Redis Cluster hash tag and move a user's keys to another slot), in log
/// lines (where control characters could forge lines) and in the welcome frame. 200 bytes
/// is the id limit of the rest of the node (channel names, node ids, admin API paths).
fn valid_subject(sub: &str) -> bool {
    (1..=200).contains(&sub.len()) && !sub.chars().any(|c| c.is_control() || c == '{' || c == '}')
}

/// The `info` claim as compact JSON text, when it is an object small enough.
fn info_text(info: Option<serde_json::Value>) -> Result<Option<String>, AuthError> {
    match info {
        None => Ok(None),
        Some(v @ serde_json::Value::Object(_)) => {
            let text = v.to_string();
            if text.len() > shared::claims::MAX_INFO_BYTES {
                Err(AuthError::InvalidInfo)
            } else {
                Ok(Some(text))
            }
        }
        Some(_) => Err(AuthError::InvalidInfo),
    }
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            AuthError::UnsupportedAlgorithm
        }
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::WrongAudience,
        _ => AuthError::Malformed,
    }
}

fn load_public_key(path: &Path) -> Result<DecodingKey, StartError> {
    let pem = std::fs::read(path).map_err(|e| StartError::Key(path.to_owned(), e.into()))?;
    DecodingKey::from_rsa_pem(&pem)
        .or_else(|_| DecodingKey::from_ec_pem(&pem))
        .or_else(|_| DecodingKey::from_ed_pem(&pem))
        .map_err(|e| StartError::Key(path.to_owned(), e.into()))
}

/// A cached JWKS.
pub struct Jwks {
    url: hyper::Uri,
    tls: Option<tokio_rustls::TlsConnector>,
    set: RwLock<Option<Cached>>,
    last_fetch: Mutex<Option<Instant>>,
    fetching: tokio::sync::Mutex<()>,
    min_refresh: Duration,
    pub refresh: Duration,
    max_stale: Duration,
    metrics: Arc<Metrics>,
}

/// The key set of the last successful fetch, and when that was.
struct Cached {
    set: JwkSet,
    fetched: Instant,
}

/// Whether a JWK may verify a token signed with `alg`. A key that says what it is for is
/// used for that only: `use` must be `sig` (RFC 7517 §4.2) and `alg` the token's (§4.4), so
/// that a key published for encryption, or for another algorithm, never verifies a token.
fn usable(k: &Jwk, alg: Algorithm) -> bool {
    let for_signing = matches!(
        k.common.public_key_use,
        None | Some(PublicKeyUse::Signature)
    );
    let for_alg = k
        .common
        .key_algorithm
        .is_none_or(|a| a == KeyAlgorithm::from(alg));
    for_signing && for_alg
}

impl Jwks {
    fn new(url: &str, c: &Config, metrics: Arc<Metrics>) -> Result<Self, StartError> {
        let uri: hyper::Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| {
            StartError::Jwks(format!("bad URL {url}"), e.into())
        })?;
        let tls = if uri.scheme_str() == Some("https") {
            let mut roots = rustls::RootCertStore::empty();
            use rustls::pki_types::pem::PemObject;
            let certs =
                rustls::pki_types::CertificateDer::pem_file_iter(&c.jwks_ca_file).map_err(|e| {
                    StartError::Jwks(format!("CA file {}", c.jwks_ca_file.display()), e.into())
                })?;
            for cert in certs.flatten() {
                let _ = roots.add(cert);
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| StartError::Jwks("TLS client".into(), e.into()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Jwks {
            url: uri,
            tls,
            set: RwLock::new(None),
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            min_refresh: Duration::from_secs(c.jwks_min_refresh_secs),
            refresh: Duration::from_secs(c.jwks_refresh_secs.max(1)),
            max_stale: Duration::from_secs(c.jwks_max_stale_secs),
            metrics,
        })
    }

    /// The keys that may verify a token with this `kid` (any, when it has none) and `alg`,
    /// possibly none; `None` when no set is cached (never fetched, or dropped as stale).
    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Option<Vec<DecodingKey>> {
        self.expire();
        let set = self.set.read().unwrap_or_else(|p| p.into_inner());
        let keys = set
            .as_ref()?
            .set
            .keys
            .iter()
            .filter(|k| kid.is_none() || k.common.key_id.as_deref() == kid)
            .filter(|k| usable(k, alg))
            .filter_map(|k| DecodingKey::from_jwk(k).ok())
            .filter(|k| k.family() == alg.family())
            .collect();
        Some(keys)
    }

    /// Keys matching `kid` (all keys when the token has none), refetching once on a miss.
    /// `Err(KeysUnavailable)` when no set is cached even after that.
    async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<DecodingKey>, AuthError> {
        let found = |keys: Option<Vec<DecodingKey>>| keys.filter(|k| !k.is_empty());
        if let Some(keys) = found(self.lookup(kid, alg)) {
            return Ok(keys);
        }
        // A fetch may be in flight (the first one at startup, or a refetch another handshake
        // started): wait for it rather than refuse. Fetches time out, so this wait is bounded.
        drop(self.fetching.lock().await);
        if let Some(keys) = found(self.lookup(kid, alg)) {
            return Ok(keys);
        }
        let recently = self
            .last_fetch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < self.min_refresh);
        if !recently {
            self.fetch().await;
        }
        self.lookup(kid, alg).ok_or(AuthError::KeysUnavailable)
    }

    /// Drops the cached set once `max_stale` has passed since the last successful fetch. The
    /// set is kept through failed fetches so that a JWKS outage does not lock everyone out,
    /// but not forever: a key the issuer has removed (say, a compromised one) must not stay
    /// live for as long as the endpoint stays unreachable.
    fn expire(&self) {
        let stale = |c: &Option<Cached>| {
            c.as_ref()
                .is_some_and(|c| c.fetched.elapsed() > self.max_stale)
        };
        if !stale(&self.set.read().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
        if stale(&set) {
            *set = None;
            self.metrics.jwks_keys_expired.inc([]);
            tracing::warn!(
                url = %self.url,
                max_stale_secs = self.max_stale.as_secs(),
                "JWKS keys dropped: no successful fetch for too long; handshakes get 503 until one succeeds"
            );
        }
    }

    /// Fetches the JWKS now (one fetch at a time); keeps the old set on failure.
    pub async fn fetch(&self) {
        let _one = self.fetching.lock().await;
        *self.last_fetch.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        match tokio::time::timeout(Duration::from_secs(5), self.get()).await {
            Ok(Ok(set)) => {
                tracing::info!(url = %self.url, keys = set.keys.len(), "JWKS refreshed");
                self.metrics.jwks_fetches.inc(["ok"]);
                *self.set.write().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
                    set,
                    fetched: Instant::now(),
                });
            }
            Ok(Err(e)) => {
                self.metrics.jwks_fetches.inc(["error"]);
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed; keeping cached keys");
            }
            Err(_) => {
                self.metrics.jwks_fetches.inc(["timeout"]);
                tracing::warn!(url = %self.url, "JWKS fetch timed out; keeping cached keys");
            }
        }
        self.expire();
    }

    async fn get(&self) -> Result<JwkSet, String> {
        let host = self.url.host().ok_or("URL has no host")?.to_owned();
        let tls = self.tls.is_some();
        let port = self.url.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let path = self
            .url
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, &host)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let body = match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| e.to_string())?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                request(stream, req).await?
            }
            None => request(tcp, req).await?,
        };
        serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
    }
}

async fn request<S>(io: S, req: hyper::Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(body.to_bytes())
}

/// Refreshes the JWKS every `refresh` until `stop`.
pub async fn refresh_jwks(jwks: Arc<Jwks>, stop: tokio_util::sync::CancellationToken) {
    loop {
        jwks.fetch().await;
        tokio::select! {
            _ = tokio::time::sleep(jwks.refresh) => {}
            _ = stop.cancelled() => return,
        }
    }
}
