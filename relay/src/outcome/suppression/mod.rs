//! The suppression list: addresses that are dead (a permanent invalid-recipient reply, a complaint, a
//! mailbox full across a streak of messages), refused at RCPT until their suppression expires.
//!
//! - `policy`: the one rule deciding what suppresses, and for how long (pure, unit-tested).
//! - `file`: the store on the spool volume (append-only JSON lines, compacted).
//!
//! [`Suppressions`] is what the rest of the relay holds: it reads the store, applies expiry, and turns an
//! [`Observation`] into a store write through [`policy::decide`]. The store is behind [`Store`] so that
//! another one (shared across replicas) can take its place.

mod file;
pub mod policy;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use herald_config::Suppression;
use serde::{Deserialize, Serialize};

pub use file::FileStore;
pub use policy::{Decision, Observation};

/// Errors of the suppression store.
#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("suppression list {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// What put an address on the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    InvalidRecipient,
    MailboxFull,
    Complaint,
    /// Added through the admin API.
    Manual,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::InvalidRecipient => "invalid-recipient",
            Cause::MailboxFull => "mailbox-full",
            Cause::Complaint => "complaint",
            Cause::Manual => "manual",
        }
    }
}

/// The reply or report behind a suppression or a streak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// `smtp` (a server's reply to this relay, or the relay's own verdict), `dsn`, `arf` or `prose` (a
    /// report sent to a return-path address), `admin`.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    /// The reply text, a DSN's diagnostic, or a complaint's feedback type.
    pub text: String,
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = self.code {
            write!(f, "{c} ")?;
        }
        if let Some(e) = &self.enhanced {
            write!(f, "{e} ")?;
        }
        f.write_str(&self.text)
    }
}

/// Why, when and until when an address is suppressed. `category`, `reply` and `expires_at` are absent
/// from entries written before they existed: such an entry never expires.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub address: String,
    /// One line for people: the reply, or what the admin said.
    pub reason: String,
    pub added_at: DateTime<Utc>,
    #[serde(default)]
    pub category: Option<Cause>,
    #[serde(default)]
    pub reply: Option<Evidence>,
    /// `None`: until removed.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Entry {
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// An address's consecutive full-mailbox failures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Streak {
    pub address: String,
    pub replies: u32,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// The latest full-mailbox reply.
    pub reply: Evidence,
}

/// Where entries and streaks are kept. Blocking: writes are durable when they return. Reads return what
/// is stored, expired or not; [`Suppressions`] applies the time.
pub trait Store: Send + Sync + fmt::Debug {
    fn entry(&self, address: &str) -> Option<Entry>;
    /// Up to `limit` entries in address order (case-insensitive) after the address `after`.
    fn entries(&self, after: Option<&str>, limit: usize) -> Vec<Entry>;
    fn put(&self, entry: Entry) -> Result<(), SuppressionError>;
    fn remove(&self, address: &str) -> Result<bool, SuppressionError>;
    fn streak(&self, address: &str) -> Option<Streak>;
    fn has_streak(&self, address: &str) -> bool;
    fn streaks(&self, after: Option<&str>, limit: usize) -> Vec<Streak>;
    fn put_streak(&self, streak: Streak) -> Result<(), SuppressionError>;
    fn clear_streak(&self, address: &str) -> Result<bool, SuppressionError>;
    /// Entries stored, expired ones not yet swept included.
    fn entry_count(&self) -> usize;
    fn streak_count(&self) -> usize;
    /// Drops entries expired at `now` and streaks `forgotten` says are over; how many went.
    fn sweep(
        &self,
        now: DateTime<Utc>,
        forgotten: &dyn Fn(&Streak) -> bool,
    ) -> Result<usize, SuppressionError>;
}

/// The list as the relay uses it: sessions read it at RCPT, the queue and feedback report outcomes to
/// it, the admin API lists and edits it.
#[derive(Debug)]
pub struct Suppressions {
    store: Box<dyn Store>,
    policy: ArcSwap<Suppression>,
    /// One observation's read-decide-write at a time, so two outcomes for one address cannot both extend
    /// the same streak.
    deciding: Mutex<()>,
}

