//! The Kubernetes objects an SmtpRelay becomes: the config Secret, the admin token Secret, the StatefulSet,
//! the Services, the PodDisruptionBudget and the ServiceMonitor (the NetworkPolicy is `network`'s, the
//! inbound Service `inbound`'s). Pure functions from the resource (and what was rendered or
//! read for it) to the desired objects; the reconciler applies them with server-side apply.
//!
//! The relay config goes in a Secret, not a ConfigMap, because it carries the users' password hashes.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, KeyToPath,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, Secret, SecretProjection,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Sysctl, Volume,
    VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{SendingDomain, SmtpRelay};
use crate::inbound;
use crate::layout::{
    ADMIN_DIR, ADMIN_PORT, ADMIN_PORT_NAME, ADMIN_TOKEN_KEY, BOUNCE_KEYS, CONFIG_DIR, CONFIG_FILE,
    DKIM_DIR, METRICS_PORT, METRICS_PORT_NAME, SMARTHOST_CA_DIR, SMARTHOST_DIR, SPOOL_DIR,
    STORE_CA_DIR, STORE_DIR, TLS_DIR, admin_token_secret_name, config_secret_name, signing_key,
};

/// The annotation that carries the rendered config's hash, so a change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "herald.dev/config-hash";
/// The non-root user the relay runs as (distroless's `nonroot`).
const RUN_AS: i64 = 65532;

/// Labels every object of a relay carries; the selector uses the first two in key order (`instance` and
/// `managed-by`: a StatefulSet's selector cannot change, so neither can that).
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

/// The labels that select a relay's pods (the StatefulSet's selector, the Services', the policy's).
pub fn selector(relay: &SmtpRelay) -> BTreeMap<String, String> {
    labels(relay).into_iter().take(2).collect()
}

