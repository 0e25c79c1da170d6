//! Outbound delivery: from a job (some recipients of one message, one destination) to a reply per
//! recipient.
//!
//! A connection task resolves the destination (MX, or the smarthost), connects to the first host that
//! answers (binding the source address of the sender's IP pool), says EHLO, upgrades with STARTTLS per
//! policy, authenticates to a smarthost, and then sends job after job over the same connection while the
//! queue has more for this destination, up to `messages_per_connection`. A host that drops the connection
//! in the middle of the first transaction of its session has not taken the job, and the next host is tried
//! with it in the same attempt.
//!
//! - `dns`: MX and address resolution.
//! - `client`: the SMTP client protocol.
//! - `tls`: the two TLS client configs: encrypt-only to MX hosts, verified to the smarthost.

pub mod client;
pub mod dns;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};

use crate::fleet::{Allowance, Count, Counters, LEASE_WAIT, Leases, Rates, Turn};

/// The longest wait for a turn under the rate that a delivery connection sits out open.
const KEEP_WAITING: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the per-source gauges are brought up to date.
const GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
use crate::queue::{Attempt, Dispatcher, Job, Reply, Slot, Wait};
use crate::shaping::{Place, Refusal, Shaper};
use crate::spool::Spool;
use arc_swap::ArcSwap;
use client::{Client, ClientError, Rcpt, Stream, Transaction};
use dns::{DnsFailure, Resolver};
use herald_config::{BackoffAction, Config, Delivery, OutboundTls, Source, TlsMode};
use tls::TlsClient;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error(transparent)]
    Resolver(#[from] dns::ResolverError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Shaping(#[from] crate::shaping::ShapingError),
    #[error("delivery.smarthost.password_file {path}: {source}")]
    Password {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What a config reload may change about delivery. A connection keeps the one it started with; the next
/// connection uses the new one.
pub struct Outbound {
    delivery: Delivery,
    hostname: String,
    resolver: Resolver,
    pools: std::collections::HashMap<String, Pool>,
    smarthost_password: Option<String>,
    /// With a smarthost and `tls: starttls` or `implicit`.
    smarthost_tls: Option<SmarthostTls>,
    /// Providers, their limits and the back-off rules.
    shaping: crate::shaping::Table,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An IP pool as connections use it.
struct Pool {
    sources: Vec<Source>,
    warmup: Option<herald_config::Warmup>,
}

/// Where one source address stands in its warm-up today (`GET /shaping`, the source gauges).
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct SourceView {
    pub pool: String,
    pub address: IpAddr,
    pub weight: u32,
    /// The first day of its warm-up, as configured; none for a warm address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_start: Option<String>,
    /// Today's day of the warm-up (1 on the start's day); none for a warm address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_day: Option<u64>,
    /// Today's cap; none when it has none (warm, or past the schedule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_cap: Option<u64>,
    /// Messages sent from it today: the fleet's count with a store, as far as this relay knows it.
    pub sent_today: u64,
}

/// How the smarthost's certificate is checked: the verifying config (system roots and `ca_file`) and the name
/// the certificate must be valid for.
struct SmarthostTls {
    client: TlsClient,
    name: ServerName<'static>,
}

/// Everything connection tasks share.
pub struct Deliverer {
    outbound: ArcSwap<Outbound>,
    /// Opportunistic, encrypt-only TLS for MX hosts; the smarthost's verifying config is in `Outbound`.
    mx_tls: TlsClient,
    spool: Spool,
    /// Turns true when the relay stops: connections still resolving or connecting give their job back.
    stop: tokio::sync::watch::Sender<bool>,
    rules: Arc<crate::outcome::Rules>,
    /// With a fleet store: a connection opens only with a lease for its destination.
    leases: Option<Arc<Leases>>,
    /// `per_domain.max_message_rate`: this relay's, or the fleet's through the store.
    rates: Arc<Rates>,
    /// Messages sent per source address.
    counters: Arc<Counters>,
    /// Limits per provider and source, and back-off.
    shaper: Arc<Shaper>,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("hostname", &self.outbound.load().hostname)
            .finish_non_exhaustive()
    }
}

impl Dispatcher for Deliverer {
    fn start(self: Arc<Self>, job: Job, slot: Slot) {
        tokio::spawn(async move { self.connection(job, slot).await });
    }

    fn stopping(&self) {
        // send_replace: the flag must stick even while no connection is subscribed.
        self.stop.send_replace(true);
    }
}

/// A connection that is ready for transactions.
struct Session {
    client: Client,
    host: String,
    /// The local address the connection went out from (the source the receiver sees).
    source: Option<IpAddr>,
}

/// Gives back a job its provider's limits or its source's standing refused: untried, not an attempt.
/// `source` is the address the connection was to leave from.
fn refused(slot: Slot, job: Job, source: Option<IpAddr>, refusal: Refusal) {
    match refusal {
        Refusal::Suspended { until_ms } => match source {
            Some(source) => slot.suspended(job, source, until_ms),
            // Mail from the relay's own address has no other to go from: it waits.
            None => {
                let wait = until_ms.saturating_sub(crate::queue::now_ms());
                slot.hold(job, std::time::Duration::from_millis(wait), Wait::Suspended);
            }
        },
        Refusal::Busy => slot.hold(job, LEASE_WAIT, Wait::Provider),
        Refusal::Wait(wait) => slot.hold(job, wait, Wait::Provider),
    }
}

/// Why no session could be opened: the replies to report for the job's recipients.
struct NoSession {
    reply: Reply,
    remote_mta: Option<String>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// The delivery settings of `config`. Blocking (reads the smarthost password and CA files, the system's
    /// CA certificates and the system resolver's config): call it off the async runtime.
    pub fn load(config: &Config) -> Result<Outbound, DeliverError> {
        let nameservers = config
            .delivery
            .dns
            .as_ref()
            .map(|d| d.nameservers.clone())
            .unwrap_or_default();
        let smarthost_password = match config
            .delivery
            .smarthost
            .as_ref()
            .and_then(|s| s.password_file.as_ref())
        {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| DeliverError::Password {
                        path: p.clone(),
                        source,
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => None,
        };
        let smarthost_tls = match &config.delivery.smarthost {
            Some(sh) if sh.tls != TlsMode::None => Some(SmarthostTls {
                client: TlsClient::smarthost_verified(sh.ca_file.as_deref())?,
                name: tls::smarthost_name(&sh.host)?,
            }),
            _ => None,
        };
        let pools = config
            .ip_pools
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    Pool {
                        sources: p.sources.clone(),
                        warmup: p.warmup.clone(),
                    },
                )
            })
            .collect();
        Ok(Outbound {
            delivery: config.delivery.clone(),
            hostname: config.hostname.clone(),
            resolver: Resolver::new(&nameservers)?,
            pools,
            smarthost_password,
            smarthost_tls,
            shaping: crate::shaping::Table::load(&config.shaping)?,
        })
    }
}

