//! `herald-relay admin`: the admin API from a shell, for `kubectl exec` into an image that has no curl.
//!
//! It finds the API and its token in the relay's own config file (`admin.address`, `admin.token_file`), so
//! inside a pod `herald-relay --config /etc/herald/relay.yaml admin queue list` needs nothing else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use herald_config::Config;
use reqwest::Method;

/// Errors of the admin client, each one a line for the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the config has no admin section; pass --url")]
    NoAdmin,
    #[error("cannot read the admin token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad admin URL {url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot reach the admin API at {url}: {source}")]
    Request { url: String, source: reqwest::Error },
    #[error("{status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the admin API answered something that is not JSON: {0}")]
    Body(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What to ask the admin API.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// The delivery queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// The suppression list.
    #[command(subcommand)]
    Suppressions(SuppressionCommand),
    /// One day's counters: messages per source address, recipients per sending domain (the fleet's
    /// with a store).
    Counters {
        /// Days since 1970-01-01 UTC; default today.
        #[arg(long)]
        day: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// One page of queued messages, oldest id first; `next` in the answer is the cursor for --after.
    List {
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        after: Option<String>,
    },
    /// One queued message with the state of each recipient.
    Show { id: String },
    /// Removes a message from the queue without a bounce.
    Delete { id: String },
    /// Retries deferred recipients now: of one message, or of all without an id.
    Flush { id: Option<String> },
}

#[derive(Debug, Subcommand)]
pub enum SuppressionCommand {
    /// One page of suppressed addresses, in address order, with category, reply, added_at and expires_at.
    List {
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        after: Option<String>,
    },
    /// One address: its suppression and its mailbox-full streak, if any.
    Show { address: String },
    /// One page of mailbox-full streaks (addresses on their way to suppression), in address order.
    Streaks {
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        after: Option<String>,
    },
    /// Suppresses an address: RCPT to it is refused from then on (until --ttl has passed, if given).
    Add {
        address: String,
        #[arg(long)]
        reason: Option<String>,
        /// How long it lasts, e.g. 30d or 12h; without it, until removed.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Lifts a suppression.
    Remove { address: String },
}

/// Where the API is and how to prove who we are.
#[derive(Debug)]
pub struct Target {
    pub base: String,
    pub token: Option<String>,
}

impl Target {
    /// From the command line when given, else from the config's admin section.
    pub fn resolve(
        config: &Config,
        url: Option<String>,
        token_file: Option<PathBuf>,
    ) -> Result<Target, ClientError> {
        let admin = config.admin.as_ref();
        let base = match url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!(
                "http://{}",
                reachable(admin.ok_or(ClientError::NoAdmin)?.address)
            ),
        };
        let token = match token_file.or_else(|| admin.and_then(|a| a.token_file.clone())) {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(t) => Some(t.trim().to_owned()),
                Err(source) => return Err(ClientError::Token { path, source }),
            },
            None => None,
        };
        Ok(Target { base, token })
    }
}

/// A wildcard listen address is reached on loopback of the same family.
fn reachable(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), address.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), address.port())
        }
        _ => address,
    }
}

/// The request a command makes.
#[derive(Debug, PartialEq)]
struct Call {
    method: Method,
    /// Path segments, encoded when the URL is built (addresses carry `+`, `/`, `%`).
    path: Vec<String>,
    query: Vec<(&'static str, String)>,
    body: Option<serde_json::Value>,
}

impl Call {
    fn new(method: Method, path: &[&str]) -> Call {
        Call {
            method,
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            query: Vec::new(),
            body: None,
        }
    }

    fn page(mut self, limit: &Option<usize>, after: &Option<String>) -> Call {
        if let Some(l) = limit {
            self.query.push(("limit", l.to_string()));
        }
        if let Some(a) = after {
            self.query.push(("after", a.clone()));
        }
        self
    }

