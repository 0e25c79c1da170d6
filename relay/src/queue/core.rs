//! The queue's decisions, with no I/O, no clock and no randomness: the shell (`queue::mod`) passes `now`
//! and the retry jitter in, and carries out the [`Action`]s that come back (open a connection, write the
//! spool, count, emit, report outcomes to the suppression list, send a DSN). Everything the queue promises is decided here and tested
//! here, property tests included.
//!
//! A destination is a recipient domain (or, in smarthost mode, the smarthost) together with the source pool
//! of the sender's domain. Each has at most `per_destination` connections; a connection carries up to
//! `messages_per_connection` messages, asking for the next one as it finishes the last. Nothing is ever
//! scanned to find work: each destination has a FIFO of ready messages, and deferred messages sit in a
//! timer heap keyed by their next attempt, so the cost of a decision does not grow with the queue.
//!
//! All destinations together have at most `total_connections` connections (`delivery.max_connections`):
//! what bounds the relay's delivery memory and sockets. A destination with ready work and room of its own
//! that finds the total at the cap joins a FIFO of waiting destinations (once); each connection that closes
//! hands its place to the first of them, one connection each in turn, so a busy destination cannot starve
//! the others of the places that come free.
//!
//! A source address whose daily warm-up cap is used up is *full* until the next day ([`Core::source_full`]):
//! mail is routed among the pool's other addresses (rendezvous hashing without it, so no other message
//! moves), and when every address of the pool is full it waits, untried, on its own address's destination,
//! which opens no connection before the day turns. Marks are set and cleared only here, each time with the
//! ready lists of the pool routed again, so a ready list never holds a message routed elsewhere.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use crate::outcome::dsn;
use crate::outcome::{Category, Class};
use crate::spool::record::Recipients;
use crate::spool::{Location, MessageMeta, QueueId, RcptState, RcptStates, RcptStatus, RcptUpdate};
use herald_config::{Config, Retry};

use serde::Serialize;

/// Where a group of recipients is delivered: `[pool/source/]domain`, or `[pool/source/][smarthost]`.
pub type DestKey = Arc<str>;

/// Work for one delivery connection: the recipients of one message that go to one destination.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: QueueId,
    pub dest: DestKey,
    /// The recipient domain (empty in smarthost mode, where the key is not a domain).
    pub domain: Arc<str>,
    pub pool: Option<Arc<str>>,
    /// The pool's address this job leaves from (part of `dest`: a connection carries one source's jobs).
    pub source: Option<IpAddr>,
    pub meta: Arc<MessageMeta>,
    pub location: Location,
    /// Indices into `meta.recipients`.
    pub rcpts: Vec<u32>,
}

/// The reply or local verdict behind a recipient's outcome.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<String>,
    pub text: String,
    /// Whether a remote server said it (vs. a local verdict: DNS, connection, policy).
    pub remote: bool,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

/// The result of one delivery attempt of a job.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: QueueId,
    /// Per recipient index: the reply (2xx delivered, 4xx deferred, 5xx bounced).
    pub results: Vec<(u32, Reply)>,
    /// The host that answered, if any.
    pub remote_mta: Option<String>,
    /// The recipient domain, for the log.
    pub domain: Arc<str>,
    /// The TLS version of the connection, if encrypted.
    pub tls: Option<String>,
    /// The server advertised DSN and so got the sender's DSN parameters: a success is its to report, not
    /// this relay's (RFC 3461 section 5.3.1).
    pub next_hop_dsn: bool,
    /// The classifier's verdict on each failed result, when whoever read the replies classified them
    /// (delivery does, once, and acts on them too); empty: the queue classifies.
    pub verdicts: Vec<Option<Verdict>>,
}

/// One recipient as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct RecipientView {
    pub recipient: String,
    pub state: &'static str,
    pub attempts: u16,
    pub next_attempt: Option<String>,
    pub last_reply: Option<String>,
}

/// One message as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct MessageView {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: u64,
    pub received_at: String,
    pub listener: String,
    pub status: Vec<RecipientView>,
}

/// A message to put in the queue.
#[derive(Debug)]
pub struct NewEntry {
    pub meta: MessageMeta,
    pub states: RcptStates,
    pub location: Location,
}

/// The retry jitter band: a delay is the nominal one times a factor in `[1 - JITTER, 1 + JITTER)`.
pub const JITTER: f64 = 0.1;

/// Routing facts from the config and the return paths in force.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// Everything goes to the smarthost.
    pub smarthost: bool,
    /// Sender domain (lower case) to its IP pool.
    pub pools: HashMap<String, Arc<str>>,
    /// Each pool's source addresses with their weights.
    pub sources: HashMap<Arc<str>, Arc<[(IpAddr, u32)]>>,
    /// Return-path domains (lower case): mail to them is the relay's own, and a bounce of mail from them
    /// gets no DSN (it would come straight back as a report about itself).
    pub local: HashSet<String>,
}

/// What the core needs from the config; replaced whole by a reload.
#[derive(Debug, Clone)]
pub struct Settings {
    pub retry: Retry,
    pub max_age: Duration,
    /// A recipient deferred this long gets its sender one delayed DSN, if the sender asked (NOTIFY=DELAY).
    pub delay_warning: Duration,
    /// Connections to one destination (`delivery.per_domain.max_connections`).
    pub per_destination: usize,
    /// Connections to all destinations together (`delivery.max_connections`, or its default).
    pub total_connections: usize,
    pub routing: Routing,
    /// The warm-up of each capped source address (its pools' schedules and its start, as written): a
    /// reload that changes an address's keeps its mark of a full day, one that changes it lifts the mark.
    pub warmups: HashMap<IpAddr, String>,
}

impl Settings {
    /// The settings of `config`, with `local` as the return-path domains in force; `memory_limit` (the
    /// container's, in bytes) sizes the connection cap when the config names none.
    pub fn new(config: &Config, local: HashSet<String>, memory_limit: Option<u64>) -> Settings {
        Settings {
            retry: config.delivery.retry.clone(),
            max_age: config.delivery.max_age,
            delay_warning: config.delivery.delay_warning,
            per_destination: config.delivery.per_domain.max_connections as usize,
            total_connections: crate::resources::delivery_connections(config, memory_limit),
            routing: Routing {
                smarthost: config.delivery.smarthost.is_some(),
                pools: config
                    .domains
                    .iter()
                    .filter_map(|d| {
                        Some((
                            d.name.to_ascii_lowercase(),
                            Arc::from(d.ip_pool.as_deref()?),
                        ))
                    })
                    .collect(),
                sources: config
                    .ip_pools
                    .iter()
                    .map(|p| {
                        (
                            Arc::from(p.name.as_str()),
                            p.sources.iter().map(|s| (s.address, s.weight)).collect(),
                        )
                    })
                    .collect(),
                local,
            },
            warmups: {
                let mut w: HashMap<IpAddr, String> = HashMap::new();
                for p in &config.ip_pools {
                    let Some(warmup) = &p.warmup else { continue };
                    for s in &p.sources {
                        if let Some(start) = &s.warmup_start {
                            w.entry(s.address)
                                .or_default()
                                .push_str(&format!("{:?}@{start};", warmup.caps()));
                        }
                    }
                }
                w
            },
        }
    }

    /// The nominal delay before attempt `attempts + 1`: `first × factor^(attempts-1)`, at most `max`.
    pub fn nominal_delay(&self, attempts: u16) -> Duration {
        let r = &self.retry;
        let exp = r.factor.powi(i32::from(attempts.saturating_sub(1)).min(64));
        Duration::from_secs_f64((r.first.as_secs_f64() * exp).min(r.max.as_secs_f64()))
    }
}

