//! The controllers: one reconciler per kind, sharing a [`Context`].
//!
//! `reconcile(obj, ctx) -> Result<Action, Error>` applies the desired objects with server-side apply (one
//! field manager) and patches status only when it changed, so status writes never re-trigger work.
//! `error_policy` backs off per object, exponentially and capped, which kube does not do by itself.

pub mod domain;
pub mod leader;
pub mod pool;
pub mod relay;
pub mod run;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

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
}

/// What the reconcilers share.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub dns: Verifier,
    pub metrics: Metrics,
    failures: Mutex<HashMap<String, u32>>,
    /// Unix seconds of the last watch event on the leader Lease, for the liveness probe. Only the watch
    /// sets it: reconciles run from requeue timers even when every watch has stalled.
    pub last_activity: AtomicI64,
    /// How soon DNS is checked again while records are missing, and once they all verify.
    pub recheck_pending: Duration,
    pub recheck_verified: Duration,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("dns", &self.dns)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        dns: Verifier,
        recheck_pending: Duration,
        recheck_verified: Duration,
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
            failures: Mutex::new(HashMap::new()),
            last_activity: AtomicI64::new(chrono::Utc::now().timestamp()),
            recheck_pending,
            recheck_verified,
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

/// The error policy shared by the controllers.
pub fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource,
    K::DynamicType: Default,
{
    let delay = ctx.backoff(obj.as_ref());
    tracing::warn!(object = %Context::key(obj.as_ref()), error = %error, retry_in = ?delay, "reconcile failed");
    ctx.metrics
        .failures
        .with_label_values(&[&K::kind(&K::DynamicType::default())])
        .inc();
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

/// A condition per the API conventions. `lastTransitionTime` is kept from `previous` when the status did
/// not change, so re-writing the same conditions is a no-op.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}
