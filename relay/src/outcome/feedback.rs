//! What a report received at a return-path address means, and recording it: metrics, events, and what the
//! suppression list makes of it (`outcome::suppression::policy` decides: permanent invalid-recipient
//! bounces and complaints suppress, full mailboxes count towards a streak, policy and reputation blocks
//! never suppress: they are the sender's problem, not the recipient's).
//!
//! Nothing in a report is believed without a token that verifies: the token comes from the envelope
//! recipient the report was sent to, or, for feedback loops that write to a fixed address, from the
//! original message's envelope sender quoted in the report. A token that carries its recipient names it;
//! one that does not is checked against each address the report gives until one verifies.

use crate::events::Event;
use crate::fleet::Count;
use crate::outcome::report::{self, Action, Kind, Report};
use crate::outcome::suppression::{Evidence, Observation, Suppressions, suppressed};
use crate::outcome::verp::{self, ReturnPaths, Token};
use crate::outcome::{Category, Class, Classifier, Reply, Rules};
use crate::telemetry::Telemetry;

/// Return-path tokens looked at per report: a report is about one message, rarely a few.
const MAX_TOKENS: usize = 10;

/// Feedback types that are a recipient saying "stop" (RFC 5965 section 7.3); `not-spam` and
/// `auth-failure` (RFC 6591) are not.
const COMPLAINT_TYPES: &[&str] = &["abuse", "fraud", "virus", "other"];

/// What became of one recipient (or of a whole report that named none that verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub kind: &'static str,
    /// bounce, delay, complaint, other, forged, unverified or not-a-report.
    pub result: &'static str,
    pub queue_id: Option<String>,
    pub recipient: Option<String>,
    pub class: Option<Class>,
    pub category: Option<Category>,
    /// The remote diagnostic of a bounce.
    pub diagnostic: Option<String>,
    /// A complaint's feedback type, one of [`COMPLAINT_TYPES`].
    pub feedback_type: Option<&'static str>,
    /// What the report tells the suppression list, if anything.
    pub observed: Option<Observation>,
}

/// Reads and records a report sent to `locals` (the local parts it was addressed to at return-path
/// domains), about mail of `sending` (the sending domain of that return path, when one is known).
/// Blocking (the suppression list is fsynced): call it off the async runtime.
pub fn process(
    raw: &[u8],
    locals: &[String],
    sending: Option<&str>,
    rules: &Rules,
    suppressions: &Suppressions,
    telemetry: &Telemetry,
) -> Vec<Outcome> {
    let rules = rules.snapshot();
    let (outcomes, limited) = assess(raw, locals, &rules.return_paths, &rules.classifier);
    if limited {
        telemetry.metrics.feedback_limited.inc();
        tracing::info!("report cut short by a processing limit; the rest was not looked at");
    }
    for o in &outcomes {
        record(o, sending, suppressions, telemetry);
    }
    outcomes
}

/// Reads a report and decides, per recipient, what it says. No side effects.
pub fn evaluate(
    raw: &[u8],
    locals: &[String],
    rp: &ReturnPaths,
    classifier: &Classifier,
) -> Vec<Outcome> {
    assess(raw, locals, rp, classifier).0
}

