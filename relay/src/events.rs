//! Delivery events: accepted, delivered, deferred, bounced, expired, suppressed and complained (bounces and
//! complaints read from reports carry a `source`), and traffic shaping's suspended and resumed, as JSON
//! lines to a file or standard output, and POSTed to a webhook.
//!
//! Emitting never waits: events go through an unbounded channel to one task. The webhook side keeps a
//! bounded buffer and retries with backoff until the endpoint accepts, so a slow or failing endpoint never
//! slows delivery, and loses events only if it stays down long enough to overflow the buffer (counted in
//! `herald_events_dropped_total`). Each POST carries `X-Herald-Timestamp` and
//! `X-Herald-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`, as hosted providers sign theirs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;

/// One event. Fields that do not apply are left out of the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unique per event (128 random bits, hex): a receiver de-duplicates by it, since a webhook batch that
    /// timed out is sent again.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub timestamp: String,
    /// Empty (and left out) for an event about the relay rather than a message (`resumed`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub queue_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sender: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Where an asynchronous outcome came from: a `dsn`, an `arf` report or a `text` bounce.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'static str>,
    /// The ARF feedback type of a complaint (`abuse`, `fraud`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<String>,
    /// The mailbox provider a `suspended` or `resumed` source address is suspended for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The source address of a `suspended` or `resumed` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<String>,
    /// When a suspension ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

impl Event {
    /// A new event of `kind` about message `queue_id` from `sender`; set the other fields as they apply.
    pub fn new(kind: &'static str, queue_id: String, sender: String) -> Event {
        Event {
            id: format!("{:032x}", rand::random::<u128>()),
            kind,
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            queue_id,
            sender,
            recipient: None,
            recipients: None,
            domain: None,
            mx: None,
            tls: None,
            reply: None,
            class: None,
            category: None,
            attempts: None,
            listener: None,
            size: None,
            source: None,
            feedback_type: None,
            provider: None,
            source_ip: None,
            until: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("events.file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("events.webhook.secret_file {path}: {source}")]
    Secret {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("events.webhook: cannot build the HTTP client: {0}")]
    Client(String),
}

/// Where one relay's events go; cheap to clone. Without outputs it drops everything.
#[derive(Debug, Clone, Default)]
pub struct EventSink(Option<mpsc::UnboundedSender<Event>>);

impl EventSink {
    /// Whether events are wanted at all (saves building them when not).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Sends an event to the configured outputs; does nothing when there are none.
    pub fn emit(&self, event: Event) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(event);
        }
    }
}

/// The handle that flushes outputs at shutdown.
#[derive(Debug)]
pub struct EventsHandle {
    stop: watch::Sender<bool>,
    done: Vec<tokio::task::JoinHandle<()>>,
}

impl EventsHandle {
    /// Stops taking events and gives the outputs up to `grace` to write and deliver what they hold.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let all = futures_join(self.done);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "event outputs did not finish within the grace period; undelivered webhook events are lost"
            );
        }
    }
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Starts the event outputs of `config`, if any: the sink to emit to, and the handle that flushes them.
pub async fn start(
    config: Option<&herald_config::Events>,
    metrics: Arc<Metrics>,
) -> Result<(EventSink, Option<EventsHandle>), EventsError> {
    let Some(cfg) = config else {
        return Ok((EventSink::default(), None));
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let (stop, stop_rx) = watch::channel(false);
    let mut file_out: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> = match &cfg.file {
        Some(p) if p.as_os_str() == "-" => Some(Box::new(tokio::io::stdout())),
        Some(p) => {
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .await
                .map_err(|source| EventsError::File {
                    path: p.clone(),
                    source,
                })?;
            Some(Box::new(f))
        }
        None => None,
    };
    let (hook_tx, hook_rx) = mpsc::unbounded_channel::<String>();
    let mut done = Vec::new();
    let webhook = cfg.webhook.clone();
    if let Some(w) = &webhook {
        let secret =
            tokio::fs::read(&w.secret_file)
                .await
                .map_err(|source| EventsError::Secret {
                    path: w.secret_file.clone(),
                    source,
                })?;
        // The key is the file's bytes as they are (any bytes may be a key), less the line end an editor or
        // `echo` leaves.
        let mut secret = secret;
        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            secret.pop();
        }
        let client = reqwest::Client::builder()
            .timeout(w.timeout)
            .build()
            .map_err(|e| EventsError::Client(e.to_string()))?;
        done.push(tokio::spawn(webhook_task(
            w.clone(),
            secret,
            client,
            hook_rx,
            stop_rx.clone(),
            metrics,
        )));
    }
    let mut stop_rx2 = stop_rx;
    done.push(tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                e = rx.recv() => e,
                _ = stop_rx2.wait_for(|s| *s) => None,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while let Ok(e) = rx.try_recv() {
                batch.push(e);
                if batch.len() >= 1000 {
                    break;
                }
            }
            write_batch(&batch, &mut file_out, webhook.is_some().then_some(&hook_tx)).await;
        }
        // Drain what is left so nothing emitted before the stop is lost.
        let mut rest = Vec::new();
        while let Ok(e) = rx.try_recv() {
            rest.push(e);
        }
        write_batch(&rest, &mut file_out, webhook.is_some().then_some(&hook_tx)).await;
        if let Some(f) = file_out.as_mut() {
            let _ = f.flush().await;
        }
    }));
    Ok((EventSink(Some(tx)), Some(EventsHandle { stop, done })))
}

