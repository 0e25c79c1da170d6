//! The way bounces come back: a relay's inbound listener (port 25), the Service that exposes it, and whether
//! the MX record of a return-path domain can point anywhere the internet reaches.
//!
//! Mail leaves with `<returnPath>.<domain>` as its envelope sender; the asynchronous bounces (DSNs) and
//! feedback-loop complaints go to that domain's MX. That MX must be a name the world resolves
//! (`spec.hostname` of the SmtpRelay) at an address where port 25 reaches the relay (the inbound Service).
//! [`route`] says whether a relay has both, and what to publish; it never offers an in-cluster name
//! (`*.svc.cluster.local`) as a record: without a public name, the record names [`PLACEHOLDER_HOST`], a
//! name under `.invalid` (RFC 2606) that says what to set.
//!
//! Pure functions of the SmtpRelay (its spec and its status's load-balancer addresses), tested without a
//! cluster.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::crd::{
    InboundServiceType, InboundStatus, ListenerAuth, ListenerSpec, ListenerTls, SmtpRelay,
};
use crate::objects::{meta, selector};

/// The SMTP port of MX hosts: an MX record has no port, so bounces come to 25.
pub const INBOUND_PORT: i32 = 25;
/// The name of the inbound listener the operator adds (and of its container and Service port).
pub const INBOUND_LISTENER: &str = "inbound";
/// The MX target shown while the relay has no public name: it resolves nowhere, and says what to set.
pub const PLACEHOLDER_HOST: &str = "set-smtprelay-spec-hostname.invalid";

/// The name of the Service that exposes the inbound listener.
pub fn service_name(relay: &SmtpRelay) -> String {
    format!("{}-inbound", relay.name_any())
}

/// The relay's listeners as it runs them: the spec's, and with `spec.inboundService` the inbound listener
/// on port 25 unless the spec has a listener there already (which then is the inbound one; the CRD's rules
/// and [`conflict`] keep it one without auth or networks).
pub fn listeners(relay: &SmtpRelay) -> Vec<ListenerSpec> {
    let mut out = relay.spec.listeners.clone();
    if relay.spec.inbound_service.is_some() && !out.iter().any(|l| l.port == INBOUND_PORT) {
        out.push(ListenerSpec {
            name: INBOUND_LISTENER.into(),
            port: INBOUND_PORT,
            // Opportunistic: senders of bounces use STARTTLS when offered and never need it.
            tls: if relay.spec.tls_secret_ref.is_some() {
                ListenerTls::Starttls
            } else {
                ListenerTls::None
            },
            auth: ListenerAuth::None,
            allow_networks: vec![],
            allow_namespaces: None,
            trusted_senders: None,
        });
    }
    out
}

/// The listener that receives bounces: its name, when the relay has one.
fn inbound_listener_name(relay: &SmtpRelay) -> Option<String> {
    relay.spec.inbound_service.as_ref()?;
    listeners(relay)
        .into_iter()
        .find(|l| l.port == INBOUND_PORT)
        .map(|l| l.name)
}

/// A listener of the spec that cannot coexist with the inbound one: `(field, message)`. The CRD's CEL rules
/// say the same at `kubectl apply`; this is for objects written before them.
pub fn conflict(relay: &SmtpRelay) -> Option<(String, String)> {
    relay.spec.inbound_service.as_ref()?;
    relay
        .spec
        .listeners
        .iter()
        .enumerate()
        .find_map(|(i, l)| {
            if l.port == INBOUND_PORT
                && (l.auth != ListenerAuth::None
                    || !l.allow_networks.is_empty()
                    || l.allow_namespaces.is_some())
            {
                Some((
                    format!("spec.listeners[{i}]"),
                    "with spec.inboundService, port 25 is the inbound listener that receives bounces from anyone: it takes no auth, allowNetworks or allowNamespaces".to_owned(),
                ))
            } else if l.name == INBOUND_LISTENER && l.port != INBOUND_PORT {
                Some((
                    format!("spec.listeners[{i}].name"),
                    "with spec.inboundService, the name inbound is the inbound listener on port 25"
                        .to_owned(),
                ))
            } else {
                None
            }
        })
}

