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
    /// `password_file` to keep it out of the config.
    pub url: String,
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
