//! The queue: every message waiting for delivery, and the scheduler that hands work to delivery.
//!
//! One task owns all queue state (an actor): sessions enqueue, delivery connections report results and ask
//! for their next job, the admin API asks questions, all through one channel. Nothing is ever scanned to
//! find work: each destination has a FIFO of ready messages, and deferred messages sit in a timer heap keyed
//! by their next attempt, so the cost of a decision does not grow with the queue.
//!
//! A destination is a recipient domain (or, in smarthost mode, the smarthost) together with the source pool
//! of the sender's domain. Each has at most `per_domain.max_connections` connections; a connection carries
//! up to `messages_per_connection` messages, asking for the next one as it finishes the last.
//!
//! Recipient state changes are written to the spool as they happen, so a restart neither repeats a
//! delivered recipient nor forgets a deferred one. A message leaves the queue when every recipient has a final
//! outcome; its spool segment is reclaimed once nothing in it is still queued (see `spool`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::events::Event;
use crate::outcome::dsn;
use crate::outcome::suppression::Suppressions;
use crate::outcome::{Class, Rules};
use crate::spool::{Location, MessageMeta, QueueId, RcptState, RcptStatus, RcptUpdate, Spool};
use crate::telemetry::Telemetry;
use herald_config::{Config, Delivery};

/// How often old spool segments are looked at for reclaiming.
const COMPACT_EVERY: Duration = Duration::from_secs(10);
/// How often the queue gauges are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(2);

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a group of recipients is delivered: `[pool/]domain`, or `[pool/][smarthost]`.
pub type DestKey = Arc<str>;

/// Work for one delivery connection: the recipients of one message that go to one destination.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: QueueId,
    pub dest: DestKey,
    /// The recipient domain (empty in smarthost mode, where the key is not a domain).
    pub domain: Arc<str>,
    pub pool: Option<Arc<str>>,
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
#[derive(Debug)]
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
    pub states: Vec<RcptState>,
    pub location: Location,
}

enum Command {
    Enqueue(Box<NewEntry>),
    Finished {
        dest: DestKey,
        attempt: Attempt,
        next: Option<oneshot::Sender<Option<Job>>>,
    },
    List {
        limit: usize,
        reply: oneshot::Sender<(usize, Vec<MessageView>)>,
    },
    Get {
        id: QueueId,
        reply: oneshot::Sender<Option<MessageView>>,
    },
    Delete {
        id: QueueId,
        reply: oneshot::Sender<bool>,
    },
    Flush {
        id: Option<QueueId>,
        reply: oneshot::Sender<bool>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
    /// Messages copied forward out of an old segment, with their new locations.
    Moved {
        segment: u64,
        moved: Vec<(QueueId, Location)>,
        done: bool,
    },
    /// An old segment was deleted (or could not be).
    Compacted,
    /// A connection gives back a job it never attempted.
    Abandon {
        dest: DestKey,
        job: Job,
    },
}

/// Something that runs a delivery connection for a job; the delivery engine implements it.
pub trait Dispatcher: Send + Sync + 'static {
    fn start(self: Arc<Self>, job: Job, queue: QueueHandle);
    /// The queue is stopping: connections not yet in a transaction should give their job back.
    fn stopping(&self);
}

