//! The relay's configuration file: its types, defaults and validation.
//!
//! These types are the one definition of the file: the operator renders configs with them, so the two sides
//! cannot drift. Parsing is strict (unknown keys are errors) and [`Config::validate`] checks what serde
//! cannot express, naming the offending field the way a user would write it (`listeners[1].tls`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The embedded default: a trusted listener on loopback and a spool in the working directory, so that
/// `herald-relay` runs with no file and no cluster.
pub const DEFAULT_CONFIG: &str = r#"
hostname: localhost
spool_dir: ./herald-spool
listeners:
  - name: trusted
    address: 127.0.0.1:2525
    auth: none
    allow_networks: [127.0.0.0/8, "::1/128"]
admin: { address: 127.0.0.1:9090 }
"#;

/// Errors from reading or validating a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The whole relay config file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name in the banner, the EHLO reply and `Received:` headers.
    pub hostname: String,
    pub spool_dir: PathBuf,
    pub listeners: Vec<Listener>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<Domain>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_pools: Vec<IpPool>,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Events>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub bounces: Bounces,
}

/// Return-path tokens, the reports that come back to them, and how failures are classified.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bounces {
    /// HMAC-SHA256 keys that authenticate return-path tokens, one per line: the first signs, all verify
    /// (so a key can be rotated without losing the bounces of mail sent under the old one). Every replica
    /// must read the same file. Required when a domain has a `return_path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Local parts accepted at return-path domains without a token (feedback-loop and RFC 5321 addresses).
    #[serde(default = "default_mailboxes")]
    pub mailboxes: Vec<String>,
    /// Classification rules checked before the built-in ones, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<BounceRule>,
    /// Whether the built-in rules (the large mailbox providers' replies) follow the configured ones.
    #[serde(default = "yes")]
    pub builtin_rules: bool,
}

impl Default for Bounces {
    fn default() -> Bounces {
        Bounces {
            secret_file: None,
            mailboxes: default_mailboxes(),
            rules: Vec::new(),
            builtin_rules: true,
        }
    }
}

fn default_mailboxes() -> Vec<String> {
    ["postmaster", "abuse", "fbl"].map(String::from).to_vec()
}

fn yes() -> bool {
    true
}

/// A classification rule: every condition given must hold; the first matching rule decides the category.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BounceRule {
    /// An enhanced status code pattern: `5.1.1`, `x.7.26` (any class), or a prefix such as `5.7` or `x.4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The basic reply code, e.g. `421`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// Regular expressions, matched case-insensitively against the reply text; any one may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub text: Vec<String>,
    pub category: crate::outcome::Category,
}

/// Where delivery events go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// JSON lines appended to this file; `-` for standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

/// Events POSTed as JSON arrays, signed with HMAC-SHA256, retried until accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    /// File holding the shared secret for the `X-Herald-Signature` header.
    pub secret_file: PathBuf,
    /// Events per POST at most.
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Events held in memory while the endpoint is failing; the oldest are dropped beyond it (counted).
    #[serde(default = "default_buffer")]
    pub buffer: usize,
}

fn default_batch() -> usize {
    100
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_buffer() -> usize {
    100_000
}

/// Logging policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// Put recipient addresses in delivery log lines (they are personal data: off by default).
    pub recipients: bool,
}

/// One SMTP listening socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default)]
    pub auth: AuthMode,
    /// When not empty, clients outside these networks are refused at connect, and clients inside may relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_networks: Vec<IpNet>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    None,
    /// RFC 3207: plain connect, upgraded on the client's STARTTLS.
    Starttls,
    /// RFC 8314: TLS from the first byte.
    Implicit,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    None,
    /// A submission listener: AUTH is mandatory before MAIL, and the message is completed (Message-ID, Date).
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// An SMTP AUTH principal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub username: String,
    /// An argon2 PHC string; never a clear-text password.
    pub password_hash: String,
    /// Domains this user may use in MAIL FROM and in the From: header.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
}

