use super::*;
use lockstep_proto::{Command, Member, MemberRole, log_entry};
use std::io::{Seek, SeekFrom};

fn entry(index: u64, epoch: u64) -> LogEntry {
    LogEntry {
        index,
        epoch,
        body: Some(log_entry::Body::Command(Command {
            client_id: format!("client-{}", index % 7),
            sequence: index,
            payload: vec![(index % 251) as u8; (index % 37) as usize + 3],
        })),
    }
}

fn entries(from: u64, to: u64) -> Vec<LogEntry> {
    (from..=to).map(|i| entry(i, 1)).collect()
}

fn snap(index: u64) -> Snapshot {
    let data = format!("state at {index}").into_bytes();
    Snapshot {
        index,
        epoch: 1,
        digest: snapshot::digest(&data),
        data,
        machine: None,
    }
}

fn opts() -> StorageOptions {
    StorageOptions::default()
}

fn small_segments() -> StorageOptions {
    StorageOptions {
        fsync: true,
        segment_bytes: 256,
        preallocate_bytes: 1024,
    }
}

/// A fresh data dir holding entries 1..=last, synced; the storage is still open.
fn written(opts: StorageOptions, last: u64) -> (tempfile::TempDir, Storage) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), opts).expect("open");
    s.append(&entries(1, last)).expect("append");
    s.sync().expect("sync");
    (tmp, s)
}

/// End of a segment's records: its file may go on with reserved space (zeros).
fn records_end(path: &Path) -> u64 {
    let (log_dir, name) = (path.parent().expect("log dir"), path.file_name().expect("name"));
    let first = wal::parse_file_name(name.to_str().expect("utf-8")).expect("segment name");
    wal::scan(log_dir, first).expect("scan").valid_len
}

/// Writes `bytes` right after a segment's records, as an interrupted append would.
fn write_after_records(path: &Path, bytes: &[u8]) {
    let end = records_end(path);
    let mut f = OpenOptions::new().write(true).open(path).expect("open");
    f.seek(SeekFrom::Start(end)).expect("seek");
    f.write_all(bytes).expect("write");
}

fn segment_files(dir: &Path) -> Vec<u64> {
    wal::list(&dir.join(LOG_DIR)).expect("list segments")
}

fn snapshot_files(dir: &Path) -> Vec<u64> {
    snapshot::list(dir).expect("list snapshots")
}

fn indexes(es: &[LogEntry]) -> Vec<u64> {
    es.iter().map(|e| e.index).collect()
}

fn corrupt_err(r: Result<(Storage, Recovered), StorageError>) -> (PathBuf, u64, String) {
    match r {
        Err(StorageError::Corrupt { path, offset, reason }) => (path, offset, reason),
        Err(e) => panic!("expected a Corrupt error, got {e}"),
        Ok((s, _)) => panic!("expected a Corrupt error, opened fine: {s:?}"),
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let mut data = fs::read(path).expect("read");
    data[offset as usize] ^= 0x5a;
    fs::write(path, data).expect("write");
}

#[test]
fn empty_directory_opens_empty() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("nested/store");
    let (s, rec) = Storage::open(&dir, opts()).expect("open");
    assert_eq!(rec, Recovered::default());
    assert_eq!(s.last_index(), 0);
    assert_eq!(s.first_index(), 1);
    assert_eq!(s.dir(), dir.as_path());
}

#[test]
fn round_trip_append_sync_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = Configuration {
        epoch: 7,
        primary_id: "a".into(),
        members: vec![Member {
            id: "a".into(),
            endpoint: "http://a:1".into(),
            role: MemberRole::Voter as i32,
        }],
    };
    {
        let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
        s.append(&entries(1, 10)).expect("append");
        s.append(&entries(11, 100)).expect("append");
        s.sync().expect("sync");
        s.save_config(&config).expect("config");
        s.save_identity("replica-a").expect("identity");
        assert_eq!(s.last_index(), 100);
    }
    let (s, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.entries, entries(1, 100));
    assert_eq!(rec.config, Some(config));
    assert_eq!(rec.identity.as_deref(), Some("replica-a"));
    assert_eq!(rec.snapshot, None);
    assert_eq!((s.first_index(), s.last_index()), (1, 100));
}

