//! One replica's replication state and the fail-stop protocol (primary-backup, write-all).
//!
//! The primary of an epoch orders commands into the log, sends every entry to all members
//! (voters and learners) and acknowledges a command only when every *voter* holds it durably
//! and it has been applied. Any surviving voter therefore holds every acknowledged write.
//! Configurations come from the master (admin `Reconfigure`) and carry an epoch; every peer
//! message carries the sender's epoch, and a replica refuses anything from a lower one.
//! A primary that learns of a higher epoch steps down at once (it is *fenced*); linearizable
//! reads need a round of acknowledgements from every voter at the primary's epoch, so a
//! fenced primary cannot serve a stale read either.
//!
//! All state sits in [`Node`] behind one short-held mutex; the I/O around it (gRPC servers,
//! per-peer replication tasks, the storage thread) lives in `server.rs`, `peers.rs` and
//! `writer.rs`.

use crate::metrics::Metrics;
use crate::runtime::{Runtime, digest};
use crate::stages::StageClock;
use crate::writer::{StorageOp, WriterHandle};
use lockstep_proto::{
    AppendRequest, AppendResponse, AppliedEntry, Command, Configuration, InstallSnapshotRequest, LogEntry,
    MachineIdentity, MemberRole, Noop, PeerProgress, ReadResponse, Resume, SealBarrier, Snapshot, StatusResponse,
    log_entry::Body,
};
use prost::Message as _;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::{broadcast, oneshot, watch};
use tonic::{Code, Status};

/// Largest command payload accepted (bigger ones get INVALID_ARGUMENT).
pub const MAX_COMMAND_BYTES: usize = 1024 * 1024;
/// Entries kept in memory below the latest snapshot, so a peer slightly behind needs no
/// full state transfer.
const LOG_TAIL_KEEP: u64 = 1024;
/// ...and of those at most this many bytes.
const LOG_TAIL_KEEP_BYTES: usize = 16 << 20;
/// Most entries sent in one Append.
pub const MAX_APPEND_ENTRIES: usize = 4096;
/// Appends in flight per peer: the next batch travels while the peer fsyncs the previous one.
pub const APPEND_WINDOW: usize = 4;
/// Outputs kept for `Watch { from_index }` replays: this many at most...
const WATCH_REPLAY: usize = 10_000;
/// ...and at most this many bytes (encoded command and output): 10,000 writes of 64 KiB
/// values held 1.3 GiB (docs/benchmarks.md, "What users run").
const WATCH_REPLAY_BYTES: usize = 32 << 20;
/// A snapshot is also taken once this many bytes of entries were applied since the last one
/// (besides every `snapshot_every` entries): the in-memory log is bounded in bytes too.
pub const SNAPSHOT_EVERY_BYTES: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Unconfigured,
    Primary,
    Backup,
    Learner,
    /// Not a member of the newest configuration it knows (fenced for good).
    Removed,
    /// A peer showed a newer epoch than this replica's configuration: it serves nothing
    /// until the master gives it that configuration (in which it may still be the primary).
    Fenced,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unconfigured => "unconfigured",
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Learner => "learner",
            Role::Removed => "removed",
            Role::Fenced => "fenced",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PeerState {
    pub endpoint: String,
    pub voter: bool,
    pub match_index: u64,
    pub next_index: u64,
    /// Highest read round this peer acknowledged at our epoch.
    pub acked_round: u64,
    /// Messages sent and not answered yet (at most `APPEND_WINDOW`).
    pub in_flight: usize,
    /// Commit index and read round carried by the last message sent.
    pub sent_commit: u64,
    pub sent_round: u64,
    pub reachable: bool,
}

struct PendingRead {
    round: u64,
    index: u64,
    query: Vec<u8>,
    reply: oneshot::Sender<Result<ReadResponse, Status>>,
}

/// Answer to a command (or seal/resume): the index and the output (or snapshot digest).
pub type ExecuteReply = oneshot::Sender<Result<(u64, Vec<u8>), Status>>;
pub type SealReply = ExecuteReply;

pub struct Node {
    pub id: String,
    pub identity: MachineIdentity,
    pub role: Role,
    pub epoch: u64,
    /// Highest epoch a peer has shown this replica (> `epoch` means fenced).
    pub fenced_by: u64,
    pub config: Option<Configuration>,
    runtime: Runtime,
    /// In-memory log: `log[0]` has index `log_start`.
    log: VecDeque<LogEntry>,
    log_start: u64,
    snapshot: Option<Arc<Snapshot>>,
    /// Highest index durable on this replica's disk.
    pub durable_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// The last index this replica held when it became primary (of this epoch, or again
    /// after a restart from disk). Any of those entries may already have been acknowledged to
    /// a client — by the previous primary, or by this one before it restarted — while this
    /// replica's commit index lags, so a read is answered only once they are applied too.
    read_floor: u64,
    pub peers: BTreeMap<String, PeerState>,
    pending: HashMap<u64, ExecuteReply>,
    read_round: u64,
    reads: Vec<PendingRead>,
    pending_seal: Vec<SealReply>,
    /// Index of the newest seal barrier put in the log (it may have been truncated since).
    last_seal: u64,
    sealed_digest: Option<Vec<u8>>,
    recent: VecDeque<AppliedEntry>,
    /// Encoded size of `recent`.
    recent_bytes: usize,
    /// Encoded size of the entries applied since the last snapshot.
    applied_bytes_since_snapshot: usize,
    snapshot_every: u64,
    pub durable: bool,
    /// Timestamps of client writes in flight, for `write_stage_seconds` (the shell stamps them;
    /// the node only carries them).
    pub stages: StageClock,
}

