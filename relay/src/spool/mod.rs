//! Durable storage of accepted messages and of each recipient's state, with group commit.
//!
//! Everything is appended to log segments (`<spool_dir>/segments/<n>.seg`) by one writer thread. The writer
//! takes every request that is waiting, writes them in one `write`, makes them durable with one
//! `fdatasync`, and only then answers them: many sessions share each sync, so durability costs latency but
//! not throughput. A session replies 250 only after its answer arrives. Recipient state changes (delivered,
//! deferred, bounced) are appended the same way, in the order they are made.
//!
//! On start the spool replays every segment. A crash can leave a torn record at the end of the segment
//! that was being written; its checksum fails, and the segment is truncated to its last whole record. No such
//! record was ever acknowledged, because acknowledgements follow the sync. A damaged record elsewhere (a
//! flipped bit, a bad sector) is skipped, counted and logged, and replay goes on from the next record that
//! verifies: the records after it were acknowledged and are not given up for one bad one.
//!
//! A write that fails is cut back so that nothing half-written sits in front of later records; if even that
//! fails, the writer refuses every later write until the relay restarts and replays, rather than append
//! behind garbage. A state change that was not written makes the next [`Spool::sync`] fail.
//!
//! Segments are never rewritten. Space comes back by deleting whole segments, oldest first: the oldest can
//! go once none of its messages is still queued. A queued message that holds an old segment alive is copied
//! forward (a new message record with the same id and its current state), after which the old copy no longer
//! counts. Deleting only from the front keeps replay simple: a record never refers to a message whose record
//! was deleted before it, except for messages that are finished anyway.

pub mod record;
mod spill;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

pub use record::{MessageMeta, QueueId, RcptState, RcptStates, RcptStatus, RcptUpdate, Recipients};
pub use spill::{Spill, SpillError};

/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The longest recipient state changes wait for a sync when nothing else brings one (see [`Writer::run`]).
const UNSYNCED_MAX: Duration = Duration::from_millis(200);
/// Upper bound on one group commit, so a burst cannot delay the first writer's answer without bound.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// The largest piece a [`MessageReader`] reads at once: what one delivery holds of its message, whatever the
/// message's size. Large enough that the hop to a blocking thread per piece costs little.
pub const READ_CHUNK: usize = 128 * 1024;

/// Messages up to this size are kept in memory for a while after they are stored (see [`Recent`]).
const RECENT_MESSAGE_MAX: usize = 64 * 1024;
/// Bytes of recently stored messages kept in memory, all together.
const RECENT_BYTES: usize = 16 * 1024 * 1024;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("spool {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("reading spool segment {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing spool segment {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("the spool writer has stopped")]
    Stopped,
    #[error(transparent)]
    Spill(#[from] SpillError),
}

/// Where a message's data lies: segment number, byte offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
}

/// A message found in the spool at start, with its recipients' states.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub meta: MessageMeta,
    pub states: RcptStates,
    pub location: Location,
}

type Ack = oneshot::Sender<Result<(u64, u64), Arc<SpoolError>>>;

struct WriteRequest {
    record: Vec<u8>,
    /// The end of the record's data, still in a spill file: copied in right after `record`.
    tail: Option<spill::Finished>,
    /// Answered once the record is durable; `None` for records nobody waits on (state changes).
    done: Option<Ack>,
}

impl WriteRequest {
    /// Bytes this request adds to the segment.
    fn len(&self) -> usize {
        self.record.len() + self.tail.as_ref().map_or(0, |t| t.len as usize)
    }
}

/// Handle to the spool; cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    tx: mpsc::Sender<WriteRequest>,
    last_id: AtomicU64,
    bytes: Arc<AtomicU64>,
    /// The segment the writer appends to; never deleted.
    current: Arc<AtomicU64>,
    /// Open segments for reading message data, by number.
    readers: Mutex<HashMap<u64, Arc<File>>>,
    /// The data of the small messages stored last.
    recent: Mutex<Recent>,
    /// Sizes of the segments on disk, by number.
    sizes: Arc<Mutex<BTreeMap<u64, u64>>>,
}

impl std::fmt::Debug for WriteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRequest")
            .field("len", &self.len())
            .finish()
    }
}

