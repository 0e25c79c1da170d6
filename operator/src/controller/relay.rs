//! SmtpRelay: the relay config rendered from the relay, its domains and its pools, and the objects that run
//! it.
//!
//! - **Fetch**: the relay's domains and the namespace's pools from the shared caches; the config Secret as it
//!   is (to keep the return-path keys, and the password hashes that still match) and whether the admin
//!   token Secret exists ([`kept_secrets`]); each user's password, hashed; the smarthost username; the
//!   StatefulSet's ready replicas; the inbound Service's load-balancer addresses (into the status, where
//!   the SendingDomains read them for their MX host's records).
//! - **Decide**: [`decide`] renders the config and builds the config Secret, the admin token Secret when
//!   there is none, StatefulSet, Services, PDB, NetworkPolicy and ServiceMonitor, and the status, without
//!   I/O.
//! - **Apply**: the admin token Secret is created (never applied: it is made once and kept); every other
//!   object is server-side applied; the inbound Service is deleted when the spec no longer asks for it;
//!   then the status when it changed.
//!
//! A relay renders once per batch of changes, not once per domain event: SendingDomain events reach it
//! through `triggers::DomainEvents` only when something the config reads changed, and a debounce folds a
//! burst of those into one reconcile (see `run`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};

use super::{Conditions, Context, Error, MANAGER, apply, patch_status};
use crate::crd::{InboundStatus, IpPool, SendingDomain, SmtpRelay, SmtpRelayStatus};
use crate::inbound;
use crate::layout::{
    ADMIN_TOKEN_KEY, BOUNCE_KEYS, CONFIG_FILE, admin_token_secret_name, config_secret_name,
};
use crate::network::{self, OperatorPods};
use crate::objects;
use crate::render::{self, HashedUser};

/// How often a relay is looked at even when nothing changed (ready replicas come from the StatefulSet).
const RESYNC: Duration = Duration::from_secs(300);

pub async fn reconcile(relay: Arc<SmtpRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.reconciling(relay.as_ref(), reconcile_relay(&relay, &ctx))
        .await
}

