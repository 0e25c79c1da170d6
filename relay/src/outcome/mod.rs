//! What happened to a recipient, and what follows from it.
//!
//! - `classify`: a remote reply (or local failure) to hard/soft and a category such as invalid-recipient.
//! - `dsn`: delivery status notifications (RFC 3464) for bounced and expired recipients.
//! - `suppression`: the list of addresses not to send to again, persisted on the spool volume.

pub mod classify;
pub mod dsn;
pub mod suppression;

pub use classify::{Category, Class, classify};
