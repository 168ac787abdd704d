//! The node's own connections: the only place that holds their outbound queues, and the
//! local end of every unicast and disconnect, whichever node or backend asked for it.
//!
//! Besides the map `conn → Local`, it keeps a by-user index `user → conns`, updated under
//! the same lock, so that the per-user cap and a unicast to a user cost a lookup instead of
//! a scan of every connection on the node.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use super::{ConnInfo, Unsubscriber};
use crate::conn::event::{Encoded, Event};
use crate::conn::outbound::{Outbound, Pushed};
use crate::conn::stream::Inbox;
use crate::error::CloseReason;
use crate::metrics::Metrics;

/// A connection held by this node.
pub struct Local {
    /// The node-local id (the hub's `ConnId`).
    pub id: u64,
    pub out: Arc<Outbound>,
    pub user: Option<String>,
    pub connected_ms: u64,
    /// A connection over an HTTP stream: where its posted commands go. Boxed: most
    /// connections are WebSockets.
    pub emulation: Option<Box<Emulation>>,
}

/// A connection whose client posts its commands (the HTTP transports, `conn::stream`):
/// the secret a post must show, and where the commands go.
#[derive(Clone)]
pub struct Emulation {
    /// Random, [`SECRET_LEN`] hex digits; the session id the client holds is the secret
    /// followed by the connection id.
    pub secret: String,
    pub inbox: Inbox,
}

/// The length of [`Emulation::secret`]: 128 random bits in hex.
pub const SECRET_LEN: usize = 32;

/// What became of posted commands at this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// In the connection's inbox.
    Queued,
    /// The connection's inbox is full ([`crate::conn::stream::INBOX`]).
    Full,
    /// No such connection here, or not with that secret, or not a streaming connection.
    Unknown,
}

/// One connection's records, for writing them all again (resync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub conn: String,
    pub user: Option<String>,
    pub connected_ms: u64,
    /// The secret of a streaming connection, recorded so that any node can check a post.
    pub secret: Option<String>,
}

#[derive(Default)]
struct Conns {
    /// Keyed by the connection's id as its session holds it: one allocation for both.
    by_conn: HashMap<Arc<str>, Local>,
    /// Connections of each user (anonymous ones are not indexed). Never holds an empty set.
    by_user: HashMap<String, HashSet<Arc<str>>>,
}

impl Conns {
    /// Connections of `user`, for [`LocalConns::deliver`].
    fn of_user(&self, user: &str) -> Vec<String> {
        self.by_user
            .get(user)
            .map(|s| s.iter().map(|c| c.to_string()).collect())
            .unwrap_or_default()
    }

    fn get(&self, conn: &str) -> Option<&Local> {
        self.by_conn.get(conn)
    }

    fn values(&self) -> impl Iterator<Item = &Local> {
        self.by_conn.values()
    }

    fn unindex(&mut self, conn: &str, user: Option<&str>) {
        let Some(u) = user else { return };
        if let Some(set) = self.by_user.get_mut(u) {
            set.remove(conn);
            if set.is_empty() {
                self.by_user.remove(u);
            }
        }
    }
}

/// See the module docs.
pub struct LocalConns {
    conns: Mutex<Conns>,
    /// What a server-side unsubscribe does to a local connection (set by the layer above).
    unsubscriber: OnceLock<Unsubscriber>,
    metrics: Arc<Metrics>,
}

impl LocalConns {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        LocalConns {
            conns: Mutex::default(),
            unsubscriber: OnceLock::new(),
            metrics,
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a connection (`id`: its node-local id), replacing one with the same id, which
    /// ids never repeat.
    pub fn insert(
        &self,
        conn: impl Into<Arc<str>>,
        id: u64,
        user: Option<&str>,
        out: Arc<Outbound>,
        connected_ms: u64,
        emulation: Option<Emulation>,
    ) {
        let conn: Arc<str> = conn.into();
        let mut local = self.local();
        let old = local.by_conn.insert(
            conn.clone(),
            Local {
                id,
                out,
                user: user.map(str::to_owned),
                connected_ms,
                emulation: emulation.map(Box::new),
            },
        );
        if let Some(old) = old {
            local.unindex(&conn, old.user.as_deref());
        }
        if let Some(u) = user {
            local.by_user.entry(u.to_owned()).or_default().insert(conn);
        }
    }

    /// Forgets a connection; returns what was held.
    pub fn remove(&self, conn: &str) -> Option<Local> {
        let mut local = self.local();
        let gone = local.by_conn.remove(conn)?;
        local.unindex(conn, gone.user.as_deref());
        Some(gone)
    }

    pub fn contains(&self, conn: &str) -> bool {
        self.local().by_conn.contains_key(conn)
    }

