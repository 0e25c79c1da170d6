//! The DSN extension's parameters (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT, and the
//! xtext encoding their values travel in.
//!
//! Values are decoded once, here, and kept decoded: the relay stores them in its spool, puts them into the
//! notifications it writes (RFC 3464 fields), and encodes them again for the next hop. The few lines of
//! xtext are written here because no crate the workspace uses exposes them (lettre has them, but lettre is
//! not a dependency and would be a large one for this).

use std::fmt::{self, Write as _};

/// RFC 3461 section 4.4: ENVID is at most 100 characters (as sent, xtext-encoded).
pub const MAX_ENVID: usize = 100;
/// RFC 3461 section 4.2: ORCPT is at most 500 characters (as sent, type and xtext).
pub const MAX_ORCPT: usize = 500;

/// Why a DSN parameter's value is refused; each names the parameter, for the 501 5.5.4 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    #[error("Bad RET value: use RET=FULL or RET=HDRS")]
    Ret,
    #[error("Bad NOTIFY value: use NOTIFY=NEVER or a list of SUCCESS, FAILURE, DELAY")]
    Notify,
    #[error("Bad ENVID value: {0}")]
    Envid(&'static str),
    #[error("Bad ORCPT value: {0}")]
    Orcpt(&'static str),
}

/// How much of the message a failure notification returns (MAIL's RET).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Headers,
}

impl Ret {
    pub fn parse(value: &str) -> Result<Ret, DsnError> {
        if value.eq_ignore_ascii_case("FULL") {
            Ok(Ret::Full)
        } else if value.eq_ignore_ascii_case("HDRS") {
            Ok(Ret::Headers)
        } else {
            Err(DsnError::Ret)
        }
    }

    /// The keyword as sent on MAIL.
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Headers => "HDRS",
        }
    }
}

/// When the sender wants a notification for a recipient (RCPT's NOTIFY). All false is NEVER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    /// `NEVER`, or a comma-separated list of `SUCCESS`, `FAILURE`, `DELAY`, each at most once.
    pub fn parse(value: &str) -> Result<Notify, DsnError> {
        if value.eq_ignore_ascii_case("NEVER") {
            return Ok(Notify::NEVER);
        }
        let mut n = Notify::NEVER;
        for word in value.split(',') {
            let slot = if word.eq_ignore_ascii_case("SUCCESS") {
                &mut n.success
            } else if word.eq_ignore_ascii_case("FAILURE") {
                &mut n.failure
            } else if word.eq_ignore_ascii_case("DELAY") {
                &mut n.delay
            } else {
                return Err(DsnError::Notify);
            };
            if std::mem::replace(slot, true) {
                return Err(DsnError::Notify);
            }
        }
        Ok(n)
    }

    pub fn is_never(self) -> bool {
        self == Notify::NEVER
    }
}

impl fmt::Display for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_never() {
            return f.write_str("NEVER");
        }
        let words = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ];
        let mut sep = "";
        for (_, w) in words.iter().filter(|(on, _)| *on) {
            write!(f, "{sep}{w}")?;
            sep = ",";
        }
        Ok(())
    }
}

/// The recipient's address as the sender first gave it (RCPT's ORCPT), decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orcpt {
    /// `rfc822` for Internet mail; `utf-8` for RFC 6533 addresses. Kept as given.
    pub addr_type: String,
    pub address: String,
}

impl Orcpt {
    /// `addr-type ";" xtext`.
    pub fn parse(value: &str) -> Result<Orcpt, DsnError> {
        if value.len() > MAX_ORCPT {
            return Err(DsnError::Orcpt("longer than 500 characters"));
        }
        let (addr_type, xtext) = value
            .split_once(';')
            .ok_or(DsnError::Orcpt("use ORCPT=rfc822;address"))?;
        // addr-type is an RFC 5322 atom.
        let atext = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
        if addr_type.is_empty() || !addr_type.bytes().all(atext) {
            return Err(DsnError::Orcpt("the address type is not an atom"));
        }
        let address = decode_text(xtext).map_err(DsnError::Orcpt)?;
        if address.is_empty() {
            return Err(DsnError::Orcpt("the address is empty"));
        }
        Ok(Orcpt {
            addr_type: addr_type.to_owned(),
            address,
        })
    }
}

