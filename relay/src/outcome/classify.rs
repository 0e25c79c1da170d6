//! Bounce classification: a reply code, its enhanced status code and text, to a class and a category.
//!
//! The class follows the reply code (4xx soft, 5xx hard). The category says *why*, which decides what to do:
//! an invalid recipient is suppressed, a reputation block is not the recipient's fault and must never be.
//! Rules are data, checked in order: the config's `bounces.rules` first, then the built-in table, where the
//! enhanced status code decides when it is specific and text patterns from the large mailbox providers'
//! replies refine the rest. A reload builds a new classifier, which `outcome::Rules` puts in force whole.

use regex::{Regex, RegexBuilder};

use herald_config::{Bounces, Category, StatusPattern};

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("bounces.rules[{rule}].status: {pattern:?} is not an enhanced status code pattern")]
    Status { rule: usize, pattern: String },
    #[error("bounces.rules[{rule}].text: {source}")]
    Text { rule: usize, source: regex::Error },
}

/// Hard (permanent, 5xx) or soft (transient, 4xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Hard,
    Soft,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Hard => "hard",
            Class::Soft => "soft",
        }
    }
}

/// Splits `5.1.1` into its three numbers.
fn enhanced_parts(enhanced: &str) -> Option<[u16; 3]> {
    let mut it = enhanced.split('.').map(|p| p.parse::<u16>().ok());
    let parts = [it.next()??, it.next()??, it.next()??];
    (it.next().is_none() && matches!(parts[0], 2 | 4 | 5)).then_some(parts)
}

/// One rule: every condition it has must hold.
#[derive(Debug, Clone)]
struct Rule {
    status: Option<StatusPattern>,
    code: Option<u16>,
    text: Option<Regex>,
    category: Category,
}

impl Rule {
    fn matches(&self, code: u16, enhanced: Option<&[u16; 3]>, text: &str) -> bool {
        let status_ok = match (&self.status, enhanced) {
            (None, _) => true,
            (Some(p), Some(e)) => p.matches(e),
            (Some(_), None) => false,
        };
        status_ok
            && self.code.is_none_or(|c| c == code)
            && self.text.as_ref().is_none_or(|r| r.is_match(text))
    }
}

/// Words as one case-insensitive alternation (they are literal text, not patterns).
fn words(list: &[&str]) -> Regex {
    let alternation = list
        .iter()
        .map(|w| regex::escape(w))
        .collect::<Vec<_>>()
        .join("|");
    RegexBuilder::new(&alternation)
        .case_insensitive(true)
        .build()
        .expect("built-in words make a valid pattern")
}

/// The built-in table, in order: (status pattern, words in the text, category).
const BUILTIN: &[(Option<&str>, &[&str], Category)] = &[
    // Authentication of the sender (SPF, DKIM, DMARC; RFC 7372).
    (Some("x.7.23"), &[], Category::AuthenticationFailure),
    (Some("x.7.24"), &[], Category::AuthenticationFailure),
    (Some("x.7.25"), &[], Category::AuthenticationFailure),
    (Some("x.7.26"), &[], Category::AuthenticationFailure),
    (Some("x.7.27"), &[], Category::AuthenticationFailure),
    (
        None,
        &["dmarc", "spf ", "spf:", "dkim", "unauthenticated"],
        Category::AuthenticationFailure,
    ),
    // Greylisting replies often say "try again later" too: they go first.
    (
        None,
        &["greylist", "graylist", "grey-list", "gray-list"],
        Category::Greylisted,
    ),
    // Gmail's 4.7.28 and the throttling wording of Microsoft, Yahoo and others.
    (Some("x.7.28"), &[], Category::RateLimited),
    (
        None,
        &[
            "rate limit",
            "ratelimit",
            "rate-limit",
            "too many",
            "throttl",
            "temporarily deferred",
            "unexpected volume",
        ],
        Category::RateLimited,
    ),
    // Recipient problems, by code first.
    (Some("x.1.1"), &[], Category::InvalidRecipient),
    (Some("x.1.0"), &[], Category::InvalidRecipient),
    // The domain, not the mailbox: bad destination system (RFC 3463) and null MX (RFC 7505). Microsoft
    // says x.1.10 for a recipient it does not know (RESOLVER.ADR.RecipientNotFound), so there the text
    // decides: only a null MX is the domain's.
    (Some("x.1.2"), &[], Category::InvalidDomain),
    (Some("x.1.10"), &["null mx"], Category::InvalidDomain),
    (Some("x.1.3"), &[], Category::InvalidRecipient),
    (Some("x.1.6"), &[], Category::InvalidRecipient),
    (Some("x.1.10"), &[], Category::InvalidRecipient),
    (Some("x.2.1"), &[], Category::InvalidRecipient),
    (Some("x.2.2"), &[], Category::MailboxFull),
    (Some("x.3.4"), &[], Category::MessageTooLarge),
    (Some("x.2.3"), &[], Category::MessageTooLarge),
    // Reputation before content: "blocked ... spam" is about the sender, not this message.
    (
        None,
        &[
            "blocklist",
            "blacklist",
            "block list",
            "black list",
            "listed",
            "reputation",
            "spamhaus",
            "rbl",
            "dnsbl",
            "blocked",
            "banned sending",
        ],
        Category::ReputationBlock,
    ),
    (
        None,
        &["spam", "content", "virus", "malware", "phish"],
        Category::SpamContent,
    ),
    // Any other 5.7.x / 4.7.x is a security or policy verdict (RFC 3463), even when the text says
    // "recipient address rejected": Postfix's access tables word their refusals that way.
    (Some("x.7"), &[], Category::PolicyBlock),
    (
        None,
        &[
            "user unknown",
            "unknown user",
            "no such user",
            "does not exist",
            "mailbox unavailable",
            "invalid recipient",
            "recipient rejected",
            "address rejected",
            "not found",
            "doesn't have a",
            "does not have a",
            "no mailbox",
            "unknown recipient",
        ],
        Category::InvalidRecipient,
    ),
    (
        None,
        &[
            "quota",
            "mailbox full",
            "mailbox is full",
            "insufficient storage",
        ],
        Category::MailboxFull,
    ),
    (
        None,
        &["too large", "too big", "size limit", "exceeds"],
        Category::MessageTooLarge,
    ),
    // Transient network and routing trouble: timeouts, refused connections, DNS failures (RFC 3463 X.4.X).
    (Some("4.4"), &[], Category::TransientNetwork),
];

