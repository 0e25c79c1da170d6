//! The session's unit tests: every path driven byte by byte, against a policy double whose answers the
//! tests choose, so they prove what the session does with a verdict, not what the relay decides (the relay's
//! `policy` module tests that, and the end-to-end suites test both together).

use std::cell::RefCell;

use super::*;

/// A scripted [`EnvelopePolicy`]: users may send only from their listed domain, listed recipients get the
/// listed verdict, everything else is accepted. It records what it was asked.
#[derive(Debug, Default)]
struct Double {
    senders: Vec<(&'static str, &'static str)>,
    recipients: Vec<(&'static str, Verdict)>,
    asked: RefCell<Vec<String>>,
}

impl EnvelopePolicy for Double {
    fn mail_from(&self, from: &ReversePath, user: Option<&str>) -> Verdict {
        self.asked
            .borrow_mut()
            .push(format!("MAIL {from} {}", user.unwrap_or("-")));
        match (from.mailbox(), user) {
            (Some(m), Some(user))
                if !self
                    .senders
                    .iter()
                    .any(|&(u, d)| u == user && m.domain.eq_ignore_ascii_case(d)) =>
            {
                let text = format!("Sender domain {} is not allowed for user {user}", m.domain);
                Verdict::Refuse(Refusal::new(
                    Reply::with_text(550, "5.7.1", text),
                    RejectReason::SenderNotAllowed,
                ))
            }
            _ => Verdict::Accept,
        }
    }

    fn rcpt_to(&self, to: &Mailbox, user: Option<&str>) -> Verdict {
        self.asked
            .borrow_mut()
            .push(format!("RCPT {to} {}", user.unwrap_or("-")));
        let to = to.to_string();
        self.recipients
            .iter()
            .find(|(r, _)| r.eq_ignore_ascii_case(&to))
            .map_or(Verdict::Accept, |(_, v)| v.clone())
    }
}

fn config(starttls: bool, auth_required: bool) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        starttls,
        auth_required,
        limits: Limits {
            max_message_size: 100,
            max_recipients: 3,
            max_errors: 4,
            max_line_length: 2048,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
        },
        budget: None,
    })
}

fn session_with(policy: Double) -> Session<Double> {
    Session::new(
        config(false, false),
        policy,
        "127.0.0.1:5000".parse().unwrap(),
        None,
    )
}

fn session() -> Session<Double> {
    session_with(Double::default())
}

fn refuse(code: u16, status: &'static str, text: &'static str, reason: RejectReason) -> Refusal {
    Refusal::new(Reply::new(code, status, text), reason)
}

/// Feeds `input` and returns the reply codes written, and the last action.
fn feed<P: EnvelopePolicy>(s: &mut Session<P>, input: &str) -> (Vec<String>, Action) {
    let (used, action) = s.process(input.as_bytes());
    assert!(used <= input.len());
    let out = String::from_utf8(std::mem::take(s.output())).unwrap();
    let codes = out
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    (codes, action)
}

#[test]
fn refused_recipient_is_left_out_and_counted_under_the_policy_reason() {
    let mut s = session_with(Double {
        recipients: vec![(
            "gone@y.test",
            Verdict::Refuse(refuse(550, "5.1.1", "suppressed", RejectReason::Suppressed)),
        )],
        ..Double::default()
    });
    feed(&mut s, "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n");
    s.take_rejections();
    let input = b"RCPT TO:<Gone@Y.test>\r\nRCPT TO:<here@y.test>\r\n";
    assert_eq!(s.process(input).0, input.len());
    let out = String::from_utf8(std::mem::take(s.output())).unwrap();
    assert_eq!(out, "550 5.1.1 suppressed\r\n250 2.1.5 Recipient ok\r\n");
    assert_eq!(s.take_rejections(), [RejectReason::Suppressed]);
    let (_, action) = feed(&mut s, "DATA\r\nx\r\n.\r\n");
    let Action::Accept(env) = action else {
        panic!("no accept")
    };
    assert_eq!(env.recipients.len(), 1);
    assert_eq!(env.recipients[0].to_string(), "here@y.test");
}

#[test]
fn a_bare_postmaster_is_asked_about_as_the_servers_own() {
    let mut s = session();
    let (codes, _) = feed(
        &mut s,
        "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<abuse>\r\n",
    );
    assert_eq!(codes[2..], ["250 2.1.0", "250 2.1.5", "501 5.1.3"]);
    assert_eq!(
        s.policy.asked.borrow().last().map(String::as_str),
        Some("RCPT postmaster@mx.test -")
    );
}

