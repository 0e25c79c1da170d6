//! The DNS records a SendingDomain needs, computed from its spec: DKIM, SPF and MX on the return-path
//! domain, the A/AAAA (or CNAME) of the MX target when the relay's load balancer has an address, DMARC.
//! Pure functions; verification against DNS happens in the reconciler.

use crate::crd::{DmarcPolicy, DnsRecord, RecordPurpose, RecordState, SendingDomainSpec};
use crate::dkim;
use crate::inbound::HostRecord;

/// What the records depend on besides the spec.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The selector that signs now, and its DKIM public key (`p=`).
    pub selector: &'a str,
    pub dkim_public_b64: &'a str,
    /// During a rotation: the next selector and its key, published before it signs.
    pub next: Option<(&'a str, &'a str)>,
    /// The smarthost provider's SPF include, when the relay sends through one.
    pub spf_include: Option<&'a str>,
    /// Source addresses of the domain's IP pool (empty without one).
    pub pool_addresses: &'a [String],
    /// The host name the relay receives bounces on (the return-path MX target): `inbound::Route::mx_host`,
    /// a public name or the placeholder, never an in-cluster one.
    pub inbound_host: &'a str,
    /// The records of that host name, from the inbound Service's load balancer (empty while unknown).
    pub host_records: &'a [HostRecord],
}

