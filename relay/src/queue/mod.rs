//! The queue: every message waiting for delivery, and the scheduler that hands work to delivery.
//!
//! `core` decides (pure: `now` and the retry jitter are inputs, actions are outputs); this module is the
//! shell around it. One task owns the core (an actor): sessions enqueue, delivery connections report
//! results and ask for their next job, the admin API asks questions, all through one channel; the task
//! runs the timers and carries out the core's actions: connections, spool writes, metrics, events,
//! suppressions and DSNs. A connection it starts holds a [`Slot`] until its socket is closed; the slot's
//! drop tells the core that the connection's place under the caps is free.
//!
//! Recipient state changes are written to the spool as they happen, so a restart neither repeats a
//! delivered recipient nor forgets a deferred one. A message leaves the queue when every recipient has a final
//! outcome; its spool segment is reclaimed once nothing in it is still queued (see `spool`).

pub mod core;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::events::Event;
use crate::fleet::Count;
use crate::outcome::dsn;
use crate::outcome::suppression::{Evidence, Observation, Suppressions, suppressed};
use crate::outcome::{Rules, classify};
use crate::spool::{Location, MessageMeta, QueueId, RcptState, RcptStates, RcptStatus, Spool};
use crate::telemetry::Telemetry;
use herald_config::Config;

use self::core::{Action, Compaction, Core, Outcome, Settings, domain_of};
pub use self::core::{Attempt, DestKey, Job, MessageView, NewEntry, RecipientView, Reply, Verdict};

/// How often old spool segments are looked at for reclaiming.
/// How long a delivery connection with nothing to send waits for its destination's next message before it
/// says QUIT: under a steady stream each message would otherwise open (and the peer accept) a connection of
/// its own. Postfix keeps its connection cache for 2 s by default.
const IDLE_WAIT: Duration = Duration::from_secs(1);
const COMPACT_EVERY: Duration = Duration::from_secs(10);
/// How often the queue gauges are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(2);
/// How often expired suppressions are dropped (they stop suppressing at once; this frees their memory).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// The most of an original message a DSN reads to find its header section; also the largest message a DSN
/// returns whole (RET=FULL); a larger one comes back as its headers.
const DSN_HEADERS_MAX: usize = 1024 * 1024;

/// Unix milliseconds as RFC 3339.
pub fn rfc3339_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Command {
    Enqueue(Box<NewEntry>),
    Finished {
        dest: DestKey,
        attempt: Attempt,
        next: Option<oneshot::Sender<Option<Job>>>,
    },
    /// A delivery connection ended (its [`Slot`] was dropped): its place is free.
    Closed {
        dest: DestKey,
    },
    List {
        after: Option<QueueId>,
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
    /// A connection found no room in the fleet for itself: its job goes back untried and the destination
    /// waits until `until` (ms).
    Hold {
        job: Job,
        until: u64,
        reason: Wait,
    },
    /// A connection gives back a job it never attempted.
    Abandon {
        job: Job,
    },
    /// A connection's source has used up today's warm-up cap: the job goes back untried, and the source
    /// sends nothing until `until` (ms).
    SourceFull {
        job: Job,
        source: IpAddr,
        until: u64,
    },
    /// A connection's source is suspended for the provider of the job's domain: the job goes back
    /// untried, and the source sends nothing to that domain until `until` (ms).
    Suspended {
        job: Job,
        source: IpAddr,
        until: u64,
    },
    /// Source addresses over their cap, and until when.
    Full {
        reply: oneshot::Sender<Vec<(IpAddr, u64)>>,
    },
    /// New settings from a config reload.
    Reconfigure(Box<Reconfigure>),
}

/// Something that runs a delivery connection for a job; the delivery engine implements it.
pub trait Dispatcher: Send + Sync + 'static {
    /// Runs a connection for `job`, reporting through `slot`; the connection holds `slot` until its socket
    /// is closed, and dropping it frees the connection's place.
    fn start(self: Arc<Self>, job: Job, slot: Slot);
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

    /// The number of queued messages, and up to `limit` of them in queue-id order after `after`.
    pub async fn list(&self, after: Option<QueueId>, limit: usize) -> (usize, Vec<MessageView>) {
        let (reply, rx) = oneshot::channel();
        self.send(Command::List {
            after,
            limit,
            reply,
        });
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

    /// Source addresses that have used up today's warm-up cap, with when they send again (Unix ms).
    pub async fn full_sources(&self) -> Vec<(IpAddr, u64)> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Full { reply });
        rx.await.unwrap_or_default()
    }

    /// Applies a reloaded config: routing, limits, retry schedule, expiry, hostname, log policy.
    pub fn reconfigure(&self, r: Reconfigure) {
        self.send(Command::Reconfigure(Box::new(r)));
    }

    /// Stops handing out work and waits until the connections in flight have reported back.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stop { reply });
        let _ = rx.await;
    }
}

