//! The operator as the configuration master of Byzantine clusters: one task per resource,
//! running only in the operator that holds the leader Lease (the controller, and so these
//! tasks, run only there; `Masters::stop_all` ends them when the controller stops).
//!
//! The protocol logic is `lockstep::up_byz::ByzMaster`, the same code `lockstep up` runs; this
//! file only feeds it (replica statuses, client keys from the `spec.clientIdentities` Secret,
//! replica public keys from the key Secrets the operator created) and persists what it signs.
//!
//! Every 100 ms the task polls the replicas of the current era and of the target
//! configuration, then:
//! 1. without a running master stream (a fresh start, a fail-over, a new era): pushes the
//!    persisted era to members that lack it and continues the era's master stream from what
//!    t + 1 members report (`ByzMaster::resume_stream`) — the one code path for a fresh era
//!    and for a new leader;
//! 2. admits streams clients ask to open and removes stalled ones (`on_statuses_with`);
//! 3. when the persisted configuration (status, written by the reconcile's Reconfigure) has
//!    a newer epoch than the era: orders a barrier, signs the next era, records it in the
//!    master Secret (before anyone sees it), and pushes it.
//!
//! Sequence numbers and timestamps of the master stream are not stored: they are recovered
//! from the replicas, which must agree on them anyway. Only the key, the signed era (with
//! its master session) and a rollout's sealing barrier are, because replicas cannot give
//! those back trustworthily: a replica could not prove which session is the newest, members
//! restarted for a rollout report no era and so no barrier, and the key must never leave the
//! operator.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use lockstep::up_byz::ByzMaster;
use lockstep_planner::Config;
use lockstep_proto::{MachineIdentity, StatusResponse};
use lockstep_replica::byz::keys;
use tokio::sync::watch;

use super::objects::{self, SealedBarrier};

const POLL: Duration = Duration::from_millis(100);
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
const BARRIER_TIMEOUT: Duration = Duration::from_secs(30);
const REPUSH_EVERY: Duration = Duration::from_secs(2);
/// How often the task looks whether its resource still exists (its master Secret is owned by
/// the resource and garbage-collected with it); a deleted resource's master stops.
const EXISTS_EVERY: Duration = Duration::from_secs(30);
const IDENTITIES_EVERY: Duration = Duration::from_secs(1);

/// What the master last saw, for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub era: u64,
    pub statuses: BTreeMap<String, StatusResponse>,
    pub error: Option<String>,
    /// The era lost its members: t + 1 replicas restarted and report no era
    /// (`up_byz::EraStanding::Restarted`). The reconcile then records a recovery era.
    pub restarted: bool,
    /// The era's master stream ended and t + 1 members stopped at the barrier that follows
    /// (`ByzMaster::ended_at_barrier`): no barrier can be ordered in it any more. The
    /// reconcile then records the next epoch with the same members, which starts there.
    pub stream_ended: bool,
    /// The era whose sealing barrier is recorded in the master Secret: a rollout restarts
    /// replicas only after that (restarted members no longer report the barrier).
    pub seal_recorded: Option<u64>,
}

/// What the reconcile asked of the master for a lockstep rollout (docs/byzantine.md, "On
/// Kubernetes"): a seal barrier in the current era, and the machine the next era resumes under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutWish {
    /// Order a sealing barrier (once per era).
    pub seal: bool,
    /// (name, version): the next era resumes the sealed runtime under this machine, with the
    /// identity (digest included) t + 1 of its members report.
    pub resume: Option<(String, String)>,
}

/// One resource's master task.
pub struct Runner {
    target: watch::Sender<Option<Config>>,
    wish: Arc<Mutex<RolloutWish>>,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
    pub master_public_key: String,
}

