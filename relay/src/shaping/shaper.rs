//! The shaping a delivery connection goes through, per provider and source address: a place under the
//! provider's connection limit when it opens, a turn under its message rates before each message, and
//! after each failed reply the back-off rules, which may suspend or slow down the source for the provider.
//!
//! Connection places are leases in the store when the fleet has one (`lease:{provider:<p>/<source>}`),
//! else this relay's own count; rates are the fleet's rates (`rate:{provider:<p>/<source>#<i>}`); standings
//! are `fleet::Backoffs`. A standing read from the store is trusted for `FRESH`, so a connection's turns
//! cost no round trip, and a suspension one relay applies reaches the others within that.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use herald_config::{BackoffAction, ProviderLimits, Rate};

use super::standing::{Standing, scaled};
use super::table::Table;
use crate::events::Event;
use crate::fleet::{Backoffs, Lease, Leases, Rates, Turn};
use crate::queue::{Reply, Verdict, now_ms, rfc3339_ms};
use crate::telemetry::Telemetry;

/// How long a standing read from the store is trusted.
const FRESH: Duration = Duration::from_secs(1);
/// A provider and source nothing has used for this long, standing recovered, is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Why a connection or a message may not go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source is suspended for the provider until then (ms since the epoch).
    Suspended { until_ms: u64 },
    /// The provider's connection limit for the source is reached.
    Busy,
    /// Over one of the provider's message rates for the source: the next turn comes in this long.
    Wait(Duration),
}

/// One provider and source as this relay knows it.
#[derive(Debug)]
struct Pair {
    provider: Arc<str>,
    source: Option<IpAddr>,
    standing: Option<Standing>,
    /// When `standing` was last read from the store.
    read_at: Option<Instant>,
    /// This relay suspended it, and has not yet said that it resumed.
    announce: bool,
    /// Connections this relay has open for it.
    open: u32,
    used: Instant,
}

/// This relay's shaping state.
#[derive(Debug)]
pub struct Shaper {
    backoffs: Arc<Backoffs>,
    leases: Option<Arc<Leases>>,
    rates: Arc<Rates>,
    telemetry: Telemetry,
    pairs: Mutex<HashMap<Arc<str>, Pair>>,
    /// Label sets of `herald_shaping_suspended` set last time.
    shown: Mutex<HashSet<(String, String)>>,
}

/// A connection's place under its provider's limits; given back when dropped.
#[derive(Debug)]
pub struct Place {
    shaper: Arc<Shaper>,
    key: Arc<str>,
    pub provider: Arc<str>,
    pub source: Option<IpAddr>,
    pub limits: ProviderLimits,
    rate_keys: Vec<Arc<str>>,
    _lease: Option<Lease>,
}

impl Place {
    /// The messages this connection may carry, by the provider's limit and `per_domain`'s.
    pub fn messages_per_connection(&self, per_domain: u32) -> u32 {
        self.limits
            .messages_per_connection
            .map_or(per_domain, |m| m.min(per_domain))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(p) = self.shaper.lock().get_mut(&self.key) {
            p.open = p.open.saturating_sub(1);
        }
    }
}

/// One provider and source in `GET /shaping`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PairView {
    pub provider: String,
    /// The source address; none for mail that leaves from the relay's own address.
    pub source: Option<String>,
    /// The limits in force now (the provider's, scaled by `share`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_per_connection: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub max_message_rates: Vec<String>,
    /// The share of the provider's limits in force: 1 unless a back-off rule acted.
    pub share: f64,
    /// Connections this relay has open for it.
    pub connections: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended_until: Option<String>,
    /// The last back-off action and the reply that brought it, while it lasts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered_at: Option<String>,
}

fn source_label(source: Option<IpAddr>) -> String {
    source.map_or_else(|| "-".to_owned(), |s| s.to_canonical().to_string())
}

impl Shaper {
    pub fn new(
        backoffs: Arc<Backoffs>,
        leases: Option<Arc<Leases>>,
        rates: Arc<Rates>,
        telemetry: Telemetry,
    ) -> Arc<Shaper> {
        Arc::new(Shaper {
            backoffs,
            leases,
            rates,
            telemetry,
            pairs: Mutex::new(HashMap::new()),
            shown: Mutex::new(HashSet::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Pair>> {
        self.pairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pair<'a>(
        pairs: &'a mut HashMap<Arc<str>, Pair>,
        key: &Arc<str>,
        provider: &Arc<str>,
        source: Option<IpAddr>,
    ) -> &'a mut Pair {
        pairs.entry(key.clone()).or_insert_with(|| Pair {
            provider: provider.clone(),
            source,
            standing: None,
            read_at: None,
            announce: false,
            open: 0,
            used: Instant::now(),
        })
    }

    /// The standing of `key`, read from the store when this relay's copy is older than `FRESH`.
    async fn standing(
        &self,
        key: &Arc<str>,
        provider: &Arc<str>,
        source: Option<IpAddr>,
    ) -> Option<Standing> {
        let stale = {
            let mut pairs = self.lock();
            let p = Self::pair(&mut pairs, key, provider, source);
            p.used = Instant::now();
            p.read_at.is_none_or(|t| t.elapsed() >= FRESH)
        };
        if stale
            && self.backoffs.is_shared()
            && let Some(stored) = self.backoffs.get(key).await
        {
            let read = stored.and_then(|json| match serde_json::from_str::<Standing>(&json) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "a back-off standing in the store does not parse; ignored");
                    None
                }
            });
            let mut pairs = self.lock();
            let p = Self::pair(&mut pairs, key, provider, source);
            // The store's word, unless it has none and this relay applied one it could not store.
            if read.is_some() || !p.announce {
                p.standing = read;
            }
            p.read_at = Some(Instant::now());
        }
        self.lock().get(key).and_then(|p| p.standing.clone())
    }