#[test]
fn config_is_replaced_atomically() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
    for epoch in 1..5 {
        s.save_config(&Configuration {
            epoch,
            ..Default::default()
        })
        .expect("config");
    }
    drop(s);
    // A leftover temp file from a crash mid-save is ignored and removed.
    fs::write(tmp.path().join("config.tmp"), b"garbage").expect("write");
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.config.map(|c| c.epoch), Some(4));
    assert!(!tmp.path().join("config.tmp").exists());
}

#[test]
fn corrupt_config_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
    s.save_config(&Configuration {
        epoch: 3,
        primary_id: "p".into(),
        ..Default::default()
    })
    .expect("config");
    drop(s);
    let path = tmp.path().join(CONFIG_FILE);
    let len = fs::metadata(&path).expect("meta").len();
    flip_byte(&path, len - 1);
    let (p, _, reason) = corrupt_err(Storage::open(tmp.path(), opts()));
    assert_eq!(p, path);
    assert!(reason.contains("checksum"), "{reason}");
}

#[test]
fn append_must_be_contiguous() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
    assert!(matches!(
        s.append(&[entry(2, 1)]),
        Err(StorageError::NonContiguous { expected: 1, got: 2 })
    ));
    s.append(&entries(1, 3)).expect("append");
    assert!(matches!(
        s.append(&[entry(4, 1), entry(6, 1)]),
        Err(StorageError::NonContiguous { expected: 5, got: 6 })
    ));
    // The rejected batch wrote nothing.
    assert_eq!(s.last_index(), 3);
    s.append(&entries(4, 5)).expect("append");
    s.sync().expect("sync");
    drop(s);
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.entries, entries(1, 5));
}

#[test]
fn torn_tail_is_truncated_and_valid_prefix_kept() {
    let (tmp, s) = written(opts(), 10);
    drop(s);
    let seg = tmp.path().join(LOG_DIR).join(wal::file_name(1));
    let good_len = records_end(&seg);
    // Half a record: a header promising 100 bytes, then only 10 of them.
    let mut torn = 100u32.to_le_bytes().to_vec();
    torn.extend(0xdead_beefu32.to_le_bytes());
    torn.extend([7u8; 10]);
    write_after_records(&seg, &torn);

    let (mut s, rec) = Storage::open(tmp.path(), opts()).expect("reopen after torn write");
    assert_eq!(rec.entries, entries(1, 10));
    assert_eq!(
        fs::metadata(&seg).expect("meta").len(),
        good_len,
        "the torn write is cut off"
    );
    s.append(&[entry(11, 2)]).expect("append after recovery");
    s.sync().expect("sync");
    drop(s);
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(indexes(&rec.entries), (1..=11).collect::<Vec<_>>());
}

#[test]
fn torn_header_and_zero_fill_are_tails() {
    for garbage in [&[1u8, 2, 3][..], &[0u8; 4096][..]] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
        s.append(&entries(1, 5)).expect("append");
        s.sync().expect("sync");
        drop(s);
        let seg = tmp.path().join(LOG_DIR).join(wal::file_name(1));
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        f.write_all(garbage).expect("write");
        drop(f);
        let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
        assert_eq!(rec.entries, entries(1, 5));
    }
}

#[test]
fn bad_checksum_on_last_record_is_a_torn_tail() {
    let (tmp, s) = written(opts(), 10);
    drop(s);
    let seg = tmp.path().join(LOG_DIR).join(wal::file_name(1));
    flip_byte(&seg, records_end(&seg) - 2);
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.entries, entries(1, 9));
}

