//! Reading the reports that come back to return-path addresses: delivery status notifications (RFC 3464,
//! and RFC 6533's global form), feedback-loop complaints (ARF, RFC 5965), and the plain-text bounces some
//! MTAs still send. Parsing only; deciding what a report means for a recipient is the caller's.
//!
//! mail-parser takes the MIME structure apart. The machine-readable parts (`message/delivery-status`,
//! `message/feedback-report`) are blocks of header-style fields, which it parses as header blocks.
//!
//! Anyone can send mail to a return-path address, and a report is read before anything verifies it, so
//! the work a report can cause is bounded: only its first [`MAX_REPORT_BYTES`] are parsed (the
//! machine-readable part comes before the returned message), and at most [`MAX_PARTS`] parts,
//! [`MAX_RECIPIENTS`] recipient blocks and [`MAX_ADDRESSES`] addresses of each kind are looked at.
//! [`Report::limited`] says when a limit cut something off.

use mail_parser::{MessageParser, MimeHeaders};
use regex::Regex;
use std::sync::LazyLock;

/// The bytes of a report that are parsed.
pub const MAX_REPORT_BYTES: usize = 1 << 20;
/// MIME parts looked at.
pub const MAX_PARTS: usize = 32;
/// Per-recipient blocks kept.
pub const MAX_RECIPIENTS: usize = 100;
/// Addresses of each kind (original senders, original recipients) kept.
pub const MAX_ADDRESSES: usize = 100;

/// What kind of report a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `multipart/report; report-type=delivery-status`.
    Dsn,
    /// `multipart/report; report-type=feedback-report`.
    Arf,
    /// A bounce in prose with a status code in it (qmail, old Exim and Exchange, ...).
    Text,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dsn => "dsn",
            Kind::Arf => "arf",
            Kind::Text => "text",
        }
    }
}

/// RFC 3464 section 2.3.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

/// One recipient's part of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientStatus {
    /// Addresses that may name the recipient, most trustworthy first (Original-Recipient, then
    /// Final-Recipient).
    pub addresses: Vec<String>,
    pub action: Action,
    /// The enhanced status code, e.g. `5.1.1`.
    pub status: Option<String>,
    /// The remote server's reply code, when the diagnostic gives one.
    pub code: Option<u16>,
    /// The diagnostic text (the SMTP reply, without its `smtp;` type).
    pub diagnostic: String,
    /// The host that gave the diagnostic (`Remote-MTA: dns; mx.example.com`), when the report names one.
    pub remote_mta: Option<String>,
}

/// A parsed report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: Kind,
    /// Per-recipient statuses (DSN and text bounces).
    pub recipients: Vec<RecipientStatus>,
    /// ARF `Feedback-Type`, lower case.
    pub feedback_type: Option<String>,
    /// Envelope senders of the original message (ARF `Original-Mail-From`, `Return-Path:` of the returned
    /// message): where a return-path token is found when the report was not sent to one.
    pub original_senders: Vec<String>,
    /// Recipients the report names outside per-recipient blocks (ARF `Original-Rcpt-To`, the returned
    /// message's `To:`, `X-Failed-Recipients:`), candidates for a token that does not carry its recipient.
    pub original_recipients: Vec<String>,
    /// A limit cut part of the report off (see the module's documentation).
    pub limited: bool,
}