/// A classifier's verdict on a failure reply.
pub type Verdict = (Class, Category);

/// Something for the shell to do.
#[derive(Debug)]
pub enum Action {
    /// Open a delivery connection for this job; its destination has room.
    Start(Job),
    /// Write these recipient states to the spool.
    Record {
        id: QueueId,
        updates: Vec<RcptUpdate>,
    },
    /// What became of one recipient in an attempt: counted, emitted and logged by the shell.
    Outcome(Outcome),
    /// Tell the sender about these recipients: failed, or relayed or delayed when the sender asked to hear.
    Dsn {
        meta: Arc<MessageMeta>,
        location: Location,
        notices: Vec<dsn::Notice>,
        /// The final states of those recipients, to write to the spool once the DSN is durable: a crash in
        /// between then retries them (at worst a second DSN) instead of losing the DSN.
        then_record: Vec<RcptUpdate>,
    },
    /// Failed recipients whose sender gets no DSN, and why.
    NoDsn {
        id: QueueId,
        failed: usize,
        why: &'static str,
    },
}

/// One recipient's result in one attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub meta: Arc<MessageMeta>,
    /// The recipient's index in `meta.recipients`.
    pub index: u32,
    /// Deferred, delivered, bounced or expired.
    pub status: RcptStatus,
    pub reply: Reply,
    pub verdict: Option<Verdict>,
    pub attempts: u16,
    /// Time since the message was accepted; the delivery latency when the outcome is final.
    pub age_ms: u64,
}

impl Outcome {
    pub fn id(&self) -> QueueId {
        self.meta.id
    }

    pub fn recipient(&self) -> &str {
        self.meta
            .recipients
            .get(self.index as usize)
            .unwrap_or_default()
    }
}

/// One queued message. A million of them must fit in a few hundred megabytes. A message is one heap block
/// (this, the envelope inline) behind a pointer in the map, plus its recipients' text: a map node holds
/// eleven entries and ids that only grow leave it about half full, so what sits inline there is paid
/// nearly twice. One recipient's slot and last reply sit inline too; more get a block of their own. The
/// shared envelope a delivery or an outcome carries (`Arc<MessageMeta>`) is made when one is needed:
/// those are few at a time, the queued messages are many.
struct Entry {
    meta: MessageMeta,
    location: Location,
    /// The earliest timer in the heap for this message: a later one is not pushed again, and a heap entry
    /// that is not this one is stale and skipped. (A timer is always in the future, so never 0.)
    armed: Option<NonZeroU64>,
    rcpts: Rcpts,
}

// 168 bytes, a 176-byte malloc block: a million queued messages cost 176 MB here, and each malloc size
// class further costs 16 MB more. Past this one, growing it should be a decision.
const _: () = assert!(std::mem::size_of::<Entry>() <= 184);

/// Each recipient's slot and last failure reply (none until it fails, its text shared with every other
/// message that got the same one), in the order of `meta.recipients`.
enum Rcpts {
    One {
        slot: Slot,
        reply: Option<Arc<str>>,
    },
    /// None, or more than one.
    Many(Box<ManyRcpts>),
}

struct ManyRcpts {
    slots: Box<[Slot]>,
    replies: Option<Box<[Option<Arc<str>>]>>,
}

const _: () = assert!(std::mem::size_of::<Rcpts>() == 32);

impl Rcpts {
    fn new(mut slots: Vec<Slot>) -> Rcpts {
        match (slots.len(), slots.pop()) {
            (1, Some(slot)) => Rcpts::One { slot, reply: None },
            (_, last) => {
                slots.extend(last);
                Rcpts::Many(Box::new(ManyRcpts {
                    slots: slots.into_boxed_slice(),
                    replies: None,
                }))
            }
        }
    }

    fn slots(&self) -> &[Slot] {
        match self {
            Rcpts::One { slot, .. } => std::slice::from_ref(slot),
            Rcpts::Many(m) => &m.slots,
        }
    }

    fn slots_mut(&mut self) -> &mut [Slot] {
        match self {
            Rcpts::One { slot, .. } => std::slice::from_mut(slot),
            Rcpts::Many(m) => &mut m.slots,
        }
    }

    /// Recipient `i`'s last failure reply.
    fn reply(&self, i: usize) -> Option<&str> {
        match self {
            Rcpts::One { reply, .. } => reply.as_deref().filter(|_| i == 0),
            Rcpts::Many(m) => m.replies.as_deref()?.get(i)?.as_deref(),
        }
    }

    fn set_reply(&mut self, i: usize, text: Arc<str>) {
        match self {
            Rcpts::One { reply, .. } => {
                if i == 0 {
                    *reply = Some(text);
                }
            }
            Rcpts::Many(m) => {
                let n = m.slots.len();
                if let Some(r) = m
                    .replies
                    .get_or_insert_with(|| vec![None; n].into_boxed_slice())
                    .get_mut(i)
                {
                    *r = Some(text);
                }
            }
        }
    }
}

/// A recipient's persisted state with the two flags that live in memory only, laid out flat so that the
/// flags sit in what would be padding (16 bytes in all).
#[derive(Debug, Clone, Copy)]
struct Slot {
    next_attempt_ms: u64,
    attempts: u16,
    status: RcptStatus,
    /// In a job handed to a connection that has not reported back.
    in_flight: bool,
    /// Its delay notice went out, or will not. In memory only: a message loaded past its
    /// `delivery.delay_warning` point counts as told, since whether it was is not on disk and a second
    /// notice is the worse mistake.
    delay_noticed: bool,
}

// A million queued recipients cost 16 MB here; a field that breaks the packing should be a decision.
const _: () = assert!(std::mem::size_of::<Slot>() == 16);
// And a state's size, so that a message's slots take over the block its states came in.
const _: () = assert!(std::mem::size_of::<Slot>() == std::mem::size_of::<RcptState>());

impl Slot {
    fn new(s: RcptState, delay_noticed: bool) -> Slot {
        Slot {
            next_attempt_ms: s.next_attempt_ms,
            attempts: s.attempts,
            status: s.status,
            in_flight: false,
            delay_noticed,
        }
    }

    fn state(&self) -> RcptState {
        RcptState {
            status: self.status,
            attempts: self.attempts,
            next_attempt_ms: self.next_attempt_ms,
        }
    }
}

/// Texts that many queued messages have in common: listener names, senders, and failure replies (a
/// refused connection, a greylisting line). Each message shares one copy with the others. Bounded: when
/// full it starts over, which only costs sharing, never correctness.
#[derive(Default)]
struct Strings(HashSet<Arc<str>>);

impl Strings {
    const MAX: usize = 4096;

    fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(t) = self.0.get(text) {
            return t.clone();
        }
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        let t: Arc<str> = Arc::from(text);
        self.0.insert(t.clone());
        t
    }
}

#[derive(Default)]
struct Dest {
    /// The pool and source address in the key, if any.
    pool: Option<Arc<str>>,
    source: Option<IpAddr>,
    /// The recipient domain.
    domain: Arc<str>,
    ready: VecDeque<QueueId>,
    connections: usize,
    /// On the FIFO of destinations waiting for a place under the total cap.
    waiting: bool,
    /// No new connection before this time (ms): the fleet had no room for one (see [`Core::hold`]).
    held_until: u64,
}

/// A copy-forward of the oldest spool segment that the shell carries out.
#[derive(Debug)]
pub struct Compaction {
    pub segment: u64,
    /// Messages to copy (none: the segment only needs deleting).
    pub copies: Vec<(QueueId, Arc<MessageMeta>, Vec<RcptState>, Location)>,
}

