//! The relay's configuration file: its types, defaults and validation.
//!
//! These types are the one definition of the file: the operator renders configs with them, so the two sides
//! cannot drift. Parsing is strict (unknown keys are errors) and [`Config::validate`] checks what serde
//! cannot express, naming the offending field the way a user would write it (`listeners[1].tls`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The embedded default: a trusted listener on loopback and a spool in the working directory, so that
/// `herald-relay` runs with no file and no cluster. It has no sending domains, so it signs nothing and no
/// sender domain is more its own than another: its listener takes any sender (`trusted_senders: any`).
pub const DEFAULT_CONFIG: &str = r#"
hostname: localhost
spool_dir: ./herald-spool
listeners:
  - name: trusted
    address: 127.0.0.1:2525
    auth: none
    trusted_senders: any
    allow_networks: [127.0.0.0/8, "::1/128"]
metrics: { address: 127.0.0.1:9090 }
admin: { address: 127.0.0.1:9091 }
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

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The whole relay config file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name in the banner, the EHLO reply and `Received:` headers.
    pub hostname: String,
    /// Directory of the durable spool (messages, queue state, suppressions); a persistent volume in a pod.
    pub spool_dir: PathBuf,
    /// The SMTP listening sockets: submission (`auth: required`), trusted (`allow_networks`) or inbound.
    pub listeners: Vec<Listener>,
    /// The certificate served by listeners with `tls: starttls` or `tls: implicit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// SMTP AUTH principals of submission listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Sending domains: DKIM keys, return path, IP pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<Domain>,
    /// Source addresses for outbound connections, picked by `domains[].ip_pool`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_pools: Vec<IpPool>,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub limits: Limits,
    /// The HTTP listener for Prometheus and the Kubernetes probes: `/metrics`, `/healthz`, `/readyz`, and
    /// nothing else; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsEndpoint>,
    /// The HTTP listener of the queue and suppression API (`herald-relay admin` talks to it); none when
    /// absent. Anyone who reaches it can delete queued mail: keep it on loopback or set `token_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Events>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub bounces: Bounces,
    /// When a failing address goes on the suppression list, and for how long.
    #[serde(default)]
    pub suppression: crate::Suppression,
    /// The Valkey (or Redis) instance the relays of a fleet share suppressions through; absent, each relay
    /// keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::Store>,
    /// How long each step of the drain after SIGTERM may take. In Kubernetes the pod's
    /// `terminationGracePeriodSeconds` must cover their sum; the operator derives it from these.
    #[serde(default)]
    pub shutdown: Shutdown,
    /// Left out of a rendered config when it holds the defaults, so that a relay older than it takes it.
    #[serde(default, skip_serializing_if = "crate::Shaping::is_default")]
    pub shaping: crate::Shaping,
}

/// The drain after SIGTERM, step by step: sessions in flight finish, deliveries in flight record their
/// outcome, events reach their outputs. Each step ends at its limit; what is cut off is not lost (the spool
/// keeps it), only retried after the restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// SMTP sessions in flight may finish their transaction.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub sessions: Duration,
    /// Deliveries in flight may finish and record their outcome (else they are retried after the restart,
    /// and may arrive twice).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub deliveries: Duration,
    /// Events still buffered may reach the file and the webhook.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub events: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            sessions: Duration::from_secs(30),
            deliveries: Duration::from_secs(30),
            events: Duration::from_secs(10),
        }
    }
}

impl Shutdown {
    /// The longest the whole drain can take.
    pub fn total(&self) -> Duration {
        self.sessions + self.deliveries + self.events
    }
}

/// Return-path tokens, the reports that come back to them, and how failures are classified.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
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
    pub category: crate::bounce::Category,
}

/// Where delivery events go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// JSON lines appended to this file; `-` for standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

/// Events POSTed as JSON arrays, signed with HMAC-SHA256, retried until accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// The endpoint, `http://` or `https://`.
    pub url: String,
    /// File holding the shared secret for the `X-Herald-Signature` header.
    pub secret_file: PathBuf,
    /// Events per POST at most.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Time limit of one POST.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
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
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// Put recipient addresses in delivery log lines (they are personal data: off by default).
    pub recipients: bool,
}

