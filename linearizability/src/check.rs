//! The checker: Wing & Gong's backtracking search with Lowe's memoisation, as done by
//! Porcupine, specialised to a key-value map. See `docs/linearizability.md`.
//!
//! Outline, per key (all operations are single-key, so a history is linearizable iff
//! every per-key sub-history is: P-compositionality):
//!
//! 1. Operations become abstract steps on a single register whose values are interned to
//!    `u32`. Every `ok` operation is `expect → next` (it is legal iff the register holds
//!    `expect`, and leaves `next`); unknown operations are `set next` or `cas old new`
//!    and are always legal. Values that no operation ever compares against the register
//!    are indistinguishable and share one id, which keeps the memo cache small.
//! 2. Call and return events go into a doubly-linked list sorted by time (calls before
//!    returns at equal times). Unknown operations have no return event (it is at
//!    +infinity), and the search is done once every `ok` operation is linearized, so an
//!    unknown operation may take effect anywhere after its call, or never.
//! 3. Depth-first search: the operations that may be linearized next are the calls
//!    before the first return in the list. Linearizing one unlinks its events
//!    ("lift"); backtracking relinks them. A configuration (set of linearized operations
//!    as a bitset, register value) is searched at most once (the memo cache); one that
//!    used a superset of the unknown operations of a searched one is skipped too.
//! 4. Pruning that keeps completeness: an `ok` operation that is legal now and does not
//!    change the value (a read, a failed cas, ...) is linearized at once without
//!    branching (moving it earlier never invalidates a linearization); an unknown
//!    operation is tried only if it changes the value to one that a pending operation
//!    can use, and must be followed by such a use; unknown operations that can only
//!    write unobserved values are dropped; identical unknown operations are tried in
//!    call order only; `ok` candidates are tried before unknown ones, earliest return
//!    first.
//! 5. Counting bounds (arrivals at a value vs. departures from it, see `supply_ok` and
//!    the static check in `KeyChecker::new`) cut off configurations, and whole
//!    histories, that cannot be completed.
//!
//! Every rule is cross-checked against a brute-force checker in `tests/generated.rs`.

use crate::history::{HistoryEntry, OpKind, Outcome, Output};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Search budget. Each limit applies to each key separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckLimits {
    /// Maximum number of linearization attempts for one key.
    pub max_steps: u64,
    /// Maximum number of memoised configurations kept for one key.
    pub max_cache_entries: usize,
    /// Approximate maximum memory of the memo cache for one key, in bytes (keys are
    /// checked in parallel, up to one per core).
    pub max_cache_bytes: usize,
}

impl Default for CheckLimits {
    fn default() -> Self {
        CheckLimits {
            max_steps: 10_000_000,
            max_cache_entries: 5_000_000,
            max_cache_bytes: 1 << 30,
        }
    }
}

impl CheckLimits {
    /// No budget at all: the search runs to the end, however long that takes.
    pub fn unlimited() -> Self {
        CheckLimits {
            max_steps: u64::MAX,
            max_cache_entries: usize::MAX,
            max_cache_bytes: usize::MAX,
        }
    }
}

/// The verdict on a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Every key's sub-history has a linearization. `ops` counts the entries checked
    /// (`ok` and `unknown`; `fail` entries are dropped), `keys` the distinct keys.
    Linearizable { ops: usize, keys: usize },
    /// No linearization exists for `key`; `explanation` shows the ops around the point
    /// where the longest linearization found got stuck.
    NotLinearizable { key: String, explanation: String },
    /// The search budget ran out (or the history is malformed) before a verdict.
    Inconclusive { reason: String },
}

impl CheckResult {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, CheckResult::Linearizable { .. })
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Linearizable { ops, keys } => {
                write!(f, "linearizable ({ops} ops on {keys} keys)")
            }
            CheckResult::NotLinearizable { key, explanation } => {
                write!(f, "NOT linearizable: key {key:?}\n{explanation}")
            }
            CheckResult::Inconclusive { reason } => write!(f, "inconclusive: {reason}"),
        }
    }
}

// ------------------------------------------------------------------ hashing

/// FxHash-style hashing with a Murmur3 finaliser: the memo cache hashes many short
/// `u64` slices, where SipHash would dominate.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(buf));
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    fn finish(&self) -> u64 {
        // a final avalanche: hashbrown takes bucket bits from the low end, which a bare
        // multiplicative hash leaves poorly mixed
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

/// (linearized ok ops, value, restricted) -> the sets of unknown ops used (sparse).
type MemoCache = HashMap<Box<[u64]>, Vec<Box<[u64]>>, FxBuild>;

// ------------------------------------------------------------------ the model

/// Interned value id shared by every value that nothing ever compares against.
const UNOBSERVED: u32 = 0;
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    /// An `ok` op: legal iff the register holds `expect`; leaves `next`.
    Ok { expect: u32, next: u32 },
    /// An unknown put/delete: always legal, leaves `next`.
    Set { next: u32 },
    /// An unknown cas: always legal.
    Cas { old: u32, new: u32 },
}

impl Step {
    /// The register value after the step, or `None` if it is not legal in `state`.
    #[inline]
    fn apply(self, state: u32) -> Option<u32> {
        match self {
            Step::Ok { expect, next } => (state == expect).then_some(next),
            Step::Set { next } => Some(next),
            Step::Cas { old, new } => Some(if state == old { new } else { state }),
        }
    }
}

