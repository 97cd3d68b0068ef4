//! Protocol-core tests: `Node`s driven by hand, no I/O. Messages are passed between nodes
//! explicitly, so each test sets up exactly the interleaving it is about.
use super::*;
use crate::machine::kv::Kv;
use lockstep_proto::Member;

fn node(id: &str) -> Node {
    Node::new(id.into(), Runtime::new(Box::new(Kv::default())), 10_000, true)
}

fn config(epoch: u64, primary: &str, voters: &[&str], learners: &[&str]) -> Configuration {
    let member = |id: &&str, role: MemberRole| Member {
        id: id.to_string(),
        endpoint: format!("http://{id}"),
        role: role as i32,
    };
    Configuration {
        epoch,
        primary_id: primary.into(),
        members: voters
            .iter()
            .map(|v| member(v, MemberRole::Voter))
            .chain(learners.iter().map(|l| member(l, MemberRole::Learner)))
            .collect(),
    }
}

fn put(client: &str, seq: u64, key: &str, value: &str) -> Command {
    Command {
        client_id: client.into(),
        sequence: seq,
        payload: serde_json::json!({"op": "put", "key": key, "value": value})
            .to_string()
            .into_bytes(),
    }
}

fn append_for(primary: &mut Node, peer: &str) -> AppendRequest {
    match primary.next_message(peer, true) {
        Some(PeerMessage::Append(req, _)) => req,
        Some(PeerMessage::Snapshot(_)) => panic!("expected an append, got a snapshot"),
        None => panic!("nothing to send"),
    }
}

/// Primary `a`, backup `b`, epoch 1.
fn pair() -> (Node, Node, broadcast::Sender<AppliedEntry>) {
    let (tx, _) = broadcast::channel(1024);
    let mut a = node("a");
    let mut b = node("b");
    a.reconfigure(config(1, "a", &["a", "b"], &[])).unwrap();
    b.reconfigure(config(1, "a", &["a", "b"], &[])).unwrap();
    (a, b, tx)
}

/// Primary `a`, backups `b` and `c` (t = 2), epoch 1.
fn trio() -> (Node, Node, Node, broadcast::Sender<AppliedEntry>) {
    let (tx, _) = broadcast::channel(1024);
    let epoch1 = config(1, "a", &["a", "b", "c"], &[]);
    let (mut a, mut b, mut c) = (node("a"), node("b"), node("c"));
    for n in [&mut a, &mut b, &mut c] {
        n.reconfigure(epoch1.clone()).unwrap();
    }
    (a, b, c, tx)
}

