//! Message data on its way into the spool that is too large to wait in memory.
//!
//! A session that receives a large message moves the bytes it has so far into a [`Spill`] and goes on
//! receiving, so the memory a session holds is bounded by its buffer, not by the message. The spill is an
//! unnamed file in the segment directory (O_TMPFILE, or created and unlinked at once where the file system
//! lacks it): a crash, a dropped connection or a refused message leaves nothing behind to clean up. At the
//! end of the message the spool writer copies the file into the segment inside the message's record
//! (`copy_file_range`, so the bytes do not pass through the relay's memory again), and the segment's sync
//! makes them durable; the spill itself is never synced.
//!
//! The record's checksum covers the spilled bytes: it is computed here as they are written and combined with
//! the checksum of the rest of the record when the record is framed.

use std::io::{self, Seek, SeekFrom};
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Errors writing a spill.
#[derive(Debug, thiserror::Error)]
#[error("spill file in {dir}: {source}")]
pub struct SpillError {
    dir: PathBuf,
    source: io::Error,
}

/// Bytes of one message, written in the order they arrived.
#[derive(Debug)]
pub struct Spill {
    dir: PathBuf,
    file: tokio::fs::File,
    len: u64,
    crc: crc32fast::Hasher,
}

impl Spill {
    pub(super) async fn create(dir: PathBuf) -> Result<Spill, SpillError> {
        let d = dir.clone();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(&d))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|source| SpillError {
                dir: dir.clone(),
                source,
            })?;
        Ok(Spill {
            dir,
            file: tokio::fs::File::from_std(file),
            len: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Appends bytes; they are in the file (not yet on stable storage) when this returns.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SpillError> {
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        let written = self.file.write_all(bytes).await;
        // tokio's file writes in the background: flush waits for that write to finish (or fail).
        match written {
            Ok(()) => self.file.flush().await,
            Err(e) => Err(e),
        }
        .map_err(|source| self.error(source))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// The first `max` bytes written (fewer if fewer were); writing may go on afterwards.
    pub async fn head(&mut self, max: usize) -> Result<Vec<u8>, SpillError> {
        let mut out = Vec::new();
        let read = async {
            self.file.seek(SeekFrom::Start(0)).await?;
            (&mut self.file)
                .take(max as u64)
                .read_to_end(&mut out)
                .await?;
            self.file.seek(SeekFrom::End(0)).await.map(drop)
        }
        .await;
        read.map(|()| out).map_err(|source| self.error(source))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn error(&self, source: io::Error) -> SpillError {
        SpillError {
            dir: self.dir.clone(),
            source,
        }
    }

    /// The file, rewound for the writer to copy, with the length and checksum of what was written.
    pub(super) async fn finish(self) -> Result<Finished, SpillError> {
        let Spill {
            dir,
            file,
            len,
            crc,
        } = self;
        let mut file = file.into_std().await;
        file.seek(SeekFrom::Start(0))
            .map_err(|source| SpillError { dir, source })?;
        Ok(Finished { file, len, crc })
    }
}

/// A spill ready to be copied into a record.
#[derive(Debug)]
pub(super) struct Finished {
    pub file: std::fs::File,
    pub len: u64,
    pub crc: crc32fast::Hasher,
}
