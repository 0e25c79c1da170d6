//! Wires the stages into a running relay: spool, queue, listeners, admin; and the signals that stop it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::policy::Policy;
use crate::queue::{Queue, Queued};
use crate::server::{self, ConnectionLimits, Shared, tls::TlsStore};
use crate::spool::Spool;

/// How long sessions in flight may take to finish after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("TLS: {0}")]
    Tls(#[from] server::tls::TlsError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error("startup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Runs the relay until SIGTERM or SIGINT, then drains.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), RunError> {
    let spool_dir = config.spool_dir.clone();
    let (spool, loaded) = tokio::task::spawn_blocking(move || Spool::open(&spool_dir)).await??;
    let queue = Arc::new(Queue::new());
    let loaded_count = loaded.len();
    for l in loaded {
        queue.insert(Queued {
            meta: l.meta,
            location: l.location,
        });
    }
    tracing::info!(spool = %config.spool_dir.display(), messages = loaded_count, bytes = spool.bytes(), "spool loaded");

    let tls = match &config.tls {
        Some(files) => {
            let files = files.clone();
            Some(Arc::new(
                tokio::task::spawn_blocking(move || TlsStore::load(&files)).await??,
            ))
        }
        None => None,
    };
    if let Some(t) = &tls {
        tokio::spawn(t.clone().watch());
    }
    let shared = Shared {
        policy: Arc::new(Policy::from_config(&config)),
        tls,
        spool,
        queue: queue.clone(),
        limits: ConnectionLimits::new(
            config.limits.max_connections,
            config.limits.max_connections_per_client,
        ),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = Arc::new(AdminState {
        ready: false.into(),
        queue,
    });
    if let Some(a) = &config.admin {
        let listener = admin::bind(a.address).await?;
        tracing::info!(address = %a.address, "admin listening");
        tokio::spawn(admin::serve(listener, state.clone()));
    }
    let listeners = server::bind(&config, &shared).await?;
    for (tcp, ctx) in listeners {
        tracing::info!(listener = %ctx.session.listener, address = %tcp.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "listening");
        tokio::spawn(server::serve(tcp, ctx, stop_rx.clone()));
    }
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(config = %config_path.as_ref().map_or_else(|| "(embedded default)".into(), |p| p.display().to_string()), "herald-relay ready");

    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Some(t) = &shared.tls {
                    match t.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                        Err(e) => tracing::warn!(error = %e, "SIGHUP: TLS reload failed; keeping the previous certificate"),
                    }
                }
            }
        }
    }
    tracing::info!("stopping: no new sessions; finishing the ones in flight");
    state.ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    while shared.limits.active() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = shared.limits.active();
    if left > 0 {
        tracing::warn!(
            sessions = left,
            "drain grace period over; closing remaining sessions"
        );
    }
    tracing::info!("stopped");
    Ok(())
}
