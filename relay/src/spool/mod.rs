//! Durable storage of accepted messages, with group commit.
//!
//! Messages are appended to log segments (`<spool_dir>/segments/<n>.seg`) by one writer thread. The writer
//! takes every request that is waiting, writes them in one `write`, makes them durable with one
//! `fdatasync`, and only then answers each of them: many sessions share each sync, so durability costs
//! latency but not throughput. A session replies 250 only after its answer arrives.
//!
//! On start the spool reads every segment back. A crash can leave a torn record at the end of the segment
//! that was being written; its checksum fails, and the segment is truncated to its last whole record. No such
//! record was ever acknowledged, because acknowledgements follow the sync.
//!
//! Segments are never rewritten in place; a new one is started at each start and whenever the current one
//! exceeds [`SEGMENT_BYTES`].

pub mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

pub use record::{MessageMeta, QueueId};

/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Upper bound on one group commit, so a burst cannot delay the first writer's answer without bound.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

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
}

/// Where a message's data lies: segment number, byte offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
}

/// A message found in the spool at start.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub meta: MessageMeta,
    pub location: Location,
}

struct WriteRequest {
    record: Vec<u8>,
    done: oneshot::Sender<Result<(u64, u64), Arc<SpoolError>>>,
}

/// Handle to the spool; cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    tx: mpsc::Sender<WriteRequest>,
    last_id: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
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
        let mut loaded = Vec::new();
        let mut bytes = 0;
        let mut max_id = 0;
        for &n in &numbers {
            let path = segment_path(&seg_dir, n);
            bytes += load_segment(&path, n, &mut loaded)?;
        }
        for l in &loaded {
            max_id = max_id.max(l.meta.id.0);
        }
        let next_segment = numbers.last().map_or(1, |n| n + 1);
        let writer = Writer::create(seg_dir.clone(), next_segment, lock)?;
        let (tx, rx) = mpsc::channel(4096);
        let spool_bytes = Arc::new(AtomicU64::new(bytes));
        let thread_bytes = spool_bytes.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx, thread_bytes))
            .map_err(dir_err)?;
        Ok((
            Spool {
                tx,
                last_id: Arc::new(AtomicU64::new(max_id)),
                bytes: spool_bytes,
            },
            loaded,
        ))
    }

    /// A new queue id: unique within this spool, increasing, and close to the time of acceptance.
    pub fn next_id(&self) -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut prev = self.last_id.load(Ordering::Relaxed);
        loop {
            let id = now.max(prev + 1);
            match self
                .last_id
                .compare_exchange_weak(prev, id, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return QueueId(id),
                Err(p) => prev = p,
            }
        }
    }

    /// Bytes of segment data on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Stores a message durably. Returns once it is on stable storage.
    pub async fn store(
        &self,
        meta: &MessageMeta,
        parts: &[&[u8]],
    ) -> Result<Location, Arc<SpoolError>> {
        let size: usize = parts.iter().map(|p| p.len()).sum();
        let mut record = Vec::with_capacity(size + 256);
        let data_offset = record::encode_message(&mut record, meta, parts);
        let (done, wait) = oneshot::channel();
        self.tx
            .send(WriteRequest { record, done })
            .await
            .map_err(|_| Arc::new(SpoolError::Stopped))?;
        let (segment, offset) = wait.await.map_err(|_| Arc::new(SpoolError::Stopped))??;
        Ok(Location {
            segment,
            offset: offset + data_offset as u64,
            len: size as u64,
        })
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.seg"))
}

/// Reads one segment into `out`; truncates a torn tail. Returns the segment's size after that.
fn load_segment(path: &Path, number: u64, out: &mut Vec<Loaded>) -> Result<u64, SpoolError> {
    let read_err = |source| SpoolError::Read {
        path: path.to_owned(),
        source,
    };
    let buf = fs::read(path).map_err(read_err)?;
    let mut pos = 0;
    while pos < buf.len() {
        let frame = match record::decode_frame(&buf[pos..]) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    segment = %path.display(),
                    offset = pos,
                    error = %e,
                    "spool segment ends in an incomplete record (left by a crash before it was acknowledged); truncating"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(read_err)?;
                f.set_len(pos as u64).map_err(read_err)?;
                f.sync_all().map_err(read_err)?;
                break;
            }
        };
        if frame.kind == record::KIND_MESSAGE {
            match record::decode_message(frame.payload) {
                Ok((meta, data_off, data_len)) => out.push(Loaded {
                    meta,
                    location: Location {
                        segment: number,
                        offset: (pos + record::FRAME_LEN + data_off) as u64,
                        len: data_len,
                    },
                }),
                Err(e) => {
                    tracing::error!(segment = %path.display(), offset = pos, error = %e, "skipping a malformed message record")
                }
            }
        }
        pos += frame.len;
    }
    Ok(pos as u64)
}

