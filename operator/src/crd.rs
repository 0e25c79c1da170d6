//! The custom resources of `herald.dev/v1alpha1`: SendingDomain, SmtpRelay and IpPool.
//!
//! The schema does the validation a user should hear about at `kubectl apply` time: patterns, enums,
//! minimums, and CEL rules where a pattern cannot say it (unique listener names, TLS for AUTH). The CRD YAML
//! in `crds/` is generated from these types (`herald-operator crds`), and a test fails when it differs.

use k8s_openapi::api::core::v1::ResourceRequirements;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A DNS name: LDH labels separated by dots.
const DOMAIN_PATTERN: &str =
    r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$";
/// One or more DNS labels (a subdomain prefix such as `bounces` or `mail.bounces`).
const LABELS_PATTERN: &str =
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$";
/// A listener's trusted sender: a domain as [`DOMAIN_PATTERN`] takes it, or the word `any`.
const TRUSTED_SENDER_PATTERN: &str =
    r"^(any|([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?)$";
/// A Kubernetes object name (RFC 1123 subdomain).
const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A Go-style duration as the relay config takes it: `90d`, `12h`, `30m`.
const DURATION_PATTERN: &str = r"^[0-9]+(s|m|h|d)$";
/// A message rate: a count per `s`, `min`, `h`, `d` or per a duration (`100/30s`).
const RATE_PATTERN: &str = r"^[1-9][0-9]{0,9}/(s|min|h|d|[0-9]+(ms|s|m|h|d))$";
/// An RFC 3339 date, or date and time with a zone.
const WARMUP_START_PATTERN: &str = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))?$";
/// A container image reference: `[registry[:port]/]path[:tag][@sha256:digest]` (the OCI distribution
/// grammar, simplified), so that a typo is refused at `kubectl apply` rather than as a pod that never pulls.
const IMAGE_PATTERN: &str = r"^(([A-Za-z0-9-]+\.)*[A-Za-z0-9-]+(:[0-9]+)?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$";

/// A reference to an object in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct LocalRef {
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = 253))]
    pub name: String,
}

/// A key in a Secret in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct SecretKeyRef {
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_password_key")]
    pub key: String,
}

fn default_password_key() -> String {
    "password".to_owned()
}

// ---------------------------------------------------------------------------------------------------
// SendingDomain

/// A domain that applications send mail from, with the DNS records it needs.
// kube's derive takes one printcolumn / validation attribute per column or rule.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "SendingDomain",
    namespaced,
    status = "SendingDomainStatus",
    shortname = "sd",
    category = "herald",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(
        name = "Verified",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"DnsVerified\")].status"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SendingDomainSpec {
    /// The domain mail is sent from: the From: domain and the DKIM signing domain.
    #[schemars(regex(pattern = DOMAIN_PATTERN), length(max = 253))]
    pub domain: String,
    /// The SmtpRelay that sends for this domain.
    pub relay_ref: LocalRef,
    #[serde(default)]
    pub dkim: DkimSpec,
    /// Subdomain of `domain` used as the envelope sender (MAIL FROM) and bounce address.
    #[serde(default = "default_return_path")]
    #[schemars(regex(pattern = LABELS_PATTERN), length(max = 200))]
    pub return_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmarc: Option<DmarcSpec>,
    /// The IpPool whose addresses send this domain's mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_pool_ref: Option<LocalRef>,
    /// Also write the records as an external-dns DNSEndpoint (when that CRD is installed).
    #[serde(default)]
    pub publish_with_external_dns: bool,
}

fn default_return_path() -> String {
    "bounces".to_owned()
}

/// DKIM signing for the domain.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// The selector; the public key is published at `<selector>._domainkey.<domain>`.
    #[serde(default = "default_selector")]
    #[schemars(regex(pattern = LABELS_PATTERN), length(max = 63))]
    pub selector: String,
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// An existing Secret holding the private key (`tls.key` or `private.key`); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalRef>,
    /// Generate a new key (with a new selector) this often, e.g. `90d`. The new selector signs once it
    /// verifies in DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub rotation_period: Option<String>,
}

