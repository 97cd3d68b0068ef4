//! The Byzantine-mode protocol core, sans I/O: agreement on every slot of every stream, order
//! by stability, execution into the shared [`Runtime`]. Time is an explicit argument (local
//! wall-clock microseconds); signatures are checked by the caller before an item is offered
//! ([`Core::precheck`] says which key and whether relay signatures matter), so the core is a
//! deterministic function of what it is told and can be driven by tests.
//!
//! **Agreement** (every correct replica ends up with the same decision for a slot
//! `(identity, session, seq)`): clients send every item to every replica; a replica relays a
//! version the first time it accepts it, to every peer, with its own signature appended to the
//! (verified) relay signatures it came with. Versions are accepted only within a window that
//! grows with the number of distinct relay signatures `k` (Dolev–Strong with a delay bound δ):
//! - `LamportClock`: relative to the slot's first arrival `f`: the first version is always
//!   accepted; another one with `k` signatures until `f + 2kδ` (k capped at t+1). The slot is
//!   decided at `f + 2(t+1)δ`: one version → that item; several (the client equivocated) or a
//!   master-signed tombstone → the stream ends there.
//! - `PhysicalClock`: relative to the version's own timestamp (Cristian et al.'s atomic
//!   broadcast): until `ts + ε + δ + k(δ + ε)`; executed at `ts + Δ`, `Δ = ε + δ + (t+1)(δ+ε) + ε`,
//!   the first of a slot's versions in (ts, digest) order wins.
//!
//! **Order**: decided items run in (ts, identity, session) order. `LamportClock`: the smallest
//! decided item runs once every other admitted stream has a decided item (or promise,
//! `horizon`) beyond it — streams are admitted and removed by the configuration master's own
//! stream, which is a participant too. `PhysicalClock`: an item runs at local time `ts + Δ`.

use super::keys::{self, MASTER_IDENTITY};
use crate::runtime::{Runtime, digest};
use lockstep_proto::{
    AppliedEntry, BatchOutput, BatchOutputs, ByzCommand, ChainSig, Command, CommandBatch, Evidence, LogEntry,
    MachineIdentity, Noop, ReplyBody, Resume, SealBarrier, SignedItem, Snapshot, StreamItem, StreamStatus, batch_entry,
    log_entry::Body, stream_item::Body as ItemBody,
};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

pub type StreamKey = (String, u64);
pub type SlotKey = (String, u64, u64);
type Digest32 = [u8; 32];

/// Most undecided or unexecuted slots one stream may hold (a flooding client stalls itself).
pub const MAX_PENDING_PER_STREAM: usize = 10_000;
/// Replies kept for retries.
const REPLY_CACHE: usize = 50_000;
/// Applied entries kept for `Watch` replays.
const WATCH_REPLAY: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stability {
    Lamport,
    Physical,
}

impl Stability {
    pub fn parse(s: &str) -> Option<Stability> {
        match s {
            "LamportClock" | "" => Some(Stability::Lamport),
            "PhysicalClock" => Some(Stability::Physical),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Stability::Lamport => "LamportClock",
            Stability::Physical => "PhysicalClock",
        }
    }
}

/// What a replica answers (signed) to an item that missed its `PhysicalClock` window there.
pub const LATE_REFUSAL: &str = "not executed: it reached this replica after its window (ts + delta): \
     the client's clock is behind, or maxDelayMillis / maxClockSkewMillis are too small for this network";

/// The timing assumptions every window is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub stability: Stability,
    /// t: faulty replicas tolerated (n = 2t + 1).
    pub t: usize,
    /// δ: bound on message delay (client → replica and replica → replica), microseconds.
    pub delay_us: u64,
    /// ε: bound on clock skew between any two processes (PhysicalClock), microseconds.
    pub skew_us: u64,
}

impl Timing {
    fn capped(&self, k: usize) -> u64 {
        k.min(self.t + 1) as u64
    }
    /// Last local time a version with `k` relay signatures is accepted.
    pub fn window(&self, first_heard: u64, ts: u64, k: usize) -> u64 {
        let k = self.capped(k);
        match self.stability {
            Stability::Lamport => first_heard.saturating_add(2 * k * self.delay_us),
            Stability::Physical => ts
                .saturating_add(self.skew_us + self.delay_us)
                .saturating_add(k * (self.delay_us + self.skew_us)),
        }
    }
    /// When a slot first heard at `first_heard` is decided (LamportClock).
    pub fn decide_at(&self, first_heard: u64) -> u64 {
        first_heard.saturating_add(2 * (self.t as u64 + 1) * self.delay_us + 1)
    }
    /// Δ: when an item stamped `ts` runs (PhysicalClock).
    pub fn execute_at(&self, ts: u64) -> u64 {
        self.window(0, ts, self.t + 1)
            .saturating_add(self.skew_us)
            .saturating_add(1)
    }
}

/// Parameters of the current era, as the master signed them.
#[derive(Clone, Debug)]
pub struct EraParams {
    pub number: u64,
    pub start_index: u64,
    pub members: Vec<(String, String, ed25519_dalek::VerifyingKey)>,
    pub master_session: u64,
    pub timing: Timing,
}

#[derive(Clone, Debug)]
struct Version {
    item: StreamItem,
}

#[derive(Debug)]
struct Slot {
    first_heard: u64,
    versions: BTreeMap<Digest32, Version>,
    decided: Option<Decision>,
}

/// Smallest ts a stream's next item can carry after an item stamped `ts` that promised
/// `horizon`, in a stream admitted at `floor`.
fn bound_after(ts: u64, horizon: u64, floor: u64) -> u64 {
    ts.saturating_add(1).max(horizon).max(floor)
}

/// Smallest ts a stream's next item can carry when nothing after what ran is decided.
fn resting_bound(s: &Stream) -> u64 {
    if s.next_seq > 1 {
        bound_after(s.last_ts, s.horizon, s.floor)
    } else {
        s.floor
    }
}