impl Suppressions {
    /// The file store in `spool_dir`, under `policy`.
    pub fn open(spool_dir: &Path, policy: Suppression) -> Result<Suppressions, SuppressionError> {
        Ok(Suppressions::new(
            Box::new(FileStore::open(spool_dir)?),
            policy,
        ))
    }

    pub fn new(store: Box<dyn Store>, policy: Suppression) -> Suppressions {
        Suppressions {
            store,
            policy: ArcSwap::from_pointee(policy),
            deciding: Mutex::new(()),
        }
    }

    /// A reloaded config's policy; suppressions already made keep their expiry.
    pub fn set_policy(&self, policy: Suppression) {
        self.policy.store(std::sync::Arc::new(policy));
    }

    /// The entry for `address` if it is suppressed now.
    pub fn get(&self, address: &str) -> Option<Entry> {
        self.store.entry(address).filter(|e| !e.expired(Utc::now()))
    }

    pub fn contains(&self, address: &str) -> bool {
        self.get(address).is_some()
    }

    /// Up to `limit` live entries after `after`, and the cursor of the next page (none on the last).
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Entry>, Option<String>) {
        let now = Utc::now();
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut cursor = after.map(str::to_owned);
        // Expired entries not yet swept are skipped; a page stays `limit` long while there are more.
        loop {
            let raw = self.store.entries(cursor.as_deref(), limit);
            let full = raw.len() == limit;
            cursor = raw.last().map(|e| e.address.clone());
            for e in raw {
                if !e.expired(now) && out.len() < limit {
                    out.push(e);
                }
            }
            if out.len() == limit {
                let next = out.last().map(|e| e.address.clone());
                return (out, next);
            }
            if !full {
                return (out, None);
            }
        }
    }

    /// Up to `limit` current mailbox-full streaks after `after`, and the next page's cursor.
    pub fn streaks(&self, after: Option<&str>, limit: usize) -> (Vec<Streak>, Option<String>) {
        let page = self.store.streaks(after, limit);
        let next = (page.len() == limit)
            .then(|| page.last().map(|s| s.address.clone()))
            .flatten();
        (page, next)
    }

    pub fn streak(&self, address: &str) -> Option<Streak> {
        self.store.streak(address)
    }

    /// Entries stored (expired ones are swept within a minute).
    pub fn len(&self) -> usize {
        self.store.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn streak_count(&self) -> usize {
        self.store.streak_count()
    }

    /// Whether [`Suppressions::observe`] could change anything, answered from memory: a delivery to an
    /// address without a streak (nearly every delivery) needs no blocking call.
    pub fn concerns(&self, address: &str, observed: &Observation) -> bool {
        match observed {
            Observation::Delivered => self.store.has_streak(address),
            Observation::Complaint { .. } => true,
            Observation::Failed {
                class, category, ..
            } => {
                use crate::outcome::{Category, Class};
                (*class == Class::Hard && category.suppresses())
                    || *category == Category::MailboxFull
                    || self.store.has_streak(address)
            }
        }
    }

    /// Applies the policy to what happened to `address`; the new entry when it got suppressed. Blocking
    /// (the store is durable): call it off the async runtime.
    pub fn observe(
        &self,
        address: &str,
        observed: &Observation,
    ) -> Result<Option<Entry>, SuppressionError> {
        let _one = self.deciding.lock().unwrap_or_else(|p| p.into_inner());
        let now = Utc::now();
        let policy = self.policy.load();
        let streak = self.store.streak(address);
        match policy::decide(&policy, address, streak.as_ref(), observed, now) {
            Decision::Nothing => Ok(None),
            Decision::Reset => {
                self.store.clear_streak(address)?;
                Ok(None)
            }
            Decision::Streak(s) => {
                self.store.put_streak(s)?;
                Ok(None)
            }
            Decision::Suppress {
                cause,
                reason,
                reply,
                expires_at,
            } => {
                if streak.is_some() {
                    self.store.clear_streak(address)?;
                }
                // A suppression in force that lasts at least as long stays as it is: a bounce must not
                // shorten a complaint's or an operator's.
                if let Some(old) = self.get(address)
                    && old
                        .expires_at
                        .is_none_or(|o| expires_at.is_some_and(|n| o >= n))
                {
                    return Ok(None);
                }
                let entry = Entry {
                    address: address.to_owned(),
                    reason,
                    added_at: now,
                    category: Some(cause),
                    reply: Some(reply),
                    expires_at,
                };
                self.store.put(entry.clone())?;
                Ok(Some(entry))
            }
        }
    }

    /// Suppresses an address by hand, until removed or `until`. Blocking.
    pub fn add_manual(
        &self,
        address: &str,
        reason: &str,
        until: Option<DateTime<Utc>>,
    ) -> Result<Entry, SuppressionError> {
        let now = Utc::now();
        let entry = Entry {
            address: address.to_owned(),
            reason: reason.to_owned(),
            added_at: now,
            category: Some(Cause::Manual),
            reply: Some(Evidence {
                source: "admin".to_owned(),
                code: None,
                enhanced: None,
                text: reason.to_owned(),
            }),
            expires_at: until,
        };
        self.store.put(entry.clone())?;
        Ok(entry)
    }

    /// Lifts a suppression (and forgets the address's streak); false if it was not suppressed. Blocking.
    pub fn remove(&self, address: &str) -> Result<bool, SuppressionError> {
        let _one = self.deciding.lock().unwrap_or_else(|p| p.into_inner());
        self.store.clear_streak(address)?;
        let live = self.get(address).is_some();
        let stored = self.store.remove(address)?;
        Ok(stored && live)
    }

    /// Whether the policy now in force has forgotten `streak`.
    pub fn forgotten(&self, streak: &Streak, now: DateTime<Utc>) -> bool {
        policy::is_forgotten(&self.policy.load(), streak, now)
    }

    /// Drops expired entries and forgotten streaks from memory and the store. Blocking.
    pub fn sweep(&self) -> Result<usize, SuppressionError> {
        let now = Utc::now();
        let policy = self.policy.load();
        self.store
            .sweep(now, &|s| policy::is_forgotten(&policy, s, now))
    }
}

