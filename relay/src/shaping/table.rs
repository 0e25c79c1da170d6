//! The providers, their limits and the back-off rules in force: the shipped ones (`shipped.yaml`, over the
//! bounce rules' provider definitions) with the config's `shaping` section over them. Built whole at start
//! and at each reload.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use herald_config::{BackoffAction, Category, ProviderLimits, Shaping, StatusPattern};

use super::ShapingError;

const SHIPPED: &str = include_str!("shipped.yaml");

/// `shipped.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Shipped {
    providers: BTreeMap<String, ProviderLimits>,
    rules: Vec<ShippedRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShippedRule {
    provider: String,
    category: Category,
    #[serde(default)]
    status: Option<String>,
    action: BackoffAction,
    #[serde(default)]
    duration: Option<String>,
    /// The page the reply and what to do about it were read from.
    source: String,
}

/// A provider: the MX hosts that are its, and its limits per source address.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: Arc<str>,
    /// Host name suffixes.
    mx: Vec<String>,
    pub limits: ProviderLimits,
}

impl Provider {
    fn hosts(&self, host: &str) -> bool {
        self.mx.iter().any(|suffix| {
            host.len() >= suffix.len()
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && (host.len() == suffix.len()
                    || host.as_bytes()[host.len() - suffix.len() - 1] == b'.')
        })
    }
}

/// A provider's limits as configured, for `GET /shaping`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LimitsView {
    pub provider: String,
    pub mx: Vec<String>,
    #[serde(flatten)]
    pub limits: ProviderLimits,
}

/// One back-off rule in force.
#[derive(Debug, Clone)]
pub struct Rule {
    pub provider: Option<Arc<str>>,
    pub category: Category,
    status: Option<StatusPattern>,
    pub action: BackoffAction,
    pub duration: Option<Duration>,
    /// Where it was written: `shaping.rules[2]`, or `shipped: gmail rate-limited`.
    pub origin: String,
}

/// Everything shaping decides by, as one reload put it in force.
#[derive(Debug, Clone)]
pub struct Table {
    /// The config's providers first, so that their MX hosts win over a shipped provider's.
    providers: Vec<Provider>,
    default: ProviderLimits,
    rules: Vec<Rule>,
    pub recovery: Duration,
}

impl Table {
    /// The shipped table with `shaping` over it.
    pub fn load(shaping: &Shaping) -> Result<Table, ShapingError> {
        let shipped: Shipped = serde_saphyr::from_str(SHIPPED)
            .map_err(|e| ShapingError::Shipped(format!("shipped.yaml: {e}")))?;
        let mut providers: Vec<Provider> = Vec::new();
        for (name, table) in crate::outcome::rules::tables()? {
            if let Some(p) = table.provider {
                let limits = shipped.providers.get(&p.name).cloned().unwrap_or_default();
                providers.push(Provider {
                    name: Arc::from(p.name.as_str()),
                    mx: p.mx,
                    limits,
                });
            } else if shipped.providers.contains_key(name) {
                return Err(ShapingError::Shipped(format!(
                    "shipped.yaml: {name} is not a provider"
                )));
            }
        }
        if let Some(unknown) = shipped
            .providers
            .keys()
            .find(|n| !providers.iter().any(|p| &*p.name == n.as_str()))
        {
            return Err(ShapingError::Shipped(format!(
                "shipped.yaml: no provider {unknown} in the bounce rules"
            )));
        }
        let mut configured: Vec<Provider> = Vec::new();
        for p in &shaping.providers {
            match providers.iter().position(|s| *s.name == *p.name) {
                Some(i) => {
                    let shipped = providers.remove(i);
                    let mut mx = p.mx.clone();
                    mx.extend(shipped.mx);
                    configured.push(Provider {
                        name: shipped.name,
                        mx,
                        limits: shipped.limits.overridden_by(&p.limits()),
                    });
                }
                None => configured.push(Provider {
                    name: Arc::from(p.name.as_str()),
                    mx: p.mx.clone(),
                    limits: p.limits(),
                }),
            }
        }
        configured.extend(providers);
        let providers = configured;
        let known = |name: &str| -> Option<Arc<str>> {
            providers
                .iter()
                .find(|p| &*p.name == name)
                .map(|p| p.name.clone())
                // A provider no table names is one an unknown destination rolls up to: its registrable
                // domain (a host name under it would never be one).
                .or_else(|| (psl::domain_str(name) == Some(name)).then(|| Arc::from(name)))
        };
        let mut rules = Vec::new();
        for (i, r) in shaping.rules.iter().enumerate() {
            let at = format!("shaping.rules[{i}]");
            let provider = match &r.provider {
                Some(p) => Some(known(p).ok_or_else(|| ShapingError::Provider {
                    field: format!("{at}.provider"),
                    name: p.clone(),
                    known: providers.iter().map(|p| p.name.to_string()).collect(),
                })?),
                None => None,
            };
            rules.push(Rule {
                provider,
                category: r.category,
                // Checked by the config's validation.
                status: r.status.as_deref().and_then(StatusPattern::parse),
                action: r.action,
                duration: r.duration,
                origin: at,
            });
        }
        if shaping.builtin_rules {
            for (i, r) in shipped.rules.iter().enumerate() {
                let bad = |what: String| {
                    ShapingError::Shipped(format!("shipped.yaml rules[{i}]: {what}"))
                };
                let provider = known(&r.provider)
                    .filter(|_| !r.provider.contains('.'))
                    .ok_or_else(|| bad(format!("unknown provider {}", r.provider)))?;
                let status = match &r.status {
                    Some(s) => {
                        Some(StatusPattern::parse(s).ok_or_else(|| bad(format!("status {s:?}")))?)
                    }
                    None => None,
                };
                let duration = match &r.duration {
                    Some(d) => Some(
                        humantime::parse_duration(d).map_err(|e| bad(format!("duration: {e}")))?,
                    ),
                    None => None,
                };
                if (r.action == BackoffAction::Suspend) != duration.is_some()
                    || !r.source.starts_with("https://")
                {
                    return Err(bad(
                        "a suspension and only a suspension has a duration; every rule a source"
                            .into(),
                    ));
                }
                rules.push(Rule {
                    provider: Some(provider),
                    category: r.category,
                    status,
                    action: r.action,
                    duration,
                    origin: format!("shipped: {} {}", r.provider, r.category.as_str()),
                });
            }
        }
        Ok(Table {
            providers,
            default: shaping.default.clone(),
            rules,
            recovery: shaping.recovery,
        })
    }