/// Where a decided `End` stands in the order. A client stream's end runs at once (it only
/// lifts the stream's bound). The master stream's end waits at the bound the stream held
/// until then (`LamportClock`): everything ordered before that bound runs first, nothing after
/// it runs in this era, and the replica stops at a barrier there — one place, the same at
/// every correct replica, since they decided the same items and the same end.
fn end_head(sk: &StreamKey, s: &Stream) -> u64 {
    if sk.0 == MASTER_IDENTITY { resting_bound(s) } else { 0 }
}

#[derive(Clone, Debug)]
enum Decision {
    Item(Box<Version>),
    End(String),
}

#[derive(Clone, Debug)]
struct Stream {
    public_key: [u8; 32],
    floor: u64,
    /// Next seq to execute (1-based).
    next_seq: u64,
    last_ts: u64,
    horizon: u64,
    ended: Option<String>,
    /// Local time of the last decided item (for the master's crashed-client detection).
    last_decided_at: u64,
    /// Decided seqs >= next_seq are contiguous up to here (exclusive).
    decided_upto: u64,
    /// The first seq decided as an `End` (the stream ends there when it runs).
    end_at: Option<u64>,
}

/// What `precheck` found about an incoming item.
#[derive(Debug)]
pub enum Precheck {
    /// This exact version is known: nothing to verify or do (a retry may get `cached_reply`).
    Known,
    /// Verify the item's signature with `key`; when `need_chain`, also count the valid relay
    /// signatures (the version can be accepted only with some).
    Verify {
        key: ed25519_dalek::VerifyingKey,
        need_chain: bool,
    },
    Reject(String),
}

/// Result of offering a verified version.
#[derive(Debug, PartialEq)]
pub enum Offer {
    /// Accepted: relay it to every peer with this chain plus our own signature.
    Accepted {
        chain: Vec<ChainSig>,
    },
    /// Already held (ignored the same way everywhere).
    Ignored(&'static str),
    /// Arrived this many microseconds after its acceptance window: the delay bound (and for
    /// `PhysicalClock` the skew bound) did not hold for it. Ignored like `Ignored`.
    Late(u64),
    Rejected(String),
}

/// Something the I/O shell must do after a call into the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Queue this entry for the disk (commands, barriers).
    Log(LogEntry),
    /// Answer whoever waits for `slot` (after `Log`s up to `durable_after` are durable).
    Reply {
        slot: SlotKey,
        body: ReplyBody,
        durable_after: u64,
    },
    /// A stream was admitted: answer the waiting `Open` (slot seq 0).
    Admitted { stream: StreamKey, body: ReplyBody },
    /// Executed a barrier at `index`: snapshot taken; nothing more runs in this era.
    Barrier { index: u64, snapshot: Snapshot },
    /// For watchers.
    Applied(AppliedEntry),
}

pub struct Core {
    pub id: String,
    pub machine: MachineIdentity,
    runtime: Runtime,
    /// Last log index applied.
    pub index: u64,
    pub era: Option<EraParams>,
    master_key: ed25519_dalek::VerifyingKey,
    /// Client keys this replica knows (its identity directory): only for early filtering and
    /// for checking Open requests; an admitted stream uses the key its admission carries.
    directory: BTreeMap<String, ed25519_dalek::VerifyingKey>,
    slots: HashMap<SlotKey, Slot>,
    streams: BTreeMap<StreamKey, Stream>,
    opens: BTreeMap<StreamKey, (SignedItem, u64)>,
    replies: HashMap<SlotKey, ReplyBody>,
    reply_order: VecDeque<SlotKey>,
    /// At a barrier: (index, snapshot digest). Nothing executes until the next era.
    pub barrier: Option<(u64, Vec<u8>)>,
    evidence: BTreeMap<(String, String), u64>,
    pub recent: VecDeque<AppliedEntry>,
    /// Test-only fault: run stable items newest-first instead of oldest-first.
    pub reorder: bool,
    /// PhysicalClock: slots already executed (until their windows are long closed).
    executed_slots: BTreeMap<u64, Vec<SlotKey>>,
    executed_set: std::collections::HashSet<SlotKey>,
    /// LamportClock, kept up to date by [`Core::refresh`] whenever a stream changes: the
    /// decided, unexecuted head of every stream by (ts, stream) (an `End` decision as ts 0) ...
    heads: BTreeSet<(u64, StreamKey)>,
    /// ... every stream's bound by (bound, stream) ...
    bounds: BTreeSet<(u64, StreamKey)>,
    /// ... and what the two sets hold for each stream, to take it out again. The next item
    /// to run is then the first head, stable when the first other bound lies beyond it: a
    /// lookup instead of a scan of every stream per executed item.
    placed: HashMap<StreamKey, (Option<u64>, u64)>,
    /// LamportClock: undecided slots by the local time they are decided.
    undecided: BTreeSet<(u64, SlotKey)>,
    /// Slots held per stream (undecided or not executed yet), for `MAX_PENDING_PER_STREAM`.
    held: HashMap<StreamKey, usize>,
}

fn stream_of(item: &StreamItem) -> StreamKey {
    (item.identity.clone(), item.session)
}

fn slot_of(item: &StreamItem) -> SlotKey {
    (item.identity.clone(), item.session, item.seq)
}

