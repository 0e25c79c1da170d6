//! The built-in bounce rules: data in `rules/*.yaml`, compiled into the binary, read by the classifier.
//!
//! One table per mailbox provider (its replies, and how to tell that a reply is its: words of the reply
//! text and the suffixes of its MX host names), then the generic tiers every reply goes through, in the
//! order a postmaster reads a reply:
//!
//! - `generic.yaml`: wording that says something specific ("mailbox full", "relay access denied");
//! - `codes.yaml`: enhanced status codes that are specific on their own (x.1.1, x.2.2, x.3.4, x.7.26);
//! - `hints.yaml`: weak wording that only decides when no specific code did ("mailbox unavailable",
//!   "service unavailable");
//! - `families.yaml`: what a generic code still says (any other 5.7.x is a policy refusal).
//!
//! Every rule names the page it was read from (`source:`), so a verdict can be checked against the
//! provider's own words.

use serde::Deserialize;

use herald_config::Category;

/// One table: a provider's (with `provider`) or a generic tier's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    #[serde(default)]
    pub provider: Option<Provider>,
    pub rules: Vec<RuleData>,
}

/// How a provider's replies are recognised.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    /// Patterns, any of which in the reply text names the provider (`gsmtp`, `\[TSS\d\d\]`).
    #[serde(default)]
    pub text: Vec<String>,
    /// Host name suffixes of the provider's MX hosts (`google.com` matches `gmail-smtp-in.l.google.com`).
    #[serde(default)]
    pub mx: Vec<String>,
}

/// Hard or soft, for a rule that holds for one class of replies only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassData {
    Hard,
    Soft,
}

/// One rule: every condition given must hold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleData {
    /// A regular expression matched case-insensitively against the reply text.
    #[serde(default)]
    pub text: Option<String>,
    /// An enhanced status code pattern (`5.1.1`, `x.7.26`, `5.7`).
    #[serde(default)]
    pub status: Option<String>,
    /// The basic reply code.
    #[serde(default)]
    pub code: Option<u16>,
    /// Only 4xx (soft) or only 5xx (hard) replies.
    #[serde(default)]
    pub class: Option<ClassData>,
    pub category: Category,
    /// The page the reply or its meaning was read from.
    pub source: String,
}

/// The provider tables, then the generic tiers, in the order they are consulted.
const TABLES: &[(&str, &str)] = &[
    ("gmail", include_str!("rules/gmail.yaml")),
    ("microsoft", include_str!("rules/microsoft.yaml")),
    ("yahoo", include_str!("rules/yahoo.yaml")),
    ("apple", include_str!("rules/apple.yaml")),
    ("comcast", include_str!("rules/comcast.yaml")),
    ("orange", include_str!("rules/orange.yaml")),
    ("gmx", include_str!("rules/gmx.yaml")),
    ("t-online", include_str!("rules/t-online.yaml")),
    ("mailru", include_str!("rules/mailru.yaml")),
    ("yandex", include_str!("rules/yandex.yaml")),
    ("zoho", include_str!("rules/zoho.yaml")),
    ("proton", include_str!("rules/proton.yaml")),
    ("fastmail", include_str!("rules/fastmail.yaml")),
    ("generic", include_str!("rules/generic.yaml")),
    ("codes", include_str!("rules/codes.yaml")),
    ("hints", include_str!("rules/hints.yaml")),
    ("families", include_str!("rules/families.yaml")),
];

/// A table that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("built-in bounce rules {table}.yaml: {source}")]
pub struct TableError {
    pub table: &'static str,
    // Boxed: the parser's error is large, and it would make every Result that carries it large too.
    #[source]
    pub source: Box<serde_saphyr::Error>,
}

/// Every built-in table, parsed, with its name.
pub fn tables() -> Result<Vec<(&'static str, Table)>, TableError> {
    TABLES
        .iter()
        .map(|(name, text)| {
            serde_saphyr::from_str::<Table>(text)
                .map(|t| (*name, t))
                .map_err(|source| TableError {
                    table: name,
                    source: Box::new(source),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_config::StatusPattern;

    #[test]
    fn every_table_parses_and_every_rule_has_a_source_and_valid_patterns() {
        let tables = tables().unwrap();
        assert_eq!(tables.len(), TABLES.len());
        let mut rules = 0;
        for (name, table) in &tables {
            let generic = ["generic", "codes", "hints", "families"].contains(name);
            assert_eq!(
                table.provider.is_none(),
                generic,
                "{name}: provider section"
            );
            if let Some(p) = &table.provider {
                assert!(
                    !p.text.is_empty() || !p.mx.is_empty(),
                    "{name}: no detection"
                );
                for t in &p.text {
                    regex::Regex::new(t).unwrap_or_else(|e| panic!("{name}: {t:?}: {e}"));
                }
                for m in &p.mx {
                    assert!(
                        !m.starts_with('.') && m.contains('.') && m == &m.to_ascii_lowercase(),
                        "{name}: mx suffix {m:?}"
                    );
                }
            }
            for (i, r) in table.rules.iter().enumerate() {
                rules += 1;
                assert!(
                    r.source.starts_with("https://") && r.source.len() > "https://".len() + 3,
                    "{name}[{i}]: source {:?}",
                    r.source
                );
                assert!(
                    r.text.is_some() || r.status.is_some() || r.code.is_some(),
                    "{name}[{i}]: a rule without a condition"
                );
                if let Some(t) = &r.text {
                    regex::Regex::new(t).unwrap_or_else(|e| panic!("{name}[{i}]: {t:?}: {e}"));
                }
                if let Some(s) = &r.status {
                    assert!(
                        StatusPattern::parse(s).is_some(),
                        "{name}[{i}]: status {s:?}"
                    );
                }
            }
        }
        assert!(rules > 100, "{rules} rules");
    }
}
