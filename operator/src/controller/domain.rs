//! SendingDomain: a DKIM key in a Secret, the DNS records to publish, and whether DNS serves them.
//!
//! - **Fetch**: the DKIM key Secret (generated when the domain brings none) and, during a rotation, the next
//!   key's; the relay and the IpPool from the shared caches. The records those make ([`wanted_records`])
//!   are checked in DNS and, when the spec asks, written as an external-dns DNSEndpoint.
//! - **Decide**: [`decide`] turns what was read and observed into the status, the selector to promote and
//!   the events to publish, without I/O.
//! - **Apply**: promote the next key, patch the status when it changed, publish the events.
//!
//! A generated Secret holds each key under its own selector's names (`<selector>.pem`, `<selector>.pub`),
//! and a key is never written under another selector's names: a promotion adds the next key beside the
//! current one and only then does the status name the new selector, which is what the relay's config and
//! StatefulSet follow (`layout::SigningKey`). So no relay ever signs with a key under a selector that is
//! not its own, at any step of a rotation, whatever order the pods see the changes in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Conditions, Context, Error, MANAGER, Recheck, chrono_time, patch_status};
use crate::crd::{
    DkimAlgorithm, DnsRecord, IpPool, RecordState, SendingDomain, SendingDomainStatus, SmtpRelay,
};
use crate::layout::{DKIM_KEY, DKIM_PUBLIC, dkim_private_key, dkim_public_key, dkim_secret_name};
use crate::records::{self, Inputs};
use crate::{dkim, inbound};

/// Annotations on a generated DKIM Secret: its selector and when it started signing.
const SELECTOR_ANNOTATION: &str = "herald.dev/dkim-selector";
const CREATED_ANNOTATION: &str = "herald.dev/dkim-created";

pub async fn reconcile(sd: Arc<SendingDomain>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.reconciling(sd.as_ref(), reconcile_domain(&sd, &ctx))
        .await
}

async fn reconcile_domain(sd: &SendingDomain, ctx: &Context) -> Result<Action, Error> {
    let ns = sd
        .namespace()
        .ok_or_else(|| Error::Invalid("SendingDomain without a namespace".into()))?;
    ctx.stores.ready().await?;
    let now = Timestamp::now();
    let name = sd.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);

    // Fetch.
    let key = dkim_key(sd, &secrets, now).await.map_err(|e| e.to_string());
    let next = match &key {
        Ok(_) => rotation_key(sd, &secrets, now).await?,
        Err(_) => None,
    };
    let relay = ctx.stores.relay(&ns, &sd.spec.relay_ref.name);
    let pool = sd
        .spec
        .ip_pool_ref
        .as_ref()
        .and_then(|r| ctx.stores.pool(&ns, &r.name));
    let route = inbound::route(&sd.spec.relay_ref.name, relay.as_deref());
    let wanted = wanted_records(
        sd,
        &key,
        next.as_ref(),
        relay.as_deref(),
        pool.as_deref(),
        &route,
    );
    let mut records = Vec::with_capacity(wanted.len());
    for r in &wanted {
        records.push(ctx.dns.check(r).await);
    }
    let external_dns = if sd.spec.publish_with_external_dns {
        Some(match dns_endpoint(sd, &ns, &records) {
            Ok(endpoint) => apply_dns_endpoint(ctx, &ns, &endpoint).await,
            Err(why) => Err(why),
        })
    } else {
        None
    };

    // Decide.
    let observed = Observed {
        key,
        next,
        records,
        external_dns,
        route,
    };
    let decision = decide(sd, observed, ctx.recheck, now);

    // Apply.
    if let Some(p) = &decision.promote {
        promote(&secrets, sd, p, now).await?;
        publish_event(ctx, sd, &p.note).await;
    }
    ctx.metrics
        .set_domain_verified(&ns, &name, decision.verified);
    if sd.status.as_ref() != Some(&decision.status) {
        let api: Api<SendingDomain> = Api::namespaced(ctx.client.clone(), &ns);
        patch_status(&api, &name, &decision.status).await?;
        if let Some(note) = &decision.transition {
            publish_event(ctx, sd, note).await;
        }
    }
    Ok(Action::requeue(decision.requeue))
}

/// A DKIM key as the records need it: its selector and public key (`p=`).
#[derive(Debug, Clone, PartialEq)]
pub struct DkimKey {
    pub selector: String,
    pub public: String,
}

/// What the status of a SendingDomain is decided from.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The key that signs now, or why there is none.
    pub key: Result<DkimKey, String>,
    /// During a rotation: the next key, published before it signs.
    pub next: Option<DkimKey>,
    /// The [`wanted_records`] as DNS served them.
    pub records: Vec<DnsRecord>,
    /// When the spec asks for a DNSEndpoint: whether it was written, or why not.
    pub external_dns: Option<Result<(), String>>,
    /// Whether bounces can reach the relay (`ReturnPathRoutable`), and the MX target the records name.
    pub route: inbound::Route,
}

/// An event to publish on the SendingDomain.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub type_: EventType,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// The next key verified in DNS: it signs from now on.
#[derive(Debug, Clone, PartialEq)]
pub struct Promotion {
    pub selector: String,
    /// The selector that signed until now; its key stays in the Secret until the next rotation.
    pub previous: String,
    pub note: Note,
}

