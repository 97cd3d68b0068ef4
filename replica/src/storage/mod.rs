//! Durable log, snapshots, configuration and identity of one replica.
//!
//! Synchronous `std::fs` code, meant to run on a dedicated thread (or `spawn_blocking`).
//! Layout of the storage directory:
//!
//! ```text
//! LOCK                                  exclusive flock held while open
//! config                                last saved Configuration (framed, atomic)
//! identity                              replica id (framed, atomic)
//! snapshot-<20-digit index>.snap        newest two snapshots (framed prost Snapshot)
//! install.pending                       only during install_snapshot (redo marker)
//! log/<20-digit first index>.wal        WAL segments
//! ```
//!
//! See `docs/storage.md` for the format and the recovery rules.

mod files;
mod snapshot;
mod wal;

#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use lockstep_proto::{Configuration, LogEntry, Snapshot};
use prost::Message;
use tracing::{info, warn};

use files::{
    CONFIG_MAGIC, IDENTITY_MAGIC, INSTALL_MAGIC, decode_framed, encode_framed, io_err, read_optional, remove_if_exists,
    sync_dir, write_atomic,
};

/// The largest index a log entry or snapshot may carry. One below `u64::MAX`, so the index
/// after any valid one exists; a file claiming more is corrupt (a log that really reached it
/// would take hundreds of thousands of years at a million entries a second).
pub const MAX_INDEX: u64 = u64::MAX - 1;

const LOCK_FILE: &str = "LOCK";
const CONFIG_FILE: &str = "config";
const IDENTITY_FILE: &str = "identity";
const INSTALL_FILE: &str = "install.pending";
const LOG_DIR: &str = "log";
const WRITE_BUFFER: usize = 1 << 20;

/// Errors name the file and, for corruption, the byte offset.
#[derive(thiserror::Error, Debug)]
pub enum StorageError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "storage directory is in use by another process (lock {} is held)",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("corrupt {} at offset {offset}: {reason}", path.display())]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("log entry index {got} does not continue the log (expected index {expected})")]
    NonContiguous { expected: u64, got: u64 },
    #[error("invalid storage request: {0}")]
    Invalid(String),
    #[error("storage is unusable after an earlier I/O failure ({0}); reopen it")]
    Poisoned(String),
}

#[derive(Clone, Debug)]
pub struct StorageOptions {
    /// fsync files and directories (default true). `false` is for benchmarks only.
    pub fsync: bool,
    /// Roll to a new WAL segment once the current one reaches this size (default 64 MiB).
    pub segment_bytes: u64,
    /// Reserve the active segment's disk space this many bytes at a time ahead of its end
    /// (default 4 MiB; 0 = grow the file with every append). An append into reserved space
    /// changes neither the file's size nor its block map, so its fdatasync has less metadata
    /// to commit (docs/storage.md, "Reserved space").
    pub preallocate_bytes: u64,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            fsync: true,
            segment_bytes: 64 * 1024 * 1024,
            preallocate_bytes: 4 * 1024 * 1024,
        }
    }
}

/// What `open` found on disk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    /// Last saved configuration.
    pub config: Option<Configuration>,
    /// Newest valid snapshot.
    pub snapshot: Option<Snapshot>,
    /// Contiguous entries after the snapshot's index (or from index 1), in order.
    pub entries: Vec<LogEntry>,
    /// Replica id saved by `save_identity`.
    pub identity: Option<String>,
}

/// The snapshot before the newest one and the log from it up to the newest snapshot's index
/// (`Storage::read_earlier`).
#[derive(Clone, Debug, PartialEq)]
pub struct Earlier {
    pub snapshot: Snapshot,
    /// Entries `snapshot.index + 1 ..=` the newest snapshot's index, in order.
    pub entries: Vec<LogEntry>,
}

/// One WAL segment file.
struct Segment {
    first: u64,
    path: PathBuf,
    /// Byte offset of each record; `offsets.len()` entries starting at `first`.
    offsets: Vec<u64>,
    /// End of the records, including buffered, not yet written bytes.
    size: u64,
    /// Length of the file: `size` plus reserved space (zeros) after it.
    allocated: u64,
}

impl Segment {
    /// Index the next record appended to this segment would have.
    fn end(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }
}

