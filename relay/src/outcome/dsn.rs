//! Delivery status notifications (RFC 3464) for recipients that bounced or expired, and for recipients
//! whose sender asked to hear of their delivery (RFC 3461 NOTIFY=SUCCESS) when the next hop will not say.
//!
//! One DSN per message per attempt lists every recipient it reports on. It is an ordinary message sent
//! from the null sender, so it can never bounce in turn, and it goes through the queue like any other.
//! The sender's DSN parameters shape it: ENVID comes back as `Original-Envelope-Id:`, each ORCPT as that
//! recipient's `Original-Recipient:`, and RET=FULL returns the whole message with a failure (RET=HDRS, or no
//! RET, only its header section; a success never returns more than the headers).

use std::fmt::Write;

use chrono::{DateTime, Utc};
use herald_smtp::dsn::{Orcpt, Ret};

/// What happened to a recipient (RFC 3464 section 2.3.3, `Action:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Bounced or expired.
    Failed,
    /// Handed to a next hop that does not support DSN, so it will not report the delivery.
    Relayed,
    /// Deferred for longer than `delivery.delay_warning`; tried until `until_ms` (Unix milliseconds).
    Delayed { until_ms: u64 },
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Relayed => "relayed",
            Action::Delayed { .. } => "delayed",
        }
    }
}

/// One recipient, as the DSN reports it.
#[derive(Debug, Clone)]
pub struct Notice {
    pub recipient: String,
    pub action: Action,
    /// The sender's ORCPT for the recipient.
    pub original_recipient: Option<Orcpt>,
    /// Enhanced status code, e.g. `5.1.1`.
    pub status: String,
    /// The remote reply, or a description of the local failure.
    pub diagnostic: String,
    /// The MX host that answered, when there was one.
    pub remote_mta: Option<String>,
    /// True for a reply from a remote server (`smtp;` diagnostic), false for a local verdict.
    pub remote: bool,
}

/// What the DSN is about.
#[derive(Debug)]
pub struct Report<'a> {
    pub hostname: &'a str,
    pub queue_id: &'a str,
    pub original_sender: &'a str,
    pub arrival: DateTime<Utc>,
    pub notices: &'a [Notice],
    /// The sender's ENVID.
    pub envid: Option<&'a str>,
    /// The original message: its header section, or the whole message when [`Report::returns_full`].
    pub original: &'a [u8],
    /// The sender's RET.
    pub ret: Option<Ret>,
}

impl Report<'_> {
    /// Whether the whole message goes back (RFC 3461 section 4.3: RET=FULL, and only with a failure);
    /// otherwise only its header section.
    pub fn returns_full(ret: Option<Ret>, notices: &[Notice]) -> bool {
        ret == Some(Ret::Full) && notices.iter().any(|n| n.action == Action::Failed)
    }
}

/// The header section of a message (up to and including the blank line), or all of it if it has no body.
fn header_section(message: &[u8]) -> &[u8] {
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(i) => &message[..i + 2],
        None => message,
    }
}

