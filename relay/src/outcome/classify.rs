//! Bounce classification: a reply code, its enhanced status code and text, to a class and a category.
//!
//! The class follows the reply code (4xx soft, 5xx hard). The category says *why*, which decides what to do:
//! an invalid recipient is suppressed, a reputation block is not the recipient's fault and must never be.
//! Rules are data, checked in order; the enhanced status code decides where it is specific, and text
//! patterns from the large mailbox providers' replies refine the rest.

use std::fmt;

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

/// Why a delivery failed. The names are the `category` label values of `herald_bounces_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    InvalidRecipient,
    MailboxFull,
    MessageTooLarge,
    RateLimited,
    Greylisted,
    ReputationBlock,
    AuthenticationFailure,
    PolicyBlock,
    SpamContent,
    TransientOther,
    PermanentOther,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::InvalidRecipient => "invalid-recipient",
            Category::MailboxFull => "mailbox-full",
            Category::MessageTooLarge => "message-too-large",
            Category::RateLimited => "rate-limited",
            Category::Greylisted => "greylisted",
            Category::ReputationBlock => "reputation-block",
            Category::AuthenticationFailure => "authentication-failure",
            Category::PolicyBlock => "policy-block",
            Category::SpamContent => "spam-content",
            Category::TransientOther => "transient-other",
            Category::PermanentOther => "permanent-other",
        }
    }

    /// Only a recipient's own fault puts it on the suppression list.
    pub fn suppresses(self) -> bool {
        self == Category::InvalidRecipient
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule: an enhanced status code prefix (`"5.1.1"`, `"x.7."`) and/or words in the text.
struct Rule {
    /// Matches the enhanced code's subject and detail (`"1.1"`, `"7.26"`) or a subject prefix (`"7."`).
    status: Option<&'static str>,
    /// Any of these, lower case, in the reply text.
    words: &'static [&'static str],
    category: Category,
}

const RULES: &[Rule] = &[
    // Authentication of the sender (SPF, DKIM, DMARC; RFC 7372).
    Rule {
        status: Some("7.23"),
        words: &[],
        category: Category::AuthenticationFailure,
    },
    Rule {
        status: Some("7.24"),
        words: &[],
        category: Category::AuthenticationFailure,
    },
    Rule {
        status: Some("7.25"),
        words: &[],
        category: Category::AuthenticationFailure,
    },
    Rule {
        status: Some("7.26"),
        words: &[],
        category: Category::AuthenticationFailure,
    },
    Rule {
        status: Some("7.27"),
        words: &[],
        category: Category::AuthenticationFailure,
    },
    Rule {
        status: None,
        words: &["dmarc", "spf ", "spf:", "dkim", "unauthenticated"],
        category: Category::AuthenticationFailure,
    },
    // Greylisting replies often say "try again later" too: they go first.
    Rule {
        status: None,
        words: &["greylist", "graylist", "grey-list", "gray-list"],
        category: Category::Greylisted,
    },
    // Gmail's 4.7.28 and the throttling wording of Microsoft, Yahoo and others.
    Rule {
        status: Some("7.28"),
        words: &[],
        category: Category::RateLimited,
    },
    Rule {
        status: None,
        words: &[
            "rate limit",
            "ratelimit",
            "rate-limit",
            "too many",
            "throttl",
            "temporarily deferred",
            "unexpected volume",
        ],
        category: Category::RateLimited,
    },
    // Recipient problems, by code first.
    Rule {
        status: Some("1.1"),
        words: &[],
        category: Category::InvalidRecipient,
    },
    Rule {
        status: Some("1.0"),
        words: &[],
        category: Category::InvalidRecipient,
    },
    Rule {
        status: Some("1.2"),
        words: &[],
        category: Category::InvalidRecipient,
    },
    Rule {
        status: Some("1.3"),
        words: &[],
        category: Category::InvalidRecipient,
    },
    Rule {
        status: Some("1.6"),
        words: &[],
        category: Category::InvalidRecipient,
    },
    Rule {
        status: Some("1.10"),
        words: &[],
        category: Category::InvalidRecipient,
    },
    Rule {
        status: Some("2.1"),
        words: &[],
        category: Category::InvalidRecipient,
    },
    Rule {
        status: Some("2.2"),
        words: &[],
        category: Category::MailboxFull,
    },
    Rule {
        status: Some("3.4"),
        words: &[],
        category: Category::MessageTooLarge,
    },
    Rule {
        status: Some("2.3"),
        words: &[],
        category: Category::MessageTooLarge,
    },
    // Reputation before content: "blocked ... spam" is about the sender, not this message.
    Rule {
        status: None,
        words: &[
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
        ],
        category: Category::ReputationBlock,
    },
    Rule {
        status: None,
        words: &["spam", "content", "virus", "malware", "phish"],
        category: Category::SpamContent,
    },
    Rule {
        status: None,
        words: &[
            "user unknown",
            "unknown user",
            "no such user",
            "does not exist",
            "mailbox unavailable",
            "invalid recipient",
            "recipient rejected",
            "address rejected",
            "not found",
        ],
        category: Category::InvalidRecipient,
    },
    Rule {
        status: None,
        words: &[
            "quota",
            "mailbox full",
            "mailbox is full",
            "insufficient storage",
        ],
        category: Category::MailboxFull,
    },
    Rule {
        status: None,
        words: &["too large", "too big", "size limit", "exceeds"],
        category: Category::MessageTooLarge,
    },
    Rule {
        status: Some("7."),
        words: &[],
        category: Category::PolicyBlock,
    },
];

/// Splits `5.1.1` into its class digit and the rest (`1.1`).
fn subject_detail(enhanced: &str) -> Option<&str> {
    let (class, rest) = enhanced.split_once('.')?;
    matches!(class, "2" | "4" | "5").then_some(rest)
}

/// Classifies a failed delivery. `enhanced` is the enhanced status code (`5.1.1`) if the reply had one.
pub fn classify(code: u16, enhanced: Option<&str>, text: &str) -> (Class, Category) {
    let class = if code >= 500 {
        Class::Hard
    } else {
        Class::Soft
    };
    let detail = enhanced.and_then(subject_detail);
    let lower = text.to_ascii_lowercase();
    for rule in RULES {
        let status_ok = match (rule.status, detail) {
            (None, _) => true,
            (Some(want), Some(have)) if want.ends_with('.') => have.starts_with(want),
            (Some(want), Some(have)) => have == want,
            (Some(_), None) => false,
        };
        if !status_ok {
            continue;
        }
        if rule.status.is_some() && rule.words.is_empty() {
            return (class, rule.category);
        }
        if rule.words.iter().any(|w| lower.contains(w)) {
            return (class, rule.category);
        }
    }
    let other = match class {
        Class::Hard => Category::PermanentOther,
        Class::Soft => Category::TransientOther,
    };
    (class, other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat(code: u16, enh: Option<&str>, text: &str) -> Category {
        classify(code, enh, text).1
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
}