#[test]
fn checksum_failure_followed_by_valid_records_is_an_error() {
    let (tmp, s) = written(opts(), 10);
    let offset = s.segments[0].offsets[4];
    drop(s);
    let seg = tmp.path().join(LOG_DIR).join(wal::file_name(1));
    let before = fs::read(&seg).expect("read");
    flip_byte(&seg, offset + 10);
    let (path, off, reason) = corrupt_err(Storage::open(tmp.path(), opts()));
    assert_eq!(path, seg);
    assert_eq!(off, offset);
    assert!(reason.contains("followed by a valid record"), "{reason}");
    // Nothing was truncated.
    assert_eq!(fs::read(&seg).expect("read").len(), before.len());
}

#[test]
fn corrupted_length_in_last_segment_is_an_error() {
    // A flipped high bit in a length field makes the record "extend past the end", but
    // intact records follow: must not be mistaken for a torn tail.
    let (tmp, s) = written(opts(), 10);
    let offset = s.segments[0].offsets[3];
    drop(s);
    let seg = tmp.path().join(LOG_DIR).join(wal::file_name(1));
    flip_byte(&seg, offset + 2);
    let (_, off, _) = corrupt_err(Storage::open(tmp.path(), opts()));
    assert_eq!(off, offset);
}

#[test]
fn corruption_in_a_middle_segment_is_an_error() {
    let (tmp, s) = written(small_segments(), 60);
    drop(s);
    let segs = segment_files(tmp.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let middle = tmp.path().join(LOG_DIR).join(wal::file_name(segs[1]));
    // Even the last record of a middle segment is protected.
    flip_byte(&middle, records_end(&middle) - 1);
    let (path, _, reason) = corrupt_err(Storage::open(tmp.path(), small_segments()));
    assert_eq!(path, middle);
    assert!(reason.contains("not the last"), "{reason}");
}

#[test]
fn truncated_middle_segment_is_an_error() {
    let (tmp, s) = written(small_segments(), 60);
    drop(s);
    let segs = segment_files(tmp.path());
    let first = tmp.path().join(LOG_DIR).join(wal::file_name(segs[0]));
    let f = OpenOptions::new().write(true).open(&first).expect("open");
    f.set_len(records_end(&first) - 3).expect("truncate");
    let (path, _, _) = corrupt_err(Storage::open(tmp.path(), small_segments()));
    assert_eq!(path, first);
}

#[test]
fn missing_middle_segment_is_a_gap_error() {
    let (tmp, s) = written(small_segments(), 60);
    drop(s);
    let segs = segment_files(tmp.path());
    fs::remove_file(tmp.path().join(LOG_DIR).join(wal::file_name(segs[1]))).expect("rm");
    let (path, _, reason) = corrupt_err(Storage::open(tmp.path(), small_segments()));
    assert_eq!(path, tmp.path().join(LOG_DIR).join(wal::file_name(segs[2])));
    assert!(reason.contains("gap"), "{reason}");
}

#[test]
fn missing_first_segment_without_snapshot_is_an_error() {
    let (tmp, s) = written(small_segments(), 60);
    drop(s);
    let segs = segment_files(tmp.path());
    fs::remove_file(tmp.path().join(LOG_DIR).join(wal::file_name(segs[0]))).expect("rm");
    let (_, _, reason) = corrupt_err(Storage::open(tmp.path(), small_segments()));
    assert!(reason.contains("no usable snapshot"), "{reason}");
}

#[test]
fn segments_roll_and_are_named_by_first_index() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), small_segments()).expect("open");
    for i in 1..=100 {
        s.append(&[entry(i, 1)]).expect("append");
    }
    s.sync().expect("sync");
    drop(s);
    let segs = segment_files(tmp.path());
    assert!(segs.len() > 5, "{segs:?}");
    assert_eq!(segs[0], 1);
    for w in segs.windows(2) {
        assert!(w[0] < w[1]);
    }
    for &first in &segs {
        let path = tmp.path().join(LOG_DIR).join(wal::file_name(first));
        let len = records_end(&path);
        // Rolls once past segment_bytes: at most one record over.
        assert!(len <= 256 + 200, "{path:?} holds {len} bytes of records");
        let sc = wal::scan(&tmp.path().join(LOG_DIR), first).expect("scan");
        assert_eq!(sc.entries[0].index, first);
    }
    let (_, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    assert_eq!(rec.entries, entries(1, 100));
}