/// What to write for a SendingDomain.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: SendingDomainStatus,
    /// Every record is served: the value of `herald_operator_sending_domain_verified`.
    pub verified: bool,
    pub promote: Option<Promotion>,
    /// The event for DnsVerified turning true or false; published once the status saying so is written.
    pub transition: Option<Note>,
    pub requeue: Duration,
}

/// The records to publish for a domain whose key is `key`; none while there is no key. The return-path MX
/// names `route`'s host: the relay's public name, or the placeholder that says to set one.
pub fn wanted_records(
    sd: &SendingDomain,
    key: &Result<DkimKey, String>,
    next: Option<&DkimKey>,
    relay: Option<&SmtpRelay>,
    pool: Option<&IpPool>,
    route: &inbound::Route,
) -> Vec<DnsRecord> {
    let Ok(key) = key else {
        return Vec::new();
    };
    let pool_addresses: Vec<String> = pool
        .map(|p| p.spec.addresses.iter().map(|a| a.address.clone()).collect())
        .unwrap_or_default();
    let spf_include = relay
        .and_then(|r| r.spec.delivery.smarthost.as_ref())
        .and_then(|s| s.spf_include.as_deref());
    records::desired(
        &sd.spec,
        &Inputs {
            selector: &key.selector,
            dkim_public_b64: &key.public,
            next: next.map(|n| (n.selector.as_str(), n.public.as_str())),
            spf_include,
            pool_addresses: &pool_addresses,
            inbound_host: &route.mx_host,
            host_records: &route.host_records,
        },
    )
}

/// The status, promotion and events that follow from what was observed. `previous` conditions keep their
/// transition times; `now` is the time of any transition.
pub fn decide(
    sd: &SendingDomain,
    observed: Observed,
    recheck: Recheck,
    now: Timestamp,
) -> Decision {
    let previous = sd.status.clone().unwrap_or_default();
    let generation = sd.metadata.generation;
    let conditions = Conditions::new(&previous.conditions, generation, now);
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        conditions.set(type_, ok, reason, message)
    };
    let mut conditions = Vec::new();
    let key = match observed.key {
        Ok(k) => {
            conditions.push(cond(
                "DkimKeyReady",
                true,
                "KeyReady",
                format!("DKIM key in Secret {}", dkim_secret_name(sd)),
            ));
            Some(k)
        }
        Err(e) => {
            conditions.push(cond("DkimKeyReady", false, "KeyUnavailable", e));
            None
        }
    };
    let records = observed.records;
    // The next key signs only once receivers can find it: promote it when its record verifies.
    let promote = match (&key, &observed.next) {
        (Some(current), Some(next)) => {
            let next_name = format!("{}._domainkey.{}", next.selector, sd.spec.domain);
            records
                .iter()
                .any(|r| r.name == next_name && r.state == RecordState::Published)
                .then(|| Promotion {
                    selector: next.selector.clone(),
                    previous: current.selector.clone(),
                    note: Note {
                        type_: EventType::Normal,
                        reason: "DkimKeyRotated",
                        action: "RotateDkimKey",
                        note: format!(
                            "selector {} verified in DNS and now signs; keep {}'s record until mail signed with it has been delivered",
                            next.selector, current.selector
                        ),
                    },
                })
        }
        _ => None,
    };
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
    let verified = key.is_some() && missing.is_empty();
    let dns_message = if key.is_none() {
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
    conditions.push(cond("DnsVerified", verified, reason, dns_message));
    if let Some(published) = observed.external_dns {
        let (ok, reason, message) = match published {
            Ok(()) => (
                true,
                "Published",
                format!(
                    "DNSEndpoint {} holds {} records",
                    dns_endpoint_name(sd),
                    records.iter().filter(|r| !is_placeholder(r)).count()
                ),
            ),
            Err(m) => (false, "NotPublished", m),
        };
        conditions.push(cond("ExternalDnsPublished", ok, reason, message));
    }
    let route = observed.route;
    conditions.push(cond(
        "ReturnPathRoutable",
        route.routable,
        route.reason,
        route.message,
    ));
    // Ready stays "the domain can send": mail leaves whether or not its late bounces can come back, which
    // ReturnPathRoutable says on its own.
    let ready = verified;
    conditions.push(cond(
        "Ready",
        ready,
        if ready { "Ready" } else { "NotReady" },
        if ready {
            "the domain can send".into()
        } else {
            "see DkimKeyReady and DnsVerified".into()
        },
    ));
    let active_selector = match (&promote, &key) {
        (Some(p), _) => Some(p.selector.clone()),
        (None, Some(k)) => Some(k.selector.clone()),
        (None, None) => None,
    };
    let status = SendingDomainStatus {
        records,
        conditions,
        observed_generation: generation,
        active_selector,
    };
    let was_verified = previous
        .conditions
        .iter()
        .any(|c| c.type_ == "DnsVerified" && c.status == "True");
    let transition = (status != previous && was_verified != verified).then(|| {
        if verified {
            Note {
                type_: EventType::Normal,
                reason: "DnsVerified",
                action: "VerifyDns",
                note: "all DNS records are published".into(),
            }
        } else {
            Note {
                type_: EventType::Warning,
                reason: "DnsNotVerified",
                action: "VerifyDns",
                note: "some DNS records are missing or differ; see status.records".into(),
            }
        }
    });
    Decision {
        status,
        verified,
        promote,
        transition,
        requeue: if verified {
            recheck.verified
        } else {
            recheck.pending
        },
    }
}