impl Core {
    pub fn new(
        id: String,
        runtime: Runtime,
        master_key: ed25519_dalek::VerifyingKey,
        directory: BTreeMap<String, ed25519_dalek::VerifyingKey>,
    ) -> Core {
        Core {
            id,
            machine: runtime.identity(),
            runtime,
            index: 0,
            era: None,
            master_key,
            directory,
            slots: HashMap::new(),
            streams: BTreeMap::new(),
            opens: BTreeMap::new(),
            replies: HashMap::new(),
            reply_order: VecDeque::new(),
            barrier: None,
            evidence: BTreeMap::new(),
            recent: VecDeque::new(),
            reorder: false,
            executed_slots: BTreeMap::new(),
            executed_set: Default::default(),
            heads: BTreeSet::new(),
            bounds: BTreeSet::new(),
            placed: HashMap::new(),
            undecided: BTreeSet::new(),
            held: HashMap::new(),
        }
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn set_directory(&mut self, directory: BTreeMap<String, ed25519_dalek::VerifyingKey>) {
        self.directory = directory;
    }

    pub fn note(&mut self, who: &str, kind: &str) {
        *self.evidence.entry((who.to_string(), kind.to_string())).or_default() += 1;
    }

    pub fn evidence(&self) -> Vec<Evidence> {
        self.evidence
            .iter()
            .map(|((peer, kind), count)| Evidence {
                peer: peer.clone(),
                kind: kind.clone(),
                count: *count,
            })
            .collect()
    }

    /// Rebuild from disk: the runtime state at `index` (snapshot + log).
    pub fn recover(&mut self, snapshot: Option<Snapshot>, entries: Vec<LogEntry>) -> anyhow::Result<()> {
        if let Some(s) = snapshot {
            if s.index > crate::storage::MAX_INDEX {
                anyhow::bail!("snapshot index {} is out of range", s.index);
            }
            self.runtime
                .restore(&s.data)
                .map_err(|e| anyhow::anyhow!("cannot restore snapshot at index {}: {e}", s.index))?;
            self.index = s.index;
        }
        for e in entries {
            if e.index <= self.index {
                continue;
            }
            if e.index != self.index + 1 {
                anyhow::bail!("recovered log has a gap at index {}", e.index);
            }
            self.runtime.apply(&e);
            self.index = e.index;
        }
        let applied_by = self.runtime.applied_by().clone();
        if applied_by.name != self.machine.name || (applied_by != self.machine && self.runtime.sealed_at().is_none()) {
            anyhow::bail!(
                "data dir was written by {} {} and is not sealed: a version change must go through a seal barrier",
                applied_by.name,
                applied_by.version
            );
        }
        if let Some(at) = self.runtime.sealed_at()
            && at == self.index
        {
            self.barrier = Some((at, digest(&self.runtime.snapshot())));
        }
        Ok(())
    }

    /// The runtime state as a snapshot at the current index.
    pub fn snapshot(&self) -> Snapshot {
        let data = self.runtime.snapshot();
        Snapshot {
            index: self.index,
            epoch: self.era.as_ref().map_or(0, |e| e.number),
            digest: digest(&data),
            data,
            machine: Some(self.runtime.applied_by().clone()),
        }
    }

    pub fn state_digest(&self) -> Vec<u8> {
        digest(&self.runtime.snapshot())
    }

    /// Replace the state with a verified snapshot (state transfer at an era start).
    pub fn install(&mut self, snap: &Snapshot) -> anyhow::Result<()> {
        if digest(&snap.data) != snap.digest {
            anyhow::bail!("snapshot data does not match its digest");
        }
        if snap.index > crate::storage::MAX_INDEX {
            anyhow::bail!("snapshot index {} is out of range", snap.index);
        }
        self.runtime
            .restore(&snap.data)
            .map_err(|e| anyhow::anyhow!("cannot restore snapshot: {e}"))?;
        self.index = snap.index;
        Ok(())
    }

    /// Begin an era: every stream of the previous one has ended; only the master's is open.
    /// The caller made sure the state is the era's start state. Returns entries to log (a
    /// resume entry when the era resumes a sealed state).
    pub fn start_era(&mut self, era: EraParams, resume: Option<MachineIdentity>) -> Vec<Effect> {
        self.slots.clear();
        self.streams.clear();
        self.opens.clear();
        self.executed_slots.clear();
        self.executed_set.clear();
        self.heads.clear();
        self.bounds.clear();
        self.placed.clear();
        self.undecided.clear();
        self.held.clear();
        self.barrier = None;
        let master = (MASTER_IDENTITY.to_string(), era.master_session);
        self.streams.insert(
            master.clone(),
            Stream {
                public_key: self.master_key.to_bytes(),
                floor: 0,
                next_seq: 1,
                last_ts: 0,
                horizon: 0,
                ended: None,
                last_decided_at: 0,
                decided_upto: 1,
                end_at: None,
            },
        );
        let number = era.number;
        self.era = Some(era);
        self.refresh(&master);
        let mut out = Vec::new();
        if let Some(machine) = resume
            && self.runtime.sealed_at().is_some()
        {
            self.index += 1;
            let entry = LogEntry {
                index: self.index,
                epoch: number,
                body: Some(Body::Resume(Resume { machine: Some(machine) })),
            };
            self.runtime.apply(&entry);
            out.push(Effect::Log(entry));
        }
        out
    }

    fn timing(&self) -> Option<Timing> {
        self.era.as_ref().map(|e| e.timing)
    }

    /// Which key verifies `item`, and whether relay signatures are needed for it to count.
    pub fn precheck(&self, item: &StreamItem, item_digest: &Digest32, now: u64) -> Precheck {
        let Some(era) = &self.era else {
            return Precheck::Reject("this replica has no era yet".into());
        };
        if item.era != era.number {
            return Precheck::Reject(format!(
                "item is for era {}, this replica is in era {}",
                item.era, era.number
            ));
        }
        let key_stream = stream_of(item);
        if let Some(ItemBody::Open(_)) = &item.body {
            if item.seq != 0 || item.identity == MASTER_IDENTITY {
                return Precheck::Reject("malformed open".into());
            }
            return match self.directory.get(&item.identity) {
                Some(k) => Precheck::Verify {
                    key: *k,
                    need_chain: false,
                },
                None => Precheck::Reject(format!("unknown client '{}'", item.identity)),
            };
        }
        if item.seq == 0 {
            return Precheck::Reject("seq 0 is reserved for the open item".into());
        }
        let slot = slot_of(item);
        if let Some(s) = self.slots.get(&slot) {
            if s.versions.contains_key(item_digest) {
                return Precheck::Known;
            }
        } else if self.replies.contains_key(&slot) || self.executed_set.contains(&slot) {
            return Precheck::Known;
        }
        let key = if matches!(item.body, Some(ItemBody::Tombstone(_))) {
            self.master_key
        } else if let Some(s) = self.streams.get(&key_stream) {
            match ed25519_dalek::VerifyingKey::from_bytes(&s.public_key) {
                Ok(k) => k,
                Err(_) => return Precheck::Reject("stream key unusable".into()),
            }
        } else if item.identity == MASTER_IDENTITY {
            return Precheck::Reject(format!("master session {} is not this era's", item.session));
        } else {
            // Not admitted (yet): admissions in flight race with the first items.
            match self.directory.get(&item.identity) {
                Some(k) => *k,
                None => return Precheck::Reject(format!("unknown client '{}'", item.identity)),
            }
        };
        let need_chain = match era.timing.stability {
            Stability::Lamport => self.slots.contains_key(&slot),
            Stability::Physical => now > era.timing.window(0, item.ts, 0),
        };
        Precheck::Verify { key, need_chain }
    }

    /// A client asks to be admitted (verified against the directory by the caller).
    pub fn offer_open(&mut self, signed: SignedItem, item: &StreamItem, now: u64) -> Option<ReplyBody> {
        let stream = stream_of(item);
        if self.streams.contains_key(&stream) {
            return self.admitted_reply(&stream);
        }
        self.opens.entry(stream).or_insert((signed, now));
        None
    }

    fn admitted_reply(&self, stream: &StreamKey) -> Option<ReplyBody> {
        let s = self.streams.get(stream)?;
        Some(ReplyBody {
            replica: self.id.clone(),
            era: self.era.as_ref().map_or(0, |e| e.number),
            identity: stream.0.clone(),
            session: stream.1,
            seq: 0,
            index: 0,
            ts: s.floor,
            machine: Some(self.machine.clone()),
            error: s.ended.clone().unwrap_or_default(),
            output: Vec::new(),
        })
    }

    /// Open requests waiting for the master (shown in Status).
    pub fn pending_opens(&self, now: u64, max_age_us: u64) -> Vec<SignedItem> {
        self.opens
            .values()
            .filter(|(_, at)| now.saturating_sub(*at) < max_age_us)
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// `PhysicalClock`: the local time by which an item stamped `ts` has run here or never will
    /// (its Δ, plus a millisecond for the ticker). `None` under `LamportClock`.
    pub fn physical_final_at(&self, ts: u64) -> Option<u64> {
        let timing = self.timing()?;
        (timing.stability == Stability::Physical).then(|| timing.execute_at(ts).saturating_add(1_000))
    }

    /// The refusal of an item stamped `ts` that missed its window here, once its Δ has passed
    /// (`physical_final_at`): `None` when a version of it is held, ran, or was answered.
    /// Remembered, so the same item sent again gets the same answer.
    pub fn late_refusal(&mut self, slot: &SlotKey, ts: u64) -> Option<ReplyBody> {
        if self.slots.contains_key(slot) || self.executed_set.contains(slot) || self.replies.contains_key(slot) {
            return None;
        }
        let body = self.reply_body(slot, 0, Vec::new(), LATE_REFUSAL.to_string(), ts);
        self.remember(slot.clone(), body.clone());
        Some(body)
    }

    pub fn cached_reply(&self, slot: &SlotKey) -> Option<ReplyBody> {
        self.replies.get(slot).cloned()
    }

    /// Offer a verified version with `chain` (valid relay signatures from distinct members).
    pub fn offer(&mut self, signed: SignedItem, item: StreamItem, chain: Vec<ChainSig>, now: u64) -> Offer {
        let Some(timing) = self.timing() else {
            return Offer::Rejected("no era".into());
        };
        let slot = slot_of(&item);
        let d = keys::sha256(&signed.item);
        let stream = stream_of(&item);
        let pending = self.held.get(&stream).copied().unwrap_or(0);
        if pending > MAX_PENDING_PER_STREAM && !self.slots.contains_key(&slot) {
            return Offer::Rejected(format!("stream has more than {MAX_PENDING_PER_STREAM} pending items"));
        }
        if let Some(s) = self.streams.get(&stream)
            && timing.stability == Stability::Lamport
            && slot.2 < s.next_seq
        {
            return Offer::Ignored("already executed");
        }
        let k = chain.len();
        let entry = self.slots.entry(slot.clone()).or_insert_with(|| Slot {
            first_heard: now,
            versions: BTreeMap::new(),
            decided: None,
        });
        if entry.versions.contains_key(&d) {
            return Offer::Ignored("duplicate");
        }
        if entry.decided.is_some() {
            return Offer::Ignored("slot already decided");
        }
        let first = entry.versions.is_empty();
        let window = timing.window(entry.first_heard, item.ts, k);
        let in_window = now <= window;
        let accept = match timing.stability {
            Stability::Lamport => first || in_window,
            Stability::Physical => in_window,
        };
        if !accept {
            if entry.versions.is_empty() {
                self.slots.remove(&slot);
            }
            return Offer::Late(now - window);
        }
        let decide_at = timing.decide_at(entry.first_heard);
        entry.versions.insert(d, Version { item });
        if first {
            *self.held.entry(stream).or_default() += 1;
            if timing.stability == Stability::Lamport {
                self.undecided.insert((decide_at, slot));
            }
        } else {
            let who = slot.0.clone();
            self.note(&who, "equivocation-or-tombstone");
        }
        Offer::Accepted { chain }
    }

    /// When `tick` next has something to do (local time), if anything is pending.
    pub fn next_deadline(&self) -> Option<u64> {
        let timing = self.timing()?;
        match timing.stability {
            Stability::Lamport => self.undecided.first().map(|(at, _)| *at),
            Stability::Physical => self
                .slots
                .values()
                .flat_map(|s| s.versions.values())
                .map(|v| timing.execute_at(v.item.ts))
                .min(),
        }
    }

    /// Decide what is due and execute what is stable.
    pub fn tick(&mut self, now: u64) -> Vec<Effect> {
        let Some(timing) = self.timing() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match timing.stability {
            Stability::Lamport => {
                self.decide_due(now);
                while self.barrier.is_none() {
                    let Some(next) = self.lamport_next() else { break };
                    self.run_lamport(next, now, &mut out);
                }
            }
            Stability::Physical => self.run_physical(&timing, now, &mut out),
        }
        out
    }

    fn decide_due(&mut self, now: u64) {
        let mut decided_streams = BTreeSet::new();
        while self.undecided.first().is_some_and(|(at, _)| *at <= now) {
            let Some((_, key)) = self.undecided.pop_first() else {
                break;
            };
            let Some(slot) = self.slots.get_mut(&key) else { continue };
            if slot.decided.is_some() {
                continue;
            }
            let tomb = slot
                .versions
                .values()
                .find(|v| matches!(v.item.body, Some(ItemBody::Tombstone(_))));
            slot.decided = Some(if tomb.is_some() {
                Decision::End("removed by the configuration master".into())
            } else if slot.versions.len() > 1 {
                Decision::End(format!(
                    "client signed {} different items for sequence {}: stream ended",
                    slot.versions.len(),
                    key.2
                ))
            } else {
                match slot.versions.values().next() {
                    Some(v) => Decision::Item(Box::new(v.clone())),
                    None => Decision::End("empty slot".into()),
                }
            });
            decided_streams.insert((key.0.clone(), key.1));
        }
        for sk in decided_streams {
            self.advance_decided(&sk, now);
        }
    }

    fn advance_decided(&mut self, sk: &StreamKey, now: u64) {
        let Some(stream) = self.streams.get_mut(sk) else { return };
        let mut upto = stream.decided_upto.max(stream.next_seq);
        while let Some(slot) = self.slots.get(&(sk.0.clone(), sk.1, upto)) {
            match slot.decided {
                None => break,
                Some(Decision::End(_)) if stream.end_at.is_none() => stream.end_at = Some(upto),
                Some(_) => {}
            }
            upto += 1;
            stream.last_decided_at = now;
        }
        stream.decided_upto = upto;
        self.refresh(sk);
    }

    /// The head of a stream: its decided, unexecuted item's ts (0 for an `End`), if any.
    fn head(&self, sk: &StreamKey, s: &Stream) -> Option<u64> {
        if s.ended.is_some() || s.decided_upto <= s.next_seq {
            return None;
        }
        match self
            .slots
            .get(&(sk.0.clone(), sk.1, s.next_seq))
            .and_then(|x| x.decided.as_ref())
        {
            Some(Decision::Item(v)) => Some(v.item.ts),
            Some(Decision::End(_)) => Some(end_head(sk, s)),
            None => None,
        }
    }

    /// Re-place a stream in `heads` and `bounds` after anything about it changed (its
    /// decisions, its execution, its admission). Only the stream itself determines both.
    fn refresh(&mut self, sk: &StreamKey) {
        if let Some((head, bound)) = self.placed.remove(sk) {
            if let Some(h) = head {
                self.heads.remove(&(h, sk.clone()));
            }
            self.bounds.remove(&(bound, sk.clone()));
        }
        let Some(s) = self.streams.get(sk) else { return };
        let (head, bound) = (self.head(sk, s), self.bound(sk, s));
        if let Some(h) = head {
            self.heads.insert((h, sk.clone()));
        }
        self.bounds.insert((bound, sk.clone()));
        self.placed.insert(sk.clone(), (head, bound));
    }

    /// Forget a slot's count towards its stream's pending limit.
    fn release(&mut self, key: &SlotKey) {
        let sk = (key.0.clone(), key.1);
        if let Some(n) = self.held.get_mut(&sk) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(&sk);
            }
        }
    }

