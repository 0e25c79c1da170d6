//! Return-path tokens (VERP): the envelope sender of outgoing mail names the message and the recipient, so a
//! bounce that arrives days later, at any replica, maps back to both with no state kept.
//!
//! The local part is `b+<queue id>-<mac>`, followed by `-<local>=<domain>` (the recipient) when the whole
//! local part still fits RFC 5321's 64 octets; otherwise the recipient is read from the report and checked
//! against the MAC. The MAC is HMAC-SHA256 over the queue id and the lower-cased recipient, cut to 40 bits:
//! enough that guessing one takes a trillion tries, short enough to leave room for the address. Without
//! the key nobody can make a token that verifies, so forged bounces cannot put addresses on the
//! suppression list. Keys come from `bounces.secret_file`, one per line: the first signs, every one
//! verifies, so a key is rotated by adding the new one on top and removing the old after the bounce window.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::spool::QueueId;
use herald_config::Config;

type HmacSha256 = hmac::Hmac<Sha256>;

const PREFIX: &str = "b+";
/// Hex digits of the MAC: 40 bits.
const MAC_HEX: usize = 10;
const MAX_LOCAL_PART: usize = 64;
/// Keys shorter than this are refused: the MAC is only as strong as the key.
const MIN_KEY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VerpError {
    #[error("bounces.secret_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "bounces.secret_file {path}: line {line} is a key of {len} bytes; use at least {MIN_KEY}"
    )]
    Short {
        path: PathBuf,
        line: usize,
        len: usize,
    },
    #[error("bounces.secret_file {path}: the file holds no key")]
    Empty { path: PathBuf },
}

/// A token read from a return-path local part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub queue_id: QueueId,
    mac: String,
    /// The recipient, when the token carries it.
    pub recipient: Option<String>,
}

/// The return-path domains of the sending domains, and the keys of their tokens.
#[derive(Debug, Default)]
pub struct ReturnPaths {
    /// Sending domain (lower case) to its return-path domain.
    by_sender: HashMap<String, String>,
    /// Return-path domains, lower case.
    local: HashSet<String>,
    mailboxes: HashSet<String>,
    keys: Vec<Vec<u8>>,
}

impl ReturnPaths {
    /// Reads the keys named by the config (blocking file I/O: call it off the async runtime).
    pub fn load(config: &Config) -> Result<ReturnPaths, VerpError> {
        let keys = match &config.bounces.secret_file {
            Some(path) => read_keys(path)?,
            None => Vec::new(),
        };
        Ok(ReturnPaths::new(config, keys))
    }

    pub fn new(config: &Config, keys: Vec<Vec<u8>>) -> ReturnPaths {
        let mut by_sender = HashMap::new();
        let mut local = HashSet::new();
        for d in &config.domains {
            if let Some(rp) = &d.return_path {
                by_sender.insert(d.name.to_ascii_lowercase(), rp.to_ascii_lowercase());
                local.insert(rp.to_ascii_lowercase());
            }
        }
        ReturnPaths {
            by_sender,
            local,
            mailboxes: config
                .bounces
                .mailboxes
                .iter()
                .map(|m| m.to_ascii_lowercase())
                .collect(),
            keys,
        }
    }

    /// The return-path domains, lower case.
    pub fn domains(&self) -> impl Iterator<Item = &String> {
        self.local.iter()
    }

    /// The sending domain whose return path `domain` is, when exactly one sending domain has it.
    pub fn sending_domain(&self, domain: &str) -> Option<&str> {
        let domain = domain.to_ascii_lowercase();
        let mut senders = self
            .by_sender
            .iter()
            .filter(|(_, rp)| **rp == domain)
            .map(|(sender, _)| sender.as_str());
        let first = senders.next()?;
        senders.next().is_none().then_some(first)
    }

    /// Is `domain` a return-path domain (the relay is its MX)?
    pub fn is_local(&self, domain: &str) -> bool {
        self.local.contains(&domain.to_ascii_lowercase())
    }

    /// May mail to `local_part`@(a return-path domain) be accepted? A configured mailbox, or a token; a
    /// token that carries its recipient must verify here, one that does not is checked against the report.
    pub fn accepts(&self, local_part: &str) -> bool {
        if self.mailboxes.contains(&local_part.to_ascii_lowercase()) {
            return true;
        }
        match parse(local_part) {
            Some(t) => match &t.recipient {
                Some(r) => self.verify(&t, r),
                None => true,
            },
            None => false,
        }
    }

