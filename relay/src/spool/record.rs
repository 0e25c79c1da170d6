//! The on-disk record format of spool segments.
//!
//! A segment is a sequence of records, each framed as
//! `magic (1) | kind (1) | payload length (4, LE) | CRC-32 of kind and payload (4, LE) | payload`.
//! The CRC lets loading tell a record that was fully written from the torn tail a crash leaves behind;
//! everything after the first bad frame in a segment is ignored (and truncated, so the segment stays
//! appendable).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
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

/// The states of a message's recipients: a single one inline, since most messages have one and a start
/// holds this for every message in the spool at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptStates {
    One(RcptState),
    Many(Vec<RcptState>),
}

impl From<Vec<RcptState>> for RcptStates {
    fn from(mut v: Vec<RcptState>) -> RcptStates {
        match (v.len(), v.pop()) {
            (1, Some(s)) => RcptStates::One(s),
            (_, last) => {
                v.extend(last);
                RcptStates::Many(v)
            }
        }
    }
}

impl std::ops::Deref for RcptStates {
    type Target = [RcptState];
    fn deref(&self) -> &[RcptState] {
        match self {
            RcptStates::One(s) => std::slice::from_ref(s),
            RcptStates::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for RcptStates {
    fn deref_mut(&mut self) -> &mut [RcptState] {
        match self {
            RcptStates::One(s) => std::slice::from_mut(s),
            RcptStates::Many(v) => v,
        }
    }
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

/// The envelope stored with a message. The queue keeps one per queued message for as long as it waits, a
/// million of them in a few hundred megabytes, so it is laid out for size: the client address as an IP
/// address and port rather than text, the recipients packed into one string, and what few messages carry
/// (an authenticated user, DSN parameters) in one box that most messages do without.
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
    /// Empty for the null sender.
    pub sender: Arc<str>,
    pub recipients: Recipients,
    /// The client's address; None when the record's text is not one (then it is in `rare`).
    peer: Option<PeerAddr>,
    rare: Option<Box<Rare>>,
}

/// The parts of an envelope that most messages do not have.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Rare {
    auth_user: Option<String>,
    /// The client as the record gave it, when it does not read back as an address.
    peer_text: Option<Box<str>>,
    /// MAIL's DSN parameters.
    dsn: MailDsn,
    /// Each recipient's DSN parameters; empty when none was given (a missing entry reads as the defaults).
    rcpt_dsn: Box<[RcptDsn]>,
}

/// A client's IP address and port: twenty bytes where the text of it takes a heap block per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerAddr {
    ip: IpAddr,
    port: u16,
}

impl PeerAddr {
    /// The address `text` spells, if it spells one exactly as it would be printed: anything else (no text
    /// the relay writes) is kept as text, so that a record copied forward says what it said.
    fn parse(text: &str) -> Option<PeerAddr> {
        let a: SocketAddr = text.parse().ok()?;
        let p = match a {
            SocketAddr::V4(v4) => PeerAddr {
                ip: IpAddr::V4(*v4.ip()),
                port: v4.port(),
            },
            SocketAddr::V6(v6) if v6.flowinfo() == 0 && v6.scope_id() == 0 => PeerAddr {
                ip: IpAddr::V6(*v6.ip()),
                port: v6.port(),
            },
            SocketAddr::V6(_) => return None,
        };
        (p.to_string() == text).then_some(p)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.ip, self.port).fmt(f)
    }
}

static NO_MAIL_DSN: MailDsn = MailDsn {
    ret: None,
    envid: None,
};

impl MessageMeta {
    /// An envelope without an authenticated user or DSN parameters (see [`MessageMeta::with_auth_user`] and
    /// [`MessageMeta::with_dsn`]). `peer` is the client's address as text (`SocketAddr`'s form).
    pub fn new(
        id: QueueId,
        received_at_ms: u64,
        listener: Arc<str>,
        peer: &str,
        sender: Arc<str>,
        recipients: Recipients,
    ) -> MessageMeta {
        let mut meta = MessageMeta {
            id,
            received_at_ms,
            smtputf8: false,
            eight_bit: false,
            listener,
            sender,
            recipients,
            peer: PeerAddr::parse(peer),
            rare: None,
        };
        if meta.peer.is_none() {
            meta.rare_mut().peer_text = Some(peer.into());
        }
        meta
    }

    /// The user the client authenticated as; None (or "": an empty name is none) for an anonymous client.
    pub fn with_auth_user(mut self, user: Option<String>) -> MessageMeta {
        let user = user.filter(|u| !u.is_empty());
        if user.is_some() || self.rare.is_some() {
            self.rare_mut().auth_user = user;
            self.drop_empty_rare();
        }
        self
    }

