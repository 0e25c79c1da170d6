//! The suppression list shared by every replica of a fleet.
//!
//! Each replica reads its own copy (the file store on its volume, in memory): a recipient costs no round
//! trip. A change made here (a hard bounce, a complaint, an admin edit) is written to the copy and to the
//! outbox, then to the store, where it becomes the address's latest change if it is later than the one
//! there, and goes out on the change feed; the other replicas follow the feed and apply it to their copies.
//! A periodic resync reads the whole list again, for whatever a feed can miss.
//!
//! In the store (keys after `store.key_prefix`; the braces keep a Valkey Cluster's keys in one slot):
//! - `{supp}:state`, a hash: per address its latest change, as JSON with its time (`e:<address>` for an
//!   entry or its removal, `s:<address>` for a mailbox-full streak or its reset). Removals stay as
//!   tombstones for `TOMBSTONE_KEEP`; expired entries and forgotten streaks are dropped by the resync.
//! - `{supp}:feed`, a stream of the changes the hash took (`f` field, `v` change, `o` origin replica),
//!   trimmed to about `FEED_LEN`.
//! - `epoch`: a random id set when the store first held the list. It is missing when the store restarted
//!   empty: each replica then writes its copy back (the latest change of an address wins). It differs
//!   from the one a replica remembers when someone reset the list on purpose (deleted the keys and set a
//!   new epoch): the replicas' copies then follow the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use redis::streams::{StreamId, StreamReadOptions, StreamReadReply};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Connection, FleetError, Link, Outbox};
use crate::outcome::suppression::{
    Entry, FileStore, Store, Streak, SuppressionError, Suppressions,
};

/// Changes the feed keeps: far more than replicas miss between two reads.
const FEED_LEN: usize = 100_000;
/// How long one read of the feed waits for a change.
const FEED_WAIT: Duration = Duration::from_secs(2);
/// Hash fields per HSCAN, and writes per pipeline.
const PAGE: usize = 500;
/// How long a removal is remembered in the store: a replica away for longer may write the address back.
const TOMBSTONE_KEEP: Duration = Duration::from_secs(30 * 86400);
/// The longest wait between two tries to reach the store.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Sets the address's latest change if this one is later; puts it on the feed when it does.
/// KEYS: state, feed. ARGV: field, time (ms), change, origin, feed length.
const WRITE: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cjson.decode(cur)['at']) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'f', ARGV[1], 'v', ARGV[3], 'o', ARGV[4])
return 1
"#;

/// Drops a field only if it still holds the change the resync saw. KEYS: state. ARGV: field, change.
const FORGET: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"#;

/// One change to the list, as the outbox, the store and the feed hold it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Unix milliseconds: of two changes to one address, the later stands, on every replica.
    pub at: i64,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum What {
    Add { entry: Entry },
    Remove { address: String },
    Streak { streak: Streak },
    Reset { address: String },
}

impl Change {
    fn now(what: What) -> Change {
        Change {
            at: Utc::now().timestamp_millis(),
            what,
        }
    }

    /// The hash field of the address this change is about.
    fn field(&self) -> String {
        match &self.what {
            What::Add { entry } => entry_field(&entry.address),
            What::Remove { address } => entry_field(address),
            What::Streak { streak } => streak_field(&streak.address),
            What::Reset { address } => streak_field(address),
        }
    }

    /// Whether the store may drop this change: an old removal, an expired entry, a forgotten streak.
    fn spent(&self, list: &Suppressions, now: DateTime<Utc>) -> bool {
        match &self.what {
            What::Add { entry } => entry.expired(now),
            What::Streak { streak } => list.forgotten(streak, now),
            What::Remove { .. } | What::Reset { .. } => {
                now.timestamp_millis() - self.at > TOMBSTONE_KEEP.as_millis() as i64
            }
        }
    }
}

fn entry_field(address: &str) -> String {
    format!("e:{}", address.to_lowercase())
}

fn streak_field(address: &str) -> String {
    format!("s:{}", address.to_lowercase())
}

