//! Counters per day that later features decide from: messages sent from each source address (IP warm-up
//! caps), and recipients delivered, bounced and complained about per sending domain (engagement rates).
//! A day is `shaping.day_length` long, counted from the Unix epoch (by default a UTC calendar day).
//!
//! Counting is a map increment on the hot path; once a second the increments go to the store in one
//! pipeline (`HINCRBY` per counter, `EXPIRE` per key), whose replies are the fleet's totals. In the store,
//! per day (days since 1970-01-01 UTC):
//! - `count:{src}:<day>`, a hash: field the source address, value the messages handed over from it (at
//!   least one recipient accepted); kept `SOURCE_DAYS` days;
//! - `count:{dom}:<day>`, a hash: fields `<sending domain>/delivered`, `/bounced`, `/complained`,
//!   recipients; kept `DOMAIN_DAYS` days.
//!
//! While the store is away the increments wait and go when it answers; without a store the relay's own
//! totals are the counts. What only this relay holds (its increments not yet in the store, or without a
//! store its totals) is saved in `counters.json` in the fleet state directory after each flush that sent
//! something, every `SAVE_EVERY`, and at shutdown, and read back at start: a restart loses at most the
//! last few seconds.
//!
//! An address in warm-up takes a turn under its daily cap before each message ([`Counters::take`]): a
//! script in the store checks the fleet's count for the day and adds to it, so the fleet as a whole never
//! goes past the cap. While the count is far from the cap the script hands out a few turns at once (a
//! quarter of the room left per relay, at most `MAX_TURNS`), spent within `BANK_LIFE` and the rest given
//! back; near the cap every relay takes one at a time. A message that then goes nowhere (no recipient
//! accepted, or no connection) gives its turn back. While the store does not answer, a relay goes on by itself for its share of the cap (cap ÷
//! `fleet_size`) beyond the count it last saw.
//!
//! Sending is at least once: a flush whose reply was lost (a time-out after the store
//! applied it) is sent again, so a count can come out a little high, never low; a batch the store
//! refuses outright (a key of another type) is dropped, said in the log, not retried for ever.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{FleetError, Link, ScriptConnection};

/// Days a source address's counts are kept.
pub const SOURCE_DAYS: u64 = 8;
/// Days a sending domain's counts are kept.
pub const DOMAIN_DAYS: u64 = 31;
/// Takes messages of a source's daily cap: one, or a few while the count is far from the cap (the room left
/// divided by ARGV[6], at most ARGV[5]), so that near the cap every relay takes one at a time. KEYS: the
/// day's source hash. ARGV: the address, the cap, this relay's increments of that address not yet sent
/// (added here, so they are not lost), the key's lifetime in seconds, the most turns, the divisor.
/// Returns {turns taken, the day's count after}.
const TAKE: &str = r#"
local pending = tonumber(ARGV[3])
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local room = tonumber(ARGV[2]) - n - pending
if room <= 0 then
  if pending > 0 then n = redis.call('HINCRBY', KEYS[1], ARGV[1], pending) end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {0, n}
end
local k = math.floor(room / tonumber(ARGV[6]))
if k < 1 then k = 1 end
if k > tonumber(ARGV[5]) then k = tonumber(ARGV[5]) end
n = redis.call('HINCRBY', KEYS[1], ARGV[1], pending + k)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {k, n}
"#;
/// The most turns one call takes from the store.
const MAX_TURNS: u64 = 16;
/// How long turns taken in a batch may be spent; then what is left goes back to the store.
const BANK_LIFE: Duration = Duration::from_secs(1);
/// Gives messages back to a source's count of a day, never below 0. KEYS: the day's source hash. ARGV: the
/// address, how many. Returns the count after.
const GIVE_BACK: &str = r#"
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local g = math.min(n, tonumber(ARGV[2]))
if g > 0 then n = redis.call('HINCRBY', KEYS[1], ARGV[1], -g) end
return n
"#;
/// How often increments go to the store.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How often what only this relay holds is saved (when it changed).
const SAVE_EVERY: Duration = Duration::from_secs(10);
/// The file, in the fleet state directory.
const FILE: &str = "counters.json";

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Scope {
    Source,
    Domain,
}