/// Builds the complete DSN message, CRLF line endings.
pub fn build(report: &Report<'_>, now: DateTime<Utc>, message_id: &str) -> Vec<u8> {
    let boundary = format!("{}/{}", report.queue_id, report.hostname);
    let date = now.to_rfc2822();
    let failed = report.notices.iter().any(|n| n.action == Action::Failed);
    let delayed = report
        .notices
        .iter()
        .any(|n| matches!(n.action, Action::Delayed { .. }));
    let (subject, summary) = if failed {
        (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients.",
        )
    } else if delayed {
        (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered to one or more recipients yet; delivery is still being tried.",
        )
    } else {
        (
            "Successful Mail Delivery Report",
            "Your message was handed on to a mail system that will not report its delivery.",
        )
    };
    let mut m = String::with_capacity(2048);
    // Writing into a String cannot fail.
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{message_id}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at host {host}.\r\n\
         \r\n\
         {summary}\r\n\
         \r\n",
        host = report.hostname,
        to = report.original_sender,
    );
    for f in report.notices {
        let _ = write!(
            m,
            "<{}>: {}: {}\r\n",
            f.recipient,
            f.action.as_str(),
            one_line(&f.diagnostic)
        );
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n"
    );
    if let Some(id) = report.envid {
        let _ = write!(m, "Original-Envelope-Id: {}\r\n", one_line(id));
    }
    let _ = write!(
        m,
        "Reporting-MTA: dns; {host}\r\n\
         X-Herald-Queue-ID: {id}\r\n\
         Arrival-Date: {arrival}\r\n",
        host = report.hostname,
        id = report.queue_id,
        arrival = report.arrival.to_rfc2822(),
    );
    for f in report.notices {
        m.push_str("\r\n");
        if let Some(o) = &f.original_recipient {
            let _ = write!(
                m,
                "Original-Recipient: {}; {}\r\n",
                one_line(&o.addr_type),
                one_line(&o.address)
            );
        }
        let _ = write!(
            m,
            "Final-Recipient: rfc822; {rcpt}\r\n\
             Action: {action}\r\n\
             Status: {status}\r\n",
            rcpt = f.recipient,
            action = f.action.as_str(),
            status = f.status,
        );
        if let Some(mta) = &f.remote_mta {
            let _ = write!(m, "Remote-MTA: dns; {mta}\r\n");
        }
        let kind = if f.remote { "smtp" } else { "x-herald" };
        let _ = write!(
            m,
            "Diagnostic-Code: {kind}; {}\r\nLast-Attempt-Date: {date}\r\n",
            one_line(&f.diagnostic)
        );
        if let Action::Delayed { until_ms } = f.action
            && let Some(until) = DateTime::from_timestamp_millis(until_ms as i64)
        {
            let _ = write!(m, "Will-Retry-Until: {}\r\n", until.to_rfc2822());
        }
    }
    let full = Report::returns_full(report.ret, report.notices);
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: {}\r\n\
         \r\n",
        if full {
            "message/rfc822"
        } else {
            "text/rfc822-headers"
        }
    );
    let mut out = m.into_bytes();
    if full {
        out.extend_from_slice(report.original);
        if !report.original.ends_with(b"\r\n") && !report.original.is_empty() {
            out.extend_from_slice(b"\r\n");
        }
    } else {
        out.extend_from_slice(header_section(report.original));
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Keeps a remote reply on one header line, whatever it contained.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_has_the_rfc3464_parts() {
        let failures = [Notice {
            recipient: "gone@dest.test".into(),
            action: Action::Failed,
            original_recipient: None,
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 No such user\r\n".into(),
            remote_mta: Some("mx.dest.test".into()),
            remote: true,
        }];
        let report = Report {
            hostname: "relay.test",
            queue_id: "00000000000000AB",
            original_sender: "app@example.test",
            arrival: Utc::now(),
            notices: &failures,
            envid: None,
            original: b"From: app@example.test\r\nSubject: hi\r\n\r\nsecret body\r\n",
            ret: None,
        };
        let dsn = String::from_utf8(build(&report, Utc::now(), "x@relay.test")).unwrap();
        assert!(dsn.contains("report-type=delivery-status"));
        assert!(dsn.contains(
            "Final-Recipient: rfc822; gone@dest.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(dsn.contains("Remote-MTA: dns; mx.dest.test\r\n"));
        assert!(dsn.contains("Diagnostic-Code: smtp; 550 5.1.1 No such user  \r\n"));
        assert!(dsn.contains("Subject: hi\r\n"));
        assert!(!dsn.contains("secret body"));
        assert!(!dsn.contains("\n\n"));
        assert!(dsn.lines().all(|l| !l.contains('\r')));
        assert!(!dsn.contains("Original-"));
        assert!(dsn.contains("Content-Type: text/rfc822-headers\r\n"));
    }

    fn notice(action: Action) -> Notice {
        Notice {
            recipient: "x@dest.test".into(),
            action,
            original_recipient: Some(Orcpt::parse("rfc822;X+2Bo@dest.test").unwrap()),
            status: if action == Action::Failed {
                "5.1.1"
            } else {
                "2.0.0"
            }
            .into(),
            diagnostic: "250 2.0.0 Ok".into(),
            remote_mta: Some("mx.dest.test".into()),
            remote: true,
        }
    }

    fn report(notices: &[Notice], ret: Option<Ret>) -> String {
        let report = Report {
            hostname: "relay.test",
            queue_id: "00000000000000AB",
            original_sender: "app@example.test",
            arrival: Utc::now(),
            notices,
            envid: Some("batch 7"),
            original: b"Subject: hi\r\n\r\nthe body\r\n",
            ret,
        };
        String::from_utf8(build(&report, Utc::now(), "x@relay.test")).unwrap()
    }

    #[test]
    fn a_relayed_notice_carries_the_senders_envelope_id_and_original_recipient() {
        let dsn = report(&[notice(Action::Relayed)], Some(Ret::Full));
        assert!(dsn.contains("Subject: Successful Mail Delivery Report\r\n"));
        assert!(dsn.contains(
            "\r\n\r\nOriginal-Envelope-Id: batch 7\r\nReporting-MTA: dns; relay.test\r\n"
        ));
        assert!(dsn.contains(
            "\r\nOriginal-Recipient: rfc822; X+o@dest.test\r\nFinal-Recipient: rfc822; x@dest.test\r\nAction: relayed\r\nStatus: 2.0.0\r\n"
        ));
        // A success returns headers only, whatever RET says.
        assert!(dsn.contains("Content-Type: text/rfc822-headers\r\n"));
        assert!(!dsn.contains("the body"));
    }

    #[test]
    fn a_delay_notice_says_until_when_it_is_tried() {
        let n = Notice {
            action: Action::Delayed {
                until_ms: 1_700_000_000_000,
            },
            ..notice(Action::Failed)
        };
        let dsn = report(&[n], Some(Ret::Full));
        assert!(dsn.contains("Subject: Delayed Mail (still being retried)\r\n"));
        assert!(dsn.contains("Action: delayed\r\n"));
        assert!(dsn.contains("Will-Retry-Until: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
        assert!(dsn.contains("Content-Type: text/rfc822-headers\r\n"));
    }

    #[test]
    fn ret_full_returns_the_message_with_a_failure_and_hdrs_only_its_headers() {
        let full = report(&[notice(Action::Failed)], Some(Ret::Full));
        assert!(full.contains("Subject: Undelivered Mail Returned to Sender\r\n"));
        assert!(
            full.contains("Content-Type: message/rfc822\r\n\r\nSubject: hi\r\n\r\nthe body\r\n")
        );
        assert!(full.contains("Action: failed\r\n"));
        for ret in [Some(Ret::Headers), None] {
            let hdrs = report(&[notice(Action::Failed)], ret);
            assert!(
                hdrs.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\n\r\n--")
            );
            assert!(!hdrs.contains("the body"));
        }
    }
}
