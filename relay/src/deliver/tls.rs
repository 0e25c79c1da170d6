//! The two TLS client configs of delivery, kept apart because they promise different things.
//!
//! - [`TlsClient::mx_encrypt_only`]: STARTTLS to MX hosts. Opportunistic security (RFC 7435): an MX host's
//!   certificate is not checked, because without MTA-STS or DANE there is nothing to check it against, and
//!   refusing it would only send the message in clear instead. It protects against passive observers; the
//!   handshake's signatures are still verified, so the session is bound to the key the server presented.
//! - [`TlsClient::smarthost_verified`]: the smarthost, a host this relay is configured to trust and hands
//!   its credentials to. Its certificate must chain to the system's CA certificates or to
//!   `delivery.smarthost.ca_file`, and be valid for `delivery.smarthost.host`. A session says which of the two
//!   it came from ([`Assurance`]), and the SMTP client sends AUTH only over a verified one.
//!
//! The system's CA certificates rather than a list compiled into the binary (webpki-roots): the relay image
//! (gcr.io/distroless/cc-debian12, see relay/Dockerfile) carries Debian's ca-certificates bundle, renewed
//! whenever the image is rebuilt, and an operator can point `SSL_CERT_FILE` at a bundle of their own without
//! a new binary; the events webhook client (reqwest) trusts the same store. Both the system's certificates
//! and the CA file are read when the config loads or reloads, never during a delivery.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("delivery.smarthost.ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error(
        "delivery.smarthost: no CA certificate to verify the smarthost's certificate with: the system has \
         none ({system}) and ca_file is not set"
    )]
    NoRoots { system: String },
    #[error("delivery.smarthost.host {host:?} is not a name a certificate can be checked against")]
    Host { host: String },
    #[error("TLS client configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// What a TLS session established about the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assurance {
    /// Encrypted; the server's certificate was not checked (opportunistic TLS to MX hosts).
    EncryptedOnly,
    /// The certificate chains to a trusted CA and is valid for the name connected to.
    Verified,
}

/// A TLS client config and what its sessions establish.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    assurance: Assurance,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("assurance", &self.assurance)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsClient {
    /// For MX hosts: encryption without certificate authentication (RFC 7435).
    pub fn mx_encrypt_only() -> Result<TlsClient, TlsError> {
        let provider = provider();
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MxEncryptOnlyVerifier(provider)))
            .with_no_client_auth();
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            assurance: Assurance::EncryptedOnly,
        })
    }

    /// For the smarthost: the chain is verified against the system's CA certificates and those of
    /// `ca_file`, and the name against the one connected to. Blocking (reads files): call it off the
    /// async runtime.
    pub fn smarthost_verified(ca_file: Option<&Path>) -> Result<TlsClient, TlsError> {
        let roots = smarthost_roots(ca_file)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            assurance: Assurance::Verified,
        })
    }

    pub fn assurance(&self) -> Assurance {
        self.assurance
    }

    /// The handshake over `tcp`; `name` is sent as SNI and, for a verifying config, checked against the
    /// certificate.
    pub async fn handshake(
        &self,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> io::Result<TlsStream<TcpStream>> {
        self.connector.connect(name, tcp).await
    }
}

/// The name the smarthost's certificate must be valid for: `delivery.smarthost.host` as it is written.
pub fn smarthost_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::Host {
        host: host.to_owned(),
    })
}

/// The system's CA certificates and those of `ca_file`.
fn smarthost_roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (_, unusable) = roots.add_parsable_certificates(system.certs);
    let problems: Vec<String> = system.errors.iter().map(ToString::to_string).collect();
    if !problems.is_empty() || unusable > 0 {
        // Some of the system's store could not be used: the rest still verifies, so this is worth a
        // warning, not a refusal of the config.
        tracing::warn!(
            errors = %problems.join("; "),
            unusable,
            usable = roots.len(),
            "some of the system's CA certificates could not be loaded"
        );
    }
    match ca_file {
        Some(path) => {
            let bad = |message: String| TlsError::CaFile {
                path: path.to_owned(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not a PEM file of certificates: {e}")))?;
            if certs.is_empty() {
                return Err(bad("no CERTIFICATE block in the file".to_owned()));
            }
            for (i, cert) in certs.into_iter().enumerate() {
                roots.add(cert).map_err(|e| {
                    bad(format!(
                        "certificate {} cannot be used as a CA certificate: {e}",
                        i + 1
                    ))
                })?;
            }
        }
        None if roots.is_empty() => {
            return Err(TlsError::NoRoots {
                system: if problems.is_empty() {
                    "no CA certificates found".to_owned()
                } else {
                    problems.join("; ")
                },
            });
        }
        None => {}
    }
    Ok(roots)
}

/// Accepts any certificate an MX host presents: encryption only, as opportunistic TLS is (RFC 7435). Never
/// for a smarthost, whose certificate [`TlsClient::smarthost_verified`] checks.
#[derive(Debug)]
struct MxEncryptOnlyVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for MxEncryptOnlyVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_file_error(content: Option<&[u8]>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        if let Some(c) = content {
            std::fs::write(&path, c).unwrap();
        }
        TlsClient::smarthost_verified(Some(&path))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_bad_ca_file_is_an_error_naming_the_field() {
        for (content, says) in [
            (None, "No such file"),
            (Some(&b"just text\n"[..]), "no CERTIFICATE block"),
            (
                Some(&b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"[..]),
                "cannot be used as a CA certificate",
            ),
            (
                Some(&b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"[..]),
                "not a PEM file",
            ),
        ] {
            let e = ca_file_error(content);
            assert!(e.starts_with("delivery.smarthost.ca_file "), "{e}");
            assert!(e.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn the_two_configs_say_what_their_sessions_establish() {
        assert_eq!(
            TlsClient::mx_encrypt_only().unwrap().assurance(),
            Assurance::EncryptedOnly
        );
    }

    #[test]
    fn the_smarthost_name_is_the_host_as_written() {
        assert!(matches!(
            smarthost_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            smarthost_name("relay.mail.svc"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(smarthost_name("not a name").is_err());
    }
}
