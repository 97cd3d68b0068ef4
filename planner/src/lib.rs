//! The planner: lockstep's decision logic as one pure function.
//!
//! `plan(&Desired, &Observed) -> Plan` decides what the configuration master does next:
//! which replicas to create, which configuration (epoch) to move to, which replicas to
//! delete, and which lockstep-rollout phase comes next. It never performs I/O. The two
//! backends — `lockstep up` (local processes) and `lockstep-operator` (Kubernetes pods) —
//! only observe the world into [`Observed`] and carry out the returned [`Action`]s, then
//! observe again. Every call returns at most one configuration change, so a backend that
//! dies between two steps resumes correctly from what it observes.
//!
//! Fail-stop rules (n = t + 1 voters, write-all):
//! * every voter holds every acknowledged write, so any one surviving voter can carry on;
//! * a failed voter is first *fenced* — the next configuration (higher epoch) leaves it
//!   out — and only then replaced;
//! * a replacement joins as a `Learner` (state transfer from the primary) and is promoted to
//!   `Voter` once it has caught up with the primary's commit index;
//! * when no voter survives, nothing is done: the plan reports `Degraded` and waits.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[cfg(feature = "wire")]
pub mod wire;

/// How replicas may fail; decides the cluster size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureModel {
    FailStop,
    Byzantine,
}

/// Number of replicas needed to tolerate `t` faults under `model`.
pub fn replicas_for(model: FailureModel, t: u32) -> usize {
    match model {
        FailureModel::FailStop => t as usize + 1,
        FailureModel::Byzantine => 2 * t as usize + 1,
    }
}

/// The state machine a replica runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRef {
    pub name: String,
    pub version: String,
    /// Container image (Kubernetes only).
    pub image: Option<String>,
}

impl MachineRef {
    /// True when a replica running `other` runs this same machine.
    pub fn same_as(&self, other: &MachineRef) -> bool {
        self.name == other.name && self.version == other.version && self.image == other.image
    }
}

/// What the user asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub faults_tolerated: u32,
    pub failure_model: FailureModel,
    pub machine: MachineRef,
    /// Pause annotation: observe and report, change nothing.
    pub paused: bool,
}

impl Desired {
    pub fn replicas(&self) -> usize {
        replicas_for(self.failure_model, self.faults_tolerated)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    Voter,
    Learner,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigMember {
    pub id: String,
    pub endpoint: String,
    pub role: Role,
}

/// A configuration decided by the master. Epochs only grow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub epoch: u64,
    pub primary: String,
    pub members: Vec<ConfigMember>,
}

impl Config {
    pub fn member(&self, id: &str) -> Option<&ConfigMember> {
        self.members.iter().find(|m| m.id == id)
    }
    pub fn voters(&self) -> impl Iterator<Item = &ConfigMember> {
        self.members.iter().filter(|m| m.role == Role::Voter)
    }
    /// The next configuration: epoch + 1 with `primary` and `members`.
    pub fn successor(&self, primary: String, members: Vec<ConfigMember>) -> Config {
        Config {
            epoch: self.epoch + 1,
            primary,
            members,
        }
    }

    pub fn learners(&self) -> impl Iterator<Item = &ConfigMember> {
        self.members.iter().filter(|m| m.role == Role::Learner)
    }
}

/// What a backend knows about one replica's process or pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Created, not answering yet (within its start-up grace).
    Starting,
    /// Answering its admin API.
    Running,
    /// Observed fail-stop: process exited, pod failed or deleted, node lost, liveness
    /// failing or unreachable past the grace period.
    Failed { reason: String },
}

/// What a replica reported through its admin `Status` call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub epoch: u64,
    pub applied_index: u64,
    pub commit_index: u64,
    pub last_index: u64,
    /// Index of the seal barrier the replica applied, if sealed.
    pub sealed_at: Option<u64>,
    /// sha256 of the snapshot taken at the seal.
    pub sealed_digest: Option<Vec<u8>>,
    /// On the primary: the match index of each peer.
    pub peer_match: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedReplica {
    pub id: String,
    /// Where its gRPC server listens now.
    pub endpoint: String,
    pub machine: MachineRef,
    pub health: Health,
    pub status: Option<ReplicaStatus>,
}

/// Phases of a lockstep rollout from one machine version to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    /// Make the new version available everywhere before anything stops (pull images).
    Staging,
    /// A seal barrier is ordered through the log; waiting for every voter to apply it.
    Sealing,
    /// Every replica is restarted with the new version from the snapshot at the seal.
    Replacing,
    /// New version running everywhere and sealed at the barrier: resume commands.
    Resuming,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub from: MachineRef,
    pub to: MachineRef,
    pub phase: RolloutPhase,
    pub seal_index: Option<u64>,
}