    /// The sender's DSN parameters: MAIL's, and each recipient's in the order of `recipients`. Defaults
    /// cost nothing.
    pub fn with_dsn(mut self, dsn: MailDsn, rcpt_dsn: Vec<RcptDsn>) -> MessageMeta {
        let rcpt_dsn: Box<[RcptDsn]> = if rcpt_dsn.iter().all(RcptDsn::is_empty) {
            Box::default()
        } else {
            rcpt_dsn.into_boxed_slice()
        };
        if !dsn.is_empty() || !rcpt_dsn.is_empty() || self.rare.is_some() {
            let rare = self.rare_mut();
            rare.dsn = dsn;
            rare.rcpt_dsn = rcpt_dsn;
            self.drop_empty_rare();
        }
        self
    }

    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    fn drop_empty_rare(&mut self) {
        if self.rare.as_deref() == Some(&Rare::default()) {
            self.rare = None;
        }
    }

    /// The user the client authenticated as.
    pub fn auth_user(&self) -> Option<&str> {
        self.rare.as_ref()?.auth_user.as_deref()
    }

    /// The client's address, as `SocketAddr` prints it.
    pub fn peer(&self) -> String {
        match (&self.peer, &self.rare) {
            (Some(p), _) => p.to_string(),
            (None, Some(r)) => r.peer_text.as_deref().unwrap_or_default().to_owned(),
            (None, None) => String::new(),
        }
    }

    /// MAIL's DSN parameters.
    pub fn dsn(&self) -> &MailDsn {
        self.rare.as_ref().map_or(&NO_MAIL_DSN, |r| &r.dsn)
    }

    /// Recipient `i`'s DSN parameters; the defaults (no NOTIFY, no ORCPT) if there are none.
    pub fn rcpt_dsn(&self, i: usize) -> RcptDsn {
        self.rcpt_dsn_given(i).cloned().unwrap_or_default()
    }

    /// Recipient `i`'s DSN parameters if the sender gave any.
    pub fn rcpt_dsn_given(&self, i: usize) -> Option<&RcptDsn> {
        self.rare.as_ref()?.rcpt_dsn.get(i)
    }

    fn has_dsn(&self) -> bool {
        self.rare
            .as_ref()
            .is_some_and(|r| !r.dsn.is_empty() || !r.rcpt_dsn.is_empty())
    }
}

/// A message's recipients in one heap block, without one per address: most messages have one, and then
/// the block is its text; otherwise the block starts with where each ends (u32 LE, from the end of that
/// table), followed by their texts.
#[derive(Clone, PartialEq, Eq)]
pub struct Recipients {
    data: Box<[u8]>,
    count: u32,
}

impl Recipients {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Recipient `i`.
    pub fn get(&self, i: usize) -> Option<&str> {
        let bytes = if self.count == 1 {
            (i == 0).then_some(&self.data[..])?
        } else {
            let end_at = |k: usize| -> Option<usize> {
                let b = self.data.get(4 * k..4 * k + 4)?;
                Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            };
            let text = self.data.get(4 * self.len()..)?;
            let start = if i == 0 { 0 } else { end_at(i - 1)? };
            text.get(start..end_at(i)?)?
        };
        // Built from strings, so valid; checked rather than assumed, at the cost of a few dozen bytes.
        std::str::from_utf8(bytes).ok()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or_default())
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_owned).collect()
    }
}

impl Default for Recipients {
    /// None.
    fn default() -> Recipients {
        Recipients {
            data: Box::default(),
            count: 0,
        }
    }
}

impl std::ops::Index<usize> for Recipients {
    type Output = str;
    fn index(&self, i: usize) -> &str {
        match self.get(i) {
            Some(r) => r,
            None => panic!("recipient {i} of {}", self.len()),
        }
    }
}

impl<S: AsRef<str>> FromIterator<S> for Recipients {
    /// One allocation of exactly the size needed: the block lives as long as the message is queued, and
    /// one grown by doubling would leave the spare space of each step behind it in the heap.
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Recipients {
        let list: Vec<S> = iter.into_iter().collect();
        let text_len: usize = list.iter().map(|r| r.as_ref().len()).sum();
        let count = u32::try_from(list.len()).unwrap_or(u32::MAX);
        let table = if count == 1 { 0 } else { 4 * list.len() };
        let mut data = Vec::with_capacity(table + text_len);
        if count != 1 {
            let mut end = 0usize;
            for r in &list {
                end += r.as_ref().len();
                // Addresses are bounded by SMTP (256 octets) and their number by the listener's limit.
                data.extend_from_slice(&u32::try_from(end).unwrap_or(u32::MAX).to_le_bytes());
            }
        }
        for r in &list {
            data.extend_from_slice(r.as_ref().as_bytes());
        }
        Recipients {
            data: data.into_boxed_slice(),
            count,
        }
    }
}

impl fmt::Debug for Recipients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
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
    put_str(out, meta.auth_user().unwrap_or(""));
    put_str(out, &meta.peer());
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
    let dsn = meta.dsn();
    out.push(match dsn.ret {
        None => 0,
        Some(Ret::Full) => 1,
        Some(Ret::Headers) => 2,
    });
    put_str(out, dsn.envid.as_deref().unwrap_or(""));
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
        self.str().map(str::to_owned)
    }
    fn str(&mut self) -> Result<&'a str, RecordError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b).map_err(|_| RecordError::Malformed)
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
    decode_message_with(kind, payload, &mut |s| Arc::from(s))
}

