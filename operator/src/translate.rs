//! Pure translation between Kubernetes objects and the planner's vocabulary.
//!
//! `observe` gathers pods, nodes and replica Admin.Status answers into a [`World`]; this
//! module turns the resource and the world into the planner's [`Desired`] and [`Observed`],
//! classifies each replica's health (the fail-stop detector), and reads back the
//! configuration and rollout the operator persisted in status.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use lockstep_planner as planner;
use lockstep_planner::{
    Config, ConfigMember, Desired, Health, MachineRef, Observed, ObservedReplica, Role, Rollout, RolloutPhase,
};
use lockstep_proto::StatusResponse;
use lockstep_resource::{FailureModel, MachineStatus, MemberStatus, ReplicatedStateMachine, RolloutStatus};

use crate::names;

/// Timing knobs of the fail-stop detector.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// A replica whose container has run this long and whose admin API has not answered for
    /// `unreachable_grace` is failed.
    pub startup_grace: Duration,
    pub unreachable_grace: Duration,
    /// A replica on a node whose Ready condition has not been True for this long is failed.
    pub node_grace: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            startup_grace: Duration::from_secs(60),
            unreachable_grace: Duration::from_secs(30),
            node_grace: Duration::from_secs(40),
        }
    }
}

/// What the admin `Status` call of one replica returned.
#[derive(Clone, Debug)]
pub enum Admin {
    Answered(Box<StatusResponse>),
    /// Not asked (pod has no IP yet, or not running).
    NotAsked,
    /// The call failed; `since` is when it first failed in a row.
    Failed {
        error: String,
        since: Timestamp,
    },
}

/// One replica pod and what is known about it.
#[derive(Clone, Debug)]
pub struct ReplicaObservation {
    pub pod: Pod,
    pub admin: Admin,
    /// Why the pod's node is considered lost, if it is.
    pub node_lost: Option<String>,
    /// The replica closed the connection the operator held to it ([`crate::liveness`]).
    pub connection_lost: bool,
}

/// Everything observed about one cluster.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub replicas: Vec<ReplicaObservation>,
    /// Image pre-pull pods of a rollout's Staging phase.
    pub stage_pods: Vec<Pod>,
    /// Names of the PersistentVolumeClaims of the cluster.
    pub pvcs: Vec<String>,
    /// Claims being deleted (a replica id is not reused until its old claim is gone).
    pub terminating_pvcs: Vec<String>,
    /// Claims whose owner reference names this RSM (the others have none: `retainOnDelete`,
    /// or kept from a deleted RSM of the same name).
    pub owned_pvcs: Vec<String>,
    /// Per replica id: consecutive quick restarts from disk (claim annotation).
    pub disk_restarts: BTreeMap<String, u32>,
    pub now: Option<Timestamp>,
}

/// The replica image to use when the spec has none.
pub fn image_of(rsm: &ReplicatedStateMachine, default_image: Option<&str>) -> Option<String> {
    rsm.spec
        .machine
        .image
        .clone()
        .or_else(|| default_image.map(str::to_string))
}

pub fn desired(rsm: &ReplicatedStateMachine, default_image: Option<&str>) -> Desired {
    Desired {
        faults_tolerated: u32::try_from(rsm.spec.faults_tolerated).unwrap_or(0),
        failure_model: match rsm.spec.failure_model {
            FailureModel::FailStop => planner::FailureModel::FailStop,
            FailureModel::Byzantine => planner::FailureModel::Byzantine,
        },
        machine: MachineRef {
            name: rsm.spec.machine.name.clone(),
            version: rsm.spec.machine.version.clone(),
            image: image_of(rsm, default_image),
        },
        paused: rsm.is_paused(),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Voter => "Voter",
        Role::Learner => "Learner",
    }
}

fn role_from(name: &str) -> Option<Role> {
    match name {
        "Voter" => Some(Role::Voter),
        "Learner" => Some(Role::Learner),
        _ => None,
    }
}