pub(crate) fn meta(relay: &SmtpRelay, name: String) -> ObjectMeta {
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

/// The Secret holding the admin API token, created once (never applied: an apply would replace the token
/// every reconcile). `token` is the caller's random value, so that this stays a pure function.
pub fn admin_token_secret(relay: &SmtpRelay, token: &str) -> Secret {
    Secret {
        metadata: meta(relay, admin_token_secret_name(relay)),
        string_data: Some(BTreeMap::from([(
            ADMIN_TOKEN_KEY.to_owned(),
            token.to_owned(),
        )])),
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

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(METRICS_PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// How long a starting relay may take before liveness applies: it reads its whole spool back before
/// `/healthz` answers, which for a large queue takes longer than three liveness periods.
const STARTUP_PERIOD: i32 = 5;
const STARTUP_FAILURES: i32 = 60;

/// The pod's `terminationGracePeriodSeconds`: the relay's whole drain (config `shutdown`) and some room for
/// the process to exit, so Kubernetes never kills a relay that is still recording outcomes.
pub fn grace_period(drain: &herald_config::Shutdown) -> i64 {
    const EXIT_ROOM: u64 = 10;
    i64::try_from(drain.total().as_secs().saturating_add(EXIT_ROOM)).unwrap_or(i64::MAX)
}

/// The relay StatefulSet: one spool volume per replica, probes on the metrics port, the admin token mounted
/// for the relay (and `kubectl exec ... herald-relay admin`), non-root with a read-only root filesystem.
/// A volume mounted read-only at `dir`.
fn read_only_mount(name: &str, dir: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: dir.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// A Secret as a volume: every key, or only `(key, mode)` as a file of that name.
fn secret_volume(name: &str, secret: String, only: Option<(&str, i32)>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            items: only.map(|(key, mode)| {
                vec![KeyToPath {
                    key: key.into(),
                    path: key.into(),
                    mode: Some(mode),
                    ..KeyToPath::default()
                }]
            }),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

pub fn statefulset(
    relay: &SmtpRelay,
    domains: &[Arc<SendingDomain>],
    config_hash: &str,
    drain: &herald_config::Shutdown,
) -> StatefulSet {
    let spec = &relay.spec;
    let listeners = inbound::listeners(relay);
    let mut ports: Vec<ContainerPort> = listeners.iter().map(|l| port(&l.name, l.port)).collect();
    ports.push(port(METRICS_PORT_NAME, i32::from(METRICS_PORT)));
    ports.push(port(ADMIN_PORT_NAME, i32::from(ADMIN_PORT)));
    let mut mounts = vec![
        read_only_mount("config", CONFIG_DIR),
        read_only_mount("admin-token", ADMIN_DIR),
        VolumeMount {
            name: "spool".into(),
            mount_path: SPOOL_DIR.into(),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        secret_volume("config", config_secret_name(relay), None),
        secret_volume(
            "admin-token",
            admin_token_secret_name(relay),
            Some((ADMIN_TOKEN_KEY, 0o400)),
        ),
    ];
    if let Some(tls) = &spec.tls_secret_ref {
        mounts.push(read_only_mount("tls", TLS_DIR));
        volumes.push(secret_volume("tls", tls.name.clone(), None));
    }
    if !domains.is_empty() {
        // One projected volume gathers every domain's key under its own file name. The Secret key and
        // the file come from the same `SigningKey` as the config's selector (see `layout`).
        let sources = domains
            .iter()
            .map(|d| {
                let key = signing_key(d);
                VolumeProjection {
                    secret: Some(SecretProjection {
                        items: Some(vec![KeyToPath {
                            path: key.file_name(&d.spec.domain),
                            key: key.secret_key,
                            mode: Some(0o400),
                            ..KeyToPath::default()
                        }]),
                        name: key.secret,
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                }
            })
            .collect();
        mounts.push(read_only_mount("dkim", DKIM_DIR));
        volumes.push(Volume {
            name: "dkim".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(sources),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let smarthost = spec.delivery.smarthost.as_ref();
    if let Some(creds) = smarthost.and_then(|s| s.credentials_secret_ref.as_ref()) {
        mounts.push(read_only_mount("smarthost", SMARTHOST_DIR));
        volumes.push(secret_volume(
            "smarthost",
            creds.name.clone(),
            Some(("password", 0o400)),
        ));
    }
    if let Some(ca) = smarthost.and_then(|s| s.ca_secret_ref.as_ref()) {
        // Only the CA certificate: the Secret may be a whole cert-manager certificate with its private key.
        mounts.push(read_only_mount("smarthost-ca", SMARTHOST_CA_DIR));
        volumes.push(secret_volume(
            "smarthost-ca",
            ca.name.clone(),
            Some(("ca.crt", 0o444)),
        ));
    }
    if let Some(store) = &spec.store {
        if let Some(pw) = &store.password_secret_ref {
            // The user's key, under the one file name the rendered config's `password_file` names.
            let mut volume = secret_volume("store", pw.name.clone(), Some((&pw.key, 0o400)));
            if let Some(items) = volume.secret.as_mut().and_then(|s| s.items.as_mut()) {
                items[0].path = "password".into();
            }
            mounts.push(read_only_mount("store", STORE_DIR));
            volumes.push(volume);
        }
        if let Some(ca) = &store.ca_secret_ref {
            mounts.push(read_only_mount("store-ca", STORE_CA_DIR));
            volumes.push(secret_volume(
                "store-ca",
                ca.name.clone(),
                Some(("ca.crt", 0o444)),
            ));
        }
    }
    let low_port = listeners.iter().any(|l| l.port < 1024);
    let container = Container {
        name: "relay".into(),
        image: Some(spec.image.clone()),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
            "--log-format".into(),
            "json".into(),
        ]),
        // So that `kubectl exec <pod> -- herald-relay admin ...` finds the admin address and token.
        env: Some(vec![EnvVar {
            name: "HERALD_CONFIG".into(),
            value: Some(format!("{CONFIG_DIR}/{CONFIG_FILE}")),
            ..EnvVar::default()
        }]),
        ports: Some(ports),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        startup_probe: Some(probe("/healthz", STARTUP_PERIOD, STARTUP_FAILURES)),
        resources: Some(
            spec.resources
                .clone()
                .unwrap_or_else(default_relay_resources),
        ),
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

/// A relay without `spec.resources` still gets a memory limit: the relay sizes its memory budgets (bodies in
/// transit, delivery connections) from it, and without one a burst ends in an OOM kill of the node's choosing.
fn default_relay_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q("100m")),
            ("memory".to_owned(), q("256Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), q("512Mi"))])),
        ..ResourceRequirements::default()
    }
}

fn service_ports(relay: &SmtpRelay, with_metrics: bool) -> Vec<ServicePort> {
    let mut ports: Vec<ServicePort> = inbound::listeners(relay)
        .iter()
        .map(|l| ServicePort {
            name: Some(l.name.clone()),
            port: l.port,
            target_port: Some(IntOrString::String(l.name.clone())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        })
        .collect();
    if with_metrics {
        ports.push(ServicePort {
            name: Some(METRICS_PORT_NAME.into()),
            port: i32::from(METRICS_PORT),
            target_port: Some(IntOrString::String(METRICS_PORT_NAME.into())),
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

/// The headless Service of the StatefulSet; also what the ServiceMonitor scrapes, so it has the metrics
/// port. No Service has the admin port: nothing calls the admin API from outside the pod today
/// (`kubectl exec ... herald-relay admin` runs inside it), and the NetworkPolicy admits only the operator.
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
            "endpoints": [ { "port": METRICS_PORT_NAME, "path": "/metrics", "interval": "30s" } ],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::*;

    use crate::fixtures::{domain_spec, relay};

    #[test]
    fn a_smarthost_ca_mounts_only_the_ca_certificate() {
        let mut r = relay();
        r.spec.delivery.smarthost = Some(SmarthostSpec {
            host: "smtp.provider.test".into(),
            port: 587,
            tls: ListenerTls::Starttls,
            credentials_secret_ref: None,
            ca_secret_ref: Some(LocalRef {
                name: "provider-tls".into(),
            }),
            spf_include: None,
        });
        let drain = herald_config::Shutdown::default();
        let pod = statefulset(&r, &[], "hash", &drain)
            .spec
            .template
            .spec
            .unwrap();
        let volume = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "smarthost-ca")
            .unwrap();
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("provider-tls"));
        let items = secret.items.as_ref().unwrap();
        assert_eq!(
            items.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(),
            ["ca.crt"]
        );
        let mount = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "smarthost-ca")
            .unwrap();
        assert_eq!(
            format!("{}/{}", mount.mount_path, items[0].path),
            crate::layout::SMARTHOST_CA
        );
    }

    #[test]
    fn the_store_password_and_ca_are_mounted_where_the_config_names_them() {
        let mut r = relay();
        r.spec.store = Some(StoreSpec {
            url: Some("rediss://valkey:6379/0".into()),
            password_secret_ref: Some(SecretKeyRef {
                name: "valkey-auth".into(),
                key: "valkey-password".into(),
            }),
            secret_ref: None,
            key_prefix: None,
            required: false,
            ca_secret_ref: Some(LocalRef {
                name: "valkey-tls".into(),
            }),
            cluster: false,
            sentinel_master: None,
            nodes: Vec::new(),
        });
        let pod = statefulset(&r, &[], "hash", &herald_config::Shutdown::default())
            .spec
            .template
            .spec
            .unwrap();
        let file = |volume: &str| {
            let v = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == volume)
                .unwrap();
            let secret = v.secret.as_ref().unwrap();
            let item = &secret.items.as_ref().unwrap()[0];
            let mount = pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == volume)
                .unwrap();
            (
                secret.secret_name.clone().unwrap(),
                item.key.clone(),
                format!("{}/{}", mount.mount_path, item.path),
            )
        };
        assert_eq!(
            file("store"),
            (
                "valkey-auth".into(),
                "valkey-password".into(),
                crate::layout::STORE_PASSWORD.into()
            )
        );
        assert_eq!(
            file("store-ca"),
            (
                "valkey-tls".into(),
                "ca.crt".into(),
                crate::layout::STORE_CA.into()
            )
        );
    }

    #[test]
    fn a_relay_without_resources_gets_a_memory_limit() {
        let drain = herald_config::Shutdown::default();
        let sts = statefulset(&relay(), &[], "hash", &drain);
        let c = &sts.spec.template.spec.unwrap().containers[0];
        let res = c.resources.as_ref().unwrap();
        assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "512Mi");
        assert_eq!(
            c.env.as_ref().unwrap()[0].value.as_deref(),
            Some("/etc/herald/config/relay.yaml")
        );
    }

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
        // Kubelet probes on the metrics port; the admin port is there for the API, never for probes.
        for p in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe] {
            let port = &p.as_ref().unwrap().http_get.as_ref().unwrap().port;
            assert_eq!(port, &IntOrString::String("metrics".into()));
        }
        let ports: Vec<(&str, i32)> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [("submission", 587), ("metrics", 9090), ("admin", 9091)]
        );
        // The token file the rendered config names, from the relay's own token Secret.
        assert!(mounts.contains(&ADMIN_DIR));
        let volumes = pod.volumes.unwrap();
        let token = volumes.iter().find(|v| v.name == "admin-token").unwrap();
        let token = token.secret.as_ref().unwrap();
        assert_eq!(token.secret_name.as_deref(), Some("relay-admin-token"));
        let item = &token.items.as_ref().unwrap()[0];
        assert_eq!(
            format!("{ADMIN_DIR}/{}", item.path),
            crate::layout::ADMIN_TOKEN_FILE
        );
        let dkim = volumes.into_iter().find(|v| v.name == "dkim").unwrap();
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
    fn the_admin_token_secret_is_owned_by_the_relay_and_holds_the_token() {
        let s = admin_token_secret(&relay(), "abc");
        assert_eq!(s.metadata.name.as_deref(), Some("relay-admin-token"));
        assert_eq!(s.metadata.owner_references.unwrap()[0].kind, "SmtpRelay");
        assert_eq!(s.string_data.unwrap()["token"], "abc");
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
        assert_eq!(
            service_monitor(&r)["spec"]["endpoints"][0]["port"],
            "metrics"
        );
        let headless: Vec<String> = headless_service(&r)
            .spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .filter_map(|p| p.name)
            .collect();
        assert_eq!(
            headless,
            ["submission", "metrics"],
            "no Service has the admin port"
        );
    }
}
