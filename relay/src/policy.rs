//! Who may send what: SMTP AUTH principals, the domains each may send as, and which domains are local.
//!
//! [`Policy`] is built once from the config and shared by every session; reloading the config builds a new
//! one. [`SessionPolicy`] is what one SMTP session consults at MAIL FROM and RCPT TO (herald-smtp's
//! [`EnvelopePolicy`]), and cleanup at the end of DATA for the From: header: the relay's policy, its
//! suppression list and what the listener knows of the client. It answers from memory, so the session
//! stays synchronous and pipelined replies stay in order.
//!
//! A sender domain (MAIL FROM's and each From: address's) is checked wherever a client may relay: an
//! authenticated user against its `allowed_domains`, a client of a trusted listener against the listener's
//! [`Senders`]. Whoever relays here gets its mail DKIM-signed, so relaying and sending as a domain go
//! together. An inbound client is not checked: it reaches only the return-path domains, and the bounces
//! and reports sent there come from anyone.

use std::collections::HashMap;
use std::sync::Arc;

use crate::outcome::suppression::Suppressions;
use crate::outcome::verp::ReturnPaths;
use herald_config::{Config, Listener, TrustedSenders};
use herald_smtp::{EnvelopePolicy, Mailbox, Refusal, RejectReason, Reply, ReversePath, Verdict};

/// A hash of a password nobody knows, checked when the user name is unknown so that a failed login takes
/// as long whether or not the user exists.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$aGVyYWxkLWR1bW15$uG3X0c8n5c3cxx5Ykn2y0E7k2Qb2E3pA1nZq6q6bQ0c";

#[derive(Debug)]
struct Principal {
    password_hash: String,
    allowed_domains: Vec<String>,
}

/// Sending policy derived from the config.
#[derive(Debug, Default)]
pub struct Policy {
    users: HashMap<String, Principal>,
    return_paths: Arc<ReturnPaths>,
    /// The relay's own name, whose postmaster it receives mail for.
    hostname: String,
}

impl Policy {
    /// A policy whose return-path domains have no token keys (tests, and tools that never see bounces).
    pub fn from_config(config: &Config) -> Policy {
        Policy::new(config, Arc::new(ReturnPaths::new(config, Vec::new())))
    }

    pub fn new(config: &Config, return_paths: Arc<ReturnPaths>) -> Policy {
        let users = config
            .users
            .iter()
            .map(|u| {
                (
                    u.username.clone(),
                    Principal {
                        password_hash: u.password_hash.clone(),
                        allowed_domains: u
                            .allowed_domains
                            .iter()
                            .map(|d| d.to_ascii_lowercase())
                            .collect(),
                    },
                )
            })
            .collect();
        Policy {
            users,
            return_paths,
            hostname: config.hostname.to_ascii_lowercase(),
        }
    }

    /// Checks a password against the user's argon2 hash. Deliberately slow (argon2): call it off the
    /// async runtime.
    pub fn verify_password(&self, username: &str, password: &str) -> bool {
        let (hash, known) = match self.users.get(username) {
            Some(p) => (p.password_hash.as_str(), true),
            None => (DUMMY_HASH, false),
        };
        herald_config::password::verify(hash, password) && known
    }

    /// May `username` use `domain` as its MAIL FROM or From: domain?
    pub fn may_send_as(&self, username: &str, domain: &str) -> bool {
        let domain = domain.to_ascii_lowercase();
        self.users
            .get(username)
            .is_some_and(|p| p.allowed_domains.contains(&domain))
    }

    /// Does this relay receive mail for `to` itself rather than relay it: an address at a return-path
    /// domain, or its own postmaster (what a bare `RCPT TO:<Postmaster>` becomes; RFC 5321 section 4.5.1).
    pub fn receives(&self, to: &Mailbox) -> bool {
        !to.is_address_literal() && (self.is_local(&to.domain) || self.is_own_postmaster(to))
    }

    /// `postmaster@<hostname>`, in any case.
    pub fn is_own_postmaster(&self, to: &Mailbox) -> bool {
        to.domain.eq_ignore_ascii_case(&self.hostname)
            && to.local.eq_ignore_ascii_case("postmaster")
    }

    /// Is `domain` one this relay receives mail for (a return-path domain)?
    pub fn is_local(&self, domain: &str) -> bool {
        self.return_paths.is_local(domain)
    }