    /// Smallest ts the stream's next undecided item can carry (u64::MAX once it ended).
    ///
    /// Every seq in `next_seq..decided_upto` is decided, so the bound follows from the last of
    /// them (or from what ran last), unless one of them ends the stream: constant time, where
    /// walking the decided range cost a hash lookup per item (quadratic while a stalled stream
    /// held thousands of decided items back, and again on every status request).
    fn bound(&self, sk: &StreamKey, s: &Stream) -> u64 {
        let b = if s.ended.is_some() || s.end_at.is_some_and(|e| e >= s.next_seq && e < s.decided_upto) {
            u64::MAX
        } else {
            let last = (s.decided_upto > s.next_seq)
                .then(|| {
                    self.slots
                        .get(&(sk.0.clone(), sk.1, s.decided_upto - 1))
                        .and_then(|x| x.decided.as_ref())
                })
                .flatten();
            match last {
                Some(Decision::End(_)) => u64::MAX,
                Some(Decision::Item(v)) => bound_after(v.item.ts, v.item.horizon, s.floor),
                None => resting_bound(s),
            }
        };
        debug_assert_eq!(
            b,
            self.bound_scan(sk, s),
            "the bound from the last decision and from the walk"
        );
        b
    }

    /// The same by walking the decided range (tests compare the two).
    fn bound_scan(&self, sk: &StreamKey, s: &Stream) -> u64 {
        if s.ended.is_some() {
            return u64::MAX;
        }
        let (mut last_ts, mut horizon) = (s.last_ts, s.horizon);
        let mut have = s.next_seq > 1;
        for seq in s.next_seq..s.decided_upto {
            match self
                .slots
                .get(&(sk.0.clone(), sk.1, seq))
                .and_then(|x| x.decided.as_ref())
            {
                Some(Decision::End(_)) => return u64::MAX,
                Some(Decision::Item(v)) => {
                    last_ts = v.item.ts;
                    horizon = v.item.horizon;
                    have = true;
                }
                None => break,
            }
        }
        if have {
            bound_after(last_ts, horizon, s.floor)
        } else {
            s.floor
        }
    }