struct Op {
    /// Index of the entry in the input history.
    entry: usize,
    call: u64,
    /// `None` for unknown ops.
    ret: Option<u64>,
    step: Step,
    /// For unknown ops: the previous (earlier call) unknown op with the same step, which
    /// must be linearized before this one may be (symmetry reduction).
    twin_before: Option<u32>,
    call_node: u32,
    ret_node: u32,
}

impl Op {
    fn is_ok(&self) -> bool {
        self.ret.is_some()
    }
}

/// The expected/resulting concrete values of an ok entry: `(expect, next)`, or an error
/// when the output contradicts itself.
fn ok_transition(e: &HistoryEntry) -> Result<(Option<String>, Option<String>), String> {
    let out = e.decode_output()?;
    match (e.op, out) {
        (OpKind::Get, Output::Get { value }) => Ok((value.clone(), value)),
        (OpKind::Put, Output::Previous { previous }) => Ok((previous, e.value.clone())),
        (OpKind::Delete, Output::Previous { previous }) => Ok((previous, None)),
        (OpKind::Cas, Output::Cas { swapped: true, current }) => {
            if current != e.new {
                Err(format!(
                    "cas reports swapped but its current value {} is not its new value {}",
                    show(&current),
                    show(&e.new)
                ))
            } else {
                Ok((e.old.clone(), e.new.clone()))
            }
        }
        (
            OpKind::Cas,
            Output::Cas {
                swapped: false,
                current,
            },
        ) => {
            if current == e.old {
                Err(format!(
                    "cas reports not swapped although the current value {} equals its old value",
                    show(&current)
                ))
            } else {
                Ok((current.clone(), current))
            }
        }
        _ => Err("output does not match the op".to_string()),
    }
}

fn show(v: &Option<String>) -> String {
    match v {
        None => "null".to_string(),
        Some(s) => format!("{s:?}"),
    }
}

/// One line describing an entry, for explanations.
fn describe(idx: usize, e: &HistoryEntry) -> String {
    let k = &e.key;
    let what = match e.op {
        OpKind::Get => format!("get {k:?}"),
        OpKind::Put => format!("put {k:?} = {}", show(&e.value)),
        OpKind::Delete => format!("delete {k:?}"),
        OpKind::Cas => format!("cas {k:?} {} -> {}", show(&e.old), show(&e.new)),
    };
    let result = match (e.result, e.decode_output()) {
        (Outcome::Ok, Ok(Output::Get { value })) => format!(" => {}", show(&value)),
        (Outcome::Ok, Ok(Output::Previous { previous })) => {
            format!(" => previous {}", show(&previous))
        }
        (Outcome::Ok, Ok(Output::Cas { swapped, current })) => format!(
            " => {}, current {}",
            if swapped { "swapped" } else { "not swapped" },
            show(&current)
        ),
        (Outcome::Ok, Err(_)) => " => (bad output)".to_string(),
        (Outcome::Unknown, _) => " => unknown".to_string(),
        (Outcome::Fail, _) => " => fail".to_string(),
    };
    let ret = match (e.result, e.ret) {
        (Outcome::Ok, Some(r)) => r.to_string(),
        _ => "never".to_string(),
    };
    format!(
        "#{} {}: {}{}  [call {}, return {}]",
        idx + 1,
        e.client,
        what,
        result,
        e.call,
        ret
    )
}

// ------------------------------------------------------------------ building the model

/// One entry's concrete transition: `Some((expect, next))` for an ok entry, `None` for an
/// unknown write.
struct Pre {
    entry: usize,
    ok: Option<(Option<String>, Option<String>)>,
}

/// The concrete transitions of the entries `idxs`; an ok entry whose output contradicts
/// itself is an error.
fn transitions(history: &[HistoryEntry], idxs: &[usize]) -> Result<Vec<Pre>, String> {
    let mut pre = Vec::with_capacity(idxs.len());
    for &i in idxs {
        let e = &history[i];
        match e.result {
            Outcome::Ok => {
                let t =
                    ok_transition(e).map_err(|why| format!("{}\n  its output is impossible: {why}", describe(i, e)))?;
                pre.push(Pre { entry: i, ok: Some(t) });
            }
            // an unanswered read constrains nothing
            Outcome::Unknown if e.op == OpKind::Get => {}
            Outcome::Unknown => pre.push(Pre { entry: i, ok: None }),
            Outcome::Fail => {}
        }
    }
    Ok(pre)
}

/// Ids (from 1) for the values that are ever compared against the register.
fn intern_values(history: &[HistoryEntry], pre: &[Pre]) -> HashMap<Option<String>, u32> {
    let mut ids: HashMap<Option<String>, u32> = HashMap::new();
    let mut intern = |v: &Option<String>| {
        let n = ids.len() as u32 + 1;
        ids.entry(v.clone()).or_insert(n);
    };
    for p in pre {
        match &p.ok {
            Some((expect, _)) => intern(expect),
            None => {
                let e = &history[p.entry];
                if e.op == OpKind::Cas {
                    intern(&e.old);
                }
            }
        }
    }
    ids
}

fn value_id(ids: &HashMap<Option<String>, u32>, v: &Option<String>) -> u32 {
    ids.get(v).copied().unwrap_or(UNOBSERVED)
}

