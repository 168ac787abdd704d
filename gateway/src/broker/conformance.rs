//! The conformance suite every [`Broker`] implementation must pass.
//!
//! Call [`run_all`] from an integration test with a factory that builds a fresh broker around
//! the given sink. The suite only uses the public trait, so the in-memory and the Redis broker
//! are held to exactly the same contract.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Broker, Envelope, Retention, Since, Sink};
use crate::config::ChannelOptions;

/// Messages a test sink received, in order.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

impl Recorder {
    pub fn sink(&self) -> Sink {
        let inner = self.0.clone();
        Arc::new(move |c: &str, d: &str| {
            inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((c.to_owned(), d.to_owned()))
        })
    }

    pub fn messages(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (up to 5 s) until at least `n` messages arrived, then returns all of them.
    pub async fn wait_for(&self, n: usize) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.messages().len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.messages()
    }

    /// Waits long enough for a message that should not arrive to show up, then returns all.
    pub async fn settle(&self) -> Vec<(String, String)> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.messages()
    }
}

fn pair(c: &str, d: &str) -> (String, String) {
    (c.to_owned(), d.to_owned())
}

/// Runs every case against brokers made by `make`. Panics on the first failure.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    delivers_subscribed_channels_only(&make).await;
    unsubscribe_stops_delivery(&make).await;
    subscribe_is_idempotent(&make).await;
    preserves_order_and_bytes(&make).await;
    delivers_across_nodes(&make).await;
    history_offsets_grow_by_one(&make).await;
    history_is_trimmed_and_read_after(&make).await;
    history_is_idempotent(&make).await;
    history_is_shared_by_nodes(&make).await;
    history_expiry_changes_the_epoch(&make).await;
    history_remove_keeps_the_position(&make).await;
    idempotency_keys_expire_on_a_busy_channel(&make).await;
    reads_keep_a_quiet_channel_s_epoch(&make).await;
}

/// The `[[channels]]` entries the history cases use; a broker that takes its options from
/// configuration (Redis) must be built with them.
pub fn channels() -> Vec<ChannelOptions> {
    [
        "conf:h:*?history_size=5&history_ttl_secs=60",
        "conf:t:*?history_size=5&history_ttl_secs=1",
    ]
    .iter()
    .map(|s| s.parse().expect("valid entry"))
    .collect()
}

const KEEP: Retention = Retention {
    size: 5,
    ttl: Duration::from_secs(60),
};

const BRIEF: Retention = Retention {
    size: 5,
    ttl: Duration::from_secs(1),
};

async fn history_offsets_grow_by_one<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let rec = Recorder::default();
    let b = make(rec.sink()).await;
    b.subscribe("conf:h:a").await.expect("subscribe");
    let mut epoch = None;
    for i in 1..=3u64 {
        let p = b
            .publish_history("conf:h:a", &i.to_string(), KEEP, None)
            .await
            .expect("publish");
        assert_eq!(p.offset, i, "offsets start at 1 and grow by 1");
        assert!(
            epoch.get_or_insert(p.epoch.clone()) == &p.epoch,
            "one epoch"
        );
    }
    let got = rec.wait_for(3).await;
    for (i, (c, payload)) in got.iter().enumerate() {
        let e = Envelope::open(payload);
        assert_eq!(c, "conf:h:a");
        assert_eq!(e.data, (i + 1).to_string());
        assert_eq!(
            e.position,
            Some((i as u64 + 1, epoch.as_deref().unwrap_or_default())),
            "each publication carries its position"
        );
    }
}

async fn history_is_trimmed_and_read_after<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = make(Recorder::default().sink()).await;
    for i in 1..=8 {
        b.publish_history("conf:h:trim", &format!("{i}"), KEEP, None)
            .await
            .expect("publish");
    }
    let h = b
        .history("conf:h:trim", KEEP, Since::Last(100))
        .await
        .expect("read");
    assert_eq!(h.top, 8);
    let offsets: Vec<u64> = h.publications.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        vec![4, 5, 6, 7, 8],
        "trimmed to the last 5, ascending"
    );
    assert_eq!(h.publications[0].1, "4");
    let last2 = b
        .history("conf:h:trim", KEEP, Since::Last(2))
        .await
        .expect("read");
    assert_eq!(
        last2
            .publications
            .iter()
            .map(|(o, _)| *o)
            .collect::<Vec<_>>(),
        vec![7, 8]
    );
    let after = b
        .history("conf:h:trim", KEEP, Since::After(5, 10))
        .await
        .expect("read");
    assert_eq!(
        after
            .publications
            .iter()
            .map(|(o, _)| *o)
            .collect::<Vec<_>>(),
        vec![6, 7, 8]
    );
    let top_only = b
        .history("conf:h:trim", KEEP, Since::After(8, 10))
        .await
        .expect("read");
    assert!(top_only.publications.is_empty());
    assert_eq!((top_only.top, &top_only.epoch), (8, &h.epoch));
}