impl fmt::Display for Orcpt {
    /// As sent on RCPT: `type;xtext`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{};{}", self.addr_type, xtext_encode(&self.address))
    }
}

/// MAIL's DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailDsn {
    pub ret: Option<Ret>,
    /// Decoded.
    pub envid: Option<String>,
}

impl MailDsn {
    pub fn parse_envid(value: &str) -> Result<String, DsnError> {
        if value.len() > MAX_ENVID {
            return Err(DsnError::Envid("longer than 100 characters"));
        }
        let id = decode_text(value).map_err(DsnError::Envid)?;
        if id.is_empty() {
            return Err(DsnError::Envid("empty"));
        }
        Ok(id)
    }

    pub fn is_empty(&self) -> bool {
        self.ret.is_none() && self.envid.is_none()
    }
}

/// RCPT's DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RcptDsn {
    pub notify: Option<Notify>,
    pub orcpt: Option<Orcpt>,
}

impl RcptDsn {
    pub fn is_empty(&self) -> bool {
        self.notify.is_none() && self.orcpt.is_none()
    }

    /// Whether a failure (bounce or expiry) is to be reported: unless NOTIFY was given without FAILURE.
    pub fn wants_failure(&self) -> bool {
        self.notify.is_none_or(|n| n.failure)
    }

    /// Whether a successful delivery (or a hand-off to a hop that will not report it) is to be reported:
    /// only when asked for.
    pub fn wants_success(&self) -> bool {
        self.notify.is_some_and(|n| n.success)
    }

    /// Whether a delay is to be reported: only when asked for (RFC 3461 section 4.1 lets an MTA send one
    /// without NOTIFY; Herald does not, so a sender that did not ask gets nothing between accept and
    /// bounce, as before the extension).
    pub fn wants_delay(&self) -> bool {
        self.notify.is_some_and(|n| n.delay)
    }
}

/// Decodes xtext (RFC 3461 section 4): `+XX` (upper-case hex) stands for a byte; the other characters are
/// themselves, printable ASCII other than `+` and `=`.
pub fn xtext_decode(s: &str) -> Result<Vec<u8>, &'static str> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| match c {
                    b'0'..=b'9' => Some(c - b'0'),
                    b'A'..=b'F' => Some(c - b'A' + 10),
                    _ => None,
                };
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err("a + must be followed by two upper-case hex digits");
                };
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'=' => return Err("= must be encoded as +3D"),
            c @ b'!'..=b'~' => {
                out.push(c);
                i += 1;
            }
            _ => return Err("not xtext: characters other than printable ASCII must be encoded"),
        }
    }
    Ok(out)
}