    /// The next stable stream head, if any (LamportClock): the smallest head, once the
    /// smallest bound of every other stream lies beyond it.
    fn lamport_next(&self) -> Option<StreamKey> {
        if self.reorder {
            return self.lamport_next_scan();
        }
        let next = self.heads.first().and_then(|(ts, sk)| {
            let stable = *ts == 0
                || self
                    .bounds
                    .iter()
                    .find(|(_, q)| q != sk)
                    .is_none_or(|(b, q)| (*b, q) > (*ts, sk));
            stable.then(|| sk.clone())
        });
        debug_assert_eq!(
            next,
            self.lamport_next_scan(),
            "the ordered index and the scan disagree"
        );
        next
    }

    /// The same by scanning every stream (and the injected `reorder` fault).
    fn lamport_next_scan(&self) -> Option<StreamKey> {
        let mut heads: Vec<((u64, StreamKey), bool)> = Vec::new(); // (ts, stream)
        for (sk, s) in &self.streams {
            if s.ended.is_some() || s.decided_upto <= s.next_seq {
                continue;
            }
            let ts = match self
                .slots
                .get(&(sk.0.clone(), sk.1, s.next_seq))
                .and_then(|x| x.decided.as_ref())
            {
                Some(Decision::Item(v)) => v.item.ts,
                Some(Decision::End(_)) => end_head(sk, s),
                None => continue,
            };
            heads.push(((ts, sk.clone()), false));
        }
        heads.sort();
        if self.reorder {
            // Injected fault: hold a decided command until another one is decided, then run the
            // newer first (stable or not); everything else runs newest-first too.
            let is_command = |sk: &StreamKey| {
                self.streams.get(sk).is_some_and(|s| {
                    matches!(
                        self.slots.get(&(sk.0.clone(), sk.1, s.next_seq)).and_then(|x| x.decided.as_ref()),
                        Some(Decision::Item(v)) if matches!(v.item.body, Some(ItemBody::Command(_)) | Some(ItemBody::Batch(_)))
                    )
                })
            };
            let commands: Vec<&StreamKey> = heads
                .iter()
                .map(|((_, sk), _)| sk)
                .filter(|sk| is_command(sk))
                .collect();
            if commands.len() >= 2 {
                return commands.last().map(|sk| (*sk).clone());
            }
            return heads
                .iter()
                .rev()
                .map(|((_, sk), _)| sk)
                .find(|sk| !is_command(sk))
                .cloned();
        }
        let ((ts, sk), _) = heads.into_iter().next()?;
        let stable = self.streams.iter().all(|(q, qs)| {
            if *q == sk {
                return true;
            }
            let b = self.bound(q, qs);
            (b, q) > (ts, &sk)
        });
        (stable || ts == 0).then_some(sk)
    }

