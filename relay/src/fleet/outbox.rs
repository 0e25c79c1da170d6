//! This replica's changes to the shared state that the store has not confirmed: one JSON line each in
//! `<spool>/fleet/outbox`, synced before the change counts as made, so a change made while the store is
//! away (or the relay is killed before it was sent) reaches the store when the relay next joins it.

use std::collections::VecDeque;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::FleetError;
use super::suppressions::Change;
use crate::metrics::Metrics;

#[derive(Debug)]
struct Inner {
    file: std::fs::File,
    pending: VecDeque<Change>,
}

/// The outbox; one per relay with a store.
#[derive(Debug)]
pub struct Outbox {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Woken on every change, so the sync task sends it at once.
    pub(super) wake: Notify,
    metrics: Arc<Metrics>,
}

/// The lines of `path`, and whether every one of them read.
fn read_lines<T: DeserializeOwned>(path: &Path) -> io::Result<(VecDeque<T>, bool)> {
    let mut out = VecDeque::new();
    let mut clean = true;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((out, clean)),
        Err(e) => return Err(e),
    };
    for (n, line) in io::BufReader::new(f).lines().enumerate() {
        match serde_json::from_str(&line?) {
            Ok(c) => out.push_back(c),
            // A torn last line from a crash: that change never counted as made.
            Err(e) => {
                clean = false;
                tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping a bad outbox line")
            }
        }
    }
    Ok((out, clean))
}

/// Writes `items` to `path` in place of what it held (a new file synced, then renamed over); the file
/// opened for appending.
fn rewrite<'a>(
    path: &Path,
    items: impl IntoIterator<Item = &'a Change>,
) -> io::Result<std::fs::File> {
    let mut text = Vec::new();
    for c in items {
        text.extend(line(c)?);
    }
    super::replace_file(path, &text)?;
    std::fs::OpenOptions::new().append(true).open(path)
}

fn line(c: &impl Serialize) -> io::Result<Vec<u8>> {
    let mut text = serde_json::to_vec(c).map_err(io::Error::other)?;
    text.push(b'\n');
    Ok(text)
}

impl Outbox {
    /// Opens (creating) the outbox in `dir`, with what an earlier run left unsent. Blocking.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Outbox, FleetError> {
        let path = dir.join("outbox");
        let err = |source| FleetError::Local {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let (pending, clean) = read_lines(&path).map_err(err)?;
        // A torn line is written over, so the next change does not land on the end of it.
        let file = if clean {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
        } else {
            rewrite(&path, &pending)
        }
        .map_err(err)?;
        metrics.store_pending.set(pending.len() as i64);
        Ok(Outbox {
            path,
            inner: Mutex::new(Inner { file, pending }),
            wake: Notify::new(),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, source: io::Error) -> FleetError {
        FleetError::Local {
            path: self.path.clone(),
            source,
        }
    }

    /// Records a change durably and wakes the sync task. Blocking (an fsync).
    pub fn push(&self, change: Change) -> Result<(), FleetError> {
        let text = line(&change).map_err(|e| self.err(e))?;
        {
            let mut inner = self.lock();
            inner.file.write_all(&text).map_err(|e| self.err(e))?;
            inner.file.sync_data().map_err(|e| self.err(e))?;
            inner.pending.push_back(change);
            self.metrics.store_pending.set(inner.pending.len() as i64);
        }
        self.wake.notify_one();
        Ok(())
    }

    /// The changes not yet confirmed, oldest first.
    pub fn pending(&self) -> Vec<Change> {
        self.lock().pending.iter().cloned().collect()
    }

    /// The oldest `n` changes are in the store: forgets them, here and on disk. Blocking.
    pub fn confirm(&self, n: usize) -> Result<(), FleetError> {
        let mut inner = self.lock();
        let n = n.min(inner.pending.len());
        inner.pending.drain(..n);
        self.metrics.store_pending.set(inner.pending.len() as i64);
        if inner.pending.is_empty() {
            inner.file.set_len(0).map_err(|e| self.err(e))?;
            return inner.file.sync_data().map_err(|e| self.err(e));
        }
        // Changes made while the others were sent: the file is written again with only them.
        inner.file = rewrite(&self.path, &inner.pending).map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::suppressions::What;

    fn change(n: i64) -> Change {
        Change {
            at: n,
            what: What::Remove {
                address: format!("a{n}@example.test"),
            },
        }
    }

    #[test]
    fn what_was_not_confirmed_survives_a_restart_and_what_was_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new(&[]));
        let outbox = Outbox::open(dir.path(), metrics.clone()).unwrap();
        for n in 1..=3 {
            outbox.push(change(n)).unwrap();
        }
        outbox.confirm(1).unwrap();
        outbox.push(change(4)).unwrap();
        drop(outbox);
        let again = Outbox::open(dir.path(), metrics.clone()).unwrap();
        assert_eq!(again.pending(), vec![change(2), change(3), change(4)]);
        assert_eq!(metrics.store_pending.get(), 3);
        again.confirm(3).unwrap();
        drop(again);
        let last = Outbox::open(dir.path(), metrics).unwrap();
        assert!(last.pending().is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join("outbox")).unwrap().len(),
            0
        );
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new(&[]));
        let outbox = Outbox::open(dir.path(), metrics.clone()).unwrap();
        outbox.push(change(1)).unwrap();
        drop(outbox);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("outbox"))
            .unwrap();
        f.write_all(b"{\"at\":2,\"op\":\"rem").unwrap();
        let again = Outbox::open(dir.path(), metrics.clone()).unwrap();
        assert_eq!(again.pending(), vec![change(1)]);
        again.push(change(3)).unwrap();
        drop(again);
        let last = Outbox::open(dir.path(), metrics).unwrap();
        assert_eq!(last.pending(), vec![change(1), change(3)]);
    }
}
