//! Kubernetes awareness (cargo feature `kube`, enabled in the container image).
//!
//! - **Drain on demand**: the node watches its own Pod. When an SRE runs
//!   `kubectl annotate pod <pod> gateway.example.io/drain=true`, the node drains as on
//!   SIGTERM (readiness fails, connections close gradually with 1012) but stays alive, so the
//!   pod can be emptied before maintenance. Removing the annotation
//!   (`kubectl annotate pod <pod> gateway.example.io/drain-`) ends the drain, as
//!   `DELETE /v1/drain` does.
//! - **Janitor election**: the janitor that purges dead nodes' routes runs on exactly one
//!   node, the holder of a `coordination.k8s.io` Lease. Outside Kubernetes (or without this
//!   feature) a Redis lock does the same job.
//!
//! RBAC: `get`/`watch` on its own pod, and `get`/`create`/`update` on leases in its
//! namespace (the Helm chart's Role).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use tokio_util::sync::CancellationToken;

use crate::cluster::directory::{BoxFuture, Elector};
use crate::ops::admin::Maintenance;

/// The annotation that drains a pod.
pub const DRAIN_ANNOTATION: &str = "gateway.example.io/drain";

fn annotated(p: &Pod) -> bool {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRAIN_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// Watches `pod` and follows its drain annotation: when it appears, starts a drain on
/// `drain`; when it goes away again, ends the drain (whoever started it). Only changes of
/// the annotation act, so a pod that never carried it leaves a drain started through the
/// admin API alone. Reads the pod first (the annotation may already be there, or may have
/// gone while the watch was down), then follows changes; on errors it waits a few seconds
/// and starts over. Returns when `stop` is cancelled.
pub async fn watch_drain(api: Api<Pod>, pod: String, drain: Maintenance, stop: CancellationToken) {
    let retry = Duration::from_secs(5);
    let mut seen = false;
    let mut follow = |p: &Pod, how: &str| {
        let now = annotated(p);
        if now && !seen {
            tracing::info!(pod, how, "drain annotation set: draining this node");
            drain.start();
        } else if !now && seen {
            tracing::info!(pod, how, "drain annotation removed: ending the drain");
            drain.end();
        }
        seen = now;
    };
    loop {
        let got = tokio::select! {
            r = api.get(&pod) => r,
            _ = stop.cancelled() => return,
        };
        let version = match got {
            Ok(p) => {
                follow(&p, "read");
                p.metadata.resource_version.unwrap_or_else(|| "0".into())
            }
            Err(e) => {
                tracing::warn!(pod, error = %e, "cannot read own pod; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let params = WatchParams::default()
            .fields(&format!("metadata.name={pod}"))
            .timeout(290);
        let watched = tokio::select! {
            r = api.watch(&params, &version) => r,
            _ = stop.cancelled() => return,
        };
        let stream = match watched {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pod, error = %e, "cannot watch own pod; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = tokio::select! {
                e = stream.next() => e,
                _ = stop.cancelled() => return,
            };
            match event {
                Some(Ok(WatchEvent::Added(p) | WatchEvent::Modified(p))) => follow(&p, "watch"),
                Some(Ok(WatchEvent::Error(e))) => {
                    tracing::debug!(pod, error = %e.message, "pod watch ended");
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(pod, error = %e, "pod watch failed");
                    break;
                }
                None => break,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Leader election through a Lease: the holder renews it every janitor pass; another node
/// takes it over once it has not been renewed for `duration`.
pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    holder: String,
    duration: Duration,
}

impl LeaseElector {
    pub fn new(api: Api<Lease>, name: &str, holder: &str, duration: Duration) -> Self {
        LeaseElector {
            api,
            name: name.to_owned(),
            holder: holder.to_owned(),
            duration,
        }
    }

    /// Takes or renews the lease. `Ok(true)` when this node holds it now.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.duration.as_secs().clamp(1, i32::MAX as u64) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(self.holder.as_str());
        let held_for_ms = i64::from(spec.lease_duration_seconds.unwrap_or(secs)) * 1000;
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0.as_millisecond() + held_for_ms < now.as_millisecond());
        if !mine && !expired {
            return Ok(false);
        }
        if !mine {
            tracing::info!(lease = %self.name, previous = ?spec.holder_identity, "taking over the janitor lease");
            spec.holder_identity = Some(self.holder.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        // The resourceVersion we read makes this a compare-and-swap: of two nodes taking
        // over at once, one gets 409 Conflict.
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }
}

fn conflict_is_false(r: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

impl Elector for LeaseElector {
    fn acquire(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            match self.try_acquire().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(error = %e, "janitor lease unavailable");
                    false
                }
            }
        })
    }
}

/// In a pod (the service account's namespace file exists): watches the pod for the drain
/// annotation and elects the janitor through a Lease. Does nothing elsewhere.
pub async fn start(node: &Arc<crate::node::Node>, stop: &CancellationToken) {
    let ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
    let namespace = std::env::var("GATEWAY_POD_NAMESPACE")
        .ok()
        .or_else(|| std::fs::read_to_string(ns_file).ok())
        .map(|s| s.trim().to_owned());
    let Some(namespace) = namespace.filter(|n| !n.is_empty()) else {
        return;
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes API access; drain annotation and lease disabled");
            return;
        }
    };
    let pod = std::env::var("GATEWAY_POD_NAME").unwrap_or_else(|_| node.config.node_id.clone());
    tokio::spawn(watch_drain(
        Api::namespaced(client.clone(), &namespace),
        pod,
        node.maintenance.clone(),
        stop.clone(),
    ));
    node.directory.set_elector(Arc::new(LeaseElector::new(
        Api::namespaced(client, &namespace),
        "gateway-janitor",
        &node.config.node_id,
        Duration::from_millis(node.config.node_ttl_ms),
    )));
    tracing::info!(
        namespace,
        "Kubernetes awareness on: drain annotation and janitor lease"
    );
}