    /// The return paths this policy was built with.
    pub fn return_paths(&self) -> &Arc<ReturnPaths> {
        &self.return_paths
    }

    /// Does a return-path domain take mail for `local_part`: a token, or a feedback/postmaster mailbox?
    pub fn accepts_local(&self, local_part: &str) -> bool {
        self.return_paths.accepts(local_part)
    }
}

/// The sender domains a trusted listener's clients may use without AUTH: its `trusted_senders`, resolved
/// against the config it came with. Names are kept in lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Senders {
    /// `trusted_senders: any`: not checked.
    Any,
    /// `trusted_senders` left out: the relay's sending domains (`domains[].name`).
    SendingDomains(Vec<String>),
    /// `trusted_senders: [...]`: exactly these.
    Listed(Vec<String>),
}

impl Senders {
    /// What `listener` lets its relaying clients send as. Only trusted listeners consult it.
    pub fn for_listener(config: &Config, listener: &Listener) -> Senders {
        match &listener.trusted_senders {
            Some(TrustedSenders::Any) => Senders::Any,
            Some(TrustedSenders::Domains(list)) => {
                Senders::Listed(list.iter().map(|d| matchable(d)).collect())
            }
            None => {
                Senders::SendingDomains(config.domains.iter().map(|d| matchable(&d.name)).collect())
            }
        }
    }

    /// Why `domain` may not be used, to end "Sender domain x is ...", or `None` when it may.
    fn refusal(&self, domain: &str) -> Option<&'static str> {
        let (list, why) = match self {
            Senders::Any => return None,
            Senders::SendingDomains(list) => (list, "not one of this relay's sending domains"),
            Senders::Listed(list) => (list, "not in this listener's trusted_senders"),
        };
        let domain = domain.to_ascii_lowercase();
        (!list.contains(&domain)).then_some(why)
    }
}

/// A domain as the config writes it, as sender domains are compared: lower case, without a final dot.
fn matchable(domain: &str) -> String {
    domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase()
}

/// The MAIL FROM and RCPT TO decisions for one SMTP session, and the From: header check cleanup makes with
/// the same rules. Each refusal carries the `reason` label of `herald_smtp_rejections_total` it is counted
/// under.
#[derive(Debug)]
pub struct SessionPolicy {
    policy: Arc<Policy>,
    suppressions: Arc<Suppressions>,
    /// Set when the client is inside the listener's allowed networks: it may relay, as these senders.
    relaying: Option<Arc<Senders>>,
}

impl SessionPolicy {
    /// `relaying` is the listener's senders when the client is inside its allowed networks, `None` for a
    /// client of an inbound listener.
    pub fn new(
        policy: Arc<Policy>,
        suppressions: Arc<Suppressions>,
        relaying: Option<Arc<Senders>>,
    ) -> SessionPolicy {
        SessionPolicy {
            policy,
            suppressions,
            relaying,
        }
    }

    /// Whether this session's sender domains are checked at all; the From: header is read only then.
    pub fn checks_senders(&self, user: Option<&str>) -> bool {
        user.is_some() || self.relaying.as_deref().is_some_and(|s| *s != Senders::Any)
    }

    /// Why this session may not use `domain` as a sender (MAIL FROM or From:), to end "... is ", or `None`
    /// when it may. An authenticated user is held to its `allowed_domains`, whatever the listener.
    pub fn sender_refusal(&self, domain: &str, user: Option<&str>) -> Option<String> {
        match (user, self.relaying.as_deref()) {
            (Some(user), _) => (!self.policy.may_send_as(user, domain))
                .then(|| format!("not allowed for user {user}")),
            (None, Some(senders)) => senders.refusal(domain).map(str::to_owned),
            (None, None) => None,
        }
    }
}

impl EnvelopePolicy for SessionPolicy {
    /// An authenticated user sends only from its allowed domains, a trusted listener's client only from
    /// the listener's senders. The null sender is not checked here (cleanup checks its From: header); nor
    /// are inbound clients.
    fn mail_from(&self, from: &ReversePath, user: Option<&str>) -> Verdict {
        if let Some(m) = from.mailbox()
            && let Some(why) = self.sender_refusal(&m.domain, user)
        {
            let text = format!("Sender domain {} is {why}", m.domain);
            return Verdict::Refuse(Refusal::new(
                Reply::with_text(550, "5.7.1", text),
                RejectReason::SenderNotAllowed,
            ));
        }
        Verdict::Accept
    }

