//! Byzantine-mode client: signs every item of its stream, sends it to every replica, and
//! accepts an answer only when t+1 replicas signed the same one (same output, log index,
//! era and machine identity). It names the replicas that disagreed or stayed silent.
//!
//! A client opens a stream (the configuration master admits it), keeps it alive with signed
//! no-ops while idle (Lamport stability needs every open stream to move on), and reopens it
//! transparently when it ends (a new era, or a removal). Commands carry an exactly-once
//! request session that survives reopening, so a retried command applies at most once.

use crate::ClientError;
use ed25519_dalek::{SigningKey, VerifyingKey};
use lockstep_proto::{
    AppliedEntry, BatchOutputs, ByzCommand, CommandBatch, Noop, ReplyBody, SignedApplied, SignedItem, SignedReply,
    StreamItem, WatchRequest, byzantine_client::ByzantineClient, stream_item::Body,
};
use lockstep_replica::byz::keys;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// What a client must know about a Byzantine cluster (written by `lockstep up` to
/// `<data-dir>/<name>/byzantine.json`; on Kubernetes, from the resource's status).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterInfo {
    pub name: String,
    pub t: usize,
    pub era: u64,
    pub replicas: Vec<ReplicaInfo>,
    pub stability: String,
    pub max_delay_millis: u64,
    /// ε (PhysicalClock); absent in files written before it was recorded.
    #[serde(default)]
    pub max_skew_millis: u64,
    /// Machine the replicas must report (name, version); answers naming another are not counted.
    pub machine_name: String,
    pub machine_version: String,
}

impl ClusterInfo {
    /// How long the order itself holds an item before it can run, whatever the load: Δ after
    /// the item's timestamp (`PhysicalClock`), or the agreement's decision delay after the
    /// first replica hears it (`LamportClock`). Every wait for an answer adds this, or a
    /// cluster with a large δ (Kubernetes: hundreds of ms) could never answer in time.
    pub fn ordering_delay(&self) -> Duration {
        let timing = self.timing();
        let us = match timing.stability {
            lockstep_replica::byz::order::Stability::Physical => timing.execute_at(0),
            lockstep_replica::byz::order::Stability::Lamport => timing.decide_at(0),
        };
        Duration::from_micros(us)
    }

