//! Kubernetes awareness against a mocked API server. No Kubernetes API server can run on
//! this machine, so `tower_test::mock::pair` stands in for it: each test scripts the API's
//! answers and checks the requests the gateway makes (the same HTTP a real API server sees).
#![cfg(feature = "kube")]
// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway::test_util::Maintenance;
use gateway::test_util::{watch_drain, LeaseElector, DRAIN_ANNOTATION};
use http_body_util::BodyExt;
use hyper::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::client::Body;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower_test::mock::{Handle, SendResponse};

type Mock = Handle<Request<Body>, Response<Body>>;

fn mock() -> (kube::Client, Mock) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "gw"), handle)
}

async fn next(handle: &mut Mock) -> (Request<Body>, SendResponse<Response<Body>>) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request in time")
        .expect("a request")
}

fn reply(send: SendResponse<Response<Body>>, status: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn pod(annotations: Value) -> Value {
    json!({"apiVersion":"v1","kind":"Pod","metadata":{
        "name":"gw-0","namespace":"gw","resourceVersion":"5","annotations":annotations}})
}

/// A watch answer: these events, then the end of the stream (the node reads the pod again
/// and starts a new watch).
fn events(send: SendResponse<Response<Body>>, events: &[Value]) {
    let body = events.iter().map(|e| format!("{e}\n")).collect::<String>();
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(body.into_bytes()))
            .unwrap(),
    );
}

fn modified(annotations: Value) -> Value {
    json!({"type":"MODIFIED","object":pod(annotations)})
}

async fn within(what: &str, f: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("{what} in time"));
}

#[tokio::test]
async fn drain_annotation_on_the_watched_pod_starts_a_drain() {
    let (client, mut api) = mock();
    let drain = Maintenance::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch_drain(
        Api::<Pod>::namespaced(client, "gw"),
        "gw-0".into(),
        drain.clone(),
        stop.clone(),
    ));
    // the node reads its pod first: no annotation yet
    let (req, send) = next(&mut api).await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/api/v1/namespaces/gw/pods/gw-0");
    reply(send, 200, &pod(json!({"team":"x"})));
    // then watches it from that version, by name
    let (req, send) = next(&mut api).await;
    let query = req.uri().query().unwrap_or_default().to_owned();
    assert_eq!(req.uri().path(), "/api/v1/namespaces/gw/pods");
    assert!(query.contains("watch=true"), "{query}");
    assert!(query.contains("resourceVersion=5"), "{query}");
    assert!(
        query.contains("fieldSelector=metadata.name%3Dgw-0"),
        "{query}"
    );
    assert!(!drain.is_on());
    events(
        send,
        &[
            modified(json!({"team":"y"})),
            modified(json!({DRAIN_ANNOTATION:"true"})),
        ],
    );
    within("drain requested", drain.wait(true)).await;
    // the watch keeps running after the drain started: it may be ended later
    let (req, _send) = next(&mut api).await;
    assert_eq!(req.uri().path(), "/api/v1/namespaces/gw/pods/gw-0");
    assert!(!task.is_finished());
    stop.cancel();
    within("watch stopped", async { task.await.unwrap() }).await;
}

#[tokio::test]
async fn an_annotation_already_present_drains_at_once() {
    let (client, mut api) = mock();
    let drain = Maintenance::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch_drain(
        Api::<Pod>::namespaced(client, "gw"),
        "gw-0".into(),
        drain.clone(),
        stop.clone(),
    ));
    let (_, send) = next(&mut api).await;
    reply(send, 200, &pod(json!({DRAIN_ANNOTATION:"true"})));
    within("drain requested", drain.wait(true)).await;
    stop.cancel();
    within("watch stopped", async { task.await.unwrap() }).await;
}

#[tokio::test]
async fn removing_the_annotation_ends_the_drain() {
    let (client, mut api) = mock();
    let drain = Maintenance::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch_drain(
        Api::<Pod>::namespaced(client, "gw"),
        "gw-0".into(),
        drain.clone(),
        stop.clone(),
    ));
    // Each watch answer ends its stream, so the node reads the pod again before the next
    // watch: when a request arrives, the previous answer has been acted on.
    let (_, send) = next(&mut api).await;
    reply(send, 200, &pod(json!({})));
    let (_, send) = next(&mut api).await;
    assert!(!drain.is_on());
    events(send, &[modified(json!({DRAIN_ANNOTATION:"true"}))]);

    // removed while watching: `kubectl annotate pod gw-0 gateway.example.io/drain-`
    let (_, send) = next(&mut api).await;
    assert!(drain.is_on(), "annotation set through the watch");
    reply(send, 200, &pod(json!({DRAIN_ANNOTATION:"true"})));
    let (_, send) = next(&mut api).await;
    assert!(drain.is_on());
    events(send, &[modified(json!({"team":"x"}))]);

    // set, then removed while the watch was down: the read at the restart sees it gone
    let (_, send) = next(&mut api).await;
    assert!(!drain.is_on(), "annotation removed through the watch");
    reply(send, 200, &pod(json!({DRAIN_ANNOTATION:"true"})));
    let (_, send) = next(&mut api).await;
    assert!(drain.is_on(), "annotation found by the read");
    events(send, &[]);
    let (_, send) = next(&mut api).await;
    reply(send, 200, &pod(json!({DRAIN_ANNOTATION:"false"})));

    // a drain started by hand is left alone by a pod that never carried the annotation
    let (_, send) = next(&mut api).await;
    assert!(
        !drain.is_on(),
        "annotation removed while the watch was down"
    );
    drain.start();
    events(send, &[modified(json!({"team":"y"}))]);
    let (_, send) = next(&mut api).await;
    assert!(drain.is_on(), "a drain by hand stays on");
    reply(send, 200, &pod(json!({"team":"y"})));
    let (_, _send) = next(&mut api).await;
    assert!(drain.is_on());
    stop.cancel();
    within("watch stopped", async { task.await.unwrap() }).await;
}