pub struct Storage {
    dir: PathBuf,
    log_dir: PathBuf,
    opts: StorageOptions,
    _lock: File,
    /// Contiguous, never empty; the last one is the active segment behind `writer`.
    segments: Vec<Segment>,
    writer: BufWriter<File>,
    /// Rolled segments with data not yet fsynced.
    unsynced: Vec<File>,
    active_dirty: bool,
    log_dir_dirty: bool,
    /// Index of the newest snapshot (0 = none).
    snapshot_index: u64,
    /// Snapshot files on disk (ascending indexes).
    snapshot_files: Vec<u64>,
    poisoned: Option<String>,
    /// Set once reserving space failed (say, a file system without it): appends grow the file.
    preallocate_failed: bool,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("dir", &self.dir)
            .field("first_index", &self.first_index())
            .field("last_index", &self.last_index())
            .field("snapshot_index", &self.snapshot_index)
            .field("segments", &self.segments.len())
            .finish()
    }
}

impl Storage {
    /// Opens (creating if missing) the storage directory, takes its exclusive lock and
    /// recovers its contents.
    pub fn open(dir: &Path, opts: StorageOptions) -> Result<(Storage, Recovered), StorageError> {
        let dir = dir.to_path_buf();
        let log_dir = dir.join(LOG_DIR);
        let lock = create_and_lock(&dir, &log_dir, opts.fsync)?;
        remove_tmp_files(&dir)?;
        let config = read_framed(&dir.join(CONFIG_FILE), CONFIG_MAGIC, |payload| {
            Configuration::decode(payload).map_err(|e| format!("undecodable Configuration: {e}"))
        })?;
        let identity = read_framed(&dir.join(IDENTITY_FILE), IDENTITY_MAGIC, |payload| {
            String::from_utf8(payload.to_vec()).map_err(|e| format!("identity is not UTF-8: {e}"))
        })?;
        let snapshot_files = snapshot::list(&dir)?;
        let snap = usable_snapshot_below(&dir, &snapshot_files, u64::MAX);
        let snapshot_index = snap.as_ref().map_or(0, |s| s.index);
        let firsts = finish_interrupted_install(&dir, &log_dir, snapshot_index, snap.is_some(), opts.fsync)?;
        let (mut segments, mut entries) = read_log(&log_dir, &firsts, snapshot_index, opts.fsync)?;
        if let Some(next) = log_restart(&segments, snapshot_index, snap.is_some())? {
            for seg in segments.iter().rev() {
                remove_if_exists(&seg.path)?;
            }
            segments.clear();
            entries.clear();
            let seg = create_segment(&log_dir, next)?;
            sync_dir(&log_dir, opts.fsync)?;
            segments.push(seg);
        }

        let (active, end) = segments
            .last()
            .map_or((PathBuf::new(), 0), |s| (s.path.clone(), s.size));
        let writer = open_at(&active, end)?;
        let storage = Storage {
            dir,
            log_dir,
            opts,
            _lock: lock,
            segments,
            writer,
            unsynced: Vec::new(),
            active_dirty: false,
            log_dir_dirty: false,
            snapshot_index,
            snapshot_files,
            poisoned: None,
            preallocate_failed: false,
            buf: Vec::new(),
        };
        let recovered = Recovered {
            config,
            snapshot: snap,
            entries,
            identity,
        };
        Ok((storage, recovered))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The snapshot before the newest one, with the log from it to the newest: what the one
    /// snapshot lag of compaction keeps (docs/storage.md). `None` when there is no older usable
    /// snapshot or the log no longer holds every entry from it (say, after an install). Reads
    /// the files again: meant for right after `open`, by a caller that must rebuild states
    /// below the newest snapshot (a Byzantine replica after a full-cluster restart).
    pub fn read_earlier(&self) -> Result<Option<Earlier>, StorageError> {
        if self.snapshot_index == 0 {
            return Ok(None);
        }
        let Some(snapshot) = usable_snapshot_below(&self.dir, &self.snapshot_files, self.snapshot_index) else {
            return Ok(None);
        };
        let (from, to) = (snapshot.index + 1, self.snapshot_index);
        let mut entries = Vec::new();
        for seg in self.segments.iter().filter(|s| s.first <= to && s.end() > from) {
            let scanned = wal::scan(&self.log_dir, seg.first)?;
            entries.extend(scanned.entries.into_iter().filter(|e| (from..=to).contains(&e.index)));
        }
        // The segments are contiguous (`open` checked), so the first index and the count settle it.
        let complete = entries.first().map(|e| e.index) == Some(from) && entries.len() as u64 == to + 1 - from;
        Ok(complete.then_some(Earlier { snapshot, entries }))
    }

    /// Last appended index; the snapshot index when the log is empty; 0 when nothing.
    pub fn last_index(&self) -> u64 {
        self.active().end() - 1
    }

    /// First index still in the log (`last_index() + 1` when the log is empty).
    pub fn first_index(&self) -> u64 {
        let physical = self.segments.first().map_or(1, |s| s.first);
        physical.max(self.snapshot_index + 1)
    }

    /// Buffered append; not durable until `sync`. Entries must continue the log.
    pub fn append(&mut self, entries: &[LogEntry]) -> Result<(), StorageError> {
        self.check_poisoned()?;
        for (expected, e) in (self.last_index() + 1..).zip(entries) {
            if e.index != expected {
                return Err(StorageError::NonContiguous { expected, got: e.index });
            }
        }
        // Encode first so that an unencodable entry leaves the log untouched.
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut sizes = Vec::with_capacity(entries.len());
        for e in entries {
            match wal::encode_record(e, &mut buf) {
                Ok(n) => sizes.push(n),
                Err(err) => {
                    self.buf = buf;
                    return Err(err);
                }
            }
        }
        let r = self.append_encoded(&buf, &sizes);
        self.buf = buf;
        self.poison_on_err(r)
    }

    fn append_encoded(&mut self, buf: &[u8], sizes: &[u64]) -> Result<(), StorageError> {
        let mut pos = 0usize;
        for &n in sizes {
            let active = self.active();
            if active.size >= self.opts.segment_bytes && !active.offsets.is_empty() {
                self.roll()?;
            }
            self.reserve(n);
            let record = &buf[pos..pos + n as usize];
            if let Err(e) = self.writer.write_all(record) {
                return Err(io_err("write", &self.active().path)(e));
            }
            let seg = self.active_mut();
            seg.offsets.push(seg.size);
            seg.size += n;
            self.active_dirty = true;
            pos += n as usize;
        }
        Ok(())
    }

    /// Makes room in the active segment's file for `n` more bytes, reserving
    /// `preallocate_bytes` at a time. Best effort: where it fails, appends grow the file.
    fn reserve(&mut self, n: u64) {
        let step = self.opts.preallocate_bytes;
        let seg = self.active();
        let need = seg.size + n;
        if step == 0 || self.preallocate_failed || need <= seg.allocated {
            return;
        }
        let start = seg.allocated.max(seg.size);
        let len = (need - start).div_ceil(step) * step;
        let reserved = match (i64::try_from(start), i64::try_from(len)) {
            (Ok(at), Ok(n)) => nix::fcntl::posix_fallocate(self.writer.get_ref(), at, n).map_err(io::Error::from),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "offset beyond the file size limit",
            )),
        };
        match reserved {
            Ok(()) => self.active_mut().allocated = start + len,
            Err(e) => {
                warn!(file = %seg.path.display(), error = %e, "cannot reserve log space ahead; appends grow the file");
                self.preallocate_failed = true;
            }
        }
    }

    /// Starts a new segment after the active one.
    fn roll(&mut self) -> Result<(), StorageError> {
        let path = self.active().path.clone();
        self.writer.flush().map_err(io_err("write", &path))?;
        let next = self.active().end();
        let seg = create_segment(&self.log_dir, next)?;
        let writer = open_at(&seg.path, 0)?;
        self.segments.push(seg);
        let old = std::mem::replace(&mut self.writer, writer);
        let (file, _) = old.into_parts();
        if self.active_dirty {
            self.unsynced.push(file);
        }
        self.active_dirty = false;
        self.log_dir_dirty = true;
        Ok(())
    }

    /// Makes everything appended so far durable (one fsync per touched file).
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let r = self.sync_inner();
        self.poison_on_err(r)
    }

    fn sync_inner(&mut self) -> Result<(), StorageError> {
        let path = self.active().path.clone();
        self.writer.flush().map_err(io_err("write", &path))?;
        if self.opts.fsync {
            for f in &self.unsynced {
                f.sync_data().map_err(io_err("fsync segment in", &self.log_dir))?;
            }
            if self.active_dirty {
                self.writer.get_ref().sync_data().map_err(io_err("fsync", &path))?;
            }
        }
        if self.log_dir_dirty {
            sync_dir(&self.log_dir, self.opts.fsync)?;
        }
        self.unsynced.clear();
        self.active_dirty = false;
        self.log_dir_dirty = false;
        Ok(())
    }

    /// Durably drops every entry with index > `index`. Also syncs the entries kept.
    pub fn truncate_after(&mut self, index: u64) -> Result<(), StorageError> {
        self.check_poisoned()?;
        if index < self.snapshot_index {
            return Err(StorageError::Invalid(format!(
                "cannot truncate after index {index}: entries up to {} are in a snapshot",
                self.snapshot_index
            )));
        }
        if index >= self.last_index() {
            return Ok(());
        }
        let r = self.truncate_inner(index);
        self.poison_on_err(r)
    }

    fn truncate_inner(&mut self, index: u64) -> Result<(), StorageError> {
        self.sync_inner()?;
        let keep = self
            .segments
            .iter()
            .rposition(|s| s.first <= index + 1)
            .ok_or_else(|| StorageError::Invalid(format!("index {index} is before the start of the log")))?;
        // Later segments first, newest first: a crash leaves a prefix of the old log.
        let removed_dir_entries = self.segments.len() > keep + 1;
        while self.segments.len() > keep + 1 {
            if let Some(seg) = self.segments.pop() {
                remove_if_exists(&seg.path)?;
            }
        }
        if removed_dir_entries {
            sync_dir(&self.log_dir, self.opts.fsync)?;
        }
        let seg = self.active_mut();
        let cut = (index + 1 - seg.first) as usize;
        let new_len = seg.offsets.get(cut).copied().unwrap_or(seg.size);
        seg.offsets.truncate(cut);
        seg.size = new_len;
        seg.allocated = new_len;
        let path = seg.path.clone();
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        file.set_len(new_len).map_err(io_err("truncate", &path))?;
        if self.opts.fsync {
            file.sync_all().map_err(io_err("fsync", &path))?;
        }
        self.writer = open_at(&path, new_len)?;
        Ok(())
    }

    /// Atomically saves the configuration.
    pub fn save_config(&mut self, c: &Configuration) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let bytes = encode_framed(CONFIG_MAGIC, &c.encode_to_vec());
        write_atomic(&self.dir, CONFIG_FILE, &bytes, self.opts.fsync)
    }

    /// Atomically saves the replica id.
    pub fn save_identity(&mut self, id: &str) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let bytes = encode_framed(IDENTITY_MAGIC, id.as_bytes());
        write_atomic(&self.dir, IDENTITY_FILE, &bytes, self.opts.fsync)
    }

    /// Durably saves a snapshot of the applied state, then compacts: the previous
    /// snapshot file is kept as a fallback, older ones are deleted, and so are log segments
    /// wholly at or below the previous snapshot (which keeps the fallback usable).
    /// Entries up to `s.index` are no longer returned by recovery either way.
    pub fn save_snapshot(&mut self, s: &Snapshot) -> Result<(), StorageError> {
        self.check_poisoned()?;
        if s.index < self.snapshot_index {
            return Err(StorageError::Invalid(format!(
                "snapshot at index {} is older than the current snapshot at {}",
                s.index, self.snapshot_index
            )));
        }
        let s = self.checked_snapshot(s)?;
        let r = self.save_snapshot_inner(&s);
        self.poison_on_err(r)
    }

    fn save_snapshot_inner(&mut self, s: &Snapshot) -> Result<(), StorageError> {
        write_atomic(
            &self.dir,
            &snapshot::file_name(s.index),
            &snapshot::encode(s),
            self.opts.fsync,
        )?;
        let previous = self.snapshot_index;
        self.snapshot_index = s.index;
        if !self.snapshot_files.contains(&s.index) {
            self.snapshot_files.push(s.index);
            self.snapshot_files.sort_unstable();
        }
        if s.index > self.last_index() {
            // Snapshot is ahead of the log: nothing in the log is needed any more.
            self.sync_inner()?;
            self.reset_log(s.index + 1)?;
        } else if previous > 0 {
            // Drop segments wholly <= previous (never the active one), oldest first so a
            // crash leaves a contiguous suffix.
            let mut removed = false;
            while self.segments.len() > 1 && self.segments[0].end() <= previous + 1 {
                let seg = self.segments.remove(0);
                remove_if_exists(&seg.path)?;
                removed = true;
            }
            if removed {
                sync_dir(&self.log_dir, self.opts.fsync)?;
            }
        }
        self.prune_snapshots(&[s.index, previous])
    }

    /// State transfer: durably saves the snapshot and discards the whole log; the next
    /// append is `s.index + 1`. Crash-atomic via the `install.pending` redo marker. The
    /// snapshot may be older than the current one (a Byzantine replica rolling back to a
    /// recovery era's start): newer snapshot files go before the log does, so a crash
    /// leaves either the old state (a newer snapshot still wins, the marker does not name
    /// it and the log is kept) or the installed one.
    pub fn install_snapshot(&mut self, s: &Snapshot) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let s = self.checked_snapshot(s)?;
        let r = self.install_inner(&s);
        self.poison_on_err(r)
    }

    fn install_inner(&mut self, s: &Snapshot) -> Result<(), StorageError> {
        let marker = encode_framed(INSTALL_MAGIC, &s.index.to_le_bytes());
        write_atomic(&self.dir, INSTALL_FILE, &marker, self.opts.fsync)?;
        write_atomic(
            &self.dir,
            &snapshot::file_name(s.index),
            &snapshot::encode(s),
            self.opts.fsync,
        )?;
        let newer: Vec<u64> = self.snapshot_files.iter().copied().filter(|&i| i > s.index).collect();
        for &idx in newer.iter().rev() {
            remove_if_exists(&self.dir.join(snapshot::file_name(idx)))?;
        }
        if !newer.is_empty() {
            sync_dir(&self.dir, self.opts.fsync)?;
        }
        self.snapshot_files.retain(|&i| i < s.index);
        self.snapshot_files.push(s.index);
        self.snapshot_index = s.index;
        self.reset_log(s.index + 1)?;
        remove_if_exists(&self.dir.join(INSTALL_FILE))?;
        sync_dir(&self.dir, self.opts.fsync)?;
        self.prune_snapshots(&[s.index])
    }

    fn checked_snapshot(&self, s: &Snapshot) -> Result<Snapshot, StorageError> {
        let digest = snapshot::digest(&s.data);
        let mut s = s.clone();
        if s.digest.is_empty() {
            s.digest = digest;
        } else if s.digest != digest {
            return Err(StorageError::Invalid(format!(
                "snapshot at index {}: digest {} does not match sha256 of data {}",
                s.index,
                hex::encode(&s.digest),
                hex::encode(&digest)
            )));
        }
        Ok(s)
    }

    /// Deletes every segment (newest first) and starts an empty one at `next`.
    fn reset_log(&mut self, next: u64) -> Result<(), StorageError> {
        self.unsynced.clear();
        self.active_dirty = false;
        for seg in self.segments.iter().rev() {
            remove_if_exists(&seg.path)?;
        }
        self.segments.clear();
        let seg = create_segment(&self.log_dir, next)?;
        self.writer = open_at(&seg.path, 0)?;
        self.segments.push(seg);
        sync_dir(&self.log_dir, self.opts.fsync)?;
        self.log_dir_dirty = false;
        Ok(())
    }

    fn prune_snapshots(&mut self, keep: &[u64]) -> Result<(), StorageError> {
        let mut removed = false;
        let mut kept = Vec::new();
        for &idx in &self.snapshot_files {
            if keep.contains(&idx) {
                kept.push(idx);
            } else {
                remove_if_exists(&self.dir.join(snapshot::file_name(idx)))?;
                removed = true;
            }
        }
        self.snapshot_files = kept;
        if removed {
            sync_dir(&self.dir, self.opts.fsync)?;
        }
        Ok(())
    }

    fn active(&self) -> &Segment {
        // Invariant: `segments` is never empty after `open`.
        &self.segments[self.segments.len() - 1]
    }

    fn active_mut(&mut self) -> &mut Segment {
        let n = self.segments.len();
        &mut self.segments[n - 1]
    }

    fn check_poisoned(&self) -> Result<(), StorageError> {
        match &self.poisoned {
            Some(msg) => Err(StorageError::Poisoned(msg.clone())),
            None => Ok(()),
        }
    }

    /// After a failed write or fsync the on-disk state is unknown (and a failed fsync
    /// cannot be retried), so the handle refuses further use.
    fn poison_on_err<T>(&mut self, r: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
        }
        r
    }
}

