//! The way to the store: the client built from the config (URL, password file, CA; one instance, a
//! cluster, or a primary found through Sentinels), connections with time limits, every operation timed and
//! its failures counted, and the fleet's key names.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisFuture,
    TlsCertificates, TlsMode,
};

use super::FleetError;
use crate::metrics::Metrics;

/// Opening a connection: beyond this the store counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One command's reply. Writes of the suppression list are small; a bulk page is a few hundred entries.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the store, whatever its topology. Cloning it is cheap and shares the connection: both
/// kinds multiplex concurrent requests.
#[derive(Clone)]
pub enum Connection {
    /// To one instance: the configured one, or the primary the Sentinels named.
    Node(MultiplexedConnection),
    /// To a cluster: each command goes to the shard of its key.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connection::Node(_) => "Connection::Node",
            Connection::Cluster(_) => "Connection::Cluster",
        })
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Connection::Node(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Node(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// How the store is reached.
enum Backend {
    Node(Client),
    Cluster(redis::cluster::ClusterClient),
    /// Asked for the primary at every connect, so a connect after a fail-over finds the new one.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Node(_) => "Backend::Node",
            Backend::Cluster(_) => "Backend::Cluster",
            Backend::Sentinel(_) => "Backend::Sentinel",
        })
    }
}

/// The configured store: its client, the key prefix, and the metrics every operation reports to.
#[derive(Debug)]
pub struct Link {
    backend: Backend,
    /// The URL without its password, for logs and errors.
    shown: String,
    prefix: String,
    metrics: Arc<Metrics>,
}

/// `redis://user:secret@host/0` as `redis://user@host/0`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host_start = rest.rfind('@').map_or(0, |at| at + 1);
    let credentials = &rest[..host_start.saturating_sub(1)];
    let user = credentials.split(':').next().unwrap_or("");
    if host_start == 0 {
        url.to_owned()
    } else if user.is_empty() {
        format!("{scheme}://{}", &rest[host_start..])
    } else {
        format!("{scheme}://{user}@{}", &rest[host_start..])
    }
}

/// The store as logs and errors name it: the URL without its password, and its topology.
fn shown(config: &herald_config::Store) -> String {
    let url = without_password(&config.url);
    let more = config.nodes.len();
    match &config.sentinel_master {
        Some(m) => format!("{url} (Sentinel, primary {m}, {} Sentinels)", more + 1),
        None if config.cluster => format!("{url} (cluster, {} seed nodes)", more + 1),
        None => url,
    }
}

fn read_file(field: &'static str, path: &std::path::Path) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|source| FleetError::File {
        field,
        path: path.to_owned(),
        source,
    })
}

impl Link {
    /// The client for `config` (files read now, nothing connected yet). Blocking: reads the password and
    /// CA files.
    pub fn new(config: &herald_config::Store, metrics: Arc<Metrics>) -> Result<Link, FleetError> {
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(FleetError::Url)?;
        if let Some(f) = &config.password_file {
            let raw = read_file("password_file", f)?;
            let password = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let certificates = match &config.tls {
            Some(tls) => Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(read_file("tls.ca_file", &tls.ca_file)?),
            }),
            None => None,
        };
        let mut nodes = vec![info.clone()];
        for node in &config.nodes {
            nodes.push(info.clone().set_addr(node_addr(info.addr(), node)?));
        }
        let backend = if config.cluster {
            let mut builder = ClusterClientBuilder::new(nodes)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(REPLY_TIMEOUT);
            if let Some(certs) = certificates {
                builder = builder.certs(certs);
            }
            Backend::Cluster(builder.build().map_err(FleetError::Url)?)
        } else if let Some(master) = &config.sentinel_master {
            Backend::Sentinel(tokio::sync::Mutex::new(sentinel(
                &info,
                nodes,
                master,
                certificates,
            )?))
        } else {
            Backend::Node(
                match certificates {
                    Some(certs) => Client::build_with_tls(info, certs),
                    None => Client::open(info),
                }
                .map_err(FleetError::Url)?,
            )
        };
        metrics.register_store();
        Ok(Link {
            backend,
            shown: shown(config),
            prefix: config.key_prefix.clone(),
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The URL as logs show it (no password).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// A fleet key: the configured prefix, then `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A new connection whose replies may take up to `reply` (more than a blocking read waits).
    pub async fn connect(&self, reply: Option<Duration>) -> Result<Connection, FleetError> {
        let reply = reply.unwrap_or(REPLY_TIMEOUT);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(reply));
        self.timed("connect", async {
            match &self.backend {
                Backend::Node(client) => client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Connection::Node),
                Backend::Cluster(client) => {
                    let config = ClusterConfig::new()
                        .set_connection_timeout(CONNECT_TIMEOUT)
                        .set_response_timeout(reply);
                    // Bounded here too: discovering the slots may try node after node.
                    within(client.get_async_connection_with_config(config))
                        .await
                        .map(Connection::Cluster)
                }
                Backend::Sentinel(sentinels) => {
                    let primary =
                        within(async { sentinels.lock().await.async_get_client().await }).await?;
                    primary
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map(Connection::Node)
                }
            }
        })
        .await
    }

    /// Runs one operation, observing its time under `op` and counting its failure.
    pub async fn timed<T, F>(&self, op: &'static str, f: F) -> Result<T, FleetError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let start = Instant::now();
        let result = f.await;
        self.metrics
            .store_latency
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        result.map_err(|source| {
            self.metrics.store_errors.with_label_values(&[op]).inc();
            self.error(source)
        })
    }