impl Spool {
    /// Opens (creating if needed) the spool at `dir`, loads what it holds, and starts the writer thread.
    pub fn open(dir: &Path) -> Result<(Spool, Vec<Loaded>), SpoolError> {
        let seg_dir = dir.join("segments");
        let dir_err = |source| SpoolError::Dir {
            path: seg_dir.clone(),
            source,
        };
        fs::create_dir_all(&seg_dir).map_err(dir_err)?;
        let lock = File::create(dir.join("lock")).map_err(dir_err)?;
        if lock.try_lock().is_err() {
            return Err(SpoolError::Locked {
                path: dir.to_owned(),
            });
        }
        let mut numbers = Vec::new();
        for entry in fs::read_dir(&seg_dir).map_err(dir_err)? {
            let name = entry.map_err(dir_err)?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_suffix(".seg"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut replay = Replay::default();
        let mut sizes = BTreeMap::new();
        // Two stages, one thread each: reading a segment and checking its records' checksums, then
        // decoding and applying them in order. The next segment is read while one is applied.
        std::thread::scope(|scope| -> Result<(), SpoolError> {
            // A rendezvous: the reader is at most one segment ahead, so two buffers take turns.
            let (read_tx, read_rx) = mpsc::sync_channel::<Result<ReadSegment, SpoolError>>(0);
            let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
            let seg_dir = &seg_dir;
            let numbers = &numbers;
            scope.spawn(move || {
                for &n in numbers {
                    let buf = spare_rx.try_recv().unwrap_or_default();
                    let read = read_segment(&segment_path(seg_dir, n), n, buf);
                    let failed = read.is_err();
                    if read_tx.send(read).is_err() || failed {
                        return;
                    }
                }
            });
            for read in read_rx {
                let read = read?;
                sizes.insert(read.number, apply_segment(&read, &mut replay)?);
                let _ = spare_tx.send(read.buf);
            }
            Ok(())
        })?;
        if replay.damaged > 0 {
            tracing::error!(
                records = replay.damaged,
                "damaged spool records were skipped during replay; what they held is lost"
            );
        }
        let loaded = replay.finish();
        let bytes: u64 = sizes.values().sum();
        let max_id = loaded.iter().map(|l| l.meta.id.0).max().unwrap_or(0);
        let next_segment = numbers.last().map_or(1, |n| n + 1);
        let writer = Writer::create(seg_dir.clone(), next_segment, lock)?;
        sizes.insert(next_segment, 0);
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            dir: seg_dir.clone(),
            tx,
            last_id: AtomicU64::new(max_id),
            bytes: Arc::new(AtomicU64::new(bytes)),
            current: Arc::new(AtomicU64::new(next_segment)),
            readers: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::default()),
            sizes: Arc::new(Mutex::new(sizes)),
        });
        let shared = WriterShared {
            bytes: inner.bytes.clone(),
            current: inner.current.clone(),
            sizes: inner.sizes.clone(),
        };
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx, shared))
            .map_err(dir_err)?;
        Ok((Spool { inner }, loaded))
    }

    /// A new queue id: unique within this spool, increasing, and close to the time of acceptance.
    pub fn next_id(&self) -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut prev = self.inner.last_id.load(Ordering::Relaxed);
        loop {
            let id = now.max(prev + 1);
            match self.inner.last_id.compare_exchange_weak(
                prev,
                id,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return QueueId(id),
                Err(p) => prev = p,
            }
        }
    }

    /// Bytes of segment data on disk.
    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Stores a message durably, with its recipients' states (all queued for a new message). Returns once
    /// it is on stable storage.
    pub async fn store(
        &self,
        meta: &MessageMeta,
        states: &[RcptState],
        parts: &[&[u8]],
    ) -> Result<Location, Arc<SpoolError>> {
        self.store_with(meta, states, parts, None).await
    }

    /// A place for a message's bytes while it arrives, when it is too large to hold in memory; hand it to
    /// [`Spool::store_with`] at its end.
    pub async fn spill(&self) -> Result<Spill, SpillError> {
        Spill::create(self.inner.dir.clone()).await
    }

    /// [`Spool::store`] for a message whose data is `parts` followed by what was written to `spill`.
    pub async fn store_with(
        &self,
        meta: &MessageMeta,
        states: &[RcptState],
        parts: &[&[u8]],
        spill: Option<Spill>,
    ) -> Result<Location, Arc<SpoolError>> {
        let tail = match spill {
            Some(s) => Some(
                s.finish()
                    .await
                    .map_err(|e| Arc::new(SpoolError::from(e)))?,
            ),
            None => None,
        };
        let in_record: usize = parts.iter().map(|p| p.len()).sum();
        let size = in_record as u64 + tail.as_ref().map_or(0, |t| t.len);
        let mut record = Vec::with_capacity(in_record + 256);
        let data_offset = record::encode_message_head(
            &mut record,
            meta,
            states,
            parts,
            tail.as_ref().map(|t| record::Tail {
                len: t.len,
                crc: &t.crc,
            }),
        );
        let (done, wait) = oneshot::channel();
        self.inner
            .tx
            .send(WriteRequest {
                record,
                tail,
                done: Some(done),
            })
            .map_err(|_| Arc::new(SpoolError::Stopped))?;
        let (segment, offset) = wait.await.map_err(|_| Arc::new(SpoolError::Stopped))??;
        let location = Location {
            segment,
            offset: offset + data_offset as u64,
            len: size,
        };
        if size as usize <= RECENT_MESSAGE_MAX {
            self.inner
                .recent()
                .insert(location, Arc::from(parts.concat()));
        }
        Ok(location)
    }

    /// Appends recipient state changes. They are written in call order, in the next group commit; the call
    /// does not wait for it.
    pub fn record_results(&self, id: QueueId, updates: &[RcptUpdate]) {
        let mut record = Vec::with_capacity(16 + updates.len() * 15);
        record::encode_results(&mut record, id, updates);
        self.send_unacked(record);
    }

    /// Appends the removal of a message.
    pub fn record_delete(&self, id: QueueId) {
        let mut record = Vec::with_capacity(24);
        record::encode_delete(&mut record, id);
        self.send_unacked(record);
    }

    fn send_unacked(&self, record: Vec<u8>) {
        if self
            .inner
            .tx
            .send(WriteRequest {
                record,
                tail: None,
                done: None,
            })
            .is_err()
        {
            tracing::error!("spool writer has stopped; a recipient state change was not recorded");
        }
    }

    /// Waits until everything sent before this call is durable.
    pub async fn sync(&self) -> Result<(), Arc<SpoolError>> {
        let (done, wait) = oneshot::channel();
        self.inner
            .tx
            .send(WriteRequest {
                record: Vec::new(),
                tail: None,
                done: Some(done),
            })
            .map_err(|_| Arc::new(SpoolError::Stopped))?;
        wait.await.map_err(|_| Arc::new(SpoolError::Stopped))??;
        Ok(())
    }

    /// Reads a message's data.
    pub async fn read(&self, location: Location) -> Result<Vec<u8>, SpoolError> {
        if let Some(data) = self.inner.recent().get(location) {
            return Ok(data.to_vec());
        }
        let inner = self.inner.clone();
        let path = segment_path(&inner.dir, location.segment);
        let res = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let file = inner.reader(location.segment)?;
            let mut buf = vec![0u8; location.len as usize];
            file.read_exact_at(&mut buf, location.offset)?;
            Ok(buf)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        res.map_err(|source| SpoolError::Read { path, source })
    }

    /// Opens a message's data for reading a piece at a time, so that sending it never needs it whole.
    pub async fn message(&self, location: Location) -> Result<MessageReader, SpoolError> {
        // A message stored a moment ago is usually still in memory: no read at all.
        if let Some(data) = self.inner.recent().get(location) {
            return Ok(MessageReader {
                inner: self.inner.clone(),
                source: Source::Memory(data),
                location,
                pos: 0,
                buf: Vec::new(),
                buf_at: None,
            });
        }
        // Nearly always the segment is open already: then no hop to a blocking thread.
        let open = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&location.segment)
            .cloned();
        let file = match open {
            Some(f) => f,
            None => {
                let inner = self.inner.clone();
                tokio::task::spawn_blocking(move || inner.reader(location.segment))
                    .await
                    .map_err(io::Error::other)
                    .and_then(|r| r)
                    .map_err(|source| SpoolError::Read {
                        path: segment_path(&self.inner.dir, location.segment),
                        source,
                    })?
            }
        };
        Ok(MessageReader {
            inner: self.inner.clone(),
            source: Source::File(file),
            location,
            pos: 0,
            buf: Vec::new(),
            buf_at: None,
        })
    }

    /// The segment being appended to now.
    pub fn current_segment(&self) -> u64 {
        self.inner.current.load(Ordering::Relaxed)
    }

    /// Segment numbers and sizes on disk, oldest first.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        let sizes = self.inner.sizes.lock().unwrap_or_else(|p| p.into_inner());
        sizes.iter().map(|(&n, &s)| (n, s)).collect()
    }

    /// Deletes a segment that holds nothing still needed. Callers delete oldest first (see the module docs).
    pub async fn delete_segment(&self, number: u64) -> Result<(), SpoolError> {
        if number >= self.current_segment() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let path = segment_path(&inner.dir, number);
        let p = path.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            inner
                .readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&number);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let size = inner
                .sizes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&number)
                .unwrap_or(0);
            inner.bytes.fetch_sub(size, Ordering::Relaxed);
            File::open(&inner.dir)?.sync_all()
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map_err(|source| SpoolError::Write { path, source })
    }
}

