//! The reconcile loop, one named step each: validate -> observe -> decide (plan + guards,
//! pure) -> apply shared objects -> recover from disk -> execute the plan (`execute`) ->
//! update status -> events.
//!
//! Only `observe`, the apply steps, `execute` and `status::write` talk to the API server or
//! replicas; `translate`, `lockstep_planner::plan`, `guards`, `build` and `status::compute`
//! are pure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use lockstep_planner::{self as planner, Plan};
use lockstep_resource::{ReplicatedStateMachine, condition_types as ct};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::admin::ReplicaAdmin;
use crate::build::{self, BuildError};
use crate::events::{Recorder, publish};
use crate::execute::{Executor, Owned, delete_if_present};
use crate::guards::{self, FromDisk};
use crate::liveness::Liveness;
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
    #[error("TLS: {0}")]
    Tls(String),
    /// The RSM cannot go on until something outside the operator changes (cert-manager has
    /// not issued a Secret yet, or is not installed): said in its status, retried soon.
    #[error("{reason}: {message}")]
    Blocked { reason: &'static str, message: String },
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
    /// Where the operator's pods run, for the NetworkPolicy of every cluster; `None`: the
    /// operator manages no NetworkPolicies (`--network-policy=false`).
    pub network_policy: Option<build::OperatorPods>,
    /// Requeue interval when nothing is changing.
    pub steady_requeue: Duration,
    /// Requeue interval while converging.
    pub busy_requeue: Duration,
    /// Per pod uid: since when and last time its admin API failed.
    unreachable: Mutex<HashMap<String, (Timestamp, Timestamp)>>,
    failures: Mutex<HashMap<String, u32>>,
    applied: Mutex<HashMap<String, String>>,
    /// Connections held to replicas to notice a dead process at once (off in tests that
    /// have no replicas); its events trigger reconciles in [`run`].
    liveness: Option<Arc<Liveness>>,
    liveness_events: Mutex<Option<UnboundedReceiver<ObjectRef<ReplicatedStateMachine>>>>,
    /// Byzantine mode: the configuration master task of each resource (leader only).
    pub masters: crate::byzantine::master::Masters,
    /// Per RSM: its CA and the operator's admin identity (crate::tls).
    pub pki: crate::tls::PkiCache,
    /// After a CA rotation, how long certificates still come from the previous CA while the
    /// kubelet delivers the new trust bundle to every replica (crate::tls::rotate_ca).
    pub ca_trust_settle: Duration,
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
            network_policy: Some(build::OperatorPods::default()),
            steady_requeue: Duration::from_secs(60),
            busy_requeue: Duration::from_secs(2),
            unreachable: Mutex::default(),
            failures: Mutex::default(),
            applied: Mutex::default(),
            liveness: None,
            liveness_events: Mutex::default(),
            masters: Default::default(),
            pki: Default::default(),
            ca_trust_settle: crate::tls::CA_TRUST_SETTLE,
        }
    }

    /// Hold a connection to every running replica and reconcile as soon as one closes
    /// ([`crate::liveness`]).
    pub fn with_liveness(mut self) -> Self {
        let (liveness, events) = Liveness::new();
        self.liveness = Some(liveness);
        self.liveness_events = Mutex::new(Some(events));
        self
    }
}

pub(crate) fn key(rsm: &ReplicatedStateMachine) -> String {
    format!("{}/{}", rsm.namespace().unwrap_or_default(), rsm.name_any())
}

