//! Helpers shared by the integration tests: entry builders, a deterministic PRNG, a
//! simulator of linearizable executions and a brute-force reference checker.
#![allow(dead_code)]

use lockstep_linearizability::{HistoryEntry, OpKind, Outcome};
use serde_json::json;

fn s(v: Option<&str>) -> Option<String> {
    v.map(str::to_string)
}

fn entry(client: &str, op: OpKind, key: &str, call: u64, ret: u64) -> HistoryEntry {
    HistoryEntry {
        client: client.to_string(),
        op,
        key: key.to_string(),
        value: None,
        old: None,
        new: None,
        call,
        ret: Some(ret),
        result: Outcome::Ok,
        output: None,
    }
}

pub fn get(client: &str, key: &str, call: u64, ret: u64, value: Option<&str>) -> HistoryEntry {
    let mut e = entry(client, OpKind::Get, key, call, ret);
    e.output = Some(json!({ "value": value }));
    e
}

pub fn put(client: &str, key: &str, value: &str, call: u64, ret: u64, previous: Option<&str>) -> HistoryEntry {
    let mut e = entry(client, OpKind::Put, key, call, ret);
    e.value = Some(value.to_string());
    e.output = Some(json!({ "previous": previous }));
    e
}

pub fn del(client: &str, key: &str, call: u64, ret: u64, previous: Option<&str>) -> HistoryEntry {
    let mut e = entry(client, OpKind::Delete, key, call, ret);
    e.output = Some(json!({ "previous": previous }));
    e
}

#[allow(clippy::too_many_arguments)]
pub fn cas(
    client: &str,
    key: &str,
    old: Option<&str>,
    new: Option<&str>,
    call: u64,
    ret: u64,
    swapped: bool,
    current: Option<&str>,
) -> HistoryEntry {
    let mut e = entry(client, OpKind::Cas, key, call, ret);
    e.old = s(old);
    e.new = s(new);
    e.output = Some(json!({ "swapped": swapped, "current": current }));
    e
}

/// Marks an entry as unanswered: no return, no output.
pub fn unknown(mut e: HistoryEntry) -> HistoryEntry {
    e.result = Outcome::Unknown;
    e.ret = None;
    e.output = None;
    e
}

/// Marks an entry as certainly failed (its output is garbage on purpose).
pub fn fail(mut e: HistoryEntry) -> HistoryEntry {
    e.result = Outcome::Fail;
    e.output = Some(json!({ "error": "rejected" }));
    e
}

// ------------------------------------------------------------------ PRNG

/// SplitMix64: deterministic, dependency-free randomness for generated histories.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ------------------------------------------------------------------ simulator

