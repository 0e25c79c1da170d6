//! Builds and runs the controllers, with the health and metrics endpoint.
//!
//! Each kind is watched once, into one cache ([`Stores`]) that every controller reads; nothing lists or
//! caches a kind a second time.
//! - SendingDomain: the watch fills the cache, tells the relays what changed for them (`triggers`), and
//!   triggers the domain controller through a generation predicate, so the controller's own status writes
//!   do not run it again (DNS is rechecked on a timer anyway).
//! - IpPool: likewise; a spec change also renders the relays whose domains use the pool.
//! - SmtpRelay: runs on its own spec changes, its StatefulSet's and Services', and what `triggers` names,
//!   with a debounce that folds a burst of domain changes into one render. A change of its public name or
//!   of its inbound Service's addresses runs its domains' controller (`triggers::route_view`).

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller, Error as ControllerError};
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::leader::Elector;
use super::scope::Scope;
use super::triggers::{self, Changes};
use super::{Context, Recheck, Stores, domain, error_policy, listed, pool, relay};
use crate::crd::{IpPool, SendingDomain, SmtpRelay};
use crate::verify::Verifier;

/// How long a leader's lease lasts without renewal.
const LEASE: Duration = Duration::from_secs(15);
/// How long a relay waits for more changes before it renders: a thousand domains applied together render
/// once, not a thousand times.
const RELAY_DEBOUNCE: Duration = Duration::from_secs(1);
/// SendingDomain reconciles in flight at once. Each holds its API requests (an HTTP/1 connection each, which
/// the client's pool keeps afterwards) and its DNS lookups: unbounded, a thousand domains meant a thousand of
/// each at startup, and 107 MiB instead of 34 (tests/bench/operator_scale.py). 32 keeps a slow nameserver
/// from serialising the rechecks; 64 was no faster in that benchmark.
const DOMAIN_CONCURRENCY: u16 = 32;

/// Options of `herald-operator run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub nameservers: Vec<SocketAddr>,
    pub health_address: SocketAddr,
    /// Namespace of the leader-election Lease.
    pub lease_namespace: String,
    /// /healthz fails when no watch event has arrived for this long (the lease is renewed every 5 s).
    pub stale_after: Duration,
    pub recheck_pending: Duration,
    pub recheck_verified: Duration,
    /// The namespace of the operator's own pods (the downward API's `POD_NAMESPACE`): the relays'
    /// NetworkPolicy admits pods labelled `app.kubernetes.io/name: herald-operator` there to their admin
    /// port. None outside a cluster: no pod is admitted.
    pub operator_namespace: Option<String>,
    /// The namespaces whose resources the operator reconciles; empty: every namespace.
    pub watch_namespaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to the Kubernetes API: {0}")]
    Client(#[from] kube::Error),
    #[error(transparent)]
    Verifier(#[from] crate::verify::VerifierError),
    #[error("health endpoint {0}: {1}")]
    Health(SocketAddr, std::io::Error),
    #[error("lost the leader lease; stopping so that only the new leader reconciles")]
    LostLeadership,
}

/// The watch of one kind over the scope, filling its cache and setting `listed` once the cache holds the
/// first full listing (`managedFields` dropped, see `Scope::watch`).
fn watch<K>(
    scope: &Scope,
    client: &Client,
    writer: Writer<K>,
    listed: tokio::sync::watch::Sender<bool>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    scope
        .watch(client, watcher::Config::default())
        .reflect(writer)
        // After `reflect`: the cache has swapped in the listing by the time the flag is seen.
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                listed.send_replace(true);
            }
        })
}

pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let scope = Scope::new(&opts.watch_namespaces);
    let (domains, domain_writer) = reflector::store::<SendingDomain>();
    let (relays, relay_writer) = reflector::store::<SmtpRelay>();
    let (pools, pool_writer) = reflector::store::<IpPool>();
    let (domains_listed, domains_listed_rx) = listed();
    let (relays_listed, relays_listed_rx) = listed();
    let (pools_listed, pools_listed_rx) = listed();
    let ctx = Context::new(
        client.clone(),
        Verifier::new(&opts.nameservers)?,
        Stores::new(
            (domains, domains_listed_rx),
            (relays, relays_listed_rx),
            (pools, pools_listed_rx),
        ),
        Recheck {
            pending: opts.recheck_pending,
            verified: opts.recheck_verified,
        },
        opts.operator_namespace
            .clone()
            .map(|namespace| crate::network::OperatorPods { namespace }),
    );
    let listener = tokio::net::TcpListener::bind(opts.health_address)
        .await
        .map_err(|e| RunError::Health(opts.health_address, e))?;
    tokio::spawn(serve_health(
        listener,
        ctx.clone(),
        opts.stale_after.as_secs() as i64,
    ));
    tokio::spawn(watch_heartbeat(
        client.clone(),
        opts.lease_namespace.clone(),
        ctx.clone(),
    ));
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "herald-operator-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        )
    });
    let elector = Elector::new(
        client.clone(),
        &opts.lease_namespace,
        "herald-operator",
        identity,
        LEASE,
    );
    tracing::info!(health = %opts.health_address, identity = elector.identity(), scope = ?scope, "herald-operator waiting for the leader lease");
    elector.acquire().await;
    tracing::info!(
        identity = elector.identity(),
        "herald-operator is the leader; starting the controllers"
    );

    let (relay_tx, relay_rx) = futures::channel::mpsc::unbounded();
    let (domain_tx, domain_rx) = futures::channel::mpsc::unbounded();
    let mut domain_changes = Changes::new(triggers::domain_view);
    let (events_ctx, to_relays) = (ctx.clone(), relay_tx.clone());
    let domain_stream = watch::<SendingDomain>(&scope, &client, domain_writer, domains_listed)
        .inspect_ok(move |event| {
            let changes = domain_changes.observe(event);
            for r in triggers::relays_of(&changes) {
                // Err only when the relay controller has stopped: the operator is shutting down.
                let _ = to_relays.unbounded_send(r);
            }
            for d in triggers::gone(&changes) {
                events_ctx
                    .metrics
                    .forget_domain(d.namespace.as_deref().unwrap_or_default(), &d.name);
            }
        })
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default());
    let domains = Controller::for_stream(domain_stream, ctx.stores.domains.clone())
        .reconcile_on(domain_rx)
        .with_config(controller::Config::default().concurrency(DOMAIN_CONCURRENCY))
        .shutdown_on_signal()
        .run(domain::reconcile, error_policy, ctx.clone())
        .for_each(|r| {
            match r {
                // A reconcile already queued for a domain deleted meanwhile (a requeue) finds it gone; its
                // series went with the delete event, and goes again here in case that reconcile had
                // written it back.
                Err(ControllerError::ObjectNotFound(obj)) => {
                    ctx.metrics
                        .forget_domain(obj.namespace.as_deref().unwrap_or_default(), &obj.name);
                }
                Err(e) => tracing::debug!(error = %e, "SendingDomain controller event"),
                Ok(_) => {}
            }
            futures::future::ready(())
        });
    let mut relay_changes = Changes::new(triggers::route_view);
    let stores = ctx.stores.clone();
    let relay_stream = watch::<SmtpRelay>(&scope, &client, relay_writer, relays_listed)
        .inspect_ok(move |event| {
            // A new public name or load-balancer address changes the domains' MX records and
            // ReturnPathRoutable now, not at their next DNS recheck.
            for c in relay_changes.observe(event) {
                let ns = c.object.namespace.as_deref().unwrap_or_default();
                for d in stores.domains_of(ns, &c.object.name) {
                    let _ = domain_tx.unbounded_send(ObjectRef::from_obj(d.as_ref()));
                }
            }
        })
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default());
    // The Secrets relays are made from, by metadata only (their contents are read when a relay renders):
    // a changed one renders the relays that name it now, not at their resync. The operator's own Secrets
    // (configs, tokens, DKIM keys) are not among them.
    let stores = ctx.stores.clone();
    let to_relays = relay_tx.clone();
    let secret_changes = scope
        .watch::<PartialObjectMeta<Secret>>(
            &client,
            watcher::Config::default().labels("app.kubernetes.io/managed-by!=herald-operator"),
        )
        // Errors are the watch's own (it backs off and goes on, and says so at warn). Deletions are left to
        // the resync: a namespace being torn down deletes every Secret in it, and reconciling its relays
        // then only meets "namespace is being terminated".
        .for_each(move |event| {
            if let Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) = event {
                let ns = secret.metadata.namespace.as_deref().unwrap_or_default();
                let name = secret.metadata.name.as_deref().unwrap_or_default();
                for r in stores.relays_using_secret(ns, name) {
                    // Err only when the relay controller has stopped: the operator is shutting down.
                    let _ = to_relays.unbounded_send(r);
                }
            }
            futures::future::ready(())
        });
    let relays = Controller::for_stream(relay_stream, ctx.stores.relays.clone())
        // Only the operator's StatefulSets: their ready replicas go into the relay's status.
        .owns_stream(
            scope
                .watch::<StatefulSet>(
                    &client,
                    watcher::Config::default()
                        .labels("app.kubernetes.io/managed-by=herald-operator"),
                )
                .touched_objects(),
        )
        // And its Services: the inbound one's load-balancer addresses go into the status too.
        .owns_stream(
            scope
                .watch::<Service>(
                    &client,
                    watcher::Config::default()
                        .labels("app.kubernetes.io/managed-by=herald-operator"),
                )
                .touched_objects(),
        )
        .reconcile_on(relay_rx)
        .with_config(controller::Config::default().debounce(RELAY_DEBOUNCE))
        .shutdown_on_signal()
        .run(relay::reconcile, error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "SmtpRelay controller event");
            }
            futures::future::ready(())
        });
    let mut pool_changes = Changes::new(triggers::pool_view);
    let stores = ctx.stores.clone();
    let pool_stream = watch::<IpPool>(&scope, &client, pool_writer, pools_listed)
        .inspect_ok(move |event| {
            for c in pool_changes.observe(event) {
                let ns = c.object.namespace.as_deref().unwrap_or_default();
                for r in stores.relays_using_pool(ns, &c.object.name) {
                    let _ = relay_tx.unbounded_send(r);
                }
            }
        })
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default());
    let pools = Controller::for_stream(pool_stream, ctx.stores.pools.clone())
        .shutdown_on_signal()
        .run(pool::reconcile, error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "IpPool controller event");
            }
            futures::future::ready(())
        });
    let controllers = async {
        tokio::join!(domains, relays, pools, secret_changes);
    };
    tokio::select! {
        _ = controllers => {}
        _ = elector.hold() => return Err(RunError::LostLeadership),
    }
    tracing::info!("herald-operator stopped");
    Ok(())
}

