//! Volumes kept across deletion (`spec.storage.retainOnDelete`) and a new RSM that finds them.
//!
//! With `retainOnDelete: true` the claims carry no owner reference, so the garbage collector
//! leaves them when the RSM is deleted; the operator keeps each claim's owner reference in line
//! with the spec (the field can be flipped on a running cluster).
//!
//! A new RSM of the same name has no status but finds the claims (they carry its cluster
//! label). The replicas on them hold a configuration on disk (epoch E), and a fresh bootstrap
//! would be wrong twice over: it would start new, empty replicas (ids past the old ones) while
//! the old volumes are later deleted as "outside the configuration", and a configuration
//! decided without them could pick an empty primary. So before the planner runs
//! ([`step`]): claims without a pod get their replica pod back (same id, same volume); once
//! every one of them answers and at least one holds a configuration, the newest one reported
//! is recorded in status as the master's own (the replicas already hold it, so nothing is
//! pushed), and planning goes on from there as after an operator restart. See
//! docs/operations.md.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use lockstep_planner::{Config, ConfigMember, Role};
use lockstep_proto::{Configuration, MemberRole};
use lockstep_resource::{FailureModel, ReplicatedStateMachine, ReplicatedStateMachineStatus};

use crate::build;
use crate::controller::{Context, Error};
use crate::events::publish;
use crate::names;
use crate::status;
use crate::translate::{self, Admin, World};

/// What a cluster without a persisted configuration does with volumes it finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Nothing to adopt: the planner decides (bootstrap or normal operation).
    None,
    /// Claims without a replica pod: recreate those replicas on their volumes.
    Revive(Vec<String>),
    /// Replicas on kept volumes hold a configuration; waiting until every one answers.
    Wait(String),
    /// Record this configuration (the newest any replica holds) and this next ordinal.
    Adopt { config: Config, max_ordinal: usize },
}

/// The replica ids of the cluster's claims that are not being deleted.
fn claimed(world: &World) -> Vec<String> {
    world
        .pvcs
        .iter()
        .filter(|c| !world.terminating_pvcs.contains(c))
        .filter_map(|c| c.strip_prefix("data-").map(str::to_string))
        .collect()
}

/// Decides [`Adoption`] from the persisted configuration and what was observed (pure).
pub fn adoption(rsm: &ReplicatedStateMachine, world: &World) -> Adoption {
    // An RSM persists `nextOrdinal` before it creates its first claim: claims found while it
    // is unset were made for an earlier RSM of this name. Byzantine replicas keep eras and
    // vouched state on disk: not adopted this way (yet).
    let created_any = rsm.status.as_ref().is_some_and(|s| s.next_ordinal.is_some());
    if created_any || translate::persisted_config(rsm).is_some() || rsm.spec.failure_model != FailureModel::FailStop {
        return Adoption::None;
    }
    let ids = claimed(world);
    let pods: BTreeSet<String> = world.replicas.iter().map(|r| r.pod.name_any()).collect();
    let missing: Vec<String> = ids.iter().filter(|id| !pods.contains(*id)).cloned().collect();
    if !missing.is_empty() {
        return Adoption::Revive(missing);
    }
    let report = |id: &str| {
        world
            .replicas
            .iter()
            .find(|r| r.pod.name_any() == id)
            .and_then(|r| match &r.admin {
                Admin::Answered(s) => Some(s.clone()),
                _ => None,
            })
    };
    let Some(newest) = ids
        .iter()
        .filter_map(|id| report(id)?.config)
        .filter(|c| c.epoch > 0)
        .max_by_key(|c| c.epoch)
    else {
        return Adoption::None; // fresh replicas: an ordinary bootstrap
    };
    let silent: Vec<&str> = ids
        .iter()
        .filter(|id| report(id).is_none())
        .map(String::as_str)
        .collect();
    if !silent.is_empty() {
        return Adoption::Wait(format!(
            "replicas on kept volumes hold configuration epoch {}; waiting for {} to answer before adopting it",
            newest.epoch,
            silent.join(", ")
        ));
    }
    let config = from_proto(rsm, &newest);
    let max_ordinal = ids
        .iter()
        .chain(config.members.iter().map(|m| &m.id))
        .filter_map(|id| lockstep_planner::ordinal_of(id))
        .max()
        .unwrap_or(0);
    Adoption::Adopt { config, max_ordinal }
}

