//! The reconcile loop: observe -> plan -> build -> apply -> update_status.
//!
//! Only `observe`, `apply` (this file's action execution) and `status::write` talk to the
//! API server or replicas; `translate`, `lockstep_planner::plan`, `build` and
//! `status::compute` are pure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use lockstep_planner::{self as planner, Action as Step, Config, Health, MachineRef, Plan};
use lockstep_resource::{ReplicatedStateMachine, condition_types as ct};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admin::ReplicaAdmin;
use crate::build::{self, BuildError};
use crate::metrics::Metrics;
use crate::names;
use crate::observe::{self, AdminAddress, Source};
use crate::status::{self, WriteError};
use crate::translate::{self, Tuning, World};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building objects: {0}")]
    Build(#[from] BuildError),
    #[error("status: {0}")]
    Status(#[from] WriteError),
    #[error("serializing: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the object has no namespace")]
    NoNamespace,
}

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub admin: Arc<dyn ReplicaAdmin>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub tuning: Tuning,
    pub default_image: Option<String>,
    pub source: Source,
    pub admin_address: AdminAddress,
    /// Requeue interval when nothing is changing.
    pub steady_requeue: Duration,
    /// Requeue interval while converging.
    pub busy_requeue: Duration,
    /// Per pod uid: since when and last time its admin API failed.
    unreachable: Mutex<HashMap<String, (Timestamp, Timestamp)>>,
    failures: Mutex<HashMap<String, u32>>,
    applied: Mutex<HashMap<String, String>>,
}

impl Context {
    pub fn new(client: Client, admin: Arc<dyn ReplicaAdmin>, metrics: Arc<Metrics>, source: Source) -> Self {
        let reporter = Reporter {
            controller: names::MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            admin,
            metrics,
            tuning: Tuning::default(),
            default_image: None,
            source,
            admin_address: AdminAddress::PodIp,
            steady_requeue: Duration::from_secs(60),
            busy_requeue: Duration::from_secs(2),
            unreachable: Mutex::default(),
            failures: Mutex::default(),
            applied: Mutex::default(),
        }
    }
}

fn key(rsm: &ReplicatedStateMachine) -> String {
    format!("{}/{}", rsm.namespace().unwrap_or_default(), rsm.name_any())
}

async fn publish(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &rsm.object_ref(&())).await {
        tracing::warn!(object = %key(rsm), error = %e, "could not publish event");
    }
}

/// Server-side apply of an owned object, only when it is missing or its content changed.
/// The hash of the desired content travels on the object (`lockstep.dev/applied-hash`), so
/// with watch caches an unchanged object costs no API request, even after a restart, and a
/// deleted one is recreated. Without caches (tests) an in-process record is used.
async fn apply<K>(ctx: &Context, ns: &str, obj: &K, store: Option<&reflector::Store<K>>) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = obj.name_any();
    let cache_key = format!("{}/{ns}/{name}", K::kind(&()));
    let hash = build::content_hash(obj);
    let unchanged = match store {
        Some(store) => store
            .get(&reflector::ObjectRef::new(&name).within(ns))
            .is_some_and(|stored| stored.annotations().get(names::HASH_ANNOTATION) == Some(&hash)),
        None => ctx
            .applied
            .lock()
            .map(|m| m.get(&cache_key) == Some(&hash))
            .unwrap_or(false),
    };
    if unchanged {
        return Ok(());
    }
    let mut obj = obj.clone();
    obj.annotations_mut()
        .insert(names::HASH_ANNOTATION.into(), hash.clone());
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(&name, &PatchParams::apply(names::MANAGER).force(), &Patch::Apply(&obj))
        .await?;
    if let Ok(mut m) = ctx.applied.lock() {
        m.insert(cache_key, hash);
    }
    Ok(())
}

async fn create_if_absent<K>(ctx: &Context, ns: &str, obj: &K) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn delete_if_present<K>(ctx: &Context, ns: &str, name: &str) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The admin address of replica `id`, if its pod can be called.
fn address_of(ctx: &Context, rsm: &ReplicatedStateMachine, world: &World, id: &str) -> Option<String> {
    world
        .replicas
        .iter()
        .find(|o| o.pod.name_any() == id)
        .and_then(|o| observe::admin_address(&o.pod, rsm, ctx.admin_address))
}