/// Liveness from a watch, not from a request: the leader renews the Lease every few seconds, so every
/// replica's watch on it sees an event that often. When watches stall (the failure that leaves
/// controllers silently idle), these events stop and /healthz fails, and Kubernetes restarts the pod.
async fn watch_heartbeat(client: Client, namespace: String, ctx: Arc<Context>) {
    let api = Api::<Lease>::namespaced(client, &namespace);
    let config = watcher::Config::default().fields("metadata.name=herald-operator");
    // Backed off like the other watches: without it, an unreachable API server made this loop retry as
    // fast as connections were refused, an error line and a busy CPU each time round.
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => ctx.touch(),
            Err(e) => tracing::debug!(error = %e, "lease watch error; the watcher retries"),
        }
    }
}

async fn serve_health(listener: tokio::net::TcpListener, ctx: Arc<Context>, stale_after: i64) {
    use axum::routing::get;
    let c1 = ctx.clone();
    let c2 = ctx.clone();
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let ctx = c1.clone();
                async move {
                    let age =
                        chrono::Utc::now().timestamp() - ctx.last_activity.load(Ordering::Relaxed);
                    if age > stale_after {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            format!("no API activity for {age} s\n"),
                        )
                    } else {
                        (axum::http::StatusCode::OK, "ok\n".to_owned())
                    }
                }
            }),
        )
        .route("/readyz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let ctx = c2.clone();
                async move { ctx.metrics.render() }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "health endpoint failed");
    }
}