/// The log line, the `suppressed` event and the gauge of a new suppression. `queue_id` and `sender` are
/// those of the message whose outcome it was.
pub fn suppressed(
    telemetry: &crate::telemetry::Telemetry,
    entry: &Entry,
    queue_id: String,
    sender: String,
    source: Option<&'static str>,
    log_recipients: bool,
) {
    let category = entry.category.map_or("", Cause::as_str);
    let expires_at = entry
        .expires_at
        .map_or_else(|| "never".to_owned(), |t| t.to_rfc3339());
    if log_recipients {
        tracing::info!(queue_id = %queue_id, category, %expires_at, recipient = %entry.address, reason = %entry.reason, "recipient added to the suppression list");
    } else {
        tracing::info!(queue_id = %queue_id, category, %expires_at, "recipient added to the suppression list");
    }
    telemetry.emit(|| {
        let mut ev = crate::events::Event::new("suppressed", queue_id, sender);
        ev.recipient = Some(entry.address.clone());
        ev.domain = entry
            .address
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase());
        ev.reply = Some(entry.reason.clone());
        ev.category = entry.category.map(Cause::as_str);
        ev.source = source;
        ev
    });
}

#[cfg(test)]
mod tests;

/// What the tests of the list and of the policy observe.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Evidence, Observation};
    use crate::outcome::{Category, Class};

    pub fn reply(code: u16, enhanced: &str, text: &str) -> Evidence {
        Evidence {
            source: "smtp".into(),
            code: Some(code),
            enhanced: Some(enhanced.into()),
            text: text.into(),
        }
    }

    /// A final failure with `code`'s class.
    pub fn failed(code: u16, category: Category, reply: Evidence) -> Observation {
        Observation::Failed {
            class: if code >= 500 {
                Class::Hard
            } else {
                Class::Soft
            },
            category,
            reply,
        }
    }
}
