//! DKIM signing (RFC 6376; Ed25519 per RFC 8463) with mail-auth's signer.
//!
//! A message is signed once, when it is accepted: the signature is stored in the spool with the message,
//! so retries and recipients never sign again. The signing domain is the From: domain (what DMARC aligns
//! on), when it is a configured sending domain; a domain with an RSA and an Ed25519 key gets both
//! signatures (RFC 8463). Relaxed/relaxed canonicalization; From is over-signed (listed once more than it
//! occurs) so a second From cannot be added after signing.
//!
//! RSA signs through aws-lc-rs rather than mail-auth's ring-backed key: at one signature per message the
//! RSA private-key operation was most of the relay's CPU time, and ring's takes ~1.8x as long as
//! aws-lc-rs's (RSA-2048 on the 2-core benchmark machine: ~585 µs against ~320 µs, which is what `openssl
//! speed` gives). Ed25519 stays on ring, where a signature costs ~26 µs.

use std::collections::HashMap;
use std::path::Path;

use mail_auth::common::crypto::{Algorithm, Ed25519Key, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use mail_parser::MessageParser;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use herald_config::{Config, DkimAlgorithm};

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
    #[error("{field}.key_file {path}: {message}")]
    Key {
        field: String,
        path: String,
        message: String,
    },
}

/// An RSA-SHA256 (PKCS#1 v1.5) DKIM key backed by aws-lc-rs.
struct RsaKey(aws_lc_rs::rsa::KeyPair);

impl SigningKey for RsaKey {
    type Hasher = Sha256;

    /// Signs the canonicalized header block (mail-auth hashes the body itself, through `Hasher`).
    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(512);
        input.write(&mut data);
        let mut signature = vec![0; self.0.public_modulus_len()];
        // aws-lc-rs ignores the random source for RSA PKCS#1 v1.5; its API still takes one.
        self.0
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                &data,
                &mut signature,
            )
            .map_err(|e| mail_auth::Error::CryptoError(e.to_string()))?;
        Ok(signature)
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::RsaSha256
    }
}

