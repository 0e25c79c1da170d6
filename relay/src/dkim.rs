//! DKIM signing (RFC 6376; Ed25519 per RFC 8463): relaxed body canonicalization of our own, fed to SHA-256
//! as the body arrives, and mail-auth's pieces for the header hash and the signature.
//!
//! A message is signed once, when it is accepted: the signature is stored in the spool with the message,
//! so retries and recipients never sign again. The signing domain is the From: domain (what DMARC aligns
//! on), when it is a configured sending domain; a domain with an RSA and an Ed25519 key gets both
//! signatures (RFC 8463). Relaxed/relaxed canonicalization; From is over-signed (listed once more than it
//! occurs) so a second From cannot be added after signing.
//!
//! The body is hashed once per message, whatever the number of keys, by a [`BodyHasher`] that the receiving
//! side feeds chunk by chunk as the body arrives, so no whole copy of the body is needed; at the end of
//! data [`Signers::sign_with_body_hash`] hashes the header section and signs. mail-auth's own signer wants
//! the whole message and canonicalizes the body one byte per hasher call (~1.3 ms per 100 KB); the
//! [`BodyHasher`] copies runs of bytes that canonicalization leaves alone straight into SHA-256.
//!
//! RSA signs through aws-lc-rs rather than mail-auth's ring-backed key: at one signature per message the
//! RSA private-key operation was most of the relay's CPU time, and ring's takes ~1.8x as long as
//! aws-lc-rs's (RSA-2048 on the 2-core benchmark machine: ~585 µs against ~320 µs, which is what `openssl
//! speed` gives). Ed25519 stays on ring, where a signature costs ~26 µs.

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
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

    /// The DKIM-Signature header(s) for a whole message made of `parts`: the headers the relay added (whole
    /// header fields), then the message as received. None when its From: domain has no key. Errors are
    /// logged and the message goes out without that signature rather than being refused.
    pub fn sign(&self, parts: &[&[u8]]) -> Option<String> {
        if self.by_domain.is_empty() {
            return None;
        }
        let (message, added) = parts.split_last()?;
        let (header, body) = split_message(message);
        let domain = self.signing_domain(header)?;
        let mut hasher = BodyHasher::new();
        hasher.update(body);
        let mut headers = added.to_vec();
        headers.push(header);
        self.sign_with_body_hash(&domain, &headers, &hasher.finish())
    }

    /// The lower-case From: domain of a message's header section, when that domain has keys; None otherwise
    /// (no From, unparsable, no key). `header` is the header section as received, with or without the
    /// blank line that ends it.
    pub fn signing_domain(&self, header: &[u8]) -> Option<String> {
        if self.by_domain.is_empty() {
            return None;
        }
        let msg = MessageParser::default().parse_headers(header)?;
        let addr = msg.from()?.first()?.address()?;
        let domain = addr.rsplit_once('@')?.1.to_ascii_lowercase();
        self.by_domain.contains_key(&domain).then_some(domain)
    }

    /// The DKIM-Signature header field(s) of `domain` (as `signing_domain` gives it; RSA first, each ending
    /// in CRLF) over the header section made of the pieces in `headers` (concatenated, with or without its
    /// final blank line) and a body hash from a [`BodyHasher`], which serves every key of the domain. A
    /// signature that fails is logged and left out; None when none was made.
    pub fn sign_with_body_hash(
        &self,
        domain: &str,
        headers: &[&[u8]],
        body_hash: &[u8; 32],
    ) -> Option<String> {
        let signers = self.by_domain.get(domain)?;
        // A few KB: one copy spares the field parser pieces that might split a field.
        let section = headers.concat();
        let fields: Vec<(&[u8], &[u8])> = HeaderFields::new(&section).collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let bh = B64.encode(body_hash).into_bytes();
        let mut out = String::new();
        for signer in signers {
            let result = match signer {
                Signer::Rsa(s) => assemble(s, &fields, &bh, now),
                Signer::Ed25519(s) => assemble(s, &fields, &bh, now),
            };
            match result {
                Ok(h) => out.push_str(&h),
                Err(e) => {
                    tracing::warn!(domain = %domain, error = %e, "DKIM signing failed; the message goes without this signature")
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

/// One signature over the selected header fields (`fields` in message order) and the base64 body hash `bh`,
/// made as mail-auth's `DkimSigner::sign` makes it from the signer's template: the listed fields present are
/// hashed bottom-up; the `h=` tag names them, then every listed name that matched nothing, which is what
/// over-signs From (SIGNED_HEADERS lists it twice).
fn assemble<T: SigningKey>(
    signer: &DkimSigner<T, Done>,
    fields: &[(&[u8], &[u8])],
    bh: &[u8],
    now: u64,
) -> mail_auth::Result<String> {
    let template = &signer.template;
    let mut found = vec![false; template.h.len()];
    let mut selected = Vec::with_capacity(template.h.len());
    let mut names = Vec::with_capacity(template.h.len() + 1);
    for &(name, value) in fields {
        if let Some(pos) = template
            .h
            .iter()
            .position(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        {
            found[pos] = true;
            selected.push((name, value));
            names.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    if selected.is_empty() {
        return Err(mail_auth::Error::NoHeadersFound);
    }
    names.reverse();
    for (h, found) in template.h.iter().zip(found) {
        if !found {
            names.push(h.clone());
        }
    }
    let mut signature = template.clone();
    signature.bh = bh.to_vec();
    signature.t = now;
    signature.x = if template.x > 0 { now + template.x } else { 0 };
    signature.h = names;
    let mut signed = Vec::with_capacity(1024);
    signature
        .ch
        .canonicalize_headers(selected.into_iter().rev(), &mut signed);
    signature.write(&mut signed, false);
    let b = signer.key.sign(signed.as_slice())?;
    signature.b = B64.encode(b).into_bytes();
    Ok(signature.to_header())
}

/// A message's header section (through the blank line) and its body. A message that starts with the blank
/// line has no header fields; one without a blank line is all header. Lines end in CRLF: the SMTP readers
/// refuse a bare CR or LF.
fn split_message(message: &[u8]) -> (&[u8], &[u8]) {
    if message.starts_with(b"\r\n") {
        return message.split_at(2);
    }
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(i) => message.split_at(i + 4),
        None => (message, b""),
    }
}

/// The fields of a header section as (name, value) pairs, the value from after the colon through its final
/// CRLF (folds included), up to the blank line; the split mail-auth's `canonicalize_headers` takes.
/// mail-auth's own iterator is private to it. A line without a colon is not a field and is skipped.
struct HeaderFields<'a> {
    rest: &'a [u8],
}

impl<'a> HeaderFields<'a> {
    fn new(section: &'a [u8]) -> Self {
        HeaderFields { rest: section }
    }
}

impl<'a> Iterator for HeaderFields<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.rest.is_empty() || self.rest.starts_with(b"\r\n") || self.rest[0] == b'\n' {
                return None;
            }
            // The field ends at the first LF not followed by a fold (SP or HT).
            let mut end = self.rest.len();
            let mut from = 0;
            while let Some(lf) = memchr::memchr(b'\n', &self.rest[from..]) {
                let at = from + lf + 1;
                if !matches!(self.rest.get(at), Some(b' ' | b'\t')) {
                    end = at;
                    break;
                }
                from = at;
            }
            let (field, rest) = self.rest.split_at(end);
            self.rest = rest;
            if let Some(colon) = memchr::memchr(b':', field) {
                return Some((&field[..colon], &field[colon + 1..]));
            }
        }
    }
}

/// RFC 6376 relaxed body canonicalization (section 3.4.4) as a byte state machine feeding an incremental
/// SHA-256: the body may come in any split, mid-CRLF and mid-whitespace-run included.
///
/// The rules: a run of WSP (SP, HT) within a line becomes one SP; WSP at the end of a line goes; the empty
/// lines at the end of the body go (a line of only WSP is empty once its WSP has gone); a non-empty body
/// that does not end in CRLF gets one; an empty body hashes the empty string. Lines end in CRLF; a lone CR
/// or LF is an ordinary byte (the SMTP readers refuse them anyway).
///
/// Unlike mail-auth 0.7's canonicalizer, a line of only WSP at the end of the body is dropped like any other
/// trailing empty line, as the RFC says (mail-auth keeps it as an empty line: `"a\r\n \r\n"` hashes as
/// `"a\r\n\r\n"` there, `"a\r\n"` here and in dkimpy and OpenDKIM).
///
/// Most of a body is left as it is by canonicalization (words parted by one SP, lines that end in a
/// non-WSP byte): such runs go to SHA-256 straight from the caller's slice; only the bytes around a change
/// (a WSP run, trailing WSP, empty lines) take the byte-at-a-time path, whose output is buffered.
pub struct BodyHasher {
    ctx: digest::Context,
    /// Canonical output of the byte-at-a-time path not yet given to `ctx`.
    out: Vec<u8>,
    /// Empty lines seen and not yet written: they are only written if something but empty lines follows.
    blank_lines: u64,
    /// A WSP run was seen in the current line: one SP if a non-WSP byte follows on the line, else nothing.
    wsp: bool,
    /// The last byte was a CR: the end of a line if an LF follows.
    cr: bool,
    /// The current line has a byte other than WSP.
    content: bool,
}

impl std::fmt::Debug for BodyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyHasher")
            .field("blank_lines", &self.blank_lines)
            .field("wsp", &self.wsp)
            .field("cr", &self.cr)
            .field("content", &self.content)
            .finish_non_exhaustive()
    }
}

