//! Builds and runs the controllers, with the health and metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::controller::{Controller, Error as ControllerError};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client, ResourceExt};

use super::leader::Elector;
use super::{Context, domain, error_policy, pool, relay};
use crate::crd::{IpPool, SendingDomain, SmtpRelay};
use crate::verify::Verifier;

/// How long a leader's lease lasts without renewal.
const LEASE: Duration = Duration::from_secs(15);

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

pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let ctx = Context::new(
        client.clone(),
        Verifier::new(&opts.nameservers)?,
        opts.recheck_pending,
        opts.recheck_verified,
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
    tracing::info!(health = %opts.health_address, identity = elector.identity(), "herald-operator waiting for the leader lease");
    elector.acquire().await;
    tracing::info!(
        identity = elector.identity(),
        "herald-operator is the leader; starting the controllers"
    );

    let domains = Controller::new(
        Api::<SendingDomain>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(domain::reconcile, error_policy, ctx.clone())
    .for_each(|r| {
        match r {
            // Every SendingDomain is requeued (the DNS recheck), so a deleted one comes back here as not
            // found within one recheck period: that is when its verification series goes.
            Err(ControllerError::ObjectNotFound(obj)) => {
                ctx.metrics
                    .forget_domain(obj.namespace.as_deref().unwrap_or_default(), &obj.name);
            }
            Err(e) => tracing::debug!(error = %e, "SendingDomain controller event"),
            Ok(_) => {}
        }
        futures::future::ready(())
    });
    let relays = Controller::new(
        Api::<SmtpRelay>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<SendingDomain>::all(client.clone()),
        watcher::Config::default(),
        |sd| {
            let ns = sd.namespace()?;
            Some(ObjectRef::<SmtpRelay>::new(&sd.spec.relay_ref.name).within(&ns))
        },
    )
    .shutdown_on_signal()
    .run(relay::reconcile, error_policy, ctx.clone())
    .for_each(|r| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "SmtpRelay controller event");
        }
        futures::future::ready(())
    });
    let pools = Controller::new(
        Api::<IpPool>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(pool::reconcile, error_policy, ctx.clone())
    .for_each(|r| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "IpPool controller event");
        }
        futures::future::ready(())
    });
    let controllers = async {
        tokio::join!(domains, relays, pools);
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
    let mut stream = std::pin::pin!(watcher(api, config));
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