/// The configuration the operator persisted in status (epoch, primary, members with roles).
pub fn persisted_config(rsm: &ReplicatedStateMachine) -> Option<Config> {
    let status = rsm.status.as_ref()?;
    let epoch = u64::try_from(status.epoch?).ok()?;
    let namespace = rsm.metadata.namespace.as_deref().unwrap_or("default");
    let cluster = rsm.metadata.name.as_deref().unwrap_or_default();
    let members: Vec<ConfigMember> = status
        .members
        .iter()
        .filter_map(|m| {
            let role = role_from(m.role.as_deref()?)?;
            Some(ConfigMember {
                id: m.pod.clone(),
                endpoint: names::endpoint(cluster, namespace, &m.pod),
                role,
            })
        })
        .collect();
    if members.is_empty() {
        return None;
    }
    Some(Config {
        epoch,
        primary: status.primary.clone().unwrap_or_default(),
        members,
    })
}

fn machine_ref(m: &MachineStatus) -> MachineRef {
    MachineRef {
        name: m.name.clone(),
        version: m.version.clone(),
        image: m.image.clone(),
    }
}

pub fn machine_status(m: &MachineRef) -> MachineStatus {
    MachineStatus {
        name: m.name.clone(),
        version: m.version.clone(),
        image: m.image.clone(),
    }
}

pub fn phase_name(p: RolloutPhase) -> &'static str {
    match p {
        RolloutPhase::Staging => "Staging",
        RolloutPhase::Sealing => "Sealing",
        RolloutPhase::Replacing => "Replacing",
        RolloutPhase::Resuming => "Resuming",
    }
}

fn phase_from(s: &str) -> Option<RolloutPhase> {
    Some(match s {
        "Staging" => RolloutPhase::Staging,
        "Sealing" => RolloutPhase::Sealing,
        "Replacing" => RolloutPhase::Replacing,
        "Resuming" => RolloutPhase::Resuming,
        _ => return None,
    })
}

/// `status.nextOrdinal`: ordinals below it were handed out before.
pub fn persisted_next_ordinal(rsm: &ReplicatedStateMachine) -> usize {
    rsm.status
        .as_ref()
        .and_then(|s| s.next_ordinal)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

pub fn persisted_rollout(rsm: &ReplicatedStateMachine) -> Option<Rollout> {
    let r = rsm.status.as_ref()?.rollout.as_ref()?;
    Some(Rollout {
        from: machine_ref(&r.from),
        to: machine_ref(&r.to),
        phase: phase_from(&r.phase)?,
        seal_index: r.seal_index.and_then(|i| u64::try_from(i).ok()),
    })
}

pub fn rollout_status(r: &Rollout) -> RolloutStatus {
    RolloutStatus {
        from: machine_status(&r.from),
        to: machine_status(&r.to),
        phase: phase_name(r.phase).to_string(),
        seal_index: r.seal_index.and_then(|i| i64::try_from(i).ok()),
    }
}

fn secs_between(earlier: Timestamp, later: Timestamp) -> u64 {
    let d = later.as_second().saturating_sub(earlier.as_second());
    u64::try_from(d).unwrap_or(0)
}

/// The pod's spec names another image than its replica container runs: the kubelet is
/// restarting the container in place for a rollout, and a closed connection is expected.
fn image_change_pending(pod: &Pod) -> bool {
    let spec_image = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == names::REPLICA_CONTAINER))
        .and_then(|c| c.image.as_deref());
    let running_image = replica_container(pod).map(|c| c.image.as_str());
    spec_image.is_some() && running_image.is_some() && spec_image != running_image
}

fn replica_container(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == names::REPLICA_CONTAINER)
}

fn spec_image(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == names::REPLICA_CONTAINER)?
        .image
        .clone()
}

/// A runtime may report `docker.io/library/x:1` for `x:1`.
pub fn same_image(reported: &str, spec: &str) -> bool {
    reported == spec || reported.ends_with(&format!("/{spec}"))
}