/// A sending domain, rendered from a SendingDomain resource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    pub name: String,
    /// One key (a mapping) or several (a list): a domain with an RSA and an Ed25519 key signs with both
    /// (RFC 8463 section 3), and verifiers that know only RSA ignore the other signature.
    #[serde(default, with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<Dkim>,
    /// The domain used in MAIL FROM for bounces; the relay is its MX and accepts mail for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_pool: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dkim {
    pub selector: String,
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    pub key_file: PathBuf,
}

/// `dkim:` as one mapping or a list of them; written back as a mapping when there is one.
mod one_or_many {
    use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Serialize, Serializer};

    use super::Dkim;

    pub fn serialize<S: Serializer>(v: &[Dkim], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Dkim>, D::Error> {
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = Vec<Dkim>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a DKIM key ({selector, algorithm, key_file}) or a list of them")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Dkim::deserialize(MapAccessDeserializer::new(map)).map(|k| vec![k])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<Dkim>::deserialize(SeqAccessDeserializer::new(seq))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum DkimAlgorithm {
    #[default]
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IpPool {
    pub name: String,
    pub sources: Vec<Source>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub address: std::net::IpAddr,
    pub ehlo: String,
}

/// Outbound delivery policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    pub dns: Option<Dns>,
    /// Port of the MX hosts; tests point it at a loopback sink.
    pub port: u16,
    pub smarthost: Option<Smarthost>,
    /// STARTTLS towards MX hosts.
    pub tls: OutboundTls,
    pub retry: Retry,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub per_domain: PerDomain,
    pub timeouts: Timeouts,
}

/// STARTTLS policy towards MX hosts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTls {
    /// Never start TLS.
    None,
    /// Use STARTTLS when offered; fall back to plain text if it is not (RFC 3207's default).
    #[default]
    Opportunistic,
    /// Defer rather than send in plain text. Certificates are not verified (MTA-STS and DANE are not
    /// implemented yet), so this guards against passive observers only.
    Required,
}

