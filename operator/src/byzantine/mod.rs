//! Byzantine mode on Kubernetes: the operator is the configuration master (docs/byzantine.md,
//! "On Kubernetes").
//!
//! - `objects`: the Secrets it owns (master key + signed era; one key per replica) and what a
//!   replica pod mounts (pure);
//! - `master`: one task per resource, in the leader only, driving `lockstep::up_byz::ByzMaster`
//!   (eras, the master stream, admissions, removals, barriers);
//! - `report`: `.status.byzantine` and metrics from what the replicas report (pure).
//!
//! The reconcile calls `prepare` before executing a plan, `push` from its Reconfigure and
//! PushConfig actions (instead of the fail-stop Admin.Reconfigure) and `publish` when writing
//! status.

pub mod master;
pub mod objects;
pub mod report;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use lockstep::up_byz::{ByzMaster, Ordering};
use lockstep_planner::{Action as Step, Config, Plan};
use lockstep_proto::MachineIdentity;
use lockstep_resource::{ByzantineStatus, FailureModel, ReplicatedStateMachine, Stability};

use crate::controller::{Context, Error, key};
use crate::execute::create_if_absent;
use crate::metrics::EvidenceLabel;
use crate::translate;

pub fn is_byzantine(rsm: &ReplicatedStateMachine) -> bool {
    rsm.spec.failure_model == FailureModel::Byzantine
}

/// The ordering bounds of `spec.ordering` with the replicas' defaults (an era whose bounds
/// differ from a replica's flags is refused, so these must be the replicas' values).
pub fn ordering(rsm: &ReplicatedStateMachine) -> Ordering {
    let o = rsm.spec.ordering.as_ref();
    Ordering {
        stability: match o.and_then(|o| o.stability) {
            Some(Stability::PhysicalClock) => "PhysicalClock".into(),
            _ => "LamportClock".into(),
        },
        max_delay_millis: o
            .and_then(|o| o.max_delay_millis)
            .map_or(lockstep_replica::byz::DEFAULT_MAX_DELAY_MILLIS, |v| v.max(1) as u64),
        max_clock_skew_millis: o.and_then(|o| o.max_clock_skew_millis).map_or(0, |v| v.max(0) as u64),
    }
}

/// Before a plan runs: key Secrets for the replicas it creates, the master Secret, and the
/// master task with the persisted configuration.
pub async fn prepare(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    current: &ReplicatedStateMachine,
    plan: &Plan,
    transport: lockstep::Transport,
) -> Result<(), Error> {
    for step in &plan.actions {
        if let Step::CreateReplica { id, .. } = step {
            let secret = objects::replica_key_secret(rsm, id, &master::fresh_key())?;
            create_if_absent(ctx, ns, &secret).await?;
        }
    }
    let config = translate::persisted_config(current);
    if let Some(runner) = ctx.masters.get(&key(rsm)) {
        runner.want(config);
        return Ok(());
    }
    let secret = master_secret(ctx, rsm, ns).await?;
    let Some(master_key) = master::master_key_of(&secret) else {
        tracing::error!(object = %key(rsm), secret = %secret.name_any(), "the master Secret holds no valid key");
        return Ok(());
    };
    let machine = MachineIdentity {
        name: rsm.spec.machine.name.clone(),
        version: rsm.spec.machine.version.clone(),
        digest: String::new(),
    };
    let t = usize::try_from(rsm.spec.faults_tolerated).unwrap_or(1);
    let mut byz = ByzMaster::from_parts(
        master_key,
        &rsm.name_any(),
        t,
        ordering(rsm),
        machine.clone(),
        objects::era_in(&secret),
        BTreeMap::new(),
    );
    byz.set_transport(transport);
    let setup = master::Setup {
        client: ctx.client.clone(),
        namespace: ns.to_string(),
        name: rsm.name_any(),
        identities_secret: rsm.spec.client_identities.as_ref().map(|c| c.secret_ref.name.clone()),
        master: byz,
        machine,
        sealed: objects::sealed_in(&secret),
    };
    ctx.masters.ensure(&key(rsm), || master::start(setup, config));
    Ok(())
}