#[test]
fn policy_refusals_as_errors_count_towards_the_error_limit() {
    let relay_denied =
        Verdict::RefuseAsError(refuse(554, "5.7.1", "denied", RejectReason::RelayDenied));
    let suppressed = Verdict::Refuse(refuse(550, "5.1.1", "suppressed", RejectReason::Suppressed));
    let mut s = session_with(Double {
        recipients: vec![("b@y.test", relay_denied), ("s@y.test", suppressed)],
        ..Double::default()
    });
    feed(&mut s, "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n");
    s.take_rejections();
    // Plain refusals do not close the session however many there are.
    let (codes, action) = feed(&mut s, &"RCPT TO:<s@y.test>\r\n".repeat(5));
    assert_eq!(codes, ["550 5.1.1"; 5]);
    assert!(matches!(action, Action::NeedInput));
    let (codes, action) = feed(&mut s, &"RCPT TO:<b@y.test>\r\n".repeat(5));
    assert_eq!(
        codes,
        [
            "554 5.7.1",
            "554 5.7.1",
            "554 5.7.1",
            "554 5.7.1",
            "421 4.7.0"
        ]
    );
    assert!(matches!(action, Action::Close));
    let mut reasons = vec![RejectReason::Suppressed; 5];
    reasons.extend([RejectReason::RelayDenied; 4]);
    reasons.push(RejectReason::TooManyErrors);
    assert_eq!(s.take_rejections(), reasons);
}

#[test]
fn policy_is_asked_only_about_well_formed_requests_in_sequence() {
    let mut s = session();
    feed(
        &mut s,
        "EHLO c.test\r\nRCPT TO:<early@y.test>\r\nMAIL FROM:<jö@x.test>\r\nMAIL FROM:<a@x.test> SIZE=101\r\n",
    );
    assert!(s.policy().asked.borrow().is_empty());
    let (codes, _) = feed(
        &mut s,
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<jö@y.test>\r\nRCPT TO:<1@y.test>\r\nRCPT TO:<2@y.test>\r\nRCPT TO:<3@y.test>\r\nRCPT TO:<4@y.test>\r\n",
    );
    assert_eq!(
        codes,
        [
            "250 2.1.0",
            "553 5.6.7",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "452 4.5.3"
        ]
    );
    assert_eq!(
        *s.policy().asked.borrow(),
        [
            "MAIL a@x.test -",
            "RCPT 1@y.test -",
            "RCPT 2@y.test -",
            "RCPT 3@y.test -"
        ]
    );
}

#[test]
fn refusal_of_a_message_by_the_driver_is_counted_under_its_reason() {
    let mut s = session();
    feed(
        &mut s,
        "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n",
    );
    let (_, action) = feed(&mut s, "x\r\n.\r\n");
    assert!(matches!(action, Action::Accept(_)));
    s.take_rejections();
    s.message_result(Err(refuse(
        452,
        "4.3.1",
        "no room",
        RejectReason::SpoolError,
    )));
    assert_eq!(feed(&mut s, "").0, ["452 4.3.1"]);
    assert_eq!(s.take_rejections(), [RejectReason::SpoolError]);
    assert!(s.is_idle());
}

#[test]
fn pipelined_transaction_is_answered_in_order() {
    let mut s = session();
    let (codes, action) = feed(
        &mut s,
        "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n",
    );
    assert_eq!(
        codes,
        [
            "220 mx.test",
            "250 HELP",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "354 End"
        ]
    );
    assert!(matches!(action, Action::NeedInput));
    let (_, action) = feed(&mut s, "Subject: x\r\n\r\nhi\r\n.\r\n");
    let Action::Accept(env) = action else {
        panic!("no accept")
    };
    assert_eq!(env.recipients.len(), 2);
    assert_eq!(env.body, b"Subject: x\r\n\r\nhi\r\n");
    assert_eq!(env.protocol, "ESMTP");
    s.message_result(Ok(Reply::new(250, "2.0.0", "Ok")));
    assert_eq!(feed(&mut s, "QUIT\r\n").0, ["250 2.0.0", "221 2.0.0"]);
}

