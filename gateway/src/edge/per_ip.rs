//! What the per-client-IP limits count by, and the count of open connections per IP
//! (`max_connections_per_ip`).
//!
//! An IPv6 client is counted by its /64: one subscriber line or one cloud VM usually gets a
//! whole /64, so a limit keyed by the full address would give each client 2^64 budgets.
//! IPv4-mapped IPv6 addresses (a dual-stack socket's view of IPv4 clients) count as the
//! IPv4 address they carry; as IPv6 they would all fall into one /64.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The key per-IP limits count `ip` under: the IPv4 address, or the IPv6 /64.
pub fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX))).into(),
        },
    }
}

/// Open connections per client key. An entry lives only while its count is above zero, so
/// the map holds one entry per client IP connected now, never one per IP ever seen. One
/// mutex: it is taken once when a connection is admitted and once when it ends, not per
/// message.
pub struct ConnectionsPerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place in its IP's count; given back on drop.
pub struct IpSlot(Option<(Arc<ConnectionsPerIp>, IpAddr)>);

impl ConnectionsPerIp {
    /// At most `max` open connections per key; `0` disables the limit (and the counting).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionsPerIp {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when its key is at the limit.
    pub fn try_add(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot(None));
        }
        let key = key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot(Some((self.clone(), key))))
    }

    /// Keys with at least one open connection.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some((owner, key)) = self.0.take() else {
            return;
        };
        let mut open = owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(key(ip("2001:db8:1:3::1")), key(ip("2001:db8:1:2::1")));
        assert_eq!(key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_ne!(key(ip("::ffff:10.1.2.3")), key(ip("::ffff:10.1.2.4")));
        assert_eq!(key(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn open_connections_are_capped_per_key_and_entries_go_at_zero() {
        let per_ip = ConnectionsPerIp::new(2);
        let a = per_ip.try_add(ip("2001:db8::1")).unwrap();
        let b = per_ip.try_add(ip("2001:db8::2")).unwrap();
        assert!(per_ip.try_add(ip("2001:db8::3")).is_none(), "same /64");
        let other = per_ip.try_add(ip("192.0.2.1")).unwrap();
        assert_eq!(per_ip.tracked(), 2);
        drop(a);
        let c = per_ip.try_add(ip("2001:db8::3")).expect("a slot came back");
        assert!(per_ip.try_add(ip("2001:db8::4")).is_none());
        drop((b, c, other));
        assert_eq!(per_ip.tracked(), 0, "no entry without an open connection");
        let unlimited = ConnectionsPerIp::new(0);
        let held: Vec<_> = (0..100)
            .map(|_| unlimited.try_add(ip("192.0.2.1")).unwrap())
            .collect();
        assert_eq!((held.len(), unlimited.tracked()), (100, 0));
    }
}