/// The master Secret, created with a fresh key when missing (never replaced: replicas trust
/// only the key they were started with).
async fn master_secret(ctx: &Context, rsm: &ReplicatedStateMachine, ns: &str) -> Result<Secret, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = objects::master_secret_name(&rsm.name_any());
    if let Some(s) = api.get_opt(&name).await? {
        return Ok(s);
    }
    let fresh = objects::master_secret(rsm, &master::fresh_key())?;
    create_if_absent(ctx, ns, &fresh).await?;
    Ok(api.get(&name).await?)
}

/// A Reconfigure/PushConfig of a Byzantine resource: the master moves the era there.
pub fn push(ctx: &Context, rsm: &ReplicatedStateMachine, config: &Config) {
    if let Some(runner) = ctx.masters.get(&key(rsm)) {
        runner.want(Some(config.clone()));
    }
}

/// A rollout's Seal step; false when no master runs for the resource (yet).
pub fn seal(ctx: &Context, rsm: &ReplicatedStateMachine) -> bool {
    ctx.masters.get(&key(rsm)).map(|r| r.seal()).is_some()
}

/// A rollout's Resume step: the next era resumes under `machine`.
pub fn resume_under(ctx: &Context, rsm: &ReplicatedStateMachine, machine: &lockstep_planner::MachineRef) {
    if let Some(r) = ctx.masters.get(&key(rsm)) {
        r.resume_under(&machine.name, &machine.version);
    }
}

/// The era the resource's master last saw itself in.
pub fn master_era(ctx: &Context, rsm: &ReplicatedStateMachine) -> Option<u64> {
    ctx.masters.get(&key(rsm)).map(|r| r.seen().era)
}

/// Whether the resource's master recorded the sealing barrier of its current era in the
/// master Secret (a rollout restarts replicas only then).
pub fn seal_recorded(ctx: &Context, rsm: &ReplicatedStateMachine) -> bool {
    ctx.masters.get(&key(rsm)).is_some_and(|r| {
        let seen = r.seen();
        seen.seal_recorded.is_some_and(|era| era == seen.era)
    })
}

/// The master's era, when its members restarted and it cannot go on (`Seen::restarted`).
pub fn restarted_era(ctx: &Context, rsm: &ReplicatedStateMachine) -> Option<u64> {
    era_seen_if(ctx, rsm, |s| s.restarted)
}

/// The master's era, if what it last saw meets `stuck`.
fn era_seen_if(ctx: &Context, rsm: &ReplicatedStateMachine, stuck: impl Fn(&master::Seen) -> bool) -> Option<u64> {
    let seen = ctx.masters.get(&key(rsm))?.seen();
    stuck(&seen).then_some(seen.era)
}

/// The master's era, when its master stream ended and its members stopped at a barrier
/// (`Seen::stream_ended`): the next era must start there.
pub fn ended_era(ctx: &Context, rsm: &ReplicatedStateMachine) -> Option<u64> {
    era_seen_if(ctx, rsm, |s| s.stream_ended)
}

/// `.status.byzantine`, and the evidence metrics.
pub fn publish(ctx: &Context, rsm: &ReplicatedStateMachine) -> Option<ByzantineStatus> {
    let runner = ctx.masters.get(&key(rsm))?;
    let seen = runner.seen();
    let (namespace, name) = (rsm.namespace().unwrap_or_default(), rsm.name_any());
    let evidence = report::evidence(&seen.statuses).into_iter().map(|(reporter, e)| {
        let labels = EvidenceLabel {
            namespace: namespace.clone(),
            name: name.clone(),
            replica: e.peer.clone(),
            kind: e.kind.clone(),
            reporter: reporter.to_string(),
        };
        (labels, i64::try_from(e.count).unwrap_or(i64::MAX))
    });
    ctx.metrics.byzantine_evidence.record(&namespace, &name, evidence);
    Some(report::status(&runner.master_public_key, &seen))
}
