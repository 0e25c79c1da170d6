//! DKIM signing (RFC 6376; Ed25519 per RFC 8463) with mail-auth's signer.
//!
//! A message is signed once, when it is accepted: the signature is stored in the spool with the message,
//! so retries and recipients never sign again. The signing domain is the From: domain (what DMARC aligns
//! on), when it is a configured sending domain. Relaxed/relaxed canonicalization; From is over-signed (listed
//! once more than it occurs) so a second From cannot be added after signing.

use std::collections::HashMap;
use std::path::Path;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use mail_parser::MessageParser;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::config::{Config, DkimAlgorithm};

/// Headers signed when present; From appears twice to over-sign it.
const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("domains[{index}].dkim.key_file {path}: {message}")]
    Key {
        index: usize,
        path: String,
        message: String,
    },
}

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// The signers of the configured sending domains, by domain (lower case).
#[derive(Default)]
pub struct Signers {
    by_domain: HashMap<String, Signer>,
}

impl std::fmt::Debug for Signers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signers")
            .field("domains", &self.by_domain.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn load_key(
    index: usize,
    path: &Path,
    algorithm: DkimAlgorithm,
    domain: &str,
    selector: &str,
) -> Result<Signer, DkimError> {
    let err = |message: String| DkimError::Key {
        index,
        path: path.display().to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| err(format!("no private key in PEM: {e}")))?;
    match (algorithm, &key) {
        (DkimAlgorithm::RsaSha256, PrivateKeyDer::Pkcs8(k)) => {
            RsaKey::<Sha256>::from_pkcs8_der(k.secret_pkcs8_der())
                .map(|k| Signer::Rsa(build(k, domain, selector)))
                .map_err(|e| err(format!("not an RSA key: {e}")))
        }
        (DkimAlgorithm::RsaSha256, PrivateKeyDer::Pkcs1(k)) => {
            RsaKey::<Sha256>::from_der(k.secret_pkcs1_der())
                .map(|k| Signer::Rsa(build(k, domain, selector)))
                .map_err(|e| err(format!("not an RSA key: {e}")))
        }
        (DkimAlgorithm::Ed25519Sha256, PrivateKeyDer::Pkcs8(k)) => {
            Ed25519Key::from_pkcs8_maybe_unchecked_der(k.secret_pkcs8_der())
                .map(|k| Signer::Ed25519(build(k, domain, selector)))
                .map_err(|e| err(format!("not an Ed25519 key: {e}")))
        }
        (a, _) => Err(err(format!(
            "the key's format does not fit algorithm {a:?} (PKCS#8 expected)"
        ))),
    }
}

fn build<T: mail_auth::common::crypto::SigningKey>(
    key: T,
    domain: &str,
    selector: &str,
) -> DkimSigner<T, Done> {
    DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(SIGNED_HEADERS.iter().copied())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
}

impl Signers {
    /// Reads every configured domain's key. A key that does not load is an error naming the field.
    pub fn load(config: &Config) -> Result<Signers, DkimError> {
        let mut by_domain = HashMap::new();
        for (i, d) in config.domains.iter().enumerate() {
            let Some(dkim) = &d.dkim else { continue };
            let signer = load_key(i, &dkim.key_file, dkim.algorithm, &d.name, &dkim.selector)?;
            by_domain.insert(d.name.to_ascii_lowercase(), signer);
        }
        Ok(Signers { by_domain })
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The DKIM-Signature header for a message made of `parts` (headers first), or None when its From:
    /// domain has no key. Errors are logged and the message goes unsigned rather than refused.
    pub fn sign(&self, parts: &[&[u8]]) -> Option<String> {
        if self.by_domain.is_empty() {
            return None;
        }
        let domain = from_domain(parts)?;
        let signer = self.by_domain.get(&domain)?;
        let result = match signer {
            Signer::Rsa(s) => s
                .sign_chained(parts.iter().copied())
                .map(|sig| sig.to_header()),
            Signer::Ed25519(s) => s
                .sign_chained(parts.iter().copied())
                .map(|sig| sig.to_header()),
        };
        match result {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(domain = %domain, error = %e, "DKIM signing failed; the message goes unsigned");
                None
            }
        }
    }
}

/// The From: domain of a message (lower case), from its header section.
fn from_domain(parts: &[&[u8]]) -> Option<String> {
    // The header section is at the start; the first part (our added headers) never holds From:, so look in
    // the part that does, bounded to its headers.
    for p in parts {
        if let Some(msg) = MessageParser::default().parse_headers(p)
            && let Some(addr) = msg.from().and_then(|f| f.first()).and_then(|a| a.address())
        {
            return addr.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
        }
    }
    None
}