/// Splits a TXT value into strings of at most 255 bytes (RFC 1035 section 3.3.14) in zone-file form.
pub fn txt_strings(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn record(name: String, record_type: &str, value: String, purpose: RecordPurpose) -> DnsRecord {
    DnsRecord {
        name,
        record_type: record_type.to_owned(),
        value,
        purpose,
        state: RecordState::Missing,
        observed: None,
        nameserver: None,
    }
}

/// The return-path domain: `<returnPath>.<domain>`.
pub fn return_path_domain(spec: &SendingDomainSpec) -> String {
    format!("{}.{}", spec.return_path, spec.domain)
}

/// Every record to publish, in a stable order (DKIM, SPF, return-path MX, its host's records, DMARC).
pub fn desired(spec: &SendingDomainSpec, inputs: &Inputs<'_>) -> Vec<DnsRecord> {
    let rp = return_path_domain(spec);
    let mut out = vec![record(
        format!("{}._domainkey.{}", inputs.selector, spec.domain),
        "TXT",
        txt_strings(&dkim::record_value(
            spec.dkim.algorithm,
            inputs.dkim_public_b64,
        )),
        RecordPurpose::Dkim,
    )];
    if let Some((selector, public)) = inputs.next {
        out.push(record(
            format!("{selector}._domainkey.{}", spec.domain),
            "TXT",
            txt_strings(&dkim::record_value(spec.dkim.algorithm, public)),
            RecordPurpose::Dkim,
        ));
    }
    let mut spf = String::from("v=spf1");
    if let Some(include) = inputs.spf_include {
        spf.push_str(&format!(" include:{include}"));
    } else if inputs.pool_addresses.is_empty() {
        spf.push_str(&format!(" a:{}", inputs.inbound_host));
    }
    for a in inputs.pool_addresses {
        let mech = if a.contains(':') { "ip6" } else { "ip4" };
        spf.push_str(&format!(" {mech}:{a}"));
    }
    spf.push_str(" -all");
    out.push(record(
        rp.clone(),
        "TXT",
        txt_strings(&spf),
        RecordPurpose::Spf,
    ));
    out.push(record(
        rp,
        "MX",
        format!("10 {}.", inputs.inbound_host.trim_end_matches('.')),
        RecordPurpose::ReturnPathMx,
    ));
    for h in inputs.host_records {
        out.push(record(
            inputs.inbound_host.trim_end_matches('.').to_owned(),
            h.record_type,
            h.value.clone(),
            RecordPurpose::ReturnPathHost,
        ));
    }
    if let Some(d) = &spec.dmarc {
        let p = match d.policy {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        };
        let mut v = format!("v=DMARC1; p={p}; adkim=r; aspf=r");
        if let Some(addr) = &d.report_address {
            v.push_str(&format!("; rua=mailto:{addr}"));
        }
        out.push(record(
            format!("_dmarc.{}", spec.domain),
            "TXT",
            txt_strings(&v),
            RecordPurpose::Dmarc,
        ));
    }
    out
}

/// Joins the strings of a TXT record as served (a resolver returns them split) for comparison.
pub fn join_txt(strings: &[&str]) -> String {
    strings.concat()
}

/// The TXT value a record expects, without the zone-file quoting.
pub fn unquoted(value: &str) -> String {
    value
        .split("\" \"")
        .map(|s| s.trim_matches('"'))
        .collect::<Vec<_>>()
        .concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DmarcSpec;

    fn spec() -> SendingDomainSpec {
        SendingDomainSpec {
            dmarc: Some(DmarcSpec {
                policy: DmarcPolicy::Quarantine,
                report_address: Some("dmarc@example.test".into()),
            }),
            ..crate::fixtures::domain_spec()
        }
    }

    #[test]
    fn records_for_a_domain_with_a_pool() {
        let key = "A".repeat(392);
        let pool = ["192.0.2.10".to_owned(), "2001:db8::1".to_owned()];
        let r = desired(
            &spec(),
            &Inputs {
                selector: "herald1",
                dkim_public_b64: &key,
                next: None,
                spf_include: None,
                pool_addresses: &pool,
                inbound_host: "relay.mail.svc.example.test",
                host_records: &[],
            },
        );
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].name, "herald1._domainkey.example.test");
        // A 2048-bit key does not fit in one 255-byte string.
        assert_eq!(r[0].value.matches("\" \"").count(), 1);
        assert_eq!(unquoted(&r[0].value), format!("v=DKIM1; k=rsa; p={key}"));
        assert_eq!(r[1].name, "bounces.example.test");
        assert_eq!(
            unquoted(&r[1].value),
            "v=spf1 ip4:192.0.2.10 ip6:2001:db8::1 -all"
        );
        assert_eq!(r[2].value, "10 relay.mail.svc.example.test.");
        assert_eq!(r[3].name, "_dmarc.example.test");
        assert_eq!(
            unquoted(&r[3].value),
            "v=DMARC1; p=quarantine; adkim=r; aspf=r; rua=mailto:dmarc@example.test"
        );
        assert!(r.iter().all(|x| x.state == RecordState::Missing));
    }

    #[test]
    fn the_mx_target_gets_the_load_balancers_records_before_dmarc() {
        let hosts = [
            HostRecord {
                record_type: "A",
                value: "192.0.2.25".into(),
            },
            HostRecord {
                record_type: "AAAA",
                value: "2001:db8::25".into(),
            },
        ];
        let r = desired(
            &spec(),
            &Inputs {
                selector: "herald1",
                dkim_public_b64: "x",
                next: None,
                spf_include: None,
                pool_addresses: &[],
                inbound_host: "mx.example.test",
                host_records: &hosts,
            },
        );
        let got: Vec<(&str, &str, &str, RecordPurpose)> = r
            .iter()
            .map(|x| {
                (
                    x.name.as_str(),
                    x.record_type.as_str(),
                    x.value.as_str(),
                    x.purpose,
                )
            })
            .collect();
        assert_eq!(
            got[2..5],
            [
                (
                    "bounces.example.test",
                    "MX",
                    "10 mx.example.test.",
                    RecordPurpose::ReturnPathMx
                ),
                (
                    "mx.example.test",
                    "A",
                    "192.0.2.25",
                    RecordPurpose::ReturnPathHost
                ),
                (
                    "mx.example.test",
                    "AAAA",
                    "2001:db8::25",
                    RecordPurpose::ReturnPathHost
                ),
            ]
        );
        assert_eq!(r[5].purpose, RecordPurpose::Dmarc);
    }

    #[test]
    fn spf_through_a_smarthost_includes_the_provider() {
        let r = desired(
            &spec(),
            &Inputs {
                selector: "herald1",
                dkim_public_b64: "x",
                next: None,
                spf_include: Some("_spf.provider.test"),
                pool_addresses: &[],
                inbound_host: "mx.example.test",
                host_records: &[],
            },
        );
        assert_eq!(
            unquoted(&r[1].value),
            "v=spf1 include:_spf.provider.test -all"
        );
    }

    #[test]
    fn spf_without_a_pool_names_the_relay() {
        let r = desired(
            &spec(),
            &Inputs {
                selector: "herald1",
                dkim_public_b64: "x",
                next: Some(("herald2", "y")),
                spf_include: None,
                pool_addresses: &[],
                inbound_host: "mx.example.test",
                host_records: &[],
            },
        );
        assert_eq!(unquoted(&r[1].value), "v=DKIM1; k=rsa; p=y");
        assert_eq!(r[1].name, "herald2._domainkey.example.test");
        assert_eq!(unquoted(&r[2].value), "v=spf1 a:mx.example.test -all");
        assert_eq!(
            join_txt(&["v=spf1 a:mx.ex", "ample.test -all"]),
            "v=spf1 a:mx.example.test -all"
        );
    }
}
