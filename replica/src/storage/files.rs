//! Small whole-file helpers: a checksummed frame for single-value files (configuration,
//! identity, snapshots, the install marker), atomic replacement and directory fsync.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use super::StorageError;

/// `[8-byte magic][u64 payload length][u32 crc32 of (length ++ payload)][payload]`
const HEADER: usize = 8 + 8 + 4;

pub(crate) const CONFIG_MAGIC: &[u8; 8] = b"LSCONF01";
pub(crate) const IDENTITY_MAGIC: &[u8; 8] = b"LSIDNT01";
pub(crate) const SNAPSHOT_MAGIC: &[u8; 8] = b"LSSNAP01";
pub(crate) const INSTALL_MAGIC: &[u8; 8] = b"LSINST01";

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { op, path, source }
}

fn frame_crc(len: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

pub(crate) fn encode_framed(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u64;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&frame_crc(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the frame and returns the payload. Every failure names the file and offset.
pub(crate) fn decode_framed<'a>(path: &Path, magic: &[u8; 8], data: &'a [u8]) -> Result<&'a [u8], StorageError> {
    let corrupt = |offset: u64, reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    if data.len() < HEADER {
        return Err(corrupt(
            0,
            format!("file is {} bytes, shorter than its {HEADER}-byte header", data.len()),
        ));
    }
    if &data[..8] != magic {
        return Err(corrupt(
            0,
            format!(
                "bad magic {:?}, expected {:?}",
                String::from_utf8_lossy(&data[..8]),
                String::from_utf8_lossy(magic)
            ),
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&data[8..16]);
    let len = u64::from_le_bytes(len_bytes);
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&data[16..20]);
    let crc = u32::from_le_bytes(crc_bytes);
    let body = &data[HEADER..];
    if body.len() as u64 != len {
        return Err(corrupt(
            8,
            format!("header says {len} payload bytes, file holds {}", body.len()),
        ));
    }
    if frame_crc(len, body) != crc {
        return Err(corrupt(HEADER as u64, "checksum mismatch".to_string()));
    }
    Ok(body)
}

/// Reads a file, `None` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// fsync a directory so that creations, renames and deletions inside it are durable.
pub(crate) fn sync_dir(path: &Path, fsync: bool) -> Result<(), StorageError> {
    if !fsync {
        return Ok(());
    }
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", path))
}

/// Atomically replaces `dir/name` with `bytes`: write `name.tmp`, fsync, rename, fsync dir.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8], fsync: bool) -> Result<(), StorageError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        if fsync {
            f.sync_all().map_err(io_err("fsync", &tmp))?;
        }
    }
    fs::rename(&tmp, &dst).map_err(io_err("rename into place", &dst))?;
    sync_dir(dir, fsync)
}

/// Removes a file; a missing file is not an error.
pub(crate) fn remove_if_exists(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("delete", path)(e)),
    }
}
