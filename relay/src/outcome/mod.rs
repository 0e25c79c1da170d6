//! What happened to a recipient, and what follows from it.
//!
//! - `classify`: a remote reply (or local failure) to hard/soft and a category such as invalid-recipient.
//! - `dsn`: delivery status notifications (RFC 3464) for bounced and expired recipients.
//! - `report`: reading DSNs, ARF complaints and prose bounces sent back to return-path addresses.
//! - `feedback`: what such a report means for a recipient, and recording it.
//! - `suppression`: the list of addresses not to send to again, persisted on the spool volume.
//! - `verp`: return-path tokens that map a bounce back to its message and recipient.

pub mod classify;
pub mod dsn;
pub mod feedback;
pub mod report;
pub mod suppression;
pub mod verp;

pub use classify::{Class, Classifier, classify};
pub use herald_config::{Category, StatusPattern};
