//! Guards the operator adds around the planner's verdict (pure functions of what was
//! observed): the crash-loop hold and the restart of every voter from its disk.

use kube::ResourceExt;
use lockstep_planner::{self as planner, Action as Step, Health, MachineRef, Plan};

use crate::names;
use crate::translate::{self, Tuning, World};

/// Pods that exited before they ever answered, with the same machine the spec asks for:
/// recreating them would only crash-loop (e.g. a replica that refuses the failure model).
pub fn startup_failures(
    world: &World,
    observed: &planner::Observed,
    desired: &planner::Desired,
) -> Vec<(String, String)> {
    observed
        .replicas
        .iter()
        .filter(|r| matches!(r.health, Health::Failed { .. }) && r.status.is_none())
        .filter(|r| r.machine.same_as(&desired.machine))
        .filter(|r| observed.config.as_ref().is_none_or(|c| c.member(&r.id).is_none()))
        .filter_map(|r| {
            let obs = world.replicas.iter().find(|o| o.pod.name_any() == r.id)?;
            let phase = obs.pod.status.as_ref()?.phase.as_deref()?;
            (phase == "Failed" || phase == "Succeeded").then(|| (r.id.clone(), translate::termination_reason(&obs.pod)))
        })
        .collect()
}

/// Crash-loop guard: a replica that exits before it ever answered, running exactly the
/// machine the spec asks for, would fail the same way again. Report and hold: no new
/// replicas, and the failed pods are kept for inspection. Returns the held replicas.
pub fn hold_startup_failures(
    plan: &mut Plan,
    world: &World,
    observed: &planner::Observed,
    desired: &planner::Desired,
) -> Vec<(String, String)> {
    let crashed = startup_failures(world, observed, desired);
    if crashed.is_empty() || desired.paused {
        return crashed;
    }
    let why = crashed
        .iter()
        .map(|(id, r)| format!("{id}: {r}"))
        .collect::<Vec<_>>()
        .join("; ");
    let msg = format!("replica failed at startup, not recreating it until the spec changes ({why})");
    plan.actions.retain(|a| {
        !matches!(a, Step::CreateReplica { .. })
            && !matches!(a, Step::DeleteReplica { id, .. } if crashed.iter().any(|(c, _)| c == id))
    });
    plan.conditions.degraded = Some(msg.clone());
    plan.summary = msg;
    crashed
}

/// Voters to bring back from their own volumes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FromDisk {
    /// Voters whose pod is gone: recreate it (same id, same volume).
    pub revive: Vec<(String, MachineRef)>,
    /// Voters whose pod stopped: delete it (recreated on the next pass).
    pub restart: Vec<String>,
}

impl FromDisk {
    pub fn is_empty(&self) -> bool {
        self.revive.is_empty() && self.restart.is_empty()
    }
}

/// Every voter gone or stopped, but their volumes are intact: bring the same replicas back
/// from their disks (not data-losing: a replica restarting from its disk has everything it
/// acknowledged). Stopped pods are deleted first and recreated on the next pass. Pods that
/// may still run (lost node, unreachable) are left alone: a second copy of a replica must
/// never run beside a zombie.
pub fn from_disk(
    plan: &Plan,
    world: &World,
    observed: &planner::Observed,
    desired: &planner::Desired,
    tuning: &Tuning,
) -> FromDisk {
    let mut out = FromDisk::default();
    // Stopped after running for a while (a replica that dies at startup would only die
    // again: that is reported, not looped).
    let stopped = |id: &str| {
        world.replicas.iter().any(|o| {
            o.pod.name_any() == id
                && matches!(
                    o.pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Failed" | "Succeeded")
                )
                && translate::ran_for(&o.pod).is_some_and(|d| d >= tuning.startup_grace)
        })
    };
    let Some(config) = &observed.config else {
        return out;
    };
    if !plan.actions.is_empty()
        || desired.paused
        || plan.conditions.degraded.is_none()
        || !config
            .voters()
            .all(|m| observed.replica(&m.id).is_none() || stopped(&m.id))
    {
        return out;
    }
    for m in config.voters() {
        if !world.pvcs.contains(&names::pvc(&m.id)) {
            continue;
        }
        if observed.replica(&m.id).is_none() {
            out.revive.push((m.id.clone(), desired.machine.clone()));
        } else {
            out.restart.push(m.id.clone());
        }
    }
    out
}