/// Creates the directory and its log directory (syncing the parent when the directory is
/// new), and takes the exclusive lock: a second process on the same directory is refused.
fn create_and_lock(dir: &Path, log_dir: &Path, fsync: bool) -> Result<File, StorageError> {
    let created = !dir.exists();
    fs::create_dir_all(log_dir).map_err(io_err("create directory", log_dir))?;
    if created && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent, fsync)?;
    }
    let lock_path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io_err("open lock file", &lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(StorageError::Locked { path: lock_path });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
    }
    sync_dir(dir, fsync)?;
    sync_dir(log_dir, fsync)?;
    Ok(lock)
}

/// A small framed file (`magic`, checksum, payload) decoded by `decode`; `None` when absent.
fn read_framed<T>(
    path: &Path,
    magic: &[u8; 8],
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<T>, StorageError> {
    let Some(data) = read_optional(path)? else {
        return Ok(None);
    };
    let payload = decode_framed(path, magic, &data)?;
    decode(payload).map(Some).map_err(|reason| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason,
    })
}

/// The newest snapshot file with an index below `below` that loads and checks out, falling
/// back to older files when a newer one is corrupt.
fn usable_snapshot_below(dir: &Path, files: &[u64], below: u64) -> Option<Snapshot> {
    for &idx in files.iter().rev().filter(|&&i| i < below) {
        match snapshot::load(dir, idx) {
            Ok(s) => return Some(s),
            Err(e) => warn!(error = %e, "snapshot unusable, falling back to an older one"),
        }
    }
    None
}

