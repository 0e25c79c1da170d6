//! SmtpRelay: render the relay config from the relay, its domains and pools, then apply the config Secret,
//! StatefulSet, Services, PDB and (when the CRD exists) ServiceMonitor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Context, Error, MANAGER, apply, condition};
use crate::crd::{IpPool, SendingDomain, SmtpRelay, SmtpRelayStatus};
use crate::objects;
use crate::render::{self, HashedUser};

/// How often a relay is looked at even when nothing changed (ready replicas come from the StatefulSet).
const RESYNC: Duration = Duration::from_secs(300);

pub async fn reconcile(relay: Arc<SmtpRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics
        .reconciles
        .with_label_values(&["SmtpRelay"])
        .inc();
    let ns = relay
        .namespace()
        .ok_or_else(|| Error::Invalid("SmtpRelay without a namespace".into()))?;
    let name = relay.name_any();
    let client = ctx.client.clone();
    let previous = relay.status.clone().unwrap_or_default();
    let generation = relay.metadata.generation;

    let domains: Vec<SendingDomain> = Api::<SendingDomain>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|d| d.spec.relay_ref.name == name)
        .collect();
    let pools = Api::<IpPool>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let existing = existing_config(&secrets, &relay).await;

    let mut users = Vec::new();
    let mut problems = Vec::new();
    for (i, u) in relay.spec.users.iter().enumerate() {
        let password = match secret_value(
            &secrets,
            &u.password_secret_ref.name,
            &u.password_secret_ref.key,
        )
        .await?
        {
            Some(p) => p,
            None => {
                problems.push(format!(
                    "spec.users[{i}].passwordSecretRef: Secret {} has no key {}",
                    u.password_secret_ref.name, u.password_secret_ref.key
                ));
                continue;
            }
        };
        // Argon2 hashes are salted: re-hashing every time would change the config, and roll the pods, on every
        // reconcile. Keep the hash while it still matches the password.
        let kept = existing.as_ref().and_then(|c| {
            c.users
                .iter()
                .find(|x| x.username == u.name)
                .map(|x| x.password_hash.clone())
        });
        let name_ = u.name.clone();
        let hash = tokio::task::spawn_blocking(move || -> Result<String, String> {
            if let Some(h) = kept
                && herald_config::password::verify(&h, &password)
            {
                return Ok(h);
            }
            herald_config::password::hash(&password)
                .map_err(|e| format!("hashing the password of {name_}: {e}"))
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

    let rendered = if problems.is_empty() {
        render::relay_config(
            &relay,
            &domains,
            &pools,
            &users,
            smarthost_username.as_deref(),
        )
        .map_err(|e| e.to_string())
    } else {
        Err(problems.join("; "))
    };
    let mut conditions = Vec::new();
    let mut config_hash = previous.config_hash.clone();
    match &rendered {
        Ok(config) => {
            let yaml = render::config_yaml(config).map_err(|e| Error::Serialize(e.to_string()))?;
            let hash = hex::encode(&Sha256::digest(yaml.as_bytes())[..8]);
            let keys = bounce_keys(&secrets, &relay).await;
            apply(&secrets, &objects::config_secret(&relay, &yaml, &keys)).await?;
            let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
            apply(&sts_api, &objects::statefulset(&relay, &domains, &hash)).await?;
            let svc: Api<Service> = Api::namespaced(client.clone(), &ns);
            apply(&svc, &objects::smtp_service(&relay)).await?;
            apply(&svc, &objects::headless_service(&relay)).await?;
            let pdb: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
            apply(&pdb, &objects::pdb(&relay)).await?;
            if relay.spec.metrics.service_monitor {
                apply_service_monitor(&ctx, &ns, &relay).await;
            }
            conditions.push(condition(
                &previous.conditions,
                "ConfigRendered",
                true,
                "Rendered",
                format!(
                    "relay config {hash} with {} domain(s) and {} user(s)",
                    domains.len(),
                    users.len()
                ),
                generation,
            ));
            config_hash = Some(hash);
        }
        Err(message) => {
            conditions.push(condition(
                &previous.conditions,
                "ConfigRendered",
                false,
                "InvalidConfig",
                message.clone(),
                generation,
            ));
        }
    }
    let ready_replicas = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .get_opt(&name)
        .await?
        .and_then(|s| s.status)
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let ready = rendered.is_ok() && ready_replicas >= relay.spec.replicas;
    conditions.push(condition(
        &previous.conditions,
        "Ready",
        ready,
        if ready {
            "AllReplicasReady"
        } else {
            "NotReady"
        },
        format!("{ready_replicas}/{} replicas ready", relay.spec.replicas),
        generation,
    ));
    let status = SmtpRelayStatus {
        ready_replicas,
        config_hash,
        conditions,
        observed_generation: generation,
    };
    if status != previous {
        let api: Api<SmtpRelay> = Api::namespaced(client, &ns);
        api.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(json!({ "apiVersion": "herald.dev/v1alpha1", "kind": "SmtpRelay", "status": status })),
        )
        .await?;
    }
    ctx.succeeded(relay.as_ref());
    ctx.metrics
        .duration
        .with_label_values(&["SmtpRelay"])
        .observe(started.elapsed().as_secs_f64());
    Ok(Action::requeue(RESYNC))
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

/// The return-path token keys: those already in the config Secret (replacing them would make every bounce
/// in flight unverifiable), or a new random key for a new relay. A user rotates by editing the Secret:
/// a new first line signs, the old lines keep verifying.
async fn bounce_keys(secrets: &Api<Secret>, relay: &SmtpRelay) -> String {
    let kept = secrets
        .get_opt(&objects::config_secret_name(relay))
        .await
        .ok()
        .flatten()
        .and_then(|s| s.data)
        .and_then(|d| d.get(render::BOUNCE_KEYS).map(|v| v.0.clone()))
        .and_then(|v| String::from_utf8(v).ok())
        .filter(|k| !k.trim().is_empty());
    kept.unwrap_or_else(|| {
        use rand_core::RngCore;
        let mut key = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut key);
        format!("{}\n", hex::encode(key))
    })
}

/// The config currently applied, to keep its password hashes.
async fn existing_config(
    secrets: &Api<Secret>,
    relay: &SmtpRelay,
) -> Option<herald_config::Config> {
    let s = secrets
        .get_opt(&objects::config_secret_name(relay))
        .await
        .ok()??;
    let text = s
        .data?
        .get(render::CONFIG_FILE)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())?;
    herald_config::Config::parse(&text).ok()
}

/// Applies the ServiceMonitor when the Prometheus Operator's CRD is installed; otherwise says so once in
/// the log and carries on.
async fn apply_service_monitor(ctx: &Context, ns: &str, relay: &SmtpRelay) {
    let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor");
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
    let obj = objects::service_monitor(relay);
    let result = api
        .patch(
            &relay.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&obj),
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