/// What follows a copy-forward.
#[derive(Debug)]
pub struct Moved {
    /// State records to write again: a state may have changed while the copy was made.
    pub rewrite: Vec<(QueueId, Vec<RcptUpdate>)>,
    /// Messages that finished meanwhile, to record as deleted.
    pub deleted: Vec<QueueId>,
    /// The old segment can go once those writes are durable.
    pub reclaim: bool,
}

/// Every message waiting for delivery and every decision about it.
pub struct Core {
    settings: Settings,
    messages: BTreeMap<QueueId, Box<Entry>>,
    dests: HashMap<DestKey, Dest>,
    /// Connections open to all destinations: the sum of their `connections`.
    connections: usize,
    /// Destinations that found the total at the cap, in the order they came; each once (`Dest::waiting`).
    /// A destination stays in `dests` while it is here.
    waiting: VecDeque<DestKey>,
    timers: BinaryHeap<Reverse<(u64, QueueId)>>,
    /// When held destinations may try for a connection again.
    holds: BinaryHeap<Reverse<(u64, DestKey)>>,
    /// Source addresses that may not send now, and until when.
    marks: Marks,
    /// When marked addresses may send again: to every domain (a full one), or to one (a suspended one).
    refills: BinaryHeap<Reverse<Refill>>,
    /// Live messages and bytes per spool segment.
    segments: BTreeMap<u64, (usize, u64)>,
    /// Messages with recipients still pending, per destination domain (for `herald_queue_depth`).
    depth: HashMap<String, i64>,
    strings: Strings,
    stopping: bool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("messages", &self.messages.len())
            .field("destinations", &self.dests.len())
            .finish_non_exhaustive()
    }
}

pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// The distinct domains (lower case) of a message's recipients that have no final outcome yet.
fn pending(recipients: &Recipients, states: impl Iterator<Item = RcptStatus>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (r, s) in recipients.iter().zip(states) {
        if s.is_final() {
            continue;
        }
        let d = domain_of(r).to_ascii_lowercase();
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

impl Core {
    pub fn new(settings: Settings) -> Core {
        Core {
            settings,
            messages: BTreeMap::new(),
            dests: HashMap::new(),
            connections: 0,
            waiting: VecDeque::new(),
            timers: BinaryHeap::new(),
            holds: BinaryHeap::new(),
            marks: Marks::default(),
            refills: BinaryHeap::new(),
            segments: BTreeMap::new(),
            depth: HashMap::new(),
            strings: Strings::default(),
            stopping: false,
        }
    }

    /// Messages in the queue.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// When the oldest message was accepted (Unix ms). Queue ids grow with the time of acceptance, so the
    /// first id is the oldest message, found without a scan.
    pub fn oldest_received_ms(&self) -> Option<u64> {
        self.messages.values().next().map(|e| e.meta.received_at_ms)
    }

    /// Messages with pending recipients per destination domain.
    pub fn depth(&self) -> Vec<(String, i64)> {
        self.depth.iter().map(|(d, n)| (d.clone(), *n)).collect()
    }

    /// When the next deferred recipient is due (Unix ms).
    pub fn next_due(&self) -> Option<u64> {
        let timer = self.timers.peek().map(|Reverse((due, _))| *due);
        let hold = self.holds.peek().map(|Reverse((until, _))| *until);
        let refill = self.refills.peek().map(|Reverse((until, _, _))| *until);
        [timer, hold, refill].into_iter().flatten().min()
    }

    /// No connection is open: after [`Core::stop`], the shell may finish.
    pub fn idle(&self) -> bool {
        self.connections == 0
    }

    /// Delivery connections open now, all destinations together.
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// Hands out no more work; connections still open report back and close.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// New settings from a reload. Routing may have changed (pools, smarthost, return-path domains), so
    /// every waiting message is routed again; a larger connection cap is used at once, and a smaller one as
    /// connections close.
    pub fn reconfigure(&mut self, settings: Settings, now: u64) -> Vec<Action> {
        // A full address stays full unless the reload changed its warm-up (a lifted or raised cap; one still
        // over its cap is marked again by its next refused turn).
        let before = self.marks.full.len();
        self.marks.full.retain(|a, _| {
            settings
                .warmups
                .get(a)
                .is_some_and(|w| self.settings.warmups.get(a) == Some(w))
        });
        let rerouted = settings.routing != self.settings.routing || self.marks.full.len() != before;
        self.settings = settings;
        let mut out = Vec::new();
        if rerouted {
            // Keys change with routing: every waiting message is routed again, once, and destinations wait
            // for a place again under their new keys.
            self.waiting.clear();
            for d in self.dests.values_mut() {
                d.ready.clear();
                d.waiting = false;
                // A hold for a full source ends with its mark; one for a lease or a rate is short, and a
                // connection that finds no room again is held again.
                d.held_until = 0;
            }
            self.dests.retain(|_, d| d.connections > 0);
            let ids: Vec<QueueId> = self.messages.keys().copied().collect();
            for id in ids {
                self.make_ready(id, now, &mut out);
            }
        } else {
            // Perhaps larger caps: the destinations that waited first, then every one with ready work.
            self.serve_waiting(now, &mut out);
            let keys: Vec<DestKey> = self.dests.keys().cloned().collect();
            for key in keys {
                self.kick(&key, now, &mut out);
            }
        }
        out
    }

    /// Adds a spooled message.
    pub fn insert(&mut self, new: NewEntry, now: u64) -> Vec<Action> {
        let id = new.meta.id;
        let n = new.meta.recipients.len();
        let seg = self.segments.entry(new.location.segment).or_default();
        seg.0 += 1;
        seg.1 += new.location.len;
        let warn_at = new
            .meta
            .received_at_ms
            .saturating_add(self.settings.delay_warning.as_millis() as u64);
        let told = now >= warn_at;
        let slots: Vec<Slot> = match new.states {
            // In the states' own block (a slot is a state's size): a start hands over every message of the
            // spool, and a new block for each would leave the old one behind as a hole in the heap.
            RcptStates::Many(states) if states.len() == n => {
                states.into_iter().map(|s| Slot::new(s, told)).collect()
            }
            states => (0..n)
                .map(|i| Slot::new(states.get(i).copied().unwrap_or(RcptState::QUEUED), told))
                .collect(),
        };
        let pending = pending(&new.meta.recipients, slots.iter().map(|s| s.status));
        self.adjust_depth(&pending, 1);
        self.messages.insert(
            id,
            Box::new(Entry {
                meta: compact(new.meta, &mut self.strings),
                location: new.location,
                armed: None,
                rcpts: Rcpts::new(slots),
            }),
        );
        let mut out = Vec::new();
        self.make_ready(id, now, &mut out);
        out
    }

    /// Records an attempt: each recipient is delivered, deferred (its next attempt a jittered backoff
    /// away, never past its expiry), bounced, or expired. `verdicts[i]` classifies `attempt.results[i]`
    /// when it is a failure; `jitter` is drawn uniformly from [0, 1) for this attempt.
    pub fn record(
        &mut self,
        attempt: Attempt,
        verdicts: &[Option<Verdict>],
        now: u64,
        jitter: f64,
    ) -> Vec<Action> {
        let id = attempt.id;
        let max_age = self.settings.max_age.as_millis() as u64;
        let delay_warning = self.settings.delay_warning.as_millis() as u64;
        let mut out = Vec::new();
        let Some(e) = self.messages.get_mut(&id) else {
            return out;
        };
        let e = &mut **e;
        // What the outcomes, and a DSN, carry of the envelope.
        let meta = Arc::new(e.meta.clone());
        let pending_before = pending(&e.meta.recipients, e.rcpts.slots().iter().map(|s| s.status));
        let expires_at = e.meta.received_at_ms.saturating_add(max_age);
        let warn_at = e.meta.received_at_ms.saturating_add(delay_warning);
        let mut updates = Vec::with_capacity(attempt.results.len());
        // What the sender is to hear of: failures, and the successes and delays it asked for.
        let mut notices = Vec::new();
        let mut unwanted = 0;
        let mut any_deferred = false;
        for (k, (idx, reply)) in attempt.results.into_iter().enumerate() {
            let i = idx as usize;
            let Some(st) = e.rcpts.slots_mut().get_mut(i) else {
                continue;
            };
            if st.status.is_final() {
                // A recipient has one final outcome; a second report about it changes nothing.
                continue;
            }
            st.in_flight = false;
            st.attempts = st.attempts.saturating_add(1);
            let rcpt = &meta.recipients[i];
            let verdict = if reply.code >= 400 {
                verdicts.get(k).copied().flatten()
            } else {
                None
            };
            let wants = meta.rcpt_dsn(i);
            if reply.code < 400 {
                st.status = RcptStatus::Delivered;
                // A next hop that took the DSN parameters reports the delivery itself.
                if wants.wants_success() && !attempt.next_hop_dsn {
                    notices.push(dsn::Notice {
                        recipient: rcpt.to_owned(),
                        action: dsn::Action::Relayed,
                        original_recipient: wants.orcpt.clone(),
                        status: reply.enhanced.clone().unwrap_or_else(|| "2.0.0".to_owned()),
                        diagnostic: reply.to_string(),
                        remote_mta: attempt.remote_mta.clone(),
                        remote: reply.remote,
                    });
                }
            } else if reply.code < 500 && now < expires_at {
                st.status = RcptStatus::Deferred;
                let nominal = self.settings.nominal_delay(st.attempts).as_secs_f64();
                let factor = 1.0 - JITTER + jitter.clamp(0.0, 1.0) * 2.0 * JITTER;
                let backoff = (nominal * factor * 1000.0) as u64;
                st.next_attempt_ms = now.saturating_add(backoff).min(expires_at);
                any_deferred = true;
                if now >= warn_at
                    && !std::mem::replace(&mut st.delay_noticed, true)
                    && wants.wants_delay()
                {
                    notices.push(dsn::Notice {
                        recipient: rcpt.to_owned(),
                        action: dsn::Action::Delayed {
                            until_ms: expires_at,
                        },
                        original_recipient: wants.orcpt.clone(),
                        status: reply
                            .enhanced
                            .clone()
                            .unwrap_or_else(|| format!("{}.0.0", reply.code / 100)),
                        diagnostic: reply.to_string(),
                        remote_mta: attempt.remote_mta.clone(),
                        remote: reply.remote,
                    });
                }
            } else {
                let expired = reply.code < 500;
                st.status = if expired {
                    RcptStatus::Expired
                } else {
                    RcptStatus::Bounced
                };
                if !wants.wants_failure() {
                    unwanted += 1;
                } else {
                    notices.push(dsn::Notice {
                        recipient: rcpt.to_owned(),
                        action: dsn::Action::Failed,
                        original_recipient: wants.orcpt.clone(),
                        status: if expired {
                            "4.4.7".to_owned()
                        } else {
                            reply
                                .enhanced
                                .clone()
                                .unwrap_or_else(|| format!("{}.0.0", reply.code / 100))
                        },
                        diagnostic: if expired {
                            format!("delivery time expired; last error: {reply}")
                        } else {
                            reply.to_string()
                        },
                        remote_mta: attempt.remote_mta.clone(),
                        remote: reply.remote,
                    });
                }
            }
            let state = st.state();
            if reply.code >= 400 {
                e.rcpts
                    .set_reply(i, self.strings.intern(&reply.to_string()));
            }
            updates.push(RcptUpdate { index: idx, state });
            out.push(Action::Outcome(Outcome {
                meta: meta.clone(),
                index: idx,
                status: state.status,
                reply,
                verdict,
                attempts: state.attempts,
                age_ms: now.saturating_sub(meta.received_at_ms),
            }));
        }
        let pending_after = pending(&e.meta.recipients, e.rcpts.slots().iter().map(|s| s.status));
        let location = e.location;
        let done = e.rcpts.slots().iter().all(|s| s.status.is_final());
        let gone: Vec<String> = pending_before
            .into_iter()
            .filter(|d| !pending_after.contains(d))
            .collect();
        self.adjust_depth(&gone, -1);
        if unwanted > 0 {
            out.push(Action::NoDsn {
                id,
                failed: unwanted,
                why: "failure of a recipient whose sender asked for no failure notice (NOTIFY): no DSN",
            });
        }
        if !notices.is_empty() {
            let failed = notices
                .iter()
                .filter(|f| f.action == dsn::Action::Failed)
                .count();
            // Such senders hear of nothing; only their failures are worth a log line.
            let unheard = if meta.sender.is_empty() {
                Some("bounce of a message from the null sender: no DSN")
            } else if self.is_local(domain_of(&meta.sender)) {
                Some("bounce of a message from a return-path address: no DSN")
            } else {
                None
            };
            if let Some(why) = unheard {
                if failed > 0 {
                    out.push(Action::NoDsn { id, failed, why });
                }
            } else {
                // The failures the DSN reports; one the sender asked not to hear of is recorded at once.
                let (failed, rest) = updates.into_iter().partition(|u: &RcptUpdate| {
                    matches!(u.state.status, RcptStatus::Bounced | RcptStatus::Expired)
                        && meta.rcpt_dsn(u.index as usize).wants_failure()
                });
                updates = rest;
                out.push(Action::Dsn {
                    meta,
                    location,
                    notices,
                    then_record: failed,
                });
            }
        }
        if !updates.is_empty() {
            out.push(Action::Record { id, updates });
        }
        if done {
            self.remove(id);
        } else if any_deferred {
            self.make_ready(id, now, &mut out);
        }
        out
    }

    /// The next job for a destination: the first ready message that still has due recipients there.
    /// None while stopping.
    /// Some destination waits for a place under the total connection cap.
    pub fn places_wanted(&self) -> bool {
        !self.waiting.is_empty()
    }

    pub fn next_job(&mut self, key: &DestKey, now: u64) -> Option<Job> {
        if self.stopping {
            return None;
        }
        loop {
            let id = self.dests.get_mut(key)?.ready.pop_front()?;
            let Some(e) = self.messages.get(&id) else {
                continue;
            };
            let mut rcpts = Vec::new();
            let mut target = None;
            for (i, s) in e.rcpts.slots().iter().enumerate() {
                if s.status.is_final()
                    || s.in_flight
                    || (s.status == RcptStatus::Deferred && s.next_attempt_ms > now)
                {
                    continue;
                }
                if let Some(route) = self.route(id, &e.meta.sender, &e.meta.recipients[i])
                    && route.key == *key
                {
                    rcpts.push(i as u32);
                    target.get_or_insert(route);
                }
            }
            let Some(route) = target else {
                continue;
            };
            let job = Job {
                id,
                dest: key.clone(),
                domain: route.domain,
                pool: route.pool,
                source: route.source,
                meta: Arc::new(e.meta.clone()),
                location: e.location,
                rcpts,
            };
            if let Some(e) = self.messages.get_mut(&id) {
                for &i in &job.rcpts {
                    if let Some(s) = e.rcpts.slots_mut().get_mut(i as usize) {
                        s.in_flight = true;
                    }
                }
            }
            return Some(job);
        }
    }

    /// A connection of `key` closed: its place goes to the destinations waiting for one, in turn, and then
    /// to `key`'s own ready work (which waits behind them when they took every place).
    pub fn connection_closed(&mut self, key: &DestKey, now: u64) -> Vec<Action> {
        if let Some(d) = self.dests.get_mut(key)
            && d.connections > 0
        {
            d.connections -= 1;
            self.connections -= 1;
        }
        let mut out = Vec::new();
        self.serve_waiting(now, &mut out);
        self.kick(key, now, &mut out);
        self.forget_if_idle(key);
        out
    }

    /// A connection for `job` found no room for itself in the fleet (every lease of the destination is
    /// taken by other relays): the job goes back untried (it is not an attempt: no retry delay, no attempt
    /// counted) and the destination opens no new connection before `until`; connections it has go on.
    pub fn hold(&mut self, job: &Job, until: u64, now: u64) -> Vec<Action> {
        let d = self.dests.entry(job.dest.clone()).or_default();
        if until > d.held_until {
            d.held_until = until;
            self.holds.push(Reverse((until, job.dest.clone())));
        }
        self.give_back(job, now)
    }

    /// A job that was never attempted goes back to the ready list.
    pub fn give_back(&mut self, job: &Job, now: u64) -> Vec<Action> {
        if let Some(e) = self.messages.get_mut(&job.id) {
            for &i in &job.rcpts {
                if let Some(s) = e.rcpts.slots_mut().get_mut(i as usize) {
                    s.in_flight = false;
                }
            }
        }
        let mut out = Vec::new();
        self.make_ready(job.id, now, &mut out);
        out
    }

    /// `job`'s source address `source` has used up its daily cap: the job goes back untried (not an attempt),
    /// and the address sends nothing more until `until` (the next day, ms). Its waiting mail goes to the pool's other
    /// addresses, or, when every one of them is full too, waits for the day to turn.
    pub fn source_full(&mut self, job: &Job, source: IpAddr, until: u64, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if until > now {
            let newly = !self.marks.full.contains_key(&source);
            let mark = self.marks.full.entry(source).or_insert(0);
            if until > *mark {
                *mark = until;
                self.refills.push(Reverse((until, source, None)));
            }
            // Once per day: later refusals (jobs that were already under way) find the mail moved.
            if newly {
                self.reroute(|d| d.source == Some(source), source, now, &mut out);
            }
        }
        out.extend(self.give_back(job, now));
        out
    }

    /// `job`'s source address `source` is suspended for the provider of `job`'s domain until `until` (ms): the
    /// job goes back untried (not an attempt), and the domain's mail goes from the pool's other addresses
    /// meanwhile, or, when every one of them is suspended or full too, waits for the suspension to end.
    /// The provider's other domains are marked as their own jobs find the suspension.
    pub fn source_suspended(
        &mut self,
        job: &Job,
        source: IpAddr,
        until: u64,
        now: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if until > now && !job.domain.is_empty() {
            let marks = self.marks.suspended.entry(job.domain.clone()).or_default();
            let newly = !marks.contains_key(&source);
            let mark = marks.entry(source).or_insert(0);
            if until > *mark {
                *mark = until;
                self.refills
                    .push(Reverse((until, source, Some(job.domain.clone()))));
            }
            if newly {
                tracing::info!(%source, domain = %job.domain, until = %crate::queue::rfc3339_ms(until),
                    "the source is suspended for this domain's provider; its mail goes from the pool's other addresses meanwhile");
                let domain = job.domain.clone();
                self.reroute(
                    |d| d.source == Some(source) && d.domain == domain,
                    source,
                    now,
                    &mut out,
                );
            }
        }
        out.extend(self.give_back(job, now));
        out
    }

    /// Routes again the ready messages of the destinations of pools that hold `source` and that `pick`
    /// picks: a change of `source`'s fullness changes where some of them go.
    fn reroute(
        &mut self,
        pick: impl Fn(&Dest) -> bool,
        source: IpAddr,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let routing = &self.settings.routing;
        let has = |pool: &Option<Arc<str>>| {
            pool.as_ref()
                .and_then(|p| routing.sources.get(p))
                .is_some_and(|s| s.iter().any(|(a, _)| *a == source))
        };
        let mut ids: Vec<QueueId> = Vec::new();
        for d in self.dests.values_mut() {
            if pick(d) && has(&d.pool) {
                ids.extend(d.ready.drain(..));
            }
        }
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.make_ready(id, now, out);
        }
        let keys: Vec<DestKey> = self.dests.keys().cloned().collect();
        for key in keys {
            self.forget_if_idle(&key);
        }
    }

    /// Whether `source` has used up today's cap.
    pub fn is_full(&self, source: IpAddr) -> bool {
        self.marks.full.contains_key(&source)
    }

    /// Source addresses over their daily cap, with when they send again (ms).
    pub fn full_sources(&self) -> Vec<(IpAddr, u64)> {
        self.marks.full.iter().map(|(a, u)| (*a, *u)).collect()
    }

    /// Makes ready the messages whose deferred recipients are due by `now`.
    pub fn due(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(Reverse((until, _, _))) = self.refills.peek() {
            if *until > now {
                break;
            }
            let Some(Reverse((_, source, domain))) = self.refills.pop() else {
                break;
            };
            match domain {
                None => {
                    if self.marks.full.get(&source).is_some_and(|&u| u <= now) {
                        self.marks.full.remove(&source);
                        tracing::debug!(%source, "a new day: the source sends again");
                        self.reroute(
                            |d| d.pool.is_some() && d.source.is_some(),
                            source,
                            now,
                            &mut out,
                        );
                    }
                }
                Some(domain) => {
                    let ended = self
                        .marks
                        .suspended
                        .get(&domain)
                        .and_then(|m| m.get(&source))
                        .is_some_and(|&u| u <= now);
                    if ended {
                        if let Some(m) = self.marks.suspended.get_mut(&domain) {
                            m.remove(&source);
                            if m.is_empty() {
                                self.marks.suspended.remove(&domain);
                            }
                        }
                        tracing::debug!(%source, %domain, "the suspension has ended: the source sends to the domain again");
                        self.reroute(
                            |d| d.pool.is_some() && d.source.is_some() && d.domain == domain,
                            source,
                            now,
                            &mut out,
                        );
                    }
                }
            }
        }
        while let Some(Reverse((until, _))) = self.holds.peek() {
            if *until > now {
                break;
            }
            if let Some(Reverse((_, key))) = self.holds.pop() {
                self.kick(&key, now, &mut out);
                self.forget_if_idle(&key);
            }
        }
        while let Some(Reverse((due, id))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            match self.messages.get_mut(&id) {
                Some(e) if e.armed.map(NonZeroU64::get) == Some(due) => e.armed = None,
                // Superseded by an earlier timer, or the message is gone.
                _ => continue,
            }
            self.make_ready(id, now, &mut out);
        }
        out
    }

    /// Retries deferred recipients now (of one message, or all). False when `id` is not queued.
    pub fn flush(&mut self, id: Option<QueueId>, now: u64) -> (bool, Vec<Action>) {
        let ids: Vec<QueueId> = match id {
            Some(id) => self
                .messages
                .contains_key(&id)
                .then_some(id)
                .into_iter()
                .collect(),
            None => self.messages.keys().copied().collect(),
        };
        let found = !ids.is_empty();
        let mut out = Vec::new();
        for id in ids {
            if let Some(e) = self.messages.get_mut(&id) {
                for s in e.rcpts.slots_mut().iter_mut() {
                    if s.status == RcptStatus::Deferred {
                        s.next_attempt_ms = now;
                    }
                }
            }
            self.make_ready(id, now, &mut out);
        }
        (found, out)
    }

    /// Removes a message (an operator's delete, or every recipient final). False when not queued.
    pub fn remove(&mut self, id: QueueId) -> bool {
        let Some(e) = self.messages.remove(&id) else {
            return false;
        };
        let pending = pending(&e.meta.recipients, e.rcpts.slots().iter().map(|s| s.status));
        self.adjust_depth(&pending, -1);
        if let Some(seg) = self.segments.get_mut(&e.location.segment) {
            seg.0 = seg.0.saturating_sub(1);
            seg.1 = seg.1.saturating_sub(e.location.len);
        }
        true
    }

    /// The number of queued messages, and up to `limit` of them in id order after `after` (a cursor).
    pub fn list(&self, after: Option<QueueId>, limit: usize) -> (usize, Vec<MessageView>) {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let views = self
            .messages
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(id, e)| view(*id, e))
            .collect();
        (self.messages.len(), views)
    }

    pub fn get(&self, id: QueueId) -> Option<MessageView> {
        self.messages.get(&id).map(|e| view(id, e))
    }

    /// The state of recipient `index` of message `id`, if it is queued.
    pub fn state(&self, id: QueueId, index: usize) -> Option<RcptState> {
        self.messages
            .get(&id)?
            .rcpts
            .slots()
            .get(index)
            .map(Slot::state)
    }

    /// What to do about the oldest closed spool segment, if anything: delete it when nothing in it is
    /// queued, or copy forward the few messages that keep a mostly finished one alive. `segments` are the
    /// spool's (number, bytes), oldest first; `current` is the segment being written.
    pub fn plan_compaction(&self, current: u64, segments: &[(u64, u64)]) -> Option<Compaction> {
        let &(oldest, size) = segments.first()?;
        if oldest >= current {
            return None;
        }
        let (live, live_bytes) = self.segments.get(&oldest).copied().unwrap_or((0, 0));
        let closed = segments.iter().filter(|(n, _)| *n < current).count();
        let mut copies = Vec::new();
        if live > 0 {
            // Copy forward only when it frees much more than it writes.
            if closed < 2 || live_bytes * 2 > size {
                return None;
            }
            for (id, e) in &self.messages {
                if e.location.segment == oldest && !e.rcpts.slots().iter().any(|s| s.in_flight) {
                    let states = e.rcpts.slots().iter().map(Slot::state).collect();
                    copies.push((*id, Arc::new(e.meta.clone()), states, e.location));
                }
                if copies.len() == live {
                    break;
                }
            }
            if copies.len() < live {
                // Some are being delivered right now; try again later.
                return None;
            }
        }
        Some(Compaction {
            segment: oldest,
            copies,
        })
    }

    /// Points copied messages at their new records.
    pub fn moved(&mut self, segment: u64, moved: Vec<(QueueId, Location)>, done: bool) -> Moved {
        let mut rewrite = Vec::new();
        let mut deleted = Vec::new();
        for (id, new) in moved {
            let Some(e) = self.messages.get_mut(&id) else {
                deleted.push(id);
                continue;
            };
            if e.location.segment == segment {
                let old = e.location;
                e.location = new;
                if let Some(seg) = self.segments.get_mut(&old.segment) {
                    seg.0 = seg.0.saturating_sub(1);
                    seg.1 = seg.1.saturating_sub(old.len);
                }
                let seg = self.segments.entry(new.segment).or_default();
                seg.0 += 1;
                seg.1 += new.len;
            }
            let updates = e
                .rcpts
                .slots()
                .iter()
                .enumerate()
                .map(|(i, s)| RcptUpdate {
                    index: i as u32,
                    state: s.state(),
                })
                .collect();
            rewrite.push((id, updates));
        }
        let live = self.segments.get(&segment).map_or(0, |s| s.0);
        let reclaim = done && live == 0;
        if reclaim {
            self.segments.remove(&segment);
        }
        Moved {
            rewrite,
            deleted,
            reclaim,
        }
    }

    /// Until when `source` may not send to `domain`, if it may not now.
    fn blocked_until(&self, source: IpAddr, domain: &str) -> Option<u64> {
        self.marks
            .until(source, (!self.settings.routing.smarthost).then_some(domain))
    }

    /// Where a recipient goes now, with full sources left out.
    fn route(&self, id: QueueId, sender: &str, address: &str) -> Option<Route> {
        dest_of(&self.settings.routing, &self.marks, id, sender, address)
    }

    fn is_local(&self, domain: &str) -> bool {
        self.settings
            .routing
            .local
            .contains(&domain.to_ascii_lowercase())
    }

    fn adjust_depth(&mut self, domains: &[String], by: i64) {
        for d in domains {
            let n = self.depth.entry(d.clone()).or_insert(0);
            *n += by;
            if *n <= 0 {
                self.depth.remove(d);
            }
        }
    }

    /// Puts a message on the ready list of every destination that has a recipient due now, and arms a timer
    /// for the ones due later.
    fn make_ready(&mut self, id: QueueId, now: u64, out: &mut Vec<Action>) {
        let Some(e) = self.messages.get(&id) else {
            return;
        };
        let mut dests: Vec<Route> = Vec::new();
        let mut earliest: Option<u64> = None;
        let mut nowhere: Vec<u32> = Vec::new();
        // Waiting for a full source: past `max_age` they expire untried.
        let mut expired: Vec<u32> = Vec::new();
        let expires_at = e
            .meta
            .received_at_ms
            .saturating_add(self.settings.max_age.as_millis() as u64);
        for (i, s) in e.rcpts.slots().iter().enumerate() {
            if s.status.is_final() || s.in_flight {
                continue;
            }
            if s.status == RcptStatus::Deferred && s.next_attempt_ms > now {
                earliest =
                    Some(earliest.map_or(s.next_attempt_ms, |t: u64| t.min(s.next_attempt_ms)));
                continue;
            }
            match self.route(id, &e.meta.sender, &e.meta.recipients[i]) {
                Some(route)
                    if route
                        .source
                        .and_then(|s| self.blocked_until(s, &route.domain))
                        .is_some_and(|until| until > expires_at) =>
                {
                    if now >= expires_at {
                        expired.push(i as u32);
                        continue;
                    }
                    // The wait outlasts the message: a timer brings it back when it expires.
                    earliest = Some(earliest.map_or(expires_at, |t: u64| t.min(expires_at)));
                    if !dests.iter().any(|d| d.key == route.key) {
                        dests.push(route);
                    }
                }
                Some(route) => {
                    if !dests.iter().any(|d| d.key == route.key) {
                        dests.push(route);
                    }
                }
                None => nowhere.push(i as u32),
            }
        }
        let armed = e.armed.map(NonZeroU64::get);
        if let Some(t) = earliest
            && armed.is_none_or(|a| t < a)
            && let Some(e) = self.messages.get_mut(&id)
        {
            e.armed = NonZeroU64::new(t);
            self.timers.push(Reverse((t, id)));
        }
        if !nowhere.is_empty() {
            out.extend(self.undeliverable(id, &nowhere, now));
        }
        if !expired.is_empty() {
            out.extend(self.expire_waiting(id, &expired, now));
        }
        for route in dests {
            let d = self.dests.entry(route.key.clone()).or_default();
            d.pool = route.pool;
            d.source = route.source;
            d.domain = route.domain;
            d.ready.push_back(id);
            self.kick(&route.key, now, out);
        }
    }

    /// Fails recipients that have nowhere to go: their domain became one of the relay's return-path domains
    /// (a reload or a new config), whose mail is the relay's own and never leaves it. Left alone they would
    /// wait for ever, never attempted and so never expired.
    fn undeliverable(&mut self, id: QueueId, rcpts: &[u32], now: u64) -> Vec<Action> {
        self.decide_locally(
            id,
            rcpts,
            now,
            (554, "5.4.6"),
            |domain| {
                format!("{domain} is a return-path domain of this relay; its mail is not delivered")
            },
            (Class::Hard, Category::PermanentOther),
        )
    }

    /// Expires recipients that waited for a full source until `max_age` had passed: never tried, they get
    /// the expiry DSN all the same.
    fn expire_waiting(&mut self, id: QueueId, rcpts: &[u32], now: u64) -> Vec<Action> {
        self.decide_locally(
            id,
            rcpts,
            now,
            (451, "4.4.5"),
            |_| "every source address of the pool had used up its daily warm-up cap".to_owned(),
            (Class::Soft, Category::TransientOther),
        )
    }

    /// Records a verdict of the relay's own (no server was asked) for recipients `rcpts` of message `id`,
    /// whose first recipient's domain `text` may name.
    fn decide_locally(
        &mut self,
        id: QueueId,
        rcpts: &[u32],
        now: u64,
        (code, enhanced): (u16, &str),
        text: impl FnOnce(&str) -> String,
        verdict: Verdict,
    ) -> Vec<Action> {
        let Some(e) = self.messages.get(&id) else {
            return Vec::new();
        };
        let domain = domain_of(&e.meta.recipients[rcpts[0] as usize]).to_ascii_lowercase();
        let reply = Reply {
            code,
            enhanced: Some(enhanced.to_owned()),
            text: text(&domain),
            remote: false,
        };
        let attempt = Attempt {
            id,
            results: rcpts.iter().map(|&i| (i, reply.clone())).collect(),
            remote_mta: None,
            domain: Arc::from(domain.as_str()),
            tls: None,
            next_hop_dsn: false,
            verdicts: Vec::new(),
        };
        let verdicts = vec![Some(verdict); rcpts.len()];
        self.record(attempt, &verdicts, now, 0.0)
    }

    /// Starts connections for a destination while it has ready work and room, and the total is under its
    /// cap; at the cap, the destination waits for a place (see [`Core::serve_waiting`]).
    fn kick(&mut self, key: &DestKey, now: u64, out: &mut Vec<Action>) {
        // A full or suspended source's mail waits for the day to turn or the suspension to end: the
        // destination is held until then.
        let blocked = self
            .dests
            .get(key)
            .and_then(|d| self.blocked_until(d.source?, &d.domain));
        if let Some(until) = blocked
            && let Some(d) = self.dests.get_mut(key)
            && d.held_until < until
        {
            d.held_until = until;
            self.holds.push(Reverse((until, key.clone())));
        }
        while self.wants_connection(key, now) {
            if self.connections >= self.settings.total_connections {
                self.wait_for_place(key);
                return;
            }
            if !self.start(key, now, out) {
                return;
            }
        }
    }

    /// Whether `key` has ready work, room for another connection of its own, and is not held.
    fn wants_connection(&self, key: &DestKey, now: u64) -> bool {
        !self.stopping
            && self.dests.get(key).is_some_and(|d| {
                d.connections < self.settings.per_destination
                    && !d.ready.is_empty()
                    && d.held_until <= now
            })
    }

    /// Starts one connection for `key` with its next job; false when it has none (its ready list held only
    /// messages that were finished, deleted, or already in flight).
    fn start(&mut self, key: &DestKey, now: u64, out: &mut Vec<Action>) -> bool {
        let Some(job) = self.next_job(key, now) else {
            return false;
        };
        if let Some(d) = self.dests.get_mut(key) {
            d.connections += 1;
            self.connections += 1;
        }
        out.push(Action::Start(job));
        true
    }

    fn wait_for_place(&mut self, key: &DestKey) {
        if let Some(d) = self.dests.get_mut(key)
            && !d.waiting
        {
            d.waiting = true;
            self.waiting.push_back(key.clone());
        }
    }

    /// Gives the places under the total cap to the waiting destinations, one connection each in turn: a
    /// destination that still wants more after its turn goes to the back.
    fn serve_waiting(&mut self, now: u64, out: &mut Vec<Action>) {
        while self.connections < self.settings.total_connections && !self.stopping {
            let Some(key) = self.waiting.pop_front() else {
                return;
            };
            if let Some(d) = self.dests.get_mut(&key) {
                d.waiting = false;
            }
            if self.wants_connection(&key, now)
                && self.start(&key, now, out)
                && self.wants_connection(&key, now)
            {
                self.wait_for_place(&key);
            }
            self.forget_if_idle(&key);
        }
    }

    /// Drops a destination that has nothing left: no connection, no ready work, no place in the waiting line.
    fn forget_if_idle(&mut self, key: &DestKey) {
        if self
            .dests
            .get(key)
            .is_some_and(|d| d.connections == 0 && d.ready.is_empty() && !d.waiting)
        {
            self.dests.remove(key);
        }
    }
}

