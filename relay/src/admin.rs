//! The admin HTTP endpoint: probes for Kubernetes and the queue listing.
//!
//! `/healthz` answers while the process runs; `/readyz` only once the spool is loaded and the listeners are
//! bound, and no longer once the relay is draining, so a Service stops sending it new sessions first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::queue::{Listing, Queue};

/// What the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    pub ready: AtomicBool,
    pub queue: Arc<Queue>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin: cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
struct ListParams {
    limit: Option<usize>,
}

#[derive(Serialize)]
struct QueueListing {
    total: usize,
    messages: Vec<Listing>,
}

fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/queue", get(queue))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<AdminState>>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn queue(
    State(s): State<Arc<AdminState>>,
    Query(p): Query<ListParams>,
) -> Json<QueueListing> {
    let limit = p.limit.unwrap_or(100_000);
    Json(QueueListing {
        total: s.queue.len(),
        messages: s.queue.list(limit),
    })
}

/// Binds the admin address.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AdminError::Bind { address, source })
}

/// Serves until the process exits: the probes must keep answering (503) while the relay drains.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        tracing::error!(error = %e, "admin server failed");
    }
}
