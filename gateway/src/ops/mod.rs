//! Operating a node: the admin listener (probes, metrics, admin API, Centrifugo's server
//! API) and, with the `kube` feature, drain on a pod annotation and the janitor's Lease.

pub mod admin;
pub mod api;
#[cfg(feature = "kube")]
pub mod kube;