/// A delivery connection's place under the connection caps (per destination and in total), from the
/// queue's decision to open it until its socket is closed. Dropping it frees the place, however the
/// connection ends: a connection still saying QUIT keeps its place, and one whose task panicked gives it
/// back all the same.
#[derive(Debug)]
pub struct Slot {
    queue: QueueHandle,
    dest: DestKey,
}

impl Slot {
    /// Reports an attempt and, when `want_next`, waits for the next job for the same destination. None:
    /// close the connection, then drop the slot.
    pub async fn finished(&self, attempt: Attempt, want_next: bool) -> Option<Job> {
        let dest = self.dest.clone();
        if !want_next {
            self.queue.send(Command::Finished {
                dest,
                attempt,
                next: None,
            });
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.queue.send(Command::Finished {
            dest,
            attempt,
            next: Some(tx),
        });
        // With nothing for its destination now, the queue keeps the connection a moment for the next
        // message; past that it closes (a job sent as it gave up goes back to the queue).
        tokio::time::timeout(IDLE_WAIT, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }

    /// Gives back a job that was never attempted because the fleet has no room for another connection to
    /// its destination; the destination opens none for `wait`. Not a delivery attempt.
    pub fn hold(self, job: Job, wait: Duration, reason: Wait) {
        let until = now_ms().saturating_add(wait.as_millis() as u64);
        self.queue.send(Command::Hold { job, until, reason });
    }

    /// Gives back a job that was never attempted because its source address `source` has used up today's
    /// warm-up cap: that address sends nothing more until `until_ms` (Unix ms), and its mail goes from the
    /// pool's others.
    pub fn full(self, job: Job, source: IpAddr, until_ms: u64) {
        self.queue.send(Command::SourceFull {
            job,
            source,
            until: until_ms,
        });
    }

    /// Gives back a job that was never attempted because its source address `source` is suspended for the
    /// provider of the job's domain until `until_ms` (Unix ms): the domain's mail goes from the pool's other
    /// addresses meanwhile, or waits.
    pub fn suspended(self, job: Job, source: IpAddr, until_ms: u64) {
        self.queue.send(Command::Suspended {
            job,
            source,
            until: until_ms,
        });
    }

    /// Gives back a job that was never attempted (the relay is stopping); the place is freed with it.
    pub fn abandon(self, job: Job) {
        self.queue.send(Command::Abandon { job });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.queue.send(Command::Closed {
            dest: self.dest.clone(),
        });
    }
}

/// Why a job went back to the queue untried (`herald_delivery_waits_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The fleet had no connection lease for its destination.
    Lease,
    /// Its destination was over `delivery.per_domain.max_message_rate`.
    Rate,
    /// Its source address had used up today's warm-up cap.
    Warmup,
    /// Its provider's limits for its source address: no connection place, or over a message rate.
    Provider,
    /// Its source address was suspended for its provider by a back-off rule.
    Suspended,
}

impl Wait {
    pub const LABELS: [&'static str; 5] = ["lease", "rate", "warmup", "provider", "suspended"];

    fn label(self) -> &'static str {
        match self {
            Wait::Lease => "lease",
            Wait::Rate => "rate",
            Wait::Warmup => "warmup",
            Wait::Provider => "provider",
            Wait::Suspended => "suspended",
        }
    }
}

/// What a reload changes in a running queue: the core's settings, the name DSNs are sent under, and
/// whether addresses may appear in log lines.
#[derive(Debug)]
pub struct Reconfigure {
    pub settings: Settings,
    pub hostname: String,
    pub log_recipients: bool,
}

impl Reconfigure {
    /// What the queue takes from `config`, with the return-path domains of `rules` and the container's
    /// `memory_limit` (for the default connection cap).
    pub fn new(config: &Config, rules: &Rules, memory_limit: Option<u64>) -> Reconfigure {
        Reconfigure {
            settings: Settings::new(
                config,
                rules.return_paths().domains().cloned().collect(),
                memory_limit,
            ),
            hostname: config.hostname.clone(),
            log_recipients: config.log.recipients,
        }
    }
}

struct Shell {
    core: Core,
    spool: Spool,
    suppressions: Arc<Suppressions>,
    dispatcher: Arc<dyn Dispatcher>,
    handle: QueueHandle,
    hostname: String,
    /// `log.recipients`: addresses may appear in log lines.
    log_recipients: bool,
    rules: Arc<Rules>,
    telemetry: Telemetry,
    stopping: Option<oneshot::Sender<()>>,
    compacting: bool,
    sweeping: Arc<AtomicBool>,
    /// Outcomes for the suppression list, see [`start_observer`].
    observer: mpsc::UnboundedSender<Observed>,
    /// Connections that finished a job when their destination had no other, waiting [`IDLE_WAIT`] for the
    /// next one, by destination: a new message goes over one of them rather than a new connection.
    idle: HashMap<DestKey, Vec<oneshot::Sender<Option<Job>>>>,
}

/// One recipient's outcome on its way to the suppression list.
struct Observed {
    recipient: String,
    observed: Observation,
    id: QueueId,
    sender: String,
    log_recipients: bool,
}

/// Writes outcomes to the suppression list one at a time, in the order the queue decided them, off the
/// runtime (each write is fsynced): a delivery and a full-mailbox bounce to one address must not swap
/// places, or the streak would be reset before the failure instead of after it.
fn start_observer(
    list: Arc<Suppressions>,
    telemetry: Telemetry,
) -> mpsc::UnboundedSender<Observed> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Observed>();
    tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            let list = list.clone();
            let telemetry = telemetry.clone();
            let done = tokio::task::spawn_blocking(move || {
                match list.observe(&o.recipient, &o.observed) {
                    Ok(Some(entry)) => suppressed(
                        &telemetry,
                        &entry,
                        o.id.to_string(),
                        o.sender,
                        None,
                        o.log_recipients,
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record an outcome in the suppression list")
                    }
                }
            })
            .await;
            if let Err(e) = done {
                tracing::error!(error = %e, "suppression list task failed");
            }
        }
    });
    tx
}

