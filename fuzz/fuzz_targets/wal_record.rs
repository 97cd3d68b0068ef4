//! The WAL reader (`Storage::open` over `log/<first>.wal`) on hostile bytes.
//!
//! Input: `[mode][rest]`. Even modes write `rest` as the segment file as it is; odd modes
//! frame each operation of `rest` (see `lockstep_fuzz::ops`) as a record with a correct
//! checksum, so the fuzzer's bytes reach the `LogEntry` decoder and the index checks behind
//! the checksum: op bit 0 set = a well-formed entry built from the bytes (index = next),
//! clear = the bytes as the payload; op 0xff = raw bytes appended unframed (a torn tail or
//! garbage). `mode >> 1` picks the segment's first index.
//!
//! Checked: opening never panics; when it succeeds, the recovered entries are contiguous,
//! every framed record before the first bad byte that decodes to the expected index is
//! there (nothing silently dropped), and reopening yields the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::{ops, u64_from, wal_record};
use lockstep_proto::{Command, LogEntry, Noop, log_entry::Body};
use lockstep_replica::storage::{Storage, StorageOptions};
use prost::Message;

const FIRSTS: [u64; 4] = [1, 2, 1000, u64::MAX - 1];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let first = FIRSTS[usize::from(mode >> 1) % FIRSTS.len()];
    let mut file = Vec::new();
    // Entries the reader must return, if it accepts the file at all.
    let mut must_keep: Vec<LogEntry> = Vec::new();
    let mut intact = true;
    if mode & 1 == 0 {
        file.extend_from_slice(rest);
    } else {
        for (op, bytes) in ops(rest) {
            let Some(expected) = first.checked_add(must_keep.len() as u64) else {
                break;
            };
            if op == 0xff {
                file.extend_from_slice(bytes);
                intact = false;
                continue;
            }
            let payload = if op & 1 == 1 {
                let body = match op >> 1 & 3 {
                    0 => Body::Noop(Noop {}),
                    _ => Body::Command(Command {
                        client_id: "c".into(),
                        sequence: u64_from(bytes),
                        payload: bytes.to_vec(),
                    }),
                };
                LogEntry {
                    index: expected,
                    epoch: u64::from(op >> 3),
                    body: Some(body),
                }
                .encode_to_vec()
            } else {
                bytes.to_vec()
            };
            if payload.is_empty() {
                // The writer never writes an empty record; the reader treats one as bad.
                file.extend_from_slice(&wal_record(&payload));
                intact = false;
                continue;
            }
            file.extend_from_slice(&wal_record(&payload));
            if intact {
                match LogEntry::decode(payload.as_slice()) {
                    Ok(e) if e.index == expected => must_keep.push(e),
                    _ => intact = false,
                }
            }
        }
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("log");
    std::fs::create_dir(&log).expect("log dir");
    std::fs::write(log.join(format!("{first:020}.wal")), &file).expect("write segment");
    let opts = StorageOptions {
        fsync: false,
        ..Default::default()
    };
    let recovered = match Storage::open(dir.path(), opts.clone()) {
        Ok((storage, recovered)) => {
            drop(storage);
            recovered
        }
        Err(e) => {
            // A clear error: it names the file (or the storage request).
            let _ = e.to_string();
            return;
        }
    };
    for (i, e) in recovered.entries.iter().enumerate() {
        assert_eq!(e.index, first + i as u64, "recovered entries are contiguous");
    }
    assert!(
        recovered.entries.starts_with(&must_keep),
        "valid records were dropped: kept {} of {} good ones",
        recovered.entries.len(),
        must_keep.len()
    );
    let (_storage, again) = Storage::open(dir.path(), opts).expect("a directory that opened once opens again");
    assert_eq!(recovered, again, "reopening changed what was recovered");
});
