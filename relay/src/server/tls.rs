//! TLS for the listeners: certificate and key from PEM files, swapped in when the files change.
//!
//! cert-manager renews a mounted Secret in place; the relay must pick up the new pair without a restart and
//! without dropping sessions. A resolver holds the current key pair behind a lock that handshakes only read;
//! a watcher polls the files' modification times and replaces the pair when both load. A pair that fails
//! to load (a half-written renewal) is logged and the old one is kept.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use herald_config::TlsFiles;

/// How often the certificate files are checked for a change.
const POLL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("key {path} cannot be used: {source}")]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock still holds a usable key pair.
        Some(match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }
}

/// The listeners' TLS acceptor and the files behind it.
pub struct TlsStore {
    files: TlsFiles,
    /// `herald_tls_certificate_expiry_timestamp_seconds` of the relay that serves these files.
    expiry: prometheus::IntGauge,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStore")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsStore {
    pub fn load(files: &TlsFiles, expiry: prometheus::IntGauge) -> Result<TlsStore, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (key, not_after) = load_pair(files, &provider)?;
        expiry.set(not_after);
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(key)),
        });
        let config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        Ok(TlsStore {
            files: files.clone(),
            expiry,
            provider,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Loads the files again and, if they are good, serves them from the next handshake on.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (key, not_after) = load_pair(&self.files, &self.provider)?;
        let key = Arc::new(key);
        self.expiry.set(not_after);
        match self.resolver.current.write() {
            Ok(mut g) => *g = key,
            Err(p) => *p.into_inner() = key,
        }
        Ok(())
    }

    /// Polls the files and reloads them when either changes. Runs until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        let mut seen = self.mtimes().await;
        loop {
            tokio::time::sleep(POLL).await;
            let now = self.mtimes().await;
            if now == seen {
                continue;
            }
            let store = self.clone();
            match tokio::task::spawn_blocking(move || store.reload()).await {
                Ok(Ok(())) => {
                    tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                    seen = now;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate")
                }
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }

    async fn mtimes(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        async fn mtime(p: &Path) -> Option<SystemTime> {
            tokio::fs::metadata(p).await.ok()?.modified().ok()
        }
        (
            mtime(&self.files.cert_file).await,
            mtime(&self.files.key_file).await,
        )
    }
}

/// The key pair and the leaf's notAfter (Unix seconds).
fn load_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<(CertifiedKey, i64), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(&files.cert_file)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: files.cert_file.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert_file.clone(),
        });
    }
    let key_pem = read(&files.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: files.key_file.clone(),
        message: e.to_string(),
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Key {
            path: files.key_file.clone(),
            source,
        })?;
    let not_after = expiry(&certs[0]).map_err(|message| TlsError::Pem {
        path: files.cert_file.clone(),
        message,
    })?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match().map_err(|source| TlsError::Key {
        path: files.key_file.clone(),
        source,
    })?;
    Ok((pair, not_after))
}

/// The leaf certificate's notAfter as Unix seconds, for the expiry metric that alerts before clients fail.
fn expiry(leaf: &CertificateDer<'_>) -> Result<i64, String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let secs = cert
        .tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs();
    i64::try_from(secs).map_err(|_| "certificate expiry out of range".to_owned())
}

/// The protocol name logged and put in `Received:` headers, e.g. `TLSv1.3`.
pub fn version_name(v: Option<rustls::ProtocolVersion>) -> String {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_owned(),
    }
}