    /// A place for a new connection from `source` to `provider`'s MX hosts.
    pub async fn enter(
        self: &Arc<Self>,
        table: &Table,
        provider: Arc<str>,
        source: Option<IpAddr>,
    ) -> Result<Place, Refusal> {
        let label = source_label(source);
        let key: Arc<str> = Arc::from(format!("{provider}/{label}"));
        let limits = table.limits(&provider).clone();
        let now = now_ms();
        let standing = self.standing(&key, &provider, source).await;
        if let Some(s) = standing.as_ref().filter(|s| s.suspended(now)) {
            return Err(Refusal::Suspended {
                until_ms: s.until_ms,
            });
        }
        let share = standing.map_or(1.0, |s| s.share_at(now, table.recovery));
        let lease = match (limits.max_connections, &self.leases) {
            (Some(max), Some(leases)) => {
                let lease_key: Arc<str> = Arc::from(format!("provider:{key}"));
                match leases.acquire(&lease_key, scaled(max, share)).await {
                    Some(l) => Some(l),
                    None => return Err(Refusal::Busy),
                }
            }
            _ => None,
        };
        {
            let mut pairs = self.lock();
            let p = Self::pair(&mut pairs, &key, &provider, source);
            if lease.is_none()
                && let Some(max) = limits.max_connections
                && p.open >= scaled(max, share)
            {
                return Err(Refusal::Busy);
            }
            p.open += 1;
        }
        let rate_keys = (0..limits.max_message_rates.as_ref().map_or(0, Vec::len))
            .map(|i| Arc::from(format!("provider:{key}#{i}")))
            .collect();
        Ok(Place {
            shaper: self.clone(),
            key,
            provider,
            source,
            limits,
            rate_keys,
            _lease: lease,
        })
    }

    /// A turn for one message on `place`'s connection.
    pub async fn turn(&self, table: &Table, place: &Place) -> Result<(), Refusal> {
        let now = now_ms();
        let standing = self
            .standing(&place.key, &place.provider, place.source)
            .await;
        if let Some(s) = standing.as_ref().filter(|s| s.suspended(now)) {
            return Err(Refusal::Suspended {
                until_ms: s.until_ms,
            });
        }
        let share = standing.map_or(1.0, |s| s.share_at(now, table.recovery));
        let rates = place.limits.max_message_rates.as_deref().unwrap_or(&[]);
        for (rate, key) in rates.iter().zip(&place.rate_keys) {
            let rate = Rate {
                count: scaled(rate.count, share),
                per: rate.per,
            };
            if let Turn::Wait(wait) = self.rates.take(key, rate).await {
                return Err(Refusal::Wait(wait));
            }
        }
        Ok(())
    }