/// Time limits of the SMTP client (RFC 5321 section 4.5.3.2 gives the minimums).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Per command reply, greeting included.
    #[serde(with = "humantime_serde")]
    pub command: Duration,
    /// Sending the message and waiting for the final reply.
    #[serde(with = "humantime_serde")]
    pub data: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            command: Duration::from_secs(300),
            data: Duration::from_secs(600),
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            dns: None,
            port: 25,
            smarthost: None,
            tls: OutboundTls::default(),
            retry: Retry::default(),
            max_age: Duration::from_secs(5 * 86400),
            per_domain: PerDomain::default(),
            timeouts: Timeouts::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Smarthost {
    pub host: String,
    #[serde(default = "default_smarthost_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

fn default_smarthost_port() -> u16 {
    587
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    #[serde(with = "humantime_serde")]
    pub first: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    pub factor: f64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            first: Duration::from_secs(60),
            max: Duration::from_secs(4 * 3600),
            factor: 2.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PerDomain {
    pub max_connections: u32,
    pub messages_per_connection: u32,
}

impl Default for PerDomain {
    fn default() -> Self {
        PerDomain {
            max_connections: 10,
            messages_per_connection: 100,
        }
    }
}

/// Limits of the SMTP front door; each one maps to a reply code a client can act on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Bytes; advertised in the EHLO SIZE keyword.
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Bad commands in one session before it is closed with 421.
    pub max_errors: u32,
    /// Octets including CRLF, for command lines and message lines alike.
    pub max_line_length: usize,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 35 * 1024 * 1024,
            max_recipients: 1000,
            max_connections: 1000,
            max_connections_per_client: 100,
            max_errors: 10,
            max_line_length: 2048,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: SocketAddr,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // serde_path_to_error tracks where in the document the deserializer was, so an error names the
        // field as a user writes it (`listeners[2].tls`) rather than only a line and column.
        let mut path = None;
        let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
                path = Some(e.path().to_string());
                e.into_inner()
            })
        });
        let config = parsed.map_err(|e| parse_error(path.as_deref().unwrap_or("."), &e))?;
        config.validate()?;
        Ok(config)
    }

    /// The embedded default config.
    pub fn embedded_default() -> Config {
        // The embedded text is part of the binary and covered by a unit test; failing here is a build bug.
        Config::parse(DEFAULT_CONFIG).expect("embedded default config is valid")
    }

    /// Checks what the types cannot: references, uniqueness, well-formed names and hashes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_domain_name(&self.hostname) {
            return Err(invalid(
                "hostname",
                format!("{:?} is not a host name", self.hostname),
            ));
        }
        if self.spool_dir.as_os_str().is_empty() {
            return Err(invalid("spool_dir", "must not be empty"));
        }
        if self.listeners.is_empty() {
            return Err(invalid("listeners", "at least one listener is needed"));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let field = format!("listeners[{i}]");
            if l.name.is_empty() {
                return Err(invalid(format!("{field}.name"), "must not be empty"));
            }
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("listener name {:?} is used twice", l.name),
                ));
            }
            if let Some(o) = self.listeners[..i].iter().find(|o| o.address == l.address) {
                return Err(invalid(
                    format!("{field}.address"),
                    format!("{} is also the address of listener {:?}", l.address, o.name),
                ));
            }
            if l.tls != TlsMode::None && self.tls.is_none() {
                return Err(invalid(
                    "tls",
                    format!(
                        "listener {:?} uses TLS but there is no tls section with cert_file and key_file",
                        l.name
                    ),
                ));
            }
            if l.auth == AuthMode::Required && l.tls == TlsMode::None {
                return Err(invalid(
                    format!("{field}.auth"),
                    "auth: required needs tls: starttls or implicit (passwords are never sent in clear)",
                ));
            }
            if l.auth == AuthMode::Required && self.users.is_empty() {
                return Err(invalid(
                    "users",
                    format!(
                        "listener {:?} requires auth but no users are configured",
                        l.name
                    ),
                ));
            }
        }
        for (i, u) in self.users.iter().enumerate() {
            let field = format!("users[{i}]");
            if u.username.is_empty() {
                return Err(invalid(format!("{field}.username"), "must not be empty"));
            }
            if self.users[..i].iter().any(|o| o.username == u.username) {
                return Err(invalid(
                    format!("{field}.username"),
                    format!("user {:?} is defined twice", u.username),
                ));
            }
            if let Err(e) = argon2::PasswordHash::new(&u.password_hash) {
                return Err(invalid(
                    format!("{field}.password_hash"),
                    format!(
                        "not an argon2 PHC string ({e}); make one with `herald-relay hash-password`"
                    ),
                ));
            }
            for (j, d) in u.allowed_domains.iter().enumerate() {
                if !is_domain_name(d) {
                    return Err(invalid(
                        format!("{field}.allowed_domains[{j}]"),
                        format!("{d:?} is not a domain name"),
                    ));
                }
            }
        }
        for (i, d) in self.domains.iter().enumerate() {
            let field = format!("domains[{i}]");
            if !is_domain_name(&d.name) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} is not a domain name", d.name),
                ));
            }
            if self.domains[..i]
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&d.name))
            {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("domain {:?} is defined twice", d.name),
                ));
            }
            if let Some(rp) = &d.return_path {
                if !is_domain_name(rp) {
                    return Err(invalid(
                        format!("{field}.return_path"),
                        format!("{rp:?} is not a domain name"),
                    ));
                }
                if self.bounces.secret_file.is_none() {
                    return Err(invalid(
                        format!("{field}.return_path"),
                        "needs bounces.secret_file, the key that authenticates return-path tokens",
                    ));
                }
            }
            if let Some(pool) = &d.ip_pool
                && !self.ip_pools.iter().any(|p| &p.name == pool)
            {
                return Err(invalid(
                    format!("{field}.ip_pool"),
                    format!("no ip_pools entry is named {pool:?}"),
                ));
            }
            for (j, dkim) in d.dkim.iter().enumerate() {
                let at = if d.dkim.len() == 1 {
                    format!("{field}.dkim")
                } else {
                    format!("{field}.dkim[{j}]")
                };
                if dkim.selector.is_empty() {
                    return Err(invalid(format!("{at}.selector"), "must not be empty"));
                }
                if d.dkim[..j].iter().any(|o| o.algorithm == dkim.algorithm) {
                    return Err(invalid(
                        format!("{at}.algorithm"),
                        "one key per algorithm: a second signature of the same kind adds nothing",
                    ));
                }
            }
        }
        for (i, p) in self.ip_pools.iter().enumerate() {
            if p.sources.is_empty() {
                return Err(invalid(
                    format!("ip_pools[{i}].sources"),
                    "a pool needs at least one source address",
                ));
            }
        }
        let r = &self.delivery.retry;
        if !(r.factor.is_finite() && r.factor >= 1.0) {
            return Err(invalid(
                "delivery.retry.factor",
                "must be a number of at least 1.0",
            ));
        }
        if r.first.is_zero() || r.max < r.first {
            return Err(invalid(
                "delivery.retry",
                "first must be positive and max at least first",
            ));
        }
        let pd = &self.delivery.per_domain;
        if pd.max_connections == 0 || pd.messages_per_connection == 0 {
            return Err(invalid(
                "delivery.per_domain",
                "max_connections and messages_per_connection must be greater than 0",
            ));
        }
        if let Some(sh) = &self.delivery.smarthost {
            if sh.host.is_empty() {
                return Err(invalid("delivery.smarthost.host", "must not be empty"));
            }
            if sh.username.is_some() != sh.password_file.is_some() {
                return Err(invalid(
                    "delivery.smarthost",
                    "username and password_file go together",
                ));
            }
            if sh.username.is_some() && sh.tls == TlsMode::None {
                return Err(invalid(
                    "delivery.smarthost.tls",
                    "AUTH needs tls: starttls or implicit (credentials are never sent in clear)",
                ));
            }
        }
        if let Some(dns) = &self.delivery.dns
            && dns.nameservers.is_empty()
        {
            return Err(invalid(
                "delivery.dns.nameservers",
                "list at least one nameserver, or leave out delivery.dns for the system resolver",
            ));
        }
        if let Some(w) = self.events.as_ref().and_then(|e| e.webhook.as_ref()) {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(invalid(
                    "events.webhook.url",
                    "must be an http:// or https:// URL",
                ));
            }
            if w.batch == 0 || w.buffer == 0 {
                return Err(invalid(
                    "events.webhook",
                    "batch and buffer must be greater than 0",
                ));
            }
        }
        self.validate_bounces()?;
        let lim = &self.limits;
        if lim.max_line_length < 512 {
            return Err(invalid(
                "limits.max_line_length",
                "must be at least 512 (RFC 5321 section 4.5.3.1.4)",
            ));
        }
        for (name, value) in [
            ("limits.max_message_size", lim.max_message_size),
            ("limits.max_recipients", lim.max_recipients),
            ("limits.max_connections", lim.max_connections),
            (
                "limits.max_connections_per_client",
                lim.max_connections_per_client,
            ),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        if lim.command_timeout.is_zero() || lim.data_timeout.is_zero() {
            return Err(invalid("limits", "timeouts must be greater than 0"));
        }
        Ok(())
    }

    fn validate_bounces(&self) -> Result<(), ConfigError> {
        for (i, m) in self.bounces.mailboxes.iter().enumerate() {
            if m.is_empty() || m.contains(['@', ' ', '"']) {
                return Err(invalid(
                    format!("bounces.mailboxes[{i}]"),
                    format!("{m:?} is not a local part"),
                ));
            }
        }
        for (i, r) in self.bounces.rules.iter().enumerate() {
            let field = format!("bounces.rules[{i}]");
            if r.status.is_none() && r.code.is_none() && r.text.is_empty() {
                return Err(invalid(
                    field,
                    "give at least one of status, code and text (a rule without conditions matches everything)",
                ));
            }
            if let Some(s) = &r.status
                && crate::outcome::StatusPattern::parse(s).is_none()
            {
                return Err(invalid(
                    format!("{field}.status"),
                    format!(
                        "{s:?} is not an enhanced status code pattern such as 5.1.1, x.7.26 or 4.4"
                    ),
                ));
            }
            if let Some(c) = r.code
                && !(200..600).contains(&c)
            {
                return Err(invalid(
                    format!("{field}.code"),
                    format!("{c} is not an SMTP reply code"),
                ));
            }
            for (j, t) in r.text.iter().enumerate() {
                if let Err(e) = regex::Regex::new(t) {
                    return Err(invalid(format!("{field}.text[{j}]"), e.to_string()));
                }
            }
        }
        Ok(())
    }
}