#[cfg(test)]
impl Core {
    /// Checks the bookkeeping against the connections the shell holds open (with a job, or `closing`: done
    /// and not yet closed): connections per destination and in total, in-flight flags, that every recipient
    /// waiting for an attempt is on its destination's ready list or under a timer, and that every
    /// destination with due work and room of its own has a connection, or waits for a place because the
    /// total is at its cap: so that nothing can be forgotten.
    pub(crate) fn audit(&self, open: &[Job], closing: &[DestKey], now: u64) -> Result<(), String> {
        self.audit_connections(open, closing)?;
        self.audit_recipients(open, now)?;
        self.audit_places(now)
    }

    fn audit_connections(&self, open: &[Job], closing: &[DestKey]) -> Result<(), String> {
        let mut per_key: HashMap<&DestKey, usize> = HashMap::new();
        for k in open.iter().map(|j| &j.dest).chain(closing) {
            *per_key.entry(k).or_default() += 1;
        }
        for (k, d) in &self.dests {
            let jobs = per_key.get(k).copied().unwrap_or(0);
            if d.connections != jobs {
                return Err(format!(
                    "{k}: {} connections, {jobs} open or closing",
                    d.connections
                ));
            }
        }
        if let Some((k, _)) = per_key.iter().find(|(k, _)| !self.dests.contains_key(**k)) {
            return Err(format!("{k}: connections but no destination"));
        }
        let sum: usize = self.dests.values().map(|d| d.connections).sum();
        if self.connections != sum || sum != open.len() + closing.len() {
            return Err(format!(
                "{} connections in total, {sum} per destination, {} open and {} closing",
                self.connections,
                open.len(),
                closing.len()
            ));
        }
        let mut seen = HashSet::new();
        for k in &self.waiting {
            if !seen.insert(k) {
                return Err(format!("{k} waits twice"));
            }
            if !self.dests.get(k).is_some_and(|d| d.waiting) {
                return Err(format!("{k} waits but is not marked waiting"));
            }
        }
        if let Some((k, _)) = self
            .dests
            .iter()
            .find(|(k, d)| d.waiting && !seen.contains(k))
        {
            return Err(format!("{k} marked waiting but not in the line"));
        }
        Ok(())
    }

