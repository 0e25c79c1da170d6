//! Who may send what: SMTP AUTH principals, the domains each may send as, and which domains are local.
//!
//! Built once from the config and shared by every session; reloading the config builds a new one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::outcome::verp::ReturnPaths;
use herald_config::Config;

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
}