/// Finishes an `install_snapshot` interrupted by a crash: when the snapshot it was installing
/// was saved, the old log goes. Returns the first indexes of the log segments left.
fn finish_interrupted_install(
    dir: &Path,
    log_dir: &Path,
    snapshot_index: u64,
    have_snapshot: bool,
    fsync: bool,
) -> Result<Vec<u64>, StorageError> {
    let install_path = dir.join(INSTALL_FILE);
    let mut discard_log = false;
    if let Some(data) = read_optional(&install_path)? {
        let payload = decode_framed(&install_path, INSTALL_MAGIC, &data);
        let target = payload.ok().and_then(|p| <[u8; 8]>::try_from(p).ok());
        match target.map(u64::from_le_bytes) {
            Some(idx) if have_snapshot && idx == snapshot_index => {
                info!(index = idx, "completing interrupted snapshot installation");
                discard_log = true;
            }
            _ => info!("snapshot installation was interrupted before the snapshot was saved; keeping the log"),
        }
    }
    let mut firsts = wal::list(log_dir)?;
    if discard_log {
        for &first in firsts.iter().rev() {
            remove_if_exists(&log_dir.join(wal::file_name(first)))?;
        }
        firsts.clear();
        sync_dir(log_dir, fsync)?;
    }
    if read_optional(&install_path)?.is_some() {
        remove_if_exists(&install_path)?;
        sync_dir(dir, fsync)?;
    }
    Ok(firsts)
}