#[test]
fn sequence_and_limit_errors() {
    let mut s = session();
    assert_eq!(
        feed(&mut s, "MAIL FROM:<a@x.test>\r\n").0,
        ["220 mx.test", "503 5.5.1"]
    );
    feed(&mut s, "HELO c.test\r\n");
    assert_eq!(feed(&mut s, "RCPT TO:<b@y.test>\r\n").0, ["503 5.5.1"]);
    assert_eq!(
        feed(&mut s, "MAIL FROM:<a@x.test> SIZE=1\r\n").0,
        ["555 5.5.4"]
    );
    let mut s = session();
    feed(&mut s, "EHLO c.test\r\n");
    assert_eq!(
        feed(&mut s, "MAIL FROM:<a@x.test> SIZE=101\r\n").0,
        ["552 5.3.4"]
    );
    feed(&mut s, "MAIL FROM:<a@x.test>\r\n");
    let (codes, _) = feed(
        &mut s,
        "RCPT TO:<1@y.test>\r\nRCPT TO:<2@y.test>\r\nRCPT TO:<3@y.test>\r\nRCPT TO:<4@y.test>\r\n",
    );
    assert_eq!(codes, ["250 2.1.5", "250 2.1.5", "250 2.1.5", "452 4.5.3"]);
}

#[test]
fn too_many_errors_closes() {
    let mut s = session();
    let (codes, action) = feed(&mut s, "BOGUS\r\nBOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n");
    assert_eq!(
        codes,
        [
            "220 mx.test",
            "500 5.5.2",
            "500 5.5.2",
            "500 5.5.2",
            "500 5.5.2",
            "421 4.7.0"
        ]
    );
    assert!(matches!(action, Action::Close));
}

#[test]
fn bare_lf_in_data_rejects_the_message_and_smuggled_commands_stay_data() {
    let mut s = session();
    feed(
        &mut s,
        "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n",
    );
    let (codes, action) = feed(
        &mut s,
        "x\r\n\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\n.\r\n",
    );
    assert_eq!(codes, ["554 5.6.0"]);
    assert!(matches!(action, Action::NeedInput));
    assert!(s.is_idle());
}

#[test]
fn bdat_chunks_make_one_message() {
    let mut s = session();
    feed(
        &mut s,
        "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n",
    );
    let (codes, _) = feed(&mut s, "BDAT 5\r\nab\r\nc");
    assert_eq!(codes, ["250 2.0.0"]);
    let (_, action) = feed(&mut s, "BDAT 3 LAST\r\nd\r\n");
    let Action::Accept(env) = action else {
        panic!("no accept")
    };
    assert_eq!(env.body, b"ab\r\ncd\r\n");
}

#[test]
fn bdat_without_transaction_is_read_and_refused() {
    let mut s = session();
    feed(&mut s, "EHLO c.test\r\n");
    let (codes, _) = feed(&mut s, "BDAT 12 LAST\r\nRSET\r\nRSET\r\nNOOP\r\n");
    assert_eq!(codes, ["503 5.5.1", "250 2.0.0"]);
}

#[test]
fn submission_requires_tls_then_auth() {
    let policy = Double {
        senders: vec![("app", "ok.test")],
        ..Double::default()
    };
    let mut s = Session::new(
        config(true, true),
        policy,
        "127.0.0.1:5000".parse().unwrap(),
        None,
    );
    let (codes, _) = feed(
        &mut s,
        "EHLO c.test\r\nAUTH PLAIN AGFwcABwdw==\r\nMAIL FROM:<a@ok.test>\r\n",
    );
    assert_eq!(
        codes,
        ["220 mx.test", "250 HELP", "538 5.7.11", "530 5.7.0"]
    );
    let (codes, action) = feed(&mut s, "STARTTLS\r\nEHLO sneaky\r\n");
    assert_eq!(codes, ["220 2.0.0"]);
    assert!(matches!(action, Action::StartTls));
    s.tls_started("TLSv1.3".into());
    let (_, action) = feed(&mut s, "EHLO c.test\r\nAUTH PLAIN AGFwcABwdw==\r\n");
    let Action::Authenticate { username, password } = action else {
        panic!("no auth")
    };
    assert_eq!((username.as_str(), password.as_str()), ("app", "pw"));
    s.auth_result(Some(username));
    let (codes, _) = feed(
        &mut s,
        "MAIL FROM:<a@evil.test>\r\nMAIL FROM:<a@ok.test>\r\n",
    );
    assert_eq!(codes, ["235 2.7.0", "550 5.7.1", "250 2.1.0"]);
    assert_eq!(
        s.take_rejections().last(),
        Some(&RejectReason::SenderNotAllowed)
    );
    assert_eq!(
        *s.policy().asked.borrow(),
        ["MAIL a@evil.test app", "MAIL a@ok.test app"]
    );
}