impl Deliverer {
    pub fn new(
        outbound: Outbound,
        spool: Spool,
        rules: Arc<crate::outcome::Rules>,
        leases: Option<Arc<Leases>>,
        rates: Arc<Rates>,
        counters: Arc<Counters>,
        shaper: Arc<Shaper>,
    ) -> Result<Arc<Deliverer>, DeliverError> {
        Ok(Arc::new(Deliverer {
            outbound: ArcSwap::from_pointee(outbound),
            mx_tls: TlsClient::mx_encrypt_only()?,
            spool,
            stop: tokio::sync::watch::channel(false).0,
            rules,
            leases,
            rates,
            counters,
            shaper,
        }))
    }

    /// Puts a reloaded config's delivery settings, IP pools and hostname in force for new connections.
    pub fn reconfigure(&self, outbound: Outbound) {
        self.outbound.store(Arc::new(outbound));
    }

    /// One connection, from the first job to QUIT. `slot` is its place under the connection caps: it goes
    /// when this returns, after the socket is closed.
    async fn connection(self: Arc<Self>, first: Job, slot: Slot) {
        let mut job = first;
        let mut session: Option<Session> = None;
        // The session was opened for the job in hand (not carried over from an earlier one).
        let mut fresh = false;
        let mut sent = 0u32;
        let o = self.outbound.load_full();
        let rate = o.delivery.per_domain.max_message_rate;
        // In a fleet, one connection more to this destination must fit the fleet's limit; when it does not,
        // the job goes back (no attempt) and the destination waits a moment. Held for the connection's life.
        // The lease comes first: a turn under the rate is not spent on a job that then finds no lease.
        let _lease = match &self.leases {
            Some(leases) => {
                match leases
                    .acquire(&job.dest, o.delivery.per_domain.max_connections)
                    .await
                {
                    Some(lease) => Some(lease),
                    None => {
                        slot.hold(job, LEASE_WAIT, Wait::Lease);
                        return;
                    }
                }
            }
            None => None,
        };
        // The hosts to try, resolved once for the connection: they tell the provider the destination rolls
        // up to, whose limits the connection goes under before it opens.
        let mut stop = self.stop.subscribe();
        let resolved = tokio::select! {
            r = self.hosts(&o, &job) => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        let hosts = match resolved {
            None => {
                slot.abandon(job);
                return;
            }
            Some(Ok(hosts)) => hosts,
            Some(Err(fail)) => {
                let mut attempt = self.fail_all(&job, &fail.reply, fail.remote_mta.clone(), None);
                self.judge(&mut attempt);
                slot.finished(attempt, false).await;
                return;
            }
        };
        // The source the connection leaves from: the job's, unless a reload took it out of the pool.
        let source = self.source(&o, &job).map(|s| s.address);
        let place = match self.enter(&o, &hosts, source).await {
            Ok(place) => place,
            Err(refusal) => {
                refused(slot, job, source, refusal);
                return;
            }
        };
        let max = match &place {
            Some(p) => p.messages_per_connection(o.delivery.per_domain.messages_per_connection),
            None => o.delivery.per_domain.messages_per_connection,
        };
        // The job in hand has no turn under the rate yet.
        let mut has_turn = false;
        // Nor one under its provider's limits.
        let mut shaped = false;
        // Nor one under its source's warm-up cap; once taken, the source it was taken from.
        let mut warmed = false;
        let mut turn: Option<(IpAddr, u64)> = None;
        loop {
            if !shaped && let Some(p) = &place {
                match self.shaper.turn(&o.shaping, p).await {
                    Ok(()) => shaped = true,
                    Err(refusal) => {
                        // First, so that a turn under the destination's rate is not spent on a refused message. A
                        // short wait is spent on the open connection, as for the destination's rate below.
                        if let Refusal::Wait(wait) = refusal
                            && session.is_some()
                            && wait <= KEEP_WAITING
                            && self.sit_out(wait).await
                        {
                            continue;
                        }
                        if let Some(s) = session.take() {
                            s.client.quit().await;
                        }
                        refused(slot, job, source, refusal);
                        return;
                    }
                }
            }
            while !has_turn && let Some(wait) = self.over_rate(rate, &job).await {
                // A short wait is spent on the open connection: closing it to open another a moment later
                // is a handshake per message, which receivers hold against a sender. Otherwise the job
                // goes back and the queue brings it back in time.
                if session.is_some() && wait <= KEEP_WAITING && self.sit_out(wait).await {
                    continue;
                }
                if let Some(s) = session.take() {
                    s.client.quit().await;
                }
                slot.hold(job, wait, Wait::Rate);
                return;
            }
            has_turn = true;
            if !warmed {
                warmed = true;
                if let Some((source, cap)) = self.daily_cap(&o, &job) {
                    match self.counters.take(source, cap).await {
                        Allowance::Go { day } => turn = Some((source, day)),
                        Allowance::Full { until_ms } => {
                            tracing::debug!(queue_id = %job.id, %source, cap,
                                "the source has used up today's warm-up cap; the message goes from another");
                            if let Some(s) = session.take() {
                                s.client.quit().await;
                            }
                            slot.full(job, source, until_ms);
                            return;
                        }
                    }
                }
            }
            if session.is_none() {
                let mut stop = self.stop.subscribe();
                let opened = tokio::select! {
                    r = self.open(&o, &job, &hosts, None) => Some(r),
                    _ = stop.wait_for(|s| *s) => None,
                };
                let Some(opened) = opened else {
                    slot.abandon(job);
                    if let Some((source, day)) = turn.take() {
                        self.counters.give_back(source, day).await;
                    }
                    return;
                };
                match opened {
                    Ok(s) => {
                        session = Some(s);
                        fresh = true;
                    }
                    Err(fail) => {
                        if let Some((source, day)) = turn.take() {
                            self.counters.give_back(source, day).await;
                        }
                        let mut attempt =
                            self.fail_all(&job, &fail.reply, fail.remote_mta.clone(), None);
                        self.judge(&mut attempt);
                        self.back_off(&o, place.as_ref(), &job, &mut attempt).await;
                        // The next job for this destination would meet the same fate now; end here and
                        // let the queue retry on its schedule.
                        slot.finished(attempt, false).await;
                        return;
                    }
                }
            }
            let Some(s) = session.as_mut() else { return };
            let before = s.client.replies();
            let (mut attempt, mut usable) = self.transact(s, &job).await;
            if !fresh && !usable && s.client.replies() == before {
                // A connection kept from an earlier job that died before the server said a word about this
                // one (closed while idle, by the server or a middlebox): the job was not tried, and nothing
                // of it can have been taken. The loop opens a new one for it, as if none had been kept.
                tracing::debug!(queue_id = %job.id, host = %s.host, "kept connection was closed; opening a new one");
                session = None;
                continue;
            }
            if fresh && lost_in_transaction(&attempt, usable) {
                // RFC 5321 section 5.1: the MX hosts are tried in order until an attempt succeeds, and one
                // that drops the connection in the middle of the transaction has not succeeded. A retry
                // starts at the same host again, so a host that always drops it (a crashing content filter)
                // would keep the mail from a healthy next host until it expired. A session carried over from
                // an earlier job is left out: a cached connection the server has closed says nothing about
                // the host.
                let failed = s.host.clone();
                let mut stop = self.stop.subscribe();
                let next = tokio::select! {
                    r = self.open(&o, &job, &hosts, Some(&failed)) => r.ok(),
                    _ = stop.wait_for(|s| *s) => None,
                };
                if let Some(next) = next {
                    tracing::info!(queue_id = %job.id, host = %failed, next = %next.host,
                        "connection lost in the middle of a transaction; trying the next MX host");
                    let s = session.insert(next);
                    (attempt, usable) = self.transact(s, &job).await;
                }
            }
            // A message counts as sent from its source once a recipient took it; a warm-up turn already
            // counted it, and goes back when none did.
            let accepted = attempt.results.iter().any(|(_, r)| r.code / 100 == 2);
            match turn.take() {
                Some((source, day)) if !accepted => self.counters.give_back(source, day).await,
                Some(_) => {}
                None => {
                    if let Some(ip) = session.as_ref().and_then(|s| s.source)
                        && accepted
                    {
                        self.counters.add(Count::Sent(ip), 1);
                    }
                }
            }
            self.judge(&mut attempt);
            let suspended = self.back_off(&o, place.as_ref(), &job, &mut attempt).await;
            fresh = false;
            sent += 1;
            let want_next = usable && sent < max && !suspended;
            match slot.finished(attempt, want_next).await {
                Some(next) => {
                    job = next;
                    has_turn = false;
                    shaped = false;
                    warmed = false;
                }
                None => break,
            }
        }
        if let Some(s) = session {
            s.client.quit().await;
        }
    }

    /// A place under the limits of the provider `hosts` roll up to, for `source`; none when the
    /// destination is not shaped (a smarthost, an address literal).
    async fn enter(
        &self,
        o: &Outbound,
        hosts: &[(String, u16)],
        source: Option<IpAddr>,
    ) -> Result<Option<Place>, Refusal> {
        if o.delivery.smarthost.is_some() {
            return Ok(None);
        }
        // Only the best host decides (an address literal's host is no provider's).
        let best = hosts.first().map(|(h, _)| std::slice::from_ref(h));
        // A provider without limits that no back-off rule names costs nothing per message.
        let Some(provider) = best
            .and_then(|h| o.shaping.provider_of(h))
            .filter(|p| o.shaping.shapes(p))
        else {
            return Ok(None);
        };
        self.shaper
            .enter(&o.shaping, provider, source)
            .await
            .map(Some)
    }

    /// Classifies the attempt's failed replies, once: the back-off rules act on the verdicts, and the
    /// queue records them.
    fn judge(&self, attempt: &mut Attempt) {
        attempt.verdicts = crate::queue::verdicts(&self.rules.classifier(), attempt);
    }

    /// Runs the back-off rules over the attempt's failed replies (each distinct reply once, until one
    /// matches a rule). True when the source was suspended for the provider: the connection ends.
    async fn back_off(
        &self,
        o: &Outbound,
        place: Option<&Place>,
        job: &Job,
        attempt: &mut Attempt,
    ) -> bool {
        let Some(place) = place else { return false };
        let mut seen: Vec<&Reply> = Vec::new();
        let mut acted = None;
        for ((_, reply), verdict) in attempt.results.iter().zip(&attempt.verdicts) {
            // The relay's own verdicts (DNS, a connection refused, TLS) say nothing about the provider.
            let Some(verdict) = verdict.filter(|_| reply.remote) else {
                continue;
            };
            if seen.iter().any(|r| {
                r.code == reply.code && r.enhanced == reply.enhanced && r.text == reply.text
            }) {
                continue;
            }
            seen.push(reply);
            if let Some(action) = self
                .shaper
                .observe(
                    &o.shaping,
                    place,
                    reply,
                    verdict,
                    job.id.to_string(),
                    job.meta.sender.to_string(),
                )
                .await
            {
                acted = Some((action, reply.clone()));
                break;
            }
        }
        match acted {
            Some((BackoffAction::Bounce, matched)) => {
                // The provider said a retry will not succeed: the recipients it refused so bounce now.
                for ((_, reply), verdict) in
                    attempt.results.iter_mut().zip(attempt.verdicts.iter_mut())
                {
                    if reply.code < 500
                        && reply.code == matched.code
                        && reply.enhanced == matched.enhanced
                        && reply.text == matched.text
                    {
                        reply.code = 554;
                        reply.enhanced = reply.enhanced.as_ref().map(|e| format!("5{}", &e[1..]));
                        if let Some(v) = verdict {
                            v.0 = crate::outcome::classify::Class::Hard;
                        }
                    }
                }
                false
            }
            Some((BackoffAction::Suspend, _)) => true,
            _ => false,
        }
    }

    /// Spends a short wait for a turn on the open connection: true once it has passed, false when the
    /// relay stops first.
    async fn sit_out(&self, wait: std::time::Duration) -> bool {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// How long `job` must wait when its destination is over `rate`; none when it may go now.
    async fn over_rate(
        &self,
        rate: Option<herald_config::Rate>,
        job: &Job,
    ) -> Option<std::time::Duration> {
        match self.rates.take(&job.dest, rate?).await {
            Turn::Go => None,
            Turn::Wait(wait) => {
                tracing::debug!(queue_id = %job.id, destination = %job.dest, rate = %rate?, wait = ?wait,
                    "over the destination's message rate; the message waits its turn");
                Some(wait)
            }
        }
    }

    fn fail_all(
        &self,
        job: &Job,
        reply: &Reply,
        remote_mta: Option<String>,
        tls: Option<&str>,
    ) -> Attempt {
        Attempt {
            id: job.id,
            results: job.rcpts.iter().map(|&i| (i, reply.clone())).collect(),
            remote_mta,
            domain: job.domain.clone(),
            tls: tls.map(str::to_owned),
            next_hop_dsn: false,
            verdicts: Vec::new(),
        }
    }

    fn local(code: u16, enhanced: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced.to_owned()),
            text: text.into(),
            remote: false,
        }
    }

