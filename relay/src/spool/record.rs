//! The on-disk record format of spool segments.
//!
//! A segment is a sequence of records, each framed as
//! `magic (1) | kind (1) | payload length (4, LE) | CRC-32 of kind and payload (4, LE) | payload`.
//! The CRC lets loading tell a record that was fully written from the torn tail a crash leaves behind;
//! everything after the first bad frame in a segment is ignored (and truncated, so the segment stays
//! appendable).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use herald_smtp::dsn::{MailDsn, Notify, Orcpt, RcptDsn, Ret};

pub const MAGIC: u8 = 0xE7;
pub const FRAME_LEN: usize = 10;

/// Record kinds. New kinds get new numbers; loading skips kinds it does not know, so an older relay can still
/// read the messages of a newer one.
/// A message: envelope, per-recipient state and data. A later record with the same id (a copy made when an
/// old segment is compacted) replaces the earlier one.
pub const KIND_MESSAGE: u8 = 1;
/// New states for some recipients of a message, after a delivery attempt.
pub const KIND_RESULTS: u8 = 2;
/// A message removed by an operator.
pub const KIND_DELETE: u8 = 3;
/// A message whose sender gave DSN parameters (RFC 3461): the layout of [`KIND_MESSAGE`] with the
/// parameters between the recipients and the data. Only such messages are written this way, so a spool
/// without them reads the same in a relay from before the extension. That older relay skips this kind, as
/// any it does not know: it neither delivers nor bounces those messages, and they are gone once the segment
/// holding them is reclaimed. Roll back only with them delivered (`/queue` lists what is queued).
pub const KIND_MESSAGE_DSN: u8 = 4;

/// Where one recipient stands. `Delivered`, `Bounced` and `Expired` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptStatus {
    Queued = 0,
    Deferred = 1,
    Delivered = 2,
    Bounced = 3,
    Expired = 4,
}

impl RcptStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RcptStatus::Delivered | RcptStatus::Bounced | RcptStatus::Expired
        )
    }

    fn from_u8(b: u8) -> Result<RcptStatus, RecordError> {
        Ok(match b {
            0 => RcptStatus::Queued,
            1 => RcptStatus::Deferred,
            2 => RcptStatus::Delivered,
            3 => RcptStatus::Bounced,
            4 => RcptStatus::Expired,
            _ => return Err(RecordError::Malformed),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RcptStatus::Queued => "queued",
            RcptStatus::Deferred => "deferred",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Bounced => "bounced",
            RcptStatus::Expired => "expired",
        }
    }
}

/// The persisted state of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RcptState {
    pub status: RcptStatus,
    pub attempts: u16,
    /// Unix milliseconds of the next attempt (deferred recipients).
    pub next_attempt_ms: u64,
}

impl RcptState {
    pub const QUEUED: RcptState = RcptState {
        status: RcptStatus::Queued,
        attempts: 0,
        next_attempt_ms: 0,
    };
}

/// A state change for recipient `index` of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RcptUpdate {
    pub index: u32,
    pub state: RcptState,
}

/// A message's identity in the spool and in every log line and reply about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(pub u64);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl FromStr for QueueId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(QueueId)
    }
}

/// The envelope stored with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    pub id: QueueId,
    /// Unix time in milliseconds when the message was accepted.
    pub received_at_ms: u64,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// Shared: a queue of a million messages holds a handful of listener names and senders, and the queue
    /// keeps one copy of each (see `queue::core`).
    pub listener: Arc<str>,
    pub auth_user: Option<String>,
    pub peer: String,
    /// Empty for the null sender.
    pub sender: Arc<str>,
    pub recipients: Vec<String>,
    /// MAIL's DSN parameters.
    pub dsn: MailDsn,
    /// Each recipient's DSN parameters, as many as `recipients` (a record from before the extension reads
    /// back as all defaults).
    pub rcpt_dsn: Vec<RcptDsn>,
}

impl MessageMeta {
    /// Recipient `i`'s DSN parameters; the defaults (no NOTIFY, no ORCPT) if there are none.
    pub fn rcpt_dsn(&self, i: usize) -> RcptDsn {
        self.rcpt_dsn.get(i).cloned().unwrap_or_default()
    }

