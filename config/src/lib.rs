//! herald-config: the one definition of herald-relay's config file.
//!
//! The relay reads its config with these types and the operator renders relay configs with them, so the two
//! sides cannot drift. The crate holds no runtime: no async, no TLS, no SMTP, so the operator links only
//! this to render and check configs.
//!
//! - `file`: the types, their defaults, parsing with field-naming errors.
//! - `validate`: what serde cannot express (references, uniqueness, ranges).
//! - `bounce`: bounce categories and enhanced-status patterns, the vocabulary of `bounces.rules`.
//! - `suppression`: the `suppression` section, when an address is suppressed and for how long.
//! - `rate`: message rates (`600/min`) for delivery limits.
//! - `shaping`: IP warm-up schedules, the length of a shaping day, limits per mailbox provider and back-off
//!   rules.
//! - `store`: the `store` section, the Valkey instance a fleet of relays shares its state through.
//! - `password`: argon2id hashes for `users[].password_hash`.
//! - `schema`: the JSON schema of the file, from which `docs/config.md` is generated.

#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod bounce;
mod file;
pub mod password;
mod rate;
pub mod schema;
mod shaping;
mod store;
mod suppression;
mod validate;

pub use bounce::{Category, StatusPattern};
pub use file::*;
pub use rate::{Rate, RateError};
pub use shaping::{
    BackoffAction, BackoffRule, MAX_BACKOFF, MAX_DAILY_CAP, MAX_DAY_LENGTH, MIN_DAY_LENGTH,
    ProviderLimits, ProviderShaping, SHIPPED_PROVIDERS, STANDARD_WARMUP, Shaping, Warmup,
    WarmupPreset, WarmupStart, WarmupStartError,
};
pub use store::{Store, StoreTls};
pub use suppression::{MailboxFull, Suppression, SuppressionTtl, Ttl};
pub use validate::is_domain_name;