#[test]
fn auth_login_exchange() {
    let mut s = Session::new(
        config(false, true),
        Double::default(),
        "127.0.0.1:5000".parse().unwrap(),
        Some("TLSv1.3".into()),
    );
    let out = {
        s.process(b"EHLO c.test\r\n");
        String::from_utf8(std::mem::take(s.output())).unwrap()
    };
    assert!(out.contains("250-AUTH PLAIN LOGIN\r\n"), "{out}");
    let (codes, _) = feed(&mut s, "AUTH LOGIN\r\n");
    assert_eq!(codes, ["334 VXNlcm5hbWU6"]);
    let (codes, _) = feed(&mut s, "YXBw\r\n");
    assert_eq!(codes, ["334 UGFzc3dvcmQ6"]);
    let (_, action) = feed(&mut s, "d3Jvbmc=\r\n");
    assert!(matches!(action, Action::Authenticate { .. }));
    s.auth_result(None);
    assert_eq!(feed(&mut s, "").0, ["535 5.7.8"]);
}

#[test]
fn overlong_command_line_is_refused_and_skipped() {
    let mut s = session();
    feed(&mut s, "EHLO c.test\r\n");
    let long = "NOOP ".to_owned() + &"x".repeat(3000);
    let (codes, _) = feed(&mut s, &long);
    assert_eq!(codes, ["500 5.5.2"]);
    let (codes, _) = feed(&mut s, "yyy\r\nNOOP\r\n");
    assert_eq!(codes, ["250 2.0.0"]);
}

/// Feeds `input` and returns the full text written.
fn feed_text<P: EnvelopePolicy>(s: &mut Session<P>, input: &str) -> String {
    s.process(input.as_bytes());
    String::from_utf8(std::mem::take(s.output())).unwrap()
}

#[test]
fn ehlo_advertises_dsn_and_helo_takes_no_dsn_parameters() {
    let mut s = session();
    let text = feed_text(&mut s, "EHLO c.test\r\n");
    assert!(text.contains("250-DSN\r\n"), "{text}");
    let mut s = session();
    feed(&mut s, "HELO c.test\r\n");
    assert_eq!(
        feed(&mut s, "MAIL FROM:<a@x.test> RET=HDRS\r\n").0,
        ["555 5.5.4"]
    );
    feed(&mut s, "MAIL FROM:<a@x.test>\r\n");
    assert_eq!(
        feed(&mut s, "RCPT TO:<b@y.test> NOTIFY=NEVER\r\n").0,
        ["555 5.5.4"]
    );
    assert_eq!(feed(&mut s, "RCPT TO:<b@y.test>\r\n").0, ["250 2.1.5"]);
}

#[test]
fn dsn_parameters_reach_the_envelope_decoded() {
    let mut s = session();
    feed(&mut s, "EHLO c.test\r\n");
    let (codes, action) = feed(
        &mut s,
        "MAIL FROM:<a@x.test> ret=hdrs ENVID=QQ+2B314\r\n\
         RCPT TO:<b@y.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;B+2Bx@y.test\r\n\
         RCPT TO:<c@y.test>\r\n\
         RCPT TO:<d@y.test> notify=never\r\n\
         DATA\r\nhi\r\n.\r\n",
    );
    assert_eq!(
        codes,
        [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "354 End"
        ]
    );
    let Action::Accept(env) = action else {
        panic!("no accept")
    };
    assert_eq!(env.dsn.ret, Some(Ret::Headers));
    assert_eq!(env.dsn.envid.as_deref(), Some("QQ+314"));
    assert_eq!(env.rcpt_dsn.len(), env.recipients.len());
    let b = &env.rcpt_dsn[0];
    assert_eq!(
        b.notify.map(|n| n.to_string()).as_deref(),
        Some("SUCCESS,DELAY")
    );
    let orcpt = b.orcpt.as_ref().unwrap();
    assert_eq!(
        (orcpt.addr_type.as_str(), orcpt.address.as_str()),
        ("rfc822", "B+x@y.test")
    );
    assert_eq!(env.rcpt_dsn[1], RcptDsn::default());
    assert_eq!(env.rcpt_dsn[2].notify, Some(Notify::NEVER));
}