impl Default for DkimSpec {
    fn default() -> Self {
        DkimSpec {
            selector: default_selector(),
            algorithm: DkimAlgorithm::default(),
            secret_ref: None,
            rotation_period: None,
        }
    }
}

fn default_selector() -> String {
    "herald1".to_owned()
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DkimAlgorithm {
    /// RSA 2048-bit, rsa-sha256 (RFC 6376).
    #[default]
    Rsa2048,
    /// Ed25519, ed25519-sha256 (RFC 8463).
    Ed25519,
}

/// The DMARC record to publish at `_dmarc.<domain>`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DmarcSpec {
    #[serde(default)]
    pub policy: DmarcPolicy,
    /// Where aggregate reports go (`rua=mailto:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^@\s]+@[^@\s]+$"))]
    pub report_address: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    #[default]
    None,
    Quarantine,
    Reject,
}

/// What the operator found and did for a SendingDomain.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendingDomainStatus {
    /// Every DNS record to publish, and whether DNS serves it.
    #[serde(default)]
    pub records: Vec<DnsRecord>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The selector the relay signs with now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_selector: Option<String>,
}

/// One DNS record to publish.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub value: String,
    pub purpose: RecordPurpose,
    pub state: RecordState,
    /// For a Mismatch: what the nameserver served instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<String>,
    /// The nameserver that answered the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nameserver: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RecordPurpose {
    Dkim,
    Spf,
    Dmarc,
    ReturnPathMx,
    /// The A, AAAA or CNAME record of the relay's `spec.hostname`, the return-path MX target.
    ReturnPathHost,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RecordState {
    Published,
    Missing,
    Mismatch,
}

// ---------------------------------------------------------------------------------------------------
// SmtpRelay

/// A pool of herald-relay replicas: listeners, users, delivery policy, storage.
// kube's derive takes one printcolumn / validation attribute per column or rule.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "SmtpRelay",
    namespaced,
    status = "SmtpRelayStatus",
    shortname = "relay",
    category = "herald",
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.listeners.all(l, self.spec.listeners.exists_one(m, m.name == l.name))").message("listener names must be unique"),
    validation = Rule::new("self.spec.listeners.all(l, self.spec.listeners.exists_one(m, m.port == l.port))").message("listener ports must be unique"),
    validation = Rule::new("!self.spec.listeners.exists(l, l.tls != 'none') || has(self.spec.tlsSecretRef)").message("listeners with tls need spec.tlsSecretRef"),
    validation = Rule::new("!has(self.spec.inboundService) || self.spec.listeners.all(l, l.port != 25 || ((!has(l.auth) || l.auth == 'none') && (!has(l.allowNetworks) || size(l.allowNetworks) == 0) && !has(l.allowNamespaces)))").message("with spec.inboundService, port 25 is the inbound listener that receives bounces from anyone: a listener there takes no auth, allowNetworks or allowNamespaces"),
    validation = Rule::new("!has(self.spec.inboundService) || self.spec.listeners.all(l, l.name != 'inbound' || l.port == 25)").message("with spec.inboundService, the listener name inbound is the inbound listener on port 25")
)]
#[serde(rename_all = "camelCase")]
pub struct SmtpRelaySpec {
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    /// The relay's container image.
    #[serde(default = "default_image")]
    #[schemars(regex(pattern = IMAGE_PATTERN), length(min = 1, max = 255))]
    pub image: String,
    /// The relay's public name: in the banner, EHLO and Received: headers, and the MX target its
    /// SendingDomains' return-path domains publish, so that bounces and complaints reach the relay. Publish
    /// its A/AAAA record (the SendingDomains list it) at the address of the inbound Service. Absent: the
    /// in-cluster name `<name>.<namespace>.svc.cluster.local`, which nobody outside the cluster can
    /// resolve: the SendingDomains say `ReturnPathRoutable=False` and their MX record is a placeholder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DOMAIN_PATTERN), length(max = 253))]
    pub hostname: Option<String>,
    #[schemars(length(min = 1, max = 8))]
    pub listeners: Vec<ListenerSpec>,
    /// A `kubernetes.io/tls` Secret (as cert-manager writes it) for STARTTLS and implicit TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<LocalRef>,
    #[serde(default)]
    pub users: Vec<UserSpec>,
    #[serde(default)]
    pub delivery: DeliverySpec,
    #[serde(default)]
    pub storage: StorageSpec,
    /// Requests and limits of the relay container. When absent: 100m CPU and 256Mi requested, a 512Mi
    /// memory limit. The relay sizes its memory budgets (bodies in transit, delivery connections) from the
    /// memory limit, so give it one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub metrics: MetricsSpec,
    #[serde(default)]
    pub shutdown: ShutdownSpec,
    #[serde(default)]
    pub suppression: SuppressionSpec,
    /// Receive bounces and complaints: an inbound listener on port 25 (no AUTH; it accepts mail only for
    /// the return-path domains and their postmaster, abuse and fbl mailboxes, and relays nothing) and a
    /// Service `<name>-inbound` of this type exposing it. A listener of `listeners` on port 25 is that
    /// listener (it must be one without auth, allowNetworks and allowNamespaces); otherwise one named
    /// `inbound` is added, with STARTTLS when `tlsSecretRef` is set. Absent: no inbound listener, and the
    /// SendingDomains say `ReturnPathRoutable=False`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_service: Option<InboundServiceSpec>,
    /// The Valkey (or Redis) instance the replicas share their suppression list and mailbox-full streaks
    /// through (docs/fleet.md). Absent: each replica keeps its own, which the condition `SharedState` says
    /// once there is more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreSpec>,
}

