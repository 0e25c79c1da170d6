//! Wires the stages into a running relay: spool, queue, listeners, admin; and the signals that stop it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::deliver;
use crate::dkim::Signers;
use crate::events;
use crate::outcome::suppression::Suppressions;
use crate::outcome::verp::{self, ReturnPaths};
use crate::outcome::{Classifier, classify};
use crate::policy::Policy;
use crate::server::{self, ConnectionLimits, Shared, tls::TlsStore};
use crate::spool::Spool;
use herald_config::Config;

/// How often the config file is checked for a change (a ConfigMap update replaces it in place).
const CONFIG_POLL: Duration = Duration::from_secs(5);

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
    #[error(transparent)]
    Suppressions(#[from] crate::outcome::suppression::SuppressionError),
    #[error(transparent)]
    Deliver(#[from] deliver::DeliverError),
    #[error(transparent)]
    Events(#[from] events::EventsError),
    #[error("DKIM: {0}")]
    Dkim(#[from] crate::dkim::DkimError),
    #[error(transparent)]
    ReturnPaths(#[from] verp::VerpError),
    #[error(transparent)]
    Classify(#[from] classify::ClassifyError),
    #[error("startup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Runs the relay until SIGTERM or SIGINT, then drains.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), RunError> {
    let spool_dir = config.spool_dir.clone();
    let (spool, loaded) = tokio::task::spawn_blocking(move || Spool::open(&spool_dir)).await??;
    let spool_dir = config.spool_dir.clone();
    let suppressions =
        Arc::new(tokio::task::spawn_blocking(move || Suppressions::open(&spool_dir)).await??);
    tracing::info!(
        spool = %config.spool_dir.display(),
        messages = loaded.len(),
        bytes = spool.bytes(),
        suppressions = suppressions.len(),
        "spool loaded"
    );
    let events = events::start(config.events.as_ref()).await?;
    // Before the queue starts: it routes the spooled messages by the return-path domains.
    let return_paths = {
        let c = config.clone();
        tokio::task::spawn_blocking(move || load_bounces(&c)).await??
    };
    let queue = deliver::start_queue(&config, spool.clone(), suppressions.clone(), loaded)?;

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
    let signers = {
        let c = config.clone();
        Arc::new(tokio::task::spawn_blocking(move || Signers::load(&c)).await??)
    };
    let shared = Shared {
        signers,
        policy: Arc::new(Policy::new(&config, return_paths)),
        tls,
        spool: spool.clone(),
        queue: queue.clone(),
        suppressions: suppressions.clone(),
        limits: ConnectionLimits::new(
            config.limits.max_connections,
            config.limits.max_connections_per_client,
        ),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = Arc::new(AdminState {
        ready: false.into(),
        queue: queue.clone(),
        suppressions,
    });
    if let Some(a) = &config.admin {
        let listener = admin::bind(a.address).await?;
        tracing::info!(address = %a.address, "admin listening");
        tokio::spawn(admin::serve(listener, state.clone()));
    }
    let listeners = server::bind(&config, &shared).await?;
    let mut contexts = Vec::new();
    for (tcp, ctx) in listeners {
        let address = tcp
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        tracing::info!(listener = %ctx.name, %address, "listening");
        contexts.push(ctx.clone());
        tokio::spawn(server::serve(tcp, ctx, stop_rx.clone()));
    }
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(config = %config_path.as_ref().map_or_else(|| "(embedded default)".into(), |p| p.display().to_string()), "herald-relay ready");

    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let mut reloader = Reloader {
        path: config_path,
        current: config,
        seen: None,
    };
    reloader.seen = reloader.read().await;
    let mut poll = tokio::time::interval(CONFIG_POLL);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                reloader.reload(&contexts, &shared, true).await;
            }
            _ = poll.tick() => {
                reloader.reload(&contexts, &shared, false).await;
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
    // Deliveries in flight finish their transaction and record the outcome, so nothing is sent twice
    // after the restart; then everything recorded is made durable.
    if tokio::time::timeout(DRAIN_GRACE, queue.stop())
        .await
        .is_err()
    {
        tracing::warn!(
            "deliveries still in flight after the grace period; they will be retried after the restart"
        );
    }
    if let Err(e) = spool.sync().await {
        tracing::error!(error = %e, "final spool sync failed");
    }
    if let Some(ev) = events {
        ev.shutdown(Duration::from_secs(10)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Reloads the config file on SIGHUP or when its content changes.
struct Reloader {
    path: Option<PathBuf>,
    current: Config,
    /// The file's content when it was last applied (or found bad), to notice changes.
    seen: Option<Vec<u8>>,
}

impl Reloader {
    /// The config file and the key files it names (DKIM, return-path tokens): a renewed key (a mounted
    /// Secret changing) reloads too.
    async fn read(&self) -> Option<Vec<u8>> {
        let mut all = tokio::fs::read(self.path.as_ref()?).await.ok()?;
        for d in &self.current.domains {
            for k in &d.dkim {
                all.extend(tokio::fs::read(&k.key_file).await.unwrap_or_default());
            }
        }
        if let Some(f) = &self.current.bounces.secret_file {
            all.extend(tokio::fs::read(f).await.unwrap_or_default());
        }
        Some(all)
    }

    /// On SIGHUP (`forced`) always reloads; otherwise only when the file's content changed.
    async fn reload(
        &mut self,
        contexts: &[Arc<server::ListenerContext>],
        shared: &Shared,
        forced: bool,
    ) {
        let Some(path) = self.path.clone() else {
            if forced {
                tracing::info!("SIGHUP: running on the embedded default config; nothing to reload");
            }
            return;
        };
        let content = self.read().await;
        if !forced && content == self.seen {
            return;
        }
        self.seen = content;
        if let Some(t) = &shared.tls {
            let t = t.clone();
            match tokio::task::spawn_blocking(move || t.reload()).await {
                Ok(Ok(())) => tracing::info!("TLS certificate reloaded"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate")
                }
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
        let Some(new) = reload_step(move || Config::load(&path)).await else {
            return;
        };
        // Even an unchanged config reloads: the change that brought us here may be a key file's.
        let c = new.clone();
        let Some(signers) = reload_step(move || Signers::load(&c)).await.map(Arc::new) else {
            return;
        };
        let c = new.clone();
        let Some(return_paths) = reload_step(move || load_bounces(&c)).await else {
            return;
        };
        let mut needs_restart =
            server::reconfigure(&new, contexts, shared, &signers, &return_paths);
        if new.spool_dir != self.current.spool_dir {
            needs_restart.push("spool_dir changed".into());
        }
        if new.tls != self.current.tls {
            needs_restart.push("tls file paths changed".into());
        }
        if new.delivery != self.current.delivery || new.ip_pools != self.current.ip_pools {
            needs_restart.push("delivery or ip_pools changed".into());
        }
        if new.admin != self.current.admin {
            needs_restart.push("admin address changed".into());
        }
        for what in &needs_restart {
            tracing::warn!(change = %what, "config change takes effect at the next restart");
        }
        tracing::info!("config reloaded; new sessions use it");
        self.current = new;
    }
}

/// Reads the return-path keys and compiles the classification rules, then puts both in force: outgoing
/// mail is signed with the new first key and failures are classified by the new rules from now on.
/// Blocking (reads the key file): call it off the async runtime.
fn load_bounces(config: &Config) -> Result<Arc<ReturnPaths>, RunError> {
    let rp = Arc::new(ReturnPaths::load(config)?);
    let classifier = Classifier::from_config(&config.bounces)?;
    verp::install(rp.clone());
    classify::install(classifier);
    Ok(rp)
}

/// Runs one loading step of a reload off the async runtime; None when it fails, which refuses the reload
/// (logged) and leaves the running config in force.
async fn reload_step<T, E>(load: impl FnOnce() -> Result<T, E> + Send + 'static) -> Option<T>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    match tokio::task::spawn_blocking(load).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "config reload refused; the running config stays in force");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload task failed");
            None
        }
    }
}
