//! The Kubernetes objects an SmtpRelay becomes: the config Secret, the StatefulSet, the Services, the
//! PodDisruptionBudget and the ServiceMonitor. Pure functions from the resource (and what was rendered or
//! read for it) to the desired objects; the reconciler applies them with server-side apply.
//!
//! The relay config goes in a Secret, not a ConfigMap, because it carries the users' password hashes.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, KeyToPath, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SeccompProfile, Secret, SecretProjection, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Sysctl, Volume, VolumeMount,
    VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{SendingDomain, SmtpRelay};
use crate::layout::{
    ADMIN_PORT, BOUNCE_KEYS, CONFIG_DIR, CONFIG_FILE, DKIM_DIR, DKIM_KEY, SMARTHOST_DIR, SPOOL_DIR,
    TLS_DIR, active_selector, config_secret_name, dkim_key_file_name, dkim_secret_name,
};

/// The annotation that carries the rendered config's hash, so a change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "herald.dev/config-hash";
/// The non-root user the relay runs as (distroless's `nonroot`).
const RUN_AS: i64 = 65532;

/// Labels every object of a relay carries; the selector uses the first two.
pub fn labels(relay: &SmtpRelay) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "herald-relay".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), relay.name_any()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "herald-operator".to_owned(),
        ),
    ])
}

fn selector(relay: &SmtpRelay) -> BTreeMap<String, String> {
    labels(relay).into_iter().take(2).collect()
}

