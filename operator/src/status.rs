//! Status: what the operator persists (configuration epoch, rollout) and reports
//! (members, versions, conditions). Computing it is pure; writing it uses optimistic
//! concurrency (`metadata.resourceVersion`), so a stale operator cannot overwrite a newer
//! epoch.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};
use lockstep_planner::{Config, Health, Observed, Plan, Rollout};
use lockstep_resource::{MemberStatus, ReplicatedStateMachine, ReplicatedStateMachineStatus, condition_types as ct};

use crate::translate::{self, World};

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The five conditions from the planner's verdict.
pub fn conditions(plan: &Plan, generation: Option<i64>, previous: &[Condition], now: Timestamp) -> Vec<Condition> {
    let c = &plan.conditions;
    let summary = plan.summary.clone();
    vec![
        condition(
            ct::READY,
            c.ready,
            if c.ready { "AllReplicasReady" } else { "NotReady" },
            summary.clone(),
            generation,
            previous,
            now,
        ),
        condition(
            ct::AVAILABLE,
            c.available,
            if c.available { "PrimaryServing" } else { "Unavailable" },
            if c.available {
                "a primary and every voter answer; commands are accepted".into()
            } else {
                "not accepting commands (bootstrapping, sealed for a rollout, or a voter is down)".into()
            },
            generation,
            previous,
            now,
        ),
        condition(
            ct::PROGRESSING,
            c.progressing.is_some(),
            match (&c.progressing, &c.degraded) {
                (Some(_), _) => "Reconciling",
                (None, Some(_)) => "Holding",
                (None, None) => "Stable",
            },
            c.progressing.clone().unwrap_or_else(|| summary.clone()),
            generation,
            previous,
            now,
        ),
        condition(
            ct::DEGRADED,
            c.degraded.is_some(),
            match (&c.degraded, &c.degraded_reason) {
                (Some(_), Some(reason)) => reason.as_str(),
                (Some(_), None) => "RedundancyLost",
                (None, _) => "FullRedundancy",
            },
            c.degraded.clone().unwrap_or_default(),
            generation,
            previous,
            now,
        ),
        condition(
            ct::PAUSED,
            c.paused,
            if c.paused { "PausedByAnnotation" } else { "Reconciling" },
            if c.paused {
                format!("{}=true: observing only", lockstep_resource::PAUSED_ANNOTATION)
            } else {
                String::new()
            },
            generation,
            previous,
            now,
        ),
    ]
}

/// Kubernetes' own view gates `Ready`: a cluster whose voters all serve is Ready only once
/// the kubelet marked their pods ready too, because the client Service routes only to ready
/// pods — `kubectl wait --for=condition=Ready` followed by a request through the Service must
/// find an endpoint. Returns the plan with `ready` cleared and the reason in the summary when
/// some voter pod is not ready yet.
pub fn gate_on_pod_readiness(plan: &Plan, config: Option<&Config>, world: &World) -> Plan {
    let mut plan = plan.clone();
    if !plan.conditions.ready {
        return plan;
    }
    let unready: Vec<&str> = config
        .map(|c| {
            c.voters()
                .map(|m| m.id.as_str())
                .filter(|id| {
                    !world
                        .replicas
                        .iter()
                        .any(|r| r.pod.name_any() == *id && pod_ready(&r.pod))
                })
                .collect()
        })
        .unwrap_or_default();
    if !unready.is_empty() {
        plan.conditions.ready = false;
        plan.summary = format!(
            "every voter serves; waiting for the kubelet to mark {} ready (readiness probe) so the Service routes to {}",
            unready.join(", "),
            if unready.len() == 1 { "it" } else { "them" }
        );
        plan.conditions.progressing.get_or_insert_with(|| plan.summary.clone());
    }
    plan
}