/// Server-side apply of an owned object, only when it is missing or its content changed.
/// The hash of the desired content travels on the object (`lockstep.dev/applied-hash`), so
/// with watch caches an unchanged object costs no API request, even after a restart, and a
/// deleted one is recreated. Without caches (tests) an in-process record is used.
async fn apply<K: Owned>(ctx: &Context, ns: &str, obj: &K, store: Option<&reflector::Store<K>>) -> Result<(), Error> {
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

/// One reconciliation of one object.
pub async fn reconcile(rsm: Arc<ReplicatedStateMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match reconcile_inner(&rsm, &ctx).await {
        Err(Error::Blocked { reason, message }) => blocked(&ctx, &rsm, reason, message).await,
        other => other,
    };
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

/// The RSM waits for something outside the operator ([`Error::Blocked`]): its conditions
/// say what (an event too, when they change), and it is looked at again in a few seconds.
async fn blocked(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    reason: &'static str,
    message: String,
) -> Result<Action, Error> {
    let ns = rsm.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ReplicatedStateMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let mut current = rsm.clone();
    let generation = rsm.meta().generation;
    let previous = rsm.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let mut s = rsm.status.clone().unwrap_or_default();
    s.observed_generation = generation;
    s.conditions = status::blocked_conditions(reason, &message, generation, &previous, Timestamp::now());
    match status::write(&api, &mut current, s).await {
        Ok(true) => {
            tracing::info!(object = %key(rsm), reason, "{message}");
            publish(ctx, rsm, EventType::Warning, reason, "Reconcile", message).await;
        }
        Ok(false) => {}
        // Stale view: the next reconcile sees the newer object.
        Err(WriteError::Conflict) => return Ok(Action::requeue(Duration::from_secs(1))),
        Err(e) => return Err(e.into()),
    }
    let again = if reason == crate::cert_manager::REASON_WAITING {
        2
    } else {
        15
    };
    Ok(Action::requeue(Duration::from_secs(again)))
}

/// What one reconcile decided: the planner's plan with the operator's guards applied.
struct Decision {
    desired: planner::Desired,
    observed: planner::Observed,
    world: World,
    plan: Plan,
    /// Replicas held by the crash-loop guard (id, why).
    crashed: Vec<(String, String)>,
    from_disk: FromDisk,
}

async fn reconcile_inner(rsm: &ReplicatedStateMachine, ctx: &Context) -> Result<Action, Error> {
    let ns = rsm.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ReplicatedStateMachine> = Api::namespaced(ctx.client.clone(), &ns);
    if rsm.meta().deletion_timestamp.is_some() {
        // Its pods go with it (owner references; first, under foreground deletion). Replacing
        // them as fail-stopped, or restarting one from disk, would fight the deletion and
        // leave claims behind that a retained-volume RSM never had.
        tracing::debug!(object = %key(rsm), "being deleted: nothing to reconcile");
        return Ok(Action::await_change());
    }
    let mut current = rsm.clone();
    let now = Timestamp::now();
    let desired = match validate(ctx, rsm, &api, &mut current, now).await? {
        Ok(desired) => desired,
        Err(blocked) => return Ok(blocked),
    };
    let pki = if desired.paused {
        crate::tls::existing(ctx, rsm, &ns).await
    } else {
        crate::tls::ensure(ctx, rsm, &ns).await.map(Some)
    };
    let pki = match pki {
        // An unusable CA Secret: say so where the user looks (the RSM's events), not only
        // in the operator's log; no pod is made without a CA.
        Err(Error::Tls(msg)) => {
            publish(ctx, rsm, EventType::Warning, "TLSUnavailable", "Reconcile", msg.clone()).await;
            return Err(Error::Tls(msg));
        }
        other => other?,
    };
    // What replica pods waited for belongs to the reconcile that noted it.
    if let Some(pki) = &pki {
        pki.take_waiting();
    }
    let world = observe_world(ctx, rsm, pki.as_deref(), now).await?;
    if !desired.paused
        && let Some(action) = crate::adopt::step(ctx, rsm, &api, &mut current, &world).await?
    {
        return Ok(action);
    }
    let decision = decide(ctx, rsm, desired, world);
    if !decision.desired.paused {
        apply_shared_objects(ctx, rsm, &ns, decision.observed.config.as_ref()).await?;
    }
    recover_from_disk(ctx, rsm, &ns, &decision.world, &decision.from_disk).await?;
    if crate::byzantine::is_byzantine(rsm) && !decision.desired.paused {
        let transport = crate::tls::master_transport(ctx, rsm, &ns, &decision.world).await?;
        crate::byzantine::prepare(ctx, rsm, &ns, &current, &decision.plan, transport).await?;
    }
    let executor = Executor {
        ctx,
        rsm,
        api: &api,
        ns: ns.clone(),
        world: &decision.world,
        plan: &decision.plan,
    };
    if !executor.run(&mut current).await? {
        ctx.metrics.status_conflicts.inc();
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let waiting = pki.as_deref().map(crate::tls::Pki::take_waiting).unwrap_or_default();
    if !update_status(ctx, rsm, &api, &mut current, &decision, &waiting, now).await? {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    outcome_events(ctx, rsm, &decision).await;
    // Certificates past 2/3 of their life are issued again while the replicas run; the
    // requeue comes back no later than when the next one is due.
    let renew = match &pki {
        Some(pki) if !decision.desired.paused => crate::tls::renew(ctx, rsm, &ns, &decision.world, pki).await?,
        _ => None,
    };
    Ok(requeue(ctx, &decision, renew, Timestamp::now()))
}

/// Step 1: admission should have rejected an invalid object; if it got in anyway (an older
/// CRD, validation bypassed) report it on this object only and leave it alone. Returns the
/// desired state, or the requeue of a blocked object.
async fn validate(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    api: &Api<ReplicatedStateMachine>,
    current: &mut ReplicatedStateMachine,
    now: Timestamp,
) -> Result<Result<planner::Desired, Action>, Error> {
    let desired = translate::desired(rsm, ctx.default_image.as_deref());
    let (reason, msg) = match rsm.validate() {
        Err(errors) => ("InvalidSpec", errors.to_string()),
        Ok(()) if desired.machine.image.is_none() => ("NoImage", BuildError::NoImage.to_string()),
        Ok(()) => match missing_secret(ctx, rsm).await? {
            Some(msg) => ("MissingSecret", msg),
            None => return Ok(Ok(desired)),
        },
    };
    let generation = rsm.meta().generation;
    let previous = rsm.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let mut s = rsm.status.clone().unwrap_or_default();
    s.observed_generation = generation;
    s.conditions = status::blocked_conditions(reason, &msg, generation, &previous, now);
    if status::write(api, current, s).await? {
        publish(ctx, rsm, EventType::Warning, reason, "Validate", msg).await;
    }
    Ok(Err(Action::requeue(Duration::from_secs(600))))
}

/// The Secret named by `spec.clientIdentities`, when it does not exist: replica pods that
/// mount it would hang in ContainerCreating, so none are created until it does.
async fn missing_secret(ctx: &Context, rsm: &ReplicatedStateMachine) -> Result<Option<String>, Error> {
    let (Some(ids), Some(ns)) = (&rsm.spec.client_identities, rsm.namespace()) else {
        return Ok(None);
    };
    let name = &ids.secret_ref.name;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    match secrets.get_metadata_opt(name).await? {
        Some(_) => Ok(None),
        None => Ok(Some(format!(
            "Secret {name} in namespace {ns} (spec.clientIdentities.secretRef) does not exist: replica pods \
             mount it and cannot start without it, so none are created. Create it with the public key of \
             each client under its name, e.g. `kubectl -n {ns} create secret generic {name} \
             --from-literal=alice=$(lockstep keygen alice.key)`"
        ))),
    }
}

/// Step 2: pods, claims, nodes and every replica's Admin.Status.
async fn observe_world(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    pki: Option<&crate::tls::Pki>,
    now: Timestamp,
) -> Result<World, Error> {
    Ok(observe::world(
        &ctx.client,
        &ctx.source,
        ctx.admin.as_ref(),
        ctx.admin_address,
        pki,
        &ctx.unreachable,
        ctx.liveness.as_deref(),
        rsm,
        &ctx.tuning,
        now,
    )
    .await?)
}

/// Step 3 (pure): the planner's verdict, shared with `lockstep up`, plus the operator's
/// guards (crash-loop hold, restart from disk).
fn decide(ctx: &Context, rsm: &ReplicatedStateMachine, desired: planner::Desired, world: World) -> Decision {
    let observed = translate::observed(rsm, &world, &ctx.tuning);
    let mut plan = planner::plan(&rsm.name_any(), &desired, &observed);
    let crashed = guards::hold_startup_failures(&mut plan, &world, &observed, &desired);
    let from_disk = guards::from_disk(&mut plan, &world, &observed, &desired, &ctx.tuning);
    Decision {
        desired,
        observed,
        world,
        plan,
        crashed,
        from_disk,
    }
}

/// Step 4: the Services, PDB, ConfigMap and NetworkPolicy every cluster has (skipped while
/// paused).
async fn apply_shared_objects(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    config: Option<&planner::Config>,
) -> Result<(), Error> {
    let caches = match &ctx.source {
        Source::Cache(c) => Some(c),
        Source::Api => None,
    };
    apply(ctx, ns, &build::peers_service(rsm)?, caches.map(|c| &c.services)).await?;
    apply(ctx, ns, &build::client_service(rsm)?, caches.map(|c| &c.services)).await?;
    apply(ctx, ns, &build::pdb(rsm)?, caches.map(|c| &c.pdbs)).await?;
    apply(
        ctx,
        ns,
        &build::config_map(rsm, config)?,
        caches.map(|c| &c.config_maps),
    )
    .await?;
    if let Some(operator) = &ctx.network_policy {
        apply(
            ctx,
            ns,
            &build::network_policy(rsm, operator)?,
            caches.map(|c| &c.network_policies),
        )
        .await?;
    }
    Ok(())
}

/// Step 5: the guard's restart from disk (stopped pods deleted, gone ones recreated on their
/// own volumes).
async fn recover_from_disk(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    world: &World,
    from_disk: &FromDisk,
) -> Result<(), Error> {
    for (id, quick) in &from_disk.restart {
        // The count first: it must survive the pod (the backoff of the next quick death).
        if world.disk_restarts.get(id).copied().unwrap_or(0) != *quick {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
            let patch =
                serde_json::json!({"metadata": {"annotations": {names::DISK_RESTARTS_ANNOTATION: quick.to_string()}}});
            claims
                .patch(&names::pvc(id), &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        if delete_if_present::<Pod>(ctx, ns, id).await? {
            let note = format!(
                "every voter has stopped; restarting {id} from its volume {} (its pod is recreated with the same identity)",
                names::pvc(id)
            );
            publish(
                ctx,
                rsm,
                EventType::Warning,
                "RestartingFromDisk",
                "DeleteReplica",
                note,
            )
            .await;
        }
    }
    for (id, machine) in &from_disk.revive {
        if crate::tls::create_replica_pod(ctx, rsm, ns, id, machine, world).await? {
            let note = format!(
                "every voter is gone; recreating {id} on its existing volume {}",
                names::pvc(id)
            );
            publish(
                ctx,
                rsm,
                EventType::Warning,
                "RecreatingFromDisk",
                "CreateReplica",
                note,
            )
            .await;
        }
    }
    Ok(())
}

/// Step 7: status from what is persisted now plus what was observed. False when the write
/// conflicted (requeue soon).
async fn update_status(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    api: &Api<ReplicatedStateMachine>,
    current: &mut ReplicatedStateMachine,
    d: &Decision,
    waiting: &[String],
    now: Timestamp,
) -> Result<bool, Error> {
    let (config, rollout) = status::persisted(current);
    let mut s = status::compute(
        current,
        config.as_ref(),
        rollout.as_ref(),
        &d.plan,
        &d.world,
        &d.observed,
        now,
    );
    // Conditions relative to what this reconcile started from.
    let previous = rsm.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let plan = status::gate_on_pod_readiness(&d.plan, config.as_ref(), &d.world);
    s.conditions = status::conditions(&plan, rsm.meta().generation, previous, now);
    status::waiting_for_certificates(&mut s.conditions, waiting);
    s.byzantine = crate::byzantine::publish(ctx, rsm);
    ctx.metrics
        .rsm
        .record(&rsm.namespace().unwrap_or_default(), &rsm.name_any(), &s);
    match status::write(api, current, s).await {
        Ok(_) => Ok(true),
        Err(WriteError::Conflict) => {
            ctx.metrics.status_conflicts.inc();
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Step 8: events for what changed without an action (pause, holds, waiting).
async fn outcome_events(ctx: &Context, rsm: &ReplicatedStateMachine, d: &Decision) {
    let previous = rsm.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let was = |type_: &str| previous.iter().any(|c| c.type_ == type_ && c.status == "True");
    if d.desired.paused != was(ct::PAUSED) {
        let (reason, note) = if d.desired.paused {
            ("Paused", "reconciliation paused by annotation: observing only")
        } else {
            ("Resumed", "reconciliation resumed")
        };
        publish(ctx, rsm, EventType::Normal, reason, "Pause", note.into()).await;
    }
    let summary = d.plan.summary.clone();
    if !d.crashed.is_empty() {
        publish(ctx, rsm, EventType::Warning, "ReplicaStartupFailure", "Hold", summary).await;
    } else if d.plan.conditions.degraded.is_some() && d.plan.actions.is_empty() && !was(ct::DEGRADED) {
        publish(ctx, rsm, EventType::Warning, "Degraded", "Wait", summary).await;
    }
}

/// Converging objects are looked at again soon; steady (or held) ones at the resync period,
/// and none later than when its next certificate is due again (`renew`).
fn requeue(ctx: &Context, d: &Decision, renew: Option<Timestamp>, now: Timestamp) -> Action {
    let busy = !d.plan.actions.is_empty() || !d.from_disk.is_empty() || d.plan.conditions.progressing.is_some();
    let delay = if busy && d.crashed.is_empty() {
        ctx.busy_requeue
    } else {
        ctx.steady_requeue
    };
    Action::requeue(renew.map_or(delay, |due| delay.min(until(due, now))))
}

/// How long from `now` to `due` (at least a second: a due certificate is issued in the
/// reconcile, so `due` is in the future unless the clock jumped).
fn until(due: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(due.duration_since(now))
        .unwrap_or_default()
        .max(Duration::from_secs(1))
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
    let (pdbs, s6) = cached(Api::<PodDisruptionBudget>::all(client.clone()), managed.clone());
    let (network_policies, s7) = cached(Api::<NetworkPolicy>::all(client.clone()), managed);
    let drive = futures::stream::select_all([s1, s2, s3, s4, s5, s6, s7]);
    (
        Source::Cache(observe::Caches {
            pods,
            pvcs,
            nodes,
            services,
            config_maps,
            pdbs,
            network_policies,
        }),
        drive,
    )
}

/// Runs the controller until `shutdown` resolves (then finishes in-flight reconciles).
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let masters = ctx.clone();
    let rsms = Api::<ReplicatedStateMachine>::all(client.clone());
    let owned = watcher::Config::default().labels(&format!("{}={}", names::MANAGED_BY_LABEL, names::MANAGER));
    let mut controller = Controller::new(rsms, watcher::Config::default().any_semantic())
        .owns(Api::<Pod>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned.clone())
        .owns(Api::<NetworkPolicy>::all(client.clone()), owned);
    let pruner = tokio::spawn(prune_rsm_gauges(ctx.clone(), controller.store()));
    let events = ctx.liveness_events.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(events) = events {
        controller = controller.reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(events));
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    // Not the leader any more (or stopping): no master stream may go on from here.
    masters.masters.stop_all();
    pruner.abort();
}

/// Drop the per-RSM gauges and evidence of deleted RSMs (a deleted RSM is never reconciled again).
async fn prune_rsm_gauges(ctx: Arc<Context>, rsms: reflector::Store<ReplicatedStateMachine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let exists = |ns: &str, name: &str| rsms.get(&ObjectRef::new(name).within(ns)).is_some();
        ctx.metrics.rsm.retain(exists);
        ctx.metrics.byzantine_evidence.retain(exists);
    }
}
