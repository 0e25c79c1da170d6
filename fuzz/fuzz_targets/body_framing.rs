//! DATA and BDAT framing (`herald_smtp::body`): dot-unstuffing, the end-of-data line, CRLF discipline and
//! the size and line limits, fed in pieces of the fuzzer's choosing.
//!
//! Checked, for DATA: whether the body is accepted, what it is and where it ended do not depend on how the
//! input was cut into reads (which of several faults is reported may: a line found too long
//! before its bare CR arrived is reported as too long, and either way the reply is 554 5.6.0); an
//! accepted body has only CRLF line endings and no line over the limit, and a sender that dot-stuffs it and
//! ends it with `.` CRLF (as RFC 5321 section 4.5.2 says) gets the same body read back. For BDAT: acceptance and the body do not depend
//! on where the chunks are cut, and an accepted body is the chunks' bytes unchanged.
//!
//! Input: the size limit (`u16` LE modulo 1000), the line length limit (3 + the byte modulo 98), a count
//! `n` (modulo 16), `n` cut sizes (for DATA the reads, of 1 + the byte; for BDAT the chunks, of the byte),
//! then the bytes the client sends after DATA, or as BDAT chunks.

#![no_main]

use herald_smtp::body::{Body, BodyError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[s0, s1, line, n], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let (cuts, input) = rest.split_at(usize::from(n % 16).min(rest.len()));
    run(
        usize::from(u16::from_le_bytes([s0, s1]) % 1000),
        3 + usize::from(line % 98),
        cuts,
        input,
    );
});

fn run(max_size: usize, max_line: usize, cuts: &[u8], input: &[u8]) {
    // DATA, in one read and in the fuzzer's pieces.
    let whole = data(input, &[], max_size, max_line);
    // Before the end, how much of an over-long line's rest is consumed early may differ; it is dropped anyway.
    let accepted =
        |r: &(usize, bool, Result<Vec<u8>, BodyError>)| (r.1.then_some(r.0), r.1, r.2.clone().ok());
    let pieces = data(input, cuts, max_size, max_line);
    assert_eq!(
        accepted(&whole),
        accepted(&pieces),
        "DATA depends on how the input was cut"
    );
    let (_, done, body) = whole;
    if let (true, Ok(body)) = (done, &body) {
        assert!(body.len() <= max_size);
        assert_crlf_lines(body, max_line);
        let mut sent = dot_stuff(body);
        sent.extend_from_slice(b".\r\n");
        let (used, done, again) = data(&sent, &[], max_size, max_line);
        assert_eq!(
            (used, done),
            (sent.len(), true),
            "a stuffed body does not end where it should"
        );
        assert_eq!(
            again.as_ref(),
            Ok(body),
            "a stuffed body does not read back the same"
        );
    }

    // BDAT: the same bytes as chunks, cut at the fuzzer's points and as one chunk.
    let one = chunked(input, &[], max_size, max_line);
    let many = chunked(input, cuts, max_size, max_line);
    assert_eq!(
        one.clone().ok(),
        many.ok(),
        "BDAT depends on where the chunks were cut"
    );
    if let Ok(body) = one {
        assert_eq!(body, input);
        assert_crlf_lines(&body, usize::MAX);
    }
}

/// Reads DATA as a connection loop does: unconsumed bytes are presented again with the next read.
fn data(
    input: &[u8],
    cuts: &[u8],
    max_size: usize,
    max_line: usize,
) -> (usize, bool, Result<Vec<u8>, BodyError>) {
    let mut body = Body::new(max_size, max_line);
    let (mut start, mut end) = (0, 0);
    let mut steps = cuts.iter().map(|&c| usize::from(c) + 1);
    loop {
        end = match steps.next() {
            Some(n) => (end + n).min(input.len()),
            None => input.len(),
        };
        let (used, done) = body.feed_data(&input[start..end]);
        assert!(start + used <= end);
        start += used;
        if done || end == input.len() {
            return (start, done, body.finish(false));
        }
    }
}

fn chunked(
    input: &[u8],
    cuts: &[u8],
    max_size: usize,
    max_line: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Body::new(max_size, max_line);
    let mut rest = input;
    for &c in cuts {
        let (chunk, tail) = rest.split_at(usize::from(c).min(rest.len()));
        body.feed_chunk(chunk);
        rest = tail;
    }
    body.feed_chunk(rest);
    body.finish(true)
}

fn assert_crlf_lines(body: &[u8], max_line: usize) {
    let mut line_start = 0;
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR"),
            b'\n' => {
                assert!(i > 0 && body[i - 1] == b'\r', "bare LF");
                // A line is measured on the wire, where a stuffed dot makes it one octet longer.
                let stuffed = usize::from(body[line_start] == b'.');
                assert!(
                    i + 1 - line_start + stuffed <= max_line,
                    "line over the limit"
                );
                line_start = i + 1;
            }
            _ => {}
        }
    }
}

/// RFC 5321 section 4.5.2, the sender's side: a line that starts with a dot gets another.
fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}
