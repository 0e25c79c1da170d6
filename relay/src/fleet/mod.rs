//! The fleet's shared state: the Valkey (or Redis) instance the config's `store` names, through which the
//! replicas of one SmtpRelay share what must be shared. Each replica keeps its spool, its queue and a copy
//! of everything shared on its own volume: the store going away slows nothing and loses nothing, and a store
//! that comes back empty is filled again from the replicas.
//!
//! - `link`: connections to the store, their timing and failure metrics, and key names.
//! - `outbox`: this replica's changes not yet in the store, durable on its volume.
//! - `suppressions`: the suppression list shared by every replica (local copy, change feed, resync).
//! - `leases`: connection leases, so `delivery.per_domain.max_connections` holds for the whole fleet.
//! - `rates`: message rates (GCRA), so `delivery.per_domain.max_message_rate` does too.
//! - `counters`: per-day counts per source address and per sending domain, for warm-up and engagement.
//! - `backoffs`: sources suspended or slowed down for a mailbox provider (traffic shaping's back-off).
//!
//! The key layout, with scope and lifetime, is in docs/fleet.md.

mod backoffs;
mod counters;
mod leases;
mod link;
mod outbox;
mod rates;
mod suppressions;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::outcome::suppression::{FileStore, Suppressions};

pub use backoffs::Backoffs;
pub use counters::{Allowance, Count, Counters, Day};
pub use leases::{LEASE_WAIT, Lease, Leases};
pub use link::{Connection, Link, ScriptConnection};
pub use outbox::Outbox;
pub use rates::{Rates, Turn};
pub use suppressions::SharedStore;

/// Errors of the fleet's shared state.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("store.url: {0}")]
    Url(redis::RedisError),
    #[error("store.{field} {path}: {source}")]
    File {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {url}: {source}")]
    Store {
        url: String,
        source: redis::RedisError,
    },
    #[error("store {url}: {what}")]
    Protocol { url: String, what: String },
    #[error("fleet state in {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Suppressions(#[from] crate::outcome::suppression::SuppressionError),
    #[error("fleet task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Puts `contents` in place of `path`'s, durably and whole or not at all: a new file synced, renamed over
/// the old, the directory synced.
fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The directory of this replica's fleet state on its volume (the remembered epoch and the outbox).
pub fn state_dir(spool_dir: &Path) -> PathBuf {
    spool_dir.join("fleet")
}

/// A relay's part in a fleet: the shared suppression list (its local copy and outbox, and the task that
/// keeps them and the store in step) and the connection leases.
#[derive(Debug)]
pub struct Fleet {
    sync: suppressions::Sync,
    link: Arc<Link>,
    fleet_size: u32,
    /// This process in the store (feed entries, lease members).
    origin: String,
}

impl Fleet {
    /// Opens the local copy and the outbox on the spool volume and the link to the store (no connection
    /// yet); returns the store the suppression list is to be built on. Blocking.
    pub fn open(
        config: &herald_config::Store,
        spool_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<(Fleet, SharedStore), FleetError> {
        let link = Arc::new(Link::new(config, metrics)?);
        let local = Arc::new(FileStore::open(spool_dir)?);
        let dir = state_dir(spool_dir);
        let outbox = Arc::new(Outbox::open(&dir, link.metrics().clone())?);
        let store = SharedStore::new(local.clone(), outbox.clone());
        let origin = format!("{:016x}", rand::random::<u64>());
        let sync = suppressions::Sync::new(
            link.clone(),
            local,
            outbox,
            &dir,
            config.resync_interval,
            origin.clone(),
        );
        Ok((
            Fleet {
                sync,
                link,
                fleet_size: config.fleet_size,
                origin,
            },
            store,
        ))
    }

    /// The connection leases (their upkeep task starts now).
    pub fn leases(&self) -> Arc<Leases> {
        Leases::start(self.link.clone(), self.fleet_size, self.origin.clone())
    }

    /// The way to the store (for the counters, opened with the relay's other state).
    pub fn link(&self) -> Arc<Link> {
        self.link.clone()
    }

    /// The message rates, shared through the store.
    pub fn rates(&self) -> Arc<Rates> {
        Rates::shared(self.link.clone(), self.fleet_size)
    }

    /// The back-off standings, shared through the store.
    pub fn backoffs(&self) -> Arc<Backoffs> {
        Backoffs::shared(self.link.clone())
    }

    /// Joins the fleet and follows it until `stop`. With `required`, the first join must succeed (else
    /// the error, and the relay does not start); otherwise a store that does not answer leaves the relay
    /// on its local copy, loudly, until it does.
    pub async fn start(
        self,
        list: Arc<Suppressions>,
        required: bool,
        stop: watch::Receiver<bool>,
    ) -> Result<(), FleetError> {
        let session = if required {
            Some(self.sync.first_join(&list).await?)
        } else {
            None
        };
        tokio::spawn(Arc::new(self.sync).run(list, session, stop));
        Ok(())
    }
}