/// Parses `raw` as a report; None when it is not one (an auto-reply, a person writing back).
pub fn parse(raw: &[u8]) -> Option<Report> {
    let truncated = raw.len() > MAX_REPORT_BYTES;
    let message = MessageParser::default().parse(&raw[..raw.len().min(MAX_REPORT_BYTES)])?;
    let mut report = Report {
        kind: Kind::Text,
        recipients: Vec::new(),
        feedback_type: None,
        original_senders: Vec::new(),
        original_recipients: Vec::new(),
        limited: truncated || message.parts.len() > MAX_PARTS,
    };
    let mut machine_readable = false;
    for part in message.parts.iter().take(MAX_PARTS) {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let (ctype, subtype) = (
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or("").to_ascii_lowercase(),
        );
        match (ctype.as_str(), subtype.as_str()) {
            ("message", "delivery-status" | "global-delivery-status") => {
                machine_readable = true;
                report.kind = Kind::Dsn;
                report.recipients.extend(delivery_status(part.contents()));
            }
            ("message", "feedback-report") => {
                machine_readable = true;
                report.kind = Kind::Arf;
                feedback_report(part.contents(), &mut report);
            }
            ("message", "rfc822" | "global")
            | ("text", "rfc822-headers")
            | ("message", "global-headers") => {
                let headers = match part.message() {
                    Some(m) => header_fields(m.raw_message()),
                    None => header_fields(part.contents()),
                };
                for (name, value) in headers {
                    if name.eq_ignore_ascii_case("Return-Path") {
                        report.original_senders.extend(angle_address(&value));
                    } else if name.eq_ignore_ascii_case("To") || name.eq_ignore_ascii_case("Cc") {
                        report.original_recipients.extend(addresses_in(&value));
                    }
                }
            }
            _ => {}
        }
    }
    for (name, value) in message.headers_raw() {
        // Exim names the failed addresses in a header of the bounce itself.
        if name.eq_ignore_ascii_case("X-Failed-Recipients") {
            report
                .original_recipients
                .extend(addresses_in(&unfold(value)));
        }
    }
    report.limited |= report.recipients.len() > MAX_RECIPIENTS
        || report.original_senders.len() > MAX_ADDRESSES
        || report.original_recipients.len() > MAX_ADDRESSES;
    report.recipients.truncate(MAX_RECIPIENTS);
    report.original_senders.truncate(MAX_ADDRESSES);
    report.original_recipients.truncate(MAX_ADDRESSES);
    if machine_readable {
        return Some(report);
    }
    // No machine-readable part: a prose bounce counts only if it states an SMTP status.
    let text = message.body_text(0)?;
    let status = prose_status(&text)?;
    report.recipients.push(status);
    Some(report)
}

/// The per-recipient blocks of a `message/delivery-status` body.
fn delivery_status(body: &[u8]) -> Vec<RecipientStatus> {
    let mut out = Vec::new();
    // The first block is per-message fields; each later one is a recipient.
    // One block beyond the limit, so that the caller can tell the report was cut short.
    for block in blocks(body).into_iter().skip(1).take(MAX_RECIPIENTS + 1) {
        let fields = header_fields(block.as_bytes());
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let Some(action) = get("Action").and_then(|a| action(&a)) else {
            continue;
        };
        let addresses: Vec<String> = ["Original-Recipient", "Final-Recipient"]
            .iter()
            .filter_map(|f| get(f))
            .filter_map(|v| typed_address(&v))
            .collect();
        if addresses.is_empty() {
            continue;
        }
        let status = get("Status").and_then(|s| {
            let code = s.split_whitespace().next()?.to_owned();
            ENHANCED.is_match(&code).then_some(code)
        });
        let diagnostic = get("Diagnostic-Code")
            .map(|d| match d.split_once(';') {
                Some((_, text)) => text.trim().to_owned(),
                None => d,
            })
            .unwrap_or_default();
        let code = diagnostic
            .split_whitespace()
            .next()
            .and_then(|c| c.parse::<u16>().ok())
            .filter(|c| (200..600).contains(c));
        // Only a host name tells whose reply it was; other MTA-name types are of no use here.
        let remote_mta = get("Remote-MTA").and_then(|v| {
            let (kind, host) = v.split_once(';')?;
            let host = host.trim().trim_end_matches('.');
            (kind.trim().eq_ignore_ascii_case("dns") && !host.is_empty() && !host.contains(' '))
                .then(|| host.to_ascii_lowercase())
        });
        out.push(RecipientStatus {
            addresses,
            action,
            status,
            code,
            diagnostic,
            remote_mta,
        });
    }
    out
}

