//! Connection leases: `delivery.per_domain.max_connections` for the whole fleet. A delivery connection
//! takes a lease for its destination before it opens and gives it back when it closes; a lease expires
//! by itself unless renewed, so a crashed relay's leases return within `LEASE_TTL`.
//!
//! In the store, per destination a sorted set `lease:{<destination>}` (after the key prefix; the braces put
//! each destination in a slot of its own in a Valkey Cluster): members are this relay's connections
//! (`<origin>:<n>`), scores their expiry on the store's clock (so relays' clocks do not matter). Taking a
//! lease drops the expired ones, counts, and adds one if there is room, atomically (a Lua script).
//!
//! Without the store (unreachable, or failing), a relay takes leases from its share of the limit, the
//! limit divided by `store.fleet_size` (at least one), never more: the fleet as a whole stays within the
//! limit while every relay is cut off, and each relay still sends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Connection, Link, ScriptConnection};

/// How long a lease lasts without renewal.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// Renewal of every held lease, well within `LEASE_TTL`.
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// How long a destination waits after the fleet had no lease for it (the caller's hold).
pub const LEASE_WAIT: Duration = Duration::from_secs(1);

/// KEYS: the destination's set. ARGV: member, limit, ttl (ms). 1 when taken.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"#;

/// KEYS: the destination's set. ARGV: member, ttl (ms). Pushes the expiry out if the lease is still held.
const RENEW: &str = r#"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
"#;

#[derive(Debug, Default)]
struct Held {
    /// Leases held per destination, from the store or the local share.
    per_dest: HashMap<Arc<str>, u32>,
    /// The store's leases this relay holds: member -> key.
    stored: HashMap<String, String>,
}

/// This relay's side of the fleet's connection leases.
#[derive(Debug)]
pub struct Leases {
    con: ScriptConnection,
    fleet_size: u32,
    origin: String,
    next: AtomicU64,
    held: Mutex<Held>,
    take: redis::Script,
    renew: redis::Script,
    release: mpsc::UnboundedSender<(String, String)>,
}

/// A connection's lease; given back when dropped.
#[derive(Debug)]
pub struct Lease {
    leases: Arc<Leases>,
    dest: Arc<str>,
    /// The store's lease (key, member); none for one from the local share.
    stored: Option<(String, String)>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut held = self.leases.lock();
        if let Some(n) = held.per_dest.get_mut(&self.dest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.per_dest.remove(&self.dest);
            }
        }
        if let Some((key, member)) = self.stored.take() {
            held.stored.remove(&member);
            // The task behind the channel removes it from the store; if that fails it expires.
            let _ = self.leases.release.send((key, member));
        }
    }
}

impl Leases {
    /// Leases through `link`; starts the task that renews and gives back the store's leases.
    pub fn start(link: Arc<Link>, fleet_size: u32, origin: String) -> Arc<Leases> {
        let (release, rx) = mpsc::unbounded_channel();
        let take = redis::Script::new(TAKE);
        let renew = redis::Script::new(RENEW);
        let leases = Arc::new(Leases {
            con: ScriptConnection::new(
                link,
                "lease",
                "connection leases come from this relay's share until the store answers",
                vec![take.clone(), renew.clone()],
            ),
            fleet_size: fleet_size.max(1),
            origin,
            next: AtomicU64::new(0),
            held: Mutex::new(Held::default()),
            take,
            renew,
            release,
        });
        tokio::spawn(upkeep(Arc::downgrade(&leases), rx));
        leases
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A lease for one more connection to `dest`, whose fleet-wide limit is `limit`; none when the
    /// fleet (or, without the store, this relay's share) has no room.
    pub async fn acquire(self: &Arc<Self>, dest: &Arc<str>, limit: u32) -> Option<Lease> {
        let limit = limit.max(1);
        let key = self.con.link().key(&format!("lease:{{{dest}}}"));
        let member = format!(
            "{}:{}",
            self.origin,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        match self.take_in_store(&key, &member, limit).await {
            Some(true) => {
                let mut held = self.lock();
                *held.per_dest.entry(dest.clone()).or_default() += 1;
                held.stored.insert(member.clone(), key.clone());
                Some(Lease {
                    leases: self.clone(),
                    dest: dest.clone(),
                    stored: Some((key, member)),
                })
            }
            Some(false) => None,
            None => {
                let share = (limit / self.fleet_size).max(1);
                let mut held = self.lock();
                let n = held.per_dest.entry(dest.clone()).or_default();
                if *n >= share {
                    return None;
                }
                *n += 1;
                Some(Lease {
                    leases: self.clone(),
                    dest: dest.clone(),
                    stored: None,
                })
            }
        }
    }

    /// Some(taken) from the store; None when it cannot be asked now.
    async fn take_in_store(&self, key: &str, member: &str, limit: u32) -> Option<bool> {
        let mut con = self.con.get().await?;
        let mut call = self.take.key(key);
        call.arg(member)
            .arg(limit)
            .arg(LEASE_TTL.as_millis() as u64);
        match self.con.timed(call.invoke_async::<i64>(&mut con)).await {
            Ok(n) => Some(n == 1),
            Err(e) => {
                self.con.failed(&e).await;
                None
            }
        }
    }
}

/// Renews the store's leases this relay holds and gives back the released ones, until the leases are
/// gone.
async fn upkeep(
    leases: std::sync::Weak<Leases>,
    mut released: mpsc::UnboundedReceiver<(String, String)>,
) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = released.recv() => {
                let Some((key, member)) = r else { return };
                let Some(l) = leases.upgrade() else { return };
                if let Some(mut con) = l.con.current().await {
                    let _ = l
                        .con
                        .timed(redis::cmd("ZREM").arg(&key).arg(&member).query_async::<i64>(&mut con))
                        .await;
                }
            }
            _ = tick.tick() => {
                let Some(l) = leases.upgrade() else { return };
                let mut stored: Vec<(String, String)> = l.lock().stored.iter().map(|(m, k)| (k.clone(), m.clone())).collect();
                if stored.is_empty() {
                    continue;
                }
                let Some(mut con) = l.con.current().await else { continue };
                // One pipeline, or one per destination in a cluster, whose pipelines may not span shards.
                stored.sort();
                let mut pipes = Vec::new();
                let mut last: Option<&str> = None;
                for (key, member) in &stored {
                    let new_pipe = pipes.is_empty()
                        || (matches!(con, Connection::Cluster(_)) && last != Some(key.as_str()));
                    if new_pipe {
                        pipes.push(redis::pipe());
                    }
                    last = Some(key);
                    let mut call = l.renew.key(key);
                    call.arg(member).arg(LEASE_TTL.as_millis() as u64);
                    if let Some(pipe) = pipes.last_mut() {
                        pipe.invoke_script(&call).ignore();
                    }
                }
                // Each pipeline is tried (in a cluster one shard may answer when another does not); after a
                // failure the connection is dropped, so the next tick renews through a new one (a fail-over's
                // new primary, a shard's new node with the scripts loaded).
                let mut failed = None;
                for pipe in pipes {
                    if let Err(e) = l.con.timed(pipe.query_async::<()>(&mut con)).await {
                        failed.get_or_insert(e);
                    }
                }
                if let Some(e) = failed {
                    tracing::warn!(error = %e, leases = stored.len(), "cannot renew connection leases; they expire unless renewed in time");
                    l.con.failed(&e).await;
                }
            }
        }
    }
}