/// Applies a change made elsewhere to this replica's copy (not to its outbox). Blocking.
fn apply(local: &FileStore, what: &What) -> Result<(), SuppressionError> {
    match what {
        What::Add { entry } => {
            if local.entry(&entry.address).as_ref() != Some(entry) {
                local.put(entry.clone())?;
            }
        }
        What::Remove { address } => {
            local.remove(address)?;
        }
        What::Streak { streak } => {
            if local.streak(&streak.address).as_ref() != Some(streak) {
                local.put_streak(streak.clone())?;
            }
        }
        What::Reset { address } => {
            local.clear_streak(address)?;
        }
    }
    Ok(())
}

/// The list's store in a relay with a fleet store: reads from the local copy, writes to it and to the
/// outbox.
#[derive(Debug)]
pub struct SharedStore {
    local: Arc<FileStore>,
    outbox: Arc<Outbox>,
}

impl SharedStore {
    pub fn new(local: Arc<FileStore>, outbox: Arc<Outbox>) -> SharedStore {
        SharedStore { local, outbox }
    }

    fn record(&self, what: What) -> Result<(), SuppressionError> {
        self.outbox.push(Change::now(what)).map_err(|e| match e {
            FleetError::Local { path, source } => SuppressionError::Io { path, source },
            other => SuppressionError::Io {
                path: PathBuf::from("fleet/outbox"),
                source: std::io::Error::other(other.to_string()),
            },
        })
    }
}

impl Store for SharedStore {
    fn entry(&self, address: &str) -> Option<Entry> {
        self.local.entry(address)
    }

    fn entries(&self, after: Option<&str>, limit: usize) -> Vec<Entry> {
        self.local.entries(after, limit)
    }

    fn put(&self, entry: Entry) -> Result<(), SuppressionError> {
        self.local.put(entry.clone())?;
        self.record(What::Add { entry })
    }

    fn remove(&self, address: &str) -> Result<bool, SuppressionError> {
        let here = self.local.remove(address)?;
        // Even when this copy has no entry: another replica's may not have reached it yet.
        self.record(What::Remove {
            address: address.to_owned(),
        })?;
        Ok(here)
    }

    fn streak(&self, address: &str) -> Option<Streak> {
        self.local.streak(address)
    }

    fn has_streak(&self, address: &str) -> bool {
        self.local.has_streak(address)
    }

    fn streaks(&self, after: Option<&str>, limit: usize) -> Vec<Streak> {
        self.local.streaks(after, limit)
    }

    fn put_streak(&self, streak: Streak) -> Result<(), SuppressionError> {
        self.local.put_streak(streak.clone())?;
        self.record(What::Streak { streak })
    }

    fn clear_streak(&self, address: &str) -> Result<bool, SuppressionError> {
        let had = self.local.clear_streak(address)?;
        if had {
            self.record(What::Reset {
                address: address.to_owned(),
            })?;
        }
        Ok(had)
    }

    fn entry_count(&self) -> usize {
        self.local.entry_count()
    }

    fn streak_count(&self) -> usize {
        self.local.streak_count()
    }

    /// Expiry is the same on every replica: each sweeps its own copy, and the resync the store.
    fn sweep(
        &self,
        now: DateTime<Utc>,
        forgotten: &dyn Fn(&Streak) -> bool,
    ) -> Result<usize, SuppressionError> {
        self.local.sweep(now, forgotten)
    }
}

/// Connections of a replica joined to the store, and how far it has read the feed.
#[derive(Debug)]
pub(super) struct Session {
    con: Connection,
    feed: Connection,
    last: String,
}

/// Keeps this replica's copy, its outbox and the store in step.
#[derive(Debug)]
pub(super) struct Sync {
    link: Arc<Link>,
    local: Arc<FileStore>,
    outbox: Arc<Outbox>,
    epoch_file: PathBuf,
    resync_every: Duration,
    /// This process on the feed: its own changes are skipped when they come back.
    origin: String,
    state_key: String,
    feed_key: String,
    epoch_key: String,
    write: redis::Script,
    forget: redis::Script,
    flushing: tokio::sync::Mutex<()>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FleetError> + Send + 'static,
) -> Result<T, FleetError> {
    tokio::task::spawn_blocking(f).await?
}