/// A `redis://` or `rediss://` URL without a password (a user name alone is allowed): the password comes
/// from a Secret, never from the spec.
const STORE_URL_PATTERN: &str = r"^rediss?://([^:@/\s]+@)?[^@/\s]+(/[0-9]+)?$";

/// Where the relays' shared state lives: a URL with the password in a Secret, or a Secret holding the
/// whole URL (as a managed service's connection string comes).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.url) != has(self.secretRef)").message("store: set exactly one of url (the password, if any, in passwordSecretRef) and secretRef (a Secret key holding the whole URL, password included)"),
    validation = Rule::new("!has(self.passwordSecretRef) || has(self.url)").message("store.passwordSecretRef goes with store.url; with secretRef the password is in the URL"),
    validation = Rule::new("!has(self.caSecretRef) || !has(self.url) || self.url.startsWith('rediss://')").message("store.caSecretRef is for a rediss:// url (redis:// is plain text)"),
    validation = Rule::new("!(has(self.cluster) && self.cluster && has(self.sentinelMaster))").message("store: a cluster has no Sentinels; set cluster or sentinelMaster, not both"),
    validation = Rule::new("!has(self.nodes) || size(self.nodes) == 0 || (has(self.cluster) && self.cluster) || has(self.sentinelMaster)").message("store.nodes are for cluster or sentinelMaster; a single instance is url alone"),
    validation = Rule::new("!(has(self.cluster) && self.cluster) || !has(self.url) || !self.url.matches('://[^/]+/[0-9]*[1-9][0-9]*$')").message("store.url: a cluster has only database 0")
)]
pub struct StoreSpec {
    /// `redis://host:6379/0`, or `rediss://` for TLS; no password in it (`passwordSecretRef` holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = STORE_URL_PATTERN), length(max = 512))]
    pub url: Option<String>,
    /// The password for `url`, mounted in the pods as a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Instead of `url`: a Secret key (default `url`) whose value is the whole URL with its password, e.g.
    /// `rediss://default:secret@primary.example.cache.amazonaws.com:6379/0`. The operator copies it into the
    /// relay's config Secret; a change renders the relay again at once and rolls its pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<UrlSecretRef>,
    /// Prepended to every key. Default `herald:<namespace>/<name>:`, so that SmtpRelays sharing one
    /// instance keep their lists apart; give two relays the same prefix to make them one fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\S+$"), length(min = 1, max = 128))]
    pub key_prefix: Option<String>,
    /// The relays refuse to start while the store cannot be reached. Default: they start on their local
    /// state and join the fleet once the store answers.
    #[serde(default)]
    pub required: bool,
    /// A Secret whose `ca.crt` signed the store's certificate (a `rediss://` URL), trusted besides the
    /// image's system CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<LocalRef>,
    /// The URL names one node of a Valkey (or Redis) Cluster; the relays find the rest and follow its
    /// slots. A cluster has only database 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// The URL names a Sentinel, and this is the name of the primary the Sentinels watch: the relays ask
    /// them where it is, and again after a fail-over. The URL's credentials are the primary's and the
    /// Sentinels'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\S+$"), length(min = 1, max = 128))]
    pub sentinel_master: Option<String>,
    /// More cluster nodes or Sentinels as `host:port`, reached with the URL's scheme and credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = STORE_NODE_PATTERN), length(max = 261)))]
    pub nodes: Vec<String>,
}

