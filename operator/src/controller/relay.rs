//! SmtpRelay: the relay config rendered from the relay, its domains and its pools, and the objects that run
//! it.
//!
//! - **Fetch**: the relay's domains and the namespace's pools from the shared caches; the config Secret as it
//!   is (to keep the return-path keys, and the password hashes that still match); each user's password,
//!   hashed; the smarthost username; the StatefulSet's ready replicas.
//! - **Decide**: [`decide`] renders the config and builds the config Secret, StatefulSet, Services, PDB and
//!   ServiceMonitor, and the status, without I/O.
//! - **Apply**: server-side apply of each object, then the status when it changed.
//!
//! A relay renders once per batch of changes, not once per domain event: SendingDomain events reach it
//! through `triggers::DomainEvents` only when something the config reads changed, and a debounce folds a
//! burst of those into one reconcile (see `run`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};

use super::{Conditions, Context, Error, MANAGER, apply, patch_status};
use crate::crd::{IpPool, SendingDomain, SmtpRelay, SmtpRelayStatus};
use crate::layout::{BOUNCE_KEYS, CONFIG_FILE, config_secret_name};
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

    // Fetch. A failed read of the config Secret fails the reconcile: carrying on would replace the
    // return-path keys with new ones, and every bounce in flight would stop verifying.
    let applied = secrets.get_opt(&config_secret_name(relay)).await?;
    let mut problems = Vec::new();
    let users = hashed_users(
        relay,
        &secrets,
        applied.as_ref().and_then(applied_config).as_ref(),
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
        bounce_keys: applied
            .as_ref()
            .and_then(kept_bounce_keys)
            .unwrap_or_else(new_bounce_keys),
        ready_replicas,
    };

    // Decide.
    let decision = decide(relay, &inputs, now)?;

    // Apply.
    if let Some(o) = &decision.objects {
        apply(&secrets, &o.config_secret).await?;
        apply(
            &Api::<StatefulSet>::namespaced(client.clone(), &ns),
            &o.statefulset,
        )
        .await?;
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        apply(&services, &o.smtp_service).await?;
        apply(&services, &o.headless_service).await?;
        apply(
            &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
            &o.pdb,
        )
        .await?;
        if let Some(monitor) = &o.service_monitor {
            apply_service_monitor(ctx, &ns, &name, monitor).await;
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
    /// The return-path token keys: those already applied, or new ones for a new relay.
    pub bounce_keys: String,
    pub ready_replicas: i32,
}

/// The objects that run a relay, as they should be.
#[derive(Debug, Clone)]
pub struct Objects {
    pub config_secret: Secret,
    pub statefulset: StatefulSet,
    pub smtp_service: Service,
    pub headless_service: Service,
    pub pdb: PodDisruptionBudget,
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
            inputs.smarthost_username.as_deref(),
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
                statefulset: objects::statefulset(relay, &inputs.domains, &hash, &config.shutdown),
                smtp_service: objects::smtp_service(relay),
                headless_service: objects::headless_service(relay),
                pdb: objects::pdb(relay),
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
        },
    })
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

/// A new random return-path key, for a relay that has none yet.
fn new_bounce_keys() -> String {
    use rand_core::RngCore;
    let mut key = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut key);
    format!("{}\n", hex::encode(key))
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
            bounce_keys: "00\n".into(),
            ready_replicas: 0,
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
        let fresh = new_bounce_keys();
        assert_eq!(fresh.len(), 65);
        assert_ne!(fresh, new_bounce_keys());
    }
}
