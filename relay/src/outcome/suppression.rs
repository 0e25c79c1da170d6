//! The suppression list: addresses that hard-bounced as invalid, refused at RCPT from then on.
//!
//! Kept in memory for the RCPT check and persisted as an append-only file of `add`/`remove` lines (JSON) on
//! the spool volume, replayed at start and rewritten compactly when it has grown well past the live set.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

/// Errors of the suppression store.
#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("suppression list {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Why and when an address was suppressed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub address: String,
    pub reason: String,
    /// RFC 3339.
    pub added_at: String,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Line {
    Add(Entry),
    Remove { address: String },
}

/// The list; shared by sessions (reads) and the delivery engine and admin API (writes).
#[derive(Debug)]
pub struct Suppressions {
    path: PathBuf,
    entries: RwLock<BTreeMap<String, Entry>>,
    /// The open file and how many lines it holds; writes are serialized here.
    file: Mutex<(std::fs::File, usize)>,
}

fn key(address: &str) -> String {
    address.to_lowercase()
}

impl Suppressions {
    /// Loads the list from `<spool_dir>/suppressions`, creating it if missing.
    pub fn open(spool_dir: &Path) -> Result<Suppressions, SuppressionError> {
        let path = spool_dir.join("suppressions");
        let err = |source| SuppressionError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(spool_dir).map_err(err)?;
        let mut entries = BTreeMap::new();
        let mut lines = 0;
        match std::fs::File::open(&path) {
            Ok(f) => {
                for (n, line) in io::BufReader::new(f).lines().enumerate() {
                    let line = line.map_err(err)?;
                    lines += 1;
                    match serde_json::from_str::<Line>(&line) {
                        Ok(Line::Add(e)) => {
                            entries.insert(key(&e.address), e);
                        }
                        Ok(Line::Remove { address }) => {
                            entries.remove(&key(&address));
                        }
                        // A torn last line from a crash; everything before it stands.
                        Err(e) => {
                            tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping a bad suppression line")
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        let s = Suppressions {
            path,
            entries: RwLock::new(entries),
            file: Mutex::new((file, lines)),
        };
        Ok(s)
    }

    /// The entry for `address`, if it is suppressed.
    pub fn get(&self, address: &str) -> Option<Entry> {
        self.read().get(&key(address)).cloned()
    }

    pub fn contains(&self, address: &str) -> bool {
        self.read().contains_key(&key(address))
    }

    /// Up to `limit` entries in address order, starting after `after` (a cursor: the last address of the
    /// previous page); the copy stays one page long however long the list is.
    pub fn page(&self, after: Option<&str>, limit: usize) -> Vec<Entry> {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(key(a)),
            None => Bound::Unbounded,
        };
        self.read()
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) an entry. Blocking file I/O: call it off the async runtime.
    pub fn add(&self, address: &str, reason: &str) -> Result<(), SuppressionError> {
        let entry = Entry {
            address: address.to_owned(),
            reason: reason.to_owned(),
            added_at: chrono::Utc::now().to_rfc3339(),
        };
        self.append(&Line::Add(entry.clone()))?;
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key(address), entry);
        Ok(())
    }

    /// Removes an entry; false if there was none. Blocking file I/O: call it off the async runtime.
    pub fn remove(&self, address: &str) -> Result<bool, SuppressionError> {
        if !self.contains(address) {
            return Ok(false);
        }
        self.append(&Line::Remove {
            address: address.to_owned(),
        })?;
        let removed = self
            .entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(address));
        Ok(removed.is_some())
    }

    fn append(&self, line: &Line) -> Result<(), SuppressionError> {
        let err = |source| SuppressionError::Io {
            path: self.path.clone(),
            source,
        };
        let mut text = serde_json::to_string(line).map_err(|e| err(io::Error::other(e)))?;
        text.push('\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.write_all(text.as_bytes()).map_err(err)?;
        guard.0.sync_data().map_err(err)?;
        guard.1 += 1;
        if guard.1 > 1024 && guard.1 > 4 * self.len() {
            self.compact(&mut guard).map_err(err)?;
        }
        Ok(())
    }

    /// Rewrites the file with only the live entries (write a new file, sync, rename over).
    fn compact(&self, guard: &mut (std::fs::File, usize)) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        let entries: Vec<Entry> = self.read().values().cloned().collect();
        for e in &entries {
            let mut text =
                serde_json::to_string(&Line::Add(e.clone())).map_err(io::Error::other)?;
            text.push('\n');
            f.write_all(text.as_bytes())?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        guard.0 = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        guard.1 = entries.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        for a in ["c@x.test", "A@x.test", "b@x.test"] {
            s.add(a, "r").unwrap();
        }
        let first = s.page(None, 2);
        let names: Vec<_> = first.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(names, ["A@x.test", "b@x.test"]);
        let rest = s.page(Some("B@X.TEST"), 2);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].address, "c@x.test");
        assert!(s.page(Some("c@x.test"), 2).is_empty());
    }

    #[test]
    fn entries_survive_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        s.add("Gone@Dest.test", "550 5.1.1 no such user").unwrap();
        for i in 0..1100 {
            s.add(&format!("t{i}@x.test"), "r").unwrap();
            s.remove(&format!("t{i}@x.test")).unwrap();
        }
        assert!(s.contains("gone@dest.test"));
        assert!(!s.remove("nobody@x.test").unwrap());
        drop(s);
        let s = Suppressions::open(dir.path()).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(
            s.get("GONE@dest.test").unwrap().reason,
            "550 5.1.1 no such user"
        );
        let lines = std::fs::read_to_string(dir.path().join("suppressions"))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 1100, "{lines} lines: never compacted");
    }
}
