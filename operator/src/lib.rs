//! herald-operator: reconciles SendingDomain, SmtpRelay and IpPool into relay workloads and DNS record
//! instructions.
//!
//! # Layout
//! - `controller`: the reconcilers, their shared context and backoff, and the run loop.
//! - `crd`: the custom resource types (the CRD schema is generated from them).
//! - `crds`: the generated CRD documents, as `kubectl apply` takes them.
//! - `dkim`: DKIM key generation and the DKIM record value.
//! - `inbound`: the relay's inbound listener and Service, and whether bounces can reach them.
//! - `layout`: the names and paths the relay's objects and its config agree on (mounts, Secret keys).
//! - `objects`: the Secrets, StatefulSet, Services, PDB and ServiceMonitor of an SmtpRelay.
//! - `network`: the NetworkPolicy of an SmtpRelay, one ingress rule per port from the peers it names.
//! - `records`: the DNS records a SendingDomain needs.
//! - `render`: an SmtpRelay and its domains and pools to the relay's config file.
//! - `verify`: DNS checks of the records, naming the nameserver.
//! - `metrics`: the operator's own metrics.

#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod controller;
pub mod crd;
pub mod crds;
pub mod dkim;
#[cfg(test)]
mod fixtures;
pub mod inbound;
pub mod layout;
pub mod metrics;
pub mod network;
pub mod objects;
pub mod records;
pub mod render;
pub mod verify;