    /// Connections held by this node.
    pub fn len(&self) -> usize {
        self.local().by_conn.len()
    }

    /// Connections held by this node that are not leaving: neither closing nor waiting out a
    /// reconnect hint ([`Outbound::close_with_hint`]). One look at each connection.
    pub fn staying(&self) -> usize {
        let local = self.local();
        local
            .by_conn
            .values()
            .filter(|l| !l.out.is_leaving())
            .count()
    }

    /// The distinct users among this node's connections.
    pub fn users(&self) -> usize {
        self.local().by_user.len()
    }

    /// Sets what [`LocalConns::unsubscribe`] does to a connection. Set once.
    pub fn set_unsubscriber(&self, unsubscriber: Unsubscriber) {
        let _ = self.unsubscriber.set(unsubscriber);
    }

    /// Takes each of `conns` that this node holds off `channel` (see [`Unsubscriber`]).
    /// Returns how many it held.
    pub fn unsubscribe<'a>(&self, conns: impl Iterator<Item = &'a str>, channel: &str) -> u64 {
        let Some(unsubscribe) = self.unsubscriber.get() else {
            return 0;
        };
        let local = self.local();
        let mut n = 0;
        for conn in conns {
            if let Some(l) = local.get(conn) {
                unsubscribe(l.id, conn, channel, &l.out);
                n += 1;
            }
        }
        n
    }

    /// How many connections `user` holds on this node.
    pub fn user_count(&self, user: &str) -> usize {
        self.local().by_user.get(user).map_or(0, HashSet::len)
    }

    /// The ids of `user`'s connections on this node, in no particular order.
    pub fn user_conns(&self, user: &str) -> Vec<String> {
        self.local().of_user(user)
    }

    /// `user`'s connections on this node as the admin API lists them, sorted by id.
    pub fn user_infos(&self, user: &str, node_id: &str) -> Vec<ConnInfo> {
        let local = self.local();
        let mut v: Vec<ConnInfo> = local
            .by_user
            .get(user)
            .into_iter()
            .flatten()
            .filter_map(|c| {
                local.get(c).map(|l| ConnInfo {
                    conn_id: c.to_string(),
                    node_id: node_id.to_owned(),
                    connected_ms: l.connected_ms,
                })
            })
            .collect();
        v.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
        v
    }

    /// Every connection's records, for re-registering them all.
    pub fn snapshot(&self) -> Vec<Record> {
        self.local()
            .by_conn
            .iter()
            .map(|(c, l)| Record {
                conn: c.to_string(),
                user: l.user.clone(),
                connected_ms: l.connected_ms,
                secret: l.emulation.as_ref().map(|e| e.secret.clone()),
            })
            .collect()
    }

    /// Hands posted commands to a local streaming connection. `secret`: what the post
    /// showed, checked here; `None` for commands another node checked against the records
    /// and forwarded.
    pub fn post(&self, conn: &str, secret: Option<&str>, commands: String) -> Posted {
        let local = self.local();
        let Some(e) = local.get(conn).and_then(|l| l.emulation.as_ref()) else {
            return Posted::Unknown;
        };
        if secret.is_some_and(|s| {
            !crate::config::secret::constant_time_eq(s.as_bytes(), e.secret.as_bytes())
        }) {
            return Posted::Unknown;
        }
        match e.inbox.try_send(commands) {
            Ok(()) => Posted::Queued,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Posted::Full,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Posted::Unknown,
        }
    }

