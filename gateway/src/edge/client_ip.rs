//! Which IP a client really has: the socket peer, unless that peer is a trusted proxy, in
//! which case `X-Forwarded-For` or a PROXY protocol v2 header names the client.
//!
//! Only `trusted_proxies` are believed: anyone else could put any address in a header and
//! dodge the per-IP handshake limit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub use crate::config::cidr::Cidr;

/// The trusted proxy list.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses validated CIDR strings (see `Config::validate`); invalid ones are skipped.
    pub fn new(cidrs: &[String]) -> Self {
        TrustedProxies(cidrs.iter().filter_map(|c| Cidr::parse(c)).collect())
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client IP for a request from `peer`: the right-most `X-Forwarded-For` entry that is
    /// not itself a trusted proxy, when `peer` is trusted; otherwise `peer`.
    ///
    /// `forwarded_for` holds the header's lines in the order received. Several lines are one
    /// comma-separated list in that order (RFC 7230 §3.2.2; RFC 7239 §7.1 says the same of
    /// `Forwarded`), so a proxy that adds its own line instead of appending to the existing
    /// one is read right: taking only the first line would let the client's own line win.
    /// Empty elements are skipped (RFC 7230 §7); an unparsable one ends the walk.
    pub fn client_ip<'a, I>(&self, peer: IpAddr, forwarded_for: I) -> IpAddr
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: DoubleEndedIterator,
    {
        if !self.trusts(peer) {
            return peer;
        }
        let hops = forwarded_for
            .into_iter()
            .rev()
            .flat_map(|line| line.rsplit(|b| *b == b','))
            .map(|hop| std::str::from_utf8(hop).map(str::trim))
            .filter(|hop| hop.map_or(true, |h| !h.is_empty()));
        let mut client = peer;
        for hop in hops {
            match hop.ok().and_then(|h| h.parse::<IpAddr>().ok()) {
                Some(ip) => {
                    client = ip;
                    if !self.trusts(ip) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }
}

/// Why a PROXY protocol header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY v2 signature")]
    Signature,
    #[error("unsupported PROXY version or command")]
    Version,
    #[error("PROXY header not received in time")]
    Timeout,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Reads a PROXY protocol v2 header from the start of `stream` and returns the source
/// address it carries. `Ok(None)` for a LOCAL command (health checks from the proxy itself)
/// or an address family we do not use (the peer address is kept then).
pub async fn read_proxy_v2(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let read = async {
        let mut head = [0u8; 16];
        stream.read_exact(&mut head).await?;
        if head[..12] != SIGNATURE {
            return Err(ProxyHeaderError::Signature);
        }
        let (version, command) = (head[12] >> 4, head[12] & 0x0f);
        if version != 2 || command > 1 {
            return Err(ProxyHeaderError::Version);
        }
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        if command == 0 {
            return Ok(None);
        }
        Ok(parse_addresses(head[13], &body))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ProxyHeaderError::Timeout)?
}

fn parse_addresses(family: u8, body: &[u8]) -> Option<SocketAddr> {
    match family >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        2 if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().ok()?;
            Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        _ => None,
    }
}

/// Encodes a PROXY v2 header for a TCP/IPv4 connection (tests and tools).
#[cfg(any(test, feature = "test-util"))]
pub fn encode_proxy_v2(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0, 12]);
    out.extend_from_slice(&src.ip().octets());
    out.extend_from_slice(&dst.ip().octets());
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nope").is_none());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let t = TrustedProxies::new(&["10.0.0.0/8".into()]);
        let xff =
            |peer: &str, lines: &[&str]| t.client_ip(ip(peer), lines.iter().map(|l| l.as_bytes()));
        assert_eq!(xff("1.2.3.4", &["9.9.9.9"]), ip("1.2.3.4"));
        assert_eq!(xff("10.0.0.1", &["9.9.9.9"]), ip("9.9.9.9"));
        // spoofed left-most entry is ignored: the right-most untrusted hop wins
        assert_eq!(
            xff("10.0.0.1", &["6.6.6.6, 9.9.9.9, 10.0.0.2"]),
            ip("9.9.9.9")
        );
        assert_eq!(xff("10.0.0.1", &["garbage"]), ip("10.0.0.1"));
        assert_eq!(xff("10.0.0.1", &[]), ip("10.0.0.1"));
        assert_eq!(xff("10.0.0.1", &["9.9.9.9, , 10.0.0.2,"]), ip("9.9.9.9"));
    }

    /// Several header lines are one list in order: the client's own line comes first, the
    /// proxies' lines after it.
    #[test]
    fn forwarded_for_lines_are_one_list_in_order() {
        let t = TrustedProxies::new(&["10.0.0.0/8".into()]);
        let lines: [&[u8]; 3] = [b"6.6.6.6", b"9.9.9.9, 10.0.0.3", b"10.0.0.2"];
        assert_eq!(t.client_ip(ip("10.0.0.1"), lines), ip("9.9.9.9"));
        let lines: [&[u8]; 2] = [b"6.6.6.6", b"\xff, 10.0.0.2"];
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), lines),
            ip("10.0.0.2"),
            "a hop that is not text ends the walk"
        );
    }
}