/// A record that names the placeholder MX target (the MX, and an SPF `a:` of it): shown in status, never
/// written to a zone.
fn is_placeholder(r: &DnsRecord) -> bool {
    r.value.contains(inbound::PLACEHOLDER_HOST)
}

fn dns_endpoint_name(sd: &SendingDomain) -> String {
    format!("{}-records", sd.name_any())
}

/// The records as an external-dns DNSEndpoint, so external-dns publishes them; an error while there are
/// none yet.
pub fn dns_endpoint(
    sd: &SendingDomain,
    namespace: &str,
    records: &[DnsRecord],
) -> Result<serde_json::Value, String> {
    if records.is_empty() {
        return Err("no records yet (waiting for the DKIM key)".into());
    }
    let endpoints: Vec<serde_json::Value> = records
        .iter()
        // A placeholder is an instruction to a person, not a record for a zone.
        .filter(|r| !is_placeholder(r))
        .map(|r| {
            let target = match r.record_type.as_str() {
                "TXT" => records::unquoted(&r.value),
                "CNAME" => r.value.trim_end_matches('.').to_owned(),
                _ => r.value.clone(),
            };
            json!({ "dnsName": r.name, "recordType": r.record_type, "targets": [target], "recordTTL": 300 })
        })
        .collect();
    Ok(json!({
        "apiVersion": "externaldns.k8s.io/v1alpha1",
        "kind": "DNSEndpoint",
        "metadata": {
            "name": dns_endpoint_name(sd),
            "namespace": namespace,
            "ownerReferences": sd.controller_owner_ref(&()).map(|o| vec![o]),
        },
        "spec": { "endpoints": endpoints },
    }))
}

/// Writes the DNSEndpoint; the error says what to do when the CRD is missing.
async fn apply_dns_endpoint(
    ctx: &Context,
    namespace: &str,
    endpoint: &serde_json::Value,
) -> Result<(), String> {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let gvk = GroupVersionKind::gvk("externaldns.k8s.io", "v1alpha1", "DNSEndpoint");
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &ApiResource::from_gvk(&gvk));
    let name = endpoint["metadata"]["name"].as_str().unwrap_or_default();
    match api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(endpoint)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            Err("the DNSEndpoint CRD (externaldns.k8s.io) is not installed; publish the records by hand".into())
        }
        Err(e) => Err(format!("cannot write the DNSEndpoint: {e}")),
    }
}

/// The active selector and its DKIM public key (`p=`), creating the key Secret when the domain does not
/// bring its own.
async fn dkim_key(
    sd: &SendingDomain,
    secrets: &Api<Secret>,
    now: Timestamp,
) -> Result<DkimKey, Error> {
    let name = dkim_secret_name(sd);
    let secret = secrets.get_opt(&name).await?;
    if sd.spec.dkim.secret_ref.is_some() {
        let Some(s) = secret else {
            return Err(Error::Invalid(format!(
                "Secret {name} (spec.dkim.secretRef) does not exist"
            )));
        };
        let Some(private) = s.data.as_ref().and_then(|d| d.get(DKIM_KEY)) else {
            return Err(Error::Invalid(format!(
                "Secret {name} has no {DKIM_KEY} key"
            )));
        };
        return Ok(DkimKey {
            selector: sd.spec.dkim.selector.clone(),
            public: public_from_private(sd.spec.dkim.algorithm, &private.0)?,
        });
    }
    let Some(s) = secret else {
        let selector = sd.spec.dkim.selector.clone();
        let public = create_key_secret(sd, secrets, &name, &selector, now).await?;
        return Ok(DkimKey { selector, public });
    };
    let selector = secret_selector(&s).unwrap_or_else(|| sd.spec.dkim.selector.clone());
    let Some(stored) = stored_key(&s, &selector) else {
        return Err(Error::Invalid(format!(
            "Secret {name} has no key for selector {selector} ({} or {DKIM_KEY})",
            dkim_private_key(&selector)
        )));
    };
    let public = match &stored.public {
        Some(p) => p.clone(),
        None => public_from_private(sd.spec.dkim.algorithm, &stored.private.0)?,
    };
    if stored.legacy {
        // Written before keys were stored per selector: the key joins the Secret under its selector's
        // names, which the relay's StatefulSet reads from now on (the old names stay until a rotation).
        let patch = json!({ "data": {
            dkim_private_key(&selector): stored.private,
            dkim_public_key(&selector): ByteString(public.clone().into_bytes()),
        }});
        secrets
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(DkimKey { selector, public })
}

/// The selector a generated DKIM Secret says its key is for.
fn secret_selector(s: &Secret) -> Option<String> {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SELECTOR_ANNOTATION).cloned())
}

/// One selector's key as a generated Secret holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKey {
    pub private: ByteString,
    /// The `p=` value, when the Secret holds it.
    pub public: Option<String>,
    /// Found under the names of before keys were stored per selector (`private.key`, `public.b64`).
    pub legacy: bool,
}

