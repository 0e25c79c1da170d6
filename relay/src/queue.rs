//! The set of messages waiting for delivery.
//!
//! Holds each spooled message's envelope and the location of its data, never the data itself, so memory
//! stays proportional to the number of messages, not their size. Scheduling per destination arrives with the
//! delivery engine; for now the queue records what was accepted and answers listings.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::spool::{Location, MessageMeta, QueueId};

#[derive(Debug, Clone)]
pub struct Queued {
    pub meta: MessageMeta,
    pub location: Location,
}

/// A message as listed by the admin API.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: u64,
    pub received_at: String,
    pub listener: String,
}

#[derive(Debug, Default)]
pub struct Queue {
    messages: Mutex<BTreeMap<QueueId, Queued>>,
}

impl Queue {
    pub fn new() -> Queue {
        Queue::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<QueueId, Queued>> {
        // The map stays consistent even if a holder panicked: every update is a single insert or remove.
        self.messages.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, q: Queued) {
        self.lock().insert(q.meta.id, q);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` messages, oldest first.
    pub fn list(&self, limit: usize) -> Vec<Listing> {
        self.lock()
            .values()
            .take(limit)
            .map(|q| Listing {
                id: q.meta.id.to_string(),
                sender: q.meta.sender.clone(),
                recipients: q.meta.recipients.clone(),
                size: q.location.len,
                received_at: chrono::DateTime::from_timestamp_millis(q.meta.received_at_ms as i64)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default(),
                listener: q.meta.listener.clone(),
            })
            .collect()
    }
}