#[test]
fn truncate_after_then_reopen() {
    let (tmp, mut s) = written(small_segments(), 80);
    let before = segment_files(tmp.path()).len();
    s.truncate_after(30).expect("truncate");
    assert_eq!(s.last_index(), 30);
    assert!(segment_files(tmp.path()).len() < before);
    // Re-append a different suffix (new epoch), not synced explicitly before drop.
    let new: Vec<LogEntry> = (31..=35).map(|i| entry(i, 2)).collect();
    s.append(&new).expect("append");
    s.sync().expect("sync");
    drop(s);
    let (mut s, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    let mut want = entries(1, 30);
    want.extend(new);
    assert_eq!(rec.entries, want);
    // Truncate to exactly a segment boundary and to nothing.
    let boundary = *segment_files(tmp.path()).last().expect("segment");
    s.truncate_after(boundary - 1).expect("truncate");
    assert_eq!(s.last_index(), boundary - 1);
    s.truncate_after(0).expect("truncate all");
    assert_eq!((s.first_index(), s.last_index()), (1, 0));
    s.truncate_after(10).expect("no-op beyond the end");
    drop(s);
    let (mut s, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    assert!(rec.entries.is_empty());
    s.append(&entries(1, 3)).expect("append from 1");
}

#[test]
fn truncate_after_discards_unsynced_suffix_and_keeps_prefix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
    s.append(&entries(1, 20)).expect("append");
    // No sync: truncate_after syncs what it keeps.
    s.truncate_after(12).expect("truncate");
    drop(s);
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.entries, entries(1, 12));
}

#[test]
fn snapshot_compaction_deletes_old_segments() {
    let (tmp, mut s) = written(small_segments(), 100);
    s.save_snapshot(&snap(40)).expect("snapshot 40");
    assert_eq!(s.first_index(), 41);
    assert_eq!(s.last_index(), 100);
    s.save_snapshot(&snap(80)).expect("snapshot 80");
    assert_eq!(s.first_index(), 81);
    assert_eq!(s.last_index(), 100);
    s.save_snapshot(&snap(90)).expect("snapshot 90");
    // Segments wholly <= 80 (the previous snapshot) are gone; 90 and 80 are kept.
    let segs = segment_files(tmp.path());
    assert!(segs[0] > 40 && segs[0] <= 81, "{segs:?}");
    assert_eq!(snapshot_files(tmp.path()), vec![80, 90]);
    s.append(&entries(101, 105)).expect("append");
    s.sync().expect("sync");
    assert!(matches!(s.truncate_after(85), Err(StorageError::Invalid(_))));
    assert!(matches!(s.save_snapshot(&snap(50)), Err(StorageError::Invalid(_))));
    drop(s);
    let (s, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(90)));
    assert_eq!(rec.entries, entries(91, 105));
    assert_eq!((s.first_index(), s.last_index()), (91, 105));
}

#[test]
fn snapshot_digest_is_checked_or_filled_in() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
    s.append(&entries(1, 5)).expect("append");
    let mut bad = snap(3);
    bad.digest = vec![0; 32];
    assert!(matches!(s.save_snapshot(&bad), Err(StorageError::Invalid(_))));
    let mut unset = snap(3);
    unset.digest.clear();
    s.save_snapshot(&unset).expect("snapshot");
    drop(s);
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(3)));
    assert_eq!(rec.entries, entries(4, 5));
}