/// The key of `selector` in a generated Secret: under its own names, or, in a Secret written before keys
/// were stored per selector, under the one pair of names those had, which belongs to the selector the
/// Secret's annotation names (the old code wrote both in one patch). Never another selector's key.
pub fn stored_key(s: &Secret, selector: &str) -> Option<StoredKey> {
    let data = s.data.as_ref()?;
    let text = |v: &ByteString| String::from_utf8_lossy(&v.0).into_owned();
    if let Some(private) = data.get(&dkim_private_key(selector)) {
        return Some(StoredKey {
            private: private.clone(),
            public: data.get(&dkim_public_key(selector)).map(text),
            legacy: false,
        });
    }
    if secret_selector(s).as_deref() != Some(selector) {
        return None;
    }
    data.get(DKIM_KEY).map(|private| StoredKey {
        private: private.clone(),
        public: data.get(DKIM_PUBLIC).map(text),
        legacy: true,
    })
}

/// Generates a key into Secret `name` for `selector`; returns its `p=`. If the Secret appeared meanwhile
/// (another replica, an interrupted reconcile), that one is used.
async fn create_key_secret(
    sd: &SendingDomain,
    secrets: &Api<Secret>,
    name: &str,
    selector: &str,
    now: Timestamp,
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
                (CREATED_ANNOTATION.to_owned(), chrono_time(now).to_rfc3339()),
                (
                    "herald.dev/dkim-algorithm".to_owned(),
                    format!("{algorithm:?}").to_lowercase(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                dkim_private_key(selector),
                ByteString(key.private_pem.into_bytes()),
            ),
            (
                dkim_public_key(selector),
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
            let public = stored_key(&s, selector).and_then(|k| k.public);
            public.ok_or_else(|| {
                Error::Invalid(format!("Secret {name} has no public key for {selector}"))
            })
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
    now: Timestamp,
) -> Result<Option<DkimKey>, Error> {
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
        let Some(selector) = secret_selector(&s) else {
            return Ok(None);
        };
        let public = stored_key(&s, &selector).and_then(|k| k.public);
        return Ok(public.map(|public| DkimKey { selector, public }));
    }
    let Some(active) = secrets.get_opt(&dkim_secret_name(sd)).await? else {
        return Ok(None);
    };
    let created = active
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CREATED_ANNOTATION));
    if !rotation_due(created.map(String::as_str), period, now) {
        return Ok(None);
    }
    let selector = next_selector(&sd.spec.dkim.selector, now);
    let public = create_key_secret(sd, secrets, &next_name, &selector, now).await?;
    Ok(Some(DkimKey { selector, public }))
}

/// Whether a key created at `created` (the RFC 3339 annotation) is due for rotation; never without a
/// readable creation time.
pub fn rotation_due(created: Option<&str>, period: Duration, now: Timestamp) -> bool {
    let Some(created) = created.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return false;
    };
    let age = chrono_time(now)
        .signed_duration_since(created.with_timezone(&chrono::Utc))
        .to_std()
        .unwrap_or_default();
    age >= period
}

/// The selector of the next key: the spec's, with the time it was made.
pub fn next_selector(base: &str, now: Timestamp) -> String {
    format!("{base}-{}", chrono_time(now).format("%Y%m%d%H%M%S"))
}

/// The merge patch of the active Secret that makes the next key the one that signs. The next key joins the
/// Secret under its own selector's names, next to the current key (whose pods have not rolled yet still
/// project it), every older key leaves, and the annotation names the new selector. Each key is copied under
/// the names of the selector it was made for, so no selector ever reads another's key; which selector signs
/// is then the status's `activeSelector`, written after this patch.
pub fn promotion_patch(
    active: &Secret,
    next: &Secret,
    current: &str,
    selector: &str,
    now: Timestamp,
) -> Result<serde_json::Value, Error> {
    let missing = |which: &str, s: &str| {
        Error::Invalid(format!(
            "the {which} DKIM Secret has no key for selector {s}"
        ))
    };
    let kept = stored_key(active, current).ok_or_else(|| missing("active", current))?;
    let new = stored_key(next, selector).ok_or_else(|| missing("next", selector))?;
    let mut data = serde_json::Map::new();
    for old in active.data.iter().flat_map(|d| d.keys()) {
        data.insert(old.clone(), serde_json::Value::Null);
    }
    for (s, key) in [(current, &kept), (selector, &new)] {
        data.insert(dkim_private_key(s), json!(key.private));
        match &key.public {
            Some(p) => data.insert(
                dkim_public_key(s),
                json!(ByteString(p.clone().into_bytes())),
            ),
            None => data.remove(&dkim_public_key(s)),
        };
    }
    Ok(json!({
        "metadata": { "annotations": {
            SELECTOR_ANNOTATION: selector,
            CREATED_ANNOTATION: chrono_time(now).to_rfc3339(),
        }},
        "data": data,
    }))
}

