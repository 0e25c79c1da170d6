//! The vocabulary of bounce classification that the config file speaks: the categories a failure falls
//! into and the enhanced status code patterns rules match on. The classifier itself lives in the relay.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Why a delivery failed. The names are the `category` label values of `herald_bounces_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    InvalidRecipient,
    /// The recipient's domain cannot receive mail: it does not exist, or publishes a null MX (RFC 7505).
    /// Not the recipient's fault and not the address's: it is never suppressed.
    InvalidDomain,
    MailboxFull,
    MessageTooLarge,
    RateLimited,
    Greylisted,
    ReputationBlock,
    AuthenticationFailure,
    PolicyBlock,
    SpamContent,
    TransientNetwork,
    TransientOther,
    PermanentOther,
}

impl Category {
    /// Every category, so counters labelled by category can start at 0 for each.
    pub const ALL: [Category; 13] = [
        Category::InvalidRecipient,
        Category::InvalidDomain,
        Category::MailboxFull,
        Category::MessageTooLarge,
        Category::RateLimited,
        Category::Greylisted,
        Category::ReputationBlock,
        Category::AuthenticationFailure,
        Category::PolicyBlock,
        Category::SpamContent,
        Category::TransientNetwork,
        Category::TransientOther,
        Category::PermanentOther,
    ];

    /// The name in the config file, events and the `category` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::InvalidRecipient => "invalid-recipient",
            Category::InvalidDomain => "invalid-domain",
            Category::MailboxFull => "mailbox-full",
            Category::MessageTooLarge => "message-too-large",
            Category::RateLimited => "rate-limited",
            Category::Greylisted => "greylisted",
            Category::ReputationBlock => "reputation-block",
            Category::AuthenticationFailure => "authentication-failure",
            Category::PolicyBlock => "policy-block",
            Category::SpamContent => "spam-content",
            Category::TransientNetwork => "transient-network",
            Category::TransientOther => "transient-other",
            Category::PermanentOther => "permanent-other",
        }
    }

    /// Whether one permanent (5xx) failure of this category puts the address on the suppression list: only
    /// a recipient that does not exist or whose account is closed. A full mailbox suppresses only across a
    /// streak (`suppression.mailbox_full`); the relay's `outcome::suppression::policy` applies both.
    pub fn suppresses(self) -> bool {
        self == Category::InvalidRecipient
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An enhanced status code pattern: up to three components, each a number or `x` (any). `5.1.1` matches
/// only itself, `x.7.26` any class, `5.7` every 5.7.*, `x.4` every network and routing status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusPattern(Vec<Option<u16>>);

impl StatusPattern {
    pub fn parse(text: &str) -> Option<StatusPattern> {
        let parts = text
            .split('.')
            .map(|p| match p {
                "x" | "X" | "*" => Some(None),
                n => n.parse::<u16>().ok().filter(|&v| v < 1000).map(Some),
            })
            .collect::<Option<Vec<_>>>()?;
        (!parts.is_empty() && parts.len() <= 3).then_some(StatusPattern(parts))
    }

    /// Does the enhanced status code `code` (class, subject, detail) fall under this pattern?
    pub fn matches(&self, code: &[u16; 3]) -> bool {
        self.0
            .iter()
            .zip(code)
            .all(|(want, have)| want.is_none_or(|w| w == *have))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_patterns() {
        let p = |s| StatusPattern::parse(s).unwrap();
        assert!(p("5.1.1").matches(&[5, 1, 1]));
        assert!(!p("5.1.1").matches(&[4, 1, 1]));
        assert!(p("x.7.26").matches(&[4, 7, 26]));
        assert!(p("5.7").matches(&[5, 7, 509]));
        assert!(!p("5.7").matches(&[5, 1, 1]));
        for bad in ["", "5..1", "a.b", "5.1.1.1", "5.1.1000"] {
            assert!(StatusPattern::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn every_category_is_listed_once_with_its_label() {
        let labels: std::collections::HashSet<_> =
            Category::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels.len(), Category::ALL.len());
        for c in Category::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{c}\""));
        }
    }
}
