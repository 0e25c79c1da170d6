//! The one rule of what suppresses an address, as a pure function of the config, the address's current
//! mailbox-full streak and what just happened to it. Every caller (synchronous replies in the queue,
//! DSNs and complaints in feedback, nothing else) goes through [`decide`], so the rule cannot drift
//! between them.

use chrono::{DateTime, Utc};
use herald_config::Suppression;

use super::{Cause, Evidence, Streak};
use crate::outcome::{Category, Class};

/// What happened to an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A message was delivered to it: its mailbox is neither missing nor full.
    Delivered,
    /// A final failure: a 5xx reply (or a DSN saying failed), or a message that expired deferred.
    /// Deferrals are not observations: one more retry of one message says nothing new.
    Failed {
        class: Class,
        category: Category,
        reply: Evidence,
    },
    /// The recipient complained (an ARF report of a complaint type).
    Complaint { reply: Evidence },
}

/// What to do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Nothing,
    /// Put the address on the list (and forget its streak).
    Suppress {
        cause: Cause,
        reason: String,
        reply: Evidence,
        expires_at: Option<DateTime<Utc>>,
    },
    /// Record the address's streak, one failure longer.
    Streak(Streak),
    /// Forget the address's streak.
    Reset,
}

/// The streak still in force at `now`: one without a new failure for `forget_after` is over.
pub fn live_streak<'a>(
    policy: &Suppression,
    streak: Option<&'a Streak>,
    now: DateTime<Utc>,
) -> Option<&'a Streak> {
    streak.filter(|s| !is_forgotten(policy, s, now))
}

pub(super) fn is_forgotten(policy: &Suppression, s: &Streak, now: DateTime<Utc>) -> bool {
    let forget = chrono::Duration::from_std(policy.mailbox_full.forget_after)
        .unwrap_or(chrono::Duration::MAX);
    s.last_at
        .checked_add_signed(forget)
        .is_some_and(|t| t <= now)
}

/// When a suppression of `cause` made at `now` ends under `policy`; `None` never.
pub fn expiry(policy: &Suppression, cause: Cause, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let ttl = match cause {
        Cause::InvalidRecipient => policy.ttl.invalid_recipient,
        Cause::MailboxFull => policy.ttl.mailbox_full,
        Cause::Complaint => policy.ttl.complaint,
        Cause::Manual => return None,
    };
    let d = chrono::Duration::from_std(ttl.duration()?).ok()?;
    now.checked_add_signed(d)
}

/// A reply as the list's `reason` says it: the reply itself, or which report gave the diagnostic.
fn reason(reply: &Evidence) -> String {
    if reply.source == "smtp" {
        reply.to_string()
    } else {
        format!("bounce ({} report): {}", reply.source, reply.text)
    }
}

