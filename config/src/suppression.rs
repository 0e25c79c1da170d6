//! The `suppression` section: when a failing address goes on the suppression list and how long it stays.
//!
//! An address is suppressed only when the failure says it is dead: a permanent invalid-recipient reply, a
//! complaint, or a mailbox that stayed full across several messages and days. Everything else (rate,
//! policy, reputation, content, authentication, a domain that cannot receive mail, any single 4xx) is the
//! sender's or the network's problem, and suppressing the address would only lose mail.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Suppression policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Suppression {
    pub mailbox_full: MailboxFull,
    pub ttl: SuppressionTtl,
}

/// A full mailbox is usually temporary (the owner cleans up), so one full reply never suppresses; a mailbox
/// still full after `replies` messages spread over at least `over` is abandoned. The streak counts final
/// failures (a 5xx full reply, or a message that expired deferred as full), not retries of one message; a
/// delivery to the address, or any other final outcome, starts it over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxFull {
    /// Consecutive full-mailbox failures that suppress the address; 0 never suppresses for a full mailbox.
    /// 1 is refused: a single full reply is not evidence of an abandoned mailbox.
    pub replies: u32,
    /// The least time between the first and the last failure of the streak.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub over: Duration,
    /// A streak with no new full-mailbox failure for this long is forgotten (it says nothing about the
    /// mailbox today); it bounds what the relay keeps for addresses it no longer sends to.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub forget_after: Duration,
}

impl Default for MailboxFull {
    fn default() -> MailboxFull {
        MailboxFull {
            replies: 3,
            over: Duration::from_secs(72 * 3600),
            forget_after: Duration::from_secs(30 * 86400),
        }
    }
}

/// How long a suppression lasts, by what caused it; `never` keeps it until removed through the admin API.
/// Entries added through the admin API last as long as the request says (no expiry by default). A changed
/// TTL applies to suppressions added after the change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SuppressionTtl {
    /// A 5xx invalid-recipient reply (user unknown, account disabled). A year: addresses are rarely
    /// reissued sooner, and a provider that recycles one after a long dormancy (some do after 12 months)
    /// gets the new owner mail again.
    pub invalid_recipient: Ttl,
    /// A mailbox full across a streak. A month: the owner may come back and clean up; sending into a full
    /// mailbox meanwhile only earns bounces that providers count against the sender's reputation.
    pub mailbox_full: Ttl,
    /// A recipient's complaint (ARF abuse, fraud, virus, other). Never: a person asked not to get this mail,
    /// and mailing them again is what blocklists and providers punish hardest.
    pub complaint: Ttl,
}

impl Default for SuppressionTtl {
    fn default() -> SuppressionTtl {
        SuppressionTtl {
            invalid_recipient: Ttl::After(Duration::from_secs(365 * 86400)),
            mailbox_full: Ttl::After(Duration::from_secs(30 * 86400)),
            complaint: Ttl::Never,
        }
    }
}

/// A lifetime: a duration, or `never` (no expiry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    Never,
    After(Duration),
}

impl Ttl {
    /// The duration, `None` for never.
    pub fn duration(self) -> Option<Duration> {
        match self {
            Ttl::Never => None,
            Ttl::After(d) => Some(d),
        }
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ttl::Never => f.write_str("never"),
            // Whole days and hours as written in a config (`365d`), not humantime's months and seconds.
            Ttl::After(d) => match d.as_secs() {
                s if d.subsec_nanos() == 0 && s > 0 && s % 86400 == 0 => {
                    write!(f, "{}d", s / 86400)
                }
                s if d.subsec_nanos() == 0 && s > 0 && s % 3600 == 0 => write!(f, "{}h", s / 3600),
                _ => write!(f, "{}", humantime_serde::re::humantime::format_duration(*d)),
            },
        }
    }
}

impl Serialize for Ttl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ttl, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "never" {
            return Ok(Ttl::Never);
        }
        humantime_serde::re::humantime::parse_duration(&text)
            .map(Ttl::After)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{text:?} is neither a duration (30d, 12h) nor never: {e}"
                ))
            })
    }
}

impl JsonSchema for Ttl {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Ttl".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration such as 30d or 12h, or never.",
        })
    }
}

impl Suppression {
    /// Checks the ranges; errors name the field.
    pub(crate) fn validate(&self) -> Result<(), crate::ConfigError> {
        use crate::file::invalid;
        let m = &self.mailbox_full;
        if m.replies == 1 {
            return Err(invalid(
                "suppression.mailbox_full.replies",
                "1 would suppress on a single full-mailbox reply; use 2 or more (or 0 to never suppress a full mailbox)",
            ));
        }
        if m.replies > 0 && m.forget_after.is_zero() {
            return Err(invalid(
                "suppression.mailbox_full.forget_after",
                "must be greater than 0",
            ));
        }
        for (field, ttl) in [
            (
                "suppression.ttl.invalid_recipient",
                self.ttl.invalid_recipient,
            ),
            ("suppression.ttl.mailbox_full", self.ttl.mailbox_full),
            ("suppression.ttl.complaint", self.ttl.complaint),
        ] {
            if ttl == Ttl::After(Duration::ZERO) {
                return Err(invalid(
                    field,
                    "must be greater than 0 (a suppression that expires at once suppresses nothing)",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn with(section: &str) -> Result<Config, crate::ConfigError> {
        Config::parse(&format!(
            "{}suppression: {section}\n",
            crate::DEFAULT_CONFIG
        ))
    }

    #[test]
    fn defaults_and_overrides_parse() {
        let c = with("{}").unwrap();
        assert_eq!(c.suppression.mailbox_full.replies, 3);
        assert_eq!(c.suppression.ttl.complaint, super::Ttl::Never);
        let c = with("{ mailbox_full: { replies: 2, over: 1s }, ttl: { invalid_recipient: never, complaint: 2s } }")
            .unwrap();
        assert_eq!(c.suppression.mailbox_full.over.as_secs(), 1);
        assert_eq!(c.suppression.ttl.invalid_recipient, super::Ttl::Never);
        assert_eq!(
            c.suppression.ttl.complaint.duration().map(|d| d.as_secs()),
            Some(2)
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        for (section, field) in [
            (
                "{ mailbox_full: { replies: 1 } }",
                "suppression.mailbox_full.replies",
            ),
            (
                "{ ttl: { mailbox_full: 0s } }",
                "suppression.ttl.mailbox_full",
            ),
            (
                "{ ttl: { complaint: forever } }",
                "suppression.ttl.complaint",
            ),
            (
                "{ mailbox_full: { forget_after: 0s } }",
                "suppression.mailbox_full.forget_after",
            ),
        ] {
            let e = with(section).unwrap_err().to_string();
            assert!(e.starts_with(field), "{section}: {e}");
        }
    }
}