/// A message's data, read from its segment in pieces of at most [`READ_CHUNK`] bytes; see [`Spool::message`].
///
/// It holds its segment's file open: a segment deleted meanwhile stays readable until the reader goes.
#[derive(Debug)]
pub struct MessageReader {
    inner: Arc<Inner>,
    source: Source,
    location: Location,
    /// Bytes of the message read so far.
    pos: u64,
    /// The last piece read; its memory is reused for the next one.
    buf: Vec<u8>,
    /// Where in the message `buf` starts, while it holds a whole piece: a message of one piece is read
    /// once for all the transactions that send it.
    buf_at: Option<u64>,
}

impl MessageReader {
    /// The message's size in bytes.
    pub fn len(&self) -> u64 {
        self.location.len
    }

    pub fn is_empty(&self) -> bool {
        self.location.len == 0
    }

    /// Goes back to the first byte, to send the message again (the next transaction on a connection).
    pub fn rewind(&mut self) {
        self.pos = 0;
    }

    /// The next piece of the message (never empty), or None after the last. The read runs on a blocking
    /// thread; a message shorter on disk than its record says is an error, not a short message.
    pub async fn next_piece(&mut self) -> Result<Option<&[u8]>, SpoolError> {
        let left = self.location.len - self.pos;
        if left == 0 {
            return Ok(None);
        }
        let n = left.min(READ_CHUNK as u64) as usize;
        let file = match &self.source {
            Source::Memory(data) => {
                let at = self.pos as usize;
                self.pos += n as u64;
                return Ok(Some(&data[at..at + n]));
            }
            Source::File(file) => file.clone(),
        };
        if self.buf_at != Some(self.pos) || self.buf.len() != n {
            self.buf_at = None;
            let mut buf = std::mem::take(&mut self.buf);
            let offset = self.location.offset + self.pos;
            let (buf, read) = tokio::task::spawn_blocking(move || {
                buf.resize(n, 0);
                let read = file.read_exact_at(&mut buf, offset);
                (buf, read)
            })
            .await
            .map_err(|e| self.error(io::Error::other(e)))?;
            self.buf = buf;
            read.map_err(|e| self.error(e))?;
            self.buf_at = Some(self.pos);
        }
        self.pos += n as u64;
        Ok(Some(&self.buf))
    }

    fn error(&self, source: io::Error) -> SpoolError {
        SpoolError::Read {
            path: segment_path(&self.inner.dir, self.location.segment),
            source,
        }
    }
}

/// Where a [`MessageReader`] reads from.
#[derive(Debug)]
enum Source {
    /// The message's segment, held open: a segment deleted meanwhile stays readable until the reader goes.
    File(Arc<File>),
    /// The message's data, still in memory since it was stored.
    Memory(Arc<[u8]>),
}

/// The data of the small messages stored last, up to [`RECENT_BYTES`], oldest dropped first.
///
/// Nearly every message is delivered moments after it is stored: kept here, its first delivery reads no
/// segment and takes no hop to a blocking thread. A message that waits longer is read from its segment
/// (mostly from the page cache) as before, so what the queue holds per message stays an index entry.
#[derive(Debug, Default)]
struct Recent {
    data: HashMap<(u64, u64), Arc<[u8]>>,
    order: std::collections::VecDeque<(u64, u64)>,
    bytes: usize,
}

impl Recent {
    fn insert(&mut self, at: Location, data: Arc<[u8]>) {
        let key = (at.segment, at.offset);
        self.bytes += data.len();
        if let Some(old) = self.data.insert(key, data) {
            self.bytes -= old.len();
        } else {
            self.order.push_back(key);
        }
        while self.bytes > RECENT_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.data.remove(&oldest) {
                self.bytes -= d.len();
            }
        }
    }

    fn get(&self, at: Location) -> Option<Arc<[u8]>> {
        self.data
            .get(&(at.segment, at.offset))
            .filter(|d| d.len() as u64 == at.len)
            .cloned()
    }
}

impl Inner {
    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reader(&self, segment: u64) -> io::Result<Arc<File>> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = readers.get(&segment) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(segment_path(&self.dir, segment))?);
        readers.insert(segment, f.clone());
        Ok(f)
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.seg"))
}

/// Replay state: the latest record of each message, with state changes applied in log order.
///
/// A spool can hold millions of messages, and what replay holds of them at its end is the peak of a start,
/// so it is laid out as tightly as the queue that follows: the messages in one vector sorted by id, found by
/// binary search, with no map whose slack would be paid on every message. Records come nearly in id order
/// (ids are handed out at acceptance, records written as sessions finish), so a record goes at the end or a
/// few places before it; one that belongs far back (a copy that compaction made of an old message) waits
/// aside in `strays`, which [`Replay::finish`] merges. A deleted message stays in place with its recipients
/// gone, so that the order holds; `finish` drops it with the finished ones. Listener names and senders
/// are shared as they are decoded.
#[derive(Default)]
struct Replay {
    messages: Vec<Loaded>,
    strays: HashMap<QueueId, Loaded>,
    strings: HashSet<Arc<str>>,
    /// Damaged records skipped.
    damaged: usize,
}

impl Replay {
    /// Bound on the shared texts: a spool with more distinct senders only shares less.
    const MAX_STRINGS: usize = 4096;
    /// How far from the end a record is put in its place in `messages`, moving those after it.
    const NEAR_END: usize = 1024;

    fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(t) = self.strings.get(text) {
            return t.clone();
        }
        if self.strings.len() >= Self::MAX_STRINGS {
            self.strings.clear();
        }
        let t: Arc<str> = Arc::from(text);
        self.strings.insert(t.clone());
        t
    }

    fn insert(&mut self, loaded: Loaded) {
        let id = loaded.meta.id;
        if let Some(l) = self.strays.get_mut(&id) {
            *l = loaded;
            return;
        }
        if self.messages.last().is_none_or(|l| l.meta.id < id) {
            self.messages.push(loaded);
            return;
        }
        match self.messages.binary_search_by_key(&id, |l| l.meta.id) {
            Ok(at) => self.messages[at] = loaded,
            Err(at) if self.messages.len() - at <= Self::NEAR_END => {
                self.messages.insert(at, loaded);
            }
            Err(_) => {
                self.strays.insert(id, loaded);
            }
        }
    }

    fn get_mut(&mut self, id: QueueId) -> Option<&mut Loaded> {
        if let Some(l) = self.strays.get_mut(&id) {
            return Some(l);
        }
        let at = self
            .messages
            .binary_search_by_key(&id, |l| l.meta.id)
            .ok()?;
        self.messages.get_mut(at)
    }

    fn remove(&mut self, id: QueueId) {
        if self.strays.remove(&id).is_none()
            && let Some(l) = self.get_mut(id)
        {
            l.meta.recipients = Recipients::default();
            l.states = RcptStates::Many(Vec::new());
        }
    }

    /// The messages with a recipient still to deliver, in id order, built where they lie.
    fn finish(self) -> Vec<Loaded> {
        let Replay {
            mut messages,
            strays,
            ..
        } = self;
        let live = |l: &Loaded| !l.states.iter().all(|s| s.status.is_final());
        messages.retain(live);
        if !strays.is_empty() {
            messages.extend(strays.into_values().filter(live));
            messages.sort_unstable_by_key(|l| l.meta.id);
        }
        messages.shrink_to_fit();
        messages
    }
}