/// A configuration as a replica reports it, with the endpoints this RSM derives (the same
/// DNS names as before: same name, same namespace).
fn from_proto(rsm: &ReplicatedStateMachine, c: &Configuration) -> Config {
    let ns = rsm.namespace().unwrap_or_default();
    let cluster = rsm.name_any();
    Config {
        epoch: c.epoch,
        primary: c.primary_id.clone(),
        members: c
            .members
            .iter()
            .map(|m| ConfigMember {
                id: m.id.clone(),
                endpoint: names::endpoint(&cluster, &ns, &m.id),
                role: if m.role == MemberRole::Learner as i32 {
                    Role::Learner
                } else {
                    Role::Voter
                },
            })
            .collect(),
    }
}

/// Runs before the planner: brings back replicas on kept volumes and adopts their
/// configuration. `Some` when this reconcile ends here (requeue), `None` to plan as usual.
pub async fn step(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    api: &Api<ReplicatedStateMachine>,
    current: &mut ReplicatedStateMachine,
    world: &World,
) -> Result<Option<Action>, Error> {
    let ns = rsm.namespace().ok_or(Error::NoNamespace)?;
    sync_claim_owners(ctx, rsm, &ns, world).await?;
    let soon = Some(Action::requeue(std::time::Duration::from_secs(2)));
    match adoption(rsm, world) {
        Adoption::None => Ok(None),
        Adoption::Revive(ids) => {
            let machine = translate::desired(rsm, ctx.default_image.as_deref()).machine;
            for id in ids {
                if crate::tls::create_replica_pod(ctx, rsm, &ns, &id, &machine, world).await? {
                    let note = format!(
                        "found volume {} without a configuration in status; starting {id} on it",
                        names::pvc(&id)
                    );
                    publish(
                        ctx,
                        rsm,
                        EventType::Normal,
                        "RecreatingFromKeptVolume",
                        "CreateReplica",
                        note,
                    )
                    .await;
                }
            }
            Ok(soon)
        }
        Adoption::Wait(why) => {
            tracing::info!(rsm = %crate::controller::key(rsm), "{why}");
            Ok(soon)
        }
        Adoption::Adopt { config, max_ordinal } => {
            let change =
                |s: &ReplicatedStateMachineStatus| status::with_ordinal(&status::with_config(s, &config), max_ordinal);
            if status::write_persisted(api, current, change, || {
                ctx.metrics.status_conflicts.inc();
            })
            .await?
            {
                let note = format!(
                    "adopted configuration epoch {} (primary {}) held by the replicas on kept volumes",
                    config.epoch, config.primary
                );
                publish(ctx, rsm, EventType::Normal, "AdoptedConfiguration", "Reconfigure", note).await;
            }
            Ok(Some(Action::requeue(std::time::Duration::from_secs(1))))
        }
    }
}

/// Claims of an RSM with `retainOnDelete` have no owner reference; the others are owned by
/// the RSM. Patches only claims that differ (none in steady state).
async fn sync_claim_owners(ctx: &Context, rsm: &ReplicatedStateMachine, ns: &str, world: &World) -> Result<(), Error> {
    let retain = build::retain_on_delete(rsm);
    let owner = build::owner_reference(rsm)?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    for claim in world.pvcs.iter().filter(|c| !world.terminating_pvcs.contains(c)) {
        let owned = world.owned_pvcs.contains(claim);
        let patch = match (retain, owned) {
            (true, true) => serde_json::json!({"metadata": {"ownerReferences": null}}),
            (false, false) => serde_json::json!({"metadata": {"ownerReferences": [owner]}}),
            _ => continue,
        };
        claims
            .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// Whether a claim is owned by `rsm` (its controller owner reference names the RSM's uid).
pub fn owned_by(claim: &PersistentVolumeClaim, rsm: &ReplicatedStateMachine) -> bool {
    let uid = rsm.meta().uid.as_deref();
    claim.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid)
}

/// Whether a claim belongs to another object (the owner reference of a deleted RSM of the same
/// name: the garbage collector is about to delete it, so it is not adopted).
pub fn owned_by_other(claim: &PersistentVolumeClaim, rsm: &ReplicatedStateMachine) -> bool {
    !claim.owner_references().is_empty() && !owned_by(claim, rsm)
}

#[cfg(test)]
mod tests;
