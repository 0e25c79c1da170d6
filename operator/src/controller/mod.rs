//! The controllers: one reconciler per kind, sharing a [`Context`].
//!
//! Each reconciler has the same three steps: **fetch** what it needs (from the shared caches in [`Stores`]
//! when the operator watches that kind, from the API or DNS otherwise), **decide** with a pure function from
//! what was read (and `now`) to the desired objects and status, and **apply**: server-side apply with one
//! field manager, and a status patch only when the status changed, so status writes never re-trigger work.
//! The decide functions are where the behaviour is, and what the unit tests exercise.
//!
//! `error_policy` backs off per object, exponentially and capped, which kube does not do by itself.
//!
//! # Layout
//! - `domain`, `relay`, `pool`: the reconciler of each kind.
//! - `triggers`: which SmtpRelay a SendingDomain event re-renders, and which domains went away.
//! - `leader`: the leader-election Lease.
//! - `scope`: the namespaces served (all, or those named) and one watch over them per kind.
//! - `run`: the watches, the shared caches and the controllers built on them.

pub mod domain;
pub mod leader;
pub mod pool;
pub mod relay;
pub mod run;
pub mod scope;
#[cfg(test)]
mod stub;
pub mod triggers;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::crd::{IpPool, SendingDomain, SmtpRelay};
use crate::metrics::Metrics;
use crate::verify::Verifier;

/// The field manager of every apply.
pub const MANAGER: &str = "herald-operator";

