//! Checking DNS records against what a nameserver serves, saying which nameserver said what.
//!
//! TXT records arrive split into strings; they are joined before comparing (a 2048-bit DKIM key never fits
//! one string). Lookups go over UDP with TCP on truncation. Each configured nameserver gets its own
//! resolver so a mismatch can name the one that served it.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};

use crate::crd::{DnsRecord, RecordState};
use crate::records::unquoted;

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct VerifierError(String);

/// Resolvers for the configured nameservers (or the system's).
#[derive(Clone)]
pub struct Verifier {
    resolvers: Vec<(String, TokioResolver)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.resolvers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Verifier")
            .field("nameservers", &names)
            .finish()
    }
}

fn opts(builder_opts: &mut ResolverOpts) {
    builder_opts.timeout = Duration::from_secs(3);
    builder_opts.attempts = 2;
    builder_opts.ndots = 0;
    // Records change while a user fixes them: a cached negative answer would hide the fix.
    builder_opts.cache_size = 0;
}

impl Verifier {
    pub fn new(nameservers: &[SocketAddr]) -> Result<Verifier, VerifierError> {
        let mut resolvers = Vec::new();
        if nameservers.is_empty() {
            let mut b = TokioResolver::builder_tokio().map_err(|e| VerifierError(e.to_string()))?;
            opts(b.options_mut());
            resolvers.push((
                "system resolver".to_owned(),
                b.build().map_err(|e| VerifierError(e.to_string()))?,
            ));
        }
        for ns in nameservers {
            let mut udp = ConnectionConfig::udp();
            udp.port = ns.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = ns.port();
            let server = NameServerConfig::new(ns.ip(), true, vec![udp, tcp]);
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![server]),
                TokioRuntimeProvider::default(),
            );
            opts(b.options_mut());
            resolvers.push((
                ns.to_string(),
                b.build().map_err(|e| VerifierError(e.to_string()))?,
            ));
        }
        Ok(Verifier { resolvers })
    }

    /// Checks one record against every nameserver; Published only if all serve it.
    pub async fn check(&self, record: &DnsRecord) -> DnsRecord {
        let mut out = record.clone();
        out.state = RecordState::Published;
        out.observed = None;
        out.nameserver = None;
        for (ns, resolver) in &self.resolvers {
            let (state, observed) = match record.record_type.as_str() {
                "TXT" => check_txt(resolver, &record.name, &unquoted(&record.value)).await,
                "MX" => check_mx(resolver, &record.name, &record.value).await,
                "A" | "AAAA" | "CNAME" => {
                    check_host(resolver, &record.name, &record.record_type, &record.value).await
                }
                other => (
                    RecordState::Mismatch,
                    Some(format!("record type {other} cannot be checked")),
                ),
            };
            if state != RecordState::Published {
                out.state = state;
                out.observed = observed;
                out.nameserver = Some(ns.clone());
                return out;
            }
        }
        out
    }
}

fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// Missing for NXDOMAIN/NODATA; a lookup failure is reported as Missing with what went wrong.
fn failure(e: &NetError) -> (RecordState, Option<String>) {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            (RecordState::Missing, Some("NXDOMAIN".to_owned()))
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => (RecordState::Missing, None),
        other => (
            RecordState::Missing,
            Some(format!("lookup failed: {other}")),
        ),
    }
}

async fn check_txt(r: &TokioResolver, name: &str, want: &str) -> (RecordState, Option<String>) {
    let lookup = match r.txt_lookup(fqdn(name).as_str()).await {
        Ok(l) => l,
        Err(e) => return failure(&e),
    };
    let values: Vec<String> = lookup
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect();
    if values.iter().any(|v| v.trim() == want) {
        return (RecordState::Published, None);
    }
    // Several TXT records may live at one name (SPF next to a verification token): show the one that
    // looks like ours.
    let prefix = want
        .split(';')
        .next()
        .unwrap_or(want)
        .split(' ')
        .next()
        .unwrap_or(want);
    let shown = values
        .iter()
        .find(|v| v.starts_with(prefix))
        .or(values.first())
        .cloned();
    match shown {
        Some(v) => (RecordState::Mismatch, Some(v)),
        None => (RecordState::Missing, None),
    }
}

