//! Inputs the fuzz targets (`fuzz/`, docs/fuzzing.md) crashed on, as plain tests: each feeds
//! the exact bytes and expects a clear error or refusal, not a panic. The fuzzer inputs
//! themselves are in `fuzz/regressions/<target>/` (replayed by `fuzz/run.sh`).

use lockstep_proto::{
    AppendRequest, AppendResponse, Configuration, InstallSnapshotRequest, LogEntry, Member, MemberRole,
};
use lockstep_replica::machine::kv::Kv;
use lockstep_replica::node::Node;
use lockstep_replica::runtime::{Runtime, digest};
use lockstep_replica::storage::{MAX_INDEX, Storage, StorageOptions};
use prost::Message;

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

fn config() -> Configuration {
    let member = |id: &str| Member {
        id: id.into(),
        endpoint: format!("http://{id}"),
        role: MemberRole::Voter as i32,
    };
    Configuration {
        epoch: 1,
        primary_id: "a".into(),
        members: vec![member("a"), member("b")],
    }
}

fn node(id: &str) -> Node {
    let mut n = Node::new(id.into(), Runtime::new(Box::new(Kv::default())), 10_000, false);
    n.reconfigure(config()).unwrap();
    n
}

/// fuzz/regressions/peer_message/append-response-match-index-max: a backup answers success
/// with match index u64::MAX. The primary computed `match_index + 1` and panicked.
#[test]
fn append_response_claiming_u64_max_does_not_crash_the_primary() {
    let resp = AppendResponse::decode(hex("100118ffffffffffffffffff01").as_slice()).unwrap();
    assert!(resp.success && resp.match_index == u64::MAX);
    let mut a = node("a");
    a.on_peer_response("b", 1, 0, &resp);
    assert_eq!(
        a.peers["b"].match_index,
        a.last_index(),
        "the claim is capped at what exists"
    );
    assert_eq!(a.commit_index, 0);
}

/// fuzz/regressions/peer_message/install-snapshot-index-max: an InstallSnapshot at index
/// u64::MAX (digest correct, image restorable). The backup computed `index + 1` and panicked.
#[test]
fn install_snapshot_at_u64_max_is_refused() {
    let mut req =
        InstallSnapshotRequest::decode(hex("08011201611a1108ffffffffffffffffff011a040a027b7d").as_slice()).unwrap();
    let snap = req.snapshot.as_mut().unwrap();
    assert_eq!(snap.index, u64::MAX);
    snap.digest = digest(&snap.data);
    let mut b = node("b");
    let (resp, ops) = b.handle_install(req);
    assert!(!resp.success, "{resp:?}");
    assert!(resp.error.contains("out of range"), "{}", resp.error);
    assert!(ops.is_empty());
    assert_eq!(b.applied_index, 0);
}

/// Next to it: a backup at MAX_INDEX - 1 (after a snapshot there) refuses an entry at
/// u64::MAX, so its last index, and `last + 1` everywhere, stay in range.
#[test]
fn append_past_max_index_is_refused() {
    let image = hex("0a027b7d");
    let mut b = node("b");
    let snapshot = lockstep_proto::Snapshot {
        index: MAX_INDEX,
        epoch: 1,
        digest: digest(&image),
        data: image,
        machine: None,
    };
    let (resp, _) = b.handle_install(InstallSnapshotRequest {
        epoch: 1,
        primary_id: "a".into(),
        snapshot: Some(snapshot),
        config: None,
    });
    assert!(resp.success, "{resp:?}");
    assert_eq!(b.last_index(), MAX_INDEX);
    let (resp, ops) = b.handle_append(AppendRequest {
        epoch: 1,
        primary_id: "a".into(),
        prev_index: MAX_INDEX,
        prev_epoch: 1,
        entries: vec![LogEntry {
            index: u64::MAX,
            epoch: 1,
            body: None,
        }],
        commit_index: 0,
        machine: Some(b.identity.clone()),
        config: None,
    });
    assert!(!resp.success && resp.error.contains("out of range"), "{resp:?}");
    assert!(ops.is_empty());
    assert_eq!(b.last_index(), MAX_INDEX);
}
