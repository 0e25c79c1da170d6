//! The SMTP listeners: sockets, connection limits, and the loop that drives each
//! [`Session`](herald_smtp::Session).
//!
//! Each listener gets an accept loop. A connection is checked against the listener's allowed networks and
//! the connection limits before a session exists; then `conn` feeds its bytes to the session and carries
//! out the session's actions (TLS, password checks, spooling). The session is the protocol core (crate
//! herald-smtp); at MAIL and RCPT it consults a [`SessionPolicy`](crate::policy::SessionPolicy) built here
//! from the listener's settings and whether the client is in its allowed networks.

pub mod auth;
mod conn;
mod inbound;
pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::dkim::Signers;
use crate::outcome::Rules;
use crate::outcome::suppression::Suppressions;
use crate::outcome::verp::ReturnPaths;
use crate::policy::{Policy, Senders};
use crate::queue::QueueHandle;
use crate::spool::Spool;
use crate::telemetry::Telemetry;
use herald_config::{AuthMode, Config, Listener, TlsMode};
use herald_smtp::budget::Budget;
use herald_smtp::{RejectReason, SessionConfig};
use tls::TlsStore;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {name:?}: cannot listen on {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        source: io::Error,
    },
    #[error("listener {name:?} needs TLS but no certificate is loaded")]
    NoTls { name: String },
}