    /// A failure of the store, named by its URL.
    pub fn error(&self, source: redis::RedisError) -> FleetError {
        FleetError::Store {
            url: self.shown.clone(),
            source,
        }
    }

    /// The store answered something this relay did not write there.
    pub fn protocol(&self, what: impl Into<String>) -> FleetError {
        FleetError::Protocol {
            url: self.shown.clone(),
            what: what.into(),
        }
    }
}

/// `f`, failing as a timeout after twice the connect limit (the client's own limits are per node).
async fn within<T>(f: impl Future<Output = redis::RedisResult<T>>) -> redis::RedisResult<T> {
    tokio::time::timeout(CONNECT_TIMEOUT * 2, f)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no node of the store answered in time",
            )))
        })
}

/// The address of one of `store.nodes` (`host:port`), with the scheme of the url's.
fn node_addr(url: &ConnectionAddr, node: &str) -> Result<ConnectionAddr, FleetError> {
    let bad = || {
        FleetError::Url(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "store.nodes: not host:port",
            node.to_owned(),
        )))
    };
    let (host, port) = node.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_owned();
    Ok(match url {
        ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: None,
        },
        _ => ConnectionAddr::Tcp(host, port),
    })
}

/// The client that asks `sentinels` for `master`. The url's credentials, database and TLS are the
/// primary's and, but for the database, the Sentinels' too (the usual setup shares one password).
fn sentinel(
    url: &ConnectionInfo,
    sentinels: Vec<ConnectionInfo>,
    master: &str,
    certificates: Option<TlsCertificates>,
) -> Result<SentinelClient, FleetError> {
    let tls = matches!(url.addr(), ConnectionAddr::TcpTls { .. });
    let addrs = sentinels.into_iter().map(|i| i.addr().clone());
    let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
        .map_err(FleetError::Url)?
        .set_client_to_redis_db(url.redis_settings().db());
    if let Some(user) = url.redis_settings().username() {
        b = b
            .set_client_to_redis_username(user)
            .set_client_to_sentinel_username(user);
    }
    if let Some(password) = url.redis_settings().password() {
        b = b
            .set_client_to_redis_password(password)
            .set_client_to_sentinel_password(password);
    }
    if tls {
        b = b
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(certs) = certificates {
            b = b
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs);
        }
    }
    b.build().map_err(FleetError::Url)
}

/// After a failure, the store is left alone for this long (callers use their fallback meanwhile).
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A connection for Lua scripts, opened on first use with its scripts loaded (so pipelined calls, which
/// do not load them, find them). After a failure the store is left alone for `RETRY_AFTER`: callers then
/// use their fallback at once instead of each waiting out a connect of its own.
#[derive(Debug)]
pub struct ScriptConnection {
    link: Arc<Link>,
    op: &'static str,
    /// Logged when the store stops answering: what the relay does meanwhile.
    fallback: &'static str,
    scripts: Vec<redis::Script>,
    con: tokio::sync::Mutex<Option<Connection>>,
    resting_until: Mutex<Option<Instant>>,
}

impl ScriptConnection {
    /// Operations through it are timed and counted under `op`.
    pub fn new(
        link: Arc<Link>,
        op: &'static str,
        fallback: &'static str,
        scripts: Vec<redis::Script>,
    ) -> ScriptConnection {
        ScriptConnection {
            link,
            op,
            fallback,
            scripts,
            con: tokio::sync::Mutex::new(None),
            resting_until: Mutex::new(None),
        }
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// The connection, opened now if need be; none while the store is being left alone.
    pub async fn get(&self) -> Option<Connection> {
        if self.resting() {
            return None;
        }
        let mut guard = self.con.lock().await;
        // Asked again under the lock: callers that queued behind a failed connect do not each try (and
        // wait out) one of their own.
        if self.resting() {
            return None;
        }
        if guard.is_none() {
            match self.connect().await {
                Ok(c) => *guard = Some(c),
                Err(e) => {
                    self.rest(&e);
                    return None;
                }
            }
        }
        guard.clone()
    }

    /// The connection if one is open; never connects.
    pub async fn current(&self) -> Option<Connection> {
        self.con.lock().await.clone()
    }

    /// Runs `f` under this connection's operation name.
    pub async fn timed<T, F>(&self, f: F) -> Result<T, FleetError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.link.timed(self.op, f).await
    }

    /// An operation on the connection failed: it is dropped, and the store left alone for a while.
    pub async fn failed(&self, e: &FleetError) {
        *self.con.lock().await = None;
        self.rest(e);
    }

    fn resting(&self) -> bool {
        self.resting_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    async fn connect(&self) -> Result<Connection, FleetError> {
        let mut con = self.link.connect(None).await?;
        for script in &self.scripts {
            self.link
                .timed(self.op, script.prepare_invoke().load_async(&mut con))
                .await?;
        }
        Ok(con)
    }

    fn rest(&self, e: &FleetError) {
        let mut resting = self.resting_until.lock().unwrap_or_else(|p| p.into_inner());
        if resting.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(error = %e, "{}", self.fallback);
        }
        *resting = Some(Instant::now() + RETRY_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn logs_never_show_the_password() {
        assert_eq!(
            without_password("redis://:s3cret@valkey:6379/0"),
            "redis://valkey:6379/0"
        );
        assert_eq!(
            without_password("rediss://herald:p@ss@valkey/1"),
            "rediss://herald@valkey/1"
        );
        assert_eq!(
            without_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
