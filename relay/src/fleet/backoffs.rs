//! Back-off standings for the whole fleet: a source address suspended or slowed down for a mailbox
//! provider by one relay is suspended or slowed down on every relay.
//!
//! In the store, per provider and source the string key `backoff:{<provider>/<source>}` (after the key
//! prefix) holds the standing as JSON, and expires when the standing has recovered, so an entry never
//! outlives its effect. The last relay to write wins: each writes the standing it computed from the one it
//! last read, which is at most `FRESH` old.
//!
//! Without the store (none configured, or not answering) each relay keeps its own standings: a provider
//! that pushes back pushes back on each relay that sends to it, so each learns for itself.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;

use super::{Link, ScriptConnection};

/// This relay's way to the fleet's back-off standings.
#[derive(Debug)]
pub struct Backoffs {
    store: Option<ScriptConnection>,
}

/// What the store answered for a key: the standing's JSON, if it has one.
pub type Stored = Option<String>;

impl Backoffs {
    /// Standings kept by this relay alone.
    pub fn local() -> Arc<Backoffs> {
        Arc::new(Backoffs { store: None })
    }

    /// Standings shared through `link`.
    pub fn shared(link: Arc<Link>) -> Arc<Backoffs> {
        Arc::new(Backoffs {
            store: Some(ScriptConnection::new(
                link,
                "backoff",
                "back-off standings are kept by this relay alone until the store answers",
                Vec::new(),
            )),
        })
    }

    /// Whether standings are shared at all.
    pub fn is_shared(&self) -> bool {
        self.store.is_some()
    }

    /// The fleet's standing for `key` (`<provider>/<source>`); None when it cannot be asked now.
    pub async fn get(&self, key: &str) -> Option<Stored> {
        let store = self.store.as_ref()?;
        let mut con = store.get().await?;
        let name = store.link().key(&format!("backoff:{{{key}}}"));
        match store.timed(con.get::<_, Option<String>>(name)).await {
            Ok(v) => Some(v),
            Err(e) => {
                store.failed(&e).await;
                None
            }
        }
    }

    /// Puts `json` as the fleet's standing for `key`, kept for `ttl`.
    pub async fn put(&self, key: &str, json: &str, ttl: Duration) {
        let Some(store) = &self.store else { return };
        let Some(mut con) = store.get().await else {
            return;
        };
        let name = store.link().key(&format!("backoff:{{{key}}}"));
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        if let Err(e) = store.timed(con.pset_ex::<_, _, ()>(name, json, ms)).await {
            store.failed(&e).await;
        }
    }
}