/// The decision for `address` given its current streak (if any) and what happened.
pub fn decide(
    policy: &Suppression,
    address: &str,
    streak: Option<&Streak>,
    observed: &Observation,
    now: DateTime<Utc>,
) -> Decision {
    let streak = live_streak(policy, streak, now);
    let reset = || {
        if streak.is_some() {
            Decision::Reset
        } else {
            Decision::Nothing
        }
    };
    match observed {
        Observation::Delivered => reset(),
        Observation::Complaint { reply } => Decision::Suppress {
            cause: Cause::Complaint,
            reason: format!("complaint ({}, {} report)", reply.text, reply.source),
            reply: reply.clone(),
            expires_at: expiry(policy, Cause::Complaint, now),
        },
        // The address does not exist or its account is closed: only a permanent reply says so for good
        // (a 4xx "user unknown" is a directory that is not sure yet).
        Observation::Failed {
            class: Class::Hard,
            category,
            reply,
        } if category.suppresses() => Decision::Suppress {
            cause: Cause::InvalidRecipient,
            reason: reason(reply),
            reply: reply.clone(),
            expires_at: expiry(policy, Cause::InvalidRecipient, now),
        },
        Observation::Failed {
            category: Category::MailboxFull,
            reply,
            ..
        } => {
            let m = &policy.mailbox_full;
            if m.replies == 0 {
                return Decision::Nothing;
            }
            let next = match streak {
                Some(s) => Streak {
                    address: s.address.clone(),
                    replies: s.replies.saturating_add(1),
                    first_at: s.first_at,
                    last_at: now,
                    reply: reply.clone(),
                },
                None => Streak {
                    address: address.to_owned(),
                    replies: 1,
                    first_at: now,
                    last_at: now,
                    reply: reply.clone(),
                },
            };
            let span = (next.last_at - next.first_at).to_std().unwrap_or_default();
            if next.replies >= m.replies && span >= m.over {
                Decision::Suppress {
                    cause: Cause::MailboxFull,
                    reason: format!(
                        "mailbox full {} times since {}: {}",
                        next.replies,
                        next.first_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        reason(reply)
                    ),
                    reply: reply.clone(),
                    expires_at: expiry(policy, Cause::MailboxFull, now),
                }
            } else {
                Decision::Streak(next)
            }
        }
        // Rate, policy, reputation, content, authentication, a domain that cannot receive mail, a 4xx
        // invalid-recipient, anything unspecific: the sender's or the network's trouble, never the
        // address's. It is not a full mailbox either, so a streak ends.
        Observation::Failed { .. } => reset(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    use crate::outcome::suppression::testing::reply;

    fn failed(code: u16, category: Category) -> Observation {
        let reply = reply(code, &format!("{}.0.0", code / 100), "test");
        crate::outcome::suppression::testing::failed(code, category, reply)
    }

    fn policy() -> Suppression {
        let mut p = Suppression::default();
        p.mailbox_full.replies = 3;
        p.mailbox_full.over = Duration::from_secs(100);
        p
    }

    #[test]
    fn a_permanent_invalid_recipient_suppresses_for_the_configured_ttl() {
        let d = decide(
            &policy(),
            "a@x.test",
            None,
            &failed(550, Category::InvalidRecipient),
            t(0),
        );
        let Decision::Suppress {
            cause, expires_at, ..
        } = d
        else {
            panic!("{d:?}")
        };
        assert_eq!(cause, Cause::InvalidRecipient);
        assert_eq!(expires_at, Some(t(365 * 86400)));
    }

    #[test]
    fn nothing_that_is_not_the_address_s_fault_suppresses() {
        let p = policy();
        for (code, category) in [
            (450, Category::InvalidRecipient),
            (450, Category::MailboxFull),
            (421, Category::RateLimited),
            (550, Category::RateLimited),
            (550, Category::PolicyBlock),
            (554, Category::ReputationBlock),
            (550, Category::SpamContent),
            (550, Category::AuthenticationFailure),
            (550, Category::InvalidDomain),
            (550, Category::PermanentOther),
            (552, Category::MailboxFull),
            (451, Category::TransientOther),
        ] {
            let d = decide(&p, "a@x.test", None, &failed(code, category), t(0));
            assert!(
                !matches!(d, Decision::Suppress { .. }),
                "{code} {category}: {d:?}"
            );
        }
    }

    #[test]
    fn a_full_mailbox_suppresses_after_n_failures_over_the_span_only() {
        let p = policy();
        let full = failed(552, Category::MailboxFull);
        let mut streak: Option<Streak> = None;
        // Three failures within 50 s: the count is reached, the span is not.
        for s in [0, 20, 50] {
            match decide(&p, "a@x.test", streak.as_ref(), &full, t(s)) {
                Decision::Streak(n) => streak = Some(n),
                d => panic!("at {s}: {d:?}"),
            }
        }
        assert_eq!(streak.as_ref().map(|s| s.replies), Some(3));
        let d = decide(&p, "a@x.test", streak.as_ref(), &full, t(100));
        let Decision::Suppress {
            cause, expires_at, ..
        } = d
        else {
            panic!("{d:?}")
        };
        assert_eq!(cause, Cause::MailboxFull);
        assert_eq!(expires_at, Some(t(100 + 30 * 86400)));
    }

    #[test]
    fn a_delivery_or_another_outcome_ends_a_streak() {
        let p = policy();
        let full = failed(552, Category::MailboxFull);
        let Decision::Streak(s) = decide(&p, "a@x.test", None, &full, t(0)) else {
            panic!()
        };
        for other in [Observation::Delivered, failed(550, Category::PolicyBlock)] {
            assert_eq!(
                decide(&p, "a@x.test", Some(&s), &other, t(10)),
                Decision::Reset
            );
        }
        // Without a streak there is nothing to reset.
        assert_eq!(
            decide(&p, "a@x.test", None, &Observation::Delivered, t(10)),
            Decision::Nothing
        );
    }

    #[test]
    fn a_streak_left_alone_for_forget_after_starts_over() {
        let mut p = policy();
        p.mailbox_full.forget_after = Duration::from_secs(1000);
        let full = failed(552, Category::MailboxFull);
        let old = Streak {
            address: "a@x.test".into(),
            replies: 2,
            first_at: t(0),
            last_at: t(10),
            reply: reply(552, "5.2.2", "full"),
        };
        match decide(&p, "a@x.test", Some(&old), &full, t(2000)) {
            Decision::Streak(s) => assert_eq!((s.replies, s.first_at), (1, t(2000))),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn replies_zero_never_suppresses_a_full_mailbox_and_complaints_never_expire_by_default() {
        let mut p = policy();
        p.mailbox_full.replies = 0;
        assert_eq!(
            decide(
                &p,
                "a@x.test",
                None,
                &failed(552, Category::MailboxFull),
                t(0)
            ),
            Decision::Nothing
        );
        let d = decide(
            &p,
            "a@x.test",
            None,
            &Observation::Complaint {
                reply: Evidence {
                    source: "arf".into(),
                    code: None,
                    enhanced: None,
                    text: "abuse".into(),
                },
            },
            t(0),
        );
        assert!(
            matches!(
                d,
                Decision::Suppress {
                    cause: Cause::Complaint,
                    expires_at: None,
                    ..
                }
            ),
            "{d:?}"
        );
    }
}
