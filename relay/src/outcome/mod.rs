//! What happened to a recipient, and what follows from it.
//!
//! - `classify`: a remote reply (or local failure) to hard/soft and a category such as invalid-recipient.
//! - `rules`: the built-in classification rules, one table per mailbox provider and the generic tiers.
//! - `dsn`: delivery status notifications (RFC 3464) for bounced and expired recipients.
//! - `report`: reading DSNs, ARF complaints and prose bounces sent back to return-path addresses.
//! - `feedback`: what such a report means for a recipient, and recording it.
//! - `suppression`: the list of addresses not to send to again, persisted on the spool volume.
//! - `verp`: return-path tokens that map a bounce back to its message and recipient.

pub mod classify;
pub mod dsn;
pub mod feedback;
pub mod report;
pub mod rules;
pub mod suppression;
pub mod verp;

pub use classify::{Class, Classifier, Reply};
pub use herald_config::{Category, StatusPattern};

use std::sync::Arc;

use arc_swap::ArcSwap;

use verp::ReturnPaths;

/// The return paths and the classification rules in force in one relay. A reload replaces both at once;
/// a decision takes one snapshot, so it never sees half of an old table and half of a new one.
#[derive(Debug)]
pub struct Rules(ArcSwap<RuleSet>);

/// One generation of [`Rules`].
#[derive(Debug)]
pub struct RuleSet {
    pub return_paths: Arc<ReturnPaths>,
    pub classifier: Arc<Classifier>,
}

impl Rules {
    pub fn new(return_paths: Arc<ReturnPaths>, classifier: Arc<Classifier>) -> Rules {
        Rules(ArcSwap::from_pointee(RuleSet {
            return_paths,
            classifier,
        }))
    }

    /// The rules in force now.
    pub fn snapshot(&self) -> Arc<RuleSet> {
        self.0.load_full()
    }

    pub fn return_paths(&self) -> Arc<ReturnPaths> {
        self.0.load().return_paths.clone()
    }

    pub fn classifier(&self) -> Arc<Classifier> {
        self.0.load().classifier.clone()
    }

    /// Puts new return paths and rules in force (startup and reload).
    pub fn set(&self, return_paths: Arc<ReturnPaths>, classifier: Arc<Classifier>) {
        self.0.store(Arc::new(RuleSet {
            return_paths,
            classifier,
        }));
    }
}