async fn history_is_idempotent<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let rec = Recorder::default();
    let b = make(rec.sink()).await;
    b.subscribe("conf:h:idem").await.expect("subscribe");
    let first = b
        .publish_history("conf:h:idem", "1", KEEP, Some("k1"))
        .await
        .expect("publish");
    let again = b
        .publish_history("conf:h:idem", "1", KEEP, Some("k1"))
        .await
        .expect("retry");
    assert_eq!(first, again, "a retried key returns the first result");
    let other = b
        .publish_history("conf:h:idem", "2", KEEP, Some("k2"))
        .await
        .expect("publish");
    assert_eq!(other.offset, first.offset + 1);
    rec.wait_for(2).await;
    assert_eq!(rec.settle().await.len(), 2, "the retry published nothing");
}

/// A key is remembered for the TTL, not for as long as the channel stays busy: Redis
/// expires each key on its own, and the memory broker must not keep them all.
async fn idempotency_keys_expire_on_a_busy_channel<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = make(Recorder::default().sink()).await;
    let first = b
        .publish_history("conf:t:keys", "1", BRIEF, Some("k"))
        .await
        .expect("publish");
    // publications without the key keep the channel (and its epoch) alive past the TTL
    let until = tokio::time::Instant::now() + BRIEF.ttl + Duration::from_millis(200);
    let mut last = first.clone();
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await; // the point of the case: time
        last = b
            .publish_history("conf:t:keys", "2", BRIEF, None)
            .await
            .expect("publish");
    }
    assert_eq!(last.epoch, first.epoch, "the channel never went idle");
    let retry = b
        .publish_history("conf:t:keys", "1", BRIEF, Some("k"))
        .await
        .expect("publish");
    assert_eq!(
        (retry.offset, &retry.epoch),
        (last.offset + 1, &first.epoch),
        "a key older than the TTL is forgotten"
    );
}

/// A channel read (as nodes read the channels they have subscribers of, every heartbeat)
/// keeps its epoch and offsets past the TTL without publications; only the publications
/// expire. Nothing was lost, so the position stays valid.
async fn reads_keep_a_quiet_channel_s_epoch<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = make(Recorder::default().sink()).await;
    let first = b
        .publish_history("conf:t:quiet", "1", BRIEF, None)
        .await
        .expect("publish");
    let until = tokio::time::Instant::now() + BRIEF.ttl + Duration::from_millis(500);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await; // the point of the case: time
        let h = b
            .history("conf:t:quiet", BRIEF, Since::After(1, 5))
            .await
            .expect("read");
        assert_eq!((&h.epoch, h.top), (&first.epoch, 1), "the epoch holds");
    }
    let h = b
        .history("conf:t:quiet", BRIEF, Since::Last(5))
        .await
        .expect("read");
    assert!(h.publications.is_empty(), "the publication expired");
    let next = b
        .publish_history("conf:t:quiet", "2", BRIEF, None)
        .await
        .expect("publish");
    assert_eq!(
        (next.offset, &next.epoch),
        (2, &first.epoch),
        "offsets go on"
    );
}

async fn history_is_shared_by_nodes<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let a = make(Recorder::default().sink()).await;
    let b = make(Recorder::default().sink()).await;
    let p = a
        .publish_history("conf:h:shared", "1", KEEP, None)
        .await
        .expect("publish on a");
    let h = b
        .history("conf:h:shared", KEEP, Since::Last(5))
        .await
        .expect("read on b");
    assert_eq!(
        (h.epoch, h.top),
        (p.epoch, p.offset),
        "one history for every node"
    );
    assert_eq!(h.publications, vec![(1, "1".to_owned())]);
}

async fn history_expiry_changes_the_epoch<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = make(Recorder::default().sink()).await;
    let before = b
        .publish_history("conf:t:x", "1", BRIEF, None)
        .await
        .expect("publish");
    let fresh = b
        .history("conf:t:x", BRIEF, Since::Last(5))
        .await
        .expect("read");
    assert_eq!(fresh.epoch, before.epoch, "same epoch before the TTL");
    tokio::time::sleep(Duration::from_millis(2_100)).await; // the point of the case: the TTL
    let after = b
        .history("conf:t:x", BRIEF, Since::Last(5))
        .await
        .expect("read");
    assert_ne!(after.epoch, before.epoch, "expired history is a new epoch");
    assert_eq!(after.top, 0);
    assert!(after.publications.is_empty());
    let next = b
        .publish_history("conf:t:x", "2", BRIEF, None)
        .await
        .expect("publish");
    assert_eq!(
        (next.offset, &next.epoch),
        (1, &after.epoch),
        "offsets restart in the new epoch"
    );
}