    fn audit_places(&self, now: u64) -> Result<(), String> {
        if self.stopping {
            return Ok(());
        }
        let under_cap = self.connections < self.settings.total_connections;
        if under_cap && !self.waiting.is_empty() {
            return Err(format!(
                "{} of {} places taken, yet {:?} wait",
                self.connections, self.settings.total_connections, self.waiting
            ));
        }
        let mut due: HashSet<DestKey> = HashSet::new();
        for e in self.messages.values() {
            for (i, s) in e.rcpts.slots().iter().enumerate() {
                if s.status.is_final()
                    || s.in_flight
                    || (s.status == RcptStatus::Deferred && s.next_attempt_ms > now)
                {
                    continue;
                }
                if let Some(Route { key, .. }) =
                    self.route(e.meta.id, &e.meta.sender, &e.meta.recipients[i])
                {
                    due.insert(key);
                }
            }
        }
        for key in due {
            let Some(d) = self.dests.get(&key) else {
                return Err(format!("{key}: due work but no destination"));
            };
            if d.connections >= self.settings.per_destination || d.held_until > now {
                continue;
            }
            if under_cap {
                return Err(format!(
                    "{key}: due work, {} of its {} connections and {} of {} in total, yet none started",
                    d.connections,
                    self.settings.per_destination,
                    self.connections,
                    self.settings.total_connections
                ));
            }
            if !d.waiting && d.connections == 0 {
                return Err(format!(
                    "{key}: due work and no connection, but not waiting for a place"
                ));
            }
        }
        Ok(())
    }