    /// The hosts to try, best first.
    async fn hosts(&self, o: &Outbound, job: &Job) -> Result<Vec<(String, u16)>, NoSession> {
        if let Some(sh) = &o.delivery.smarthost {
            return Ok(vec![(sh.host.clone(), sh.port)]);
        }
        let port = o.delivery.port;
        if job.domain.starts_with('[') {
            return Ok(vec![(job.domain.to_string(), port)]);
        }
        match o.resolver.mx_hosts(&job.domain).await {
            Ok(hosts) => Ok(hosts.into_iter().map(|h| (h, port)).collect()),
            Err(e) => Err(NoSession {
                reply: dns_reply(&e),
                remote_mta: None,
            }),
        }
    }

    /// The job's source (the queue picked it by the pool's weights), with its EHLO name. When a reload
    /// has just taken that address out of the pool, the pool in force picks again.
    fn source(&self, o: &Outbound, job: &Job) -> Option<Source> {
        let pool = &o.pools.get(job.pool.as_deref()?)?.sources;
        if let Some(s) = pool.iter().find(|s| Some(s.address) == job.source) {
            return Some(s.clone());
        }
        let weights: Vec<(IpAddr, u32)> = pool.iter().map(|s| (s.address, s.weight)).collect();
        let address = crate::queue::core::source_of(&weights, job.id)?;
        pool.iter().find(|s| s.address == address).cloned()
    }