async fn reconcile_relay(relay: &SmtpRelay, ctx: &Context) -> Result<Action, Error> {
    let ns = relay
        .namespace()
        .ok_or_else(|| Error::Invalid("SmtpRelay without a namespace".into()))?;
    ctx.stores.ready().await?;
    let now = Timestamp::now();
    let name = relay.name_any();
    let client = ctx.client.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // Fetch.
    let kept = kept_secrets(&secrets, relay).await?;
    let mut problems = kept.problems;
    let users = hashed_users(
        relay,
        &secrets,
        kept.applied.as_ref().and_then(applied_config).as_ref(),
        &mut problems,
    )
    .await?;
    let smarthost_username = match relay
        .spec
        .delivery
        .smarthost
        .as_ref()
        .and_then(|s| s.credentials_secret_ref.as_ref())
    {
        Some(r) => {
            match secret_value(&secrets, &r.name, "username").await? {
                Some(u) => Some(u),
                None => {
                    problems.push(format!("spec.delivery.smarthost.credentialsSecretRef: Secret {} has no key username", r.name));
                    None
                }
            }
        }
        None => None,
    };
    let store_url = store_secrets(relay, &secrets, &mut problems).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let inbound_service = services.get_opt(&inbound::service_name(relay)).await?;
    let ready_replicas = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .get_opt(&name)
        .await?
        .and_then(|s| s.status)
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let inputs = Inputs {
        domains: ctx.stores.domains_of(&ns, &name),
        pools: ctx.stores.pools_in(&ns),
        users,
        problems,
        smarthost_username,
        store_url,
        bounce_keys: kept.bounce_keys,
        new_admin_token: kept.new_admin_token,
        operator_pods: ctx.operator_pods.clone(),
        ready_replicas,
        inbound: relay
            .spec
            .inbound_service
            .as_ref()
            .map(|_| inbound::status(relay, inbound_service.as_ref())),
    };

    // Decide.
    let decision = decide(relay, &inputs, now)?;

    // Apply.
    if let Some(o) = &decision.objects {
        if let Some(token) = &o.admin_token_secret {
            create_once(&secrets, token).await?;
        }
        apply(&secrets, &o.config_secret).await?;
        apply(
            &Api::<StatefulSet>::namespaced(client.clone(), &ns),
            &o.statefulset,
        )
        .await?;
        apply(&services, &o.smtp_service).await?;
        apply(&services, &o.headless_service).await?;
        if let Some(s) = &o.inbound_service {
            apply(&services, s).await?;
        }
        apply(
            &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
            &o.pdb,
        )
        .await?;
        apply(
            &Api::<NetworkPolicy>::namespaced(client.clone(), &ns),
            &o.network_policy,
        )
        .await?;
        if let Some(monitor) = &o.service_monitor {
            apply_service_monitor(ctx, &ns, &name, monitor).await;
        }
    }
    // The spec dropped inboundService: its Service goes (only ours: owned by this relay).
    if relay.spec.inbound_service.is_none()
        && let Some(s) = &inbound_service
        && inbound::owned_by(s, relay)
    {
        match services
            .delete(&inbound::service_name(relay), &Default::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if relay.status.as_ref() != Some(&decision.status) {
        patch_status(
            &Api::<SmtpRelay>::namespaced(client, &ns),
            &name,
            &decision.status,
        )
        .await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// What a relay's objects and status are decided from.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The SendingDomains that name the relay, by name.
    pub domains: Vec<Arc<SendingDomain>>,
    /// The IpPools of the relay's namespace.
    pub pools: Vec<Arc<IpPool>>,
    pub users: Vec<HashedUser>,
    /// Secrets the spec names that lack a key; the config is not rendered while there are any.
    pub problems: Vec<String>,
    pub smarthost_username: Option<String>,
    /// The URL `spec.store.secretRef` holds (with its password).
    pub store_url: Option<Redacted>,
    /// The return-path token keys: those already applied, or new ones for a new relay.
    pub bounce_keys: String,
    /// A new admin API token, when the relay has no token Secret yet.
    pub new_admin_token: Option<String>,
    /// The operator's pods, which the NetworkPolicy admits to the admin port.
    pub operator_pods: Option<OperatorPods>,
    pub ready_replicas: i32,
    /// With `spec.inboundService`: its Service's load-balancer addresses.
    pub inbound: Option<InboundStatus>,
}

/// A value read from a Secret that must not reach a log, not even through `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redacted(..)")
    }
}

/// The objects that run a relay, as they should be.
#[derive(Debug, Clone)]
pub struct Objects {
    pub config_secret: Secret,
    /// Created when the relay has none yet; never applied over an existing one.
    pub admin_token_secret: Option<Secret>,
    pub statefulset: StatefulSet,
    pub smtp_service: Service,
    pub headless_service: Service,
    /// With `spec.inboundService`: the Service of the inbound listener (port 25).
    pub inbound_service: Option<Service>,
    pub pdb: PodDisruptionBudget,
    pub network_policy: NetworkPolicy,
    /// Applied when the Prometheus Operator's CRD is installed.
    pub service_monitor: Option<serde_json::Value>,
}

/// What to write for a relay: its objects (none while the config cannot be rendered) and its status.
#[derive(Debug, Clone)]
pub struct Decision {
    pub objects: Option<Objects>,
    pub status: SmtpRelayStatus,
}

/// Renders the config and the objects that run it, and the status saying how that went.
pub fn decide(relay: &SmtpRelay, inputs: &Inputs, now: Timestamp) -> Result<Decision, Error> {
    let previous = relay.status.clone().unwrap_or_default();
    let generation = relay.metadata.generation;
    let conditions = Conditions::new(&previous.conditions, generation, now);
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        conditions.set(type_, ok, reason, message)
    };
    let rendered = if inputs.problems.is_empty() {
        render::relay_config(
            relay,
            &inputs.domains,
            &inputs.pools,
            &inputs.users,
            render::SecretValues {
                smarthost_username: inputs.smarthost_username.as_deref(),
                store_url: inputs.store_url.as_ref().map(|u| u.0.as_str()),
            },
        )
        .map_err(|e| e.to_string())
    } else {
        Err(inputs.problems.join("; "))
    };
    let mut conditions = Vec::new();
    let mut config_hash = previous.config_hash.clone();
    let objects = match &rendered {
        Ok(config) => {
            let yaml = render::config_yaml(config).map_err(|e| Error::Serialize(e.to_string()))?;
            let hash = hex::encode(&Sha256::digest(yaml.as_bytes())[..8]);
            conditions.push(cond(
                "ConfigRendered",
                true,
                "Rendered",
                format!(
                    "relay config {hash} with {} domain(s) and {} user(s)",
                    inputs.domains.len(),
                    inputs.users.len()
                ),
            ));
            let o = Objects {
                config_secret: objects::config_secret(relay, &yaml, &inputs.bounce_keys),
                admin_token_secret: inputs
                    .new_admin_token
                    .as_deref()
                    .map(|t| objects::admin_token_secret(relay, t)),
                statefulset: objects::statefulset(relay, &inputs.domains, &hash, &config.shutdown),
                smtp_service: objects::smtp_service(relay),
                headless_service: objects::headless_service(relay),
                inbound_service: inbound::service(relay),
                pdb: objects::pdb(relay),
                network_policy: network::network_policy(relay, inputs.operator_pods.as_ref()),
                service_monitor: relay
                    .spec
                    .metrics
                    .service_monitor
                    .then(|| objects::service_monitor(relay)),
            };
            config_hash = Some(hash);
            Some(o)
        }
        Err(message) => {
            conditions.push(cond(
                "ConfigRendered",
                false,
                "InvalidConfig",
                message.clone(),
            ));
            None
        }
    };
    let (shared, reason, message) = shared_state(relay);
    conditions.push(cond("SharedState", shared, reason, message));
    let ready = rendered.is_ok() && inputs.ready_replicas >= relay.spec.replicas;
    conditions.push(cond(
        "Ready",
        ready,
        if ready {
            "AllReplicasReady"
        } else {
            "NotReady"
        },
        format!(
            "{}/{} replicas ready",
            inputs.ready_replicas, relay.spec.replicas
        ),
    ));
    Ok(Decision {
        objects,
        status: SmtpRelayStatus {
            ready_replicas: inputs.ready_replicas,
            config_hash,
            conditions,
            observed_generation: generation,
            inbound: inputs.inbound.clone(),
        },
    })
}