/// `host:port` or `[v6]:port`: a store node besides the one in the URL.
const STORE_NODE_PATTERN: &str = r"^([^:@/\s\[\]]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$";

/// A key in a Secret in the same namespace that holds a URL.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct UrlSecretRef {
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_url_key")]
    pub key: String,
}

fn default_url_key() -> String {
    "url".to_owned()
}

/// The Service that exposes a relay's inbound listener (port 25) to the senders of bounces: anyone on the
/// internet.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.loadBalancerClass) || self.type == 'LoadBalancer'").message("loadBalancerClass is for type LoadBalancer"),
    validation = Rule::new("!has(self.externalTrafficPolicy) || self.type != 'ClusterIP'").message("externalTrafficPolicy is for type LoadBalancer or NodePort")
)]
pub struct InboundServiceSpec {
    /// `LoadBalancer` (the default): the operator reads the address the load balancer gets and lists the
    /// A/AAAA (or CNAME) record for `spec.hostname`. `NodePort` or `ClusterIP`: you route port 25 of
    /// `spec.hostname` to the Service yourself (an external load balancer, a TCP proxy); the operator
    /// cannot see that address and takes `spec.hostname` as reachable.
    #[serde(rename = "type", default)]
    pub type_: InboundServiceType,
    /// Annotations of the Service, e.g. the cloud's load-balancer settings or external-dns's hostname.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The Service's `loadBalancerClass`: which load-balancer implementation serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub load_balancer_class: Option<String>,
    /// The Service's `externalTrafficPolicy`. `Local` keeps the sender's address (the relay logs it) at the
    /// price of reaching only nodes that run a replica; Kubernetes's default is `Cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum InboundServiceType {
    ClusterIP,
    NodePort,
    #[default]
    LoadBalancer,
}

impl InboundServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            InboundServiceType::ClusterIP => "ClusterIP",
            InboundServiceType::NodePort => "NodePort",
            InboundServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

fn default_replicas() -> i32 {
    2
}

fn default_image() -> String {
    format!("herald/relay:{}", env!("CARGO_PKG_VERSION"))
}

