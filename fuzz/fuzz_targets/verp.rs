//! Return-path tokens (`herald_relay::outcome::verp`): reading one from any local part a bounce may be
//! sent to, and making one for any recipient the SMTP parser accepts.
//!
//! Checked: parsing and `accepts` never panic; a token made for a recipient is a valid SMTP path of at most
//! 64 octets of local part, reads back with its queue id, verifies for that recipient, and is accepted as
//! it is and upper-cased (as careless MTAs return it).

#![no_main]

use std::sync::LazyLock;

use herald_relay::outcome::verp::{self, ReturnPaths};
use herald_relay::spool::QueueId;
use herald_smtp::address;
use libfuzzer_sys::fuzz_target;

static RETURN_PATHS: LazyLock<ReturnPaths> = LazyLock::new(herald_fuzz::return_paths);

fuzz_target!(|data: &[u8]| {
    let rp = &*RETURN_PATHS;
    let Some((id, text)) = data.split_first_chunk::<8>() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if let Some(t) = verp::parse(text) {
        let _ = t
            .recipient
            .map(|r| rp.verify(&verp::parse(text).expect("parsed once"), &r));
    }
    let _ = rp.accepts(text);

    let Ok(rcpt) = address::parse_mailbox(text) else {
        return;
    };
    let rcpt = rcpt.to_string();
    let id = QueueId(u64::from_le_bytes(*id));
    let sender = rp
        .envelope_sender(id, "news@example.test", &rcpt)
        .expect("example.test has a return path and a key");
    let path = format!("<{sender}>");
    let parsed = address::parse_forward_path(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(parsed.domain, "bounces.example.test");
    assert!(parsed.local.len() <= 64, "{path}");
    let token = verp::parse(&parsed.local).unwrap_or_else(|| panic!("no token in {path}"));
    assert_eq!(token.queue_id, id, "{path}");
    assert!(
        rp.verify(&token, &rcpt),
        "{path} does not verify for {rcpt}"
    );
    if let Some(r) = &token.recipient {
        assert!(
            r.eq_ignore_ascii_case(&rcpt),
            "{path} carries {r}, not {rcpt}"
        );
    }
    assert!(rp.accepts(&parsed.local), "{path} refused");
    assert!(
        rp.accepts(&parsed.local.to_ascii_uppercase()),
        "{path} refused upper-cased"
    );
});