/// One operation to simulate.
#[derive(Clone, Debug)]
pub struct OpSpec {
    pub client: usize,
    /// 0 get, 1 put, 2 delete, 3 cas
    pub kind: u8,
    pub key: usize,
    /// value written (put, cas new); `values` = domain size
    pub val: usize,
    /// cas old: `None` = absent
    pub old: Option<usize>,
    /// idle time before the call
    pub gap: u64,
    /// call → return
    pub dur: u64,
    /// where inside its window the op takes effect, in 1/1000
    pub lin: u64,
    pub outcome: SimOutcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimOutcome {
    Ok,
    Fail,
    /// no answer, but it took effect (possibly after the client gave up)
    UnknownApplied,
    /// no answer, and it never took effect
    UnknownLost,
}

pub fn value_name(v: usize) -> String {
    format!("v{v}")
}

/// Simulates a linearizable kv store: every effective op takes effect at one point
/// inside its interval (unknown ones anywhere after the call), in that order; outputs
/// come from applying them to a map. Returns the history in call order.
pub fn simulate(specs: &[OpSpec]) -> Vec<HistoryEntry> {
    let n_clients = specs.iter().map(|s| s.client + 1).max().unwrap_or(0);
    let mut clock = vec![0u64; n_clients];
    // (entry, linearization point or None)
    let mut entries: Vec<(HistoryEntry, Option<u64>)> = Vec::new();
    for sp in specs {
        let call = clock[sp.client] + sp.gap;
        let ret = call + sp.dur;
        clock[sp.client] = ret;
        let client = format!("c{}", sp.client);
        let key = format!("k{}", sp.key);
        let mut e = entry(
            &client,
            [OpKind::Get, OpKind::Put, OpKind::Delete, OpKind::Cas][sp.kind as usize % 4],
            &key,
            call,
            ret,
        );
        match e.op {
            OpKind::Put => e.value = Some(value_name(sp.val)),
            OpKind::Cas => {
                e.old = sp.old.map(value_name);
                e.new = Some(value_name(sp.val));
            }
            _ => {}
        }
        let lin = match sp.outcome {
            SimOutcome::Ok => Some(call + sp.dur * sp.lin / 1000),
            SimOutcome::UnknownApplied => Some(call + 3 * sp.dur * sp.lin / 1000),
            SimOutcome::Fail | SimOutcome::UnknownLost => None,
        };
        match sp.outcome {
            SimOutcome::Ok => {}
            SimOutcome::Fail => e.result = Outcome::Fail,
            SimOutcome::UnknownApplied | SimOutcome::UnknownLost => {
                e.result = Outcome::Unknown;
                e.ret = None;
            }
        }
        entries.push((e, lin));
    }
    let mut order: Vec<usize> = (0..entries.len()).filter(|&i| entries[i].1.is_some()).collect();
    order.sort_by_key(|&i| (entries[i].1, i));
    let mut map: std::collections::HashMap<String, String> = Default::default();
    for i in order {
        let e = &mut entries[i].0;
        let before = map.get(&e.key).cloned();
        let output = match e.op {
            OpKind::Get => json!({ "value": before }),
            OpKind::Put => {
                map.insert(e.key.clone(), e.value.clone().unwrap());
                json!({ "previous": before })
            }
            OpKind::Delete => {
                map.remove(&e.key);
                json!({ "previous": before })
            }
            OpKind::Cas => {
                let swapped = before == e.old;
                if swapped {
                    match &e.new {
                        Some(n) => map.insert(e.key.clone(), n.clone()),
                        None => map.remove(&e.key),
                    };
                }
                json!({ "swapped": swapped, "current": map.get(&e.key) })
            }
        };
        if e.result == Outcome::Ok {
            e.output = Some(output);
        }
    }
    let mut out: Vec<HistoryEntry> = entries.into_iter().map(|(e, _)| e).collect();
    out.sort_by_key(|e| e.call);
    out
}

/// Random specs from a PRNG: `percent_unknown` of the ops get no answer (half of those
/// took effect), `percent_fail` fail.
pub fn random_specs(
    rng: &mut Rng,
    n_ops: usize,
    clients: usize,
    keys: usize,
    values: usize,
    percent_unknown: u64,
    percent_fail: u64,
) -> Vec<OpSpec> {
    (0..n_ops)
        .map(|_| {
            let roll = rng.below(100);
            let outcome = if roll < percent_fail {
                SimOutcome::Fail
            } else if roll < percent_fail + percent_unknown {
                if rng.chance(50) {
                    SimOutcome::UnknownApplied
                } else {
                    SimOutcome::UnknownLost
                }
            } else {
                SimOutcome::Ok
            };
            OpSpec {
                client: rng.below(clients as u64) as usize,
                kind: rng.below(4) as u8,
                key: rng.below(keys as u64) as usize,
                val: rng.below(values as u64) as usize,
                old: if rng.chance(25) {
                    None
                } else {
                    Some(rng.below(values as u64) as usize)
                },
                gap: rng.below(20),
                dur: 1 + rng.below(60),
                lin: rng.below(1001),
                outcome,
            }
        })
        .collect()
}

/// Makes one ok entry's output impossible: it reports a value nobody ever wrote.
pub fn corrupt(e: &mut HistoryEntry) {
    const NEVER: &str = "never-written";
    let out = e.output.as_mut().expect("ok entry has an output");
    match e.op {
        OpKind::Get => out["value"] = json!(NEVER),
        OpKind::Put | OpKind::Delete => out["previous"] = json!(NEVER),
        OpKind::Cas => out["current"] = json!(NEVER),
    }
}

// ------------------------------------------------------------------ brute force

/// Reference checker for tiny single-key histories: tries every order (and every subset
/// of the unknown ops) that respects real time.
pub fn brute_force(history: &[HistoryEntry]) -> bool {
    let ops: Vec<&HistoryEntry> = history.iter().filter(|e| e.result != Outcome::Fail).collect();
    assert!(ops.len() <= 12, "brute force is for tiny histories");
    fn go(ops: &[&HistoryEntry], done: u32, state: Option<String>) -> bool {
        let pending_ok = |i: usize| done & (1 << i) == 0 && ops[i].result == Outcome::Ok;
        if !(0..ops.len()).any(pending_ok) {
            return true;
        }
        // an op may go next iff no pending ok op returned strictly before its call
        let min_ret = (0..ops.len())
            .filter(|&i| pending_ok(i))
            .map(|i| ops[i].ret.unwrap())
            .min()
            .unwrap();
        for i in 0..ops.len() {
            if done & (1 << i) != 0 || ops[i].call > min_ret {
                continue;
            }
            if let Some(next) = step(ops[i], &state)
                && go(ops, done | (1 << i), next)
            {
                return true;
            }
        }
        false
    }
    go(&ops, 0, None)
}

/// The kv machine on one key: the next value, or `None` when an ok op's output does not
/// match.
fn step(e: &HistoryEntry, state: &Option<String>) -> Option<Option<String>> {
    let out = e.output.as_ref();
    let field = |name: &str| -> Option<String> { out?[name].as_str().map(str::to_string) };
    let next = match e.op {
        OpKind::Get => state.clone(),
        OpKind::Put => e.value.clone(),
        OpKind::Delete => None,
        OpKind::Cas => {
            if *state == e.old {
                e.new.clone()
            } else {
                state.clone()
            }
        }
    };
    if e.result == Outcome::Unknown {
        return Some(next);
    }
    let ok = match e.op {
        OpKind::Get => field("value") == *state,
        OpKind::Put | OpKind::Delete => field("previous") == *state,
        OpKind::Cas => out.unwrap()["swapped"].as_bool() == Some(*state == e.old) && field("current") == next,
    };
    ok.then_some(next)
}
