//! An SmtpRelay, the SendingDomains that name it and their IpPools, rendered into the relay's config file.
//!
//! The config is built with the relay crate's own types and checked with its own validation, so every
//! config the operator writes is one `herald-relay check-config` accepts. Paths are where the StatefulSet
//! mounts things in the pod.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use herald_config::{
    self as relay, Admin, AuthMode, Config, Delivery, Dkim, DkimAlgorithm as RelayDkim, Domain,
    IpPool as RelayPool, Listener, MetricsEndpoint, PerDomain, Retry, Smarthost, Source, TlsFiles,
    TlsMode, TrustedSenders,
};
use kube::ResourceExt;

use crate::crd::{DkimAlgorithm, IpPool, ListenerAuth, ListenerTls, SendingDomain, SmtpRelay};
use crate::inbound;
use crate::layout::{
    ADMIN_PORT, ADMIN_TOKEN_FILE, BOUNCE_KEYS, CONFIG_DIR, METRICS_PORT, SMARTHOST_CA,
    SMARTHOST_PASSWORD, SPOOL_DIR, STORE_CA, STORE_PASSWORD, TLS_DIR, signing_key,
};
use crate::records::return_path_domain;

/// Why a relay config could not be rendered; `field` is a path in the resource the user can fix.
#[derive(Debug, thiserror::Error)]
#[error("{resource}: {field}: {message}")]
pub struct RenderError {
    pub resource: String,
    pub field: String,
    pub message: String,
}

fn err(resource: &str, field: impl Into<String>, message: impl Into<String>) -> RenderError {
    RenderError {
        resource: resource.to_owned(),
        field: field.into(),
        message: message.into(),
    }
}

/// A user with the argon2 hash of its password (hashing happens in the reconciler, from the Secret).
#[derive(Debug, Clone)]
pub struct HashedUser {
    pub name: String,
    pub password_hash: String,
    pub allowed_domains: Vec<String>,
}

/// What the reconciler read from the Secrets the spec names for the config file itself. A Secret that
/// is only mounted (a password file, a CA) is not read: its path is rendered.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecretValues<'a> {
    /// The `username` of `spec.delivery.smarthost.credentialsSecretRef`.
    pub smarthost_username: Option<&'a str>,
    /// The URL, password included, that `spec.store.secretRef` holds.
    pub store_url: Option<&'a str>,
}

/// The relay's `store.resync_interval` default (`herald_config::Store`); a test keeps them equal. The
/// SmtpRelay has no field for it: the default suits every fleet so far.
const STORE_RESYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// The key prefix of a relay without `spec.store.keyPrefix`: its namespace and name, so that two
/// SmtpRelays pointed at one instance keep their lists apart.
pub fn default_key_prefix(relay: &SmtpRelay) -> String {
    format!(
        "herald:{}/{}:",
        relay.namespace().unwrap_or_else(|| "default".into()),
        relay.name_any()
    )
}

/// `spec.store` as the relay config's `store`. Error messages never quote the URL of `secretRef`: it
/// holds the password.
fn store(
    resource: &str,
    relay: &SmtpRelay,
    spec: &crate::crd::StoreSpec,
    secret_url: Option<&str>,
) -> Result<relay::Store, RenderError> {
    let url = match (&spec.url, &spec.secret_ref) {
        (Some(url), None) => url.clone(),
        (None, Some(r)) => secret_url
            .ok_or_else(|| {
                err(
                    resource,
                    "spec.store.secretRef",
                    format!("the URL in Secret {} key {} was not read", r.name, r.key),
                )
            })?
            .to_owned(),
        // The CRD refuses both and neither; this catches a spec that skipped the API server's validation.
        _ => {
            return Err(err(
                resource,
                "spec.store",
                "set exactly one of url and secretRef",
            ));
        }
    };
    if spec.password_secret_ref.is_some() && spec.url.is_none() {
        return Err(err(
            resource,
            "spec.store.passwordSecretRef",
            "goes with url; with secretRef the password is in the URL",
        ));
    }
    if spec.ca_secret_ref.is_some() && !url.starts_with("rediss://") {
        return Err(err(
            resource,
            "spec.store.caSecretRef",
            "a CA is for a rediss:// URL; redis:// is plain text",
        ));
    }
    let fleet_size = u32::try_from(relay.spec.replicas)
        .map_err(|_| err(resource, "spec.replicas", "must be at least 1"))?;
    Ok(relay::Store {
        url,
        key_prefix: spec
            .key_prefix
            .clone()
            .unwrap_or_else(|| default_key_prefix(relay)),
        password_file: spec
            .password_secret_ref
            .as_ref()
            .map(|_| STORE_PASSWORD.into()),
        tls: spec.ca_secret_ref.as_ref().map(|_| relay::StoreTls {
            ca_file: STORE_CA.into(),
        }),
        required: spec.required,
        fleet_size,
        resync_interval: STORE_RESYNC_INTERVAL,
        nodes: spec.nodes.clone(),
        cluster: spec.cluster,
        sentinel_master: spec.sentinel_master.clone(),
    })
}

/// The relay's own host name: the spec's, or the in-cluster Service name.
pub fn hostname(relay: &SmtpRelay) -> String {
    relay.spec.hostname.clone().unwrap_or_else(|| {
        format!(
            "{}.{}.svc.cluster.local",
            relay.name_any(),
            relay.namespace().unwrap_or_else(|| "default".into())
        )
    })
}

