//! Tests of the DKIM signer: the streaming body canonicalization against the RFC and mail-auth, and
//! signatures checked with mail-auth's verifier.

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

/// Signers for rsa.test (RSA), ed.test (Ed25519) and both.test (both; its RSA key is the PKCS#1 copy), the
/// DNS records of their keys, and a verifier.
struct Fixture {
    _dir: tempfile::TempDir,
    signers: Signers,
    txt: MapCache<String, Txt>,
    auth: MessageAuthenticator,
}

/// The domains of the fixture and the algorithms of their signatures, in order.
const DOMAINS: &[(&str, &[&str])] = &[
    ("rsa.test", &["rsa-sha256"]),
    ("ed.test", &["ed25519-sha256"]),
    // both keys: both signatures, RSA first
    ("both.test", &["rsa-sha256", "ed25519-sha256"]),
];

fn fixture() -> Fixture {
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
    Fixture {
        _dir: dir,
        signers,
        txt,
        auth,
    }
}

impl Fixture {
    /// mail-auth's verdict on each DKIM signature of `message`: true for a pass.
    async fn verify(&self, message: &[u8]) -> Vec<bool> {
        let msg = AuthenticatedMessage::parse(message).unwrap();
        self.auth
            .verify_dkim(Parameters::new(&msg).with_txt_cache(&self.txt))
            .await
            .iter()
            .map(|o| *o.result() == DkimResult::Pass)
            .collect()
    }
}

/// The `a=` values of the DKIM-Signature fields in `sig`, in order.
fn algorithms(sig: &str) -> Vec<&str> {
    sig.split("DKIM-Signature:")
        .skip(1)
        .filter_map(|h| h.split(';').find_map(|t| t.trim().strip_prefix("a=")))
        .collect()
}