    fn url(&self, base: &str) -> Result<reqwest::Url, ClientError> {
        let bad = |e: String| ClientError::Url {
            url: base.to_owned(),
            message: e,
        };
        let mut url = reqwest::Url::parse(base).map_err(|e| bad(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| bad("cannot be a base URL".into()))?
            .pop_if_empty()
            .extend(&self.path);
        if !self.query.is_empty() {
            url.query_pairs_mut().extend_pairs(&self.query);
        }
        Ok(url)
    }
}

fn call(command: &AdminCommand) -> Call {
    match command {
        AdminCommand::Counters { day } => {
            let mut c = Call::new(Method::GET, &["counters"]);
            if let Some(d) = day {
                c.query.push(("day", d.to_string()));
            }
            c
        }
        AdminCommand::Queue(QueueCommand::List { limit, after }) => {
            Call::new(Method::GET, &["queue"]).page(limit, after)
        }
        AdminCommand::Queue(QueueCommand::Show { id }) => Call::new(Method::GET, &["queue", id]),
        AdminCommand::Queue(QueueCommand::Delete { id }) => {
            Call::new(Method::DELETE, &["queue", id])
        }
        AdminCommand::Queue(QueueCommand::Flush { id: Some(id) }) => {
            Call::new(Method::POST, &["queue", id, "flush"])
        }
        AdminCommand::Queue(QueueCommand::Flush { id: None }) => {
            Call::new(Method::POST, &["queue", "flush"])
        }
        AdminCommand::Suppressions(SuppressionCommand::List { limit, after }) => {
            Call::new(Method::GET, &["suppressions"]).page(limit, after)
        }
        AdminCommand::Suppressions(SuppressionCommand::Show { address }) => {
            Call::new(Method::GET, &["suppressions", address])
        }
        AdminCommand::Suppressions(SuppressionCommand::Streaks { limit, after }) => {
            Call::new(Method::GET, &["suppressions", "streaks"]).page(limit, after)
        }
        AdminCommand::Suppressions(SuppressionCommand::Add {
            address,
            reason,
            ttl,
        }) => {
            let mut body = serde_json::Map::new();
            if let Some(r) = reason {
                body.insert("reason".into(), r.as_str().into());
            }
            if let Some(t) = ttl {
                body.insert("ttl".into(), t.as_str().into());
            }
            Call {
                body: (!body.is_empty()).then_some(serde_json::Value::Object(body)),
                ..Call::new(Method::PUT, &["suppressions", address])
            }
        }
        AdminCommand::Suppressions(SuppressionCommand::Remove { address }) => {
            Call::new(Method::DELETE, &["suppressions", address])
        }
    }
}

/// Runs one command and returns the API's answer, pretty-printed.
pub fn run(target: &Target, command: &AdminCommand) -> Result<String, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    runtime.block_on(send(target, command))
}

async fn send(target: &Target, command: &AdminCommand) -> Result<String, ClientError> {
    let call = call(command);
    let url = call.url(&target.base)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|source| ClientError::Request {
            url: url.to_string(),
            source,
        })?;
    let mut req = client.request(call.method, url.clone());
    if let Some(t) = &target.token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = &call.body {
        req = req.json(b);
    }
    let response = req.send().await.map_err(|source| ClientError::Request {
        url: url.to_string(),
        source,
    })?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|source| ClientError::Request {
            url: url.to_string(),
            source,
        })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|_| ClientError::Body(text.clone()))?;
    if !status.is_success() {
        let message = value["error"].as_str().unwrap_or(&text).to_owned();
        return Err(ClientError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    serde_json::to_string_pretty(&value).map_err(|e| ClientError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_are_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:9091".parse().unwrap()),
            "127.0.0.1:9091".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            reachable("[::]:9091".parse().unwrap()),
            "[::1]:9091".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            reachable("10.1.2.3:9091".parse().unwrap()),
            "10.1.2.3:9091".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn addresses_are_encoded_in_paths() {
        let c = call(&AdminCommand::Suppressions(SuppressionCommand::Add {
            address: "a+b/c d@x.test".into(),
            reason: Some("asked".into()),
            ttl: Some("30d".into()),
        }));
        assert_eq!(c.method, Method::PUT);
        assert_eq!(c.body.as_ref().unwrap()["reason"], "asked");
        assert_eq!(c.body.as_ref().unwrap()["ttl"], "30d");
        let url = c.url("http://127.0.0.1:9091").unwrap();
        assert_eq!(url.path(), "/suppressions/a+b%2Fc%20d@x.test");
        let c = call(&AdminCommand::Queue(QueueCommand::List {
            limit: Some(5),
            after: Some("00000000000000AB".into()),
        }));
        let url = c.url("http://127.0.0.1:9091/").unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9091/queue?limit=5&after=00000000000000AB"
        );
        let c = call(&AdminCommand::Suppressions(SuppressionCommand::Streaks {
            limit: Some(2),
            after: None,
        }));
        let url = c.url("http://127.0.0.1:9091").unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9091/suppressions/streaks?limit=2"
        );
    }
}