enum Signer {
    Rsa(DkimSigner<RsaKey, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// The signers of the configured sending domains, by domain (lower case); RSA first.
#[derive(Default)]
pub struct Signers {
    by_domain: HashMap<String, Vec<Signer>>,
}

impl std::fmt::Debug for Signers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signers")
            .field("domains", &self.by_domain.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn load_key(
    field: String,
    path: &Path,
    algorithm: DkimAlgorithm,
    domain: &str,
    selector: &str,
) -> Result<Signer, DkimError> {
    let err = |message: String| DkimError::Key {
        field: field.clone(),
        path: path.display().to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| err(format!("no private key in PEM: {e}")))?;
    match (algorithm, &key) {
        (DkimAlgorithm::RsaSha256, PrivateKeyDer::Pkcs8(k)) => {
            aws_lc_rs::rsa::KeyPair::from_pkcs8(k.secret_pkcs8_der())
                .map(|k| Signer::Rsa(build(RsaKey(k), domain, selector)))
                .map_err(|e| err(format!("not an RSA key: {e}")))
        }
        (DkimAlgorithm::RsaSha256, PrivateKeyDer::Pkcs1(k)) => {
            aws_lc_rs::rsa::KeyPair::from_der(k.secret_pkcs1_der())
                .map(|k| Signer::Rsa(build(RsaKey(k), domain, selector)))
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

fn build<T: SigningKey>(key: T, domain: &str, selector: &str) -> DkimSigner<T, Done> {
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
            let mut signers = Vec::with_capacity(d.dkim.len());
            for (j, dkim) in d.dkim.iter().enumerate() {
                let field = if d.dkim.len() == 1 {
                    format!("domains[{i}].dkim")
                } else {
                    format!("domains[{i}].dkim[{j}]")
                };
                signers.push(load_key(
                    field,
                    &dkim.key_file,
                    dkim.algorithm,
                    &d.name,
                    &dkim.selector,
                )?);
            }
            // The RSA signature first: it is the one every verifier understands.
            signers.sort_by_key(|s| matches!(s, Signer::Ed25519(_)));
            if !signers.is_empty() {
                by_domain.insert(d.name.to_ascii_lowercase(), signers);
            }
        }
        Ok(Signers { by_domain })
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The DKIM-Signature header(s) for a message made of `parts` (headers first), or None when its From:
    /// domain has no key. Errors are logged and the message goes out without that signature rather than
    /// being refused.
    pub fn sign(&self, parts: &[&[u8]]) -> Option<String> {
        if self.by_domain.is_empty() {
            return None;
        }
        let domain = from_domain(parts)?;
        let mut headers = String::new();
        for signer in self.by_domain.get(&domain)? {
            let result = match signer {
                Signer::Rsa(s) => s
                    .sign_chained(parts.iter().copied())
                    .map(|sig| sig.to_header()),
                Signer::Ed25519(s) => s
                    .sign_chained(parts.iter().copied())
                    .map(|sig| sig.to_header()),
            };
            match result {
                Ok(h) => headers.push_str(&h),
                Err(e) => {
                    tracing::warn!(domain = %domain, error = %e, "DKIM signing failed; the message goes without this signature")
                }
            }
        }
        (!headers.is_empty()).then_some(headers)
    }
}

/// The From: domain of a message (lower case), from its header section.
fn from_domain(parts: &[&[u8]]) -> Option<String> {
    // The parts are the headers the relay added (never a From:) and then the message as received: only the
    // last one needs parsing.
    let msg = MessageParser::default().parse_headers(parts.last()?)?;
    let addr = msg.from()?.first()?.address()?;
    addr.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use std::borrow::Borrow;
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    use mail_auth::common::parse::TxtRecordParser;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::{
        AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
    };

    use super::*;

    /// A DNS cache holding the test's DKIM records, so mail-auth's verifier never asks the network.
    struct MapCache<K, V>(Mutex<HashMap<K, V>>);

    impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for MapCache<K, V> {
        fn get<Q>(&self, name: &Q) -> Option<V>
        where
            K: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().get(name).cloned()
        }
        fn remove<Q>(&self, name: &Q) -> Option<V>
        where
            K: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().remove(name)
        }
        fn insert(&self, key: K, value: V, _valid_until: Instant) {
            self.0.lock().unwrap().insert(key, value);
        }
    }

    /// An RSA key (PKCS#8 PEM, and the same key as PKCS#1 PEM beside it: rsa1.pem) and an Ed25519 key, and
    /// their DNS `p=` values: (rsa file, rsa p, ed file, ed p).
    fn keys(dir: &std::path::Path) -> (String, String, String, String) {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let rsa = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let rsa_path = dir.join("rsa.pem");
        std::fs::write(
            &rsa_path,
            rsa.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        std::fs::write(
            dir.join("rsa1.pem"),
            rsa.to_pkcs1_pem(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        let rsa_p = B64.encode(rsa.to_public_key().to_public_key_der().unwrap().as_bytes());
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair;
        let ed_p = B64.encode(pair.public_key().as_ref());
        let ed_path = dir.join("ed.pem");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            B64.encode(pkcs8.as_ref())
        );
        std::fs::write(&ed_path, pem).unwrap();
        (
            rsa_path.display().to_string(),
            rsa_p,
            ed_path.display().to_string(),
            ed_p,
        )
    }

    #[tokio::test]
    async fn signatures_verify_with_mail_auths_verifier_and_tampering_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (rsa_file, rsa_p, ed_file, ed_p) = keys(dir.path());
        let rsa1_file = dir.path().join("rsa1.pem").display().to_string();
        let config = Config::parse(&format!(
            r#"
hostname: relay.test
spool_dir: s
listeners: [{{ name: a, address: "127.0.0.1:1" }}]
domains:
  - {{ name: rsa.test, dkim: {{ selector: s1, algorithm: rsa-sha256, key_file: "{rsa_file}" }} }}
  - {{ name: ed.test, dkim: {{ selector: s2, algorithm: ed25519-sha256, key_file: "{ed_file}" }} }}
  - name: both.test
    dkim:
      - {{ selector: e1, algorithm: ed25519-sha256, key_file: "{ed_file}" }}
      - {{ selector: r1, algorithm: rsa-sha256, key_file: "{rsa1_file}" }}
"#
        ))
        .unwrap();
        // both.test's RSA key is the PKCS#1 ("BEGIN RSA PRIVATE KEY") copy: both encodings load.
        let signers = Signers::load(&config).unwrap();
        let txt: MapCache<String, Txt> = MapCache(Mutex::new(HashMap::new()));
        let far = Instant::now() + Duration::from_secs(3600);
        for (name, record) in [
            (
                "s1._domainkey.rsa.test.",
                format!("v=DKIM1; k=rsa; p={rsa_p}"),
            ),
            (
                "s2._domainkey.ed.test.",
                format!("v=DKIM1; k=ed25519; p={ed_p}"),
            ),
            (
                "r1._domainkey.both.test.",
                format!("v=DKIM1; k=rsa; p={rsa_p}"),
            ),
            (
                "e1._domainkey.both.test.",
                format!("v=DKIM1; k=ed25519; p={ed_p}"),
            ),
        ] {
            txt.insert(
                name.to_owned(),
                Txt::from(DomainKey::parse(record.as_bytes()).unwrap()),
                far,
            );
        }
        let auth = MessageAuthenticator::new_system_conf()
            .or_else(|_| MessageAuthenticator::new_cloudflare())
            .unwrap();
        for (domain, want) in [
            ("rsa.test", &["rsa-sha256"][..]),
            ("ed.test", &["ed25519-sha256"]),
            // both keys: both signatures, RSA first
            ("both.test", &["rsa-sha256", "ed25519-sha256"]),
        ] {
            let prefix = "Received: from x by relay.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n";
            let body =
                format!("From: App <app@{domain}>\r\nTo: x@y.test\r\nSubject: hi\r\n\r\nline\r\n");
            let sig = signers
                .sign(&[prefix.as_bytes(), body.as_bytes()])
                .expect("signed");
            let algorithms: Vec<&str> = sig
                .split("DKIM-Signature:")
                .skip(1)
                .filter_map(|h| h.split(';').find_map(|t| t.trim().strip_prefix("a=")))
                .collect();
            assert_eq!(algorithms, want, "{sig}");
            for (tamper, want_pass) in [(false, true), (true, false)] {
                let mut full = format!("{sig}{prefix}{body}");
                if tamper {
                    full = full.replace("line\r\n", "lime\r\n");
                }
                let msg = AuthenticatedMessage::parse(full.as_bytes()).unwrap();
                let out = auth
                    .verify_dkim(Parameters::new(&msg).with_txt_cache(&txt))
                    .await;
                assert_eq!(out.len(), want.len(), "{domain}");
                for o in &out {
                    let pass = *o.result() == DkimResult::Pass;
                    assert_eq!(
                        pass,
                        want_pass,
                        "{domain} tampered={tamper}: {:?}",
                        o.result()
                    );
                }
            }
        }
        assert!(
            signers
                .sign(&[b"From: a@other.test\r\n\r\nx\r\n"])
                .is_none()
        );
    }

    #[test]
    fn a_key_that_does_not_fit_its_algorithm_is_an_error_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let (rsa_file, _, ed_file, _) = keys(dir.path());
        for (algorithm, file, want) in [
            ("rsa-sha256", &ed_file, "not an RSA key"),
            ("ed25519-sha256", &rsa_file, "not an Ed25519 key"),
        ] {
            let config = Config::parse(&format!(
                r#"
hostname: relay.test
spool_dir: s
listeners: [{{ name: a, address: "127.0.0.1:1" }}]
domains:
  - {{ name: a.test, dkim: {{ selector: s1, algorithm: {algorithm}, key_file: "{file}" }} }}
"#
            ))
            .unwrap();
            let e = Signers::load(&config).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("domains[0].dkim.key_file {file}: {want}")),
                "{e}"
            );
        }
    }
}
