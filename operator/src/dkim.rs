//! DKIM key pairs: generated for a SendingDomain, stored in a Secret, published as a TXT record.
//!
//! RSA keys are 2048-bit (RFC 8301's minimum for signing is 1024, 2048 is what receivers expect now);
//! Ed25519 keys follow RFC 8463, whose DNS form is the raw 32-byte public key, not an SPKI structure.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::KeyPair;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

use crate::crd::DkimAlgorithm;

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("RSA key generation failed: {0}")]
    Rsa(String),
    #[error("Ed25519 key generation failed")]
    Ed25519,
    #[error("key encoding failed: {0}")]
    Encoding(String),
}

/// A generated key pair.
#[derive(Clone)]
pub struct KeyMaterial {
    /// PKCS#8 PEM private key, for the Secret (and the relay's `dkim.key_file`).
    pub private_pem: String,
    /// The `p=` value of the DKIM record.
    pub public_b64: String,
    pub algorithm: DkimAlgorithm,
}

// The private key must never reach a log line, an event or a status field.
impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("algorithm", &self.algorithm)
            .field("public_b64", &self.public_b64)
            .finish_non_exhaustive()
    }
}

/// Generates a key pair. RSA generation takes a moment: call it off the async runtime.
pub fn generate(algorithm: DkimAlgorithm) -> Result<KeyMaterial, DkimError> {
    match algorithm {
        DkimAlgorithm::Rsa2048 => {
            let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
                .map_err(|e| DkimError::Rsa(e.to_string()))?;
            let private_pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| DkimError::Encoding(e.to_string()))?
                .to_string();
            let spki = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| DkimError::Encoding(e.to_string()))?;
            Ok(KeyMaterial {
                private_pem,
                public_b64: B64.encode(spki.as_bytes()),
                algorithm,
            })
        }
        DkimAlgorithm::Ed25519 => {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| DkimError::Ed25519)?;
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|_| DkimError::Ed25519)?;
            let body = B64.encode(pkcs8.as_ref());
            let mut private_pem = String::from("-----BEGIN PRIVATE KEY-----\n");
            for chunk in body.as_bytes().chunks(64) {
                private_pem.push_str(&String::from_utf8_lossy(chunk));
                private_pem.push('\n');
            }
            private_pem.push_str("-----END PRIVATE KEY-----\n");
            Ok(KeyMaterial {
                private_pem,
                public_b64: B64.encode(pair.public_key().as_ref()),
                algorithm,
            })
        }
    }
}

/// The DKIM TXT record value (RFC 6376 section 3.6.1).
pub fn record_value(algorithm: DkimAlgorithm, public_b64: &str) -> String {
    let k = match algorithm {
        DkimAlgorithm::Rsa2048 => "rsa",
        DkimAlgorithm::Ed25519 => "ed25519",
    };
    format!("v=DKIM1; k={k}; p={public_b64}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_keys_have_a_32_byte_public_key() {
        let k = generate(DkimAlgorithm::Ed25519).unwrap();
        assert_eq!(B64.decode(&k.public_b64).unwrap().len(), 32);
        assert!(k.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }

    #[test]
    fn rsa_keys_are_2048_bit_spki() {
        use rsa::pkcs8::DecodePublicKey;
        use rsa::traits::PublicKeyParts;
        let k = generate(DkimAlgorithm::Rsa2048).unwrap();
        let der = B64.decode(&k.public_b64).unwrap();
        let public = rsa::RsaPublicKey::from_public_key_der(&der).unwrap();
        assert_eq!(public.size() * 8, 2048);
        assert!(record_value(k.algorithm, &k.public_b64).starts_with("v=DKIM1; k=rsa; p=MIIB"));
    }
}