/// One SMTP port of the relay.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.auth != 'required' || self.tls != 'none'").message("auth: required needs tls: starttls or implicit"),
    validation = Rule::new("self.port != 9090 && self.port != 9091 && self.name != 'metrics' && self.name != 'admin'").message("port 9090 (name metrics) and port 9091 (name admin) are the relay's metrics and admin ports"),
    validation = Rule::new("!has(self.allowNamespaces) || !has(self.allowNetworks) || size(self.allowNetworks) == 0").message("allowNamespaces narrows a listener without allowNetworks; with allowNetworks the relay admits only those networks"),
    validation = Rule::new("!has(self.trustedSenders) || (self.auth != 'required' && has(self.allowNetworks) && size(self.allowNetworks) > 0)").message("trustedSenders is for a listener with allowNetworks and no auth (a submission listener checks its users' allowedDomains; one without allowNetworks relays nothing)")
)]
pub struct ListenerSpec {
    #[schemars(regex(pattern = r"^[a-z][a-z0-9-]{0,14}$"), length(min = 1, max = 15))]
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    pub tls: ListenerTls,
    #[serde(default)]
    pub auth: ListenerAuth,
    /// Clients outside these CIDRs are refused; clients inside may relay without AUTH. The relay's
    /// NetworkPolicy admits only these networks to the port (as `ipBlock`s).
    #[serde(default)]
    pub allow_networks: Vec<String>,
    /// For a listener without `allowNetworks`: only pods in the namespaces this selects may connect. The
    /// relay's NetworkPolicy enforces it (the relay itself sees addresses, not namespaces), so it needs a
    /// network plugin that enforces NetworkPolicy. Without it (and without `allowNetworks`) anyone may
    /// connect: a public submission or MX port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_namespaces: Option<LabelSelector>,
    /// With `allowNetworks` and no AUTH: the domains its clients may send as, in MAIL FROM and the From:
    /// header (550 5.7.1 otherwise). Absent: the domains of this relay's SendingDomains; `[any]`: every
    /// sender, unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100), inner(regex(pattern = TRUSTED_SENDER_PATTERN), length(max = 253)))]
    #[x_kube(validation = Rule::new("!('any' in self) || size(self) == 1").message("trustedSenders: [any] stands alone"))]
    pub trusted_senders: Option<Vec<String>>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    #[default]
    None,
    Starttls,
    Implicit,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListenerAuth {
    #[default]
    None,
    Required,
}

/// An SMTP AUTH user; the operator hashes the password into the relay's config Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    #[schemars(length(min = 1, max = 64))]
    pub name: String,
    pub password_secret_ref: SecretKeyRef,
    /// Domains this user may use in MAIL FROM and From:.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
}

/// Delivery policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_age: Option<String>,
    /// How long a recipient may stay deferred before a sender that asked (NOTIFY=DELAY) gets one delayed
    /// DSN (the relay's `delivery.delay_warning`, default 4h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub delay_warning: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_domain: Option<PerDomainSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<SmarthostSpec>,
    /// Limits per mailbox provider and source address, and back-off rules, over the shipped ones (the
    /// relay's `shaping` section; docs/shaping.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<ShapingSpec>,
}

/// Traffic shaping by mailbox provider.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShapingSpec {
    /// A shipped provider's name (`gmail`, `microsoft`, `yahoo`, ...) replaces the limits given; a new
    /// name defines a provider by its MX host suffixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderSpec>,
    /// The limits of every other destination (rolled up by the registrable domain of its MX host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<ProviderLimitsSpec>,
    /// Back-off rules, consulted before the shipped ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<BackoffRuleSpec>,
    /// Whether the shipped back-off rules apply (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin_rules: Option<bool>,
    /// After a suspension or a halving the share of the limits doubles every `recovery` (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub recovery: Option<String>,
}

/// A provider's limits, each per source address (for the whole SmtpRelay with a `store`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderLimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub messages_per_connection: Option<u32>,
    /// Messages per period (`600/min`, `20000/h`); every rate listed holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_rates: Option<Vec<RateText>>,
}

/// A message rate as the relay reads it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct RateText(#[schemars(regex(pattern = RATE_PATTERN))] pub String);

