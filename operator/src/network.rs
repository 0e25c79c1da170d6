//! The NetworkPolicy of an SmtpRelay: who may open a connection to which port of its pods.
//!
//! The policy isolates the relay's pods for ingress and lets in, rule by rule:
//! - each SMTP listener, from the peers its spec names ([`listener_rule`]): its `allowNetworks` as
//!   `ipBlock`s, or the namespaces of its `allowNamespaces`, or anyone when it names neither (public
//!   submission, MX, and the inbound listener `spec.inboundService` adds: bounces come from the internet);
//! - the metrics port, from the namespaces of `spec.metrics.namespaceSelector` ([`metrics_rule`]);
//! - the admin port, from the operator's own pods only ([`admin_rule`]); with no operator namespace known
//!   (the operator runs outside the cluster) there is no such rule and the port is closed, which
//!   `kubectl exec ... herald-relay admin` does not notice: it talks to the relay inside the pod.
//!
//! One function per kind of peer, so that a port added later gets its rule the same way. The kubelet's
//! probes need no rule: a pod's own node may always reach it.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::crd::{ListenerSpec, SmtpRelay};
use crate::inbound;
use crate::layout::{ADMIN_PORT, METRICS_PORT};
use crate::objects::{meta, selector};

/// The label every operator pod carries (the chart's Deployment sets it), which the admin rule selects on.
pub const OPERATOR_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "herald-operator");
/// The label Kubernetes puts on every namespace, holding its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Where the operator's pods run: the namespace of this operator (the downward API's `POD_NAMESPACE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorPods {
    pub namespace: String,
}

/// The relay's NetworkPolicy, named after the relay and owned by it.
pub fn network_policy(relay: &SmtpRelay, operator: Option<&OperatorPods>) -> NetworkPolicy {
    // The inbound listener (port 25, with `spec.inboundService`) has no peers: bounces come from anywhere.
    let mut ingress: Vec<NetworkPolicyIngressRule> = inbound::listeners(relay)
        .iter()
        .map(listener_rule)
        .collect();
    ingress.push(metrics_rule(relay));
    ingress.extend(operator.map(admin_rule));
    NetworkPolicy {
        metadata: meta(relay, relay.name_any()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(relay)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// One SMTP listener's rule: its port, from its networks, or its namespaces, or from anyone.
pub fn listener_rule(listener: &ListenerSpec) -> NetworkPolicyIngressRule {
    let mut from: Vec<NetworkPolicyPeer> = listener
        .allow_networks
        .iter()
        .map(|n| network_peer(n))
        .collect();
    from.extend(listener.allow_namespaces.clone().map(namespace_peer));
    rule(listener.port, from)
}

/// The metrics port, from the monitoring namespaces.
pub fn metrics_rule(relay: &SmtpRelay) -> NetworkPolicyIngressRule {
    rule(
        i32::from(METRICS_PORT),
        vec![namespace_peer(
            relay.spec.metrics.namespace_selector.clone(),
        )],
    )
}

/// The admin port, from the operator's pods: their namespace and their label, together in one peer (both
/// must match).
pub fn admin_rule(operator: &OperatorPods) -> NetworkPolicyIngressRule {
    let (key, value) = OPERATOR_POD_LABEL;
    let peer = NetworkPolicyPeer {
        namespace_selector: Some(match_labels(NAMESPACE_NAME_LABEL, &operator.namespace)),
        pod_selector: Some(match_labels(key, value)),
        ..NetworkPolicyPeer::default()
    };
    rule(i32::from(ADMIN_PORT), vec![peer])
}

/// A CIDR of `allowNetworks` as an `ipBlock`, written as its network address (`10.1.2.3/8` is
/// `10.0.0.0/8` to the relay too): the API server refuses a CIDR with host bits set. The relay's config
/// was rendered from the same list first, so a CIDR that does not parse never gets here; if one did, it
/// goes as written and the API server names it.
fn network_peer(cidr: &str) -> NetworkPolicyPeer {
    let cidr = cidr
        .parse::<ipnet::IpNet>()
        .map(|n| n.trunc().to_string())
        .unwrap_or_else(|_| cidr.to_owned());
    NetworkPolicyPeer {
        ip_block: Some(IPBlock { cidr, except: None }),
        ..NetworkPolicyPeer::default()
    }
}

fn namespace_peer(selector: LabelSelector) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(selector),
        ..NetworkPolicyPeer::default()
    }
}

fn match_labels(key: &str, value: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
        ..LabelSelector::default()
    }
}

