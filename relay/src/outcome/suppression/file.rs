//! The suppression store on the spool volume: one append-only file of JSON lines (`add`/`remove` for
//! entries, `streak`/`reset` for mailbox-full streaks), replayed at start and rewritten with only what is
//! live when it has grown well past that, or when entries expire.
//!
//! Lines written before entries had a category, a reply and an expiry read as entries without them (and
//! so without expiry): a relay upgraded in place keeps its list as it was.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Entry, Store, Streak, SuppressionError};

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Line {
    Add(Entry),
    Remove { address: String },
    Streak(Streak),
    Reset { address: String },
}

#[derive(Debug, Default)]
struct Maps {
    entries: BTreeMap<String, Entry>,
    streaks: BTreeMap<String, Streak>,
}

/// The file store; one per spool directory.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    maps: RwLock<Maps>,
    /// The open file and how many lines it holds; writes are serialized here.
    file: Mutex<(std::fs::File, usize)>,
}

fn key(address: &str) -> String {
    address.to_lowercase()
}

fn page<T: Clone>(map: &BTreeMap<String, T>, after: Option<&str>, limit: usize) -> Vec<T> {
    let start = match after {
        Some(a) => Bound::Excluded(key(a)),
        None => Bound::Unbounded,
    };
    map.range((start, Bound::Unbounded))
        .take(limit)
        .map(|(_, v)| v.clone())
        .collect()
}

impl FileStore {
    /// Loads `<spool_dir>/suppressions`, creating it if missing.
    pub fn open(spool_dir: &Path) -> Result<FileStore, SuppressionError> {
        let path = spool_dir.join("suppressions");
        let err = |source| SuppressionError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(spool_dir).map_err(err)?;
        let mut maps = Maps::default();
        let mut lines = 0;
        match std::fs::File::open(&path) {
            Ok(f) => {
                for (n, line) in io::BufReader::new(f).lines().enumerate() {
                    let line = line.map_err(err)?;
                    lines += 1;
                    match serde_json::from_str::<Line>(&line) {
                        Ok(l) => maps.apply(l),
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
        Ok(FileStore {
            path,
            maps: RwLock::new(maps),
            file: Mutex::new((file, lines)),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a line (fsynced), then applies it in memory: what a reader sees is durable.
    fn write(&self, line: Line) -> Result<(), SuppressionError> {
        let err = |source| SuppressionError::Io {
            path: self.path.clone(),
            source,
        };
        let mut text = serde_json::to_string(&line).map_err(|e| err(io::Error::other(e)))?;
        text.push('\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.write_all(text.as_bytes()).map_err(err)?;
        guard.0.sync_data().map_err(err)?;
        guard.1 += 1;
        let live = {
            let mut maps = self.maps.write().unwrap_or_else(|p| p.into_inner());
            maps.apply(line);
            maps.entries.len() + maps.streaks.len()
        };
        if guard.1 > 1024 && guard.1 > 4 * live {
            self.compact(&mut guard, Utc::now()).map_err(err)?;
        }
        Ok(())
    }

    /// Rewrites the file with only the live entries and streaks (write a new file, sync, rename over).
    /// Entries expired by `now` are left out, here and in memory.
    fn compact(&self, guard: &mut (std::fs::File, usize), now: DateTime<Utc>) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut written = 0;
        {
            let mut maps = self.maps.write().unwrap_or_else(|p| p.into_inner());
            maps.entries.retain(|_, e| !e.expired(now));
            for e in maps.entries.values() {
                serde_json::to_writer(&mut f, &Line::Add(e.clone())).map_err(io::Error::other)?;
                f.write_all(b"\n")?;
                written += 1;
            }
            for s in maps.streaks.values() {
                serde_json::to_writer(&mut f, &Line::Streak(s.clone()))
                    .map_err(io::Error::other)?;
                f.write_all(b"\n")?;
                written += 1;
            }
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        guard.0 = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        guard.1 = written;
        Ok(())
    }
}

impl Maps {
    fn apply(&mut self, line: Line) {
        match line {
            Line::Add(e) => {
                self.entries.insert(key(&e.address), e);
            }
            Line::Remove { address } => {
                self.entries.remove(&key(&address));
            }
            Line::Streak(s) => {
                self.streaks.insert(key(&s.address), s);
            }
            Line::Reset { address } => {
                self.streaks.remove(&key(&address));
            }
        }
    }
}

impl Store for FileStore {
    fn entry(&self, address: &str) -> Option<Entry> {
        self.read().entries.get(&key(address)).cloned()
    }

    fn entries(&self, after: Option<&str>, limit: usize) -> Vec<Entry> {
        page(&self.read().entries, after, limit)
    }

    fn put(&self, entry: Entry) -> Result<(), SuppressionError> {
        self.write(Line::Add(entry))
    }

    fn remove(&self, address: &str) -> Result<bool, SuppressionError> {
        if !self.read().entries.contains_key(&key(address)) {
            return Ok(false);
        }
        self.write(Line::Remove {
            address: address.to_owned(),
        })?;
        Ok(true)
    }

    fn streak(&self, address: &str) -> Option<Streak> {
        self.read().streaks.get(&key(address)).cloned()
    }

    fn has_streak(&self, address: &str) -> bool {
        // Asked for nearly every delivered recipient: no lowercased copy while there are no streaks.
        let maps = self.read();
        !maps.streaks.is_empty() && maps.streaks.contains_key(&key(address))
    }

    fn streaks(&self, after: Option<&str>, limit: usize) -> Vec<Streak> {
        page(&self.read().streaks, after, limit)
    }

    fn put_streak(&self, streak: Streak) -> Result<(), SuppressionError> {
        self.write(Line::Streak(streak))
    }

    fn clear_streak(&self, address: &str) -> Result<bool, SuppressionError> {
        if !self.has_streak(address) {
            return Ok(false);
        }
        self.write(Line::Reset {
            address: address.to_owned(),
        })?;
        Ok(true)
    }

    fn entry_count(&self) -> usize {
        self.read().entries.len()
    }

    fn streak_count(&self) -> usize {
        self.read().streaks.len()
    }

    fn sweep(
        &self,
        now: DateTime<Utc>,
        forgotten: &dyn Fn(&Streak) -> bool,
    ) -> Result<usize, SuppressionError> {
        let due = {
            let maps = self.read();
            maps.entries.values().filter(|e| e.expired(now)).count()
                + maps.streaks.values().filter(|s| forgotten(s)).count()
        };
        if due == 0 {
            return Ok(0);
        }
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.maps
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .streaks
            .retain(|_, s| !forgotten(s));
        self.compact(&mut guard, now)
            .map_err(|source| SuppressionError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(due)
    }
}
