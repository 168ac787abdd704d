//! The conformance suite every [`Records`] implementation must pass.
//!
//! Call [`run_all`] from an integration test with a factory that builds a fresh backend
//! (its own state: for Redis, its own key prefix) together with the local registry it
//! delivers into. The suite drives the trait as [`super::Directory`] does: `register`, then
//! the local insert; the local remove, then `unregister`. So [`LocalRecords`](super::LocalRecords)
//! and [`RedisRecords`](super::RedisRecords) are held to the same contract.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{now_ms, ConnInfo, Directory, Emulation, LocalConns, Post, Records, SECRET_LEN};
use crate::conn::outbound::Outbound;
use crate::error::CloseReason;

/// A backend under test and the registry it delivers into.
pub struct Fixture {
    /// The node's id, as listed in [`ConnInfo::node_id`].
    pub node_id: String,
    pub records: Arc<dyn Records>,
    pub local: Arc<LocalConns>,
    /// The directory over both.
    pub dir: Arc<Directory>,
}

impl Fixture {
    /// The backend and registry of a started directory.
    pub fn of(dir: Arc<Directory>, node_id: &str) -> Fixture {
        Fixture {
            node_id: node_id.to_owned(),
            records: dir.records().clone(),
            local: dir.local().clone(),
            dir,
        }
    }

    /// Registers and, if accepted, holds a connection, as [`Directory::add`] does; `None`
    /// when the backend refused it (the per-user cap).
    async fn open(&self, conn: &str, user: Option<&str>, max: usize) -> Option<Arc<Outbound>> {
        let at = now_ms();
        let accepted = self
            .records
            .register(conn, user, at, max, None)
            .await
            .expect("register");
        if !accepted {
            return None;
        }
        let out = Arc::new(Outbound::new(1 << 20, &crate::conn::event::DebugCodec));
        self.local.insert(conn, 0, user, out.clone(), at, None);
        Some(out)
    }

    async fn open_ok(&self, conn: &str, user: Option<&str>) -> Arc<Outbound> {
        self.open(conn, user, 0)
            .await
            .unwrap_or_else(|| panic!("{conn} refused without a cap"))
    }

    /// Forgets a connection, as [`Directory::remove`] does.
    async fn close(&self, conn: &str) {
        let user = self.local.remove(conn).and_then(|l| l.user);
        self.records
            .unregister(conn, user.as_deref())
            .await
            .expect("unregister");
    }

    async fn list(&self, user: &str) -> Vec<String> {
        let infos = self.records.user_connections(user).await.expect("list");
        infos.into_iter().map(|i| i.conn_id).collect()
    }
}

/// A direct message as the suite's connections (with `DebugCodec`) receive it.
fn direct(data: &str) -> Bytes {
    use crate::conn::event::Codec;
    crate::conn::event::DebugCodec.encode(&crate::conn::event::Event::Direct { data })
}

/// Frames queued so far (taken: a second call returns only newer ones).
fn frames(out: &Outbound) -> Vec<Bytes> {
    let mut got = VecDeque::new();
    out.take(&mut got);
    got.into()
}

/// Waits (up to 5 s) for a first frame; delivery through Redis is asynchronous.
async fn wait_frames(out: &Outbound) -> Vec<Bytes> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = frames(out);
        if !got.is_empty() || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Long enough for a frame that should not arrive to show up.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Runs every case against backends made by `make`. Panics on the first failure.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    register_list_unregister(&make().await).await;
    per_user_cap_is_enforced_and_anonymous_exempt(&make().await).await;
    unicast_to_a_user_reaches_exactly_its_connections(&make().await).await;
    unicast_to_a_connection(&make().await).await;
    disconnect_closes_one_connection(&make().await).await;
    unregistering_an_unknown_connection_is_a_no_op(&make().await).await;
    posts_reach_a_streaming_connection_only_with_its_secret(&make().await).await;
}