    /// The envelope sender for recipient `rcpt` of message `id` from `sender`: a token at the sender
    /// domain's return-path domain, or None to keep the sender (no return path, the null sender, no key).
    pub fn envelope_sender(&self, id: QueueId, sender: &str, rcpt: &str) -> Option<String> {
        let (_, domain) = sender.rsplit_once('@')?;
        let rp = self.by_sender.get(&domain.to_ascii_lowercase())?;
        let key = self.keys.first()?;
        let mac = mac_hex(key, id, rcpt);
        let mut local = format!("{PREFIX}{:016x}-{mac}", id.0);
        if let Some((l, d)) = rcpt.rsplit_once('@') {
            let embedded = format!("{local}-{l}={d}");
            // `%` and `!` would read as routing syntax (and be refused) when the bounce comes back.
            if embedded.len() <= MAX_LOCAL_PART
                && is_dot_atom(&embedded)
                && !embedded.contains(['%', '!'])
            {
                local = embedded;
            }
        }
        Some(format!("{local}@{rp}"))
    }

    /// Whether `token` was made by one of the keys for `recipient`.
    pub fn verify(&self, token: &Token, recipient: &str) -> bool {
        let Ok(given) = hex::decode(&token.mac) else {
            return false;
        };
        self.keys.iter().any(|key| {
            keyed(key, token.queue_id, recipient)
                .verify_truncated_left(&given)
                .is_ok()
        })
    }
}

/// The MAC state over what a token stands for: the queue id and the lower-cased recipient.
fn keyed(key: &[u8], id: QueueId, rcpt: &str) -> HmacSha256 {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(&id.0.to_be_bytes());
    m.update(b"\0");
    m.update(rcpt.to_ascii_lowercase().as_bytes());
    m
}

fn mac_hex(key: &[u8], id: QueueId, rcpt: &str) -> String {
    let full = hex::encode(keyed(key, id, rcpt).finalize().into_bytes());
    full[..MAC_HEX].to_owned()
}

/// Reads a token from a return-path local part; None when it is not one (syntax only, no MAC check).
pub fn parse(local_part: &str) -> Option<Token> {
    let rest = strip_prefix_ignore_case(local_part, PREFIX)?;
    let (id, rest) = rest.split_at_checked(16)?;
    let rest = rest.strip_prefix('-')?;
    let (mac, rest) = rest.split_at_checked(MAC_HEX)?;
    if !mac.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let queue_id = QueueId(u64::from_str_radix(id, 16).ok()?);
    let recipient = if rest.is_empty() {
        None
    } else {
        let (l, d) = rest.strip_prefix('-')?.rsplit_once('=')?;
        if l.is_empty() || d.is_empty() {
            return None;
        }
        Some(format!("{l}@{d}"))
    };
    Some(Token {
        queue_id,
        mac: mac.to_ascii_lowercase(),
        recipient,
    })
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// RFC 5321 Dot-string: atext runs separated by single dots.
fn is_dot_atom(s: &str) -> bool {
    const SPECIALS: &[u8] = b"!#$%&'*+-/=?^_`{|}~";
    !s.is_empty()
        && s.split('.').all(|atom| {
            !atom.is_empty()
                && atom
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || SPECIALS.contains(&b))
        })
}