    /// The job's source address and its cap today, when it is warming up.
    fn daily_cap(&self, o: &Outbound, job: &Job) -> Option<(IpAddr, u64)> {
        let pool = o.pools.get(job.pool.as_deref()?)?;
        let source = self.source(o, job)?;
        let cap = pool.warmup.as_ref()?.cap(
            source
                .warmup_start
                .as_ref()?
                .day_index(unix_now(), self.counters.day_length()),
        )?;
        Some((source.address, cap))
    }

    /// Every pool's addresses and where each stands in its warm-up today.
    pub fn sources(&self) -> Vec<SourceView> {
        let o = self.outbound.load();
        let today = self.counters.day(self.counters.today());
        let now = unix_now();
        let day_length = self.counters.day_length();
        let mut out: Vec<SourceView> = Vec::new();
        for (name, pool) in &o.pools {
            for s in &pool.sources {
                let index = s
                    .warmup_start
                    .as_ref()
                    .map(|w| w.day_index(now, day_length));
                out.push(SourceView {
                    pool: name.clone(),
                    address: s.address,
                    weight: s.weight,
                    warmup_start: s.warmup_start.as_ref().map(ToString::to_string),
                    warmup_day: index.filter(|_| pool.warmup.is_some()).map(|i| i + 1),
                    daily_cap: index.and_then(|i| pool.warmup.as_ref()?.cap(i)),
                    sent_today: today
                        .sources
                        .get(&s.address.to_canonical().to_string())
                        .copied()
                        .unwrap_or(0),
                });
            }
        }
        out.sort_by(|a, b| (&a.pool, a.address).cmp(&(&b.pool, b.address)));
        out
    }