async fn register_list_unregister(f: &Fixture) {
    let before = now_ms();
    f.open_ok("c1", Some("alice")).await;
    f.open_ok("c2", Some("alice")).await;
    f.open_ok("c3", Some("bob")).await;
    f.open_ok("c4", None).await;
    let infos = f.records.user_connections("alice").await.expect("list");
    assert_eq!(
        infos.iter().map(|i| i.conn_id.as_str()).collect::<Vec<_>>(),
        ["c1", "c2"],
        "alice's connections, sorted"
    );
    for ConnInfo {
        node_id,
        connected_ms,
        ..
    } in &infos
    {
        assert_eq!(node_id, &f.node_id);
        assert!(
            (before..=now_ms()).contains(connected_ms),
            "connected_ms {connected_ms} is not the registration time"
        );
    }
    assert_eq!(f.list("bob").await, ["c3"]);
    assert!(f.list("nobody").await.is_empty());

    f.close("c1").await;
    assert_eq!(f.list("alice").await, ["c2"]);
    f.close("c2").await;
    assert!(f.list("alice").await.is_empty(), "all of alice's are gone");
    assert_eq!(f.list("bob").await, ["c3"], "bob's stay");
}

async fn per_user_cap_is_enforced_and_anonymous_exempt(f: &Fixture) {
    assert!(f.open("a1", Some("alice"), 2).await.is_some());
    assert!(f.open("a2", Some("alice"), 2).await.is_some());
    assert!(
        f.open("a3", Some("alice"), 2).await.is_none(),
        "a third connection passed a cap of 2"
    );
    assert_eq!(
        f.list("alice").await,
        ["a1", "a2"],
        "a refused one is not recorded"
    );
    assert!(
        f.open("b1", Some("bob"), 2).await.is_some(),
        "the cap is per user"
    );
    for i in 0..3 {
        assert!(
            f.open(&format!("anon{i}"), None, 2).await.is_some(),
            "anonymous connection {i} was capped"
        );
    }
    f.close("a1").await;
    assert!(
        f.open("a3", Some("alice"), 2).await.is_some(),
        "closing one frees a slot"
    );
    assert!(f.open("a4", Some("alice"), 0).await.is_some(), "0: no cap");
    assert_eq!(f.list("alice").await, ["a2", "a3", "a4"]);
}

async fn unicast_to_a_user_reaches_exactly_its_connections(f: &Fixture) {
    let a1 = f.open_ok("a1", Some("alice")).await;
    let a2 = f.open_ok("a2", Some("alice")).await;
    let b1 = f.open_ok("b1", Some("bob")).await;
    let x = f.open_ok("x", None).await;
    let data = r#"{"n":1,"s":"é \"q\""}"#;
    assert_eq!(f.records.send_user("alice", data).await.expect("send"), 2);
    assert_eq!(wait_frames(&a1).await, [direct(data)]);
    assert_eq!(wait_frames(&a2).await, [direct(data)]);
    settle().await;
    assert!(
        frames(&a1).is_empty() && frames(&a2).is_empty(),
        "delivered twice"
    );
    assert!(frames(&b1).is_empty(), "another user got alice's unicast");
    assert!(
        frames(&x).is_empty(),
        "an anonymous connection got alice's unicast"
    );

    assert_eq!(f.records.send_user("nobody", "1").await.expect("send"), 0);
    f.close("a1").await;
    assert_eq!(f.records.send_user("alice", "2").await.expect("send"), 1);
    assert_eq!(wait_frames(&a2).await, [direct("2")]);
    settle().await;
    assert!(
        frames(&a1).is_empty(),
        "a closed connection still got a unicast"
    );
}