/// Pods that exited before they ever answered, with the same machine the spec asks for:
/// recreating them would only crash-loop (e.g. a replica that refuses the failure model).
fn startup_failures(world: &World, observed: &planner::Observed, desired: &planner::Desired) -> Vec<(String, String)> {
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

/// One reconciliation of one object.
pub async fn reconcile(rsm: Arc<ReplicatedStateMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&rsm, &ctx).await;
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::ResultLabel { result: label.into() })
        .inc();
    if result.is_ok()
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&key(&rsm));
    }
    result
}

async fn reconcile_inner(rsm: &ReplicatedStateMachine, ctx: &Context) -> Result<Action, Error> {
    let ns = rsm.namespace().ok_or(Error::NoNamespace)?;
    let cluster = rsm.name_any();
    let api: Api<ReplicatedStateMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let mut current = rsm.clone();
    let now = Timestamp::now();
    let generation = rsm.meta().generation;
    let previous = rsm.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();

    // Admission should have rejected an invalid object; if it got in anyway (an older CRD,
    // validation bypassed) report it on this object only and leave it alone.
    if let Err(errors) = rsm.validate() {
        let mut s = rsm.status.clone().unwrap_or_default();
        s.observed_generation = generation;
        s.conditions = status::blocked_conditions("InvalidSpec", &errors.to_string(), generation, &previous, now);
        if status::write(&api, &mut current, s).await? {
            publish(
                ctx,
                rsm,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                errors.to_string(),
            )
            .await;
        }
        return Ok(Action::requeue(Duration::from_secs(600)));
    }
    let desired = translate::desired(rsm, ctx.default_image.as_deref());
    if desired.machine.image.is_none() {
        let msg = BuildError::NoImage.to_string();
        let mut s = rsm.status.clone().unwrap_or_default();
        s.observed_generation = generation;
        s.conditions = status::blocked_conditions("NoImage", &msg, generation, &previous, now);
        if status::write(&api, &mut current, s).await? {
            publish(ctx, rsm, EventType::Warning, "NoImage", "Validate", msg).await;
        }
        return Ok(Action::requeue(Duration::from_secs(600)));
    }

    // observe
    let world = observe::world(
        &ctx.client,
        &ctx.source,
        ctx.admin.as_ref(),
        ctx.admin_address,
        &ctx.unreachable,
        rsm,
        &ctx.tuning,
        now,
    )
    .await?;
    let observed = translate::observed(rsm, &world, &ctx.tuning);

    // plan (pure, shared with `lockstep up`)
    let mut plan = planner::plan(&cluster, &desired, &observed);

    // Crash-loop guard: a replica that exits before it ever answered, running exactly the
    // machine the spec asks for, would fail the same way again. Report and hold.
    let crashed = startup_failures(&world, &observed, &desired);
    if !crashed.is_empty() && !desired.paused {
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
    }

    // Every voter gone or stopped, but their volumes are intact: bring the same replicas back
    // from their disks (not data-losing: a replica restarting from its disk has everything it
    // acknowledged). Stopped pods are deleted first and recreated on the next pass. Pods that
    // may still run (lost node, unreachable) are left alone: a second copy of a replica must
    // never run beside a zombie.
    let mut revive: Vec<(String, MachineRef)> = Vec::new();
    let mut restart_from_disk: Vec<String> = Vec::new();
    // Stopped after running for a while (a replica that dies at startup would only die
    // again: that is reported, not looped).
    let stopped = |id: &str| {
        world.replicas.iter().any(|o| {
            o.pod.name_any() == id
                && matches!(
                    o.pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Failed" | "Succeeded")
                )
                && translate::ran_for(&o.pod).is_some_and(|d| d >= ctx.tuning.startup_grace)
        })
    };
    if plan.actions.is_empty()
        && !desired.paused
        && let Some(config) = &observed.config
        && plan.conditions.degraded.is_some()
        && config
            .voters()
            .all(|m| observed.replica(&m.id).is_none() || stopped(&m.id))
    {
        for m in config.voters() {
            if !world.pvcs.contains(&names::pvc(&m.id)) {
                continue;
            }
            if observed.replica(&m.id).is_none() {
                revive.push((m.id.clone(), desired.machine.clone()));
            } else {
                restart_from_disk.push(m.id.clone());
            }
        }
    }

    // build + apply the shared objects (skipped while paused)
    if !desired.paused {
        let caches = match &ctx.source {
            Source::Cache(c) => Some(c),
            Source::Api => None,
        };
        apply(ctx, &ns, &build::peers_service(rsm)?, caches.map(|c| &c.services)).await?;
        apply(ctx, &ns, &build::client_service(rsm)?, caches.map(|c| &c.services)).await?;
        apply(ctx, &ns, &build::pdb(rsm)?, caches.map(|c| &c.pdbs)).await?;
        apply(
            ctx,
            &ns,
            &build::config_map(rsm, observed.config.as_ref())?,
            caches.map(|c| &c.config_maps),
        )
        .await?;
    }

    for id in &restart_from_disk {
        if delete_if_present::<Pod>(ctx, &ns, id).await? {
            publish(
                ctx,
                rsm,
                EventType::Warning,
                "RestartingFromDisk",
                "DeleteReplica",
                format!(
                    "every voter has stopped; restarting {id} from its volume {} (its pod is recreated with the same identity)",
                    names::pvc(id)
                ),
            )
            .await;
        }
    }
    for (id, machine) in &revive {
        let pod = build::replica_pod(rsm, id, machine)?;
        if create_if_absent(ctx, &ns, &pod).await? {
            publish(
                ctx,
                rsm,
                EventType::Warning,
                "RecreatingFromDisk",
                "CreateReplica",
                format!(
                    "every voter is gone; recreating {id} on its existing volume {}",
                    names::pvc(id)
                ),
            )
            .await;
        }
    }

    // apply the plan's actions, in order; persisted state first
    let acted = execute(ctx, rsm, &api, &mut current, &world, &plan).await?;
    if !acted {
        ctx.metrics.status_conflicts.inc();
        return Ok(Action::requeue(Duration::from_secs(1)));
    }

    // update_status
    let (config, rollout) = status::persisted(&current);
    let mut s = status::compute(
        &current,
        config.as_ref(),
        rollout.as_ref(),
        &plan,
        &world,
        &observed,
        now,
    );
    s.conditions = status::conditions(&plan, generation, &previous, now);
    let was_paused = previous.iter().any(|c| c.type_ == ct::PAUSED && c.status == "True");
    match status::write(&api, &mut current, s).await {
        Ok(_) => {}
        Err(WriteError::Conflict) => {
            ctx.metrics.status_conflicts.inc();
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        Err(e) => return Err(e.into()),
    }
    if desired.paused != was_paused {
        let (reason, note) = if desired.paused {
            ("Paused", "reconciliation paused by annotation: observing only")
        } else {
            ("Resumed", "reconciliation resumed")
        };
        publish(ctx, rsm, EventType::Normal, reason, "Pause", note.into()).await;
    }
    if !crashed.is_empty() {
        publish(
            ctx,
            rsm,
            EventType::Warning,
            "ReplicaStartupFailure",
            "Hold",
            plan.summary.clone(),
        )
        .await;
    }
    if plan.conditions.degraded.is_some() && plan.actions.is_empty() && crashed.is_empty() {
        let was_degraded = previous.iter().any(|c| c.type_ == ct::DEGRADED && c.status == "True");
        if !was_degraded {
            publish(ctx, rsm, EventType::Warning, "Degraded", "Wait", plan.summary.clone()).await;
        }
    }

    let busy = !plan.actions.is_empty()
        || !revive.is_empty()
        || !restart_from_disk.is_empty()
        || plan.conditions.progressing.is_some();
    Ok(Action::requeue(if busy && crashed.is_empty() {
        ctx.busy_requeue
    } else {
        ctx.steady_requeue
    }))
}

/// Carries out the plan. Returns false when a persisted-state write lost a race (the plan
/// is stale and nothing after it may run).
async fn execute(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    api: &Api<ReplicatedStateMachine>,
    current: &mut ReplicatedStateMachine,
    world: &World,
    plan: &Plan,
) -> Result<bool, Error> {
    let ns = rsm.namespace().ok_or(Error::NoNamespace)?;
    let cluster = rsm.name_any();
    if !plan.actions.is_empty() {
        tracing::info!(object = %key(rsm), summary = %plan.summary, actions = plan.actions.len(), "plan");
    }
    for step in &plan.actions {
        match step {
            Step::CreateReplica { id, machine } => {
                ctx.metrics.action("create_replica");
                if world.terminating_pvcs.contains(&names::pvc(id)) {
                    // The planner reuses a free ordinal; its old volume is still going away.
                    tracing::info!(object = %key(rsm), replica = %id, "waiting for the old claim to be deleted");
                    continue;
                }
                if let Some(pvc) = build::replica_pvc(rsm, id)? {
                    create_if_absent::<PersistentVolumeClaim>(ctx, &ns, &pvc).await?;
                }
                let pod = build::replica_pod(rsm, id, machine)?;
                if create_if_absent(ctx, &ns, &pod).await? {
                    publish(
                        ctx,
                        rsm,
                        EventType::Normal,
                        "CreatingReplica",
                        "CreateReplica",
                        format!(
                            "creating replica {id} ({} {}): {}",
                            machine.name, machine.version, plan.summary
                        ),
                    )
                    .await;
                }
            }
            Step::Reconfigure { config, notify } => {
                ctx.metrics.action("reconfigure");
                // Fence first: the epoch is decided when the API server stores it.
                let won = status::write_persisted(
                    api,
                    current,
                    |s| status::with_config(s, config),
                    || {
                        ctx.metrics.status_conflicts.inc();
                    },
                )
                .await?;
                if !won {
                    publish(
                        ctx,
                        rsm,
                        EventType::Normal,
                        "StalePlan",
                        "Reconfigure",
                        format!(
                            "epoch {} was not recorded: the persisted configuration changed meanwhile; replanning",
                            config.epoch
                        ),
                    )
                    .await;
                    return Ok(false);
                }
                publish(
                    ctx,
                    rsm,
                    EventType::Normal,
                    "Reconfigured",
                    "Reconfigure",
                    format!(
                        "epoch {} recorded (primary {}, {} members): {}",
                        config.epoch,
                        config.primary,
                        config.members.len(),
                        plan.summary
                    ),
                )
                .await;
                push_config(
                    ctx,
                    rsm,
                    world,
                    config,
                    config
                        .members
                        .iter()
                        .map(|m| m.id.as_str())
                        .chain(notify.iter().map(String::as_str)),
                )
                .await;
            }
            Step::PushConfig { id } => {
                ctx.metrics.action("push_config");
                if let Some(config) = translate::persisted_config(current) {
                    push_config(ctx, rsm, world, &config, std::iter::once(id.as_str())).await;
                }
            }
            Step::DeleteReplica { id, reason } => {
                ctx.metrics.action("delete_replica");
                let failed = reason.starts_with("fail-stopped");
                if failed {
                    ctx.metrics.replacements.inc();
                }
                if delete_if_present::<Pod>(ctx, &ns, id).await? {
                    publish(
                        ctx,
                        rsm,
                        if failed { EventType::Warning } else { EventType::Normal },
                        if failed { "ReplacingReplica" } else { "RemovingReplica" },
                        "DeleteReplica",
                        format!("deleting {id}: {reason}"),
                    )
                    .await;
                }
                // Its volume holds nothing the configuration needs any more.
                let in_config = translate::persisted_config(current).is_some_and(|c| c.member(id).is_some());
                if !in_config {
                    delete_if_present::<PersistentVolumeClaim>(ctx, &ns, &names::pvc(id)).await?;
                }
            }
            Step::Seal => {
                ctx.metrics.action("seal");
                if let Some(addr) = primary_address(ctx, rsm, current, world) {
                    match ctx.admin.seal(addr).await {
                        Ok(index) => {
                            publish(
                                ctx,
                                rsm,
                                EventType::Normal,
                                "Sealing",
                                "Seal",
                                format!("seal barrier ordered at index {index}: {}", plan.summary),
                            )
                            .await
                        }
                        Err(e) => tracing::warn!(object = %key(rsm), error = %e, "seal failed; will retry"),
                    }
                }
            }
            Step::Stage { machine } => {
                ctx.metrics.action("stage");
                let Some(image) = machine.image.as_deref() else {
                    continue;
                };
                let Some(config) = translate::persisted_config(current) else {
                    continue;
                };
                let mut created = 0;
                for m in &config.members {
                    let node = world
                        .replicas
                        .iter()
                        .find(|o| o.pod.name_any() == m.id)
                        .and_then(|o| o.pod.spec.as_ref()?.node_name.clone());
                    if let Some(node) = node {
                        let pod = build::stage_pod(rsm, &m.id, &node, image)?;
                        if create_if_absent(ctx, &ns, &pod).await? {
                            created += 1;
                        }
                    }
                }
                if created > 0 {
                    publish(
                        ctx,
                        rsm,
                        EventType::Normal,
                        "Staging",
                        "Stage",
                        format!("pulling {image} on the nodes of {created} replica(s) before anything stops"),
                    )
                    .await;
                }
            }
            Step::RestartReplica { id, machine } => {
                ctx.metrics.action("restart_replica");
                let Some(obs) = world.replicas.iter().find(|o| o.pod.name_any() == *id) else {
                    continue;
                };
                let spec_image = obs
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.iter().find(|c| c.name == names::REPLICA_CONTAINER))
                    .and_then(|c| c.image.clone());
                let version = obs.pod.annotations().get(names::VERSION_ANNOTATION).cloned();
                if spec_image == machine.image && version.as_deref() == Some(machine.version.as_str()) {
                    continue; // already asked; waiting for the kubelet
                }
                let patch = build::restart_patch(&obs.pod, machine)?;
                Api::<Pod>::namespaced(ctx.client.clone(), &ns)
                    .patch(id, &PatchParams::default(), &Patch::Strategic(patch))
                    .await?;
                publish(
                    ctx,
                    rsm,
                    EventType::Normal,
                    "RestartingReplica",
                    "RestartReplica",
                    format!(
                        "restarting {id} with {} {} from the snapshot at the seal",
                        machine.name, machine.version
                    ),
                )
                .await;
            }
            Step::Resume { machine } => {
                ctx.metrics.action("resume");
                if let Some(addr) = primary_address(ctx, rsm, current, world) {
                    match ctx.admin.resume(addr).await {
                        Ok(index) => {
                            publish(
                                ctx,
                                rsm,
                                EventType::Normal,
                                "Resuming",
                                "Resume",
                                format!(
                                    "commands resume under {} {} at index {index}",
                                    machine.name, machine.version
                                ),
                            )
                            .await
                        }
                        Err(e) => tracing::warn!(object = %key(rsm), error = %e, "resume failed; will retry"),
                    }
                }
            }
            Step::SetRollout { rollout } => {
                ctx.metrics.action("set_rollout");
                let before = translate::persisted_rollout(current);
                let won = status::write_persisted(
                    api,
                    current,
                    |s| status::with_rollout(s, rollout.as_ref()),
                    || {
                        ctx.metrics.status_conflicts.inc();
                    },
                )
                .await?;
                if !won {
                    return Ok(false);
                }
                match (&before, rollout) {
                    (None, Some(r)) => {
                        ctx.metrics.rollouts_started.inc();
                        publish(
                            ctx,
                            rsm,
                            EventType::Normal,
                            "RolloutStarted",
                            "Rollout",
                            format!("lockstep rollout {} -> {}", r.from.version, r.to.version),
                        )
                        .await;
                    }
                    (Some(b), None) => {
                        ctx.metrics.rollouts_completed.inc();
                        publish(
                            ctx,
                            rsm,
                            EventType::Normal,
                            "RolloutFinished",
                            "Rollout",
                            format!("rollout to {} finished: {}", b.to.version, plan.summary),
                        )
                        .await;
                    }
                    (_, Some(r)) => {
                        publish(
                            ctx,
                            rsm,
                            EventType::Normal,
                            "RolloutPhase",
                            "Rollout",
                            format!("rollout to {}: {}", r.to.version, translate::phase_name(r.phase)),
                        )
                        .await;
                    }
                    (None, None) => {}
                }
                // Stage pods are done once the rollout leaves Staging.
                if rollout
                    .as_ref()
                    .is_none_or(|r| r.phase != planner::RolloutPhase::Staging)
                {
                    for p in &world.stage_pods {
                        delete_if_present::<Pod>(ctx, &ns, &p.name_any()).await?;
                    }
                }
            }
        }
    }
    let _ = cluster;
    Ok(true)
}

