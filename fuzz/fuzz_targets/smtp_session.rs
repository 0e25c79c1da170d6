//! The server session state machine driven by arbitrary client bytes, as the relay's connection loop drives
//! it: input arrives in pieces of the fuzzer's choosing, the unconsumed rest of a read is presented again
//! with the next piece, and each action gets an outcome the fuzzer picks (TLS started, credentials good or
//! bad or refused, the message stored or not).
//!
//! Checked: the session never panics, never loops without consuming, every byte it writes is a well-formed
//! reply line ([`herald_fuzz::assert_reply_lines`]), and every message it hands over has recipients (each
//! with its DSN parameters), fits the size limit and has only CRLF line endings.
//!
//! Input: a 16-byte header, then what the client sends (so a seed is a header and a transcript):
//! - 0: flags: 1 STARTTLS offered, 2 AUTH required, 4 implicit TLS, 8 the relay stops (else a timeout)
//!   when the input runs out, 16 the relay's memory budget for bodies is spent (every body with content
//!   gets 452 4.3.1);
//! - 1-2: the message size limit, `u16` LE modulo 1000; 3: recipients per message, modulo 5;
//!   4: bad commands before 421, 1 + modulo 20; 5: line length limit, 8 + the byte;
//! - 6-7: action outcomes, `u16` LE, two bits per action in turn (authentication: 0 good, 1 bad,
//!   2-3 refused for now; a message: even stored, odd not);
//! - 8-15: the sizes of the reads the client bytes arrive in, 1 + the byte, in turn.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use herald_fuzz::{ScriptedPolicy, assert_reply_lines};
use herald_smtp::budget::Budget;
use herald_smtp::{Action, Limits, Refusal, RejectReason, Reply, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((header, client)) = data.split_first_chunk::<16>() else {
        return;
    };
    run(header, client);
});

fn run(h: &[u8; 16], client: &[u8]) {
    let flags = h[0];
    let budget = Budget::new(if flags & 16 != 0 { 0 } else { 1 << 20 });
    let config = Arc::new(SessionConfig {
        hostname: "mx.fuzz.test".into(),
        starttls: flags & 1 != 0,
        auth_required: flags & 2 != 0,
        limits: Limits {
            max_message_size: usize::from(u16::from_le_bytes([h[1], h[2]]) % 1000),
            max_recipients: usize::from(h[3] % 5),
            max_errors: 1 + u32::from(h[4] % 20),
            max_line_length: 8 + usize::from(h[5]),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
        },
        budget: Some(budget.clone()),
    });
    let outcomes = u16::from_le_bytes([h[6], h[7]]);
    let mut next_outcome = (0..).map(|i: u32| (outcomes >> ((2 * i) % 16)) & 3);
    let mut reads = h[8..16].iter().cycle().map(|&b| 1 + usize::from(b));
    let implicit_tls = (flags & 4 != 0).then(|| "TLSv1.3".to_owned());
    let peer = "192.0.2.1:4000".parse().expect("a literal socket address");
    let mut session = Session::new(config.clone(), ScriptedPolicy, peer, implicit_tls);
    check_output(&mut session);
    // What the connection loop holds: bytes read and not yet consumed.
    let mut pending: Vec<u8> = Vec::new();
    let mut unread = client;
    // Bounded: a round either reads, answers an action (at most one per command line), or ends the session.
    for _ in 0..4 * client.len() + 16 {
        let (used, action) = session.process(&pending);
        assert!(used <= pending.len(), "consumed more than it was given");
        pending.drain(..used);
        check_output(&mut session);
        match action {
            Action::NeedInput => {
                if unread.is_empty() {
                    // The client went quiet: the session times out, or the relay stops while it is idle.
                    if flags & 8 != 0 && session.is_idle() {
                        session.shutting_down();
                    } else {
                        session.timed_out();
                    }
                    let (_, action) = session.process(&pending);
                    assert!(matches!(action, Action::Close), "no close after a timeout");
                    check_output(&mut session);
                    return;
                }
                let (read, rest) = unread.split_at(reads.next().unwrap_or(1).min(unread.len()));
                pending.extend_from_slice(read);
                unread = rest;
            }
            Action::Close => return,
            Action::StartTls => {
                // RFC 3207 section 4.2: what the client sent before the handshake is discarded.
                pending.clear();
                session.tls_started("TLSv1.3".into());
            }
            Action::Authenticate { username, .. } => match next_outcome.next().unwrap_or(0) {
                0 => session.auth_result(Some(username)),
                1 => session.auth_result(None),
                _ => session.auth_refused(Refusal::new(
                    Reply::new(454, "4.7.0", "Try again later"),
                    RejectReason::Authentication,
                )),
            },
            Action::Accept(envelope) => {
                assert!(
                    !envelope.recipients.is_empty(),
                    "a message with no recipient"
                );
                assert_eq!(
                    envelope.rcpt_dsn.len(),
                    envelope.recipients.len(),
                    "DSN parameters not one per recipient"
                );
                assert!(
                    envelope.body.len() <= config.limits.max_message_size,
                    "over the size limit"
                );
                assert_crlf_only(&envelope.body);
                let result = if next_outcome.next().unwrap_or(0) & 1 == 0 {
                    Ok(Reply::new(250, "2.0.0", "Ok: queued"))
                } else {
                    Err(Refusal::new(
                        Reply::new(451, "4.3.0", "Spool error"),
                        RejectReason::SpoolError,
                    ))
                };
                session.message_result(result);
            }
        }
        check_output(&mut session);
    }
    panic!("the session neither consumed its input nor closed");
}

fn check_output(session: &mut Session<ScriptedPolicy>) {
    let out = session.output();
    assert_reply_lines(out);
    out.clear();
}

fn assert_crlf_only(body: &[u8]) {
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR in an accepted body"),
            b'\n' => assert!(i > 0 && body[i - 1] == b'\r', "bare LF in an accepted body"),
            _ => {}
        }
    }
}