impl Runner {
    /// Hand the master the configuration persisted in status (it moves the era there).
    pub fn want(&self, config: Option<Config>) {
        self.target.send_if_modified(|cur| {
            let changed = *cur != config;
            *cur = config;
            changed
        });
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A rollout's Seal step: the master orders a sealing barrier in the current era.
    pub fn seal(&self) {
        if let Ok(mut w) = self.wish.lock() {
            w.seal = true;
        }
    }

    /// A rollout's Resume step: the next era (the caller persisted its configuration) resumes
    /// under `name` `version`.
    pub fn resume_under(&self, name: &str, version: &str) {
        if let Ok(mut w) = self.wish.lock() {
            w.resume = Some((name.to_string(), version.to_string()));
        }
    }
}

/// The master tasks of this operator, by `namespace/name`.
#[derive(Default)]
pub struct Masters {
    runners: Mutex<HashMap<String, Arc<Runner>>>,
}

impl Masters {
    pub fn get(&self, key: &str) -> Option<Arc<Runner>> {
        let runners = self.runners.lock().ok()?;
        runners.get(key).filter(|r| !r.task.is_finished()).cloned()
    }

    /// Starts the task of `key` unless one runs.
    pub fn ensure(&self, key: &str, start: impl FnOnce() -> Runner) -> Option<Arc<Runner>> {
        let mut runners = self.runners.lock().ok()?;
        if let Some(r) = runners.get(key).filter(|r| !r.task.is_finished()) {
            return Some(r.clone());
        }
        let r = Arc::new(start());
        runners.insert(key.to_string(), r.clone());
        Some(r)
    }

    pub fn stop(&self, key: &str) {
        if let Some(r) = self.runners.lock().ok().and_then(|mut m| m.remove(key)) {
            r.task.abort();
        }
    }