fn primary_address(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    current: &ReplicatedStateMachine,
    world: &World,
) -> Option<String> {
    let config = translate::persisted_config(current)?;
    address_of(ctx, rsm, world, &config.primary)
}

/// Pushes `config` to the given replicas. Failures are logged: a replica that missed it
/// reports the old epoch and the planner pushes again (PushConfig).
async fn push_config<'a>(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    world: &World,
    config: &Config,
    ids: impl Iterator<Item = &'a str>,
) {
    let calls = ids
        .filter_map(|id| address_of(ctx, rsm, world, id).map(|a| (id.to_string(), a)))
        .map(|(id, addr)| {
            let config = config.clone();
            async move { (id, ctx.admin.reconfigure(addr, config).await) }
        });
    for (id, result) in futures::future::join_all(calls).await {
        if let Err(e) = result {
            tracing::warn!(object = %key(rsm), replica = %id, error = %e, "reconfigure push failed; will retry");
        }
    }
}

/// Exponential backoff per object: 1s, 2s, 4s ... 5 minutes. One object's errors never
/// delay another's reconciliation.
pub fn error_policy(rsm: Arc<ReplicatedStateMachine>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.inc();
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key(&rsm)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = Duration::from_secs(1u64 << n.min(9)).min(Duration::from_secs(300));
    tracing::warn!(object = %key(&rsm), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn cached<K>(api: Api<K>, config: watcher::Config) -> (reflector::Store<K>, futures::stream::BoxStream<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .map(|_| ())
        .boxed();
    (store, stream)
}

/// Watch caches (one watch per kind, all namespaces; owned kinds filtered by
/// `app.kubernetes.io/managed-by=lockstep-operator`). Drive the returned stream to keep
/// them filled.
pub fn caches(client: &Client) -> (Source, impl futures::Stream<Item = ()> + Send + 'static) {
    let managed = watcher::Config::default().labels(&format!("{}={}", names::MANAGED_BY_LABEL, names::MANAGER));
    let (pods, s1) = cached(Api::<Pod>::all(client.clone()), managed.clone());
    let (pvcs, s2) = cached(Api::<PersistentVolumeClaim>::all(client.clone()), managed.clone());
    let (nodes, s3) = cached(Api::<Node>::all(client.clone()), watcher::Config::default());
    let (services, s4) = cached(Api::<Service>::all(client.clone()), managed.clone());
    let (config_maps, s5) = cached(Api::<ConfigMap>::all(client.clone()), managed.clone());
    let (pdbs, s6) = cached(Api::<PodDisruptionBudget>::all(client.clone()), managed);
    let drive = futures::stream::select_all([s1, s2, s3, s4, s5, s6]);
    (
        Source::Cache(observe::Caches {
            pods,
            pvcs,
            nodes,
            services,
            config_maps,
            pdbs,
        }),
        drive,
    )
}

/// Runs the controller until `shutdown` resolves (then finishes in-flight reconciles).
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let rsms = Api::<ReplicatedStateMachine>::all(client.clone());
    let owned = watcher::Config::default().labels(&format!("{}={}", names::MANAGED_BY_LABEL, names::MANAGER));
    Controller::new(rsms, watcher::Config::default().any_semantic())
        .owns(Api::<Pod>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}