#[test]
fn snapshot_ahead_of_log_resets_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
    s.append(&entries(1, 5)).expect("append");
    s.save_snapshot(&snap(9)).expect("snapshot");
    assert_eq!((s.first_index(), s.last_index()), (10, 9));
    s.append(&entries(10, 12)).expect("append");
    s.sync().expect("sync");
    drop(s);
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.entries, entries(10, 12));
}

#[test]
fn install_snapshot_discards_the_log() {
    let (tmp, mut s) = written(small_segments(), 50);
    s.save_snapshot(&snap(10)).expect("snapshot");
    // Install below the current last index: the divergent suffix goes too.
    s.install_snapshot(&snap(30)).expect("install");
    assert_eq!((s.first_index(), s.last_index()), (31, 30));
    assert_eq!(segment_files(tmp.path()), vec![31]);
    assert_eq!(snapshot_files(tmp.path()), vec![30]);
    assert!(!tmp.path().join(INSTALL_FILE).exists());
    assert!(matches!(
        s.append(&[entry(51, 1)]),
        Err(StorageError::NonContiguous { expected: 31, .. })
    ));
    let new: Vec<LogEntry> = (31..=33).map(|i| entry(i, 3)).collect();
    s.append(&new).expect("append");
    s.sync().expect("sync");
    drop(s);
    let (mut s, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(30)));
    assert_eq!(rec.entries, new);
    assert_eq!(
        s.read_earlier().expect("read"),
        None,
        "an install keeps no earlier state"
    );
    // Install far ahead.
    s.install_snapshot(&snap(500)).expect("install");
    drop(s);
    let (s, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(500)));
    assert!(rec.entries.is_empty());
    assert_eq!(s.last_index(), 500);
}

#[test]
fn interrupted_install_is_completed_or_rolled_back() {
    // Crash after marker + snapshot but before the log was deleted: redo on open.
    let (tmp, s) = written(opts(), 20);
    drop(s);
    let marker = encode_framed(INSTALL_MAGIC, &8u64.to_le_bytes());
    fs::write(tmp.path().join(INSTALL_FILE), &marker).expect("marker");
    fs::write(tmp.path().join(snapshot::file_name(8)), snapshot::encode(&snap(8))).expect("snapshot");
    let (s, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(8)));
    assert!(rec.entries.is_empty(), "{:?}", indexes(&rec.entries));
    assert_eq!(s.last_index(), 8);
    assert!(!tmp.path().join(INSTALL_FILE).exists());
    drop(s);

    // Crash after the marker but before the snapshot was written: keep the log.
    let (tmp, s) = written(opts(), 20);
    drop(s);
    let marker = encode_framed(INSTALL_MAGIC, &30u64.to_le_bytes());
    fs::write(tmp.path().join(INSTALL_FILE), &marker).expect("marker");
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.entries, entries(1, 20));
    assert!(!tmp.path().join(INSTALL_FILE).exists());
}

#[test]
fn corrupt_newest_snapshot_falls_back_to_older() {
    let (tmp, mut s) = written(small_segments(), 100);
    s.save_snapshot(&snap(40)).expect("snapshot");
    s.save_snapshot(&snap(80)).expect("snapshot");
    drop(s);
    let newest = tmp.path().join(snapshot::file_name(80));
    let len = fs::metadata(&newest).expect("meta").len();
    flip_byte(&newest, len - 3);
    let (s, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(40)));
    assert_eq!(rec.entries, entries(41, 100));
    assert_eq!(s.first_index(), 41);
}

#[test]
fn snapshot_with_wrong_digest_falls_back() {
    // Checksummed frame intact but the digest does not match the data.
    let (tmp, mut s) = written(opts(), 10);
    s.save_snapshot(&snap(4)).expect("snapshot");
    drop(s);
    let mut lying = snap(7);
    lying.digest = vec![1; 32];
    fs::write(tmp.path().join(snapshot::file_name(7)), snapshot::encode(&lying)).expect("write");
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(4)));
    assert_eq!(rec.entries, entries(5, 10));
}