/// One SMTP listening socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique; the `listener` label of metrics and events.
    pub name: String,
    /// IP address and port to listen on, e.g. `0.0.0.0:587`.
    pub address: SocketAddr,
    /// `starttls` (RFC 3207, port 587), `implicit` (RFC 8314, port 465) or `none`.
    #[serde(default)]
    pub tls: TlsMode,
    /// `required` makes a submission port: AUTH before MAIL, only under TLS.
    #[serde(default)]
    pub auth: AuthMode,
    /// When not empty, clients outside these networks are refused at connect, and clients inside may relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<crate::schema::Network>")]
    pub allow_networks: Vec<IpNet>,
    /// On a trusted listener (`allow_networks`, no `auth`): the domains its clients may send as, in MAIL
    /// FROM and in the From: header (550 5.7.1 otherwise). Absent: the relay's sending domains
    /// (`domains[].name`); a list: exactly those domains; `any`: every sender, unchecked. Not allowed on a
    /// submission listener (its users' `allowed_domains` decide) nor on an inbound one (it relays nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_senders: Option<TrustedSenders>,
}

/// `listeners[].trusted_senders`: the word `any`, or a list of domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustedSenders {
    /// `any`: a client inside the networks may send as anyone, and its mail for a configured domain is
    /// DKIM-signed.
    Any,
    /// Only these domains (matched without regard to case, never their subdomains).
    Domains(Vec<String>),
}

impl Serialize for TrustedSenders {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TrustedSenders::Any => s.serialize_str("any"),
            TrustedSenders::Domains(d) => d.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TrustedSenders {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TrustedSenders, D::Error> {
        use serde::de::value::SeqAccessDeserializer;
        use serde::de::{Error, SeqAccess, Visitor};

        // By hand rather than `#[serde(untagged)]`, whose error ("did not match any variant") names neither
        // form a user may write.
        struct AnyOrList;
        impl<'de> Visitor<'de> for AnyOrList {
            type Value = TrustedSenders;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`any` or a list of domains")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<TrustedSenders, E> {
                if v == "any" {
                    Ok(TrustedSenders::Any)
                } else {
                    Err(E::custom(format!(
                        "{v:?} is neither `any` nor a list of domains (write [{v}] for one domain)"
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<TrustedSenders, A::Error> {
                Vec::<String>::deserialize(SeqAccessDeserializer::new(seq))
                    .map(TrustedSenders::Domains)
            }
        }
        d.deserialize_any(AnyOrList)
    }
}

impl JsonSchema for TrustedSenders {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TrustedSenders".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [
                { "type": "string", "enum": ["any"] },
                { "type": "array", "items": { "type": "string" } },
            ],
        })
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    None,
    /// RFC 3207: plain connect, upgraded on the client's STARTTLS.
    Starttls,
    /// RFC 8314: TLS from the first byte.
    Implicit,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    None,
    /// A submission listener: AUTH is mandatory before MAIL, and the message is completed (Message-ID, Date).
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first; reloaded when it changes.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate.
    pub key_file: PathBuf,
}

/// An SMTP AUTH principal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The AUTH PLAIN/LOGIN user name.
    pub username: String,
    /// An argon2 PHC string; never a clear-text password.
    pub password_hash: String,
    /// Domains this user may use in MAIL FROM and in the From: header.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
}

/// A sending domain, rendered from a SendingDomain resource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// The domain of MAIL FROM and From: addresses this entry applies to.
    pub name: String,
    /// One key (a mapping) or several (a list): a domain with an RSA and an Ed25519 key signs with both
    /// (RFC 8463 section 3), and verifiers that know only RSA ignore the other signature.
    #[serde(default, with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "crate::schema::OneOrMany<Dkim>")]
    pub dkim: Vec<Dkim>,
    /// The domain used in MAIL FROM for bounces; the relay is its MX and accepts mail for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_path: Option<String>,
    /// The `ip_pools` entry whose addresses this domain's mail leaves from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_pool: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dkim {
    /// The `s=` tag: the key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// The signing algorithm; it must match the key.
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// PKCS#8 PEM private key; reloaded when it changes.
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

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub enum DkimAlgorithm {
    #[default]
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpPool {
    /// Referenced by `domains[].ip_pool`.
    pub name: String,
    /// The local addresses outbound connections are made from.
    pub sources: Vec<Source>,
    /// Daily caps for the pool's new addresses (those with a `warmup_start`): a shipped `preset` or a
    /// written `schedule`. An address over today's cap sends nothing more today: its mail goes from the
    /// pool's other addresses, or waits for the next day when none has room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<crate::Warmup>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A local IP address of this host (the pod's); connections are bound to it.
    pub address: std::net::IpAddr,
    /// The EHLO name sent from this address; should match its reverse DNS.
    pub ehlo: String,
    /// This address's share of the pool's mail against the other addresses' weights: 3 and 1 send three
    /// messages from the first for each from the second. 0 sends nothing from it (a source being retired);
    /// one address of the pool at least must weigh more.
    #[serde(
        default = "default_source_weight",
        skip_serializing_if = "is_default_source_weight"
    )]
    pub weight: u32,
    /// The first day of this address's warm-up under the pool's `warmup` schedule; absent, the address is
    /// warm and has no daily cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_start: Option<crate::WarmupStart>,
}