impl Scope {
    fn tag(self) -> &'static str {
        match self {
            Scope::Source => "src",
            Scope::Domain => "dom",
        }
    }

    /// Days its counts are kept.
    fn days(self) -> u64 {
        match self {
            Scope::Source => SOURCE_DAYS,
            Scope::Domain => DOMAIN_DAYS,
        }
    }
}

/// One event to count.
#[derive(Debug, Clone, Copy)]
pub enum Count<'a> {
    /// A message handed over from this source address.
    Sent(IpAddr),
    /// A recipient of this sending domain delivered.
    Delivered(&'a str),
    /// A recipient of this sending domain bounced (a final failure, or a bounce report).
    Bounced(&'a str),
    /// A complaint (feedback-loop report) about a recipient of this sending domain.
    Complained(&'a str),
}

impl Count<'_> {
    fn key(&self) -> (Scope, String) {
        match self {
            Count::Sent(ip) => (Scope::Source, ip.to_canonical().to_string()),
            Count::Delivered(d) => (
                Scope::Domain,
                format!("{}/delivered", d.to_ascii_lowercase()),
            ),
            Count::Bounced(d) => (Scope::Domain, format!("{}/bounced", d.to_ascii_lowercase())),
            Count::Complained(d) => (
                Scope::Domain,
                format!("{}/complained", d.to_ascii_lowercase()),
            ),
        }
    }
}

type Key = (u64, Scope, String);

#[derive(Debug, Default)]
struct State {
    /// The latest totals known: the fleet's (from the store's replies), or this relay's without a store.
    totals: BTreeMap<Key, u64>,
    /// Increments not yet in the store.
    pending: BTreeMap<Key, u64>,
    /// Turns under a warm-up cap taken from the store in a batch and not yet spent, per address.
    banks: std::collections::HashMap<IpAddr, Bank>,
}

/// Turns taken from the store for one address on `day`, at `at`.
#[derive(Debug)]
struct Bank {
    day: u64,
    turns: u64,
    at: std::time::Instant,
}

/// One day's counts, as the admin API shows them.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Day {
    pub day: u64,
    /// Source address to messages sent.
    pub sources: BTreeMap<String, u64>,
    /// Sending domain to `delivered`, `bounced`, `complained`.
    pub domains: BTreeMap<String, BTreeMap<String, u64>>,
}

/// A turn under a source's daily cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// Taken on `day`: the message may go (and counts, unless given back to that day).
    Go { day: u64 },
    /// Today's cap is used up; the next day starts at this Unix time (ms).
    Full { until_ms: u64 },
}

/// This relay's counters; shared through the store when there is one.
#[derive(Debug)]
pub struct Counters {
    store: Option<ScriptConnection>,
    take: redis::Script,
    give: redis::Script,
    /// Seconds in a day (`shaping.day_length`).
    day_secs: u64,
    /// Replicas sharing the store: while it is away, this relay's share of a cap.
    fleet_size: u32,
    state: Mutex<State>,
    file: PathBuf,
    /// Changed since the last save.
    dirty: AtomicBool,
    /// One save at a time, so an older snapshot never lands after a newer one.
    saving: tokio::sync::Mutex<()>,
}

/// `counters.json`: each entry `[day, scope, field, count]`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    totals: Vec<(u64, Scope, String, u64)>,
    #[serde(default)]
    pending: Vec<(u64, Scope, String, u64)>,
}

fn entries(map: &BTreeMap<Key, u64>) -> Vec<(u64, Scope, String, u64)> {
    map.iter()
        .map(|((day, scope, field), n)| (*day, *scope, field.clone(), *n))
        .collect()
}

fn keep(day: u64, scope: Scope, now: u64) -> bool {
    day + scope.days() > now
}

