//! The operator's own metrics, defined in one place: `herald_operator_reconcile_*` per kind, and
//! `herald_operator_sending_domain_verified` per SendingDomain (what the "DNS records not verified" alert
//! of the Helm chart watches).
//!
//! A reconcile is measured by a [`ReconcileGuard`]: it counts the reconcile when it starts and records the
//! duration when it is dropped, so every way out of a reconcile (success, an error returned with `?`, an
//! early return, a cancelled future) is timed, not only the happy path.

use std::time::Instant;

use crate::crd::{IpPool, SendingDomain, SmtpRelay};

use kube::Resource;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Reconcile counts, failures and durations per kind; DNS verification per SendingDomain.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
    domain_verified: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "herald_operator_reconcile_total",
                "Reconciles run, by kind.",
            ),
            &["kind"],
        )
        .expect("metric definition is valid");
        let failures = IntCounterVec::new(
            Opts::new(
                "herald_operator_reconcile_errors_total",
                "Reconciles that failed and were retried with backoff, by kind.",
            ),
            &["kind"],
        )
        .expect("metric definition is valid");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "herald_operator_reconcile_duration_seconds",
                "Time one reconcile took, by kind.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["kind"],
        )
        .expect("metric definition is valid");
        // One series per SendingDomain object (bounded by the objects, not by mail), labelled like
        // kube-state-metrics: a monitor scraping it needs honorLabels, or `namespace` is the operator's.
        let domain_verified = IntGaugeVec::new(
            Opts::new(
                "herald_operator_sending_domain_verified",
                "1 when every DNS record of the SendingDomain is published (condition DnsVerified is True), 0 otherwise.",
            ),
            &["namespace", "name"],
        )
        .expect("metric definition is valid");
        for c in [&reconciles, &failures] {
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique");
        }
        registry
            .register(Box::new(duration.clone()))
            .expect("metric names are unique");
        registry
            .register(Box::new(domain_verified.clone()))
            .expect("metric names are unique");
        // The kinds are known: their series exist from the start at 0, so that a dashboard or an alert reads
        // 0 rather than "no data" before the first reconcile (or the first error) of a kind.
        for kind in [
            SendingDomain::kind(&()),
            SmtpRelay::kind(&()),
            IpPool::kind(&()),
        ] {
            reconciles.with_label_values(&[&kind]);
            failures.with_label_values(&[&kind]);
            duration.with_label_values(&[&kind]);
        }
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            domain_verified,
        }
    }

    /// Counts a reconcile of `kind` as started and times it until the returned guard is dropped.
    pub fn reconcile_started(&self, kind: &str) -> ReconcileGuard {
        self.reconciles.with_label_values(&[kind]).inc();
        ReconcileGuard {
            duration: self.duration.with_label_values(&[kind]),
            errors: self.failures.with_label_values(&[kind]),
            started: Instant::now(),
        }
    }

    /// Records whether a SendingDomain's DNS records all verify.
    pub fn set_domain_verified(&self, namespace: &str, name: &str, verified: bool) {
        self.domain_verified
            .with_label_values(&[namespace, name])
            .set(i64::from(verified));
    }

    /// Drops a deleted SendingDomain's series, so an alert on it does not outlive the object.
    pub fn forget_domain(&self, namespace: &str, name: &str) {
        // Err only means there was no series: nothing to drop.
        let _ = self.domain_verified.remove_label_values(&[namespace, name]);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// One reconcile in progress: records its duration when dropped, however the reconcile ended.
#[derive(Debug)]
#[must_use = "the reconcile is timed until the guard is dropped"]
pub struct ReconcileGuard {
    duration: Histogram,
    errors: IntCounter,
    started: Instant,
}

impl ReconcileGuard {
    /// Passes the reconcile's result through, counting it in `herald_operator_reconcile_errors_total` when it
    /// is an error; the duration is recorded as the guard drops at the end of this call.
    pub fn finish<T, E>(self, result: Result<T, E>) -> Result<T, E> {
        if result.is_err() {
            self.errors.inc();
        }
        result
    }
}

impl Drop for ReconcileGuard {
    fn drop(&mut self) {
        self.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_verified_follows_the_condition_and_goes_with_the_domain() {
        let m = Metrics::new();
        m.set_domain_verified("mail", "example-com", false);
        m.set_domain_verified("mail", "other", true);
        let text = m.render();
        assert!(
            text.contains(
                "herald_operator_sending_domain_verified{name=\"example-com\",namespace=\"mail\"} 0"
            ),
            "{text}"
        );
        assert!(text.contains(
            "herald_operator_sending_domain_verified{name=\"other\",namespace=\"mail\"} 1"
        ));
        m.set_domain_verified("mail", "example-com", true);
        assert!(m.render().contains(
            "herald_operator_sending_domain_verified{name=\"example-com\",namespace=\"mail\"} 1"
        ));
        m.forget_domain("mail", "example-com");
        m.forget_domain("mail", "never-seen");
        let text = m.render();
        assert!(!text.contains("example-com"), "{text}");
        assert!(text.contains("name=\"other\""));
    }

    fn timed(m: &Metrics, kind: &str) -> (u64, u64, u64) {
        (
            m.reconciles.with_label_values(&[kind]).get(),
            m.duration.with_label_values(&[kind]).get_sample_count(),
            m.failures.with_label_values(&[kind]).get(),
        )
    }

    #[test]
    fn every_kind_starts_at_zero() {
        let text = Metrics::new().render();
        for kind in ["SendingDomain", "SmtpRelay", "IpPool"] {
            for line in [
                format!("herald_operator_reconcile_total{{kind=\"{kind}\"}} 0"),
                format!("herald_operator_reconcile_errors_total{{kind=\"{kind}\"}} 0"),
                format!("herald_operator_reconcile_duration_seconds_count{{kind=\"{kind}\"}} 0"),
            ] {
                assert!(text.contains(&line), "{line} missing from\n{text}");
            }
        }
    }

    #[test]
    fn the_guard_times_every_way_out_of_a_reconcile() {
        let m = Metrics::new();
        // Success.
        let ok: Result<(), ()> = m.reconcile_started("SmtpRelay").finish(Ok(()));
        assert!(ok.is_ok());
        assert_eq!(timed(&m, "SmtpRelay"), (1, 1, 0));
        // An error: timed, and counted as one.
        let err: Result<(), &str> = m.reconcile_started("SmtpRelay").finish(Err("boom"));
        assert_eq!(err, Err("boom"));
        assert_eq!(timed(&m, "SmtpRelay"), (2, 2, 1));
        // A return with `?` before `finish` is reached: still timed. (The controllers call `finish` on the
        // whole reconcile's result, so such an error is counted there.)
        fn early(m: &Metrics, input: &str) -> Result<u8, std::num::ParseIntError> {
            let guard = m.reconcile_started("IpPool");
            let n: u8 = input.parse()?;
            guard.finish(Ok(n))
        }
        assert!(early(&m, "not a number").is_err());
        assert_eq!(timed(&m, "IpPool"), (1, 1, 0));
        assert_eq!(early(&m, "7"), Ok(7));
        assert_eq!(timed(&m, "IpPool"), (2, 2, 0));
        // A reconcile dropped midway (the controller shutting down): timed, not an error.
        drop(m.reconcile_started("SendingDomain"));
        assert_eq!(timed(&m, "SendingDomain"), (1, 1, 0));
        let text = m.render();
        assert!(
            text.contains("herald_operator_reconcile_duration_seconds_count{kind=\"SmtpRelay\"} 2"),
            "{text}"
        );
        assert!(text.contains("herald_operator_reconcile_errors_total{kind=\"SmtpRelay\"} 1"));
    }
}