/// The fields of a `message/feedback-report` body.
fn feedback_report(body: &[u8], report: &mut Report) {
    for (name, value) in header_fields(body) {
        if name.eq_ignore_ascii_case("Feedback-Type") {
            report.feedback_type = Some(value.trim().to_ascii_lowercase());
        } else if name.eq_ignore_ascii_case("Original-Mail-From") {
            report.original_senders.extend(angle_address(&value));
        } else if name.eq_ignore_ascii_case("Original-Rcpt-To") {
            report.original_recipients.extend(angle_address(&value));
        }
    }
}

fn action(text: &str) -> Option<Action> {
    let word = text.split_whitespace().next()?.to_ascii_lowercase();
    Some(match word.as_str() {
        "failed" => Action::Failed,
        "delayed" => Action::Delayed,
        "delivered" => Action::Delivered,
        "relayed" => Action::Relayed,
        "expanded" => Action::Expanded,
        _ => return None,
    })
}

static ENHANCED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[245]\.\d{1,3}\.\d{1,3}$").expect("valid pattern"));
/// A reply code and enhanced code in prose: `550 5.1.1` or `550-5.1.1`, or qmail's `(#5.1.1)`. A bare
/// `5.3.24` is not enough: dates are written that way too ("back on 5.3.24").
static PROSE_STATUS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b([245]\d\d)[ -]([245]\.\d{1,3}\.\d{1,3})\b|\(#([245]\.\d{1,3}\.\d{1,3})\)")
        .expect("valid pattern")
});
static ADDRESS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
        .expect("valid pattern")
});

/// The first status a prose bounce states, as a recipient status without an address (the token names it).
fn prose_status(text: &str) -> Option<RecipientStatus> {
    let m = PROSE_STATUS
        .captures_iter(text)
        // A reply code and an enhanced code of different classes is not a status line.
        .find(|m| match (m.get(1), m.get(2)) {
            (Some(c), Some(e)) => c.as_str().as_bytes()[0] == e.as_str().as_bytes()[0],
            _ => true,
        })?;
    let status = m.get(2).or(m.get(3))?.as_str().to_owned();
    let code = m.get(1).and_then(|c| c.as_str().parse().ok());
    // The diagnostic is the line the status is on.
    let at = m.get(0)?.start();
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let action = if status.starts_with('4') {
        Action::Delayed
    } else {
        Action::Failed
    };
    Some(RecipientStatus {
        addresses: addresses_in(text).into_iter().take(1).collect(),
        action,
        status: Some(status),
        code,
        diagnostic: text[line_start..line_end].trim().to_owned(),
        remote_mta: None,
    })
}