/// One provider's MX hosts and limits.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSpec {
    #[schemars(regex(pattern = r"^[a-z0-9._-]{1,63}$"))]
    pub name: String,
    /// Host name suffixes of its MX hosts (`mx.example.net` takes `a.mx.example.net`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mx: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub messages_per_connection: Option<u32>,
    /// Messages per period (`600/min`, `20000/h`); every rate listed holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_rates: Option<Vec<RateText>>,
}

/// What a back-off rule does to the source address a matching reply came from.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackoffActionSpec {
    Suspend,
    Halve,
    Bounce,
}

/// A back-off rule: a failed reply from `provider` (any, when absent) that the classifier put in
/// `category` (and whose enhanced status code matches `status`, when given).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackoffRuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9._-]{1,63}$"))]
    pub provider: Option<String>,
    /// The reply's bounce category: `rate-limited`, `reputation-block`, ...
    pub category: herald_config::Category,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub action: BackoffActionSpec,
    /// How long a suspension lasts (`suspend` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub duration: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub first: String,
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max: String,
    #[schemars(range(min = 1.0, max = 10.0))]
    pub factor: f64,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PerDomainSpec {
    #[schemars(range(min = 1, max = 1000))]
    pub max_connections: u32,
    #[schemars(range(min = 1, max = 100000))]
    pub messages_per_connection: u32,
    /// Messages to one destination domain per period (`600/min`, `10/s`, `100/30s`), with bursts of up
    /// to the count: for the whole SmtpRelay with a `store`, else per replica. Absent: no rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = RATE_PATTERN))]
    pub max_message_rate: Option<String>,
}

/// Send everything through one upstream (a hosted provider).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmarthostSpec {
    #[schemars(length(min = 1))]
    pub host: String,
    #[serde(default = "default_smarthost_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default = "default_smarthost_tls")]
    pub tls: ListenerTls,
    /// A Secret with `username` and `password` keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalRef>,
    /// A Secret whose `ca.crt` is the CA that signed the smarthost's certificate (cert-manager's certificate
    /// Secrets carry one), trusted besides the image's system CAs. The relay verifies the smarthost's
    /// certificate before it sends credentials, so a smarthost with a private CA needs this; needs `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<LocalRef>,
    /// The provider's SPF record to include (`include:` in the domains' SPF), e.g. `_spf.provider.example`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DOMAIN_PATTERN), length(max = 253))]
    pub spf_include: Option<String>,
}

fn default_smarthost_port() -> i32 {
    587
}

fn default_smarthost_tls() -> ListenerTls {
    ListenerTls::Starttls
}

/// How long a stopping relay drains, step by step (the relay config's `shutdown`). The pod's
/// `terminationGracePeriodSeconds` is their sum and 10 s more, so Kubernetes never kills a relay that is
/// still draining.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShutdownSpec {
    /// SMTP sessions in flight may finish their transaction, e.g. `30s`.
    #[serde(default = "default_drain_sessions")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 10))]
    pub sessions: String,
    /// Deliveries in flight may finish and record their outcome (else they are retried after the restart,
    /// and may arrive twice).
    #[serde(default = "default_drain_deliveries")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 10))]
    pub deliveries: String,
    /// Events still buffered may reach the file and the webhook.
    #[serde(default = "default_drain_events")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 10))]
    pub events: String,
}

impl Default for ShutdownSpec {
    fn default() -> Self {
        ShutdownSpec {
            sessions: default_drain_sessions(),
            deliveries: default_drain_deliveries(),
            events: default_drain_events(),
        }
    }
}

// The relay's own defaults (`herald_config::Shutdown::default`); a test keeps them equal.
fn default_drain_sessions() -> String {
    "30s".to_owned()
}

fn default_drain_deliveries() -> String {
    "30s".to_owned()
}

fn default_drain_events() -> String {
    "10s".to_owned()
}

