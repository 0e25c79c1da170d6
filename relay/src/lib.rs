//! herald-relay: Herald's mail transfer agent.
//!
//! Follow the mail: a client connects to a listener (`server`), speaks SMTP to a session (the `herald-smtp`
//! crate), which asks who may send what (`policy`); the accepted message is completed (`cleanup`) and
//! written durably (`spool`) before the client hears 250, and waits in the `queue` for delivery.
//! `exporter` serves metrics and probes, `admin` the queue and suppression API; `app` wires these together. The config file is defined once, in
//! the `herald-config` crate.
//!
//! # Layout
//! - the config file is the `herald-config` crate (shared with the operator).
//! - the SMTP protocol, a state machine without I/O, is the `herald-smtp` crate.
//! - `server`: listeners, TLS, connection limits, the loop that drives sessions.
//! - `policy`: AUTH principals, allowed sender domains, local domains; the MAIL and RCPT verdicts.
//! - `cleanup`: `Received:`, `Message-ID:`, `Date:`, From: checks.
//! - `spool`: durable storage with group commit.
//! - `queue`: messages waiting for delivery.
//! - `deliver`: MX resolution and the SMTP client.
//! - `shaping`: limits per mailbox provider and source address, and back-off when a provider pushes back.
//! - `dkim`: DKIM signing at acceptance.
//! - `outcome`: bounce classification, DSNs, suppression.
//! - `fleet`: what the replicas of a fleet share through Valkey (the suppression list).
//! - `metrics`: the Prometheus metrics.
//! - `events`: delivery events to a file and a signed webhook.
//! - `telemetry`: one relay's metrics and event sink, handed to every stage.
//! - `logging`: the JSON log line format.
//! - `exporter`: `/metrics` and the Kubernetes probes.
//! - `admin`: the queue and suppression API (bearer token), and its client, `herald-relay admin`.
//! - `resources`: the container's memory limit and the budgets sized from it.
//! - `app`: startup, signals, drain.

#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod admin;
pub mod app;
pub mod cleanup;
pub mod deliver;
pub mod dkim;
pub mod events;
pub mod exporter;
pub mod fleet;
pub mod logging;
pub mod metrics;
pub mod outcome;
pub mod policy;
pub mod queue;
pub mod resources;
pub mod server;
pub mod shaping;
pub mod spool;
pub mod telemetry;