/// Errors a reconcile can end in; each becomes a backoff and a log line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Render(#[from] crate::render::RenderError),
    #[error("DKIM key: {0}")]
    Dkim(#[from] crate::dkim::DkimError),
    #[error("{0}")]
    Invalid(String),
    #[error("serializing: {0}")]
    Serialize(String),
    #[error("the {0} cache stopped before it was filled; the operator is shutting down")]
    CacheGone(&'static str),
}

/// The operator's caches of its own kinds, one per kind, filled by the watches in `run` and read by every
/// controller that needs them: a reconcile reads its relay, domains and pools here instead of asking the
/// API server, and nothing is cached twice.
#[derive(Clone)]
pub struct Stores {
    pub domains: Store<SendingDomain>,
    pub relays: Store<SmtpRelay>,
    pub pools: Store<IpPool>,
    /// Per cache, whether it holds its first full listing; set by the watch that fills it ([`listed`]).
    listed: [(&'static str, watch::Receiver<bool>); 3],
}

/// A cache's "first listing complete" flag: the watch sets it, reconciles wait for it.
///
/// Not kube's `Store::wait_until_ready`: that wakes only the last of several tasks waiting at once (one
/// waker slot), and kube's controller already waits on each store, so reconciles waiting there too hung
/// for ever whenever they started before a cache was filled.
pub fn listed() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("domains", &self.domains.len())
            .field("relays", &self.relays.len())
            .field("pools", &self.pools.len())
            .finish()
    }
}

impl Stores {
    /// The caches, with the flags their watches set once each holds its first full listing.
    pub fn new(
        domains: (Store<SendingDomain>, watch::Receiver<bool>),
        relays: (Store<SmtpRelay>, watch::Receiver<bool>),
        pools: (Store<IpPool>, watch::Receiver<bool>),
    ) -> Stores {
        Stores {
            domains: domains.0,
            relays: relays.0,
            pools: pools.0,
            listed: [
                ("SendingDomain", domains.1),
                ("SmtpRelay", relays.1),
                ("IpPool", pools.1),
            ],
        }
    }

    /// Waits until every cache holds its first full listing, so a reconcile never decides from a cache that
    /// is still filling (a relay rendered from half its domains would roll its pods twice).
    pub async fn ready(&self) -> Result<(), Error> {
        for (kind, flag) in &self.listed {
            flag.clone()
                .wait_for(|listed| *listed)
                .await
                .map_err(|_| Error::CacheGone(kind))?;
        }
        Ok(())
    }

    pub fn relay(&self, namespace: &str, name: &str) -> Option<Arc<SmtpRelay>> {
        self.relays.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn pool(&self, namespace: &str, name: &str) -> Option<Arc<IpPool>> {
        self.pools.get(&ObjectRef::new(name).within(namespace))
    }

    /// The SendingDomains that name relay `name` in `namespace`, by name (the order a LIST returns, so a
    /// rendered config does not change with the cache's hash order).
    pub fn domains_of(&self, namespace: &str, name: &str) -> Vec<Arc<SendingDomain>> {
        let mut out: Vec<Arc<SendingDomain>> = self
            .domains
            .state()
            .into_iter()
            .filter(|d| {
                d.metadata.namespace.as_deref() == Some(namespace) && d.spec.relay_ref.name == name
            })
            .collect();
        out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        out
    }

    /// The relays in `namespace` made from Secret `name` (see [`triggers::secret_names`]).
    pub fn relays_using_secret(&self, namespace: &str, name: &str) -> Vec<ObjectRef<SmtpRelay>> {
        self.relays
            .state()
            .into_iter()
            .filter(|r| {
                r.metadata.namespace.as_deref() == Some(namespace)
                    && triggers::secret_names(r).contains(&name)
            })
            .map(|r| ObjectRef::from_obj(r.as_ref()))
            .collect()
    }

    /// The relays in `namespace` with a domain that sends from pool `name`.
    pub fn relays_using_pool(&self, namespace: &str, name: &str) -> Vec<ObjectRef<SmtpRelay>> {
        let mut out: Vec<ObjectRef<SmtpRelay>> = Vec::new();
        for d in self.domains.state() {
            if d.metadata.namespace.as_deref() == Some(namespace)
                && d.spec.ip_pool_ref.as_ref().is_some_and(|p| p.name == name)
            {
                let r = ObjectRef::new(&d.spec.relay_ref.name).within(namespace);
                if !out.contains(&r) {
                    out.push(r);
                }
            }
        }
        out
    }

    /// The IpPools in `namespace`, by name.
    pub fn pools_in(&self, namespace: &str) -> Vec<Arc<IpPool>> {
        let mut out: Vec<Arc<IpPool>> = self
            .pools
            .state()
            .into_iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
            .collect();
        out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        out
    }
}

/// How soon DNS is checked again while records are missing, and once they all verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recheck {
    pub pending: Duration,
    pub verified: Duration,
}

/// What the reconcilers share.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub dns: Verifier,
    pub metrics: Metrics,
    pub stores: Stores,
    failures: Mutex<HashMap<String, u32>>,
    /// Unix seconds of the last watch event on the leader Lease, for the liveness probe. Only the watch
    /// sets it: reconciles run from requeue timers even when every watch has stalled.
    pub last_activity: AtomicI64,
    pub recheck: Recheck,
    /// Where this operator's pods run, for the relays' NetworkPolicy (their admin port admits them).
    pub operator_pods: Option<crate::network::OperatorPods>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("dns", &self.dns)
            .field("stores", &self.stores)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        dns: Verifier,
        stores: Stores,
        recheck: Recheck,
        operator_pods: Option<crate::network::OperatorPods>,
    ) -> Arc<Context> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Arc::new(Context {
            client,
            recorder,
            dns,
            metrics: Metrics::new(),
            stores,
            failures: Mutex::new(HashMap::new()),
            last_activity: AtomicI64::new(chrono::Utc::now().timestamp()),
            recheck,
            operator_pods,
        })
    }

    /// A watch event arrived.
    pub fn touch(&self) {
        self.last_activity
            .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    }

    fn key<K: Resource>(obj: &K) -> String
    where
        K::DynamicType: Default,
    {
        format!(
            "{}/{}/{}",
            K::kind(&K::DynamicType::default()),
            obj.namespace().unwrap_or_default(),
            obj.name_any()
        )
    }

    /// Runs one reconcile of `obj` under the reconcile metrics: counted when it starts, timed however it
    /// ends, counted as an error when it returns one; a success clears the object's backoff.
    pub async fn reconciling<K>(
        &self,
        obj: &K,
        reconcile: impl Future<Output = Result<Action, Error>>,
    ) -> Result<Action, Error>
    where
        K: Resource,
        K::DynamicType: Default,
    {
        let guard = self
            .metrics
            .reconcile_started(&K::kind(&K::DynamicType::default()));
        let result = reconcile.await;
        if result.is_ok() {
            self.succeeded(obj);
        }
        guard.finish(result)
    }

    /// Clears an object's failure count after a successful reconcile.
    pub fn succeeded<K: Resource>(&self, obj: &K)
    where
        K::DynamicType: Default,
    {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&Self::key(obj));
    }

    /// The next retry delay for an object that failed: 5 s doubling, capped at 5 minutes.
    pub fn backoff<K: Resource>(&self, obj: &K) -> Duration
    where
        K::DynamicType: Default,
    {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(Self::key(obj)).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 5u64.saturating_mul(1 << (*n - 1).min(10));
        Duration::from_secs(secs.min(300))
    }
}

/// The error policy shared by the controllers. The error itself was counted by [`Context::reconciling`].
pub fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource,
    K::DynamicType: Default,
{
    let delay = ctx.backoff(obj.as_ref());
    tracing::warn!(object = %Context::key(obj.as_ref()), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Server-side apply of a desired object with the operator's field manager.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    Ok(api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Server-side apply of an object's status with the operator's field manager; the same for every kind.
pub async fn patch_status<K>(api: &Api<K>, name: &str, status: &impl Serialize) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        })),
    )
    .await?;
    Ok(())
}

/// The conditions of one status write: each keeps its `lastTransitionTime` while its status is unchanged.
#[derive(Debug)]
pub struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Timestamp,
}

impl<'a> Conditions<'a> {
    pub fn new(previous: &'a [Condition], generation: Option<i64>, now: Timestamp) -> Self {
        Conditions {
            previous,
            generation,
            now,
        }
    }