    fn audit_recipients(&self, open: &[Job], now: u64) -> Result<(), String> {
        let armed: HashSet<(u64, QueueId)> = self.timers.iter().map(|Reverse(t)| *t).collect();
        for (id, e) in &self.messages {
            for (i, s) in e.rcpts.slots().iter().enumerate() {
                let in_job = open
                    .iter()
                    .any(|j| j.id == *id && j.rcpts.contains(&(i as u32)));
                if s.in_flight != in_job {
                    return Err(format!(
                        "{id} #{i}: in_flight {} but in an open job: {in_job}",
                        s.in_flight
                    ));
                }
                if s.status.is_final() || in_job {
                    continue;
                }
                if s.status == RcptStatus::Deferred && s.next_attempt_ms > now {
                    match e.armed.map(NonZeroU64::get) {
                        Some(t) if t <= s.next_attempt_ms && armed.contains(&(t, *id)) => continue,
                        other => {
                            return Err(format!(
                                "{id} #{i}: due at {}, armed {other:?}",
                                s.next_attempt_ms
                            ));
                        }
                    }
                }
                let Some(Route { key, .. }) =
                    self.route(*id, &e.meta.sender, &e.meta.recipients[i])
                else {
                    return Err(format!("{id} #{i}: waiting with nowhere to go"));
                };
                if !self.dests.get(&key).is_some_and(|d| d.ready.contains(id)) {
                    return Err(format!("{id} #{i}: due but not on the ready list of {key}"));
                }
            }
        }
        Ok(())
    }
}

