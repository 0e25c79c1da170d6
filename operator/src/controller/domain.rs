//! SendingDomain: a DKIM key in a Secret, the DNS records to publish, and whether DNS serves them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Context, Error, MANAGER, condition};
use crate::crd::{
    DkimAlgorithm, IpPool, RecordState, SendingDomain, SendingDomainStatus, SmtpRelay,
};
use crate::objects::{DKIM_KEY, dkim_secret_name};
use crate::records::{self, Inputs};
use crate::{dkim, render};

/// The key in a generated DKIM Secret holding the `p=` value, so the public key is not re-derived each time.
pub const DKIM_PUBLIC: &str = "public.b64";

pub async fn reconcile(sd: Arc<SendingDomain>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics
        .reconciles
        .with_label_values(&["SendingDomain"])
        .inc();
    let ns = sd
        .namespace()
        .ok_or_else(|| Error::Invalid("SendingDomain without a namespace".into()))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let previous = sd.status.clone().unwrap_or_default();
    let generation = sd.metadata.generation;

    let key = dkim_public_key(&sd, &secrets).await;
    let mut conditions = Vec::new();
    let (selector, public) = match &key {
        Ok((selector, p)) => {
            conditions.push(condition(
                &previous.conditions,
                "DkimKeyReady",
                true,
                "KeyReady",
                format!("DKIM key in Secret {}", dkim_secret_name(&sd)),
                generation,
            ));
            (selector.clone(), Some(p.clone()))
        }
        Err(e) => {
            conditions.push(condition(
                &previous.conditions,
                "DkimKeyReady",
                false,
                "KeyUnavailable",
                e.to_string(),
                generation,
            ));
            (sd.spec.dkim.selector.clone(), None)
        }
    };
    let next = if public.is_some() {
        rotation_key(&sd, &secrets).await?
    } else {
        None
    };

    let pools: Api<IpPool> = Api::namespaced(ctx.client.clone(), &ns);
    let pool_addresses = match &sd.spec.ip_pool_ref {
        Some(r) => pools
            .get_opt(&r.name)
            .await?
            .map(|p| p.spec.addresses.iter().map(|a| a.address.clone()).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let relays: Api<SmtpRelay> = Api::namespaced(ctx.client.clone(), &ns);
    let relay = relays.get_opt(&sd.spec.relay_ref.name).await?;
    let inbound_host = match &relay {
        Some(r) => render::hostname(r),
        None => format!("{}.{ns}.svc.cluster.local", sd.spec.relay_ref.name),
    };
    let spf_include = relay
        .as_ref()
        .and_then(|r| r.spec.delivery.smarthost.as_ref())
        .and_then(|s| s.spf_include.clone());
    let mut records = Vec::new();
    if let Some(p) = &public {
        let desired = records::desired(
            &sd.spec,
            &Inputs {
                selector: &selector,
                dkim_public_b64: p,
                next: next.as_ref().map(|(s, k)| (s.as_str(), k.as_str())),
                spf_include: spf_include.as_deref(),
                pool_addresses: &pool_addresses,
                inbound_host: &inbound_host,
            },
        );
        for r in &desired {
            records.push(ctx.dns.check(r).await);
        }
    }
    // The next key signs only once receivers can find it: promote it when its record verifies.
    let mut active = selector.to_owned();
    if let Some((next_selector, _)) = &next {
        let next_name = format!("{next_selector}._domainkey.{}", sd.spec.domain);
        if records
            .iter()
            .any(|r| r.name == next_name && r.state == RecordState::Published)
        {
            promote(&secrets, &sd, next_selector).await?;
            active = next_selector.clone();
            publish_event(&ctx, &sd, EventType::Normal, "DkimKeyRotated", "RotateDkimKey",
                format!("selector {next_selector} verified in DNS and now signs; keep {selector}'s record until mail signed with it has been delivered")).await;
        }
    }
    let missing: Vec<String> = records
        .iter()
        .filter(|r| r.state != RecordState::Published)
        .map(|r| match (&r.observed, &r.nameserver) {
            (Some(o), Some(ns)) => format!(
                "{} {} ({:?}: {ns} served {o:?})",
                r.record_type, r.name, r.state
            ),
            (_, Some(ns)) => format!("{} {} ({:?} at {ns})", r.record_type, r.name, r.state),
            _ => format!("{} {} ({:?})", r.record_type, r.name, r.state),
        })
        .collect();
    let verified = public.is_some() && missing.is_empty();
    let dns_message = if public.is_none() {
        "waiting for the DKIM key".to_owned()
    } else if verified {
        format!("all {} records are published", records.len())
    } else {
        format!("not yet served: {}", missing.join("; "))
    };
    let reason = if verified {
        "RecordsPublished"
    } else if records.iter().any(|r| r.state == RecordState::Mismatch) {
        "RecordsMismatch"
    } else {
        "RecordsMissing"
    };
    conditions.push(condition(
        &previous.conditions,
        "DnsVerified",
        verified,
        reason,
        dns_message,
        generation,
    ));
    ctx.metrics
        .set_domain_verified(&ns, &sd.name_any(), verified);
    if sd.spec.publish_with_external_dns {
        let published = publish_external_dns(&ctx, &ns, &sd, &records).await;
        let (ok, reason, message) = match published {
            Ok(()) => (
                true,
                "Published",
                format!(
                    "DNSEndpoint {}-records holds {} records",
                    sd.name_any(),
                    records.len()
                ),
            ),
            Err(m) => (false, "NotPublished", m),
        };
        conditions.push(condition(
            &previous.conditions,
            "ExternalDnsPublished",
            ok,
            reason,
            message,
            generation,
        ));
    }
    let ready = verified && key.is_ok();
    conditions.push(condition(
        &previous.conditions,
        "Ready",
        ready,
        if ready { "Ready" } else { "NotReady" },
        if ready {
            "the domain can send".into()
        } else {
            "see DkimKeyReady and DnsVerified".into()
        },
        generation,
    ));
    let status = SendingDomainStatus {
        records,
        conditions,
        observed_generation: generation,
        active_selector: public.as_ref().map(|_| active),
    };
    if status != previous {
        let was_verified = previous
            .conditions
            .iter()
            .any(|c| c.type_ == "DnsVerified" && c.status == "True");
        let api: Api<SendingDomain> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &sd.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "herald.dev/v1alpha1",
                "kind": "SendingDomain",
                "status": status,
            })),
        )
        .await?;
        if was_verified != verified {
            let (type_, reason, note) = if verified {
                (
                    EventType::Normal,
                    "DnsVerified",
                    "all DNS records are published",
                )
            } else {
                (
                    EventType::Warning,
                    "DnsNotVerified",
                    "some DNS records are missing or differ; see status.records",
                )
            };
            publish_event(&ctx, &sd, type_, reason, "VerifyDns", note.into()).await;
        }
    }
    ctx.succeeded(sd.as_ref());
    ctx.metrics
        .duration
        .with_label_values(&["SendingDomain"])
        .observe(started.elapsed().as_secs_f64());
    Ok(Action::requeue(if verified {
        ctx.recheck_verified
    } else {
        ctx.recheck_pending
    }))
}