/// Everything the master observed, plus what it persisted itself (config, rollout).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The configuration the master last decided (persisted by the master), if any.
    pub config: Option<Config>,
    pub replicas: Vec<ObservedReplica>,
    pub rollout: Option<Rollout>,
    /// Local backends: the new version is available (the binary exists); Kubernetes: the
    /// image was pulled on the nodes.
    pub staged: bool,
    /// Ordinals below this were handed out before: new replicas never reuse them, so a
    /// replacement never carries the name (and DNS name, logs) of the replica it replaces.
    /// A backend persists `max(next_ordinal, ordinal + 1)` for every replica it creates.
    pub next_ordinal: usize,
    /// Replicas whose data volume (PVC, data directory) exists. A volume outside the
    /// configuration is kept until redundancy is fully restored (see [`Action::DeleteVolume`]).
    pub volumes: Vec<String>,
}

impl Observed {
    pub fn replica(&self, id: &str) -> Option<&ObservedReplica> {
        self.replicas.iter().find(|r| r.id == id)
    }
}

/// One step for a backend to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a replica with empty state (it joins as a learner through state transfer).
    CreateReplica { id: String, machine: MachineRef },
    /// Persist `config` as the current configuration FIRST (this is the fence), then push it
    /// to every member of it. Also push it to the replicas in `notify` (removed members,
    /// which then refuse all requests).
    Reconfigure { config: Config, notify: Vec<String> },
    /// Re-send the current configuration to a member that reports an older epoch.
    PushConfig { id: String },
    /// Stop and remove a replica that is no longer part of the configuration. Its volume
    /// stays: it may hold the only other copy of the data until redundancy is restored.
    DeleteReplica { id: String, reason: String },
    /// Delete the data volume of a replica outside the configuration. Planned only while every
    /// one of the n voters runs (full redundancy): before that, a fenced replica's disk may
    /// be the last full copy if the survivors fail too.
    DeleteVolume { id: String },
    /// Ask the primary to order a seal barrier through the log.
    Seal,
    /// Make the rollout's target version available (pull images / check the binary).
    Stage { machine: MachineRef },
    /// Restart replica `id` with `machine`, keeping its data (it restarts from the snapshot at
    /// the seal).
    RestartReplica { id: String, machine: MachineRef },
    /// Ask the primary to resume commands after a seal, under `machine`.
    Resume { machine: MachineRef },
    /// Persist the rollout state (None = no rollout in progress).
    SetRollout { rollout: Option<Rollout> },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Every desired replica is a voter that runs the desired version and answers.
    pub ready: bool,
    /// The service accepts commands (a primary and all voters answer, not sealed).
    pub available: bool,
    /// Why the cluster is changing, if it is.
    pub progressing: Option<String>,
    /// Why the cluster cannot make progress on its own or has lost redundancy.
    pub degraded: Option<String>,
    /// A machine-readable reason for `degraded` when it is not about redundancy (e.g.
    /// `WrongMachineVersion`).
    pub degraded_reason: Option<String>,
    pub paused: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub conditions: Conditions,
    /// One line for people: what the plan does and why.
    pub summary: String,
}

impl Plan {
    /// Move to the next epoch with `primary` and `members` (the one way every rule changes the
    /// configuration), telling `notify` too, and say so: "`what`: epoch a -> b".
    fn reconfigure(
        &mut self,
        from: &Config,
        primary: String,
        members: Vec<ConfigMember>,
        notify: Vec<String>,
        what: String,
    ) {
        let config = from.successor(primary, members);
        self.summary = format!("{what}: epoch {} -> {}", from.epoch, config.epoch);
        if config.primary != from.primary {
            self.summary.push_str(&format!(" (primary {})", config.primary));
        }
        self.actions.push(Action::Reconfigure { config, notify });
    }

    /// The cluster is degraded: `why` is both the condition and the summary.
    fn degrade(&mut self, why: String) {
        self.conditions.degraded = Some(why.clone());
        self.summary = why;
    }
}

/// Replica ids are `{prefix}-{ordinal}`.
pub fn replica_id(prefix: &str, ordinal: usize) -> String {
    format!("{prefix}-{ordinal}")
}

