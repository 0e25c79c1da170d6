//! Every Prometheus metric the relay exports, defined once (names, labels and help are the contract in
//! docs/metrics.md). Each running relay owns its own [`Metrics`] and registry, so two relays in one
//! process (tests) count apart.
//!
//! Label values are bounded: listeners and results come from config and code; destination domains pass
//! through [`DomainLabels`], which gives the first `MAX_DOMAINS` domains seen their own label and folds the
//! rest into `other`, so no sender can grow the series without bound. No label ever holds an address.

use std::collections::HashSet;
use std::sync::Mutex;

use herald_smtp::RejectReason;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Destination domains with a label of their own; the rest are `other`.
const MAX_DOMAINS: usize = 50;

/// Latency buckets for mail: from sub-second loopback hand-offs to the five-day expiry.
const LATENCY_BUCKETS: &[f64] = &[
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
    2.0 * 86400.0,
    5.0 * 86400.0,
];

/// The relay's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub received: IntCounterVec,
    pub deliveries: IntCounterVec,
    pub bounces: IntCounterVec,
    pub latency: Histogram,
    pub sessions: IntGaugeVec,
    pub rejections: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub queue_messages: IntGauge,
    pub queue_oldest_age: IntGauge,
    pub delivery_connections: IntGauge,
    pub spool_bytes: IntGauge,
    pub suppressions: IntGauge,
    pub suppression_streaks: IntGauge,
    pub events_dropped: IntCounter,
    pub webhook_failures: IntCounter,
    pub tls_expiry: IntGauge,
    pub feedback: IntCounterVec,
    pub complaints: IntCounterVec,
    pub feedback_limited: IntCounter,
    pub auth_attempts: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub inbound_bytes: IntGauge,
    pub store_up: IntGauge,
    pub store_errors: IntCounterVec,
    pub delivery_waits: IntCounterVec,
    source_sent_today: IntGaugeVec,
    /// Failed replies that matched a traffic shaping back-off rule, by provider and verdict category.
    pub throttled: IntCounterVec,
    /// 1 while a source address is suspended for a provider.
    pub shaping_suspended: IntGaugeVec,
    source_daily_cap: IntGaugeVec,
    pub store_latency: HistogramVec,
    pub store_pending: IntGauge,
    domains: Mutex<HashSet<String>>,
    /// The `source` labels set last by [`Metrics::set_sources`].
    sources: Mutex<HashSet<String>>,
}

/// The `kind` and `result` values of `herald_feedback_reports_total`.
pub const FEEDBACK_KINDS: &[&str] = &["dsn", "arf", "text", "none"];
pub const FEEDBACK_RESULTS: &[&str] = &[
    "bounce",
    "delay",
    "complaint",
    "other",
    "forged",
    "unverified",
    "not-a-report",
];

/// The label of destination domains beyond the first `MAX_DOMAINS`.
const OTHER_DOMAIN: &str = "other";

/// The `result` values of `herald_deliveries_total`.
pub const DELIVERY_RESULTS: &[&str] = &["delivered", "deferred", "bounced"];

/// The `result` values of `herald_auth_attempts_total`.
pub const AUTH_RESULTS: &[&str] = &["accepted", "failed", "throttled", "busy"];

/// The `result` values of `herald_config_reload_total`: the whole new config is in force; all of it but
/// what cannot change live (named in the log); or none of it (invalid, the running config stays).
/// The store operations `herald_store_errors_total` and `herald_store_latency_seconds` count.
pub const STORE_OPS: &[&str] = &[
    "connect", "join", "publish", "feed", "resync", "lease", "rate", "count",
];

/// Store round trips on loopback take tens of microseconds, across a zone a few milliseconds.
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