/// Writes the records as an external-dns DNSEndpoint, so external-dns publishes them.
async fn publish_external_dns(
    ctx: &Context,
    ns: &str,
    sd: &SendingDomain,
    records: &[crate::crd::DnsRecord],
) -> Result<(), String> {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    if records.is_empty() {
        return Err("no records yet (waiting for the DKIM key)".into());
    }
    let gvk = GroupVersionKind::gvk("externaldns.k8s.io", "v1alpha1", "DNSEndpoint");
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &ApiResource::from_gvk(&gvk));
    let endpoints: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let target = if r.record_type == "TXT" { records::unquoted(&r.value) } else { r.value.clone() };
            json!({ "dnsName": r.name, "recordType": r.record_type, "targets": [target], "recordTTL": 300 })
        })
        .collect();
    let name = format!("{}-records", sd.name_any());
    let obj = json!({
        "apiVersion": "externaldns.k8s.io/v1alpha1",
        "kind": "DNSEndpoint",
        "metadata": {
            "name": name,
            "namespace": ns,
            "ownerReferences": sd.controller_owner_ref(&()).map(|o| vec![o]),
        },
        "spec": { "endpoints": endpoints },
    });
    match api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            Err("the DNSEndpoint CRD (externaldns.k8s.io) is not installed; publish the records by hand".into())
        }
        Err(e) => Err(format!("cannot write the DNSEndpoint: {e}")),
    }
}

