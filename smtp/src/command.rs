//! One SMTP command line to a [`Command`].
//!
//! The verb is matched case-insensitively; MAIL and RCPT arguments are split into a path and ESMTP
//! parameters. Which parameters are acceptable depends on what the session advertised, so that check is the
//! session's; this module only parses.

use crate::address::{self, AddressError, RcptPath, ReversePath};

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    Mail {
        from: ReversePath,
        params: Vec<Param<'a>>,
    },
    Rcpt {
        to: RcptPath,
        params: Vec<Param<'a>>,
    },
    Data,
    Bdat {
        size: usize,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth {
        mechanism: &'a str,
        initial: Option<&'a str>,
    },
}

/// An ESMTP parameter `KEY[=VALUE]`; the key is upper-cased by the parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param<'a> {
    pub key: String,
    pub value: Option<&'a str>,
}

/// Why a line is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command not recognized")]
    Unknown,
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    #[error("bad sender address: {0}")]
    BadSender(AddressError),
    #[error("bad recipient address: {0}")]
    BadRecipient(AddressError),
    #[error("command line is not valid UTF-8")]
    NotUtf8,
}

/// Parses one line, without its line ending.
pub fn parse(line: &[u8]) -> Result<Command<'_>, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::NotUtf8)?;
    let (verb, arg) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let no_arg = |cmd: Command<'static>| {
        if arg.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Syntax("this command takes no argument"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" | "HELO" => {
            let name = arg.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(CommandError::Syntax(
                    "EHLO and HELO need one domain argument",
                ));
            }
            Ok(if verb.eq_ignore_ascii_case("EHLO") {
                Command::Ehlo(name)
            } else {
                Command::Helo(name)
            })
        }
        "MAIL" => {
            let rest = strip_keyword(arg, "FROM:")
                .ok_or(CommandError::Syntax("use MAIL FROM:<address>"))?;
            let (path, params) = address::split_path(rest).map_err(CommandError::BadSender)?;
            let from = address::parse_reverse_path(path).map_err(CommandError::BadSender)?;
            Ok(Command::Mail {
                from,
                params: parse_params(params)?,
            })
        }
        "RCPT" => {
            let rest =
                strip_keyword(arg, "TO:").ok_or(CommandError::Syntax("use RCPT TO:<address>"))?;
            let (path, params) = address::split_path(rest).map_err(CommandError::BadRecipient)?;
            let to = address::parse_rcpt_path(path).map_err(CommandError::BadRecipient)?;
            Ok(Command::Rcpt {
                to,
                params: parse_params(params)?,
            })
        }
        "DATA" => no_arg(Command::Data),
        "BDAT" => {
            let mut words = arg.split_ascii_whitespace();
            let size = words
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or(CommandError::Syntax("use BDAT <size> [LAST]"))?;
            let last = match words.next() {
                None => false,
                Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Err(CommandError::Syntax("use BDAT <size> [LAST]")),
            };
            if words.next().is_some() {
                return Err(CommandError::Syntax("use BDAT <size> [LAST]"));
            }
            Ok(Command::Bdat { size, last })
        }
        "RSET" => no_arg(Command::Rset),
        // NOOP and HELP may carry an argument, which is ignored (RFC 5321 section 4.1.1.9, 4.1.1.8).
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_arg(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "STARTTLS" => no_arg(Command::StartTls),
        "AUTH" => {
            let mut words = arg.split_ascii_whitespace();
            let mechanism = words.next().ok_or(CommandError::Syntax(
                "use AUTH <mechanism> [initial-response]",
            ))?;
            let initial = words.next();
            if words.next().is_some() {
                return Err(CommandError::Syntax(
                    "use AUTH <mechanism> [initial-response]",
                ));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        _ => Err(CommandError::Unknown),
    }
}

/// Strips `keyword` case-insensitively, allowing the space some clients put after the colon.
fn strip_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| arg[keyword.len()..].trim_start_matches(' '))
}

fn parse_params(s: &str) -> Result<Vec<Param<'_>>, CommandError> {
    if !s.is_empty() && !s.starts_with(' ') {
        return Err(CommandError::Syntax(
            "parameters must follow the address after a space",
        ));
    }
    s.split_ascii_whitespace()
        .map(|word| {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            };
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(CommandError::Syntax("malformed ESMTP parameter"));
            }
            Ok(Param {
                key: key.to_ascii_uppercase(),
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(parse(b"ehlo client.test"), Ok(Command::Ehlo("client.test")));
        assert_eq!(parse(b"QuIt"), Ok(Command::Quit));
        assert_eq!(parse(b"NOOP anything"), Ok(Command::Noop));
        assert_eq!(parse(b"FOO"), Err(CommandError::Unknown));
        assert!(matches!(parse(b"QUIT now"), Err(CommandError::Syntax(_))));
    }

    #[test]
    fn mail_with_params() {
        let Ok(Command::Mail { from, params }) =
            parse(b"MAIL FROM:<a@b.test> size=100 BODY=8BITMIME")
        else {
            panic!("not a MAIL");
        };
        assert_eq!(from.to_string(), "a@b.test");
        assert_eq!(params[0].key, "SIZE");
        assert_eq!(params[0].value, Some("100"));
        assert_eq!(params[1].value, Some("8BITMIME"));
        assert!(matches!(
            parse(b"MAIL FROM: <>"),
            Ok(Command::Mail {
                from: ReversePath::Null,
                ..
            })
        ));
        assert!(matches!(
            parse(b"MAIL FROM:a@b.test"),
            Err(CommandError::BadSender(_))
        ));
        assert!(matches!(
            parse(b"MAIL <a@b.test>"),
            Err(CommandError::Syntax(_))
        ));
    }

    #[test]
    fn bdat_forms() {
        assert_eq!(
            parse(b"BDAT 10 LAST"),
            Ok(Command::Bdat {
                size: 10,
                last: true
            })
        );
        assert_eq!(
            parse(b"BDAT 0"),
            Ok(Command::Bdat {
                size: 0,
                last: false
            })
        );
        assert!(parse(b"BDAT x").is_err());
        assert!(parse(b"BDAT 1 FIRST").is_err());
    }

    #[test]
    fn auth_forms() {
        assert_eq!(
            parse(b"AUTH PLAIN AGFwcABwdw=="),
            Ok(Command::Auth {
                mechanism: "PLAIN",
                initial: Some("AGFwcABwdw==")
            })
        );
        assert_eq!(
            parse(b"AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN",
                initial: None
            })
        );
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert_eq!(
            parse(b"MAIL FROM:<\xff@x.test>"),
            Err(CommandError::NotUtf8)
        );
    }
}