fn lease(holder: &str, renewed_secs_ago: i64) -> Value {
    let renew = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(
            renewed_secs_ago,
        ))
        .unwrap();
    json!({"apiVersion":"coordination.k8s.io/v1","kind":"Lease",
        "metadata":{"name":"gateway-janitor","namespace":"gw","resourceVersion":"7"},
        "spec":{"holderIdentity":holder,"leaseDurationSeconds":10,
                "renewTime":renew.to_string(),"leaseTransitions":2}})
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn elector(client: kube::Client, me: &str) -> LeaseElector {
    LeaseElector::new(
        Api::<Lease>::namespaced(client, "gw"),
        "gateway-janitor",
        me,
        Duration::from_secs(10),
    )
}

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/gw/leases/gateway-janitor";

#[tokio::test]
async fn lease_election_acquire_hold_and_failover() {
    let (client, mut api) = mock();
    let a = elector(client.clone(), "node-a");
    let b = elector(client, "node-b");

    // no lease yet: node-a creates it and leads
    let (acquired, ()) = tokio::join!(a.try_acquire(), async {
        let (req, send) = next(&mut api).await;
        assert_eq!((req.method(), req.uri().path()), (&Method::GET, LEASE_PATH));
        reply(
            send,
            404,
            &json!({"kind":"Status","apiVersion":"v1","status":"Failure",
            "message":"not found","reason":"NotFound","code":404}),
        );
        let (req, send) = next(&mut api).await;
        assert_eq!(req.method(), Method::POST);
        let created = body_json(req).await;
        assert_eq!(created["spec"]["holderIdentity"], "node-a");
        reply(send, 201, &created);
    });
    assert!(acquired.unwrap());

    // node-b sees a fresh lease held by node-a: it does not lead, and writes nothing
    let (acquired, ()) = tokio::join!(b.try_acquire(), async {
        let (_, send) = next(&mut api).await;
        reply(send, 200, &lease("node-a", 1));
    });
    assert!(!acquired.unwrap());

    // node-a renews its own lease
    let (acquired, ()) = tokio::join!(a.try_acquire(), async {
        let (_, send) = next(&mut api).await;
        reply(send, 200, &lease("node-a", 1));
        let (req, send) = next(&mut api).await;
        assert_eq!((req.method(), req.uri().path()), (&Method::PUT, LEASE_PATH));
        let renewed = body_json(req).await;
        assert_eq!(renewed["spec"]["holderIdentity"], "node-a");
        assert_eq!(renewed["spec"]["leaseTransitions"], 2);
        reply(send, 200, &renewed);
    });
    assert!(acquired.unwrap());

    // node-a dies: its lease goes stale, and node-b takes over with a compare-and-swap
    let (acquired, ()) = tokio::join!(b.try_acquire(), async {
        let (_, send) = next(&mut api).await;
        reply(send, 200, &lease("node-a", 30));
        let (req, send) = next(&mut api).await;
        assert_eq!(req.method(), Method::PUT);
        let taken = body_json(req).await;
        assert_eq!(taken["spec"]["holderIdentity"], "node-b");
        assert_eq!(taken["spec"]["leaseTransitions"], 3);
        assert_eq!(taken["metadata"]["resourceVersion"], "7");
        reply(send, 200, &taken);
    });
    assert!(acquired.unwrap());

    // two nodes racing for a stale lease: the loser gets 409 and does not lead
    let (acquired, ()) = tokio::join!(a.try_acquire(), async {
        let (_, send) = next(&mut api).await;
        reply(send, 200, &lease("node-c", 30));
        let (_, send) = next(&mut api).await;
        reply(
            send,
            409,
            &json!({"kind":"Status","apiVersion":"v1","status":"Failure",
            "message":"conflict","reason":"Conflict","code":409}),
        );
    });
    assert!(!acquired.unwrap());
}
