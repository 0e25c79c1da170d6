//! Wires the stages into a running relay: spool, queue, listeners, admin; and the signals that stop it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::deliver::{self, Deliverer, Outbound};
use crate::dkim::Signers;
use crate::events;
use crate::exporter::{self, ExporterState};
use crate::fleet::{self, Backoffs, Counters, Fleet, Rates};
use crate::metrics::Metrics;
use crate::outcome::suppression::Suppressions;
use crate::outcome::verp::{self, ReturnPaths};
use crate::outcome::{Classifier, Rules, classify};
use crate::policy::Policy;
use crate::queue::{self, QueueHandle};
use crate::resources;
use crate::server::{self, ConnectionLimits, Shared, auth::AuthGate, tls::TlsStore};
use crate::shaping::Shaper;
use crate::spool::Spool;
use crate::telemetry::Telemetry;
use herald_config::Config;
use herald_smtp::budget::Budget;

/// How often the config file is checked for a change (a ConfigMap update replaces it in place).
const CONFIG_POLL: Duration = Duration::from_secs(5);

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
    #[error(transparent)]
    Exporter(#[from] exporter::ExporterError),
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Suppressions(#[from] crate::outcome::suppression::SuppressionError),
    #[error(transparent)]
    Deliver(#[from] deliver::DeliverError),
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
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

/// One running relay: the spool, queue, listeners and admin API it started, and the metrics, events and
/// rules they share. Nothing of it is process-wide, so a test can run two side by side.
#[derive(Debug)]
pub struct Relay {
    spool: Spool,
    queue: QueueHandle,
    deliverer: Arc<Deliverer>,
    shared: Shared,
    contexts: Vec<Arc<server::ListenerContext>>,
    listening: Vec<(String, SocketAddr)>,
    state: Arc<ExporterState>,
    stop: watch::Sender<bool>,
    events: Option<events::EventsHandle>,
    reloader: Reloader,
    counters: Arc<Counters>,
}

impl Relay {
    /// Loads the spool, starts the queue and delivery, binds every listener and the admin API, and starts
    /// serving. Addresses with port 0 get a free port: see [`Relay::listener_address`].
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Relay, RunError> {
        let spool_dir = config.spool_dir.clone();
        let (spool, loaded) =
            tokio::task::spawn_blocking(move || Spool::open(&spool_dir)).await??;
        let listener_names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        let metrics = Arc::new(Metrics::new(&listener_names));
        let (suppressions, fleet) = open_suppressions(&config, metrics.clone()).await?;
        let (stop, stop_rx) = watch::channel(false);
        let leases = fleet.as_ref().map(Fleet::leases);
        let rates = fleet.as_ref().map_or_else(Rates::local, Fleet::rates);
        let backoffs = fleet.as_ref().map_or_else(Backoffs::local, Fleet::backoffs);
        let counters = {
            let dir = fleet::state_dir(&config.spool_dir);
            let link = fleet.as_ref().map(Fleet::link);
            let fleet_size = config.store.as_ref().map_or(1, |s| s.fleet_size);
            let day = config.shaping.day_length;
            Arc::new(
                tokio::task::spawn_blocking(move || Counters::open(&dir, link, fleet_size, day))
                    .await??,
            )
        };
        counters.start(stop_rx.clone());
        // Before anything is delivered or accepted: a relay that must have the store has its list first.
        if let (Some(fleet), Some(store)) = (fleet, &config.store) {
            fleet
                .start(suppressions.clone(), store.required, stop_rx.clone())
                .await?;
        }
        tracing::info!(
            spool = %config.spool_dir.display(),
            messages = loaded.len(),
            bytes = spool.bytes(),
            suppressions = suppressions.len(),
            "spool loaded"
        );
        let (sink, events) = events::start(config.events.as_ref(), metrics.clone()).await?;
        let telemetry = Telemetry::new(metrics.clone(), sink, counters.clone());
        // Before the queue starts: it routes the spooled messages by the return-path domains.
        let (return_paths, classifier) = {
            let c = config.clone();
            tokio::task::spawn_blocking(move || load_bounces(&c)).await??
        };
        let rules = Arc::new(Rules::new(return_paths.clone(), classifier));
        let outbound = {
            let c = config.clone();
            tokio::task::spawn_blocking(move || Outbound::load(&c)).await??
        };
        let memory_limit = tokio::task::spawn_blocking(resources::memory_limit).await?;
        let initial = queue::Reconfigure::new(&config, &rules, memory_limit);
        tracing::info!(
            memory_limit,
            delivery_connections = initial.settings.total_connections,
            "resources"
        );
        let shaper = Shaper::new(backoffs, leases.clone(), rates.clone(), telemetry.clone());
        let deliverer = Deliverer::new(
            outbound,
            spool.clone(),
            rules.clone(),
            leases,
            rates,
            counters.clone(),
            shaper,
        )?;
        deliverer.start_gauges(metrics.clone(), stop_rx.clone());
        let queue = queue::start(
            initial,
            spool.clone(),
            suppressions.clone(),
            loaded,
            deliverer.clone(),
            rules.clone(),
            telemetry.clone(),
        );

        let tls = match &config.tls {
            Some(files) => {
                let files = files.clone();
                let gauge = metrics.tls_expiry.clone();
                Some(Arc::new(
                    tokio::task::spawn_blocking(move || TlsStore::load(&files, gauge)).await??,
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
        let inbound = resources::inbound_bytes(&config, memory_limit);
        tracing::info!(
            memory_limit = memory_limit.map_or_else(|| "none".to_owned(), |l| l.to_string()),
            inbound_bytes = inbound,
            delivery_connections = resources::delivery_connections(&config, memory_limit),
            "memory budgets"
        );
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
            rules,
            auth: Arc::new(AuthGate::new(&config.limits, telemetry.metrics.clone())),
            telemetry,
            budget: Budget::new(inbound as usize),
            memory_limit,
        };
        let state = Arc::new(ExporterState {
            ready: false.into(),
            metrics,
            inbound: shared.budget.clone(),
        });
        if let Some(m) = &config.metrics {
            let listener = exporter::bind(m.address).await?;
            let address = listener.local_addr().unwrap_or(m.address);
            tracing::info!(%address, "metrics listening");
            tokio::spawn(exporter::serve(listener, state.clone()));
        }
        if let Some(a) = &config.admin {
            let listener = admin::bind(a.address).await?;
            let address = listener.local_addr().unwrap_or(a.address);
            tracing::info!(%address, token = a.token_file.is_some(), "admin API listening");
            let api = Arc::new(AdminState {
                queue: queue.clone(),
                suppressions,
                counters: counters.clone(),
                deliverer: deliverer.clone(),
                token_file: a.token_file.clone(),
            });
            tokio::spawn(admin::serve(listener, api));
        }
        let mut contexts = Vec::new();
        let mut listening = Vec::new();
        for (tcp, ctx) in server::bind(&config, &shared).await? {
            let address = tcp.local_addr().unwrap_or(ctx.address);
            tracing::info!(listener = %ctx.name, %address, "listening");
            listening.push((ctx.name.clone(), address));
            contexts.push(ctx.clone());
            tokio::spawn(server::serve(tcp, ctx, stop_rx.clone()));
        }
        state.ready.store(true, Ordering::Relaxed);
        tracing::info!(config = %config_path.as_ref().map_or_else(|| "(embedded default)".into(), |p| p.display().to_string()), "herald-relay ready");
        let mut reloader = Reloader {
            path: config_path,
            current: config,
            seen: None,
            memory_limit,
        };
        reloader.seen = reloader.read().await;
        Ok(Relay {
            spool,
            queue,
            deliverer,
            shared,
            contexts,
            listening,
            state,
            stop,
            events,
            reloader,
            counters,
        })
    }

    /// The address listener `name` accepts connections on.
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.listening
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// This relay's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.telemetry.metrics
    }

    /// Reloads the config file: always when `forced` (SIGHUP), otherwise only when it or a key file it
    /// names changed.
    pub async fn reload(&mut self, forced: bool) {
        let live = Live {
            contexts: &self.contexts,
            shared: &self.shared,
            deliverer: &self.deliverer,
        };
        self.reloader.reload(live, forced).await;
    }

    /// Stops accepting, lets sessions in flight finish (up to the grace period), lets deliveries in flight
    /// record their outcome, makes the spool durable and flushes the event outputs.
    pub async fn shutdown(self) {
        tracing::info!("stopping: no new sessions; finishing the ones in flight");
        self.state.ready.store(false, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let drain = self.reloader.current.shutdown.clone();
        let deadline = tokio::time::Instant::now() + drain.sessions;
        while self.shared.limits.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.shared.limits.active();
        if left > 0 {
            tracing::warn!(
                sessions = left,
                "drain grace period over; closing remaining sessions"
            );
        }
        // Deliveries in flight finish their transaction and record the outcome, so nothing is sent twice
        // after the restart; then everything recorded is made durable.
        if tokio::time::timeout(drain.deliveries, self.queue.stop())
            .await
            .is_err()
        {
            tracing::warn!(
                "deliveries still in flight after the grace period; they will be retried after the restart"
            );
        }
        if let Err(e) = self.spool.sync().await {
            tracing::error!(error = %e, "final spool sync failed");
        }
        self.counters.close().await;
        if let Some(ev) = self.events {
            ev.shutdown(drain.events).await;
        }
        tracing::info!("stopped");
    }
}

/// The suppression list: the file on the spool volume, or with a store the fleet's shared list (whose
/// sync is started by the caller).
async fn open_suppressions(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Suppressions>, Option<Fleet>), RunError> {
    let spool_dir = config.spool_dir.clone();
    let policy = config.suppression.clone();
    let store = config.store.clone();
    let (list, fleet) = tokio::task::spawn_blocking(move || -> Result<_, RunError> {
        Ok(match store {
            None => (Suppressions::open(&spool_dir, policy)?, None),
            Some(s) => {
                let (fleet, shared) = Fleet::open(&s, &spool_dir, metrics)?;
                (Suppressions::new(Box::new(shared), policy), Some(fleet))
            }
        })
    })
    .await??;
    Ok((Arc::new(list), fleet))
}

/// Runs a relay until SIGTERM or SIGINT, reloading on SIGHUP and when the config file changes; then drains.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), RunError> {
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let mut relay = Relay::start(config, config_path).await?;
    let mut poll = tokio::time::interval(CONFIG_POLL);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => relay.reload(true).await,
            _ = poll.tick() => relay.reload(false).await,
        }
    }
    relay.shutdown().await;
    Ok(())
}

/// Reloads the config file on SIGHUP or when its content changes.
#[derive(Debug)]
struct Reloader {
    path: Option<PathBuf>,
    current: Config,
    /// The file's content when it was last applied (or found bad), to notice changes.
    seen: Option<Vec<u8>>,
    /// The container's memory limit, read at start: what the budgets the config leaves open are sized by.
    memory_limit: Option<u64>,
}

impl Reloader {
    /// The config file and the key files it names (DKIM, return-path tokens, the smarthost's password and CA):
    /// a renewed key (a mounted Secret changing) reloads too.
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
        if let Some(s) = &self.current.delivery.smarthost {
            // The CA file too: a CA that cert-manager renews reaches the verifier without a signal.
            for f in s.password_file.iter().chain(&s.ca_file) {
                all.extend(tokio::fs::read(f).await.unwrap_or_default());
            }
        }
        Some(all)
    }

    /// On SIGHUP (`forced`) always reloads; otherwise only when the file's content changed. A valid new
    /// config reaches every part of the running relay (listeners, policy, DKIM, rules, queue, delivery);
    /// what cannot change without new sockets or a new spool is named in the log and left as it is.
    async fn reload(&mut self, relay: Live<'_>, forced: bool) {
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
        let reloads = &relay.shared.telemetry.metrics.config_reloads;
        // Everything that can fail is loaded first; nothing changes unless all of it loads.
        let Some(new) = reload_step(move || Config::load(&path)).await else {
            reloads.with_label_values(&["rejected"]).inc();
            return;
        };
        // Even an unchanged config reloads: the change that brought us here may be a key file's.
        let c = new.clone();
        let Some(signers) = reload_step(move || Signers::load(&c)).await.map(Arc::new) else {
            reloads.with_label_values(&["rejected"]).inc();
            return;
        };
        let c = new.clone();
        let Some((return_paths, classifier)) = reload_step(move || load_bounces(&c)).await else {
            reloads.with_label_values(&["rejected"]).inc();
            return;
        };
        // Loaded whatever changed: the change that brought us here may be the password or CA file's.
        let c = new.clone();
        let Some(outbound) = reload_step(move || Outbound::load(&c)).await else {
            reloads.with_label_values(&["rejected"]).inc();
            return;
        };
        if let Some(t) = &relay.shared.tls {
            let t = t.clone();
            match tokio::task::spawn_blocking(move || t.reload()).await {
                Ok(Ok(())) => tracing::info!("TLS certificate reloaded"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate")
                }
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
        relay.shared.rules.set(return_paths.clone(), classifier);
        relay
            .shared
            .suppressions
            .set_policy(new.suppression.clone());
        let mut fixed =
            server::reconfigure(&new, relay.contexts, relay.shared, &signers, &return_paths);
        // The queue first: it routes by the new keys before connections see the new delivery settings.
        relay.shared.queue.reconfigure(queue::Reconfigure::new(
            &new,
            &relay.shared.rules,
            self.memory_limit,
        ));
        relay.deliverer.reconfigure(outbound);
        if new.spool_dir != self.current.spool_dir {
            fixed.push("spool_dir changed".into());
        }
        if new.tls != self.current.tls {
            fixed.push("tls file paths changed".into());
        }
        if new.admin != self.current.admin {
            fixed.push("admin section changed".into());
        }
        if new.metrics != self.current.metrics {
            fixed.push("metrics address changed".into());
        }
        if new.store != self.current.store {
            fixed.push("store section changed".into());
        }
        if new.shaping.day_length != self.current.shaping.day_length {
            fixed.push("shaping.day_length changed".into());
        }
        if new.events != self.current.events {
            fixed.push("events outputs changed".into());
        }
        for what in &fixed {
            tracing::warn!(change = %what, "this part of the config cannot change while running; it takes effect at the next restart");
        }
        let result = if fixed.is_empty() {
            "applied"
        } else {
            "partial"
        };
        reloads.with_label_values(&[result]).inc();
        tracing::info!(result, "config reloaded");
        // What was not applied stays as it runs, so that it is reported again until a restart.
        let mut current = new;
        current.spool_dir = self.current.spool_dir.clone();
        current.tls = self.current.tls.clone();
        current.admin = self.current.admin.clone();
        current.metrics = self.current.metrics.clone();
        current.events = self.current.events.clone();
        current.shaping.day_length = self.current.shaping.day_length;
        self.current = current;
    }
}

/// The running parts a reload reaches.
struct Live<'a> {
    contexts: &'a [Arc<server::ListenerContext>],
    shared: &'a Shared,
    deliverer: &'a Arc<Deliverer>,
}

/// Reads the return-path keys and compiles the classification rules.
/// Blocking (reads the key file): call it off the async runtime.
fn load_bounces(config: &Config) -> Result<(Arc<ReturnPaths>, Arc<Classifier>), RunError> {
    let rp = Arc::new(ReturnPaths::load(config)?);
    let classifier = Classifier::from_config(&config.bounces)?;
    Ok((rp, Arc::new(classifier)))
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
