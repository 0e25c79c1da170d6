//! Finding where to deliver: MX resolution (RFC 5321 section 5.1) with hickory-resolver.
//!
//! MX hosts by preference, shuffled among equals; the domain itself when it has no MX (implicit MX); a
//! permanent failure for a domain that does not exist or publishes a null MX (RFC 7505); a temporary one for
//! time-outs and SERVFAIL. Answers are cached by hickory for their TTL.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use rand::seq::SliceRandom;

/// Why no address could be found.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsFailure {
    #[error("domain {0} does not exist")]
    NoSuchDomain(String),
    #[error("domain {0} does not accept mail (null MX)")]
    NullMx(String),
    #[error("no address for {0}")]
    NoAddress(String),
    #[error("DNS lookup for {name} failed: {reason}")]
    Temporary { name: String, reason: String },
}

impl DnsFailure {
    /// Whether retrying later can help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, DnsFailure::NoSuchDomain(_) | DnsFailure::NullMx(_))
    }

    /// The enhanced status code reported for it.
    pub fn status(&self) -> &'static str {
        match self {
            DnsFailure::NoSuchDomain(_) => "5.1.2",
            DnsFailure::NullMx(_) => "5.1.10",
            DnsFailure::NoAddress(_) => "4.4.4",
            DnsFailure::Temporary { .. } => "4.4.3",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct ResolverError(String);

/// The delivery engine's resolver.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// Uses `nameservers` (UDP, TCP on truncation), or the system's resolver when there are none.
    pub fn new(nameservers: &[SocketAddr]) -> Result<Resolver, ResolverError> {
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| ResolverError(e.to_string()))?
        } else {
            let servers = nameservers
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        opts.ndots = 0;
        let inner = builder.build().map_err(|e| ResolverError(e.to_string()))?;
        Ok(Resolver { inner })
    }

    /// The hosts to try for `domain`, best first.
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<String>, DnsFailure> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let lookup = match self.inner.mx_lookup(fqdn.as_str()).await {
            Ok(l) => l,
            Err(e) => {
                return match classify(domain, &e) {
                    // RFC 5321 section 5.1: no MX records, so the domain itself is the host.
                    Lookup::NoData => Ok(vec![domain.to_owned()]),
                    Lookup::Failed(f) => Err(f),
                };
            }
        };
        let mut mx: Vec<(u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                _ => None,
            })
            .collect();
        if mx.is_empty() {
            return Ok(vec![domain.to_owned()]);
        }
        // RFC 7505: a single MX whose exchange is the root means "no mail".
        if mx.len() == 1 && (mx[0].1 == "." || mx[0].1.is_empty()) {
            return Err(DnsFailure::NullMx(domain.to_owned()));
        }
        mx.retain(|(_, host)| host != ".");
        // Random among equal preferences, so load spreads as the publisher intended.
        mx.shuffle(&mut rand::rng());
        mx.sort_by_key(|(pref, _)| *pref);
        Ok(mx
            .into_iter()
            .map(|(_, h)| h.trim_end_matches('.').to_owned())
            .collect())
    }

    /// The addresses of `host`.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_start_matches("IPv6:")
            .parse::<IpAddr>()
            && host.starts_with('[')
        {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(l) => {
                let v: Vec<IpAddr> = l.iter().collect();
                if v.is_empty() {
                    Err(DnsFailure::NoAddress(host.to_owned()))
                } else {
                    Ok(v)
                }
            }
            Err(e) => match classify(host, &e) {
                Lookup::NoData => Err(DnsFailure::NoAddress(host.to_owned())),
                Lookup::Failed(f) => Err(f),
            },
        }
    }
}

enum Lookup {
    NoData,
    Failed(DnsFailure),
}

fn classify(name: &str, e: &NetError) -> Lookup {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => match nr.response_code {
            ResponseCode::NXDomain => Lookup::Failed(DnsFailure::NoSuchDomain(name.to_owned())),
            _ => Lookup::NoData,
        },
        other => Lookup::Failed(DnsFailure::Temporary {
            name: name.to_owned(),
            reason: other.to_string(),
        }),
    }
}
