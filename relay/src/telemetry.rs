//! What one running relay reports to: its metrics registry and its event sink. Every stage that counts
//! or emits gets a clone; nothing is process-wide, so two relays in one process stay apart.

use std::sync::Arc;

use crate::events::{Event, EventSink};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
}

impl Telemetry {
    pub fn new(metrics: Arc<Metrics>, events: EventSink) -> Telemetry {
        Telemetry { metrics, events }
    }

    /// Builds and emits an event only when events are wanted.
    pub fn emit(&self, build: impl FnOnce() -> Event) {
        if self.events.enabled() {
            self.events.emit(build());
        }
    }
}