    /// The provider a destination whose MX hosts are `hosts` (best first) rolls up to: the one whose MX
    /// host suffixes take the best host, else that host's registrable domain (public suffix list).
    pub fn provider_of(&self, hosts: &[String]) -> Option<Arc<str>> {
        let host = hosts.first()?.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() || host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        if let Some(p) = self.providers.iter().find(|p| p.hosts(&host)) {
            return Some(p.name.clone());
        }
        let registrable = psl::domain_str(&host).unwrap_or(&host);
        Some(Arc::from(registrable))
    }

    /// Every provider that has limits, with them, and the limits of the others (`default`).
    pub fn limit_views(&self) -> (Vec<LimitsView>, ProviderLimits) {
        let views = self
            .providers
            .iter()
            .filter(|p| !p.limits.is_empty())
            .map(|p| LimitsView {
                provider: p.name.to_string(),
                mx: p.mx.clone(),
                limits: p.limits.clone(),
            })
            .collect();
        (views, self.default.clone())
    }

    /// Whether shaping has anything to do for `provider`: limits, or a back-off rule that may match.
    pub fn shapes(&self, provider: &str) -> bool {
        !self.limits(provider).is_empty()
            || self
                .rules
                .iter()
                .any(|r| r.provider.as_deref().is_none_or(|p| p == provider))
    }

    /// The limits of `provider`, per source address.
    pub fn limits(&self, provider: &str) -> &ProviderLimits {
        self.providers
            .iter()
            .find(|p| &*p.name == provider)
            .map_or(&self.default, |p| &p.limits)
    }