/// The condition `SharedState`: whether the replicas hold the state that must be the same everywhere (the
/// suppression list, the connection limits) in one place, and what stays per pod when they do not.
fn shared_state(relay: &SmtpRelay) -> (bool, &'static str, String) {
    let replicas = relay.spec.replicas;
    match &relay.spec.store {
        Some(store) => {
            // The URL of `url` has no password (the CRD's pattern); the one of `secretRef` is not shown.
            let at = match (&store.url, &store.secret_ref) {
                (Some(url), _) => url.clone(),
                (None, Some(r)) => format!("the URL in Secret {}", r.name),
                (None, None) => "spec.store".to_owned(),
            };
            (
                true,
                "StoreConfigured",
                format!(
                    "the {replicas} replica(s) share the suppression list, mailbox-full streaks and delivery.perDomain connection limits through {at}"
                ),
            )
        }
        None if replicas > 1 => (
            false,
            "NoStore",
            format!(
                "no spec.store: each of the {replicas} pods keeps its own suppression list and mailbox-full streaks (an address suppressed on one is still mailed by the others) and applies delivery.perDomain connection limits on its own; set spec.store (docs/fleet.md)"
            ),
        ),
        None => (
            true,
            "SingleReplica",
            "one replica: its suppression list is the whole fleet's; set spec.store before adding replicas"
                .to_owned(),
        ),
    }
}

/// Reads what `spec.store` names: the URL of `secretRef`, and that the password and CA Secrets have their
/// keys (a pod whose Secret volume lacks its key never starts, and says so only in its events). A
/// missing Secret or key is a problem that keeps the config from rendering.
async fn store_secrets(
    relay: &SmtpRelay,
    secrets: &Api<Secret>,
    problems: &mut Vec<String>,
) -> Result<Option<Redacted>, Error> {
    let Some(store) = &relay.spec.store else {
        return Ok(None);
    };
    let mut url = None;
    if let Some(r) = &store.secret_ref {
        match secret_value(secrets, &r.name, &r.key).await? {
            Some(u) if !u.trim().is_empty() => url = Some(Redacted(u.trim().to_owned())),
            _ => problems.push(format!(
                "spec.store.secretRef: Secret {} has no key {}",
                r.name, r.key
            )),
        }
    }
    if let Some(r) = &store.password_secret_ref
        && secret_value(secrets, &r.name, &r.key).await?.is_none()
    {
        problems.push(format!(
            "spec.store.passwordSecretRef: Secret {} has no key {}",
            r.name, r.key
        ));
    }
    if let Some(r) = &store.ca_secret_ref
        && secret_value(secrets, &r.name, "ca.crt").await?.is_none()
    {
        problems.push(format!(
            "spec.store.caSecretRef: Secret {} has no key ca.crt",
            r.name
        ));
    }
    Ok(url)
}