fn meta(relay: &SmtpRelay, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: relay.namespace(),
        labels: Some(labels(relay)),
        owner_references: owner(relay).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn owner(relay: &SmtpRelay) -> Option<OwnerReference> {
    relay.controller_owner_ref(&())
}

pub fn headless_service_name(relay: &SmtpRelay) -> String {
    format!("{}-headless", relay.name_any())
}

/// The Secret holding the relay config file and the return-path token keys it names.
pub fn config_secret(relay: &SmtpRelay, config_yaml: &str, bounce_keys: &str) -> Secret {
    Secret {
        metadata: meta(relay, config_secret_name(relay)),
        string_data: Some(BTreeMap::from([
            (CONFIG_FILE.to_owned(), config_yaml.to_owned()),
            (BOUNCE_KEYS.to_owned(), bounce_keys.to_owned()),
        ])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The relay StatefulSet: one spool volume per replica, probes on the admin port, non-root with a
/// read-only root filesystem.
/// The pod's `terminationGracePeriodSeconds`: the relay's whole drain (config `shutdown`) and some room for
/// the process to exit, so Kubernetes never kills a relay that is still recording outcomes.
pub fn grace_period(drain: &herald_config::Shutdown) -> i64 {
    const EXIT_ROOM: u64 = 10;
    (drain.total().as_secs() + EXIT_ROOM) as i64
}

pub fn statefulset(
    relay: &SmtpRelay,
    domains: &[Arc<SendingDomain>],
    config_hash: &str,
    drain: &herald_config::Shutdown,
) -> StatefulSet {
    let spec = &relay.spec;
    let mut ports: Vec<ContainerPort> = spec
        .listeners
        .iter()
        .map(|l| port(&l.name, l.port))
        .collect();
    ports.push(port("admin", i32::from(ADMIN_PORT)));
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "spool".into(),
            mount_path: SPOOL_DIR.into(),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![Volume {
        name: "config".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(config_secret_name(relay)),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(tls) = &spec.tls_secret_ref {
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if !domains.is_empty() {
        // One projected volume gathers every domain's key under its own file name.
        let sources = domains
            .iter()
            .map(|d| VolumeProjection {
                secret: Some(SecretProjection {
                    name: dkim_secret_name(d),
                    items: Some(vec![KeyToPath {
                        key: DKIM_KEY.into(),
                        path: dkim_key_file_name(&d.spec.domain, &active_selector(d)),
                        mode: Some(0o400),
                        ..KeyToPath::default()
                    }]),
                    optional: Some(false),
                }),
                ..VolumeProjection::default()
            })
            .collect();
        mounts.push(VolumeMount {
            name: "dkim".into(),
            mount_path: DKIM_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "dkim".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(sources),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if let Some(creds) = spec
        .delivery
        .smarthost
        .as_ref()
        .and_then(|s| s.credentials_secret_ref.as_ref())
    {
        mounts.push(VolumeMount {
            name: "smarthost".into(),
            mount_path: SMARTHOST_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "smarthost".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(creds.name.clone()),
                items: Some(vec![KeyToPath {
                    key: "password".into(),
                    path: "password".into(),
                    mode: Some(0o400),
                    ..KeyToPath::default()
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let low_port = spec.listeners.iter().any(|l| l.port < 1024);
    let container = Container {
        name: "relay".into(),
        image: Some(spec.image.clone()),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
            "--log-format".into(),
            "json".into(),
        ]),
        ports: Some(ports),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: spec.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let mut pvc_resources = BTreeMap::new();
    pvc_resources.insert("storage".to_owned(), Quantity(spec.storage.size.clone()));
    StatefulSet {
        metadata: meta(relay, relay.name_any()),
        spec: StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(headless_service_name(relay)),
            selector: LabelSelector {
                match_labels: Some(selector(relay)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(relay)),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        config_hash.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(grace_period(drain)),
                    // The relay never talks to the API server: no token in the pod.
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        // Ports 25, 465 and 587 without any capability.
                        sysctls: low_port.then(|| {
                            vec![Sysctl {
                                name: "net.ipv4.ip_unprivileged_port_start".into(),
                                value: "0".into(),
                            }]
                        }),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("spool".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: spec.storage.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(pvc_resources),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

fn service_ports(relay: &SmtpRelay, with_admin: bool) -> Vec<ServicePort> {
    let mut ports: Vec<ServicePort> = relay
        .spec
        .listeners
        .iter()
        .map(|l| ServicePort {
            name: Some(l.name.clone()),
            port: l.port,
            target_port: Some(IntOrString::String(l.name.clone())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        })
        .collect();
    if with_admin {
        ports.push(ServicePort {
            name: Some("admin".into()),
            port: i32::from(ADMIN_PORT),
            target_port: Some(IntOrString::String("admin".into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        });
    }
    ports
}

/// The SMTP Service applications send to.
pub fn smtp_service(relay: &SmtpRelay) -> Service {
    Service {
        metadata: meta(relay, relay.name_any()),
        spec: Some(ServiceSpec {
            selector: Some(selector(relay)),
            ports: Some(service_ports(relay, false)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The headless Service of the StatefulSet; also what the ServiceMonitor scrapes.
pub fn headless_service(relay: &SmtpRelay) -> Service {
    Service {
        metadata: meta(relay, headless_service_name(relay)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector(relay)),
            ports: Some(service_ports(relay, true)),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// At most one replica down for voluntary disruptions: the others keep accepting mail.
pub fn pdb(relay: &SmtpRelay) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(relay, relay.name_any()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(relay)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The ServiceMonitor (monitoring.coreos.com/v1) as JSON, for a dynamic apply when the CRD exists.
pub fn service_monitor(relay: &SmtpRelay) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {
            "name": relay.name_any(),
            "namespace": relay.namespace(),
            "labels": labels(relay),
            "ownerReferences": owner(relay).map(|o| vec![o]),
        },
        "spec": {
            // job="herald-relay" for every relay, as the chart's monitors and alert selectors expect,
            // rather than the Service's name.
            "jobLabel": "app.kubernetes.io/name",
            "selector": { "matchLabels": selector(relay) },
            "endpoints": [ { "port": "admin", "path": "/metrics", "interval": "30s" } ],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::*;

    use crate::fixtures::{domain_spec, relay};

    #[test]
    fn statefulset_mounts_what_the_config_names_and_is_hardened() {
        let d = Arc::new(SendingDomain::new("example", domain_spec()));
        let drain = herald_config::Shutdown::default();
        let s = statefulset(&relay(), &[d], "abc", &drain);
        let spec = s.spec;
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        let mounts: Vec<&str> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(mounts.contains(&DKIM_DIR) && mounts.contains(&TLS_DIR));
        let dkim = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "dkim")
            .unwrap();
        let item = &dkim.projected.unwrap().sources.unwrap()[0]
            .secret
            .clone()
            .unwrap()
            .items
            .unwrap()[0];
        // The file the rendered config's key_file points at.
        assert_eq!(
            format!("{DKIM_DIR}/{}", item.path),
            crate::layout::dkim_key_file("example.test", "herald1")
        );
        assert_eq!(
            spec.template.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION],
            "abc"
        );
        assert!(
            pod.security_context.unwrap().sysctls.is_some(),
            "port 587 needs the unprivileged-port sysctl"
        );
        assert_eq!(s.metadata.owner_references.unwrap()[0].kind, "SmtpRelay");
        // Kubernetes waits for the relay's whole drain (70 s by default) before it kills the pod.
        assert_eq!(pod.termination_grace_period_seconds, Some(80));
        assert!(drain.total().as_secs() < 80);
        assert_eq!(pod.automount_service_account_token, Some(false));
    }

    #[test]
    fn services_and_pdb_select_the_pods() {
        let r = relay();
        let svc = smtp_service(&r);
        let sel = svc.spec.as_ref().unwrap().selector.clone().unwrap();
        let pod_labels = statefulset(&r, &[], "h", &herald_config::Shutdown::default())
            .spec
            .template
            .metadata
            .unwrap()
            .labels
            .unwrap();
        assert!(sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 587);
        assert_eq!(
            headless_service(&r).spec.unwrap().cluster_ip.as_deref(),
            Some("None")
        );
        assert_eq!(
            pdb(&r).spec.unwrap().max_unavailable,
            Some(IntOrString::Int(1))
        );
        assert_eq!(service_monitor(&r)["spec"]["endpoints"][0]["port"], "admin");
    }
}