    /// The first rule a failed reply from `provider`, put in `category`, with `enhanced` as its enhanced
    /// status code, matches.
    pub fn rule(
        &self,
        provider: &str,
        category: Category,
        enhanced: Option<&str>,
    ) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.category == category
                && r.provider.as_deref().is_none_or(|p| p == provider)
                && r.status.as_ref().is_none_or(|s| {
                    enhanced
                        .and_then(crate::outcome::classify::enhanced_parts)
                        .is_some_and(|e| s.matches(&e))
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> Result<Table, ShapingError> {
        let shaping: Shaping = serde_saphyr::from_str(yaml).expect("shaping yaml");
        Table::load(&shaping)
    }

    #[test]
    fn the_shipped_table_loads_and_covers_the_large_providers() {
        let t = table("{}").expect("shipped");
        for name in [
            "gmail",
            "microsoft",
            "yahoo",
            "apple",
            "comcast",
            "orange",
            "gmx",
            "mailru",
            "yandex",
        ] {
            let l = t.limits(name);
            assert!(l.messages_per_connection.is_some(), "{name}: {l:?}");
        }
        assert!(t.rules.len() >= 7);
        // The config crate's list of the shipped providers, which it checks rules against, is these.
        let mut names: Vec<&str> = t.providers.iter().map(|p| &*p.name).collect();
        let mut listed = herald_config::SHIPPED_PROVIDERS.to_vec();
        names.sort_unstable();
        listed.sort_unstable();
        assert_eq!(names, listed);
        let r = t
            .rule("gmail", Category::RateLimited, Some("4.7.28"))
            .expect("gmail rate rule");
        assert_eq!(r.action, BackoffAction::Suspend);
        assert_eq!(
            t.rule("yahoo", Category::RateLimited, Some("4.7.0"))
                .map(|r| r.action),
            Some(BackoffAction::Suspend)
        );
        assert_eq!(
            t.rule("microsoft", Category::RateLimited, None)
                .map(|r| r.action),
            Some(BackoffAction::Halve)
        );
        assert!(t.rule("gmail", Category::InvalidRecipient, None).is_none());
        assert!(t.rule("example.net", Category::RateLimited, None).is_none());
    }

    #[test]
    fn destinations_roll_up_by_their_best_mx_host() {
        let t = table("providers: [{name: hosting, mx: [mx.hosting.test], max_connections: 2}]")
            .expect("table");
        let hosts = |h: &[&str]| h.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // Every Google Workspace domain is Gmail.
        assert_eq!(
            t.provider_of(&hosts(&["aspmx.l.google.com.", "alt1.aspmx.l.google.com"]))
                .as_deref(),
            Some("gmail")
        );
        assert_eq!(
            t.provider_of(&hosts(&["example-com.mail.protection.outlook.com"]))
                .as_deref(),
            Some("microsoft")
        );
        assert_eq!(
            t.provider_of(&hosts(&["a.mx.hosting.test"])).as_deref(),
            Some("hosting")
        );
        assert_eq!(t.limits("hosting").max_connections, Some(2));
        // Unknown: the registrable domain, by the public suffix list.
        assert_eq!(
            t.provider_of(&hosts(&["mx1.mail.example.co.uk"]))
                .as_deref(),
            Some("example.co.uk")
        );
        assert_eq!(
            t.provider_of(&hosts(&["mx.b.example.net", "mx.a.example.net"]))
                .as_deref(),
            Some("example.net")
        );
        assert_eq!(
            t.provider_of(&hosts(&["notgoogle.com"])).as_deref(),
            Some("notgoogle.com")
        );
        assert_eq!(t.provider_of(&hosts(&["127.0.0.1"])), None);
        assert_eq!(t.provider_of(&[]), None);
    }

    #[test]
    fn the_config_overrides_limits_field_by_field_and_its_rules_come_first() {
        let t = table(
            "providers: [{name: gmail, max_connections: 3, max_message_rates: [100/min]}]\n\
             default: {max_connections: 4}\n\
             rules: [{provider: gmail, category: rate-limited, status: 4.7.28, action: halve}]",
        )
        .expect("table");
        let g = t.limits("gmail");
        assert_eq!(g.max_connections, Some(3));
        assert_eq!(
            g.messages_per_connection,
            Some(100),
            "kept from the shipped table"
        );
        assert_eq!(g.max_message_rates.as_ref().map(Vec::len), Some(1));
        assert_eq!(t.limits("example.net").max_connections, Some(4));
        assert_eq!(
            t.rule("gmail", Category::RateLimited, Some("4.7.28"))
                .map(|r| r.action),
            Some(BackoffAction::Halve)
        );
        // Another code falls through to the shipped rule.
        assert_eq!(
            t.rule("gmail", Category::RateLimited, Some("4.2.1"))
                .map(|r| r.action),
            Some(BackoffAction::Suspend)
        );
        let off = table("builtin_rules: false").expect("table");
        assert!(off.rule("gmail", Category::RateLimited, None).is_none());
    }

    #[test]
    fn a_rule_for_a_provider_nobody_defines_is_refused_with_its_field() {
        let e = table("rules: [{provider: gmial, category: rate-limited, action: halve}]")
            .expect_err("unknown provider");
        let text = e.to_string();
        assert!(text.starts_with("shaping.rules[0].provider: "), "{text}");
        assert!(text.contains("gmial") && text.contains("gmail"), "{text}");
        // A registrable domain is the provider of the destinations hosted there; a host under one is not.
        let t = table("rules: [{provider: example.net, category: rate-limited, action: halve}]")
            .expect("domain provider");
        assert!(t.shapes("example.net") && !t.shapes("example.org"));
        assert!(t.shapes("gmail"), "shipped limits and rules");
        let e = table("rules: [{provider: mx.example.net, category: rate-limited, action: halve}]")
            .expect_err("a host name");
        assert!(
            e.to_string().starts_with("shaping.rules[0].provider: "),
            "{e}"
        );
    }
}