/// Each user with the argon2 hash of the password in its Secret; a missing Secret key is a problem that
/// keeps the config from rendering, not an error to retry.
async fn hashed_users(
    relay: &SmtpRelay,
    secrets: &Api<Secret>,
    applied: Option<&herald_config::Config>,
    problems: &mut Vec<String>,
) -> Result<Vec<HashedUser>, Error> {
    let mut users = Vec::new();
    for (i, u) in relay.spec.users.iter().enumerate() {
        let Some(password) = secret_value(
            secrets,
            &u.password_secret_ref.name,
            &u.password_secret_ref.key,
        )
        .await?
        else {
            problems.push(format!(
                "spec.users[{i}].passwordSecretRef: Secret {} has no key {}",
                u.password_secret_ref.name, u.password_secret_ref.key
            ));
            continue;
        };
        // Argon2 hashes are salted: re-hashing every time would change the config, and roll the pods, on every
        // reconcile. Keep the hash while it still matches the password.
        let kept = applied.and_then(|c| {
            c.users
                .iter()
                .find(|x| x.username == u.name)
                .map(|x| x.password_hash.clone())
        });
        let name = u.name.clone();
        let hash = tokio::task::spawn_blocking(move || -> Result<String, String> {
            if let Some(h) = kept
                && herald_config::password::verify(&h, &password)
            {
                return Ok(h);
            }
            herald_config::password::hash(&password)
                .map_err(|e| format!("hashing the password of {name}: {e}"))
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?
        .map_err(Error::Invalid)?;
        users.push(HashedUser {
            name: u.name.clone(),
            password_hash: hash,
            allowed_domains: u.allowed_domains.clone(),
        });
    }
    Ok(users)
}

async fn secret_value(
    secrets: &Api<Secret>,
    name: &str,
    key: &str,
) -> Result<Option<String>, Error> {
    Ok(secrets
        .get_opt(name)
        .await?
        .and_then(|s| s.data)
        .and_then(|d| {
            d.get(key).map(|v| {
                String::from_utf8_lossy(&v.0)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned()
            })
        }))
}

/// What a relay keeps across reconciles in its own Secrets, as read from the API server.
#[derive(Debug)]
pub struct Kept {
    /// The config Secret as applied last (its password hashes are kept while they match).
    pub applied: Option<Secret>,
    /// The return-path token keys: the applied ones, or new ones when there is no config Secret yet.
    pub bounce_keys: String,
    /// A new admin token, only when the token Secret does not exist.
    pub new_admin_token: Option<String>,
    /// A token Secret without a usable token: said in the status rather than replaced behind the
    /// user's back.
    pub problems: Vec<String>,
}

/// Reads the config and admin token Secrets. A value is new only where its Secret is absent (a 404): any
/// other failure to read fails the reconcile, because carrying on would replace keys in use (every bounce
/// in flight would stop verifying; `herald-relay admin` would be locked out until the pods read the new
/// token).
pub async fn kept_secrets(secrets: &Api<Secret>, relay: &SmtpRelay) -> Result<Kept, Error> {
    let applied = secrets.get_opt(&config_secret_name(relay)).await?;
    let token_name = admin_token_secret_name(relay);
    let token = secrets.get_opt(&token_name).await?;
    let mut problems = Vec::new();
    let new_admin_token = match &token {
        None => Some(new_secret_value()),
        Some(s) if secret_has_value(s, ADMIN_TOKEN_KEY) => None,
        Some(_) => {
            problems.push(format!(
                "Secret {token_name} has no key {ADMIN_TOKEN_KEY}: delete it and the operator makes a new admin token"
            ));
            None
        }
    };
    Ok(Kept {
        bounce_keys: applied
            .as_ref()
            .and_then(kept_bounce_keys)
            .unwrap_or_else(new_secret_value_line),
        applied,
        new_admin_token,
        problems,
    })
}

fn secret_has_value(s: &Secret, key: &str) -> bool {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .is_some_and(|v| !v.0.iter().all(u8::is_ascii_whitespace))
}

/// Creates a Secret that must be made once and never replaced; one made meanwhile (another operator
/// replica, an interrupted reconcile) is kept.
async fn create_once(secrets: &Api<Secret>, secret: &Secret) -> Result<(), Error> {
    match secrets
        .create(&kube::api::PostParams::default(), secret)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The return-path token keys in the applied config Secret (replacing them would make every bounce in
/// flight unverifiable). A user rotates by editing the Secret: a new first line signs, the old lines keep
/// verifying.
fn kept_bounce_keys(applied: &Secret) -> Option<String> {
    applied
        .data
        .as_ref()
        .and_then(|d| d.get(BOUNCE_KEYS))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|k| !k.trim().is_empty())
}

/// 32 random bytes in hex: a return-path key or an admin token.
fn new_secret_value() -> String {
    use rand_core::RngCore;
    let mut key = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut key);
    hex::encode(key)
}

/// A new return-path key file (one key per line), for a relay that has none yet.
fn new_secret_value_line() -> String {
    format!("{}\n", new_secret_value())
}

/// The config in the applied Secret, to keep its password hashes.
fn applied_config(applied: &Secret) -> Option<herald_config::Config> {
    let text = applied
        .data
        .as_ref()?
        .get(CONFIG_FILE)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())?;
    herald_config::Config::parse(&text).ok()
}

/// Applies the ServiceMonitor when the Prometheus Operator's CRD is installed; otherwise says so in the
/// debug log and carries on.
async fn apply_service_monitor(ctx: &Context, ns: &str, name: &str, monitor: &serde_json::Value) {
    let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor");
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
    let result = api
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(monitor),
        )
        .await;
    match result {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {
            tracing::debug!("ServiceMonitor CRD not installed; skipping");
        }
        Err(e) => tracing::warn!(error = %e, "cannot apply the ServiceMonitor"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LocalRef, SendingDomainSpec};
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn relay() -> SmtpRelay {
        let mut r = crate::fixtures::relay();
        r.spec.replicas = 2;
        r.metadata.generation = Some(4);
        r.spec.listeners[0].auth = crate::crd::ListenerAuth::None;
        r
    }

    fn domain(name: &str) -> Arc<SendingDomain> {
        let mut d = SendingDomain::new(
            name,
            SendingDomainSpec {
                domain: format!("{name}.test"),
                ..crate::fixtures::domain_spec()
            },
        );
        d.metadata.namespace = Some("mail".into());
        Arc::new(d)
    }

    fn inputs() -> Inputs {
        Inputs {
            domains: vec![domain("a"), domain("b")],
            pools: vec![],
            users: vec![],
            problems: vec![],
            smarthost_username: None,
            store_url: None,
            bounce_keys: "00\n".into(),
            new_admin_token: None,
            operator_pods: None,
            ready_replicas: 0,
            inbound: None,
        }
    }

    fn cond<'a>(
        s: &'a SmtpRelayStatus,
        type_: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} in {:?}", s.conditions))
    }

    #[test]
    fn a_relay_with_its_domains_renders_its_objects_and_a_status_naming_the_config() {
        let r = relay();
        let d = decide(&r, &inputs(), at(100)).unwrap();
        let o = d.objects.expect("objects");
        let yaml = &o.config_secret.string_data.as_ref().unwrap()[CONFIG_FILE];
        assert!(yaml.contains("a.test") && yaml.contains("b.test"), "{yaml}");
        assert_eq!(
            o.config_secret.string_data.as_ref().unwrap()[BOUNCE_KEYS],
            "00\n"
        );
        let hash = d.status.config_hash.clone().expect("a hash");
        assert_eq!(
            o.statefulset
                .spec
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()[objects::CONFIG_HASH_ANNOTATION],
            hash
        );
        assert_eq!(
            cond(&d.status, "ConfigRendered").message,
            format!("relay config {hash} with 2 domain(s) and 0 user(s)")
        );
        assert!(o.service_monitor.is_some());
        let ready = cond(&d.status, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            ("False", "0/2 replicas ready")
        );
        assert_eq!(ready.observed_generation, Some(4));
        // Ready once the StatefulSet says so.
        let d = decide(
            &r,
            &Inputs {
                ready_replicas: 2,
                ..inputs()
            },
            at(200),
        )
        .unwrap();
        assert_eq!(cond(&d.status, "Ready").reason, "AllReplicasReady");
        assert_eq!(
            d.status.config_hash,
            Some(hash),
            "the same inputs, the same config"
        );
    }

    #[test]
    fn the_config_hash_follows_the_domains() {
        let r = relay();
        let two = decide(&r, &inputs(), at(100)).unwrap().status.config_hash;
        let three = decide(
            &r,
            &Inputs {
                domains: vec![domain("a"), domain("b"), domain("c")],
                ..inputs()
            },
            at(100),
        )
        .unwrap()
        .status
        .config_hash;
        assert_ne!(two, three);
    }

    #[test]
    fn a_missing_secret_key_keeps_the_config_and_says_which() {
        let mut r = relay();
        r.status = Some(SmtpRelayStatus {
            config_hash: Some("0123456789abcdef".into()),
            ..SmtpRelayStatus::default()
        });
        let d = decide(
            &r,
            &Inputs {
                problems: vec![
                    "spec.users[0].passwordSecretRef: Secret pw has no key password".into(),
                ],
                ..inputs()
            },
            at(100),
        )
        .unwrap();
        assert!(d.objects.is_none(), "nothing is applied");
        let c = cond(&d.status, "ConfigRendered");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidConfig")
        );
        assert!(c.message.contains("Secret pw has no key password"));
        assert_eq!(d.status.config_hash.as_deref(), Some("0123456789abcdef"));
        assert_eq!(cond(&d.status, "Ready").status, "False");
    }

    #[test]
    fn a_domain_naming_a_missing_pool_is_an_invalid_config_naming_the_field() {
        let mut d = (*domain("a")).clone();
        d.spec.ip_pool_ref = Some(LocalRef {
            name: "nowhere".into(),
        });
        let decision = decide(
            &relay(),
            &Inputs {
                domains: vec![Arc::new(d)],
                ..inputs()
            },
            at(100),
        )
        .unwrap();
        let c = cond(&decision.status, "ConfigRendered");
        assert!(
            c.message.contains("SendingDomain.spec.ipPoolRef"),
            "{}",
            c.message
        );
    }

    /// Each domain's selector and key file in the rendered config, and the Secret key projected to that
    /// file in the StatefulSet.
    fn signing(d: &Decision) -> Vec<(String, String, String, String)> {
        let o = d.objects.as_ref().unwrap();
        let yaml = &o.config_secret.string_data.as_ref().unwrap()[CONFIG_FILE];
        let config = herald_config::Config::parse(yaml).unwrap();
        let pod = o.statefulset.spec.template.spec.as_ref().unwrap();
        let dkim = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "dkim")
            .unwrap();
        let sources = dkim.projected.as_ref().unwrap().sources.as_ref().unwrap();
        config
            .domains
            .iter()
            .zip(sources)
            .map(|(domain, source)| {
                let secret = source.secret.as_ref().unwrap();
                let item = &secret.items.as_ref().unwrap()[0];
                let file = format!("{}/{}", crate::layout::DKIM_DIR, item.path);
                assert_eq!(file, domain.dkim[0].key_file.display().to_string());
                (
                    domain.dkim[0].selector.clone(),
                    file,
                    secret.name.clone(),
                    item.key.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn a_selector_is_only_ever_rendered_with_its_own_key() {
        let r = relay();
        let mut d = (*domain("a")).clone();
        let mut brought = (*domain("b")).clone();
        brought.spec.dkim.secret_ref = Some(LocalRef {
            name: "b-key".into(),
        });
        let with = |d: &SendingDomain, b: &SendingDomain| Inputs {
            domains: vec![Arc::new(d.clone()), Arc::new(b.clone())],
            ..inputs()
        };
        let row = |sel: &str, domain: &str, secret: &str, key: &str| {
            (
                sel.to_owned(),
                format!("/etc/herald/dkim/{domain}.{sel}.pem"),
                secret.to_owned(),
                key.to_owned(),
            )
        };
        let before = decide(&r, &with(&d, &brought), at(100)).unwrap();
        assert_eq!(
            signing(&before),
            [
                row("herald1", "a.test", "a-dkim", "herald1.pem"),
                row("herald1", "b.test", "b-key", "private.key"),
            ]
        );
        // The rotation is promoted: the selector, the file and the Secret key it is projected from move
        // together, and the config hash changes so the pods roll.
        d.status = Some(crate::crd::SendingDomainStatus {
            active_selector: Some("herald1-20260101000000".into()),
            ..Default::default()
        });
        // A brought key's selector is the spec's (with the spec's Secret), whatever the status says.
        brought.spec.dkim.selector = "s2".into();
        brought.status = d.status.clone();
        let after = decide(&r, &with(&d, &brought), at(200)).unwrap();
        assert_eq!(
            signing(&after),
            [
                row(
                    "herald1-20260101000000",
                    "a.test",
                    "a-dkim",
                    "herald1-20260101000000.pem"
                ),
                row("s2", "b.test", "b-key", "private.key"),
            ]
        );
        assert_ne!(before.status.config_hash, after.status.config_hash);
    }

    #[test]
    fn the_pods_grace_period_is_the_rendered_drain_and_ten_seconds() {
        let mut r = relay();
        let grace = |r: &SmtpRelay| {
            let d = decide(r, &inputs(), at(100)).unwrap();
            let o = d.objects.unwrap();
            let pod = o.statefulset.spec.template.spec.unwrap();
            let yaml = &o.config_secret.string_data.unwrap()[CONFIG_FILE];
            let config = herald_config::Config::parse(yaml).unwrap();
            (pod.termination_grace_period_seconds, config.shutdown)
        };
        let (seconds, drain) = grace(&r);
        assert_eq!((seconds, drain.total().as_secs()), (Some(80), 70));
        r.spec.shutdown.deliveries = "5m".into();
        let (seconds, drain) = grace(&r);
        assert_eq!(drain.deliveries.as_secs(), 300);
        assert_eq!(seconds, Some(30 + 300 + 10 + 10));
        // A drain that does not parse is a condition naming the field; nothing is applied.
        r.spec.shutdown.events = "forever".into();
        let d = decide(&r, &inputs(), at(100)).unwrap();
        assert!(d.objects.is_none());
        let c = cond(&d.status, "ConfigRendered");
        assert!(c.message.contains("spec.shutdown.events"), "{}", c.message);
    }

    #[test]
    fn no_service_monitor_when_the_spec_turns_it_off() {
        let mut r = relay();
        r.spec.metrics.service_monitor = false;
        let d = decide(&r, &inputs(), at(100)).unwrap();
        assert!(d.objects.unwrap().service_monitor.is_none());
    }

    #[test]
    fn the_applied_secret_keeps_its_bounce_keys_and_hashes() {
        let r = relay();
        let yaml = decide(&r, &inputs(), at(100))
            .unwrap()
            .objects
            .unwrap()
            .config_secret
            .string_data
            .unwrap()[CONFIG_FILE]
            .clone();
        // As the API server returns it: `data`, not `stringData`.
        let applied = Secret {
            data: Some(BTreeMap::from([
                (CONFIG_FILE.to_owned(), ByteString(yaml.into_bytes())),
                (BOUNCE_KEYS.to_owned(), ByteString(b"abc\n".to_vec())),
            ])),
            ..Secret::default()
        };
        assert_eq!(kept_bounce_keys(&applied).as_deref(), Some("abc\n"));
        assert_eq!(applied_config(&applied).unwrap().domains.len(), 2);
        let empty = Secret {
            data: Some(BTreeMap::from([(
                BOUNCE_KEYS.to_owned(),
                ByteString(b" \n".to_vec()),
            )])),
            ..Secret::default()
        };
        assert_eq!(kept_bounce_keys(&empty), None);
        let fresh = new_secret_value_line();
        assert_eq!(fresh.len(), 65);
        assert_ne!(fresh, new_secret_value_line());
    }

    use super::super::stub::{self, secret, status};

    #[tokio::test]
    async fn a_failed_read_never_makes_new_bounce_keys_or_a_new_admin_token() {
        // The API server fails (500, or 429 while it sheds load, 403 after an RBAC edit): the reconcile
        // fails and keeps what exists.
        let failing: [stub::Answer; 3] = [
            |_, _| (500, status(500, "InternalError")),
            |_, _| (429, status(429, "TooManyRequests")),
            |_, _| (403, status(403, "Forbidden")),
        ];
        for answer in failing {
            let s = stub::secrets(answer);
            assert!(kept_secrets(&s.api, &relay()).await.is_err());
            assert!(s.writes().is_empty(), "{:?}", s.writes());
        }
        // Only the token Secret's read fails: still no new bounce keys go out with a new token.
        let s = stub::secrets(|_, path| {
            if path.ends_with("/relay-config") {
                (200, secret("relay-config", &[(BOUNCE_KEYS, b"abc\n")]))
            } else {
                (500, status(500, "InternalError"))
            }
        });
        assert!(kept_secrets(&s.api, &relay()).await.is_err());
    }

    #[tokio::test]
    async fn keys_and_token_are_new_only_where_their_secret_is_absent() {
        let s = stub::secrets(|_, path| {
            if path.ends_with("/relay-config") {
                (200, secret("relay-config", &[(BOUNCE_KEYS, b"abc\n")]))
            } else {
                (404, status(404, "NotFound"))
            }
        });
        let kept = kept_secrets(&s.api, &relay()).await.unwrap();
        assert_eq!(kept.bounce_keys, "abc\n");
        let token = kept.new_admin_token.expect("a new token");
        assert!(
            token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
            "{token}"
        );

        let s = stub::secrets(|_, path| {
            if path.ends_with("/relay-admin-token") {
                (
                    200,
                    secret("relay-admin-token", &[(ADMIN_TOKEN_KEY, b"t0ken")]),
                )
            } else {
                (404, status(404, "NotFound"))
            }
        });
        let kept = kept_secrets(&s.api, &relay()).await.unwrap();
        assert_eq!(kept.new_admin_token, None, "the existing token is kept");
        assert_eq!(kept.bounce_keys.len(), 65, "a new relay gets new keys");
        assert!(kept.problems.is_empty());

        // A token Secret emptied by hand is reported, not silently replaced.
        let s = stub::secrets(|_, path| {
            if path.ends_with("/relay-admin-token") {
                (
                    200,
                    secret("relay-admin-token", &[(ADMIN_TOKEN_KEY, b"\n")]),
                )
            } else {
                (404, status(404, "NotFound"))
            }
        });
        let kept = kept_secrets(&s.api, &relay()).await.unwrap();
        assert_eq!(kept.new_admin_token, None);
        assert!(
            kept.problems[0].contains("relay-admin-token has no key token"),
            "{:?}",
            kept.problems
        );
    }

    #[test]
    fn a_new_admin_token_is_an_object_to_create_and_none_otherwise() {
        let r = relay();
        let d = decide(&r, &inputs(), at(100)).unwrap();
        assert!(d.objects.unwrap().admin_token_secret.is_none());
        let with_token = Inputs {
            new_admin_token: Some("t".into()),
            ..inputs()
        };
        let o = decide(&r, &with_token, at(100)).unwrap().objects.unwrap();
        let token = o.admin_token_secret.expect("a token Secret");
        assert_eq!(token.metadata.name.as_deref(), Some("relay-admin-token"));
    }

    fn with_store(mut r: SmtpRelay, url: Option<&str>, secret: Option<&str>) -> SmtpRelay {
        r.spec.store = Some(crate::crd::StoreSpec {
            url: url.map(str::to_owned),
            password_secret_ref: None,
            secret_ref: secret.map(|name| crate::crd::UrlSecretRef {
                name: name.into(),
                key: "url".into(),
            }),
            key_prefix: None,
            required: false,
            ca_secret_ref: None,
            cluster: false,
            sentinel_master: None,
            nodes: Vec::new(),
        });
        r
    }

    #[test]
    fn shared_state_says_what_is_per_pod_when_replicas_have_no_store() {
        let mut r = relay();
        let d = decide(&r, &inputs(), at(100)).unwrap();
        let c = cond(&d.status, "SharedState");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "NoStore"));
        for per_pod in ["suppression list", "mailbox-full streaks", "perDomain"] {
            assert!(c.message.contains(per_pod), "{}", c.message);
        }
        assert!(d.objects.is_some(), "a fleet without a store still runs");
        r.spec.replicas = 1;
        let c = cond(
            &decide(&r, &inputs(), at(100)).unwrap().status,
            "SharedState",
        )
        .clone();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "SingleReplica")
        );
        let r = with_store(relay(), Some("redis://relay-valkey:6379/0"), None);
        let d = decide(&r, &inputs(), at(100)).unwrap();
        let c = cond(&d.status, "SharedState");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "StoreConfigured")
        );
        assert!(
            c.message.contains("redis://relay-valkey:6379/0") && c.message.contains("perDomain"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_secret_url_reaches_the_config_secret_and_never_the_status() {
        let r = with_store(relay(), None, Some("cache"));
        let url = "rediss://default:s3cret@cache.example.test:6379/0";
        let d = decide(
            &r,
            &Inputs {
                store_url: Some(Redacted(url.into())),
                ..inputs()
            },
            at(100),
        )
        .unwrap();
        let yaml = &d.objects.unwrap().config_secret.string_data.unwrap()[CONFIG_FILE];
        let config = herald_config::Config::parse(yaml).unwrap();
        let store = config.store.unwrap();
        assert_eq!((store.url.as_str(), store.fleet_size), (url, 2));
        let status = serde_json::to_string(&d.status).unwrap();
        assert!(!status.contains("s3cret"), "{status}");
        assert!(!format!("{:?}", Redacted(url.into())).contains("s3cret"));
    }

    #[tokio::test]
    async fn a_missing_store_secret_key_is_a_problem_naming_it() {
        let mut r = with_store(relay(), None, Some("cache"));
        let s = stub::secrets(|_, path| {
            if path.ends_with("/cache") {
                (
                    200,
                    secret("cache", &[("url", b"redis://:pw@cache:6379\n")]),
                )
            } else {
                (404, status(404, "NotFound"))
            }
        });
        let mut problems = Vec::new();
        let url = store_secrets(&r, &s.api, &mut problems).await.unwrap();
        assert_eq!(url, Some(Redacted("redis://:pw@cache:6379".into())));
        assert!(problems.is_empty(), "{problems:?}");
        // The password and CA Secrets the pods mount are missing.
        let store = r.spec.store.as_mut().unwrap();
        store.url = Some("rediss://valkey:6379".into());
        store.secret_ref = None;
        store.password_secret_ref = Some(crate::crd::SecretKeyRef {
            name: "valkey".into(),
            key: "password".into(),
        });
        store.ca_secret_ref = Some(LocalRef {
            name: "valkey-ca".into(),
        });
        let url = store_secrets(&r, &s.api, &mut problems).await.unwrap();
        assert_eq!(url, None);
        assert_eq!(
            problems,
            [
                "spec.store.passwordSecretRef: Secret valkey has no key password",
                "spec.store.caSecretRef: Secret valkey-ca has no key ca.crt",
            ]
        );
    }
}
