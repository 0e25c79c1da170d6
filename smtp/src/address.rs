//! Mailbox and path syntax of RFC 5321 section 4.1.2, with RFC 6531's UTF-8 extension.
//!
//! Parsing is strict where leniency has been abused (unbalanced brackets, `%` and `!` routing are left as
//! plain local-part characters and never interpreted) and lenient where the RFC asks it (source routes are
//! accepted and ignored, section 4.1.1.3).

use std::fmt;

/// A mailbox `local@domain`. The domain is kept as written; compare it case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The local part as it appears on the wire (a quoted local part keeps its quotes).
    pub local: String,
    pub domain: String,
}

impl Mailbox {
    /// True when the address needs SMTPUTF8 to travel.
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }

    /// True when the domain is an address literal such as `[192.0.2.1]`.
    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    /// The domain in lower case, the form used for routing and policy.
    pub fn domain_lower(&self) -> String {
        self.domain.to_lowercase()
    }

    /// True when the local part carries routing syntax that old MTAs interpreted (`%`, `!`, a quoted `@`).
    /// Herald never interprets it, but refuses it for its own domains so that no peer can be tricked.
    pub fn has_routing_syntax(&self) -> bool {
        self.local.contains(['%', '!', '@'])
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The argument of MAIL FROM: a mailbox or the null sender `<>` (used by bounces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Mailbox(Mailbox),
}

impl ReversePath {
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ReversePath::Null => None,
            ReversePath::Mailbox(m) => Some(m),
        }
    }
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => m.fmt(f),
        }
    }
}

/// Why a path did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the address must be enclosed in <>")]
    NoBrackets,
    #[error("the address has no @domain")]
    NoDomain,
    #[error("the local part is not valid")]
    BadLocalPart,
    #[error("the domain is not valid")]
    BadDomain,
    #[error("the address is too long")]
    TooLong,
}

/// Splits `<path> params` into the path (with brackets) and the rest.
pub fn split_path(arg: &str) -> Result<(&str, &str), AddressError> {
    let arg = arg.trim_start();
    if !arg.starts_with('<') {
        return Err(AddressError::NoBrackets);
    }
    // A '>' inside a quoted local part does not close the path.
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in arg.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Ok((&arg[..=i], &arg[i + 1..])),
            _ => {}
        }
    }
    Err(AddressError::NoBrackets)
}

/// Parses a reverse-path (`<>` or `<mailbox>`).
pub fn parse_reverse_path(path: &str) -> Result<ReversePath, AddressError> {
    if path == "<>" {
        return Ok(ReversePath::Null);
    }
    parse_forward_path(path).map(ReversePath::Mailbox)
}

/// The argument of RCPT TO: a mailbox, or `<Postmaster>` with no domain, which every SMTP server must accept
/// and deliver to its own postmaster (RFC 5321 sections 4.1.1.3 and 4.5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptPath {
    Postmaster,
    Mailbox(Mailbox),
}

/// Parses RCPT TO's path: `<Postmaster>` (any case) or a forward-path.
pub fn parse_rcpt_path(path: &str) -> Result<RcptPath, AddressError> {
    if path.len() == "<postmaster>".len() && path.eq_ignore_ascii_case("<postmaster>") {
        return Ok(RcptPath::Postmaster);
    }
    parse_forward_path(path).map(RcptPath::Mailbox)
}

/// Parses a forward-path `<[@route,@route:]local@domain>`.
pub fn parse_forward_path(path: &str) -> Result<Mailbox, AddressError> {
    let inner = path
        .strip_prefix('<')
        .and_then(|p| p.strip_suffix('>'))
        .ok_or(AddressError::NoBrackets)?;
    // RFC 5321 section 4.5.3.1.3: a path is at most 256 octets.
    if inner.len() > 256 {
        return Err(AddressError::TooLong);
    }
    let mailbox = strip_source_route(inner)?;
    parse_mailbox(mailbox)
}

/// Drops an A-d-l source route (`@a,@b:`), which RFC 5321 says to accept and ignore.
fn strip_source_route(s: &str) -> Result<&str, AddressError> {
    if !s.starts_with('@') {
        return Ok(s);
    }
    let colon = s.find(':').ok_or(AddressError::BadDomain)?;
    for hop in s[..colon].split(',') {
        let domain = hop.strip_prefix('@').ok_or(AddressError::BadDomain)?;
        if !is_domain(domain) {
            return Err(AddressError::BadDomain);
        }
    }
    Ok(&s[colon + 1..])
}