/// Where replay can go on after a record at `pos` that does not verify: the next offset at which a record
/// verifies and is followed by another that verifies, or by the end of the segment. None when nothing after
/// `pos` verifies: a torn tail. Tried first is the end the damaged record's own length gives (a flipped bit
/// in its body leaves its header intact).
fn resync(buf: &[u8], pos: usize) -> Option<usize> {
    let chained = |at: usize| match record::decode_frame(&buf[at..]) {
        Ok(f) => at + f.len == buf.len() || record::decode_frame(&buf[at + f.len..]).is_ok(),
        Err(_) => false,
    };
    let by_length = buf
        .get(pos + 2..pos + 6)
        .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .map(|len| pos + record::FRAME_LEN + len)
        .filter(|&end| end < buf.len() && chained(end));
    by_length.or_else(|| {
        (pos + 1..buf.len())
            .filter(|&at| buf[at] == record::MAGIC)
            .find(|&at| chained(at))
    })
}

/// Replays one segment into `replay`; truncates a torn tail. Returns the segment's size after that.
#[cfg(test)]
fn load_segment(path: &Path, number: u64, replay: &mut Replay) -> Result<u64, SpoolError> {
    let read = read_segment(path, number, Vec::new())?;
    apply_segment(&read, replay)
}

/// A segment's bytes, read and checked, ready to be applied.
struct ReadSegment {
    number: u64,
    path: PathBuf,
    buf: Vec<u8>,
    verified: Option<Verified>,
}

/// The records of a segment that verify, when none is damaged.
struct Verified {
    /// Where each record starts, and its length.
    frames: Vec<(usize, usize)>,
    /// Where the whole records end.
    end: usize,
    /// Why what follows them (a torn tail) does not decode.
    torn: Option<record::RecordError>,
}

/// Reads segment `number` into `buf` (reused from segment to segment: a fresh 64 MiB buffer per segment
/// is that much memory to fault in again) and checks every record's checksum.
fn read_segment(path: &Path, number: u64, mut buf: Vec<u8>) -> Result<ReadSegment, SpoolError> {
    buf.clear();
    File::open(path)
        .and_then(|mut f| {
            buf.reserve(f.metadata()?.len() as usize);
            io::Read::read_to_end(&mut f, &mut buf)
        })
        .map_err(|source| SpoolError::Read {
            path: path.to_owned(),
            source,
        })?;
    let verified = verify(&buf);
    Ok(ReadSegment {
        number,
        path: path.to_owned(),
        buf,
        verified,
    })
}

/// Replays a segment read by [`read_segment`] into `replay` and truncates a torn tail. Returns the segment's
/// size after that.
fn apply_segment(read: &ReadSegment, replay: &mut Replay) -> Result<u64, SpoolError> {
    let path = &read.path;
    let (end, torn) = replay_verified(&read.buf, read.verified.as_ref(), path, read.number, replay);
    if let Some(e) = torn {
        tracing::warn!(
            segment = %path.display(),
            offset = end,
            error = %e,
            "spool segment ends in an incomplete record (left by a crash before it was acknowledged); truncating"
        );
        let read_err = |source| SpoolError::Read {
            path: path.to_owned(),
            source,
        };
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(read_err)?;
        f.set_len(end as u64).map_err(read_err)?;
        f.sync_all().map_err(read_err)?;
    }
    Ok(end as u64)
}

/// Every record of `buf` that verifies, or None when a damaged one is among them.
fn verify(buf: &[u8]) -> Option<Verified> {
    let mut frames = Vec::new();
    let mut damaged = false;
    let (end, torn) = walk(
        buf,
        |pos, f| frames.push((pos, f.len)),
        |_, _, _| damaged = true,
    );
    (!damaged).then_some(Verified { frames, end, torn })
}

/// Replays the bytes of segment `number` (read from `path`, named in logs) into `replay`. Returns where its
/// whole records end and, when a torn tail follows, why it did not decode; cutting it off is the caller's.
fn replay_segment(
    buf: &[u8],
    path: &Path,
    number: u64,
    replay: &mut Replay,
) -> (usize, Option<record::RecordError>) {
    replay_verified(buf, verify(buf).as_ref(), path, number, replay)
}

/// [`replay_segment`] for bytes already checked by [`verify`].
fn replay_verified(
    buf: &[u8],
    verified: Option<&Verified>,
    path: &Path,
    number: u64,
    replay: &mut Replay,
) -> (usize, Option<record::RecordError>) {
    // Nearly always nothing is damaged: every record verified once, and is applied as it stands.
    if let Some(v) = verified {
        for &(pos, len) in &v.frames {
            let bytes = &buf[pos..pos + len];
            let frame = record::Frame {
                kind: bytes[1],
                payload: &bytes[record::FRAME_LEN..],
                len,
            };
            apply(replay, number, pos, &frame, path);
        }
        return (v.end, v.torn);
    }
    // Replay what the next start will read, once the torn tail is cut off: where replay goes on after a
    // damaged record can depend on what follows it (a record counts as found when the end of the segment
    // follows it), so a tail still there now could make this start find a message that the next one does
    // not, or the other way round. The tail is cut until none is left; without a damaged record the
    // first cut is the last.
    let mut len = buf.len();
    let mut torn = None;
    loop {
        let mut damaged = 0;
        let (end, error) = walk(&buf[..len], |_, _| {}, |_, _, _| damaged += 1);
        torn = torn.or(error);
        let done = end == len || damaged == 0;
        len = end;
        if done {
            break;
        }
    }
    let mut damaged = 0;
    walk(
        &buf[..len],
        |pos, frame| apply(replay, number, pos, &frame, path),
        |pos, next, e| {
            tracing::error!(
                segment = %path.display(),
                offset = pos,
                skipped = next - pos,
                error = %e,
                "damaged spool record skipped; replay goes on with the next record that verifies"
            );
            damaged += 1;
        },
    );
    replay.damaged += damaged;
    (len, torn)
}

/// Walks the records of `buf` from its start: `found` gets each record that verifies with its offset,
/// `damaged` each record that does not (its offset, where replay goes on, and why). Returns where the whole
/// records end and, when something follows them (a torn tail), why it does not decode.
fn walk<'a>(
    buf: &'a [u8],
    mut found: impl FnMut(usize, record::Frame<'a>),
    mut damaged: impl FnMut(usize, usize, record::RecordError),
) -> (usize, Option<record::RecordError>) {
    let mut pos = 0;
    while pos < buf.len() {
        match record::decode_frame(&buf[pos..]) {
            Ok(frame) => {
                let len = frame.len;
                found(pos, frame);
                pos += len;
            }
            Err(e) => match resync(buf, pos) {
                Some(next) => {
                    damaged(pos, next, e);
                    pos = next;
                }
                None => return (pos, Some(e)),
            },
        }
    }
    (pos, None)
}

