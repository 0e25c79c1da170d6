//! Reports that come back to return-path addresses: DSNs (RFC 3464), ARF complaints (RFC 5965) and prose
//! bounces, read by `outcome::report::parse` and judged by `outcome::feedback::evaluate`. Anyone on the
//! internet can send these, before anything is verified.
//!
//! Checked: no panic; the documented limits hold (recipient blocks, addresses); every outcome is one of the
//! documented results, and only an outcome for a recipient whose token verified names a recipient or tells
//! the suppression list anything.

#![no_main]

use std::sync::LazyLock;

use herald_relay::outcome::verp::ReturnPaths;
use herald_relay::outcome::{Classifier, feedback, report};
use herald_relay::spool::QueueId;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    rp: ReturnPaths,
    classifier: Classifier,
    /// Local parts the report is "addressed to": a token that carries its recipient
    /// (`user@example.net`) and one too long to (checked against the addresses in the report).
    locals: Vec<String>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let rp = herald_fuzz::return_paths();
    let local = |id, rcpt| {
        let sender = rp
            .envelope_sender(QueueId(id), "news@example.test", rcpt)
            .expect("a token");
        sender.split('@').next().expect("an address").to_owned()
    };
    let locals = vec![
        local(1, "user@example.net"),
        local(
            2,
            "a.recipient.whose.address.is.too.long.for.the.token@example.net",
        ),
    ];
    Fixture {
        classifier: Classifier::builtin(),
        locals,
        rp,
    }
});

const RESULTS: &[&str] = &[
    "bounce",
    "delay",
    "complaint",
    "other",
    "forged",
    "unverified",
    "not-a-report",
];

fuzz_target!(|raw: &[u8]| {
    let f = &*FIXTURE;
    if let Some(r) = report::parse(raw) {
        assert!(r.recipients.len() <= report::MAX_RECIPIENTS);
        assert!(r.original_senders.len() <= report::MAX_ADDRESSES);
        assert!(r.original_recipients.len() <= report::MAX_ADDRESSES);
    }
    for locals in [&f.locals[..], &[]] {
        let outcomes = feedback::evaluate(raw, locals, &f.rp, &f.classifier);
        assert!(!outcomes.is_empty());
        for o in &outcomes {
            assert!(RESULTS.contains(&o.result), "{o:?}");
            let verified = !matches!(o.result, "forged" | "unverified" | "not-a-report");
            assert_eq!(o.recipient.is_some(), verified, "{o:?}");
            // What the suppression list hears of comes only from a verified bounce or complaint.
            assert!(
                o.observed.is_none() || matches!(o.result, "bounce" | "complaint"),
                "{o:?}"
            );
        }
    }
});