fn read_keys(path: &PathBuf) -> Result<Vec<Vec<u8>>, VerpError> {
    let text = std::fs::read_to_string(path).map_err(|source| VerpError::Read {
        path: path.clone(),
        source,
    })?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        if key.len() < MIN_KEY {
            return Err(VerpError::Short {
                path: path.clone(),
                line: i + 1,
                len: key.len(),
            });
        }
        keys.push(key.as_bytes().to_vec());
    }
    if keys.is_empty() {
        return Err(VerpError::Empty { path: path.clone() });
    }
    Ok(keys)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// example.test with its return path bounces.example.test, and these keys.
    pub(crate) fn paths(keys: &[&str]) -> ReturnPaths {
        let config = Config::parse(
            r#"
hostname: relay.test
spool_dir: /tmp/x
listeners: [{ name: a, address: "127.0.0.1:1" }]
domains: [{ name: Example.TEST, return_path: bounces.example.test }]
bounces: { secret_file: /nonexistent }
"#,
        )
        .unwrap();
        ReturnPaths::new(
            &config,
            keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        )
    }

    const KEY: &str = "0123456789abcdef0123";

    #[test]
    fn a_short_recipient_rides_in_the_token_and_verifies() {
        let rp = paths(&[KEY]);
        let id = QueueId(0x0123_4567_89AB_CDEF);
        let sender = rp
            .envelope_sender(id, "news@example.test", "Jo.Smith@gmail.test")
            .unwrap();
        let (local, domain) = sender.rsplit_once('@').unwrap();
        assert_eq!(domain, "bounces.example.test");
        assert!(local.len() <= 64, "{local}");
        let t = parse(local).unwrap();
        assert_eq!(t.queue_id, id);
        assert_eq!(t.recipient.as_deref(), Some("Jo.Smith@gmail.test"));
        assert!(rp.verify(&t, "jo.smith@GMAIL.test"));
        assert!(rp.accepts(local));
        // Upper-cased by a careless MTA on the way back: still the same token.
        assert!(rp.accepts(&local.to_ascii_uppercase()));
    }

    #[test]
    fn a_long_recipient_is_left_out_and_checked_against_the_report() {
        let rp = paths(&[KEY]);
        let rcpt = "a.very.long.recipient.local.part.indeed@subdomain.example-mail.test";
        let sender = rp
            .envelope_sender(QueueId(7), "news@example.test", rcpt)
            .unwrap();
        let local = sender.split('@').next().unwrap();
        let t = parse(local).unwrap();
        assert_eq!(t.recipient, None);
        assert!(rp.verify(&t, rcpt));
        assert!(!rp.verify(&t, "someone.else@example-mail.test"));
    }

    #[test]
    fn forgeries_do_not_verify() {
        let rp = paths(&[KEY]);
        let sender = rp
            .envelope_sender(QueueId(42), "news@example.test", "u@d.test")
            .unwrap();
        let local = sender.split('@').next().unwrap();
        // Another recipient pasted into a real token.
        let swapped = local.replace("-u=d.test", "-victim=d.test");
        assert!(!rp.accepts(&swapped));
        // Another queue id.
        let t = parse(local).unwrap();
        let other = Token {
            queue_id: QueueId(43),
            ..t.clone()
        };
        assert!(!rp.verify(&other, "u@d.test"));
        // Another key.
        assert!(!paths(&["another key of enough length"]).verify(&t, "u@d.test"));
        // Not a token at all, and the configured mailboxes.
        assert!(!rp.accepts("someone"));
        assert!(rp.accepts("FBL"));
        assert!(rp.accepts("postmaster"));
    }

    #[test]
    fn every_key_verifies_and_the_first_signs() {
        let old = paths(&[KEY]);
        let t = parse(
            old.envelope_sender(QueueId(9), "a@example.test", "u@d.test")
                .unwrap()
                .split('@')
                .next()
                .unwrap(),
        )
        .unwrap();
        let rotated = paths(&["the new key, long enough", KEY]);
        assert!(rotated.verify(&t, "u@d.test"));
    }

    #[test]
    fn only_return_path_senders_are_rewritten() {
        let rp = paths(&[KEY]);
        assert!(rp.envelope_sender(QueueId(1), "", "u@d.test").is_none());
        assert!(
            rp.envelope_sender(QueueId(1), "a@other.test", "u@d.test")
                .is_none()
        );
        assert!(
            paths(&[])
                .envelope_sender(QueueId(1), "a@example.test", "u@d.test")
                .is_none()
        );
    }

    #[test]
    fn quoted_local_parts_are_not_embedded() {
        let rp = paths(&[KEY]);
        let sender = rp
            .envelope_sender(QueueId(1), "a@example.test", "\"john doe\"@d.test")
            .unwrap();
        assert_eq!(
            parse(sender.split('@').next().unwrap()).unwrap().recipient,
            None
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "b+",
            "b+0123456789abcdef",
            "b+0123456789abcdef-zzzzzzzzzz",
            "b+0123456789abcdeX-0123456789",
            "b+0123456789abcdef-0123456789-nodomain",
            "b+0123456789abcdef-0123456789x",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
