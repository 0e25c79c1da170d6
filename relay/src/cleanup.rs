//! Completing an accepted message before it is spooled (Postfix's "cleanup" stage).
//!
//! Every message gets a `Received:` header. Wherever the session checks sender domains (an authenticated
//! user, a trusted listener without `trusted_senders: any`; see [`SessionPolicy`]), every From: address must
//! be in a domain the client may send as, the same rule as for MAIL FROM: DKIM signs for the From: domain,
//! so that is the one that must not be forged. Messages from submission listeners are also completed the
//! way RFC 6409 section 8 lets a submission server do: a missing `Message-ID:` or `Date:` is added. The
//! headers are produced as a separate prefix so that the body is never copied to prepend them. On every
//! listener a message with more than one From: field is refused: checks and DKIM would each pick one, and
//! a reader's client may show the other.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use mail_parser::MessageParser;

use crate::policy::SessionPolicy;
use crate::spool::QueueId;
use herald_smtp::{Envelope, Refusal, RejectReason, Reply};

/// Builds the header lines to put in front of the message, or the refusal (reply and rejection reason).
/// `header` is the message's header section (the envelope's body may hold only the message's last bytes).
pub fn prefix_headers(
    env: &Envelope,
    header: &[u8],
    id: QueueId,
    hostname: &str,
    policy: &SessionPolicy,
    now: DateTime<Utc>,
) -> Result<String, Refusal> {
    let froms = from_fields(header);
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
    let user = env.auth_user.as_deref();
    let check_from = policy.checks_senders(user);
    if env.submission || check_from {
        let malformed = |text| {
            Refusal::new(
                Reply::new(554, "5.6.0", text),
                RejectReason::MalformedMessage,
            )
        };
        let Some(parsed) = MessageParser::default().parse_headers(header) else {
            return Err(malformed("Message has no header section"));
        };
        // Without a From: there is nothing to check (nor to sign for): refused where it would be checked.
        let Some(from) = parsed.from() else {
            return Err(malformed("Message has no From: header"));
        };
        if check_from {
            for addr in from.iter() {
                let address = addr.address().unwrap_or("(empty)");
                let refused = match address.rsplit_once('@') {
                    Some((_, domain)) => policy
                        .sender_refusal(domain, user)
                        .map(|why| format!("From: address {address}: domain {domain} is {why}")),
                    None => Some(format!("From: address {address} has no domain")),
                };
                if let Some(text) = refused {
                    return Err(Refusal::new(
                        Reply::with_text(550, "5.7.1", text),
                        RejectReason::SenderNotAllowed,
                    ));
                }
            }
        }
        if env.submission {
            if parsed.message_id().is_none() {
                let _ = write!(h, "Message-ID: <{id}@{hostname}>\r\n");
            }
            if parsed.date().is_none() {
                let _ = write!(h, "Date: {date}\r\n");
            }
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
    use std::sync::Arc;

    use super::*;
    use crate::outcome::suppression::Suppressions;
    use crate::policy::{Policy, Senders};
    use herald_config::Config;
    use herald_smtp::ReversePath;

    /// The tests' envelopes hold whole messages: the header section is read from the body.
    fn prefix_headers(
        env: &Envelope,
        id: QueueId,
        hostname: &str,
        policy: &SessionPolicy,
        now: DateTime<Utc>,
    ) -> Result<String, Refusal> {
        super::prefix_headers(env, &env.body, id, hostname, policy, now)
    }

    fn env(body: &str, submission: bool) -> Envelope {
        Envelope {
            sender: ReversePath::Null,
            recipients: vec![],
            dsn: Default::default(),
            rcpt_dsn: vec![],
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
            body_number: 1,
        }
    }

    /// The policy of a session whose client relays as `relaying` (`None`: an inbound client), with user
    /// `app` allowed ok.test and sending domains ok.test and also.test.
    fn session(relaying: Option<Senders>) -> SessionPolicy {
        let hash = herald_config::password::hash("x").unwrap();
        let policy = Policy::from_config(
            &Config::parse(&format!(
                "hostname: h.test\nspool_dir: s\nlisteners: [{{name: a, address: \"127.0.0.1:1\"}}]\nusers: [{{username: app, password_hash: \"{hash}\", allowed_domains: [ok.test]}}]\ndomains: [{{name: ok.test}}, {{name: also.test}}]\n"
            ))
            .unwrap(),
        );
        // The list's file lives on in the open handle after the directory is cleaned up.
        let suppressions = Suppressions::open(
            tempfile::tempdir().unwrap().path(),
            herald_config::Suppression::default(),
        )
        .unwrap();
        SessionPolicy::new(
            Arc::new(policy),
            Arc::new(suppressions),
            relaying.map(Arc::new),
        )
    }

    /// A submission session's policy (the user's domains decide; the listener relays as anyone).
    fn policy() -> SessionPolicy {
        session(Some(Senders::Any))
    }

    /// A relaying envelope without AUTH, as a trusted listener makes it.
    fn trusted_env(body: &str) -> Envelope {
        Envelope {
            auth_user: None,
            protocol: "ESMTP".into(),
            ..env(body, false)
        }
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
            &trusted_env("Subject: none\r\n\r\nb\r\n"),
            QueueId(1),
            "h.test",
            &p,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(h.matches("\r\n").count(), 4);
    }

    fn refusal(body: &str, p: &SessionPolicy) -> Option<String> {
        prefix_headers(&trusted_env(body), QueueId(1), "h.test", p, Utc::now())
            .err()
            .map(|e| {
                assert_eq!(e.reason, RejectReason::SenderNotAllowed, "{}", e.reply);
                e.reply.to_string()
            })
    }

    #[test]
    fn a_trusted_listener_checks_the_from_domain_against_its_senders() {
        let p = session(Some(Senders::SendingDomains(vec![
            "ok.test".into(),
            "also.test".into(),
        ])));
        assert_eq!(refusal("From: App <a@OK.test>\r\n\r\nb\r\n", &p), None);
        assert_eq!(
            refusal("From: a@ok.test, b@also.test\r\n\r\nb\r\n", &p),
            None
        );
        assert_eq!(
            refusal("From: Boss <boss@evil.test>\r\n\r\nb\r\n", &p).as_deref(),
            Some(
                "550 5.7.1 From: address boss@evil.test: domain evil.test is not one of this relay's sending domains"
            )
        );
        // One author outside the set is enough; so is an allowed domain only in the display name.
        assert!(refusal("From: a@ok.test, b@evil.test\r\n\r\nb\r\n", &p).is_some());
        assert!(refusal("From: \"a@ok.test\" <b@evil.test>\r\n\r\nb\r\n", &p).is_some());
        let p = session(Some(Senders::Listed(vec!["also.test".into()])));
        assert_eq!(
            refusal("From: a@ok.test\r\n\r\nb\r\n", &p).as_deref(),
            Some(
                "550 5.7.1 From: address a@ok.test: domain ok.test is not in this listener's trusted_senders"
            )
        );
        // Nothing to check without a From:, where it would be checked.
        let e = prefix_headers(
            &trusted_env("Subject: s\r\n\r\nb\r\n"),
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
    fn any_sender_and_inbound_clients_get_no_from_check() {
        for p in [session(Some(Senders::Any)), session(None)] {
            for body in [
                "From: boss@evil.test\r\n\r\nb\r\n",
                "Subject: no from\r\n\r\nb\r\n",
            ] {
                let h = prefix_headers(&trusted_env(body), QueueId(1), "h.test", &p, Utc::now())
                    .unwrap();
                assert_eq!(h.matches("\r\n").count(), 4, "{h}");
            }
        }
    }
}
