//! Operating a node: the admin listener (probes, metrics, admin API) and, with the `kube`
//! feature, drain on a pod annotation and the janitor's Lease.

pub mod admin;
#[cfg(feature = "kube")]
pub mod kube;
