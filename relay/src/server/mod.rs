//! The SMTP listeners: sockets, connection limits, and the loop that drives each [`Session`].
//!
//! Each listener gets an accept loop. A connection is checked against the listener's allowed networks and
//! the connection limits before a session exists; then `conn` feeds its bytes to the session and carries
//! out the session's actions (TLS, password checks, spooling).

mod conn;
pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{AuthMode, Config, Listener, TlsMode};
use crate::policy::Policy;
use crate::queue::Queue;
use crate::smtp::SessionConfig;
use crate::spool::Spool;
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
    max_total: usize,
    max_per_client: usize,
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
            max_total,
            max_per_client,
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    /// Open connections, across all listeners.
    pub fn active(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return None;
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_client {
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

/// What every connection of one listener shares.
#[derive(Debug)]
pub struct ListenerContext {
    pub session: Arc<SessionConfig>,
    pub allow_networks: Vec<IpNet>,
    pub tls: Option<Arc<TlsStore>>,
    pub spool: Spool,
    pub queue: Arc<Queue>,
    pub limits: Arc<ConnectionLimits>,
}

/// Shared pieces the listeners are built from.
#[derive(Debug)]
pub struct Shared {
    pub policy: Arc<Policy>,
    pub tls: Option<Arc<TlsStore>>,
    pub spool: Spool,
    pub queue: Arc<Queue>,
    pub limits: Arc<ConnectionLimits>,
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

fn context(config: &Config, l: &Listener, shared: &Shared) -> Result<ListenerContext, ServerError> {
    if l.tls != TlsMode::None && shared.tls.is_none() {
        return Err(ServerError::NoTls {
            name: l.name.clone(),
        });
    }
    Ok(ListenerContext {
        session: Arc::new(SessionConfig {
            hostname: config.hostname.clone(),
            listener: l.name.clone(),
            tls_mode: l.tls,
            auth_required: l.auth == AuthMode::Required,
            limits: config.limits.clone(),
            policy: shared.policy.clone(),
        }),
        allow_networks: l.allow_networks.clone(),
        tls: shared.tls.clone(),
        spool: shared.spool.clone(),
        queue: shared.queue.clone(),
        limits: shared.limits.clone(),
    })
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
                tracing::warn!(listener = %ctx.session.listener, error = %e, "accept failed");
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
    let listener = &ctx.session.listener;
    let trusted = !ctx.allow_networks.is_empty();
    if trusted && !ctx.allow_networks.iter().any(|n| n.contains(&ip)) {
        tracing::info!(%listener, client = %ip, "refused: client not in allow_networks");
        if ctx.session.tls_mode != TlsMode::Implicit {
            let msg = format!("554 5.7.1 {ip} is not allowed to use this service\r\n");
            let _ = tcp.write_all(msg.as_bytes()).await;
        }
        return;
    }
    let Some(_slot) = ctx.limits.acquire(ip) else {
        tracing::info!(%listener, client = %ip, "refused: too many connections");
        if ctx.session.tls_mode != TlsMode::Implicit {
            let _ = tcp
                .write_all(b"421 4.7.0 Too many connections, try again later\r\n")
                .await;
        }
        return;
    };
    if let Err(e) = conn::run(tcp, peer, trusted, &ctx, shutdown).await {
        tracing::debug!(%listener, client = %ip, error = %e, "session ended with an error");
    }
}