    /// Leadership lost or shutting down: no master stream may go on from here.
    pub fn stop_all(&self) {
        if let Ok(mut m) = self.runners.lock() {
            for (_, r) in m.drain() {
                r.task.abort();
            }
        }
    }
}

/// Everything a master task needs.
pub struct Setup {
    pub client: Client,
    pub namespace: String,
    pub name: String,
    pub identities_secret: Option<String>,
    pub master: ByzMaster,
    /// The machine to name in an era when t + 1 replicas do not agree on one yet.
    pub machine: MachineIdentity,
    /// The sealing barrier recorded in the master Secret (`objects::sealed_in`), if any.
    pub sealed: Option<SealedBarrier>,
}

/// Starts a master task.
pub fn start(setup: Setup, config: Option<Config>) -> Runner {
    let (target, rx) = watch::channel(config);
    let wish = Arc::new(Mutex::new(RolloutWish::default()));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let master_public_key = setup.master.public_key_hex();
    let ticker = TickerGuard(setup.master.spawn_ticker());
    let sealed = setup.sealed.clone();
    if let (Some(b), Ok(mut s)) = (&sealed, seen.lock()) {
        s.seal_recorded = Some(b.era);
    }
    let task = Task {
        setup,
        target: rx,
        wish: wish.clone(),
        sealed_era: sealed.as_ref().map(|b| b.era),
        sealed_state: sealed.clone(),
        recorded_seal: sealed,
        seen: seen.clone(),
        last_push: BTreeMap::new(),
        identities: None,
        _ticker: ticker,
    };
    Runner {
        target,
        wish,
        seen,
        task: tokio::spawn(task.run()),
        master_public_key,
    }
}

struct Task {
    setup: Setup,
    target: watch::Receiver<Option<Config>>,
    wish: Arc<Mutex<RolloutWish>>,
    /// The era in which this task ordered a sealing barrier (one per era is enough: execution
    /// stops at it until the next era).
    sealed_era: Option<u64>,
    /// The sealing barrier t + 1 members reached: a resumed era starts there. Kept here and
    /// recorded in the master Secret because members restarted on the new image report no era
    /// (they wait for the next one) and so no barrier digest.
    sealed_state: Option<SealedBarrier>,
    /// What the master Secret holds of `sealed_state`.
    recorded_seal: Option<SealedBarrier>,
    seen: Arc<Mutex<Seen>>,
    last_push: BTreeMap<String, Instant>,
    /// Client identities as last read, and when (an unknown client retrying its open must not
    /// make the master read the Secret every 100 ms).
    identities: Option<(Instant, BTreeMap<String, VerifyingKey>)>,
    /// The master stream's ticks stop with the task (abort included).
    _ticker: TickerGuard,
}

struct TickerGuard(tokio::task::JoinHandle<()>);

impl Drop for TickerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An error after which the task must not go on (its memory may be ahead of the Secret).
struct Fatal(String);

impl Task {
    async fn run(mut self) {
        let who = format!("{}/{}", self.setup.namespace, self.setup.name);
        tracing::info!(object = %who, era = self.setup.master.era_number(), "Byzantine master started");
        let mut checked = Instant::now();
        loop {
            if checked.elapsed() > EXISTS_EVERY {
                checked = Instant::now();
                if self.resource_gone().await {
                    tracing::info!(object = %who, "resource deleted: its Byzantine master stops");
                    return;
                }
            }
            match self.iteration().await {
                Ok(()) => {}
                Err(Fatal(e)) => {
                    tracing::error!(object = %who, error = %e, "Byzantine master stops; the next reconcile restarts it");
                    self.note_error(Some(e));
                    return;
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn resource_gone(&self) -> bool {
        let api: Api<Secret> = Api::namespaced(self.setup.client.clone(), &self.setup.namespace);
        matches!(
            api.get_opt(&objects::master_secret_name(&self.setup.name)).await,
            Ok(None)
        )
    }

    fn note_error(&self, error: Option<String>) {
        if let Ok(mut s) = self.seen.lock() {
            s.error = error;
        }
    }

    async fn iteration(&mut self) -> Result<(), Fatal> {
        let target = self.target.borrow().clone();
        let statuses = self.poll(target.as_ref()).await;
        if let Ok(mut s) = self.seen.lock() {
            s.era = self.setup.master.era_number();
            s.statuses = statuses.clone();
            s.restarted = self.setup.master.current_era().is_some_and(|era| {
                lockstep::up_byz::era_standing(era, statuses.values(), self.setup.master.t)
                    == lockstep::up_byz::EraStanding::Restarted
            });
            s.stream_ended = self.setup.master.ended_at_barrier(&statuses).is_some();
        }
        self.keep_era_going(&statuses).await;
        if self.setup.master.streaming() {
            let directory = if self.setup.master.has_unadmitted_opens(&statuses) {
                self.client_identities().await
            } else {
                BTreeMap::new()
            };
            self.setup.master.on_statuses_with(&statuses, &directory);
        }
        self.seal_if_asked(&statuses).await;
        if let Some(target) = target
            && target.epoch > self.setup.master.era_number()
        {
            match self.change_era(&target, &statuses).await {
                Ok(()) => self.note_error(None),
                Err(EraError::Fatal(e)) => return Err(Fatal(e)),
                Err(EraError::NotYet(e)) => {
                    tracing::info!(object = %self.setup.name, epoch = target.epoch, reason = %e, "next era not started yet");
                    self.note_error(Some(e));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        Ok(())
    }

    /// Status of every replica of the current era and of the target configuration, by id.
    async fn poll(&self, target: Option<&Config>) -> BTreeMap<String, StatusResponse> {
        let mut endpoints: BTreeMap<String, String> = BTreeMap::new();
        if let Some(era) = self.setup.master.current_era() {
            for m in &era.members {
                endpoints.insert(m.id.clone(), m.endpoint.clone());
            }
        }
        for m in target.iter().flat_map(|c| c.members.iter()) {
            endpoints.insert(m.id.clone(), m.endpoint.clone());
        }
        let probes = endpoints.into_iter().map(|(id, ep)| async move {
            // Over the master's channels: with TLS a handshake per replica, not per poll.
            let s = self.setup.master.channels().status(&ep, STATUS_TIMEOUT).await;
            (id, s)
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .filter_map(|(id, s)| s.ok().map(|s| (id, s)))
            .collect()
    }

    /// The era's master stream runs, or is resumed; members lacking the era get it.
    async fn keep_era_going(&mut self, statuses: &BTreeMap<String, StatusResponse>) {
        let Some(era) = self.setup.master.current_era().cloned() else {
            return;
        };
        if !self.setup.master.streaming() && self.setup.master.resume_stream(statuses) {
            tracing::info!(object = %self.setup.name, era = era.number, "master stream running");
        }
        for m in &era.members {
            let behind = statuses
                .get(&m.id)
                .and_then(|s| s.byzantine.as_ref())
                .is_some_and(|b| b.era < era.number);
            let due = self.last_push.get(&m.id).is_none_or(|t| t.elapsed() > REPUSH_EVERY);
            if behind && due {
                self.last_push.insert(m.id.clone(), Instant::now());
                if let Err(e) = self.setup.master.push_current(&m.endpoint).await {
                    tracing::info!(object = %self.setup.name, replica = %m.id, error = %e, "era push failed; will retry");
                }
            }
        }
    }

    /// Client public keys from the `spec.clientIdentities` Secret, read at most once a second.
    async fn client_identities(&mut self) -> BTreeMap<String, VerifyingKey> {
        if let Some((at, ids)) = &self.identities
            && at.elapsed() < IDENTITIES_EVERY
        {
            return ids.clone();
        }
        let ids = self.read_client_identities().await;
        self.identities = Some((Instant::now(), ids.clone()));
        ids
    }

    /// Client public keys from the `spec.clientIdentities` Secret (identity -> key).
    async fn read_client_identities(&self) -> BTreeMap<String, VerifyingKey> {
        let Some(name) = &self.setup.identities_secret else {
            return BTreeMap::new();
        };
        let api: Api<Secret> = Api::namespaced(self.setup.client.clone(), &self.setup.namespace);
        match api.get_opt(name).await {
            Ok(Some(s)) => super::report::identities_in(&s),
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(object = %self.setup.name, secret = %name, error = %e, "cannot read client identities");
                BTreeMap::new()
            }
        }
    }

    /// Public keys of `config`'s members from their key Secrets (created by the operator
    /// before the pods).
    async fn learn_member_keys(&mut self, config: &Config) -> Result<(), String> {
        let api: Api<Secret> = Api::namespaced(self.setup.client.clone(), &self.setup.namespace);
        for m in &config.members {
            let name = objects::replica_key_secret_name(&m.id);
            let secret = api
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading Secret {name}: {e}"))?
                .ok_or_else(|| format!("Secret {name} (the key of {}) does not exist yet", m.id))?;
            let key = objects::key_in(&secret, objects::REPLICA_KEY)
                .ok_or_else(|| format!("Secret {name} holds no valid {}", objects::REPLICA_KEY))?;
            self.setup
                .master
                .set_public_key(&m.id, hex::encode(key.verifying_key().to_bytes()));
        }
        Ok(())
    }

    /// A rollout's seal: one sealing barrier in the current era, unless t + 1 members already
    /// stand sealed at one.
    async fn seal_if_asked(&mut self, statuses: &BTreeMap<String, StatusResponse>) {
        let wanted = self.wish.lock().map(|w| w.seal).unwrap_or(false);
        let Some(era) = self.setup.master.current_era().cloned() else {
            return;
        };
        if let Some((index, digest)) = sealed_barrier(&era, statuses, self.setup.master.t) {
            self.sealed_state = Some(SealedBarrier {
                era: era.number,
                index,
                digest,
            });
        }
        self.record_seal().await;
        if !wanted || self.sealed_era == Some(era.number) || !self.setup.master.streaming() {
            return;
        }
        let sealed = era
            .members
            .iter()
            .filter(|m| statuses.get(&m.id).is_some_and(|s| s.sealed_at > 0))
            .count();
        self.sealed_era = Some(era.number);
        if sealed > self.setup.master.t {
            return;
        }
        match self.setup.master.barrier(true, BARRIER_TIMEOUT).await {
            Ok((index, digest)) => {
                tracing::info!(object = %self.setup.name, era = era.number, index, "sealing barrier reached");
                self.sealed_state = Some(SealedBarrier {
                    era: era.number,
                    index,
                    digest,
                });
                self.record_seal().await;
            }
            Err(e) => {
                // Ordered; the rollout waits for the members to report it (or for the era).
                tracing::warn!(object = %self.setup.name, era = era.number, error = %format!("{e:#}"),
                    "sealing barrier not reached yet")
            }
        }
        if let Ok(mut w) = self.wish.lock() {
            w.seal = false;
        }
    }

    /// Writes a newly reached sealing barrier to the master Secret (retried on the next
    /// iteration when the write fails), so a new operator leader can resume from it.
    async fn record_seal(&mut self) {
        let Some(barrier) = self
            .sealed_state
            .clone()
            .filter(|b| self.recorded_seal.as_ref() != Some(b))
        else {
            return;
        };
        let api: Api<Secret> = Api::namespaced(self.setup.client.clone(), &self.setup.namespace);
        let secret = objects::master_secret_name(&self.setup.name);
        let patch = Patch::Merge(objects::sealed_patch(&barrier));
        match api.patch(&secret, &PatchParams::default(), &patch).await {
            Ok(_) => {
                tracing::info!(object = %self.setup.name, era = barrier.era, index = barrier.index,
                    "sealing barrier recorded in the master Secret");
                if let Ok(mut s) = self.seen.lock() {
                    s.seal_recorded = Some(barrier.era);
                }
                self.recorded_seal = Some(barrier);
            }
            Err(e) => tracing::warn!(object = %self.setup.name, secret = %secret, error = %e,
                "recording the sealing barrier failed; will retry"),
        }
    }

    /// The machine the next era resumes under, when the reconcile asked for one: the identity
    /// t + 1 members of `target` report with the asked name and version (their restarted
    /// binaries), digest included.
    fn resume_machine(
        &self,
        target: &Config,
        statuses: &BTreeMap<String, StatusResponse>,
    ) -> Result<Option<MachineIdentity>, EraError> {
        let Some((name, version)) = self.wish.lock().ok().and_then(|w| w.resume.clone()) else {
            return Ok(None);
        };
        let members: BTreeMap<String, StatusResponse> = statuses
            .iter()
            .filter(|(id, _)| target.members.iter().any(|m| &m.id == *id))
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        match agreed_machine(&members, self.setup.master.t) {
            Some(m) if m.name == name && m.version == version => Ok(Some(m)),
            other => Err(EraError::NotYet(format!(
                "resuming under {name} {version}: t + 1 members must report it first (they agree on {})",
                other.map_or("nothing yet".to_string(), |m| format!("{} {}", m.name, m.version))
            ))),
        }
    }

    /// Where a resumed era starts: the sealing barrier of the current era, if t + 1 members of
    /// `target` are sealed at its index.
    fn resume_state(
        &self,
        target: &Config,
        statuses: &BTreeMap<String, StatusResponse>,
    ) -> Result<(u64, Vec<u8>), EraError> {
        let era = self.setup.master.era_number();
        let Some(SealedBarrier {
            era: sealed_era,
            index,
            digest,
        }) = self.sealed_state.clone().filter(|s| s.era == era)
        else {
            return Err(EraError::NotYet(format!(
                "no sealing barrier of era {era} is known to this master"
            )));
        };
        let at = target
            .members
            .iter()
            .filter(|m| statuses.get(&m.id).is_some_and(|s| s.sealed_at == index))
            .count();
        if at <= self.setup.master.t {
            return Err(EraError::NotYet(format!(
                "only {at} members stand sealed at index {index} of era {sealed_era}"
            )));
        }
        Ok((index, digest))
    }

    /// Barrier, sign, record, push. The era is in the Secret before any replica sees it.
    async fn change_era(
        &mut self,
        target: &Config,
        statuses: &BTreeMap<String, StatusResponse>,
    ) -> Result<(), EraError> {
        let resume = self.resume_machine(target, statuses)?;
        if resume.is_none()
            && self.setup.master.current_era().is_some()
            && !self.setup.master.streaming()
            && self.setup.master.ended_at_barrier(statuses).is_none()
        {
            return Err(EraError::NotYet(
                "the current era's master stream is not running yet (fewer than t + 1 members report it)".into(),
            ));
        }
        self.learn_member_keys(target).await.map_err(EraError::NotYet)?;
        let (start, digest) = match &resume {
            // Members restarted on the new image wait, sealed, for the next era: it starts at
            // the sealing barrier, which t + 1 of them must still stand at.
            Some(_) => self.resume_state(target, statuses)?,
            None => {
                let endpoints: Vec<String> = target.members.iter().map(|m| m.endpoint.clone()).collect();
                self.setup
                    .master
                    .next_era_state(&endpoints, BARRIER_TIMEOUT)
                    .await
                    .map_err(|e| EraError::NotYet(format!("{e:#}")))?
            }
        };
        let t = self.setup.master.t;
        if resume.is_none() {
            self.setup.master.machine = agreed_machine(statuses, t).unwrap_or_else(|| self.setup.machine.clone());
        }
        self.setup
            .master
            .sign_era(target, start, digest, resume.clone())
            .map_err(|e| EraError::NotYet(format!("{e:#}")))?;
        if let Some(m) = &resume
            && let Ok(mut w) = self.wish.lock()
        {
            *w = RolloutWish::default();
            tracing::info!(object = %self.setup.name, era = target.epoch, machine = %format!("{} {}", m.name, m.version),
                "the next era resumes the sealed state under the new machine");
        }
        let Some(signed) = self.setup.master.signed_era().cloned() else {
            return Err(EraError::Fatal("signed era vanished".into()));
        };
        let api: Api<Secret> = Api::namespaced(self.setup.client.clone(), &self.setup.namespace);
        let secret = objects::master_secret_name(&self.setup.name);
        api.patch(
            &secret,
            &PatchParams::default(),
            &Patch::Merge(objects::era_patch(&signed)),
        )
        .await
        .map_err(|e| EraError::Fatal(format!("recording era {} in Secret {secret}: {e}", target.epoch)))?;
        tracing::info!(object = %self.setup.name, era = target.epoch, start, members = target.members.len(),
            "era signed and recorded; pushing it");
        self.last_push.clear();
        for m in &target.members {
            self.last_push.insert(m.id.clone(), Instant::now());
            if let Err(e) = self.setup.master.push_current(&m.endpoint).await {
                tracing::info!(object = %self.setup.name, replica = %m.id, error = %e, "era push failed; will retry");
            }
        }
        Ok(())
    }
}

enum EraError {
    /// Try again later.
    NotYet(String),
    /// The in-memory master may be ahead of the Secret: restart from the Secret.
    Fatal(String),
}

/// (index, digest) of a sealing barrier of `era` that t + 1 of its members report.
fn sealed_barrier(
    era: &lockstep_proto::Era,
    statuses: &BTreeMap<String, StatusResponse>,
    t: usize,
) -> Option<(u64, Vec<u8>)> {
    let members = era.members.iter().filter_map(|m| statuses.get(&m.id));
    lockstep::up_byz::agreed_barrier(era, members, t, |s, b| {
        s.sealed_at > 0 && b.barrier_index == s.sealed_at
    })
}

/// The machine identity t + 1 replicas report (what clients will see in answers).
pub fn agreed_machine(statuses: &BTreeMap<String, StatusResponse>, t: usize) -> Option<MachineIdentity> {
    let mut counts: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for m in statuses.values().filter_map(|s| s.machine.as_ref()) {
        *counts
            .entry((m.name.clone(), m.version.clone(), m.digest.clone()))
            .or_default() += 1;
    }
    counts
        .into_iter()
        .find(|(_, n)| *n > t)
        .map(|((name, version, digest), _)| MachineIdentity { name, version, digest })
}

/// The master key of a Secret, or a fresh one.
pub fn master_key_of(secret: &Secret) -> Option<ed25519_dalek::SigningKey> {
    objects::key_in(secret, objects::MASTER_KEY)
}

/// A fresh random key (master or replica).
pub fn fresh_key() -> ed25519_dalek::SigningKey {
    keys::random_signing_key()
}