    fn has_dsn(&self) -> bool {
        !self.dsn.is_empty() || self.rcpt_dsn.iter().any(|d| !d.is_empty())
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is cut short")]
    Truncated,
    #[error("record has a bad magic byte")]
    BadMagic,
    #[error("record checksum does not match")]
    BadChecksum,
    #[error("record payload is malformed")]
    Malformed,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Fields are bounded by SMTP's own limits (paths of 256 octets); u16 is ample.
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

/// Appends a framed message record to `out`; returns the offset of the message data within the record.
pub fn encode_message(
    out: &mut Vec<u8>,
    meta: &MessageMeta,
    states: &[RcptState],
    parts: &[&[u8]],
) -> usize {
    encode_message_head(out, meta, states, parts, None)
}

/// The data of a message record that is not in `out` but follows it in the segment: its length and the
/// CRC-32 of its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Tail<'a> {
    pub len: u64,
    pub crc: &'a crc32fast::Hasher,
}

/// [`encode_message`] for a record whose data ends with `tail`, written after `out`: the length and checksum
/// in the frame count it.
pub fn encode_message_head(
    out: &mut Vec<u8>,
    meta: &MessageMeta,
    states: &[RcptState],
    parts: &[&[u8]],
    tail: Option<Tail<'_>>,
) -> usize {
    let start = out.len();
    let kind = if meta.has_dsn() {
        KIND_MESSAGE_DSN
    } else {
        KIND_MESSAGE
    };
    out.extend_from_slice(&[MAGIC, kind, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&meta.id.0.to_le_bytes());
    out.extend_from_slice(&meta.received_at_ms.to_le_bytes());
    out.push(u8::from(meta.smtputf8) | (u8::from(meta.eight_bit) << 1));
    put_str(out, &meta.listener);
    put_str(out, meta.auth_user.as_deref().unwrap_or(""));
    put_str(out, &meta.peer);
    put_str(out, &meta.sender);
    out.extend_from_slice(&(meta.recipients.len() as u32).to_le_bytes());
    for (i, r) in meta.recipients.iter().enumerate() {
        put_str(out, r);
        put_state(out, states.get(i).copied().unwrap_or(RcptState::QUEUED));
    }
    if kind == KIND_MESSAGE_DSN {
        put_dsn(out, meta);
    }
    let data_len = parts.iter().map(|p| p.len() as u64).sum::<u64>() + tail.map_or(0, |t| t.len);
    out.extend_from_slice(&data_len.to_le_bytes());
    let data_offset = out.len() - start;
    for p in parts {
        out.extend_from_slice(p);
    }
    finish_frame_with(out, start, tail);
    data_offset
}

/// `ret (1: 0 none, 1 FULL, 2 HDRS) | envid (str, "" for none)`, then per recipient
/// `notify (1: bit 0 given, 1 SUCCESS, 2 FAILURE, 3 DELAY) | orcpt type (str) | orcpt address (str, "" for
/// none)`.
fn put_dsn(out: &mut Vec<u8>, meta: &MessageMeta) {
    out.push(match meta.dsn.ret {
        None => 0,
        Some(Ret::Full) => 1,
        Some(Ret::Headers) => 2,
    });
    put_str(out, meta.dsn.envid.as_deref().unwrap_or(""));
    for i in 0..meta.recipients.len() {
        let d = meta.rcpt_dsn(i);
        out.push(d.notify.map_or(0, |n| {
            1 | u8::from(n.success) << 1 | u8::from(n.failure) << 2 | u8::from(n.delay) << 3
        }));
        let (t, a) = d
            .orcpt
            .as_ref()
            .map_or(("", ""), |o| (o.addr_type.as_str(), o.address.as_str()));
        put_str(out, t);
        put_str(out, a);
    }
}

fn put_state(out: &mut Vec<u8>, st: RcptState) {
    out.push(st.status as u8);
    out.extend_from_slice(&st.attempts.to_le_bytes());
    out.extend_from_slice(&st.next_attempt_ms.to_le_bytes());
}

/// Appends a framed results record.
pub fn encode_results(out: &mut Vec<u8>, id: QueueId, updates: &[RcptUpdate]) {
    let start = out.len();
    out.extend_from_slice(&[MAGIC, KIND_RESULTS, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&id.0.to_le_bytes());
    out.extend_from_slice(&(updates.len() as u32).to_le_bytes());
    for u in updates {
        out.extend_from_slice(&u.index.to_le_bytes());
        put_state(out, u.state);
    }
    finish_frame(out, start);
}

/// Appends a framed delete record.
pub fn encode_delete(out: &mut Vec<u8>, id: QueueId) {
    let start = out.len();
    out.extend_from_slice(&[MAGIC, KIND_DELETE, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&id.0.to_le_bytes());
    finish_frame(out, start);
}

fn finish_frame(out: &mut [u8], start: usize) {
    finish_frame_with(out, start, None)
}

fn finish_frame_with(out: &mut [u8], start: usize, tail: Option<Tail<'_>>) {
    let payload_len = (out.len() - start - FRAME_LEN) as u64 + tail.map_or(0, |t| t.len);
    // Messages are far below 4 GiB (the size limit is checked as they arrive).
    let payload_len = payload_len as u32;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start + 1..start + 2]);
    crc.update(&out[start + FRAME_LEN..]);
    if let Some(t) = tail {
        crc.combine(t.crc);
    }
    out[start + 2..start + 6].copy_from_slice(&payload_len.to_le_bytes());
    out[start + 6..start + 10].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// One decoded frame: its kind, payload, and the length of the whole frame.
#[derive(Debug)]
pub struct Frame<'a> {
    pub kind: u8,
    pub payload: &'a [u8],
    pub len: usize,
}

/// Decodes the frame at the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Result<Frame<'_>, RecordError> {
    if buf.len() < FRAME_LEN {
        return Err(RecordError::Truncated);
    }
    if buf[0] != MAGIC {
        return Err(RecordError::BadMagic);
    }
    let kind = buf[1];
    let len = u32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
    let crc = u32::from_le_bytes([buf[6], buf[7], buf[8], buf[9]]);
    let payload = buf
        .get(FRAME_LEN..FRAME_LEN + len)
        .ok_or(RecordError::Truncated)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    if h.finalize() != crc {
        return Err(RecordError::BadChecksum);
    }
    Ok(Frame {
        kind,
        payload,
        len: FRAME_LEN + len,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let s = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or(RecordError::Malformed)?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn state(&mut self) -> Result<RcptState, RecordError> {
        Ok(RcptState {
            status: RcptStatus::from_u8(self.u8()?)?,
            attempts: self.u16()?,
            next_attempt_ms: self.u64()?,
        })
    }
    /// The DSN block [`put_dsn`] writes, for `n` recipients.
    fn dsn(&mut self, n: usize) -> Result<(MailDsn, Vec<RcptDsn>), RecordError> {
        let ret = match self.u8()? {
            0 => None,
            1 => Some(Ret::Full),
            2 => Some(Ret::Headers),
            _ => return Err(RecordError::Malformed),
        };
        let envid = Some(self.string()?).filter(|s| !s.is_empty());
        let mut rcpts = Vec::with_capacity(n);
        for _ in 0..n {
            let bits = self.u8()?;
            if bits & !0b1111 != 0 {
                return Err(RecordError::Malformed);
            }
            let notify = (bits & 1 != 0).then_some(Notify {
                success: bits & 2 != 0,
                failure: bits & 4 != 0,
                delay: bits & 8 != 0,
            });
            let addr_type = self.string()?;
            let address = self.string()?;
            let orcpt = (!address.is_empty()).then_some(Orcpt { addr_type, address });
            rcpts.push(RcptDsn { notify, orcpt });
        }
        Ok((MailDsn { ret, envid }, rcpts))
    }
    fn string(&mut self) -> Result<String, RecordError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| RecordError::Malformed)
    }
}

/// A decoded message record.
#[derive(Debug)]
pub struct DecodedMessage {
    pub meta: MessageMeta,
    pub states: Vec<RcptState>,
    /// Offset of the data within the payload.
    pub data_offset: usize,
    pub data_len: u64,
}

/// Decodes the payload of a message record of `kind` ([`KIND_MESSAGE`] or [`KIND_MESSAGE_DSN`]).
pub fn decode_message(kind: u8, payload: &[u8]) -> Result<DecodedMessage, RecordError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let id = QueueId(r.u64()?);
    let received_at_ms = r.u64()?;
    let flags = r.u8()?;
    let listener = Arc::from(r.string()?);
    let auth_user = Some(r.string()?).filter(|s| !s.is_empty());
    let peer = r.string()?;
    let sender = Arc::from(r.string()?);
    let n = r.u32()? as usize;
    // Each recipient takes at least 13 bytes: a count beyond that is corruption, not a reason to allocate.
    if n > payload.len() / 13 {
        return Err(RecordError::Malformed);
    }
    let mut recipients = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    for _ in 0..n {
        recipients.push(r.string()?);
        states.push(r.state()?);
    }
    let (dsn, rcpt_dsn) = match kind {
        KIND_MESSAGE => (MailDsn::default(), vec![RcptDsn::default(); n]),
        KIND_MESSAGE_DSN => r.dsn(n)?,
        _ => return Err(RecordError::Malformed),
    };
    let data_len = r.u64()?;
    if r.pos as u64 + data_len != payload.len() as u64 {
        return Err(RecordError::Malformed);
    }
    let meta = MessageMeta {
        id,
        received_at_ms,
        smtputf8: flags & 1 != 0,
        eight_bit: flags & 2 != 0,
        listener,
        auth_user,
        peer,
        sender,
        recipients,
        dsn,
        rcpt_dsn,
    };
    Ok(DecodedMessage {
        meta,
        states,
        data_offset: r.pos,
        data_len,
    })
}

