//! What one running relay reports to: its metrics registry, its event sink and its counters. Every stage that counts
//! or emits gets a clone; nothing is process-wide, so two relays in one process stay apart.

use std::sync::Arc;

use crate::events::{Event, EventSink};
use crate::fleet::Counters;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
    /// Per-day counts per source address and sending domain (the fleet's with a store).
    pub counters: Arc<Counters>,
}

impl Telemetry {
    pub fn new(metrics: Arc<Metrics>, events: EventSink, counters: Arc<Counters>) -> Telemetry {
        Telemetry {
            metrics,
            events,
            counters,
        }
    }

    /// Builds and emits an event only when events are wanted.
    pub fn emit(&self, build: impl FnOnce() -> Event) {
        if self.events.enabled() {
            self.events.emit(build());
        }
    }
}