#[test]
fn lock_prevents_a_second_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (s, _) = Storage::open(tmp.path(), opts()).expect("open");
    match Storage::open(tmp.path(), opts()) {
        Err(StorageError::Locked { path }) => assert_eq!(path, tmp.path().join(LOCK_FILE)),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("second open succeeded"),
    }
    drop(s);
    Storage::open(tmp.path(), opts()).expect("open after release");
}

#[test]
fn no_fsync_mode_round_trips() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = StorageOptions {
        fsync: false,
        segment_bytes: 512,
        ..Default::default()
    };
    let (mut s, _) = Storage::open(tmp.path(), o.clone()).expect("open");
    s.append(&entries(1, 50)).expect("append");
    s.sync().expect("sync");
    s.save_snapshot(&snap(20)).expect("snapshot");
    drop(s);
    let (_, rec) = Storage::open(tmp.path(), o).expect("reopen");
    assert_eq!(rec.entries, entries(21, 50));
}

#[test]
fn appended_data_reaches_the_file_on_sync() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, _) = Storage::open(tmp.path(), opts()).expect("open");
    let seg = tmp.path().join(LOG_DIR).join(wal::file_name(1));
    s.append(&entries(1, 3)).expect("append");
    assert_eq!(records_end(&seg), 0, "append is buffered");
    s.sync().expect("sync");
    assert_eq!(records_end(&seg), s.active().size);
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Append(u8),
        Sync,
        /// Truncate after a point chosen between the snapshot and the last index.
        Truncate(u8),
        Snapshot(u8),
        Install(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u8..20).prop_map(Op::Append),
            2 => Just(Op::Sync),
            2 => any::<u8>().prop_map(Op::Truncate),
            2 => any::<u8>().prop_map(Op::Snapshot),
            1 => (0u8..30).prop_map(Op::Install),
            2 => Just(Op::Reopen),
        ]
    }

    #[derive(Default)]
    struct Model {
        snapshot: Option<Snapshot>,
        entries: Vec<LogEntry>,
        epoch: u64,
    }

    impl Model {
        fn snap_index(&self) -> u64 {
            self.snapshot.as_ref().map_or(0, |s| s.index)
        }
        fn last(&self) -> u64 {
            self.entries.last().map_or(self.snap_index(), |e| e.index)
        }
        fn pick(&self, r: u8) -> u64 {
            let lo = self.snap_index();
            let span = self.last() - lo + 1;
            lo + u64::from(r) % span
        }
    }

    fn check(s: &Storage, m: &Model) -> Result<(), TestCaseError> {
        prop_assert_eq!(s.last_index(), m.last());
        prop_assert_eq!(s.first_index(), m.snap_index() + 1);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_operations_match_model(ops in proptest::collection::vec(op(), 1..60)) {
            let tmp = tempfile::tempdir().expect("tempdir");
            let o = StorageOptions { fsync: false, segment_bytes: 300, preallocate_bytes: 100 };
            let (mut s, rec) = Storage::open(tmp.path(), o.clone()).expect("open");
            prop_assert_eq!(rec, Recovered::default());
            let mut m = Model::default();
            for op in ops {
                match op {
                    Op::Append(n) => {
                        m.epoch += 1;
                        let from = m.last() + 1;
                        let batch: Vec<LogEntry> =
                            (from..from + u64::from(n)).map(|i| entry(i, m.epoch)).collect();
                        s.append(&batch).expect("append");
                        m.entries.extend(batch);
                    }
                    Op::Sync => s.sync().expect("sync"),
                    Op::Truncate(r) => {
                        let at = m.pick(r);
                        s.truncate_after(at).expect("truncate");
                        m.entries.retain(|e| e.index <= at);
                    }
                    Op::Snapshot(r) => {
                        let at = m.pick(r);
                        s.sync().expect("sync");
                        s.save_snapshot(&snap(at)).expect("snapshot");
                        m.entries.retain(|e| e.index > at);
                        m.snapshot = Some(snap(at));
                    }
                    Op::Install(ahead) => {
                        let at = m.pick(ahead) + u64::from(ahead % 3) * u64::from(ahead);
                        s.install_snapshot(&snap(at)).expect("install");
                        m.entries.clear();
                        m.snapshot = Some(snap(at));
                    }
                    Op::Reopen => {
                        drop(s);
                        let (s2, rec) = Storage::open(tmp.path(), o.clone()).expect("reopen");
                        s = s2;
                        prop_assert_eq!(&rec.snapshot, &m.snapshot);
                        prop_assert_eq!(indexes(&rec.entries), indexes(&m.entries));
                        prop_assert_eq!(&rec.entries, &m.entries);
                    }
                }
                check(&s, &m)?;
            }
            s.sync().expect("sync");
            drop(s);
            let (s, rec) = Storage::open(tmp.path(), o).expect("final reopen");
            prop_assert_eq!(&rec.snapshot, &m.snapshot);
            prop_assert_eq!(&rec.entries, &m.entries);
            check(&s, &m)?;
            // Compaction bounds the on-disk log: at most two snapshot files.
            prop_assert!(snapshot_files(tmp.path()).len() <= 2);
        }
    }
}