    /// Traffic shaping by provider for `GET /shaping`: the limits each provider has, the others' limits,
    /// and every provider and source this relay has sent to lately with its standing.
    pub fn providers(
        &self,
    ) -> (
        Vec<crate::shaping::LimitsView>,
        herald_config::ProviderLimits,
        Vec<crate::shaping::PairView>,
    ) {
        let o = self.outbound.load();
        let (limits, default) = o.shaping.limit_views();
        (limits, default, self.shaper.views(&o.shaping))
    }

    /// Keeps `herald_source_sent_today`, `herald_source_daily_cap` and `herald_shaping_suspended` current,
    /// and says when suspensions end, until `stop`.
    pub fn start_gauges(
        self: &Arc<Self>,
        metrics: Arc<crate::metrics::Metrics>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(GAUGES_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let Some(d) = me.upgrade() else { return };
                metrics.set_sources(&d.sources());
                d.shaper.tick(d.outbound.load().shaping.recovery);
            }
        });
    }

    /// Connects to the first host that greets, says EHLO, starts TLS and authenticates as configured. With
    /// `after`, only the hosts that come after that one are tried.
    async fn open(
        &self,
        o: &Outbound,
        job: &Job,
        hosts: &[(String, u16)],
        after: Option<&str>,
    ) -> Result<Session, NoSession> {
        let hosts = match after {
            Some(failed) => hosts_after(hosts.to_vec(), failed),
            None => hosts.to_vec(),
        };
        let source = self.source(o, job);
        let ehlo = source
            .as_ref()
            .map_or(o.hostname.as_str(), |s| s.ehlo.as_str())
            .to_owned();
        let mut last = NoSession {
            reply: Self::local(451, "4.4.1", "no MX host could be reached"),
            remote_mta: None,
        };
        for (host, port) in hosts {
            let addrs = if o.delivery.smarthost.is_some() {
                match host.parse::<IpAddr>() {
                    Ok(ip) => vec![ip],
                    Err(_) => match o.resolver.addresses(&host).await {
                        Ok(a) => a,
                        Err(e) => {
                            last.reply = dns_reply(&e);
                            continue;
                        }
                    },
                }
            } else {
                match o.resolver.addresses(&host).await {
                    Ok(a) => a,
                    Err(e) => {
                        last.reply = dns_reply(&DnsFailure::Temporary {
                            name: host.clone(),
                            reason: e.to_string(),
                        });
                        continue;
                    }
                }
            };
            for ip in addrs {
                let addr = SocketAddr::new(ip, port);
                match self
                    .try_host(o, &host, addr, source.as_ref(), &ehlo, true)
                    .await
                {
                    Ok(s) => return Ok(s),
                    Err(Retry::WithoutTls(fail)) => {
                        // Opportunistic TLS that fails is not a reason to give up: try the same host in clear.
                        tracing::info!(host = %host, error = %fail.reply, "STARTTLS failed; retrying without TLS");
                        match self
                            .try_host(o, &host, addr, source.as_ref(), &ehlo, false)
                            .await
                        {
                            Ok(s) => return Ok(s),
                            Err(Retry::WithoutTls(f) | Retry::Next(f)) => last = f,
                            Err(Retry::Stop(f)) => return Err(f),
                        }
                    }
                    Err(Retry::Next(f)) => last = f,
                    Err(Retry::Stop(f)) => return Err(f),
                }
            }
        }
        Err(last)
    }

    async fn try_host(
        &self,
        o: &Outbound,
        host: &str,
        addr: SocketAddr,
        source: Option<&Source>,
        ehlo: &str,
        use_tls: bool,
    ) -> Result<Session, Retry> {
        let mta = Some(host.to_owned());
        let fail = |reply: Reply| NoSession {
            reply,
            remote_mta: mta.clone(),
        };
        let t = &o.delivery.timeouts;
        let tcp = match tokio::time::timeout(t.connect, connect(addr, source)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Retry::Next(fail(Self::local(
                    451,
                    "4.4.1",
                    format!("connect to {host}[{addr}]: {e}"),
                ))));
            }
            Err(_) => {
                return Err(Retry::Next(fail(Self::local(
                    451,
                    "4.4.1",
                    format!("connect to {host}[{addr}]: timed out"),
                ))));
            }
        };
        let local = tcp.local_addr().ok().map(|a| a.ip());
        let _ = tcp.set_nodelay(true);
        let limits = client::Limits {
            command: t.command,
            data: t.data,
        };
        let smarthost = o.delivery.smarthost.as_ref();
        // The smarthost's certificate is verified against its configured name; an MX host's is not checked
        // (the name is only SNI), as opportunistic TLS goes.
        let (tls, name) = match &o.smarthost_tls {
            Some(sh) => (&sh.client, sh.name.clone()),
            None => (
                &self.mx_tls,
                ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
                    ServerName::try_from("invalid.invalid").expect("a valid DNS name")
                }),
            ),
        };
        let implicit = smarthost.is_some_and(|s| s.tls == TlsMode::Implicit);
        let mut c = if implicit {
            match Client::connect_tls(tcp, tls, name.clone(), limits).await {
                Ok(c) => c,
                Err(e) => return Err(Retry::Next(fail(tls_failure(host, addr, &e)))),
            }
        } else {
            Client::new(Stream::Plain(tcp), limits)
        };
        let err =
            |e: ClientError| Retry::Next(fail(Self::local(451, "4.4.2", format!("{host}: {e}"))));
        let greeting = c
            .read_response("the greeting", t.command)
            .await
            .map_err(err)?;
        if greeting.code != 220 {
            c.quit().await;
            return Err(Retry::Next(fail(remote_reply(&greeting))));
        }
        let r = c.hello(ehlo).await.map_err(err)?;
        if !r.is_positive() {
            c.quit().await;
            return Err(Retry::Next(fail(remote_reply(&r))));
        }
        let want_tls = match smarthost {
            Some(s) => s.tls == TlsMode::Starttls,
            None => use_tls && o.delivery.tls != OutboundTls::None,
        };
        let must_tls = match smarthost {
            Some(s) => s.tls == TlsMode::Starttls,
            None => o.delivery.tls == OutboundTls::Required,
        };
        if want_tls && c.tls.is_none() {
            if c.extensions.starttls {
                match c.starttls(tls, name).await {
                    Ok((next, None)) => {
                        c = next;
                        let r = c.hello(ehlo).await.map_err(err)?;
                        if !r.is_positive() {
                            c.quit().await;
                            return Err(Retry::Next(fail(remote_reply(&r))));
                        }
                    }
                    Ok((plain, Some(refused))) => {
                        if must_tls {
                            plain.quit().await;
                            return Err(Retry::Next(fail(remote_reply(&refused))));
                        }
                        c = plain;
                    }
                    Err(e) => {
                        let f = fail(tls_failure(host, addr, &e));
                        return Err(if must_tls {
                            Retry::Next(f)
                        } else {
                            Retry::WithoutTls(f)
                        });
                    }
                }
            } else if must_tls {
                c.quit().await;
                return Err(Retry::Next(fail(Self::local(
                    451,
                    "4.7.10",
                    format!("{host} does not offer STARTTLS and TLS is required"),
                ))));
            }
        }
        if let (Some(sh), Some(pw)) = (smarthost, &o.smarthost_password)
            && let Some(user) = &sh.username
        {
            let r = match c.authenticate(user, pw).await {
                Ok(r) => r,
                // The client's own guard: the policy above never gets here without a verified certificate.
                Err(e @ ClientError::Unverified) => {
                    c.quit().await;
                    return Err(Retry::Stop(fail(Self::local(
                        451,
                        "4.7.5",
                        format!("{host}: {e}"),
                    ))));
                }
                Err(e) => return Err(err(e)),
            };
            if r.code != 235 {
                c.quit().await;
                // A refused login will not get better by retrying every minute, but it is our config, not
                // the recipients' fault: defer, so fixing the credentials delivers the queue.
                let mut reply = remote_reply(&r);
                if reply.code >= 500 {
                    reply.code = 451;
                    reply.enhanced = Some("4.7.8".to_owned());
                }
                return Err(Retry::Stop(fail(reply)));
            }
        }
        Ok(Session {
            client: c,
            host: host.to_owned(),
            source: local,
        })
    }

    /// Sends one job over an open session. Returns the attempt and whether the session can carry more.
    async fn transact(&self, s: &mut Session, job: &Job) -> (Attempt, bool) {
        let mta = Some(s.host.clone());
        // Streamed from the spool a piece at a time (each transaction reads it again from the start): what a
        // delivery holds of its message stays one piece, whatever the message's size.
        let mut body = match self.spool.message(job.location).await {
            Ok(r) => r,
            Err(e) => {
                let reply = Self::local(
                    451,
                    "4.3.0",
                    format!("cannot read the message from the spool: {e}"),
                );
                return (
                    self.fail_all(job, &reply, mta, s.client.tls.as_deref()),
                    true,
                );
            }
        };
        let ext = &s.client.extensions;
        let refusal = if job.meta.smtputf8 && !ext.smtputf8 {
            Some(Self::local(
                554,
                "5.6.7",
                format!(
                    "{} does not support SMTPUTF8, which this message needs",
                    s.host
                ),
            ))
        } else if job.meta.eight_bit && ext.esmtp && !ext.eight_bit {
            Some(Self::local(
                554,
                "5.6.3",
                format!(
                    "{} does not support 8BITMIME and conversion is not supported",
                    s.host
                ),
            ))
        } else if let Some(limit) = ext.size.filter(|&l| l > 0 && body.len() > l) {
            Some(Self::local(
                552,
                "5.3.4",
                format!(
                    "message of {} bytes exceeds {}'s limit of {limit}",
                    body.len(),
                    s.host
                ),
            ))
        } else {
            None
        };
        if let Some(reply) = refusal {
            return (
                self.fail_all(job, &reply, mta, s.client.tls.as_deref()),
                true,
            );
        }
        // With a return path, each recipient gets its own envelope sender (a token naming it), and so its
        // own transaction on this connection; otherwise one transaction carries them all.
        let rp = self.rules.return_paths();
        let groups: Vec<(String, Vec<u32>)> = match job
            .rcpts
            .iter()
            .map(|&i| {
                rp.envelope_sender(job.id, &job.meta.sender, &job.meta.recipients[i as usize])
                    .map(|s| (s, vec![i]))
            })
            .collect::<Option<Vec<_>>>()
        {
            Some(per_recipient) => per_recipient,
            None => vec![(job.meta.sender.to_string(), job.rcpts.clone())],
        };
        let mut results: Vec<(u32, Reply)> = Vec::with_capacity(job.rcpts.len());
        let mut usable = true;
        for (sender, rcpts) in &groups {
            if !usable {
                // The connection failed or the server is closing: the rest wait for another attempt.
                let reply = Self::local(451, "4.4.2", format!("{}: connection lost", s.host));
                results.extend(rcpts.iter().map(|&i| (i, reply.clone())));
                continue;
            }
            let tx = Transaction {
                sender,
                recipients: rcpts
                    .iter()
                    .map(|&i| Rcpt {
                        address: &job.meta.recipients[i as usize],
                        dsn: job.meta.rcpt_dsn_given(i as usize),
                    })
                    .collect(),
                size: body.len(),
                eight_bit: job.meta.eight_bit,
                smtputf8: job.meta.smtputf8,
                dsn: job.meta.dsn(),
            };
            body.rewind();
            match s.client.send(&tx, &mut body).await {
                Ok(result) => {
                    let replies: Vec<(u32, Reply)> = rcpts
                        .iter()
                        .zip(result.replies)
                        .map(|(&i, r)| (i, remote_reply(&r)))
                        .collect();
                    usable = replies.iter().all(|(_, r)| r.code != 421);
                    results.extend(replies);
                }
                Err(ClientError::Body(e)) => {
                    // The server has part of the message and no end of data: dropping the connection makes it
                    // discard what it got.
                    let reply = Self::local(
                        451,
                        "4.3.0",
                        format!("cannot read the message from the spool: {e}"),
                    );
                    results.extend(rcpts.iter().map(|&i| (i, reply.clone())));
                    usable = false;
                }
                Err(e) => {
                    let reply = Self::local(451, "4.4.2", format!("{}: {e}", s.host));
                    results.extend(rcpts.iter().map(|&i| (i, reply.clone())));
                    usable = false;
                }
            }
        }
        (
            Attempt {
                id: job.id,
                results,
                remote_mta: mta,
                domain: job.domain.clone(),
                tls: s.client.tls.clone(),
                next_hop_dsn: s.client.extensions.dsn,
                verdicts: Vec::new(),
            },
            usable,
        )
    }
}