#[test]
fn a_write_commits_only_when_every_voter_holds_it() {
    let (mut a, mut b, tx) = pair();
    let (reply, mut rx) = oneshot::channel();
    let entries = a.propose(put("c", 1, "k", "v"), reply).unwrap();
    assert_eq!(entries.len(), 1);
    a.on_durable(1);
    a.apply_committed(&tx);
    assert_eq!(a.commit_index, 0, "the primary alone does not commit");
    assert!(rx.try_recv().is_err());

    let req = append_for(&mut a, "b");
    let (resp, ops) = b.handle_append(req);
    assert!(resp.success && resp.match_index == 1);
    assert!(matches!(ops.as_slice(), [StorageOp::Append(e)] if e.len() == 1));
    a.on_peer_response("b", 1, 0, &resp);
    a.apply_committed(&tx);
    assert_eq!(a.commit_index, 1);
    let (index, output) = rx.try_recv().expect("answered").expect("ok");
    assert_eq!(index, 1);
    assert_eq!(output, br#"{"previous":null}"#);

    // The backup applies once it hears the commit index.
    let req = append_for(&mut a, "b");
    b.handle_append(req);
    b.apply_committed(&tx);
    assert_eq!(b.applied_index, 1);
}

#[test]
fn entries_held_before_a_refused_one_are_queued_for_the_disk() {
    let (mut a, mut b, _tx) = pair();
    for seq in 1..=3 {
        let (reply, _rx) = oneshot::channel();
        a.propose(put("c", seq, "k", "v"), reply).unwrap();
    }
    let full = append_for(&mut a, "b");
    let mut req = full.clone();
    req.entries.remove(1); // 1, 3: not contiguous
    let (resp, ops) = b.handle_append(req);
    assert!(!resp.success);
    assert_eq!(resp.hint_index, 2, "resend from the gap");
    assert_eq!(b.last_index(), 1, "entry 1 is held");
    assert!(
        matches!(ops.as_slice(), [StorageOp::Append(e)] if e.len() == 1 && e[0].index == 1),
        "entry 1 is queued for the disk too"
    );
    // The resend finds entry 1 held and acknowledges all three, queueing the other two.
    let (resp, ops) = b.handle_append(full);
    assert!(resp.success && resp.match_index == 3);
    assert!(matches!(ops.as_slice(), [StorageOp::Append(e)] if e.len() == 2 && e[0].index == 2));
}

#[test]
fn durability_of_the_primary_counts_too() {
    let (mut a, mut b, tx) = pair();
    let (reply, _rx) = oneshot::channel();
    a.propose(put("c", 1, "k", "v"), reply).unwrap();
    let (resp, _) = b.handle_append(append_for(&mut a, "b"));
    a.on_peer_response("b", 1, 0, &resp);
    a.apply_committed(&tx);
    assert_eq!(a.commit_index, 0, "not durable on the primary yet");
    a.on_durable(1);
    assert_eq!(a.commit_index, 1);
}

#[test]
fn a_primary_that_sees_a_newer_epoch_is_fenced_and_fails_pending_commands_as_unknown() {
    let (mut a, mut b, _tx) = pair();
    let (reply, mut rx) = oneshot::channel();
    a.propose(put("c", 1, "k", "v"), reply).unwrap();
    // The master moved on without a: b is primary of epoch 2.
    b.reconfigure(config(2, "b", &["b"], &[])).unwrap();
    let (resp, _) = b.handle_append(append_for(&mut a, "b"));
    assert!(!resp.success);
    assert_eq!(resp.epoch, 2);
    a.on_peer_response("b", 1, 0, &resp);
    assert_eq!(a.role, Role::Fenced);
    let err = rx.try_recv().expect("answered").expect_err("failed");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("outcome unknown"));
    // It refuses new commands and reads, naming the newer epoch.
    let (reply, _) = oneshot::channel();
    let err = a.propose(put("c", 2, "k", "w"), reply).expect_err("fenced");
    assert!(err.message().contains("superseded by epoch 2"), "{}", err.message());
    let (reply, mut rx) = oneshot::channel();
    a.read(br#"{"op":"get","key":"k"}"#.to_vec(), reply);
    assert_eq!(
        rx.try_recv().expect("answered").expect_err("fenced").code(),
        Code::FailedPrecondition
    );
    // The master can still make it primary again with a newer configuration.
    a.reconfigure(config(3, "a", &["a", "b"], &[])).unwrap();
    assert_eq!(a.role, Role::Primary);
}

#[test]
fn a_read_waits_for_every_voter_to_confirm_the_epoch() {
    let (mut a, mut b, tx) = pair();
    // A message sent BEFORE the read arrives...
    let Some(PeerMessage::Append(early, early_round)) = a.next_message("b", true) else {
        panic!("heartbeat")
    };
    let (reply, mut rx) = oneshot::channel();
    a.read(br#"{"op":"get","key":"k"}"#.to_vec(), reply);
    assert!(rx.try_recv().is_err(), "no read before the backup confirms");
    // ...does not confirm it when its answer comes back.
    let (resp, _) = b.handle_append(early);
    a.on_peer_response("b", 1, early_round, &resp);
    a.apply_committed(&tx);
    assert!(rx.try_recv().is_err());
    let Some(PeerMessage::Append(req, round)) = a.next_message("b", false) else {
        panic!("a read needs a round")
    };
    assert_eq!(round, 1);
    let (resp, _) = b.handle_append(req);
    a.on_peer_response("b", 1, round, &resp);
    let out = rx.try_recv().expect("answered").expect("ok");
    assert_eq!(out.output, br#"{"value":null}"#);
}

#[test]
fn one_read_round_in_flight_serves_every_read_that_came_meanwhile() {
    let (mut a, mut b, tx) = pair();
    let get = || br#"{"op":"get","key":"k"}"#.to_vec();
    let (first, mut first_rx) = oneshot::channel();
    a.read(get(), first);
    let Some(PeerMessage::Append(req, round)) = a.next_message("b", false) else {
        panic!("the first read starts a round")
    };
    // Three more reads while that round is out: no message for each of them.
    let mut later: Vec<_> = (0..3)
        .map(|_| {
            let (reply, rx) = oneshot::channel();
            a.read(get(), reply);
            rx
        })
        .collect();
    assert!(a.next_message("b", false).is_none(), "one round in flight at a time");
    let (resp, _) = b.handle_append(req);
    a.on_peer_response("b", 1, round, &resp);
    a.apply_committed(&tx);
    first_rx.try_recv().expect("answered").expect("ok");
    assert!(
        later.iter_mut().all(|rx| rx.try_recv().is_err()),
        "they arrived after it left"
    );
    // The next round, sent once the first is answered, serves all three.
    let Some(PeerMessage::Append(req, next)) = a.next_message("b", false) else {
        panic!("the waiting reads need the next round")
    };
    assert_eq!(next, round + 3);
    let (resp, _) = b.handle_append(req);
    a.on_peer_response("b", 1, next, &resp);
    for mut rx in later {
        rx.try_recv().expect("answered").expect("ok");
    }
}

#[test]
fn a_backup_refuses_lower_epochs_other_primaries_and_other_machines() {
    let (mut a, mut b, _tx) = pair();
    let mut req = append_for(&mut a, "b");
    b.reconfigure(config(2, "b", &["b"], &[])).unwrap();
    let (resp, _) = b.handle_append(req.clone());
    assert!(!resp.success && resp.error.contains("stale epoch"));

    let mut c = node("c");
    c.reconfigure(config(1, "a", &["a", "c"], &[])).unwrap();
    req.primary_id = "intruder".into();
    assert!(!c.handle_append(req.clone()).0.success);
    req.primary_id = "a".into();
    req.machine = Some(MachineIdentity {
        name: "kv".into(),
        version: "9.9.9".into(),
        digest: "x".into(),
    });
    let (resp, _) = c.handle_append(req);
    assert!(resp.error.contains("machine mismatch"), "{}", resp.error);
}

#[test]
fn a_diverged_suffix_is_truncated_back_to_the_commit_index() {
    let (mut a, mut b, tx) = pair();
    // Entry 1 committed everywhere.
    let (r1, _) = oneshot::channel();
    a.propose(put("c", 1, "k", "1"), r1).unwrap();
    a.on_durable(1);
    let (resp, _) = b.handle_append(append_for(&mut a, "b"));
    a.on_peer_response("b", 1, 0, &resp);
    a.apply_committed(&tx);
    b.handle_append(append_for(&mut a, "b"));
    b.apply_committed(&tx);
    assert_eq!(b.commit_index, 1);
    // a appends entry 2 (epoch 1) and b receives it, but it never commits.
    let (r2, _) = oneshot::channel();
    a.propose(put("c", 2, "k", "old"), r2).unwrap();
    b.handle_append(append_for(&mut a, "b"));
    assert_eq!(b.last_index(), 2);

    // New epoch: c (which only has entry 1) becomes primary, b its backup.
    let mut c = node("c");
    c.reconfigure(config(1, "a", &["a", "b", "c"], &[])).unwrap();
    let catch_up = AppendRequest {
        epoch: 1,
        primary_id: "a".into(),
        prev_index: 0,
        prev_epoch: 0,
        entries: vec![a.entry(1).cloned().expect("entry 1")],
        commit_index: 1,
        machine: Some(a.identity.clone()),
        config: Some(config(1, "a", &["a", "b", "c"], &[])),
    };
    assert!(c.handle_append(catch_up).0.success);
    assert_eq!(c.last_index(), 1);
    let new = config(2, "c", &["b", "c"], &[]);
    c.reconfigure(new.clone()).unwrap();
    b.reconfigure(new).unwrap();
    let (r3, _) = oneshot::channel();
    c.propose(put("d", 1, "k", "new"), r3).unwrap();
    // c first sends (prev = 1, entries [2@epoch2]); b's entry 2 is from epoch 1: conflict.
    let (resp, _) = b.handle_append(append_for(&mut c, "b"));
    assert!(resp.success, "{}", resp.error);
    assert_eq!(b.last_index(), 2);
    assert_eq!(b.epoch_at(2), Some(2), "the old uncommitted entry was replaced");
}

#[test]
fn a_mismatched_append_drops_nothing_the_old_primary_may_have_committed() {
    let (mut a, mut b, mut c, tx) = trio();
    // a commits 1 and 2 (every voter holds them; b and c never hear the commit index).
    for seq in 1..=2 {
        let (reply, _rx) = oneshot::channel();
        a.propose(put("c", seq, "k", "v"), reply).unwrap();
    }
    a.on_durable(2);
    for (id, peer) in [("b", &mut b), ("c", &mut c)] {
        let (resp, _) = peer.handle_append(append_for(&mut a, id));
        a.on_peer_response(id, 1, 0, &resp);
    }
    a.apply_committed(&tx);
    assert_eq!(a.commit_index, 2);
    // a's entries 3 and 4 reach c only, then a fails.
    for seq in 3..=4 {
        let (reply, _rx) = oneshot::channel();
        a.propose(put("c", seq, "k", "v"), reply).unwrap();
    }
    let mut late = append_for(&mut a, "c");
    late.commit_index = 0; // as if sent before a counted the acknowledgements
    assert!(c.handle_append(late).0.success);
    assert_eq!((c.last_index(), c.commit_index), (4, 0));

    // b becomes primary and writes 3..=6; its second Append (prev 4 from epoch 2) reaches c
    // before its first.
    let two = config(2, "b", &["b", "c"], &[]);
    b.reconfigure(two.clone()).unwrap();
    c.reconfigure(two).unwrap();
    for seq in 1..=2 {
        let (reply, _rx) = oneshot::channel();
        b.propose(put("d", seq, "k", "w"), reply).unwrap();
    }
    let first = append_for(&mut b, "c");
    for seq in 3..=4 {
        let (reply, _rx) = oneshot::channel();
        b.propose(put("d", seq, "k", "w"), reply).unwrap();
    }
    let second = append_for(&mut b, "c");
    assert_eq!(second.prev_index, 4);
    let (resp, ops) = c.handle_append(second);
    assert!(!resp.success);
    assert!(ops.is_empty(), "nothing truncated");
    assert_eq!(c.last_index(), 4);
    // b fails before resending: c, the last voter, still holds what a committed.
    for i in 1..=2 {
        assert_eq!(c.epoch_at(i), Some(1), "committed entry {i} kept");
    }
    // The earlier Append replaces only the entries a never committed.
    let (resp, _) = c.handle_append(first);
    assert!(resp.success, "{}", resp.error);
    assert_eq!(
        (1..=4).map(|i| c.epoch_at(i)).collect::<Vec<_>>(),
        [Some(1), Some(1), Some(2), Some(2)]
    );
}

#[test]
fn learners_are_not_in_the_write_set_and_get_a_snapshot_when_the_log_is_compacted() {
    let (tx, _) = broadcast::channel(1024);
    let mut a = Node::new("a".into(), Runtime::new(Box::new(Kv::default())), 3, true);
    a.reconfigure(config(1, "a", &["a"], &[])).unwrap();
    for i in 1..=5 {
        let (r, _) = oneshot::channel();
        a.propose(put("c", i, "k", &i.to_string()), r).unwrap();
    }
    a.on_durable(5);
    a.apply_committed(&tx);
    assert_eq!(a.applied_index, 5, "a single voter commits alone");
    a.reconfigure(config(2, "a", &["a"], &["l"])).unwrap();
    let (r, _) = oneshot::channel();
    a.propose(put("c", 6, "k", "6"), r).unwrap();
    a.on_durable(6);
    a.apply_committed(&tx);
    assert_eq!(a.commit_index, 6, "the learner does not hold back commits");

    // Force compaction below what the learner has (nothing), then state transfer.
    a.log_start = 4;
    a.log.drain(..3);
    let mut l = node("l");
    // The learner has nothing: it asks for entries from index 1, which are compacted away.
    let (resp, _) = l.handle_append(append_for(&mut a, "l"));
    assert!(!resp.success && resp.hint_index == 1, "{resp:?}");
    a.on_peer_response("l", 2, 0, &resp);
    let Some(PeerMessage::Snapshot(req)) = a.next_message("l", true) else {
        panic!("expected a snapshot")
    };
    let (resp, ops) = l.handle_install(req);
    assert!(resp.success, "{}", resp.error);
    assert!(matches!(ops.last(), Some(StorageOp::Install(_))));
    assert_eq!(l.role, Role::Learner);
    a.on_peer_response("l", 2, 0, &resp);
    let (resp, _) = l.handle_append(append_for(&mut a, "l"));
    assert!(resp.success && resp.match_index == 6, "{resp:?}");
    l.apply_committed(&tx);
    assert_eq!(l.applied_index, 6);
    assert_eq!(
        l.runtime.query(br#"{"op":"get","key":"k"}"#).unwrap(),
        br#"{"value":"6"}"#
    );
}

#[test]
fn reconfigure_refuses_stale_and_conflicting_configurations() {
    let (mut a, _b, _tx) = pair();
    assert!(
        a.reconfigure(config(1, "a", &["a", "b"], &[])).unwrap().is_none(),
        "same config: idempotent"
    );
    assert!(
        a.reconfigure(config(1, "b", &["a", "b"], &[])).is_err(),
        "same epoch, different config"
    );
    a.reconfigure(config(5, "a", &["a"], &[])).unwrap();
    let err = a.reconfigure(config(4, "a", &["a"], &[])).unwrap_err();
    assert!(err.message().contains("stale configuration"));
    let err = a.reconfigure(config(6, "x", &["a"], &["x"])).unwrap_err();
    assert!(err.message().contains("not a voter"));
}

/// Writes `k = v` through `a` to both replicas and acknowledges it, without `b` hearing the
/// commit index.
fn acknowledged_write_b_has_not_seen_committed(a: &mut Node, b: &mut Node, tx: &broadcast::Sender<AppliedEntry>) {
    let (reply, mut rx) = oneshot::channel();
    a.propose(put("c", 1, "k", "v"), reply).unwrap();
    a.on_durable(1);
    let (resp, _) = b.handle_append(append_for(a, "b"));
    b.on_durable(1);
    a.on_peer_response("b", 1, 0, &resp);
    a.apply_committed(tx);
    rx.try_recv().expect("acknowledged").expect("ok");
    assert_eq!(b.commit_index, 0, "b has not heard the commit index yet");
}

fn get_k(n: &mut Node) -> oneshot::Receiver<Result<ReadResponse, Status>> {
    let (reply, rx) = oneshot::channel();
    n.read(br#"{"op":"get","key":"k"}"#.to_vec(), reply);
    rx
}

#[test]
fn a_new_primary_reads_only_after_applying_what_it_inherited() {
    // t = 2: a primary, b and c backups; k = v is acknowledged, b and c never hear the commit.
    let (mut a, mut b, mut c, tx) = trio();
    let (reply, mut acked) = oneshot::channel();
    a.propose(put("c", 1, "k", "v"), reply).unwrap();
    a.on_durable(1);
    for (id, n) in [("b", &mut b), ("c", &mut c)] {
        let (resp, _) = n.handle_append(append_for(&mut a, id));
        n.on_durable(1);
        a.on_peer_response(id, 1, 0, &resp);
    }
    a.apply_committed(&tx);
    acked.try_recv().expect("acknowledged").expect("ok");
    assert_eq!((b.commit_index, c.commit_index), (0, 0));
    // a fails; epoch 2: b primary, c backup. A read confirmed by c's first answer...
    let epoch2 = config(2, "b", &["b", "c"], &[]);
    b.reconfigure(epoch2.clone()).unwrap();
    c.reconfigure(epoch2).unwrap();
    let mut rx = get_k(&mut b);
    let Some(PeerMessage::Append(req, round)) = b.next_message("c", true) else {
        panic!("a read needs a round")
    };
    let (resp, _) = c.handle_append(req);
    b.on_peer_response("c", 2, round, &resp);
    // ...is answered only from a state that holds the acknowledged write.
    assert!(
        rx.try_recv().is_err(),
        "no read from a state without the acknowledged write"
    );
    b.apply_committed(&tx);
    let out = rx.try_recv().expect("answered").expect("ok");
    assert_eq!(out.output, br#"{"value":"v"}"#, "an acknowledged write must be visible");
}

#[test]
fn a_primary_restarted_from_disk_reads_only_after_recommitting_its_log() {
    let (mut a, mut b, tx) = pair();
    acknowledged_write_b_has_not_seen_committed(&mut a, &mut b, &tx);
    // Both restart from disk: the log is there, the commit index (not persisted) is 0.
    let log: Vec<LogEntry> = (1..=1).filter_map(|i| a.entry(i).cloned()).collect();
    let conf = config(1, "a", &["a", "b"], &[]);
    let mut a = node("a");
    a.recover(Some(conf.clone()), None, log.clone()).unwrap();
    let mut b = node("b");
    b.recover(Some(conf), None, log).unwrap();
    let mut rx = get_k(&mut a);
    // The read round alone (a heartbeat that does not yet carry a commit) is not enough...
    let Some(PeerMessage::Append(req, round)) = a.next_message("b", true) else {
        panic!("a read needs a round")
    };
    let (resp, _) = b.handle_append(req);
    a.on_peer_response("b", 1, round, &resp);
    assert!(
        rx.try_recv().is_err(),
        "no read from the empty state before the log is re-applied"
    );
    // ...the backup's match index commits the recovered entry; once applied, the read answers.
    a.apply_committed(&tx);
    let out = rx.try_recv().expect("answered").expect("ok");
    assert_eq!(out.output, br#"{"value":"v"}"#);
}

/// Large values: the watch buffer stays within its byte bound and snapshots come by bytes
/// applied, long before `snapshot_every` entries (10,000), so the in-memory log is bounded too.
#[test]
fn large_values_bound_the_watch_buffer_and_take_snapshots_by_bytes() {
    let (tx, _) = broadcast::channel(16);
    let mut a = node("a");
    a.reconfigure(config(1, "a", &["a"], &[])).unwrap();
    let value = "x".repeat(256 * 1024);
    let mut snapshots = 0;
    let writes = 400u64;
    for i in 1..=writes {
        let (reply, _rx) = oneshot::channel();
        a.propose(put("c", i, &format!("k{}", i % 10), &value), reply).unwrap();
        a.on_durable(a.last_index());
        snapshots += a
            .apply_committed(&tx)
            .iter()
            .filter(|op| matches!(op, StorageOp::Snapshot(_)))
            .count();
    }
    // 400 writes of 256 KiB (their outputs carry the previous value too): ~100 MiB of
    // entries applied, so at least one snapshot by bytes (64 MiB each).
    assert!(snapshots >= 1, "no snapshot after {writes} writes of 256 KiB");
    assert!(
        a.recent_bytes <= WATCH_REPLAY_BYTES,
        "watch buffer {} bytes",
        a.recent_bytes
    );
    assert!((a.recent.len() as u64) < writes / 2, "{} outputs kept", a.recent.len());
    assert_eq!(
        a.recent_bytes,
        a.recent.iter().map(|e| e.encoded_len()).sum::<usize>(),
        "the byte count follows what is kept"
    );
    assert!(
        (a.log.len() as u64) < writes,
        "the in-memory log was compacted ({} entries)",
        a.log.len()
    );
}