/// Parses `local@domain`.
pub fn parse_mailbox(s: &str) -> Result<Mailbox, AddressError> {
    let (local, domain) = if s.starts_with('"') {
        let end = quoted_string_end(s).ok_or(AddressError::BadLocalPart)?;
        let rest = &s[end..];
        let domain = rest.strip_prefix('@').ok_or(AddressError::NoDomain)?;
        (&s[..end], domain)
    } else {
        let at = s.rfind('@').ok_or(AddressError::NoDomain)?;
        let local = &s[..at];
        if !is_dot_string(local) {
            return Err(AddressError::BadLocalPart);
        }
        (local, &s[at + 1..])
    };
    // RFC 5321 section 4.5.3.1.1: a local part is at most 64 octets.
    if local.len() > 64 {
        return Err(AddressError::TooLong);
    }
    if !(is_domain(domain) || is_address_literal(domain)) {
        return Err(AddressError::BadDomain);
    }
    Ok(Mailbox {
        local: local.to_owned(),
        domain: domain.to_owned(),
    })
}

/// Byte index just past the closing quote of a quoted string that starts at index 0.
fn quoted_string_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            c if c.is_ascii_control() => return None,
            _ => {}
        }
    }
    None
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// A domain: LDH labels, or U-labels when the address is UTF-8 (RFC 6531).
fn is_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        })
}

fn is_address_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        return false;
    };
    if let Some(v6) = inner.strip_prefix("IPv6:") {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    inner.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(s: &str) -> Result<Mailbox, AddressError> {
        parse_forward_path(s)
    }

    #[test]
    fn plain_addresses() {
        let m = fwd("<a.b+c@Example.TEST>").unwrap();
        assert_eq!(m.local, "a.b+c");
        assert_eq!(m.domain_lower(), "example.test");
        assert_eq!(fwd("<user@[127.0.0.1]>").unwrap().domain, "[127.0.0.1]");
        assert!(fwd("<user@[IPv6:::1]>").unwrap().is_address_literal());
        assert_eq!(parse_reverse_path("<>").unwrap(), ReversePath::Null);
    }

    #[test]
    fn a_bare_postmaster_is_the_only_path_without_a_domain() {
        for p in ["<postmaster>", "<Postmaster>", "<POSTMASTER>"] {
            assert_eq!(parse_rcpt_path(p), Ok(RcptPath::Postmaster), "{p}");
        }
        assert_eq!(parse_rcpt_path("<abuse>"), Err(AddressError::NoDomain));
        assert_eq!(
            parse_rcpt_path("<postmasterx>"),
            Err(AddressError::NoDomain)
        );
        assert_eq!(parse_rcpt_path("postmaster"), Err(AddressError::NoBrackets));
        assert!(matches!(
            parse_rcpt_path("<postmaster@example.test>"),
            Ok(RcptPath::Mailbox(m)) if m.domain == "example.test"
        ));
    }

    #[test]
    fn source_route_is_ignored() {
        let m = fwd("<@relay.test,@other.test:user@foreign.test>").unwrap();
        assert_eq!(m.to_string(), "user@foreign.test");
    }

    #[test]
    fn quoted_local_parts() {
        let m = fwd(r#"<"user@foreign.test"@local.test>"#).unwrap();
        assert!(m.has_routing_syntax());
        assert_eq!(m.domain, "local.test");
        assert_eq!(fwd(r#"<"user@foreign.test">"#), Err(AddressError::NoDomain));
        let (path, rest) = split_path(r#"<"a>b"@x.test> SIZE=10"#).unwrap();
        assert_eq!(path, r#"<"a>b"@x.test>"#);
        assert_eq!(rest, " SIZE=10");
    }

    #[test]
    fn relay_tricks_do_not_parse_or_are_flagged() {
        assert!(fwd("<user@foreign.test@local.test>").is_err());
        assert_eq!(fwd("<foreign.test!user>"), Err(AddressError::NoDomain));
        assert!(
            fwd("<user%foreign.test@local.test>")
                .unwrap()
                .has_routing_syntax()
        );
        assert!(fwd("user@local.test").is_err());
        assert!(fwd("<user@local.test").is_err());
        assert!(fwd("<.user@local.test>").is_err());
        assert!(fwd("<user@-bad.test>").is_err());
        assert!(fwd("<user@[300.1.1.1]>").is_err());
    }

    #[test]
    fn utf8_addresses() {
        let m = fwd("<jöran@bücher.test>").unwrap();
        assert!(m.is_utf8());
    }

    #[test]
    fn length_limits() {
        let long_local = "a".repeat(65);
        assert_eq!(
            fwd(&format!("<{long_local}@x.test>")),
            Err(AddressError::TooLong)
        );
    }
}
