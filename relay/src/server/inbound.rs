//! One message's bytes on their way in, seen once as they arrive.
//!
//! The session buffers a body's bytes; after every read the connection hands the new ones to an [`Inbound`],
//! which keeps the message's header section (cleanup and DKIM need it), feeds everything after it to the
//! DKIM body hash of the From: domain when that domain signs, and once the session holds more than
//! [`SPILL_AT`] moves the buffer into a spill file of the spool. A session therefore holds at most about
//! [`SPILL_AT`] of any message plus one read, and the body is walked once, while it arrives, not again after
//! it has all arrived: the signature is assembled at the end from the header section and the body hash.

use herald_smtp::body::Body;
use memchr::memmem;

use crate::dkim::{BodyHasher, Signers};
use crate::spool::{Spill, SpillError, Spool};

/// A body larger than this moves out of memory into a spill file as it arrives. Most mail is smaller and
/// goes to the spool in one write from memory, in a group commit with other sessions' messages.
pub const SPILL_AT: usize = 256 * 1024;
/// The most of a header section kept. Beyond it the message is still accepted, but its header checks see
/// only this much and it is not signed.
pub const MAX_HEADER: usize = 1024 * 1024;

/// What has been seen of the body numbered `number` (see `herald_smtp::Session::body_in_progress`).
#[derive(Debug)]
pub struct Inbound {
    number: u64,
    /// The header section up to and including the blank line that ends it, once that has arrived.
    header: Vec<u8>,
    header_done: bool,
    /// Bytes at the front of the session's buffer already seen.
    seen: usize,
    /// The signing domain and the hash of the body so far, when the From: domain has keys.
    signing: Option<(String, BodyHasher)>,
    spill: Option<Spill>,
    /// Moving bytes to the spill failed: the message is refused at its end, as when the spool fails.
    failed: Option<SpillError>,
}

/// The message once it has all arrived.
#[derive(Debug)]
pub struct Received {
    pub header: Vec<u8>,
    /// The signing domain and the message's body hash.
    pub body_hash: Option<(String, [u8; 32])>,
    /// The bytes moved out of memory, which come before the envelope's body.
    pub spill: Option<Spill>,
}

impl Inbound {
    pub fn new(number: u64) -> Inbound {
        Inbound {
            number,
            header: Vec::new(),
            header_done: false,
            seen: 0,
            signing: None,
            spill: None,
            failed: None,
        }
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    /// Sees the body's new bytes, and moves them out of memory once there are enough.
    pub async fn progress(&mut self, body: &mut Body, signers: &Signers, spool: &Spool) {
        let buffered = body.buffered();
        if buffered.len() > self.seen {
            self.see(&buffered[self.seen..], signers);
            self.seen = buffered.len();
        }
        if body.buffered().len() < SPILL_AT || body.failed() {
            return;
        }
        if self.failed.is_none()
            && let Err(e) = self.spill_out(body.buffered(), spool).await
        {
            tracing::error!(error = %e, "cannot move a message's bytes out of memory; it will be refused with 452");
            self.failed = Some(e);
        }
        // Taken even when the spill failed: the message is refused at its end and must not fill memory.
        body.take_buffered();
        self.seen = 0;
    }

    async fn spill_out(&mut self, bytes: &[u8], spool: &Spool) -> Result<(), SpillError> {
        let spill = match &mut self.spill {
            Some(s) => s,
            None => self.spill.insert(spool.spill().await?),
        };
        spill.write(bytes).await
    }

    /// The message's end: `tail` is the envelope's body, the bytes after the last move. The tail joins the
    /// spill when there is one, and is then emptied.
    pub async fn finish(
        mut self,
        tail: &mut Vec<u8>,
        signers: &Signers,
    ) -> Result<Received, SpillError> {
        if tail.len() > self.seen {
            self.see(&tail[self.seen..], signers);
        }
        if let Some(e) = self.failed {
            return Err(e);
        }
        if !self.header_done {
            // No blank line: the message is all header section and its body is empty.
            self.header_done = true;
            self.start_signing(signers);
        }
        if let Some(spill) = &mut self.spill {
            spill.write(tail).await?;
            *tail = Vec::new();
        }
        Ok(Received {
            header: self.header,
            body_hash: self.signing.map(|(d, h)| (d, h.finish())),
            spill: self.spill,
        })
    }

    fn see(&mut self, bytes: &[u8], signers: &Signers) {
        let body = if self.header_done {
            bytes
        } else {
            match self.header_end(bytes) {
                Some(used) => {
                    self.header_done = true;
                    self.start_signing(signers);
                    &bytes[used..]
                }
                None => return,
            }
        };
        if let Some((_, hasher)) = &mut self.signing {
            hasher.update(body);
        }
    }

    /// Adds `bytes` to the header section; returns how many of them it took once the section is complete.
    fn header_end(&mut self, bytes: &[u8]) -> Option<usize> {
        let before = self.header.len();
        // The blank line may straddle two reads: look again at the last three bytes already kept.
        let from = before.saturating_sub(3);
        let room = (MAX_HEADER - before).min(bytes.len());
        self.header.extend_from_slice(&bytes[..room]);
        let end = if self.header.starts_with(b"\r\n") {
            // An empty header section: the message starts with the blank line.
            Some(2)
        } else {
            memmem::find(&self.header[from..], b"\r\n\r\n").map(|i| from + i + 4)
        };
        match end {
            Some(end) => {
                self.header.truncate(end);
                Some(end - before)
            }
            None if self.header.len() >= MAX_HEADER => {
                tracing::warn!(
                    limit = MAX_HEADER,
                    "a message's header section is larger than the relay keeps; it goes unsigned"
                );
                // Neither a signature nor more header: the rest is treated as body that nobody hashes.
                self.header_done = true;
                self.signing = None;
                Some(room)
            }
            None => None,
        }
    }

    fn start_signing(&mut self, signers: &Signers) {
        if self.header.len() >= MAX_HEADER {
            return;
        }
        self.signing = signers
            .signing_domain(&self.header)
            .map(|d| (d, BodyHasher::new()));
    }
}
