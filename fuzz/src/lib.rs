//! What the fuzz targets share: the check that the SMTP server's output is well-formed reply lines, a
//! scripted envelope policy for the session, and the return paths of the report and verp targets.
//!
//! The targets themselves are in `fuzz_targets/`, one file each; `fuzz/run` builds and runs them, and
//! `fuzz/README.md` says why the build is shaped as it is.

#![forbid(unsafe_code)]

use herald_smtp::{EnvelopePolicy, Mailbox, Refusal, RejectReason, Reply, ReversePath, Verdict};

/// Checks that `out` is a run of complete SMTP reply lines (RFC 5321 section 4.2): each `DDD[ -]text\r\n`
/// with a code from 200 to 599, no CR or LF inside a line, the lines of a multi-line reply sharing one
/// code; and that every reply that carries an enhanced status code (RFC 3463) has one of the same class as
/// the code, and every refusal carries one. Panics (so the fuzzer reports the input) otherwise.
pub fn assert_reply_lines(out: &[u8]) {
    let mut continued: Option<&[u8]> = None;
    let mut rest = out;
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or_else(|| panic!("reply without CRLF: {:?}", String::from_utf8_lossy(rest)));
        let line = &rest[..end];
        rest = &rest[end + 2..];
        let shown = String::from_utf8_lossy(line);
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "bare CR or LF in reply line {shown:?}"
        );
        assert!(line.len() >= 4, "reply line too short: {shown:?}");
        let (code, sep, text) = (&line[..3], line[3], &line[4..]);
        assert!(
            code.iter().all(u8::is_ascii_digit) && (b'2'..=b'5').contains(&code[0]),
            "bad reply code in {shown:?}"
        );
        assert!(sep == b' ' || sep == b'-', "bad separator in {shown:?}");
        if let Some(prev) = continued {
            assert_eq!(prev, code, "multi-line reply changes its code: {shown:?}");
        }
        continued = (sep == b'-').then_some(code);
        let enhanced = enhanced_code(text);
        if let Some(class) = enhanced {
            assert_eq!(
                class, code[0],
                "enhanced status class differs from the code: {shown:?}"
            );
        } else {
            assert!(
                code[0] < b'4',
                "refusal without an enhanced status code: {shown:?}"
            );
        }
    }
    assert!(continued.is_none(), "multi-line reply not finished");
}

/// The class digit of the enhanced status code `class.subject.detail` that opens `text`, if one does.
fn enhanced_code(text: &[u8]) -> Option<u8> {
    let word = text.split(|&b| b == b' ').next()?;
    let text = std::str::from_utf8(word).ok()?;
    let mut parts = text.split('.');
    let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    (parts.next().is_none()
        && class.len() == 1
        && digits(class, 1)
        && digits(subject, 3)
        && digits(detail, 3))
    .then(|| class.as_bytes()[0])
}

/// A policy double whose answers depend on the address only, so that the fuzzer can reach each verdict:
/// a domain starting with `r` is refused, one starting with `e` is refused as an error, the rest accepted.
#[derive(Debug, Default)]
pub struct ScriptedPolicy;

fn verdict_for(domain: &str) -> Verdict {
    let refusal = || {
        Refusal::new(
            Reply::with_text(
                550,
                "5.7.1",
                format!("Relay to {domain} denied\r\n250 forged"),
            ),
            RejectReason::RelayDenied,
        )
    };
    match domain.as_bytes().first() {
        Some(b'r' | b'R') => Verdict::Refuse(refusal()),
        Some(b'e' | b'E') => Verdict::RefuseAsError(refusal()),
        _ => Verdict::Accept,
    }
}

impl EnvelopePolicy for ScriptedPolicy {
    fn mail_from(&self, from: &ReversePath, _user: Option<&str>) -> Verdict {
        from.mailbox()
            .map_or(Verdict::Accept, |m| verdict_for(&m.domain))
    }

    fn rcpt_to(&self, to: &Mailbox, _user: Option<&str>) -> Verdict {
        verdict_for(&to.domain)
    }
}

/// Return paths as a relay with one sending domain has them: `example.test` sends with the return-path
/// domain `bounces.example.test`, tokens signed with a fixed key.
pub fn return_paths() -> herald_relay::outcome::verp::ReturnPaths {
    let config = herald_config::Config::parse(
        r#"
hostname: relay.fuzz.test
spool_dir: /nonexistent
listeners: [{ name: a, address: "127.0.0.1:1" }]
domains: [{ name: example.test, return_path: bounces.example.test }]
bounces: { secret_file: /nonexistent }
"#,
    )
    .expect("the fuzz targets' config is valid");
    herald_relay::outcome::verp::ReturnPaths::new(
        &config,
        vec![b"fuzz-key-0123456789abcdef".to_vec()],
    )
}
