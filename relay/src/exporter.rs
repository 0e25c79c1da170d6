//! The metrics endpoint: `/metrics` for Prometheus and the Kubernetes probes, and nothing else.
//!
//! It is a socket of its own, apart from the admin API, because the two have different audiences: the
//! monitoring namespace may scrape every relay, but only an operator may delete mail.
//!
//! `/healthz` answers while the process runs; `/readyz` only once the spool is loaded and the listeners are
//! bound, and no longer once the relay is draining, so a Service stops sending it new sessions first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoint reads.
#[derive(Debug)]
pub struct ExporterState {
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    /// The memory budget of message bodies in transit, read at each scrape.
    pub inbound: Arc<herald_smtp::budget::Budget>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("metrics: cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

fn router(state: Arc<ExporterState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn metrics_text(
    State(s): State<Arc<ExporterState>>,
) -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            s.metrics.inbound_bytes.set(s.inbound.used() as i64);
            s.metrics.render()
        },
    )
}

async fn readyz(State(s): State<Arc<ExporterState>>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds the metrics address.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, ExporterError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| ExporterError::Bind { address, source })
}

/// Serves until the process exits: the probes must keep answering (503) while the relay drains.
pub async fn serve(listener: TcpListener, state: Arc<ExporterState>) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        tracing::error!(error = %e, "metrics server failed");
    }
}