/// Whether an attempt ended with the connection lost before the server answered for any recipient: the
/// session is unusable and every result is the relay's own temporary failure (an I/O error, a time-out,
/// the server closing), none a reply from the server.
fn lost_in_transaction(attempt: &Attempt, usable: bool) -> bool {
    !usable
        && !attempt.results.is_empty()
        && attempt
            .results
            .iter()
            .all(|(_, r)| !r.remote && (400..500).contains(&r.code))
}

/// The hosts after `failed` in the order they are tried; none when `failed` is not among them (the MX
/// records changed meanwhile: the next attempt starts from the top).
fn hosts_after(mut hosts: Vec<(String, u16)>, failed: &str) -> Vec<(String, u16)> {
    match hosts.iter().position(|(h, _)| h == failed) {
        Some(i) => {
            hosts.drain(..=i);
            hosts
        }
        None => Vec::new(),
    }
}

enum Retry {
    /// Try the next address or host.
    Next(NoSession),
    /// Try the same address again without STARTTLS.
    WithoutTls(NoSession),
    /// Give up on this destination for now.
    Stop(NoSession),
}

fn remote_reply(r: &client::Response) -> Reply {
    Reply {
        code: r.code,
        enhanced: r.enhanced.clone(),
        text: r.text.clone(),
        remote: true,
    }
}