/// Why a pod that stopped is failed: the container's termination (with the replica's last
/// words, `terminationMessagePolicy: FallbackToLogsOnError`) or the pod's reason.
pub fn termination_reason(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    if let Some(t) = replica_container(pod)
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
    {
        let mut why = format!("container exited with code {}", t.exit_code);
        if let Some(r) = &t.reason {
            why.push_str(&format!(" ({r})"));
        }
        if let Some(m) = t.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
            let last = m.lines().last().unwrap_or(m);
            why.push_str(&format!(": {last}"));
        }
        return why;
    }
    let phase = status.and_then(|s| s.phase.clone()).unwrap_or_default();
    let reason = status.and_then(|s| s.reason.clone()).unwrap_or_default();
    let message = status.and_then(|s| s.message.clone()).unwrap_or_default();
    format!("pod {phase} {reason} {message}").trim().to_string()
}

/// When the replica container terminated, if it did.
pub fn finished_at(pod: &Pod) -> Option<Timestamp> {
    Some(
        replica_container(pod)?
            .state
            .as_ref()?
            .terminated
            .as_ref()?
            .finished_at
            .as_ref()?
            .0,
    )
}

/// How long the replica container ran before it terminated (None when it has not
/// terminated or the times are unknown).
pub fn ran_for(pod: &Pod) -> Option<Duration> {
    let t = replica_container(pod)?.state.as_ref()?.terminated.as_ref()?;
    let started = t.started_at.as_ref()?.0;
    let finished = t.finished_at.as_ref()?.0;
    Some(Duration::from_secs(secs_between(started, finished)))
}

/// The fail-stop detector: from what Kubernetes and the replica say, is it failed?
pub fn classify(obs: &ReplicaObservation, now: Timestamp, tuning: &Tuning) -> Health {
    let pod = &obs.pod;
    if pod.metadata.deletion_timestamp.is_some() {
        return Health::Failed {
            reason: "pod is being deleted".into(),
        };
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    if phase == "Failed" || phase == "Succeeded" {
        return Health::Failed {
            reason: termination_reason(pod),
        };
    }
    if let Some(why) = &obs.node_lost {
        return Health::Failed { reason: why.clone() };
    }
    match &obs.admin {
        Admin::Answered(_) => Health::Running,
        Admin::NotAsked => Health::Starting,
        // A live process never refuses connections on its own listening port.
        Admin::Failed { error, .. }
            if obs.connection_lost && error.starts_with("connect ") && !image_change_pending(pod) =>
        {
            Health::Failed {
                reason: format!(
                    "replica process gone: it closed the operator's connection and refuses new ones ({error})"
                ),
            }
        }
        Admin::Failed { error, since } => {
            let started = replica_container(pod)
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.running.as_ref())
                .and_then(|r| r.started_at.as_ref())
                .map(|t| t.0);
            let up_long_enough = started.is_some_and(|s| secs_between(s, now) >= tuning.startup_grace.as_secs());
            let silent_for = secs_between(*since, now);
            if up_long_enough && silent_for >= tuning.unreachable_grace.as_secs() {
                Health::Failed {
                    reason: format!("admin API unreachable for {silent_for}s: {error}"),
                }
            } else {
                Health::Starting
            }
        }
    }
}

/// The machine a replica runs, as the replica itself reports it when it answers: its
/// machine identity (name, version) and the image it was launched from (`launched_image`,
/// from the `lockstep.dev/image` annotation at container start). Only for a replica that does
/// not answer (or an older one that does not report its image) does the pod stand in.
pub fn running_machine(obs: &ReplicaObservation) -> MachineRef {
    let fallback = pod_machine(&obs.pod);
    let Admin::Answered(s) = &obs.admin else {
        return fallback;
    };
    let identity = s.machine.as_ref();
    let reported =
        |f: fn(&lockstep_proto::MachineIdentity) -> &String| identity.map(f).filter(|v| !v.is_empty()).cloned();
    MachineRef {
        name: reported(|m| &m.name).unwrap_or(fallback.name),
        version: reported(|m| &m.version).unwrap_or(fallback.version),
        image: Some(s.launched_image.clone())
            .filter(|i| !i.is_empty())
            .or(fallback.image),
    }
}

