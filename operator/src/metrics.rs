//! The operator's own metrics (`herald_operator_reconcile_*`), defined in one place.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Reconcile counts, failures and durations per kind.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
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
        for c in [&reconciles, &failures] {
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique");
        }
        registry
            .register(Box::new(duration.clone()))
            .expect("metric names are unique");
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
        }
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