/// Applies one record at offset `pos` of segment `number` to the messages replayed so far.
fn apply(messages: &mut Replay, number: u64, pos: usize, frame: &record::Frame<'_>, path: &Path) {
    let applied = match frame.kind {
        record::KIND_MESSAGE | record::KIND_MESSAGE_DSN => {
            let decoded =
                record::decode_message_with(frame.kind, frame.payload, &mut |s| messages.intern(s));
            decoded.map(|d| {
                let location = Location {
                    segment: number,
                    offset: (pos + record::FRAME_LEN + d.data_offset) as u64,
                    len: d.data_len,
                };
                let mut states = d.states;
                states.resize(d.meta.recipients.len(), RcptState::QUEUED);
                messages.insert(Loaded {
                    meta: d.meta,
                    states: states.into(),
                    location,
                });
            })
        }
        record::KIND_RESULTS => record::decode_results(frame.payload).map(|(id, updates)| {
            // Results for a message whose record was compacted away belong to a finished message.
            if let Some(m) = messages.get_mut(id) {
                for u in updates {
                    if let Some(s) = m.states.get_mut(u.index as usize) {
                        *s = u.state;
                    }
                }
            }
        }),
        record::KIND_DELETE => record::decode_delete(frame.payload).map(|id| {
            messages.remove(id);
        }),
        _ => Ok(()),
    };
    if let Err(e) = applied {
        tracing::error!(segment = %path.display(), offset = pos, error = %e, "skipping a malformed spool record");
    }
}

/// What replaying one segment's bytes gives: the messages still queued, how many damaged records were
/// skipped, and where the whole records end (a torn tail after that is truncated on disk). Loading does
/// this to each segment file; it is public for the fuzz targets (`fuzz/`), which feed it arbitrary bytes.
#[doc(hidden)]
pub fn replay_bytes(buf: &[u8]) -> (Vec<Loaded>, usize, usize) {
    let mut replay = Replay::default();
    let (end, _) = replay_segment(buf, Path::new("(fuzz)"), 1, &mut replay);
    let damaged = replay.damaged;
    (replay.finish(), damaged, end)
}

/// What the writer thread shares with the handles.
struct WriterShared {
    bytes: Arc<AtomicU64>,
    current: Arc<AtomicU64>,
    sizes: Arc<Mutex<BTreeMap<u64, u64>>>,
}

/// The writer thread's state: the segment being appended to.
struct Writer {
    dir: PathBuf,
    number: u64,
    file: File,
    len: u64,
    /// Held while the writer runs, so a second relay cannot share the spool.
    lock: File,
    /// A failed write could not be cut back: nothing more is appended behind it until a restart replays.
    broken: Option<Arc<SpoolError>>,
    /// A state change that nobody waited for was not written; the next sync reports it.
    unacked_lost: Option<Arc<SpoolError>>,
    /// Something was written after the last sync.
    unsynced: bool,
}

impl Writer {
    fn create(dir: PathBuf, number: u64, lock: File) -> Result<Writer, SpoolError> {
        let path = segment_path(&dir, number);
        let err = |source| SpoolError::Write {
            path: path.clone(),
            source,
        };
        // Not O_APPEND: copy_file_range (spilled message data, see `write_batch`) refuses such a target. The
        // writer is the file's only writer and keeps its position at the end (a failed write is cut back
        // and the position with it).
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(err)?;
        // A new file's name is durable only once its directory is synced.
        File::open(&dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(Writer {
            dir,
            number,
            file,
            len: 0,
            lock,
            broken: None,
            unacked_lost: None,
            unsynced: false,
        })
    }

    /// Takes requests until every sender is gone. A batch that somebody waits on (a new message, a sync) is
    /// synced before it is answered. A batch of state changes only is written and left for the next sync,
    /// at most [`UNSYNCED_MAX`] later: nobody waits on them, a crash of the process loses nothing written,
    /// and one sync per delivery would cost as much as the deliveries. What only a power cut can lose is
    /// that moment's "delivered", and such a recipient is delivered again (at least once, never lost).
    fn run(mut self, rx: mpsc::Receiver<WriteRequest>, shared: WriterShared) {
        let mut batch: Vec<WriteRequest> = Vec::new();
        loop {
            let first = if self.unsynced {
                match rx.recv_timeout(UNSYNCED_MAX) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.sync_unsynced();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            let mut size = first.len();
            batch.push(first);
            // Everything that queued up during the previous sync joins this one.
            while size < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        size += r.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            let start = self.len;
            let written: usize = batch.iter().map(WriteRequest::len).sum();
            let waited_on = batch.iter().any(|r| r.done.is_some());
            let result = self.commit(&batch, waited_on);
            if let Err(e) = &result
                && batch
                    .iter()
                    .any(|r| r.done.is_none() && !r.record.is_empty())
            {
                self.unacked_lost = Some(e.clone());
            }
            if result.is_ok() {
                shared.bytes.fetch_add(written as u64, Ordering::Relaxed);
                shared
                    .sizes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(self.number, self.len);
            }
            let mut offset = start;
            for req in batch.drain(..) {
                let len = req.len() as u64;
                if let Some(done) = req.done {
                    let reply = match &result {
                        // A sync: everything sent before it must be durable, not only this batch.
                        Ok(()) if req.record.is_empty() => match self.unacked_lost.take() {
                            Some(lost) => Err(lost),
                            None => Ok((self.number, offset)),
                        },
                        Ok(()) => Ok((self.number, offset)),
                        Err(e) => Err(e.clone()),
                    };
                    // A session that went away no longer needs its answer; the message stays spooled.
                    let _ = done.send(reply);
                }
                offset += len;
            }
            if self.len >= SEGMENT_BYTES {
                self.sync_unsynced();
                self.rotate(&shared);
            }
        }
        self.sync_unsynced();
    }

    /// Syncs what was written without a sync; a failure is reported by the next [`Spool::sync`].
    fn sync_unsynced(&mut self) {
        if !self.unsynced {
            return;
        }
        self.unsynced = false;
        if let Err(source) = self.file.sync_data() {
            let path = segment_path(&self.dir, self.number);
            tracing::error!(segment = %path.display(), error = %source, "syncing recipient state changes failed");
            self.unacked_lost = Some(Arc::new(SpoolError::Write { path, source }));
        }
    }

    fn rotate(&mut self, shared: &WriterShared) {
        let next = self
            .lock
            .try_clone()
            .map_err(|source| SpoolError::Write {
                path: self.dir.clone(),
                source,
            })
            .and_then(|lock| Writer::create(self.dir.clone(), self.number + 1, lock));
        match next {
            Ok(mut next) => {
                next.unacked_lost = self.unacked_lost.take();
                *self = next;
                shared
                    .sizes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(self.number, 0);
                shared.current.store(self.number, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a new spool segment; appending to the current one")
            }
        }
    }

    /// Writes and syncs one batch. On failure the segment is cut back to where it was, so that a partial
    /// write cannot sit in front of later records.
    ///
    /// The records go out with vectored writes straight from the requests: copying them into one buffer
    /// first would hold every message of the batch twice, and keep a buffer as large as the largest batch
    /// ever for the life of the process.
    fn commit(&mut self, batch: &[WriteRequest], sync: bool) -> Result<(), Arc<SpoolError>> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let total: usize = batch.iter().map(WriteRequest::len).sum();
        if total == 0 {
            // A sync alone: it makes durable what earlier batches left unsynced.
            if sync && self.unsynced {
                self.unsynced = false;
                self.file.sync_data().map_err(|source| {
                    Arc::new(SpoolError::Write {
                        path: segment_path(&self.dir, self.number),
                        source,
                    })
                })?;
            }
            return Ok(());
        }
        let path = segment_path(&self.dir, self.number);
        let written = self
            .write_batch(batch)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.len += total as u64;
                // A sync covers everything written before it.
                self.unsynced = !sync;
                Ok(())
            }
            Err(source) => {
                let err = Arc::new(SpoolError::Write { path, source });
                let cut = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(drop));
                if let Err(e) = cut {
                    tracing::error!(error = %e, "cannot cut a failed spool write back; refusing further writes until a restart");
                    self.broken = Some(err.clone());
                }
                Err(err)
            }
        }
    }

    /// Writes the batch's records in order: runs of in-memory records in one vectored write each, and each
    /// spill straight from its file behind its record's head.
    fn write_batch(&mut self, batch: &[WriteRequest]) -> io::Result<()> {
        let mut from = 0;
        for (i, req) in batch.iter().enumerate() {
            let Some(tail) = &req.tail else { continue };
            self.write_records(&batch[from..=i])?;
            // std's copy is copy_file_range between two files on Linux: the kernel moves the bytes.
            let copied = io::copy(&mut &tail.file, &mut self.file)?;
            if copied != tail.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "spill file holds {copied} bytes, {} were written to it",
                        tail.len
                    ),
                ));
            }
            from = i + 1;
        }
        self.write_records(&batch[from..])
    }

    fn write_records(&mut self, requests: &[WriteRequest]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = requests
            .iter()
            .filter(|r| !r.record.is_empty())
            .map(|r| IoSlice::new(&r.record))
            .collect();
        write_all_vectored(&mut self.file, &mut slices)
    }
}