    fn rcpt_to(&self, to: &Mailbox, user: Option<&str>) -> Verdict {
        let local = self.policy.receives(to);
        if local && to.has_routing_syntax() {
            // %-hacks and bang paths were how open relays were abused; refuse them as relaying.
            return Verdict::RefuseAsError(Refusal::new(
                Reply::with_text(
                    554,
                    "5.7.1",
                    format!("<{to}>: Relay access denied (routing syntax in the local part)"),
                ),
                RejectReason::RelayDenied,
            ));
        }
        if local && !self.policy.accepts_local(&to.local) && !self.policy.is_own_postmaster(to) {
            // Only tokens and the feedback mailboxes exist here; anything else is a guess or a forgery.
            // Counted apart from suppressed recipients, which share the reply code.
            return Verdict::RefuseAsError(Refusal::new(
                Reply::with_text(550, "5.1.1", format!("<{to}>: no such mailbox")),
                RejectReason::UnknownRecipient,
            ));
        }
        if !local && self.relaying.is_none() && user.is_none() {
            return Verdict::RefuseAsError(Refusal::new(
                Reply::with_text(554, "5.7.1", format!("<{to}>: Relay access denied")),
                RejectReason::RelayDenied,
            ));
        }
        if let Some(entry) = self.suppressions.get(&to.to_string()) {
            // A sender that retries a bounced address is not probing: refused, not counted as an error.
            return Verdict::Refuse(Refusal::new(
                Reply::with_text(
                    550,
                    "5.1.1",
                    format!(
                        "<{to}>: recipient is suppressed ({}at {}: {})",
                        // Entries from before categories say only when.
                        entry
                            .category
                            .map_or(String::new(), |c| format!("{} ", c.as_str())),
                        entry
                            .added_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        entry.reason
                    ),
                ),
                RejectReason::Suppressed,
            ));
        }
        Verdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let hash = herald_config::password::hash("s3cret").unwrap();
        let config = Config::parse(&format!(
            r#"
hostname: relay.test
spool_dir: /tmp/x
listeners: [{{ name: a, address: "127.0.0.1:1" }}]
users: [{{ username: app, password_hash: "{hash}", allowed_domains: [Example.TEST] }}]
domains: [{{ name: example.test, return_path: bounces.example.test }}]
bounces: {{ secret_file: /nonexistent }}
"#
        ))
        .unwrap();
        Policy::from_config(&config)
    }

    #[test]
    fn passwords_verify_against_hashes() {
        let p = policy();
        assert!(p.verify_password("app", "s3cret"));
        assert!(!p.verify_password("app", "wrong"));
        assert!(!p.verify_password("nobody", "s3cret"));
    }

    #[test]
    fn dummy_hash_parses() {
        assert!(herald_config::password::check_format(DUMMY_HASH).is_ok());
    }

    #[test]
    fn domains() {
        let p = policy();
        assert!(p.may_send_as("app", "EXAMPLE.test"));
        assert!(!p.may_send_as("app", "other.test"));
        assert!(!p.may_send_as("nobody", "example.test"));
        assert!(p.is_local("Bounces.Example.Test"));
        assert!(!p.is_local("example.test"));
    }

    fn session_policy(trusted: bool) -> SessionPolicy {
        session_policy_with(trusted.then_some(Senders::Any))
    }

    fn session_policy_with(relaying: Option<Senders>) -> SessionPolicy {
        // The list's file lives on in the open handle after the directory is cleaned up.
        let suppressions = Suppressions::open(
            tempfile::tempdir().unwrap().path(),
            herald_config::Suppression::default(),
        )
        .unwrap();
        SessionPolicy::new(
            Arc::new(policy()),
            Arc::new(suppressions),
            relaying.map(Arc::new),
        )
    }

    fn mailbox(s: &str) -> Mailbox {
        herald_smtp::address::parse_forward_path(s).unwrap()
    }

