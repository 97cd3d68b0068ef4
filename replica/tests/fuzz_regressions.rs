//! Inputs the fuzz targets (`fuzz/`, docs/fuzzing.md) crashed on, as plain tests: each feeds
//! the exact bytes and expects a clear error or refusal, not a panic. The fuzzer inputs
//! themselves are in `fuzz/regressions/<target>/` (replayed by `fuzz/run.sh`).

use lockstep_replica::storage::{Storage, StorageOptions};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn opts() -> StorageOptions {
    StorageOptions {
        fsync: false,
        ..Default::default()
    }
}

/// fuzz/regressions/wal_record/segment-index-u64-max: segment `18446744073709551614.wal`
/// holding two well-formed records, indexes u64::MAX - 1 and u64::MAX. Computing the index
/// after the segment overflowed (a panic in `Storage::open`).
#[test]
fn wal_entry_at_u64_max_is_corruption() {
    let segment = hex(concat!(
        "0d0000004574acb408feffffffffffffffff012a00",
        "120000003c5fea7c08ffffffffffffffffff0110141a030a0163",
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("log")).unwrap();
    std::fs::write(dir.path().join("log").join("18446744073709551614.wal"), &segment).unwrap();
    let err = Storage::open(dir.path(), opts()).expect_err("an index past MAX_INDEX is corrupt");
    let msg = err.to_string();
    assert!(msg.contains("18446744073709551614.wal"), "{msg}");
    assert!(msg.contains("at offset 21"), "{msg}");
    assert!(msg.contains("above the largest possible index"), "{msg}");
}

/// fuzz/regressions/snapshot/snapshot-index-u64-max: a well-framed snapshot with a correct
/// digest at index u64::MAX. Recovery computed `index + 1` and panicked; now the file is
/// unusable like any corrupt snapshot (and with no older one, nothing is recovered).
#[test]
fn snapshot_at_u64_max_is_corruption() {
    let file = hex(concat!(
        "4c53534e4150303135000000000000002108999e08ffffffffffffffffff0110011a04ffff6fe5",
        "2a207bc9dc3aea4422a9dc4bcb1872ade7895b4d5d6dde0d5f18f4471588da4af51f",
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("snapshot-18446744073709551615.snap"), &file).unwrap();
    let (_storage, recovered) = Storage::open(dir.path(), opts()).expect("opens without the snapshot");
    assert_eq!(recovered.snapshot, None);
    assert!(recovered.entries.is_empty());
}