/// The abstract ops, ok ops by call time then unknown ops by call time, and how many are
/// ok. Unknown ops that can never matter are left out; identical unknown ops are chained
/// (`twin_before`) so they are only linearized in call order (symmetry).
fn abstract_ops(history: &[HistoryEntry], pre: &[Pre], ids: &HashMap<Option<String>, u32>) -> (Vec<Op>, usize) {
    let id = |v: &Option<String>| value_id(ids, v);
    let mut ops: Vec<Op> = pre
        .iter()
        .map(|p| {
            let e = &history[p.entry];
            let step = match &p.ok {
                Some((expect, next)) => Step::Ok {
                    expect: id(expect),
                    next: id(next),
                },
                None => match e.op {
                    OpKind::Put => Step::Set { next: id(&e.value) },
                    OpKind::Delete => Step::Set { next: id(&None) },
                    OpKind::Cas => Step::Cas {
                        old: id(&e.old),
                        new: id(&e.new),
                    },
                    OpKind::Get => unreachable!("unknown gets are dropped"),
                },
            };
            Op {
                entry: p.entry,
                call: e.call,
                ret: if p.ok.is_some() { e.ret } else { None },
                step,
                twin_before: None,
                call_node: NIL,
                ret_node: NIL,
            }
        })
        // an unknown op that can only leave a value nothing ever compares against,
        // or that can never change the value, is never needed (see `run`)
        .filter(|o| match o.step {
            Step::Ok { .. } => true,
            Step::Set { next } => next != UNOBSERVED,
            Step::Cas { old, new } => new != UNOBSERVED && new != old,
        })
        .collect();
    ops.sort_by_key(|o| (!o.is_ok(), o.call, o.entry));
    let n_ok = ops.iter().filter(|o| o.is_ok()).count();
    let mut last_twin: HashMap<Step, u32> = HashMap::new();
    for (i, op) in ops.iter_mut().enumerate().skip(n_ok) {
        op.twin_before = last_twin.insert(op.step, i as u32);
    }
    (ops, n_ok)
}

/// The calls and returns of the ops as a doubly linked list in time order: node 0 is the
/// head sentinel, the last node the tail sentinel.
struct EventList {
    node_op: Vec<u32>,
    node_is_ret: Vec<bool>,
    /// time of each node (`u64::MAX` for the tail sentinel)
    node_time: Vec<u64>,
    next: Vec<u32>,
    prev: Vec<u32>,
}

impl EventList {
    /// The list for `ops`, whose `call_node` and `ret_node` it sets.
    fn new(ops: &mut [Op]) -> EventList {
        let mut events: Vec<(u64, bool, u32)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            events.push((op.call, false, i as u32));
            if let Some(r) = op.ret {
                events.push((r, true, i as u32));
            }
        }
        // calls before returns at equal times: such ops count as concurrent
        events.sort_unstable();
        let n_nodes = events.len() + 2;
        let mut node_op = vec![NIL; n_nodes];
        let mut node_is_ret = vec![false; n_nodes];
        let mut node_time = vec![0u64; n_nodes];
        for (k, &(t, is_ret, op)) in events.iter().enumerate() {
            let node = k as u32 + 1;
            node_op[node as usize] = op;
            node_is_ret[node as usize] = is_ret;
            node_time[node as usize] = t;
            if is_ret {
                ops[op as usize].ret_node = node;
            } else {
                ops[op as usize].call_node = node;
            }
        }
        // the tail sentinel counts as a return: it ends every scan
        node_is_ret[n_nodes - 1] = true;
        node_time[n_nodes - 1] = u64::MAX;
        EventList {
            node_op,
            node_is_ret,
            node_time,
            next: (1..=n_nodes as u32).collect(),
            prev: (0..n_nodes as u32).map(|i| i.wrapping_sub(1)).collect(),
        }
    }
}

/// Per interned value, for the counting bounds (`static_bound`, `supply_ok`).
struct ValueIndex {
    /// (return time, op) of the ok ops that move the register away from the value, ascending
    leave: Vec<Vec<(u64, u32)>>,
    /// call times of the ops that can move the register to the value, ascending
    arrive_call: Vec<Vec<u64>>,
    /// (return time, op) of the ok ops that need the value and leave it unchanged, ascending
    read: Vec<Vec<(u64, u32)>>,
}

impl ValueIndex {
    fn new(ops: &[Op], n_values: usize) -> ValueIndex {
        let mut leave: Vec<Vec<(u64, u32)>> = vec![Vec::new(); n_values];
        let mut arrive_call: Vec<Vec<u64>> = vec![Vec::new(); n_values];
        let mut read: Vec<Vec<(u64, u32)>> = vec![Vec::new(); n_values];
        for (i, op) in ops.iter().enumerate() {
            match op.step {
                Step::Ok { expect, next } if expect != next => {
                    leave[expect as usize].push((op.ret.expect("ok op"), i as u32));
                    arrive_call[next as usize].push(op.call);
                }
                Step::Ok { expect, .. } => read[expect as usize].push((op.ret.expect("ok op"), i as u32)),
                Step::Set { next } => arrive_call[next as usize].push(op.call),
                Step::Cas { new, .. } => arrive_call[new as usize].push(op.call),
            }
        }
        leave.iter_mut().for_each(|l| l.sort_unstable());
        arrive_call.iter_mut().for_each(|a| a.sort_unstable());
        read.iter_mut().for_each(|l| l.sort_unstable());
        ValueIndex {
            leave,
            arrive_call,
            read,
        }
    }
}