pub const RELOAD_RESULTS: &[&str] = &["applied", "partial", "rejected"];

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric definition is valid");
    r.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric definition is valid");
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    /// A fresh registry with every metric; labelled series with bounded, known label values start at 0
    /// so that dashboards and alerts read 0 rather than "no data" before the first event.
    pub fn new(listeners: &[&str]) -> Metrics {
        let m = Metrics::unpopulated();
        for l in listeners {
            m.received.with_label_values(&[l]);
            m.sessions.with_label_values(&[l]);
        }
        for r in RejectReason::ALL {
            m.rejections.with_label_values(&[r.as_str()]);
        }
        for r in DELIVERY_RESULTS {
            m.deliveries.with_label_values(&[r]);
        }
        for r in RELOAD_RESULTS {
            m.config_reloads.with_label_values(&[r]);
        }
        for r in AUTH_RESULTS {
            m.auth_attempts.with_label_values(&[r]);
        }
        // The domain label is open-ended; the zero series carry the fold-over value.
        for class in ["hard", "soft"] {
            for category in herald_config::Category::ALL {
                m.bounces
                    .with_label_values(&[class, category.as_str(), OTHER_DOMAIN]);
            }
        }
        for kind in FEEDBACK_KINDS {
            for result in FEEDBACK_RESULTS {
                m.feedback.with_label_values(&[kind, result]);
            }
        }
        m
    }

    fn unpopulated() -> Metrics {
        let r = Registry::new();
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "herald_delivery_latency_seconds",
                "Time from the 250 reply at acceptance to the recipient's final outcome (delivered, bounced or expired).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("metric definition is valid");
        r.register(Box::new(latency.clone()))
            .expect("metric names are unique");
        let store_latency = HistogramVec::new(
            HistogramOpts::new(
                "herald_store_latency_seconds",
                "Time of operations on the fleet's store (Valkey/Redis) by operation; a join or resync is one bulk operation, a feed read the wait for changes.",
            )
            .buckets(STORE_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("metric definition is valid");
        Metrics {
            received: counter_vec(
                &r,
                "herald_messages_received_total",
                "Messages accepted (answered 250) by listener.",
                &["listener"],
            ),
            deliveries: counter_vec(
                &r,
                "herald_deliveries_total",
                "Recipient delivery attempts by result: delivered, deferred (will retry) or bounced (final failure, expiry included).",
                &["result"],
            ),
            bounces: counter_vec(
                &r,
                "herald_bounces_total",
                "Failed recipient attempts by class (hard 5xx, soft 4xx), classifier category and destination domain.",
                &["class", "category", "domain"],
            ),
            latency,
            sessions: gauge_vec(
                &r,
                "herald_smtp_sessions",
                "Open SMTP sessions by listener.",
                &["listener"],
            ),
            rejections: counter_vec(
                &r,
                "herald_smtp_rejections_total",
                "SMTP commands, messages or connections refused, by reason.",
                &["reason"],
            ),
            queue_depth: gauge_vec(
                &r,
                "herald_queue_depth",
                "Messages waiting for delivery by destination domain (busiest domains; the rest in other).",
                &["domain"],
            ),
            queue_messages: gauge(&r, "herald_queue_messages", "Messages in the queue."),
            queue_oldest_age: gauge(
                &r,
                "herald_queue_oldest_message_age_seconds",
                "Age of the oldest message in the queue (0 when empty).",
            ),
            delivery_connections: gauge(
                &r,
                "herald_delivery_connections",
                "Delivery connections open now, all destinations together (at most delivery.max_connections).",
            ),
            spool_bytes: gauge(&r, "herald_spool_bytes", "Bytes of spool segments on disk."),
            suppressions: gauge(
                &r,
                "herald_suppressions",
                "Addresses on the suppression list.",
            ),
            suppression_streaks: gauge(
                &r,
                "herald_suppression_streaks",
                "Addresses with a mailbox-full streak under way (not yet suppressed).",
            ),
            events_dropped: counter(
                &r,
                "herald_events_dropped_total",
                "Delivery events dropped because the webhook buffer was full.",
            ),
            webhook_failures: counter(
                &r,
                "herald_webhook_failures_total",
                "Webhook POSTs that failed and will be retried.",
            ),
            tls_expiry: gauge(
                &r,
                "herald_tls_certificate_expiry_timestamp_seconds",
                "Unix time at which the listeners' TLS certificate expires (0 when no TLS is configured).",
            ),
            feedback: counter_vec(
                &r,
                "herald_feedback_reports_total",
                "Reports received at return-path addresses, by kind (dsn, arf, text, none) and result (bounce, delay, complaint, other, forged, unverified, not-a-report); one per recipient a report is about.",
                &["kind", "result"],
            ),
            complaints: counter_vec(
                &r,
                "herald_complaints_total",
                "Feedback-loop complaints (ARF) with a verified return-path token, by feedback type and recipient domain.",
                &["feedback_type", "domain"],
            ),
            auth_attempts: counter_vec(
                &r,
                "herald_auth_attempts_total",
                "AUTH attempts by result: accepted, failed (wrong credentials), throttled (refused unchecked after repeated failures from the client address) or busy (no check slot came free).",
                &["result"],
            ),
            feedback_limited: counter(
                &r,
                "herald_feedback_limited_total",
                "Reports at return-path addresses cut short by a processing limit (size, MIME parts, recipients, addresses or tokens); the rest was not looked at.",
            ),
            config_reloads: counter_vec(
                &r,
                "herald_config_reload_total",
                "Config reloads by result: applied (all of it), partial (all but what cannot change live) or rejected (invalid; the running config stays).",
                &["result"],
            ),
            delivery_waits: {
                let c = counter_vec(
                    &r,
                    "herald_delivery_waits_total",
                    "Messages given back to the queue untried because their destination had no room: no connection lease left in the fleet (lease), over delivery.per_domain.max_message_rate (rate), a source address over today's warm-up cap (warmup), its provider's limits for the source address (provider), or the source address suspended for the provider (suspended). Not delivery attempts.",
                    &["reason"],
                );
                for reason in crate::queue::Wait::LABELS {
                    c.with_label_values(&[reason]);
                }
                c
            },
            throttled: counter_vec(
                &r,
                "herald_throttled_total",
                "Failed replies that matched a traffic shaping back-off rule (which then suspended the source for the provider, halved its limits, or bounced the recipients), by provider and the reply's category (rate-limited, reputation-block, ...).",
                &["provider", "reason"],
            ),
            shaping_suspended: gauge_vec(
                &r,
                "herald_shaping_suspended",
                "1 while a source address is suspended for a mailbox provider by a back-off rule (as this relay knows it: the fleet's with a store); absent otherwise.",
                &["provider", "source"],
            ),
            source_sent_today: gauge_vec(
                &r,
                "herald_source_sent_today",
                "Messages sent today from each source address of the IP pools (accepted by a receiver): the fleet's count when the relays share a store. Days are shaping.day_length long.",
                &["source"],
            ),
            source_daily_cap: gauge_vec(
                &r,
                "herald_source_daily_cap",
                "Today's warm-up cap of each source address that is warming up; absent for an address without a cap.",
                &["source"],
            ),
            inbound_bytes: gauge(
                &r,
                "herald_inbound_bytes",
                "Bytes of message bodies the SMTP sessions hold in memory now, against limits.max_inbound_bytes (reserved in 64 KiB steps).",
            ),
            // Registered only with a store (`register_store`): a relay without one has no store to be down.
            store_up: IntGauge::new(
                "herald_store_up",
                "1 while the relay is joined to the fleet's store; 0 while it runs on its local copy (store configured but unreachable).",
            )
            .expect("metric definition is valid"),
            store_errors: IntCounterVec::new(
                Opts::new(
                    "herald_store_errors_total",
                    "Failed operations on the fleet's store by operation (connect, join, publish, feed, resync, lease, rate, count).",
                ),
                &["op"],
            )
            .expect("metric definition is valid"),
            store_latency,
            store_pending: IntGauge::new(
                "herald_store_pending_changes",
                "Suppression changes made by this relay and not yet written to the store (kept on its volume until they are).",
            )
            .expect("metric definition is valid"),
            domains: Mutex::new(HashSet::new()),
            sources: Mutex::new(HashSet::new()),
            registry: r,
        }
    }

    /// Adds the store's metrics to the registry: called once, by a relay configured with a store.
    pub fn register_store(&self) {
        for op in STORE_OPS {
            self.store_errors.with_label_values(&[op]);
        }
        for c in [
            Box::new(self.store_up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(self.store_errors.clone()),
            Box::new(self.store_latency.clone()),
            Box::new(self.store_pending.clone()),
        ] {
            // Registered once per relay: a second call finds them there, which changes nothing.
            let _ = self.registry.register(c);
        }
    }

    /// The label for a destination domain: itself while few domains are known, `other` beyond.
    pub fn domain_label(&self, domain: &str) -> String {
        let mut known = self.domains.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(domain) {
            return domain.to_owned();
        }
        if known.len() < MAX_DOMAINS {
            known.insert(domain.to_owned());
            return domain.to_owned();
        }
        OTHER_DOMAIN.to_owned()
    }

    /// Sets `herald_queue_depth` from per-domain counts: the busiest domains by name, the rest as `other`.
    pub fn set_queue_depth(&self, counts: &[(String, i64)]) {
        let mut sorted: Vec<&(String, i64)> = counts.iter().filter(|(_, n)| *n > 0).collect();
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        self.queue_depth.reset();
        let mut other = 0;
        for (i, (domain, n)) in sorted.into_iter().enumerate() {
            if i < MAX_DOMAINS {
                self.queue_depth
                    .with_label_values(&[domain.as_str()])
                    .set(*n);
            } else {
                other += n;
            }
        }
        if other > 0 {
            self.queue_depth.with_label_values(&["other"]).set(other);
        }
    }

    /// Sets the per-source gauges from where each address stands today.
    pub fn set_sources(&self, sources: &[crate::deliver::SourceView]) {
        let mut now: HashSet<String> = HashSet::new();
        for s in sources {
            let label = s.address.to_string();
            self.source_sent_today
                .with_label_values(&[label.as_str()])
                .set(s.sent_today as i64);
            match s.daily_cap {
                Some(cap) => self
                    .source_daily_cap
                    .with_label_values(&[label.as_str()])
                    .set(i64::try_from(cap).unwrap_or(i64::MAX)),
                None => {
                    let _ = self.source_daily_cap.remove_label_values(&[label.as_str()]);
                }
            }
            now.insert(label);
        }
        // Addresses a reload took out of the pools lose their series; the others are never absent
        // in between, as a reset would leave them for a scrape.
        let mut before = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        for gone in before.difference(&now) {
            let _ = self.source_sent_today.remove_label_values(&[gone.as_str()]);
            let _ = self.source_daily_cap.remove_label_values(&[gone.as_str()]);
        }
        *before = now;
    }

    /// Counts a refused command, message or connection.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejections.with_label_values(&[reason.as_str()]).inc();
    }

    /// The exposition text for `GET /metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on an inconsistent metric family, which the definitions above exclude.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_labels_start_at_zero() {
        let text = Metrics::new(&["submission"]).render();
        for line in [
            "herald_messages_received_total{listener=\"submission\"} 0",
            "herald_smtp_sessions{listener=\"submission\"} 0",
            "herald_smtp_rejections_total{reason=\"relay_denied\"} 0",
            "herald_deliveries_total{result=\"deferred\"} 0",
            "herald_config_reload_total{result=\"rejected\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn two_registries_count_apart() {
        let (a, b) = (Metrics::new(&[]), Metrics::new(&[]));
        a.rejected(RejectReason::Timeout);
        assert!(
            a.render()
                .contains("herald_smtp_rejections_total{reason=\"timeout\"} 1")
        );
        assert!(
            b.render()
                .contains("herald_smtp_rejections_total{reason=\"timeout\"} 0")
        );
    }

    #[test]
    fn domain_labels_are_bounded() {
        let m = Metrics::new(&[]);
        for i in 0..MAX_DOMAINS {
            assert_eq!(m.domain_label(&format!("d{i}.test")), format!("d{i}.test"));
        }
        assert_eq!(m.domain_label("late.test"), "other");
        assert_eq!(m.domain_label("d3.test"), "d3.test");
    }

    #[test]
    fn queue_depth_folds_the_tail() {
        let m = Metrics::new(&[]);
        let counts: Vec<(String, i64)> = (0..60).map(|i| (format!("d{i}.test"), 100 - i)).collect();
        m.set_queue_depth(&counts);
        let text = m.render();
        assert!(text.contains("herald_queue_depth{domain=\"d0.test\"} 100"));
        let other: i64 = (50..60).map(|i| 100 - i).sum();
        assert!(
            text.contains(&format!("herald_queue_depth{{domain=\"other\"}} {other}")),
            "{text}"
        );
        assert!(!text.contains("d55.test"));
    }
}