/// Annotations on a generated DKIM Secret: its selector and when it started signing.
const SELECTOR_ANNOTATION: &str = "herald.dev/dkim-selector";
const CREATED_ANNOTATION: &str = "herald.dev/dkim-created";

/// The active selector and its DKIM public key (`p=`), creating the key Secret when the domain does not
/// bring its own.
async fn dkim_public_key(
    sd: &SendingDomain,
    secrets: &Api<Secret>,
) -> Result<(String, String), Error> {
    let name = dkim_secret_name(sd);
    if let Some(s) = secrets.get_opt(&name).await? {
        let selector = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SELECTOR_ANNOTATION).cloned())
            .filter(|_| sd.spec.dkim.secret_ref.is_none())
            .unwrap_or_else(|| sd.spec.dkim.selector.clone());
        let data = s.data.unwrap_or_default();
        if let Some(p) = data.get(DKIM_PUBLIC) {
            return Ok((selector, String::from_utf8_lossy(&p.0).into_owned()));
        }
        let Some(private) = data.get(DKIM_KEY) else {
            return Err(Error::Invalid(format!(
                "Secret {name} has no {DKIM_KEY} key"
            )));
        };
        return Ok((
            selector,
            public_from_private(sd.spec.dkim.algorithm, &private.0)?,
        ));
    }
    if sd.spec.dkim.secret_ref.is_some() {
        return Err(Error::Invalid(format!(
            "Secret {name} (spec.dkim.secretRef) does not exist"
        )));
    }
    let selector = sd.spec.dkim.selector.clone();
    let public = create_key_secret(sd, secrets, &name, &selector).await?;
    Ok((selector, public))
}

/// Generates a key into Secret `name` for `selector`; returns its `p=`. If the Secret appeared meanwhile
/// (another replica, an interrupted reconcile), that one is used.
async fn create_key_secret(
    sd: &SendingDomain,
    secrets: &Api<Secret>,
    name: &str,
    selector: &str,
) -> Result<String, Error> {
    let algorithm = sd.spec.dkim.algorithm;
    let key = tokio::task::spawn_blocking(move || dkim::generate(algorithm))
        .await
        .map_err(|e| Error::Invalid(e.to_string()))??;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: sd.namespace(),
            owner_references: sd.controller_owner_ref(&()).map(|o| vec![o]),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                MANAGER.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([
                (SELECTOR_ANNOTATION.to_owned(), selector.to_owned()),
                (
                    CREATED_ANNOTATION.to_owned(),
                    chrono::Utc::now().to_rfc3339(),
                ),
                (
                    "herald.dev/dkim-algorithm".to_owned(),
                    format!("{algorithm:?}").to_lowercase(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                DKIM_KEY.to_owned(),
                ByteString(key.private_pem.into_bytes()),
            ),
            (
                DKIM_PUBLIC.to_owned(),
                ByteString(key.public_b64.clone().into_bytes()),
            ),
        ])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(key.public_b64),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = secrets.get(name).await?;
            let data = s.data.unwrap_or_default();
            data.get(DKIM_PUBLIC)
                .map(|p| String::from_utf8_lossy(&p.0).into_owned())
                .ok_or_else(|| Error::Invalid(format!("Secret {name} has no {DKIM_PUBLIC} key")))
        }
        Err(e) => Err(e.into()),
    }
}