/// Everything shared by the servers and background tasks of one replica.
pub struct Shared {
    pub node: std::sync::Mutex<Node>,
    /// Bumped whenever peers have something new to look at (entries, reads, config).
    pub changed: watch::Sender<u64>,
    pub applied_tx: broadcast::Sender<AppliedEntry>,
    pub writer: WriterHandle,
    pub metrics: Metrics,
    /// How this replica reaches its peers (mutual TLS or plaintext).
    pub transport: crate::tls::Transport,
    /// The open replication streams (as primary), for handlers to send new entries on.
    pub outboxes: crate::peers::Outboxes,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Node> {
        // A panic while holding the lock would have aborted the process (panic = abort is
        // not set, but nothing in Node panics on input); recover the guard regardless.
        self.node.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn poke(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// After a durability or acknowledgement event seen at `now`, under the node lock: stamp
    /// the commit, apply what is committed (answering its clients), stamp that, and queue the
    /// snapshots it asks for.
    pub fn apply_committed(&self, node: &mut Node, now: std::time::Instant) {
        let commit = node.commit_index;
        node.stages.committed(commit, now);
        let ops = node.apply_committed(&self.applied_tx);
        let applied = node.applied_index;
        node.stages.applied(applied, std::time::Instant::now(), &self.metrics);
        self.writer.send_all(ops);
    }

    /// Refresh gauges and wake the replication tasks.
    pub fn after_change(&self) {
        {
            let n = self.lock();
            self.metrics.applied_index.set(n.applied_index as i64);
            self.metrics.commit_index.set(n.commit_index as i64);
            self.metrics.epoch.set(n.epoch as i64);
            self.metrics.is_primary.set(i64::from(n.role == Role::Primary));
        }
        self.poke();
    }
}

pub fn failed_precondition(msg: impl Into<String>) -> Status {
    Status::new(Code::FailedPrecondition, msg.into())
}

/// The outcome of a command is not known (it may still commit): the client should retry
/// with the same (client_id, sequence), which applies it at most once.
pub fn unknown_outcome(msg: impl Into<String>) -> Status {
    Status::new(Code::Unavailable, format!("outcome unknown: {}", msg.into()))
}

/// Metadata key naming the primary's endpoint on NOT_PRIMARY errors.
pub const PRIMARY_HINT: &str = "x-lockstep-primary";

impl Node {
    pub fn new(id: String, runtime: Runtime, snapshot_every: u64, durable: bool) -> Node {
        Node {
            id,
            identity: runtime.identity(),
            role: Role::Unconfigured,
            epoch: 0,
            fenced_by: 0,
            config: None,
            runtime,
            log: VecDeque::new(),
            log_start: 1,
            snapshot: None,
            durable_index: 0,
            commit_index: 0,
            read_floor: 0,
            applied_index: 0,
            peers: BTreeMap::new(),
            pending: HashMap::new(),
            read_round: 0,
            reads: Vec::new(),
            pending_seal: Vec::new(),
            last_seal: 0,
            sealed_digest: None,
            recent: VecDeque::new(),
            recent_bytes: 0,
            applied_bytes_since_snapshot: 0,
            snapshot_every,
            durable,
            stages: StageClock::default(),
        }
    }

    /// Rebuild from what the storage recovered.
    pub fn recover(
        &mut self,
        config: Option<Configuration>,
        snapshot: Option<Snapshot>,
        entries: Vec<LogEntry>,
    ) -> anyhow::Result<()> {
        if let Some(s) = snapshot {
            if s.index > crate::storage::MAX_INDEX {
                anyhow::bail!("snapshot index {} is out of range", s.index);
            }
            self.runtime
                .restore(&s.data)
                .map_err(|e| anyhow::anyhow!("cannot restore snapshot at index {}: {e}", s.index))?;
            self.applied_index = s.index;
            self.commit_index = s.index;
            self.durable_index = s.index;
            self.log_start = s.index + 1;
            if self.runtime.sealed_at() == Some(s.index) {
                self.sealed_digest = Some(digest(&s.data));
            }
            self.snapshot = Some(Arc::new(s));
        }
        let applied_by = self.runtime.applied_by().clone();
        if applied_by.name != self.identity.name {
            anyhow::bail!(
                "data dir holds state of machine '{}', this replica runs '{}'",
                applied_by.name,
                self.identity.name
            );
        }
        if applied_by != self.identity && self.runtime.sealed_at().is_none() {
            anyhow::bail!(
                "data dir was written by {} {} and is not sealed: a version change must go through a seal barrier \
                 (lockstep rollout) so no index is executed by two versions",
                applied_by.name,
                applied_by.version
            );
        }
        for e in entries {
            if e.index < self.log_start {
                continue;
            }
            if e.index != self.last_index() + 1 {
                anyhow::bail!("recovered log has a gap at index {}", e.index);
            }
            self.push_entry(e);
        }
        self.durable_index = self.last_index();
        if let Some(c) = config {
            self.adopt(c);
        }
        Ok(())
    }

    pub fn last_index(&self) -> u64 {
        self.log_start - 1 + self.log.len() as u64
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.index)
    }

    fn entry(&self, index: u64) -> Option<&LogEntry> {
        if index < self.log_start {
            return None;
        }
        self.log.get((index - self.log_start) as usize)
    }

    /// Epoch of the entry at `index`, if known (0 for index 0).
    pub fn epoch_at(&self, index: u64) -> Option<u64> {
        if index == 0 {
            return Some(0);
        }
        if let Some(e) = self.entry(index) {
            return Some(e.epoch);
        }
        self.snapshot.as_ref().filter(|s| s.index == index).map(|s| s.epoch)
    }

    fn primary_endpoint(&self) -> Option<String> {
        let c = self.config.as_ref()?;
        c.members
            .iter()
            .find(|m| m.id == c.primary_id)
            .map(|m| m.endpoint.clone())
    }

    /// Error for requests that only the primary serves, with a hint where it is.
    pub fn not_primary(&self) -> Status {
        let (code, msg) = match self.role {
            Role::Unconfigured => (
                Code::Unavailable,
                format!("replica {} has no configuration yet", self.id),
            ),
            Role::Removed => (
                Code::FailedPrecondition,
                format!(
                    "replica {} is fenced: removed from the configuration at epoch {}",
                    self.id, self.epoch
                ),
            ),
            Role::Fenced => (
                Code::FailedPrecondition,
                format!(
                    "replica {} is fenced: its epoch {} was superseded by epoch {}",
                    self.id, self.epoch, self.fenced_by
                ),
            ),
            _ => (
                Code::FailedPrecondition,
                format!(
                    "replica {} is not the primary of epoch {} (primary: {})",
                    self.id,
                    self.epoch,
                    self.config.as_ref().map_or("unknown", |c| c.primary_id.as_str())
                ),
            ),
        };
        let mut status = Status::new(code, msg);
        if let Some(ep) = self
            .primary_endpoint()
            .filter(|_| !matches!(self.role, Role::Removed | Role::Fenced))
            && let Ok(v) = ep.parse()
        {
            status.metadata_mut().insert(PRIMARY_HINT, v);
        }
        status
    }

    fn member_role(config: &Configuration, id: &str) -> Option<MemberRole> {
        config.members.iter().find(|m| m.id == id).map(|m| m.role())
    }

    /// Take `config` as current (caller persisted it or will before acknowledging).
    fn adopt(&mut self, config: Configuration) {
        let was_primary = self.role == Role::Primary;
        self.epoch = config.epoch;
        self.role = match Self::member_role(&config, &self.id) {
            _ if self.fenced_by > config.epoch => Role::Fenced,
            None | Some(MemberRole::Unspecified) => Role::Removed,
            Some(_) if config.primary_id == self.id => Role::Primary,
            Some(MemberRole::Voter) => Role::Backup,
            Some(MemberRole::Learner) => Role::Learner,
        };
        let last = self.last_index();
        let old_peers = std::mem::take(&mut self.peers);
        if self.role == Role::Primary && !was_primary {
            self.read_floor = last;
        }
        if self.role == Role::Primary {
            for m in config.members.iter().filter(|m| m.id != self.id) {
                let keep = old_peers.get(&m.id).filter(|_| was_primary);
                self.peers.insert(
                    m.id.clone(),
                    PeerState {
                        endpoint: m.endpoint.clone(),
                        voter: m.role() == MemberRole::Voter,
                        match_index: keep.map_or(0, |p| p.match_index),
                        // Messages of the old epoch are ignored when they return: resend
                        // from what the peer is known to hold.
                        next_index: keep.map_or(last + 1, |p| p.match_index + 1),
                        acked_round: 0,
                        in_flight: 0,
                        sent_commit: 0,
                        sent_round: 0,
                        reachable: keep.is_some_and(|p| p.reachable),
                    },
                );
            }
        }
        self.config = Some(config);
        if self.role != Role::Primary {
            self.fail_pending(&format!(
                "replica {} is no longer the primary (epoch {})",
                self.id, self.epoch
            ));
        } else {
            // Reads must be re-confirmed under the new epoch.
            let reads = std::mem::take(&mut self.reads);
            for r in reads {
                let _ = r
                    .reply
                    .send(Err(Status::unavailable("configuration changed during the read; retry")));
            }
            self.advance_commit();
        }
    }

    /// Fail everything waiting on this replica as primary.
    fn fail_pending(&mut self, why: &str) {
        for (_, tx) in self.pending.drain() {
            let _ = tx.send(Err(unknown_outcome(why.to_string())));
        }
        for r in self.reads.drain(..) {
            let _ = r.reply.send(Err(failed_precondition(why.to_string())));
        }
        for tx in self.pending_seal.drain(..) {
            let _ = tx.send(Err(unknown_outcome(why.to_string())));
        }
    }

    /// Admin `Reconfigure`: returns the storage op to persist before answering.
    pub fn reconfigure(&mut self, config: Configuration) -> Result<Option<Configuration>, Status> {
        if config.epoch < self.epoch {
            return Err(failed_precondition(format!(
                "stale configuration: epoch {} is older than this replica's epoch {}",
                config.epoch, self.epoch
            )));
        }
        if config.epoch == self.epoch {
            return match &self.config {
                Some(c) if *c == config => Ok(None),
                _ => Err(failed_precondition(format!(
                    "epoch {} already holds a different configuration on replica {}",
                    config.epoch, self.id
                ))),
            };
        }
        if !config
            .members
            .iter()
            .any(|m| m.id == config.primary_id && m.role() == MemberRole::Voter)
        {
            return Err(Status::invalid_argument(format!(
                "configuration of epoch {}: primary '{}' is not a voter of it",
                config.epoch, config.primary_id
            )));
        }
        self.adopt(config.clone());
        Ok(Some(config))
    }

    /// Client command on the primary: order it into the log.
    pub fn propose(&mut self, command: Command, reply: ExecuteReply) -> Result<Vec<LogEntry>, Status> {
        if self.role != Role::Primary {
            return Err(self.not_primary());
        }
        if let Some(at) = self.runtime.sealed_at() {
            return Err(failed_precondition(format!(
                "sealed at index {at} for a version change; commands resume after the upgrade (or an admin Resume)"
            )));
        }
        if !self.pending_seal.is_empty() || self.seal_ordered() {
            return Err(failed_precondition(
                "a seal barrier is being ordered; commands resume after the upgrade",
            ));
        }
        if command.payload.len() > MAX_COMMAND_BYTES {
            return Err(Status::invalid_argument(format!(
                "command of {} bytes exceeds the limit of {MAX_COMMAND_BYTES} bytes",
                command.payload.len()
            )));
        }
        if let Err(e) = self.runtime.validate(&command) {
            return Err(Status::invalid_argument(e.0));
        }
        // A retry of something already applied answers from the session, without a new entry.
        if let Some(answer) = self.runtime.session_answer(&command) {
            return match answer {
                Ok(output) => {
                    let _ = reply.send(Ok((self.applied_index, output)));
                    Ok(Vec::new())
                }
                Err(e) => Err(failed_precondition(e.0)),
            };
        }
        let entry = LogEntry {
            index: self.last_index() + 1,
            epoch: self.epoch,
            body: Some(Body::Command(command)),
        };
        self.pending.insert(entry.index, reply);
        self.log.push_back(entry.clone());
        Ok(vec![entry])
    }

    /// A seal barrier is in the log but not applied yet. O(1): this runs for every command.
    fn seal_ordered(&self) -> bool {
        self.last_seal > self.applied_index
            && self
                .entry(self.last_seal)
                .is_some_and(|e| matches!(e.body, Some(Body::Seal(_))))
    }

    /// Append to the in-memory log, remembering where the newest seal barrier is.
    fn push_entry(&mut self, e: LogEntry) {
        if matches!(e.body, Some(Body::Seal(_))) {
            self.last_seal = e.index;
        }
        self.log.push_back(e);
    }

    /// Admin `Seal`: order the barrier at `at_index` (0 = next index), padding with no-ops.
    pub fn seal(&mut self, at_index: u64, reply: SealReply) -> Result<Vec<LogEntry>, Status> {
        if self.role != Role::Primary {
            return Err(self.not_primary());
        }
        if let Some(at) = self.runtime.sealed_at() {
            if at_index == 0 || at_index == at {
                let _ = reply.send(Ok((at, self.sealed_digest.clone().unwrap_or_default())));
                return Ok(Vec::new());
            }
            return Err(failed_precondition(format!("already sealed at index {at}")));
        }
        if self.seal_ordered() {
            self.pending_seal.push(reply);
            return Ok(Vec::new());
        }
        let next = self.last_index() + 1;
        let at = if at_index == 0 { next } else { at_index };
        if at < next {
            return Err(failed_precondition(format!(
                "cannot seal at index {at}: the log already reached index {}; choose {next} or later",
                next - 1
            )));
        }
        let mut out = Vec::new();
        for index in next..at {
            out.push(LogEntry {
                index,
                epoch: self.epoch,
                body: Some(Body::Noop(Noop {})),
            });
        }
        out.push(LogEntry {
            index: at,
            epoch: self.epoch,
            body: Some(Body::Seal(SealBarrier {
                machine: Some(self.identity.clone()),
            })),
        });
        for e in &out {
            self.push_entry(e.clone());
        }
        self.pending_seal.push(reply);
        Ok(out)
    }

    /// Admin `Resume`: lift the seal under this replica's machine identity.
    pub fn resume(&mut self, reply: ExecuteReply) -> Result<Vec<LogEntry>, Status> {
        if self.role != Role::Primary {
            return Err(self.not_primary());
        }
        if self.runtime.sealed_at().is_none() {
            let _ = reply.send(Ok((self.applied_index, Vec::new())));
            return Ok(Vec::new());
        }
        let entry = LogEntry {
            index: self.last_index() + 1,
            epoch: self.epoch,
            body: Some(Body::Resume(Resume {
                machine: Some(self.identity.clone()),
            })),
        };
        self.pending.insert(entry.index, reply);
        self.log.push_back(entry.clone());
        Ok(vec![entry])
    }

    /// Linearizable read on the primary: needs one round of acks from every voter at this
    /// epoch, started after the read arrived, then the state as of the commit index at
    /// arrival.
    pub fn read(&mut self, query: Vec<u8>, reply: oneshot::Sender<Result<ReadResponse, Status>>) {
        if self.role != Role::Primary {
            let _ = reply.send(Err(self.not_primary()));
            return;
        }
        if let Err(e) = self.runtime.query(&query).map(|_| ()) {
            let _ = reply.send(Err(Status::invalid_argument(e.0)));
            return;
        }
        self.read_round += 1;
        self.reads.push(PendingRead {
            round: self.read_round,
            index: self.commit_index.max(self.read_floor),
            query,
            reply,
        });
        self.check_reads();
    }

    pub fn read_round(&self) -> u64 {
        self.read_round
    }

    fn check_reads(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        let confirmed = self
            .peers
            .values()
            .filter(|p| p.voter)
            .map(|p| p.acked_round)
            .min()
            .unwrap_or(self.read_round);
        let applied = self.applied_index;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads)
            .into_iter()
            .partition(|r| r.round <= confirmed && r.index <= applied);
        self.reads = waiting;
        for r in ready {
            let result = self
                .runtime
                .query(&r.query)
                .map(|output| ReadResponse {
                    index: applied,
                    epoch: self.epoch,
                    output,
                    machine: Some(self.identity.clone()),
                })
                .map_err(|e| Status::invalid_argument(e.0));
            let _ = r.reply.send(result);
        }
    }