/// [`evaluate`], and whether a processing limit cut the report short.
fn assess(
    raw: &[u8],
    locals: &[String],
    rp: &ReturnPaths,
    classifier: &Classifier,
) -> (Vec<Outcome>, bool) {
    let Some(report) = report::parse(raw) else {
        return (
            vec![bare("none", "not-a-report")],
            raw.len() > report::MAX_REPORT_BYTES,
        );
    };
    let mut limited = report.limited;
    let kind = report.kind.as_str();
    let mut tokens: Vec<Token> = Vec::new();
    let from_senders = report.original_senders.iter().filter_map(|a| {
        let (local, domain) = a.rsplit_once('@')?;
        rp.is_local(domain).then_some(local)
    });
    for local in locals.iter().map(String::as_str).chain(from_senders) {
        if let Some(t) = verp::parse(local)
            && !tokens.contains(&t)
        {
            if tokens.len() == MAX_TOKENS {
                limited = true;
                break;
            }
            tokens.push(t);
        }
    }
    if tokens.is_empty() {
        return (vec![bare(kind, "unverified")], limited);
    }
    let mut out = Vec::new();
    for token in &tokens {
        let recipient = match &token.recipient {
            Some(r) => rp.verify(token, r).then(|| r.clone()),
            None => candidates(&report).find(|c| rp.verify(token, c)),
        };
        match recipient {
            Some(r) => out.push(judge(&report, token, r, classifier)),
            None => out.push(bare(kind, "forged")),
        }
    }
    (out, limited)
}

fn bare(kind: &'static str, result: &'static str) -> Outcome {
    Outcome {
        kind,
        result,
        queue_id: None,
        recipient: None,
        class: None,
        category: None,
        diagnostic: None,
        feedback_type: None,
        observed: None,
    }
}

/// Every address the report gives, per-recipient blocks first.
fn candidates(report: &Report) -> impl Iterator<Item = String> + '_ {
    report
        .recipients
        .iter()
        .flat_map(|r| r.addresses.iter())
        .chain(report.original_recipients.iter())
        .cloned()
}

/// The outcome for a verified recipient.
fn judge(report: &Report, token: &Token, recipient: String, classifier: &Classifier) -> Outcome {
    let mut o = bare(report.kind.as_str(), "other");
    o.queue_id = Some(token.queue_id.to_string());
    if report.kind == Kind::Arf {
        let given = report.feedback_type.as_deref().unwrap_or("other");
        if let Some(ft) = COMPLAINT_TYPES.iter().find(|t| **t == given) {
            o.result = "complaint";
            o.feedback_type = Some(ft);
            o.observed = Some(Observation::Complaint {
                reply: Evidence {
                    source: report.kind.as_str().to_owned(),
                    code: None,
                    enhanced: None,
                    // The feedback type: `reason` reads "complaint (abuse, arf report)".
                    text: (*ft).to_owned(),
                },
            });
        }
        o.recipient = Some(recipient);
        return o;
    }
    // The block about this recipient; a report about one recipient may name it differently (forwarding).
    let status = report
        .recipients
        .iter()
        .find(|s| {
            s.addresses
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&recipient))
        })
        .or(match report.recipients.as_slice() {
            [only] => Some(only),
            _ => None,
        });
    o.recipient = Some(recipient);
    let Some(status) = status else {
        return o;
    };
    match status.action {
        Action::Failed => {
            let enhanced = status.status.as_deref();
            let code = status
                .code
                .unwrap_or(if enhanced.is_some_and(|e| e.starts_with('4')) {
                    450
                } else {
                    550
                });
            let reply = Reply::new(code, enhanced, &status.diagnostic)
                .with_mx(status.remote_mta.as_deref());
            let (class, category) = classifier.classify(&reply);
            o.result = "bounce";
            o.class = Some(class);
            o.category = Some(category);
            o.diagnostic = Some(status.diagnostic.clone());
            o.observed = Some(Observation::Failed {
                class,
                category,
                reply: Evidence {
                    source: report.kind.as_str().to_owned(),
                    code: status.code,
                    enhanced: enhanced.map(str::to_owned),
                    text: status.diagnostic.clone(),
                },
            });
        }
        Action::Delayed => o.result = "delay",
        Action::Delivered => o.observed = Some(Observation::Delivered),
        Action::Relayed | Action::Expanded => {}
    }
    o
}