/// Starts the queue task, configured by `initial`, with the messages loaded from the spool.
pub fn start(
    initial: Reconfigure,
    spool: Spool,
    suppressions: Arc<Suppressions>,
    loaded: Vec<crate::spool::Loaded>,
    dispatcher: Arc<dyn Dispatcher>,
    rules: Arc<Rules>,
    telemetry: Telemetry,
) -> QueueHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = QueueHandle { tx };
    let observer = start_observer(suppressions.clone(), telemetry.clone());
    let mut shell = Shell {
        core: Core::new(initial.settings),
        spool,
        suppressions,
        dispatcher,
        handle: handle.clone(),
        hostname: initial.hostname,
        log_recipients: initial.log_recipients,
        rules,
        telemetry,
        stopping: None,
        compacting: false,
        sweeping: Arc::new(AtomicBool::new(false)),
        observer,
        idle: HashMap::new(),
    };
    let now = now_ms();
    // The spool's messages are as many as the queue's entries: handing them over one by one while the
    // whole vector stays allocated would hold both at once, the peak of a start. So the vector is walked
    // from its end (reversed first, to keep id order) and shrunk as it goes.
    let mut loaded = loaded;
    loaded.reverse();
    while let Some(l) = loaded.pop() {
        if loaded.len().is_multiple_of(65536) {
            loaded.shrink_to_fit();
        }
        let actions = shell.core.insert(
            NewEntry {
                meta: l.meta,
                states: l.states,
                location: l.location,
            },
            now,
        );
        shell.act(actions, None);
    }
    tokio::spawn(shell.run(rx));
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

/// The classifier's verdict on each failed result of `attempt`.
pub fn verdicts(classifier: &classify::Classifier, attempt: &Attempt) -> Vec<Option<Verdict>> {
    // The host that answered tells whose rules read the reply (Gmail's 4.2.1 is a rate limit).
    let mx = attempt.remote_mta.as_deref();
    attempt
        .results
        .iter()
        .map(|(_, r)| {
            (r.code >= 400).then(|| {
                classifier.classify(
                    &classify::Reply::new(r.code, r.enhanced.as_deref(), &r.text).with_mx(mx),
                )
            })
        })
        .collect()
}

/// Facts of the attempt an outcome belongs to, for its metrics, event and log line.
struct AttemptInfo<'a> {
    domain: &'a str,
    remote_mta: Option<&'a str>,
    tls: Option<&'a str>,
}