/// `Write::write_all` for several buffers (std's `write_all_vectored` is not stable): a short write
/// resumes where it stopped; more buffers than the kernel takes at once (IOV_MAX) go in several calls.
fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: QueueId) -> MessageMeta {
        MessageMeta::new(
            id,
            1,
            "l".into(),
            "127.0.0.1:1",
            "a@b.test".into(),
            ["c@d.test", "e@d.test"].into_iter().collect(),
        )
    }

    /// A message whose sender gave DSN parameters, stored in their own record kind.
    fn dsn_meta(id: QueueId) -> MessageMeta {
        use herald_smtp::dsn::{MailDsn, Notify, Orcpt, RcptDsn, Ret};
        meta(id).with_dsn(
            MailDsn {
                ret: Some(Ret::Full),
                envid: Some("E1".into()),
            },
            vec![
                RcptDsn::default(),
                RcptDsn {
                    notify: Some(Notify::NEVER),
                    orcpt: Some(Orcpt::parse("rfc822;e@d.test").unwrap()),
                },
            ],
        )
    }

    fn reopen(dir: &Path) -> (Spool, Vec<Loaded>) {
        // The writer thread releases the lock when it sees the last handle go; give it a moment.
        for _ in 0..200 {
            match Spool::open(dir) {
                Ok(r) => return r,
                Err(SpoolError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("spool lock not released after the handle was dropped");
    }

    #[tokio::test]
    async fn stored_messages_and_states_load_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let (spool, loaded) = Spool::open(dir.path()).unwrap();
            assert!(loaded.is_empty());
            let mut ids = Vec::new();
            for i in 0..50 {
                let id = spool.next_id();
                let body = format!("message {i}\r\n");
                spool
                    .store(&meta(id), &[], &[body.as_bytes()])
                    .await
                    .unwrap();
                ids.push(id);
            }
            let done = RcptState {
                status: RcptStatus::Delivered,
                attempts: 1,
                next_attempt_ms: 0,
            };
            let later = RcptState {
                status: RcptStatus::Deferred,
                attempts: 1,
                next_attempt_ms: 99,
            };
            // Message 0: both delivered (finished). Message 1: one delivered, one deferred. Message 2: deleted.
            let both = [
                RcptUpdate {
                    index: 0,
                    state: done,
                },
                RcptUpdate {
                    index: 1,
                    state: done,
                },
            ];
            spool.record_results(ids[0], &both);
            spool.record_results(
                ids[1],
                &[RcptUpdate {
                    index: 0,
                    state: done,
                }],
            );
            spool.record_results(
                ids[1],
                &[RcptUpdate {
                    index: 1,
                    state: later,
                }],
            );
            spool.record_delete(ids[2]);
            spool.sync().await.unwrap();
            ids
        };
        let (spool, loaded) = reopen(dir.path());
        let got: Vec<QueueId> = loaded.iter().map(|l| l.meta.id).collect();
        assert_eq!(
            got,
            ids[1..2]
                .iter()
                .chain(&ids[3..])
                .copied()
                .collect::<Vec<_>>()
        );
        assert_eq!(loaded[0].states[0].status, RcptStatus::Delivered);
        assert_eq!(loaded[0].states[1].next_attempt_ms, 99);
        assert!(spool.next_id() > *ids.last().unwrap());
        let data = spool.read(loaded[5].location).await.unwrap();
        assert_eq!(data, b"message 7\r\n");
    }

    #[tokio::test]
    async fn a_small_message_just_stored_reads_from_memory_and_a_large_one_from_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let small = b"Subject: s\r\n\r\nsmall\r\n".to_vec();
        let large = vec![b'x'; RECENT_MESSAGE_MAX + 1];
        let (a, b) = (spool.next_id(), spool.next_id());
        let at_small = spool.store(&meta(a), &[], &[&small]).await.unwrap();
        let at_large = spool.store(&meta(b), &[], &[&large]).await.unwrap();
        // The segment loses its data behind the spool's back: only what is in memory still reads.
        let seg = segment_path(&dir.path().join("segments"), at_small.segment);
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert_eq!(spool.read(at_small).await.unwrap(), small);
        let mut reader = spool.message(at_small).await.unwrap();
        assert_eq!(reader.next_piece().await.unwrap(), Some(&small[..]));
        assert_eq!(reader.next_piece().await.unwrap(), None);
        assert!(spool.read(at_large).await.is_err());
        let mut reader = spool.message(at_large).await.unwrap();
        assert!(reader.next_piece().await.is_err());
    }

    #[tokio::test]
    async fn spilled_data_lands_in_the_record_between_others_and_replays_whole() {
        let dir = tempfile::tempdir().unwrap();
        // Data with every byte value, larger than one read piece, written to the spill in odd pieces.
        let big: Vec<u8> = (0..READ_CHUNK * 3 + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (spilled, small_a, small_b) = {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            let mut spill = spool.spill().await.unwrap();
            for piece in big.chunks(65_521) {
                spill.write(piece).await.unwrap();
            }
            assert_eq!(spill.len(), big.len() as u64);
            let (a, b, c) = (spool.next_id(), spool.next_id(), spool.next_id());
            // Sent together, so one group commit holds an in-memory record on either side of the spill.
            let (ma, mb, mc) = (meta(a), dsn_meta(b), meta(c));
            let (ra, rb, rc) = tokio::join!(
                spool.store(&ma, &[], &[b"first\r\n"]),
                spool.store_with(&mb, &[], &[b"Prefix: 1\r\n"], Some(spill)),
                spool.store(&mc, &[], &[b"last\r\n"]),
            );
            let (la, lb, lc) = (ra.unwrap(), rb.unwrap(), rc.unwrap());
            assert_eq!(lb.len, big.len() as u64 + 11);
            let mut reader = spool.message(lb).await.unwrap();
            let mut back = Vec::new();
            while let Some(p) = reader.next_piece().await.unwrap() {
                back.extend_from_slice(p);
            }
            assert_eq!(&back[..11], b"Prefix: 1\r\n");
            assert!(
                back[11..] == big[..],
                "the spilled bytes read back as written"
            );
            assert_eq!(spool.read(la).await.unwrap(), b"first\r\n");
            assert_eq!(spool.read(lc).await.unwrap(), b"last\r\n");
            (b, a, c)
        };
        let (spool, loaded) = reopen(dir.path());
        assert_eq!(
            loaded.len(),
            3,
            "every record verifies on replay, checksum included"
        );
        let m = loaded.iter().find(|l| l.meta.id == spilled).unwrap();
        assert_eq!(m.meta, dsn_meta(spilled));
        let data = spool.read(m.location).await.unwrap();
        assert!(data[11..] == big[..]);
        for (id, want) in [(small_a, &b"first\r\n"[..]), (small_b, b"last\r\n")] {
            let l = loaded.iter().find(|l| l.meta.id == id).unwrap();
            assert_eq!(spool.read(l.location).await.unwrap(), want);
        }
    }

    #[tokio::test]
    async fn a_message_reads_back_in_bounded_pieces_and_again_after_a_rewind() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let body: Vec<u8> = (0..3 * READ_CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let loc = spool
            .store(&meta(spool.next_id()), &[], &[&body[..10], &body[10..]])
            .await
            .unwrap();
        let mut reader = spool.message(loc).await.unwrap();
        assert_eq!(reader.len(), body.len() as u64);
        for _ in 0..2 {
            let mut got = Vec::new();
            let mut pieces = 0;
            while let Some(p) = reader.next_piece().await.unwrap() {
                assert!(!p.is_empty() && p.len() <= READ_CHUNK);
                got.extend_from_slice(p);
                pieces += 1;
            }
            assert_eq!((pieces, got == body), (4, true));
            reader.rewind();
        }
        // A message of one piece is read once for every transaction that sends it (one too large to be
        // kept in memory after it was stored, so that it is read from its segment).
        let one = vec![b'o'; RECENT_MESSAGE_MAX + 100];
        let one_piece = spool
            .store(&meta(spool.next_id()), &[], &[&one])
            .await
            .unwrap();
        let mut reader = spool.message(one_piece).await.unwrap();
        for _ in 0..2 {
            assert_eq!(reader.next_piece().await.unwrap(), Some(&one[..]));
            assert_eq!(reader.next_piece().await.unwrap(), None);
            reader.rewind();
        }
        assert_eq!(reader.buf_at, Some(0));
        // A record that claims more than the segment holds is an error, not a short message.
        let past = Location {
            len: loc.len + READ_CHUNK as u64,
            ..loc
        };
        let mut reader = spool.message(past).await.unwrap();
        let mut result = Ok(None);
        for _ in 0..5 {
            result = reader.next_piece().await.map(|p| p.map(<[u8]>::len));
            if !matches!(result, Ok(Some(_))) {
                break;
            }
        }
        assert!(matches!(result, Err(SpoolError::Read { .. })), "{result:?}");
    }

    #[tokio::test]
    async fn a_copied_record_replaces_the_old_one_and_old_segments_can_go() {
        let dir = tempfile::tempdir().unwrap();
        let (id, first_segment) = {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            let id = spool.next_id();
            let loc = spool.store(&dsn_meta(id), &[], &[b"x\r\n"]).await.unwrap();
            (id, loc.segment)
        };
        let (spool, loaded) = reopen(dir.path());
        let state = RcptState {
            status: RcptStatus::Deferred,
            attempts: 2,
            next_attempt_ms: 5,
        };
        let copy = spool
            .store(&loaded[0].meta, &[state, state], &[b"x\r\n"])
            .await
            .unwrap();
        assert!(copy.segment > first_segment);
        spool.delete_segment(first_segment).await.unwrap();
        drop(spool);
        let (_spool, loaded) = reopen(dir.path());
        assert_eq!(loaded.len(), 1);
        // The copy keeps the envelope whole, DSN parameters included.
        assert_eq!(loaded[0].meta, dsn_meta(id));
        assert_eq!(loaded[0].states[1], state);
    }

    #[test]
    fn vectored_writes_take_more_buffers_than_one_call_can() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let mut file = File::create(&path).unwrap();
        let records: Vec<Vec<u8>> = (0..3000u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let mut slices: Vec<IoSlice<'_>> = records.iter().map(|r| IoSlice::new(r)).collect();
        write_all_vectored(&mut file, &mut slices).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), records.concat());
    }

    #[test]
    fn torn_tail_is_truncated_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let seg_dir = dir.path().join("segments");
        fs::create_dir_all(&seg_dir).unwrap();
        let mut buf = Vec::new();
        record::encode_message(&mut buf, &meta(QueueId(1)), &[], &[b"one\r\n"]);
        let good = buf.len();
        record::encode_message(&mut buf, &meta(QueueId(2)), &[], &[b"two\r\n"]);
        buf.truncate(buf.len() - 3);
        fs::write(segment_path(&seg_dir, 1), &buf).unwrap();
        let mut replay = Replay::default();
        let size = load_segment(&segment_path(&seg_dir, 1), 1, &mut replay).unwrap();
        assert_eq!(replay.finish().len(), 1);
        assert_eq!(size, good as u64);
        assert_eq!(
            fs::metadata(segment_path(&seg_dir, 1)).unwrap().len(),
            good as u64
        );
    }

    /// Three message records in one segment, the middle one damaged by `damage`; returns what replay keeps.
    fn replay_with_damage(damage: impl Fn(&mut Vec<u8>, usize)) -> (Vec<QueueId>, usize, u64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let seg_dir = dir.path().join("segments");
        fs::create_dir_all(&seg_dir).unwrap();
        let mut buf = Vec::new();
        record::encode_message(&mut buf, &meta(QueueId(1)), &[], &[b"one\r\n"]);
        let second = buf.len();
        record::encode_message(&mut buf, &meta(QueueId(2)), &[], &[b"two\r\n"]);
        record::encode_message(&mut buf, &meta(QueueId(3)), &[], &[b"three\r\n"]);
        damage(&mut buf, second);
        let whole = buf.len() as u64;
        fs::write(segment_path(&seg_dir, 1), &buf).unwrap();
        let mut replay = Replay::default();
        let size = load_segment(&segment_path(&seg_dir, 1), 1, &mut replay).unwrap();
        let damaged = replay.damaged;
        let mut ids: Vec<QueueId> = replay.finish().into_iter().map(|l| l.meta.id).collect();
        ids.sort();
        (ids, damaged, size, whole)
    }

    /// Records come nearly in id order: out of place by a few (sessions finish in another order than they
    /// began), or far back (a copy of an old message whose first record was reclaimed). Each kind ends up
    /// in id order, with its states and a delete applied to the right message.
    #[test]
    fn replay_finds_messages_out_of_order_near_and_far() {
        let mut buf = Vec::new();
        let deferred = RcptState {
            status: RcptStatus::Deferred,
            attempts: 1,
            next_attempt_ms: 5,
        };
        let mut ids: Vec<u64> = (100..2200).collect();
        // Neighbours swapped, and a far stray after them all.
        ids.swap(10, 11);
        ids.swap(2000, 2003);
        ids.push(7);
        for &id in &ids {
            record::encode_message(&mut buf, &meta(QueueId(id)), &[], &[b"x\r\n"]);
        }
        let update = |index| RcptUpdate {
            index,
            state: deferred,
        };
        for id in [7, 110, 2103] {
            record::encode_results(&mut buf, QueueId(id), &[update(1)]);
        }
        for id in [7, 111, 2150, 9999] {
            record::encode_delete(&mut buf, QueueId(id));
        }
        // A copy of a deleted message brings it back, as a later record does.
        record::encode_message(&mut buf, &meta(QueueId(2150)), &[], &[b"y\r\n"]);
        let (loaded, damaged, _) = replay_bytes(&buf);
        assert_eq!(damaged, 0);
        let got: Vec<u64> = loaded.iter().map(|l| l.meta.id.0).collect();
        let want: Vec<u64> = (100..2200).filter(|&id| id != 111).collect();
        assert_eq!(got, want);
        for l in &loaded {
            let changed = [110, 2103].contains(&l.meta.id.0);
            assert_eq!(l.states[1] == deferred, changed, "{:?}", l.meta.id);
            assert_eq!(l.meta.recipients.len(), 2);
        }
    }

    #[test]
    fn a_damaged_record_is_skipped_and_the_ones_after_it_survive() {
        // A flipped bit in the body: the header's length still finds the next record.
        let (ids, damaged, size, whole) =
            replay_with_damage(|buf, at| buf[at + record::FRAME_LEN + 20] ^= 0x10);
        assert_eq!(ids, vec![QueueId(1), QueueId(3)]);
        assert_eq!((damaged, size), (1, whole), "nothing may be truncated");
        // A damaged header: the next record is found by scanning.
        let (ids, damaged, _, _) = replay_with_damage(|buf, at| {
            buf[at] = 0;
            buf[at + 2] ^= 0xFF;
        });
        assert_eq!((ids, damaged), (vec![QueueId(1), QueueId(3)], 1));
    }

    /// Found by the `spool_record` fuzz target (fuzz/): garbage whose length field points past a good
    /// message record to a record that a torn tail follows. With the tail there, skipping by length was
    /// refused (the record it reached was followed by neither a record nor the end) and scanning found the
    /// message; once the tail was cut off, the next start skipped by length, over the message, and lost it.
    #[test]
    fn the_start_after_a_torn_tail_is_cut_off_replays_the_same_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.seg");
        let mut message = Vec::new();
        record::encode_message(&mut message, &meta(QueueId(7)), &[], &[b""]);
        let mut results = Vec::new();
        record::encode_results(&mut results, QueueId(0x1234), &[]);
        // The crashing input's shape: 34 bytes of garbage that do not start with the magic byte, with a
        // length that ends where the results record starts.
        let mut garbage = vec![0x05, record::MAGIC];
        let len = (34 + message.len() - record::FRAME_LEN) as u32;
        garbage.extend_from_slice(&len.to_le_bytes());
        garbage.resize(34, 0xFF);
        let segment = [&garbage[..], &message, &results, &[record::MAGIC]].concat();
        fs::write(&path, &segment).unwrap();

        let mut first = Replay::default();
        let size = load_segment(&path, 1, &mut first).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            size,
            "the tail is cut off"
        );
        let mut second = Replay::default();
        assert_eq!(load_segment(&path, 1, &mut second).unwrap(), size);
        let ids = |r: Replay| r.finish().iter().map(|l| l.meta.id).collect::<Vec<_>>();
        assert_eq!(ids(first), ids(second));
        assert_eq!(replay_bytes(&segment).2, size as usize);
    }

    #[test]
    fn a_failed_write_that_cannot_be_cut_back_stops_the_writer_and_fails_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let lock = File::create(dir.path().join("lock")).unwrap();
        let mut writer = Writer::create(dir.path().to_owned(), 1, lock).unwrap();
        // A handle that can neither write nor truncate: every write fails, and so does the cut-back.
        writer.file = File::open(segment_path(dir.path(), 1)).unwrap();
        let shared = WriterShared {
            bytes: Arc::new(AtomicU64::new(0)),
            current: Arc::new(AtomicU64::new(1)),
            sizes: Arc::new(Mutex::new(BTreeMap::new())),
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || writer.run(rx, shared));
        let ask = |record: Vec<u8>| {
            let (done, wait) = oneshot::channel();
            tx.send(WriteRequest {
                tail: None,
                record,
                done: Some(done),
            })
            .unwrap();
            wait.blocking_recv().unwrap()
        };
        let mut state = Vec::new();
        record::encode_delete(&mut state, QueueId(7));
        tx.send(WriteRequest {
            tail: None,
            record: state,
            done: None,
        })
        .unwrap();
        assert!(ask(Vec::new()).is_err(), "a sync after a lost state change");
        let mut msg = Vec::new();
        record::encode_message(&mut msg, &meta(QueueId(8)), &[], &[b"x\r\n"]);
        assert!(ask(msg).is_err(), "a write after a failed cut-back");
        assert!(
            ask(Vec::new()).is_err(),
            "the writer stays refused until a restart"
        );
        drop(tx);
        thread.join().unwrap();
    }
}