/// Metrics, events, the log line and the suppression for one outcome.
fn record(o: &Outcome, sending: Option<&str>, suppressions: &Suppressions, telemetry: &Telemetry) {
    let m = &telemetry.metrics;
    m.feedback.with_label_values(&[o.kind, o.result]).inc();
    let (Some(id), Some(recipient)) = (&o.queue_id, &o.recipient) else {
        tracing::info!(kind = o.kind, result = o.result, "report ignored");
        return;
    };
    let domain = recipient
        .rsplit_once('@')
        .map_or("", |(_, d)| d)
        .to_ascii_lowercase();
    tracing::info!(
        queue_id = %id,
        kind = o.kind,
        result = o.result,
        category = o.category.map_or("", Category::as_str),
        %domain,
        "report processed"
    );
    let event = |kind: &'static str| {
        let mut ev = Event::new(kind, id.clone(), String::new());
        ev.recipient = Some(recipient.clone());
        ev.domain = Some(domain.clone());
        ev.source = Some(o.kind);
        ev
    };
    if let (Some(class), Some(category)) = (o.class, o.category) {
        m.bounces
            .with_label_values(&[class.as_str(), category.as_str(), &m.domain_label(&domain)])
            .inc();
        if let Some(s) = sending {
            telemetry.counters.add(Count::Bounced(s), 1);
        }
        telemetry.emit(|| {
            let mut ev = event("bounced");
            ev.reply = o.diagnostic.clone();
            ev.class = Some(class.as_str());
            ev.category = Some(category.as_str());
            ev
        });
    }
    if let Some(ft) = o.feedback_type {
        m.complaints
            .with_label_values(&[ft, &m.domain_label(&domain)])
            .inc();
        if let Some(s) = sending {
            telemetry.counters.add(Count::Complained(s), 1);
        }
        telemetry.emit(|| {
            let mut ev = event("complained");
            ev.feedback_type = Some(ft.to_owned());
            ev
        });
    }
    let Some(observed) = &o.observed else {
        return;
    };
    if !suppressions.concerns(recipient, observed) {
        return;
    }
    match suppressions.observe(recipient, observed) {
        Ok(Some(entry)) => {
            m.suppressions.set(suppressions.len() as i64);
            suppressed(
                telemetry,
                &entry,
                id.clone(),
                String::new(),
                Some(o.kind),
                false,
            );
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "cannot record a report in the suppression list"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::QueueId;

    fn paths() -> ReturnPaths {
        crate::outcome::verp::tests::paths(&["a key of enough length"])
    }

    fn dsn(recipient: &str, status: &str, diagnostic: &str) -> String {
        format!(
            "From: MAILER-DAEMON@mx.example.net\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\
\r\n\
--b\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.net\r\n\
\r\n\
Final-Recipient: rfc822; {recipient}\r\n\
Action: failed\r\n\
Status: {status}\r\n\
Diagnostic-Code: smtp; {diagnostic}\r\n\
--b--\r\n"
        )
    }

    /// Whether the policy suppresses on this outcome alone (no streak).
    fn suppresses(o: &Outcome) -> bool {
        use crate::outcome::suppression::policy::{Decision, decide};
        o.observed.as_ref().is_some_and(|obs| {
            matches!(
                decide(
                    &herald_config::Suppression::default(),
                    "a@x.test",
                    None,
                    obs,
                    chrono::Utc::now()
                ),
                Decision::Suppress { .. }
            )
        })
    }

    fn local_part(sender: &str) -> String {
        sender.split('@').next().unwrap().to_owned()
    }

    #[test]
    fn a_long_recipient_is_verified_from_the_report_and_another_is_forged() {
        let rp = paths();
        let rcpt = "someone.with.a.rather.long.name@mail.example-provider.test";
        let token = local_part(
            &rp.envelope_sender(QueueId(5), "news@example.test", rcpt)
                .unwrap(),
        );
        let raw = dsn(rcpt, "5.1.1", "550 5.1.1 user unknown");
        let [o] = evaluate(
            raw.as_bytes(),
            std::slice::from_ref(&token),
            &rp,
            &Classifier::builtin(),
        )
        .try_into()
        .unwrap();
        assert_eq!(o.result, "bounce");
        assert_eq!(o.recipient.as_deref(), Some(rcpt));
        assert_eq!(o.category, Some(Category::InvalidRecipient));
        assert!(suppresses(&o));

        let forged = dsn("victim@example.net", "5.1.1", "550 5.1.1 user unknown");
        let [o] = evaluate(forged.as_bytes(), &[token], &rp, &Classifier::builtin())
            .try_into()
            .unwrap();
        assert_eq!((o.result, suppresses(&o)), ("forged", false));
    }

    #[test]
    fn blocks_are_counted_but_never_suppress() {
        let rp = paths();
        let token = local_part(
            &rp.envelope_sender(QueueId(6), "news@example.test", "u@d.test")
                .unwrap(),
        );
        let raw = dsn(
            "u@d.test",
            "5.7.1",
            "550 5.7.1 Service unavailable; client host blocked using Spamhaus",
        );
        let [o] = evaluate(raw.as_bytes(), &[token], &rp, &Classifier::builtin())
            .try_into()
            .unwrap();
        assert_eq!(o.result, "bounce");
        assert_eq!(o.category, Some(Category::ReputationBlock));
        assert!(!suppresses(&o));
    }

    #[test]
    fn a_full_mailbox_dsn_is_a_streak_observation_not_a_suppression() {
        let rp = paths();
        let token = local_part(
            &rp.envelope_sender(QueueId(7), "news@example.test", "u@d.test")
                .unwrap(),
        );
        let raw = dsn("u@d.test", "5.2.2", "552 5.2.2 mailbox full");
        let [o] = evaluate(raw.as_bytes(), &[token], &rp, &Classifier::builtin())
            .try_into()
            .unwrap();
        assert_eq!(o.category, Some(Category::MailboxFull));
        assert!(!suppresses(&o));
        let Some(Observation::Failed { reply, .. }) = &o.observed else {
            panic!("{o:?}")
        };
        assert_eq!(
            (reply.source.as_str(), reply.enhanced.as_deref()),
            ("dsn", Some("5.2.2"))
        );
    }

    #[test]
    fn a_report_without_a_token_is_unverified() {
        let raw = dsn("u@d.test", "5.1.1", "550 5.1.1 user unknown");
        let [o] = evaluate(
            raw.as_bytes(),
            &["postmaster".to_owned()],
            &paths(),
            &Classifier::builtin(),
        )
        .try_into()
        .unwrap();
        assert_eq!((o.kind, o.result), ("dsn", "unverified"));
    }

    #[test]
    fn the_remote_mta_of_a_dsn_tells_whose_reply_it_quotes() {
        let rp = paths();
        let token = local_part(
            &rp.envelope_sender(QueueId(7), "news@example.test", "u@contoso.test")
                .unwrap(),
        );
        let diagnostic = "550 5.4.1 Recipient address rejected: Access denied.";
        let raw = dsn("u@contoso.test", "5.4.1", diagnostic);
        // Exchange Online's directory-based edge blocking: the address does not exist.
        let from_microsoft = raw.replace(
            "Action: failed\r\n",
            "Action: failed\r\nRemote-MTA: dns; contoso-test.mail.protection.outlook.com\r\n",
        );
        let [o] = evaluate(
            from_microsoft.as_bytes(),
            std::slice::from_ref(&token),
            &rp,
            &Classifier::builtin(),
        )
        .try_into()
        .unwrap();
        assert_eq!(o.category, Some(Category::InvalidRecipient));
        assert!(suppresses(&o));
        // From a host nobody knows, the same words are an access table's policy refusal.
        let [o] = evaluate(raw.as_bytes(), &[token], &rp, &Classifier::builtin())
            .try_into()
            .unwrap();
        assert_eq!(o.category, Some(Category::PolicyBlock));
        assert!(!suppresses(&o));
    }
}
