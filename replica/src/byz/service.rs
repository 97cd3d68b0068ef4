//! The I/O shell of a Byzantine-mode replica: the `Byzantine` gRPC service (clients submit
//! signed items, peers relay them, the master starts eras), the `Admin` status, the ticker
//! that drives [`Core::tick`], per-peer relay senders, the storage thread and the signed
//! `Watch` stream. All protocol decisions are in [`super::order`].

use super::inject::Behaviour;
use super::keys;
use super::order::{Core, Effect, EraParams, Offer, Precheck, SlotKey, Stability, StreamKey, Timing};
use super::{now_micros, prepare, sign_relays, verify_prepared};
use crate::metrics::Metrics;
use crate::writer::{StorageOp, WriterHandle};
use ed25519_dalek::SigningKey;
use lockstep_proto::{
    AppliedEntry, ByzStatus, Configuration, Era, EraAck, FetchSnapshotRequest, MachineIdentity, Member, MemberRole,
    PeerProgress, RelayAck, RelayBatch, Relayed, ReplyBody, ResumeRequest, ResumeResponse, SealRequest, SealResponse,
    SignedApplied, SignedEra, SignedItem, SignedReply, Snapshot, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse, SubmitAnswer, WatchRequest, admin_server::Admin, byzantine_client::ByzantineClient,
    byzantine_server::Byzantine, stream_item::Body as ItemBody,
};
use prost::Message;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How long a submitted command waits for its execution before the client is told to retry.
const EXECUTE_TIMEOUT: Duration = Duration::from_secs(20);
/// Open requests are shown to the master this long.
const OPEN_SHOWN_US: u64 = 30_000_000;
/// Items per relay message ...
const RELAY_BATCH: usize = 512;
/// ... and their bytes: a quarter of the largest message, so that chains and the item of a
/// batch that is alone over it still fit (512 items of 64 KiB values were 32 MiB, over the
/// gRPC limit, and failed forever).
const RELAY_BATCH_BYTES: usize = lockstep_proto::MAX_MESSAGE_BYTES / 4;
/// Unacknowledged relays kept for one peer while it cannot be reached.
const RELAY_BACKLOG: usize = 100_000;
pub const ERA_FILE: &str = "era";
/// Relayed items remembered per peer to recognise replays (their hashes, oldest forgotten).
const RELAYED_REMEMBERED: usize = 200_000;

/// What each peer relayed in this era, to recognise a replay without looking at clocks: an
/// honest replica relays an item once, when it first accepts it, and marks a batch it sends
/// again after a failure as `retry`. (Judging by the item's age named slow honest replicas
/// on a loaded machine.)
#[derive(Default)]
struct RelayedBy {
    era: u64,
    peers: HashMap<String, (std::collections::HashSet<u64>, VecDeque<u64>)>,
}

impl RelayedBy {
    /// Records that `peer` relayed `bytes` in `era`; true when it had relayed them before.
    fn repeated(&mut self, era: u64, peer: &str, bytes: &[u8]) -> bool {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        if era != self.era {
            self.era = era;
            self.peers.clear();
        }
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(bytes);
        let (set, order) = self.peers.entry(peer.to_string()).or_default();
        if !set.insert(h) {
            return true;
        }
        order.push_back(h);
        if order.len() > RELAYED_REMEMBERED
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        false
    }
}

/// Ordering parameters from flags/env (the operator sets them from `spec.ordering`).
#[derive(Clone, Debug)]
pub struct OrderingArgs {
    pub stability: Stability,
    pub delay_us: u64,
    pub skew_us: u64,
}

pub struct ByzShared {
    pub id: String,
    core: Mutex<Core>,
    signing: SigningKey,
    master_key: ed25519_dalek::VerifyingKey,
    pub writer: WriterHandle,
    durable: Mutex<u64>,
    waiters: Mutex<HashMap<SlotKey, Vec<oneshot::Sender<SignedReply>>>>,
    open_waiters: Mutex<HashMap<StreamKey, Vec<oneshot::Sender<SignedReply>>>>,
    deferred: Mutex<BTreeMap<u64, Vec<(SlotKey, ReplyBody)>>>,
    wake: Notify,
    relays: Mutex<Vec<mpsc::UnboundedSender<Relayed>>>,
    peers_applied: Mutex<BTreeMap<String, u64>>,
    relayed_by: Mutex<RelayedBy>,
    pub applied_tx: broadcast::Sender<SignedApplied>,
    pub metrics: Metrics,
    data_dir: PathBuf,
    pub ordering: OrderingArgs,
    pub inject: Option<Behaviour>,
    snapshot_every: u64,
    last_snapshot: Mutex<u64>,
    era_lock: tokio::sync::Mutex<()>,
    /// The encoded SignedEra of the current era (reported in status for clients).
    signed_era: Mutex<Vec<u8>>,
    /// What this replica recovered from disk, until it first joins an era (`recovery`).
    recovered: Mutex<Option<super::recovery::RecoveredLog>>,
    /// The era this replica was in when it stopped (from its data dir; 0: none). It cannot
    /// rejoin that era (its streams and relays are gone) and must not rebuild that era's start
    /// state from its log (that would drop what the era ran): it waits for a later one.
    left_era: u64,
    transport: crate::tls::Transport,
    /// When the last late item was logged (local microseconds).
    late_warned: AtomicU64,
}

/// Late items are logged at most this often (each one is counted).
const LATE_WARNING_EVERY_US: u64 = 10_000_000;

impl ByzShared {
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn injected(&self, b: Behaviour) -> bool {
        self.inject == Some(b)
    }

    /// What this replica says (after the injected faults that change it), encoded.
    fn reply_bytes(&self, mut body: ReplyBody) -> Vec<u8> {
        if self.injected(Behaviour::WrongOutput) && (body.seq > 0 || !body.output.is_empty()) {
            body.output = br#"{"previous":"forged-by-a-faulty-replica","value":"forged"}"#.to_vec();
        }
        if self.injected(Behaviour::WrongVersion)
            && let Some(m) = body.machine.as_mut()
        {
            m.version = "6.6.6".into();
        }
        body.encode_to_vec()
    }

    /// Sign one reply.
    fn sign_reply(&self, body: ReplyBody) -> SignedReply {
        let bytes = self.reply_bytes(body);
        SignedReply {
            signature: keys::sign(&self.signing, &bytes),
            body: bytes,
            path: Vec::new(),
            position: 0,
        }
    }

    /// Sign replies that are ready together (one storage batch made them durable): one
    /// signature over the root of a Merkle tree of their digests, each reply with its path.
    /// A signed reply still binds this replica to exactly that answer, checkable by anyone
    /// with its public key (`keys::verify_reply`); a single reply is signed by itself.
    fn sign_replies(&self, bodies: Vec<ReplyBody>) -> Vec<SignedReply> {
        if bodies.len() == 1 {
            return bodies.into_iter().map(|b| self.sign_reply(b)).collect();
        }
        let encoded: Vec<Vec<u8>> = bodies.into_iter().map(|b| self.reply_bytes(b)).collect();
        let digests: Vec<[u8; 32]> = encoded.iter().map(|b| keys::sha256(b)).collect();
        let (root, paths) = keys::merkle_tree(&digests);
        let signature = keys::sign(&self.signing, &keys::reply_batch_message(&root));
        encoded
            .into_iter()
            .zip(paths)
            .enumerate()
            .map(|(position, (body, path))| SignedReply {
                body,
                signature: signature.clone(),
                path,
                position: position as u64,
            })
            .collect()
    }