fn next_secret_name(sd: &SendingDomain) -> String {
    format!("{}-dkim-next", sd.name_any())
}

/// During a rotation, the next selector and its key: created once the active key is older than
/// `spec.dkim.rotationPeriod` (generated keys only).
async fn rotation_key(
    sd: &SendingDomain,
    secrets: &Api<Secret>,
) -> Result<Option<(String, String)>, Error> {
    let Some(period) = &sd.spec.dkim.rotation_period else {
        return Ok(None);
    };
    if sd.spec.dkim.secret_ref.is_some() {
        return Ok(None);
    }
    let period = humantime::parse_duration(period)
        .map_err(|e| Error::Invalid(format!("spec.dkim.rotationPeriod {period:?}: {e}")))?;
    let next_name = next_secret_name(sd);
    if let Some(s) = secrets.get_opt(&next_name).await? {
        let selector = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SELECTOR_ANNOTATION).cloned());
        let public = s
            .data
            .as_ref()
            .and_then(|d| d.get(DKIM_PUBLIC))
            .map(|p| String::from_utf8_lossy(&p.0).into_owned());
        return Ok(selector.zip(public));
    }
    let Some(active) = secrets.get_opt(&dkim_secret_name(sd)).await? else {
        return Ok(None);
    };
    let created = active
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CREATED_ANNOTATION))
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc));
    let Some(created) = created else {
        return Ok(None);
    };
    let age = chrono::Utc::now()
        .signed_duration_since(created)
        .to_std()
        .unwrap_or_default();
    if age < period {
        return Ok(None);
    }
    let selector = format!(
        "{}-{}",
        sd.spec.dkim.selector,
        chrono::Utc::now().format("%Y%m%d%H%M%S")
    );
    let public = create_key_secret(sd, secrets, &next_name, &selector).await?;
    Ok(Some((selector, public)))
}

/// Makes the next key the active one: its data and selector move into the active Secret (same name, so the
/// relay's mount does not change), and the next Secret goes.
async fn promote(secrets: &Api<Secret>, sd: &SendingDomain, selector: &str) -> Result<(), Error> {
    let next_name = next_secret_name(sd);
    let next = secrets.get(&next_name).await?;
    let patch = json!({
        "metadata": { "annotations": {
            SELECTOR_ANNOTATION: selector,
            CREATED_ANNOTATION: chrono::Utc::now().to_rfc3339(),
        }},
        "data": next.data,
    });
    secrets
        .patch(
            &dkim_secret_name(sd),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    secrets.delete(&next_name, &Default::default()).await?;
    Ok(())
}

async fn publish_event(
    ctx: &Context,
    sd: &SendingDomain,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &sd.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}

/// The `p=` value of a private key the user brought.
fn public_from_private(algorithm: DkimAlgorithm, pem: &[u8]) -> Result<String, Error> {
    let text = String::from_utf8_lossy(pem);
    match algorithm {
        DkimAlgorithm::Rsa2048 => {
            use rsa::pkcs1::DecodeRsaPrivateKey;
            use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
            let key = rsa::RsaPrivateKey::from_pkcs8_pem(&text)
                .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(&text))
                .map_err(|_| {
                    Error::Invalid("the DKIM Secret's key is not an RSA private key in PEM".into())
                })?;
            let der = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| Error::Invalid(e.to_string()))?;
            Ok(B64.encode(der.as_bytes()))
        }
        DkimAlgorithm::Ed25519 => {
            use ring::signature::KeyPair;
            let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            let der = B64
                .decode(body.trim())
                .map_err(|_| Error::Invalid("the DKIM Secret's key is not PEM".into()))?;
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(
                |_| Error::Invalid("the DKIM Secret's key is not an Ed25519 PKCS#8 key".into()),
            )?;
            Ok(B64.encode(pair.public_key().as_ref()))
        }
    }
}