async fn history_remove_keeps_the_position<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let a = make(Recorder::default().sink()).await;
    let b = make(Recorder::default().sink()).await;
    let mut last = None;
    for i in 1..=3 {
        last = Some(
            a.publish_history("conf:h:rm", &i.to_string(), KEEP, None)
                .await
                .expect("publish"),
        );
    }
    let last = last.expect("published");
    b.remove_history("conf:h:rm", KEEP)
        .await
        .expect("remove on another node");
    let h = a
        .history("conf:h:rm", KEEP, Since::Last(5))
        .await
        .expect("read");
    assert_eq!(
        (&h.epoch, h.top),
        (&last.epoch, 3),
        "epoch and top offset survive the removal"
    );
    assert!(h.publications.is_empty(), "no publication is left");
    let next = a
        .publish_history("conf:h:rm", "4", KEEP, None)
        .await
        .expect("publish after the removal");
    assert_eq!((next.offset, &next.epoch), (4, &last.epoch));
    let h = b
        .history("conf:h:rm", KEEP, Since::After(3, 5))
        .await
        .expect("read");
    assert_eq!(h.publications, vec![(4, "4".to_owned())]);
    b.remove_history("conf:h:never", KEEP)
        .await
        .expect("removing a history that never was is fine");
}

async fn delivers_subscribed_channels_only<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let rec = Recorder::default();
    let b = make(rec.sink()).await;
    b.subscribe("conf:a").await.expect("subscribe");
    b.publish("conf:b", "1").await.expect("publish b");
    b.publish("conf:a", "2").await.expect("publish a");
    assert_eq!(rec.wait_for(1).await, vec![pair("conf:a", "2")]);
    assert_eq!(
        rec.settle().await,
        vec![pair("conf:a", "2")],
        "channel b leaked"
    );
}

async fn unsubscribe_stops_delivery<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let rec = Recorder::default();
    let b = make(rec.sink()).await;
    b.subscribe("conf:u").await.expect("subscribe");
    b.publish("conf:u", "1").await.expect("publish");
    rec.wait_for(1).await;
    b.unsubscribe("conf:u").await.expect("unsubscribe");
    b.unsubscribe("conf:u")
        .await
        .expect("second unsubscribe is a no-op");
    b.publish("conf:u", "2").await.expect("publish");
    assert_eq!(rec.settle().await, vec![pair("conf:u", "1")]);
}

async fn subscribe_is_idempotent<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let rec = Recorder::default();
    let b = make(rec.sink()).await;
    b.subscribe("conf:i").await.expect("subscribe");
    b.subscribe("conf:i").await.expect("subscribe again");
    b.publish("conf:i", "true").await.expect("publish");
    rec.wait_for(1).await;
    assert_eq!(
        rec.settle().await.len(),
        1,
        "double subscribe must not double deliver"
    );
}

async fn preserves_order_and_bytes<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let rec = Recorder::default();
    let b = make(rec.sink()).await;
    b.subscribe("conf:o").await.expect("subscribe");
    let odd = r#"{"s":"é \"q\" \\ \u0000 😀","n":[1,2.5e3,null]}"#;
    b.publish("conf:o", odd).await.expect("publish");
    for i in 0..200 {
        b.publish("conf:o", &i.to_string()).await.expect("publish");
    }
    let got = rec.wait_for(201).await;
    assert_eq!(got.len(), 201);
    assert_eq!(
        got[0],
        pair("conf:o", odd),
        "data must arrive byte for byte"
    );
    for (i, m) in got[1..].iter().enumerate() {
        assert_eq!(m.1, i.to_string(), "order broken at {i}");
    }
}

/// Two brokers from one factory are two nodes on one backend: a publish on either reaches
/// exactly the nodes subscribed to the channel, the publishing node included.
async fn delivers_across_nodes<F, Fut>(make: &F)
where
    F: Fn(Sink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (ra, rb) = (Recorder::default(), Recorder::default());
    let a = make(ra.sink()).await;
    let b = make(rb.sink()).await;
    b.subscribe("conf:x").await.expect("subscribe b");
    a.publish("conf:x", "1").await.expect("publish on a");
    assert_eq!(rb.wait_for(1).await, vec![pair("conf:x", "1")], "a to b");
    a.subscribe("conf:x").await.expect("subscribe a");
    b.publish("conf:x", "2").await.expect("publish on b");
    assert_eq!(ra.wait_for(1).await, vec![pair("conf:x", "2")], "b to a");
    assert_eq!(rb.wait_for(2).await.len(), 2, "b hears its own publish");
    b.unsubscribe("conf:x").await.expect("unsubscribe b");
    a.publish("conf:x", "3").await.expect("publish on a");
    assert_eq!(ra.wait_for(2).await.len(), 2);
    assert_eq!(
        rb.settle().await,
        vec![pair("conf:x", "1"), pair("conf:x", "2")],
        "b unsubscribed but still received"
    );
}