/// Reads the log segments starting at `firsts`, in order: a gap between segments or damage
/// before the last segment's end is an error; a torn write at the very end is cut off. Returns
/// the segments and the entries after `snapshot_index`.
fn read_log(
    log_dir: &Path,
    firsts: &[u64],
    snapshot_index: u64,
    fsync: bool,
) -> Result<(Vec<Segment>, Vec<LogEntry>), StorageError> {
    let mut segments: Vec<Segment> = Vec::with_capacity(firsts.len());
    let mut entries = Vec::new();
    for (i, &first) in firsts.iter().enumerate() {
        let last_segment = i + 1 == firsts.len();
        let sc = wal::scan(log_dir, first)?;
        if let Some(prev) = segments.last().map(Segment::end)
            && prev != first
        {
            return Err(StorageError::Corrupt {
                path: sc.path,
                offset: 0,
                reason: format!(
                    "segment starts at index {first} but the previous segment ends before \
                     index {prev} (gap in the log)"
                ),
            });
        }
        let allocated = match &sc.bad {
            Some((offset, reason)) => {
                cut_torn_tail(&sc, *offset, reason, last_segment, fsync)?;
                sc.valid_len
            }
            None => sc.file_len,
        };
        entries.extend(sc.entries.into_iter().filter(|e| e.index > snapshot_index));
        segments.push(Segment {
            first,
            path: sc.path,
            offsets: sc.offsets,
            size: sc.valid_len,
            allocated,
        });
    }
    Ok((segments, entries))
}