/// A failure of the way to the store (worth sending again), not the store refusing the commands. Only a
/// refusal of the commands themselves drops a batch: anything else (a lost connection, a shard without a
/// connection, a fail-over, a store still loading) keeps it for the next flush.
fn transient(e: &FleetError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e {
        FleetError::Store { source, .. } => !matches!(
            source.kind(),
            ErrorKind::Server(
                ServerErrorKind::ResponseError
                    | ServerErrorKind::CrossSlot
                    | ServerErrorKind::NoPerm
                    | ServerErrorKind::ExecAbort
            ) | ErrorKind::UnexpectedReturnType
        ),
        _ => true,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Counters {
    /// The counters kept in `dir` (the fleet state directory), with days of `day_length`; through `link`
    /// when there is a store, shared by `fleet_size` relays. Blocking: reads the saved file.
    pub fn open(
        dir: &Path,
        link: Option<Arc<Link>>,
        fleet_size: u32,
        day_length: Duration,
    ) -> Result<Counters, FleetError> {
        let day_secs = day_length.as_secs().max(1);
        let local = |source| FleetError::Local {
            path: dir.join(FILE),
            source,
        };
        std::fs::create_dir_all(dir).map_err(local)?;
        let file = dir.join(FILE);
        let saved: Saved = match std::fs::read(&file) {
            Ok(raw) => serde_json::from_slice(&raw).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), error = %e, "saved counters unreadable; starting from zero");
                Saved::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(local(e)),
        };
        let now = unix_ms() / 1000 / day_secs;
        let load = |v: Vec<(u64, Scope, String, u64)>| -> BTreeMap<Key, u64> {
            v.into_iter()
                .filter(|(day, scope, _, _)| keep(*day, *scope, now))
                .map(|(day, scope, field, n)| ((day, scope, field), n))
                .collect()
        };
        let mut state = State {
            totals: load(saved.totals),
            pending: load(saved.pending),
            banks: Default::default(),
        };
        let take = redis::Script::new(TAKE);
        let give = redis::Script::new(GIVE_BACK);
        let store = link.map(|link| {
            ScriptConnection::new(
                link,
                "count",
                "counters wait on this relay until the store answers",
                vec![take.clone(), give.clone()],
            )
        });
        if store.is_none() {
            // Increments saved while there was a store, kept now that there is none.
            for (k, n) in std::mem::take(&mut state.pending) {
                *state.totals.entry(k).or_default() += n;
            }
        }
        Ok(Counters {
            store,
            take,
            give,
            day_secs,
            fleet_size: fleet_size.max(1),
            state: Mutex::new(state),
            file,
            dirty: AtomicBool::new(false),
            saving: tokio::sync::Mutex::new(()),
        })
    }

    /// Starts the task that sends the increments to the store and saves the file, until `stop`.
    pub fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        tokio::spawn(upkeep(Arc::downgrade(self), stop));
    }

    /// At shutdown, after the last deliveries: the increments to the store, and the file.
    pub async fn close(&self) {
        self.return_banks(true).await;
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "counters not sent to the store at shutdown; they are saved on this relay");
        }
        self.save().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Today, in days since 1970-01-01 UTC (days of `shaping.day_length`).
    pub fn today(&self) -> u64 {
        unix_ms() / 1000 / self.day_secs
    }

    /// The length of a day.
    pub fn day_length(&self) -> Duration {
        Duration::from_secs(self.day_secs)
    }

    /// Counts `n` of `count` today.
    pub fn add(&self, count: Count<'_>, n: u64) {
        if n == 0 {
            return;
        }
        let (scope, field) = count.key();
        let key = (self.today(), scope, field);
        let mut state = self.lock();
        if self.store.is_some() {
            *state.pending.entry(key).or_default() += n;
        } else {
            *state.totals.entry(key).or_default() += n;
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// A turn for one message from `source` under today's `cap`, counted as sent from it at once (the
    /// fleet's count through the store, this relay's while there is none or it does not answer).
    pub async fn take(&self, source: IpAddr, cap: u64) -> Allowance {
        let day = self.today();
        let key: Key = (day, Scope::Source, Count::Sent(source).key().1);
        let full = Allowance::Full {
            until_ms: (day + 1) * self.day_secs * 1000,
        };
        if let Some(b) = self.lock().banks.get_mut(&source)
            && b.day == day
            && b.turns > 0
            && b.at.elapsed() < BANK_LIFE
        {
            b.turns -= 1;
            return Allowance::Go { day };
        }
        if let Some(store) = &self.store
            && let Some(con) = store.get().await
        {
            // What is left of an old batch goes back first, or the count would stay high.
            self.return_banks(false).await;
            let pending = self.lock().pending.remove(&key).unwrap_or(0);
            let name = store
                .link()
                .key(&format!("count:{{{}}}:{day}", Scope::Source.tag()));
            let mut call = self.take.key(name);
            call.arg(&key.2)
                .arg(cap)
                .arg(pending)
                .arg(Scope::Source.days() * self.day_secs)
                .arg(MAX_TURNS)
                .arg(4 * u64::from(self.fleet_size));
            let mut con = con;
            match store.timed(call.invoke_async::<(u64, u64)>(&mut con)).await {
                Ok((taken, n)) => {
                    let mut state = self.lock();
                    state.totals.insert(key, n);
                    self.dirty.store(true, Ordering::Relaxed);
                    if taken == 0 {
                        return full;
                    }
                    if taken > 1 {
                        state.banks.insert(
                            source,
                            Bank {
                                day,
                                turns: taken - 1,
                                at: std::time::Instant::now(),
                            },
                        );
                    }
                    return Allowance::Go { day };
                }
                Err(e) => {
                    if pending > 0 {
                        *self.lock().pending.entry(key.clone()).or_default() += pending;
                    }
                    store.failed(&e).await;
                }
            }
        }
        let mut state = self.lock();
        let known = state.totals.get(&key).copied().unwrap_or(0);
        let mine = state.pending.get(&key).copied().unwrap_or(0);
        let room = match self.store {
            // Without a store the counts are this relay's own, and so is the cap.
            None => known < cap,
            // The store is away: this relay takes no more than its share of what was left of the cap
            // when it last heard the fleet's count, so the relays together stay within it.
            Some(_) => mine < cap.saturating_sub(known) / u64::from(self.fleet_size),
        };
        if !room {
            return full;
        }
        if self.store.is_some() {
            *state.pending.entry(key).or_default() += 1;
        } else {
            *state.totals.entry(key).or_default() += 1;
        }
        self.dirty.store(true, Ordering::Relaxed);
        Allowance::Go { day }
    }

    /// Gives back a turn [`Counters::take`] gave on `day` for a message that was not handed over after all.
    pub async fn give_back(&self, source: IpAddr, day: u64) {
        let key: Key = (day, Scope::Source, Count::Sent(source).key().1);
        {
            let mut state = self.lock();
            if let Some(b) = state.banks.get_mut(&source)
                && b.day == day
                && b.at.elapsed() < BANK_LIFE
            {
                b.turns += 1;
                return;
            }
            if let Some(n) = state.pending.get_mut(&key)
                && *n > 0
            {
                *n -= 1;
                return;
            }
            if self.store.is_none() {
                if let Some(n) = state.totals.get_mut(&key) {
                    *n = n.saturating_sub(1);
                }
                self.dirty.store(true, Ordering::Relaxed);
                return;
            }
        }
        let Some(store) = &self.store else { return };
        let Some(mut con) = store.get().await else {
            return;
        };
        let name = store
            .link()
            .key(&format!("count:{{{}}}:{day}", Scope::Source.tag()));
        // A give-back that does not arrive leaves the count a little high, never low.
        let mut call = self.give.key(name);
        call.arg(&key.2).arg(1);
        match store.timed(call.invoke_async::<u64>(&mut con)).await {
            Ok(n) => {
                self.lock().totals.insert(key, n);
            }
            Err(e) => store.failed(&e).await,
        }
    }

    /// Gives the store back the turns of batches past their life (every batch with `all`), so that the
    /// fleet's count holds only messages sent or about to be.
    async fn return_banks(&self, all: bool) {
        let Some(store) = &self.store else { return };
        let stale: Vec<(IpAddr, Bank)> = {
            let mut state = self.lock();
            let gone: Vec<IpAddr> = state
                .banks
                .iter()
                .filter(|(_, b)| all || b.at.elapsed() >= BANK_LIFE)
                .map(|(a, _)| *a)
                .collect();
            gone.into_iter()
                .filter_map(|a| Some((a, state.banks.remove(&a)?)))
                .filter(|(_, b)| b.turns > 0)
                .collect()
        };
        if stale.is_empty() {
            return;
        }
        let Some(con) = store.get().await else { return };
        for (source, bank) in stale {
            let field = Count::Sent(source).key().1;
            let name = store
                .link()
                .key(&format!("count:{{{}}}:{}", Scope::Source.tag(), bank.day));
            let mut call = self.give.key(name);
            call.arg(&field).arg(bank.turns);
            let mut con = con.clone();
            match store.timed(call.invoke_async::<u64>(&mut con)).await {
                Ok(n) => {
                    self.lock()
                        .totals
                        .insert((bank.day, Scope::Source, field), n);
                }
                Err(e) => {
                    store.failed(&e).await;
                    return;
                }
            }
        }
    }

    /// Writes what only this relay holds to the file, when it changed since the last save.
    async fn save(&self) {
        let _one = self.saving.lock().await;
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let saved = {
            let mut state = self.lock();
            let now = self.today();
            state
                .totals
                .retain(|(day, scope, _), _| keep(*day, *scope, now));
            Saved {
                // With a store its totals are the store's, and only today's source counts are kept, as the
                // last the relay heard: a relay that starts while the store is away keeps to its share of
                // what was left of a warm-up cap. The increments are this relay's.
                totals: if self.store.is_some() {
                    state
                        .totals
                        .iter()
                        .filter(|((day, scope, _), _)| *day == now && *scope == Scope::Source)
                        .map(|((day, scope, field), n)| (*day, *scope, field.clone(), *n))
                        .collect()
                } else {
                    entries(&state.totals)
                },
                pending: entries(&state.pending),
            }
        };
        let file = self.file.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let raw = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
            super::replace_file(&file, &raw)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            self.dirty.store(true, Ordering::Relaxed);
            tracing::warn!(file = %self.file.display(), "cannot save the counters; trying again");
        }
    }

    /// The counts of `day` as far as this relay knows them: the fleet's last totals and its own
    /// increments since.
    pub fn day(&self, day: u64) -> Day {
        let state = self.lock();
        let mut out = Day {
            day,
            ..Day::default()
        };
        let mut add = |(d, scope, field): &Key, n: u64| {
            if *d != day {
                return;
            }
            match scope {
                Scope::Source => *out.sources.entry(field.clone()).or_default() += n,
                Scope::Domain => {
                    let (domain, what) = field.rsplit_once('/').unwrap_or((field, ""));
                    *out.domains
                        .entry(domain.to_owned())
                        .or_default()
                        .entry(what.to_owned())
                        .or_default() += n;
                }
            }
        };
        for (k, n) in &state.totals {
            add(k, *n);
        }
        for (k, n) in &state.pending {
            add(k, *n);
        }
        out
    }

    /// The counts of `day`: with a store the fleet's, read now, and this relay's increments not yet sent;
    /// while the store does not answer (and without one), [`Counters::day`].
    pub async fn read(&self, day: u64) -> Day {
        let Some(store) = &self.store else {
            return self.day(day);
        };
        let Some(con) = store.get().await else {
            return self.day(day);
        };
        let key = |scope: Scope| {
            store
                .link()
                .key(&format!("count:{{{}}}:{day}", scope.tag()))
        };
        // Two commands, not one pipeline: in a cluster the two keys live on different shards.
        let (mut c1, mut c2) = (con.clone(), con);
        let (k1, k2) = (key(Scope::Source), key(Scope::Domain));
        let read = store
            .timed(async {
                tokio::try_join!(
                    c1.hgetall::<_, BTreeMap<String, u64>>(&k1),
                    c2.hgetall::<_, BTreeMap<String, u64>>(&k2)
                )
            })
            .await;
        match read {
            Ok((sources, domains)) => {
                let mut state = self.lock();
                for (field, n) in sources {
                    state.totals.insert((day, Scope::Source, field), n);
                }
                for (field, n) in domains {
                    state.totals.insert((day, Scope::Domain, field), n);
                }
                drop(state);
                self.day(day)
            }
            Err(e) => {
                store.failed(&e).await;
                self.day(day)
            }
        }
    }

    /// Sends the increments made since the last flush (true when it sent any); on a failure of the way
    /// to the store they wait for the next.
    async fn flush(&self) -> Result<bool, FleetError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        let pending = std::mem::take(&mut self.lock().pending);
        if pending.is_empty() {
            return Ok(false);
        }
        // One pipeline per scope: its keys share a hash tag, so they sit on one shard of a cluster, where a
        // pipeline may not span shards.
        let mut groups: BTreeMap<Scope, Vec<(Key, u64)>> = BTreeMap::new();
        for (key, n) in pending {
            groups.entry(key.1).or_default().push((key, n));
        }
        let con = store.get().await;
        let mut results = Vec::with_capacity(groups.len());
        for (scope, group) in groups {
            let result = match &con {
                None => None,
                Some(con) => {
                    let mut pipe = redis::pipe();
                    let mut con = con.clone();
                    for ((day, _, field), n) in &group {
                        let key = store
                            .link()
                            .key(&format!("count:{{{}}}:{day}", scope.tag()));
                        pipe.hincr(&key, field, *n);
                        pipe.expire(&key, (scope.days() * self.day_secs) as i64)
                            .ignore();
                    }
                    Some(store.timed(pipe.query_async::<Vec<u64>>(&mut con)).await)
                }
            };
            results.push((group, result));
        }
        let (sent, failed) = {
            let mut sent = false;
            let mut failed = None;
            let mut state = self.lock();
            for (group, result) in results {
                match result {
                    Some(Ok(totals)) => {
                        for ((key, _), total) in group.into_iter().zip(totals) {
                            state.totals.insert(key, total);
                        }
                        let now = self.today();
                        state
                            .totals
                            .retain(|(day, scope, _), _| keep(*day, *scope, now));
                        self.dirty.store(true, Ordering::Relaxed);
                        sent = true;
                    }
                    Some(Err(e)) if !transient(&e) => {
                        tracing::error!(error = %e, counters = group.len(), "the store refused the counters' increments; they are dropped");
                        self.dirty.store(true, Ordering::Relaxed);
                    }
                    other => {
                        for (key, n) in group {
                            *state.pending.entry(key).or_default() += n;
                        }
                        if let Some(Err(e)) = other {
                            failed.get_or_insert(e);
                        }
                    }
                }
            }
            (sent, failed)
        };
        match failed {
            // What went out must be saved as sent even when the other scope's increments wait.
            Some(e) if sent => {
                tracing::debug!(error = %e, "some counters not sent; they go with the next flush");
                store.failed(&e).await;
                Ok(true)
            }
            Some(e) => {
                store.failed(&e).await;
                Err(e)
            }
            None => Ok(true),
        }
    }
}

