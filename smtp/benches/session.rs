//! The accept path's protocol work: one SMTP session, from the client's bytes to the `Accept` action and the
//! final reply, for a 2 KB and a 100 KB message. No I/O and no spool: this is the part of an accept that
//! `herald-smtp` owns (command parsing, dot-unstuffing, the body buffer), measured apart from the relay.
//! `cargo bench -p herald-smtp`; CI only compiles it (`cargo bench --workspace --no-run` in tests/run).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald_smtp::{
    Action, EnvelopePolicy, Limits, Mailbox, ReversePath, Session, SessionConfig, Verdict, reply,
};

/// Accepts every sender and recipient: the relay's policy answers from memory too, and its cost is not what
/// this measures.
struct AcceptAll;

impl EnvelopePolicy for AcceptAll {
    fn mail_from(&self, _: &ReversePath, _: Option<&str>) -> Verdict {
        Verdict::Accept
    }

    fn rcpt_to(&self, _: &Mailbox, _: Option<&str>) -> Verdict {
        Verdict::Accept
    }
}

/// A whole pipelined session carrying one message of about `size` bytes: 78-character body lines, as
/// tests/bench's sender writes them, a few of them starting with a dot so unstuffing has work.
fn session_bytes(size: usize) -> Vec<u8> {
    let mut s = b"EHLO client.bench.test\r\nMAIL FROM:<sender@bench.test>\r\n\
RCPT TO:<rcpt@dest.test>\r\nDATA\r\n\
From: <sender@bench.test>\r\nTo: <rcpt@dest.test>\r\nSubject: bench\r\n\
Message-ID: <1@bench.test>\r\n\r\n"
        .to_vec();
    let mut n = 0;
    while s.len() < size {
        let lead = if n % 50 == 0 { ".." } else { "" };
        s.extend_from_slice(format!("{lead}{n:08} {}\r\n", "x".repeat(68)).as_bytes());
        n += 1;
    }
    s.extend_from_slice(b".\r\nQUIT\r\n");
    s
}

fn config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "bench.herald.test".into(),
        starttls: false,
        auth_required: false,
        limits: Limits {
            max_message_size: 10 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 10,
            max_line_length: 1000,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
        },
        budget: None,
    })
}

/// Runs one session over `input` and returns the accepted body's length.
fn run_session(config: &Arc<SessionConfig>, peer: SocketAddr, input: &[u8]) -> usize {
    let mut session = Session::new(config.clone(), AcceptAll, peer, None);
    let mut pos = 0;
    let mut body_len = 0;
    loop {
        let (used, action) = session.process(&input[pos..]);
        pos += used;
        session.output().clear();
        match action {
            Action::Accept(envelope) => {
                body_len = envelope.body.len();
                session.message_result(Ok(reply::OK));
            }
            Action::Close => return body_len,
            Action::NeedInput if pos == input.len() => return body_len,
            Action::NeedInput => {}
            other => panic!("unexpected action {other:?}"),
        }
    }
}

fn accept(c: &mut Criterion) {
    let config = config();
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("a literal address");
    let mut group = c.benchmark_group("session_accept");
    for size in [2 * 1024, 100 * 1024] {
        let input = session_bytes(size);
        // A bench that silently accepted nothing would measure nothing.
        assert!(
            run_session(&config, peer, &input) > size / 2,
            "no message accepted"
        );
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &input, |b, input| {
            b.iter(|| run_session(&config, peer, black_box(input)))
        });
    }
    group.finish();
}

criterion_group!(benches, accept);
criterion_main!(benches);