    fn run_lamport(&mut self, sk: StreamKey, now: u64, out: &mut Vec<Effect>) {
        let Some(s) = self.streams.get(&sk).cloned() else {
            return;
        };
        let key = (sk.0.clone(), sk.1, s.next_seq);
        let Some(slot) = self.slots.remove(&key) else { return };
        self.release(&key);
        let mut s = s;
        s.next_seq += 1;
        match slot.decided {
            Some(Decision::Item(v)) => {
                let ts_ok = v.item.ts > s.last_ts && v.item.ts >= s.horizon && v.item.ts >= s.floor;
                if !ts_ok {
                    s.ended = Some(format!(
                        "item {} has timestamp {} below the stream's bound: stream ended",
                        key.2, v.item.ts
                    ));
                    self.end_reply(&key, &s, out);
                } else {
                    s.last_ts = v.item.ts;
                    s.horizon = v.item.horizon;
                    if matches!(v.item.body, Some(ItemBody::Close(_))) {
                        s.ended = Some("stream closed by its client".into());
                    }
                    self.streams.insert(sk.clone(), s.clone());
                    self.execute(&v.item, now, out);
                }
            }
            Some(Decision::End(why)) => {
                s.ended = Some(why);
                self.end_reply(&key, &s, out);
            }
            None => {}
        }
        if let Some(cur) = self.streams.get_mut(&sk) {
            cur.next_seq = cur.next_seq.max(s.next_seq);
            if s.ended.is_some() {
                cur.ended = s.ended.clone();
            }
        }
        self.refresh(&sk);
        if sk.0 == MASTER_IDENTITY && s.ended.is_some() && self.barrier.is_none() {
            // No barrier can be ordered in this era any more. Every correct replica decided
            // the same end at the same place in the order, so they all stop here, alike, and
            // the master starts the next era from this state (docs/byzantine.md, "When the
            // master stream ends").
            tracing::warn!(
                why = s.ended.as_deref().unwrap_or_default(),
                index = self.index,
                "the configuration master's stream ended: stopping at a barrier for the next era"
            );
            self.stop_at_barrier(Body::Noop(Noop {}), out);
        }
    }

    fn end_reply(&mut self, key: &SlotKey, s: &Stream, out: &mut Vec<Effect>) {
        self.streams.insert((key.0.clone(), key.1), s.clone());
        self.refuse(key.clone(), s.ended.clone().unwrap_or_default(), 0, out);
    }

    /// PhysicalClock: run every version whose execution time has come, oldest first, then
    /// forget executed slots whose windows closed long ago. Stops at a barrier (and then
    /// forgets nothing).
    fn run_physical(&mut self, timing: &Timing, now: u64, out: &mut Vec<Effect>) {
        loop {
            if self.barrier.is_some() {
                return;
            }
            if !self.run_next_due(timing, now, out) {
                break;
            }
        }
        self.forget_executed(timing, now);
    }

    /// The due version with the smallest (ts, stream, digest): its ts, slot and digest.
    fn next_due(&self, timing: &Timing, now: u64) -> Option<(u64, SlotKey, Digest32)> {
        let mut due: Option<(u64, SlotKey, Digest32)> = None;
        for (key, slot) in &self.slots {
            for (d, v) in &slot.versions {
                if timing.execute_at(v.item.ts) > now {
                    continue;
                }
                let cand = (v.item.ts, key.clone(), *d);
                if due
                    .as_ref()
                    .is_none_or(|c| (cand.0, &cand.1, &cand.2) < (c.0, &c.1, &c.2))
                {
                    due = Some(cand);
                }
            }
        }
        due
    }

    /// Take the next due version out of its slot, mark the slot executed and run it in its
    /// stream. False when nothing was due.
    fn run_next_due(&mut self, timing: &Timing, now: u64, out: &mut Vec<Effect>) -> bool {
        let Some((ts, key, d)) = self.next_due(timing, now) else {
            return false;
        };
        let Some(slot) = self.slots.remove(&key) else {
            return false;
        };
        self.release(&key);
        let Some(v) = slot.versions.get(&d).cloned() else {
            return false;
        };
        self.executed_set.insert(key.clone());
        self.executed_slots.entry(ts).or_default().push(key.clone());
        self.run_in_stream(key, ts, &v.item, now, out);
        true
    }