impl Default for BodyHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// The byte-at-a-time path hands `out` to SHA-256 when it holds this much.
const OUT_FLUSH: usize = 8192;

impl BodyHasher {
    pub fn new() -> BodyHasher {
        BodyHasher {
            ctx: digest::Context::new(&digest::SHA256),
            out: Vec::with_capacity(OUT_FLUSH),
            blank_lines: 0,
            wsp: false,
            cr: false,
            content: false,
        }
    }

    /// Feeds the next bytes of the body.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            if self.wsp || self.cr || self.blank_lines > 0 {
                self.step(bytes[i]);
                i += 1;
                continue;
            }
            let start = i;
            i = self.verbatim(bytes, i);
            if i > start {
                self.flush_out();
                self.ctx.update(&bytes[start..i]);
            }
            if let Some(&b) = bytes.get(i) {
                self.step(b);
                i += 1;
            }
        }
    }

    /// The body hash (the `bh=` value before base64).
    pub fn finish(mut self) -> [u8; 32] {
        if self.cr {
            self.cr = false;
            self.byte(b'\r');
        }
        if self.content {
            self.emit(b"\r\n");
        }
        self.flush_out();
        let mut hash = [0; 32];
        hash.copy_from_slice(self.ctx.finish().as_ref());
        hash
    }

    /// The end of the run, from `i`, that canonicalization leaves unchanged, given no pending WSP, CR or
    /// empty line: bytes other than WSP and CR, single SPs followed by such a byte, and CRLFs ending a line
    /// with content. Stops at the first byte that needs `step` (or the end).
    fn verbatim(&mut self, bytes: &[u8], mut i: usize) -> usize {
        loop {
            let Some(off) = memchr::memchr3(b' ', b'\t', b'\r', &bytes[i..]) else {
                self.content |= i < bytes.len();
                return bytes.len();
            };
            let p = i + off;
            self.content |= off > 0;
            match (bytes[p], bytes.get(p + 1)) {
                (b' ', Some(&next)) if !matches!(next, b' ' | b'\t' | b'\r') => {
                    self.content = true;
                    i = p + 2;
                }
                (b'\r', Some(b'\n')) if self.content => {
                    self.content = false;
                    i = p + 2;
                }
                _ => return p,
            }
        }
    }

    /// One byte through the state machine.
    fn step(&mut self, b: u8) {
        if self.cr {
            self.cr = false;
            if b == b'\n' {
                if self.content {
                    self.emit(b"\r\n");
                } else {
                    self.blank_lines += 1;
                }
                self.wsp = false;
                self.content = false;
                return;
            }
            self.byte(b'\r');
        }
        match b {
            b' ' | b'\t' => self.wsp = true,
            b'\r' => self.cr = true,
            _ => self.byte(b),
        }
    }

    /// A byte of content: the empty lines and the WSP run before it are written first.
    fn byte(&mut self, b: u8) {
        while self.blank_lines > 0 {
            self.blank_lines -= 1;
            self.emit(b"\r\n");
        }
        if self.wsp {
            self.wsp = false;
            self.emit(b" ");
        }
        self.emit(&[b]);
        self.content = true;
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
        if self.out.len() >= OUT_FLUSH {
            self.flush_out();
        }
    }

    fn flush_out(&mut self) {
        if !self.out.is_empty() {
            self.ctx.update(&self.out);
            self.out.clear();
        }
    }
}

#[cfg(test)]
mod tests;