/// The reply for a failed TLS handshake. A certificate that did not verify (the smarthost's: MX hosts' are
/// not checked) is logged as such: the attempt is deferred, and nothing, credentials least of all, was sent.
fn tls_failure(host: &str, addr: SocketAddr, e: &ClientError) -> Reply {
    let ClientError::Certificate(cert) = e else {
        return Deliverer::local(451, "4.7.5", format!("{host}: {e}"));
    };
    let why = match cert {
        rustls::CertificateError::UnknownIssuer => {
            "issued by a CA that is neither among the system's CA certificates nor in \
             delivery.smarthost.ca_file"
                .to_owned()
        }
        // A trusted CA of the issuer's name exists but did not sign it: typically a CA (or a self-signed
        // certificate) renewed with a new key while the CA file still holds the old one.
        rustls::CertificateError::BadSignature => {
            "its signature does not verify with the trusted CA certificate of its issuer's name (a CA \
             renewed with a new key, and the CA file not updated yet?)"
                .to_owned()
        }
        other => other.to_string(),
    };
    tracing::warn!(
        smarthost = host,
        address = %addr,
        error = %why,
        "the smarthost's certificate did not verify: deferred, no credentials sent"
    );
    Deliverer::local(
        451,
        "4.7.5",
        format!("{host}[{addr}]: certificate not verified: {why}"),
    )
}

