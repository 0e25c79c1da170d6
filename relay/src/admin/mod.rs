//! The admin API: the queue and the suppression list, for operators and `herald-relay admin`.
//!
//! Queue: `GET /queue?limit=&after=`, `GET|DELETE /queue/{id}`, `POST /queue/{id}/flush`,
//! `POST /queue/flush`. Suppressions: `GET /suppressions?limit=&after=`, `GET /suppressions/streaks?limit=&after=`
//! (mailbox-full streaks), `GET|PUT|DELETE /suppressions/{address}`.
//! Lists come a page at a time (at most [`MAX_PAGE`] entries) with a `next` cursor, so a million queued
//! recipients cost one page of memory, not a copy of the queue.
//!
//! With `admin.token_file` set every request needs `Authorization: Bearer <token>`: whoever reaches this
//! socket can delete mail. The token is read from the file on each request (a rotated Secret applies at
//! once) and compared in constant time.

pub mod client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::fleet::Counters;
use crate::outcome::suppression::Suppressions;
use crate::queue::{MessageView, QueueHandle};
use crate::spool::QueueId;

/// The longest page a list request returns.
pub const MAX_PAGE: usize = 1000;
/// The page length when a request names none.
pub const DEFAULT_PAGE: usize = 100;

/// What the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    pub queue: QueueHandle,
    pub suppressions: Arc<Suppressions>,
    pub counters: Arc<Counters>,
    /// Source addresses and their warm-up, for `GET /shaping`.
    pub deliverer: Arc<crate::deliver::Deliverer>,
    pub token_file: Option<PathBuf>,
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
    after: Option<String>,
}

impl ListParams {
    fn limit(&self) -> Result<usize, String> {
        match self.limit {
            None => Ok(DEFAULT_PAGE),
            Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            Some(n) => Err(format!("limit {n} is out of range 1..={MAX_PAGE}")),
        }
    }
}

/// One page of the queue; `next` is the cursor of the following page (absent on the last one).
#[derive(Serialize)]
struct QueuePage {
    total: usize,
    messages: Vec<MessageView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// The body of `PUT /suppressions/{address}`, all optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SuppressBody {
    reason: Option<String>,
    /// How long the suppression lasts (`30d`, `12h`), or `never` (the default).
    ttl: Option<herald_config::Ttl>,
    /// When it ends (RFC 3339), as `GET /suppressions` shows it: a list restored from an export keeps
    /// its expiry. Not with `ttl`.
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/queue", get(queue_list))
        .route("/queue/flush", post(flush_all))
        .route("/queue/{id}", get(queue_get).delete(queue_delete))
        .route("/queue/{id}/flush", post(flush_one))
        .route("/suppressions", get(suppressions))
        .route("/suppressions/streaks", get(streaks))
        .route("/counters", get(counters))
        .route("/shaping", get(shaping))
        .route(
            "/suppressions/{address}",
            get(lookup).put(suppress).delete(unsuppress),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Lets a request through only with the bearer token of `token_file`, when one is configured.
async fn authorize(State(s): State<Arc<AdminState>>, request: Request, next: Next) -> Response {
    let Some(path) = &s.token_file else {
        return next.run(request).await;
    };
    let expected = match tokio::fs::read_to_string(path).await {
        Ok(t) if !t.trim().is_empty() => t,
        Ok(_) => {
            tracing::error!(file = %path.display(), "admin token file is empty; refusing every request");
            return error(StatusCode::SERVICE_UNAVAILABLE, "admin token is not set");
        }
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot read the admin token file; refusing every request");
            return error(StatusCode::SERVICE_UNAVAILABLE, "admin token is unreadable");
        }
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token_matches(presented, expected.trim()) {
        next.run(request).await
    } else {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs Authorization: Bearer <admin token>",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"herald-admin\""),
        );
        response
    }
}