impl Shell {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut compact = tokio::time::interval(COMPACT_EVERY);
        compact.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges = tokio::time::interval(GAUGES_EVERY);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.core.next_due();
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
                _ = sleep => {
                    let actions = self.core.due(now_ms());
                    self.act(actions, None);
                }
                _ = compact.tick() => self.compact(),
                _ = gauges.tick() => self.gauges(),
                _ = sweep.tick() => self.sweep(),
            }
            self.serve_idle(now_ms());
            if let Some(reply) = self.stopping.take() {
                if self.core.idle() {
                    let _ = reply.send(());
                    return;
                }
                self.stopping = Some(reply);
            }
        }
    }

    fn command(&mut self, c: Command) {
        let now = now_ms();
        match c {
            Command::Enqueue(e) => {
                let actions = self.core.insert(*e, now);
                self.act(actions, None);
            }
            Command::Finished {
                dest,
                attempt,
                next,
            } => {
                self.finished(attempt, now);
                // Without a next job the connection closes; its place is freed when its slot goes.
                if let Some(tx) = next {
                    match self.core.next_job(&dest, now) {
                        Some(job) => self.hand(tx, job, now),
                        // Nothing now: it waits a moment for the destination's next message (see
                        // `serve_idle`), unless other destinations wait for its place.
                        None if self.stopping.is_none() && !self.core.places_wanted() => {
                            self.idle.entry(dest).or_default().push(tx);
                        }
                        None => {
                            let _ = tx.send(None);
                        }
                    }
                }
            }
            Command::Closed { dest } => {
                let actions = self.core.connection_closed(&dest, now);
                self.act(actions, None);
            }
            Command::List {
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(self.core.list(after, limit));
            }
            Command::Get { id, reply } => {
                let _ = reply.send(self.core.get(id));
            }
            Command::Delete { id, reply } => {
                let found = self.core.remove(id);
                if found {
                    self.spool.record_delete(id);
                    tracing::info!(queue_id = %id, "deleted by an operator");
                }
                let _ = reply.send(found);
            }
            Command::Flush { id, reply } => {
                let (found, actions) = self.core.flush(id, now);
                self.act(actions, None);
                let _ = reply.send(found);
            }
            Command::Reconfigure(r) => {
                let r = *r;
                let actions = self.core.reconfigure(r.settings, now);
                self.hostname = r.hostname;
                self.log_recipients = r.log_recipients;
                self.act(actions, None);
            }
            Command::Stop { reply } => {
                self.core.stop();
                self.stopping = Some(reply);
                self.dispatcher.stopping();
            }
            Command::Hold { job, until, reason } => {
                self.telemetry
                    .metrics
                    .delivery_waits
                    .with_label_values(&[reason.label()])
                    .inc();
                let actions = self.core.hold(&job, until, now);
                self.act(actions, None);
            }
            Command::SourceFull { job, source, until } => {
                self.telemetry
                    .metrics
                    .delivery_waits
                    .with_label_values(&[Wait::Warmup.label()])
                    .inc();
                if !self.core.is_full(source) {
                    tracing::info!(%source, until = %crate::queue::rfc3339_ms(until),
                        "the source has used up today's warm-up cap; its mail goes from the pool's other addresses until the day turns");
                }
                let actions = self.core.source_full(&job, source, until, now);
                self.act(actions, None);
            }
            Command::Suspended { job, source, until } => {
                self.telemetry
                    .metrics
                    .delivery_waits
                    .with_label_values(&[Wait::Suspended.label()])
                    .inc();
                let actions = self.core.source_suspended(&job, source, until, now);
                self.act(actions, None);
            }
            Command::Full { reply } => {
                let _ = reply.send(self.core.full_sources());
            }
            Command::Abandon { job } => {
                let actions = self.core.give_back(&job, now);
                self.act(actions, None);
            }
            Command::Moved {
                segment,
                moved,
                done,
            } => self.moved(segment, moved, done),
            Command::Compacted => self.compacting = false,
        }
    }

    /// Classifies the failures of an attempt with the rules in force, records it in the core, and carries
    /// out what follows.
    fn finished(&mut self, mut attempt: Attempt, now: u64) {
        let verdicts = if attempt.verdicts.len() == attempt.results.len() {
            std::mem::take(&mut attempt.verdicts)
        } else {
            verdicts(&self.rules.classifier(), &attempt)
        };
        let (domain, remote_mta, tls) = (
            attempt.domain.clone(),
            attempt.remote_mta.clone(),
            attempt.tls.clone(),
        );
        let actions = self
            .core
            .record(attempt, &verdicts, now, rand::random::<f64>());
        let info = AttemptInfo {
            domain: &domain,
            remote_mta: remote_mta.as_deref(),
            tls: tls.as_deref(),
        };
        self.act(actions, Some(&info));
    }

    /// Carries out the core's actions; `attempt` describes the attempt that outcomes come from.
    fn act(&mut self, actions: Vec<Action>, attempt: Option<&AttemptInfo<'_>>) {
        // One log line per result of an attempt: (result, first reply, recipients).
        let mut logged: Vec<(&'static str, String, usize, QueueId, f64)> = Vec::new();
        for action in actions {
            match action {
                Action::Start(job) => {
                    let slot = Slot {
                        queue: self.handle.clone(),
                        dest: job.dest.clone(),
                    };
                    // An idle connection to the destination takes the job; the place the core set aside
                    // for a new one is given back as the unused slot drops.
                    let job = match self.idle_connection(&job.dest) {
                        Some(tx) => match tx.send(Some(job)) {
                            Ok(()) => continue,
                            Err(job) => job.unwrap_or_else(|| unreachable!("sent Some")),
                        },
                        None => job,
                    };
                    self.dispatcher.clone().start(job, slot);
                }
                Action::Record { id, updates } => self.spool.record_results(id, &updates),
                Action::Outcome(o) => {
                    self.outcome(&o, attempt);
                    self.observe(&o);
                    let result = o.status.as_str();
                    let delay = o.age_ms as f64 / 1000.0;
                    match logged.iter_mut().find(|l| l.0 == result) {
                        Some(l) => {
                            l.2 += 1;
                            if self.log_recipients {
                                l.1.push_str(&format!(" <{}>", o.recipient()));
                            }
                        }
                        None => {
                            let mut text = self.redact(o.reply.to_string());
                            if self.log_recipients {
                                text.push_str(&format!(" <{}>", o.recipient()));
                            }
                            logged.push((result, text, 1, o.id(), delay));
                        }
                    }
                }
                Action::Dsn {
                    meta,
                    location,
                    notices,
                    then_record,
                } => self.send_dsn(meta, location, notices, then_record),
                Action::NoDsn { id, failed, why } => {
                    tracing::info!(queue_id = %id, failed, "{why}");
                }
            }
        }
        // Outcomes decided without an attempt (a recipient with nowhere to go) are logged all the same.
        let local = AttemptInfo {
            domain: "-",
            remote_mta: None,
            tls: None,
        };
        let a = attempt.unwrap_or(&local);
        for (result, reply, recipients, id, delay) in logged {
            tracing::info!(
                queue_id = %id,
                domain = %a.domain,
                mx = a.remote_mta.unwrap_or("-"),
                tls = a.tls.unwrap_or("none"),
                result,
                reply = %reply,
                delay,
                recipients,
                "delivery"
            );
        }
    }

    fn redact(&self, text: String) -> String {
        if self.log_recipients {
            text
        } else {
            redact_addresses(&text)
        }
    }

    /// Metrics and the event of one recipient's outcome.
    fn outcome(&self, o: &Outcome, attempt: Option<&AttemptInfo<'_>>) {
        let m = &self.telemetry.metrics;
        if let Some((class, category)) = o.verdict {
            let domain_label = m.domain_label(domain_of(o.recipient()));
            m.bounces
                .with_label_values(&[class.as_str(), category.as_str(), &domain_label])
                .inc();
        }
        let result_label = match o.status {
            RcptStatus::Delivered => "delivered",
            RcptStatus::Deferred => "deferred",
            _ => "bounced",
        };
        m.deliveries.with_label_values(&[result_label]).inc();
        // Per sending domain (the envelope sender's, as accepted): delivered, and bounced by a receiver.
        // Expiry is not the receiver's answer; the null sender (a DSN) has no domain.
        if let Some((_, sending)) = o.meta.sender.rsplit_once('@') {
            let counters = &self.telemetry.counters;
            match o.status {
                RcptStatus::Delivered => counters.add(Count::Delivered(sending), 1),
                RcptStatus::Bounced => counters.add(Count::Bounced(sending), 1),
                _ => {}
            }
        }
        if o.status.is_final() {
            m.latency.observe(o.age_ms as f64 / 1000.0);
        }
        self.telemetry.emit(|| {
            let mut ev = Event::new(
                o.status.as_str(),
                o.id().to_string(),
                o.meta.sender.to_string(),
            );
            ev.recipient = Some(o.recipient().to_owned());
            ev.domain = Some(domain_of(o.recipient()).to_ascii_lowercase());
            ev.mx = attempt.and_then(|a| a.remote_mta.map(str::to_owned));
            ev.tls = attempt.and_then(|a| a.tls.map(str::to_owned));
            ev.reply = Some(o.reply.to_string());
            ev.attempts = Some(o.attempts);
            if let Some((class, category)) = o.verdict {
                ev.class = Some(class.as_str());
                ev.category = Some(category.as_str());
            }
            ev
        });
    }

    /// Tells the suppression list what became of a recipient: a delivery ends a mailbox-full streak, a
    /// final failure may suppress or extend one (the policy decides, in `outcome::suppression`). Deferrals
    /// are retries, not news. Off the queue task when there is anything to write (the list is fsynced).
    fn observe(&self, o: &Outcome) {
        let observed = match (o.status, o.verdict) {
            (RcptStatus::Delivered, _) => Observation::Delivered,
            (RcptStatus::Bounced | RcptStatus::Expired, Some((class, category))) => {
                Observation::Failed {
                    class,
                    category,
                    reply: Evidence {
                        source: "smtp".to_owned(),
                        code: Some(o.reply.code),
                        enhanced: o.reply.enhanced.clone(),
                        text: o.reply.text.clone(),
                    },
                }
            }
            _ => return,
        };
        let recipient = o.recipient().to_owned();
        if !self.suppressions.concerns(&recipient, &observed) {
            return;
        }
        let _ = self.observer.send(Observed {
            recipient,
            observed,
            id: o.id(),
            sender: o.meta.sender.to_string(),
            log_recipients: self.log_recipients,
        });
    }

    /// Drops expired suppressions and forgotten streaks (off the queue task), one sweep at a time.
    fn sweep(&mut self) {
        if self.sweeping.load(Ordering::Relaxed) {
            return;
        }
        self.sweeping.store(true, Ordering::Relaxed);
        let list = self.suppressions.clone();
        let sweeping = self.sweeping.clone();
        tokio::task::spawn_blocking(move || {
            match list.sweep() {
                Ok(0) => {}
                Ok(n) => tracing::info!(dropped = n, "expired suppressions and streaks dropped"),
                Err(e) => tracing::error!(error = %e, "cannot sweep the suppression list"),
            }
            sweeping.store(false, Ordering::Relaxed);
        });
    }

    fn gauges(&self) {
        let m = &self.telemetry.metrics;
        m.set_queue_depth(&self.core.depth());
        m.queue_messages.set(self.core.len() as i64);
        let oldest = self
            .core
            .oldest_received_ms()
            .map_or(0, |t| now_ms().saturating_sub(t) / 1000);
        m.queue_oldest_age.set(oldest as i64);
        m.spool_bytes.set(self.spool.bytes() as i64);
        m.suppressions.set(self.suppressions.len() as i64);
        m.suppression_streaks
            .set(self.suppressions.streak_count() as i64);
        m.delivery_connections.set(self.core.connections() as i64);
    }

    /// Points copied messages at their new records; only once their state is written again and durable
    /// can the old segment go.
    fn moved(&mut self, segment: u64, moved: Vec<(QueueId, Location)>, done: bool) {
        let core::Moved {
            rewrite,
            deleted,
            reclaim,
        } = self.core.moved(segment, moved, done);
        for id in deleted {
            self.spool.record_delete(id);
        }
        for (id, updates) in rewrite {
            self.spool.record_results(id, &updates);
        }
        if !reclaim {
            self.compacting = false;
            return;
        }
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

    /// Gives `job` to the connection waiting on `tx`; if that connection went away meanwhile, the job goes
    /// back to the queue.
    fn hand(&mut self, tx: oneshot::Sender<Option<Job>>, job: Job, now: u64) {
        if let Err(Some(job)) = tx.send(Some(job)) {
            let actions = self.core.give_back(&job, now);
            self.act(actions, None);
        }
    }

    /// An idle connection to `dest` still waiting, if there is one.
    fn idle_connection(&mut self, dest: &DestKey) -> Option<oneshot::Sender<Option<Job>>> {
        let waiting = self.idle.get_mut(dest)?;
        let found = std::iter::from_fn(|| waiting.pop()).find(|tx| !tx.is_closed());
        if waiting.is_empty() {
            self.idle.remove(dest);
        }
        found
    }

    /// Hands ready messages to idle connections of their destination, which the core does not start new
    /// connections for when the destination's connections are all open (idle). Idle connections are let go
    /// when the relay stops or another destination waits for a place under the total cap.
    fn serve_idle(&mut self, now: u64) {
        if self.idle.is_empty() {
            return;
        }
        if self.stopping.is_some() || self.core.places_wanted() {
            for (_, waiting) in self.idle.drain() {
                for tx in waiting {
                    let _ = tx.send(None);
                }
            }
            return;
        }
        let dests: Vec<DestKey> = self.idle.keys().cloned().collect();
        for dest in dests {
            while let Some(tx) = self.idle_connection(&dest) {
                match self.core.next_job(&dest, now) {
                    Some(job) => self.hand(tx, job, now),
                    None => {
                        self.idle.entry(dest.clone()).or_default().push(tx);
                        break;
                    }
                }
            }
        }
    }

    /// Reclaims the oldest spool segment when the core says it can go, copying forward what keeps it alive.
    fn compact(&mut self) {
        if self.compacting {
            return;
        }
        let Some(Compaction { segment, copies }) = self
            .core
            .plan_compaction(self.spool.current_segment(), &self.spool.segments())
        else {
            return;
        };
        self.compacting = true;
        let spool = self.spool.clone();
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let mut moved = Vec::new();
            for (id, meta, states, location) in copies {
                let copied = copy_forward(&spool, &meta, &states, location).await;
                match copied {
                    Ok(new) => moved.push((id, new)),
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot copy a message forward");
                        handle.send(Command::Moved {
                            segment,
                            moved,
                            done: false,
                        });
                        return;
                    }
                }
            }
            handle.send(Command::Moved {
                segment,
                moved,
                done: true,
            });
        });
    }

    /// Builds and queues a DSN for `notices`, then records `updates` (the states of the failures it
    /// reports) once the DSN is durable (off the queue task: it reads the spool).
    fn send_dsn(
        &self,
        meta: Arc<MessageMeta>,
        location: Location,
        notices: Vec<dsn::Notice>,
        updates: Vec<crate::spool::RcptUpdate>,
    ) {
        let spool = self.spool.clone();
        let handle = self.handle.clone();
        let hostname = self.hostname.clone();
        tokio::spawn(async move {
            // RET=FULL returns the message whole when it fits the cap a DSN holds of it, else its headers.
            let full = dsn::Report::returns_full(meta.dsn().ret, &notices)
                && location.len <= DSN_HEADERS_MAX as u64;
            let original = if full {
                spool.read(location).await
            } else {
                message_head(&spool, location, DSN_HEADERS_MAX).await
            };
            let original = match original {
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
                notices: &notices,
                envid: meta.dsn().envid.as_deref(),
                original: &original,
                ret: (full && !original.is_empty()).then_some(herald_smtp::dsn::Ret::Full),
            };
            let body = dsn::build(&report, now, &format!("{id}@{hostname}"));
            let mut dsn_meta = MessageMeta::new(
                id,
                now_ms(),
                Arc::from("dsn"),
                "local",
                Arc::from(""),
                [&*meta.sender].into_iter().collect(),
            );
            dsn_meta.smtputf8 = meta.smtputf8;
            // The message returned whole keeps its 8-bit content, and needs BODY=8BITMIME as it did.
            dsn_meta.eight_bit = full && meta.eight_bit;
            match spool.store(&dsn_meta, &[], &[&body]).await {
                Ok(location) => {
                    tracing::info!(queue_id = %id, original = %meta.id, "DSN queued");
                    if !updates.is_empty() {
                        spool.record_results(meta.id, &updates);
                    }
                    handle.enqueue(NewEntry {
                        meta: dsn_meta,
                        states: RcptStates::One(RcptState::QUEUED),
                        location,
                    });
                }
                Err(e) => tracing::error!(
                    original = %meta.id,
                    error = %e,
                    "cannot spool a DSN; the failures it reports stay queued on disk and are tried again after a restart"
                ),
            }
        });
    }
}

