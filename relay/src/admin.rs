//! The admin HTTP endpoint: probes for Kubernetes, the queue and the suppression list.
//!
//! `/healthz` answers while the process runs; `/readyz` only once the spool is loaded and the listeners are
//! bound, and no longer once the relay is draining, so a Service stops sending it new sessions first.
//!
//! Queue: `GET /queue`, `GET|DELETE /queue/{id}`, `POST /queue/{id}/flush`, `POST /queue/flush`.
//! Suppressions: `GET /suppressions`, `PUT|DELETE /suppressions/{address}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

use crate::outcome::suppression::{Entry, Suppressions};
use crate::queue::{MessageView, QueueHandle};
use crate::spool::QueueId;

/// What the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    pub ready: AtomicBool,
    pub queue: QueueHandle,
    pub suppressions: Arc<Suppressions>,
    pub metrics: Arc<crate::metrics::Metrics>,
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
    messages: Vec<MessageView>,
}

#[derive(Deserialize, Default)]
struct SuppressBody {
    reason: Option<String>,
}

fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/queue", get(queue_list))
        .route("/queue/flush", post(flush_all))
        .route("/queue/{id}", get(queue_get).delete(queue_delete))
        .route("/queue/{id}/flush", post(flush_one))
        .route("/suppressions", get(suppressions))
        .route(
            "/suppressions/{address}",
            axum::routing::put(suppress).delete(unsuppress),
        )
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn parse_id(id: &str) -> Result<QueueId, String> {
    id.parse()
        .map_err(|_| format!("{id:?} is not a queue id (16 hex digits)"))
}

async fn metrics_text(
    State(s): State<Arc<AdminState>>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<Arc<AdminState>>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn queue_list(
    State(s): State<Arc<AdminState>>,
    Query(p): Query<ListParams>,
) -> Json<QueueListing> {
    // A listing is built in memory whole: page by default, so a huge queue cannot balloon the relay.
    let (total, messages) = s.queue.list(p.limit.unwrap_or(1000)).await;
    Json(QueueListing { total, messages })
}

async fn queue_get(State(s): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(i) => i,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match s.queue.get(id).await {
        Some(m) => Json(m).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no queued message {id}")),
    }
}

async fn queue_delete(State(s): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(i) => i,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    if s.queue.delete(id).await {
        Json(json!({ "deleted": id.to_string() })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no queued message {id}"))
    }
}

async fn flush_one(State(s): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(i) => i,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    if s.queue.flush(Some(id)).await {
        Json(json!({ "flushed": id.to_string() })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no queued message {id}"))
    }
}

async fn flush_all(State(s): State<Arc<AdminState>>) -> Response {
    s.queue.flush(None).await;
    Json(json!({ "flushed": "all" })).into_response()
}

async fn suppressions(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let list: Vec<Entry> = s.suppressions.list();
    Json(json!({ "suppressions": list }))
}

async fn suppress(
    State(s): State<Arc<AdminState>>,
    Path(address): Path<String>,
    body: Option<Json<SuppressBody>>,
) -> Response {
    if !address.contains('@') {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{address:?} is not an email address"),
        );
    }
    let reason = body
        .and_then(|Json(b)| b.reason)
        .unwrap_or_else(|| "added through the admin API".to_owned());
    let list = s.suppressions.clone();
    let addr = address.clone();
    match tokio::task::spawn_blocking(move || list.add(&addr, &reason)).await {
        Ok(Ok(())) => Json(json!({ "suppressed": address })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn unsuppress(State(s): State<Arc<AdminState>>, Path(address): Path<String>) -> Response {
    let list = s.suppressions.clone();
    let addr = address.clone();
    match tokio::task::spawn_blocking(move || list.remove(&addr)).await {
        Ok(Ok(true)) => Json(json!({ "removed": address })).into_response(),
        Ok(Ok(false)) => error(
            StatusCode::NOT_FOUND,
            format!("{address} is not suppressed"),
        ),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
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
