//! Byzantine mode (n = 2t + 1): Schneider's state machine approach with signed client
//! requests, relays with a delay bound (agreement), ordering by stability (Lamport or
//! physical clocks) and outputs voted by the clients. See `docs/byzantine.md`.
//!
//! - [`keys`]: key files and signatures;
//! - [`order`]: the sans-IO protocol core (agreement windows, stability, execution);
//! - [`service`]: the I/O shell (gRPC service, relays to peers, storage, eras);
//! - [`inject`]: test-only faults (cargo feature `fault-injection`).

pub mod inject;
pub mod keys;
pub mod order;

use ed25519_dalek::SigningKey;
use lockstep_proto::{ChainSig, SignedItem, StreamItem};
use prost::Message;

/// Sign an item as its owner.
pub fn sign_item(key: &SigningKey, item: &StreamItem) -> SignedItem {
    let bytes = item.encode_to_vec();
    SignedItem {
        signature: keys::sign(key, &bytes),
        item: bytes,
    }
}

/// A replica's relay signature on an item of `era`.
pub fn chain_sig(replica: &str, key: &SigningKey, era: u64, signed: &SignedItem) -> ChainSig {
    ChainSig {
        replica: replica.to_string(),
        signature: keys::sign(key, &keys::relay_message(era, &keys::sha256(&signed.item))),
    }
}

/// Local wall-clock time in microseconds (the `now` every core call takes).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An incoming item after the cheap checks done under the core's lock.
pub struct Prepared {
    pub item: StreamItem,
    pub check: order::Precheck,
    era: u64,
    self_id: String,
    members: Vec<(String, ed25519_dalek::VerifyingKey)>,
}

/// Decode `signed` and ask the core what verifying it takes (call with the lock held).
pub fn prepare(core: &order::Core, signed: &SignedItem, now: u64) -> Result<Prepared, String> {
    let item = StreamItem::decode(signed.item.as_slice()).map_err(|e| format!("undecodable item: {e}"))?;
    let d = keys::sha256(&signed.item);
    let check = core.precheck(&item, &d, now);
    let (era, members) = core.era.as_ref().map_or((0, Vec::new()), |e| {
        (e.number, e.members.iter().map(|(id, _, k)| (id.clone(), *k)).collect())
    });
    Ok(Prepared {
        item,
        check,
        era,
        self_id: core.id.clone(),
        members,
    })
}

/// Verify the item's signature and keep the valid relay signatures (distinct members other
/// than this replica). Run without the lock: this is where the CPU goes.
pub fn verify_prepared(p: &Prepared, signed: &SignedItem, chain: &[ChainSig]) -> Result<Vec<ChainSig>, String> {
    let order::Precheck::Verify { key, need_chain } = &p.check else {
        return Ok(Vec::new());
    };
    if !keys::verify(key, &signed.item, &signed.signature) {
        return Err(format!("bad signature on an item of '{}'", p.item.identity));
    }
    let mut valid: Vec<ChainSig> = Vec::new();
    if *need_chain {
        let msg = keys::relay_message(p.era, &keys::sha256(&signed.item));
        for c in chain {
            if c.replica == p.self_id || valid.iter().any(|v| v.replica == c.replica) {
                continue;
            }
            let Some((_, k)) = p.members.iter().find(|(id, _)| *id == c.replica) else {
                continue;
            };
            if keys::verify(k, &msg, &c.signature) {
                valid.push(c.clone());
            }
        }
    } else {
        // Keep the chain as it came (it is only forwarded, never counted, unless verified).
        valid = Vec::new();
    }
    Ok(valid)
}
