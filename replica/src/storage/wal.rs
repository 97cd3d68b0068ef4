//! Write-ahead log segments: `log/<20-digit first index>.wal`, a sequence of records
//! `[u32 len LE][u32 crc32 LE of (len ++ payload)][payload = prost LogEntry]`, then possibly
//! zeros to the end of the file (space reserved ahead of the records).

use std::fs;
use std::path::{Path, PathBuf};

use lockstep_proto::LogEntry;
use prost::Message;

use super::StorageError;
use super::files::io_err;

pub(crate) const RECORD_HEADER: usize = 8;
/// Largest accepted record payload. A length field above it is treated as corruption.
pub(crate) const MAX_RECORD: usize = 64 * 1024 * 1024;
/// Upper bound on checksum work spent deciding whether a bad record is a torn tail.
const TAIL_SCAN_BUDGET: usize = 1 << 30;

pub(crate) fn file_name(first: u64) -> String {
    format!("{first:020}.wal")
}

pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// First indexes of all segment files in `log_dir`, ascending.
pub(crate) fn list(log_dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(log_dir).map_err(io_err("list", log_dir))? {
        let entry = entry.map_err(io_err("list", log_dir))?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push(first);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn record_crc(len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends the framed record for `entry` to `out`; returns the record size in bytes.
pub(crate) fn encode_record(entry: &LogEntry, out: &mut Vec<u8>) -> Result<u64, StorageError> {
    let payload_len = entry.encoded_len();
    if payload_len == 0 || payload_len > MAX_RECORD {
        return Err(StorageError::Invalid(format!(
            "log entry {} encodes to {payload_len} bytes (allowed 1..={MAX_RECORD})",
            entry.index
        )));
    }
    let start = out.len();
    let len = payload_len as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    entry
        .encode(out)
        .map_err(|e| StorageError::Invalid(format!("encoding log entry {}: {e}", entry.index)))?;
    let crc = record_crc(len, &out[start + RECORD_HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok((out.len() - start) as u64)
}

/// Parses one record at the start of `buf`: `(payload, record size)` or why it is invalid.
fn parse_record(buf: &[u8]) -> Result<(&[u8], usize), String> {
    if buf.len() < RECORD_HEADER {
        return Err(format!(
            "incomplete record header ({} of {RECORD_HEADER} bytes)",
            buf.len()
        ));
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let n = len as usize;
    if n == 0 {
        return Err("zero-length record".to_string());
    }
    if n > MAX_RECORD {
        return Err(format!("record length {n} exceeds the maximum {MAX_RECORD}"));
    }
    if RECORD_HEADER + n > buf.len() {
        return Err(format!(
            "record of {n} bytes extends past the end of the file ({} bytes left)",
            buf.len() - RECORD_HEADER
        ));
    }
    let payload = &buf[RECORD_HEADER..RECORD_HEADER + n];
    if record_crc(len, payload) != crc {
        return Err("checksum mismatch".to_string());
    }
    Ok((payload, RECORD_HEADER + n))
}

/// A segment as read from disk.
pub(crate) struct Scanned {
    pub path: PathBuf,
    pub entries: Vec<LogEntry>,
    /// Byte offset of each record in `entries`.
    pub offsets: Vec<u64>,
    /// Length of the valid prefix (end of the last good record).
    pub valid_len: u64,
    /// File length: `valid_len`, reserved space (zeros) and anything `bad` names.
    pub file_len: u64,
    /// First invalid record: offset and reason. `None` when the file parsed to its end.
    pub bad: Option<(u64, String)>,
    /// Some valid record (offset) found after `bad`; means `bad` is not a torn tail.
    pub valid_after_bad: Option<u64>,
}

/// Reads a whole segment. Entry indexes must be `first, first+1, ...` (a hard error
/// otherwise). Framing/checksum problems are reported in `bad`; the caller decides whether
/// they are a torn tail.
pub(crate) fn scan(log_dir: &Path, first: u64) -> Result<Scanned, StorageError> {
    let path = log_dir.join(file_name(first));
    let data = fs::read(&path).map_err(io_err("read", &path))?;
    let mut entries = Vec::new();
    let mut offsets = Vec::new();
    let mut off = 0usize;
    let mut bad = None;
    while off < data.len() {
        match parse_record(&data[off..]) {
            Ok((payload, size)) => {
                let entry = LogEntry::decode(payload).map_err(|e| StorageError::Corrupt {
                    path: path.clone(),
                    offset: off as u64,
                    reason: format!("checksum ok but payload is not a LogEntry: {e}"),
                })?;
                let expected = first + entries.len() as u64;
                if entry.index > super::MAX_INDEX {
                    return Err(StorageError::Corrupt {
                        path: path.clone(),
                        offset: off as u64,
                        reason: format!(
                            "entry has index {}, above the largest possible index {}",
                            entry.index,
                            super::MAX_INDEX
                        ),
                    });
                }
                if entry.index != expected {
                    return Err(StorageError::Corrupt {
                        path: path.clone(),
                        offset: off as u64,
                        reason: format!(
                            "entry has index {}, expected {expected} (gap or reordering)",
                            entry.index
                        ),
                    });
                }
                offsets.push(off as u64);
                entries.push(entry);
                off += size;
            }
            // Nothing but zeros to the end: space reserved ahead of the records.
            Err(_) if data[off..].iter().all(|&b| b == 0) => break,
            Err(reason) => {
                bad = Some((off as u64, reason));
                break;
            }
        }
    }
    let next_index = first + entries.len() as u64;
    let valid_after_bad = if bad.is_some() {
        find_valid_record(&path, &data, off + 1, next_index)?
    } else {
        None
    };
    Ok(Scanned {
        path,
        entries,
        offsets,
        valid_len: off as u64,
        file_len: data.len() as u64,
        bad,
        valid_after_bad,
    })
}

/// Looks for any well-formed record at or after `from` whose entry index is at least
/// `min_index`. Finding one means the bad record before it is corruption in the middle
/// of the log, not a torn write at its end.
fn find_valid_record(path: &Path, data: &[u8], from: usize, min_index: u64) -> Result<Option<u64>, StorageError> {
    let mut budget = TAIL_SCAN_BUDGET;
    let mut p = from;
    while p + RECORD_HEADER < data.len() {
        let len = u32::from_le_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]]) as usize;
        if len > 0 && len <= MAX_RECORD && p + RECORD_HEADER + len <= data.len() {
            if len > budget {
                return Err(StorageError::Corrupt {
                    path: path.to_path_buf(),
                    offset: from.saturating_sub(1) as u64,
                    reason: "bad record, and the bytes after it are too large to prove it is \
                             a torn tail; refusing to truncate (inspect the file)"
                        .to_string(),
                });
            }
            budget -= len;
            if let Ok((payload, _)) = parse_record(&data[p..])
                && let Ok(e) = LogEntry::decode(payload)
                && e.index >= min_index
            {
                return Ok(Some(p as u64));
            }
        }
        p += 1;
    }
    Ok(None)
}