/// An ordered rules table.
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Rule>,
}

impl Classifier {
    /// The built-in table alone.
    pub fn builtin() -> Classifier {
        let rules = BUILTIN
            .iter()
            .map(|(status, list, category)| Rule {
                status: status.map(|s| StatusPattern::parse(s).expect("built-in patterns parse")),
                code: None,
                text: (!list.is_empty()).then(|| words(list)),
                category: *category,
            })
            .collect();
        Classifier { rules }
    }

    /// The config's rules, then (unless turned off) the built-in ones.
    pub fn from_config(bounces: &Bounces) -> Result<Classifier, ClassifyError> {
        let mut rules = Vec::with_capacity(bounces.rules.len() + BUILTIN.len());
        for (i, r) in bounces.rules.iter().enumerate() {
            let status = match &r.status {
                Some(p) => Some(
                    StatusPattern::parse(p).ok_or_else(|| ClassifyError::Status {
                        rule: i,
                        pattern: p.clone(),
                    })?,
                ),
                None => None,
            };
            let text = if r.text.is_empty() {
                None
            } else {
                let alternation = r
                    .text
                    .iter()
                    .map(|t| format!("(?:{t})"))
                    .collect::<Vec<_>>()
                    .join("|");
                Some(
                    RegexBuilder::new(&alternation)
                        .case_insensitive(true)
                        .build()
                        .map_err(|source| ClassifyError::Text { rule: i, source })?,
                )
            };
            rules.push(Rule {
                status,
                code: r.code,
                text,
                category: r.category,
            });
        }
        if bounces.builtin_rules {
            rules.extend(Classifier::builtin().rules);
        }
        Ok(Classifier { rules })
    }

