//! Guards the operator adds around the planner's verdict (pure functions of what was
//! observed): the crash-loop hold and the restart of every voter from its disk.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
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
            crashed_by_itself(&obs.pod).then(|| (r.id.clone(), translate::termination_reason(&obs.pod)))
        })
        .collect()
}

/// The replica process failed on its own: not stopped by a deletion or eviction (SIGTERM,
/// then a clean exit 0) — those are no reason to stop creating replicas.
fn crashed_by_itself(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
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
    // One line per distinct error, naming every replica that reported it.
    let mut by_reason: Vec<(&str, Vec<&str>)> = Vec::new();
    for (id, r) in &crashed {
        match by_reason.iter_mut().find(|(reason, _)| reason == r) {
            Some((_, ids)) => ids.push(id),
            None => by_reason.push((r, vec![id])),
        }
    }
    let why = by_reason
        .iter()
        .map(|(r, ids)| format!("{}: {r}", ids.join(", ")))
        .collect::<Vec<_>>()
        .join("; ");
    let msg = format!("replica failed at startup, not recreating it until the spec changes ({why})");
    plan.actions.retain(|a| {
        !matches!(a, Step::CreateReplica { .. })
            && !matches!(a, Step::DeleteReplica { id, .. } if crashed.iter().any(|(c, _)| c == id))
    });
    plan.conditions.degraded = Some(msg.clone());
    // Holding is not progressing: nothing changes until a person does.
    plan.conditions.progressing = None;
    plan.summary = msg;
    crashed
}

/// Voters to bring back from their own volumes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FromDisk {
    /// Voters whose pod is gone: recreate it (same id, same volume).
    pub revive: Vec<(String, MachineRef)>,
    /// Voters whose pod stopped: record the restart count on the claim, delete the pod
    /// (recreated on the next pass).
    pub restart: Vec<(String, u32)>,
    /// Voters waiting out their crash-loop backoff: (id, seconds left).
    pub backing_off: Vec<(String, u64)>,
}

impl FromDisk {
    pub fn is_empty(&self) -> bool {
        self.revive.is_empty() && self.restart.is_empty() && self.backing_off.is_empty()
    }
}

/// Backoff before restarting a replica from its disk after `quick` consecutive deaths within
/// the start-up grace: none for the first, then 5 s, 10 s, 20 s ... up to 5 minutes.
pub fn disk_restart_backoff(quick: u32) -> Duration {
    match quick {
        0 => Duration::ZERO,
        n => Duration::from_secs(5u64 << (n - 1).min(6)).min(Duration::from_secs(300)),
    }
}

/// Every voter gone or stopped, but their volumes are intact: bring the same replicas back
/// from their disks (not data-losing: a voter of the persisted configuration has run and
/// joined, and restarting from its disk it has everything it acknowledged), whatever its
/// uptime. A replica that dies again within the start-up grace is restarted with a growing
/// backoff (count on its claim) and reported: Degraded names it and its last words. Stopped
/// pods are deleted first and recreated on the next pass. Pods that may still run (lost
/// node, unreachable) are left alone: a second copy of a replica must never run beside a
/// zombie.
pub fn from_disk(
    plan: &mut Plan,
    world: &World,
    observed: &planner::Observed,
    desired: &planner::Desired,
    tuning: &Tuning,
) -> FromDisk {
    let mut out = FromDisk::default();
    let Some(config) = &observed.config else {
        return out;
    };
    let stopped_pod = |id: &str| {
        world.replicas.iter().map(|o| &o.pod).find(|p| {
            p.name_any() == id
                && matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Failed" | "Succeeded")
                )
        })
    };
    if !plan.actions.is_empty()
        || desired.paused
        || plan.conditions.degraded.is_none()
        || !config
            .voters()
            .all(|m| observed.replica(&m.id).is_none() || stopped_pod(&m.id).is_some())
    {
        return out;
    }
    let now = world.now.unwrap_or_else(Timestamp::now);
    let mut crashing = Vec::new();
    for m in config.voters() {
        if !world.pvcs.contains(&names::pvc(&m.id)) {
            continue;
        }
        let Some(pod) = stopped_pod(&m.id) else {
            out.revive.push((m.id.clone(), desired.machine.clone()));
            continue;
        };
        let before = world.disk_restarts.get(&m.id).copied().unwrap_or(0);
        let quick = translate::ran_for(pod).is_none_or(|d| d < tuning.startup_grace);
        if !quick {
            out.restart.push((m.id.clone(), 0));
            continue;
        }
        crashing.push(format!(
            "{} died within {}s of starting ({} time(s) in a row): {}",
            m.id,
            tuning.startup_grace.as_secs(),
            before + 1,
            translate::termination_reason(pod)
        ));
        let wait = disk_restart_backoff(before);
        let since = translate::finished_at(pod).map_or(0, |t| now.as_second().saturating_sub(t.as_second()));
        let left = wait.as_secs().saturating_sub(u64::try_from(since).unwrap_or(0));
        if left == 0 {
            out.restart.push((m.id.clone(), before + 1));
        } else {
            out.backing_off.push((m.id.clone(), left));
        }
    }
    if !crashing.is_empty() {
        let mut why = format!(
            "every voter stopped; restarting them from their volumes. {}",
            crashing.join("; ")
        );
        if !out.backing_off.is_empty() {
            let waits: Vec<String> = out.backing_off.iter().map(|(id, s)| format!("{id} in {s}s")).collect();
            why.push_str(&format!(" (backing off: {})", waits.join(", ")));
        }
        plan.conditions.degraded = Some(why.clone());
        plan.summary = why;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evicted_or_cleanly_stopped_pod_is_no_startup_failure() {
        use k8s_openapi::api::core::v1::{Pod, PodStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let pod = |phase: &str, deleted: bool| Pod {
            metadata: kube::api::ObjectMeta {
                deletion_timestamp: deleted.then_some(Time(Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(crashed_by_itself(&pod("Failed", false)));
        assert!(!crashed_by_itself(&pod("Failed", true)), "being deleted (evicted)");
        assert!(!crashed_by_itself(&pod("Succeeded", false)), "exit 0 after SIGTERM");
        assert!(!crashed_by_itself(&pod("Running", false)));
    }

    #[test]
    fn disk_restart_backoff_grows_to_five_minutes() {
        let secs: Vec<u64> = (0..10).map(|n| disk_restart_backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![0, 5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