/// The machine a replica pod runs now, from the pod alone (spec, annotations and the image
/// the kubelet reports). During a rollout restart the container runs the previous image
/// until the kubelet has restarted it with the new one.
pub fn pod_machine(pod: &Pod) -> MachineRef {
    let meta = &pod.metadata;
    let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k)).cloned();
    let name = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(names::MACHINE_LABEL))
        .cloned()
        .unwrap_or_default();
    let image = spec_image(pod);
    let reported = replica_container(pod).map(|c| c.image.clone());
    let restart_pending = match (&image, &reported, annotation(names::PREVIOUS_IMAGE_ANNOTATION)) {
        (Some(spec), Some(rep), Some(prev)) => prev != *spec && !same_image(rep, spec),
        _ => false,
    };
    if restart_pending {
        MachineRef {
            name,
            version: annotation(names::PREVIOUS_VERSION_ANNOTATION).unwrap_or_default(),
            image: annotation(names::PREVIOUS_IMAGE_ANNOTATION),
        }
    } else {
        MachineRef {
            name,
            version: annotation(names::VERSION_ANNOTATION).unwrap_or_default(),
            image,
        }
    }
}

pub use lockstep_planner::wire::replica_status;

fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Has the new image been pulled on the node of every member (Staging)?
pub fn staged(rollout: Option<&Rollout>, world: &World, config: Option<&Config>) -> bool {
    let Some(r) = rollout else { return false };
    if r.to.image == r.from.image {
        return true; // nothing to pull
    }
    let Some(to_image) = r.to.image.as_deref() else {
        return true;
    };
    let Some(config) = config else { return false };
    config.members.iter().all(|m| {
        let node = world
            .replicas
            .iter()
            .find(|o| pod_name(&o.pod) == m.id)
            .and_then(|o| o.pod.spec.as_ref()?.node_name.clone());
        let Some(node) = node else { return false };
        world.stage_pods.iter().any(|p| {
            let spec = p.spec.as_ref();
            spec.and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
                && spec.is_some_and(|s| s.containers.iter().any(|c| c.image.as_deref() == Some(to_image)))
                && p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| !c.image_id.is_empty()))
        })
    })
}

/// The planner's view of the world.
pub fn observed(rsm: &ReplicatedStateMachine, world: &World, tuning: &Tuning) -> Observed {
    let now = world.now.unwrap_or_else(Timestamp::now);
    let cluster = rsm.metadata.name.as_deref().unwrap_or_default();
    let namespace = rsm.metadata.namespace.as_deref().unwrap_or("default");
    let config = persisted_config(rsm);
    let rollout = persisted_rollout(rsm);
    let replicas = world
        .replicas
        .iter()
        .map(|o| {
            let id = pod_name(&o.pod);
            ObservedReplica {
                endpoint: names::endpoint(cluster, namespace, &id),
                machine: running_machine(o),
                health: classify(o, now, tuning),
                status: match &o.admin {
                    Admin::Answered(s) => Some(replica_status(s)),
                    _ => None,
                },
                id,
            }
        })
        .collect();
    let staged = staged(rollout.as_ref(), world, config.as_ref());
    Observed {
        config,
        replicas,
        rollout,
        staged,
        next_ordinal: persisted_next_ordinal(rsm),
        volumes: world
            .pvcs
            .iter()
            .filter_map(|c| c.strip_prefix("data-").map(str::to_string))
            .collect(),
    }
}