    pub fn set(&self, type_: &str, ok: bool, reason: &str, message: String) -> Condition {
        condition(
            self.previous,
            type_,
            ok,
            reason,
            message,
            self.generation,
            self.now,
        )
    }
}

/// A condition per the API conventions. `lastTransitionTime` is kept from `previous` when the status did
/// not change, so re-writing the same conditions is a no-op; `now` is the time of a transition.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// `now` as chrono time, for the annotations and dates that are kept in that form.
pub fn chrono_time(now: Timestamp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(now.as_second(), now.subsec_nanosecond().unsigned_abs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_600).unwrap();
        let first = condition(&[], "Ready", false, "NotReady", "m".into(), Some(1), t0);
        assert_eq!(first.last_transition_time, Time(t0));
        let same = condition(
            std::slice::from_ref(&first),
            "Ready",
            false,
            "NotReady",
            "m2".into(),
            Some(2),
            t1,
        );
        assert_eq!(
            same.last_transition_time,
            Time(t0),
            "same status: no transition"
        );
        assert_eq!(same.observed_generation, Some(2));
        let flipped = condition(&[first], "Ready", true, "Ready", "m".into(), Some(2), t1);
        assert_eq!(flipped.last_transition_time, Time(t1));
        assert_eq!(chrono_time(t1).timestamp(), 1_700_000_600);
    }

    #[test]
    fn a_relays_domains_come_from_the_cache_in_name_order() {
        use kube::runtime::{reflector, watcher};
        let (domains, mut writer) = reflector::store::<SendingDomain>();
        for (ns, name, relay) in [
            ("mail", "b", "relay"),
            ("mail", "c", "other"),
            ("mail", "a", "relay"),
            ("elsewhere", "d", "relay"),
        ] {
            let mut d = SendingDomain::new(name, crate::fixtures::domain_spec());
            d.metadata.namespace = Some(ns.into());
            d.spec.relay_ref.name = relay.into();
            d.spec.ip_pool_ref = (name == "a").then(|| crate::crd::LocalRef { name: "p1".into() });
            writer.apply_watcher_event(&watcher::Event::Apply(d));
        }
        let (pools, mut pool_writer) = reflector::store::<IpPool>();
        for (ns, name) in [("mail", "p2"), ("mail", "p1"), ("elsewhere", "p3")] {
            let mut p = IpPool::new(
                name,
                crate::crd::IpPoolSpec {
                    addresses: vec![],
                    warmup: vec![],
                    warmup_preset: None,
                },
            );
            p.metadata.namespace = Some(ns.into());
            pool_writer.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let stores = Stores::new(
            (domains, listed().1),
            (reflector::store::<SmtpRelay>().0, listed().1),
            (pools, listed().1),
        );
        let names = |v: Vec<Arc<SendingDomain>>| -> Vec<String> {
            v.iter().map(|d| d.name_any()).collect()
        };
        assert_eq!(names(stores.domains_of("mail", "relay")), ["a", "b"]);
        assert_eq!(names(stores.domains_of("elsewhere", "relay")), ["d"]);
        let pools: Vec<String> = stores
            .pools_in("mail")
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(pools, ["p1", "p2"]);
        assert!(stores.pool("mail", "p1").is_some() && stores.pool("mail", "p3").is_none());
        assert!(stores.relay("mail", "relay").is_none());
        assert_eq!(
            stores.relays_using_pool("mail", "p1"),
            [ObjectRef::new("relay").within("mail")]
        );
        assert!(stores.relays_using_pool("mail", "p2").is_empty());
    }

    #[tokio::test]
    async fn every_reconcile_waiting_for_the_caches_goes_on_once_they_are_listed() {
        use kube::runtime::reflector;
        let ((d, d_rx), (r, r_rx), (p, p_rx)) = (listed(), listed(), listed());
        let stores = Stores::new(
            (reflector::store::<SendingDomain>().0, d_rx),
            (reflector::store::<SmtpRelay>().0, r_rx),
            (reflector::store::<IpPool>().0, p_rx),
        );
        // As many waiters as the domain controller runs at once, all waiting before the caches fill.
        let waiting: Vec<_> = (0..40)
            .map(|_| {
                let s = stores.clone();
                tokio::spawn(async move { s.ready().await })
            })
            .collect();
        tokio::task::yield_now().await;
        for tx in [&d, &r, &p] {
            tx.send_replace(true);
        }
        for w in waiting {
            let done = tokio::time::timeout(Duration::from_secs(5), w).await;
            assert!(matches!(done, Ok(Ok(Ok(())))), "a waiter was left behind");
        }
        // A cache whose watch went away is an error, not a wait for ever.
        let gone = Stores::new(
            (reflector::store::<SendingDomain>().0, listed().1),
            (reflector::store::<SmtpRelay>().0, listed().1),
            (reflector::store::<IpPool>().0, listed().1),
        );
        assert!(matches!(
            gone.ready().await,
            Err(Error::CacheGone("SendingDomain"))
        ));
    }
}