fn ordinal(id: &str) -> Option<usize> {
    id.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

/// The ordinal of a replica id `{prefix}-{n}`.
pub fn ordinal_of(id: &str) -> Option<usize> {
    ordinal(id)
}

/// The smallest ordinals from `next_ordinal` on not used by any known replica (in the
/// config or observed).
fn free_ids(prefix: &str, observed: &Observed, count: usize) -> Vec<String> {
    let mut used: BTreeSet<usize> = observed.replicas.iter().filter_map(|r| ordinal(&r.id)).collect();
    if let Some(c) = &observed.config {
        used.extend(c.members.iter().filter_map(|m| ordinal(&m.id)));
    }
    used.extend(observed.volumes.iter().filter_map(|v| ordinal(v)));
    (observed.next_ordinal..)
        .filter(|o| !used.contains(o))
        .take(count)
        .map(|o| replica_id(prefix, o))
        .collect()
}

fn is_failed(observed: &Observed, id: &str) -> Option<String> {
    match observed.replica(id) {
        None => Some("replica is gone".to_string()),
        Some(r) => match &r.health {
            Health::Failed { reason } => Some(reason.clone()),
            _ => None,
        },
    }
}

fn is_running(observed: &Observed, id: &str) -> bool {
    observed
        .replica(id)
        .is_some_and(|r| r.health == Health::Running && r.status.is_some())
}

/// Choose a primary among `candidates` (all hold every acknowledged write): keep the current
/// one when possible, else the one with the longest log (least to truncate), ties by id.
fn choose_primary(observed: &Observed, current: Option<&str>, candidates: &[&ConfigMember]) -> String {
    if let Some(cur) = current
        && candidates.iter().any(|m| m.id == cur)
    {
        return cur.to_string();
    }
    candidates
        .iter()
        .max_by_key(|m| {
            let last = observed
                .replica(&m.id)
                .and_then(|r| r.status.as_ref())
                .map_or(0, |s| s.last_index);
            (last, std::cmp::Reverse(m.id.clone()))
        })
        .map(|m| m.id.clone())
        .unwrap_or_default()
}

/// Decide the next step. `prefix` names replicas (`{prefix}-{ordinal}`).
///
/// The steps run in order, and the first that decides something ends the round: fence failed
/// members, a rollout, moved endpoints, promotions, shrinking, new learners; then cleanup and
/// replacements, and a summary.
pub fn plan(prefix: &str, desired: &Desired, observed: &Observed) -> Plan {
    let mut p = Plan::default();
    p.conditions.paused = desired.paused;
    fill_conditions(desired, observed, &mut p.conditions);
    if desired.paused {
        p.summary = "paused: observing only".into();
        return p;
    }
    let n = desired.replicas();

    let Some(config) = &observed.config else {
        return bootstrap(prefix, desired, observed, n, p);
    };
    if fence_failed(observed, config, &mut p) {
        return p;
    }
    if let Some(step) = rollout_step(desired, observed, config, &mut p) {
        return step;
    }
    if follow_moved_endpoints(observed, config, &mut p) {
        return p;
    }
    push_missed_configs(observed, config, &mut p);
    if promote_caught_up(observed, config, n, &mut p) || shrink_to(config, n, &mut p) {
        return p;
    }
    let Some(joining) = admit_outsiders(desired, observed, config, n, &mut p) else {
        return p;
    };
    delete_left_volumes(observed, config, n, &mut p);
    let create = create_replacements(prefix, desired, observed, config, n, joining, &mut p);
    if p.summary.is_empty() {
        p.summary = summary(config, n, create, joining, &p);
    }
    p
}

/// Step 1: Fence failed members: the next epoch leaves them out (true: this round is decided).
fn fence_failed(observed: &Observed, config: &Config, p: &mut Plan) -> bool {
    let failed = failed_members(observed, config);
    if failed.is_empty() {
        return false;
    }
    let surviving_voters: Vec<&ConfigMember> = config.voters().filter(|m| !is_among(&failed, &m.id)).collect();
    if surviving_voters.is_empty() {
        p.degrade(all_voters_failed(config, &failed));
    } else if !surviving_voters.iter().any(|m| is_running(observed, &m.id)) {
        // A survivor that has not answered yet may be failing too (a pod that still looks
        // Running for a moment): an epoch whose only voters are dead would fence the one
        // replica that may come back with every write. Wait until a survivor answers.
        p.degrade(no_survivor_answered(config, &failed, &surviving_voters));
    } else {
        fence(observed, config, &failed, &surviving_voters, p);
    }
    true
}

/// The members of `config` that failed, each with why.
fn failed_members<'a>(observed: &Observed, config: &'a Config) -> Vec<(&'a ConfigMember, String)> {
    config
        .members
        .iter()
        .filter_map(|m| is_failed(observed, &m.id).map(|r| (m, r)))
        .collect()
}

fn is_among(failed: &[(&ConfigMember, String)], id: &str) -> bool {
    failed.iter().any(|(f, _)| f.id == id)
}

/// "id (reason), ..." of the failed members.
fn with_reasons(failed: &[(&ConfigMember, String)]) -> String {
    failed
        .iter()
        .map(|(m, r)| format!("{} ({r})", m.id))
        .collect::<Vec<_>>()
        .join(", ")
}