    fn sign_applied(&self, mut e: AppliedEntry) -> SignedApplied {
        if self.injected(Behaviour::WrongOutput) {
            e.output = b"forged".to_vec();
        }
        let bytes = e.encode_to_vec();
        SignedApplied {
            replica: self.id.clone(),
            signature: keys::sign(&self.signing, &bytes),
            entry: bytes,
        }
    }

    /// Answer whoever waits for these slots, the replies signed together. Call without the
    /// core's lock (signing is the costly part).
    fn answer_all(&self, replies: Vec<(SlotKey, ReplyBody)>) {
        let (waiting, bodies): (Vec<_>, Vec<_>) = {
            let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            replies
                .into_iter()
                .filter_map(|(slot, body)| w.remove(&slot).map(|ws| (ws, body)))
                .unzip()
        };
        if bodies.is_empty() {
            return;
        }
        for (ws, signed) in waiting.into_iter().zip(self.sign_replies(bodies)) {
            for w in ws {
                let _ = w.send(signed.clone());
            }
        }
    }

    /// Carry out what the core decided. Returns the replies to send now, for
    /// [`ByzShared::answer_all`] once the core's lock is released.
    #[must_use]
    fn handle(&self, effects: Vec<Effect>) -> Vec<(SlotKey, ReplyBody)> {
        let mut now = Vec::new();
        let mut appends = Vec::new();
        for e in effects {
            match e {
                Effect::Log(entry) => appends.push(entry),
                Effect::Reply {
                    slot,
                    body,
                    durable_after,
                } => {
                    tracing::debug!(identity = %slot.0, seq = slot.2, index = body.index, "executed");
                    let durable = *self.durable.lock().unwrap_or_else(|e| e.into_inner());
                    if durable_after <= durable {
                        now.push((slot, body));
                    } else {
                        self.deferred
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(durable_after)
                            .or_default()
                            .push((slot, body));
                    }
                }
                Effect::Admitted { stream, body } => {
                    let waiters = self
                        .open_waiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&stream);
                    if let Some(waiters) = waiters {
                        let signed = self.sign_reply(body);
                        for w in waiters {
                            let _ = w.send(signed.clone());
                        }
                    }
                }
                Effect::Barrier { index, snapshot } => {
                    if !appends.is_empty() {
                        self.writer.send(StorageOp::Append(std::mem::take(&mut appends)));
                    }
                    tracing::info!(index, digest = %hex::encode(&snapshot.digest), "at a barrier: snapshot taken, waiting for the next era");
                    *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) = index;
                    self.writer.send(StorageOp::Snapshot(snapshot));
                }
                Effect::Applied(entry) => {
                    if self.applied_tx.receiver_count() > 0 {
                        let _ = self.applied_tx.send(self.sign_applied(entry));
                    }
                }
            }
        }
        if !appends.is_empty() {
            self.metrics
                .commands
                .get_or_create(&crate::metrics::ResultLabel { result: "ok".into() })
                .inc_by(appends.len() as u64);
            self.writer.send(StorageOp::Append(appends));
        }
        now
    }

    fn on_durable(&self, index: u64) {
        *self.durable.lock().unwrap_or_else(|e| e.into_inner()) = index;
        let ready: Vec<(SlotKey, ReplyBody)> = {
            let mut d = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
            let later = d.split_off(&(index + 1));
            let now = std::mem::replace(&mut *d, later);
            now.into_values().flatten().collect()
        };
        self.answer_all(ready);
    }

    /// Queue an accepted item for every peer; each peer's sender adds this replica's relay
    /// signature, once per batch it sends ([`sign_relays`]).
    fn relay(&self, signed: &SignedItem, chain: Vec<lockstep_proto::ChainSig>) {
        if self.injected(Behaviour::Silent) {
            return;
        }
        let relayed = Relayed {
            item: Some(signed.clone()),
            chain,
        };
        let senders = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        for (i, tx) in senders.iter().enumerate() {
            if self.injected(Behaviour::EquivocateRelays) {
                // Each peer gets a different altered copy of what the client signed.
                let mut bad = relayed.clone();
                if let Some(item) = bad.item.as_mut() {
                    let pos = i % item.item.len().max(1);
                    if let Some(b) = item.item.get_mut(pos) {
                        *b ^= 0x55;
                    }
                }
                let _ = tx.send(bad);
                continue;
            }
            let _ = tx.send(relayed.clone());
        }
    }

    /// An item from `from` arrived `by_us` after its acceptance window: counted by sender
    /// (`lockstep_replica_byz_late_items_total`), and said in the log at most every 10 s.
    /// Not evidence of a fault: a slow network or an overloaded machine does it too.
    fn late(&self, from: &str, by_us: u64) {
        self.metrics.late_item(from);
        let now = now_micros();
        let last = self.late_warned.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= LATE_WARNING_EVERY_US
            && self
                .late_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                from,
                late_ms = by_us as f64 / 1000.0,
                "an item arrived after its acceptance window and was ignored here: the delay bound \
                 (spec.ordering.maxDelayMillis, and maxClockSkewMillis for PhysicalClock) did not hold \
                 for it; if this repeats, raise it (lockstep_replica_byz_late_items_total counts them)"
            );
        }
    }

    /// Verify and offer one item (from a client, or relayed by `from`). Returns whether it
    /// was accepted, or why it was refused.
    fn ingest(&self, signed: &SignedItem, chain: &[lockstep_proto::ChainSig], from: &str) -> Result<bool, String> {
        let now = now_micros();
        let prepared = {
            let mut core = self.lock();
            match prepare(&core, signed, now) {
                Ok(p) => p,
                Err(why) => {
                    core.note(from, "undecodable-item");
                    return Err(why);
                }
            }
        };
        match &prepared.check {
            Precheck::Known => {
                return Ok(false);
            }
            Precheck::Reject(why) => {
                self.lock().note(from, "refused-item");
                return Err(why.clone());
            }
            Precheck::Verify { .. } => {}
        }
        let valid = match verify_prepared(&prepared, signed, chain) {
            Ok(v) => v,
            Err(why) => {
                self.lock().note(from, "bad-signature");
                return Err(why);
            }
        };
        if matches!(prepared.item.body, Some(ItemBody::Open(_))) {
            return Ok(true);
        }
        let offer = self.lock().offer(signed.clone(), prepared.item, valid, now_micros());
        match offer {
            Offer::Accepted { chain } => {
                self.relay(signed, chain);
                self.wake.notify_one();
                Ok(true)
            }
            Offer::Ignored(_) => Ok(false),
            Offer::Late(by_us) => {
                self.late(from, by_us);
                Ok(false)
            }
            Offer::Rejected(why) => Err(why),
        }
    }
}

