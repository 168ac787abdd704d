//! TLS for the public listener (rustls with the ring provider, TLS 1.2 and 1.3, ALPN
//! `http/1.1`), with certificate hot reload.
//!
//! The certificate is served through a resolver that holds the current key pair. A watcher
//! task checks the files' modification times every `tls_reload_interval_ms` and swaps in the
//! new pair when they change (cert-manager rewrites the Secret volume through a symlink
//! swap, which changes the mtime). New handshakes get the new certificate; established
//! connections keep their session and are not touched. A failed reload keeps the old pair,
//! and so does a certificate whose public key is not the key file's: serving that pair
//! would fail every handshake (the client checks the signature against the certificate).
//! It is also what a half-done rotation looks like (new certificate, old key), so the
//! watcher waits for the files to change again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::conn::tls::TlsStream;
use crate::error::StartError;
use crate::metrics::Metrics;

/// Serves whatever key pair was loaded last.
#[derive(Debug)]
pub struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a key pair was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file is missing or does not parse.
    #[error("{0}")]
    Read(String),
    /// Both files parse, but the certificate is not for this key.
    #[error("{cert} does not match the private key {key}")]
    Mismatch { cert: String, key: String },
}

/// Loads a PEM chain and key into a rustls key pair, and checks that the leaf certificate
/// carries the key's public half.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, LoadError> {
    let pair = parse(cert, key).map_err(LoadError::Read)?;
    match pair.keys_match() {
        // A key type that cannot tell its public half is served, as rustls does (none of
        // the ring provider's RSA, ECDSA and Ed25519 keys is such a key).
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(_) => Err(LoadError::Mismatch {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        }),
    }
}

fn parse(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Accepts TLS connections on the public listener, as [`TlsStream`]s (rustls' unbuffered
/// API: an idle connection holds no TLS buffer).
#[derive(Clone)]
pub struct Acceptor(Arc<rustls::ServerConfig>);

impl Acceptor {
    /// The handshake; the caller bounds it with the handshake timeout.
    pub fn accept(
        &self,
        tcp: TcpStream,
    ) -> impl std::future::Future<Output = std::io::Result<TlsStream>> {
        TlsStream::accept(self.0.clone(), tcp)
    }
}

/// The acceptor for the public listener and its resolver (for the reload task).
pub fn acceptor(cert: &Path, key: &Path) -> Result<(Acceptor, Arc<Resolver>), StartError> {
    let pair =
        load(cert, key).map_err(|e| StartError::Tls("loading the certificate".into(), e.into()))?;
    let resolver = Arc::new(Resolver(RwLock::new(Arc::new(pair))));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| StartError::Tls("protocol versions".into(), e.into()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Acceptor(Arc::new(config)), resolver))
}

fn stamp(paths: &[&Path]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Reloads the key pair when the files change, until `stop`.
pub async fn watch(
    resolver: Arc<Resolver>,
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut seen = stamp(&[&cert, &key]);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let now = stamp(&[&cert, &key]);
        if now == seen {
            continue;
        }
        match load(&cert, &key) {
            Ok(pair) => {
                *resolver.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
                seen = now;
                metrics.tls_reloads.inc(["ok"]);
                tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
            }
            Err(e @ LoadError::Mismatch { .. }) => {
                // Retried when the files change again (the missing half arrives), not every
                // tick: the pair on disk will not start to match by itself.
                seen = now;
                metrics.tls_reloads.inc(["mismatch"]);
                tracing::warn!(error = %e, "TLS reload refused; keeping the current certificate");
            }
            Err(e @ LoadError::Read(_)) => {
                // Often a half-written pair (cert updated, key not yet): retry next tick.
                metrics.tls_reloads.inc(["error"]);
                tracing::warn!(error = %e, "TLS reload failed; keeping the current certificate");
            }
        }
    }
}
