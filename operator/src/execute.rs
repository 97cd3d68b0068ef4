//! Carrying out a plan: one function per `lockstep_planner::Action`.
//!
//! Persisted state (a configuration, a rollout phase) is written to status first, with
//! optimistic concurrency; an action that loses that race stops the whole plan (it is stale)
//! and the next reconcile plans again from what the API server stored.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use lockstep_planner::{self as planner, Action as Step, Config, MachineRef, Plan, Rollout};
use lockstep_resource::{ReplicatedStateMachine, ReplicatedStateMachineStatus};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admin::AdminTarget;
use crate::build;
use crate::controller::{Context, Error, key};
use crate::events::publish;
use crate::names;
use crate::observe;
use crate::status;
use crate::translate::{self, World};

/// A namespaced Kubernetes object the operator creates, applies or deletes.
pub trait Owned:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Owned for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
{
}

/// Creates `obj`; false when it already exists.
pub async fn create_if_absent<K: Owned>(ctx: &Context, ns: &str, obj: &K) -> Result<bool, Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Deletes object `name`; false when it was already gone.
pub async fn delete_if_present<K: Owned>(ctx: &Context, ns: &str, name: &str) -> Result<bool, Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Everything one plan's actions need.
pub struct Executor<'a> {
    pub ctx: &'a Context,
    pub rsm: &'a ReplicatedStateMachine,
    pub api: &'a Api<ReplicatedStateMachine>,
    pub ns: String,
    pub world: &'a World,
    pub plan: &'a Plan,
}

/// Whether the plan may go on after an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    /// A persisted-state write lost a race: the plan is stale, nothing after it may run.
    Stale,
}