    /// The reply line, and the reason when refused.
    fn rcpt(p: &SessionPolicy, to: &str, user: Option<&str>) -> (String, RejectReason, bool) {
        match p.rcpt_to(&mailbox(to), user) {
            // Accepted: the reason is never looked at.
            Verdict::Accept => ("accept".into(), RejectReason::Other, false),
            Verdict::Refuse(r) => (r.reply.to_string(), r.reason, false),
            Verdict::RefuseAsError(r) => (r.reply.to_string(), r.reason, true),
        }
    }

    #[test]
    fn untrusted_clients_cannot_relay_but_reach_local_domains() {
        let p = session_policy(false);
        let denied = |to: &str| {
            (
                format!("554 5.7.1 {to}: Relay access denied"),
                RejectReason::RelayDenied,
                true,
            )
        };
        assert_eq!(rcpt(&p, "<b@y.test>", None), denied("<b@y.test>"));
        assert_eq!(rcpt(&p, "<b@[127.0.0.1]>", None), denied("<b@[127.0.0.1]>"));
        assert_eq!(
            rcpt(&p, "<b%y.test@bounces.example.test>", None),
            (
                "554 5.7.1 <b%y.test@bounces.example.test>: Relay access denied (routing syntax in the local part)".into(),
                RejectReason::RelayDenied,
                true
            )
        );
        assert_eq!(
            rcpt(&p, "<Postmaster@BOUNCES.example.test>", None).0,
            "accept"
        );
        // A return-path domain has only its feedback mailboxes and tokens: no guessing addresses there.
        assert_eq!(
            rcpt(&p, "<b@bounces.example.test>", None),
            (
                "550 5.1.1 <b@bounces.example.test>: no such mailbox".into(),
                RejectReason::UnknownRecipient,
                true
            )
        );
        assert_eq!(
            rcpt(
                &p,
                "<b+0123456789abcdef-0123456789@bounces.example.test>",
                None
            )
            .0,
            "accept"
        );
        // Its own postmaster (a bare RCPT TO:<Postmaster> becomes postmaster@<hostname>), and nobody else
        // at its name.
        assert_eq!(rcpt(&p, "<POSTMASTER@Relay.Test>", None).0, "accept");
        assert_eq!(
            rcpt(&p, "<abuse@relay.test>", None),
            denied("<abuse@relay.test>")
        );
        let to = herald_smtp::address::parse_forward_path("<postmaster@relay.test>").unwrap();
        assert!(p.policy.receives(&to));
        // Trusted networks and authenticated users relay.
        assert_eq!(rcpt(&session_policy(true), "<b@y.test>", None).0, "accept");
        assert_eq!(rcpt(&p, "<b@y.test>", Some("app")).0, "accept");
    }

    #[test]
    fn suppressed_recipients_are_refused_at_rcpt() {
        let p = session_policy(true);
        p.suppressions
            .add_manual("Gone@Y.test", "550 5.1.1 no such user", None)
            .unwrap();
        let (line, reason, as_error) = rcpt(&p, "<gone@y.test>", None);
        assert!(
            line.starts_with("550 5.1.1 <gone@y.test>: recipient is suppressed (manual at "),
            "{line}"
        );
        assert!(line.ends_with(": 550 5.1.1 no such user)"), "{line}");
        assert_eq!((reason, as_error), (RejectReason::Suppressed, false));
        assert_eq!(rcpt(&p, "<here@y.test>", None).0, "accept");
    }

    #[test]
    fn authenticated_users_send_only_from_their_domains() {
        let p = session_policy(false);
        let from = |s: &str| herald_smtp::address::parse_reverse_path(s).unwrap();
        assert_eq!(
            p.mail_from(&from("<a@evil.test>"), Some("app")),
            Verdict::Refuse(Refusal::new(
                Reply::new(
                    550,
                    "5.7.1",
                    "Sender domain evil.test is not allowed for user app"
                ),
                RejectReason::SenderNotAllowed
            ))
        );
        assert_eq!(
            p.mail_from(&from("<a@Example.test>"), Some("app")),
            Verdict::Accept
        );
        assert_eq!(p.mail_from(&from("<>"), Some("app")), Verdict::Accept);
        assert_eq!(p.mail_from(&from("<a@evil.test>"), None), Verdict::Accept);
    }

    fn mail_from(p: &SessionPolicy, from: &str, user: Option<&str>) -> Verdict {
        p.mail_from(
            &herald_smtp::address::parse_reverse_path(from).unwrap(),
            user,
        )
    }

