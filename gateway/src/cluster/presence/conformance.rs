//! The conformance suite every presence [`Store`] must pass.
//!
//! Call [`run_all`] from an integration test with a factory that builds a fresh store (its
//! own state: for Redis, its own key prefix) for the `[[channels]]` entries of
//! [`channels`], and a way to hear the channels' announcements.

use std::any::Any;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Entry, Member, Store};
use crate::broker::{BoxFuture, Envelope};
use crate::config::ChannelOptions;

/// The entries the suite's stores must be built with: `each:*` announces every join and
/// leave, `user:*` a user's first and last, `quiet:*` nothing.
pub fn channels() -> Vec<ChannelOptions> {
    [
        "each:*?presence&join_leave",
        "user:*?presence&user_join_leave",
        "quiet:*?presence",
    ]
    .iter()
    .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
    .collect()
}

/// Announcements heard so far: `(channel, payload)`.
pub type Heard = Arc<Mutex<Vec<(String, String)>>>;

/// Starts hearing a channel's announcements.
pub type Watch = Box<dyn Fn(&str) -> BoxFuture<'static, ()> + Send + Sync>;

/// A store under test.
pub struct Fixture {
    /// The node the store writes as.
    pub node_id: String,
    pub store: Arc<dyn Store>,
    /// What the store announced on the channels it was told to watch.
    pub heard: Heard,
    /// Starts hearing a channel's announcements (a no-op where every one is heard).
    pub watch: Watch,
    /// Whatever must live as long as the fixture.
    pub keep: Option<Box<dyn Any + Send + Sync>>,
}

