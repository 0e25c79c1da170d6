//! Completing an accepted message before it is spooled (Postfix's "cleanup" stage).
//!
//! Every message gets a `Received:` header. Messages from submission listeners are also checked and
//! completed the way RFC 6409 section 8 lets a submission server do: the From: domain must be one the
//! authenticated user may send as, and a missing `Message-ID:` or `Date:` is added. The headers are
//! produced as a separate prefix so that the body is never copied to prepend them. On every listener a
//! message with more than one From: field is refused: checks and DKIM would each pick one, and a reader's
//! client may show the other.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use mail_parser::MessageParser;

use crate::policy::Policy;
use crate::spool::QueueId;
use herald_smtp::{Envelope, Refusal, RejectReason, Reply};

/// Builds the header lines to put in front of the message, or the refusal (reply and rejection reason).
pub fn prefix_headers(
    env: &Envelope,
    id: QueueId,
    hostname: &str,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<String, Refusal> {
    let froms = from_fields(&env.body);
    if froms > 1 {
        return Err(Refusal::new(
            Reply::with_text(
                550,
                "5.7.1",
                format!("Message has {froms} From: header fields; RFC 5322 allows one"),
            ),
            RejectReason::MalformedMessage,
        ));
    }
    let date = now.to_rfc2822();
    let mut h = String::with_capacity(256);
    // Writing into a String cannot fail.
    let _ = write!(
        h,
        "Received: from {helo} ([{ip}])\r\n\tby {hostname} (Herald) with {proto} id {id}",
        helo = env.helo,
        ip = env.peer.ip(),
        proto = env.protocol,
    );
    if let Some(tls) = &env.tls {
        let _ = write!(h, "\r\n\t(using {tls})");
    }
    let _ = write!(h, ";\r\n\t{date}\r\n");
    if env.submission {
        let malformed = |text| {
            Refusal::new(
                Reply::new(554, "5.6.0", text),
                RejectReason::MalformedMessage,
            )
        };
        let Some(parsed) = MessageParser::default().parse_headers(&env.body) else {
            return Err(malformed("Message has no header section"));
        };
        let Some(from) = parsed.from() else {
            return Err(malformed("Message has no From: header"));
        };
        if let Some(user) = &env.auth_user {
            for addr in from.iter() {
                let domain = addr
                    .address()
                    .and_then(|a| a.rsplit_once('@'))
                    .map(|(_, d)| d);
                match domain {
                    Some(d) if policy.may_send_as(user, d) => {}
                    _ => {
                        let text = format!(
                            "From: address {} is not in a domain user {user} may send as",
                            addr.address().unwrap_or("(none)")
                        );
                        return Err(Refusal::new(
                            Reply::with_text(550, "5.7.1", text),
                            RejectReason::SenderNotAllowed,
                        ));
                    }
                }
            }
        }
        if parsed.message_id().is_none() {
            let _ = write!(h, "Message-ID: <{id}@{hostname}>\r\n");
        }
        if parsed.date().is_none() {
            let _ = write!(h, "Date: {date}\r\n");
        }
    }
    Ok(h)
}

/// How many From: fields the header section of `message` has (RFC 5322 section 3.6 allows one). A field
/// name starts a line; the obsolete syntax (section 4.5.3) allows blanks before the colon.
fn from_fields(message: &[u8]) -> usize {
    message
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty())
        .filter(|line| {
            line.get(..4)
                .is_some_and(|name| name.eq_ignore_ascii_case(b"from"))
                && line[4..]
                    .iter()
                    .find(|&&b| b != b' ' && b != b'\t')
                    .is_some_and(|&b| b == b':')
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_config::Config;
    use herald_smtp::ReversePath;

    fn env(body: &str, submission: bool) -> Envelope {
        Envelope {
            sender: ReversePath::Null,
            recipients: vec![],
            body: body.as_bytes().to_vec(),
            smtputf8: false,
            eight_bit: false,
            helo: "client.test".into(),
            peer: "127.0.0.1:1234".parse().unwrap(),
            auth_user: Some("app".into()),
            tls: Some("TLSv1.3".into()),
            protocol: "ESMTPSA".into(),
            submission,
            held: None,
        }
    }

    fn policy() -> Policy {
        let hash = herald_config::password::hash("x").unwrap();
        Policy::from_config(
            &Config::parse(&format!(
                "hostname: h.test\nspool_dir: s\nlisteners: [{{name: a, address: \"127.0.0.1:1\"}}]\nusers: [{{username: app, password_hash: \"{hash}\", allowed_domains: [ok.test]}}]\n"
            ))
            .unwrap(),
        )
    }

    #[test]
    fn submission_gets_message_id_and_date() {
        let p = policy();
        let h = prefix_headers(
            &env("From: a@ok.test\r\nSubject: x\r\n\r\nbody\r\n", true),
            QueueId(0xAB),
            "h.test",
            &p,
            Utc::now(),
        )
        .unwrap();
        assert!(h.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby h.test (Herald) with ESMTPSA id 00000000000000AB"), "{h}");
        assert!(
            h.contains("Message-ID: <00000000000000AB@h.test>\r\n"),
            "{h}"
        );
        assert!(h.contains("\r\nDate: "), "{h}");
    }

    #[test]
    fn existing_message_id_and_date_are_kept() {
        let p = policy();
        let body = "From: a@ok.test\r\nMessage-ID: <x@y>\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n\r\nb\r\n";
        let h = prefix_headers(&env(body, true), QueueId(1), "h.test", &p, Utc::now()).unwrap();
        assert!(!h.contains("Message-ID"));
        assert!(!h.contains("\r\nDate:"));
    }

    #[test]
    fn from_domain_must_be_allowed() {
        let p = policy();
        let e = prefix_headers(
            &env("From: Eve <eve@evil.test>\r\n\r\nb\r\n", true),
            QueueId(1),
            "h.test",
            &p,
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!((e.reply.code, e.reply.status), (550, "5.7.1"));
        assert_eq!(e.reason, RejectReason::SenderNotAllowed);
        let e = prefix_headers(
            &env("Subject: none\r\n\r\nb\r\n", true),
            QueueId(1),
            "h.test",
            &p,
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(
            (e.reply.code, e.reason),
            (554, RejectReason::MalformedMessage)
        );
    }

    #[test]
    fn from_fields_are_counted_in_the_header_section_only() {
        assert_eq!(
            from_fields(b"From: a@x\r\nSubject: s\r\n\r\nFrom: in the body\r\n"),
            1
        );
        assert_eq!(from_fields(b"FROM : a@x\r\nfrom:\tb@y\r\n\r\n"), 2);
        assert_eq!(from_fields(b"From-Address: a@x\r\nX-From: b\r\n\r\n"), 0);
        assert_eq!(from_fields(b"Subject: s\r\n\tFrom: folded\r\n\r\n"), 0);
    }

    #[test]
    fn a_second_from_field_is_refused_on_every_listener() {
        let p = policy();
        for submission in [true, false] {
            let body = "From: a@ok.test\r\nFrom: b@ok.test\r\n\r\nb\r\n";
            let e = prefix_headers(&env(body, submission), QueueId(1), "h.test", &p, Utc::now())
                .unwrap_err();
            assert_eq!((e.reply.code, e.reply.status), (550, "5.7.1"));
            assert!(
                e.reply.text.contains("2 From: header fields"),
                "{}",
                e.reply
            );
        }
    }

    #[test]
    fn relay_listeners_only_get_received() {
        let p = policy();
        let h = prefix_headers(
            &env("Subject: none\r\n\r\nb\r\n", false),
            QueueId(1),
            "h.test",
            &p,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(h.matches("\r\n").count(), 4);
    }
}