fn dns_reply(e: &DnsFailure) -> Reply {
    let code = if e.is_permanent() { 550 } else { 451 };
    Deliverer::local(code, e.status(), e.to_string())
}

async fn connect(addr: SocketAddr, source: Option<&Source>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(s) = source
        && s.address.is_ipv4() == addr.is_ipv4()
        && !s.address.is_unspecified()
    {
        socket.bind(SocketAddr::new(s.address, 0))?;
    }
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(results: Vec<(u32, Reply)>) -> Attempt {
        Attempt {
            id: crate::spool::QueueId(1),
            results,
            remote_mta: Some("mx1.example.test".into()),
            domain: Arc::from("example.test"),
            tls: None,
            next_hop_dsn: false,
            verdicts: Vec::new(),
        }
    }

    fn reply(code: u16, remote: bool) -> Reply {
        Reply {
            code,
            enhanced: None,
            text: String::new(),
            remote,
        }
    }

    #[test]
    fn a_connection_lost_before_any_reply_is_lost_in_the_transaction() {
        let lost = attempt(vec![(0, reply(451, false)), (1, reply(451, false))]);
        assert!(lost_in_transaction(&lost, false));
        // The session carries on: nothing was lost.
        assert!(!lost_in_transaction(&lost, true));
    }

    #[test]
    fn a_reply_from_the_server_is_not_a_lost_connection() {
        // 421: the server said it is closing; it answered.
        assert!(!lost_in_transaction(
            &attempt(vec![(0, reply(421, true))]),
            false
        ));
        // One recipient's transaction went through before the connection was lost: it is not sent again.
        let partly = attempt(vec![(0, reply(250, true)), (1, reply(451, false))]);
        assert!(!lost_in_transaction(&partly, false));
        assert!(!lost_in_transaction(&attempt(vec![]), false));
    }

    #[test]
    fn the_hosts_after_a_failed_one_keep_their_order() {
        let hosts = |names: &[&str]| -> Vec<(String, u16)> {
            names.iter().map(|n| ((*n).to_owned(), 25)).collect()
        };
        let all = hosts(&["mx1", "mx2", "mx3"]);
        assert_eq!(hosts_after(all.clone(), "mx1"), hosts(&["mx2", "mx3"]));
        assert_eq!(hosts_after(all.clone(), "mx3"), hosts(&[]));
        assert_eq!(hosts_after(all, "gone"), hosts(&[]));
    }
}