fn no_survivor_answered(config: &Config, failed: &[(&ConfigMember, String)], surviving: &[&ConfigMember]) -> String {
    format!(
        "{} failed; no surviving voter of epoch {} has answered yet ({}): \
         not moving to a new epoch until one is confirmed running",
        with_reasons(failed),
        config.epoch,
        surviving
            .iter()
            .map(|m| format!("{} starting", m.id))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn all_voters_failed(config: &Config, failed: &[(&ConfigMember, String)]) -> String {
    format!(
        "all {} voters of epoch {} failed ({}); every acknowledged write is on their disks: \
         not taking a data-losing action, waiting for one to come back",
        config.voters().count(),
        config.epoch,
        failed
            .iter()
            .map(|(m, r)| format!("{}: {r}", m.id))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The next epoch without the failed members, its primary one of the surviving voters that
/// answers (or the current primary); the failed replicas still around are told and deleted.
fn fence(
    observed: &Observed,
    config: &Config,
    failed: &[(&ConfigMember, String)],
    surviving_voters: &[&ConfigMember],
    p: &mut Plan,
) {
    let candidates: Vec<&ConfigMember> = surviving_voters
        .iter()
        .copied()
        .filter(|m| m.id == config.primary || is_running(observed, &m.id))
        .collect();
    let primary = choose_primary(observed, Some(&config.primary), &candidates);
    let members: Vec<ConfigMember> = config
        .members
        .iter()
        .filter(|m| !is_among(failed, &m.id))
        .cloned()
        .collect();
    let what = format!("fencing failed {}", with_reasons(failed));
    let notify = failed
        .iter()
        .filter(|(m, _)| observed.replica(&m.id).is_some())
        .map(|(m, _)| m.id.clone())
        .collect();
    p.reconfigure(config, primary, members, notify, what);
    for (m, reason) in failed {
        if observed.replica(&m.id).is_some() {
            p.actions.push(Action::DeleteReplica {
                id: m.id.clone(),
                reason: format!("fail-stopped: {reason}"),
            });
        }
    }
}

/// Step 3: Endpoints changed (a member restarted on a new address): a new epoch with the new
/// endpoints, so peers find each other (true: this round is decided).
fn follow_moved_endpoints(observed: &Observed, config: &Config, p: &mut Plan) -> bool {
    let moved: Vec<String> = config
        .members
        .iter()
        .filter(|m| {
            observed
                .replica(&m.id)
                .is_some_and(|r| r.health == Health::Running && !r.endpoint.is_empty() && r.endpoint != m.endpoint)
        })
        .map(|m| m.id.clone())
        .collect();
    if moved.is_empty() {
        return false;
    }
    let members = config
        .members
        .iter()
        .map(|m| ConfigMember {
            endpoint: observed
                .replica(&m.id)
                .map_or(m.endpoint.clone(), |r| r.endpoint.clone()),
            ..m.clone()
        })
        .collect();
    let what = format!("members {} moved", moved.join(", "));
    p.reconfigure(config, config.primary.clone(), members, vec![], what);
    true
}

/// Step 4: Members that missed the current configuration get it again.
fn push_missed_configs(observed: &Observed, config: &Config, p: &mut Plan) {
    for m in &config.members {
        if let Some(s) = observed.replica(&m.id).and_then(|r| r.status.as_ref())
            && s.epoch < config.epoch
        {
            p.actions.push(Action::PushConfig { id: m.id.clone() });
        }
    }
}

/// Step 5: Promote learners that caught up with the primary, while voters are short of `n` (true:
/// this round is decided).
fn promote_caught_up(observed: &Observed, config: &Config, n: usize, p: &mut Plan) -> bool {
    let voters = config.voters().count();
    let primary_status = observed.replica(&config.primary).and_then(|r| r.status.as_ref());
    let caught_up: Vec<&ConfigMember> = config
        .learners()
        .filter(|l| {
            primary_status.is_some_and(|ps| {
                ps.peer_match.get(&l.id).is_some_and(|&mi| mi >= ps.commit_index) && is_running(observed, &l.id)
            })
        })
        .collect();
    if caught_up.is_empty() || voters >= n {
        return false;
    }
    let room = n - voters;
    let promote: BTreeSet<&str> = caught_up.iter().take(room).map(|m| m.id.as_str()).collect();
    let members = config
        .members
        .iter()
        .map(|m| ConfigMember {
            role: if promote.contains(m.id.as_str()) {
                Role::Voter
            } else {
                m.role
            },
            ..m.clone()
        })
        .collect();
    let what = format!(
        "promoting caught-up learner(s) {}",
        promote.iter().copied().collect::<Vec<_>>().join(", ")
    );
    p.reconfigure(config, config.primary.clone(), members, vec![], what);
    true
}

/// Step 6: Too many voters (t lowered): remove one non-primary voter per epoch (true: this round
/// is decided).
fn shrink_to(config: &Config, n: usize, p: &mut Plan) -> bool {
    let voters: Vec<&ConfigMember> = config.voters().collect();
    if voters.len() <= n {
        return false;
    }
    let victim = voters
        .iter()
        .filter(|m| m.id != config.primary)
        .max_by_key(|m| (ordinal(&m.id), m.id.clone()))
        .map(|m| m.id.clone())
        .unwrap_or_default();
    let members = config.members.iter().filter(|m| m.id != victim).cloned().collect();
    let what = format!("shrinking to {n} replicas, removing {victim}");
    p.reconfigure(config, config.primary.clone(), members, vec![victim.clone()], what);
    p.actions.push(Action::DeleteReplica {
        id: victim,
        reason: "faultsTolerated lowered".into(),
    });
    true
}

/// Step 7: Replicas outside the configuration: added as learners while the configuration is short,
/// deleted otherwise. `None`: some were added (this round is decided); otherwise how many
/// wanted ones are still starting.
fn admit_outsiders(desired: &Desired, observed: &Observed, config: &Config, n: usize, p: &mut Plan) -> Option<usize> {
    let in_config: BTreeSet<&str> = config.members.iter().map(|m| m.id.as_str()).collect();
    let short = n.saturating_sub(config.members.len());
    let mut joining = Vec::new();
    for r in observed.replicas.iter().filter(|r| !in_config.contains(r.id.as_str())) {
        let wanted = joining.len() < short && r.machine.same_as(&desired.machine);
        match (&r.health, wanted) {
            (Health::Running, true) if r.status.is_some() => joining.push(r),
            (Health::Starting, true) | (Health::Running, true) => joining.push(r), // wait for it
            _ => p.actions.push(Action::DeleteReplica {
                id: r.id.clone(),
                reason: match &r.health {
                    Health::Failed { reason } => format!("failed before joining: {reason}"),
                    _ => "not part of the configuration and not needed".into(),
                },
            }),
        }
    }
    let ready_to_join: Vec<&ObservedReplica> = joining
        .iter()
        .copied()
        .filter(|r| r.health == Health::Running && r.status.is_some())
        .collect();
    if ready_to_join.is_empty() {
        return Some(joining.len());
    }
    let mut members = config.members.clone();
    members.extend(ready_to_join.iter().map(|r| ConfigMember {
        id: r.id.clone(),
        endpoint: r.endpoint.clone(),
        role: Role::Learner,
    }));
    let what = format!(
        "adding {} as learner(s) for state transfer",
        ready_to_join
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    p.reconfigure(config, config.primary.clone(), members, vec![], what);
    None
}

/// Volumes of replicas that left the configuration are deleted only with full redundancy:
/// until then a fenced replica's disk may be the last full copy.
fn delete_left_volumes(observed: &Observed, config: &Config, n: usize, p: &mut Plan) {
    let voters: Vec<&ConfigMember> = config.voters().collect();
    let full_redundancy = voters.len() >= n && voters.iter().all(|m| is_running(observed, &m.id));
    if !full_redundancy {
        return;
    }
    for v in &observed.volumes {
        if !config.members.iter().any(|m| &m.id == v) && observed.replica(v).is_none() {
            p.actions.push(Action::DeleteVolume { id: v.clone() });
        }
    }
}

/// Step 8: Still short: create replacements, at most t in flight (learners + joining). Returns how
/// many.
fn create_replacements(
    prefix: &str,
    desired: &Desired,
    observed: &Observed,
    config: &Config,
    n: usize,
    joining: usize,
    p: &mut Plan,
) -> usize {
    let short = n.saturating_sub(config.members.len());
    let in_flight = config.learners().count() + joining;
    let missing = short.saturating_sub(joining);
    let budget = (desired.faults_tolerated as usize).max(1).saturating_sub(in_flight);
    let create = missing.min(budget);
    for id in free_ids(prefix, observed, create) {
        p.actions.push(Action::CreateReplica {
            id,
            machine: desired.machine.clone(),
        });
    }
    create
}

/// What a round that changed no configuration did, in a line.
fn summary(config: &Config, n: usize, created: usize, joining: usize, p: &Plan) -> String {
    if created > 0 {
        format!("creating {created} replica(s) to reach {n}")
    } else if joining > 0 || config.learners().next().is_some() {
        "waiting for new replicas to start and catch up".into()
    } else if !p.actions.is_empty() {
        "cleaning up".into()
    } else {
        format!(
            "steady: epoch {}, {} voters, primary {}",
            config.epoch,
            config.voters().count(),
            config.primary
        )
    }
}

fn bootstrap(prefix: &str, desired: &Desired, observed: &Observed, n: usize, mut p: Plan) -> Plan {
    let usable: Vec<&ObservedReplica> = observed
        .replicas
        .iter()
        .filter(|r| !matches!(r.health, Health::Failed { .. }))
        .collect();
    for r in observed
        .replicas
        .iter()
        .filter(|r| matches!(r.health, Health::Failed { .. }))
    {
        p.actions.push(Action::DeleteReplica {
            id: r.id.clone(),
            reason: "failed before bootstrap".into(),
        });
    }
    if usable.len() < n {
        for id in free_ids(prefix, observed, n - usable.len()) {
            p.actions.push(Action::CreateReplica {
                id,
                machine: desired.machine.clone(),
            });
        }
        p.summary = format!("bootstrapping: creating {} of {n} replicas", n - usable.len());
        return p;
    }
    let mut chosen: Vec<&ObservedReplica> = usable.clone();
    chosen.sort_by_key(|r| (ordinal(&r.id), r.id.clone()));
    chosen.truncate(n);
    if chosen
        .iter()
        .any(|r| !(r.health == Health::Running && r.status.is_some()))
    {
        p.summary = format!("bootstrapping: waiting for {n} replicas to answer");
        return p;
    }
    let members: Vec<ConfigMember> = chosen
        .iter()
        .map(|r| ConfigMember {
            id: r.id.clone(),
            endpoint: r.endpoint.clone(),
            role: Role::Voter,
        })
        .collect();
    let epoch = chosen
        .iter()
        .filter_map(|r| r.status.as_ref())
        .map(|s| s.epoch)
        .max()
        .unwrap_or(0)
        + 1;
    let config = Config {
        epoch,
        primary: members[0].id.clone(),
        members,
    };
    p.summary = format!(
        "bootstrapping: epoch {epoch} with {n} voters, primary {}",
        config.primary
    );
    p.actions.push(Action::Reconfigure { config, notify: vec![] });
    p
}

/// Lockstep rollout: stage -> seal -> replace -> resume. Returns a finished plan when the
/// rollout decides this step, None when there is no rollout work.
fn rollout_step(desired: &Desired, observed: &Observed, config: &Config, p: &mut Plan) -> Option<Plan> {
    let Some(rollout) = observed.rollout.clone() else {
        return start_rollout(desired, observed, config, p);
    };
    let mut out = p.clone();
    if !rollout.to.same_as(&desired.machine) {
        retarget_rollout(desired, rollout, &mut out);
        return Some(out);
    }
    let voters: Vec<&ConfigMember> = config.voters().collect();
    let statuses: Vec<Option<&ReplicaStatus>> = voters
        .iter()
        .map(|m| observed.replica(&m.id).and_then(|r| r.status.as_ref()))
        .collect();
    match rollout.phase {
        RolloutPhase::Staging => stage(observed, rollout, &mut out),
        RolloutPhase::Sealing => seal(desired, rollout, &voters, &statuses, &mut out),
        RolloutPhase::Replacing => replace_voters(observed, rollout, &voters, &mut out),
        RolloutPhase::Resuming => resume(desired, rollout, &statuses, &mut out),
    }
    out.conditions.progressing = Some(out.summary.clone());
    Some(out)
}

/// The machine a replica reports running, if it is observed.
fn machine_of(observed: &Observed, id: &str) -> Option<MachineRef> {
    observed.replica(id).map(|r| r.machine.clone())
}

/// No rollout yet: start one (staging) when enough members report another machine than the
/// desired one, and the configuration is complete and healthy (repairs come first).
fn start_rollout(desired: &Desired, observed: &Observed, config: &Config, p: &Plan) -> Option<Plan> {
    let differing = config
        .members
        .iter()
        .filter(|m| machine_of(observed, &m.id).is_some_and(|v| !v.same_as(&desired.machine)))
        .count();
    // Byzantine: up to t replicas may report anything; only t+1 reports are a fact.
    let needed = match desired.failure_model {
        FailureModel::FailStop => 1,
        FailureModel::Byzantine => desired.faults_tolerated as usize + 1,
    };
    if differing < needed {
        return None;
    }
    let from = config
        .members
        .iter()
        .find_map(|m| machine_of(observed, &m.id).filter(|v| !v.same_as(&desired.machine)))?;
    // Roll out only a complete, healthy configuration: fail-stop repairs come first.
    if config.voters().count() < desired.replicas() || config.learners().count() > 0 {
        return None;
    }
    let r = Rollout {
        from,
        to: desired.machine.clone(),
        phase: RolloutPhase::Staging,
        seal_index: None,
    };
    let mut out = p.clone();
    out.summary = format!("rollout {} -> {}: staging", r.from.version, r.to.version);
    out.conditions.progressing = Some(out.summary.clone());
    out.actions.push(Action::SetRollout {
        rollout: Some(r.clone()),
    });
    out.actions.push(Action::Stage { machine: r.to.clone() });
    Some(out)
}

/// The desired machine changed mid-rollout: a rollback before anything was replaced resumes
/// the old version; anything else keeps the phase and aims at the new version.
fn retarget_rollout(desired: &Desired, rollout: Rollout, out: &mut Plan) {
    match rollout.phase {
        RolloutPhase::Staging | RolloutPhase::Sealing if desired.machine.same_as(&rollout.from) => {
            out.summary = format!(
                "rollout to {} cancelled: resuming {}",
                rollout.to.version, rollout.from.version
            );
            out.actions.push(Action::Resume {
                machine: rollout.from.clone(),
            });
            out.actions.push(Action::SetRollout { rollout: None });
        }
        _ => {
            let r = Rollout {
                to: desired.machine.clone(),
                ..rollout
            };
            out.summary = format!("rollout retargeted to {}", r.to.version);
            out.actions.push(Action::SetRollout { rollout: Some(r) });
        }
    }
    out.conditions.progressing = Some(out.summary.clone());
}

/// Staging: the new machine is staged on every replica; then seal.
fn stage(observed: &Observed, rollout: Rollout, out: &mut Plan) {
    if observed.staged {
        out.summary = format!("rollout to {}: staged everywhere, sealing", rollout.to.version);
        out.actions.push(Action::SetRollout {
            rollout: Some(Rollout {
                phase: RolloutPhase::Sealing,
                ..rollout
            }),
        });
        out.actions.push(Action::Seal);
    } else {
        out.summary = format!("rollout to {}: staging", rollout.to.version);
        out.actions.push(Action::Stage {
            machine: rollout.to.clone(),
        });
    }
}

/// Sealing: once the voters agree on the seal's snapshot, restart every voter under the new
/// machine; different snapshots stop the rollout.
fn seal(
    desired: &Desired,
    rollout: Rollout,
    voters: &[&ConfigMember],
    statuses: &[Option<&ReplicaStatus>],
    out: &mut Plan,
) {
    match sealed_barrier(desired, statuses) {
        Barrier::Agreed(index) => {
            out.summary = format!("rollout to {}: voters sealed at {index}, replacing", rollout.to.version);
            out.actions.push(Action::SetRollout {
                rollout: Some(Rollout {
                    phase: RolloutPhase::Replacing,
                    seal_index: Some(index),
                    ..rollout.clone()
                }),
            });
            for m in voters {
                out.actions.push(Action::RestartReplica {
                    id: m.id.clone(),
                    machine: rollout.to.clone(),
                });
            }
        }
        Barrier::Diverged(index) => {
            let why = format!(
                "rollout to {}: voters sealed at {index} with DIFFERENT snapshots; stopped",
                rollout.to.version
            );
            out.degrade(why);
        }
        Barrier::Waiting => {
            out.summary = format!("rollout to {}: waiting for the voters to seal", rollout.to.version);
            if statuses.iter().all(|s| s.is_some_and(|s| s.sealed_at.is_none())) {
                out.actions.push(Action::Seal); // idempotent: the primary seals once
            }
        }
    }
}

/// Replacing: restart the voters that do not run the new machine yet; when all do and are
/// running, resume.
fn replace_voters(observed: &Observed, rollout: Rollout, voters: &[&ConfigMember], out: &mut Plan) {
    let stale: Vec<&ConfigMember> = voters
        .iter()
        .copied()
        .filter(|m| machine_of(observed, &m.id).is_some_and(|v| !v.same_as(&rollout.to)))
        .collect();
    if stale.is_empty() && voters.iter().all(|m| is_running(observed, &m.id)) {
        out.summary = format!("rollout to {}: every voter runs it, resuming", rollout.to.version);
        out.actions.push(Action::SetRollout {
            rollout: Some(Rollout {
                phase: RolloutPhase::Resuming,
                ..rollout.clone()
            }),
        });
        out.actions.push(Action::Resume {
            machine: rollout.to.clone(),
        });
        return;
    }
    out.summary = format!(
        "rollout to {}: waiting for {} voter(s) to restart",
        rollout.to.version,
        stale.len()
    );
    if let Some(why) = wrong_machine(observed, &rollout, &stale) {
        out.conditions.degraded_reason = Some("WrongMachineVersion".into());
        out.degrade(why);
    }
    for m in stale {
        out.actions.push(Action::RestartReplica {
            id: m.id.clone(),
            machine: rollout.to.clone(),
        });
    }
}

/// Resuming: done once enough voters run unsealed; until then, resume again.
fn resume(desired: &Desired, rollout: Rollout, statuses: &[Option<&ReplicaStatus>], out: &mut Plan) {
    let resumed = statuses
        .iter()
        .filter(|s| s.is_some_and(|s| s.sealed_at.is_none()))
        .count();
    if resumed >= vouching(desired, statuses.len()) {
        out.summary = format!("rollout to {} done", rollout.to.version);
        out.actions.push(Action::SetRollout { rollout: None });
    } else {
        out.summary = format!("rollout to {}: resuming", rollout.to.version);
        out.actions.push(Action::Resume {
            machine: rollout.to.clone(),
        });
    }
}

/// How many voters' reports make a fact: every voter's for fail-stop (all of them are
/// honest), t + 1 for Byzantine (up to t may report anything, or lag behind).
fn vouching(desired: &Desired, voters: usize) -> usize {
    match desired.failure_model {
        FailureModel::FailStop => voters,
        FailureModel::Byzantine => (desired.faults_tolerated as usize + 1).min(voters),
    }
}

/// Where the voters stand on the rollout's sealing barrier.
#[derive(Debug, PartialEq, Eq)]
enum Barrier {
    /// Enough voters (see [`vouching`]) sealed at this index with the same snapshot.
    Agreed(u64),
    /// Every voter sealed at this index, but their snapshots differ (fail-stop: a bug).
    Diverged(u64),
    Waiting,
}

fn sealed_barrier(desired: &Desired, statuses: &[Option<&ReplicaStatus>]) -> Barrier {
    let mut groups: BTreeMap<(u64, Option<&Vec<u8>>), usize> = BTreeMap::new();
    for s in statuses.iter().flatten() {
        if let Some(index) = s.sealed_at {
            *groups.entry((index, s.sealed_digest.as_ref())).or_default() += 1;
        }
    }
    let needed = vouching(desired, statuses.len());
    if let Some(((index, _), _)) = groups.iter().find(|(_, n)| **n >= needed) {
        return Barrier::Agreed(*index);
    }
    let indexes: BTreeSet<u64> = groups.keys().map(|(i, _)| *i).collect();
    let all_sealed = groups.values().sum::<usize>() == statuses.len();
    match (indexes.len(), indexes.first()) {
        (1, Some(index)) if all_sealed && desired.failure_model == FailureModel::FailStop => Barrier::Diverged(*index),
        _ => Barrier::Waiting,
    }
}

/// Voters that restarted on the rollout's target image but report another machine: the image
/// does not contain the version the spec names. The rollout halts there (it never resumes on
/// a machine other than the target); setting spec.machine back retargets it (rollback).
fn wrong_machine(observed: &Observed, rollout: &Rollout, stale: &[&ConfigMember]) -> Option<String> {
    let image = rollout.to.image.as_deref()?;
    let wrong: Vec<String> = stale
        .iter()
        .filter_map(|m| observed.replica(&m.id).filter(|_| is_running(observed, &m.id)))
        .filter(|r| r.machine.image.as_deref() == Some(image))
        .map(|r| {
            format!(
                "{} runs {image} but reports {} {}",
                r.id, r.machine.name, r.machine.version
            )
        })
        .collect();
    if wrong.is_empty() {
        return None;
    }
    Some(format!(
        "rollout to {} {} halted: {}; the image does not contain the version the spec names. \
         Set spec.machine back to {} {} to roll back, or name an image that contains {} {}",
        rollout.to.name,
        rollout.to.version,
        wrong.join("; "),
        rollout.from.name,
        rollout.from.version,
        rollout.to.name,
        rollout.to.version
    ))
}

fn fill_conditions(desired: &Desired, observed: &Observed, c: &mut Conditions) {
    let n = desired.replicas();
    let Some(config) = &observed.config else {
        c.progressing = Some("bootstrapping".into());
        return;
    };
    let voters: Vec<&ConfigMember> = config.voters().collect();
    let all_voters_up = voters.iter().all(|m| is_running(observed, &m.id));
    let sealed = voters.iter().any(|m| {
        observed
            .replica(&m.id)
            .and_then(|r| r.status.as_ref())
            .is_some_and(|s| s.sealed_at.is_some())
    });
    c.available = all_voters_up && is_running(observed, &config.primary) && !sealed;
    c.ready = c.available
        && voters.len() == n
        && config.members.len() == n
        && voters.iter().all(|m| {
            observed
                .replica(&m.id)
                .is_some_and(|r| r.machine.same_as(&desired.machine))
        });
    if voters.len() < n {
        c.degraded = Some(format!("{} of {n} voters: redundancy reduced", voters.len()));
    }
    if !c.ready && c.progressing.is_none() {
        c.progressing = Some("converging".into());
    }
}

#[cfg(test)]
mod tests;