/// A rule for one TCP port; no peers means from anywhere.
fn rule(port: i32, from: Vec<NetworkPolicyPeer>) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule {
        from: (!from.is_empty()).then_some(from),
        ports: Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(port)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ListenerAuth, ListenerTls};

    fn listener(name: &str, port: i32, networks: &[&str]) -> ListenerSpec {
        ListenerSpec {
            name: name.into(),
            port,
            tls: ListenerTls::None,
            auth: ListenerAuth::None,
            allow_networks: networks.iter().map(|n| n.to_string()).collect(),
            allow_namespaces: None,
            trusted_senders: None,
        }
    }

    fn relay() -> SmtpRelay {
        let mut r = crate::fixtures::relay();
        r.spec.listeners = vec![
            listener("mx", 25, &[]),
            listener("trusted", 2525, &["10.1.2.3/8", "fd00::/8"]),
            ListenerSpec {
                allow_namespaces: Some(match_labels("team", "apps")),
                ..listener("internal", 2526, &[])
            },
        ];
        r
    }

    fn operator() -> OperatorPods {
        OperatorPods {
            namespace: "herald-system".into(),
        }
    }

    fn ports(rule: &NetworkPolicyIngressRule) -> Vec<IntOrString> {
        rule.ports
            .iter()
            .flatten()
            .map(|p| {
                assert_eq!(p.protocol.as_deref(), Some("TCP"));
                p.port.clone().unwrap()
            })
            .collect()
    }

    #[test]
    fn every_listener_gets_exactly_one_rule_with_its_port_then_metrics_and_admin() {
        let r = relay();
        let p = network_policy(&r, Some(&operator()));
        assert_eq!(p.metadata.name.as_deref(), Some("relay"));
        assert_eq!(p.metadata.owner_references.unwrap()[0].kind, "SmtpRelay");
        let spec = p.spec.unwrap();
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_owned()][..])
        );
        let rules = spec.ingress.unwrap();
        let all: Vec<Vec<IntOrString>> = rules.iter().map(ports).collect();
        let int = |p: i32| vec![IntOrString::Int(p)];
        assert_eq!(all, [int(25), int(2525), int(2526), int(9090), int(9091)]);
        // The same labels that select the pods of the StatefulSet.
        let pods = crate::objects::statefulset(&r, &[], "h", &herald_config::Shutdown::default())
            .spec
            .template
            .metadata
            .unwrap()
            .labels
            .unwrap();
        let sel = spec.pod_selector.unwrap().match_labels.unwrap();
        assert!(sel.iter().all(|(k, v)| pods.get(k) == Some(v)), "{sel:?}");
    }

    #[test]
    fn the_inbound_listener_of_an_inbound_service_is_open_to_anyone_on_port_25() {
        let mut r = crate::fixtures::relay();
        let ports_of = |r: &SmtpRelay| -> Vec<Vec<IntOrString>> {
            network_policy(r, None)
                .spec
                .unwrap()
                .ingress
                .unwrap()
                .iter()
                .map(ports)
                .collect()
        };
        let int = |p: i32| vec![IntOrString::Int(p)];
        assert_eq!(
            ports_of(&r),
            [int(587), int(9090)],
            "no port 25 unless asked"
        );
        r.spec.inbound_service = Some(crate::crd::InboundServiceSpec {
            type_: crate::crd::InboundServiceType::LoadBalancer,
            annotations: Default::default(),
            load_balancer_class: None,
            external_traffic_policy: None,
        });
        assert_eq!(ports_of(&r), [int(587), int(25), int(9090)]);
        let rules = network_policy(&r, None).spec.unwrap().ingress.unwrap();
        assert_eq!(rules[1].from, None, "bounces come from the internet");
    }

    #[test]
    fn a_listener_open_to_all_has_a_rule_with_only_its_port() {
        let rule = listener_rule(&listener("mx", 25, &[]));
        assert_eq!(rule.from, None, "no peers: from anywhere");
        assert_eq!(ports(&rule), [IntOrString::Int(25)]);
    }

    #[test]
    fn allowed_networks_become_ip_blocks_at_their_network_address() {
        let rule = listener_rule(&listener("trusted", 2525, &["10.1.2.3/8", "fd00::/8"]));
        let blocks: Vec<String> = rule
            .from
            .unwrap()
            .into_iter()
            .map(|p| {
                assert!(p.namespace_selector.is_none() && p.pod_selector.is_none());
                p.ip_block.unwrap().cidr
            })
            .collect();
        assert_eq!(blocks, ["10.0.0.0/8", "fd00::/8"]);
    }

    #[test]
    fn allowed_namespaces_become_a_namespace_selector() {
        let rule = listener_rule(&relay().spec.listeners[2]);
        let from = rule.from.unwrap();
        assert_eq!(from.len(), 1);
        assert_eq!(
            from[0].namespace_selector,
            Some(match_labels("team", "apps"))
        );
        assert!(from[0].pod_selector.is_none() && from[0].ip_block.is_none());
    }

    #[test]
    fn metrics_come_from_the_monitoring_namespace_unless_the_spec_says_otherwise() {
        let mut r = relay();
        let from = metrics_rule(&r).from.unwrap();
        assert_eq!(
            from[0].namespace_selector,
            Some(match_labels("kubernetes.io/metadata.name", "monitoring"))
        );
        r.spec.metrics.namespace_selector = match_labels("monitoring", "true");
        let from = metrics_rule(&r).from.unwrap();
        assert_eq!(
            from[0].namespace_selector,
            Some(match_labels("monitoring", "true"))
        );
    }

    #[test]
    fn the_admin_port_admits_the_operators_pods_in_its_namespace_only() {
        let rule = admin_rule(&operator());
        assert_eq!(ports(&rule), [IntOrString::Int(9091)]);
        let from = rule.from.unwrap();
        assert_eq!(
            from.len(),
            1,
            "namespace and pod labels in one peer: both must match"
        );
        assert_eq!(
            from[0].namespace_selector,
            Some(match_labels("kubernetes.io/metadata.name", "herald-system"))
        );
        assert_eq!(
            from[0].pod_selector,
            Some(match_labels("app.kubernetes.io/name", "herald-operator"))
        );
        // Without a known operator namespace nobody is admitted to the admin port.
        let rules = network_policy(&relay(), None)
            .spec
            .unwrap()
            .ingress
            .unwrap();
        assert!(
            rules.iter().all(|r| ports(r) != [IntOrString::Int(9091)]),
            "{rules:?}"
        );
        assert_eq!(rules.len(), 4);
    }
}