/// Static bound: an ok op X that needs the value v sees v between an arrival at v and the
/// next departure. Arrivals and departures alternate, so the arrivals usable before X
/// (called by its return, plus the initial value) must outnumber the ok departures from v
/// that certainly precede X (returned before its call). This finds reads of never-written
/// values and most stale reads at once.
fn static_bound(history: &[HistoryEntry], ok_ops: &[Op], init: u32, index: &ValueIndex) -> Result<(), String> {
    for op in ok_ops {
        let Step::Ok { expect: v, .. } = op.step else {
            continue;
        };
        let ret = op.ret.expect("ok op");
        let arrivals = index.arrive_call[v as usize].partition_point(|&c| c <= ret) + usize::from(v == init);
        let gone = index.leave[v as usize].partition_point(|&(r, _)| r < op.call);
        if arrivals <= gone {
            let e = &history[op.entry];
            let (seen, _) = ok_transition(e).expect("checked above");
            let mut why = format!(
                "{}\n  needs the key to hold {}, but ",
                describe(op.entry, e),
                show(&seen)
            );
            if arrivals == 0 {
                why.push_str("no op that could have written that value was called before it returned.\n");
            } else {
                why.push_str(&format!(
                    "that value can have been written at most {arrivals} time(s) before it returned{}, and {gone} op(s) had already replaced it before it was called, e.g.:\n",
                    if v == init { " (counting the initial absent state)" } else { "" }
                ));
                for &(_, l) in index.leave[v as usize][..gone].iter().rev().take(3) {
                    let le = ok_ops[l as usize].entry;
                    why.push_str(&format!("  {}\n", describe(le, &history[le])));
                }
            }
            return Err(why);
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ per-key search

enum KeyVerdict {
    Linearizable,
    NotLinearizable(String),
    Inconclusive(String),
}

struct KeyChecker<'h> {
    history: &'h [HistoryEntry],
    key: &'h str,
    ops: Vec<Op>,
    n_ok: usize,
    init: u32,
    // the event list: node 0 is the head sentinel, the last node the tail sentinel
    node_op: Vec<u32>,
    node_is_ret: Vec<bool>,
    /// time of each node (`u64::MAX` for the tail sentinel)
    node_time: Vec<u64>,
    next: Vec<u32>,
    prev: Vec<u32>,
    // For the counting bound (see `supply_ok`), per interned value `v`:
    /// return times of the ok ops that move the register away from `v`, ascending
    leave_ret: Vec<Vec<u64>>,
    /// those ops, in the same order
    leave_op: Vec<Vec<u32>>,
    /// call times of the ops that can move the register to `v`, ascending
    arrive_call: Vec<Vec<u64>>,
    /// return times of the ok ops that need `v` but leave it unchanged (reads), ascending
    read_ret: Vec<Vec<u64>>,
    /// those ops, in the same order
    read_op: Vec<Vec<u32>>,
}

impl<'h> KeyChecker<'h> {
    /// Builds the abstract ops for the entries `idxs` (all on `key`, none `fail`).
    fn new(history: &'h [HistoryEntry], key: &'h str, idxs: &[usize]) -> Result<Self, String> {
        let pre = transitions(history, idxs)?;
        let ids = intern_values(history, &pre);
        let (mut ops, n_ok) = abstract_ops(history, &pre, &ids);
        let events = EventList::new(&mut ops);
        let index = ValueIndex::new(&ops, ids.len() + 1);
        let init = value_id(&ids, &None);
        static_bound(history, &ops[..n_ok], init, &index)?;
        let ValueIndex {
            leave,
            arrive_call,
            read,
        } = index;
        let (leave_ret, leave_op) = leave.into_iter().map(|l| l.into_iter().unzip()).unzip();
        let (read_ret, read_op) = read.into_iter().map(|l| l.into_iter().unzip()).unzip();
        let EventList {
            node_op,
            node_is_ret,
            node_time,
            next,
            prev,
        } = events;
        Ok(KeyChecker {
            history,
            key,
            ops,
            n_ok,
            init,
            node_op,
            node_is_ret,
            node_time,
            next,
            prev,
            leave_ret,
            leave_op,
            arrive_call,
            read_ret,
            read_op,
        })
    }

    #[inline]
    fn unlink(&mut self, x: u32) {
        let (p, n) = (self.prev[x as usize], self.next[x as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
    }

    #[inline]
    fn relink(&mut self, x: u32) {
        let (p, n) = (self.prev[x as usize], self.next[x as usize]);
        self.next[p as usize] = x;
        self.prev[n as usize] = x;
    }

    fn lift(&mut self, op: u32) {
        let (c, r) = (self.ops[op as usize].call_node, self.ops[op as usize].ret_node);
        self.unlink(c);
        if r != NIL {
            self.unlink(r);
        }
    }

    fn unlift(&mut self, op: u32) {
        let (c, r) = (self.ops[op as usize].call_node, self.ops[op as usize].ret_node);
        if r != NIL {
            self.relink(r);
        }
        self.relink(c);
    }

    /// A necessary condition for completing the configuration after the register left
    /// value `v`. Every ok op that moves the register away from `v` needs its own
    /// arrival at `v` before it: an op that moves the register to `v`, which must be
    /// called before the leaving op returns. So for every time `t`, the unlinearized
    /// leavers returning by `t` can be at most the unused arrivals called by `t`
    /// (all the used ones were called before `frontier`, the earliest pending return,
    /// and so before `t`). Catches a leaver that took an arrival another needed. Likewise
    /// a pending read of `v` needs an unused arrival called before it returns.
    fn supply_ok(&self, v: u32, frontier: u64, bits: &[u64], used_arrivals: u32) -> bool {
        let rets = &self.leave_ret[v as usize];
        let leavers = &self.leave_op[v as usize];
        let arrivals = &self.arrive_call[v as usize];
        let unused_by = |t: u64| arrivals.partition_point(|&c| c <= t) as u32 - used_arrivals;
        // the earliest pending read of `v` needs a new arrival
        let rets_r = &self.read_ret[v as usize];
        let readers = &self.read_op[v as usize];
        let first = rets_r.partition_point(|&r| r < frontier);
        for i in first..rets_r.len().min(first + 1024) {
            let op = readers[i];
            if bits[op as usize / 64] & (1 << (op % 64)) == 0 {
                if unused_by(rets_r[i]) == 0 {
                    return false;
                }
                break;
            }
        }
        let mut need = 0u32;
        let mut checked = 0;
        for i in rets.partition_point(|&r| r < frontier)..rets.len() {
            let op = leavers[i];
            if bits[op as usize / 64] & (1 << (op % 64)) != 0 {
                continue;
            }
            need += 1;
            let t = rets[i];
            if need > unused_by(t) {
                return false;
            }
            checked += 1;
            if checked == 256 {
                break; // a partial check is still sound
            }
        }
        true
    }

    fn run(&mut self, limits: CheckLimits) -> KeyVerdict {
        let mut search = Search::new(self);
        loop {
            if search.remaining_ok == 0 {
                return KeyVerdict::Linearizable;
            }
            search.enter(self);
            if let Err(verdict) = search.advance(self, &limits) {
                return verdict;
            }
        }
    }

    /// Human-readable account of where the longest linearization found got stuck.
    fn explain(&self, best_path: &[u32]) -> String {
        let (value, done) = self.replay(best_path);
        let mut out = self.describe_path(best_path, &value);
        // the completed ops still pending there, most urgent first
        let mut pending: Vec<usize> = (0..self.n_ok).filter(|&o| !done[o]).collect();
        pending.sort_by_key(|&o| (self.ops[o].ret, self.ops[o].call, o));
        let Some(&first) = pending.first() else {
            return out;
        };
        let horizon = self.ops[first].ret.unwrap_or(u64::MAX);
        out.push_str("No way on from there; the completed ops still pending (earliest return first):\n");
        self.describe_pending(&pending, &value, &done, &mut out);
        let unknown_open = (self.n_ok..self.ops.len())
            .filter(|&o| !done[o] && self.ops[o].call <= horizon)
            .count();
        if unknown_open > 0 {
            out.push_str(&format!(
                "({unknown_open} unknown-outcome ops could also take effect there; none helps.)\n"
            ));
        }
        out
    }

    /// Replays `path` with concrete values: the value the key holds after it, and which
    /// ops it placed.
    fn replay(&self, path: &[u32]) -> (Option<String>, Vec<bool>) {
        let mut value: Option<String> = None;
        let mut done = vec![false; self.ops.len()];
        for &op in path {
            let e = &self.history[self.ops[op as usize].entry];
            done[op as usize] = true;
            value = match e.op {
                OpKind::Get => value,
                OpKind::Put => e.value.clone(),
                OpKind::Delete => None,
                OpKind::Cas => {
                    if e.result == Outcome::Ok {
                        match e.decode_output() {
                            Ok(Output::Cas { current, .. }) => current,
                            _ => value,
                        }
                    } else if value == e.old {
                        e.new.clone()
                    } else {
                        value
                    }
                }
            };
        }
        (value, done)
    }

    /// How far the longest linearization found got: its last ops and the value after them.
    fn describe_path(&self, best_path: &[u32], value: &Option<String>) -> String {
        let h = self.history;
        let total_ok = self.n_ok;
        let n_unknown = self.ops.len() - self.n_ok;
        let linearized_ok = best_path.iter().filter(|&&o| (o as usize) < self.n_ok).count();
        let mut out = format!(
            "no linearization exists for the {total_ok} completed and {n_unknown} unknown-outcome ops on this key.\n"
        );
        if best_path.is_empty() {
            out.push_str("Not even the first op can be linearized; the key starts absent (null).\n");
            return out;
        }
        out.push_str(&format!(
            "The longest linearization found covers {linearized_ok} of the {total_ok} completed ops; it ends with:\n"
        ));
        let tail = best_path.len().saturating_sub(6);
        if tail > 0 {
            out.push_str(&format!("  ... ({tail} earlier ops)\n"));
        }
        for &op in &best_path[tail..] {
            let i = self.ops[op as usize].entry;
            out.push_str(&format!("  {}\n", describe(i, &h[i])));
        }
        out.push_str(&format!("after which the key holds {}.\n", show(value)));
        out
    }

    /// The first few `pending` ops, each with why it cannot come next when the key holds
    /// `value`.
    fn describe_pending(&self, pending: &[usize], value: &Option<String>, done: &[bool], out: &mut String) {
        let shown = pending.len().min(8);
        for &o in &pending[..shown] {
            let op = &self.ops[o];
            let e = &self.history[op.entry];
            let why = match ok_transition(e) {
                Ok((expect, _)) if expect != *value => self.missing_value(o, &expect, done),
                Ok(_) => "fits here, but then the rest cannot be linearized".to_string(),
                Err(why) => why,
            };
            out.push_str(&format!("  {}\n      {}\n", describe(op.entry, e), why));
        }
        if pending.len() > shown {
            out.push_str(&format!("  ... and {} more\n", pending.len() - shown));
        }
    }

    /// Why ok op `o`, which needs the key to hold `expect`, cannot get it: whether any op
    /// not `done` could write that value before `o` returns.
    fn missing_value(&self, o: usize, expect: &Option<String>, done: &[bool]) -> String {
        let ret = self.ops[o].ret.unwrap_or(u64::MAX);
        let writers = (0..self.ops.len())
            .filter(|&w| w != o && !done[w] && self.ops[w].call <= ret && self.writes(w).as_ref() == Some(expect))
            .count();
        if writers == 0 {
            format!(
                "needs the key to hold {}, and no op left could write that before it returns",
                show(expect)
            )
        } else {
            format!(
                "needs the key to hold {} ({writers} op(s) left could write it, none in a way that works)",
                show(expect)
            )
        }
    }

    /// The value op `o` could write if placed now; `None` if it writes nothing new (reads).
    fn writes(&self, o: usize) -> Option<Option<String>> {
        let e = &self.history[self.ops[o].entry];
        match (e.result, e.op) {
            (_, OpKind::Get) => None,
            (Outcome::Ok, _) => match ok_transition(e) {
                Ok((expect, next)) if expect != next => Some(next),
                _ => None,
            },
            (_, OpKind::Put) => Some(e.value.clone()),
            (_, OpKind::Delete) => Some(None),
            (_, OpKind::Cas) => Some(e.new.clone()),
        }
    }
}

/// Marks op `op` linearized (`on`) or not: ok ops in `bits`, unknown ones in `ubits`.
/// One configuration on the search stack.
struct Frame {
    /// candidates are `cands[start..end]`, the next to try at `cursor`
    start: usize,
    end: usize,
    cursor: usize,
    applied: u32,
    /// the register value in this configuration
    state: u32,
}

/// The depth-first search of [`KeyChecker::run`]: the current configuration (the ops
/// linearized, the register value), the stack of configurations that led to it, and the memo
/// cache of configurations already searched.
struct Search {
    n_ok: usize,
    /// linearized ok ops (bit = op id) and unknown ops (bit = op id - n_ok)
    bits: Vec<u64>,
    ubits: Vec<u64>,
    /// The memo cache: (ok set, value, restricted) -> the sets of unknown ops used in
    /// configurations already searched. Unknown ops are optional and never block anything,
    /// so a configuration that used a superset of the unknown ops of a searched one (same ok
    /// set and value) has no completion the searched one lacked: it is skipped too
    /// (subsumption).
    cache: MemoCache,
    cached: usize,
    cached_bytes: usize,
    sparse_buf: Vec<u64>,
    key_buf: Vec<u64>,
    /// per value: == useful_gen iff a pending op needs or can use it
    useful: Vec<u32>,
    useful_gen: u32,
    frames: Vec<Frame>,
    cands: Vec<(u32, u32)>,
    path: Vec<u32>,
    best_path: Vec<u32>,
    best_ok: usize,
    state: u32,
    /// per value: how many linearized ops moved the register to it
    used_arrivals: Vec<u32>,
    /// the value the last step moved the register away from
    departed: Option<u32>,
    remaining_ok: usize,
    steps: u64,
}

/// Whether `ubits` uses every unknown op of one of the searched sets in `list`.
fn subsumed(list: Option<&Vec<Box<[u64]>>>, ubits: &[u64]) -> bool {
    list.is_some_and(|l| {
        l.iter()
            .rev()
            .take(256) // a partial look-up is still sound
            .any(|u| u.chunks(2).all(|p| p[1] & !ubits[p[0] as usize] == 0))
    })
}

impl Search {
    fn new(kc: &KeyChecker) -> Search {
        let (n, n_ok, n_values) = (kc.ops.len(), kc.n_ok, kc.leave_ret.len());
        Search {
            n_ok,
            bits: vec![0u64; n_ok.div_ceil(64).max(1)],
            ubits: vec![0u64; (n - n_ok).div_ceil(64)],
            cache: MemoCache::default(),
            cached: 0,
            cached_bytes: 0,
            sparse_buf: Vec::new(),
            key_buf: Vec::new(),
            useful: vec![0; n_values],
            useful_gen: 0,
            frames: Vec::new(),
            cands: Vec::new(),
            path: Vec::new(),
            best_path: Vec::new(),
            best_ok: 0,
            state: kc.init,
            used_arrivals: vec![0u32; n_values],
            departed: None,
            remaining_ok: n_ok,
            steps: 0,
        }
    }

    /// Push the current configuration with its candidates: the ops that may go next.
    fn enter(&mut self, kc: &KeyChecker) {
        let start = self.cands.len();
        let (forced, frontier) = self.collect_candidates(kc);
        if let Some(v) = self.departed.take()
            && !kc.supply_ok(v, frontier, &self.bits, self.used_arrivals[v as usize])
        {
            self.cands.truncate(start); // dead end: no candidates
        } else if let Some(f) = forced {
            self.cands.truncate(start);
            self.cands.push(f);
        } else {
            self.prune_candidates(kc, start);
        }
        self.frames.push(Frame {
            start,
            end: self.cands.len(),
            cursor: start,
            applied: NIL,
            state: self.state,
        });
    }

    /// Push (op, value after it) for every call before the first return that is legal now;
    /// an ok op that leaves the value unchanged is forced (returned, not pushed). Also marks
    /// the `useful` values and returns the time of the first return (the frontier).
    fn collect_candidates(&mut self, kc: &KeyChecker) -> (Option<(u32, u32)>, u64) {
        // After an unknown op, the next op must use the value it left: an ok op legal
        // now, or an unknown cas expecting it. (Otherwise the unknown op could be left
        // out: the next state change overwrites its value unobserved.) Such a
        // "restricted" configuration is marked in the memo key.
        let restricted = self.path.last().is_some_and(|&op| op as usize >= self.n_ok);
        // the values some op that may go next needs (ok ops) or can use (unknown
        // cas): an unknown op leaving any other value would be a dead end
        self.useful_gen = self.useful_gen.wrapping_add(1);
        if self.useful_gen == 0 {
            self.useful.iter_mut().for_each(|g| *g = 0);
            self.useful_gen = 1;
        }
        let state = self.state;
        let mut node = kc.next[0];
        while !kc.node_is_ret[node as usize] {
            let op_id = kc.node_op[node as usize];
            let op = &kc.ops[op_id as usize];
            match op.step {
                Step::Ok { expect, .. } => self.useful[expect as usize] = self.useful_gen,
                Step::Cas { old, .. } => self.useful[old as usize] = self.useful_gen,
                Step::Set { .. } => {}
            }
            if let Some(ns) = op.step.apply(state) {
                if op.is_ok() {
                    if ns == state {
                        return (Some((op_id, ns)), kc.node_time[node as usize]);
                    }
                    self.cands.push((op_id, ns));
                } else if ns != state
                    && (!restricted || matches!(op.step, Step::Cas { old, .. } if old == state))
                    && op.twin_before.is_none_or(|t| {
                        let t = t as usize - self.n_ok;
                        self.ubits[t / 64] & (1 << (t % 64)) != 0
                    })
                {
                    self.cands.push((op_id, ns));
                }
            }
            node = kc.next[node as usize];
        }
        (None, kc.node_time[node as usize])
    }

    /// Keep the unknown candidates that leave a useful value; put ok ops first (unknown ops
    /// are only needed when an ok op needs their value) and the most urgent (earliest
    /// return) first.
    fn prune_candidates(&mut self, kc: &KeyChecker, start: usize) {
        let mut k = start;
        for i in start..self.cands.len() {
            let (op, ns) = self.cands[i];
            if (op as usize) < self.n_ok || self.useful[ns as usize] == self.useful_gen {
                self.cands[k] = self.cands[i];
                k += 1;
            }
        }
        self.cands.truncate(k);
        self.cands[start..].sort_by_key(|&(op, _)| kc.ops[op as usize].ret.unwrap_or(u64::MAX));
    }

    /// Step into the next configuration not searched yet, backtracking as needed. `Err` is
    /// the verdict when there is none left or a limit is reached.
    fn advance(&mut self, kc: &mut KeyChecker, limits: &CheckLimits) -> Result<(), KeyVerdict> {
        loop {
            let Some(f) = self.frames.last_mut() else {
                return Err(KeyVerdict::NotLinearizable(kc.explain(&self.best_path)));
            };
            if f.cursor == f.end {
                self.backtrack(kc)?;
                continue;
            }
            let (op, ns) = self.cands[f.cursor];
            f.cursor += 1;
            self.steps += 1;
            if self.steps > limits.max_steps {
                return Err(KeyVerdict::Inconclusive(format!(
                    "key {:?}: search budget of {} steps exhausted ({} ops, at most {} of {} completed ops linearized)",
                    kc.key,
                    limits.max_steps,
                    kc.ops.len(),
                    self.best_ok,
                    self.n_ok
                )));
            }
            set_bit(&mut self.bits, &mut self.ubits, self.n_ok, op, true);
            if self.searched(op, ns) {
                set_bit(&mut self.bits, &mut self.ubits, self.n_ok, op, false);
                continue;
            }
            if self.cached >= limits.max_cache_entries || self.cached_bytes >= limits.max_cache_bytes {
                return Err(KeyVerdict::Inconclusive(format!(
                    "key {:?}: memo cache limit reached ({} configurations, ~{} MiB; {} ops, at most {} of {} completed ops linearized)",
                    kc.key,
                    self.cached,
                    self.cached_bytes >> 20,
                    kc.ops.len(),
                    self.best_ok,
                    self.n_ok
                )));
            }
            self.remember();
            self.step(kc, op, ns);
            return Ok(());
        }
    }

    /// Whether the configuration that linearizing `op` (leaving `ns`) leads to was searched
    /// already, or one it subsumes. Leaves its memo key in `key_buf`.
    fn searched(&mut self, op: u32, ns: u32) -> bool {
        // the configuration this leads to is restricted iff `op` is unknown; an
        // unrestricted configuration that failed also fails restricted
        let to_restricted = op as usize >= self.n_ok;
        compress(&self.bits, ns, false, &mut self.key_buf);
        let mut seen = subsumed(self.cache.get(self.key_buf.as_slice()), &self.ubits);
        if to_restricted {
            self.key_buf[0] |= 1;
            seen = seen || subsumed(self.cache.get(self.key_buf.as_slice()), &self.ubits);
        }
        seen
    }

    /// Add the configuration keyed by `key_buf` with the unknown ops used now, stored
    /// sparsely as (word index, word) pairs.
    fn remember(&mut self) {
        self.sparse_buf.clear();
        for (i, &w) in self.ubits.iter().enumerate() {
            if w != 0 {
                self.sparse_buf.extend([i as u64, w]);
            }
        }
        self.cached += 1;
        self.cached_bytes += 8 * self.sparse_buf.len() + 24;
        let entry = self.sparse_buf.clone().into_boxed_slice();
        match self.cache.get_mut(self.key_buf.as_slice()) {
            Some(list) => list.push(entry),
            None => {
                self.cached_bytes += 8 * self.key_buf.len() + 64;
                self.cache.insert(self.key_buf.clone().into_boxed_slice(), vec![entry]);
            }
        }
    }

    /// Linearize `op`, leaving the register at `ns`.
    fn step(&mut self, kc: &mut KeyChecker, op: u32, ns: u32) {
        let f = self.frames.last_mut().expect("a frame");
        f.applied = op;
        kc.lift(op);
        self.path.push(op);
        if ns != f.state {
            self.used_arrivals[ns as usize] += 1;
            self.departed = Some(f.state);
        }
        self.state = ns;
        if (op as usize) < self.n_ok {
            self.remaining_ok -= 1;
            if self.n_ok - self.remaining_ok > self.best_ok {
                self.best_ok = self.n_ok - self.remaining_ok;
                self.best_path.clone_from(&self.path);
            }
        }
    }

    /// The top configuration is a dead end: undo the step that led to it.
    fn backtrack(&mut self, kc: &mut KeyChecker) -> Result<(), KeyVerdict> {
        let f = self.frames.pop().expect("frame");
        self.cands.truncate(f.start);
        let Some(parent) = self.frames.last_mut() else {
            return Err(KeyVerdict::NotLinearizable(kc.explain(&self.best_path)));
        };
        let op = parent.applied;
        parent.applied = NIL;
        kc.unlift(op);
        if f.state != parent.state {
            self.used_arrivals[f.state as usize] -= 1;
        }
        set_bit(&mut self.bits, &mut self.ubits, self.n_ok, op, false);
        self.path.pop();
        if (op as usize) < self.n_ok {
            self.remaining_ok += 1;
        }
        Ok(())
    }
}

#[inline]
fn set_bit(bits: &mut [u64], ubits: &mut [u64], n_ok: usize, op: u32, on: bool) {
    let (v, i) = if (op as usize) < n_ok {
        (bits, op as usize)
    } else {
        (ubits, op as usize - n_ok)
    };
    if on {
        v[i / 64] |= 1 << (i % 64);
    } else {
        v[i / 64] &= !(1 << (i % 64));
    }
}

/// The memo key of a configuration: `[state << 1 | restricted, leading all-ones words, (index, word)*]` for
/// the non-zero words after them. Operations are numbered in call order, so the
/// linearized set is mostly a run of ones followed by a short window: this keeps keys
/// short on long histories.
fn compress(bits: &[u64], state: u32, restricted: bool, out: &mut Vec<u64>) {
    out.clear();
    out.push(((state as u64) << 1) | restricted as u64);
    let lead = bits.iter().take_while(|&&w| w == u64::MAX).count();
    out.push(lead as u64);
    for (i, &w) in bits.iter().enumerate().skip(lead) {
        if w != 0 {
            out.push(i as u64);
            out.push(w);
        }
    }
}

// ------------------------------------------------------------------ entry point

/// Checks a key-value history for linearizability (see the crate docs for the format
/// and the machine's semantics). Keys are checked independently, in parallel.
pub fn check_kv(history: &[HistoryEntry], limits: CheckLimits) -> CheckResult {
    let (keys, ops) = match entries_by_key(history) {
        Ok(grouped) => grouped,
        Err(inconclusive) => return inconclusive,
    };
    let verdicts = map_in_parallel(&keys, |(key, idxs)| match KeyChecker::new(history, key, idxs) {
        Ok(mut kc) => kc.run(limits),
        Err(explanation) => KeyVerdict::NotLinearizable(explanation),
    });
    combine_verdicts(&keys, verdicts, ops)
}

/// Each key with the indexes of its entries in the history, in key order.
type KeyEntries<'h> = Vec<(&'h str, Vec<usize>)>;

/// The entries to check (all but `fail`), as indexes into `history` grouped by key in key
/// order, and how many there are; `Err`: the first invalid one, which makes the check
/// inconclusive.
fn entries_by_key(history: &[HistoryEntry]) -> Result<(KeyEntries<'_>, usize), CheckResult> {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut ops = 0;
    for (i, e) in history.iter().enumerate() {
        if e.result == Outcome::Fail {
            continue;
        }
        if let Err(reason) = e.validate() {
            return Err(CheckResult::Inconclusive {
                reason: format!("invalid history entry #{}: {reason}", i + 1),
            });
        }
        ops += 1;
        by_key.entry(e.key.as_str()).or_default().push(i);
    }
    Ok((by_key.into_iter().collect(), ops))
}

/// `f` of each item, in the items' order, computed on up to 16 threads (as many as the
/// machine runs at once, and no more than there are items); on this thread when that is one.
fn map_in_parallel<T: Sync, V: Send>(items: &[T], f: impl Fn(&T) -> V + Sync) -> Vec<V> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(items.len())
        .min(16);
    if workers <= 1 {
        return items.iter().map(f).collect();
    }
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<V>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= items.len() {
                        break;
                    }
                    let v = f(&items[i]);
                    slots.lock().expect("no panics while locked")[i] = Some(v);
                }
            });
        }
    });
    slots
        .into_inner()
        .expect("no panics while locked")
        .into_iter()
        .map(|v| v.expect("every key checked"))
        .collect()
}

/// The history's verdict from its keys' (in key order): the first key that is not
/// linearizable, else the first reason a key was inconclusive, else linearizable.
fn combine_verdicts(keys: &[(&str, Vec<usize>)], verdicts: Vec<KeyVerdict>, ops: usize) -> CheckResult {
    let mut inconclusive = None;
    for ((key, _), v) in keys.iter().zip(verdicts) {
        match v {
            KeyVerdict::Linearizable => {}
            KeyVerdict::NotLinearizable(explanation) => {
                return CheckResult::NotLinearizable {
                    key: key.to_string(),
                    explanation,
                };
            }
            KeyVerdict::Inconclusive(reason) => {
                inconclusive.get_or_insert(reason);
            }
        }
    }
    match inconclusive {
        Some(reason) => CheckResult::Inconclusive { reason },
        None => CheckResult::Linearizable { ops, keys: keys.len() },
    }
}
