//! SMTP replies. Every reply carries an enhanced status code (RFC 2034, RFC 3463), so clients and logs
//! can tell a full mailbox from a policy block without parsing the text.

use std::borrow::Cow;
use std::fmt;

/// One reply: a code, an enhanced status code and text. Multi-line replies (EHLO) are written by the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as `5.1.1`; its class always matches the first digit of `code`.
    pub status: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, status: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            status,
            text: Cow::Borrowed(text),
        }
    }

    pub fn with_text(code: u16, status: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status,
            text: Cow::Owned(text.into()),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the reply, CRLF-terminated, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{self}\r\n");
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Reply text must not break the line structure of the protocol, whatever a caller passed in.
        let text = self.text.replace(['\r', '\n'], " ");
        write!(f, "{} {} {}", self.code, self.status, text)
    }
}

// Replies used in more than one place.
pub const OK: Reply = Reply::new(250, "2.0.0", "Ok");
pub const TOO_MANY_ERRORS: Reply = Reply::new(421, "4.7.0", "Too many errors, closing connection");
pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Line too long");
pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout, closing connection");
pub const SHUTTING_DOWN: Reply = Reply::new(421, "4.3.2", "Service shutting down, try again later");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_text_cannot_inject_lines() {
        let r = Reply::with_text(550, "5.7.1", "no\r\n250 2.0.0 ok");
        let mut out = Vec::new();
        r.write_to(&mut out);
        assert_eq!(out, b"550 5.7.1 no  250 2.0.0 ok\r\n");
    }
}
