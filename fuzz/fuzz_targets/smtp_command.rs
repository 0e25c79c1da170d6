//! One SMTP command line, as the session hands it to the parser (without its line ending).
//!
//! Checked: parsing never panics; what it returns holds what the session relies on: a HELO/EHLO name is
//! one non-empty word, ESMTP parameter keys are upper-case `[A-Z0-9-]+`, and a MAIL or RCPT path prints
//! as an address that parses back to the same value.

#![no_main]

use herald_smtp::address::{self, RcptPath};
use herald_smtp::command::{self, Command, Param};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let Ok(cmd) = command::parse(line) else {
        return;
    };
    match cmd {
        Command::Ehlo(name) | Command::Helo(name) => {
            assert!(
                !name.is_empty() && !name.contains(char::is_whitespace),
                "{name:?}"
            );
        }
        Command::Mail { from, params } => {
            check_params(&params);
            let printed = format!("<{from}>");
            assert_eq!(address::parse_reverse_path(&printed), Ok(from), "{printed}");
        }
        Command::Rcpt { to, params } => {
            check_params(&params);
            match to {
                RcptPath::Postmaster => {
                    assert_eq!(
                        address::parse_rcpt_path("<postmaster>"),
                        Ok(RcptPath::Postmaster)
                    )
                }
                RcptPath::Mailbox(to) => {
                    let printed = format!("<{to}>");
                    assert_eq!(address::parse_forward_path(&printed), Ok(to), "{printed}");
                }
            }
        }
        Command::Auth { mechanism, initial } => {
            // Words as `split_ascii_whitespace` cuts them (a vertical tab is not ASCII white space).
            let word = |w: &str| !w.is_empty() && !w.bytes().any(|b| b.is_ascii_whitespace());
            assert!(word(mechanism), "{mechanism:?}");
            assert!(initial.is_none_or(word), "{initial:?}");
        }
        _ => {}
    }
});

fn check_params(params: &[Param<'_>]) {
    for p in params {
        assert!(
            !p.key.is_empty()
                && p.key
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-'),
            "parameter key {:?}",
            p.key
        );
    }
}
