//! MAIL FROM and RCPT TO paths and the domains in them: `split_path` on the command argument, then the
//! reverse-path and forward-path parsers, and the config crate's domain-name check against them.
//!
//! Checked: no panic; a parsed mailbox keeps RFC 5321's local-part limit (64 octets), prints as
//! `local@domain` and parses back to the same value from `parse_mailbox`, and from a path when it fits
//! in one (256 octets: `parse_mailbox` alone does not check that limit);
//! `split_path` returns a prefix of its input that is the bracketed path.

#![no_main]

use herald_smtp::address::{self, ReversePath};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(arg) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((path, rest)) = address::split_path(arg) {
        assert!(path.starts_with('<') && path.ends_with('>'), "{path:?}");
        assert!(arg.trim_start().len() == path.len() + rest.len(), "{arg:?}");
        check(address::parse_reverse_path(path).map(|p| p.mailbox().cloned()));
    }
    check(address::parse_forward_path(arg).map(Some));
    check(address::parse_mailbox(arg).map(Some));
    // A name the config accepts (hostname, domains[].name) is one SMTP accepts in an address, when the
    // path has room for it; the config also allows the root's trailing dot, which an address never has.
    if herald_config::is_domain_name(arg)
        && !arg.ends_with('.')
        && arg.len() <= 256 - "postmaster@".len()
    {
        let printed = format!("<postmaster@{arg}>");
        assert!(address::parse_forward_path(&printed).is_ok(), "{printed}");
    }
});

fn check(parsed: Result<Option<herald_smtp::Mailbox>, address::AddressError>) {
    let Ok(Some(m)) = parsed else {
        return;
    };
    assert!(m.local.len() <= 64, "{m}");
    assert!(!m.domain.is_empty(), "{m}");
    let printed = m.to_string();
    assert_eq!(
        address::parse_mailbox(&printed).as_ref(),
        Ok(&m),
        "{printed}"
    );
    if printed.len() > 256 {
        return;
    }
    let path = format!("<{printed}>");
    assert_eq!(
        address::parse_reverse_path(&path),
        Ok(ReversePath::Mailbox(m.clone())),
        "{path}"
    );
    assert_eq!(m.is_address_literal(), m.domain.starts_with('['));
    let _ = (m.is_utf8(), m.domain_lower(), m.has_routing_syntax());
}
