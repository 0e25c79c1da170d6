//! The operator's own metrics, defined in one place: `herald_operator_reconcile_*` per kind, and
//! `herald_operator_sending_domain_verified` per SendingDomain (what the "DNS records not verified" alert
//! of the Helm chart watches).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
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
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            domain_verified,
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
}