fn parse_error(path: &str, e: &serde_saphyr::Error) -> ConfigError {
    let message = e.without_snippet().to_string();
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    if path == "." {
        ConfigError::Parse(message.to_owned())
    } else {
        ConfigError::Invalid {
            field: path.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// A host or domain name in the LDH syntax (RFC 1035, with RFC 1123's leading digits), or an A-label.
pub fn is_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default();
        assert_eq!(c.listeners[0].allow_networks.len(), 2);
    }

    #[test]
    fn design_example_parses() {
        let c = Config::parse(
            r#"
hostname: relay.example.test
spool_dir: /var/lib/herald/spool
listeners:
  - name: submission
    address: 0.0.0.0:587
    tls: starttls
    auth: required
  - name: trusted
    address: 0.0.0.0:2525
    auth: none
    allow_networks: [10.0.0.0/8]
tls: { cert_file: /etc/herald/tls/tls.crt, key_file: /etc/herald/tls/tls.key }
users:
  - username: app
    password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$5gqTt8S6NUXAwTCq+3eE1QKqPzB3P7vQ5ny1dB1Hd5w"
    allowed_domains: [example.test]
domains:
  - name: example.test
    dkim: { selector: herald1, algorithm: rsa-sha256, key_file: /etc/herald/dkim/example.test.pem }
    return_path: bounces.example.test
    ip_pool: default
bounces: { secret_file: /etc/herald/bounces/keys }
ip_pools:
  - name: default
    sources: [ { address: 0.0.0.0, ehlo: relay.example.test } ]
delivery:
  dns: { nameservers: ["127.0.0.1:5353"] }
  port: 25
  smarthost: null
  retry: { first: 1m, max: 4h, factor: 2.0 }
  max_age: 5d
  per_domain: { max_connections: 10, messages_per_connection: 100 }
admin: { address: 127.0.0.1:9090 }
"#,
        )
        .unwrap();
        assert_eq!(c.delivery.max_age, Duration::from_secs(5 * 86400));
        let rp = crate::outcome::verp::ReturnPaths::new(&c, Vec::new());
        assert!(rp.is_local("BOUNCES.example.test"));
        assert!(!rp.is_local("example.test"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("hostname: a\nspool_dir: s\nlisteners: []\nbogus: 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = err(
            "hostname: a\nspool_dir: s\nlisteners:\n - {name: x, address: \"127.0.0.1:1\"}\n - {name: y, address: \"127.0.0.1:2\", tls: sometimes}\n",
        );
        assert!(e.starts_with("listeners[1].tls: "), "{e}");
        let e =
            err("hostname: a\nspool_dir: s\nlisteners: []\nlimits: { command_timeout: soon }\n");
        assert!(e.starts_with("limits.command_timeout: "), "{e}");
    }

    #[test]
    fn duplicate_listener_is_named() {
        let e = err(
            "hostname: a\nspool_dir: s\nlisteners:\n - {name: x, address: 127.0.0.1:1}\n - {name: x, address: 127.0.0.1:2}\n",
        );
        assert!(e.starts_with("listeners[1].name:"), "{e}");
    }

    #[test]
    fn tls_listener_needs_tls_files() {
        let e = err(
            "hostname: a\nspool_dir: s\nlisteners:\n - {name: x, address: 127.0.0.1:1, tls: implicit}\n",
        );
        assert!(e.starts_with("tls:"), "{e}");
    }

    #[test]
    fn bad_password_hash_is_named() {
        let e = err(
            "hostname: a\nspool_dir: s\nlisteners:\n - {name: x, address: 127.0.0.1:1}\nusers:\n - {username: u, password_hash: secret}\n",
        );
        assert!(e.starts_with("users[0].password_hash:"), "{e}");
    }

    #[test]
    fn serialized_config_parses_back() {
        let c = Config::embedded_default();
        let text = serde_saphyr::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c);
    }
}