/// Splits a fields body into blank-line separated blocks.
fn blocks(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.split('\n') {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        } else {
            current.push_str(line);
            current.push_str("\r\n");
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Header-style fields, unfolded, in order.
fn header_fields(block: &[u8]) -> Vec<(String, String)> {
    let mut owned = block.to_vec();
    owned.extend_from_slice(b"\r\n\r\n");
    let Some(m) = MessageParser::default().parse_headers(&owned) else {
        return Vec::new();
    };
    m.headers_raw()
        .map(|(n, v)| (n.to_owned(), unfold(v)))
        .collect()
}

fn unfold(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `rfc822; user@example.com` to the address.
fn typed_address(value: &str) -> Option<String> {
    let (kind, addr) = value.split_once(';')?;
    let addr = addr.trim().trim_start_matches('<').trim_end_matches('>');
    (kind.trim().eq_ignore_ascii_case("rfc822") || kind.trim().eq_ignore_ascii_case("utf-8"))
        .then(|| addr.to_owned())
        .filter(|a| a.contains('@'))
}

/// The address in `<...>` (or the bare value).
fn angle_address(value: &str) -> Option<String> {
    let v = value.trim();
    let inner = match (v.find('<'), v.rfind('>')) {
        (Some(a), Some(b)) if a < b => &v[a + 1..b],
        _ => v,
    };
    inner.contains('@').then(|| inner.trim().to_owned())
}

fn addresses_in(text: &str) -> Vec<String> {
    ADDRESS
        .find_iter(text)
        .map(|m| m.as_str().to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dsn_with(recipients: usize, padding: usize) -> Vec<u8> {
        let mut m = String::from(
            "From: MAILER-DAEMON@mx.test\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n\
             --b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.test\r\n\r\n",
        );
        for i in 0..recipients {
            m.push_str(&format!(
                "Final-Recipient: rfc822; r{i}@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
            ));
        }
        m.push_str("--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: original\r\n\r\n");
        m.push_str(&"y".repeat(padding));
        m.push_str("\r\n--b--\r\n");
        m.into_bytes()
    }

    #[test]
    fn a_report_is_read_up_to_its_limits() {
        let r = parse(&dsn_with(3, 0)).unwrap();
        assert_eq!((r.recipients.len(), r.limited), (3, false));
        let r = parse(&dsn_with(MAX_RECIPIENTS + 50, 0)).unwrap();
        assert_eq!((r.recipients.len(), r.limited), (MAX_RECIPIENTS, true));
        // The status part comes first; a huge returned message behind it is not read.
        let r = parse(&dsn_with(1, 2 * MAX_REPORT_BYTES)).unwrap();
        assert_eq!(
            (r.kind, r.recipients.len(), r.limited),
            (Kind::Dsn, 1, true)
        );
    }

    const DSN: &str = "From: MAILER-DAEMON@mx.example.net\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"B1\"\r\n\
\r\n\
--B1\r\n\
Content-Type: text/plain\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
--B1\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.net\r\n\
Arrival-Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\
\r\n\
Original-Recipient: rfc822;Jo@Example.NET\r\n\
Final-Recipient: rfc822; jo@example.net\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Remote-MTA: dns; MX1.Example.NET.\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <jo@example.net>: Recipient address\r\n\
\x20rejected: User unknown in local recipient table\r\n\
\r\n\
Final-Recipient: rfc822; ann@example.net\r\n\
Action: delayed\r\n\
Status: 4.2.2 (mailbox full)\r\n\
\r\n\
--B1\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
Return-Path: <b+0000000000000001-0123456789@bounces.example.test>\r\n\
From: news@example.test\r\n\
To: jo@example.net, ann@example.net\r\n\
Subject: hello\r\n\
\r\n\
--B1--\r\n";

    #[test]
    fn a_dsn_gives_each_recipient_its_action_status_and_diagnostic() {
        let r = parse(DSN.as_bytes()).unwrap();
        assert_eq!(r.kind, Kind::Dsn);
        assert_eq!(r.recipients.len(), 2);
        let jo = &r.recipients[0];
        assert_eq!(jo.addresses, ["Jo@Example.NET", "jo@example.net"]);
        assert_eq!(jo.action, Action::Failed);
        assert_eq!(jo.status.as_deref(), Some("5.1.1"));
        assert_eq!(jo.code, Some(550));
        assert_eq!(jo.remote_mta.as_deref(), Some("mx1.example.net"));
        assert_eq!(r.recipients[1].remote_mta, None);
        assert_eq!(
            jo.diagnostic,
            "550 5.1.1 <jo@example.net>: Recipient address rejected: User unknown in local recipient table"
        );
        let ann = &r.recipients[1];
        assert_eq!(ann.action, Action::Delayed);
        assert_eq!(ann.status.as_deref(), Some("4.2.2"));
        assert_eq!(ann.code, None);
        assert_eq!(
            r.original_senders,
            ["b+0000000000000001-0123456789@bounces.example.test"]
        );
        assert_eq!(r.original_recipients, ["jo@example.net", "ann@example.net"]);
    }

    #[test]
    fn an_arf_report_gives_its_type_and_the_original_envelope() {
        let arf = "From: staff@feedback.example.org\r\n\
Subject: FW: Earn money\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"A\"\r\n\
\r\n\
--A\r\n\
Content-Type: text/plain\r\n\
\r\n\
This is an email abuse report.\r\n\
--A\r\n\
Content-Type: message/feedback-report\r\n\
\r\n\
Feedback-Type: Abuse\r\n\
User-Agent: SomeGenerator/1.0\r\n\
Version: 1\r\n\
Original-Mail-From: <b+00000000000000AB-0123456789@bounces.example.test>\r\n\
Original-Rcpt-To: <user@example.org>\r\n\
\r\n\
--A\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
From: <news@example.test>\r\n\
To: <user@example.org>\r\n\
Subject: Earn money\r\n\
\r\n\
Spam spam spam\r\n\
--A--\r\n";
        let r = parse(arf.as_bytes()).unwrap();
        assert_eq!(r.kind, Kind::Arf);
        assert_eq!(r.feedback_type.as_deref(), Some("abuse"));
        assert_eq!(
            r.original_senders,
            ["b+00000000000000AB-0123456789@bounces.example.test"]
        );
        assert_eq!(
            r.original_recipients,
            ["user@example.org", "user@example.org"]
        );
        assert!(r.recipients.is_empty());
    }

    #[test]
    fn a_qmail_prose_bounce_is_read_for_its_status() {
        let q = "From: MAILER-DAEMON@mail.example.org\r\n\
Subject: failure notice\r\n\
\r\n\
Hi. This is the qmail-send program at mail.example.org.\r\n\
I'm afraid I wasn't able to deliver your message to the following addresses.\r\n\
This is a permanent error; I've given up. Sorry it didn't work out.\r\n\
\r\n\
<nobody@example.org>:\r\n\
Sorry, no mailbox here by that name. (#5.1.1)\r\n";
        let r = parse(q.as_bytes()).unwrap();
        assert_eq!(r.kind, Kind::Text);
        let s = &r.recipients[0];
        assert_eq!(s.action, Action::Failed);
        assert_eq!(s.status.as_deref(), Some("5.1.1"));
        assert_eq!(s.addresses, ["nobody@example.org"]);
        assert_eq!(
            s.diagnostic,
            "Sorry, no mailbox here by that name. (#5.1.1)"
        );
    }

    #[test]
    fn an_auto_reply_is_not_a_report() {
        let ooo =
            "From: jo@example.net\r\nSubject: Out of office\r\n\r\nI am away until Monday.\r\n";
        assert_eq!(parse(ooo.as_bytes()), None);
        let dated = "From: jo@example.net\r\nSubject: Abwesend\r\n\r\nIch bin bis 5.3.24 nicht im Haus.\r\n";
        assert_eq!(parse(dated.as_bytes()), None);
    }

    /// Found by the `report` fuzz target (fuzz/): MIME nesting that breaks an internal invariant of
    /// mail-parser, which checks it with `debug_assert!` and recovers when the check is off, as in a release
    /// build. The root Cargo.toml builds mail-parser without debug assertions in debug builds too, so the
    /// tests and the end-to-end suites read such a report as production does instead of panicking (a debug
    /// build of the relay refused it with 451, so the sender would have retried it for days).
    #[test]
    fn mime_nesting_that_trips_a_mail_parser_debug_assertion_is_read_as_in_production() {
        let raw = b"Content-Type:multipart/\n\tboundary=b\n\n--bContent-Type:message/rfc822\n\n\
                    Content-Type:message/rfc822\n\n\n--b--\n";
        assert_eq!(parse(raw), None);
    }
}