async fn unicast_to_a_connection(f: &Fixture) {
    let a1 = f.open_ok("a1", Some("alice")).await;
    let a2 = f.open_ok("a2", Some("alice")).await;
    let x = f.open_ok("x", None).await;
    assert_eq!(f.records.send_conn("a2", "[1]").await.expect("send"), 1);
    assert_eq!(wait_frames(&a2).await, [direct("[1]")]);
    assert_eq!(f.records.send_conn("x", "true").await.expect("send"), 1);
    assert_eq!(wait_frames(&x).await, [direct("true")]);
    settle().await;
    assert!(frames(&a1).is_empty(), "a1 got a unicast to a2");
    assert!(
        frames(&a2).is_empty() && frames(&x).is_empty(),
        "delivered twice"
    );
    assert_eq!(f.records.send_conn("missing", "1").await.expect("send"), 0);
}

async fn disconnect_closes_one_connection(f: &Fixture) {
    let a1 = f.open_ok("a1", Some("alice")).await;
    let a2 = f.open_ok("a2", Some("alice")).await;
    assert!(f.records.disconnect("a1").await.expect("disconnect"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !a1.is_closing() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a1.close_reason(), Some(CloseReason::Disconnected));
    settle().await;
    assert!(!a2.is_closing(), "the other connection was closed too");
    assert!(!f.records.disconnect("missing").await.expect("disconnect"));
}

async fn unregistering_an_unknown_connection_is_a_no_op(f: &Fixture) {
    let a1 = f.open_ok("a1", Some("alice")).await;
    f.records
        .unregister("ghost", Some("alice"))
        .await
        .expect("unregister of an unknown connection");
    f.records
        .unregister("ghost", None)
        .await
        .expect("unregister of an unknown anonymous connection");
    assert_eq!(f.list("alice").await, ["a1"]);
    assert_eq!(f.records.send_user("alice", "7").await.expect("send"), 1);
    assert_eq!(wait_frames(&a1).await, [direct("7")]);
}

async fn posts_reach_a_streaming_connection_only_with_its_secret(f: &Fixture) {
    let secret = "0123456789abcdef0123456789abcdef";
    assert_eq!(secret.len(), SECRET_LEN);
    let (inbox, mut posted) = tokio::sync::mpsc::channel(2);
    let out = Arc::new(Outbound::new(1 << 20, &crate::conn::event::DebugCodec));
    let emulation = Emulation {
        secret: secret.into(),
        inbox,
    };
    f.dir
        .add(&"s1".into(), 1, Some("alice"), out, Some(emulation))
        .await
        .expect("add");
    let ws = Arc::new(Outbound::new(1 << 20, &crate::conn::event::DebugCodec));
    f.dir
        .add(&"w1".into(), 2, Some("alice"), ws, None)
        .await
        .expect("add");
    let post = |session: String, data: &str| {
        let data = data.to_owned();
        async move { f.dir.post(&session, data).await.expect("post") }
    };
    assert_eq!(post(format!("{secret}s1"), "one").await, Post::Local);
    assert_eq!(posted.try_recv().ok().as_deref(), Some("one"));
    let wrong = format!("{}s1", "f".repeat(SECRET_LEN));
    assert_eq!(post(wrong, "two").await, Post::Unknown, "a wrong secret");
    assert_eq!(post("s1".into(), "two").await, Post::Unknown, "no secret");
    assert_eq!(
        post(format!("{secret}w1"), "two").await,
        Post::Unknown,
        "a WebSocket"
    );
    assert_eq!(
        post(format!("{secret}gone"), "two").await,
        Post::Unknown,
        "no such conn"
    );
    assert!(posted.try_recv().is_err(), "a refused post was delivered");
    assert_eq!(post(format!("{secret}s1"), "a").await, Post::Local);
    assert_eq!(post(format!("{secret}s1"), "b").await, Post::Local);
    assert_eq!(
        post(format!("{secret}s1"), "c").await,
        Post::Full,
        "the inbox holds 2"
    );
    f.dir.remove("s1").await;
    assert_eq!(
        post(format!("{secret}s1"), "d").await,
        Post::Unknown,
        "closed"
    );
}