/// Sends the increments every `FLUSH_EVERY` and saves the file every `SAVE_EVERY`, until `stop` (then
/// [`Counters::close`] does both once more, after the last deliveries).
async fn upkeep(counters: Weak<Counters>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let saves = (SAVE_EVERY.as_millis() / FLUSH_EVERY.as_millis()).max(1) as u64;
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(c) = counters.upgrade() else { return };
        c.return_banks(false).await;
        let sent = match c.flush().await {
            Ok(sent) => sent,
            Err(e) => {
                tracing::debug!(error = %e, "counters not sent; they go with the next flush");
                false
            }
        };
        n += 1;
        // After a flush the file must not hold increments the store has: a restart would send them again.
        if sent || n.is_multiple_of(saves) {
            c.save().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_relay_without_a_store_counts_by_itself_per_day() {
        let dir = tempfile::tempdir().unwrap();
        let c = Counters::open(dir.path(), None, 1, DAY).unwrap();
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        c.add(Count::Sent(ip), 2);
        c.add(Count::Sent(ip), 1);
        c.add(Count::Sent("::ffff:192.0.2.10".parse().unwrap()), 1);
        c.add(Count::Delivered("Example.COM"), 5);
        c.add(Count::Bounced("example.com"), 1);
        c.add(Count::Complained("example.com"), 0);
        let day = c.day(c.today());
        assert_eq!(day.sources["192.0.2.10"], 4);
        assert_eq!(
            day.domains["example.com"],
            BTreeMap::from([("bounced".to_owned(), 1), ("delivered".to_owned(), 5)])
        );
        assert_eq!(
            c.day(c.today() - 1),
            Day {
                day: c.today() - 1,
                ..Day::default()
            }
        );
    }

    #[tokio::test]
    async fn what_only_this_relay_holds_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = Counters::open(dir.path(), None, 1, DAY).unwrap();
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        c.add(Count::Sent(ip), 3);
        c.add(Count::Complained("example.com"), 1);
        c.close().await;
        let again = Counters::open(dir.path(), None, 1, DAY).unwrap();
        assert_eq!(again.day(c.today()), c.day(c.today()));
        // Counts past their keeping are not read back.
        let old = Saved {
            totals: vec![(
                c.today() - SOURCE_DAYS,
                Scope::Source,
                "192.0.2.10".into(),
                9,
            )],
            pending: vec![(c.today(), Scope::Source, "192.0.2.10".into(), 2)],
        };
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&old).unwrap()).unwrap();
        let read = Counters::open(dir.path(), None, 1, DAY).unwrap();
        assert_eq!(read.day(c.today()).sources["192.0.2.10"], 2);
        assert!(read.day(c.today() - SOURCE_DAYS).sources.is_empty());
    }

    #[tokio::test]
    async fn a_cap_gives_exactly_its_count_of_turns_per_day_and_a_turn_given_back_comes_again() {
        let dir = tempfile::tempdir().unwrap();
        let c = Counters::open(dir.path(), None, 1, DAY).unwrap();
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        for _ in 0..3 {
            assert!(matches!(c.take(ip, 3).await, Allowance::Go { .. }));
        }
        let Allowance::Full { until_ms } = c.take(ip, 3).await else {
            panic!("a fourth turn under a cap of 3");
        };
        assert_eq!(until_ms, (c.today() + 1) * 86_400_000);
        assert_eq!(c.day(c.today()).sources["192.0.2.10"], 3);
        c.give_back(ip, c.today()).await;
        assert!(matches!(c.take(ip, 3).await, Allowance::Go { .. }));
        assert!(matches!(c.take(ip, 3).await, Allowance::Full { .. }));
        // Messages counted as sent before the address had a cap count against it.
        let other: IpAddr = "192.0.2.11".parse().unwrap();
        c.add(Count::Sent(other), 2);
        assert!(matches!(c.take(other, 3).await, Allowance::Go { .. }));
        assert!(matches!(c.take(other, 3).await, Allowance::Full { .. }));
        // And the count survives a restart.
        c.close().await;
        let again = Counters::open(dir.path(), None, 1, DAY).unwrap();
        assert!(matches!(again.take(ip, 3).await, Allowance::Full { .. }));
    }

    #[test]
    fn days_follow_the_configured_length() {
        let dir = tempfile::tempdir().unwrap();
        let c = Counters::open(dir.path(), None, 1, Duration::from_secs(10)).unwrap();
        assert_eq!(c.today(), unix_ms() / 10_000);
        assert_eq!(c.day_length(), Duration::from_secs(10));
    }
}