    /// Execute `item` (stamped `ts`) of slot `key` if its stream is admitted, not ended and
    /// the item not stamped before its admission; otherwise answer it with why not. A close
    /// or a tombstone ends the stream.
    fn run_in_stream(&mut self, key: SlotKey, ts: u64, item: &StreamItem, now: u64, out: &mut Vec<Effect>) {
        let sk = (key.0.clone(), key.1);
        match self.streams.get(&sk).cloned() {
            None => self.refuse(key, "stream not admitted".into(), ts, out),
            Some(s) if s.ended.is_some() || ts < s.floor => {
                let why = s
                    .ended
                    .clone()
                    .unwrap_or_else(|| "item stamped before its admission".into());
                self.refuse(key, why, ts, out);
            }
            Some(mut s) => {
                if matches!(item.body, Some(ItemBody::Close(_)) | Some(ItemBody::Tombstone(_))) {
                    s.ended = Some(if matches!(item.body, Some(ItemBody::Tombstone(_))) {
                        "removed by the configuration master".into()
                    } else {
                        "stream closed by its client".into()
                    });
                }
                s.last_ts = s.last_ts.max(ts);
                s.last_decided_at = now;
                self.streams.insert(sk, s);
                self.execute(item, now, out);
            }
        }
    }

    /// Answer slot `key` with the error `why` instead of executing it (and remember the answer
    /// for retries).
    fn refuse(&mut self, key: SlotKey, why: String, ts: u64, out: &mut Vec<Effect>) {
        let body = self.reply_body(&key, 0, Vec::new(), why, ts);
        self.remember(key.clone(), body.clone());
        out.push(Effect::Reply {
            slot: key,
            body,
            durable_after: 0,
        });
    }

    /// Forget executed slots whose windows closed long ago: an item sent for one of them again
    /// now comes too late to be accepted anyway.
    fn forget_executed(&mut self, timing: &Timing, now: u64) {
        let horizon = now.saturating_sub(timing.execute_at(0).saturating_mul(2) + 10_000_000);
        while let Some((&ts, _)) = self.executed_slots.first_key_value() {
            if ts >= horizon {
                break;
            }
            if let Some((_, keys)) = self.executed_slots.pop_first() {
                for k in keys {
                    self.executed_set.remove(&k);
                }
            }
        }
    }

    fn reply_body(&self, key: &SlotKey, index: u64, output: Vec<u8>, error: String, ts: u64) -> ReplyBody {
        ReplyBody {
            replica: self.id.clone(),
            era: self.era.as_ref().map_or(0, |e| e.number),
            identity: key.0.clone(),
            session: key.1,
            seq: key.2,
            index,
            output,
            error,
            machine: Some(self.machine.clone()),
            ts,
        }
    }

    fn remember(&mut self, key: SlotKey, body: ReplyBody) {
        if self.replies.insert(key.clone(), body).is_none() {
            self.reply_order.push_back(key);
        }
        while self.reply_order.len() > REPLY_CACHE {
            if let Some(old) = self.reply_order.pop_front() {
                self.replies.remove(&old);
            }
        }
    }

    fn push_applied(&mut self, entry: &LogEntry, output: &[u8], kind: &str, out: &mut Vec<Effect>) {
        let event = AppliedEntry {
            index: entry.index,
            epoch: entry.epoch,
            kind: kind.to_string(),
            command: match &entry.body {
                Some(Body::Command(c)) => Some(c.clone()),
                _ => None,
            },
            output: output.to_vec(),
            machine: Some(self.runtime.applied_by().clone()),
        };
        self.recent.push_back(event.clone());
        if self.recent.len() > WATCH_REPLAY {
            self.recent.pop_front();
        }
        out.push(Effect::Applied(event));
    }

    /// Run one item at its place in the order.
    fn execute(&mut self, item: &StreamItem, now: u64, out: &mut Vec<Effect>) {
        let key = slot_of(item);
        let era = self.era.as_ref().map_or(0, |e| e.number);
        let from_master = item.identity == MASTER_IDENTITY;
        match &item.body {
            Some(ItemBody::Command(c)) => {
                let (output, error) = match self.run_command(&item.identity, c, era, out) {
                    Ok(r) => (r.output, r.error),
                    Err(sealed) => (Vec::new(), sealed),
                };
                // A refused command made nothing durable: answer it at once.
                let durable_after = if error.is_empty() { self.index } else { 0 };
                self.answer(key, output, error, item.ts, durable_after, out);
            }
            Some(ItemBody::Batch(b)) => {
                let (output, error) = if b.entries.is_empty() {
                    (Vec::new(), "invalid command: an empty batch".to_string())
                } else {
                    self.run_batch(&item.identity, b, era, out)
                };
                let durable_after = if error.is_empty() { self.index } else { 0 };
                self.answer(key, output, error, item.ts, durable_after, out);
            }
            Some(ItemBody::Query(q)) => {
                let BatchOutput { output, error, .. } = self.run_query(q);
                self.answer(key, output, error, item.ts, 0, out);
            }
            Some(ItemBody::Admit(a)) if from_master => self.admit(a, item.ts, now, out),
            Some(ItemBody::Barrier(b)) if from_master => {
                let body = if b.seal {
                    Body::Seal(SealBarrier {
                        machine: Some(self.machine.clone()),
                    })
                } else {
                    Body::Noop(Noop {})
                };
                self.stop_at_barrier(body, out);
            }
            _ => {}
        }
    }

    /// Log `body` as the era's last entry, snapshot, and run nothing more until the next era.
    fn stop_at_barrier(&mut self, body: Body, out: &mut Vec<Effect>) {
        self.index += 1;
        let entry = LogEntry {
            index: self.index,
            epoch: self.era.as_ref().map_or(0, |e| e.number),
            body: Some(body),
        };
        let applied = self.runtime.apply(&entry);
        out.push(Effect::Log(entry.clone()));
        self.push_applied(&entry, &applied.output, applied.kind, out);
        let snapshot = self.snapshot();
        self.barrier = Some((self.index, snapshot.digest.clone()));
        out.push(Effect::Barrier {
            index: self.index,
            snapshot,
        });
    }