impl Sync {
    pub(super) fn new(
        link: Arc<Link>,
        local: Arc<FileStore>,
        outbox: Arc<Outbox>,
        dir: &Path,
        resync_every: Duration,
        origin: String,
    ) -> Sync {
        Sync {
            state_key: link.key("{supp}:state"),
            feed_key: link.key("{supp}:feed"),
            epoch_key: link.key("epoch"),
            link,
            local,
            outbox,
            epoch_file: dir.join("epoch"),
            resync_every,
            origin,
            write: redis::Script::new(WRITE),
            forget: redis::Script::new(FORGET),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// The first join of a relay that may not start without the store.
    pub(super) async fn first_join(&self, list: &Suppressions) -> Result<Session, FleetError> {
        let session = self.join(list).await?;
        self.link.metrics().store_up.set(1);
        Ok(session)
    }

    /// Joins and follows the store until `stop`, joining again after every failure. `loud`: the first
    /// failure to join is an error in the log (the relay started without the store).
    pub(super) async fn run(
        self: Arc<Self>,
        list: Arc<Suppressions>,
        mut session: Option<Session>,
        mut stop: watch::Receiver<bool>,
    ) {
        let up = &self.link.metrics().store_up;
        let mut delay = Duration::from_secs(1);
        let mut said = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let s = match session.take() {
                Some(s) => s,
                None => match self.join(&list).await {
                    Ok(s) => s,
                    Err(e) => {
                        up.set(0);
                        if !said {
                            tracing::error!(error = %e, "this relay cannot use the fleet's store: suppressions stay local until it answers, and changes made meanwhile are kept and sent then");
                            said = true;
                        } else {
                            tracing::debug!(error = %e, "this relay still cannot use the fleet's store");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => return,
                        }
                        delay = (delay * 2).min(RETRY_MAX);
                        continue;
                    }
                },
            };
            up.set(1);
            tracing::info!(store = %self.link.shown(), "joined the fleet's store");
            delay = Duration::from_secs(1);
            match self.follow(s, &list, stop.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    up.set(0);
                    tracing::warn!(error = %e, "lost the fleet's store; suppressions stay local until it is back");
                    said = true;
                }
            }
        }
    }

    /// Connects, sends the outbox, reconciles the copy with the store, and notes where the feed is.
    async fn join(&self, list: &Suppressions) -> Result<Session, FleetError> {
        let mut con = self.link.connect(None).await?;
        let feed = self.link.connect(Some(FEED_WAIT * 3)).await?;
        for script in [&self.write, &self.forget] {
            self.link
                .timed("join", script.prepare_invoke().load_async(&mut con))
                .await?;
        }
        let last = self.feed_end(&mut con).await?;
        self.reconcile(&mut con, list, "join").await?;
        Ok(Session { con, feed, last })
    }

    /// Makes the copy and the store agree, by the epoch (see the module's notes): sends the outbox, then
    /// reads the store's whole list; writes the copy back to a store that lost it, or drops what the copy
    /// has beyond a store that was reset.
    async fn reconcile(
        &self,
        con: &mut Connection,
        list: &Suppressions,
        op: &'static str,
    ) -> Result<(), FleetError> {
        let stored: Option<String> = self.link.timed(op, con.get(&self.epoch_key)).await?;
        let file = self.epoch_file.clone();
        let known = blocking(move || read_epoch(&file)).await?;
        let adopt = match (&stored, &known) {
            (Some(s), Some(k)) if s != k => {
                tracing::warn!(stored = %s, known = %k, "the store's suppression list was reset on purpose (its epoch changed): this relay's copy follows it");
                true
            }
            _ => false,
        };
        // Our own changes first, so that the store's list below includes them.
        self.flush(con).await?;
        self.resync(con, list, !adopt, op).await?;
        let epoch = match stored {
            Some(s) => s,
            None => {
                // A store that lost the list keeps the epoch the replicas know, so that each of them
                // writes its copy back rather than taking the store's (empty) list as a reset.
                if known.is_some() {
                    tracing::warn!(
                        "the fleet's store lost its suppression list (restarted without persistence?): written back from this relay's copy"
                    );
                }
                let mine = known
                    .clone()
                    .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
                let _: bool = self
                    .link
                    .timed(op, con.set_nx(&self.epoch_key, &mine))
                    .await?;
                let now: Option<String> = self.link.timed(op, con.get(&self.epoch_key)).await?;
                now.ok_or_else(|| self.link.protocol("the epoch key vanished as it was set"))?
            }
        };
        if known.as_ref() != Some(&epoch) {
            let file = self.epoch_file.clone();
            blocking(move || write_epoch(&file, &epoch)).await?;
        }
        Ok(())
    }