/// A segment whose scan stopped at a bad record (`offset`, `reason`): a torn write when it is
/// the last segment and nothing valid follows, cut off then; data loss otherwise, refused.
fn cut_torn_tail(
    sc: &wal::Scanned,
    offset: u64,
    reason: &str,
    last_segment: bool,
    fsync: bool,
) -> Result<(), StorageError> {
    if !last_segment {
        return Err(StorageError::Corrupt {
            path: sc.path.clone(),
            offset,
            reason: format!("{reason} (in a segment that is not the last)"),
        });
    }
    if let Some(valid) = sc.valid_after_bad {
        return Err(StorageError::Corrupt {
            path: sc.path.clone(),
            offset,
            reason: format!(
                "{reason}, followed by a valid record at offset {valid}: not a torn \
                 write, refusing to drop data"
            ),
        });
    }
    warn!(
        file = %sc.path.display(),
        offset,
        reason = %reason,
        dropped_bytes = sc.file_len - sc.valid_len,
        "truncating torn write at the end of the log"
    );
    let f = OpenOptions::new()
        .write(true)
        .open(&sc.path)
        .map_err(io_err("open", &sc.path))?;
    f.set_len(sc.valid_len)
        .map_err(io_err("truncate torn tail of", &sc.path))?;
    if fsync {
        f.sync_all().map_err(io_err("fsync", &sc.path))?;
    }
    Ok(())
}