    /// Answer `key` at the current index: remember the reply and send it once `durable_after`
    /// is on disk (0: at once).
    fn answer(
        &mut self,
        key: SlotKey,
        output: Vec<u8>,
        error: String,
        ts: u64,
        durable_after: u64,
        out: &mut Vec<Effect>,
    ) {
        let body = self.reply_body(&key, self.index, output, error, ts);
        self.remember(key.clone(), body.clone());
        out.push(Effect::Reply {
            slot: key,
            body,
            durable_after,
        });
    }

    /// Validate and apply one client command at the next log index. `Err` when the runtime is
    /// sealed (nothing runs until the rollout resumes it); an invalid command is refused in
    /// the result (`error`) and takes no index.
    fn run_command(
        &mut self,
        identity: &str,
        c: &ByzCommand,
        era: u64,
        out: &mut Vec<Effect>,
    ) -> Result<BatchOutput, String> {
        if self.runtime.sealed_at().is_some() {
            return Err("sealed: the cluster is being upgraded; retry".to_string());
        }
        let command = Command {
            client_id: format!("{identity}/{}", c.request_session),
            sequence: c.request_seq,
            payload: c.payload.clone(),
        };
        if let Err(e) = self.runtime.validate(&command) {
            return Ok(BatchOutput {
                index: 0,
                output: Vec::new(),
                error: format!("invalid command: {e}"),
            });
        }
        self.index += 1;
        let entry = LogEntry {
            index: self.index,
            epoch: era,
            body: Some(Body::Command(command)),
        };
        let applied = self.runtime.apply(&entry);
        out.push(Effect::Log(entry.clone()));
        self.push_applied(&entry, &applied.output, applied.kind, out);
        Ok(BatchOutput {
            index: self.index,
            output: applied.output,
            error: String::new(),
        })
    }

    /// Answer a read-only query at the current index.
    fn run_query(&self, q: &ByzCommand) -> BatchOutput {
        let (output, error) = match self.runtime.query(&q.payload) {
            Ok(o) => (o, String::new()),
            Err(e) => (Vec::new(), format!("invalid query: {e}")),
        };
        BatchOutput {
            index: self.index,
            output,
            error,
        }
    }

    /// Run a batch's entries in order: the reply's output (an encoded `BatchOutputs`) and its
    /// error. Sealed at its first command, the whole batch is refused (nothing before it
    /// changed the state); a seal cannot come between two entries of one batch (it is an item
    /// of its own). An entry without a kind is refused as invalid.
    fn run_batch(&mut self, identity: &str, b: &CommandBatch, era: u64, out: &mut Vec<Effect>) -> (Vec<u8>, String) {
        let mut outputs = Vec::with_capacity(b.entries.len());
        for e in &b.entries {
            let r = match &e.kind {
                Some(batch_entry::Kind::Command(c)) => match self.run_command(identity, c, era, out) {
                    Ok(r) => r,
                    Err(sealed) => return (Vec::new(), sealed),
                },
                Some(batch_entry::Kind::Query(q)) => self.run_query(q),
                None => BatchOutput {
                    index: 0,
                    output: Vec::new(),
                    error: "invalid command: a batch entry without a command".into(),
                },
            };
            outputs.push(r);
        }
        (BatchOutputs { outputs }.encode_to_vec(), String::new())
    }

    fn admit(&mut self, a: &lockstep_proto::Admit, ts: u64, now: u64, out: &mut Vec<Effect>) {
        let Some(open) = &a.open else { return };
        let Ok(item) = StreamItem::decode(open.item.as_slice()) else {
            return;
        };
        let Ok(key) = keys::public_key_from_bytes(&a.public_key) else {
            return;
        };
        let era = self.era.as_ref().map_or(0, |e| e.number);
        if item.era != era
            || item.seq != 0
            || item.identity == MASTER_IDENTITY
            || !matches!(item.body, Some(ItemBody::Open(_)))
            || !keys::verify(&key, &open.item, &open.signature)
        {
            return;
        }
        let sk = stream_of(&item);
        self.opens.remove(&sk);
        if self.streams.contains_key(&sk) {
            return;
        }
        let floor = a.floor.max(ts.saturating_add(1));
        self.streams.insert(
            sk.clone(),
            Stream {
                public_key: key.to_bytes(),
                floor,
                next_seq: 1,
                last_ts: 0,
                horizon: 0,
                ended: None,
                last_decided_at: now,
                decided_upto: 1,
                end_at: None,
            },
        );
        // Items of this stream decided before its admission count now.
        self.advance_decided(&sk, now);
        if let Some(body) = self.admitted_reply(&sk) {
            out.push(Effect::Admitted { stream: sk, body });
        }
    }

    pub fn stream_status(&self, now: u64) -> Vec<StreamStatus> {
        self.streams
            .iter()
            .filter(|(_, s)| s.ended.is_none())
            .map(|(sk, s)| StreamStatus {
                identity: sk.0.clone(),
                session: sk.1,
                next_seq: s.decided_upto.max(s.next_seq),
                bound: self.bound(sk, s),
                idle_micros: now.saturating_sub(s.last_decided_at),
            })
            .collect()
    }

    pub fn pending_items(&self) -> usize {
        self.slots.len()
    }

    /// Entries applied from `from` on, for a watcher (None when no longer kept).
    pub fn replay_from(&self, from: u64) -> Option<Vec<AppliedEntry>> {
        if from > self.index {
            return Some(Vec::new());
        }
        let oldest = self.recent.front().map_or(self.index + 1, |e| e.index);
        if from < oldest {
            return None;
        }
        Some(self.recent.iter().filter(|e| e.index >= from).cloned().collect())
    }
}

#[cfg(test)]
#[path = "order_tests.rs"]
mod tests;