/// Decodes a results payload.
pub fn decode_results(payload: &[u8]) -> Result<(QueueId, Vec<RcptUpdate>), RecordError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let id = QueueId(r.u64()?);
    let n = r.u32()? as usize;
    if n > payload.len() / 15 {
        return Err(RecordError::Malformed);
    }
    let mut updates = Vec::with_capacity(n);
    for _ in 0..n {
        let index = r.u32()?;
        updates.push(RcptUpdate {
            index,
            state: r.state()?,
        });
    }
    Ok((id, updates))
}

/// Decodes a delete payload.
pub fn decode_delete(payload: &[u8]) -> Result<QueueId, RecordError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    Ok(QueueId(r.u64()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> MessageMeta {
        MessageMeta {
            id: QueueId(0x1234),
            received_at_ms: 99,
            smtputf8: true,
            eight_bit: false,
            listener: "trusted".into(),
            auth_user: None,
            peer: "127.0.0.1:4000".into(),
            sender: "a@b.test".into(),
            recipients: vec!["x@y.test".into(), "z@y.test".into()],
            dsn: MailDsn::default(),
            rcpt_dsn: vec![RcptDsn::default(); 2],
        }
    }

    fn dsn_meta() -> MessageMeta {
        MessageMeta {
            dsn: MailDsn {
                ret: Some(Ret::Headers),
                envid: Some("env 1".into()),
            },
            rcpt_dsn: vec![
                RcptDsn {
                    notify: Some(Notify::parse("SUCCESS,DELAY").unwrap()),
                    orcpt: Some(Orcpt::parse("rfc822;x+2Bo@y.test").unwrap()),
                },
                RcptDsn {
                    notify: Some(Notify::NEVER),
                    orcpt: None,
                },
            ],
            ..meta()
        }
    }

    #[test]
    fn message_round_trips() {
        let mut buf = vec![0xAA];
        let states = [
            RcptState::QUEUED,
            RcptState {
                status: RcptStatus::Deferred,
                attempts: 3,
                next_attempt_ms: 77,
            },
        ];
        let parts: [&[u8]; 2] = [b"Received: x\r\n", b"body\r\n"];
        let data_off = encode_message(&mut buf, &meta(), &states, &parts);
        let frame = decode_frame(&buf[1..]).unwrap();
        assert_eq!(frame.len, buf.len() - 1);
        assert_eq!(frame.kind, KIND_MESSAGE);
        let d = decode_message(frame.kind, frame.payload).unwrap();
        assert_eq!(d.meta, meta());
        assert_eq!(d.states, states);
        assert_eq!(d.data_offset + FRAME_LEN, data_off);
        let (off, len) = (d.data_offset, d.data_len as usize);
        assert_eq!(&frame.payload[off..off + len], b"Received: x\r\nbody\r\n");
        let mut buf = Vec::new();
        let ups = [RcptUpdate {
            index: 1,
            state: states[1],
        }];
        encode_results(&mut buf, QueueId(9), &ups);
        let frame = decode_frame(&buf).unwrap();
        assert_eq!(frame.kind, KIND_RESULTS);
        assert_eq!(
            decode_results(frame.payload).unwrap(),
            (QueueId(9), ups.to_vec())
        );
        assert_eq!(
            "0000000000001234".parse::<QueueId>().unwrap(),
            QueueId(0x1234)
        );
        assert_eq!(QueueId(0x1234).to_string(), "0000000000001234");
    }

    #[test]
    fn dsn_parameters_round_trip_in_their_own_kind() {
        for m in [
            dsn_meta(),
            MessageMeta {
                dsn: MailDsn::default(),
                ..dsn_meta()
            },
            MessageMeta {
                rcpt_dsn: vec![RcptDsn::default(); 2],
                ..dsn_meta()
            },
        ] {
            let mut buf = Vec::new();
            let states = [RcptState::QUEUED; 2];
            encode_message(&mut buf, &m, &states, &[b"data\r\n"]);
            let frame = decode_frame(&buf).unwrap();
            assert_eq!(frame.kind, KIND_MESSAGE_DSN);
            let d = decode_message(frame.kind, frame.payload).unwrap();
            assert_eq!(d.meta, m);
            assert_eq!(d.states, states);
            let (off, len) = (d.data_offset, d.data_len as usize);
            assert_eq!(&frame.payload[off..off + len], b"data\r\n");
            // A relay that does not know the kind cannot take it for the older layout either.
            assert!(decode_message(KIND_MESSAGE, frame.payload).is_err());
        }
    }

    /// A message record as the relay wrote it before DSN parameters were stored, byte for byte: it must
    /// keep reading back, with default DSN parameters.
    #[test]
    fn a_record_from_before_dsn_parameters_reads_back() {
        let mut old = vec![MAGIC, KIND_MESSAGE, 0, 0, 0, 0, 0, 0, 0, 0];
        old.extend_from_slice(&0x1234u64.to_le_bytes());
        old.extend_from_slice(&99u64.to_le_bytes());
        old.push(1);
        for s in ["trusted", "", "127.0.0.1:4000", "a@b.test"] {
            old.extend_from_slice(&(s.len() as u16).to_le_bytes());
            old.extend_from_slice(s.as_bytes());
        }
        old.extend_from_slice(&2u32.to_le_bytes());
        for r in ["x@y.test", "z@y.test"] {
            old.extend_from_slice(&(r.len() as u16).to_le_bytes());
            old.extend_from_slice(r.as_bytes());
            old.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
        old.extend_from_slice(&6u64.to_le_bytes());
        old.extend_from_slice(b"body\r\n");
        finish_frame(&mut old, 0);
        let frame = decode_frame(&old).unwrap();
        let d = decode_message(frame.kind, frame.payload).unwrap();
        assert_eq!(d.meta, meta());
        // And a message without DSN parameters is still written exactly so.
        let mut now = Vec::new();
        encode_message(&mut now, &meta(), &[], &[b"body\r\n"]);
        assert_eq!(now, old);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_message(&mut buf, &dsn_meta(), &[], &[b"body\r\n"]);
        for cut in 0..buf.len() {
            assert!(decode_frame(&buf[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            assert!(decode_frame(&b).is_err(), "flip at {i}");
        }
    }
}
