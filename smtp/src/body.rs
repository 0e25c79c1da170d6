//! Reading a message body: DATA (dot-stuffed lines) and BDAT (counted chunks, RFC 3030).
//!
//! Both readers enforce one discipline: lines end in CRLF and nothing else. A bare LF or bare CR anywhere
//! makes the whole message fail (it is still read to its end, so the session stays in step with the
//! client). That is what defeats SMTP smuggling: only `CRLF . CRLF` ends DATA here, and a message that
//! contains any other spelling of an end-of-data marker is refused rather than passed on to a peer that might
//! read it differently.

use std::sync::Arc;

use memchr::{memchr, memchr2_iter};

use crate::budget::{Budget, Reservation};

/// Why a body was refused; the reply is chosen from it once the body has been read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("message exceeds the size limit")]
    TooBig,
    #[error("message has a line longer than the limit")]
    LineTooLong,
    #[error("message has a bare CR or LF; lines must end in CRLF")]
    BareLineEnding,
    /// The relay holds as many message bytes in memory as its budget allows.
    #[error("the relay's memory budget for messages in transit is spent")]
    OverBudget,
}

/// A message body being received, with the limits it must meet.
#[derive(Debug)]
pub struct Body {
    /// The bytes received and not yet taken by the driver (see [`Body::take_buffered`]).
    data: Vec<u8>,
    /// Bytes received in all, taken or not: what the size limit counts.
    received: usize,
    max_size: usize,
    max_line: usize,
    error: Option<BodyError>,
    /// The previous line ended in CRLF (DATA), so a `.` line now would end the body.
    prev_crlf: bool,
    /// Inside a line too long to buffer: its bytes are dropped until its end.
    skipping_line: bool,
    /// Last byte consumed was CR (carried across reads and BDAT chunks).
    last_cr: bool,
    /// Length of the line in progress (BDAT only; DATA sees whole lines).
    line_len: usize,
    /// What `data` holds of the relay's shared budget, when there is one.
    reservation: Option<Reservation>,
}

impl Body {
    pub fn new(max_size: usize, max_line: usize) -> Body {
        Body {
            data: Vec::new(),
            received: 0,
            max_size,
            max_line,
            error: None,
            // The CRLF of the DATA command itself counts: an immediate "." line is an empty body.
            prev_crlf: true,
            skipping_line: false,
            last_cr: false,
            line_len: 0,
            reservation: None,
        }
    }

    /// Holds the body's bytes against `budget`: beyond it the body fails with [`BodyError::OverBudget`].
    pub fn budgeted(mut self, budget: Option<&Arc<Budget>>) -> Body {
        self.reservation = budget.map(|b| Reservation::new(b.clone()));
        self
    }

    fn fail(&mut self, e: BodyError) {
        if self.error.is_none() {
            self.error = Some(e);
            // A failed body is never stored: free it now rather than keep reading into it.
            self.data = Vec::new();
            if let Some(r) = &mut self.reservation {
                r.release();
            }
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if self.received + bytes.len() > self.max_size {
            self.fail(BodyError::TooBig);
            return;
        }
        if let Some(r) = &mut self.reservation
            && !r.grow_to(self.data.len() + bytes.len())
        {
            self.fail(BodyError::OverBudget);
            return;
        }
        self.received += bytes.len();
        self.data.extend_from_slice(bytes);
    }

    /// Reads DATA lines from `input`. Returns how many bytes were consumed and whether the end-of-data line
    /// was seen. An incomplete line at the end of `input` is left unconsumed unless it is already too long.
    pub fn feed_data(&mut self, input: &[u8]) -> (usize, bool) {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            let Some(nl) = memchr(b'\n', rest) else {
                if rest.len() >= self.max_line {
                    // Consume it so a client cannot make us buffer an endless line.
                    self.fail(BodyError::LineTooLong);
                    self.skipping_line = true;
                    self.last_cr = rest.last() == Some(&b'\r');
                    return (input.len(), false);
                }
                break;
            };
            let line = &rest[..=nl];
            pos += nl + 1;
            let crlf = if nl > 0 {
                rest[nl - 1] == b'\r'
            } else {
                self.skipping_line && self.last_cr
            };
            if self.skipping_line {
                self.skipping_line = false;
                self.prev_crlf = crlf;
                continue;
            }
            if self.prev_crlf && line == b".\r\n" {
                return (pos, true);
            }
            let content = &line[..line.len() - if crlf { 2 } else { 1 }];
            if !crlf || memchr(b'\r', content).is_some() {
                self.fail(BodyError::BareLineEnding);
            }
            if line.len() > self.max_line {
                self.fail(BodyError::LineTooLong);
            }
            // Dot-unstuffing (RFC 5321 section 4.5.2).
            let unstuffed = if line[0] == b'.' { &line[1..] } else { line };
            self.append(unstuffed);
            self.prev_crlf = crlf;
        }
        (pos, false)
    }

