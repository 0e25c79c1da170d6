//! Traffic shaping by mailbox provider: limits per provider and source address, and back-off when a
//! provider pushes back. (Warm-up, the other half of shaping, counts per source address alone: see
//! `fleet::counters` and the queue's full sources.)
//!
//! A destination rolls up to a provider by its best MX host: to a provider whose MX host suffixes take it
//! (the bounce rules' providers, and the config's), else to the host's registrable domain. Every recipient
//! domain of a provider shares its limits: connections per source address, messages per connection, and
//! message rates per source address. A failed reply goes through the back-off rules, keyed on the
//! classifier's verdict (its one pass over the reply) and the provider: a rule suspends the source for the
//! provider, halves its limits, or bounces the recipients. A suspended source's mail for that provider
//! goes from the pool's other addresses, or waits, untried; when the suspension ends the source resumes at
//! half its limits, doubling back each `shaping.recovery`.
//!
//! - `table`: the providers, limits and rules in force (shipped, with the config over them).
//! - `standing`: a source's standing with a provider, and the arithmetic of suspension and recovery.
//! - `shaper`: what delivery connections go through, this relay's state, events, gauges and views.

mod shaper;
mod standing;
mod table;

pub use shaper::{PairView, Place, Refusal, Shaper};
pub use table::{LimitsView, Table};

#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    #[error("{field}: no provider {name:?}; name one of {}, one of shaping.providers, or a registrable domain (example.net)", known.join(", "))]
    Provider {
        field: String,
        name: String,
        known: Vec<String>,
    },
    #[error("built-in traffic shaping {0}")]
    Shipped(String),
    #[error(transparent)]
    Rules(#[from] crate::outcome::rules::TableError),
}