/// Reconciles the log with the snapshot: a gap between them is an error; a log that is empty
/// or wholly covered by the snapshot restarts at the index after it (returned).
fn log_restart(segments: &[Segment], snapshot_index: u64, have_snapshot: bool) -> Result<Option<u64>, StorageError> {
    let (Some(head), Some(tail)) = (segments.first(), segments.last()) else {
        return Ok(Some(snapshot_index + 1));
    };
    if head.first > snapshot_index + 1 {
        return Err(StorageError::Corrupt {
            path: head.path.clone(),
            offset: 0,
            reason: format!(
                "log starts at index {} but {} (gap between snapshot and log)",
                head.first,
                if have_snapshot {
                    format!("the newest usable snapshot ends at {snapshot_index}")
                } else {
                    "there is no usable snapshot".to_string()
                }
            ),
        });
    }
    // The whole log covered by the snapshot: start it again after the snapshot.
    Ok((tail.end() <= snapshot_index).then_some(snapshot_index + 1))
}

fn create_segment(log_dir: &Path, first: u64) -> Result<Segment, StorageError> {
    let path = log_dir.join(wal::file_name(first));
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err("create segment", &path))?;
    Ok(Segment {
        first,
        path,
        offsets: Vec::new(),
        size: 0,
        allocated: 0,
    })
}

/// A writer to the segment at `path` whose next byte goes to `offset` (the end of its
/// records: reserved space may follow, so the file is not opened for appending).
fn open_at(path: &Path, offset: u64) -> Result<BufWriter<File>, StorageError> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open segment", path))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(io_err("seek in segment", path))?;
    Ok(BufWriter::with_capacity(WRITE_BUFFER, f))
}

fn remove_tmp_files(dir: &Path) -> Result<(), StorageError> {
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_name().to_str().is_some_and(|n| n.ends_with(".tmp")) {
            remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}
