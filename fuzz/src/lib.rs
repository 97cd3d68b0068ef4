//! Helpers shared by the fuzz targets: splitting the fuzzer's bytes into framed operations,
//! and writing the on-disk framings (with correct checksums) so the fuzzer's bytes reach the
//! decoders behind a checksum instead of stopping at it.

/// Splits `data` into operations `[op: u8][len: u16 LE][len bytes]`. The last operation gets
/// what is left when `len` runs past the end, so every input means something.
pub fn ops(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let Some((&op, rest)) = data.split_first() {
        let [a, b, rest @ ..] = rest else {
            out.push((op, rest));
            break;
        };
        let len = usize::from(u16::from_le_bytes([*a, *b]));
        let n = len.min(rest.len());
        out.push((op, &rest[..n]));
        data = &rest[n..];
    }
    out
}

/// A little-endian u64 from up to 8 bytes (missing bytes are zero).
pub fn u64_from(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}

/// A WAL record as `replica/src/storage/wal.rs` writes it:
/// `[u32 len LE][u32 crc32 LE of (len ++ payload)][payload]`.
pub fn wal_record(payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(payload);
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A single-value file as `replica/src/storage/files.rs` writes it:
/// `[8-byte magic][u64 len LE][u32 crc32 of (len ++ payload)][payload]`.
pub fn framed_file(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u64;
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(payload);
    let mut out = Vec::with_capacity(20 + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"LSSNAP01";
pub const CONFIG_MAGIC: &[u8; 8] = b"LSCONF01";
pub const IDENTITY_MAGIC: &[u8; 8] = b"LSIDNT01";
pub const INSTALL_MAGIC: &[u8; 8] = b"LSINST01";

/// sha256, as the snapshot digest.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

/// The built-in machine `selector` picks (kv or counter).
pub fn machine(selector: u8) -> Box<dyn lockstep_replica::machine::StateMachine> {
    let names = lockstep_replica::machine::BUILTIN_NAMES;
    let name = names[usize::from(selector) % names.len()];
    lockstep_replica::machine::builtin(name).expect("a built-in name")()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_split_and_keep_the_tail() {
        assert_eq!(ops(&[1, 2, 0, 9, 9, 3, 5, 0, 7]), vec![(1, &[9, 9][..]), (3, &[7][..])]);
        assert_eq!(ops(&[4]), vec![(4, &[][..])]);
        assert_eq!(ops(&[4, 1]), vec![(4, &[1][..])]);
    }
}