    fn refused(text: &str) -> Verdict {
        Verdict::Refuse(Refusal::new(
            Reply::with_text(550, "5.7.1", text.to_owned()),
            RejectReason::SenderNotAllowed,
        ))
    }

    /// The senders of the listener named `name` in a config with two sending domains.
    fn listener_senders(listener: &str) -> Senders {
        let config = Config::parse(&format!(
            "hostname: relay.test\nspool_dir: s\ndomains: [{{name: Example.TEST}}, {{name: other.test.}}]\n\
             listeners: [{{name: t, address: \"127.0.0.1:1\", allow_networks: [10.0.0.0/8]{listener}}}]\n"
        ))
        .unwrap();
        Senders::for_listener(&config, &config.listeners[0])
    }

    #[test]
    fn a_trusted_listener_sends_as_the_relays_sending_domains_by_default() {
        let senders = listener_senders("");
        assert_eq!(
            senders,
            Senders::SendingDomains(vec!["example.test".into(), "other.test".into()])
        );
        let p = session_policy_with(Some(senders));
        assert!(p.checks_senders(None));
        for ok in [
            "<a@example.test>",
            "<a@EXAMPLE.Test>",
            "<a@other.test>",
            "<>",
        ] {
            assert_eq!(mail_from(&p, ok, None), Verdict::Accept, "{ok}");
        }
        for (from, domain) in [
            ("<a@evil.test>", "evil.test"),
            ("<a@sub.example.test>", "sub.example.test"),
            ("<a@example.test.evil.test>", "example.test.evil.test"),
            ("<a@[127.0.0.1]>", "[127.0.0.1]"),
        ] {
            assert_eq!(
                mail_from(&p, from, None),
                refused(&format!(
                    "Sender domain {domain} is not one of this relay's sending domains"
                )),
                "{from}"
            );
        }
        // Still a relay for its clients: the sender is what is checked, not the recipient.
        assert_eq!(rcpt(&p, "<b@y.test>", None).0, "accept");
    }

    #[test]
    fn trusted_senders_narrows_or_opens_a_trusted_listener() {
        let listed = listener_senders(", trusted_senders: [Other.Test]");
        assert_eq!(listed, Senders::Listed(vec!["other.test".into()]));
        let p = session_policy_with(Some(listed));
        assert_eq!(mail_from(&p, "<a@other.test>", None), Verdict::Accept);
        assert_eq!(
            mail_from(&p, "<a@example.test>", None),
            refused("Sender domain example.test is not in this listener's trusted_senders")
        );
        let any = listener_senders(", trusted_senders: any");
        assert_eq!(any, Senders::Any);
        let p = session_policy_with(Some(any));
        assert!(!p.checks_senders(None));
        assert_eq!(mail_from(&p, "<a@evil.test>", None), Verdict::Accept);
        assert_eq!(p.sender_refusal("evil.test", None), None);
    }

    #[test]
    fn an_authenticated_user_is_held_to_its_own_domains_on_any_listener() {
        // A submission listener with allow_networks: the user's allowed_domains decide, not the listener.
        let p = session_policy_with(Some(Senders::Any));
        assert!(p.checks_senders(Some("app")));
        assert_eq!(
            p.sender_refusal("evil.test", Some("app")).as_deref(),
            Some("not allowed for user app")
        );
        let p = session_policy_with(Some(Senders::Listed(vec!["evil.test".into()])));
        assert_eq!(
            mail_from(&p, "<a@evil.test>", Some("app")),
            refused("Sender domain evil.test is not allowed for user app")
        );
        assert_eq!(
            mail_from(&p, "<a@example.test>", Some("app")),
            Verdict::Accept
        );
    }

    #[test]
    fn inbound_clients_send_as_anyone_but_only_to_local_domains() {
        let p = session_policy_with(None);
        assert!(!p.checks_senders(None));
        assert_eq!(
            mail_from(&p, "<mailer-daemon@far.test>", None),
            Verdict::Accept
        );
        assert_eq!(rcpt(&p, "<fbl@bounces.example.test>", None).0, "accept");
        assert_eq!(rcpt(&p, "<b@y.test>", None).1, RejectReason::RelayDenied);
    }
}