    /// Classifies a failure. `enhanced` is the enhanced status code (`5.1.1`) if the reply had one.
    pub fn classify(&self, code: u16, enhanced: Option<&str>, text: &str) -> (Class, Category) {
        let class = if code >= 500 {
            Class::Hard
        } else {
            Class::Soft
        };
        let parts = enhanced.and_then(enhanced_parts);
        let category = self
            .rules
            .iter()
            .find(|r| r.matches(code, parts.as_ref(), text))
            .map_or(
                match class {
                    Class::Hard => Category::PermanentOther,
                    Class::Soft => Category::TransientOther,
                },
                |r| r.category,
            );
        (class, category)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat(code: u16, enh: Option<&str>, text: &str) -> Category {
        Classifier::builtin().classify(code, enh, text).1
    }

    fn classify(code: u16, enh: Option<&str>, text: &str) -> (Class, Category) {
        Classifier::builtin().classify(code, enh, text)
    }

    #[test]
    fn provider_replies() {
        // Gmail
        assert_eq!(
            cat(
                550,
                Some("5.1.1"),
                "The email account that you tried to reach does not exist."
            ),
            Category::InvalidRecipient
        );
        assert_eq!(
            cat(
                452,
                Some("4.2.2"),
                "The email account that you tried to reach is over quota."
            ),
            Category::MailboxFull
        );
        assert_eq!(
            cat(
                421,
                Some("4.7.28"),
                "Our system has detected an unusual rate of unsolicited mail"
            ),
            Category::RateLimited
        );
        assert_eq!(
            cat(
                550,
                Some("5.7.26"),
                "This mail has been blocked because the sender is unauthenticated."
            ),
            Category::AuthenticationFailure
        );
        assert_eq!(
            cat(
                552,
                Some("5.3.4"),
                "Your message exceeded Google's message size limits."
            ),
            Category::MessageTooLarge
        );
        // Microsoft
        assert_eq!(
            cat(
                550,
                Some("5.7.1"),
                "Service unavailable, Client host [192.0.2.1] blocked using Spamhaus."
            ),
            Category::ReputationBlock
        );
        assert_eq!(
            cat(
                550,
                Some("5.4.1"),
                "Recipient address rejected: Access denied."
            ),
            Category::InvalidRecipient
        );
        // Yahoo
        assert_eq!(
            cat(
                421,
                Some("4.7.0"),
                "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume"
            ),
            Category::RateLimited
        );
        assert_eq!(
            cat(
                554,
                Some("5.7.9"),
                "Message not accepted for policy reasons."
            ),
            Category::PolicyBlock
        );
        // Postfix access tables: a policy verdict in recipient wording
        assert_eq!(
            cat(
                554,
                Some("5.7.1"),
                "<x@example.net>: Recipient address rejected: Access denied"
            ),
            Category::PolicyBlock
        );
        // Microsoft's banned sending IP range 5.7.606-649
        assert_eq!(
            cat(
                550,
                Some("5.7.606"),
                "Access denied, banned sending IP [192.0.2.1]."
            ),
            Category::ReputationBlock
        );
        // Yahoo's "dd" reply
        assert_eq!(
            cat(
                554,
                Some("5.0.0"),
                "delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [-5]"
            ),
            Category::InvalidRecipient
        );
        // Greylisting (Postgrey)
        assert_eq!(
            cat(
                450,
                Some("4.2.0"),
                "Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/"
            ),
            Category::Greylisted
        );
        assert_eq!(
            cat(
                550,
                Some("5.7.1"),
                "Message rejected as spam by Content Filtering."
            ),
            Category::SpamContent
        );
    }

    #[test]
    fn fallbacks_and_class() {
        assert_eq!(
            classify(451, Some("4.3.0"), "Local error"),
            (Class::Soft, Category::TransientOther)
        );
        assert_eq!(
            classify(554, None, "Transaction failed"),
            (Class::Hard, Category::PermanentOther)
        );
        assert_eq!(
            classify(550, None, "No such user here"),
            (Class::Hard, Category::InvalidRecipient)
        );
        assert!(!Category::ReputationBlock.suppresses());
        assert!(!Category::PolicyBlock.suppresses());
        assert!(Category::InvalidRecipient.suppresses());
    }

    #[test]
    fn a_domain_that_cannot_receive_mail_is_not_the_recipients_fault() {
        // The relay's own verdicts (deliver/dns.rs) and the same codes from a peer.
        for (status, text) in [
            ("5.1.2", "domain nowhere.test does not exist"),
            (
                "5.1.10",
                "domain nowhere.test does not accept mail (null MX)",
            ),
        ] {
            assert_eq!(
                classify(550, Some(status), text),
                (Class::Hard, Category::InvalidDomain),
                "{status}"
            );
        }
        assert!(!Category::InvalidDomain.suppresses());
        assert_eq!(
            classify(
                550,
                Some("5.1.10"),
                "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
            ),
            (Class::Hard, Category::InvalidRecipient)
        );
    }

    #[test]
    fn network_trouble_is_its_own_category() {
        assert_eq!(
            classify(451, Some("4.4.2"), "mx.example.test: connection reset"),
            (Class::Soft, Category::TransientNetwork)
        );
        // A hard 5.4.x (no route) is not a transient problem.
        assert_eq!(
            classify(550, Some("5.4.4"), "Unable to route"),
            (Class::Hard, Category::PermanentOther)
        );
    }

    #[test]
    fn configured_rules_come_first_and_can_replace_the_builtins() {
        let config = herald_config::Config::parse(
            r#"
hostname: relay.test
spool_dir: /tmp/x
listeners: [{ name: a, address: "127.0.0.1:1" }]
bounces:
  rules:
    - { status: "5.7.1", text: ["sender denied by policy \\d+"], category: reputation-block }
    - { code: 421, category: rate-limited }
"#,
        )
        .unwrap();
        let c = Classifier::from_config(&config.bounces).unwrap();
        // The built-in table would call this a policy block; the configured rule wins.
        assert_eq!(
            c.classify(550, Some("5.7.1"), "Sender denied by POLICY 17")
                .1,
            Category::ReputationBlock
        );
        assert_eq!(
            c.classify(550, Some("5.7.1"), "other").1,
            Category::PolicyBlock
        );
        assert_eq!(c.classify(421, None, "closing").1, Category::RateLimited);
        // Built-ins still follow.
        assert_eq!(
            c.classify(550, Some("5.1.1"), "x").1,
            Category::InvalidRecipient
        );

        let mut only = config.bounces.clone();
        only.builtin_rules = false;
        let c = Classifier::from_config(&only).unwrap();
        assert_eq!(
            c.classify(550, Some("5.1.1"), "x").1,
            Category::PermanentOther
        );
    }
}