fn tls_mode(t: ListenerTls) -> TlsMode {
    match t {
        ListenerTls::None => TlsMode::None,
        ListenerTls::Starttls => TlsMode::Starttls,
        ListenerTls::Implicit => TlsMode::Implicit,
    }
}

fn duration(resource: &str, field: &str, v: &str) -> Result<std::time::Duration, RenderError> {
    humantime::parse_duration(v)
        .map_err(|e| err(resource, field, format!("{v:?} is not a duration: {e}")))
}

/// Message rates as the relay reads them.
fn rates(
    resource: &str,
    field: &str,
    v: &Option<Vec<crate::crd::RateText>>,
) -> Result<Option<Vec<herald_config::Rate>>, RenderError> {
    v.as_ref()
        .map(|rates| {
            rates
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    r.0.parse::<herald_config::Rate>()
                        .map_err(|e| err(resource, format!("{field}[{i}]"), e.to_string()))
                })
                .collect()
        })
        .transpose()
}

/// `spec.delivery.shaping` as the relay config's `shaping`; a mistake the relay's validation finds is
/// reported under the resource's own field name.
fn shaping(resource: &str, spec: &crate::crd::ShapingSpec) -> Result<relay::Shaping, RenderError> {
    let at = "spec.delivery.shaping";
    let mut providers = Vec::new();
    for (i, p) in spec.providers.iter().enumerate() {
        providers.push(relay::ProviderShaping {
            name: p.name.clone(),
            mx: p.mx.clone(),
            max_connections: p.max_connections,
            messages_per_connection: p.messages_per_connection,
            max_message_rates: rates(
                resource,
                &format!("{at}.providers[{i}].maxMessageRates"),
                &p.max_message_rates,
            )?,
        });
    }
    let default = match &spec.default {
        Some(d) => relay::ProviderLimits {
            max_connections: d.max_connections,
            messages_per_connection: d.messages_per_connection,
            max_message_rates: rates(
                resource,
                &format!("{at}.default.maxMessageRates"),
                &d.max_message_rates,
            )?,
        },
        None => relay::ProviderLimits::default(),
    };
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        rules.push(relay::BackoffRule {
            provider: r.provider.clone(),
            category: r.category,
            status: r.status.clone(),
            action: match r.action {
                crate::crd::BackoffActionSpec::Suspend => relay::BackoffAction::Suspend,
                crate::crd::BackoffActionSpec::Halve => relay::BackoffAction::Halve,
                crate::crd::BackoffActionSpec::Bounce => relay::BackoffAction::Bounce,
            },
            duration: r
                .duration
                .as_deref()
                .map(|d| duration(resource, &format!("{at}.rules[{i}].duration"), d))
                .transpose()?,
        });
    }
    let mut out = relay::Shaping {
        providers,
        default,
        rules,
        ..relay::Shaping::default()
    };
    if let Some(b) = spec.builtin_rules {
        out.builtin_rules = b;
    }
    if let Some(r) = &spec.recovery {
        out.recovery = duration(resource, &format!("{at}.recovery"), r)?;
    }
    // The relay's own checks, with its field names turned into the resource's.
    let probe = Config {
        shaping: out.clone(),
        ..Config::embedded_default()
    };
    if let Err(relay::ConfigError::Invalid { field, message }) = probe.validate() {
        let field = field
            .strip_prefix("shaping")
            .map(|rest| format!("{at}{}", camel(rest)))
            .unwrap_or(field);
        return Err(err(resource, field, message));
    }
    Ok(out)
}