    /// Take the next message for `peer` (and count it as in flight), or None when the peer
    /// has everything, no commit index or read round is news to it, no heartbeat is due, or
    /// the window is full. Entries are sent optimistically: `next_index` moves past them at
    /// once, and back to the peer's hint if it refuses.
    pub fn next_message(&mut self, peer: &str, heartbeat_due: bool) -> Option<PeerMessage> {
        if self.role != Role::Primary {
            return None;
        }
        let (last, commit, round, log_start) = (self.last_index(), self.commit_index, self.read_round, self.log_start);
        let p = self.peers.get(peer)?;
        if p.in_flight >= APPEND_WINDOW {
            return None;
        }
        let config = self.config.clone();
        if p.next_index < log_start {
            if p.in_flight > 0 {
                return None; // state transfer goes alone
            }
            let snap = self.snapshot.clone()?;
            let p = self.peers.get_mut(peer)?;
            p.in_flight += 1;
            p.next_index = snap.index + 1;
            return Some(PeerMessage::Snapshot(InstallSnapshotRequest {
                epoch: self.epoch,
                primary_id: self.id.clone(),
                snapshot: Some((*snap).clone()),
                config,
            }));
        }
        let has_new = p.next_index <= last;
        // One read round in flight at a time: its answer confirms every read that arrived
        // before it left, and the next round then serves all reads that came meanwhile.
        // (A round also rides along with any message sent for entries or the commit index.)
        let round_in_flight = p.sent_round > p.acked_round;
        let news = p.sent_commit < commit || (p.sent_round < round && !round_in_flight);
        if !(has_new || news || (heartbeat_due && p.in_flight == 0)) {
            return None;
        }
        let prev_index = p.next_index - 1;
        let prev_epoch = self.epoch_at(prev_index)?;
        let entries: Vec<LogEntry> = (p.next_index..=last)
            .take(MAX_APPEND_ENTRIES)
            .filter_map(|i| self.entry(i).cloned())
            .collect();
        let req = AppendRequest {
            epoch: self.epoch,
            primary_id: self.id.clone(),
            prev_index,
            prev_epoch,
            commit_index: commit,
            machine: Some(self.identity.clone()),
            config,
            entries,
        };
        let p = self.peers.get_mut(peer)?;
        p.in_flight += 1;
        p.next_index = prev_index + req.entries.len() as u64 + 1;
        p.sent_commit = commit;
        p.sent_round = round;
        Some(PeerMessage::Append(req, round))
    }

