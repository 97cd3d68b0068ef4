//! Peer and replication messages (prost) on hostile bytes, fed to the code that acts on them
//! without a network: the fail-stop protocol core (`Node::handle_append`,
//! `Node::handle_install`, `Node::reconfigure`, `Node::on_peer_response`) and the Byzantine
//! era check (`era_params`). Every other message of the protocol is decoded and re-encoded.
//!
//! Input: `[machine][ops...]` (see `lockstep_fuzz::ops`), sent in order to backup `b` and
//! primary `a` of epoch 1. Op bit 3 makes the harness fill in what a fuzzer cannot guess
//! (the machine identity, the snapshot digest), so the bytes get past those checks.
//!
//! Checked: nothing panics; a node never commits past its log nor applies past its commit
//! index; a decoded message re-encodes to one that decodes equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::{machine, sha256, u64_from};
use lockstep_proto as pb;
use lockstep_replica::byz::order::Stability;
use lockstep_replica::byz::service::{OrderingArgs, era_params};
use lockstep_replica::node::{Node, PeerMessage};
use lockstep_replica::runtime::Runtime;
use prost::Message;

fn config(epoch: u64) -> pb::Configuration {
    let member = |id: &str| pb::Member {
        id: id.into(),
        endpoint: format!("http://{id}"),
        role: pb::MemberRole::Voter as i32,
    };
    pb::Configuration {
        epoch,
        primary_id: "a".into(),
        members: vec![member("a"), member("b")],
    }
}

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again, m, "decode -> encode -> decode changed the message");
    Some(m)
}

fn check(node: &Node) {
    assert!(
        node.commit_index <= node.last_index(),
        "{}: commit index {} past the log's end {}",
        node.id,
        node.commit_index,
        node.last_index()
    );
    assert!(
        node.applied_index <= node.commit_index,
        "{}: applied past the commit index",
        node.id
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (tx, _rx) = tokio::sync::broadcast::channel(1024);
    let mut a = Node::new("a".into(), Runtime::new(machine(selector)), 4, false);
    let mut b = Node::new("b".into(), Runtime::new(machine(selector)), 4, false);
    a.reconfigure(config(1)).expect("primary a");
    b.reconfigure(config(1)).expect("backup b");
    let fill = |op: u8| op & 8 != 0;
    for (op, bytes) in lockstep_fuzz::ops(rest) {
        match op % 8 {
            0 => {
                let Some(mut req) = round_trip::<pb::AppendRequest>(bytes) else {
                    continue;
                };
                if fill(op) {
                    req.machine = Some(b.identity.clone());
                    req.primary_id = "a".into();
                }
                let (_resp, ops) = b.handle_append(req);
                if !ops.is_empty() {
                    b.on_durable(b.last_index());
                }
                b.apply_committed(&tx);
            }
            1 => {
                let Some(mut req) = round_trip::<pb::InstallSnapshotRequest>(bytes) else {
                    continue;
                };
                if fill(op)
                    && let Some(s) = req.snapshot.as_mut()
                {
                    s.digest = sha256(&s.data);
                }
                let _ = b.handle_install(req);
                b.apply_committed(&tx);
            }
            2 => {
                let Some(c) = round_trip::<pb::Configuration>(bytes) else {
                    continue;
                };
                let target = if op & 16 != 0 { &mut a } else { &mut b };
                let _ = target.reconfigure(c);
            }
            3 => {
                let Some(resp) = round_trip::<pb::AppendResponse>(bytes) else {
                    continue;
                };
                let epoch = if fill(op) { a.epoch } else { u64::from(op >> 4) };
                a.on_peer_response("b", epoch, 0, &resp);
                a.apply_committed(&tx);
            }
            4 => {
                // The primary proposes a command; its next message goes to b as-is.
                let (reply, _answer) = tokio::sync::oneshot::channel();
                let cmd = pb::Command {
                    client_id: "c".into(),
                    sequence: u64_from(bytes).max(1),
                    payload: bytes.to_vec(),
                };
                if a.propose(cmd, reply).is_ok() {
                    a.on_durable(a.last_index());
                }
                if let Some(msg) = a.next_message("b", true) {
                    let resp = match msg {
                        PeerMessage::Append(req, _) => b.handle_append(req).0,
                        PeerMessage::Snapshot(req) => b.handle_install(req).0,
                    };
                    b.on_durable(b.last_index());
                    a.on_peer_response("b", a.epoch, 0, &resp);
                }
                a.apply_committed(&tx);
                b.apply_committed(&tx);
            }
            5 => {
                let Some(signed) = round_trip::<pb::SignedEra>(bytes) else {
                    continue;
                };
                let era = if fill(op) {
                    round_trip::<pb::Era>(bytes)
                } else {
                    round_trip::<pb::Era>(&signed.era)
                };
                if let Some(era) = era {
                    let ordering = OrderingArgs {
                        stability: if op & 16 != 0 {
                            Stability::Physical
                        } else {
                            Stability::Lamport
                        },
                        delay_us: era.max_delay_micros,
                        skew_us: era.max_skew_micros,
                    };
                    if let Ok(params) = era_params(&era, &ordering) {
                        assert_eq!(params.members.len(), era.members.len());
                    }
                }
            }
            6 => {
                if let Some(req) = round_trip::<pb::ExecuteRequest>(bytes)
                    && let Some(cmd) = req.command
                {
                    let rt = Runtime::new(machine(selector));
                    let _ = rt.validate(&cmd);
                }
                let _ = round_trip::<pb::ReadRequest>(bytes);
                let _ = round_trip::<pb::WatchRequest>(bytes);
                let _ = round_trip::<pb::SessionRequest>(bytes);
                let _ = round_trip::<pb::SessionResponse>(bytes);
                if let Some(e) = round_trip::<pb::SessionError>(bytes) {
                    // Any code and metadata from the wire map to a Status without a panic.
                    let _ = e.into_status();
                }
            }
            _ => {
                let _ = round_trip::<pb::ReplicateRequest>(bytes);
                let _ = round_trip::<pb::RelayBatch>(bytes);
                let _ = round_trip::<pb::SignedItem>(bytes);
                let _ = round_trip::<pb::StreamItem>(bytes);
                let _ = round_trip::<pb::ReplyBody>(bytes);
                let _ = round_trip::<pb::SignedReply>(bytes);
                let _ = round_trip::<pb::SignedApplied>(bytes);
                let _ = round_trip::<pb::AppliedEntry>(bytes);
                let _ = round_trip::<pb::FetchSnapshotRequest>(bytes);
                let _ = round_trip::<pb::StatusResponse>(bytes);
                let _ = round_trip::<pb::ByzStatus>(bytes);
                let _ = round_trip::<pb::LogEntry>(bytes);
                let _ = round_trip::<pb::Snapshot>(bytes);
            }
        }
        check(&a);
        check(&b);
    }
});