fn pod_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Conditions for an object the operator refuses to act on (invalid spec, missing image).
pub fn blocked_conditions(
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Vec<Condition> {
    let plan = Plan {
        summary: message.to_string(),
        conditions: lockstep_planner::Conditions {
            degraded: Some(message.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut out = conditions(&plan, generation, previous, now);
    for c in &mut out {
        if c.type_ == ct::READY || c.type_ == ct::DEGRADED || c.type_ == ct::PROGRESSING {
            c.reason = reason.into();
        }
    }
    out
}

/// Replica pods that wait for cert-manager to issue their Secret: `Progressing` (and `Ready`,
/// when not ready) say so, with reason `WaitingForCertificate`.
pub fn waiting_for_certificates(conditions: &mut [Condition], waiting: &[String]) {
    if waiting.is_empty() {
        return;
    }
    let message = waiting.join("; ");
    for c in conditions.iter_mut() {
        let progressing = c.type_ == ct::PROGRESSING;
        if progressing || (c.type_ == ct::READY && c.status != "True") {
            if progressing && c.status != "True" {
                c.status = "True".into();
                c.last_transition_time = Time(Timestamp::now());
            }
            c.reason = crate::cert_manager::REASON_WAITING.into();
            c.message = message.clone();
        }
    }
}

/// The most common machine version among the voters (what the cluster runs).
fn current_version(config: Option<&Config>, observed: &Observed) -> Option<String> {
    let config = config?;
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for m in config.voters() {
        if let Some(r) = observed.replica(&m.id) {
            *counts.entry(r.machine.version.as_str()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(v, _)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// Full status from the persisted configuration and rollout plus what was observed.
pub fn compute(
    rsm: &ReplicatedStateMachine,
    config: Option<&Config>,
    rollout: Option<&Rollout>,
    plan: &Plan,
    world: &World,
    observed: &Observed,
    now: Timestamp,
) -> ReplicatedStateMachineStatus {
    let previous = rsm.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = rsm.meta().generation;
    let ready = config.map_or(0, |c| {
        c.voters()
            .filter(|m| {
                observed
                    .replica(&m.id)
                    .is_some_and(|r| r.health == Health::Running && r.status.is_some())
            })
            .count()
    });
    ReplicatedStateMachineStatus {
        observed_generation: generation,
        desired_replicas: Some(rsm.desired_replicas()),
        ready_replicas: Some(i32::try_from(ready).unwrap_or(i32::MAX)),
        epoch: config.and_then(|c| i64::try_from(c.epoch).ok()),
        primary: config.map(|c| c.primary.clone()).filter(|p| !p.is_empty()),
        members: translate::member_statuses(config, world, observed),
        current_version: current_version(config, observed),
        target_version: Some(rsm.spec.machine.version.clone()),
        upgrade_phase: rollout.map(|r| translate::phase_name(r.phase).to_string()),
        seal_index: rollout.and_then(|r| r.seal_index).and_then(|i| i64::try_from(i).ok()),
        rollout: rollout.map(translate::rollout_status),
        next_ordinal: rsm.status.as_ref().and_then(|s| s.next_ordinal),
        conditions: conditions(plan, generation, previous, now),
        // Filled by the Byzantine step (`byzantine::report`).
        byzantine: None,
    }
}

/// The status with a new configuration recorded (epoch, primary, roles) — the fence.
pub fn with_config(status: &ReplicatedStateMachineStatus, config: &Config) -> ReplicatedStateMachineStatus {
    let mut s = status.clone();
    s.epoch = i64::try_from(config.epoch).ok();
    s.primary = Some(config.primary.clone()).filter(|p| !p.is_empty());
    let mut members: Vec<MemberStatus> = s
        .members
        .iter()
        .cloned()
        .map(|mut m| {
            m.role = None;
            m
        })
        .collect();
    for cm in &config.members {
        let role = Some(format!("{:?}", cm.role));
        match members.iter_mut().find(|m| m.pod == cm.id) {
            Some(m) => m.role = role,
            None => members.push(MemberStatus {
                pod: cm.id.clone(),
                role,
                ..Default::default()
            }),
        }
    }
    members.sort_by(|a, b| a.pod.cmp(&b.pod));
    s.members = members;
    s
}

/// The status with `next_ordinal` raised past `ordinal` (before replica `ordinal` is created).
pub fn with_ordinal(status: &ReplicatedStateMachineStatus, ordinal: usize) -> ReplicatedStateMachineStatus {
    let mut s = status.clone();
    let next = i64::try_from(ordinal).unwrap_or(i64::MAX - 1) + 1;
    s.next_ordinal = Some(s.next_ordinal.unwrap_or(0).max(next));
    s
}

pub fn with_rollout(status: &ReplicatedStateMachineStatus, rollout: Option<&Rollout>) -> ReplicatedStateMachineStatus {
    let mut s = status.clone();
    s.rollout = rollout.map(translate::rollout_status);
    s.upgrade_phase = rollout.map(|r| translate::phase_name(r.phase).to_string());
    s.seal_index = rollout.and_then(|r| r.seal_index).and_then(|i| i64::try_from(i).ok());
    s
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("status write conflicted (409): the object changed since it was read")]
    Conflict,
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Replaces the status subresource, conditional on `current`'s resourceVersion. On success
/// `current` becomes the stored object (with its new resourceVersion).
pub async fn write(
    api: &Api<ReplicatedStateMachine>,
    current: &mut ReplicatedStateMachine,
    status: ReplicatedStateMachineStatus,
) -> Result<bool, WriteError> {
    if current.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let mut body = current.clone();
    body.status = Some(status);
    match api
        .replace_status(&current.name_any(), &PostParams::default(), &body)
        .await
    {
        Ok(stored) => {
            *current = stored;
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Err(WriteError::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// What the configuration master persisted, to check that a conflict did not move it.
pub fn persisted(rsm: &ReplicatedStateMachine) -> (Option<Config>, Option<Rollout>) {
    (translate::persisted_config(rsm), translate::persisted_rollout(rsm))
}

/// Writes a change to the persisted state (`change` maps the current status to the new one)
/// with optimistic concurrency. On a 409 it re-reads the object: if the persisted
/// configuration and rollout are still the ones the plan was based on (someone else changed
/// something unrelated, e.g. the spec), it retries on the fresh object; if they moved
/// (another operator instance decided), it gives up and returns `Ok(false)`: the caller must
/// not act on its plan.
pub async fn write_persisted(
    api: &Api<ReplicatedStateMachine>,
    current: &mut ReplicatedStateMachine,
    change: impl Fn(&ReplicatedStateMachineStatus) -> ReplicatedStateMachineStatus,
    on_conflict: impl Fn(),
) -> Result<bool, WriteError> {
    let base = persisted(current);
    for _ in 0..3 {
        let next = change(&current.status.clone().unwrap_or_default());
        match write(api, current, next).await {
            Ok(_) => return Ok(true),
            Err(WriteError::Conflict) => {
                on_conflict();
                let fresh = api.get_status(&current.name_any()).await?;
                if persisted(&fresh) != base {
                    *current = fresh;
                    return Ok(false);
                }
                *current = fresh;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_planner::{ConfigMember, Role};

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let t0 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let t1 = Timestamp::from_second(2_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let mut plan = Plan::default();
        plan.conditions.ready = true;
        let first = conditions(&plan, Some(1), &[], t0);
        let again = conditions(&plan, Some(2), &first, t1);
        let ready = |cs: &[Condition]| cs.iter().find(|c| c.type_ == "Ready").cloned().expect("Ready");
        assert_eq!(ready(&again).last_transition_time, Time(t0));
        assert_eq!(ready(&again).observed_generation, Some(2));
        plan.conditions.ready = false;
        let flipped = conditions(&plan, Some(2), &again, t1);
        assert_eq!(ready(&flipped).last_transition_time, Time(t1));
        assert_eq!(ready(&flipped).status, "False");
        assert_eq!(flipped.len(), 5);
    }

    #[test]
    fn ready_waits_for_the_kubelet_to_mark_voter_pods_ready() {
        use crate::translate::{Admin, ReplicaObservation};
        use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
        let pod = |name: &str, ready: &str| ReplicaObservation {
            pod: Pod {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                status: Some(PodStatus {
                    conditions: Some(vec![PodCondition {
                        type_: "Ready".into(),
                        status: ready.into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            admin: Admin::NotAsked,
            node_lost: None,
            connection_lost: false,
        };
        let voter = |id: &str| ConfigMember {
            id: id.into(),
            endpoint: "e".into(),
            role: Role::Voter,
        };
        let config = Config {
            epoch: 1,
            primary: "kv-0".into(),
            members: vec![voter("kv-0"), voter("kv-1")],
        };
        let mut plan = Plan::default();
        plan.conditions.ready = true;
        let mut world = World {
            replicas: vec![pod("kv-0", "True"), pod("kv-1", "False")],
            ..Default::default()
        };
        let gated = gate_on_pod_readiness(&plan, Some(&config), &world);
        assert!(!gated.conditions.ready);
        assert!(
            gated.summary.contains("kv-1") && !gated.summary.contains("kv-0"),
            "{}",
            gated.summary
        );
        world.replicas[1] = pod("kv-1", "True");
        assert!(gate_on_pod_readiness(&plan, Some(&config), &world).conditions.ready);
    }

    #[test]
    fn fence_records_roles() {
        let status = ReplicatedStateMachineStatus {
            members: vec![
                MemberStatus {
                    pod: "kv-0".into(),
                    role: Some("Voter".into()),
                    ..Default::default()
                },
                MemberStatus {
                    pod: "kv-1".into(),
                    role: Some("Voter".into()),
                    ..Default::default()
                },
            ],
            epoch: Some(3),
            ..Default::default()
        };
        let config = Config {
            epoch: 4,
            primary: "kv-0".into(),
            members: vec![ConfigMember {
                id: "kv-0".into(),
                endpoint: "e".into(),
                role: Role::Voter,
            }],
        };
        let s = with_config(&status, &config);
        assert_eq!(s.epoch, Some(4));
        assert_eq!(s.members[1].role, None, "kv-1 fenced out");
        assert_eq!(s.members[0].role.as_deref(), Some("Voter"));
    }
}