/// Compares digests rather than the tokens, so neither the content nor the length of the token shows in
/// how long a refusal takes.
fn token_matches(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.trim().as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    !presented.trim().is_empty() && bool::from(a.as_slice().ct_eq(b.as_slice()))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn parse_id(id: &str) -> Result<QueueId, String> {
    id.parse()
        .map_err(|_| format!("{id:?} is not a queue id (16 hex digits)"))
}

async fn queue_list(State(s): State<Arc<AdminState>>, Query(p): Query<ListParams>) -> Response {
    let limit = match p.limit() {
        Ok(n) => n,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let after = match p.after.as_deref().map(parse_id).transpose() {
        Ok(a) => a,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (total, messages) = s.queue.list(after, limit).await;
    let next = (messages.len() == limit)
        .then(|| messages.last().map(|m| m.id.clone()))
        .flatten();
    Json(QueuePage {
        total,
        messages,
        next,
    })
    .into_response()
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

async fn suppressions(State(s): State<Arc<AdminState>>, Query(p): Query<ListParams>) -> Response {
    let limit = match p.limit() {
        Ok(n) => n,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (page, next) = s.suppressions.page(p.after.as_deref(), limit);
    page_response("suppressions", json!(page), next)
}

/// The current mailbox-full streaks, a page at a time in address order.
async fn streaks(State(s): State<Arc<AdminState>>, Query(p): Query<ListParams>) -> Response {
    let limit = match p.limit() {
        Ok(n) => n,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (page, next) = s.suppressions.streaks(p.after.as_deref(), limit);
    page_response("streaks", json!(page), next)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DayParams {
    day: Option<u64>,
}

/// One day's counters (default today, in days of `shaping.day_length` since 1970-01-01 UTC): with a store the fleet's, and this
/// relay's increments of the last second not yet sent; without one (or while it is away) this relay's.
async fn counters(State(s): State<Arc<AdminState>>, Query(p): Query<DayParams>) -> Response {
    let day = p.day.unwrap_or_else(|| s.counters.today());
    Json(s.counters.read(day).await).into_response()
}

/// Where traffic shaping stands: each source address with its weight, its warm-up day and today's cap,
/// what it sent today (the fleet's count with a store), and `full_until` when it has used up today's cap;
/// the limits of each provider that has some (`limits`) and of the others (`default_limits`); and per
/// provider and source this relay sent to lately (`providers`) the limits in force, its open connections,
/// and any suspension or halving with the reply that brought it.
async fn shaping(State(s): State<Arc<AdminState>>) -> Response {
    let today = s.counters.today();
    // Brings the fleet's counts up to date before they are shown.
    s.counters.read(today).await;
    let full: std::collections::HashMap<std::net::IpAddr, u64> =
        s.queue.full_sources().await.into_iter().collect();
    let sources: Vec<serde_json::Value> = s
        .deliverer
        .sources()
        .into_iter()
        .map(|v| {
            let mut o = json!(v);
            if let Some(until) = full.get(&v.address) {
                o["full_until"] = json!(crate::queue::rfc3339_ms(*until));
            }
            o
        })
        .collect();
    let (limits, default_limits, providers) = s.deliverer.providers();
    Json(json!({
        "day": today,
        "day_length_seconds": s.counters.day_length().as_secs(),
        "sources": sources,
        "limits": limits,
        "default_limits": default_limits,
        "providers": providers,
    }))
    .into_response()
}

/// `{"<field>": [...], "next": "<cursor>"}`, `next` only when there is more.
fn page_response(field: &str, page: serde_json::Value, next: Option<String>) -> Response {
    let mut body = json!({ field: page });
    if let Some(n) = next {
        body["next"] = json!(n);
    }
    Json(body).into_response()
}

/// One address: its suppression in force and its mailbox-full streak, each `null` when there is none.
async fn lookup(State(s): State<Arc<AdminState>>, Path(address): Path<String>) -> Response {
    Json(json!({
        "address": address,
        "suppression": s.suppressions.get(&address),
        "streak": s.suppressions.streak(&address),
    }))
    .into_response()
}

async fn suppress(
    State(s): State<Arc<AdminState>>,
    Path(address): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if !address.contains('@') {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{address:?} is not an email address"),
        );
    }
    // Read whatever the content type says: `curl -d '{...}'` sends JSON labelled as a form.
    let body: SuppressBody = if body.iter().all(u8::is_ascii_whitespace) {
        SuppressBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "body: {e} (expected {{\"reason\": \"...\", \"ttl\": \"30d\" or \"never\"}})"
                    ),
                );
            }
        }
    };
    if body.ttl == Some(herald_config::Ttl::After(std::time::Duration::ZERO)) {
        return error(StatusCode::BAD_REQUEST, "ttl: must be greater than 0");
    }
    let reason = body
        .reason
        .unwrap_or_else(|| "added through the admin API".to_owned());
    let until = match (body.ttl, body.expires_at) {
        (Some(_), Some(_)) => {
            return error(StatusCode::BAD_REQUEST, "give ttl or expires_at, not both");
        }
        (_, Some(t)) => Some(t),
        (Some(ttl), None) => ttl
            .duration()
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .and_then(|d| chrono::Utc::now().checked_add_signed(d)),
        (None, None) => None,
    };
    let list = s.suppressions.clone();
    let addr = address.clone();
    match tokio::task::spawn_blocking(move || list.add_manual(&addr, &reason, until)).await {
        Ok(Ok(entry)) => Json(json!({ "suppressed": address, "entry": entry })).into_response(),
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

/// Serves until the process exits.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        tracing::error!(error = %e, "admin server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(token_matches("s3cret\n", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3cret2", "s3cret"));
        assert!(!token_matches("", ""));
    }
}