    /// The bounds the replicas order by.
    pub fn timing(&self) -> lockstep_replica::byz::order::Timing {
        crate::up_byz::Ordering {
            stability: self.stability.clone(),
            max_delay_millis: self.max_delay_millis,
            max_clock_skew_millis: self.max_skew_millis,
        }
        .timing(self.t)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReplicaInfo {
    pub id: String,
    pub endpoint: String,
    /// Hex Ed25519 public key.
    pub public_key: String,
}

pub const INFO_FILE: &str = "byzantine.json";
pub const CLIENT_KEYS_DIR: &str = "clients";
pub const IDENTITIES_DIR: &str = "client-identities";
pub const DEFAULT_IDENTITY: &str = "cli";

pub fn load_info(cluster_dir: &Path) -> anyhow::Result<Option<ClusterInfo>> {
    use anyhow::Context;
    let path = cluster_dir.join(INFO_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("{} is not readable", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Create a client key pair in a local cluster's directory: the secret in `clients/ID.key`,
/// the public key in `client-identities/ID` (the directory the replicas read).
pub fn add_client(cluster_dir: &Path, id: &str) -> anyhow::Result<VerifyingKey> {
    if id.is_empty() || id.starts_with('.') || id.contains('/') || id == keys::MASTER_IDENTITY {
        anyhow::bail!(
            "'{id}' cannot name a client (no '/', no leading '.', not '{}')",
            keys::MASTER_IDENTITY
        );
    }
    let key = keys::load_or_create_signing_key(&cluster_dir.join(CLIENT_KEYS_DIR).join(format!("{id}.key")))?;
    let public = key.verifying_key();
    let dir = cluster_dir.join(IDENTITIES_DIR);
    std::fs::create_dir_all(&dir)?;
    lockstep_replica::write_atomically(&dir.join(id), keys::encode_key(&public.to_bytes()).as_bytes())?;
    Ok(public)
}

pub fn client_key(cluster_dir: &Path, id: &str) -> anyhow::Result<SigningKey> {
    keys::load_signing_key(&cluster_dir.join(CLIENT_KEYS_DIR).join(format!("{id}.key")))
}

/// How replicas answered, per replica, over a client's lifetime.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub agreed: u64,
    pub disagreed: u64,
    pub silent: u64,
    pub bad_signature: u64,
}

/// The vote behind one accepted answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VoteReport {
    pub agreed: Vec<String>,
    /// Replica and what it said instead.
    pub disagreed: Vec<(String, String)>,
    /// No (valid) answer by the time the vote was decided.
    pub silent: Vec<String>,
}

/// An accepted (voted) answer.
#[derive(Clone, Debug)]
pub struct Voted {
    pub index: u64,
    pub output: Vec<u8>,
    pub ts: u64,
    pub report: VoteReport,
}

struct StreamState {
    era: u64,
    session: u64,
    seq: u64,
    last_ts: u64,
    horizon: u64,
    /// When to renew the promise with a no-op if nothing else was sent by then
    /// (`lockstep_replica::byz::Promise::renew_at`).
    renew_at: u64,
    open: bool,
    /// Smoothed round trip of this stream's ordered items (µs), for the promise ...
    latency_us: u64,
    /// ... and its smoothed deviation (µs).
    latency_var_us: u64,
    /// Since when (µs) a command or query of this stream has been waiting for its answer.
    busy_since: Option<u64>,
}

impl StreamState {
    fn new(era: u64, session: u64, floor: u64, open: bool) -> StreamState {
        StreamState {
            era,
            session,
            seq: 0,
            last_ts: floor.saturating_sub(1),
            horizon: floor,
            renew_at: floor,
            open,
            latency_us: 0,
            latency_var_us: 0,
            busy_since: None,
        }
    }

    /// When this stream expects to send its next item, from `now` (µs): what its promise
    /// covers before a renewal is due ([`lockstep_replica::byz::promise`]).
    ///
    /// Idle: one no-op interval. A command or query: the next item is the next command, one
    /// round trip later: the smoothed round trip plus its deviation, at least 1 ms and at
    /// most [`MAX_PROMISE_INTERVALS`] intervals, and no less than `ahead_us`. A renewal while the answer is still awaited:
    /// half the time waited so far, so a slow answer costs no-ops spaced 1.5 times further
    /// apart each (a command stuck for 3 s: about 20), and the next command, which must be
    /// stamped at or after the renewal's horizon, is not pushed far into the future.
    ///
    /// Why not more: an item's timestamp is the previous horizon when it is sent earlier, and
    /// it runs only once every other stream's promise has passed that timestamp; the streams
    /// renew `renew_ahead` before their promises run out, so the lowest of those promises is
    /// only that far ahead of the clock, and every µs promised beyond the next item is a µs
    /// that item waits. Twice the deviation, or counting a renewal from the whole wait, put
    /// the next commands tens of ms into the future (8 clients: p99 190 ms; 64 clients: the
    /// commands' timestamps 47 ms past their arrival, executed 41 ms after their decision).
    /// A whole interval for a busy stream is what the writer among idle clients at a 100 ms
    /// interval paid (p50 86 ms, docs/benchmarks.md). Why not less: an answer later than
    /// promised costs a renewal (a signed no-op, as costly as a command at every replica).
    fn gap_us(&self, now: u64, interval: Duration, ahead_us: u64) -> u64 {
        let interval = (interval.as_micros() as u64).max(1);
        let Some(since) = self.busy_since else {
            return interval;
        };
        if self.latency_us == 0 {
            return interval;
        }
        let waited = now.saturating_sub(since);
        let gap = if waited == 0 {
            self.latency_us + self.latency_var_us
        } else {
            waited / 2
        };
        // At least the renewal's own lead, or a renewal could not be decided in time.
        let cap = interval.saturating_mul(MAX_PROMISE_INTERVALS).max(1_000);
        gap.clamp(ahead_us.clamp(1_000, cap), cap)
    }

    /// Fold one round trip into the smoothed latency and deviation (weights 1/8 and 1/4, as
    /// TCP's SRTT and RTTVAR).
    fn observe(&mut self, sample: Duration) {
        let us = sample.as_micros() as u64;
        if self.latency_us == 0 {
            self.latency_us = us;
            self.latency_var_us = us / 2;
        } else {
            self.latency_var_us = (self.latency_var_us * 3 + self.latency_us.abs_diff(us)) / 4;
            self.latency_us = (self.latency_us * 7 + us) / 8;
        }
    }

    /// Number, timestamp and promise of the stream's next item, sent at `now`; `gap_us` as
    /// from [`StreamState::gap_us`] (0: the stream's last item, a close), `ahead_us` from
    /// [`lockstep_replica::byz::renew_ahead`], or `None` under `PhysicalClock`. The timestamp
    /// keeps the previous promise.
    ///
    /// `PhysicalClock` runs an item at `ts + Δ` and waits for no promise, so a stream promises
    /// nothing there (every µs of promise would be a µs its next item is stamped ahead, and
    /// runs later) and sends a no-op only as a keep-alive, `gap_us` after its last item.
    fn stamp(&mut self, now: u64, gap_us: u64, ahead_us: Option<u64>) -> (u64, u64, u64) {
        self.seq += 1;
        let ts = now.max(self.last_ts + 1).max(self.horizon);
        self.last_ts = ts;
        if gap_us == 0 {
            self.horizon = lockstep_replica::byz::next_horizon(now, ts, 0);
            self.renew_at = u64::MAX;
        } else if let Some(ahead_us) = ahead_us {
            let p = lockstep_replica::byz::promise(now, ts, gap_us, ahead_us);
            self.horizon = p.horizon;
            self.renew_at = p.renew_at;
        } else {
            self.horizon = lockstep_replica::byz::next_horizon(now, ts, 0);
            self.renew_at = now.saturating_add(gap_us);
        }
        (self.seq, ts, self.horizon)
    }
}

/// A stream's promise is at most this many no-op intervals (see [`StreamState::gap_us`]).
const MAX_PROMISE_INTERVALS: u64 = 4;

/// Where a replica's answer to one item goes: (replica id, its signed reply or why not).
type AnswerTx = mpsc::UnboundedSender<(String, Result<SignedReply, String>)>;
/// Where the answers to one item are read: see [`AnswerTx`].
type AnswerRx = mpsc::UnboundedReceiver<(String, Result<SignedReply, String>)>;

/// A client's one long-lived `SubmitStream` to one replica, opened on first use and again
/// after it broke. Items go out in order on that one HTTP/2 stream; answers come back tagged
/// by slot and go to whoever waits for that slot. A unary `Submit` per item cost a new HTTP/2
/// stream per item at both ends (headers, HPACK, the tower and authorization layers, a task),
/// which was most of a replica's CPU besides the signatures (docs/byzantine.md).
struct Link {
    id: String,
    channel: Channel,
    conn: Mutex<Option<Conn>>,
    /// The replica has no `SubmitStream` (an older version): one unary `Submit` per item.
    unary: Arc<std::sync::atomic::AtomicBool>,
}

/// One `SubmitStream` call. Dropping it (with its `Link`) ends the client's side.
struct Conn {
    out: mpsc::UnboundedSender<SignedItem>,
    state: Arc<ConnState>,
}

#[derive(Default)]
struct ConnState {
    waiters: Mutex<HashMap<(u64, u64), Vec<AnswerTx>>>,
    dead: std::sync::atomic::AtomicBool,
}

impl Link {
    fn new(id: String, channel: Channel) -> Link {
        Link {
            id,
            channel,
            conn: Mutex::new(None),
            unary: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Send `item` (of `slot`); its answer, if any, goes to `waiter`.
    fn send(&self, item: &SignedItem, slot: (u64, u64), waiter: Option<AnswerTx>, timeout: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.unary.load(SeqCst) {
            let mut c =
                ByzantineClient::new(self.channel.clone()).max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
            let mut req = tonic::Request::new(item.clone());
            req.set_timeout(timeout);
            let id = self.id.clone();
            tokio::spawn(async move {
                let r = c
                    .submit(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| s.message().to_string());
                if let Some(w) = waiter {
                    let _ = w.send((id, r));
                }
            });
            return;
        }
        let (out, state) = self.conn();
        if let Some(w) = &waiter {
            let mut ws = state.waiters.lock().unwrap_or_else(|e| e.into_inner());
            if ws.len() > 256 {
                // Waits that ended without an answer (a silent replica, a timed-out vote).
                ws.retain(|_, v| {
                    v.retain(|t| !t.is_closed());
                    !v.is_empty()
                });
            }
            ws.entry(slot).or_default().push(w.clone());
        }
        // Registered before checking `dead`: the reader marks the call dead before it fails
        // the waiters it holds, so a waiter is failed by one or the other (or both).
        if (out.send(item.clone()).is_err() || state.dead.load(SeqCst))
            && let Some(w) = waiter
        {
            let _ = w.send((self.id.clone(), Err("the stream to this replica broke".into())));
        }
    }

    /// The open `SubmitStream`, or a new one.
    fn conn(&self) -> (mpsc::UnboundedSender<SignedItem>, Arc<ConnState>) {
        use std::sync::atomic::Ordering::SeqCst;
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.as_ref()
            && !c.state.dead.load(SeqCst)
        {
            return (c.out.clone(), c.state.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel::<SignedItem>();
        let state = Arc::new(ConnState::default());
        *g = Some(Conn {
            out: tx.clone(),
            state: state.clone(),
        });
        let mut client = ByzantineClient::new(self.channel.clone())
            .max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
        let (id, unary, reader) = (self.id.clone(), self.unary.clone(), state.clone());
        tokio::spawn(async move {
            let why = match client
                .submit_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                .await
            {
                Ok(resp) => {
                    let mut answers = resp.into_inner();
                    loop {
                        match answers.message().await {
                            Ok(Some(a)) => {
                                let ws = reader
                                    .waiters
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .remove(&(a.session, a.seq));
                                let r = if a.refused.is_empty() {
                                    Ok(a.reply.unwrap_or_default())
                                } else {
                                    Err(a.refused)
                                };
                                for w in ws.into_iter().flatten() {
                                    let _ = w.send((id.clone(), r.clone()));
                                }
                            }
                            Ok(None) => break "the replica ended the stream".to_string(),
                            Err(s) => break s.message().to_string(),
                        }
                    }
                }
                Err(s) => {
                    if s.code() == tonic::Code::Unimplemented {
                        unary.store(true, SeqCst);
                    }
                    s.message().to_string()
                }
            };
            reader.dead.store(true, SeqCst);
            let ws = std::mem::take(&mut *reader.waiters.lock().unwrap_or_else(|e| e.into_inner()));
            for w in ws.into_values().flatten() {
                let _ = w.send((id.clone(), Err(why.clone())));
            }
        });
        (tx, state)
    }
}

/// Marks a stream idle when dropped (its command or query is no longer waiting).
struct Idle(Arc<Shared>);

impl Drop for Idle {
    fn drop(&mut self) {
        self.0.stream.lock().unwrap_or_else(|e| e.into_inner()).busy_since = None;
    }
}

fn links(chans: &[(String, Channel, VerifyingKey)]) -> Vec<Arc<Link>> {
    chans
        .iter()
        .map(|(id, ch, _)| Arc::new(Link::new(id.clone(), ch.clone())))
        .collect()
}

struct Shared {
    transport: crate::Transport,
    info: Mutex<ClusterInfo>,
    keys: Mutex<Vec<(String, Channel, VerifyingKey)>>,
    /// One `SubmitStream` per replica, in the order of `keys`.
    links: Mutex<Vec<Arc<Link>>>,
    identity: String,
    key: SigningKey,
    stream: Mutex<StreamState>,
    tallies: Arc<Mutex<BTreeMap<String, Tally>>>,
    /// Added to the system clock for this client's timestamps (µs).
    clock_offset_us: std::sync::atomic::AtomicI64,
}

impl Shared {
    /// This client's clock: the system's, moved by [`ByzClient::set_clock_offset_us`].
    fn now_us(&self) -> u64 {
        now_us().saturating_add_signed(self.clock_offset_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Update what the voters saw of replica `id`.
    fn tally(&self, id: &str, update: impl FnOnce(&mut Tally)) {
        let mut tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        update(tallies.entry(id.to_string()).or_default());
    }

    /// Count a decided vote: who agreed with it and who said something else.
    fn tally_vote(&self, report: &VoteReport) {
        for id in &report.agreed {
            self.tally(id, |t| t.agreed += 1);
        }
        for (id, _) in &report.disagreed {
            self.tally(id, |t| t.disagreed += 1);
        }
    }
}

/// What one attempt at an item came to (see [`ByzClient::ordered_item`]).
enum Attempt {
    /// Finished: the voted answer, or an error that sending again cannot change.
    Done(Result<Voted, ClientError>),
    /// The stream ended (why): open a new one and send the item again on it.
    NewStream(String),
    /// No agreement in time (why): send the same item again.
    Again(String),
}

pub struct ByzClient {
    shared: Arc<Shared>,
    request_session: String,
    request_seq: u64,
    /// How long one operation keeps trying.
    pub deadline: Duration,
    /// How long one attempt waits for t+1 matching answers before sending again.
    pub attempt_timeout: Duration,
    /// Idle streams send a signed no-op this often.
    pub noop_interval: Duration,
    /// Where to re-read the cluster info after an era change (a local cluster's directory).
    pub reload_from: Option<PathBuf>,
    /// Or where to re-learn it from the replicas' signed era (`byz_discover`).
    pub discover: Option<crate::byz_discover::Discovery>,
    noop_task: Option<tokio::task::JoinHandle<()>>,
    /// The vote of the last accepted answer.
    pub last_vote: VoteReport,
}

fn channels(
    transport: &crate::Transport,
    info: &ClusterInfo,
) -> Result<Vec<(String, Channel, VerifyingKey)>, ClientError> {
    info.replicas
        .iter()
        .map(|r| {
            let key = keys::parse_public_key(r.public_key.as_bytes())
                .map_err(|e| ClientError::Invalid(format!("public key of {}: {e}", r.id)))?;
            Ok((r.id.clone(), crate::cluster_channel(transport, &r.endpoint)?, key))
        })
        .collect()
}

fn now_us() -> u64 {
    lockstep_replica::byz::now_micros()
}

impl ByzClient {
    pub fn new(
        transport: crate::Transport,
        info: ClusterInfo,
        identity: &str,
        key: SigningKey,
    ) -> Result<ByzClient, ClientError> {
        let chans = channels(&transport, &info)?;
        let era = info.era;
        Ok(ByzClient {
            shared: Arc::new(Shared {
                transport,
                info: Mutex::new(info),
                links: Mutex::new(links(&chans)),
                keys: Mutex::new(chans),
                identity: identity.to_string(),
                key,
                stream: Mutex::new(StreamState::new(era, 0, 0, false)),
                tallies: Arc::new(Mutex::new(BTreeMap::new())),
                clock_offset_us: std::sync::atomic::AtomicI64::new(0),
            }),
            request_session: format!("{:016x}", rand::random::<u64>()),
            request_seq: 0,
            deadline: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(3),
            noop_interval: Duration::from_millis(50),
            reload_from: None,
            discover: None,
            noop_task: None,
            last_vote: VoteReport::default(),
        })
    }

    /// A client of a local cluster started by `lockstep up` (identity `cli` unless named).
    pub fn local(cluster_dir: &Path, identity: &str) -> anyhow::Result<ByzClient> {
        use anyhow::Context;
        let info = load_info(cluster_dir)?.with_context(|| {
            format!(
                "{} holds no Byzantine cluster info (is `lockstep up` running it?)",
                cluster_dir.display()
            )
        })?;
        let key = client_key(cluster_dir, identity).with_context(|| {
            format!("no key for client '{identity}' (create one with `lockstep -c NAME add-client {identity}`)")
        })?;
        let transport = crate::pki::local_client_transport(cluster_dir)?;
        let mut c = ByzClient::new(transport, info, identity, key)?;
        c.reload_from = Some(cluster_dir.to_path_buf());
        Ok(c)
    }

    pub fn info(&self) -> ClusterInfo {
        self.shared.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Count this client's votes into `sink` (shared by several clients) from now on.
    pub fn with_tallies(self, sink: Arc<Mutex<BTreeMap<String, Tally>>>) -> ByzClient {
        let mut me = self;
        if let Some(shared) = Arc::get_mut(&mut me.shared) {
            shared.tallies = sink;
        }
        me
    }

    pub fn tallies(&self) -> BTreeMap<String, Tally> {
        self.shared.tallies.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A client of a cluster learned from one address (inside Kubernetes: the client
    /// Service), verified with the master's public key; its secret key from `key_file`.
    pub async fn discover(
        discovery: crate::byz_discover::Discovery,
        identity: &str,
        key_file: &Path,
    ) -> anyhow::Result<ByzClient> {
        use anyhow::Context;
        let key = keys::load_signing_key(key_file)
            .with_context(|| format!("no key for client '{identity}' in {}", key_file.display()))?;
        let info = crate::byz_discover::discover(&discovery, Duration::from_secs(5))
            .await
            .map_err(anyhow::Error::msg)?;
        let mut c = ByzClient::new(discovery.transport.clone(), info, identity, key)?;
        c.discover = Some(discovery);
        Ok(c)
    }

    async fn reload(&self) {
        let info = if let Some(dir) = &self.reload_from {
            load_info(dir).ok().flatten()
        } else if let Some(d) = &self.discover {
            crate::byz_discover::discover(d, Duration::from_secs(2)).await.ok()
        } else {
            None
        };
        let Some(info) = info else { return };
        let mut cur = self.shared.info.lock().unwrap_or_else(|e| e.into_inner());
        if info.era > cur.era
            && let Ok(chans) = channels(&self.shared.transport, &info)
        {
            *self.shared.links.lock().unwrap_or_else(|e| e.into_inner()) = links(&chans);
            *self.shared.keys.lock().unwrap_or_else(|e| e.into_inner()) = chans;
            *cur = info;
        }
    }

    /// Build and sign the stream's next item; with it, its slot (session, seq). `interval`:
    /// the stream's no-op interval, `None` for its last item (a close: it promises nothing).
    fn next_item(shared: &Shared, body: Body, interval: Option<Duration>) -> (SignedItem, (u64, u64)) {
        let timing = shared.info.lock().unwrap_or_else(|e| e.into_inner()).timing();
        let ahead = (timing.stability == lockstep_replica::byz::order::Stability::Lamport)
            .then(|| lockstep_replica::byz::renew_ahead(&timing));
        let mut s = shared.stream.lock().unwrap_or_else(|e| e.into_inner());
        let now = shared.now_us();
        if matches!(body, Body::Command(_) | Body::Query(_) | Body::Batch(_)) && s.busy_since.is_none() {
            s.busy_since = Some(now);
        }
        let gap = interval.map_or(0, |i| match ahead {
            Some(ahead) => s.gap_us(now, i, ahead),
            None => (i.as_micros() as u64).max(1),
        });
        let (seq, ts, horizon) = s.stamp(now, gap, ahead);
        let item = StreamItem {
            identity: shared.identity.clone(),
            session: s.session,
            seq,
            ts,
            horizon,
            era: s.era,
            body: Some(body),
        };
        (lockstep_replica::byz::sign_item(&shared.key, &item), (s.session, seq))
    }

    /// Send `signed` to every replica; resolve when t+1 signed identical answers arrived.
    async fn vote(
        shared: &Arc<Shared>,
        signed: &SignedItem,
        slot: (u64, u64),
        timeout: Duration,
    ) -> Result<Voted, String> {
        let replicas = shared.keys.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut ballot = {
            let i = shared.info.lock().unwrap_or_else(|e| e.into_inner());
            Ballot::new(i.t, (i.machine_name.clone(), i.machine_version.clone()))
        };
        let mut rx = Self::broadcast(shared, signed, slot, timeout);
        let ids: Vec<String> = replicas.iter().map(|(id, _, _)| id.clone()).collect();
        let check = ReplyCheck {
            keys: replicas.iter().map(|(id, _, k)| (id.clone(), *k)).collect(),
            identity: shared.identity.clone(),
            slot,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let Some(key) = ballot.collect(shared, &check, &mut rx, deadline).await else {
            ballot.tally_silent(shared, &ids);
            return Err(no_agreement(ballot.t, timeout, &ballot.votes, &ballot.heard));
        };
        let report = report_for(&ids, &key, &ballot.heard);
        shared.tally_vote(&report);
        // The others may still answer: count them when they do (or when they time out).
        if !report.silent.is_empty() {
            let late = tally_late_answers(shared.clone(), check, key.clone(), report.silent.clone(), rx, deadline);
            tokio::spawn(late);
        }
        if !key.2.is_empty() {
            return Err(format!("refused: {}", key.2));
        }
        Ok(Voted {
            index: key.0,
            output: key.1,
            ts: key.5,
            report,
        })
    }

    /// Send `signed` to every replica's link; their answers (or why none came) arrive on
    /// the returned receiver, which ends once every link has answered or given up.
    fn broadcast(shared: &Shared, signed: &SignedItem, slot: (u64, u64), timeout: Duration) -> AnswerRx {
        let (tx, rx) = mpsc::unbounded_channel();
        for link in shared.links.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            link.send(signed, slot, Some(tx.clone()), timeout);
        }
        rx
    }

    fn ordering_delay(&self) -> Duration {
        self.shared
            .info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ordering_delay()
    }

    /// Move this client's clock by `offset_us` (negative: behind). For tests of what a client
    /// with a wrong clock gets: `PhysicalClock` assumes every clock is within ε of the others.
    pub fn set_clock_offset_us(&self, offset_us: i64) {
        self.shared
            .clock_offset_us
            .store(offset_us, std::sync::atomic::Ordering::Relaxed);
    }

    /// Open a stream (admitted by the master), unless one is open.
    pub async fn open(&mut self) -> Result<(), ClientError> {
        if self.shared.stream.lock().unwrap_or_else(|e| e.into_inner()).open {
            return Ok(());
        }
        let start = Instant::now();
        let mut last = String::new();
        // One open per era, sent again as it is on a retry: a new session per attempt left
        // the earlier ones to be admitted later, streams that never send anything and hold
        // back every other stream until the master removes them (the client timeout).
        let mut attempt: Option<(u64, u64, SignedItem)> = None;
        while start.elapsed() < self.deadline {
            self.reload().await;
            let era = self.shared.info.lock().unwrap_or_else(|e| e.into_inner()).era;
            if attempt.as_ref().is_none_or(|(e, _, _)| *e != era) {
                let session = loop {
                    let s = rand::random::<u64>() >> 1;
                    if s != 0 {
                        break s;
                    }
                };
                let item = StreamItem {
                    identity: self.shared.identity.clone(),
                    session,
                    seq: 0,
                    ts: self.shared.now_us(),
                    horizon: 0,
                    era,
                    body: Some(Body::Open(Noop {})),
                };
                attempt = Some((era, session, lockstep_replica::byz::sign_item(&self.shared.key, &item)));
            }
            let Some((_, session, signed)) = attempt.clone() else {
                continue;
            };
            // Two ordered items stand between an open and its answer: the open itself and
            // the master's admission.
            let order = 2 * self.ordering_delay();
            match Self::vote(
                &self.shared,
                &signed,
                (session, 0),
                self.attempt_timeout.max(Duration::from_secs(5)) + order,
            )
            .await
            {
                Ok(v) => {
                    // The admission's floor is the stream's first promise: renew it in time.
                    let ahead = lockstep_replica::byz::renew_ahead(&self.info().timing());
                    let mut s = self.shared.stream.lock().unwrap_or_else(|e| e.into_inner());
                    *s = StreamState::new(era, session, v.ts, true);
                    s.renew_at = v.ts.saturating_sub(ahead);
                    drop(s);
                    self.start_noops();
                    return Ok(());
                }
                Err(why) => last = why,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(ClientError::Rejected(format!("could not open a stream: {last}")))
    }

    fn start_noops(&mut self) {
        if let Some(t) = self.noop_task.take() {
            t.abort();
        }
        let shared = self.shared.clone();
        let interval = self.noop_interval;
        self.noop_task = Some(tokio::spawn(async move {
            loop {
                // Due shortly before the stream's promise runs out (`renew_at`), so the
                // no-op is decided everywhere while the promise still holds: other streams'
                // items never wait for this one, busy or idle. Sending something else moves
                // `renew_at` on; waking early only means looking again.
                let wait = {
                    let s = shared.stream.lock().unwrap_or_else(|e| e.into_inner());
                    if !s.open {
                        return;
                    }
                    s.renew_at.saturating_sub(shared.now_us())
                };
                if wait > 0 {
                    tokio::time::sleep(Duration::from_micros(wait).min(interval)).await;
                    continue;
                }
                let (signed, slot) = Self::next_item(&shared, Body::Noop(Noop {}), Some(interval));
                for link in shared.links.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    link.send(&signed, slot, None, Duration::from_secs(2));
                }
            }
        }));
    }

    fn end_stream(&self) {
        self.shared.stream.lock().unwrap_or_else(|e| e.into_inner()).open = false;
    }

    /// The next command of this client's exactly-once session.
    fn next_command(&mut self, payload: Vec<u8>) -> ByzCommand {
        self.request_seq += 1;
        ByzCommand {
            request_session: self.request_session.clone(),
            request_seq: self.request_seq,
            payload,
        }
    }

    /// Run one command or query through the order, voted.
    async fn ordered(&mut self, payload: Vec<u8>, query: bool) -> Result<Voted, ClientError> {
        let cmd = self.next_command(payload);
        let body = if query { Body::Query(cmd) } else { Body::Command(cmd) };
        self.ordered_item(body).await
    }

    /// Run several commands and queries (`(payload, read_only)`) as one item (one signature,
    /// one slot, one voted reply) and return each one's output, or why it was refused, in the
    /// order given. Each command keeps its own place in the exactly-once session, so a
    /// retried batch runs nothing twice.
    pub async fn execute_batch(
        &mut self,
        requests: Vec<(Vec<u8>, bool)>,
    ) -> Result<(Vec<Result<Vec<u8>, ClientError>>, VoteReport), ClientError> {
        use lockstep_proto::{BatchEntry, batch_entry::Kind};
        let n = requests.len();
        let entries = requests
            .into_iter()
            .map(|(payload, read_only)| BatchEntry {
                kind: Some(if read_only {
                    Kind::Query(ByzCommand {
                        payload,
                        ..Default::default()
                    })
                } else {
                    Kind::Command(self.next_command(payload))
                }),
            })
            .collect();
        let voted = self.ordered_item(Body::Batch(CommandBatch { entries })).await?;
        // t+1 replicas signed this output: a malformed one is beyond the failure model.
        let outputs = BatchOutputs::decode(voted.output.as_slice())
            .map_err(|e| ClientError::Unknown(format!("the voted answer to a batch is not a batch's: {e}")))?
            .outputs;
        if outputs.len() != n {
            return Err(ClientError::Unknown(format!(
                "the voted answer to a batch of {n} has {} outputs",
                outputs.len()
            )));
        }
        let results = outputs
            .into_iter()
            .map(|o| {
                if o.error.is_empty() {
                    Ok(o.output)
                } else {
                    Err(ClientError::Invalid(o.error))
                }
            })
            .collect();
        Ok((results, voted.report))
    }

    /// Run one command, query or batch through the order, voted.
    async fn ordered_item(&mut self, body: Body) -> Result<Voted, ClientError> {
        // However this ends (answered, failed, dropped), the stream is idle again after it.
        let _idle = Idle(self.shared.clone());
        let query = matches!(body, Body::Query(_));
        let start = Instant::now();
        let mut maybe_applied = false;
        let mut last = String::new();
        while start.elapsed() < self.deadline {
            if let Err(e) = self.open().await {
                // Keep why the last stream ended: that is what the caller needs to know.
                last = if last.is_empty() {
                    e.to_string()
                } else {
                    format!("{last}; then {e}")
                };
                break;
            }
            let (signed, slot) = Self::next_item(&self.shared, body.clone(), Some(self.noop_interval));
            // Resend the same item until t+1 agree or the deadline passes.
            loop {
                let left = self.deadline.saturating_sub(start.elapsed());
                if left.is_zero() {
                    break;
                }
                maybe_applied = maybe_applied || !query;
                match self.attempt(&signed, slot, left).await {
                    Attempt::Done(result) => return result,
                    Attempt::NewStream(why) => {
                        last = why;
                        break;
                    }
                    Attempt::Again(why) => last = why,
                }
            }
        }
        Err(if maybe_applied {
            ClientError::Unknown(last)
        } else {
            ClientError::Rejected(last)
        })
    }

    /// Send the item once and wait for its vote, at most one attempt's timeout (the order's
    /// delay included) and never past `left`.
    async fn attempt(&mut self, signed: &SignedItem, slot: (u64, u64), left: Duration) -> Attempt {
        let attempt = (self.attempt_timeout + self.ordering_delay()).min(left);
        let sent = Instant::now();
        match Self::vote(&self.shared, signed, slot, attempt).await {
            Ok(v) => {
                self.shared
                    .stream
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .observe(sent.elapsed());
                self.last_vote = v.report.clone();
                Attempt::Done(Ok(v))
            }
            Err(why) if why.starts_with("refused: ") => {
                self.refused(why.trim_start_matches("refused: ").to_string()).await
            }
            Err(why) => self.unanswered(why).await,
        }
    }

    /// The replicas agreed to refuse the item: it is invalid, or the cluster is sealed (both
    /// final), or its stream ended (era change, removal) and it did not run.
    async fn refused(&mut self, why: String) -> Attempt {
        if why.starts_with("invalid") {
            return Attempt::Done(Err(ClientError::Invalid(why)));
        }
        if why.starts_with("sealed") {
            return Attempt::Done(Err(ClientError::Rejected(why)));
        }
        self.end_stream();
        self.reload().await;
        Attempt::NewStream(why)
    }

    /// No t+1 agreed in time: send the item again, on a new stream if the stream's era is
    /// over (already known, or learned by reloading the cluster info).
    async fn unanswered(&mut self, why: String) -> Attempt {
        if self.shared.stream.lock().unwrap_or_else(|e| e.into_inner()).era
            < self.shared.info.lock().unwrap_or_else(|e| e.into_inner()).era
        {
            self.end_stream();
            return Attempt::NewStream(why);
        }
        self.reload().await;
        let newer = self.shared.info.lock().unwrap_or_else(|e| e.into_inner()).era;
        if newer > self.shared.stream.lock().unwrap_or_else(|e| e.into_inner()).era {
            self.end_stream();
            return Attempt::NewStream(why);
        }
        Attempt::Again(why)
    }

    pub async fn execute(&mut self, payload: Vec<u8>) -> Result<Voted, ClientError> {
        self.ordered(payload, false).await
    }

    pub async fn query(&mut self, payload: Vec<u8>) -> Result<Voted, ClientError> {
        self.ordered(payload, true).await
    }

    async fn kv(&mut self, cmd: serde_json::Value, query: bool) -> Result<serde_json::Value, ClientError> {
        let v = self.ordered(cmd.to_string().into_bytes(), query).await?;
        crate::parse_output(&v.output)
    }

    pub async fn put(&mut self, key: &str, value: &str) -> Result<Option<String>, ClientError> {
        let out = self
            .kv(serde_json::json!({"op": "put", "key": key, "value": value}), false)
            .await?;
        Ok(out["previous"].as_str().map(String::from))
    }

    pub async fn delete(&mut self, key: &str) -> Result<Option<String>, ClientError> {
        let out = self.kv(serde_json::json!({"op": "delete", "key": key}), false).await?;
        Ok(out["previous"].as_str().map(String::from))
    }

    pub async fn cas(
        &mut self,
        key: &str,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Result<(bool, Option<String>), ClientError> {
        let out = self
            .kv(
                serde_json::json!({"op": "cas", "key": key, "old": old, "new": new}),
                false,
            )
            .await?;
        Ok((
            out["swapped"].as_bool().unwrap_or(false),
            out["current"].as_str().map(String::from),
        ))
    }

    /// A linearizable read: ordered like a command, voted like one.
    pub async fn get(&mut self, key: &str) -> Result<Option<String>, ClientError> {
        let out = self.kv(serde_json::json!({"op": "get", "key": key}), true).await?;
        Ok(out["value"].as_str().map(String::from))
    }

    /// Close the stream (the replicas stop waiting for it).
    pub async fn close(&mut self) {
        let open = self.shared.stream.lock().unwrap_or_else(|e| e.into_inner()).open;
        if let Some(t) = self.noop_task.take() {
            t.abort();
        }
        if !open {
            return;
        }
        let (signed, slot) = Self::next_item(&self.shared, Body::Close(Noop {}), None);
        self.end_stream();
        // Each replica acknowledges the close; wait for all of them (at most 2 s).
        let (tx, mut rx) = mpsc::unbounded_channel();
        let links = self.shared.links.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for link in &links {
            link.send(&signed, slot, Some(tx.clone()), Duration::from_secs(2));
        }
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for _ in 0..links.len() {
                if rx.recv().await.is_none() {
                    return;
                }
            }
        })
        .await;
    }

    /// Applied entries, voted: an entry is passed on once t+1 replicas sent the same signed one.
    pub async fn watch(
        &self,
        from_index: u64,
    ) -> Result<mpsc::Receiver<Result<(AppliedEntry, VoteReport), String>>, ClientError> {
        let replicas = self.shared.keys.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let t = self.shared.info.lock().unwrap_or_else(|e| e.into_inner()).t;
        let (in_tx, in_rx) = mpsc::unbounded_channel::<(String, SignedApplied)>();
        for (id, channel, _) in &replicas {
            let c = ByzantineClient::new(channel.clone()).max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
            tokio::spawn(forward_watch(c, id.clone(), from_index, in_tx.clone()));
        }
        drop(in_tx);
        let votes = WatchVotes {
            keys: replicas.iter().map(|(id, _, k)| (id.clone(), *k)).collect(),
            ids: replicas.iter().map(|(id, _, _)| id.clone()).collect(),
            t,
            pending: BTreeMap::new(),
            next: (from_index > 0).then_some(from_index),
        };
        let (out_tx, out_rx) = mpsc::channel(256);
        tokio::spawn(votes.run(in_rx, out_tx));
        Ok(out_rx)
    }
}

/// Replica `id`'s watch stream from `from_index`, into `in_tx`, until either ends.
async fn forward_watch(
    mut c: ByzantineClient<Channel>,
    id: String,
    from_index: u64,
    in_tx: mpsc::UnboundedSender<(String, SignedApplied)>,
) {
    let Ok(resp) = c.watch(WatchRequest { from_index }).await else {
        return;
    };
    let mut s = resp.into_inner();
    while let Ok(Some(e)) = s.message().await {
        if in_tx.send((id.clone(), e)).is_err() {
            return;
        }
    }
}

/// The vote over the replicas' watch streams: an index is passed on, in order, once t+1
/// replicas sent the same signed entry for it.
struct WatchVotes {
    keys: HashMap<String, VerifyingKey>,
    ids: Vec<String>,
    t: usize,
    /// index -> replica -> entry bytes
    pending: BTreeMap<u64, BTreeMap<String, Vec<u8>>>,
    /// The index to pass on next (`None`: the first one that gets t+1 votes).
    next: Option<u64>,
}

impl WatchVotes {
    async fn run(
        mut self,
        mut in_rx: mpsc::UnboundedReceiver<(String, SignedApplied)>,
        out_tx: mpsc::Sender<Result<(AppliedEntry, VoteReport), String>>,
    ) {
        while let Some((id, e)) = in_rx.recv().await {
            if !self.accept(id, e) {
                continue;
            }
            // Emit every index in order that has t+1 identical copies.
            while let Some(voted) = self.next_voted() {
                if out_tx.send(Ok(voted)).await.is_err() {
                    return;
                }
            }
        }
        let _ = out_tx.send(Err("every replica's watch stream ended".into())).await;
    }

    /// Counts replica `id`'s entry as its vote, unless it is not signed by `id`, undecodable or
    /// already passed on.
    fn accept(&mut self, id: String, e: SignedApplied) -> bool {
        let Some(key) = self.keys.get(&id) else { return false };
        if e.replica != id || !keys::verify(key, &e.entry, &e.signature) {
            return false;
        }
        let Ok(entry) = AppliedEntry::decode(e.entry.as_slice()) else {
            return false;
        };
        if self.next.is_some_and(|n| entry.index < n) {
            return false;
        }
        self.pending.entry(entry.index).or_default().insert(id, e.entry);
        true
    }

    /// The next index's entry and its vote, once t+1 replicas agree on it; it is no longer
    /// pending then.
    fn next_voted(&mut self) -> Option<(AppliedEntry, VoteReport)> {
        while let Some((&index, votes)) = self.pending.first_key_value() {
            if self.next.is_some_and(|n| index < n) {
                self.pending.pop_first();
                continue;
            }
            if self.next.is_some_and(|n| index > n) {
                return None; // wait for the expected index
            }
            let voted = self.agreed(votes)?;
            self.pending.pop_first();
            self.next = Some(index + 1);
            return Some(voted);
        }
        None
    }

    /// The entry t+1 of `votes` (replica -> entry bytes) agree on, and who agreed, differed or
    /// was silent.
    fn agreed(&self, votes: &BTreeMap<String, Vec<u8>>) -> Option<(AppliedEntry, VoteReport)> {
        let mut groups: BTreeMap<&Vec<u8>, Vec<&String>> = BTreeMap::new();
        for (rid, bytes) in votes {
            groups.entry(bytes).or_default().push(rid);
        }
        let (bytes, agreed) = groups.iter().find(|(_, v)| v.len() > self.t)?;
        let entry = AppliedEntry::decode(bytes.as_slice()).ok()?;
        let report = VoteReport {
            agreed: agreed.iter().map(|s| s.to_string()).collect(),
            disagreed: votes
                .iter()
                .filter(|(_, b)| *b != *bytes)
                .map(|(r, _)| (r.clone(), "a different entry".to_string()))
                .collect(),
            silent: self.ids.iter().filter(|r| !votes.contains_key(*r)).cloned().collect(),
        };
        Some((entry, report))
    }
}

impl Drop for ByzClient {
    /// A dropped client closes its stream, so replicas stop waiting for it (best effort: a
    /// client that cannot say goodbye is removed by the master after its timeout).
    fn drop(&mut self) {
        if let Some(t) = self.noop_task.take() {
            t.abort();
        }
        let open = self.shared.stream.lock().unwrap_or_else(|e| e.into_inner()).open;
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !open {
            return;
        }
        let (signed, slot) = Self::next_item(&self.shared, Body::Close(Noop {}), None);
        self.end_stream();
        // Queued on each replica's stream, which ends (after it) when the links are dropped.
        let _guard = handle.enter();
        for link in self.shared.links.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            link.send(&signed, slot, None, Duration::from_secs(2));
        }
    }
}

impl crate::bench::KvBackend for ByzClient {
    async fn finish(&mut self) {
        self.close().await;
    }

    async fn run(&mut self, op: &crate::bench::Op) -> (lockstep_linearizability::Outcome, Option<serde_json::Value>) {
        let query = op.kind == lockstep_linearizability::OpKind::Get;
        let result = self.ordered(crate::bench::kv_payload(op), query).await;
        crate::bench::outcome(op, result.and_then(|v| crate::parse_output(&v.output)))
    }
}

/// A path-friendly helper for tests and tools: the cluster directory of a local cluster.
pub fn cluster_dir(data_dir: &Path, name: &str) -> PathBuf {
    crate::cluster::cluster_dir(data_dir, name)
}

/// What the voter compares between answers: index, output, error, machine name and version,
/// and timestamp.
type VoteKey = (u64, Vec<u8>, String, String, String, u64);

fn vote_key(body: &ReplyBody) -> VoteKey {
    let m = body.machine.clone().unwrap_or_default();
    (
        body.index,
        body.output.clone(),
        body.error.clone(),
        m.name,
        m.version,
        body.ts,
    )
}

/// One vote in progress: the answers heard so far, grouped by what they say, until t+1 of
/// them say the same for the cluster's machine.
struct Ballot {
    t: usize,
    /// The machine (name, version) the replicas must report to be counted.
    machine: (String, String),
    /// Who said each answer.
    votes: BTreeMap<VoteKey, Vec<String>>,
    /// What each replica said, or why it said nothing usable.
    heard: BTreeMap<String, Result<VoteKey, String>>,
}

impl Ballot {
    fn new(t: usize, machine: (String, String)) -> Ballot {
        Ballot {
            t,
            machine,
            votes: BTreeMap::new(),
            heard: BTreeMap::new(),
        }
    }

    /// Read answers from `rx` until one is decided (`Some`), or until the deadline or the
    /// last answer (`None`). Bad signatures are tallied as they come.
    async fn collect(
        &mut self,
        shared: &Shared,
        check: &ReplyCheck,
        rx: &mut AnswerRx,
        deadline: tokio::time::Instant,
    ) -> Option<VoteKey> {
        loop {
            let next = tokio::time::timeout_at(deadline, rx.recv()).await;
            let Ok(Some((id, r))) = next else { return None };
            let verdict = check.check(&id, r);
            if let Some(key) = self.count(shared, id, verdict) {
                return Some(key);
            }
        }
    }

    /// Count replica `id`'s checked answer; the answer it decides, if it is the (t+1)th
    /// alike and names the cluster's machine.
    fn count(&mut self, shared: &Shared, id: String, verdict: Result<ReplyBody, (bool, String)>) -> Option<VoteKey> {
        match verdict {
            Ok(body) => {
                let key = vote_key(&body);
                self.heard.insert(id.clone(), Ok(key.clone()));
                let v = self.votes.entry(key.clone()).or_default();
                v.push(id);
                (v.len() > self.t && (key.3 == self.machine.0 && key.4 == self.machine.1)).then_some(key)
            }
            Err((bad, why)) => {
                if bad {
                    shared.tally(&id, |t| t.bad_signature += 1);
                }
                self.heard.insert(id, Err(why));
                None
            }
        }
    }

    /// After a vote that decided nothing: count silence for each of `ids` that gave no
    /// well-signed answer.
    fn tally_silent(&self, shared: &Shared, ids: &[String]) {
        for id in ids {
            if !matches!(self.heard.get(id), Some(Ok(_))) {
                shared.tally(id, |t| t.silent += 1);
            }
        }
    }
}

/// Checks one replica's answer to one item.
struct ReplyCheck {
    keys: HashMap<String, VerifyingKey>,
    identity: String,
    slot: (u64, u64),
}

impl ReplyCheck {
    /// The answer's body when `id` signed it and it answers this item. `Err((true, why))`:
    /// the replica said something wrong (bad signature, undecodable, another item);
    /// `Err((false, why))`: no answer (the call failed).
    fn check(&self, id: &str, r: Result<SignedReply, String>) -> Result<ReplyBody, (bool, String)> {
        let r = r.map_err(|e| (false, e))?;
        let key = self.keys.get(id).ok_or((true, "unknown replica".to_string()))?;
        if !keys::verify_reply(key, &r.body, &r.signature, &r.path, r.position) {
            return Err((true, "bad signature".into()));
        }
        let body = ReplyBody::decode(r.body.as_slice()).map_err(|e| (true, format!("undecodable: {e}")))?;
        if body.replica != id || body.identity != self.identity || (body.session, body.seq) != self.slot {
            return Err((true, "answer for another item".into()));
        }
        Ok(body)
    }
}

/// Who agreed with `key`, who said what instead, and who was silent, among `ids`.
fn report_for(ids: &[String], key: &VoteKey, heard: &BTreeMap<String, Result<VoteKey, String>>) -> VoteReport {
    let mut report = VoteReport::default();
    for id in ids {
        match heard.get(id) {
            Some(Ok(k)) if k == key => report.agreed.push(id.clone()),
            Some(Ok(k)) => report.disagreed.push((
                id.clone(),
                format!(
                    "index {} output {} {} (machine {} {})",
                    k.0,
                    String::from_utf8_lossy(&k.1),
                    k.2,
                    k.3,
                    k.4
                ),
            )),
            _ => report.silent.push(id.clone()),
        }
    }
    report
}

/// The error of a vote that no t + 1 replicas agreed on in time: what each group said.
fn no_agreement(
    t: usize,
    timeout: Duration,
    votes: &BTreeMap<VoteKey, Vec<String>>,
    heard: &BTreeMap<String, Result<VoteKey, String>>,
) -> String {
    let mut said: Vec<String> = votes.values().map(|v| format!("{} agreed", v.join("+"))).collect();
    said.extend(
        heard
            .iter()
            .filter_map(|(id, r)| r.as_ref().err().map(|e| format!("{id}: {e}"))),
    );
    if said.is_empty() {
        said.push("no answer".into());
    }
    format!("no {} replicas agreed within {timeout:?} ({})", t + 1, said.join("; "))
}

/// After a vote: the replicas in `pending` had not answered; count what each says until the
/// deadline (agreed, disagreed, bad signature), and silence for the rest.
async fn tally_late_answers(
    shared: Arc<Shared>,
    check: ReplyCheck,
    key: VoteKey,
    pending: Vec<String>,
    mut rx: AnswerRx,
    deadline: tokio::time::Instant,
) {
    let mut left: std::collections::BTreeSet<String> = pending.into_iter().collect();
    while let Ok(Some((id, r))) = tokio::time::timeout_at(deadline, rx.recv()).await {
        if !left.remove(&id) {
            continue;
        }
        let verdict = check.check(&id, r);
        shared.tally(&id, |t| match verdict {
            Ok(body) if vote_key(&body) == key => t.agreed += 1,
            Ok(_) => t.disagreed += 1,
            Err((true, _)) => t.bad_signature += 1,
            Err((false, _)) => t.silent += 1,
        });
    }
    for id in left {
        shared.tally(&id, |t| t.silent += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(stability: &str, t: usize, delay: u64, skew: u64) -> ClusterInfo {
        ClusterInfo {
            name: "kv".into(),
            t,
            era: 1,
            replicas: vec![],
            stability: stability.into(),
            max_delay_millis: delay,
            max_skew_millis: skew,
            machine_name: "kv".into(),
            machine_version: "1.0.0".into(),
        }
    }

    #[test]
    fn waits_grow_with_the_ordering_bounds() {
        // The Kubernetes example: Δ = ε + δ + (t+1)(δ+ε) + ε = 50 + 500 + 2·550 + 50 ms.
        let k8s = info("PhysicalClock", 1, 500, 50).ordering_delay();
        assert!(
            k8s >= Duration::from_millis(1700) && k8s < Duration::from_millis(1701),
            "{k8s:?}"
        );
        // LamportClock decides a slot 2(t+1)δ after it is first heard.
        let lamport = info("LamportClock", 2, 10, 0).ordering_delay();
        assert!(
            lamport >= Duration::from_millis(60) && lamport < Duration::from_millis(61),
            "{lamport:?}"
        );
    }

    /// The bench's cluster: t = 1, δ = 2 ms (renewals 12 ms ahead), no-ops every 50 ms.
    fn bench_stream() -> (lockstep_replica::byz::order::Timing, u64, Duration, StreamState) {
        let timing = info("LamportClock", 1, 2, 0).timing();
        let ahead = lockstep_replica::byz::renew_ahead(&timing);
        assert_eq!(ahead, 12_000);
        (
            timing,
            ahead,
            Duration::from_millis(50),
            StreamState::new(1, 5, 1_000_000, true),
        )
    }

    #[test]
    fn a_stream_with_a_command_in_flight_renews_its_promise_before_it_runs_out() {
        let (timing, ahead, interval, mut s) = bench_stream();
        for _ in 0..30 {
            s.observe(Duration::from_millis(30));
        }
        let now = 2_000_000;
        s.busy_since = Some(now);
        let (_, ts, horizon) = s.stamp(now, s.gap_us(now, interval, ahead), Some(ahead));
        assert_eq!(ts, now);
        // The promise covers the expected round trip, and a renewal sent when that is over
        // arrives (δ) and is decided (2(t + 1)δ) everywhere before the promise runs out.
        assert!(s.renew_at >= now + 30_000, "{}", s.renew_at - now);
        assert!(timing.decide_at(s.renew_at + timing.delay_us) < horizon);
        // No whole interval for a busy stream: its next command would be stamped that far
        // ahead and wait for everyone else's promises to pass it.
        assert!(horizon < now + interval.as_micros() as u64, "{}", horizon - now);
        // The answer is late: the no-op sent at `renew_at` keeps the promise and renews it
        // in time again.
        let at = s.renew_at;
        let (seq, ts2, horizon2) = s.stamp(at, s.gap_us(at, interval, ahead), Some(ahead));
        assert_eq!(seq, 2);
        assert!(ts2 >= horizon && horizon2 > horizon);
        assert!(s.renew_at > at && timing.decide_at(s.renew_at + timing.delay_us) < horizon2);
    }

    #[test]
    fn a_command_that_stays_stuck_costs_few_renewals_and_never_lets_the_promise_lapse() {
        let (timing, ahead, interval, mut s) = bench_stream();
        s.observe(Duration::from_millis(10));
        let start = 2_000_000;
        s.busy_since = Some(start);
        let (_, _, mut horizon) = s.stamp(start, s.gap_us(start, interval, ahead), Some(ahead));
        let mut renewals = 0;
        while s.renew_at < start + 3_000_000 {
            let at = s.renew_at;
            let (_, ts, h) = s.stamp(at, s.gap_us(at, interval, ahead), Some(ahead));
            assert!(ts >= horizon, "the promise is kept");
            assert!(timing.decide_at(at + timing.delay_us) < horizon, "renewed in time");
            horizon = h;
            renewals += 1;
        }
        // Spaced 1.5 times further each, up to 4 intervals: about 20 in 3 s, not one per
        // 10 ms round trip.
        assert!(renewals <= 25, "{renewals} renewals");
        // Answered: the stream is idle again and promises one interval.
        s.busy_since = None;
        assert_eq!(s.gap_us(start + 3_000_000, interval, ahead), 50_000);
    }

    #[test]
    fn an_idle_stream_renews_once_per_interval_before_its_promise_runs_out() {
        let (timing, ahead, interval, mut s) = bench_stream();
        s.observe(Duration::from_millis(10));
        let mut at = 2_000_000;
        let (_, _, mut horizon) = s.stamp(at, s.gap_us(at, interval, ahead), Some(ahead));
        for _ in 0..100 {
            assert_eq!(s.renew_at - at, 50_000, "one no-op per interval");
            at = s.renew_at;
            assert!(timing.decide_at(at + timing.delay_us) < horizon);
            let (_, ts, h) = s.stamp(at, s.gap_us(at, interval, ahead), Some(ahead));
            assert!(ts >= horizon);
            horizon = h;
        }
    }

    #[test]
    fn under_physical_clock_a_stream_promises_nothing_and_only_keeps_alive() {
        let (_, _, interval, mut s) = bench_stream();
        s.observe(Duration::from_millis(10));
        s.busy_since = Some(2_000_000);
        let (_, ts, horizon) = s.stamp(2_000_000, interval.as_micros() as u64, None);
        assert_eq!(horizon, ts + 1, "the next item is not stamped ahead");
        assert_eq!(s.renew_at, 2_000_000 + 50_000);
    }

    #[test]
    fn a_close_promises_nothing_and_is_never_renewed() {
        let (_, ahead, _, mut s) = bench_stream();
        let (_, ts, horizon) = s.stamp(2_000_000, 0, Some(ahead));
        assert_eq!(horizon, ts + 1);
        assert_eq!(s.renew_at, u64::MAX);
    }

    #[test]
    fn cluster_files_without_a_skew_still_parse() {
        let old = r#"{"name":"kv","t":1,"era":2,"replicas":[],"stability":"LamportClock",
            "max_delay_millis":10,"machine_name":"kv","machine_version":"1.0.0"}"#;
        let parsed: ClusterInfo = serde_json::from_str(old).expect("parses");
        assert_eq!(parsed.max_skew_millis, 0);
    }
}