/// When a failing address goes on the suppression list and how long it stays (the relay config's
/// `suppression`). Only a dead address is suppressed: a permanent unknown-user reply, a complaint, or a
/// mailbox full across several messages and days.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SuppressionSpec {
    #[serde(default)]
    pub mailbox_full: MailboxFullSpec,
    #[serde(default)]
    pub ttl: SuppressionTtlSpec,
}

/// A full mailbox suppresses only after `replies` final full-mailbox failures spread over at least `over`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replies != 1").message("mailboxFull.replies: 1 would suppress on a single full-mailbox reply; use 2 or more, or 0 to never suppress a full mailbox"))]
pub struct MailboxFullSpec {
    /// Consecutive full-mailbox failures that suppress the address; 0 never suppresses a full mailbox.
    #[serde(default = "default_full_replies")]
    #[schemars(range(max = 1000))]
    pub replies: u32,
    /// The least time between the first and the last failure of the streak, e.g. `72h`.
    #[serde(default = "default_full_over")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 10))]
    pub over: String,
    /// A streak with no new full-mailbox failure for this long is forgotten, e.g. `30d`.
    #[serde(default = "default_full_forget")]
    #[schemars(regex(pattern = NONZERO_DURATION_PATTERN), length(max = 10))]
    pub forget_after: String,
}

impl Default for MailboxFullSpec {
    fn default() -> Self {
        MailboxFullSpec {
            replies: default_full_replies(),
            over: default_full_over(),
            forget_after: default_full_forget(),
        }
    }
}

/// How long a suppression lasts, by its cause: a duration such as `365d`, or `never`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SuppressionTtlSpec {
    /// A permanent invalid-recipient reply (user unknown, account disabled).
    #[serde(default = "default_ttl_invalid_recipient")]
    #[schemars(regex(pattern = TTL_PATTERN), length(max = 10))]
    pub invalid_recipient: String,
    /// A mailbox full across a streak.
    #[serde(default = "default_ttl_mailbox_full")]
    #[schemars(regex(pattern = TTL_PATTERN), length(max = 10))]
    pub mailbox_full: String,
    /// A recipient's complaint.
    #[serde(default = "default_ttl_complaint")]
    #[schemars(regex(pattern = TTL_PATTERN), length(max = 10))]
    pub complaint: String,
}

impl Default for SuppressionTtlSpec {
    fn default() -> Self {
        SuppressionTtlSpec {
            invalid_recipient: default_ttl_invalid_recipient(),
            mailbox_full: default_ttl_mailbox_full(),
            complaint: default_ttl_complaint(),
        }
    }
}

/// A duration greater than zero.
const NONZERO_DURATION_PATTERN: &str = r"^0*[1-9][0-9]*(s|m|h|d)$";
/// A lifetime: a duration greater than zero, or `never`.
const TTL_PATTERN: &str = r"^(never|0*[1-9][0-9]*(s|m|h|d))$";

// The relay's own defaults (`herald_config::Suppression::default`); a test keeps them equal.
fn default_full_replies() -> u32 {
    3
}

fn default_full_over() -> String {
    "72h".to_owned()
}

fn default_full_forget() -> String {
    "30d".to_owned()
}

fn default_ttl_invalid_recipient() -> String {
    "365d".to_owned()
}

fn default_ttl_mailbox_full() -> String {
    "30d".to_owned()
}

fn default_ttl_complaint() -> String {
    "never".to_owned()
}

/// The spool volume of each replica.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti)$"))]
    pub size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

fn default_storage_size() -> String {
    "10Gi".to_owned()
}

/// The relay's metrics port (9090: `/metrics`, `/healthz`, `/readyz`) and who scrapes it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Create a ServiceMonitor (when the Prometheus Operator's CRD is installed).
    #[serde(default = "default_true")]
    pub service_monitor: bool,
    /// The namespaces whose pods may scrape the metrics port (the relay's NetworkPolicy); Prometheus's.
    /// The kubelet's probes come from the node and are always let in.
    #[serde(default = "default_monitoring_namespaces")]
    pub namespace_selector: LabelSelector,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        MetricsSpec {
            service_monitor: true,
            namespace_selector: default_monitoring_namespaces(),
        }
    }
}