async fn check_mx(r: &TokioResolver, name: &str, want: &str) -> (RecordState, Option<String>) {
    let lookup = match r.mx_lookup(fqdn(name).as_str()).await {
        Ok(l) => l,
        Err(e) => return failure(&e),
    };
    let want_host = want
        .split_whitespace()
        .last()
        .unwrap_or(want)
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let served: Vec<String> = lookup
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::MX(m) => Some(format!("{} {}", m.preference, m.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    let matches = served.iter().any(|s| {
        s.split_whitespace()
            .last()
            .is_some_and(|h| h.trim_end_matches('.').eq_ignore_ascii_case(&want_host))
    });
    if matches {
        (RecordState::Published, None)
    } else if served.is_empty() {
        (RecordState::Missing, None)
    } else {
        (RecordState::Mismatch, Some(served.join(", ")))
    }
}

/// An address (A, AAAA) or alias (CNAME) record of a host: published when the wanted value is among those
/// served (a host may have more addresses than its load balancer's).
async fn check_host(
    r: &TokioResolver,
    name: &str,
    record_type: &str,
    want: &str,
) -> (RecordState, Option<String>) {
    let rtype = match record_type {
        "A" => RecordType::A,
        "AAAA" => RecordType::AAAA,
        _ => RecordType::CNAME,
    };
    let lookup = match r.lookup(fqdn(name).as_str(), rtype).await {
        Ok(l) => l,
        Err(e) => return failure(&e),
    };
    let served: Vec<String> = lookup
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) if rtype == RecordType::A => Some(a.0.to_string()),
            RData::AAAA(a) if rtype == RecordType::AAAA => Some(a.0.to_string()),
            RData::CNAME(c) if rtype == RecordType::CNAME => Some(c.0.to_ascii()),
            _ => None,
        })
        .collect();
    let same = |s: &String| match rtype {
        RecordType::CNAME => s
            .trim_end_matches('.')
            .eq_ignore_ascii_case(want.trim_end_matches('.')),
        // Compared as addresses: `2001:db8::25` and `2001:db8:0::25` are one.
        _ => s.parse::<std::net::IpAddr>().ok() == want.parse().ok(),
    };
    if served.iter().any(same) {
        (RecordState::Published, None)
    } else if served.is_empty() {
        (RecordState::Missing, None)
    } else {
        (RecordState::Mismatch, Some(served.join(", ")))
    }
}

/// Forward-confirmed reverse DNS of a sending address: its PTR names `ehlo`, and `ehlo` resolves back to it.
pub async fn check_reverse(
    v: &Verifier,
    address: std::net::IpAddr,
    ehlo: &str,
) -> (RecordState, Option<String>, Option<String>) {
    for (ns, r) in &v.resolvers {
        let ptrs: Vec<String> = match r.reverse_lookup(address).await {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::PTR(p) => {
                        Some(p.0.to_ascii().trim_end_matches('.').to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect(),
            Err(e) => {
                let (state, observed) = failure(&e);
                return (state, observed, Some(ns.clone()));
            }
        };
        let want = ehlo.trim_end_matches('.').to_ascii_lowercase();
        if !ptrs.contains(&want) {
            return (
                RecordState::Mismatch,
                Some(format!("PTR {}", ptrs.join(", "))),
                Some(ns.clone()),
            );
        }
        let forward: Vec<std::net::IpAddr> = match r.lookup_ip(fqdn(ehlo).as_str()).await {
            Ok(l) => l.iter().collect(),
            Err(e) => {
                let (_, observed) = failure(&e);
                return (
                    RecordState::Mismatch,
                    Some(format!(
                        "{ehlo} does not resolve: {}",
                        observed.unwrap_or_default()
                    )),
                    Some(ns.clone()),
                );
            }
        };
        if !forward.contains(&address) {
            let list: Vec<String> = forward.iter().map(|a| a.to_string()).collect();
            return (
                RecordState::Mismatch,
                Some(format!("{ehlo} resolves to {}", list.join(", "))),
                Some(ns.clone()),
            );
        }
    }
    (RecordState::Published, None, None)
}
