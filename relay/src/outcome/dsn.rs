//! Delivery status notifications (RFC 3464) for recipients that bounced or expired.
//!
//! One DSN per message per attempt lists every recipient that failed in it. It is an ordinary message sent
//! from the null sender, so it can never bounce in turn, and it goes through the queue like any other.

use std::fmt::Write;

use chrono::{DateTime, Utc};

/// One failed recipient, as the DSN reports it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub recipient: String,
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
    pub failures: &'a [Failure],
    /// The original message; only its header section is returned.
    pub original: &'a [u8],
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
    let mut m = String::with_capacity(2048);
    // Writing into a String cannot fail.
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{to}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
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
         Your message could not be delivered to one or more recipients.\r\n\
         \r\n",
        host = report.hostname,
        to = report.original_sender,
    );
    for f in report.failures {
        let _ = write!(m, "<{}>: {}\r\n", f.recipient, one_line(&f.diagnostic));
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {host}\r\n\
         X-Herald-Queue-ID: {id}\r\n\
         Arrival-Date: {arrival}\r\n",
        host = report.hostname,
        id = report.queue_id,
        arrival = report.arrival.to_rfc2822(),
    );
    for f in report.failures {
        let _ = write!(
            m,
            "\r\nFinal-Recipient: rfc822; {rcpt}\r\n\
             Action: failed\r\n\
             Status: {status}\r\n",
            rcpt = f.recipient,
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
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n"
    );
    let mut out = m.into_bytes();
    out.extend_from_slice(header_section(report.original));
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
        let failures = [Failure {
            recipient: "gone@dest.test".into(),
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
            failures: &failures,
            original: b"From: app@example.test\r\nSubject: hi\r\n\r\nsecret body\r\n",
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
    }
}