/// Counts open connections, in total and per client address.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: AtomicUsize,
    max_per_client: AtomicUsize,
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection's place; gives it back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_client: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total: AtomicUsize::new(max_total),
            max_per_client: AtomicUsize::new(max_per_client),
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    /// New maxima, from a reloaded config; connections already open are not closed.
    pub fn set_max(&self, max_total: usize, max_per_client: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_client.store(max_per_client, Ordering::Relaxed);
    }

    /// Open connections, across all listeners.
    pub fn active(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total.load(Ordering::Relaxed) {
            return None;
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_client.load(Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self
            .limits
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The part of a listener's setup that a config reload may change.
#[derive(Debug)]
pub struct ListenerSettings {
    pub session: Arc<SessionConfig>,
    pub allow_networks: Vec<IpNet>,
    /// Who the clients inside `allow_networks` may send as without AUTH.
    pub senders: Arc<Senders>,
    /// Users, their sending domains and the local domains.
    pub policy: Arc<Policy>,
    /// DKIM signers of the sending domains.
    pub signers: Arc<Signers>,
    /// `limits.max_session_duration`.
    pub max_session: std::time::Duration,
}

/// What every connection of one listener shares.
#[derive(Debug)]
pub struct ListenerContext {
    pub name: String,
    pub address: SocketAddr,
    pub tls_mode: TlsMode,
    settings: RwLock<Arc<ListenerSettings>>,
    pub tls: Option<Arc<TlsStore>>,
    pub spool: Spool,
    pub queue: QueueHandle,
    pub suppressions: Arc<Suppressions>,
    pub limits: Arc<ConnectionLimits>,
    pub rules: Arc<Rules>,
    pub telemetry: Telemetry,
    pub auth: Arc<auth::AuthGate>,
}

impl ListenerContext {
    /// The settings in force now; a connection keeps the ones it started with.
    pub fn settings(&self) -> Arc<ListenerSettings> {
        match self.settings.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_settings(&self, new: ListenerSettings) {
        let new = Arc::new(new);
        match self.settings.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
    }
}

/// Shared pieces the listeners are built from.
#[derive(Debug)]
pub struct Shared {
    pub policy: Arc<Policy>,
    pub tls: Option<Arc<TlsStore>>,
    pub spool: Spool,
    pub queue: QueueHandle,
    pub suppressions: Arc<Suppressions>,
    pub signers: Arc<Signers>,
    pub limits: Arc<ConnectionLimits>,
    pub rules: Arc<Rules>,
    pub telemetry: Telemetry,
    pub auth: Arc<auth::AuthGate>,
    /// Bytes of message bodies all sessions together may hold in memory.
    pub budget: Arc<Budget>,
    /// The container's memory limit, which sizes `budget` when the config does not.
    pub memory_limit: Option<u64>,
}

/// Binds every listener of the config; nothing is served until [`serve`] runs them.
pub async fn bind(
    config: &Config,
    shared: &Shared,
) -> Result<Vec<(TcpListener, Arc<ListenerContext>)>, ServerError> {
    let mut out = Vec::new();
    for l in &config.listeners {
        let tcp = TcpListener::bind(l.address)
            .await
            .map_err(|source| ServerError::Bind {
                name: l.name.clone(),
                address: l.address,
                source,
            })?;
        out.push((tcp, Arc::new(context(config, l, shared)?)));
    }
    Ok(out)
}

fn settings(
    config: &Config,
    l: &Listener,
    policy: &Arc<Policy>,
    signers: &Arc<Signers>,
    budget: &Arc<Budget>,
) -> ListenerSettings {
    let limits = &config.limits;
    ListenerSettings {
        session: Arc::new(SessionConfig {
            hostname: config.hostname.clone(),
            starttls: l.tls == TlsMode::Starttls,
            auth_required: l.auth == AuthMode::Required,
            limits: herald_smtp::Limits {
                max_message_size: limits.max_message_size,
                max_recipients: limits.max_recipients,
                max_errors: limits.max_errors,
                max_line_length: limits.max_line_length,
                command_timeout: limits.command_timeout,
                data_timeout: limits.data_timeout,
            },
            budget: Some(budget.clone()),
        }),
        allow_networks: l.allow_networks.clone(),
        senders: Arc::new(Senders::for_listener(config, l)),
        max_session: limits.max_session_duration,
        policy: policy.clone(),
        signers: signers.clone(),
    }
}

fn context(config: &Config, l: &Listener, shared: &Shared) -> Result<ListenerContext, ServerError> {
    if l.tls != TlsMode::None && shared.tls.is_none() {
        return Err(ServerError::NoTls {
            name: l.name.clone(),
        });
    }
    Ok(ListenerContext {
        name: l.name.clone(),
        address: l.address,
        tls_mode: l.tls,
        settings: RwLock::new(Arc::new(settings(
            config,
            l,
            &shared.policy,
            &shared.signers,
            &shared.budget,
        ))),
        tls: shared.tls.clone(),
        spool: shared.spool.clone(),
        queue: shared.queue.clone(),
        suppressions: shared.suppressions.clone(),
        limits: shared.limits.clone(),
        rules: shared.rules.clone(),
        telemetry: shared.telemetry.clone(),
        auth: shared.auth.clone(),
    })
}

/// Applies a reloaded config to running listeners: users, domains, limits, networks and names take effect
/// for new sessions. What needs new sockets or a new spool is reported, not applied.
pub fn reconfigure(
    config: &Config,
    contexts: &[Arc<ListenerContext>],
    shared: &Shared,
    signers: &Arc<Signers>,
    return_paths: &Arc<ReturnPaths>,
) -> Vec<String> {
    let limits = &shared.limits;
    let policy = Arc::new(Policy::new(config, return_paths.clone()));
    shared
        .budget
        .set_capacity(crate::resources::inbound_bytes(config, shared.memory_limit) as usize);
    let mut needs_restart = Vec::new();
    for ctx in contexts {
        match config.listeners.iter().find(|l| l.name == ctx.name) {
            Some(l) if l.address == ctx.address && l.tls == ctx.tls_mode => {
                ctx.set_settings(settings(config, l, &policy, signers, &shared.budget));
            }
            Some(l) => {
                // The socket and its TLS mode stay as they are; everything else still applies.
                let mut kept = l.clone();
                kept.address = ctx.address;
                kept.tls = ctx.tls_mode;
                ctx.set_settings(settings(config, &kept, &policy, signers, &shared.budget));
                needs_restart.push(format!(
                    "listener {:?} changed address or TLS mode",
                    ctx.name
                ));
            }
            None => needs_restart.push(format!("listener {:?} was removed", ctx.name)),
        }
    }
    for l in &config.listeners {
        if !contexts.iter().any(|c| c.name == l.name) {
            needs_restart.push(format!("listener {:?} was added", l.name));
        }
    }
    limits.set_max(
        config.limits.max_connections,
        config.limits.max_connections_per_client,
    );
    shared.auth.set_limits(&config.limits);
    needs_restart
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ListenerContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(listener = %ctx.name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { connection(tcp, peer, ctx, shutdown).await });
    }
}

async fn connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerContext>,
    shutdown: watch::Receiver<bool>,
) {
    // Replies are small and latency-bound: Nagle would hold each one back waiting for an ACK.
    let _ = tcp.set_nodelay(true);
    let ip = peer.ip().to_canonical();
    let listener = &ctx.name;
    let settings = ctx.settings();
    let trusted = !settings.allow_networks.is_empty();
    if trusted && !settings.allow_networks.iter().any(|n| n.contains(&ip)) {
        tracing::info!(%listener, client = %ip, "refused: client not in allow_networks");
        ctx.telemetry.metrics.rejected(RejectReason::NetworkDenied);
        if ctx.tls_mode != TlsMode::Implicit {
            let msg = format!("554 5.7.1 {ip} is not allowed to use this service\r\n");
            let _ = tcp.write_all(msg.as_bytes()).await;
        }
        return;
    }
    let Some(_slot) = ctx.limits.acquire(ip) else {
        tracing::info!(%listener, client = %ip, "refused: too many connections");
        ctx.telemetry
            .metrics
            .rejected(RejectReason::ConnectionLimit);
        if ctx.tls_mode != TlsMode::Implicit {
            let _ = tcp
                .write_all(b"421 4.7.0 Too many connections, try again later\r\n")
                .await;
        }
        return;
    };
    let sessions = ctx
        .telemetry
        .metrics
        .sessions
        .with_label_values(&[listener.as_str()]);
    sessions.inc();
    let result = conn::run(tcp, peer, trusted, &ctx, &settings, shutdown).await;
    sessions.dec();
    if let Err(e) = result {
        tracing::debug!(%listener, client = %ip, error = %e, "session ended with an error");
    }
}