    /// The id of the feed's newest change ("0-0" when empty): reading on from it misses nothing later.
    async fn feed_end(&self, con: &mut Connection) -> Result<String, FleetError> {
        let newest: redis::streams::StreamRangeReply = self
            .link
            .timed("join", con.xrevrange_count(&self.feed_key, "+", "-", 1))
            .await?;
        Ok(newest
            .ids
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |i| i.id))
    }

    /// Writes the outbox to the store, oldest first; each change stands there if it is the address's
    /// latest. Then forgets what was sent.
    async fn flush(&self, con: &mut Connection) -> Result<(), FleetError> {
        // One flush at a time: each confirms as many changes as it sent, from the front.
        let _one = self.flushing.lock().await;
        let pending = self.outbox.pending();
        if pending.is_empty() {
            return Ok(());
        }
        for chunk in pending.chunks(PAGE) {
            self.write_all(con, chunk, "publish").await?;
        }
        let outbox = self.outbox.clone();
        let n = pending.len();
        blocking(move || outbox.confirm(n)).await
    }

    /// Writes changes through the `WRITE` script, one pipeline for all of them.
    async fn write_all(
        &self,
        con: &mut Connection,
        changes: &[Change],
        op: &'static str,
    ) -> Result<(), FleetError> {
        let mut pipe = redis::pipe();
        for c in changes {
            let json = serde_json::to_string(c)
                .map_err(|e| self.link.protocol(format!("cannot encode a change: {e}")))?;
            let mut call = self.write.prepare_invoke();
            call.key(&self.state_key)
                .key(&self.feed_key)
                .arg(c.field())
                .arg(c.at)
                .arg(json)
                .arg(&self.origin)
                .arg(FEED_LEN);
            pipe.invoke_script(&call).ignore();
        }
        self.link.timed(op, pipe.query_async::<()>(con)).await
    }

    /// Reads the whole list in the store and makes the copy match it. Addresses the copy has and the store
    /// has nothing about are written to the store with `push_missing` (it lost them, or never had them:
    /// a relay joining with a list of its own), else dropped from the copy (the store was reset). The store
    /// sheds what is spent on the way.
    async fn resync(
        &self,
        con: &mut Connection,
        list: &Suppressions,
        push_missing: bool,
        op: &'static str,
    ) -> Result<(), FleetError> {
        let stored = self.read_state(con, op).await?;
        let local = self.local.clone();
        let (entries, streaks) = blocking(move || {
            Ok((
                local.entries(None, usize::MAX),
                local.streaks(None, usize::MAX),
            ))
        })
        .await?;
        let now = Utc::now();
        let mut push = Vec::new();
        let mut here = Vec::new();
        let mut spent = Vec::new();
        for e in entries {
            if !stored.contains_key(&entry_field(&e.address)) {
                if push_missing {
                    push.push(Change {
                        at: e.added_at.timestamp_millis(),
                        what: What::Add { entry: e },
                    });
                } else {
                    here.push(What::Remove { address: e.address });
                }
            }
        }
        for s in streaks {
            if !stored.contains_key(&streak_field(&s.address)) {
                if push_missing {
                    push.push(Change {
                        at: s.last_at.timestamp_millis(),
                        what: What::Streak { streak: s },
                    });
                } else {
                    here.push(What::Reset { address: s.address });
                }
            }
        }
        for (field, (raw, change)) in stored {
            if change.spent(list, now) {
                spent.push((field, raw));
            } else {
                here.push(change.what);
            }
        }
        let local = self.local.clone();
        blocking(move || {
            for w in &here {
                apply(&local, w)?;
            }
            Ok(())
        })
        .await?;
        for chunk in push.chunks(PAGE) {
            self.write_all(con, chunk, op).await?;
        }
        for chunk in spent.chunks(PAGE) {
            let mut pipe = redis::pipe();
            for (field, raw) in chunk {
                let mut call = self.forget.prepare_invoke();
                call.key(&self.state_key).arg(field).arg(raw);
                pipe.invoke_script(&call).ignore();
            }
            self.link.timed(op, pipe.query_async::<()>(con)).await?;
        }
        if !push.is_empty() {
            tracing::info!(
                written = push.len(),
                "suppressions the store did not have written to it from this relay's copy"
            );
        }
        Ok(())
    }

    /// Every field of the state hash with its change.
    async fn read_state(
        &self,
        con: &mut Connection,
        op: &'static str,
    ) -> Result<HashMap<String, (String, Change)>, FleetError> {
        let mut out = HashMap::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, page): (u64, Vec<(String, String)>) = self
                .link
                .timed(
                    op,
                    redis::cmd("HSCAN")
                        .arg(&self.state_key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async(con),
                )
                .await?;
            for (field, raw) in page {
                match serde_json::from_str::<Change>(&raw) {
                    Ok(c) => {
                        out.insert(field, (raw, c));
                    }
                    Err(e) => {
                        tracing::warn!(%field, error = %e, "skipping a suppression change in the store this relay cannot read")
                    }
                }
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Follows the feed, sends the outbox when it has something, and resyncs every `resync_every`, until
    /// `stop` (Ok) or a failure of the store (the error).
    async fn follow(
        &self,
        session: Session,
        list: &Suppressions,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), FleetError> {
        let Session {
            mut con,
            mut feed,
            mut last,
        } = session;
        let mut publish_con = con.clone();
        let publisher = async {
            loop {
                self.outbox.wake.notified().await;
                self.flush(&mut publish_con).await?;
            }
        };
        let follower = async {
            let mut next_resync = tokio::time::Instant::now() + self.resync_every;
            loop {
                self.read_feed(&mut feed, &mut last).await?;
                // After a batch, never during one: the feed read on from `last` afterwards replays whatever
                // the resync's snapshot may have missed, and a change applied twice changes nothing.
                if tokio::time::Instant::now() >= next_resync {
                    self.reconcile(&mut con, list, "resync").await?;
                    next_resync = tokio::time::Instant::now() + self.resync_every;
                }
            }
        };
        tokio::select! {
            r = publisher => r,
            r = follower => r,
            _ = stop.changed() => Ok(()),
        }
    }

    /// One read of the feed (waiting up to `FEED_WAIT`); applies other replicas' changes to the copy.
    async fn read_feed(&self, feed: &mut Connection, last: &mut String) -> Result<(), FleetError> {
        let options = StreamReadOptions::default()
            .block(FEED_WAIT.as_millis() as usize)
            .count(PAGE);
        let reply: Option<StreamReadReply> = self
            .link
            .timed(
                "feed",
                feed.xread_options(&[&self.feed_key], &[last.as_str()], &options),
            )
            .await?;
        let Some(reply) = reply else {
            return Ok(());
        };
        let mut changes = Vec::new();
        for StreamId { id, map, .. } in reply.keys.into_iter().flat_map(|k| k.ids) {
            *last = id;
            let origin: Option<String> = map
                .get("o")
                .and_then(|v| redis::from_redis_value_ref(v).ok());
            if origin.as_deref() == Some(self.origin.as_str()) {
                continue;
            }
            let value: Option<String> = map
                .get("v")
                .and_then(|v| redis::from_redis_value_ref(v).ok());
            match value.map(|v| serde_json::from_str::<Change>(&v)) {
                Some(Ok(c)) => changes.push(c.what),
                Some(Err(e)) => {
                    tracing::warn!(id = %last, error = %e, "skipping a change on the feed this relay cannot read")
                }
                None => tracing::warn!(id = %last, "skipping a feed entry without a change"),
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let local = self.local.clone();
        blocking(move || {
            for w in &changes {
                apply(&local, w)?;
            }
            Ok(())
        })
        .await
    }
}

fn read_epoch(path: &Path) -> Result<Option<String>, FleetError> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FleetError::Local {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Remembers the store's epoch (a new file synced and renamed over the old).
fn write_epoch(path: &Path, epoch: &str) -> Result<(), FleetError> {
    super::replace_file(path, format!("{epoch}\n").as_bytes()).map_err(|source| FleetError::Local {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_keep_their_shape_on_the_wire() {
        let c = Change {
            at: 1_700_000_000_000,
            what: What::Remove {
                address: "Gone@Example.test".into(),
            },
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"at":1700000000000,"op":"remove","address":"Gone@Example.test"}"#
        );
        assert_eq!(serde_json::from_str::<Change>(&json).unwrap(), c);
        assert_eq!(c.field(), "e:gone@example.test");
    }
}
