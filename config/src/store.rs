//! The `store` section: the Valkey (or Redis) instance the replicas of one fleet share their suppressions
//! (and, as they come, connection leases, rates and counters) through. Each replica keeps its own spool: a
//! queued message never lives in the store.

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::file::{ConfigError, invalid};

/// The fleet's shared state. Absent: every relay keeps its state on its own volume (one replica, a
/// sidecar, a relay run by hand).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// `redis://[user[:password]@]host:port[/db]`, or `rediss://` for TLS. The password may be here, or in
    /// `password_file` to keep it out of the config. With `cluster`, one node of the cluster; with
    /// `sentinel_master`, one Sentinel (its scheme, credentials and database are the primary's too).
    pub url: String,
    /// More nodes as `host:port`, reached with the scheme and credentials of `url`: with `cluster`, other
    /// nodes to discover the cluster from (any one that answers is enough); with `sentinel_master`, the
    /// other Sentinels. Nothing else takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// `url` and `nodes` are nodes of a Valkey (or Redis) Cluster: the relay follows its slots, and each
    /// destination's keys land on the shard of their hash tag. A cluster has only database 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// `url` and `nodes` are Sentinels, and this is the name of the primary they watch: the relay asks
    /// them where the primary is, and asks again when it stops taking writes (a fail-over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_master: Option<String>,
    /// Prepended to every key, so that several fleets (or other applications) can share one instance.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// File holding the password (e.g. a mounted Secret); wins over a password in `url`. Read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// For a `rediss://` URL: the CA certificates its server certificate must chain to, besides the
    /// system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<StoreTls>,
    /// Refuse to start while the store cannot be reached. Otherwise the relay starts on its local state,
    /// says so in its log and `herald_store_up`, and joins the fleet once the store answers.
    #[serde(default)]
    pub required: bool,
    /// How many replicas share the store (the operator sets it from the SmtpRelay's replicas): while the
    /// store is unreachable, a relay opens at most `per_domain.max_connections / fleet_size` (at least one)
    /// connections to a destination and sends at most `per_domain.max_message_rate / fleet_size`, its
    /// share of the fleet's limits.
    #[serde(default = "default_fleet_size")]
    pub fleet_size: u32,
    /// How often the relay reads the whole shared suppression list again, besides following the change
    /// feed; it bounds how long a change the feed missed stays unseen.
    #[serde(default = "default_resync_interval", with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub resync_interval: Duration,
}

/// TLS towards the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreTls {
    /// PEM file of CA certificates trusted for the store's certificate.
    pub ca_file: PathBuf,
}

/// The `/N` of a URL's rest (after the scheme), if any.
fn database(rest: &str) -> Option<&str> {
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    host.split_once('/')
        .map(|(_, db)| db)
        .filter(|db| !db.is_empty())
}

/// `host:port` with a port number, `[v6]:port` too.
fn host_port(node: &str) -> bool {
    let Some((host, port)) = node.rsplit_once(':') else {
        return false;
    };
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok().then_some(v6),
        None => (!host.contains(':')).then_some(host),
    };
    host.is_some_and(|h| !h.is_empty() && !h.contains(['/', '@', ' ', '[', ']']))
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn default_key_prefix() -> String {
    "herald:".to_owned()
}

fn default_fleet_size() -> u32 {
    1
}

fn default_resync_interval() -> Duration {
    Duration::from_secs(600)
}

impl Store {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let tls = self.url.starts_with("rediss://");
        let Some(rest) = self
            .url
            .strip_prefix("rediss://")
            .or_else(|| self.url.strip_prefix("redis://"))
        else {
            return Err(invalid("store.url", "must be a redis:// or rediss:// URL"));
        };
        if rest.is_empty() || rest.starts_with('/') {
            return Err(invalid("store.url", "names no host"));
        }
        if self.cluster && self.sentinel_master.is_some() {
            return Err(invalid(
                "store.sentinel_master",
                "a cluster has no Sentinels: set cluster or sentinel_master, not both",
            ));
        }
        if self
            .sentinel_master
            .as_ref()
            .is_some_and(|m| m.is_empty() || m.contains(char::is_whitespace))
        {
            return Err(invalid(
                "store.sentinel_master",
                "must be the primary's name as the Sentinels know it (no spaces)",
            ));
        }
        if self.cluster && database(rest).is_some_and(|db| db.parse::<u32>() != Ok(0)) {
            return Err(invalid(
                "store.url",
                "a cluster has only database 0 (drop the /N)",
            ));
        }
        if !self.nodes.is_empty() && !self.cluster && self.sentinel_master.is_none() {
            return Err(invalid(
                "store.nodes",
                "are for cluster or sentinel_master; a single instance is url alone",
            ));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if !host_port(node) {
                return Err(invalid(
                    format!("store.nodes[{i}]"),
                    "must be host:port (the scheme and credentials are url's)",
                ));
            }
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(invalid(
                "store.key_prefix",
                "must be a non-empty string without spaces (e.g. \"herald:\")",
            ));
        }
        if self
            .password_file
            .as_ref()
            .is_some_and(|f| f.as_os_str().is_empty())
        {
            return Err(invalid("store.password_file", "must not be empty"));
        }
        if self.tls.is_some() && !tls {
            return Err(invalid(
                "store.tls",
                "needs a rediss:// url (redis:// is plain text)",
            ));
        }
        if self.fleet_size == 0 {
            return Err(invalid("store.fleet_size", "must be at least 1"));
        }
        if self.resync_interval < Duration::from_secs(1) {
            return Err(invalid("store.resync_interval", "must be at least 1s"));
        }
        Ok(())
    }
}