/// Where one recipient of a message goes.
struct Route {
    key: DestKey,
    domain: Arc<str>,
    pool: Option<Arc<str>>,
    source: Option<IpAddr>,
}

/// When a marked source may send again (ms), and to which domain: every one (None: a full day) or one (a
/// suspension for its provider).
type Refill = (u64, IpAddr, Option<Arc<str>>);

/// Source addresses that may not send now: over today's warm-up cap (to any domain), or suspended for a
/// domain's provider (to that domain), each until a time (ms).
#[derive(Debug, Default)]
struct Marks {
    full: HashMap<IpAddr, u64>,
    /// By domain: the provider's other domains are marked as their own jobs find the suspension.
    suspended: HashMap<Arc<str>, HashMap<IpAddr, u64>>,
}

impl Marks {
    fn is_empty(&self) -> bool {
        self.full.is_empty() && self.suspended.is_empty()
    }

    /// Until when `source` may not send to `domain`, if it may not now. Through a smarthost (`domain`
    /// None) there is no provider, so no suspension.
    fn until(&self, source: IpAddr, domain: Option<&str>) -> Option<u64> {
        let full = self.full.get(&source).copied();
        let suspended = domain
            .and_then(|d| self.suspended.get(d))
            .and_then(|m| m.get(&source))
            .copied();
        full.max(suspended)
    }
}

/// The destination of recipient `address` of message `id` from `sender`, its source picked among the
/// pool's addresses that are not `full` (when all are, among all: it waits there); None for return-path
/// domains, whose mail is the relay's own and is not delivered by MX.
fn dest_of(
    routing: &Routing,
    marks: &Marks,
    id: QueueId,
    sender: &str,
    address: &str,
) -> Option<Route> {
    let domain = domain_of(address).to_ascii_lowercase();
    if routing.local.contains(&domain) {
        return None;
    }
    let pool = routing
        .pools
        .get(&domain_of(sender).to_ascii_lowercase())
        .cloned();
    let source = pool
        .as_ref()
        .and_then(|p| routing.sources.get(p))
        .and_then(|sources| {
            if marks.is_empty() {
                return source_of(sources, id);
            }
            let shaped = (!routing.smarthost).then_some(domain.as_str());
            pick_source(sources, id, |a| marks.until(a, shaped).is_none())
                .or_else(|| source_of(sources, id))
        });
    let target = if routing.smarthost {
        "[smarthost]".to_owned()
    } else {
        domain.clone()
    };
    let key = match (&pool, source) {
        (Some(p), Some(s)) => format!("{p}/{s}/{target}"),
        (Some(p), None) => format!("{p}/{target}"),
        (None, _) => target,
    };
    Some(Route {
        key: Arc::from(key),
        domain: Arc::from(domain),
        pool,
        source,
    })
}

/// Message `id`'s source among `sources`: weighted rendezvous hashing, keyed by the id. Every attempt of
/// the message (after a restart too) leaves from the same address without the choice being stored; the
/// pool's mail splits by the weights; and a change of one address's weight, or one added or removed, moves
/// only mail to or from that address (a retry that changes address meets greylisting afresh).
pub fn source_of(sources: &[(IpAddr, u32)], id: QueueId) -> Option<IpAddr> {
    pick_source(sources, id, |_| true)
}

/// [`source_of`] among the addresses `usable` takes: leaving one out moves only the mail it had.
fn pick_source(
    sources: &[(IpAddr, u32)],
    id: QueueId,
    usable: impl Fn(IpAddr) -> bool,
) -> Option<IpAddr> {
    let id = mix(id.0);
    sources
        .iter()
        .filter(|&&(address, weight)| weight > 0 && usable(address))
        .map(|&(address, weight)| {
            // An exponential draw at rate `weight`: the smallest wins with odds weight / total.
            let u = unit(mix(id ^ address_key(address)));
            (-u.ln() / f64::from(weight), address)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, address)| address)
}

/// A hash in (0, 1), never 0 (its logarithm is taken).
fn unit(h: u64) -> f64 {
    ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

fn address_key(a: IpAddr) -> u64 {
    let bits = match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6) ^ (1 << 127),
    };
    mix(bits as u64 ^ mix((bits >> 64) as u64))
}

/// SplitMix64's finaliser: ids are timestamps in µs, close together and with regular low bits; this
/// spreads them evenly.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The envelope as the queue keeps it for as long as the message waits: listener and sender shared with
/// the other messages (the rest of it is already as compact as `MessageMeta` makes it).
fn compact(mut meta: MessageMeta, strings: &mut Strings) -> MessageMeta {
    meta.listener = strings.intern(&meta.listener);
    meta.sender = strings.intern(&meta.sender);
    meta
}

fn view(id: QueueId, e: &Entry) -> MessageView {
    let ts = |ms: u64| {
        chrono::DateTime::from_timestamp_millis(ms as i64)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    };
    MessageView {
        id: id.to_string(),
        sender: e.meta.sender.to_string(),
        recipients: e.meta.recipients.to_vec(),
        size: e.location.len,
        received_at: ts(e.meta.received_at_ms),
        listener: e.meta.listener.to_string(),
        status: e
            .meta
            .recipients
            .iter()
            .zip(e.rcpts.slots().iter())
            .enumerate()
            .map(|(i, (r, s))| RecipientView {
                recipient: r.to_owned(),
                state: s.status.as_str(),
                attempts: s.attempts,
                next_attempt: (s.status == RcptStatus::Deferred).then(|| ts(s.next_attempt_ms)),
                last_reply: e.rcpts.reply(i).map(str::to_owned),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;