/// Encodes as xtext: `+`, `=` and anything outside printable ASCII become `+XX`.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// Decodes xtext that must carry text fit for a notification's header field: UTF-8 with no control
/// characters (RFC 3461 asks for printable ASCII; UTF-8 is what RFC 6533 adds for SMTPUTF8 senders).
fn decode_text(s: &str) -> Result<String, &'static str> {
    let bytes = xtext_decode(s)?;
    let text = String::from_utf8(bytes).map_err(|_| "the decoded value is not UTF-8")?;
    if text.chars().any(char::is_control) {
        return Err("the decoded value has control characters");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_round_trips_and_rejects_malformed() {
        assert_eq!(xtext_decode("a+2Bb+3Dc").unwrap(), b"a+b=c");
        assert_eq!(xtext_decode("").unwrap(), b"");
        assert_eq!(xtext_encode("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
        for bad in [
            "+", "+4", "+4g", "+4a", "a=b", "a b", "\u{e9}", "+ZZ", "x\t",
        ] {
            assert!(xtext_decode(bad).is_err(), "{bad:?}");
        }
        for s in [
            "",
            "plain",
            "a+b",
            "x=y",
            "sp ace",
            "\u{e9}t\u{e9}",
            "~!",
            "+2B",
        ] {
            let enc = xtext_encode(s);
            assert_eq!(xtext_decode(&enc).unwrap(), s.as_bytes(), "{s:?}");
        }
        for b in 0..=255u8 {
            let s = String::from_utf8_lossy(&[b]).into_owned();
            assert_eq!(xtext_decode(&xtext_encode(&s)).unwrap(), s.as_bytes());
        }
    }

    #[test]
    fn notify_takes_never_alone_or_each_keyword_once() {
        assert_eq!(Notify::parse("never"), Ok(Notify::NEVER));
        assert_eq!(
            Notify::parse("SUCCESS,failure,DELAY"),
            Ok(Notify {
                success: true,
                failure: true,
                delay: true
            })
        );
        assert_eq!(
            Notify::parse("DELAY").map(|n| n.to_string()),
            Ok("DELAY".into())
        );
        assert_eq!(
            Notify::parse("FAILURE,SUCCESS").map(|n| n.to_string()),
            Ok("SUCCESS,FAILURE".into())
        );
        for bad in [
            "",
            "NEVER,SUCCESS",
            "SUCCESS,NEVER",
            "SUCCESS,SUCCESS",
            "SUCCESS,",
            ",DELAY",
            "SUCCESS FAILURE",
            "ALWAYS",
        ] {
            assert_eq!(Notify::parse(bad), Err(DsnError::Notify), "{bad:?}");
        }
    }

    #[test]
    fn ret_envid_orcpt() {
        assert_eq!(Ret::parse("hdrs"), Ok(Ret::Headers));
        assert_eq!(Ret::parse("Full"), Ok(Ret::Full));
        assert_eq!(Ret::parse("BODY"), Err(DsnError::Ret));
        assert_eq!(Ret::parse(""), Err(DsnError::Ret));
        assert_eq!(MailDsn::parse_envid("QQ+2B1"), Ok("QQ+1".into()));
        assert!(MailDsn::parse_envid("").is_err());
        assert!(MailDsn::parse_envid(&"x".repeat(101)).is_err());
        assert!(MailDsn::parse_envid(&"x".repeat(100)).is_ok());
        assert!(MailDsn::parse_envid("a+0Ab").is_err(), "control character");
        let o = Orcpt::parse("rfc822;a+2Bb@example.test").unwrap();
        assert_eq!(o.addr_type, "rfc822");
        assert_eq!(o.address, "a+b@example.test");
        assert_eq!(o.to_string(), "rfc822;a+2Bb@example.test");
        for bad in [
            "a@b.test",
            ";a@b.test",
            "rfc 822;a@b.test",
            "rfc822;",
            "rfc822;a=b",
            "rfc822;+FF",
        ] {
            assert!(
                matches!(Orcpt::parse(bad), Err(DsnError::Orcpt(_))),
                "{bad:?}"
            );
        }
        assert!(Orcpt::parse(&format!("rfc822;{}", "x".repeat(494))).is_err());
    }

    #[test]
    fn what_each_notify_asks_for() {
        let none = RcptDsn::default();
        assert!(none.wants_failure() && !none.wants_success() && !none.wants_delay());
        let never = RcptDsn {
            notify: Some(Notify::NEVER),
            orcpt: None,
        };
        assert!(!never.wants_failure() && !never.wants_success() && !never.wants_delay());
        let success = RcptDsn {
            notify: Some(Notify::parse("SUCCESS").unwrap()),
            orcpt: None,
        };
        assert!(!success.wants_failure() && success.wants_success());
        let delay = RcptDsn {
            notify: Some(Notify::parse("DELAY,FAILURE").unwrap()),
            orcpt: None,
        };
        assert!(delay.wants_failure() && delay.wants_delay() && !delay.wants_success());
    }
}