fn default_source_weight() -> u32 {
    1
}

// Left out of a rendered config when 1, so that a relay older than weights still takes it.
fn is_default_source_weight(w: &u32) -> bool {
    *w == 1
}

/// The largest weight: sums over a pool stay far from overflowing.
pub const MAX_SOURCE_WEIGHT: u32 = 1_000_000;

/// Outbound delivery policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// Nameservers for MX and address look-ups; the system resolver when absent.
    pub dns: Option<Dns>,
    /// Port of the MX hosts; tests point it at a loopback sink.
    pub port: u16,
    /// Send everything through this relay host instead of to MX hosts.
    pub smarthost: Option<Smarthost>,
    /// STARTTLS towards MX hosts.
    pub tls: OutboundTls,
    /// When a deferred recipient is tried again.
    pub retry: Retry,
    /// How long a recipient may stay queued; then it expires and the sender gets a DSN.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub max_age: Duration,
    /// How long a recipient may stay deferred before its sender gets one "delayed" DSN, if the sender asked
    /// for delay notices (RCPT with NOTIFY=DELAY; without NOTIFY, or with a NOTIFY that leaves DELAY out,
    /// none is sent, as RFC 3461 section 4.1 asks). `max_age` or more: none at all.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub delay_warning: Duration,
    /// Limits per destination domain, and per source address for mail of an `ip_pools` entry (receivers
    /// count connections and rates per sending address).
    pub per_domain: PerDomain,
    /// Delivery connections open at once, all destinations together; ready work beyond waits for a free
    /// one. Each costs little memory (the message is streamed from the spool), but not none. When absent:
    /// one per 2 MiB of the container's memory limit (16 to 1000), or 200 when no limit is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    pub timeouts: Timeouts,
}