    /// A peer answered an Append/InstallSnapshot sent at `epoch`.
    pub fn on_peer_response(&mut self, peer: &str, sent_epoch: u64, round: u64, resp: &AppendResponse) {
        if resp.epoch > self.epoch {
            tracing::warn!(
                peer,
                their_epoch = resp.epoch,
                our_epoch = self.epoch,
                "fenced: a peer is at a newer epoch"
            );
            self.fenced_by = self.fenced_by.max(resp.epoch);
            self.role = Role::Fenced;
            self.peers.clear();
            let why = format!("replica {} was fenced: a peer is at epoch {}", self.id, resp.epoch);
            self.fail_pending(&why);
            return;
        }
        if sent_epoch != self.epoch || self.role != Role::Primary {
            return;
        }
        let last = self.last_index();
        let Some(p) = self.peers.get_mut(peer) else { return };
        p.reachable = true;
        p.in_flight = p.in_flight.saturating_sub(1);
        if resp.success {
            // A peer cannot hold more than this primary has sent: a larger claim is garbage
            // (and `match_index + 1` must not overflow).
            p.match_index = p.match_index.max(resp.match_index.min(last));
            p.next_index = p.next_index.max(p.match_index + 1);
            p.acked_round = p.acked_round.max(round);
        } else {
            if !resp.error.is_empty() {
                tracing::debug!(peer, error = %resp.error, "append refused");
            }
            p.next_index = resp.hint_index.max(1).min(last + 1);
            // Whatever else is in flight was built on the refused prefix: resend it all.
            p.sent_commit = 0;
            p.sent_round = 0;
        }
        self.advance_commit();
        self.check_reads();
    }