/// The writer thread's state: the segment being appended to.
struct Writer {
    dir: PathBuf,
    number: u64,
    file: File,
    len: u64,
    /// Held while the writer runs, so a second relay cannot share the spool.
    _lock: File,
}

impl Writer {
    fn create(dir: PathBuf, number: u64, lock: File) -> Result<Writer, SpoolError> {
        let path = segment_path(&dir, number);
        let err = |source| SpoolError::Write {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        // A new file's name is durable only once its directory is synced.
        File::open(&dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(Writer {
            dir,
            number,
            file,
            len: 0,
            _lock: lock,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>, bytes: Arc<AtomicU64>) {
        let mut batch: Vec<WriteRequest> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut size = first.record.len();
            batch.push(first);
            // Everything that queued up during the previous sync joins this one.
            while size < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        size += r.record.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            let result = self.commit(&batch, &mut buf);
            if result.is_ok() {
                bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
            let mut offset = self.len - buf.len() as u64;
            let result = result.map_err(Arc::new);
            for req in batch.drain(..) {
                let reply = match &result {
                    Ok(()) => Ok((self.number, offset)),
                    Err(e) => Err(e.clone()),
                };
                offset += req.record.len() as u64;
                // A session that went away no longer needs its answer; the message stays spooled.
                let _ = req.done.send(reply);
            }
            buf.clear();
            if self.len >= SEGMENT_BYTES {
                let lock = match self._lock.try_clone() {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a new spool segment; appending to the current one");
                        continue;
                    }
                };
                match Writer::create(self.dir.clone(), self.number + 1, lock) {
                    Ok(next) => self = next,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a new spool segment; appending to the current one")
                    }
                }
            }
        }
    }

    /// Writes and syncs one batch. On failure the segment is cut back to where it was, so that a partial
    /// write cannot sit in front of later records.
    fn commit(&mut self, batch: &[WriteRequest], buf: &mut Vec<u8>) -> Result<(), SpoolError> {
        for r in batch {
            buf.extend_from_slice(&r.record);
        }
        let path = segment_path(&self.dir, self.number);
        match self
            .file
            .write_all(buf)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(source) => {
                if let Err(e) = self.file.set_len(self.len) {
                    tracing::error!(segment = %path.display(), error = %e, "cannot cut a failed write back");
                }
                buf.clear();
                Err(SpoolError::Write { path, source })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: QueueId) -> MessageMeta {
        MessageMeta {
            id,
            received_at_ms: 1,
            smtputf8: false,
            eight_bit: false,
            listener: "l".into(),
            auth_user: None,
            peer: "127.0.0.1:1".into(),
            sender: "a@b.test".into(),
            recipients: vec!["c@d.test".into()],
        }
    }

    #[tokio::test]
    async fn stored_messages_load_after_reopen_in_a_new_process_image() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let (spool, loaded) = Spool::open(dir.path()).unwrap();
            assert!(loaded.is_empty());
            let mut ids = Vec::new();
            for i in 0..50 {
                let id = spool.next_id();
                let body = format!("message {i}\r\n");
                spool.store(&meta(id), &[body.as_bytes()]).await.unwrap();
                ids.push(id);
            }
            ids
        };
        // The writer thread releases the lock when it sees the last handle go; give it a moment.
        let mut reopened = None;
        for _ in 0..200 {
            match Spool::open(dir.path()) {
                Ok(r) => {
                    reopened = Some(r);
                    break;
                }
                Err(SpoolError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let (spool, loaded) = reopened.expect("spool lock released after the handle was dropped");
        let got: Vec<QueueId> = loaded.iter().map(|l| l.meta.id).collect();
        assert_eq!(got, ids);
        assert!(spool.next_id() > *ids.last().unwrap());
        let seg = dir
            .path()
            .join("segments")
            .join(format!("{:020}.seg", loaded[7].location.segment));
        let data = fs::read(seg).unwrap();
        let l = loaded[7].location;
        assert_eq!(
            &data[l.offset as usize..(l.offset + l.len) as usize],
            b"message 7\r\n"
        );
    }

    #[test]
    fn torn_tail_is_truncated_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let seg_dir = dir.path().join("segments");
        fs::create_dir_all(&seg_dir).unwrap();
        let mut buf = Vec::new();
        record::encode_message(&mut buf, &meta(QueueId(1)), &[b"one\r\n"]);
        let good = buf.len();
        record::encode_message(&mut buf, &meta(QueueId(2)), &[b"two\r\n"]);
        buf.truncate(buf.len() - 3);
        fs::write(segment_path(&seg_dir, 1), &buf).unwrap();
        let mut out = Vec::new();
        let size = load_segment(&segment_path(&seg_dir, 1), 1, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(size, good as u64);
        assert_eq!(
            fs::metadata(segment_path(&seg_dir, 1)).unwrap().len(),
            good as u64
        );
    }
}