/// `status.members`: every member of `config` and every observed replica, in id order.
pub fn member_statuses(config: Option<&Config>, world: &World, observed: &Observed) -> Vec<MemberStatus> {
    let mut by_id: BTreeMap<String, MemberStatus> = BTreeMap::new();
    for r in &observed.replicas {
        let admin = world
            .replicas
            .iter()
            .find(|o| pod_name(&o.pod) == r.id)
            .map(|o| &o.admin);
        let (version, applied, state) = match admin {
            Some(Admin::Answered(s)) => (
                s.machine
                    .as_ref()
                    .map(|m| m.version.clone())
                    .or(Some(r.machine.version.clone())),
                i64::try_from(s.applied_index).ok(),
                Some(if s.sealed_at > 0 && s.state != "fenced" && s.state != "removed" {
                    format!("{} (sealed at {})", s.state, s.sealed_at)
                } else {
                    s.state.clone()
                }),
            ),
            _ => (
                Some(r.machine.version.clone()),
                None,
                Some(match &r.health {
                    Health::Failed { .. } => "failed".to_string(),
                    Health::Starting => "starting".to_string(),
                    Health::Running => "running".to_string(),
                }),
            ),
        };
        by_id.insert(
            r.id.clone(),
            MemberStatus {
                pod: r.id.clone(),
                version: version.filter(|v| !v.is_empty()),
                applied_index: applied,
                state,
                role: None,
            },
        );
    }
    if let Some(config) = config {
        for m in &config.members {
            let entry = by_id.entry(m.id.clone()).or_insert_with(|| MemberStatus {
                pod: m.id.clone(),
                state: Some("gone".into()),
                ..Default::default()
            });
            entry.role = Some(role_name(m.role).to_string());
        }
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateRunning, ContainerStatus, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(phase: &str, started: Timestamp) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("kv-0".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: names::REPLICA_CONTAINER.into(),
                    state: Some(ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: Some(Time(started)),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn obs(pod: Pod, admin: Admin, node_lost: Option<String>) -> ReplicaObservation {
        ReplicaObservation {
            pod,
            admin,
            node_lost,
            connection_lost: false,
        }
    }

    /// The admin call has failed since `since`.
    fn silent(since: Timestamp) -> Admin {
        Admin::Failed {
            error: "connection refused".into(),
            since,
        }
    }

    /// The pod's spec names `to` while its container still runs `from` (a rollout's in-place
    /// restart as the kubelet reports it).
    fn restart_in_place(p: &mut Pod, from: &str, to: &str) {
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: names::REPLICA_CONTAINER.into(),
                image: Some(to.into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        if let Some(c) = p
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.as_mut())
            .and_then(|cs| cs.first_mut())
        {
            c.image = from.into();
        }
    }

    /// A replica that closed the operator's connection and refuses new ones.
    fn gone() -> ReplicaObservation {
        let refused = Admin::Failed {
            error: "connect http://10.0.0.1:7000: transport error: tcp connect error: Connection refused".into(),
            since: at(100),
        };
        ReplicaObservation {
            connection_lost: true,
            ..obs(pod("Running", at(95)), refused, None)
        }
    }

    #[test]
    fn fail_stop_detector() {
        let t = Tuning::default();
        let answered = Admin::Answered(Box::default());
        assert_eq!(
            classify(&obs(pod("Running", at(0)), answered.clone(), None), at(100), &t),
            Health::Running
        );
        assert!(matches!(
            classify(&obs(pod("Failed", at(0)), answered.clone(), None), at(100), &t),
            Health::Failed { .. }
        ));
        assert!(matches!(
            classify(&obs(pod("Running", at(0)), answered.clone(), Some("node n1 lost".into())), at(100), &t),
            Health::Failed { reason } if reason == "node n1 lost"
        ));
        let mut deleting = pod("Running", at(0));
        deleting.metadata.deletion_timestamp = Some(Time(at(50)));
        assert!(matches!(
            classify(&obs(deleting, answered, None), at(100), &t),
            Health::Failed { .. }
        ));
    }

    #[test]
    fn a_silent_replica_fails_after_its_grace() {
        let t = Tuning::default();
        // Silent for 10s: still starting. Silent for 40s after a minute of uptime: failed.
        assert_eq!(
            classify(&obs(pod("Running", at(0)), silent(at(90)), None), at(100), &t),
            Health::Starting
        );
        assert!(matches!(
            classify(&obs(pod("Running", at(0)), silent(at(60)), None), at(100), &t),
            Health::Failed { reason } if reason.contains("unreachable for 40s")
        ));
        // A freshly started container gets its startup grace.
        assert_eq!(
            classify(&obs(pod("Running", at(90)), silent(at(0)), None), at(100), &t),
            Health::Starting
        );
        assert_eq!(
            classify(&obs(pod("Pending", at(0)), Admin::NotAsked, None), at(100), &t),
            Health::Starting
        );
    }

    #[test]
    fn a_lost_connection_that_is_refused_is_a_gone_process() {
        let t = Tuning::default();
        // The replica closed the operator's connection and refuses new ones: its process is
        // gone, whatever its uptime. A closed connection alone (it still answers, or fails
        // in another way) is not enough.
        let mut gone = gone();
        assert!(matches!(
            classify(&gone, at(100), &t),
            Health::Failed { reason } if reason.contains("process gone")
        ));
        let still_connected = ReplicaObservation {
            connection_lost: false,
            ..gone.clone()
        };
        assert_eq!(classify(&still_connected, at(100), &t), Health::Starting);
        gone.admin = silent(at(100));
        assert_eq!(classify(&gone, at(100), &t), Health::Starting);
    }

    #[test]
    fn a_rollout_restart_closing_the_connection_is_not_a_death() {
        // A rollout's in-place restart (spec names the new image, the container still the
        // old one) closes the connection too.
        let mut restarting = gone();
        restart_in_place(&mut restarting.pod, "img:1", "img:2");
        assert_eq!(classify(&restarting, at(100), &Tuning::default()), Health::Starting);
    }

    #[test]
    fn a_second_tag_of_the_same_image_is_seen_from_what_the_replica_reports() {
        // Rollout img:1 -> img:2, where img:2 is a second tag of the same image: the kubelet
        // keeps reporting the name it first resolved (img:1).
        let mut p = pod("Running", at(0));
        p.metadata.labels = Some([(names::MACHINE_LABEL.to_string(), "kv".to_string())].into());
        p.metadata.annotations = Some(
            [
                (names::VERSION_ANNOTATION, "1.1.0"),
                (names::IMAGE_ANNOTATION, "img:2"),
                (names::PREVIOUS_VERSION_ANNOTATION, "1.0.0"),
                (names::PREVIOUS_IMAGE_ANNOTATION, "img:1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        restart_in_place(&mut p, "docker.io/library/img:1", "img:2");
        // From the pod alone it looks like the restart never happened (the old bug: sealed
        // forever).
        assert_eq!(pod_machine(&p).version, "1.0.0");
        // The replica answers: launched from img:2, machine kv 1.1.0.
        let reporting = |version: &str| ReplicaObservation {
            pod: p.clone(),
            admin: Admin::Answered(Box::new(StatusResponse {
                machine: Some(lockstep_proto::MachineIdentity {
                    name: "kv".into(),
                    version: version.into(),
                    digest: String::new(),
                }),
                launched_image: "img:2".into(),
                ..Default::default()
            })),
            node_lost: None,
            connection_lost: false,
        };
        assert_eq!(
            running_machine(&reporting("1.1.0")),
            MachineRef {
                name: "kv".into(),
                version: "1.1.0".into(),
                image: Some("img:2".into())
            }
        );
        // A replica that reports the old version from the new image is seen as exactly that.
        let obs = reporting("1.0.0");
        assert_eq!(running_machine(&obs).version, "1.0.0");
    }

    #[test]
    fn image_normalisation() {
        assert!(same_image("docker.io/library/kv:1", "kv:1"));
        assert!(same_image("ghcr.io/x/kv:1", "ghcr.io/x/kv:1"));
        assert!(!same_image("ghcr.io/x/kv:1", "ghcr.io/x/kv:2"));
    }
}