/// [`decode_message`], with the listener name and sender made by `intern`: replaying a spool of a million
/// messages shares the few distinct ones instead of allocating each a million times.
pub fn decode_message_with(
    kind: u8,
    payload: &[u8],
    intern: &mut dyn FnMut(&str) -> Arc<str>,
) -> Result<DecodedMessage, RecordError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let id = QueueId(r.u64()?);
    let received_at_ms = r.u64()?;
    let flags = r.u8()?;
    let listener = intern(r.str()?);
    let auth_user = Some(r.string()?).filter(|s| !s.is_empty());
    let peer = r.str()?;
    let sender = intern(r.str()?);
    let n = r.u32()? as usize;
    // Each recipient takes at least 13 bytes: a count beyond that is corruption, not a reason to allocate.
    if n > payload.len() / 13 {
        return Err(RecordError::Malformed);
    }
    let mut recipients = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    for _ in 0..n {
        recipients.push(r.str()?);
        states.push(r.state()?);
    }
    let (dsn, rcpt_dsn) = match kind {
        KIND_MESSAGE => (MailDsn::default(), Vec::new()),
        KIND_MESSAGE_DSN => r.dsn(n)?,
        _ => return Err(RecordError::Malformed),
    };
    let data_len = r.u64()?;
    if r.pos as u64 + data_len != payload.len() as u64 {
        return Err(RecordError::Malformed);
    }
    let mut meta = MessageMeta::new(
        id,
        received_at_ms,
        listener,
        peer,
        sender,
        recipients.into_iter().collect(),
    )
    .with_auth_user(auth_user)
    .with_dsn(dsn, rcpt_dsn);
    meta.smtputf8 = flags & 1 != 0;
    meta.eight_bit = flags & 2 != 0;
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
        let mut m = MessageMeta::new(
            QueueId(0x1234),
            99,
            "trusted".into(),
            "127.0.0.1:4000",
            "a@b.test".into(),
            ["x@y.test", "z@y.test"].into_iter().collect(),
        );
        m.smtputf8 = true;
        m
    }

    fn mail_dsn() -> MailDsn {
        MailDsn {
            ret: Some(Ret::Headers),
            envid: Some("env 1".into()),
        }
    }

    fn rcpt_dsn() -> Vec<RcptDsn> {
        vec![
            RcptDsn {
                notify: Some(Notify::parse("SUCCESS,DELAY").unwrap()),
                orcpt: Some(Orcpt::parse("rfc822;x+2Bo@y.test").unwrap()),
            },
            RcptDsn {
                notify: Some(Notify::NEVER),
                orcpt: None,
            },
        ]
    }

    fn dsn_meta() -> MessageMeta {
        meta().with_dsn(mail_dsn(), rcpt_dsn())
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
            meta().with_dsn(MailDsn::default(), rcpt_dsn()),
            meta().with_dsn(mail_dsn(), vec![RcptDsn::default(); 2]),
            dsn_meta().with_auth_user(Some("app".into())),
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

    /// The client's address is kept as an address when it prints back as the same text, and as the text
    /// otherwise; either way a record copied forward says what the old one said.
    #[test]
    fn peers_and_rare_parts_round_trip() {
        for peer in [
            "127.0.0.1:4000",
            "[2001:db8::1]:25",
            "[::ffff:10.0.0.1]:25",
            "[2001:0db8::1]:25",
            "[fe80::1%2]:25",
            "localhost",
            "",
        ] {
            let mut m = MessageMeta::new(
                QueueId(1),
                2,
                "l".into(),
                peer,
                "".into(),
                ["r@x"].into_iter().collect(),
            );
            assert_eq!(m.peer(), peer);
            m = m.with_auth_user(Some("u".into()));
            let mut buf = Vec::new();
            encode_message(&mut buf, &m, &[], &[b"d"]);
            let frame = decode_frame(&buf).unwrap();
            let d = decode_message(frame.kind, frame.payload).unwrap();
            assert_eq!(d.meta, m);
            assert_eq!(
                (d.meta.peer().as_str(), d.meta.auth_user()),
                (peer, Some("u"))
            );
            // Taking the user away again leaves what a message without one has.
            let plain = m.clone().with_auth_user(None);
            assert_eq!(plain.auth_user(), None);
            assert_eq!(plain.peer(), peer);
        }
        let m = meta().with_auth_user(Some("u".into())).with_auth_user(None);
        assert_eq!(m, meta());
        assert_eq!(m.dsn(), &MailDsn::default());
        assert_eq!(m.rcpt_dsn_given(0), None);
    }

    #[test]
    fn recipients_pack_into_one_string() {
        for list in [
            vec![],
            vec!["a@x"],
            vec!["", "b@y", ""],
            vec!["a@x", "b@y", "c@z"],
        ] {
            let r: Recipients = list.iter().collect();
            assert_eq!(r.len(), list.len());
            assert_eq!(r.iter().collect::<Vec<_>>(), list);
            assert_eq!(r.get(list.len()), None);
            for (i, a) in list.iter().enumerate() {
                assert_eq!(&r[i], *a);
            }
        }
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