/// Copies a message forward into the current segment (its old segment is being reclaimed). A message of
/// more than one read piece goes through a spill, a piece at a time, rather than whole through memory.
async fn copy_forward(
    spool: &Spool,
    meta: &MessageMeta,
    states: &[RcptState],
    location: Location,
) -> Result<Location, Arc<crate::spool::SpoolError>> {
    if location.len <= crate::spool::READ_CHUNK as u64 {
        let data = spool.read(location).await.map_err(Arc::new)?;
        return spool.store(meta, states, &[&data]).await;
    }
    let mut spill = spool.spill().await.map_err(|e| Arc::new(e.into()))?;
    let mut reader = spool.message(location).await.map_err(Arc::new)?;
    while let Some(piece) = reader.next_piece().await.map_err(Arc::new)? {
        spill.write(piece).await.map_err(|e| Arc::new(e.into()))?;
    }
    spool.store_with(meta, states, &[], Some(spill)).await
}

/// The start of a message through its header section (the first empty line), at most `limit` bytes, cut
/// at a line end: a DSN returns only the headers, and a burst of bounces of large messages must not read
/// each one whole.
async fn message_head(
    spool: &Spool,
    location: Location,
    limit: usize,
) -> Result<Vec<u8>, crate::spool::SpoolError> {
    let mut reader = spool.message(location).await?;
    let mut head = Vec::new();
    while let Some(piece) = reader.next_piece().await? {
        // The empty line may straddle two pieces.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(piece);
        if let Some(i) = memchr::memmem::find(&head[from..], b"\r\n\r\n") {
            head.truncate(from + i + 4);
            return Ok(head);
        }
        if head.len() >= limit {
            head.truncate(limit);
            let end = memchr::memrchr(b'\n', &head).map_or(0, |i| i + 1);
            head.truncate(end);
            return Ok(head);
        }
    }
    Ok(head)
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

    #[tokio::test]
    async fn a_dsn_reads_only_the_header_section_of_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let meta = |id| {
            MessageMeta::new(
                id,
                1,
                "a".into(),
                "127.0.0.1:1",
                "app@example.test".into(),
                ["x@dest.test"].into_iter().collect(),
            )
        };
        let piece = crate::spool::READ_CHUNK;
        // Headers that end just across the first piece boundary, then a large body.
        let mut headers = b"Subject: x\r\n".to_vec();
        while headers.len() < piece - 1 {
            headers.extend_from_slice(b"X-Pad: yyyyyyyyyyyyyyyyyyyyyyyy\r\n");
        }
        headers.truncate(piece - 3);
        headers.extend_from_slice(b"\r\n\r\n");
        let body = vec![b'b'; 3 * piece];
        let loc = spool
            .store(&meta(spool.next_id()), &[], &[&headers, b"body\r\n", &body])
            .await
            .unwrap();
        let head = message_head(&spool, loc, DSN_HEADERS_MAX).await.unwrap();
        assert_eq!(head, headers);
        // No empty line within the limit: cut at the last line end before it.
        let lines = b"X-Long: zzzzzzzzzzzzzzzzzzzzzzzz\r\n".repeat(2 * piece / 32);
        let loc = spool
            .store(&meta(spool.next_id()), &[], &[&lines])
            .await
            .unwrap();
        let head = message_head(&spool, loc, piece + 10).await.unwrap();
        assert!(head.len() <= piece + 10 && head.ends_with(b"\r\n"));
        assert_eq!(head, lines[..head.len()]);
    }

    /// A delivery engine that answers 550 5.1.1 for every recipient of every job.
    struct Refusing;

    impl Dispatcher for Refusing {
        fn start(self: Arc<Self>, job: Job, slot: Slot) {
            tokio::spawn(async move {
                let reply = Reply {
                    code: 550,
                    enhanced: Some("5.1.1".into()),
                    text: "no such user".into(),
                    remote: true,
                };
                let attempt = Attempt {
                    id: job.id,
                    results: job.rcpts.iter().map(|&i| (i, reply.clone())).collect(),
                    remote_mta: Some("mx.test".into()),
                    domain: job.domain.clone(),
                    tls: None,
                    next_hop_dsn: false,
                    verdicts: Vec::new(),
                };
                slot.finished(attempt, false).await;
            });
        }

        fn stopping(&self) {}
    }

    /// Where the spool's records are, in the order they were written: (offset, kind, queue id, sender, bounced?).
    fn records(dir: &std::path::Path) -> Vec<(usize, u8, QueueId, String, bool)> {
        use crate::spool::record;
        let mut out = Vec::new();
        let mut segments: Vec<_> = std::fs::read_dir(dir.join("segments"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segments.sort();
        let mut base = 0;
        for seg in segments {
            let buf = std::fs::read(&seg).unwrap();
            let mut pos = 0;
            while let Ok(f) = record::decode_frame(&buf[pos..]) {
                match f.kind {
                    record::KIND_MESSAGE => {
                        let m = record::decode_message(f.kind, f.payload).unwrap();
                        out.push((
                            base + pos,
                            f.kind,
                            m.meta.id,
                            m.meta.sender.to_string(),
                            false,
                        ));
                    }
                    record::KIND_RESULTS => {
                        let (id, updates) = record::decode_results(f.payload).unwrap();
                        let bounced = updates
                            .iter()
                            .any(|u| u.state.status == RcptStatus::Bounced);
                        out.push((base + pos, f.kind, id, String::new(), bounced));
                    }
                    _ => {}
                }
                pos += f.len;
            }
            base += buf.len();
        }
        out
    }

    #[tokio::test]
    async fn a_large_message_is_copied_forward_a_piece_at_a_time_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let meta = MessageMeta::new(
            spool.next_id(),
            now_ms(),
            "a".into(),
            "127.0.0.1:1",
            "app@example.test".into(),
            ["a@dest.test"].into_iter().collect(),
        );
        for size in [100, crate::spool::READ_CHUNK * 5 + 3] {
            let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            let old = spool.store(&meta, &[], &[&data]).await.unwrap();
            let new = copy_forward(&spool, &meta, &[RcptState::QUEUED], old)
                .await
                .unwrap();
            assert!(new.offset > old.offset);
            assert!(spool.read(new).await.unwrap() == data, "{size} bytes");
        }
    }

    #[tokio::test]
    async fn a_bounce_is_recorded_only_after_its_dsn_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(&format!(
            "hostname: relay.test\nspool_dir: {}\nlisteners: [{{ name: a, address: \"127.0.0.1:1\" }}]\n",
            dir.path().display()
        ))
        .unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let suppressions = Arc::new(
            Suppressions::open(dir.path(), herald_config::Suppression::default()).unwrap(),
        );
        let rules = Arc::new(Rules::new(
            Arc::new(crate::outcome::verp::ReturnPaths::default()),
            Arc::new(crate::outcome::Classifier::builtin()),
        ));
        let telemetry = Telemetry::new(
            Arc::new(crate::metrics::Metrics::new(&[])),
            crate::events::EventSink::default(),
            Arc::new(
                crate::fleet::Counters::open(
                    &dir.path().join("fleet"),
                    None,
                    1,
                    std::time::Duration::from_secs(86_400),
                )
                .unwrap(),
            ),
        );
        let queue = start(
            Reconfigure::new(&config, &rules, None),
            spool.clone(),
            suppressions,
            Vec::new(),
            Arc::new(Refusing),
            rules,
            telemetry,
        );
        let meta = MessageMeta::new(
            spool.next_id(),
            now_ms(),
            "a".into(),
            "127.0.0.1:1",
            "app@example.test".into(),
            ["gone@dest.test"].into_iter().collect(),
        );
        let id = meta.id;
        let location = spool
            .store(&meta, &[], &[b"Subject: x\r\n\r\nhi\r\n"])
            .await
            .unwrap();
        queue.enqueue(NewEntry {
            meta,
            states: RcptStates::One(RcptState::QUEUED),
            location,
        });
        // The message bounces, its DSN is queued, and the DSN (from the null sender) bounces in turn.
        for _ in 0..200 {
            if queue.list(None, 10).await.0 == 0 && records(dir.path()).len() >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        spool.sync().await.unwrap();
        let written = records(dir.path());
        let dsn = written
            .iter()
            .find(|r| r.1 == crate::spool::record::KIND_MESSAGE && r.3.is_empty())
            .unwrap_or_else(|| panic!("no DSN in the spool: {written:?}"));
        let bounce = written
            .iter()
            .find(|r| r.1 == crate::spool::record::KIND_RESULTS && r.2 == id && r.4)
            .unwrap_or_else(|| panic!("the bounce was not recorded: {written:?}"));
        assert!(
            dsn.0 < bounce.0,
            "the bounce was recorded before its DSN: {written:?}"
        );
    }
}