    /// A message to `peer` got no answer (connection error or timeout): resend from what
    /// the peer is known to hold.
    pub fn on_peer_unreachable(&mut self, peer: &str) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.reachable = false;
            p.in_flight = p.in_flight.saturating_sub(1);
            p.next_index = p.match_index + 1;
            p.sent_commit = 0;
            p.sent_round = 0;
        }
    }

    /// Local durability progress from the storage thread.
    pub fn on_durable(&mut self, index: u64) {
        self.durable_index = index.min(self.last_index());
        self.advance_commit();
    }

    fn advance_commit(&mut self) {
        if self.role != Role::Primary {
            return;
        }
        let commit = self
            .replicated_index()
            .map_or(self.durable_index, |r| r.min(self.durable_index));
        if commit > self.commit_index {
            self.commit_index = commit;
        }
    }

    /// The highest index every voter peer holds (None without voter peers).
    pub fn replicated_index(&self) -> Option<u64> {
        self.peers.values().filter(|p| p.voter).map(|p| p.match_index).min()
    }

    /// Apply committed entries; returns storage ops (snapshots) to queue.
    pub fn apply_committed(&mut self, applied_tx: &broadcast::Sender<AppliedEntry>) -> Vec<StorageOp> {
        let mut ops = Vec::new();
        while self.applied_index < self.commit_index {
            let index = self.applied_index + 1;
            let Some(entry) = self.entry(index).cloned() else { break };
            let applied = self.runtime.apply(&entry);
            self.applied_index = index;
            let event = AppliedEntry {
                index,
                epoch: entry.epoch,
                kind: applied.kind.to_string(),
                command: match &entry.body {
                    Some(Body::Command(c)) => Some(c.clone()),
                    _ => None,
                },
                output: applied.output.clone(),
                machine: Some(self.runtime.applied_by().clone()),
            };
            let _ = applied_tx.send(event.clone());
            self.applied_bytes_since_snapshot += entry.encoded_len();
            self.remember_applied(event);
            if let Some(tx) = self.pending.remove(&index) {
                let _ = tx.send(Ok((index, applied.output)));
            }
            if applied.kind == "seal" {
                let snap = self.make_snapshot(&entry);
                let d = snap.digest.clone();
                self.sealed_digest = Some(d.clone());
                ops.push(StorageOp::Snapshot(snap));
                for tx in self.pending_seal.drain(..) {
                    let _ = tx.send(Ok((index, d.clone())));
                }
                tracing::info!(index, digest = %hex::encode(&d), "sealed");
            } else if applied.kind == "resume" {
                self.sealed_digest = None;
            } else if index - self.snapshot_index() >= self.snapshot_every
                || self.applied_bytes_since_snapshot >= SNAPSHOT_EVERY_BYTES
            {
                ops.push(StorageOp::Snapshot(self.make_snapshot(&entry)));
            }
        }
        self.check_reads();
        ops
    }

    /// Keep `event` for watch replays, within [`WATCH_REPLAY`] entries and
    /// [`WATCH_REPLAY_BYTES`].
    fn remember_applied(&mut self, event: AppliedEntry) {
        self.recent_bytes += event.encoded_len();
        self.recent.push_back(event);
        while self.recent.len() > WATCH_REPLAY || (self.recent_bytes > WATCH_REPLAY_BYTES && self.recent.len() > 1) {
            if let Some(old) = self.recent.pop_front() {
                self.recent_bytes -= old.encoded_len();
            }
        }
    }

    fn make_snapshot(&mut self, at: &LogEntry) -> Snapshot {
        self.applied_bytes_since_snapshot = 0;
        let data = self.runtime.snapshot();
        let snap = Snapshot {
            index: at.index,
            epoch: at.epoch,
            digest: digest(&data),
            data,
            machine: Some(self.runtime.applied_by().clone()),
        };
        self.snapshot = Some(Arc::new(snap.clone()));
        // Drop in-memory entries well below the snapshot.
        let mut keep_from = at.index.saturating_sub(LOG_TAIL_KEEP).max(self.log_start);
        let mut tail_bytes: usize = (keep_from..=at.index)
            .filter_map(|i| self.entry(i))
            .map(|e| e.encoded_len())
            .sum();
        while tail_bytes > LOG_TAIL_KEEP_BYTES && keep_from < at.index {
            tail_bytes -= self.entry(keep_from).map_or(0, |e| e.encoded_len());
            keep_from += 1;
        }
        while self.log_start < keep_from {
            self.log.pop_front();
            self.log_start += 1;
        }
        snap
    }

    /// Admin `TakeSnapshot`.
    pub fn take_snapshot(&mut self) -> Option<StorageOp> {
        let index = self.applied_index;
        if index == 0 || index == self.snapshot_index() {
            return None;
        }
        let entry = self.entry(index).cloned()?;
        Some(StorageOp::Snapshot(self.make_snapshot(&entry)))
    }

    /// Backup side of `Append`. Returns the response to send after `ops` are durable, or an
    /// immediate response (no ops).
    pub fn handle_append(&mut self, req: AppendRequest) -> (AppendResponse, Vec<StorageOp>) {
        let mut ops = Vec::new();
        let matched = req.prev_index + req.entries.len() as u64;
        let accepted = self
            .accept_primary(&req, &mut ops)
            .and_then(|()| self.match_log(req.prev_index, req.prev_epoch))
            .and_then(|()| self.append_entries(req.entries, &mut ops));
        if let Err(refusal) = accepted {
            return (refusal, ops);
        }
        let new_commit = req.commit_index.min(matched);
        if new_commit > self.commit_index {
            self.commit_index = new_commit;
        }
        (
            AppendResponse {
                epoch: self.epoch,
                success: true,
                match_index: matched,
                hint_index: 0,
                error: String::new(),
            },
            ops,
        )
    }

    /// An Append refused at this replica's epoch; `hint` is where the primary should resend
    /// from (0: no hint).
    fn refusal(&self, hint: u64, error: String) -> AppendResponse {
        AppendResponse {
            epoch: self.epoch,
            success: false,
            match_index: 0,
            hint_index: hint,
            error,
        }
    }

    /// The sender is the primary of this replica's epoch (adopting a newer epoch's
    /// configuration the request carries) and runs the same machine.
    fn accept_primary(&mut self, req: &AppendRequest, ops: &mut Vec<StorageOp>) -> Result<(), AppendResponse> {
        if req.epoch < self.epoch {
            return Err(self.refusal(0, format!("stale epoch {} < {}", req.epoch, self.epoch)));
        }
        if req.machine.as_ref() != Some(&self.identity) {
            let theirs = req
                .machine
                .as_ref()
                .map_or("none".into(), |m| format!("{} {} ({})", m.name, m.version, m.digest));
            return Err(self.refusal(
                0,
                format!(
                    "machine mismatch: primary runs {theirs}, this replica runs {} {} ({})",
                    self.identity.name, self.identity.version, self.identity.digest
                ),
            ));
        }
        if let Err(error) = self.adopt_from_primary(req.epoch, &req.primary_id, req.config.as_ref(), ops) {
            return Err(self.refusal(0, error));
        }
        let primary = self.config.as_ref().map(|c| c.primary_id.clone()).unwrap_or_default();
        if req.primary_id != primary
            || matches!(
                self.role,
                Role::Removed | Role::Primary | Role::Unconfigured | Role::Fenced
            )
        {
            return Err(self.refusal(
                0,
                format!("{} is not the primary of epoch {} here", req.primary_id, self.epoch),
            ));
        }
        Ok(())
    }

    /// Log matching: this replica holds the entry before the new ones, from the same epoch.
    /// When it holds another entry there, the primary is asked to resend from the commit
    /// index; nothing is dropped here. This replica's commit index can lag what the old
    /// primary committed, so entries after it may be committed ones the new primary holds
    /// too: only an entry that differs from one the primary sends is dropped
    /// (`append_each`), and then with everything after it.
    fn match_log(&self, prev_index: u64, prev_epoch: u64) -> Result<(), AppendResponse> {
        if prev_index > self.last_index() {
            return Err(self.refusal(self.last_index() + 1, "missing entries".into()));
        }
        if prev_index >= self.log_start && self.epoch_at(prev_index) != Some(prev_epoch) {
            return Err(self.refusal(
                self.commit_index + 1,
                format!("log diverged at index {prev_index}; resend from the commit index"),
            ));
        }
        Ok(())
    }

    /// Append the entries this replica does not hold yet (truncating an uncommitted
    /// conflicting suffix first) and queue them for the disk. Refused at a bad entry, the ones
    /// before it are held and queued all the same: an entry in the log is always on its way to
    /// the disk, or a later Append would find it held and acknowledge it undurable.
    fn append_entries(&mut self, entries: Vec<LogEntry>, ops: &mut Vec<StorageOp>) -> Result<(), AppendResponse> {
        let mut appended = Vec::new();
        let result = self.append_each(entries, ops, &mut appended);
        if !appended.is_empty() {
            ops.push(StorageOp::Append(appended));
        }
        result
    }

    fn append_each(
        &mut self,
        entries: Vec<LogEntry>,
        ops: &mut Vec<StorageOp>,
        appended: &mut Vec<LogEntry>,
    ) -> Result<(), AppendResponse> {
        for e in entries {
            if e.index <= self.last_index() {
                if e.index < self.log_start || self.epoch_at(e.index) == Some(e.epoch) {
                    continue; // already held (or covered by the snapshot)
                }
                if e.index <= self.commit_index {
                    tracing::error!(index = e.index, "primary sent a conflicting committed entry; refusing");
                    return Err(self.refusal(0, "conflict below the commit index".into()));
                }
                self.truncate_after(e.index - 1);
                ops.push(StorageOp::Truncate(e.index - 1));
            }
            if e.index > crate::storage::MAX_INDEX {
                return Err(self.refusal(0, format!("entry index {} is out of range", e.index)));
            }
            if e.index != self.last_index() + 1 {
                return Err(self.refusal(self.last_index() + 1, "non-contiguous entries".into()));
            }
            self.push_entry(e.clone());
            appended.push(e);
        }
        Ok(())
    }

    /// A message from the primary of a newer epoch carries that epoch's configuration:
    /// adopt it (and queue it for the disk) before acting on the message.
    fn adopt_from_primary(
        &mut self,
        epoch: u64,
        primary_id: &str,
        config: Option<&Configuration>,
        ops: &mut Vec<StorageOp>,
    ) -> Result<(), String> {
        if epoch <= self.epoch {
            return Ok(());
        }
        match config {
            Some(c) if c.epoch == epoch && c.primary_id == primary_id => {
                self.adopt(c.clone());
                ops.push(StorageOp::Config(c.clone()));
                Ok(())
            }
            _ => Err(format!("epoch {epoch} unknown here and no configuration sent")),
        }
    }

    fn truncate_after(&mut self, index: u64) {
        while self.last_index() > index && !self.log.is_empty() {
            self.log.pop_back();
        }
        self.durable_index = self.durable_index.min(index);
    }

    /// Backup/learner side of `InstallSnapshot` (state transfer).
    pub fn handle_install(&mut self, req: InstallSnapshotRequest) -> (AppendResponse, Vec<StorageOp>) {
        let mut ops = Vec::new();
        if req.epoch < self.epoch {
            return (self.refusal(0, format!("stale epoch {}", req.epoch)), ops);
        }
        let Some(snap) = req.snapshot else {
            return (self.refusal(0, "no snapshot".into()), ops);
        };
        if let Err(error) = self.adopt_from_primary(req.epoch, &req.primary_id, req.config.as_ref(), &mut ops) {
            return (self.refusal(0, error), ops);
        }
        if matches!(
            self.role,
            Role::Removed | Role::Primary | Role::Unconfigured | Role::Fenced
        ) {
            return (self.refusal(0, "not a follower".into()), ops);
        }
        if snap.index > crate::storage::MAX_INDEX {
            return (
                self.refusal(0, format!("snapshot index {} is out of range", snap.index)),
                ops,
            );
        }
        if digest(&snap.data) != snap.digest {
            return (self.refusal(0, "snapshot digest mismatch".into()), ops);
        }
        if snap.index <= self.applied_index {
            let m = self.last_index().max(snap.index);
            return (
                AppendResponse {
                    epoch: self.epoch,
                    success: true,
                    match_index: snap.index.min(m),
                    ..Default::default()
                },
                ops,
            );
        }
        if let Err(e) = self.runtime.restore(&snap.data) {
            return (self.refusal(0, format!("cannot restore: {e}")), ops);
        }
        self.log.clear();
        self.log_start = snap.index + 1;
        self.applied_index = snap.index;
        self.commit_index = self.commit_index.max(snap.index);
        self.durable_index = snap.index;
        self.sealed_digest = (self.runtime.sealed_at() == Some(snap.index)).then(|| snap.digest.clone());
        let index = snap.index;
        self.snapshot = Some(Arc::new(snap.clone()));
        ops.push(StorageOp::Install(snap));
        tracing::info!(index, "installed snapshot from the primary (state transfer)");
        (
            AppendResponse {
                epoch: self.epoch,
                success: true,
                match_index: index,
                ..Default::default()
            },
            ops,
        )
    }

    /// Entries applied from `from` on, for a watcher (None when compacted away).
    pub fn replay_from(&self, from: u64) -> Option<Vec<AppliedEntry>> {
        if from > self.applied_index {
            return Some(Vec::new());
        }
        let oldest = self.recent.front().map_or(self.applied_index + 1, |e| e.index);
        if from < oldest {
            return None;
        }
        Some(self.recent.iter().filter(|e| e.index >= from).cloned().collect())
    }

    pub fn oldest_replayable(&self) -> u64 {
        self.recent.front().map_or(self.applied_index + 1, |e| e.index)
    }

    pub fn status(&self) -> StatusResponse {
        StatusResponse {
            id: self.id.clone(),
            epoch: self.epoch,
            state: self.role.as_str().into(),
            applied_index: self.applied_index,
            commit_index: self.commit_index,
            last_index: self.last_index(),
            machine: Some(self.identity.clone()),
            config: self.config.clone(),
            sealed_at: self.runtime.sealed_at().unwrap_or(0),
            sealed_digest: self.sealed_digest.clone().unwrap_or_default(),
            peers: self
                .peers
                .iter()
                .map(|(id, p)| PeerProgress {
                    id: id.clone(),
                    match_index: p.match_index,
                    reachable: p.reachable,
                })
                .collect(),
            snapshot_index: self.snapshot_index(),
            durable: self.durable,
            // Filled in by the admin server (process environment, not protocol state).
            launched_image: String::new(),
            byzantine: None,
        }
    }
}

pub enum PeerMessage {
    /// The request and the read round it confirms.
    Append(AppendRequest, u64),
    Snapshot(InstallSnapshotRequest),
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "node_sim.rs"]
mod sim;