/// The value of tag `tag` in one DKIM-Signature field, unfolded.
fn tag(sig: &str, tag: &str) -> String {
    let unfolded: String = sig
        .chars()
        .filter(|c| !matches!(c, '\r' | '\n' | '\t' | ' '))
        .collect();
    unfolded
        .split(';')
        .find_map(|t| t.strip_prefix(&format!("{tag}=")))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn signatures_verify_with_mail_auths_verifier_and_tampering_fails() {
    let f = fixture();
    for &(domain, want) in DOMAINS {
        let prefix = "Received: from x by relay.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n";
        let body =
            format!("From: App <app@{domain}>\r\nTo: x@y.test\r\nSubject: hi\r\n\r\nline\r\n");
        let sig = f
            .signers
            .sign(&[prefix.as_bytes(), body.as_bytes()])
            .expect("signed");
        assert_eq!(algorithms(&sig), want, "{sig}");
        for (tamper, want_pass) in [(false, true), (true, false)] {
            let mut full = format!("{sig}{prefix}{body}");
            if tamper {
                full = full.replace("line\r\n", "lime\r\n");
            }
            let out = f.verify(full.as_bytes()).await;
            assert_eq!(
                out,
                vec![want_pass; want.len()],
                "{domain} tampered={tamper}"
            );
        }
    }
    assert!(
        f.signers
            .sign(&[b"From: a@other.test\r\n\r\nx\r\n"])
            .is_none()
    );
}

/// The relaxed body canonicalization of RFC 6376 section 3.4.4, written out plainly: split at CRLF, each
/// line's WSP runs to one SP and its trailing WSP gone, the empty lines at the end dropped, every line
/// ended with CRLF.
fn reference_body(body: &[u8]) -> Vec<u8> {
    let mut lines = Vec::new();
    let mut rest = body;
    while let Some(i) = memchr::memmem::find(rest, b"\r\n") {
        lines.push(&rest[..i]);
        rest = &rest[i + 2..];
    }
    // What follows the last CRLF: a last line without its CRLF, or nothing (an empty line, dropped below).
    lines.push(rest);
    let mut lines: Vec<Vec<u8>> = lines
        .into_iter()
        .map(|line| {
            let mut out = Vec::new();
            let mut in_wsp = false;
            for &b in line {
                if b == b' ' || b == b'\t' {
                    if !in_wsp {
                        out.push(b' ');
                    }
                    in_wsp = true;
                } else {
                    out.push(b);
                    in_wsp = false;
                }
            }
            if out.last() == Some(&b' ') {
                out.pop();
            }
            out
        })
        .collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
        .into_iter()
        .flat_map(|mut l| {
            l.extend_from_slice(b"\r\n");
            l
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

fn mail_auth_body(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Canonicalization::Relaxed
        .canonical_body(body, u64::MAX)
        .write(&mut out);
    out
}

fn hash_in(chunks: &[&[u8]]) -> [u8; 32] {
    let mut h = BodyHasher::new();
    for c in chunks {
        h.update(c);
    }
    h.finish()
}

/// Bodies that exercise every rule, and whether mail-auth's canonicalizer gives the RFC's result for them.
fn tricky_bodies() -> Vec<(Vec<u8>, bool)> {
    let long = format!(
        "{}\r\n{}\r\n{}",
        "x".repeat(1500),
        "y ".repeat(700),
        "z\t".repeat(600)
    );
    [
        (&b""[..], true),
        (b"\r\n", true),
        (b"\r\n\r\n\r\n", true),
        (b"a", true),
        (b"a\r\nb", true),
        (b"line one\r\nline two\r\n", true),
        (b"a  b\t\tc \t d\r\n", true),
        (b" leading\r\n\tTab lead\r\n  \t two\r\n", true),
        (b"trailing ws  \t\r\nnext \r\n", true),
        (b"text\r\n\r\n\r\n\r\n", true),
        (b"a\r\n \r\nb\r\n", true),
        (b"a\r\n\r\nb  \r\n\r\n", true),
        (b"no final crlf  ", true),
        (b"para\r\n\r\n\r\npara two\r\n\r\n", true),
        (long.as_bytes(), true),
        // A line of only WSP at the end is an empty line once its WSP has gone, and so dropped (RFC 6376
        // 3.4.4); mail-auth 0.7 keeps it as a CRLF.
        (b"text\r\n \r\n\t\r\n", false),
        (b" \t \r\n", false),
        (b"a\r\n\r\n \t", false),
        // A lone CR or LF is not a line end here (mail-auth drops every CR); the SMTP readers refuse both.
        (b"a\rb\r\n", false),
        (b"a\nb\r\n", false),
        (b"a\r\n\r", false),
        (b"a \r", false),
    ]
    .into_iter()
    .map(|(b, agrees)| (b.to_vec(), agrees))
    .collect()
}

#[test]
fn the_body_hash_is_the_rfcs_whatever_the_split() {
    for (body, mail_auth_agrees) in tricky_bodies() {
        let want = sha256(&reference_body(&body));
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        assert_eq!(hash_in(&[&body]), want, "one piece: {shown:?}");
        // Every split point, including between CR and LF and inside WSP runs.
        for k in 0..=body.len() {
            assert_eq!(
                hash_in(&[&body[..k], &body[k..]]),
                want,
                "split at {k}: {shown:?}"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(hash_in(&bytes), want, "a byte at a time: {shown:?}");
        if mail_auth_agrees {
            assert_eq!(
                reference_body(&body),
                mail_auth_body(&body),
                "mail-auth: {shown:?}"
            );
        } else {
            assert_ne!(
                reference_body(&body),
                mail_auth_body(&body),
                "mail-auth: {shown:?}"
            );
        }
    }
    // RFC 6376 3.4.4: an empty body is the empty string; so is one of only empty lines.
    assert_eq!(
        B64.encode(hash_in(&[b"\r\n\r\n"])),
        "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    );
}

proptest::proptest! {
    #[test]
    fn any_body_in_any_chunks_hashes_as_the_rfc_says(
        body in proptest::collection::vec(proptest::sample::select(&b"ab \t\r\n"[..]), 0..200),
        cuts in proptest::collection::vec(0usize..200, 0..6),
    ) {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut from = 0;
        for c in cuts {
            chunks.push(&body[from..c]);
            from = c;
        }
        chunks.push(&body[from..]);
        proptest::prop_assert_eq!(hash_in(&chunks), sha256(&reference_body(&body)));
    }
}

/// A message's header section from `domain`, with its blank line.
fn header(domain: &str) -> String {
    format!(
        "From: App <app@{domain}>\r\nTo: x@y.test\r\nSubject: hi\r\nMessage-ID: <1@{domain}>\r\n\r\n"
    )
}

#[tokio::test]
async fn signatures_over_a_streamed_body_hash_verify_with_mail_auth_and_tampering_fails() {
    let f = fixture();
    let prefix = b"Received: from x by relay.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n";
    let long_lines = format!("{}\r\n", "x".repeat(990)).repeat(5);
    let mut megabyte = Vec::new();
    let mut n = 0;
    while megabyte.len() < 1 << 20 {
        megabyte.extend_from_slice(format!("{n:08} {}  \tword\r\n", "y".repeat(60)).as_bytes());
        n += 1;
    }
    let crlfs = b"first\r\n\r\nsecond\r\nthird \r\n".repeat(50);
    // Each body as the pieces the hasher is fed.
    let cases: Vec<(&str, Vec<&[u8]>)> = vec![
        ("long lines", vec![long_lines.as_bytes()]),
        ("trailing blank lines", vec![b"text\r\n\r\n\r\n\r\n"]),
        ("empty body", vec![]),
        (
            "WSP runs",
            vec![b"a  \t b\r\n\t indented\t \r\n  x\r\nend\r\n"],
        ),
        ("1 MB", vec![&megabyte]),
        (
            "split mid-CRLF",
            crlfs.split_inclusive(|&b| b == b'\r').collect(),
        ),
        ("1 MB in 8 KB chunks", megabyte.chunks(8192).collect()),
    ];
    for &(domain, want) in DOMAINS {
        let header = header(domain);
        for (i, (name, chunks)) in cases.iter().enumerate() {
            let body = chunks.concat();
            let body = body.as_slice();
            let mut hasher = BodyHasher::new();
            for c in chunks {
                hasher.update(c);
            }
            let bh = hasher.finish();
            // The header block with and without its blank line: the same signature either way.
            let block = if i % 2 == 0 {
                header.as_bytes()
            } else {
                header.strip_suffix("\r\n").unwrap().as_bytes()
            };
            assert_eq!(
                f.signers.signing_domain(block).as_deref(),
                Some(domain),
                "{name}"
            );
            let sig = f
                .signers
                .sign_with_body_hash(domain, &[prefix, block], &bh)
                .expect("signed");
            assert_eq!(algorithms(&sig), want, "{domain} {name}: {sig}");
            let message = [sig.as_bytes(), prefix, header.as_bytes(), body].concat();
            assert_eq!(
                f.verify(&message).await,
                vec![true; want.len()],
                "{domain} {name}"
            );
            let tampered = [message.as_slice(), b"added\r\n"].concat();
            assert_eq!(
                f.verify(&tampered).await,
                vec![false; want.len()],
                "{domain} {name}: an added line"
            );
            let tampered = [
                sig.as_bytes(),
                prefix,
                header.replace("Subject: hi", "Subject: ho").as_bytes(),
                body,
            ]
            .concat();
            assert_eq!(
                f.verify(&tampered).await,
                vec![false; want.len()],
                "{domain} {name}: another Subject"
            );
        }
    }
}

#[test]
fn the_signature_is_the_one_mail_auths_signer_makes() {
    // Ed25519 signatures are deterministic: for a body where mail-auth follows the RFC, the same template,
    // header fields and second give the same field, byte for byte.
    let f = fixture();
    let Some([Signer::Ed25519(signer)]) = f.signers.by_domain.get("ed.test").map(Vec::as_slice)
    else {
        panic!("ed.test has one Ed25519 signer");
    };
    let prefix = b"Received: from x by relay.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n";
    let header = "From: App <app@ed.test>\r\nto: x@y.test\r\nSubject:  spaced \r\n\tfolded\r\n\
Cc: c@y.test\r\nX-Other: not signed\r\nFrom: Second <b@ed.test>\r\n\r\n";
    let body = b"a  b\r\n\r\nc\t\r\n\r\n";
    // Bounded: the two signers read the clock separately, so a second may tick between them.
    for _ in 0..5 {
        let message = [header.as_bytes(), body].concat();
        let theirs = signer
            .sign_chained([&prefix[..], &message].into_iter())
            .unwrap()
            .to_header();
        let ours = f
            .signers
            .sign_with_body_hash("ed.test", &[prefix, header.as_bytes()], &hash_in(&[body]))
            .unwrap();
        if tag(&theirs, "t") == tag(&ours, "t") {
            assert_eq!(ours, theirs);
            assert_eq!(
                tag(&ours, "h"),
                "From:Cc:Subject:to:From:From:Date:Message-ID:Reply-To:In-Reply-To:References:MIME-Version:Content-Type:Content-Transfer-Encoding:List-Unsubscribe:List-Unsubscribe-Post"
            );
            return;
        }
    }
    panic!("the clock ticked between the two signatures five times");
}

#[test]
fn the_signing_domain_is_the_from_domain_when_it_has_keys() {
    let f = fixture();
    for (header, want) in [
        (&b"From: app@rsa.test\r\n\r\n"[..], Some("rsa.test")),
        (b"From: app@rsa.test\r\n", Some("rsa.test")),
        (
            b"Subject: x\r\nFROM: \"Doe, J.\" <j@Ed.TEST>\r\n\r\n",
            Some("ed.test"),
        ),
        (
            b"From:\r\n =?utf-8?q?App_=C3=A9?=\r\n <app@both.test>\r\nTo: x@y.test\r\n\r\n",
            Some("both.test"),
        ),
        (b"From: App <app@other.test>\r\n\r\n", None),
        (b"To: x@rsa.test\r\nSubject: no From\r\n\r\n", None),
        (b"From: not an address\r\n\r\n", None),
        (b"", None),
    ] {
        assert_eq!(
            f.signers.signing_domain(header).as_deref(),
            want,
            "{}",
            String::from_utf8_lossy(header)
        );
    }
    assert_eq!(
        Signers::default().signing_domain(b"From: app@rsa.test\r\n\r\n"),
        None
    );
}

#[test]
fn a_message_splits_at_its_blank_line() {
    assert_eq!(
        split_message(b"A: b\r\n\r\nbody\r\n"),
        (&b"A: b\r\n\r\n"[..], &b"body\r\n"[..])
    );
    assert_eq!(split_message(b"\r\nbody"), (&b"\r\n"[..], &b"body"[..]));
    assert_eq!(split_message(b"A: b\r\n"), (&b"A: b\r\n"[..], &b""[..]));
    let fields: Vec<_> =
        HeaderFields::new(b"A: 1\r\nno colon\r\nB:\r\n 2\r\n\r\nC: 3\r\n").collect();
    assert_eq!(fields, [(&b"A"[..], &b" 1\r\n"[..]), (b"B", b"\r\n 2\r\n")]);
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