    /// Queues a direct message, encoded once per protocol, to local connections. Returns how many got it.
    pub fn deliver<'a>(&self, conns: impl Iterator<Item = &'a str>, data: &str) -> u64 {
        let mut encoded = Encoded::new(Event::Direct { data });
        let local = self.local();
        let mut n = 0;
        for conn in conns {
            if let Some(l) = local.get(conn) {
                match l.out.push_encoded(&mut encoded, None).0 {
                    Pushed::Queued => n += 1,
                    Pushed::Overflowed => self.metrics.slow_consumer_disconnects.inc([]),
                    Pushed::Closing | Pushed::Unwanted => {}
                }
            }
        }
        self.metrics.hot.deliveries.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Closes one local connection with 4003. False when this node does not hold it.
    pub fn kick(&self, conn: &str) -> bool {
        match self.local().get(conn) {
            Some(l) => {
                l.out.close(CloseReason::Disconnected);
                true
            }
            None => false,
        }
    }

    /// Closes up to `n` of this node's connections, oldest first, with the reason `why`
    /// gives each (a reconnect hint: see [`Outbound::close_with_hint`], which closes those
    /// whose clients cannot read it after its delay, by `deadline` at the latest). Returns how
    /// many it closed. Oldest first because a connection that has just arrived (perhaps just
    /// shed by another node) should not be bounced again; connections already leaving are
    /// not picked again.
    pub fn close_oldest(
        &self,
        n: usize,
        why: impl Fn() -> CloseReason,
        deadline: Option<tokio::time::Instant>,
    ) -> usize {
        let local = self.local();
        let mut open: Vec<(&u64, &Arc<Outbound>)> = local
            .values()
            .filter(|l| !l.out.is_leaving())
            .map(|l| (&l.connected_ms, &l.out))
            .collect();
        open.sort_by_key(|(at, _)| **at);
        for (_, out) in open.iter().take(n) {
            out.close_with_hint(why(), deadline);
        }
        n.min(open.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns() -> LocalConns {
        LocalConns::new(Arc::default())
    }

    fn out() -> Arc<Outbound> {
        Arc::new(Outbound::new(1 << 20, &crate::conn::event::DebugCodec))
    }

    #[test]
    fn by_user_index_follows_insert_and_remove() {
        let l = conns();
        l.insert("a1", 0, Some("alice"), out(), 1, None);
        l.insert("a2", 0, Some("alice"), out(), 2, None);
        l.insert("b1", 0, Some("bob"), out(), 3, None);
        l.insert("x", 0, None, out(), 4, None);
        assert_eq!(l.user_count("alice"), 2);
        let mut a = l.user_conns("alice");
        a.sort();
        assert_eq!(a, ["a1", "a2"]);
        assert_eq!(l.len(), 4);

        assert_eq!(
            l.remove("a1").and_then(|g| g.user).as_deref(),
            Some("alice")
        );
        assert!(l.remove("a1").is_none());
        assert_eq!(l.user_conns("alice"), ["a2"]);
        l.remove("a2");
        assert_eq!(l.user_count("alice"), 0);
        assert!(
            !l.local().by_user.contains_key("alice"),
            "empty sets are dropped"
        );
        assert_eq!(l.user_conns("bob"), ["b1"]);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn reinserting_an_id_moves_it_to_the_new_user() {
        let l = conns();
        l.insert("c", 0, Some("alice"), out(), 1, None);
        l.insert("c", 0, Some("bob"), out(), 2, None);
        assert_eq!(l.user_count("alice"), 0);
        assert_eq!(l.user_conns("bob"), ["c"]);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn user_infos_are_sorted_and_carry_the_node() {
        let l = conns();
        l.insert("z", 0, Some("u"), out(), 5, None);
        l.insert("m", 0, Some("u"), out(), 6, None);
        let infos = l.user_infos("u", "n1");
        assert_eq!(
            infos,
            [
                ConnInfo {
                    conn_id: "m".into(),
                    node_id: "n1".into(),
                    connected_ms: 6
                },
                ConnInfo {
                    conn_id: "z".into(),
                    node_id: "n1".into(),
                    connected_ms: 5
                }
            ]
        );
    }

    #[tokio::test]
    async fn connections_waiting_out_a_hint_are_not_picked_or_counted_again() {
        let l = conns();
        let hintless = || Arc::new(Outbound::new(1 << 20, &crate::conn::event::HintlessCodec));
        let (a, b, c) = (hintless(), out(), hintless());
        l.insert("a", 0, None, a.clone(), 1, None);
        l.insert("b", 0, None, b.clone(), 2, None);
        l.insert("c", 0, None, c.clone(), 3, None);
        let hint = || CloseReason::Rebalance(60_000);
        assert_eq!(l.close_oldest(2, hint, None), 2);
        assert!(a.is_leaving() && !a.is_closing(), "waits out its hint");
        assert!(b.is_closing(), "reads the hint: closed at once");
        assert_eq!((l.len(), l.staying()), (3, 1));
        assert_eq!(l.close_oldest(2, hint, None), 1, "only c is left to pick");
        assert!(c.is_leaving() && l.staying() == 0);
    }

    #[test]
    fn deliver_and_kick_reach_only_the_named_connections() {
        let l = conns();
        let (a, b) = (out(), out());
        l.insert("a", 0, Some("u"), a.clone(), 1, None);
        l.insert("b", 0, Some("u"), b.clone(), 2, None);
        assert_eq!(l.deliver(["a", "nope"].into_iter(), "1"), 1);
        let mut got = std::collections::VecDeque::new();
        a.take(&mut got);
        assert_eq!(got.len(), 1);
        got.clear();
        b.take(&mut got);
        assert!(got.is_empty());
        assert!(l.kick("b"));
        assert!(!l.kick("nope"));
        assert!(b.is_closing() && !a.is_closing());
    }
}