/// Makes the next key the active one (see [`promotion_patch`]); the next Secret goes. The relay follows
/// once the status names the new selector.
async fn promote(
    secrets: &Api<Secret>,
    sd: &SendingDomain,
    promotion: &Promotion,
    now: Timestamp,
) -> Result<(), Error> {
    let name = dkim_secret_name(sd);
    let next_name = next_secret_name(sd);
    let active = secrets.get(&name).await?;
    let next = secrets.get(&next_name).await?;
    let patch = promotion_patch(
        &active,
        &next,
        &promotion.previous,
        &promotion.selector,
        now,
    )?;
    secrets
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    secrets.delete(&next_name, &Default::default()).await?;
    Ok(())
}

async fn publish_event(ctx: &Context, sd: &SendingDomain, note: &Note) {
    let ev = Event {
        type_: note.type_,
        reason: note.reason.into(),
        note: Some(note.note.clone()),
        action: note.action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &sd.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}

/// The `p=` value of a private key the user brought.
pub fn public_from_private(algorithm: DkimAlgorithm, pem: &[u8]) -> Result<String, Error> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        DmarcSpec, InboundServiceSpec, InboundServiceType, InboundStatus, SmarthostSpec,
        SmtpRelayStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const RECHECK: Recheck = Recheck {
        pending: Duration::from_secs(30),
        verified: Duration::from_secs(600),
    };

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn domain() -> SendingDomain {
        let mut d = SendingDomain::new(
            "example",
            crate::crd::SendingDomainSpec {
                dmarc: Some(DmarcSpec {
                    policy: crate::crd::DmarcPolicy::Reject,
                    report_address: None,
                }),
                ..crate::fixtures::domain_spec()
            },
        );
        d.metadata.namespace = Some("mail".into());
        d.metadata.generation = Some(3);
        d.metadata.uid = Some("5678".into());
        d
    }

    fn key(selector: &str) -> DkimKey {
        DkimKey {
            selector: selector.into(),
            public: format!("KEY-{selector}"),
        }
    }

    /// The wanted records as a nameserver would serve them: `served` names the purposes it has.
    fn served(records: Vec<DnsRecord>, unserved: &[&str]) -> Vec<DnsRecord> {
        records
            .into_iter()
            .map(|mut r| {
                if unserved.iter().any(|n| r.name.starts_with(n)) {
                    r.state = RecordState::Missing;
                    r.nameserver = Some("127.0.0.1:53".into());
                } else {
                    r.state = RecordState::Published;
                }
                r
            })
            .collect()
    }

    /// The relay with a public name, behind a Service whose outside address the user routes (so no
    /// host records: DKIM, SPF, MX, DMARC).
    fn routed_relay() -> SmtpRelay {
        let mut r = crate::fixtures::relay();
        r.spec.hostname = Some("mx.example.test".into());
        r.spec.inbound_service = Some(InboundServiceSpec {
            type_: InboundServiceType::NodePort,
            annotations: Default::default(),
            load_balancer_class: None,
            external_traffic_policy: None,
        });
        r
    }

    fn observe_with(
        sd: &SendingDomain,
        relay: Option<&SmtpRelay>,
        next: Option<DkimKey>,
        unserved: &[&str],
    ) -> Observed {
        let k = Ok(key("herald1"));
        let route = inbound::route("relay", relay);
        let wanted = wanted_records(sd, &k, next.as_ref(), relay, None, &route);
        Observed {
            key: k,
            next,
            records: served(wanted, unserved),
            external_dns: None,
            route,
        }
    }

    fn observe(sd: &SendingDomain, next: Option<DkimKey>, unserved: &[&str]) -> Observed {
        observe_with(sd, Some(&routed_relay()), next, unserved)
    }

    fn cond<'a>(
        d: &'a Decision,
        type_: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        d.status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} in {:?}", d.status.conditions))
    }

    #[test]
    fn records_name_the_relay_and_its_smarthost_and_pool() {
        let sd = domain();
        let k = Ok(key("herald1"));
        let route = |r: Option<&SmtpRelay>| inbound::route("relay", r);
        let none = wanted_records(&sd, &k, None, None, None, &route(None));
        assert_eq!(none.len(), 4);
        assert_eq!(none[2].value, "10 set-smtprelay-spec-hostname.invalid.");
        let mut relay = crate::fixtures::relay();
        relay.spec.hostname = Some("mx.example.test".into());
        relay.spec.delivery.smarthost = Some(SmarthostSpec {
            host: "smtp.provider.test".into(),
            port: 587,
            tls: crate::crd::ListenerTls::Starttls,
            credentials_secret_ref: None,
            ca_secret_ref: None,
            spf_include: Some("_spf.provider.test".into()),
        });
        let pool = crate::fixtures::pool();
        let r = wanted_records(
            &sd,
            &k,
            None,
            Some(&relay),
            Some(&pool),
            &route(Some(&relay)),
        );
        assert_eq!(r[2].value, "10 mx.example.test.");
        assert_eq!(
            records::unquoted(&r[1].value),
            "v=spf1 include:_spf.provider.test ip4:192.0.2.10 -all"
        );
        assert!(
            wanted_records(&sd, &Err("no key".into()), None, None, None, &route(None)).is_empty()
        );
    }

    #[test]
    fn missing_records_leave_the_domain_pending_naming_the_nameserver() {
        let sd = domain();
        let d = decide(&sd, observe(&sd, None, &["_dmarc."]), RECHECK, at(100));
        assert!(!d.verified);
        assert_eq!(cond(&d, "DkimKeyReady").status, "True");
        let dns = cond(&d, "DnsVerified");
        assert_eq!(
            (dns.status.as_str(), dns.reason.as_str()),
            ("False", "RecordsMissing")
        );
        assert_eq!(
            dns.message,
            "not yet served: TXT _dmarc.example.test (Missing at 127.0.0.1:53)"
        );
        assert_eq!(dns.observed_generation, Some(3));
        assert_eq!(cond(&d, "Ready").status, "False");
        assert_eq!(d.status.active_selector.as_deref(), Some("herald1"));
        assert_eq!(d.requeue, RECHECK.pending);
        // Never verified before, so not verified now is no transition.
        assert_eq!(d.transition, None);
        assert_eq!(d.promote, None);
    }

    #[test]
    fn all_records_served_make_the_domain_ready_once_with_one_event() {
        let mut sd = domain();
        let pending = decide(&sd, observe(&sd, None, &["_dmarc."]), RECHECK, at(100));
        sd.status = Some(pending.status);
        let d = decide(&sd, observe(&sd, None, &[]), RECHECK, at(200));
        assert!(d.verified);
        assert_eq!(
            cond(&d, "DnsVerified").message,
            "all 4 records are published"
        );
        assert_eq!(cond(&d, "Ready").status, "True");
        assert_eq!(cond(&d, "Ready").last_transition_time, Time(at(200)));
        assert_eq!(
            cond(&d, "DkimKeyReady").last_transition_time,
            Time(at(100)),
            "an unchanged condition keeps its transition time"
        );
        assert_eq!(d.transition.as_ref().map(|n| n.reason), Some("DnsVerified"));
        assert_eq!(d.requeue, RECHECK.verified);
        // The next check finds the same: the same status (so no write) and no event.
        sd.status = Some(d.status.clone());
        let again = decide(&sd, observe(&sd, None, &[]), RECHECK, at(900));
        assert_eq!(Some(&again.status), sd.status.as_ref());
        assert_eq!(again.transition, None);
    }

    #[test]
    fn a_record_that_goes_away_is_a_warning_transition() {
        let mut sd = domain();
        sd.status = Some(decide(&sd, observe(&sd, None, &[]), RECHECK, at(100)).status);
        let d = decide(&sd, observe(&sd, None, &["bounces."]), RECHECK, at(200));
        assert!(!d.verified);
        let note = d.transition.expect("an event");
        assert_eq!(
            (note.type_, note.reason),
            (EventType::Warning, "DnsNotVerified")
        );
    }

    #[test]
    fn a_mismatch_says_what_was_served() {
        let sd = domain();
        let mut o = observe(&sd, None, &[]);
        o.records[3].state = RecordState::Mismatch;
        o.records[3].observed = Some("v=DMARC1; p=none".into());
        o.records[3].nameserver = Some("127.0.0.1:53".into());
        let d = decide(&sd, o, RECHECK, at(100));
        let dns = cond(&d, "DnsVerified");
        assert_eq!(dns.reason, "RecordsMismatch");
        assert!(
            dns.message
                .contains("(Mismatch: 127.0.0.1:53 served \"v=DMARC1; p=none\")"),
            "{}",
            dns.message
        );
    }

    #[test]
    fn without_a_key_there_are_no_records_and_the_domain_waits() {
        let sd = domain();
        let o = Observed {
            key: Err("Secret mine (spec.dkim.secretRef) does not exist".into()),
            next: None,
            records: vec![],
            external_dns: Some(Err("no records yet (waiting for the DKIM key)".into())),
            route: inbound::route("relay", None),
        };
        let d = decide(&sd, o, RECHECK, at(100));
        let k = cond(&d, "DkimKeyReady");
        assert_eq!(
            (k.status.as_str(), k.reason.as_str()),
            ("False", "KeyUnavailable")
        );
        assert!(k.message.contains("does not exist"));
        assert_eq!(cond(&d, "DnsVerified").message, "waiting for the DKIM key");
        assert_eq!(cond(&d, "ExternalDnsPublished").reason, "NotPublished");
        assert_eq!(d.status.active_selector, None);
        assert!(!d.verified);
    }

    #[test]
    fn the_next_key_is_promoted_only_once_its_record_is_served() {
        let sd = domain();
        let next = key("herald1-20260101000000");
        let d = decide(
            &sd,
            observe(&sd, Some(next.clone()), &["herald1-2026"]),
            RECHECK,
            at(100),
        );
        assert_eq!(d.promote, None);
        assert_eq!(d.status.active_selector.as_deref(), Some("herald1"));
        assert_eq!(d.status.records.len(), 5, "both keys are published");
        let d = decide(&sd, observe(&sd, Some(next), &[]), RECHECK, at(200));
        let p = d.promote.expect("promoted");
        assert_eq!(p.selector, "herald1-20260101000000");
        assert_eq!(p.note.reason, "DkimKeyRotated");
        assert!(
            p.note.note.contains("keep herald1's record"),
            "{}",
            p.note.note
        );
        assert_eq!(
            d.status.active_selector.as_deref(),
            Some("herald1-20260101000000")
        );
    }

    #[test]
    fn the_dns_endpoint_holds_every_record_unquoted_and_its_outcome_is_a_condition() {
        let mut sd = domain();
        sd.spec.publish_with_external_dns = true;
        let o = observe(&sd, None, &[]);
        let endpoint = dns_endpoint(&sd, "mail", &o.records).unwrap();
        assert_eq!(endpoint["metadata"]["name"], "example-records");
        assert_eq!(
            endpoint["metadata"]["ownerReferences"][0]["kind"],
            "SendingDomain"
        );
        let e = &endpoint["spec"]["endpoints"];
        assert_eq!(e.as_array().unwrap().len(), 4);
        assert_eq!(e[3]["targets"][0], "v=DMARC1; p=reject; adkim=r; aspf=r");
        assert_eq!(e[2]["targets"][0], "10 mx.example.test.");
        let d = decide(
            &sd,
            Observed {
                external_dns: Some(Ok(())),
                ..o
            },
            RECHECK,
            at(100),
        );
        let c = cond(&d, "ExternalDnsPublished");
        assert_eq!(c.status, "True");
        assert_eq!(c.message, "DNSEndpoint example-records holds 4 records");
    }

    /// Every record of a decision, as `type name value`.
    fn all_records(d: &Decision) -> Vec<String> {
        d.status
            .records
            .iter()
            .map(|r| format!("{} {} {}", r.record_type, r.name, r.value))
            .collect()
    }

    #[test]
    fn without_a_public_name_the_mx_is_a_placeholder_and_return_path_routable_is_false() {
        let mut sd = domain();
        sd.spec.publish_with_external_dns = true;
        let internal = crate::fixtures::relay();
        for relay in [None, Some(&internal)] {
            let o = observe_with(&sd, relay, None, &[]);
            let endpoint = dns_endpoint(&sd, "mail", &o.records).unwrap();
            let d = decide(&sd, o, RECHECK, at(100));
            let c = cond(&d, "ReturnPathRoutable");
            assert_eq!(c.status, "False");
            let records = all_records(&d);
            assert!(
                records.iter().all(|r| !r.contains("cluster.local")),
                "{records:?}"
            );
            assert!(
                records.contains(
                    &"MX bounces.example.test 10 set-smtprelay-spec-hostname.invalid.".to_owned()
                ),
                "{records:?}"
            );
            // The placeholder is an instruction, never written to a zone: DKIM and DMARC only.
            let names: Vec<&str> = endpoint["spec"]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["recordType"].as_str().unwrap())
                .collect();
            assert_eq!(names, ["TXT", "TXT"], "{endpoint}");
        }
        let d = decide(
            &sd,
            observe_with(&sd, Some(&internal), None, &[]),
            RECHECK,
            at(100),
        );
        let c = cond(&d, "ReturnPathRoutable");
        assert_eq!(c.reason, "NoPublicHostname");
        assert!(
            c.message.contains("set spec.hostname of SmtpRelay relay"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_load_balancer_address_becomes_the_mx_hosts_record_and_the_route_turns_true_once() {
        let mut sd = domain();
        let mut relay = routed_relay();
        relay.spec.inbound_service.as_mut().unwrap().type_ = InboundServiceType::LoadBalancer;
        let pending = decide(
            &sd,
            observe_with(&sd, Some(&relay), None, &[]),
            RECHECK,
            at(100),
        );
        let c = cond(&pending, "ReturnPathRoutable");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "LoadBalancerPending")
        );
        assert!(
            all_records(&pending)
                .contains(&"MX bounces.example.test 10 mx.example.test.".to_owned())
        );
        sd.status = Some(pending.status);
        relay.status = Some(SmtpRelayStatus {
            inbound: Some(InboundStatus {
                service: "relay-inbound".into(),
                addresses: vec!["192.0.2.25".into()],
                hostnames: vec![],
            }),
            ..SmtpRelayStatus::default()
        });
        let d = decide(
            &sd,
            observe_with(&sd, Some(&relay), None, &[]),
            RECHECK,
            at(200),
        );
        let c = cond(&d, "ReturnPathRoutable");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "LoadBalancerReady")
        );
        assert_eq!(c.last_transition_time, Time(at(200)));
        assert!(
            all_records(&d).contains(&"A mx.example.test 192.0.2.25".to_owned()),
            "{:?}",
            all_records(&d)
        );
        assert!(d.verified, "the A record is checked like the others");
        // The same again: no transition, the same status (no write).
        sd.status = Some(d.status.clone());
        let again = decide(
            &sd,
            observe_with(&sd, Some(&relay), None, &[]),
            RECHECK,
            at(300),
        );
        assert_eq!(Some(&again.status), sd.status.as_ref());
    }

    #[test]
    fn a_key_is_rotated_once_it_is_older_than_the_period() {
        let day = Duration::from_secs(86400);
        let created = "2026-01-01T00:00:00+00:00";
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        assert!(!rotation_due(
            Some(created),
            90 * day,
            t("2026-03-31T23:59:59Z")
        ));
        assert!(rotation_due(
            Some(created),
            90 * day,
            t("2026-04-01T00:00:00Z")
        ));
        assert!(!rotation_due(None, day, t("2030-01-01T00:00:00Z")));
        assert!(!rotation_due(
            Some("yesterday"),
            day,
            t("2030-01-01T00:00:00Z")
        ));
        assert_eq!(
            next_selector("herald1", t("2026-04-01T12:30:05Z")),
            "herald1-20260401123005"
        );
    }

    #[test]
    fn a_brought_key_gives_the_public_key_it_was_generated_with() {
        let k = dkim::generate(DkimAlgorithm::Ed25519).unwrap();
        assert_eq!(
            public_from_private(DkimAlgorithm::Ed25519, k.private_pem.as_bytes()).unwrap(),
            k.public_b64
        );
        assert!(public_from_private(DkimAlgorithm::Rsa2048, k.private_pem.as_bytes()).is_err());
        assert!(public_from_private(DkimAlgorithm::Ed25519, b"not a key").is_err());
    }

    fn generated(selector: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([(
                    SELECTOR_ANNOTATION.to_owned(),
                    selector.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn b64(v: &str) -> serde_json::Value {
        json!(B64.encode(v))
    }

    #[test]
    fn a_stored_key_is_found_only_under_its_own_selector_or_the_legacy_names_of_its_annotation() {
        let s = generated(
            "s1",
            &[("s1.pem", "K1"), ("s1.pub", "P1"), ("s0.pem", "K0")],
        );
        let k = stored_key(&s, "s1").unwrap();
        assert_eq!(
            (k.private.0.as_slice(), k.public.as_deref(), k.legacy),
            (&b"K1"[..], Some("P1"), false)
        );
        assert_eq!(stored_key(&s, "s0").unwrap().public, None);
        assert_eq!(stored_key(&s, "s2"), None);
        // Before keys were stored per selector: private.key belongs to the annotation's selector only.
        let legacy = generated("s1", &[("private.key", "K1"), ("public.b64", "P1")]);
        let k = stored_key(&legacy, "s1").unwrap();
        assert_eq!(
            (k.private.0.as_slice(), k.public.as_deref(), k.legacy),
            (&b"K1"[..], Some("P1"), true)
        );
        assert_eq!(
            stored_key(&legacy, "s2"),
            None,
            "never another selector's key"
        );
    }

    #[test]
    fn a_promotion_copies_each_key_under_its_own_selector_and_drops_older_ones() {
        let active = generated(
            "s1",
            &[
                ("s0.pem", "K0"),
                ("s0.pub", "P0"),
                ("s1.pem", "K1"),
                ("s1.pub", "P1"),
            ],
        );
        let next = generated("s2", &[("s2.pem", "K2"), ("s2.pub", "P2")]);
        let patch = promotion_patch(&active, &next, "s1", "s2", at(86400)).unwrap();
        assert_eq!(patch["metadata"]["annotations"][SELECTOR_ANNOTATION], "s2");
        assert_eq!(
            patch["metadata"]["annotations"][CREATED_ANNOTATION],
            "1970-01-02T00:00:00+00:00"
        );
        let data = patch["data"].as_object().unwrap();
        let expected = json!({
            "s0.pem": null, "s0.pub": null,
            "s1.pem": b64("K1"), "s1.pub": b64("P1"),
            "s2.pem": b64("K2"), "s2.pub": b64("P2"),
        });
        assert_eq!(&json!(data), &expected);
        // A Secret of before keys were stored per selector: its key moves to its selector's names.
        let legacy = generated("s1", &[("private.key", "K1"), ("public.b64", "P1")]);
        let patch = promotion_patch(&legacy, &next, "s1", "s2", at(0)).unwrap();
        assert_eq!(
            patch["data"],
            json!({
                "private.key": null, "public.b64": null,
                "s1.pem": b64("K1"), "s1.pub": b64("P1"),
                "s2.pem": b64("K2"), "s2.pub": b64("P2"),
            })
        );
        // A next Secret without its selector's key is refused rather than promoted.
        let wrong = generated("s2", &[("s3.pem", "K3")]);
        assert!(promotion_patch(&active, &wrong, "s1", "s2", at(0)).is_err());
    }

    #[tokio::test]
    async fn a_failed_read_of_a_key_secret_never_generates_a_key() {
        use super::super::stub::{self, secret, status};
        let mut sd = domain();
        sd.spec.dkim.algorithm = DkimAlgorithm::Ed25519;
        sd.spec.dkim.rotation_period = Some("1s".into());
        let s = stub::secrets(|_, _| (503, status(503, "ServiceUnavailable")));
        assert!(dkim_key(&sd, &s.api, at(0)).await.is_err());
        assert!(rotation_key(&sd, &s.api, at(0)).await.is_err());
        assert!(s.writes().is_empty(), "{:?}", s.writes());
        // Absent (a 404): the key is generated and created, under its selector's name.
        let s = stub::secrets(|method, _| {
            if method == http::Method::GET {
                (404, status(404, "NotFound"))
            } else {
                (201, secret("example-dkim", &[]))
            }
        });
        let key = dkim_key(&sd, &s.api, at(0)).await.unwrap();
        assert_eq!(key.selector, "herald1");
        assert_eq!(
            s.writes(),
            ["POST /api/v1/namespaces/mail/secrets"],
            "{:?}",
            s.requests()
        );
    }
}