mod torn {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Crash mid-batch: the last (unsynced) batch's bytes from an arbitrary one on are
        /// lost, the file either cut there (a file grown by appends) or zeros from there on
        /// (records written into reserved space), optionally followed by junk where the
        /// write stopped. Recovery returns exactly the complete records.
        #[test]
        fn cut_batches_recover_the_complete_prefix(
            rounds in proptest::collection::vec(
                (
                    1u64..12,
                    any::<u16>(),
                    any::<bool>(),
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                ),
                1..8,
            )
        ) {
            let tmp = tempfile::tempdir().expect("tempdir");
            let o = StorageOptions { fsync: false, segment_bytes: 1 << 30, preallocate_bytes: 4096 };
            let mut want: Vec<LogEntry> = Vec::new();
            for (n, cut, in_reserved_space, junk) in rounds {
                let (mut s, rec) = Storage::open(tmp.path(), o.clone()).expect("open");
                prop_assert_eq!(&rec.entries, &want);
                let from = want.len() as u64 + 1;
                let batch: Vec<LogEntry> = (from..from + n).map(|i| entry(i, from)).collect();
                let synced = s.active().size;
                s.append(&batch).expect("append");
                s.sync().expect("sync");
                let seg = s.active();
                let (path, size, offsets) = (seg.path.clone(), seg.size, seg.offsets.clone());
                drop(s);
                let written = std::fs::read(&path).expect("read the segment");
                let cut_at = synced + u64::from(cut) % (size - synced + 1);
                let mut f = OpenOptions::new().write(true).open(&path).expect("open");
                if in_reserved_space {
                    f.seek(SeekFrom::Start(cut_at)).expect("seek");
                    f.write_all(&vec![0u8; (size - cut_at) as usize]).expect("zero");
                    f.seek(SeekFrom::Start(cut_at)).expect("seek");
                } else {
                    f.set_len(cut_at).expect("cut");
                    f.seek(SeekFrom::End(0)).expect("seek");
                }
                if let Some(junk) = junk {
                    f.write_all(&junk).expect("junk");
                }
                drop(f);
                // The records whose bytes are all still there survive: those that end at or
                // before the cut, and one the junk happens to complete byte for byte (a cut
                // of its last byte, followed by that byte).
                let left = std::fs::read(&path).expect("read the segment");
                let mut ends: Vec<u64> = offsets.iter().skip(1).copied().collect();
                ends.push(size);
                // The segment holds exactly `want` followed by `batch`.
                let before = want.len();
                for (k, e) in batch.into_iter().enumerate() {
                    let end = ends[before + k] as usize;
                    if left.get(..end) != Some(&written[..end]) {
                        break;
                    }
                    want.push(e);
                }
            }
            let (_, rec) = Storage::open(tmp.path(), o).expect("final open");
            prop_assert_eq!(rec.entries, want);
        }
    }
}

