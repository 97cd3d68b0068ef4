//! Snapshot restore on hostile bytes, into each built-in machine: the runtime image decoder
//! (`Runtime::restore`), the snapshot file reader (`Storage::open` over
//! `snapshot-<index>.snap`) and recovery from it (`Node::recover`, the Byzantine
//! `Core::recover`).
//!
//! Input: `[machine][mode][rest]`.
//! - mode 0: `rest` is the runtime image (`Snapshot.data`) handed to `Runtime::restore`;
//! - mode 1: a snapshot file with a correct frame and digest around `rest[8..]` as `data`,
//!   index `rest[..8]` (the fuzzer reaches the image decoder through the file);
//! - mode 2: `rest` is the `Snapshot` message, in a frame with a correct checksum;
//! - mode 3: `rest` is the whole file.
//!
//! Checked: nothing panics; a state that restored is written back as a snapshot that restores
//! to the same state (no silent loss in a round trip); recovery either fails with an error or
//! lands at the snapshot's index.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::{SNAPSHOT_MAGIC, framed_file, machine, sha256, u64_from};
use lockstep_proto::Snapshot;
use lockstep_replica::byz::order::Core;
use lockstep_replica::node::Node;
use lockstep_replica::runtime::Runtime;
use lockstep_replica::storage::{Storage, StorageOptions};
use prost::Message;

fn check_round_trip(selector: u8, rt: &Runtime) {
    let written = rt.snapshot();
    let mut again = Runtime::new(machine(selector));
    again
        .restore(&written)
        .expect("a snapshot the runtime wrote must restore");
    assert_eq!(
        again.snapshot(),
        written,
        "snapshot -> restore -> snapshot changed the state"
    );
    assert_eq!(again.sealed_at(), rt.sealed_at());
    assert_eq!(again.applied_by(), rt.applied_by());
}

fn recover(selector: u8, snap: Snapshot) {
    let index = snap.index;
    let mut node = Node::new("a".into(), Runtime::new(machine(selector)), 10_000, false);
    match node.recover(None, Some(snap.clone()), Vec::new()) {
        Ok(()) => {
            assert_eq!(node.applied_index, index);
            assert_eq!(node.last_index(), index);
            let _ = node.status();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let master = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
    let mut core = Core::new("r0".into(), Runtime::new(machine(selector)), master, Default::default());
    match core.recover(Some(snap), Vec::new()) {
        Ok(()) => {
            assert_eq!(core.index, index);
            let _ = core.snapshot();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [selector, mode, rest @ ..] = data else {
        return;
    };
    let selector = *selector;
    if mode % 4 == 0 {
        let mut rt = Runtime::new(machine(selector));
        if rt.restore(rest).is_ok() {
            check_round_trip(selector, &rt);
        }
        return;
    }
    let (index, file) = match mode % 4 {
        1 => {
            let index = u64_from(rest);
            let payload = rest.get(8..).unwrap_or_default().to_vec();
            let snap = Snapshot {
                index,
                epoch: 1,
                digest: sha256(&payload),
                data: payload,
                machine: None,
            };
            (index, framed_file(SNAPSHOT_MAGIC, &snap.encode_to_vec()))
        }
        2 => {
            let index = Snapshot::decode(rest).map_or(5, |s| s.index);
            (index, framed_file(SNAPSHOT_MAGIC, rest))
        }
        _ => (5, rest.to_vec()),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(format!("snapshot-{index:020}.snap")), &file).expect("write snapshot");
    let opts = StorageOptions {
        fsync: false,
        ..Default::default()
    };
    match Storage::open(dir.path(), opts) {
        Ok((storage, recovered)) => {
            drop(storage);
            if let Some(snap) = recovered.snapshot {
                assert_eq!(snap.index, index);
                assert_eq!(snap.digest, sha256(&snap.data), "a loaded snapshot matches its digest");
                let mut rt = Runtime::new(machine(selector));
                if rt.restore(&snap.data).is_ok() {
                    check_round_trip(selector, &rt);
                }
                recover(selector, snap);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