    /// Reads one BDAT chunk (or part of it): the bytes are the message verbatim, checked for line endings.
    pub fn feed_chunk(&mut self, chunk: &[u8]) {
        if self.error.is_none() {
            let mut line_start = 0;
            for i in memchr2_iter(b'\r', b'\n', chunk) {
                if chunk[i] == b'\n' {
                    let after_cr = if i == 0 {
                        self.last_cr
                    } else {
                        chunk[i - 1] == b'\r'
                    };
                    if !after_cr {
                        self.fail(BodyError::BareLineEnding);
                        break;
                    }
                    if self.line_len + (i + 1 - line_start) > self.max_line {
                        self.fail(BodyError::LineTooLong);
                        break;
                    }
                    self.line_len = 0;
                    line_start = i + 1;
                } else if chunk.get(i + 1).is_some_and(|&b| b != b'\n') {
                    self.fail(BodyError::BareLineEnding);
                    break;
                }
            }
            if self.error.is_none() {
                if self.last_cr && chunk.first().is_some_and(|&b| b != b'\n') {
                    self.fail(BodyError::BareLineEnding);
                }
                self.line_len += chunk.len() - line_start;
                if self.line_len > self.max_line {
                    self.fail(BodyError::LineTooLong);
                }
            }
        }
        if let Some(&b) = chunk.last() {
            self.last_cr = b == b'\r';
        }
        self.append(chunk);
    }

    /// Ends the body: the bytes, or why they were refused.
    pub fn finish(self, chunked: bool) -> Result<Vec<u8>, BodyError> {
        self.finish_held(chunked).map(|(data, _)| data)
    }

