//! Snapshot files: `snapshot-<20-digit index>.snap`, a checksummed frame around the
//! prost-encoded `Snapshot`, whose `digest` (sha256 of `data`) is verified on load.

use std::fs;
use std::path::Path;

use lockstep_proto::Snapshot;
use prost::Message;
use sha2::{Digest, Sha256};

use super::StorageError;
use super::files::{SNAPSHOT_MAGIC, decode_framed, encode_framed, io_err};

pub(crate) fn file_name(index: u64) -> String {
    format!("snapshot-{index:020}.snap")
}

pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snapshot-")?.strip_suffix(".snap")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn digest(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Indexes of all snapshot files in `dir`, ascending.
pub(crate) fn list(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Some(idx) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push(idx);
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub(crate) fn encode(s: &Snapshot) -> Vec<u8> {
    encode_framed(SNAPSHOT_MAGIC, &s.encode_to_vec())
}

/// Loads and fully verifies `dir/snapshot-<index>.snap`.
pub(crate) fn load(dir: &Path, index: u64) -> Result<Snapshot, StorageError> {
    let path = dir.join(file_name(index));
    let corrupt = |reason: String| StorageError::Corrupt {
        path: path.clone(),
        offset: 0,
        reason,
    };
    if index > super::MAX_INDEX {
        return Err(corrupt(format!(
            "snapshot index {index} is above the largest possible index {}",
            super::MAX_INDEX
        )));
    }
    let data = fs::read(&path).map_err(io_err("read", &path))?;
    let payload = decode_framed(&path, SNAPSHOT_MAGIC, &data)?;
    let snap = Snapshot::decode(payload).map_err(|e| corrupt(format!("undecodable Snapshot message: {e}")))?;
    if snap.index != index {
        return Err(corrupt(format!(
            "file name says index {index}, snapshot says {}",
            snap.index
        )));
    }
    if snap.digest != digest(&snap.data) {
        return Err(corrupt(format!(
            "sha256 of data is {}, snapshot digest says {}",
            hex::encode(digest(&snap.data)),
            hex::encode(&snap.digest)
        )));
    }
    Ok(snap)
}