async fn write_batch(
    batch: &[Event],
    file: &mut Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    hook: Option<&mpsc::UnboundedSender<String>>,
) {
    if batch.is_empty() {
        return;
    }
    let mut lines = String::new();
    for e in batch {
        match serde_json::to_string(e) {
            Ok(json) => {
                lines.push_str(&json);
                lines.push('\n');
                if let Some(h) = hook {
                    let _ = h.send(json);
                }
            }
            Err(err) => tracing::error!(error = %err, "cannot encode an event"),
        }
    }
    if let Some(f) = file.as_mut()
        && let Err(e) = async {
            f.write_all(lines.as_bytes()).await?;
            f.flush().await
        }
        .await
    {
        tracing::error!(error = %e, "cannot write events");
    }
}

/// The signature header value for `body` sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

async fn webhook_task(
    cfg: herald_config::Webhook,
    secret: Vec<u8>,
    client: reqwest::Client,
    mut rx: mpsc::UnboundedReceiver<String>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let mut buffer: VecDeque<String> = VecDeque::new();
    let mut backoff = Duration::from_millis(500);
    let mut stopping = false;
    loop {
        while let Ok(e) = rx.try_recv() {
            buffer.push_back(e);
        }
        while buffer.len() > cfg.buffer {
            buffer.pop_front();
            metrics.events_dropped.inc();
        }
        if buffer.is_empty() {
            if stopping {
                return;
            }
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => buffer.push_back(e),
                    None => return,
                },
                _ = stop.wait_for(|s| *s) => stopping = true,
            }
            continue;
        }
        let n = buffer.len().min(cfg.batch);
        let mut body = String::from("[");
        for (i, e) in buffer.iter().take(n).enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(e);
        }
        body.push(']');
        let ts = chrono::Utc::now().timestamp().to_string();
        let sig = signature(&secret, &ts, body.as_bytes());
        let result = client
            .post(&cfg.url)
            .header("content-type", "application/json")
            .header("x-herald-timestamp", &ts)
            .header("x-herald-signature", sig)
            .body(body)
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => {
                buffer.drain(..n);
                backoff = Duration::from_millis(500);
            }
            other => {
                let why = match other {
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => e.to_string(),
                };
                metrics.webhook_failures.inc();
                tracing::warn!(url = %cfg.url, error = %why, events = buffer.len(), retry_in = ?backoff, "webhook POST failed; will retry");
                if stopping {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => stopping = true,
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_an_independent_hmac() {
        // python3 -c "import hmac,hashlib;print(hmac.new(b'key',b'1.body',hashlib.sha256).hexdigest())"
        assert_eq!(
            signature(b"key", "1", b"body"),
            "v1=91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5"
        );
    }
}