/// The ticker: decide what is due, execute what is stable, act on it.
async fn ticker(shared: Arc<ByzShared>) {
    loop {
        let deadline = shared.lock().next_deadline();
        let now = now_micros();
        let wait = deadline.map_or(Duration::from_millis(50), |d| {
            Duration::from_micros(d.saturating_sub(now)).min(Duration::from_millis(50))
        });
        if !wait.is_zero() {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let (effects, replies) = {
            let mut core = shared.lock();
            let effects = core.tick(now_micros());
            let snapshot = {
                let mut last = shared.last_snapshot.lock().unwrap_or_else(|e| e.into_inner());
                // Not before the first era: the recovered log must stay rebuildable from its snapshot.
                let due = core.index >= *last + shared.snapshot_every && core.era.is_some();
                (due && core.barrier.is_none()).then(|| {
                    *last = core.index;
                    core.snapshot()
                })
            };
            // Queue storage ops while holding the core lock: the log reaches the disk in order.
            let replies = shared.handle(effects);
            if let Some(s) = snapshot.clone() {
                shared.writer.send(StorageOp::Snapshot(s));
            }
            (core.index, replies)
        };
        shared.answer_all(replies);
        shared.metrics.applied_index.set(effects as i64);
    }
}

/// One task per peer: drain relayed items and send them in batches.
fn spawn_relay_sender(
    shared: Arc<ByzShared>,
    peer: String,
    endpoint: String,
    era: u64,
) -> mpsc::UnboundedSender<Relayed> {
    let (tx, rx) = mpsc::unbounded_channel::<Relayed>();
    tokio::spawn(async move {
        let Some(channel) = crate::peers::connect_lazy(&shared.transport, &endpoint) else {
            tracing::error!(peer, endpoint, "invalid peer endpoint");
            return;
        };
        let client = ByzantineClient::new(channel)
            .max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
        let replay = shared.injected(Behaviour::ReplayRequests);
        let forge = shared.injected(Behaviour::ForgeRequests);
        RelaySender {
            shared,
            peer,
            era,
            client,
            rx,
            replay,
            forge,
            history: Vec::new(),
            pending: VecDeque::new(),
            failures: 0,
        }
        .run()
        .await;
    });
    tx
}

/// The task that relays items to one peer for one era.
struct RelaySender {
    shared: Arc<ByzShared>,
    peer: String,
    era: u64,
    client: ByzantineClient<tonic::transport::Channel>,
    rx: mpsc::UnboundedReceiver<Relayed>,
    /// Fault injection: send what was relayed before again.
    replay: bool,
    /// Fault injection: add forged items.
    forge: bool,
    history: Vec<Relayed>,
    /// What this peer has not acknowledged yet, oldest first. A relay that fails (the peer
    /// is not up yet, its name does not resolve yet, it has not started this era yet) is
    /// sent again: a replica that misses relays can never execute past the gap.
    pending: VecDeque<Relayed>,
    /// Failed relays in a row.
    failures: u32,
}

impl RelaySender {
    /// Until the channel closes or the era ends: gather what is pending, send a batch of it.
    async fn run(mut self) {
        loop {
            if !self.gather().await {
                return;
            }
            self.trim_backlog();
            let take = relay_batch_len(&self.pending);
            let items = self.batch_items(take);
            self.send(take, items).await;
            if self.shared.lock().era.as_ref().map_or(0, |e| e.number) != self.era {
                return;
            }
        }
    }

    /// With nothing pending, wait for a relay; then take every one queued (false: the channel
    /// is closed).
    async fn gather(&mut self) -> bool {
        if self.pending.is_empty() {
            match self.rx.recv().await {
                Some(r) => self.pending.push_back(r),
                None => return false,
            }
        }
        while let Ok(r) = self.rx.try_recv() {
            self.pending.push_back(r);
        }
        true
    }

    /// Past [`RELAY_BACKLOG`], drop the oldest relays.
    fn trim_backlog(&mut self) {
        if self.pending.len() > RELAY_BACKLOG {
            let dropped = self.pending.len() - RELAY_BACKLOG;
            self.pending.drain(..dropped);
            tracing::warn!(
                peer = self.peer,
                dropped,
                "relay backlog full: oldest relays dropped (the peer will need a new era to catch up)"
            );
        }
    }

    /// The first `take` pending relays, signed for this era (with the injected faults).
    fn batch_items(&mut self, take: usize) -> Vec<Relayed> {
        let mut items: Vec<Relayed> = self.pending.iter().take(take).cloned().collect();
        sign_relays(&self.shared.id, &self.shared.signing, self.era, &mut items);
        if self.replay {
            // Send what was relayed before again, alongside the new items.
            let old: Vec<Relayed> = self.history.iter().take(8).cloned().collect();
            self.history.extend(items.iter().cloned());
            self.history.truncate(1000);
            items.extend(old);
        }
        if self.forge {
            items.extend(forgeries(&self.shared, &items));
        }
        items
    }

    /// Send `items`: acknowledged, the first `take` pending relays are done; failed, back off.
    async fn send(&mut self, take: usize, items: Vec<Relayed>) {
        let applied_index = self.shared.lock().index;
        let batch = RelayBatch {
            from: self.shared.id.clone(),
            era: self.era,
            applied_index,
            items,
            retry: self.failures > 0,
        };
        let mut req = Request::new(batch);
        req.set_timeout(Duration::from_secs(2));
        match self.client.relay(req).await {
            Ok(_) => {
                self.pending.drain(..take);
                self.failures = 0;
            }
            Err(status) => {
                self.failures += 1;
                let failures = self.failures;
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(peer = self.peer, failures, backlog = self.pending.len(), error = %status.message(), "relay failed: will retry");
                }
                let backoff = Duration::from_millis(20u64 << failures.min(7)).min(Duration::from_secs(2));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// How many of the oldest pending relays go in the next message: at most [`RELAY_BATCH`] and
/// [`RELAY_BATCH_BYTES`] of items, and at least one.
fn relay_batch_len(pending: &VecDeque<Relayed>) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for r in pending.iter().take(RELAY_BATCH) {
        bytes += r.item.as_ref().map_or(0, |i| i.item.len() + i.signature.len());
        if n > 0 && bytes > RELAY_BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// Fault injection: each item under a signature that is not the client's, and an item from a
/// client nobody registered.
fn forgeries(shared: &ByzShared, items: &[Relayed]) -> Vec<Relayed> {
    let mut fakes = Vec::new();
    for r in items {
        let Some(item) = &r.item else { continue };
        let mut f = item.clone();
        f.signature = keys::sign(&shared.signing, &f.item);
        fakes.push(Relayed {
            item: Some(f),
            chain: r.chain.clone(),
        });
        if let Ok(mut si) = lockstep_proto::StreamItem::decode(item.item.as_slice()) {
            si.identity = "mallory".into();
            fakes.push(Relayed {
                item: Some(super::sign_item(&shared.signing, &si)),
                chain: Vec::new(),
            });
        }
    }
    fakes
}

#[derive(Clone)]
pub struct ByzServices {
    pub shared: Arc<ByzShared>,
}

fn reply_wait_status() -> Status {
    Status::unavailable("outcome unknown: not executed in time here; retry with the same item")
}

/// What submitting one item comes to, before any waiting: the same for a unary `Submit` and
/// for an item on a `SubmitStream`.
enum Submitted {
    /// Answer this now (a cached reply, an admission already known, a refusal).
    Now(Result<SignedReply, Status>),
    /// The answer comes when the item has run (or not within [`EXECUTE_TIMEOUT`]).
    Later(Waiting),
    /// Accepted; nothing to vote on (a no-op, a close).
    Accepted,
    /// Injected fault `silent`: taken in, never answered.
    Silent,
}

/// An item whose answer is awaited: where it comes, and, for an ordered item under
/// `PhysicalClock` (not an open, which the master admits), its slot, timestamp and the local
/// time by which it has run or never will (`Core::physical_final_at`).
struct Waiting {
    rx: oneshot::Receiver<SignedReply>,
    late_check: Option<(SlotKey, u64, u64)>,
}

impl ByzShared {
    /// Take a client's item in: verify, offer, and say what the client gets.
    fn submit_item(&self, signed: &SignedItem) -> Submitted {
        let item = match lockstep_proto::StreamItem::decode(signed.item.as_slice()) {
            Ok(i) => i,
            Err(e) => return Submitted::Now(Err(Status::invalid_argument(format!("undecodable item: {e}")))),
        };
        if self.injected(Behaviour::Silent) {
            // Accept nothing visibly, answer nobody.
            let _ = self.ingest(signed, &[], "client -");
            return Submitted::Silent;
        }
        let slot: SlotKey = (item.identity.clone(), item.session, item.seq);
        let is_open = matches!(item.body, Some(ItemBody::Open(_)));
        let wants_reply = matches!(
            item.body,
            Some(ItemBody::Command(_)) | Some(ItemBody::Query(_)) | Some(ItemBody::Batch(_))
        );
        let (tx, rx) = oneshot::channel();
        if is_open {
            self.open_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((item.identity.clone(), item.session))
                .or_default()
                .push(tx);
        } else if wants_reply {
            if let Some(body) = self.lock().cached_reply(&slot) {
                return Submitted::Now(Ok(self.sign_reply(body)));
            }
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(slot.clone())
                .or_default()
                .push(tx);
        }
        tracing::debug!(identity = %item.identity, seq = item.seq, ts = item.ts, "submitted");
        let who = format!("client {}", item.identity);
        if let Err(why) = self.ingest(signed, &[], &who) {
            self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
            return Submitted::Now(Err(Status::permission_denied(why)));
        }
        let mut late_check = None;
        if is_open {
            let admitted = {
                let mut core = self.lock();
                core.offer_open(signed.clone(), &item, now_micros())
            };
            if let Some(body) = admitted {
                return Submitted::Now(Ok(self.sign_reply(body)));
            }
        } else if !wants_reply {
            // No-ops and closes: accepted; nothing to vote on.
            return Submitted::Accepted;
        } else {
            let (cached, final_at) = {
                let core = self.lock();
                (core.cached_reply(&slot), core.physical_final_at(item.ts))
            };
            if let Some(body) = cached {
                return Submitted::Now(Ok(self.sign_reply(body)));
            }
            late_check = final_at.map(|at| (slot, item.ts, at));
        }
        Submitted::Later(Waiting { rx, late_check })
    }

    /// Wait for an item's execution and sign the answer. Under `PhysicalClock` an item that no
    /// version of reached this replica in its window by the time it would have run never runs
    /// here, nor at any correct replica (they agree on what is in): it is refused then, signed
    /// like any answer, instead of left to the client's timeout.
    async fn answer_when_run(&self, w: Waiting) -> Result<SignedReply, Status> {
        let Waiting { mut rx, late_check } = w;
        if let Some((slot, ts, final_at)) = late_check {
            let wait = Duration::from_micros(final_at.saturating_sub(now_micros()));
            match tokio::time::timeout(wait, &mut rx).await {
                Ok(Ok(signed)) => return Ok(signed),
                Ok(Err(_)) => return Err(reply_wait_status()),
                Err(_) => {
                    let refusal = self.lock().late_refusal(&slot, ts);
                    if let Some(body) = refusal {
                        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
                        return Ok(self.sign_reply(body));
                    }
                }
            }
        }
        match tokio::time::timeout(EXECUTE_TIMEOUT, rx).await {
            Ok(Ok(signed)) => Ok(signed),
            _ => Err(reply_wait_status()),
        }
    }
}

fn stream_answer(session: u64, seq: u64, r: Result<SignedReply, Status>) -> SubmitAnswer {
    match r {
        Ok(reply) => SubmitAnswer {
            session,
            seq,
            reply: Some(reply),
            refused: String::new(),
        },
        Err(status) => SubmitAnswer {
            session,
            seq,
            reply: None,
            refused: status.message().to_string(),
        },
    }
}

/// Serve one client's `SubmitStream`: take its items in as they come (in order, on this one
/// HTTP/2 stream) and send each answer when it is ready, tagged by its slot.
async fn serve_submit_stream(
    shared: Arc<ByzShared>,
    mut items: tonic::Streaming<SignedItem>,
    tx: mpsc::Sender<Result<SubmitAnswer, Status>>,
) {
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;
    type Waiting = Pin<Box<dyn std::future::Future<Output = SubmitAnswer> + Send>>;
    let mut waiting: FuturesUnordered<Waiting> = FuturesUnordered::new();
    let mut incoming = true;
    loop {
        if !incoming && waiting.is_empty() {
            return;
        }
        let answer = tokio::select! {
            next = items.message(), if incoming => match next {
                Ok(Some(signed)) => {
                    let (session, seq, close) = match lockstep_proto::StreamItem::decode(signed.item.as_slice()) {
                        Ok(i) => (i.session, i.seq, matches!(i.body, Some(ItemBody::Close(_)))),
                        Err(_) => (0, 0, false),
                    };
                    match shared.submit_item(&signed) {
                        Submitted::Now(r) => stream_answer(session, seq, r),
                        Submitted::Later(w) => {
                            let shared = shared.clone();
                            waiting.push(Box::pin(async move {
                                stream_answer(session, seq, shared.answer_when_run(w).await)
                            }));
                            continue;
                        }
                        // A close is acknowledged (a client awaits it before it exits).
                        Submitted::Accepted if close => stream_answer(session, seq, Ok(SignedReply::default())),
                        Submitted::Accepted | Submitted::Silent => continue,
                    }
                }
                // The client closed its side (or went away): answer what is still running.
                _ => {
                    incoming = false;
                    continue;
                }
            },
            Some(answer) = waiting.next(), if !waiting.is_empty() => answer,
            _ = tx.closed() => return,
        };
        if tx.send(Ok(answer)).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Byzantine for ByzServices {
    async fn submit(&self, request: Request<SignedItem>) -> Result<Response<SignedReply>, Status> {
        let shared = &self.shared;
        match shared.submit_item(&request.into_inner()) {
            Submitted::Now(r) => r.map(Response::new),
            Submitted::Later(w) => shared.answer_when_run(w).await.map(Response::new),
            Submitted::Accepted => Ok(Response::new(SignedReply::default())),
            Submitted::Silent => std::future::pending().await,
        }
    }

    type SubmitStreamStream = Pin<Box<dyn Stream<Item = Result<SubmitAnswer, Status>> + Send>>;

    async fn submit_stream(
        &self,
        request: Request<tonic::Streaming<SignedItem>>,
    ) -> Result<Response<Self::SubmitStreamStream>, Status> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(serve_submit_stream(self.shared.clone(), request.into_inner(), tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn relay(&self, request: Request<RelayBatch>) -> Result<Response<RelayAck>, Status> {
        // With TLS the sender is who its certificate says (the layer checked it is a member).
        let caller = request.extensions().get::<crate::tls::PeerIdentity>().cloned();
        let batch = request.into_inner();
        if let Some(who) = caller
            && who.role == crate::tls::Role::Replica
            && who.name != batch.from
        {
            return Err(Status::permission_denied(format!(
                "relay claims to come from '{}' but the caller is {who}",
                batch.from
            )));
        }
        let shared = &self.shared;
        {
            let core = shared.lock();
            let known = core
                .era
                .as_ref()
                .is_some_and(|e| e.members.iter().any(|(id, _, _)| *id == batch.from));
            if !known {
                return Err(Status::permission_denied(format!(
                    "{} is not a member of this era",
                    batch.from
                )));
            }
        }
        shared
            .peers_applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(batch.from.clone(), batch.applied_index);
        if !batch.retry {
            // One lock per batch, not per item.
            let replayed = {
                let mut seen = shared.relayed_by.lock().unwrap_or_else(|e| e.into_inner());
                batch
                    .items
                    .iter()
                    .filter_map(|r| r.item.as_ref())
                    .filter(|item| seen.repeated(batch.era, &batch.from, &item.item))
                    .count()
            };
            if replayed > 0 {
                let mut core = shared.lock();
                for _ in 0..replayed {
                    core.note(&batch.from, "replayed-item");
                }
            }
        }
        for r in batch.items {
            let Some(item) = r.item else { continue };
            let _ = shared.ingest(&item, &r.chain, &batch.from);
        }
        Ok(Response::new(RelayAck {}))
    }

    async fn start_era(&self, request: Request<SignedEra>) -> Result<Response<EraAck>, Status> {
        let signed = request.into_inner();
        start_era(&self.shared, signed).await.map(Response::new)
    }

    async fn fetch_snapshot(&self, request: Request<FetchSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        let index = request.into_inner().index;
        let mut snap = self.shared.state_at(index)?;
        if self.shared.injected(Behaviour::CorruptSnapshot) {
            if let Some(b) = snap.data.last_mut() {
                *b ^= 0xff;
            }
            snap.data.extend_from_slice(b"corrupt");
        }
        Ok(Response::new(snap))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<SignedApplied, Status>> + Send>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let from = request.into_inner().from_index;
        let shared = self.shared.clone();
        let mut live = shared.applied_tx.subscribe();
        let replay = {
            let core = shared.lock();
            if from == 0 {
                Vec::new()
            } else {
                core.replay_from(from)
                    .ok_or_else(|| Status::out_of_range(format!("index {from} is no longer available for replay")))?
            }
        };
        let mut next = replay.last().map_or(from, |e| e.index + 1);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            if shared.injected(Behaviour::Silent) {
                std::future::pending::<()>().await;
            }
            for e in replay {
                if tx.send(Ok(shared.sign_applied(e))).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(e) => {
                        let index = AppliedEntry::decode(e.entry.as_slice()).map_or(0, |a| a.index);
                        if index < next {
                            continue;
                        }
                        next = index + 1;
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell {n} entries behind; resume with from_index {next}"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Adopt a master-signed era: check it, bring the state to its start (state transfer from a
/// member whose snapshot matches the digest the era names), then start ordering. One era at a
/// time: `era_lock` is held for the whole of it, the core's lock only between awaits.
async fn start_era(shared: &Arc<ByzShared>, signed: SignedEra) -> Result<EraAck, Status> {
    let _serial = shared.era_lock.lock().await;
    let (era, params) = shared.verify_era(&signed)?;
    let ack = EraAck { number: era.number };
    if shared.already_in(&era)? {
        return Ok(ack);
    }
    if !params.members.iter().any(|(id, _, _)| *id == shared.id) {
        shared.leave(&era);
        return Ok(ack);
    }
    reach_start_state(shared, &era, &params).await?;
    shared.enter(&era, params.clone());
    record_era(shared, &signed).await?;
    start_relay_senders(shared, &params, era.number);
    shared.metrics.epoch.set(era.number as i64);
    tracing::info!(
        era = era.number,
        start = era.start_index,
        members = params.members.len(),
        stability = params.timing.stability.as_str(),
        delay_us = params.timing.delay_us,
        "started era"
    );
    shared.wake.notify_one();
    Ok(ack)
}

/// The steps of [`start_era`] that need no await.
impl ByzShared {
    /// The era, if the configuration master signed it, with its parameters, if this replica's
    /// ordering flags agree with them.
    fn verify_era(&self, signed: &SignedEra) -> Result<(Era, EraParams), Status> {
        if !keys::verify(&self.master_key, &signed.era, &signed.signature) {
            self.lock().note("master?", "bad-era-signature");
            return Err(Status::permission_denied(
                "era is not signed by the configuration master",
            ));
        }
        let era = Era::decode(signed.era.as_slice())
            .map_err(|e| Status::invalid_argument(format!("undecodable era: {e}")))?;
        let params = era_params(&era, &self.ordering).map_err(Status::invalid_argument)?;
        Ok((era, params))
    }

    /// True when this replica is in `era` already (the master repeated it); an error when the
    /// era is older than the one it is in, or not after the one it left when it stopped.
    fn already_in(&self, era: &Era) -> Result<bool, Status> {
        let core = self.lock();
        if let Some(cur) = &core.era {
            if cur.number == era.number {
                return Ok(true);
            }
            if cur.number > era.number {
                return Err(Status::failed_precondition(format!(
                    "stale era {} (this replica is in era {})",
                    era.number, cur.number
                )));
            }
        } else if era.number <= self.left_era {
            return Err(Status::failed_precondition(format!(
                "this replica restarted out of era {} and waits for a later era (era {} offered)",
                self.left_era, era.number
            )));
        }
        Ok(false)
    }

    /// `era` does not name this replica: it leaves its era and serves nothing.
    fn leave(&self, era: &Era) {
        let mut core = self.lock();
        core.era = None;
        tracing::info!(era = era.number, "removed from the membership: serving nothing");
    }

    /// Start ordering in `era` from its start state (resuming the machine the era names, if it
    /// says to), forget the recovered log, and carry out what starting decided; the replies
    /// are signed after the core's lock is released.
    fn enter(&self, era: &Era, params: EraParams) {
        let replies = {
            let mut core = self.lock();
            let resume = era.resume.then(|| era.machine.clone()).flatten();
            let out = core.start_era(params, resume);
            *self.recovered.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.handle(out)
        };
        self.answer_all(replies);
    }
}

/// Bring the state to the era's start: it is there already, or rolls back to it in the
/// recovered log, or else fetches it from a member (the core's lock is not held while fetching).
async fn reach_start_state(shared: &Arc<ByzShared>, era: &Era, params: &EraParams) -> Result<(), Status> {
    let in_place = {
        let core = shared.lock();
        core.index == era.start_index && core.state_digest() == era.state_digest
    };
    if !in_place && !shared.roll_back_to(era)? {
        transfer_state(shared, era, params).await?;
    }
    Ok(())
}

/// Keep the signed era in the data dir (a restarted replica knows which era it left) and for
/// status, then wait until everything queued to storage before it is durable.
async fn record_era(shared: &Arc<ByzShared>, signed: &SignedEra) -> Result<(), Status> {
    lockstep_replica_write_era(&shared.data_dir, signed).map_err(|e| Status::internal(format!("{e:#}")))?;
    *shared.signed_era.lock().unwrap_or_else(|e| e.into_inner()) = signed.encode_to_vec();
    shared
        .writer
        .barrier()
        .await
        .map_err(|_| Status::internal("storage stopped"))?;
    Ok(())
}

/// New relay senders for the era's other members; the previous era's senders are dropped,
/// which ends them.
fn start_relay_senders(shared: &Arc<ByzShared>, params: &EraParams, era: u64) {
    let senders = params
        .members
        .iter()
        .filter(|(id, _, _)| *id != shared.id)
        .map(|(id, endpoint, _)| spawn_relay_sender(shared.clone(), id.clone(), endpoint.clone(), era))
        .collect();
    *shared.relays.lock().unwrap_or_else(|e| e.into_inner()) = senders;
}

fn lockstep_replica_write_era(dir: &std::path::Path, signed: &SignedEra) -> anyhow::Result<()> {
    crate::write_atomically(&dir.join(ERA_FILE), &signed.encode_to_vec())?;
    Ok(())
}

/// Fetch the era's start state from its members until one serves a snapshot whose digest is
/// the one the master signed (t+1 replicas reported it at the barrier).
async fn transfer_state(shared: &Arc<ByzShared>, era: &Era, params: &EraParams) -> Result<(), Status> {
    let mut last = String::from("no member to fetch from");
    for attempt in 0..50u32 {
        for (id, endpoint, _) in params.members.iter().filter(|(id, _, _)| *id != shared.id) {
            let Some(channel) = crate::peers::connect_lazy(&shared.transport, endpoint) else {
                continue;
            };
            let mut client = ByzantineClient::new(channel).max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
            match client
                .fetch_snapshot(FetchSnapshotRequest { index: era.start_index })
                .await
            {
                Ok(resp) => {
                    let snap = resp.into_inner();
                    let data_digest = crate::runtime::digest(&snap.data);
                    if data_digest != era.state_digest || snap.index != era.start_index {
                        tracing::warn!(peer = %id, "peer offered a snapshot that does not match the era's digest: refused");
                        shared.lock().note(id, "corrupt-snapshot");
                        last = format!("{id} offered a snapshot with the wrong digest");
                        continue;
                    }
                    let snap = Snapshot {
                        digest: data_digest,
                        ..snap
                    };
                    shared
                        .lock()
                        .install(&snap)
                        .map_err(|e| Status::internal(format!("{e:#}")))?;
                    shared.writer.send(StorageOp::Install(snap));
                    tracing::info!(from = %id, index = era.start_index, "installed the era's start state (state transfer)");
                    return Ok(());
                }
                Err(s) => last = format!("{id}: {}", s.message()),
            }
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10) + 1))).await;
    }
    Err(Status::unavailable(format!(
        "cannot get the state at index {} with the era's digest: {last}",
        era.start_index
    )))
}

pub fn era_params(era: &Era, ordering: &OrderingArgs) -> Result<EraParams, String> {
    let stability = Stability::parse(&era.stability).ok_or_else(|| format!("unknown stability '{}'", era.stability))?;
    if stability != ordering.stability
        || era.max_delay_micros != ordering.delay_us
        || era.max_skew_micros != ordering.skew_us
    {
        return Err(format!(
            "the era's ordering ({} delay {} µs skew {} µs) differs from this replica's flags ({} delay {} µs skew {} µs): \
             every replica must use the same bounds",
            era.stability,
            era.max_delay_micros,
            era.max_skew_micros,
            ordering.stability.as_str(),
            ordering.delay_us,
            ordering.skew_us
        ));
    }
    let mut members = Vec::new();
    for m in &era.members {
        let key = keys::public_key_from_bytes(&m.public_key).map_err(|e| format!("member {}: {e}", m.id))?;
        members.push((m.id.clone(), m.endpoint.clone(), key));
    }
    Ok(EraParams {
        number: era.number,
        start_index: era.start_index,
        members,
        master_session: era.master_session,
        timing: Timing {
            stability,
            t: era.faults as usize,
            delay_us: ordering.delay_us,
            skew_us: ordering.skew_us,
        },
    })
}

impl ByzShared {
    /// The state at `index`: the current one, or, before the first era, one rebuilt from the
    /// recovered log (`recovery`).
    fn state_at(&self, index: u64) -> Result<Snapshot, Status> {
        let (current, before_any_era) = {
            let core = self.lock();
            if core.index == index {
                return Ok(core.snapshot());
            }
            (core.index, core.era.is_none())
        };
        let log = self.recovered.lock().unwrap_or_else(|e| e.into_inner());
        let rebuilt = match log.as_ref().filter(|_| before_any_era) {
            Some(log) => log.state_at(index).map_err(|e| Status::internal(format!("{e:#}")))?,
            None => None,
        };
        rebuilt.ok_or_else(|| {
            let range = log
                .as_ref()
                .filter(|_| before_any_era)
                .map(|l| {
                    format!(
                        " (it can rebuild its state from {} to {})",
                        l.from_index(),
                        l.end_index()
                    )
                })
                .unwrap_or_default();
            Status::failed_precondition(format!("this replica is at index {current}, not {index}{range}"))
        })
    }

    /// Before its first era, a replica that applied past the era's start rebuilds the start
    /// state from its recovered log when that has the digest the master signed, and drops the
    /// entries after it (a recovery era after a full-cluster restart: `recovery`). False when
    /// it cannot; it then fetches the state from the members.
    fn roll_back_to(&self, era: &Era) -> Result<bool, Status> {
        let internal = |e: anyhow::Error| Status::internal(format!("{e:#}"));
        let mut core = self.lock();
        if core.era.is_some() || core.index <= era.start_index {
            return Ok(false);
        }
        let log = self.recovered.lock().unwrap_or_else(|e| e.into_inner());
        let Some(snap) = log
            .as_ref()
            .map(|l| l.state_at(era.start_index))
            .transpose()
            .map_err(internal)?
            .flatten()
            .filter(|s| s.digest == era.state_digest)
        else {
            return Ok(false);
        };
        let dropped = core.index - snap.index;
        core.install(&snap).map_err(internal)?;
        // Nothing after the start is durable any more: the install resets the log there.
        *self.durable.lock().unwrap_or_else(|e| e.into_inner()) = snap.index;
        *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snap.index;
        self.writer.send(StorageOp::Install(snap));
        tracing::warn!(
            era = era.number,
            index = era.start_index,
            dropped,
            "rolled back to the era's start state: the recovered log went further than t + 1 replicas vouch for"
        );
        Ok(true)
    }

    /// What this replica reports to the operator, `lockstep status` and clients, read under
    /// one hold of the core's lock so that the parts agree with each other.
    pub fn status(&self) -> StatusResponse {
        let now = now_micros();
        let core = self.lock();
        let peers = self.peers_applied.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sealed_at = core.runtime().sealed_at().unwrap_or(0);
        let era_number = core.era.as_ref().map_or(0, |e| e.number);
        StatusResponse {
            id: self.id.clone(),
            epoch: era_number,
            state: status_state(&core, sealed_at).into(),
            applied_index: core.index,
            commit_index: core.index,
            last_index: core.index,
            machine: Some(self.reported_machine(&core)),
            config: core.era.as_ref().map(era_configuration),
            launched_image: crate::server::launched_image(),
            sealed_at,
            sealed_digest: if sealed_at > 0 {
                core.barrier.as_ref().map(|b| b.1.clone()).unwrap_or_default()
            } else {
                Vec::new()
            },
            peers: peers
                .into_iter()
                .map(|(id, match_index)| PeerProgress {
                    id,
                    match_index,
                    reachable: true,
                })
                .collect(),
            snapshot_index: *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()),
            durable: true,
            byzantine: Some(self.byz_status(&core, now, era_number)),
        }
    }

    /// The machine this replica says it runs (a replica injected with `WrongVersion` lies).
    fn reported_machine(&self, core: &Core) -> MachineIdentity {
        let mut machine = core.machine.clone();
        if self.injected(Behaviour::WrongVersion) {
            machine.version = "6.6.6".into();
        }
        machine
    }

    /// The part of [`ByzShared::status`] only Byzantine mode has: the barrier, open requests
    /// and streams the master acts on, evidence against others, and what a restarted replica
    /// can recover from. Called with the core's lock held (`core`).
    fn byz_status(&self, core: &Core, now: u64, era_number: u64) -> ByzStatus {
        ByzStatus {
            era: era_number,
            public_key: self.signing.verifying_key().to_bytes().to_vec(),
            barrier_index: core.barrier.as_ref().map_or(0, |b| b.0),
            barrier_digest: core.barrier.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            pending_opens: core.pending_opens(now, OPEN_SHOWN_US),
            streams: core.stream_status(now),
            evidence: core.evidence(),
            pending_items: core.pending_items() as u64,
            inject: self.inject.map(|b| b.name().to_string()).unwrap_or_default(),
            left_era: self.left_era,
            recoverable_from: match (&core.era, &*self.recovered.lock().unwrap_or_else(|e| e.into_inner())) {
                (None, Some(log)) => log.from_index(),
                _ => core.index,
            },
            signed_era: if core.era.is_some() {
                self.signed_era.lock().unwrap_or_else(|e| e.into_inner()).clone()
            } else {
                Vec::new()
            },
        }
    }
}

/// The replica's state as status names it: in no era yet, a member, stopped at a barrier for
/// the next era, or sealed.
fn status_state(core: &Core, sealed_at: u64) -> &'static str {
    match (&core.era, &core.barrier) {
        (None, _) => "unconfigured",
        (Some(_), Some(_)) if sealed_at > 0 => "sealed",
        (Some(_), Some(_)) => "barrier",
        (Some(_), None) if sealed_at > 0 => "sealed",
        (Some(_), None) => "member",
    }
}

/// An era's membership as the fail-stop `Configuration` status reports (every member a voter,
/// no primary).
fn era_configuration(era: &EraParams) -> Configuration {
    Configuration {
        epoch: era.number,
        primary_id: String::new(),
        members: era
            .members
            .iter()
            .map(|(id, ep, _)| Member {
                id: id.clone(),
                endpoint: ep.clone(),
                role: MemberRole::Voter as i32,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Admin for ByzServices {
    async fn reconfigure(
        &self,
        _: Request<lockstep_proto::ReconfigureRequest>,
    ) -> Result<Response<lockstep_proto::ReconfigureResponse>, Status> {
        Err(Status::failed_precondition(
            "Byzantine replicas take their membership from master-signed eras (Byzantine/StartEra), not Reconfigure",
        ))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.shared.status()))
    }

    async fn seal(&self, _: Request<SealRequest>) -> Result<Response<SealResponse>, Status> {
        Err(Status::failed_precondition(
            "in Byzantine mode the seal is an ordered item of the configuration master's stream",
        ))
    }

    async fn resume(&self, _: Request<ResumeRequest>) -> Result<Response<ResumeResponse>, Status> {
        Err(Status::failed_precondition(
            "in Byzantine mode a sealed cluster resumes with the next master-signed era",
        ))
    }

    async fn take_snapshot(&self, _: Request<SnapshotRequest>) -> Result<Response<SnapshotResponse>, Status> {
        let snap = {
            let core = self.shared.lock();
            if core.era.is_none()
                && self
                    .shared
                    .recovered
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some()
            {
                // A snapshot now would compact away the log a recovery era may roll back into.
                return Err(Status::failed_precondition(
                    "this replica waits for an era after a restart: its recovered log is kept as it is until then",
                ));
            }
            core.snapshot()
        };
        let index = snap.index;
        self.shared.writer.send(StorageOp::Snapshot(snap));
        Ok(Response::new(SnapshotResponse { index }))
    }
}

/// Everything a Byzantine replica needs besides the common replica flags.
pub struct ByzConfig {
    pub key_file: Option<PathBuf>,
    pub master_public_key: ed25519_dalek::VerifyingKey,
    pub client_identities: Option<PathBuf>,
    pub ordering: OrderingArgs,
    pub inject: Option<Behaviour>,
    /// How this replica reaches its peers (mutual TLS or plaintext).
    pub transport: crate::tls::Transport,
}

/// Start a Byzantine replica: recover, serve, tick. Returns the shared state and the gRPC
/// services to mount; the caller owns the listeners.
pub fn build(
    args: &crate::ReplicaArgs,
    cfg: ByzConfig,
    factory: crate::machine::MachineFactory,
) -> anyhow::Result<(Arc<ByzShared>, ByzServices)> {
    let signing = signing_key(args, cfg.key_file.as_ref())?;
    let directory = match &cfg.client_identities {
        Some(dir) => keys::load_identity_dir(dir)?,
        None => BTreeMap::new(),
    };
    let (storage, recovered) = open_storage(args)?;
    let recovery = recover(args, &cfg, directory, &storage, recovered, factory)?;
    tracing::info!(id = %args.id, index = recovery.core.index, "recovered from disk; waiting for an era from the configuration master");
    let shared = share(args, cfg, signing, storage, recovery);
    {
        let index = shared.lock().index;
        *shared.durable.lock().unwrap_or_else(|e| e.into_inner()) = index;
    }
    tokio::spawn(ticker(shared.clone()));
    let services = ByzServices { shared: shared.clone() };
    Ok((shared, services))
}

/// The replica's signing key (`key_file`, or one made on first start in the data directory),
/// its public half written beside it.
fn signing_key(args: &crate::ReplicaArgs, key_file: Option<&PathBuf>) -> anyhow::Result<SigningKey> {
    let key_path = key_file
        .cloned()
        .unwrap_or_else(|| args.data_dir.join(keys::REPLICA_KEY_FILE));
    std::fs::create_dir_all(&args.data_dir)?;
    let signing = if key_file.is_some() {
        keys::load_signing_key(&key_path)?
    } else {
        keys::load_or_create_signing_key(&key_path)?
    };
    crate::write_atomically(
        &args.data_dir.join(keys::REPLICA_PUB_FILE),
        keys::encode_key(&signing.verifying_key().to_bytes()).as_bytes(),
    )?;
    Ok(signing)
}

/// The data directory's storage, which must be this replica's (a fresh one becomes it).
fn open_storage(args: &crate::ReplicaArgs) -> anyhow::Result<(crate::storage::Storage, crate::storage::Recovered)> {
    use anyhow::Context;
    let opts = crate::storage::StorageOptions {
        fsync: !args.no_fsync,
        ..Default::default()
    };
    let (mut storage, recovered) = crate::storage::Storage::open(&args.data_dir, opts)
        .with_context(|| format!("cannot open data dir {}", args.data_dir.display()))?;
    match &recovered.identity {
        Some(id) if *id != args.id => anyhow::bail!(
            "data dir {} belongs to replica '{id}', not '{}'",
            args.data_dir.display(),
            args.id
        ),
        Some(_) => {}
        None => storage.save_identity(&args.id)?,
    }
    Ok((storage, recovered))
}

/// What a replica rebuilt from its disk.
struct Recovery {
    core: Core,
    log: super::recovery::RecoveredLog,
    snapshot_index: u64,
    left_era: u64,
}

/// The ordering core rebuilt from the snapshot and log on disk, and what a recovery era may
/// need of them.
fn recover(
    args: &crate::ReplicaArgs,
    cfg: &ByzConfig,
    directory: BTreeMap<String, ed25519_dalek::VerifyingKey>,
    storage: &crate::storage::Storage,
    recovered: crate::storage::Recovered,
    factory: crate::machine::MachineFactory,
) -> anyhow::Result<Recovery> {
    let runtime = crate::runtime::Runtime::new(factory());
    let mut core = Core::new(args.id.clone(), runtime, cfg.master_public_key, directory);
    core.reorder = cfg.inject == Some(Behaviour::Reorder);
    let snapshot_index = recovered.snapshot.as_ref().map_or(0, |s| s.index);
    core.recover(recovered.snapshot.clone(), recovered.entries.clone())?;
    // The snapshot before the newest widens the range this replica can rebuild for a recovery
    // era (docs/byzantine.md, "Full-cluster restart"); without it, the newest is the floor.
    let earlier = storage.read_earlier().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the snapshot before the newest; recovery starts from the newest");
        None
    });
    let log = super::recovery::RecoveredLog::new(recovered.snapshot, recovered.entries, earlier, factory);
    let left_era = super::recovery::left_era(&args.data_dir.join(ERA_FILE))?;
    Ok(Recovery {
        core,
        log,
        snapshot_index,
        left_era,
    })
}

/// The state the services and tasks share, with the storage writer whose durable batches it
/// hears of.
fn share(
    args: &crate::ReplicaArgs,
    cfg: ByzConfig,
    signing: SigningKey,
    storage: crate::storage::Storage,
    recovery: Recovery,
) -> Arc<ByzShared> {
    let (applied_tx, _) = broadcast::channel(4096);
    Arc::new_cyclic(|weak: &std::sync::Weak<ByzShared>| {
        let writer = spawn_writer(storage, weak.clone());
        ByzShared {
            id: args.id.clone(),
            core: Mutex::new(recovery.core),
            signing,
            master_key: cfg.master_public_key,
            writer,
            durable: Mutex::new(0),
            waiters: Mutex::new(HashMap::new()),
            open_waiters: Mutex::new(HashMap::new()),
            deferred: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            relays: Mutex::new(Vec::new()),
            peers_applied: Mutex::new(BTreeMap::new()),
            relayed_by: Mutex::new(RelayedBy::default()),
            applied_tx,
            metrics: Metrics::default(),
            data_dir: args.data_dir.clone(),
            ordering: cfg.ordering,
            transport: cfg.transport,
            inject: cfg.inject,
            snapshot_every: args.snapshot_every.max(1),
            last_snapshot: Mutex::new(recovery.snapshot_index),
            era_lock: tokio::sync::Mutex::new(()),
            signed_era: Mutex::new(Vec::new()),
            recovered: Mutex::new(Some(recovery.log)),
            left_era: recovery.left_era,
            late_warned: AtomicU64::new(0),
        }
    })
}

/// The storage writer; each durable batch is counted and handed to the replica.
fn spawn_writer(storage: crate::storage::Storage, weak: std::sync::Weak<ByzShared>) -> WriterHandle {
    crate::writer::spawn(
        storage,
        Box::new(move |durable, written, started| {
            let Some(shared) = weak.upgrade() else { return };
            shared.metrics.observe_batch(written, started.elapsed());
            shared.on_durable(durable);
        }),
    )
}

/// `/healthz`, `/readyz` (a member of an era, not at a barrier) and `/metrics`.
pub fn http_router(shared: Arc<ByzShared>) -> axum::Router {
    use axum::{extract::State, http::StatusCode, routing::get};
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<ByzShared>>| async move {
                let st = s.status();
                let body = format!("{} era {}\n", st.state, st.epoch);
                if st.state == "member" {
                    (StatusCode::OK, body)
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, body)
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<ByzShared>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    s.metrics.encode(),
                )
            }),
        )
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relayed(bytes: usize) -> Relayed {
        Relayed {
            item: Some(SignedItem {
                item: vec![0; bytes],
                signature: Vec::new(),
            }),
            chain: Vec::new(),
        }
    }

    #[test]
    fn a_relay_message_holds_at_most_its_count_and_bytes_and_at_least_one_item() {
        let small: VecDeque<Relayed> = (0..RELAY_BATCH + 5).map(|_| relayed(10)).collect();
        assert_eq!(relay_batch_len(&small), RELAY_BATCH);
        let large: VecDeque<Relayed> = (0..512).map(|_| relayed(64 * 1024)).collect();
        let n = relay_batch_len(&large);
        assert_eq!(
            n,
            RELAY_BATCH_BYTES / (64 * 1024),
            "64 KiB items: as many as fit the budget"
        );
        let huge: VecDeque<Relayed> = (0..3).map(|_| relayed(RELAY_BATCH_BYTES * 2)).collect();
        assert_eq!(relay_batch_len(&huge), 1, "one item over the budget still goes");
    }
}