    /// A failed reply from `place`'s provider, with the classifier's verdict: the first back-off rule it
    /// matches acts on the source, and its action is returned. `queue_id` and `sender` are the message's
    /// that drew it, for the event.
    pub async fn observe(
        &self,
        table: &Table,
        place: &Place,
        reply: &Reply,
        verdict: Verdict,
        queue_id: String,
        sender: String,
    ) -> Option<BackoffAction> {
        let rule = table.rule(&place.provider, verdict.1, reply.enhanced.as_deref())?;
        let action = rule.action;
        self.telemetry
            .metrics
            .throttled
            .with_label_values(&[&*place.provider, verdict.1.as_str()])
            .inc();
        let source = source_label(place.source);
        if action == BackoffAction::Bounce {
            tracing::info!(provider = %place.provider, %source, rule = %rule.origin, reply = %reply,
                "a back-off rule bounces the recipients this reply refused");
            return Some(action);
        }
        let now = now_ms();
        let previous = self
            .standing(&place.key, &place.provider, place.source)
            .await;
        let next = Standing::after(
            previous.as_ref(),
            action,
            rule.duration,
            now,
            table.recovery,
            reply.to_string(),
        )?;
        let ttl = Duration::from_millis(
            next.recovered_ms(table.recovery)
                .saturating_sub(now)
                .max(1_000),
        );
        let newly_suspended =
            action == BackoffAction::Suspend && previous.as_ref().is_none_or(|p| !p.suspended(now));
        {
            let mut pairs = self.lock();
            let p = Self::pair(&mut pairs, &place.key, &place.provider, place.source);
            p.standing = Some(next.clone());
            p.read_at = Some(Instant::now());
            if action == BackoffAction::Suspend {
                p.announce = true;
            }
        }
        match serde_json::to_string(&next) {
            Ok(json) => self.backoffs.put(&place.key, &json, ttl).await,
            Err(e) => tracing::error!(error = %e, "cannot write a back-off standing"),
        }
        match action {
            BackoffAction::Suspend if newly_suspended => {
                tracing::warn!(provider = %place.provider, %source, until = %rfc3339_ms(next.until_ms),
                    rule = %rule.origin, reply = %reply,
                    "the provider pushed back: the source is suspended for it; its mail there goes from the pool's other addresses or waits");
                self.telemetry.emit(|| {
                    let mut e = Event::new("suspended", queue_id, sender);
                    e.provider = Some(place.provider.to_string());
                    e.source_ip = Some(source.clone());
                    e.until = Some(rfc3339_ms(next.until_ms));
                    e.reply = Some(reply.to_string());
                    e.category = Some(verdict.1.as_str());
                    e
                });
            }
            BackoffAction::Halve => {
                tracing::warn!(provider = %place.provider, %source, share = next.share,
                    rule = %rule.origin, reply = %reply,
                    "the provider pushed back: the source's limits for it are halved");
            }
            _ => {}
        }
        Some(action)
    }

    /// Says which suspensions this relay applied have ended (event `resumed`), keeps
    /// `herald_shaping_suspended` current, and forgets what nothing uses any more.
    pub fn tick(&self, recovery: Duration) {
        let now = now_ms();
        let mut suspended: HashSet<(String, String)> = HashSet::new();
        {
            let mut pairs = self.lock();
            for p in pairs.values_mut() {
                let source = source_label(p.source);
                match &p.standing {
                    Some(s) if s.suspended(now) => {
                        suspended.insert((p.provider.to_string(), source));
                    }
                    Some(s) if p.announce => {
                        p.announce = false;
                        tracing::info!(provider = %p.provider, %source, share = s.share_at(now, recovery),
                            "the suspension has ended: the source sends to the provider again, at a reduced rate");
                        let provider = p.provider.to_string();
                        self.telemetry.emit(|| {
                            // About the source, not a message: no queue id, no sender.
                            let mut e = Event::new("resumed", String::new(), String::new());
                            e.provider = Some(provider);
                            e.source_ip = Some(source);
                            e
                        });
                    }
                    _ => {}
                }
            }
            pairs.retain(|_, p| {
                p.open > 0
                    || p.used.elapsed() < FORGET_AFTER
                    || p.standing
                        .as_ref()
                        .is_some_and(|s| now < s.recovered_ms(recovery))
            });
        }
        let metrics = &self.telemetry.metrics;
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        for (provider, source) in &suspended {
            metrics
                .shaping_suspended
                .with_label_values(&[provider.as_str(), source.as_str()])
                .set(1);
        }
        for (provider, source) in shown.difference(&suspended) {
            let _ = metrics
                .shaping_suspended
                .remove_label_values(&[provider.as_str(), source.as_str()]);
        }
        *shown = suspended;
    }

    /// Every provider and source this relay has sent to lately, with its limits and standing.
    pub fn views(&self, table: &Table) -> Vec<PairView> {
        let now = now_ms();
        let pairs = self.lock();
        let mut out: Vec<PairView> = pairs
            .values()
            .map(|p| {
                let limits = table.limits(&p.provider);
                let share = p
                    .standing
                    .as_ref()
                    .map_or(1.0, |s| s.share_at(now, table.recovery));
                let live = p
                    .standing
                    .as_ref()
                    .filter(|s| now < s.recovered_ms(table.recovery));
                PairView {
                    provider: p.provider.to_string(),
                    source: p.source.map(|s| s.to_canonical().to_string()),
                    max_connections: limits.max_connections.map(|m| scaled(m, share)),
                    messages_per_connection: limits.messages_per_connection,
                    max_message_rates: limits
                        .max_message_rates
                        .iter()
                        .flatten()
                        .map(|r| {
                            Rate {
                                count: scaled(r.count, share),
                                per: r.per,
                            }
                            .to_string()
                        })
                        .collect(),
                    share,
                    connections: p.open,
                    suspended_until: live
                        .filter(|s| s.suspended(now))
                        .map(|s| rfc3339_ms(s.until_ms)),
                    action: live.map(|s| s.action.clone()),
                    reply: live.map(|s| s.reply.clone()),
                    recovered_at: live.map(|s| rfc3339_ms(s.recovered_ms(table.recovery))),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.provider, &a.source).cmp(&(&b.provider, &b.source)));
        out
    }
}