/// `.max_connections` as `.maxConnections`.
fn camel(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut upper = false;
    for c in path.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

/// A lifetime: `never` or a duration.
fn ttl(resource: &str, field: &str, v: &str) -> Result<relay::Ttl, RenderError> {
    if v == "never" {
        return Ok(relay::Ttl::Never);
    }
    duration(resource, field, v).map(relay::Ttl::After)
}

/// `spec.suppression` as the relay config's `suppression`.
fn suppression(
    resource: &str,
    spec: &crate::crd::SuppressionSpec,
) -> Result<relay::Suppression, RenderError> {
    let full = &spec.mailbox_full;
    if full.replies == 1 {
        // The CRD refuses it too; this catches a spec that skipped the API server's validation.
        return Err(err(
            resource,
            "spec.suppression.mailboxFull.replies",
            "1 would suppress on a single full-mailbox reply; use 2 or more, or 0",
        ));
    }
    let field = |f: &str| format!("spec.suppression.{f}");
    Ok(relay::Suppression {
        mailbox_full: relay::MailboxFull {
            replies: full.replies,
            over: duration(resource, &field("mailboxFull.over"), &full.over)?,
            forget_after: duration(
                resource,
                &field("mailboxFull.forgetAfter"),
                &full.forget_after,
            )?,
        },
        ttl: relay::SuppressionTtl {
            invalid_recipient: ttl(
                resource,
                &field("ttl.invalidRecipient"),
                &spec.ttl.invalid_recipient,
            )?,
            mailbox_full: ttl(resource, &field("ttl.mailboxFull"), &spec.ttl.mailbox_full)?,
            complaint: ttl(resource, &field("ttl.complaint"), &spec.ttl.complaint)?,
        },
    })
}

/// `trustedSenders` as the relay config writes it: `[any]` is `any` (a CRD field has one type, so the word
/// comes as the list's only item).
fn trusted_senders(
    resource: &str,
    listener: usize,
    senders: Option<&[String]>,
) -> Result<Option<TrustedSenders>, RenderError> {
    match senders {
        None => Ok(None),
        Some([any]) if any == "any" => Ok(Some(TrustedSenders::Any)),
        Some(list) if list.iter().any(|d| d == "any") => Err(err(
            resource,
            format!("spec.listeners[{listener}].trustedSenders"),
            "[any] stands alone: with other domains it would mean neither",
        )),
        Some(list) => Ok(Some(TrustedSenders::Domains(list.to_vec()))),
    }
}

/// Renders the relay config.
pub fn relay_config(
    relay: &SmtpRelay,
    domains: &[Arc<SendingDomain>],
    pools: &[Arc<IpPool>],
    users: &[HashedUser],
    secrets: SecretValues<'_>,
) -> Result<Config, RenderError> {
    let smarthost_username = secrets.smarthost_username;
    let res = format!("SmtpRelay {}", relay.name_any());
    let spec = &relay.spec;
    if let Some((field, message)) = inbound::conflict(relay) {
        return Err(err(&res, field, message));
    }
    let mut listeners = Vec::new();
    // The spec's listeners first, so `spec.listeners[i]` in an error is the i-th; the inbound listener the
    // operator adds comes last and is well-formed.
    for (i, l) in inbound::listeners(relay).iter().enumerate() {
        let mut nets = Vec::new();
        for (j, n) in l.allow_networks.iter().enumerate() {
            nets.push(n.parse::<ipnet::IpNet>().map_err(|_| {
                err(
                    &res,
                    format!("spec.listeners[{i}].allowNetworks[{j}]"),
                    format!("{n:?} is not a CIDR network"),
                )
            })?);
        }
        let port = u16::try_from(l.port)
            .map_err(|_| err(&res, format!("spec.listeners[{i}].port"), "out of range"))?;
        listeners.push(Listener {
            name: l.name.clone(),
            address: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
            tls: tls_mode(l.tls),
            auth: match l.auth {
                ListenerAuth::None => AuthMode::None,
                ListenerAuth::Required => AuthMode::Required,
            },
            allow_networks: nets,
            trusted_senders: trusted_senders(&res, i, l.trusted_senders.as_deref())?,
        });
    }
    let mut relay_domains = Vec::new();
    let mut pool_names: Vec<String> = Vec::new();
    for d in domains {
        let pool = d.spec.ip_pool_ref.as_ref().map(|p| p.name.clone());
        if let Some(p) = &pool
            && !pool_names.contains(p)
        {
            pool_names.push(p.clone());
        }
        // The selector and the file of its key from one value: see `layout::SigningKey`.
        let key = signing_key(d);
        relay_domains.push(Domain {
            name: d.spec.domain.clone(),
            dkim: vec![Dkim {
                key_file: key.file(&d.spec.domain).into(),
                selector: key.selector,
                algorithm: match d.spec.dkim.algorithm {
                    DkimAlgorithm::Rsa2048 => RelayDkim::RsaSha256,
                    DkimAlgorithm::Ed25519 => RelayDkim::Ed25519Sha256,
                },
            }],
            return_path: Some(return_path_domain(&d.spec)),
            ip_pool: pool,
        });
    }
    let mut ip_pools = Vec::new();
    for name in pool_names {
        let Some(p) = pools.iter().find(|p| p.name_any() == name) else {
            return Err(err(
                &res,
                "SendingDomain.spec.ipPoolRef",
                format!("IpPool {name:?} does not exist"),
            ));
        };
        let mut sources = Vec::new();
        for (i, a) in p.spec.addresses.iter().enumerate() {
            let address = a.address.parse::<IpAddr>().map_err(|_| {
                err(
                    &format!("IpPool {name}"),
                    format!("spec.addresses[{i}].address"),
                    "not an IP address",
                )
            })?;
            // The API server keeps the strings unique; two spellings of one IPv6 address get past it.
            if sources.iter().any(|s: &Source| s.address == address) {
                return Err(err(
                    &format!("IpPool {name}"),
                    format!("spec.addresses[{i}].address"),
                    format!("{address} is listed twice"),
                ));
            }
            let warmup_start = match &a.warmup_start {
                Some(start) => Some(start.parse::<herald_config::WarmupStart>().map_err(|e| {
                    err(
                        &format!("IpPool {name}"),
                        format!("spec.addresses[{i}].warmupStart"),
                        e.to_string(),
                    )
                })?),
                None => None,
            };
            sources.push(Source {
                address,
                ehlo: a.ehlo.clone(),
                weight: a.weight,
                warmup_start,
            });
        }
        let warmup = match (p.spec.warmup_preset, p.spec.warmup.is_empty()) {
            (Some(crate::crd::WarmupPreset::Standard), _) => Some(herald_config::Warmup {
                preset: Some(herald_config::WarmupPreset::Standard),
                schedule: Vec::new(),
            }),
            (None, false) => {
                if let Some(k) =
                    (1..p.spec.warmup.len()).find(|&k| p.spec.warmup[k] < p.spec.warmup[k - 1])
                {
                    return Err(err(
                        &format!("IpPool {name}"),
                        format!("spec.warmup[{k}]"),
                        format!(
                            "{} is less than the day before ({}): a warm-up schedule never decreases",
                            p.spec.warmup[k],
                            p.spec.warmup[k - 1]
                        ),
                    ));
                }
                Some(herald_config::Warmup {
                    preset: None,
                    schedule: p.spec.warmup.clone(),
                })
            }
            (None, true) => None,
        };
        if warmup.is_none() {
            // Without a schedule a start means nothing (the API server refuses the pair; an older CRD may not).
            for s in &mut sources {
                s.warmup_start = None;
            }
        }
        ip_pools.push(RelayPool {
            name,
            sources,
            warmup,
        });
    }
    let mut delivery = Delivery::default();
    if let Some(r) = &spec.delivery.retry {
        delivery.retry = Retry {
            first: duration(&res, "spec.delivery.retry.first", &r.first)?,
            max: duration(&res, "spec.delivery.retry.max", &r.max)?,
            factor: r.factor,
        };
    }
    if let Some(m) = &spec.delivery.max_age {
        delivery.max_age = duration(&res, "spec.delivery.maxAge", m)?;
    }
    if let Some(d) = &spec.delivery.delay_warning {
        delivery.delay_warning = duration(&res, "spec.delivery.delayWarning", d)?;
    }
    if let Some(p) = &spec.delivery.per_domain {
        let max_message_rate = match &p.max_message_rate {
            Some(r) => Some(r.parse::<herald_config::Rate>().map_err(|e| {
                err(
                    &res,
                    "spec.delivery.perDomain.maxMessageRate",
                    e.to_string(),
                )
            })?),
            None => None,
        };
        delivery.per_domain = PerDomain {
            max_connections: p.max_connections,
            messages_per_connection: p.messages_per_connection,
            max_message_rate,
        };
    }
    if let Some(s) = &spec.delivery.smarthost {
        if s.ca_secret_ref.is_some() && s.tls == crate::crd::ListenerTls::None {
            return Err(err(
                &res,
                "spec.delivery.smarthost.caSecretRef",
                "a CA is for verifying the smarthost's certificate; set tls to starttls or implicit",
            ));
        }
        let port = u16::try_from(s.port)
            .map_err(|_| err(&res, "spec.delivery.smarthost.port", "out of range"))?;
        delivery.smarthost = Some(Smarthost {
            host: s.host.clone(),
            port,
            tls: tls_mode(s.tls),
            username: smarthost_username.map(str::to_owned),
            password_file: smarthost_username.map(|_| SMARTHOST_PASSWORD.into()),
            ca_file: s.ca_secret_ref.as_ref().map(|_| SMARTHOST_CA.into()),
        });
    }
    let shaping = match &spec.delivery.shaping {
        Some(sh) => shaping(&res, sh)?,
        None => relay::Shaping::default(),
    };
    let config = Config {
        shaping,
        hostname: hostname(relay),
        spool_dir: SPOOL_DIR.into(),
        listeners,
        tls: spec.tls_secret_ref.as_ref().map(|_| TlsFiles {
            cert_file: format!("{TLS_DIR}/tls.crt").into(),
            key_file: format!("{TLS_DIR}/tls.key").into(),
        }),
        users: users
            .iter()
            .map(|u| relay::User {
                username: u.name.clone(),
                password_hash: u.password_hash.clone(),
                allowed_domains: u.allowed_domains.clone(),
            })
            .collect(),
        domains: relay_domains,
        ip_pools,
        delivery,
        limits: relay::Limits::default(),
        // On every address, so that Prometheus (metrics) and the operator (admin) reach them; the
        // NetworkPolicy (`network`) says from where, and the admin API wants the token besides.
        metrics: Some(MetricsEndpoint {
            address: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), METRICS_PORT),
        }),
        admin: Some(Admin {
            address: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), ADMIN_PORT),
            token_file: Some(ADMIN_TOKEN_FILE.into()),
        }),
        events: None,
        log: relay::Log::default(),
        // The operator keeps the keys in the config Secret (see `objects::config_secret`): every replica reads
        // the same ones, so a bounce verifies wherever it lands.
        bounces: relay::Bounces {
            secret_file: Some(format!("{CONFIG_DIR}/{BOUNCE_KEYS}").into()),
            ..relay::Bounces::default()
        },
        suppression: suppression(&res, &spec.suppression)?,
        store: spec
            .store
            .as_ref()
            .map(|s| store(&res, relay, s, secrets.store_url))
            .transpose()?,
        shutdown: relay::Shutdown {
            sessions: duration(&res, "spec.shutdown.sessions", &spec.shutdown.sessions)?,
            deliveries: duration(&res, "spec.shutdown.deliveries", &spec.shutdown.deliveries)?,
            events: duration(&res, "spec.shutdown.events", &spec.shutdown.events)?,
        },
    };
    config.validate().map_err(|e| {
        err(
            &res,
            "spec",
            format!("the rendered relay config is invalid: {e}"),
        )
    })?;
    Ok(config)
}

