//! The relay's share of an accept: the spool append of a message (record encoding, the group-committed
//! write and its `fdatasync`) into a temporary directory, and the DKIM signing pass over a 100 KB message
//! with an RSA-2048 and an Ed25519 key through `dkim::Signers`, the API the relay signs with at accept:
//! whole (`sign`) and as the relay streams it (`BodyHasher` fed 8 KB chunks, then `sign_with_body_hash`),
//! beside mail-auth's own signer and body canonicalization, which the relay used before.
//! `cargo bench -p herald-relay`; CI only compiles it (`cargo bench --workspace --no-run` in tests/run).
//!
//! The spool figures depend on the filesystem under `$TMPDIR` (on tmpfs the sync costs nothing).

use std::hint::black_box;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald_config::Config;
use herald_relay::dkim::{BodyHasher, Signers};
use herald_relay::spool::{MessageMeta, RcptState, Spool};
use mail_auth::common::crypto::{Ed25519Key, HashContext, HashImpl, Sha256};
use mail_auth::common::headers::Writable;
use mail_auth::dkim::{Canonicalization, DkimSigner};

/// A message of about `size` bytes: a header section with a From: in bench.test, then 78-character lines.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: <sender@bench.test>\r\nTo: <rcpt@dest.test>\r\nSubject: bench\r\n\
Date: Mon, 7 Dec 2026 03:00:00 +0000\r\nMessage-ID: <1@bench.test>\r\n\r\n"
        .to_vec();
    let mut n = 0;
    while m.len() < size {
        m.extend_from_slice(format!("{n:08} {}\r\n", "x".repeat(68)).as_bytes());
        n += 1;
    }
    m
}

fn meta(spool: &Spool) -> MessageMeta {
    MessageMeta::new(
        spool.next_id(),
        1,
        "trusted".into(),
        "127.0.0.1:40000",
        "sender@bench.test".into(),
        ["rcpt@dest.test"].into_iter().collect(),
    )
}

fn spool_append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (spool, _) = Spool::open(dir.path()).expect("a fresh spool");
    let mut group = c.benchmark_group("spool_append");
    for size in [2 * 1024, 100 * 1024] {
        let body = message(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| {
                let meta = meta(&spool);
                runtime
                    .block_on(spool.store(&meta, &[RcptState::QUEUED], &[black_box(body)]))
                    .expect("the spool stores the message")
            })
        });
    }
    group.finish();
}

/// Writes an RSA-2048 and an Ed25519 key (PKCS#8 PEM, what the relay reads) into `dir`: their files, and
/// the Ed25519 key's PKCS#8 DER.
fn write_keys(dir: &std::path::Path) -> (String, String, Vec<u8>) {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let rsa = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("an RSA key");
    let rsa_path = dir.join("rsa.pem");
    let pem = rsa.to_pkcs8_pem(LineEnding::LF).expect("PEM encoding");
    std::fs::write(&rsa_path, pem.as_bytes()).expect("writing the RSA key");
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("an Ed25519 key");
    let ed_path = dir.join("ed.pem");
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        B64.encode(pkcs8.as_ref())
    );
    std::fs::write(&ed_path, pem).expect("writing the Ed25519 key");
    (
        rsa_path.display().to_string(),
        ed_path.display().to_string(),
        pkcs8.as_ref().to_vec(),
    )
}

fn dkim_sign(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (rsa_file, ed_file, ed_pkcs8) = write_keys(dir.path());
    let body = message(100 * 1024);
    let split = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the message has a blank line")
        + 4;
    let (header, text) = body.split_at(split);

    let mut group = c.benchmark_group("dkim_body_100k");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("mail_auth", |b| {
        b.iter(|| {
            let mut hasher = Sha256::hasher();
            Canonicalization::Relaxed
                .canonical_body(black_box(text), u64::MAX)
                .write(&mut hasher);
            hasher.complete()
        })
    });
    group.bench_function("body_hasher", |b| {
        b.iter(|| {
            let mut hasher = BodyHasher::new();
            for chunk in black_box(text).chunks(8192) {
                hasher.update(chunk);
            }
            hasher.finish()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("dkim_sign_100k");
    group.throughput(Throughput::Bytes(body.len() as u64));
    for (name, algorithm, key) in [
        ("rsa", "rsa-sha256", &rsa_file),
        ("ed25519", "ed25519-sha256", &ed_file),
    ] {
        let config = Config::parse(&format!(
            r#"
hostname: bench.herald.test
spool_dir: s
listeners: [{{ name: a, address: "127.0.0.1:1" }}]
domains:
  - {{ name: bench.test, dkim: {{ selector: s1, algorithm: {algorithm}, key_file: "{key}" }} }}
"#
        ))
        .expect("the bench config parses");
        let signers = Signers::load(&config).expect("the key loads");
        // Signing that silently produced nothing would measure only the From: lookup.
        assert!(signers.sign(&[&body]).is_some(), "{name}: no signature");
        group.bench_function(name, |b| b.iter(|| signers.sign(&[black_box(&body)])));
        group.bench_function(format!("{name}_streamed"), |b| {
            b.iter(|| {
                let domain = signers
                    .signing_domain(black_box(header))
                    .expect("bench.test has a key");
                let mut hasher = BodyHasher::new();
                for chunk in black_box(text).chunks(8192) {
                    hasher.update(chunk);
                }
                signers.sign_with_body_hash(&domain, &[header], &hasher.finish())
            })
        });
    }
    // mail-auth's own signer, what the relay signed with before (its Ed25519 key is the same ring key).
    let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(&ed_pkcs8).expect("the Ed25519 key");
    let signer = DkimSigner::from_key(key)
        .domain("bench.test")
        .selector("s1")
        .headers(["From", "From", "To", "Subject", "Date", "Message-ID"])
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    group.bench_function("ed25519_mail_auth", |b| {
        b.iter(|| signer.sign(black_box(&body)).expect("mail-auth signs"))
    });
    group.finish();
}

criterion_group!(benches, spool_append, dkim_sign);
criterion_main!(benches);
