//! Opening benchmark connections: `ws://` or `wss://` URLs, source-address spreading (one
//! process can use 127.0.0.2, 127.0.0.3, ... so that more than ~28k ephemeral ports are
//! available towards one listener), and a TLS client that accepts any certificate (the
//! benchmarks use self-signed certificates on loopback).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpSocket, TcpStream};

use crate::client::{Client, ConnectError};

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub tls: bool,
    /// `host:port`, sent as the Host header.
    pub host: String,
    /// Host name alone (the TLS server name).
    pub hostname: String,
    /// Path and query.
    pub path: String,
    pub addr: SocketAddr,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            return Err(anyhow!("expected a ws:// or wss:// URL: {url}"));
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let host = if host.contains(':') {
            host.to_string()
        } else if tls {
            format!("{host}:443")
        } else {
            format!("{host}:80")
        };
        let addr = host
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}"))?
            .next()
            .ok_or_else(|| anyhow!("{host} resolves to nothing"))?;
        let hostname = host
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_else(|| host.clone());
        Ok(Target {
            tls,
            host,
            hostname,
            path: path.to_string(),
            addr,
        })
    }
}

/// Opens connections from a rotating set of source addresses.
pub struct Connector {
    sources: Vec<IpAddr>,
    next: AtomicUsize,
    tls: tokio_rustls::TlsConnector,
}

impl Connector {
    /// `sources` empty: let the kernel choose.
    pub fn new(sources: Vec<IpAddr>) -> anyhow::Result<Connector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth();
        Ok(Connector {
            sources,
            next: AtomicUsize::new(0),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Parses `127.0.0.2,127.0.0.3` (empty string: no binding).
    pub fn parse_sources(list: &str) -> anyhow::Result<Vec<IpAddr>> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().with_context(|| format!("bad source address {s}")))
            .collect()
    }

    async fn tcp(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        if self.sources.is_empty() {
            return TcpStream::connect(addr).await;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len();
        let src = self.sources[i];
        let sock = if src.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(SocketAddr::new(src, 0))?;
        sock.connect(addr).await
    }

    /// TCP (+ TLS) + WebSocket handshake.
    pub async fn connect(
        &self,
        t: &Target,
        headers: &[(&str, &str)],
    ) -> Result<Client, ConnectError> {
        let tcp = self
            .tcp(t.addr)
            .await
            .with_context(|| format!("connecting to {}", t.addr))
            .map_err(ConnectError::Other)?;
        let _ = tcp.set_nodelay(true);
        if t.tls {
            let name = ServerName::try_from(t.hostname.clone())
                .map_err(|e| ConnectError::Other(e.into()))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .context("TLS handshake")
                .map_err(ConnectError::Other)?;
            Client::handshake(tls, &t.host, &t.path, headers).await
        } else {
            Client::handshake(tcp, &t.host, &t.path, headers).await
        }
    }
}

/// Accepts any server certificate but still checks the handshake signatures (the load
/// generator's servers, and the gateway's TLS tests, use throwaway certificates).
#[derive(Debug)]
pub struct AcceptAny(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