#[test]
fn a_bad_or_repeated_dsn_parameter_is_refused_naming_it() {
    let cases: &[(&str, &str, &str)] = &[
        ("MAIL FROM:<a@x.test> RET=BODY", "501 5.5.4", "RET"),
        ("MAIL FROM:<a@x.test> RET", "501 5.5.4", "RET"),
        (
            "MAIL FROM:<a@x.test> RET=FULL RET=HDRS",
            "501 5.5.4",
            "Duplicate parameter RET",
        ),
        ("MAIL FROM:<a@x.test> ENVID=a=b", "501 5.5.4", "ENVID"),
        ("MAIL FROM:<a@x.test> ENVID=+4", "501 5.5.4", "ENVID"),
        ("MAIL FROM:<a@x.test> ENVID=", "501 5.5.4", "ENVID"),
        (
            "MAIL FROM:<a@x.test> ENVID=1 ENVID=2",
            "501 5.5.4",
            "Duplicate parameter ENVID",
        ),
        (
            "MAIL FROM:<a@x.test> SIZE=1 size=2",
            "501 5.5.4",
            "Duplicate parameter SIZE",
        ),
        ("MAIL FROM:<a@x.test> NOTIFY=NEVER", "555 5.5.4", "NOTIFY"),
    ];
    for (line, code, names) in cases {
        let mut s = session();
        feed(&mut s, "EHLO c.test\r\n");
        let text = feed_text(&mut s, &format!("{line}\r\n"));
        assert!(
            text.starts_with(code) && text.contains(names),
            "{line}: {text}"
        );
        // The transaction did not start.
        assert_eq!(
            feed(&mut s, "RCPT TO:<b@y.test>\r\n").0,
            ["503 5.5.1"],
            "{line}"
        );
    }
    let rcpt_cases: &[(&str, &str, &str)] = &[
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4", "NOTIFY"),
        ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4", "NOTIFY"),
        ("NOTIFY=", "501 5.5.4", "NOTIFY"),
        ("NOTIFY", "501 5.5.4", "NOTIFY"),
        ("NOTIFY=sometimes", "501 5.5.4", "NOTIFY"),
        (
            "NOTIFY=NEVER NOTIFY=NEVER",
            "501 5.5.4",
            "Duplicate parameter NOTIFY",
        ),
        ("ORCPT=b@y.test", "501 5.5.4", "ORCPT"),
        ("ORCPT=rfc822;", "501 5.5.4", "ORCPT"),
        ("ORCPT=rfc822;a+zzb", "501 5.5.4", "ORCPT"),
        (
            "ORCPT=rfc822;a@b ORCPT=rfc822;a@b",
            "501 5.5.4",
            "Duplicate parameter ORCPT",
        ),
        ("RET=FULL", "555 5.5.4", "RET"),
    ];
    for (params, code, names) in rcpt_cases {
        let mut s = session();
        feed(&mut s, "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n");
        let text = feed_text(&mut s, &format!("RCPT TO:<b@y.test> {params}\r\n"));
        assert!(
            text.starts_with(code) && text.contains(names),
            "{params}: {text}"
        );
        // The recipient was not added.
        assert_eq!(feed(&mut s, "DATA\r\n").0, ["503 5.5.1"], "{params}");
    }
}

#[test]
fn a_driver_can_take_body_bytes_as_they_arrive_and_gets_the_rest_with_the_body_number() {
    let mut s = session();
    feed(
        &mut s,
        "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n",
    );
    let (n, body) = s.body_in_progress().expect("a body");
    assert!(body.buffered().is_empty());
    feed(&mut s, "one\r\n..two\r\n");
    let (same, body) = s.body_in_progress().expect("a body");
    assert_eq!(same, n);
    assert_eq!(body.buffered(), b"one\r\n.two\r\n");
    body.take_buffered();
    let (_, action) = feed(&mut s, "three\r\n.\r\n");
    let Action::Accept(env) = action else {
        panic!("no accept")
    };
    assert_eq!((env.body_number, &env.body[..]), (n, &b"three\r\n"[..]));
    assert!(s.body_in_progress().is_none(), "no body between messages");
    s.message_result(Ok(Reply::new(250, "2.0.0", "Ok")));

    // BDAT: the body lives across chunks, under a new number; a bare CR split from its LF by a take is
    // still seen.
    feed(&mut s, "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n");
    assert!(s.body_in_progress().is_none());
    feed(&mut s, "BDAT 3\r\nab\r");
    let (m, body) = s.body_in_progress().expect("a body");
    assert_ne!(m, n);
    assert_eq!(body.buffered(), b"ab\r");
    body.take_buffered();
    let (codes, _) = feed(&mut s, "BDAT 4 LAST\r\nxy\r\n");
    assert_eq!(codes, ["554 5.6.0"], "the CR before the take was bare");
    assert!(s.body_in_progress().is_none());
}