/// Handle to the queue task; cheap to clone.
#[derive(Clone, Debug)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl QueueHandle {
    fn send(&self, c: Command) {
        // The queue task only ends at shutdown, after which nothing is enqueued.
        let _ = self.tx.send(c);
    }

    /// Adds a spooled message.
    pub fn enqueue(&self, entry: NewEntry) {
        self.send(Command::Enqueue(Box::new(entry)));
    }

    /// Reports an attempt and, when `want_next`, waits for the next job for the same destination.
    pub async fn finished(&self, dest: DestKey, attempt: Attempt, want_next: bool) -> Option<Job> {
        if !want_next {
            self.send(Command::Finished {
                dest,
                attempt,
                next: None,
            });
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.send(Command::Finished {
            dest,
            attempt,
            next: Some(tx),
        });
        rx.await.ok().flatten()
    }

    pub async fn list(&self, limit: usize) -> (usize, Vec<MessageView>) {
        let (reply, rx) = oneshot::channel();
        self.send(Command::List { limit, reply });
        rx.await.unwrap_or_default()
    }

    pub async fn get(&self, id: QueueId) -> Option<MessageView> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Get { id, reply });
        rx.await.ok().flatten()
    }

    /// Removes a message without a DSN; false if it is not queued.
    pub async fn delete(&self, id: QueueId) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Delete { id, reply });
        rx.await.unwrap_or(false)
    }

    /// Retries deferred recipients now (of one message, or all).
    pub async fn flush(&self, id: Option<QueueId>) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Flush { id, reply });
        rx.await.unwrap_or(false)
    }

    /// Gives back a job that was never attempted (the relay is stopping), and closes the connection slot.
    pub fn abandon(&self, dest: DestKey, job: Job) {
        self.send(Command::Abandon { dest, job });
    }

    /// Stops handing out work and waits until the connections in flight have reported back.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stop { reply });
        let _ = rx.await;
    }
}

/// Routing facts the queue needs from the config.
#[derive(Debug, Clone)]
struct Routing {
    smarthost: bool,
    /// Sender domain (lower case) to its IP pool.
    pools: HashMap<String, Arc<str>>,
}

struct Entry {
    meta: Arc<MessageMeta>,
    location: Location,
    states: Vec<RcptState>,
    in_flight: Vec<bool>,
    replies: Vec<Option<Box<str>>>,
}

#[derive(Default)]
struct Dest {
    ready: VecDeque<QueueId>,
    connections: usize,
}

struct State {
    spool: Spool,
    suppressions: Arc<Suppressions>,
    dispatcher: Arc<dyn Dispatcher>,
    handle: QueueHandle,
    delivery: Delivery,
    hostname: String,
    routing: Routing,
    messages: BTreeMap<QueueId, Entry>,
    dests: HashMap<DestKey, Dest>,
    timers: BinaryHeap<Reverse<(u64, QueueId)>>,
    /// Live messages and bytes per spool segment.
    segments: BTreeMap<u64, (usize, u64)>,
    stopping: Option<oneshot::Sender<()>>,
    compacting: bool,
    /// Messages with recipients still pending, per destination domain (for `herald_queue_depth`).
    depth: HashMap<String, i64>,
    /// `log.recipients`: addresses may appear in log lines.
    log_recipients: bool,
    rules: Arc<Rules>,
    telemetry: Telemetry,
}

/// Starts the queue task with the messages loaded from the spool.
pub fn start(
    config: &Config,
    spool: Spool,
    suppressions: Arc<Suppressions>,
    loaded: Vec<crate::spool::Loaded>,
    dispatcher: Arc<dyn Dispatcher>,
    rules: Arc<Rules>,
    telemetry: Telemetry,
) -> QueueHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = QueueHandle { tx };
    let routing = Routing {
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
    };
    let mut state = State {
        spool,
        suppressions,
        dispatcher,
        handle: handle.clone(),
        delivery: config.delivery.clone(),
        hostname: config.hostname.clone(),
        routing,
        messages: BTreeMap::new(),
        dests: HashMap::new(),
        timers: BinaryHeap::new(),
        segments: BTreeMap::new(),
        stopping: None,
        compacting: false,
        depth: HashMap::new(),
        log_recipients: config.log.recipients,
        rules,
        telemetry,
    };
    for l in loaded {
        state.insert(NewEntry {
            meta: l.meta,
            states: l.states,
            location: l.location,
        });
    }
    tokio::spawn(state.run(rx));
    handle
}