fn member(conn: &str, user: Option<&str>) -> Member {
    Member {
        conn_id: conn.into(),
        user_id: user.map(str::to_owned),
        info: user.map(|u| format!(r#"{{"name":"{u}","n":[1,2]}}"#)),
    }
}

impl Fixture {
    async fn add(&self, channel: &str, conn: &str, user: Option<&str>) {
        self.store
            .add(channel, &member(conn, user))
            .await
            .expect("add");
    }

    async fn remove(&self, channel: &str, conn: &str) {
        self.store.remove(channel, conn).await.expect("remove");
    }

    async fn stats(&self, channel: &str) -> (u64, u64) {
        let s = self.store.stats(channel).await.expect("stats");
        (s.num_clients, s.num_users)
    }

    async fn conns(&self, channel: &str, max: usize) -> (Vec<String>, bool) {
        let l = self.store.list(channel, max).await.expect("list");
        let mut conns: Vec<String> = l.members.into_iter().map(|m| m.conn_id).collect();
        conns.sort();
        (conns, l.truncated)
    }

    /// Waits (up to 5 s) for `n` announcements, then a moment for any extra, and takes
    /// them as `"join c1"` / `"leave c2"`.
    async fn announcements(&self, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.heard().len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let heard = std::mem::take(&mut *self.heard());
        heard
            .iter()
            .map(|(_, payload)| {
                let env = Envelope::open(payload);
                let entry = Entry::parse(env.data).expect("an announcement holds an entry");
                assert_eq!(
                    entry.node.as_deref(),
                    Some(self.node_id.as_str()),
                    "the entry names its node"
                );
                format!("{} {}", env.event.unwrap_or("message"), entry.conn_id)
            })
            .collect()
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs every case against stores made by `make`. Panics on the first failure.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    counts_and_listing(&make().await).await;
    members_round_trip(&make().await).await;
    join_leave_announces_every_connection(&make().await).await;
    user_join_leave_announces_first_and_last(&make().await).await;
    quiet_channels_announce_nothing(&make().await).await;
    pages_cover_every_member(&make().await).await;
    batches_and_purge_of_a_node(&make().await).await;
}

async fn counts_and_listing(f: &Fixture) {
    let ch = "quiet:count";
    assert_eq!(f.stats(ch).await, (0, 0), "an unknown channel is empty");
    f.add(ch, "c1", Some("alice")).await;
    f.add(ch, "c2", Some("bob")).await;
    assert_eq!(f.stats(ch).await, (2, 2));
    f.add(ch, "c3", Some("alice")).await;
    assert_eq!(f.stats(ch).await, (3, 2), "a second connection of a user");
    f.add(ch, "c4", None).await;
    assert_eq!(f.stats(ch).await, (4, 2), "anonymous: a client, not a user");
    f.add(ch, "c2", Some("bob")).await;
    assert_eq!(f.stats(ch).await, (4, 2), "adding again changes nothing");
    assert_eq!(
        f.conns(ch, 10).await,
        (
            vec!["c1".into(), "c2".into(), "c3".into(), "c4".into()],
            false
        )
    );
    assert!(!f.conns(ch, 4).await.1, "exactly max is not truncated");
    let (some, truncated) = f.conns(ch, 2).await;
    assert_eq!(some.len(), 2);
    assert!(truncated, "more than max is truncated");
    assert_eq!(
        f.stats("quiet:other").await,
        (0, 0),
        "channels are separate"
    );

    f.remove(ch, "c1").await;
    assert_eq!(f.stats(ch).await, (3, 2), "alice still has c3");
    f.remove(ch, "c3").await;
    assert_eq!(f.stats(ch).await, (2, 1), "alice's last connection left");
    f.remove(ch, "ghost").await;
    f.remove("quiet:nothing", "c2").await;
    assert_eq!(f.stats(ch).await, (2, 1), "removing the absent is a no-op");
    f.remove(ch, "c4").await;
    f.remove(ch, "c2").await;
    assert_eq!(f.stats(ch).await, (0, 0));
    assert_eq!(f.conns(ch, 10).await, (vec![], false));
}

async fn members_round_trip(f: &Fixture) {
    let ch = "quiet:fields";
    let odd = Member {
        conn_id: "n.1.9".into(),
        user_id: Some("é \"q\" \\ ü".into()),
        info: Some(r#"{"a":{"b":[true,null,1.5]},"s":"\u00e9"}"#.into()),
    };
    f.store.add(ch, &odd).await.expect("add");
    f.add(ch, "anon", None).await;
    let mut listed = f.store.list(ch, 10).await.expect("list").members;
    listed.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
    assert_eq!(listed[0].conn_id, "anon");
    assert_eq!(
        (listed[0].user_id.as_ref(), listed[0].info.as_ref()),
        (None, None)
    );
    assert_eq!(listed[1].conn_id, odd.conn_id);
    assert_eq!(listed[1].user_id, odd.user_id);
    let info: serde_json::Value =
        serde_json::from_str(listed[1].info.as_deref().expect("info")).expect("JSON");
    let want: serde_json::Value =
        serde_json::from_str(odd.info.as_deref().expect("info")).expect("JSON");
    assert_eq!(info, want, "info comes back as the same JSON");
}

async fn join_leave_announces_every_connection(f: &Fixture) {
    let ch = "each:room";
    (f.watch)(ch).await;
    f.add(ch, "c1", Some("alice")).await;
    f.add(ch, "c2", Some("alice")).await;
    f.add(ch, "c3", None).await;
    f.add(ch, "c1", Some("alice")).await; // again: no second join
    f.remove(ch, "c2").await;
    f.remove(ch, "ghost").await; // absent: no leave
    assert_eq!(
        f.announcements(4).await,
        ["join c1", "join c2", "join c3", "leave c2"]
    );
    let (_, payload) = {
        f.remove(ch, "c1").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while f.heard().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        f.heard().remove(0)
    };
    let env = Envelope::open(&payload);
    assert_eq!(env.event, Some("leave"));
    let e = Entry::parse(env.data).expect("entry");
    assert_eq!(e.user_id.as_deref(), Some("alice"));
    assert_eq!(
        e.info.map(|i| i.get()),
        Some(r#"{"name":"alice","n":[1,2]}"#),
        "the leave carries the join's fields"
    );
}

async fn user_join_leave_announces_first_and_last(f: &Fixture) {
    let ch = "user:lobby";
    (f.watch)(ch).await;
    f.add(ch, "c1", Some("alice")).await;
    f.add(ch, "c2", Some("alice")).await;
    f.add(ch, "c3", None).await;
    f.add(ch, "c4", None).await;
    f.remove(ch, "c1").await;
    f.remove(ch, "c2").await;
    f.remove(ch, "c3").await;
    assert_eq!(
        f.announcements(5).await,
        ["join c1", "join c3", "join c4", "leave c2", "leave c3"],
        "a user's first join and last leave; each anonymous connection is its own"
    );
    assert_eq!(f.stats(ch).await, (1, 0));
}

async fn quiet_channels_announce_nothing(f: &Fixture) {
    let ch = "quiet:hush";
    (f.watch)(ch).await;
    f.add(ch, "c1", Some("alice")).await;
    f.remove(ch, "c1").await;
    assert!(f.announcements(1).await.is_empty());
}

async fn pages_cover_every_member(f: &Fixture) {
    let ch = "quiet:big";
    let all: Vec<(String, Member)> = (0..250)
        .map(|i| {
            let user = format!("u{}", i % 100);
            (ch.to_owned(), member(&format!("c{i:03}"), Some(&user)))
        })
        .collect();
    f.store.add_many(&all).await.expect("add_many");
    assert_eq!(f.stats(ch).await, (250, 100));
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = f
            .store
            .page(ch, cursor.as_deref(), 100)
            .await
            .expect("page");
        pages += 1;
        assert!(pages <= 250, "the cursor never ended");
        seen.extend(page.members.into_iter().map(|m| m.conn_id));
        match page.cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 250, "every member on some page");
    let (listed, truncated) = f.conns(ch, 1000).await;
    assert_eq!((listed.len(), truncated), (250, false));
    let (listed, truncated) = f.conns(ch, 100).await;
    assert_eq!((listed.len(), truncated), (100, true));
    let empty = f.store.page("quiet:none", None, 100).await.expect("page");
    assert!(empty.members.is_empty() && empty.cursor.is_none());
}

async fn batches_and_purge_of_a_node(f: &Fixture) {
    let (a, b) = ("each:a", "each:b");
    (f.watch)(a).await;
    (f.watch)(b).await;
    let entries: Vec<(String, Member)> = (0..30)
        .map(|i| {
            let ch = if i % 2 == 0 { a } else { b };
            (ch.to_owned(), member(&format!("c{i}"), Some("u")))
        })
        .collect();
    f.store.add_many(&entries).await.expect("add_many");
    assert_eq!(f.announcements(30).await.len(), 30, "a join each");
    let gone: Vec<(String, String)> = entries[..4]
        .iter()
        .map(|(ch, m)| (ch.clone(), m.conn_id.clone()))
        .collect();
    f.store.remove_many(&gone).await.expect("remove_many");
    assert_eq!(f.announcements(4).await.len(), 4, "a leave each");
    assert_eq!(f.stats(a).await, (13, 1));
    assert_eq!(f.stats(b).await, (13, 1));
    assert_eq!(f.store.purge_node("another-node").await.expect("purge"), 0);
    assert_eq!(
        f.stats(a).await,
        (13, 1),
        "another node's purge leaves ours"
    );
    assert_eq!(
        f.store.purge_node(&f.node_id).await.expect("purge"),
        26,
        "every entry the node wrote"
    );
    assert_eq!(f.stats(a).await, (0, 0));
    assert_eq!(f.stats(b).await, (0, 0));
    let heard = f.announcements(26).await;
    assert_eq!(heard.len(), 26);
    assert!(heard.iter().all(|h| h.starts_with("leave ")), "{heard:?}");
    assert_eq!(f.store.purge_node(&f.node_id).await.expect("purge"), 0);
}