/// The namespace kube-prometheus-stack is usually installed in.
fn default_monitoring_namespaces() -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            "monitoring".to_owned(),
        )])),
        match_expressions: None,
    }
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmtpRelayStatus {
    #[serde(default)]
    pub ready_replicas: i32,
    /// Hash of the rendered relay config; the pods carry it as an annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// With `spec.inboundService`: its name and the addresses its load balancer reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundStatus>,
}

/// Where the inbound Service can be reached from outside, as its `status.loadBalancer` says.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboundStatus {
    /// The Service, `<name>-inbound`.
    pub service: String,
    /// The load balancer's IP addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The load balancer's host names (some clouds give a name, not an address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

// ---------------------------------------------------------------------------------------------------
// IpPool

/// Source addresses for outbound mail, with EHLO names, weights and a warm-up schedule.
// kube's derive takes one printcolumn / validation attribute per column or rule.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "IpPool",
    namespaced,
    status = "IpPoolStatus",
    shortname = "ippool",
    category = "herald",
    printcolumn(
        name = "Addresses",
        type_ = "integer",
        json_path = ".status.addressCount"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.warmupPreset) && has(self.warmup) && size(self.warmup) > 0)").message("warmup and warmupPreset: give one schedule, not both"))]
#[x_kube(validation = Rule::new("!self.addresses.exists(a, has(a.warmupStart)) || has(self.warmupPreset) || (has(self.warmup) && size(self.warmup) > 0)").message("addresses[].warmupStart: the pool has no warm-up schedule (set warmup or warmupPreset)"))]
pub struct IpPoolSpec {
    /// Each address once (a list keyed by `address`).
    #[schemars(length(min = 1, max = 256), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["address"]))]
    #[x_kube(validation = Rule::new("self.exists(a, !has(a.weight) || a.weight > 0)").message("addresses: every weight is 0; at least one address must carry mail"))]
    pub addresses: Vec<PoolAddress>,
    /// Daily message caps by day of warm-up (day 1 first), never decreasing; after the last day there is
    /// no cap. Applies to the addresses with a `warmupStart`.
    #[serde(default)]
    #[schemars(length(max = 366), inner(range(min = 1)))]
    pub warmup: Vec<u64>,
    /// A shipped schedule instead of `warmup`: `standard` ramps from 50 messages on day 1 to 750,000 on
    /// day 30, then no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_preset: Option<WarmupPreset>,
}

/// The shipped warm-up schedules.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WarmupPreset {
    /// Thirty days, from 50 to 750,000 messages a day.
    Standard,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("isIP(self.address)").message("address must be an IPv4 or IPv6 address"))]
pub struct PoolAddress {
    #[schemars(length(min = 2, max = 45))]
    pub address: String,
    /// The EHLO name; its A/AAAA should be this address and the address's PTR this name.
    #[schemars(regex(pattern = DOMAIN_PATTERN))]
    pub ehlo: String,
    /// This address's share of the pool's mail against the others' weights (3 and 1: three messages from
    /// the first for each from the second). 0 sends nothing from it, e.g. before the address is removed.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000))]
    pub weight: u32,
    /// The first day of this address's warm-up: an RFC 3339 date (`2026-12-01`, midnight UTC) or date and
    /// time; warm-up is off without it. Before it the address counts as on its first day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = WARMUP_START_PATTERN))]
    pub warmup_start: Option<String>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpPoolStatus {
    #[serde(default)]
    pub address_count: i32,
    #[serde(default)]
    pub addresses: Vec<AddressStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressStatus {
    pub address: String,
    /// Whether the PTR of the address is the EHLO name and that name resolves back to the address.
    pub reverse_dns: RecordState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_ptr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_day: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_cap: Option<u64>,
}