/// The config file's text.
pub fn config_yaml(config: &Config) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::*;

    fn relay() -> SmtpRelay {
        let mut r = crate::fixtures::relay();
        r.spec.replicas = 2;
        r.spec.listeners.push(ListenerSpec {
            name: "trusted".into(),
            port: 2525,
            tls: ListenerTls::None,
            auth: ListenerAuth::None,
            allow_networks: vec!["10.0.0.0/8".into()],
            allow_namespaces: None,
            trusted_senders: None,
        });
        r.spec.delivery = DeliverySpec {
            retry: Some(RetrySpec {
                first: "2m".into(),
                max: "4h".into(),
                factor: 2.0,
            }),
            max_age: Some("3d".into()),
            delay_warning: Some("2h".into()),
            per_domain: None,
            smarthost: None,
            shaping: None,
        };
        r
    }

    fn domain() -> Arc<SendingDomain> {
        Arc::new(SendingDomain::new(
            "example",
            SendingDomainSpec {
                ip_pool_ref: Some(LocalRef {
                    name: "pool".into(),
                }),
                ..crate::fixtures::domain_spec()
            },
        ))
    }

    fn pool() -> Arc<IpPool> {
        Arc::new(crate::fixtures::pool())
    }

    /// The config of `r` with the usual domain, pool and users, and no Secret values.
    fn render(r: &SmtpRelay) -> Result<Config, RenderError> {
        relay_config(r, &[domain()], &[pool()], &users(), SecretValues::default())
    }

    fn users() -> Vec<HashedUser> {
        vec![HashedUser {
            name: "app".into(),
            password_hash: herald_config::password::hash("pw").unwrap(),
            allowed_domains: vec!["example.test".into()],
        }]
    }

    #[test]
    fn a_warm_up_is_rendered_from_the_schedule_or_the_preset_and_a_decreasing_one_is_refused() {
        let mut p = (*pool()).clone();
        p.spec.addresses[0].warmup_start = Some("2026-12-01T06:00:00Z".into());
        p.spec.warmup = vec![10, 20, 40];
        let render = |p: &IpPool| {
            relay_config(
                &relay(),
                &[domain()],
                &[Arc::new(p.clone())],
                &users(),
                SecretValues::default(),
            )
        };
        let c = render(&p).unwrap();
        let rendered = &c.ip_pools[0];
        assert_eq!(
            rendered.warmup.as_ref().map(|w| w.caps().to_vec()),
            Some(vec![10, 20, 40])
        );
        assert_eq!(
            rendered.sources[0]
                .warmup_start
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("2026-12-01T06:00:00Z")
        );
        // What the relay reads back is what was rendered.
        let text = serde_saphyr::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text).unwrap().ip_pools, c.ip_pools);
        p.spec.warmup.clear();
        p.spec.warmup_preset = Some(crate::crd::WarmupPreset::Standard);
        let c = render(&p).unwrap();
        assert_eq!(
            c.ip_pools[0].warmup.as_ref().and_then(|w| w.cap(29)),
            Some(750_000)
        );
        p.spec.warmup_preset = None;
        p.spec.warmup = vec![10, 40, 20];
        let e = render(&p).unwrap_err();
        assert!(
            e.to_string().contains("spec.warmup[2]") && e.message.contains("never decreases"),
            "{e}"
        );
        // Without a schedule a start is dropped, not rendered into a config the relay would refuse.
        p.spec.warmup.clear();
        let c = render(&p).unwrap();
        assert!(c.ip_pools[0].warmup.is_none() && c.ip_pools[0].sources[0].warmup_start.is_none());
    }

    #[test]
    fn an_ip_pools_weights_are_rendered_and_all_zero_is_refused() {
        let mut p = (*pool()).clone();
        let mut second = p.spec.addresses[0].clone();
        second.address = "192.0.2.11".into();
        second.ehlo = "mta2.example.test".into();
        second.weight = 3;
        p.spec.addresses.push(second);
        let c = relay_config(
            &relay(),
            &[domain()],
            &[Arc::new(p.clone())],
            &users(),
            SecretValues::default(),
        )
        .unwrap();
        let weights: Vec<u32> = c.ip_pools[0].sources.iter().map(|s| s.weight).collect();
        assert_eq!(weights, [1, 3]);
        for a in &mut p.spec.addresses {
            a.weight = 0;
        }
        let e = relay_config(
            &relay(),
            &[domain()],
            &[Arc::new(p)],
            &users(),
            SecretValues::default(),
        )
        .unwrap_err();
        assert!(e.message.contains("every weight is 0"), "{e}");
    }

    #[test]
    fn rendered_config_is_one_the_relay_accepts() {
        let c = render(&relay()).unwrap();
        assert_eq!(c.hostname, "relay.mail.svc.cluster.local");
        assert_eq!(
            c.domains[0].return_path.as_deref(),
            Some("bounces.example.test")
        );
        assert_eq!(c.ip_pools[0].sources[0].ehlo, "mta1.example.test");
        assert_eq!(
            c.delivery.max_age,
            std::time::Duration::from_secs(3 * 86400)
        );
        assert_eq!(
            c.delivery.delay_warning,
            std::time::Duration::from_secs(2 * 3600)
        );
        assert_eq!(
            c.metrics.as_ref().map(|m| m.address.to_string()).as_deref(),
            Some("0.0.0.0:9090")
        );
        let admin = c.admin.as_ref().unwrap();
        assert_eq!(admin.address.to_string(), "0.0.0.0:9091");
        assert_eq!(
            admin.token_file.as_deref(),
            Some(std::path::Path::new("/etc/herald/admin/token"))
        );
        // What herald-relay check-config does with the file.
        let text = config_yaml(&c).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c);
    }

    #[test]
    fn an_inbound_service_renders_the_inbound_listener_and_the_public_hostname() {
        let mut r = relay();
        r.spec.hostname = Some("mx.example.test".into());
        r.spec.inbound_service = Some(InboundServiceSpec {
            type_: InboundServiceType::LoadBalancer,
            annotations: Default::default(),
            load_balancer_class: None,
            external_traffic_policy: None,
        });
        let c = render(&r).unwrap();
        assert_eq!(c.hostname, "mx.example.test");
        let inbound = c.listeners.iter().find(|l| l.name == "inbound").unwrap();
        assert_eq!(inbound.address.to_string(), "0.0.0.0:25");
        assert_eq!(
            (inbound.tls, inbound.auth),
            (TlsMode::Starttls, AuthMode::None)
        );
        assert!(inbound.allow_networks.is_empty() && inbound.trusted_senders.is_none());
        assert_eq!(Config::parse(&config_yaml(&c).unwrap()).unwrap(), c);
        // A listener of the spec on port 25 that is not an inbound one cannot be the bounce port.
        r.spec.listeners[1].port = 25;
        let e = render(&r).unwrap_err();
        assert_eq!(e.field, "spec.listeners[1]");
    }

    #[test]
    fn a_message_rate_renders_and_a_bad_one_names_the_field() {
        let mut r = relay();
        r.spec.delivery.per_domain = Some(crate::crd::PerDomainSpec {
            max_connections: 5,
            messages_per_connection: 50,
            max_message_rate: Some("600/min".into()),
        });
        let c = render(&r).unwrap();
        let rate = c.delivery.per_domain.max_message_rate.unwrap();
        assert_eq!((rate.count, rate.per.as_secs()), (600, 60));
        assert_eq!(Config::parse(&config_yaml(&c).unwrap()).unwrap(), c);
        // The CRD's pattern lets through a period the relay does not take (over 7 days).
        if let Some(p) = r.spec.delivery.per_domain.as_mut() {
            p.max_message_rate = Some("10/30d".into());
        }
        let e = render(&r).unwrap_err();
        assert_eq!(e.field, "spec.delivery.perDomain.maxMessageRate");
        assert!(e.message.contains("period"), "{}", e.message);
    }

    #[test]
    fn provider_shaping_renders_and_a_mistake_names_the_resource_field() {
        use crate::crd::{BackoffActionSpec, BackoffRuleSpec, ProviderSpec, RateText, ShapingSpec};
        let mut r = relay();
        r.spec.delivery.shaping = Some(ShapingSpec {
            providers: vec![ProviderSpec {
                name: "gmail".into(),
                mx: vec!["mx.gmail-relay.example".into()],
                max_connections: Some(4),
                messages_per_connection: None,
                max_message_rates: Some(vec![RateText("600/min".into())]),
            }],
            rules: vec![BackoffRuleSpec {
                provider: Some("gmail".into()),
                category: herald_config::Category::RateLimited,
                status: Some("4.7.28".into()),
                action: BackoffActionSpec::Suspend,
                duration: Some("30m".into()),
            }],
            builtin_rules: Some(false),
            recovery: Some("5m".into()),
            ..ShapingSpec::default()
        });
        let c = render(&r).unwrap();
        assert_eq!(c.shaping.providers[0].max_connections, Some(4));
        assert_eq!(c.shaping.rules[0].duration.map(|d| d.as_secs()), Some(1800));
        assert!(!c.shaping.builtin_rules);
        assert_eq!(c.shaping.recovery.as_secs(), 300);
        assert_eq!(Config::parse(&config_yaml(&c).unwrap()).unwrap(), c);
        if let Some(sh) = r.spec.delivery.shaping.as_mut() {
            sh.rules[0].status = Some("4.7.twentyeight".into());
        }
        let e = render(&r).unwrap_err();
        assert_eq!(e.field, "spec.delivery.shaping.rules[0].status");
        if let Some(sh) = r.spec.delivery.shaping.as_mut() {
            sh.rules[0].status = None;
            sh.rules[0].duration = None;
            sh.providers[0].mx = vec!["*.example".into()];
        }
        let e = render(&r).unwrap_err();
        assert_eq!(e.field, "spec.delivery.shaping.providers[0].mx[0]");
        if let Some(sh) = r.spec.delivery.shaping.as_mut() {
            sh.providers[0].mx.clear();
        }
        let e = render(&r).unwrap_err();
        assert_eq!(e.field, "spec.delivery.shaping.rules[0].duration");
        if let Some(sh) = r.spec.delivery.shaping.as_mut() {
            sh.rules[0].duration = Some("1h".into());
            sh.rules[0].provider = Some("gmial".into());
        }
        let e = render(&r).unwrap_err();
        assert_eq!(e.field, "spec.delivery.shaping.rules[0].provider");
        assert!(e.message.contains("gmail"), "{}", e.message);
    }

    #[test]
    fn a_missing_pool_or_bad_network_names_the_field() {
        let e = relay_config(
            &relay(),
            &[domain()],
            &[],
            &users(),
            SecretValues::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "SendingDomain.spec.ipPoolRef");
        let mut r = relay();
        r.spec.listeners[1].allow_networks = vec!["10.0.0.0/33".into()];
        let e = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap_err();
        assert_eq!(e.field, "spec.listeners[1].allowNetworks[0]");
    }

    #[test]
    fn the_drain_is_the_specs_and_its_defaults_are_the_relays() {
        let c = relay_config(&relay(), &[], &[], &users(), SecretValues::default()).unwrap();
        assert_eq!(c.shutdown, herald_config::Shutdown::default());
        let mut r = relay();
        r.spec.shutdown = ShutdownSpec {
            sessions: "1m".into(),
            deliveries: "2m".into(),
            events: "5s".into(),
        };
        let c = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap();
        assert_eq!(c.shutdown.total(), std::time::Duration::from_secs(185));
        r.spec.shutdown.deliveries = "99999999999999999999d".into();
        let e = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap_err();
        assert_eq!(e.field, "spec.shutdown.deliveries");
    }

    #[test]
    fn the_suppression_policy_is_the_specs_and_its_defaults_are_the_relays() {
        let c = relay_config(&relay(), &[], &[], &users(), SecretValues::default()).unwrap();
        assert_eq!(c.suppression, herald_config::Suppression::default());
        let mut r = relay();
        r.spec.suppression.mailbox_full.replies = 5;
        r.spec.suppression.mailbox_full.over = "7d".into();
        r.spec.suppression.ttl.invalid_recipient = "never".into();
        r.spec.suppression.ttl.complaint = "90d".into();
        let c = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap();
        assert_eq!(c.suppression.mailbox_full.replies, 5);
        assert_eq!(
            c.suppression.mailbox_full.over,
            std::time::Duration::from_secs(7 * 86400)
        );
        assert_eq!(
            c.suppression.ttl.invalid_recipient,
            herald_config::Ttl::Never
        );
        assert_eq!(
            c.suppression.ttl.complaint,
            herald_config::Ttl::After(std::time::Duration::from_secs(90 * 86400))
        );
        r.spec.suppression.ttl.mailbox_full = "soon".into();
        let e = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap_err();
        assert_eq!(e.field, "spec.suppression.ttl.mailboxFull");
        r.spec.suppression.ttl.mailbox_full = "30d".into();
        r.spec.suppression.mailbox_full.replies = 1;
        let e = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap_err();
        assert_eq!(e.field, "spec.suppression.mailboxFull.replies");
    }

    #[test]
    fn auth_listeners_without_users_are_refused_by_the_relays_own_validation() {
        let e = relay_config(&relay(), &[], &[], &[], SecretValues::default()).unwrap_err();
        assert!(e.message.contains("users"), "{e}");
    }

    #[test]
    fn trusted_senders_reach_the_relay_config() {
        let trusted = |senders: Option<Vec<&str>>| {
            let mut r = relay();
            r.spec.listeners[1].trusted_senders =
                senders.map(|s| s.into_iter().map(String::from).collect());
            render(&r)
        };
        // Absent: the relay's sending domains decide, so nothing is written.
        let c = trusted(None).unwrap();
        assert_eq!(c.listeners[1].trusted_senders, None);
        assert!(!config_yaml(&c).unwrap().contains("trusted_senders"));
        let c = trusted(Some(vec!["example.test", "other.test"])).unwrap();
        assert_eq!(
            c.listeners[1].trusted_senders,
            Some(TrustedSenders::Domains(vec![
                "example.test".into(),
                "other.test".into()
            ]))
        );
        let c = trusted(Some(vec!["any"])).unwrap();
        assert_eq!(c.listeners[1].trusted_senders, Some(TrustedSenders::Any));
        let text = config_yaml(&c).unwrap();
        assert!(text.contains("trusted_senders: any"), "{text}");
        assert_eq!(Config::parse(&text).unwrap(), c);
        let e = trusted(Some(vec!["example.test", "any"])).unwrap_err();
        assert_eq!(e.field, "spec.listeners[1].trustedSenders");
    }

    #[test]
    fn trusted_senders_on_a_submission_listener_is_refused_by_the_relays_own_validation() {
        let mut r = relay();
        r.spec.listeners[0].trusted_senders = Some(vec!["example.test".into()]);
        let e = render(&r).unwrap_err();
        assert!(e.message.contains("listeners[0].trusted_senders"), "{e}");
    }

    #[test]
    fn a_smarthost_ca_is_the_mounted_ca_file_and_needs_tls() {
        let smarthost = |tls| crate::crd::SmarthostSpec {
            host: "smtp.provider.test".into(),
            port: 587,
            tls,
            credentials_secret_ref: None,
            ca_secret_ref: Some(crate::crd::LocalRef {
                name: "provider-ca".into(),
            }),
            spf_include: None,
        };
        let mut r = relay();
        r.spec.delivery.smarthost = Some(smarthost(crate::crd::ListenerTls::Starttls));
        let c = render(&r).unwrap();
        let sh = c.delivery.smarthost.as_ref().unwrap();
        assert_eq!(
            sh.ca_file.as_deref(),
            Some(std::path::Path::new(SMARTHOST_CA))
        );
        assert_eq!(Config::parse(&config_yaml(&c).unwrap()).unwrap(), c);
        r.spec.delivery.smarthost = Some(smarthost(crate::crd::ListenerTls::None));
        let e = render(&r).unwrap_err();
        assert_eq!(e.field, "spec.delivery.smarthost.caSecretRef");
    }

    fn store_spec() -> StoreSpec {
        StoreSpec {
            url: Some("redis://relay-valkey:6379/0".into()),
            password_secret_ref: Some(SecretKeyRef {
                name: "valkey".into(),
                key: "password".into(),
            }),
            secret_ref: None,
            key_prefix: None,
            required: false,
            ca_secret_ref: None,
            cluster: false,
            sentinel_master: None,
            nodes: Vec::new(),
        }
    }

    #[test]
    fn no_store_in_the_spec_is_no_store_in_the_config() {
        let c = relay_config(&relay(), &[], &[], &users(), SecretValues::default()).unwrap();
        assert_eq!(c.store, None);
    }

    #[test]
    fn the_store_is_rendered_with_the_fleet_size_the_relay_prefix_and_the_mounted_password() {
        let mut r = relay();
        r.spec.replicas = 4;
        r.spec.store = Some(store_spec());
        let c = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap();
        let store = c.store.clone().expect("a store");
        assert_eq!(store.url, "redis://relay-valkey:6379/0");
        assert_eq!(store.fleet_size, 4, "one per replica of the SmtpRelay");
        assert_eq!(store.key_prefix, "herald:mail/relay:");
        assert_eq!(
            store.password_file.as_deref(),
            Some(std::path::Path::new(STORE_PASSWORD))
        );
        assert_eq!((store.tls, store.required), (None, false));
        // What herald-relay check-config does with the file.
        assert_eq!(Config::parse(&config_yaml(&c).unwrap()).unwrap(), c);
        // A prefix of the spec's, e.g. to make two SmtpRelays one fleet.
        r.spec.store.as_mut().unwrap().key_prefix = Some("shared:".into());
        r.spec.store.as_mut().unwrap().required = true;
        let c = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap();
        let store = c.store.unwrap();
        assert_eq!(
            (store.key_prefix.as_str(), store.required),
            ("shared:", true)
        );
    }

    #[test]
    fn a_cluster_or_sentinels_are_rendered_with_their_nodes() {
        let mut r = relay();
        let mut spec = store_spec();
        spec.cluster = true;
        spec.nodes = vec!["valkey-1.valkey:6379".into(), "valkey-2.valkey:6379".into()];
        r.spec.store = Some(spec.clone());
        let c = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap();
        let store = c.store.clone().unwrap();
        assert!(store.cluster);
        assert_eq!(store.nodes, spec.nodes);
        assert_eq!(Config::parse(&config_yaml(&c).unwrap()).unwrap(), c);
        spec.cluster = false;
        spec.sentinel_master = Some("herald".into());
        spec.url = Some("redis://sentinel-0.sentinel:26379/0".into());
        r.spec.store = Some(spec.clone());
        let c = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap();
        assert_eq!(c.store.unwrap().sentinel_master.as_deref(), Some("herald"));
        // What the relay refuses is refused here, naming the field.
        spec.sentinel_master = None;
        r.spec.store = Some(spec);
        let e = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap_err();
        assert!(e.message.contains("store.nodes"), "{e}");
    }

    #[test]
    fn the_resync_interval_is_the_relays_default() {
        let parsed: herald_config::Store =
            serde_saphyr::from_str("url: redis://valkey:6379").unwrap();
        assert_eq!(parsed.resync_interval, STORE_RESYNC_INTERVAL);
    }

    #[test]
    fn a_store_ca_is_the_mounted_ca_file_and_needs_rediss() {
        let mut r = relay();
        let mut spec = store_spec();
        spec.url = Some("rediss://valkey.example.test:6380".into());
        spec.ca_secret_ref = Some(LocalRef {
            name: "valkey-ca".into(),
        });
        r.spec.store = Some(spec.clone());
        let c = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap();
        assert_eq!(
            c.store.unwrap().tls.map(|t| t.ca_file),
            Some(STORE_CA.into())
        );
        spec.url = Some("redis://valkey:6379".into());
        r.spec.store = Some(spec);
        let e = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap_err();
        assert_eq!(e.field, "spec.store.caSecretRef");
    }

    #[test]
    fn a_secret_url_is_rendered_as_read_and_never_quoted_in_an_error() {
        let mut r = relay();
        r.spec.store = Some(StoreSpec {
            url: None,
            password_secret_ref: None,
            secret_ref: Some(UrlSecretRef {
                name: "cache".into(),
                key: "url".into(),
            }),
            ..store_spec()
        });
        let url = "rediss://default:s3cret@primary.cache.example.test:6379/0";
        let secrets = SecretValues {
            store_url: Some(url),
            ..SecretValues::default()
        };
        let c = relay_config(&r, &[], &[], &users(), secrets).unwrap();
        let store = c.store.unwrap();
        assert_eq!((store.url.as_str(), store.password_file), (url, None));
        // Not read (the reconciler reports the missing key itself): nothing is rendered.
        let e = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap_err();
        assert_eq!(e.field, "spec.store.secretRef");
        // A URL the relay refuses: the error names the field, not the URL and its password.
        let bad = SecretValues {
            store_url: Some("http://user:s3cret@cache"),
            ..SecretValues::default()
        };
        let e = relay_config(&r, &[], &[], &users(), bad).unwrap_err();
        assert!(e.message.contains("store.url"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn a_store_spec_the_api_server_would_refuse_is_refused_here_too() {
        let mut r = relay();
        r.spec.store = Some(StoreSpec {
            secret_ref: Some(UrlSecretRef {
                name: "cache".into(),
                key: "url".into(),
            }),
            ..store_spec()
        });
        let e = relay_config(&r, &[], &[], &users(), SecretValues::default()).unwrap_err();
        assert_eq!(e.field, "spec.store");
    }
}