    /// Ends the body: the bytes with what they hold of the budget (give it back by dropping it once the
    /// bytes are freed), or why they were refused.
    pub fn finish_held(self, chunked: bool) -> Result<(Vec<u8>, Option<Reservation>), BodyError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if chunked && self.last_cr {
            return Err(BodyError::BareLineEnding);
        }
        Ok((self.data, self.reservation))
    }

    /// The bytes received so far and still held here, in order: all of them unless a driver that streams
    /// bodies out has taken some with [`Body::take_buffered`]. Empty once the body has failed.
    pub fn buffered(&self) -> &[u8] {
        &self.data
    }

    /// Forgets the buffered bytes (the driver has stored them elsewhere) and gives back what they held of
    /// the budget; the buffer's memory is kept for the bytes that follow.
    pub fn take_buffered(&mut self) {
        self.data.clear();
        if let Some(r) = &mut self.reservation {
            r.shrink_to(0);
        }
    }

    /// The body has been refused: it is read to its end only to stay in step with the client.
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// Bytes received in all, including any taken.
    pub fn received(&self) -> usize {
        self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_over_the_budget_fails_and_gives_it_back() {
        let budget = Budget::new(128 * 1024);
        let mut small = Body::new(1 << 20, 1000).budgeted(Some(&budget));
        small.feed_data(b"hello\r\n");
        let mut big = Body::new(1 << 20, 1000).budgeted(Some(&budget));
        let mut line = vec![b'x'; 998];
        line.extend_from_slice(b"\r\n");
        for _ in 0..200 {
            assert_eq!(big.feed_data(&line), (line.len(), false));
        }
        let (_, done) = big.feed_data(b".\r\n");
        assert!(done, "a refused body is still read to its end");
        assert_eq!(big.finish(false), Err(BodyError::OverBudget));
        assert_eq!(
            budget.used(),
            64 * 1024,
            "only the small body holds the budget"
        );
        let (data, held) = small.finish_held(false).unwrap();
        assert_eq!(data, b"hello\r\n");
        assert!(held.is_some());
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn taken_bytes_still_count_against_the_size_limit_but_not_the_budget() {
        let budget = Budget::new(128 * 1024);
        let mut b = Body::new(100_000, 1000).budgeted(Some(&budget));
        let mut line = vec![b'x'; 998];
        line.extend_from_slice(b"\r\n");
        let mut taken = Vec::new();
        for _ in 0..40 {
            b.feed_data(&line);
            if b.buffered().len() > 10_000 {
                taken.extend_from_slice(b.buffered());
                b.take_buffered();
                assert_eq!(budget.used(), 0, "taken bytes give their budget back");
            }
        }
        assert_eq!(b.received(), 40_000);
        taken.extend_from_slice(b.buffered());
        assert_eq!(taken, line.repeat(40));
        for _ in 0..70 {
            b.feed_data(&line);
            b.take_buffered();
        }
        let (_, done) = b.feed_data(b".\r\n");
        assert!(done);
        assert!(b.failed());
        assert_eq!(
            b.finish(false),
            Err(BodyError::TooBig),
            "the limit counts every byte received"
        );
    }

    fn data(input: &[u8]) -> (Result<Vec<u8>, BodyError>, usize, bool) {
        let mut b = Body::new(1000, 100);
        let (used, done) = b.feed_data(input);
        (b.finish(false), used, done)
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf() {
        let (body, used, done) = data(b"a\r\n..b\r\n.\r\nMAIL");
        assert!(done);
        assert_eq!(used, 11);
        assert_eq!(body.unwrap(), b"a\r\n.b\r\n");
    }

    #[test]
    fn smuggling_variants_do_not_end_data() {
        for input in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\r\rMAIL FROM:<x@y>\r\n",
        ] {
            let (body, used, done) = data(input);
            assert!(!done, "{input:?} ended data");
            assert_eq!(used, input.len());
            assert_eq!(body, Err(BodyError::BareLineEnding), "{input:?}");
        }
    }

    #[test]
    fn split_reads_keep_state() {
        let mut b = Body::new(1000, 100);
        let input = b"line one\r\n.\r\n";
        let (used, done) = b.feed_data(&input[..5]);
        assert_eq!((used, done), (0, false));
        let (used, done) = b.feed_data(&input[..12]);
        assert_eq!((used, done), (10, false));
        let (used, done) = b.feed_data(&input[10..]);
        assert_eq!((used, done), (3, true));
        assert_eq!(b.finish(false).unwrap(), b"line one\r\n");
    }

    #[test]
    fn limits() {
        let mut b = Body::new(10, 100);
        b.feed_data(b"0123456789abc\r\n");
        assert_eq!(b.finish(false), Err(BodyError::TooBig));
        let mut b = Body::new(1000, 8);
        let (used, _) = b.feed_data(b"0123456789");
        assert_eq!(used, 10);
        let (_, done) = b.feed_data(b"\r\n.\r\n");
        assert!(done);
        assert_eq!(b.finish(false), Err(BodyError::LineTooLong));
    }

    #[test]
    fn chunks_check_line_endings_across_boundaries() {
        let mut b = Body::new(1000, 100);
        b.feed_chunk(b"a\r");
        b.feed_chunk(b"\nb\r\n");
        assert_eq!(b.finish(true).unwrap(), b"a\r\nb\r\n");
        let mut b = Body::new(1000, 100);
        b.feed_chunk(b"a\r");
        b.feed_chunk(b"b\r\n");
        assert_eq!(b.finish(true), Err(BodyError::BareLineEnding));
        let mut b = Body::new(1000, 100);
        b.feed_chunk(b"a\nb");
        assert_eq!(b.finish(true), Err(BodyError::BareLineEnding));
        let mut b = Body::new(1000, 100);
        b.feed_chunk(b"a\r\nb\r");
        assert_eq!(b.finish(true), Err(BodyError::BareLineEnding));
    }
}