#[test]
fn appends_fill_reserved_space_across_reopens() {
    let o = StorageOptions {
        preallocate_bytes: 4096,
        ..opts()
    };
    let (tmp, s) = written(o.clone(), 10);
    let seg = tmp.path().join(LOG_DIR).join(wal::file_name(1));
    let (end, reserved) = (records_end(&seg), fs::metadata(&seg).expect("meta").len());
    assert!(
        end < reserved && reserved == 4096,
        "records end at {end}, file is {reserved} bytes"
    );
    drop(s);
    for round in 1..=3u64 {
        let (mut s, rec) = Storage::open(tmp.path(), o.clone()).expect("reopen");
        assert_eq!(rec.entries, entries(1, 10 * round));
        s.append(&entries(10 * round + 1, 10 * round + 10)).expect("append");
        s.sync().expect("sync");
    }
    let (_, rec) = Storage::open(tmp.path(), o).expect("reopen");
    assert_eq!(rec.entries, entries(1, 40));
    let len = fs::metadata(&seg).expect("meta").len();
    assert!(
        len % 4096 == 0 && len > records_end(&seg),
        "{len} bytes, records end at {}",
        records_end(&seg)
    );
}

#[test]
fn the_snapshot_before_the_newest_comes_back_with_the_log_from_it() {
    let (tmp, mut s) = written(small_segments(), 30);
    assert_eq!(s.read_earlier().expect("read"), None, "no snapshot yet");
    s.save_snapshot(&snap(10)).expect("snapshot");
    assert_eq!(s.read_earlier().expect("read"), None, "one snapshot only");
    s.save_snapshot(&snap(20)).expect("snapshot");
    s.save_snapshot(&snap(25)).expect("snapshot");
    drop(s);
    let (s, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    assert_eq!(rec.entries, entries(26, 30));
    let earlier = s
        .read_earlier()
        .expect("read")
        .expect("the fallback snapshot and its log");
    assert_eq!(earlier.snapshot, snap(20));
    assert_eq!(earlier.entries, entries(21, 25));
}

#[test]
fn an_install_below_the_newest_snapshot_rolls_back() {
    let (tmp, mut s) = written(small_segments(), 30);
    s.save_snapshot(&snap(10)).expect("snapshot");
    s.save_snapshot(&snap(25)).expect("snapshot");
    assert!(matches!(s.save_snapshot(&snap(20)), Err(StorageError::Invalid(_))));
    s.install_snapshot(&snap(20)).expect("install below the newest");
    assert_eq!((s.first_index(), s.last_index()), (21, 20));
    assert_eq!(
        snapshot_files(tmp.path()),
        vec![20],
        "no newer snapshot outlives the rollback"
    );
    s.append(&entries(21, 22)).expect("append");
    s.sync().expect("sync");
    drop(s);
    let (s, rec) = Storage::open(tmp.path(), small_segments()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(20)));
    assert_eq!(rec.entries, entries(21, 22));
    assert_eq!(s.read_earlier().expect("read"), None);
}

#[test]
fn a_rollback_interrupted_before_the_newer_snapshot_went_keeps_the_old_state() {
    let (tmp, mut s) = written(opts(), 30);
    s.save_snapshot(&snap(25)).expect("snapshot");
    drop(s);
    // The install wrote its marker and its snapshot, then the process died.
    let marker = encode_framed(INSTALL_MAGIC, &20u64.to_le_bytes());
    write_atomic(tmp.path(), INSTALL_FILE, &marker, true).expect("marker");
    write_atomic(tmp.path(), &snapshot::file_name(20), &snapshot::encode(&snap(20)), true).expect("snapshot");
    let (_, rec) = Storage::open(tmp.path(), opts()).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(25)));
    assert_eq!(rec.entries, entries(26, 30));
    assert!(!tmp.path().join(INSTALL_FILE).exists());
}