/// Replaces anything that looks like an address in `text` (a remote reply often quotes the recipient) so
/// that log lines hold no addresses unless `log.recipients` allows them.
pub fn redact_addresses(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            if word.contains('@') {
                let open = word.starts_with('<');
                let close = word.trim_end_matches([':', ',', ';', '.']).ends_with('>');
                let tail = &word[word.trim_end_matches([':', ',', ';', '.']).len()..];
                format!(
                    "{}redacted{}{}",
                    if open { "<" } else { "" },
                    if close { ">" } else { "" },
                    tail
                )
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// The distinct domains (lower case) of a message's recipients that have no final outcome yet.
fn pending_domains(recipients: &[String], states: &[RcptState]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (r, s) in recipients.iter().zip(states) {
        if s.status.is_final() {
            continue;
        }
        let d = domain_of(r).to_ascii_lowercase();
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

impl State {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut compact = tokio::time::interval(COMPACT_EVERY);
        compact.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges = tokio::time::interval(GAUGES_EVERY);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse((due, _))| *due);
            let sleep = async {
                match next_timer {
                    Some(due) => {
                        let wait = due.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(wait)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => return,
                },
                _ = sleep => self.fire_timers(),
                _ = compact.tick() => self.compact(),
                _ = gauges.tick() => self.gauges(),
            }
            if let Some(reply) = self.stopping.take() {
                if self.dests.values().all(|d| d.connections == 0) {
                    let _ = reply.send(());
                    return;
                }
                self.stopping = Some(reply);
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Enqueue(e) => self.insert(*e),
            Command::Finished {
                dest,
                attempt,
                next,
            } => {
                self.apply(attempt);
                match next {
                    Some(tx) => {
                        let job = if self.stopping.is_some() {
                            None
                        } else {
                            self.next_job(&dest)
                        };
                        let none = job.is_none();
                        // If the connection went away meanwhile, its job goes back to the queue.
                        if let Err(Some(job)) = tx.send(job) {
                            self.release(&job);
                            self.connection_closed(&dest);
                        } else if none {
                            self.connection_closed(&dest);
                        }
                    }
                    None => self.connection_closed(&dest),
                }
            }
            Command::List { limit, reply } => {
                let views = self
                    .messages
                    .iter()
                    .take(limit)
                    .map(|(id, e)| view(*id, e))
                    .collect();
                let _ = reply.send((self.messages.len(), views));
            }
            Command::Get { id, reply } => {
                let _ = reply.send(self.messages.get(&id).map(|e| view(id, e)));
            }
            Command::Delete { id, reply } => {
                let found = self.remove(id);
                if found {
                    self.spool.record_delete(id);
                    tracing::info!(queue_id = %id, "deleted by an operator");
                }
                let _ = reply.send(found);
            }
            Command::Flush { id, reply } => {
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
                let now = now_ms();
                for id in ids {
                    if let Some(e) = self.messages.get_mut(&id) {
                        for s in &mut e.states {
                            if s.status == RcptStatus::Deferred {
                                s.next_attempt_ms = now;
                            }
                        }
                    }
                    self.make_ready(id);
                }
                let _ = reply.send(found);
            }
            Command::Stop { reply } => {
                self.stopping = Some(reply);
                self.dispatcher.stopping();
            }
            Command::Abandon { dest, job } => {
                self.release(&job);
                self.connection_closed(&dest);
            }
            Command::Moved {
                segment,
                moved,
                done,
            } => self.moved(segment, moved, done),
            Command::Compacted => self.compacting = false,
        }
    }

    /// Points copied messages at their new records. Their state may have changed while the copy was made, so
    /// it is written again after the copy; a message that finished meanwhile is deleted after it. Only then,
    /// once that is durable, can the old segment go.
    fn moved(&mut self, segment: u64, moved: Vec<(QueueId, Location)>, done: bool) {
        for (id, new) in moved {
            let Some(e) = self.messages.get_mut(&id) else {
                self.spool.record_delete(id);
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
            let updates: Vec<RcptUpdate> = e
                .states
                .iter()
                .enumerate()
                .map(|(i, s)| RcptUpdate {
                    index: i as u32,
                    state: *s,
                })
                .collect();
            self.spool.record_results(id, &updates);
        }
        let live = self.segments.get(&segment).map_or(0, |s| s.0);
        if !done || live > 0 {
            self.compacting = false;
            return;
        }
        self.segments.remove(&segment);
        let spool = self.spool.clone();
        let handle = self.handle.clone();
        tokio::spawn(async move {
            match spool.sync().await {
                Ok(()) => match spool.delete_segment(segment).await {
                    Ok(()) => tracing::debug!(segment, "spool segment reclaimed"),
                    Err(e) => tracing::warn!(segment, error = %e, "cannot delete a spool segment"),
                },
                Err(e) => tracing::warn!(error = %e, "spool sync before reclaiming failed"),
            }
            handle.send(Command::Compacted);
        });
    }

    fn gauges(&self) {
        let m = &self.telemetry.metrics;
        let counts: Vec<(String, i64)> = self.depth.iter().map(|(d, n)| (d.clone(), *n)).collect();
        m.set_queue_depth(&counts);
        m.queue_messages.set(self.messages.len() as i64);
        let oldest = self
            .messages
            .values()
            .map(|e| e.meta.received_at_ms)
            .next()
            .map_or(0, |t| now_ms().saturating_sub(t) / 1000);
        m.queue_oldest_age.set(oldest as i64);
        m.spool_bytes.set(self.spool.bytes() as i64);
        m.suppressions.set(self.suppressions.len() as i64);
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

    fn insert(&mut self, new: NewEntry) {
        let id = new.meta.id;
        let n = new.meta.recipients.len();
        let seg = self.segments.entry(new.location.segment).or_default();
        seg.0 += 1;
        seg.1 += new.location.len;
        let mut states = new.states;
        states.resize(n, RcptState::QUEUED);
        let pending = pending_domains(&new.meta.recipients, &states);
        self.adjust_depth(&pending, 1);
        self.messages.insert(
            id,
            Entry {
                meta: Arc::new(new.meta),
                location: new.location,
                states,
                in_flight: vec![false; n],
                replies: Vec::new(),
            },
        );
        self.make_ready(id);
    }

    /// The destination of recipient `address` of a message from `sender`; None for local domains.
    fn dest_of(
        &self,
        sender: &str,
        address: &str,
    ) -> Option<(DestKey, Arc<str>, Option<Arc<str>>)> {
        let domain = domain_of(address).to_ascii_lowercase();
        // Return-path domains: mail to them is for the relay itself and is not delivered by MX.
        if self.rules.return_paths().is_local(&domain) {
            return None;
        }
        let pool = self
            .routing
            .pools
            .get(&domain_of(sender).to_ascii_lowercase())
            .cloned();
        let target = if self.routing.smarthost {
            "[smarthost]".to_owned()
        } else {
            domain.clone()
        };
        let key = match &pool {
            Some(p) => format!("{p}/{target}"),
            None => target,
        };
        Some((Arc::from(key), Arc::from(domain), pool))
    }

    /// Puts a message on the ready list of every destination that has a recipient due now, and arms a timer
    /// for the ones due later.
    fn make_ready(&mut self, id: QueueId) {
        let Some(e) = self.messages.get(&id) else {
            return;
        };
        let now = now_ms();
        let mut dests: Vec<DestKey> = Vec::new();
        let mut earliest: Option<u64> = None;
        for (i, s) in e.states.iter().enumerate() {
            if s.status.is_final() || e.in_flight[i] {
                continue;
            }
            if s.status == RcptStatus::Deferred && s.next_attempt_ms > now {
                earliest =
                    Some(earliest.map_or(s.next_attempt_ms, |t: u64| t.min(s.next_attempt_ms)));
                continue;
            }
            if let Some((key, _, _)) = self.dest_of(&e.meta.sender, &e.meta.recipients[i])
                && !dests.contains(&key)
            {
                dests.push(key);
            }
        }
        if let Some(t) = earliest {
            self.timers.push(Reverse((t, id)));
        }
        for key in dests {
            self.dests
                .entry(key.clone())
                .or_default()
                .ready
                .push_back(id);
            self.kick(&key);
        }
    }

    /// Starts connections for a destination while it has ready work and room.
    fn kick(&mut self, key: &DestKey) {
        if self.stopping.is_some() {
            return;
        }
        let max = self.delivery.per_domain.max_connections as usize;
        loop {
            let Some(d) = self.dests.get(key) else { return };
            if d.connections >= max || d.ready.is_empty() {
                return;
            }
            let Some(job) = self.next_job(key) else {
                return;
            };
            if let Some(d) = self.dests.get_mut(key) {
                d.connections += 1;
            }
            self.dispatcher.clone().start(job, self.handle.clone());
        }
    }

    fn connection_closed(&mut self, key: &DestKey) {
        if let Some(d) = self.dests.get_mut(key) {
            d.connections = d.connections.saturating_sub(1);
            if d.connections == 0 && d.ready.is_empty() {
                self.dests.remove(key);
                return;
            }
        }
        self.kick(key);
    }

    /// The next job for a destination: the first ready message that still has due recipients there.
    fn next_job(&mut self, key: &DestKey) -> Option<Job> {
        let now = now_ms();
        loop {
            let id = self.dests.get_mut(key)?.ready.pop_front()?;
            let Some(e) = self.messages.get(&id) else {
                continue;
            };
            let mut rcpts = Vec::new();
            let mut target = None;
            for (i, s) in e.states.iter().enumerate() {
                if s.status.is_final()
                    || e.in_flight[i]
                    || (s.status == RcptStatus::Deferred && s.next_attempt_ms > now)
                {
                    continue;
                }
                if let Some((k, domain, pool)) = self.dest_of(&e.meta.sender, &e.meta.recipients[i])
                    && k == *key
                {
                    rcpts.push(i as u32);
                    target.get_or_insert((domain, pool));
                }
            }
            let Some((domain, pool)) = target else {
                continue;
            };
            let job = Job {
                id,
                dest: key.clone(),
                domain,
                pool,
                meta: e.meta.clone(),
                location: e.location,
                rcpts,
            };
            if let Some(e) = self.messages.get_mut(&id) {
                for &i in &job.rcpts {
                    e.in_flight[i as usize] = true;
                }
            }
            return Some(job);
        }
    }

    /// Gives a job that was never attempted back to the ready list.
    fn release(&mut self, job: &Job) {
        if let Some(e) = self.messages.get_mut(&job.id) {
            for &i in &job.rcpts {
                e.in_flight[i as usize] = false;
            }
        }
        self.make_ready(job.id);
    }

    fn fire_timers(&mut self) {
        let now = now_ms();
        while let Some(Reverse((due, id))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            self.make_ready(id);
        }
    }

    fn apply(&mut self, attempt: Attempt) {
        let id = attempt.id;
        let now = now_ms();
        let max_age = self.delivery.max_age.as_millis() as u64;
        let Some(e) = self.messages.get_mut(&id) else {
            return;
        };
        let m = self.telemetry.metrics.clone();
        let classifier = self.rules.classifier();
        let pending_before = pending_domains(&e.meta.recipients, &e.states);
        let expires_at = e.meta.received_at_ms + max_age;
        let mut updates = Vec::with_capacity(attempt.results.len());
        let mut failures = Vec::new();
        let mut suppress = Vec::new();
        let mut any_deferred = false;
        let n = e.states.len();
        // One log line per outcome of this attempt: (result, first reply, recipients).
        let mut logged: Vec<(&'static str, String, usize)> = Vec::new();
        let redact = |text: String| {
            if self.log_recipients {
                text
            } else {
                redact_addresses(&text)
            }
        };
        for (idx, reply) in attempt.results {
            let i = idx as usize;
            let (Some(st), Some(flag)) = (e.states.get_mut(i), e.in_flight.get_mut(i)) else {
                continue;
            };
            *flag = false;
            st.attempts = st.attempts.saturating_add(1);
            let rcpt = &e.meta.recipients[i];
            // Classified once here; the suppression decision, the metric and the event share the verdict.
            let verdict = (reply.code >= 400)
                .then(|| classifier.classify(reply.code, reply.enhanced.as_deref(), &reply.text));
            if reply.code < 400 {
                st.status = RcptStatus::Delivered;
            } else if reply.code < 500 && now < expires_at {
                st.status = RcptStatus::Deferred;
                // The delay before the next attempt: first * factor^(attempts-1), capped, +-10% jitter.
                let backoff = {
                    let r = &self.delivery.retry;
                    let exp = r
                        .factor
                        .powi(i32::from(st.attempts.saturating_sub(1)).min(64));
                    let base = (r.first.as_secs_f64() * exp).min(r.max.as_secs_f64());
                    (base * (0.9 + rand::random::<f64>() * 0.2) * 1000.0) as u64
                };
                st.next_attempt_ms = (now + backoff).min(expires_at);
                any_deferred = true;
            } else {
                let expired = reply.code < 500;
                st.status = if expired {
                    RcptStatus::Expired
                } else {
                    RcptStatus::Bounced
                };
                if let Some((class, category)) = verdict
                    && class == Class::Hard
                    && category.suppresses()
                {
                    suppress.push((rcpt.clone(), reply.to_string()));
                }
                failures.push(dsn::Failure {
                    recipient: rcpt.clone(),
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
            if reply.code >= 400 {
                if e.replies.is_empty() {
                    e.replies = vec![None; n];
                }
                e.replies[i] = Some(reply.to_string().into_boxed_str());
            }
            if let Some((class, category)) = verdict {
                let domain_label = m.domain_label(domain_of(rcpt));
                m.bounces
                    .with_label_values(&[class.as_str(), category.as_str(), &domain_label])
                    .inc();
            }
            let result_label = match st.status {
                RcptStatus::Delivered => "delivered",
                RcptStatus::Deferred => "deferred",
                _ => "bounced",
            };
            m.deliveries.with_label_values(&[result_label]).inc();
            if st.status.is_final() {
                m.latency
                    .observe(now.saturating_sub(e.meta.received_at_ms) as f64 / 1000.0);
            }
            let result = st.status.as_str();
            match logged.iter_mut().find(|(r, _, _)| *r == result) {
                Some(l) => {
                    l.2 += 1;
                    if self.log_recipients {
                        l.1.push_str(&format!(" <{rcpt}>"));
                    }
                }
                None => {
                    let mut text = redact(reply.to_string());
                    if self.log_recipients {
                        text.push_str(&format!(" <{rcpt}>"));
                    }
                    logged.push((result, text, 1))
                }
            }
            self.telemetry.emit(|| {
                let mut ev = Event::new(result, id.to_string(), e.meta.sender.clone());
                ev.recipient = Some(rcpt.clone());
                ev.domain = Some(domain_of(rcpt).to_ascii_lowercase());
                ev.mx = attempt.remote_mta.clone();
                ev.tls = attempt.tls.clone();
                ev.reply = Some(reply.to_string());
                ev.attempts = Some(st.attempts);
                if let Some((class, category)) = verdict {
                    ev.class = Some(class.as_str());
                    ev.category = Some(category.as_str());
                }
                ev
            });
            updates.push(RcptUpdate {
                index: idx,
                state: *st,
            });
        }
        let delay = now.saturating_sub(e.meta.received_at_ms) as f64 / 1000.0;
        for (result, reply, recipients) in logged {
            tracing::info!(
                queue_id = %id,
                domain = %attempt.domain,
                mx = attempt.remote_mta.as_deref().unwrap_or("-"),
                tls = attempt.tls.as_deref().unwrap_or("none"),
                result,
                reply = %reply,
                delay,
                recipients,
                "delivery"
            );
        }
        self.spool.record_results(id, &updates);
        let pending_after = pending_domains(&e.meta.recipients, &e.states);
        let meta = e.meta.clone();
        let location = e.location;
        let done = e.states.iter().all(|s| s.status.is_final());
        let gone: Vec<String> = pending_before
            .into_iter()
            .filter(|d| !pending_after.contains(d))
            .collect();
        self.adjust_depth(&gone, -1);
        if !suppress.is_empty() {
            let list = self.suppressions.clone();
            let sender = meta.sender.clone();
            let log_recipients = self.log_recipients;
            let telemetry = self.telemetry.clone();
            let log_reason = move |r: &str| {
                if log_recipients {
                    r.to_owned()
                } else {
                    redact_addresses(r)
                }
            };
            tokio::task::spawn_blocking(move || {
                for (addr, reason) in suppress {
                    match list.add(&addr, &reason) {
                        Ok(()) => {
                            tracing::info!(reason = %log_reason(&reason), "recipient added to the suppression list");
                            telemetry.emit(|| {
                                let mut ev =
                                    Event::new("suppressed", id.to_string(), sender.clone());
                                ev.recipient = Some(addr.clone());
                                ev.reply = Some(reason.clone());
                                ev
                            });
                        }
                        Err(e) => tracing::error!(error = %e, "cannot record a suppression"),
                    }
                }
            });
        }
        if !failures.is_empty() {
            if meta.sender.is_empty() {
                tracing::info!(queue_id = %id, failed = failures.len(), "bounce of a message from the null sender: no DSN");
            } else if self.rules.return_paths().is_local(domain_of(&meta.sender)) {
                // A DSN to our own return-path domain would come straight back as a report about itself.
                tracing::info!(queue_id = %id, failed = failures.len(), "bounce of a message from a return-path address: no DSN");
            } else {
                self.send_dsn(meta, location, failures);
            }
        }
        if done {
            self.remove(id);
        } else if any_deferred {
            self.make_ready(id);
        }
    }

    /// Builds and queues a DSN for `failures` (off the queue task: it reads the spool).
    fn send_dsn(&self, meta: Arc<MessageMeta>, location: Location, failures: Vec<dsn::Failure>) {
        let spool = self.spool.clone();
        let handle = self.handle.clone();
        let hostname = self.hostname.clone();
        tokio::spawn(async move {
            let original = match spool.read(location).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(queue_id = %meta.id, error = %e, "cannot read the message for its DSN; sending it without headers");
                    Vec::new()
                }
            };
            let id = spool.next_id();
            let now = chrono::Utc::now();
            let arrival =
                chrono::DateTime::from_timestamp_millis(meta.received_at_ms as i64).unwrap_or(now);
            let queue_id = meta.id.to_string();
            let report = dsn::Report {
                hostname: &hostname,
                queue_id: &queue_id,
                original_sender: &meta.sender,
                arrival,
                failures: &failures,
                original: &original,
            };
            let body = dsn::build(&report, now, &format!("{id}@{hostname}"));
            let dsn_meta = MessageMeta {
                id,
                received_at_ms: now_ms(),
                smtputf8: meta.smtputf8,
                eight_bit: false,
                listener: "dsn".to_owned(),
                auth_user: None,
                peer: "local".to_owned(),
                sender: String::new(),
                recipients: vec![meta.sender.clone()],
            };
            match spool.store(&dsn_meta, &[], &[&body]).await {
                Ok(location) => {
                    tracing::info!(queue_id = %id, original = %meta.id, "DSN queued");
                    handle.enqueue(NewEntry {
                        meta: dsn_meta,
                        states: vec![RcptState::QUEUED],
                        location,
                    });
                }
                Err(e) => tracing::error!(original = %meta.id, error = %e, "cannot spool a DSN"),
            }
        });
    }

    fn remove(&mut self, id: QueueId) -> bool {
        let Some(e) = self.messages.remove(&id) else {
            return false;
        };
        let pending = pending_domains(&e.meta.recipients, &e.states);
        self.adjust_depth(&pending, -1);
        if let Some(seg) = self.segments.get_mut(&e.location.segment) {
            seg.0 = seg.0.saturating_sub(1);
            seg.1 = seg.1.saturating_sub(e.location.len);
        }
        true
    }

    /// Reclaims the oldest spool segments: deletes those with nothing queued, and copies forward the few
    /// messages that keep an old, mostly finished segment alive.
    fn compact(&mut self) {
        if self.compacting {
            return;
        }
        let current = self.spool.current_segment();
        let segments = self.spool.segments();
        let Some(&(oldest, size)) = segments.first() else {
            return;
        };
        if oldest >= current {
            return;
        }
        let (live, live_bytes) = self.segments.get(&oldest).copied().unwrap_or((0, 0));
        let closed = segments.iter().filter(|(n, _)| *n < current).count();
        let mut copies = Vec::new();
        if live > 0 {
            // Copy forward only when it frees much more than it writes.
            if closed < 2 || live_bytes * 2 > size {
                return;
            }
            for (id, e) in &self.messages {
                if e.location.segment == oldest && !e.in_flight.iter().any(|f| *f) {
                    copies.push((*id, e.meta.clone(), e.states.clone(), e.location));
                }
                if copies.len() == live {
                    break;
                }
            }
            if copies.len() < live {
                // Some are being delivered right now; try again on the next tick.
                return;
            }
        }
        self.compacting = true;
        let spool = self.spool.clone();
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let mut moved = Vec::new();
            for (id, meta, states, location) in copies {
                let data = match spool.read(location).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot read a message to copy it forward");
                        handle.send(Command::Moved {
                            segment: oldest,
                            moved,
                            done: false,
                        });
                        return;
                    }
                };
                match spool.store(&meta, &states, &[&data]).await {
                    Ok(new) => moved.push((id, new)),
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot copy a message forward");
                        handle.send(Command::Moved {
                            segment: oldest,
                            moved,
                            done: false,
                        });
                        return;
                    }
                }
            }
            handle.send(Command::Moved {
                segment: oldest,
                moved,
                done: true,
            });
        });
    }
}

fn view(id: QueueId, e: &Entry) -> MessageView {
    let ts = |ms: u64| {
        chrono::DateTime::from_timestamp_millis(ms as i64)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    };
    MessageView {
        id: id.to_string(),
        sender: e.meta.sender.clone(),
        recipients: e.meta.recipients.clone(),
        size: e.location.len,
        received_at: ts(e.meta.received_at_ms),
        listener: e.meta.listener.clone(),
        status: e
            .meta
            .recipients
            .iter()
            .zip(&e.states)
            .enumerate()
            .map(|(i, (r, s))| RecipientView {
                recipient: r.clone(),
                state: s.status.as_str(),
                attempts: s.attempts,
                next_attempt: (s.status == RcptStatus::Deferred).then(|| ts(s.next_attempt_ms)),
                last_reply: e
                    .replies
                    .get(i)
                    .and_then(|r| r.as_deref().map(str::to_owned)),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_redacted_from_replies() {
        assert_eq!(
            redact_addresses(
                "550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown"
            ),
            "550 5.1.1 <redacted>: Recipient address rejected: User unknown"
        );
        assert_eq!(
            redact_addresses("451 mailbox x@y.test, busy"),
            "451 mailbox redacted, busy"
        );
        assert_eq!(redact_addresses("250 2.0.0 Ok"), "250 2.0.0 Ok");
    }

    #[test]
    fn pending_domains_are_distinct_and_skip_final_recipients() {
        let rcpts = vec![
            "a@X.test".to_owned(),
            "b@x.test".to_owned(),
            "c@y.test".to_owned(),
        ];
        let done = RcptState {
            status: RcptStatus::Delivered,
            attempts: 1,
            next_attempt_ms: 0,
        };
        let states = vec![RcptState::QUEUED, RcptState::QUEUED, done];
        assert_eq!(pending_domains(&rcpts, &states), vec!["x.test".to_owned()]);
    }
}
