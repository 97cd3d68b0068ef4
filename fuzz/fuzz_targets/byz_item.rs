//! The Byzantine item path on hostile bytes, without a network: decoding and pre-checking
//! (`prepare`), signature and relay-chain checks (`verify_prepared`), the ordering core
//! (`Core::offer`, `offer_open`, `tick`, which executes what becomes stable) and era changes
//! (`era_params`, `Core::start_era`), as the replica's Submit/Relay/StartEra handlers call
//! them. Replica `r0` of a three-replica era 1 (t = 1), clients `alice` and `bob`.
//!
//! Input: `[ops...]` (see `lockstep_fuzz::ops`), op % 5:
//! - 0: the bytes are a `SignedItem` a client submits;
//! - 1: the bytes are a `StreamItem` the harness signs as alice, bob or the master (op >> 3),
//!   so it gets past the signature check; op bit 7 adds relay signatures of r1 and r2;
//! - 2: the bytes are a `RelayBatch` from r1;
//! - 3: time passes (`u16` of the bytes × 100 µs) and the core ticks;
//! - 4: the bytes are an `Era` the master signed: checked, and started when valid.
//!
//! Checked: nothing panics; the applied index only grows, by the logged entries.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::{machine, u64_from};
use lockstep_proto::{self as pb, ChainSig, SignedItem, stream_item::Body as ItemBody};
use lockstep_replica::byz::order::{Core, EraParams, Precheck, Stability, Timing};
use lockstep_replica::byz::service::{OrderingArgs, era_params};
use lockstep_replica::byz::{chain_sig, prepare, verify_prepared};
use lockstep_replica::runtime::Runtime;
use prost::Message;
use std::collections::BTreeMap;

const DELAY_US: u64 = 1_000;
const SKEW_US: u64 = 500;

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

/// What the replica's `ingest` does with one item, minus the network.
fn ingest(core: &mut Core, signed: &SignedItem, chain: &[ChainSig], now: u64) {
    let Ok(p) = prepare(core, signed, now) else { return };
    if !matches!(p.check, Precheck::Verify { .. }) {
        return;
    }
    let Ok(valid) = verify_prepared(&p, signed, chain) else {
        return;
    };
    if matches!(p.item.body, Some(ItemBody::Open(_))) {
        let _ = core.offer_open(signed.clone(), &p.item, now);
        return;
    }
    let item = p.item.clone();
    let _ = core.offer(signed.clone(), item, valid, now);
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let stability = if selector & 1 == 0 {
        Stability::Lamport
    } else {
        Stability::Physical
    };
    let master = key(1);
    let clients = [("alice", key(2)), ("bob", key(3))];
    let replicas = [key(10), key(11), key(12)];
    let directory: BTreeMap<_, _> = clients
        .iter()
        .map(|(n, k)| (n.to_string(), k.verifying_key()))
        .collect();
    let members: Vec<_> = replicas
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("r{i}"), String::new(), k.verifying_key()))
        .collect();
    let timing = Timing {
        stability,
        t: 1,
        delay_us: DELAY_US,
        skew_us: SKEW_US,
    };
    let mut core = Core::new(
        "r0".into(),
        Runtime::new(machine(selector >> 1)),
        master.verifying_key(),
        directory,
    );
    core.start_era(
        EraParams {
            number: 1,
            start_index: 0,
            members,
            master_session: 7,
            timing,
        },
        None,
    );
    let mut now: u64 = 1_000_000;
    let mut logged = 0u64;
    for (op, bytes) in lockstep_fuzz::ops(rest) {
        now += 1;
        match op % 5 {
            0 => {
                let Ok(signed) = SignedItem::decode(bytes) else {
                    continue;
                };
                ingest(&mut core, &signed, &[], now);
            }
            1 => {
                let signer = match (op >> 3) % 3 {
                    0 => &clients[0].1,
                    1 => &clients[1].1,
                    _ => &master,
                };
                let signed = SignedItem {
                    item: bytes.to_vec(),
                    signature: lockstep_replica::byz::keys::sign(signer, bytes),
                };
                let chain = if op & 0x80 != 0 {
                    let era = core.era.as_ref().map_or(0, |e| e.number);
                    vec![
                        chain_sig("r1", &replicas[1], era, &signed),
                        chain_sig("r2", &replicas[2], era, &signed),
                    ]
                } else {
                    Vec::new()
                };
                ingest(&mut core, &signed, &chain, now);
            }
            2 => {
                let Ok(batch) = pb::RelayBatch::decode(bytes) else {
                    continue;
                };
                for r in batch.items {
                    if let Some(item) = r.item {
                        ingest(&mut core, &item, &r.chain, now);
                    }
                }
            }
            3 => {
                now = now.saturating_add(u64_from(&bytes[..bytes.len().min(2)]) * 100);
                let before = core.index;
                for effect in core.tick(now) {
                    if let lockstep_replica::byz::order::Effect::Log(e) = effect {
                        logged += 1;
                        assert!(e.index > before, "a logged entry moves the index forward");
                    }
                }
            }
            _ => {
                let Ok(era) = pb::Era::decode(bytes) else { continue };
                let ordering = OrderingArgs {
                    stability,
                    delay_us: era.max_delay_micros,
                    skew_us: era.max_skew_micros,
                };
                let Ok(params) = era_params(&era, &ordering) else {
                    continue;
                };
                if params.number > core.era.as_ref().map_or(0, |e| e.number) {
                    let resume = era.resume.then(|| era.machine.clone()).flatten();
                    for effect in core.start_era(params, resume) {
                        if let lockstep_replica::byz::order::Effect::Log(_) = effect {
                            logged += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(core.index, logged, "every applied index was logged once");
    }
});