impl Executor<'_> {
    /// Carries out the plan in order. Returns false when it turned out to be stale.
    pub async fn run(&self, current: &mut ReplicatedStateMachine) -> Result<bool, Error> {
        if !self.plan.actions.is_empty() {
            tracing::info!(object = %key(self.rsm), summary = %self.plan.summary,
                actions = self.plan.actions.len(), "plan");
        }
        if self.era_after_ended_stream(current).await? == Outcome::Stale {
            return Ok(false);
        }
        for step in &self.plan.actions {
            if self.step(current, step).await? == Outcome::Stale {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Byzantine: the master stream of the master's era ended (two master items for one
    /// sequence number: a fail-over whose old leader's last item reached only some replicas)
    /// and its members stopped at one barrier. Unless the plan moves the era anyway, the next
    /// era has the same members and starts at that barrier (docs/byzantine.md, "When the
    /// master stream ends"). Not while paused: the operator then only observes.
    async fn era_after_ended_stream(&self, current: &mut ReplicatedStateMachine) -> Result<Outcome, Error> {
        let Some(era) = crate::byzantine::ended_era(self.ctx, self.rsm).filter(|_| !self.plan.conditions.paused) else {
            return Ok(Outcome::Continue);
        };
        let moves_era = |s: &Step| matches!(s, Step::Reconfigure { .. } | Step::Resume { .. });
        if self.plan.actions.iter().any(moves_era) {
            return Ok(Outcome::Continue);
        }
        self.next_era_with_same_members(current, era, "MasterStreamEnded", |next| {
            format!(
                "the master stream of era {era} ended and its members stopped at one barrier: era {next} starts there"
            )
        })
        .await
    }

    async fn step(&self, current: &mut ReplicatedStateMachine, step: &Step) -> Result<Outcome, Error> {
        match step {
            Step::CreateReplica { id, machine } => return self.create_replica(current, id, machine).await,
            Step::Reconfigure { config, notify } => return self.reconfigure(current, config, notify).await,
            Step::PushConfig { id } => return self.push_config(current, id).await,
            Step::DeleteReplica { id, reason } => self.delete_replica(id, reason).await?,
            Step::DeleteVolume { id } => self.delete_volume(id).await?,
            Step::Seal => self.seal(current).await,
            Step::Stage { machine } => self.stage(current, machine).await?,
            Step::RestartReplica { id, machine } => self.restart_replica(id, machine).await?,
            Step::Resume { machine } => return self.resume(current, machine).await,
            Step::SetRollout { rollout } => return self.set_rollout(current, rollout.as_ref()).await,
        }
        Ok(Outcome::Continue)
    }

    /// Writes a change to the persisted state; false when the plan turned out stale.
    async fn persist(
        &self,
        current: &mut ReplicatedStateMachine,
        change: impl Fn(&ReplicatedStateMachineStatus) -> ReplicatedStateMachineStatus,
    ) -> Result<bool, Error> {
        let conflict = || {
            self.ctx.metrics.status_conflicts.inc();
        };
        Ok(status::write_persisted(self.api, current, change, conflict).await?)
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        publish(self.ctx, self.rsm, type_, reason, action, note).await;
    }

    fn address_of(&self, id: &str) -> Option<AdminTarget> {
        address_of(self.ctx, self.rsm, self.world, id)
    }

    fn primary_address(&self, current: &ReplicatedStateMachine) -> Option<AdminTarget> {
        let config = translate::persisted_config(current)?;
        self.address_of(&config.primary)
    }

    /// Records that the ordinal is handed out (so no replacement ever reuses this name or
    /// volume), then creates the claim and the pod.
    async fn create_replica(
        &self,
        current: &mut ReplicatedStateMachine,
        id: &str,
        machine: &MachineRef,
    ) -> Result<Outcome, Error> {
        self.ctx.metrics.action("create_replica");
        if self.world.terminating_pvcs.contains(&names::pvc(id)) {
            // An old volume of this name is still going away.
            tracing::info!(object = %key(self.rsm), replica = %id, "waiting for the old claim to be deleted");
            return Ok(Outcome::Continue);
        }
        // cert-manager: nothing is handed out (ordinal, claim, pod) before the replica's
        // Secret is issued, so the next plan asks for the same id and its Certificate.
        if let Some(issuer) = self.rsm.issuer_ref()
            && !crate::cert_manager::replica_ready(self.ctx, self.rsm, &self.ns, issuer, id).await?
        {
            return Ok(Outcome::Continue);
        }
        if let Some(ordinal) = planner::ordinal_of(id)
            && ordinal >= translate::persisted_next_ordinal(current)
        {
            let won = self.persist(current, |s| status::with_ordinal(s, ordinal)).await?;
            if !won {
                return Ok(Outcome::Stale);
            }
        }
        if let Some(pvc) = build::replica_pvc(self.rsm, id)? {
            create_if_absent::<PersistentVolumeClaim>(self.ctx, &self.ns, &pvc).await?;
        }
        if crate::tls::create_replica_pod(self.ctx, self.rsm, &self.ns, id, machine, self.world).await? {
            let note = format!(
                "creating replica {id} ({} {}): {}",
                machine.name, machine.version, self.plan.summary
            );
            self.event(EventType::Normal, "CreatingReplica", "CreateReplica", note)
                .await;
        }
        Ok(Outcome::Continue)
    }

    /// Fence first: the epoch is decided when the API server stores it; only then is it
    /// pushed to the replicas.
    async fn reconfigure(
        &self,
        current: &mut ReplicatedStateMachine,
        config: &Config,
        notify: &[String],
    ) -> Result<Outcome, Error> {
        self.ctx.metrics.action("reconfigure");
        let won = self.persist(current, |s| status::with_config(s, config)).await?;
        if !won {
            let note = format!(
                "epoch {} was not recorded: the persisted configuration changed meanwhile; replanning",
                config.epoch
            );
            self.event(EventType::Normal, "StalePlan", "Reconfigure", note).await;
            return Ok(Outcome::Stale);
        }
        let note = format!(
            "epoch {} recorded (primary {}, {} members): {}",
            config.epoch,
            config.primary,
            config.members.len(),
            self.plan.summary
        );
        self.event(EventType::Normal, "Reconfigured", "Reconfigure", note).await;
        let members = config.members.iter().map(|m| m.id.as_str());
        self.push_to(config, members.chain(notify.iter().map(String::as_str)))
            .await;
        Ok(Outcome::Continue)
    }

    async fn push_config(&self, current: &mut ReplicatedStateMachine, id: &str) -> Result<Outcome, Error> {
        self.ctx.metrics.action("push_config");
        if let Some(era) = crate::byzantine::restarted_era(self.ctx, self.rsm) {
            return self.recover_byzantine(current, era).await;
        }
        if let Some(config) = translate::persisted_config(current) {
            self.push_to(&config, std::iter::once(id)).await;
        }
        Ok(Outcome::Continue)
    }

    /// Byzantine: every replica restarted on its volume and the master's era lost its members
    /// (they report no era, and the planner pushes the configuration to them). The next era is
    /// a recovery era with the same members (docs/byzantine.md, "Full-cluster restart"): its
    /// configuration (next epoch) is persisted first, once, as for a resume.
    async fn recover_byzantine(&self, current: &mut ReplicatedStateMachine, era: u64) -> Result<Outcome, Error> {
        self.next_era_with_same_members(current, era, "Recovering", |next| {
            format!("every replica restarted and era {era} cannot go on: era {next} starts where t + 1 of them rebuild the same state")
        })
        .await
    }

    /// Byzantine: era `era` cannot go on. Its successor (same members, next epoch) is
    /// persisted once and handed to the master; an event with `reason` and `note(next epoch)`
    /// says why.
    async fn next_era_with_same_members(
        &self,
        current: &mut ReplicatedStateMachine,
        era: u64,
        reason: &str,
        note: impl FnOnce(u64) -> String,
    ) -> Result<Outcome, Error> {
        let Some(config) = translate::persisted_config(current) else {
            return Ok(Outcome::Continue);
        };
        if config.epoch > era {
            crate::byzantine::push(self.ctx, self.rsm, &config);
            return Ok(Outcome::Continue);
        }
        let Some(next) = self.push_next_era(current, config).await? else {
            return Ok(Outcome::Stale);
        };
        self.event(EventType::Warning, reason, "Recover", note(next.epoch))
            .await;
        Ok(Outcome::Continue)
    }

    /// Records the next epoch with the same members and hands it to the Byzantine master, which
    /// signs it as the next era. `None` when another writer changed the status first (stale).
    async fn push_next_era(
        &self,
        current: &mut ReplicatedStateMachine,
        config: Config,
    ) -> Result<Option<Config>, Error> {
        let next = Config {
            epoch: config.epoch + 1,
            ..config
        };
        if !self.persist(current, |s| status::with_config(s, &next)).await? {
            return Ok(None);
        }
        crate::byzantine::push(self.ctx, self.rsm, &next);
        Ok(Some(next))
    }

    /// Pushes `config` to the given replicas. Failures are logged: a replica that missed it
    /// reports the old epoch and the planner pushes again (PushConfig).
    async fn push_to<'a>(&self, config: &Config, ids: impl Iterator<Item = &'a str>) {
        if crate::byzantine::is_byzantine(self.rsm) {
            // Byzantine replicas take membership only from master-signed eras.
            crate::byzantine::push(self.ctx, self.rsm, config);
            return;
        }
        let calls = ids
            .filter_map(|id| self.address_of(id).map(|a| (id.to_string(), a)))
            .map(|(id, addr)| {
                let config = config.clone();
                async move { (id, self.ctx.admin.reconfigure(addr, config).await) }
            });
        for (id, result) in futures::future::join_all(calls).await {
            if let Err(e) = result {
                tracing::warn!(object = %key(self.rsm), replica = %id, error = %e,
                    "reconfigure push failed; will retry");
            }
        }
    }

    /// Stops a replica outside the configuration. Its volume stays (`delete_volume`, planned
    /// once redundancy is fully restored).
    async fn delete_replica(&self, id: &str, reason: &str) -> Result<(), Error> {
        self.ctx.metrics.action("delete_replica");
        let failed = reason.starts_with("fail-stopped");
        if failed {
            self.ctx.metrics.replacements.inc();
        }
        if delete_if_present::<Pod>(self.ctx, &self.ns, id).await? {
            let (type_, why) = if failed {
                (EventType::Warning, "ReplacingReplica")
            } else {
                (EventType::Normal, "RemovingReplica")
            };
            self.event(type_, why, "DeleteReplica", format!("deleting {id}: {reason}"))
                .await;
        }
        Ok(())
    }

    /// Deletes the claim of a replica that left the configuration (planned only with every
    /// voter running).
    async fn delete_volume(&self, id: &str) -> Result<(), Error> {
        self.ctx.metrics.action("delete_volume");
        let claim = names::pvc(id);
        if self.world.terminating_pvcs.contains(&claim) {
            return Ok(());
        }
        if delete_if_present::<PersistentVolumeClaim>(self.ctx, &self.ns, &claim).await? {
            let note = format!(
                "deleting volume {claim} of {id}, which left the configuration: every voter runs again, \
                 so it is no longer the last copy of anything"
            );
            self.event(EventType::Normal, "DeletingVolume", "DeleteVolume", note)
                .await;
        }
        Ok(())
    }

    async fn seal(&self, current: &ReplicatedStateMachine) {
        self.ctx.metrics.action("seal");
        if crate::byzantine::is_byzantine(self.rsm) {
            // The seal is a barrier of the master's ordered stream.
            if crate::byzantine::seal(self.ctx, self.rsm) {
                let note = format!("sealing barrier ordered in the master stream: {}", self.plan.summary);
                self.event(EventType::Normal, "Sealing", "Seal", note).await;
            }
            return;
        }
        let Some(addr) = self.primary_address(current) else {
            return;
        };
        match self.ctx.admin.seal(addr).await {
            Ok(index) => {
                let note = format!("seal barrier ordered at index {index}: {}", self.plan.summary);
                self.event(EventType::Normal, "Sealing", "Seal", note).await;
            }
            Err(e) => tracing::warn!(object = %key(self.rsm), error = %e, "seal failed; will retry"),
        }
    }

    /// One pre-pull pod per member's node, so the image is there before anything stops.
    async fn stage(&self, current: &ReplicatedStateMachine, machine: &MachineRef) -> Result<(), Error> {
        self.ctx.metrics.action("stage");
        let (Some(image), Some(config)) = (machine.image.as_deref(), translate::persisted_config(current)) else {
            return Ok(());
        };
        let mut created = 0;
        for m in &config.members {
            let node = self
                .world
                .replicas
                .iter()
                .find(|o| o.pod.name_any() == m.id)
                .and_then(|o| o.pod.spec.as_ref()?.node_name.clone());
            if let Some(node) = node {
                let pod = build::stage_pod(self.rsm, &m.id, &node, image)?;
                if create_if_absent(self.ctx, &self.ns, &pod).await? {
                    created += 1;
                }
            }
        }
        if created > 0 {
            let note = format!("pulling {image} on the nodes of {created} replica(s) before anything stops");
            self.event(EventType::Normal, "Staging", "Stage", note).await;
        }
        Ok(())
    }

    /// Changes the replica container's image in place (same pod, IP, volume).
    async fn restart_replica(&self, id: &str, machine: &MachineRef) -> Result<(), Error> {
        self.ctx.metrics.action("restart_replica");
        let Some(obs) = self.world.replicas.iter().find(|o| o.pod.name_any() == id) else {
            return Ok(());
        };
        if crate::byzantine::is_byzantine(self.rsm) && !crate::byzantine::seal_recorded(self.ctx, self.rsm) {
            // A restarted member reports no era and so no barrier: the next era could only
            // resume from the master's record of it, which a new operator leader reads back.
            tracing::info!(object = %key(self.rsm), replica = id,
                "restart waits until the master has recorded the sealing barrier");
            return Ok(());
        }
        let spec_image = obs
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == names::REPLICA_CONTAINER))
            .and_then(|c| c.image.clone());
        let version = obs.pod.annotations().get(names::VERSION_ANNOTATION).cloned();
        if spec_image == machine.image && version.as_deref() == Some(machine.version.as_str()) {
            return Ok(()); // already asked; waiting for the kubelet
        }
        let patch = build::restart_patch(&obs.pod, machine)?;
        Api::<Pod>::namespaced(self.ctx.client.clone(), &self.ns)
            .patch(id, &PatchParams::default(), &Patch::Strategic(patch))
            .await?;
        let note = format!(
            "restarting {id} with {} {} from the snapshot at the seal",
            machine.name, machine.version
        );
        self.event(EventType::Normal, "RestartingReplica", "RestartReplica", note)
            .await;
        Ok(())
    }

    async fn resume(&self, current: &mut ReplicatedStateMachine, machine: &MachineRef) -> Result<Outcome, Error> {
        self.ctx.metrics.action("resume");
        if crate::byzantine::is_byzantine(self.rsm) {
            return self.resume_byzantine(current, machine).await;
        }
        self.resume_fail_stop(current, machine).await;
        Ok(Outcome::Continue)
    }

    /// Byzantine: a sealed cluster resumes with the next master-signed era. Its configuration
    /// (same members, next epoch) is persisted first, once: while the master has not reached
    /// the persisted epoch, an era change is already on its way.
    async fn resume_byzantine(
        &self,
        current: &mut ReplicatedStateMachine,
        machine: &MachineRef,
    ) -> Result<Outcome, Error> {
        let Some(config) = translate::persisted_config(current) else {
            return Ok(Outcome::Continue);
        };
        let Some(era) = crate::byzantine::master_era(self.ctx, self.rsm) else {
            return Ok(Outcome::Continue);
        };
        crate::byzantine::resume_under(self.ctx, self.rsm, machine);
        if era < config.epoch {
            return Ok(Outcome::Continue);
        }
        let Some(next) = self.push_next_era(current, config).await? else {
            return Ok(Outcome::Stale);
        };
        let note = format!(
            "commands resume under {} {} with era {} (signed by the master once t + 1 members report it)",
            machine.name, machine.version, next.epoch
        );
        self.event(EventType::Normal, "Resuming", "Resume", note).await;
        Ok(Outcome::Continue)
    }

    async fn resume_fail_stop(&self, current: &ReplicatedStateMachine, machine: &MachineRef) {
        let Some(addr) = self.primary_address(current) else {
            return;
        };
        match self.ctx.admin.resume(addr).await {
            Ok(index) => {
                let note = format!(
                    "commands resume under {} {} at index {index}",
                    machine.name, machine.version
                );
                self.event(EventType::Normal, "Resuming", "Resume", note).await;
            }
            Err(e) => tracing::warn!(object = %key(self.rsm), error = %e, "resume failed; will retry"),
        }
    }

    /// Persists the rollout phase before the actions it announces.
    async fn set_rollout(
        &self,
        current: &mut ReplicatedStateMachine,
        rollout: Option<&Rollout>,
    ) -> Result<Outcome, Error> {
        self.ctx.metrics.action("set_rollout");
        let before = translate::persisted_rollout(current);
        let won = self.persist(current, |s| status::with_rollout(s, rollout)).await?;
        if !won {
            return Ok(Outcome::Stale);
        }
        self.rollout_event(before.as_ref(), rollout).await;
        // Stage pods are done once the rollout leaves Staging.
        if rollout.is_none_or(|r| r.phase != planner::RolloutPhase::Staging) {
            for p in &self.world.stage_pods {
                delete_if_present::<Pod>(self.ctx, &self.ns, &p.name_any()).await?;
            }
        }
        Ok(Outcome::Continue)
    }

    async fn rollout_event(&self, before: Option<&Rollout>, after: Option<&Rollout>) {
        let (reason, note) = match (before, after) {
            (None, Some(r)) => {
                self.ctx.metrics.rollouts_started.inc();
                (
                    "RolloutStarted",
                    format!("lockstep rollout {} -> {}", r.from.version, r.to.version),
                )
            }
            (Some(b), None) => {
                self.ctx.metrics.rollouts_completed.inc();
                (
                    "RolloutFinished",
                    format!("rollout to {} finished: {}", b.to.version, self.plan.summary),
                )
            }
            (_, Some(r)) => (
                "RolloutPhase",
                format!("rollout to {}: {}", r.to.version, translate::phase_name(r.phase)),
            ),
            (None, None) => return,
        };
        self.event(EventType::Normal, reason, "Rollout", note).await;
    }
}

/// Where and how to call the admin API of replica `id`, if its pod can be called.
pub fn address_of(ctx: &Context, rsm: &ReplicatedStateMachine, world: &World, id: &str) -> Option<AdminTarget> {
    let pod = &world.replicas.iter().find(|o| o.pod.name_any() == id)?.pod;
    let addr = observe::admin_address(pod, rsm, ctx.admin_address)?;
    Some(crate::tls::admin_target(rsm, pod, addr, ctx.pki.get(rsm).as_deref()))
}