/// The inbound Service, when the spec asks for one: port 25 to the inbound listener, of the spec's type.
pub fn service(relay: &SmtpRelay) -> Option<Service> {
    let spec = relay.spec.inbound_service.as_ref()?;
    let listener = inbound_listener_name(relay)?;
    let mut metadata = meta(relay, service_name(relay));
    metadata.annotations = (!spec.annotations.is_empty()).then(|| spec.annotations.clone());
    Some(Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(spec.type_.as_str().to_owned()),
            selector: Some(selector(relay)),
            ports: Some(vec![ServicePort {
                name: Some(INBOUND_LISTENER.into()),
                port: INBOUND_PORT,
                target_port: Some(IntOrString::String(listener)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            load_balancer_class: spec.load_balancer_class.clone(),
            external_traffic_policy: spec.external_traffic_policy.map(|p| p.as_str().to_owned()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The inbound part of the relay's status: the Service's name and the addresses its load balancer reports
/// (none while it has none, or while the Service does not exist yet).
pub fn status(relay: &SmtpRelay, service: Option<&Service>) -> InboundStatus {
    let ingress = service
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let mut addresses: Vec<String> = ingress
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    let mut hostnames: Vec<String> = ingress
        .into_iter()
        .flatten()
        .filter_map(|i| i.hostname.clone())
        .collect();
    // The status is compared with the last one written: a reordering is no change.
    addresses.sort();
    hostnames.sort();
    InboundStatus {
        service: service_name(relay),
        addresses,
        hostnames,
    }
}

/// Whether `service` is this relay's (its controller owner), so that the operator deletes it when the spec
/// drops `inboundService`, and never a Service someone else made under that name.
pub fn owned_by(service: &Service, relay: &SmtpRelay) -> bool {
    let uid = relay.metadata.uid.as_deref();
    uid.is_some()
        && service
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// Why a host name is no MX target the internet can use, or `None` when it may be one.
pub fn not_public(hostname: &str) -> Option<&'static str> {
    let h = hostname.trim_end_matches('.').to_ascii_lowercase();
    if !h.contains('.') {
        return Some("is not a fully qualified name");
    }
    // Names only a cluster, a LAN or this host resolve (RFC 6761, RFC 6762, Kubernetes's cluster domain).
    const INTERNAL: [&str; 6] = [
        ".cluster.local",
        ".svc",
        ".local",
        ".localhost",
        ".internal",
        ".invalid",
    ];
    if h.contains(".svc.") || INTERNAL.iter().any(|s| h.ends_with(s)) {
        return Some("resolves only inside the cluster or the local network");
    }
    None
}

/// One record for the relay's host name: its type (A, AAAA or CNAME) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    pub record_type: &'static str,
    pub value: String,
}

/// Whether bounces can reach a relay, and what its SendingDomains publish for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The return-path MX target: `spec.hostname`, or [`PLACEHOLDER_HOST`] without a public one.
    pub mx_host: String,
    /// The records of `mx_host` (from the load balancer's addresses), to publish beside the MX.
    pub host_records: Vec<HostRecord>,
    /// The `ReturnPathRoutable` condition: status, reason, message.
    pub routable: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Route {
    fn no(mx_host: String, reason: &'static str, message: String) -> Route {
        Route {
            mx_host,
            host_records: Vec::new(),
            routable: false,
            reason,
            message,
        }
    }
}

/// Where the bounces of a domain sent by relay `relay_name` (`relay`, when it exists) go.
pub fn route(relay_name: &str, relay: Option<&SmtpRelay>) -> Route {
    let placeholder = PLACEHOLDER_HOST.to_owned();
    let Some(relay) = relay else {
        return Route::no(
            placeholder,
            "RelayNotFound",
            format!("SmtpRelay {relay_name} (spec.relayRef) does not exist"),
        );
    };
    let Some(hostname) = relay.spec.hostname.as_deref() else {
        return Route::no(
            placeholder,
            "NoPublicHostname",
            format!(
                "set spec.hostname of SmtpRelay {relay_name} to the relay's public DNS name: the return-path MX points at it; without it the relay is {}, which resolves only inside the cluster, and bounces are lost",
                crate::render::hostname(relay)
            ),
        );
    };
    if let Some(why) = not_public(hostname) {
        return Route::no(
            placeholder,
            "NoPublicHostname",
            format!(
                "spec.hostname {hostname} of SmtpRelay {relay_name} {why}: set it to the relay's public DNS name, the return-path MX target"
            ),
        );
    }
    let mx_host = hostname.trim_end_matches('.').to_ascii_lowercase();
    let Some(service) = &relay.spec.inbound_service else {
        return Route::no(
            mx_host.clone(),
            "NoInboundService",
            format!(
                "set spec.inboundService of SmtpRelay {relay_name} (type LoadBalancer) so that port 25 of {mx_host} reaches the relay's inbound listener"
            ),
        );
    };
    let name = service_name(relay);
    if service.type_ != InboundServiceType::LoadBalancer {
        return Route {
            message: format!(
                "MX {mx_host}: Service {name} is of type {}, whose outside address the operator cannot see; route port 25 of {mx_host} to it",
                service.type_.as_str()
            ),
            mx_host,
            host_records: Vec::new(),
            routable: true,
            reason: "RoutedByUser",
        };
    }
    let status = relay.status.as_ref().and_then(|s| s.inbound.as_ref());
    let mut ips: Vec<IpAddr> = status
        .map(|s| s.addresses.iter().filter_map(|a| a.parse().ok()).collect())
        .unwrap_or_default();
    ips.sort();
    ips.dedup();
    let mut host_records: Vec<HostRecord> = ips
        .iter()
        .map(|ip| HostRecord {
            record_type: if ip.is_ipv4() { "A" } else { "AAAA" },
            value: ip.to_string(),
        })
        .collect();
    let alias = status.and_then(|s| s.hostnames.first());
    if host_records.is_empty()
        && let Some(alias) = alias
    {
        host_records.push(HostRecord {
            record_type: "CNAME",
            value: format!("{}.", alias.trim_end_matches('.')),
        });
    }
    if host_records.is_empty() {
        return Route::no(
            mx_host,
            "LoadBalancerPending",
            format!("Service {name} has no load-balancer address yet"),
        );
    }
    let at: Vec<String> = host_records
        .iter()
        .map(|r| format!("{} {}", r.record_type, r.value))
        .collect();
    Route {
        message: format!(
            "MX {mx_host}, which must resolve to Service {name}: {}",
            at.join(", ")
        ),
        mx_host,
        host_records,
        routable: true,
        reason: "LoadBalancerReady",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{InboundServiceSpec, SmtpRelayStatus, TrafficPolicy};
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    use std::collections::BTreeMap;

    fn relay(hostname: Option<&str>, type_: Option<InboundServiceType>) -> SmtpRelay {
        let mut r = crate::fixtures::relay();
        r.spec.hostname = hostname.map(str::to_owned);
        r.spec.inbound_service = type_.map(|type_| InboundServiceSpec {
            type_,
            annotations: BTreeMap::from([("lb.example/scheme".into(), "internet".into())]),
            load_balancer_class: None,
            external_traffic_policy: Some(TrafficPolicy::Local),
        });
        r
    }

    fn with_ingress(mut r: SmtpRelay, addresses: &[&str], hostnames: &[&str]) -> SmtpRelay {
        r.status = Some(SmtpRelayStatus {
            inbound: Some(InboundStatus {
                service: "relay-inbound".into(),
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                hostnames: hostnames.iter().map(|a| a.to_string()).collect(),
            }),
            ..SmtpRelayStatus::default()
        });
        r
    }

    #[test]
    fn in_cluster_and_unqualified_names_are_not_public() {
        for h in [
            "relay.mail.svc.cluster.local",
            "relay.mail.svc.cluster.local.",
            "relay.mail.svc",
            "relay.mail.svc.corp.example",
            "mx",
            "mx.local",
            "mx.internal",
            "RELAY.MAIL.SVC.CLUSTER.LOCAL",
            PLACEHOLDER_HOST,
        ] {
            assert!(not_public(h).is_some(), "{h}");
        }
        for h in ["mx.example.com", "mx.example.com.", "mail.svcs.example.org"] {
            assert_eq!(not_public(h), None, "{h}");
        }
    }

    #[test]
    fn without_a_public_name_the_route_is_a_placeholder_naming_the_field() {
        let r = route(
            "relay",
            Some(&relay(None, Some(InboundServiceType::LoadBalancer))),
        );
        assert!(!r.routable);
        assert_eq!(r.reason, "NoPublicHostname");
        assert_eq!(r.mx_host, PLACEHOLDER_HOST);
        assert!(
            r.message.contains("set spec.hostname of SmtpRelay relay"),
            "{}",
            r.message
        );
        let r = route(
            "relay",
            Some(&relay(Some("relay.mail.svc.cluster.local"), None)),
        );
        assert_eq!((r.routable, r.reason), (false, "NoPublicHostname"));
        assert_eq!(r.mx_host, PLACEHOLDER_HOST);
        let r = route("gone", None);
        assert_eq!((r.routable, r.reason), (false, "RelayNotFound"));
        assert_eq!(r.mx_host, PLACEHOLDER_HOST);
    }

    #[test]
    fn a_public_name_needs_an_inbound_service_with_an_address() {
        let r = route("relay", Some(&relay(Some("MX.Example.test."), None)));
        assert_eq!((r.routable, r.reason), (false, "NoInboundService"));
        assert_eq!(r.mx_host, "mx.example.test");
        assert!(r.message.contains("spec.inboundService"), "{}", r.message);
        let lb = relay(
            Some("mx.example.test"),
            Some(InboundServiceType::LoadBalancer),
        );
        let r = route("relay", Some(&lb));
        assert_eq!((r.routable, r.reason), (false, "LoadBalancerPending"));
        let r = route(
            "relay",
            Some(&with_ingress(
                lb.clone(),
                &["2001:db8::25", "192.0.2.25", "bogus"],
                &[],
            )),
        );
        assert_eq!((r.routable, r.reason), (true, "LoadBalancerReady"));
        assert_eq!(
            r.host_records,
            [
                HostRecord {
                    record_type: "A",
                    value: "192.0.2.25".into()
                },
                HostRecord {
                    record_type: "AAAA",
                    value: "2001:db8::25".into()
                }
            ]
        );
        // A cloud that gives a name: the relay's name is an alias of it.
        let r = route(
            "relay",
            Some(&with_ingress(lb, &[], &["abc.elb.example.net"])),
        );
        assert!(r.routable);
        assert_eq!(
            r.host_records,
            [HostRecord {
                record_type: "CNAME",
                value: "abc.elb.example.net.".into()
            }]
        );
        // A Service whose outside address the operator cannot see: the user routes it.
        let r = route(
            "relay",
            Some(&relay(
                Some("mx.example.test"),
                Some(InboundServiceType::NodePort),
            )),
        );
        assert_eq!((r.routable, r.reason), (true, "RoutedByUser"));
        assert!(r.host_records.is_empty());
    }

    #[test]
    fn the_inbound_listener_is_added_only_with_an_inbound_service() {
        assert_eq!(listeners(&relay(None, None)).len(), 1);
        let r = relay(None, Some(InboundServiceType::LoadBalancer));
        let all = listeners(&r);
        let inbound = all.last().unwrap();
        assert_eq!((inbound.name.as_str(), inbound.port), ("inbound", 25));
        assert_eq!(
            inbound.tls,
            ListenerTls::Starttls,
            "the relay has a certificate"
        );
        assert_eq!(inbound.auth, ListenerAuth::None);
        assert!(inbound.allow_networks.is_empty() && inbound.allow_namespaces.is_none());
        assert_eq!(conflict(&r), None);
        // A listener of the spec on port 25 is the inbound one: nothing is added.
        let mut own = r.clone();
        own.spec.listeners.push(ListenerSpec {
            name: "mx".into(),
            ..inbound.clone()
        });
        assert_eq!(listeners(&own).len(), 2);
        assert_eq!(inbound_listener_name(&own).as_deref(), Some("mx"));
        // ... unless it is not one anyone may send bounces to.
        own.spec.listeners[1].allow_networks = vec!["10.0.0.0/8".into()];
        assert_eq!(
            conflict(&own).map(|c| c.0).as_deref(),
            Some("spec.listeners[1]")
        );
        let mut named = r.clone();
        named.spec.listeners[0].name = "inbound".into();
        assert_eq!(
            conflict(&named).map(|c| c.0).as_deref(),
            Some("spec.listeners[0].name")
        );
    }

    #[test]
    fn the_inbound_service_exposes_port_25_with_the_specs_settings() {
        assert!(service(&relay(None, None)).is_none());
        let s = service(&relay(None, Some(InboundServiceType::LoadBalancer))).unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("relay-inbound"));
        assert_eq!(
            s.metadata.owner_references.as_ref().unwrap()[0].kind,
            "SmtpRelay"
        );
        assert_eq!(
            s.metadata.annotations.as_ref().unwrap()["lb.example/scheme"],
            "internet"
        );
        let spec = s.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        let ports = spec.ports.unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 25);
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String("inbound".into()))
        );
        assert_eq!(spec.selector, Some(selector(&relay(None, None))));
    }

    #[test]
    fn the_status_carries_the_load_balancers_addresses_and_names_sorted() {
        let r = relay(None, Some(InboundServiceType::LoadBalancer));
        let mut s = service(&r).unwrap();
        assert_eq!(
            status(&r, None),
            InboundStatus {
                service: "relay-inbound".into(),
                addresses: vec![],
                hostnames: vec![],
            }
        );
        let ingress = |ip: Option<&str>, hostname: Option<&str>| LoadBalancerIngress {
            ip: ip.map(str::to_owned),
            hostname: hostname.map(str::to_owned),
            ..LoadBalancerIngress::default()
        };
        s.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    ingress(Some("198.51.100.7"), None),
                    ingress(None, Some("abc.elb.example.net")),
                    ingress(Some("192.0.2.25"), None),
                ]),
            }),
            ..ServiceStatus::default()
        });
        let st = status(&r, Some(&s));
        assert_eq!(st.addresses, ["192.0.2.25", "198.51.100.7"]);
        assert_eq!(st.hostnames, ["abc.elb.example.net"]);
        assert!(owned_by(&s, &r));
        let mut other = r.clone();
        other.metadata.uid = Some("someone-else".into());
        assert!(!owned_by(&s, &other));
    }
}