/// STARTTLS policy towards MX hosts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Establishing the TCP connection.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub connect: Duration,
    /// Per command reply, greeting included.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub command: Duration,
    /// Sending the message and waiting for the final reply.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
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
            delay_warning: Duration::from_secs(4 * 3600),
            per_domain: PerDomain::default(),
            max_connections: None,
            timeouts: Timeouts::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// `ip:port` of each nameserver, tried in order.
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Smarthost {
    /// Host name or IP address of the smarthost; also the name its certificate must be valid for.
    pub host: String,
    /// The smarthost's port.
    #[serde(default = "default_smarthost_port")]
    pub port: u16,
    /// How the connection is secured: `starttls` on 587, `implicit` on 465. The smarthost's certificate must
    /// verify (chain to the system's CA certificates or `ca_file`, valid for `host`), else the attempt is
    /// deferred.
    #[serde(default)]
    pub tls: TlsMode,
    /// AUTH user name; goes with `password_file` and needs `tls: starttls` or `implicit`. Sent only once the
    /// smarthost's certificate has verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the AUTH password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM file of CA certificates trusted for the smarthost's certificate besides the system's (e.g. the
    /// `ca.crt` of a cert-manager Secret); read at start and on every reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_smarthost_port() -> u16 {
    587
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// The delay before the second attempt.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub first: Duration,
    /// The longest delay between attempts.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub max: Duration,
    /// Each delay is the previous one times this (at least 1.0), with +-10% jitter.
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PerDomain {
    /// Concurrent connections to one destination domain: per relay, or for the whole fleet when the relays
    /// share a `store` (each connection then takes a lease there).
    pub max_connections: u32,
    /// Messages sent on one connection before it is closed and a new one opened.
    pub messages_per_connection: u32,
    /// Messages to one destination domain per period (`600/min`, `10/s`) on average, with bursts of up to
    /// the count after a quiet period: per relay, or for the whole fleet when the relays share a `store`. A message over the rate waits in
    /// the queue for its turn, which is not a delivery attempt. Absent: no rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_rate: Option<crate::Rate>,
}

impl Default for PerDomain {
    fn default() -> Self {
        PerDomain {
            max_connections: 10,
            messages_per_connection: 100,
            max_message_rate: None,
        }
    }
}

/// Limits of the SMTP front door; each one maps to a reply code a client can act on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Bytes; advertised in the EHLO SIZE keyword. At most 1 GiB.
    pub max_message_size: usize,
    /// RCPT commands per transaction; 452 4.5.3 beyond.
    pub max_recipients: usize,
    /// Concurrent SMTP sessions; 421 4.7.0 at connect beyond.
    pub max_connections: usize,
    /// Concurrent SMTP sessions from one client address; 421 4.7.0 at connect beyond.
    pub max_connections_per_client: usize,
    /// Bad commands in one session before it is closed with 421.
    pub max_errors: u32,
    /// Octets including CRLF, for command lines and message lines alike.
    pub max_line_length: usize,
    /// Waiting for the client's next command, and for a client to take a reply; then 421 4.4.2 and the
    /// session closes.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub command_timeout: Duration,
    /// Receiving the whole message after DATA or the first BDAT.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub data_timeout: Duration,
    /// The longest an SMTP session may last, however active: a client that trickles a byte now and then
    /// cannot hold a connection for ever. Then 421 4.4.2 and the session closes.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub max_session_duration: Duration,
    /// Failed AUTH attempts from one client address within `auth_failure_window`; beyond, AUTH from that
    /// address is refused (454 4.7.0) without checking the password until the window has passed.
    pub auth_failures_per_client: u32,
    /// How long failed AUTH attempts count against their client address.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub auth_failure_window: Duration,
    /// Bytes of message bodies all sessions together may hold in memory while they are received and
    /// stored; a message that would go beyond is refused with 452 4.3.1 (the client tries again later), so
    /// a burst of messages cannot push the relay past its memory limit. A session holds at most about
    /// 320 KiB of any message (more moves to the spool as it arrives), so this bounds how many sessions
    /// receive at once rather than how large a message may be. When absent: a quarter of the container's
    /// memory limit, or 256 MiB when no limit is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inbound_bytes: Option<u64>,
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
            max_session_duration: Duration::from_secs(3600),
            auth_failures_per_client: 10,
            auth_failure_window: Duration::from_secs(900),
            max_inbound_bytes: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsEndpoint {
    /// IP address and port of the HTTP listener, e.g. `0.0.0.0:9090`.
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// IP address and port of the HTTP listener, e.g. `127.0.0.1:9091`.
    pub address: SocketAddr,
    /// File holding the bearer token every request must carry (`Authorization: Bearer <token>`; 401
    /// without it). Read again on every request, so a rotated Secret takes effect without a restart.
    /// Without it the API is open to whoever reaches the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_store_section_is_checked_field_by_field() {
        let base = "hostname: h.example.test\nspool_dir: /s\nlisteners: [{name: t, address: \"127.0.0.1:25\", auth: none, trusted_senders: any, allow_networks: [127.0.0.0/8]}]\n";
        let with = |store: &str| format!("{base}store: {store}\n");
        let ok = Config::parse(&with("{url: \"redis://valkey:6379/0\"}")).unwrap();
        let store = ok.store.unwrap();
        assert_eq!(store.key_prefix, "herald:");
        assert_eq!(store.fleet_size, 1);
        assert!(!store.required);
        for (store, field, says) in [
            ("{url: \"http://valkey\"}", "store.url", "redis://"),
            ("{url: \"redis://\"}", "store.url", "no host"),
            (
                "{url: \"redis://v\", key_prefix: \"\"}",
                "store.key_prefix",
                "non-empty",
            ),
            (
                "{url: \"redis://v\", tls: {ca_file: /ca.pem}}",
                "store.tls",
                "rediss://",
            ),
            (
                "{url: \"rediss://v\", fleet_size: 0}",
                "store.fleet_size",
                "at least 1",
            ),
            (
                "{url: \"redis://v\", resync_interval: 10ms}",
                "store.resync_interval",
                "1s",
            ),
            (
                "{url: \"redis://v\", nodes: [\"w:6379\"]}",
                "store.nodes",
                "cluster or sentinel_master",
            ),
            (
                "{url: \"redis://v\", cluster: true, nodes: [\"w:6379\", \"redis://x:6379\"]}",
                "store.nodes[1]",
                "host:port",
            ),
            (
                "{url: \"redis://v\", cluster: true, nodes: [\"w\"]}",
                "store.nodes[0]",
                "host:port",
            ),
            (
                "{url: \"redis://v\", cluster: true, nodes: [\"a:b:6379\"]}",
                "store.nodes[0]",
                "host:port",
            ),
            (
                "{url: \"redis://v:6379/2\", cluster: true}",
                "store.url",
                "database 0",
            ),
            (
                "{url: \"redis://v\", cluster: true, sentinel_master: m}",
                "store.sentinel_master",
                "not both",
            ),
            (
                "{url: \"redis://v\", sentinel_master: \"\"}",
                "store.sentinel_master",
                "name",
            ),
        ] {
            let e = err(&with(store));
            assert!(e.starts_with(field) && e.contains(says), "{store}: {e}");
        }
        assert!(Config::parse(&with("{url: \"rediss://v\", tls: {ca_file: /ca.pem}}")).is_ok());
        let cluster = Config::parse(&with(
            "{url: \"redis://:pw@v-0:6379/0\", cluster: true, nodes: [\"v-1:6379\", \"[::1]:7000\"]}",
        ))
        .unwrap()
        .store
        .unwrap();
        assert!(cluster.cluster);
        assert_eq!(cluster.nodes, ["v-1:6379", "[::1]:7000"]);
        let sentinel = Config::parse(&with(
            "{url: \"redis://s-0:26379/1\", sentinel_master: herald, nodes: [\"s-1:26379\"]}",
        ))
        .unwrap()
        .store
        .unwrap();
        assert_eq!(sentinel.sentinel_master.as_deref(), Some("herald"));
    }

    #[test]
    fn source_weights_are_checked() {
        let base = "hostname: h.example.test\nspool_dir: /s\nlisteners: [{name: t, address: \"127.0.0.1:25\", auth: none, trusted_senders: any, allow_networks: [127.0.0.0/8]}]\n";
        let with = |sources: &str| format!("{base}ip_pools: [{{name: p, sources: {sources}}}]\n");
        let ok = Config::parse(&with(
            "[{address: 192.0.2.1, ehlo: a.test, weight: 3}, {address: 192.0.2.2, ehlo: b.test}, {address: 192.0.2.3, ehlo: c.test, weight: 0}]",
        ))
        .unwrap();
        let weights: Vec<u32> = ok.ip_pools[0].sources.iter().map(|s| s.weight).collect();
        assert_eq!(weights, [3, 1, 0]);
        for (sources, field, says) in [
            (
                "[{address: 192.0.2.1, ehlo: a.test, weight: 0}, {address: 192.0.2.2, ehlo: b.test, weight: 0}]",
                "ip_pools[0].sources",
                "every weight is 0",
            ),
            (
                "[{address: 192.0.2.1, ehlo: a.test, weight: 1000001}]",
                "ip_pools[0].sources[0].weight",
                "at most",
            ),
            (
                "[{address: 192.0.2.1, ehlo: a.test}, {address: 192.0.2.1, ehlo: b.test}]",
                "ip_pools[0].sources[1].address",
                "already",
            ),
        ] {
            let e = err(&with(sources));
            assert!(e.starts_with(field) && e.contains(says), "{sources}: {e}");
        }
    }

    #[test]
    fn warm_up_schedules_and_starts_are_checked() {
        let base = "hostname: h.example.test\nspool_dir: /s\nlisteners: [{name: t, address: \"127.0.0.1:25\", auth: none, trusted_senders: any, allow_networks: [127.0.0.0/8]}]\n";
        let with = |pool: &str| format!("{base}ip_pools: [{{name: p, {pool}}}]\n");
        let cold = "sources: [{address: 192.0.2.1, ehlo: a.test, warmup_start: \"2026-12-01\"}, {address: 192.0.2.2, ehlo: b.test}]";
        let ok = Config::parse(&with(&format!(
            "warmup: {{schedule: [5, 10, 10, 40]}}, {cold}"
        )))
        .unwrap();
        let pool = &ok.ip_pools[0];
        assert_eq!(pool.warmup.as_ref().and_then(|w| w.cap(3)), Some(40));
        assert_eq!(
            pool.sources[0].warmup_start.as_ref().map(|s| s.unix),
            Some(1_796_083_200)
        );
        assert!(pool.sources[1].warmup_start.is_none());
        let preset =
            Config::parse(&with(&format!("warmup: {{preset: standard}}, {cold}"))).unwrap();
        assert_eq!(
            preset.ip_pools[0].warmup.as_ref().and_then(|w| w.cap(0)),
            Some(50)
        );
        // Written back as read, so a rendered config says what the user wrote.
        let text = serde_saphyr::to_string(&ok).unwrap();
        assert!(text.contains("warmup_start: \"2026-12-01\""), "{text}");
        assert_eq!(Config::parse(&text).unwrap(), ok);
        for (pool, field, says) in [
            (
                format!("warmup: {{schedule: [50, 100, 60]}}, {cold}"),
                "ip_pools[0].warmup.schedule[2]",
                "never decreases",
            ),
            (
                format!("warmup: {{schedule: [0, 100]}}, {cold}"),
                "ip_pools[0].warmup.schedule[0]",
                "at least 1",
            ),
            (
                format!("warmup: {{preset: standard, schedule: [5]}}, {cold}"),
                "ip_pools[0].warmup",
                "not both",
            ),
            (format!("warmup: {{}}, {cold}"), "ip_pools[0].warmup", "preset"),
            (
                format!("warmup: {{preset: gentle}}, {cold}"),
                "ip_pools[0].warmup.preset",
                "standard",
            ),
            (cold.to_owned(), "ip_pools[0].sources[0].warmup_start", "no warmup"),
            (
                "warmup: {schedule: [5]}, sources: [{address: 192.0.2.1, ehlo: a.test, warmup_start: \"1 Dec\"}]".to_owned(),
                "ip_pools[0].sources[0].warmup_start",
                "RFC 3339",
            ),
        ] {
            let e = err(&with(&pool));
            assert!(e.starts_with(field) && e.contains(says), "{pool}: {e}");
        }
        for (day, ok) in [
            ("10s", true),
            ("500ms", false),
            ("1500ms", false),
            ("8d", false),
        ] {
            let text = format!("{base}shaping: {{day_length: {day}}}\n");
            match Config::parse(&text) {
                Ok(c) => assert!(ok, "{day} taken: {:?}", c.shaping),
                Err(e) => {
                    assert!(!ok, "{day}: {e}");
                    assert!(e.to_string().starts_with("shaping.day_length"), "{e}");
                }
            }
        }
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
metrics: { address: 127.0.0.1:9090 }
admin: { address: 127.0.0.1:9091, token_file: /etc/herald/admin/token }
"#,
        )
        .unwrap();
        assert_eq!(c.delivery.max_age, Duration::from_secs(5 * 86400));
        assert_eq!(
            c.domains[0].return_path.as_deref(),
            Some("bounces.example.test")
        );
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
    fn admin_needs_its_own_port() {
        let e = err(
            "hostname: a\nspool_dir: s\nlisteners:\n - {name: x, address: 127.0.0.1:1}\nmetrics: {address: 127.0.0.1:2}\nadmin: {address: 127.0.0.1:2}\n",
        );
        assert!(e.starts_with("admin.address:"), "{e}");
        let e = err(
            "hostname: a\nspool_dir: s\nlisteners:\n - {name: x, address: 127.0.0.1:1}\nmetrics: {address: 127.0.0.1:1}\n",
        );
        assert!(e.starts_with("metrics.address:"), "{e}");
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
