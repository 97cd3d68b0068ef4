//! `lockstep up FILE`: a local cluster, with this process as the configuration master.
//!
//! It reads a `ReplicatedStateMachine`, runs its replicas as child processes on loopback, and
//! loops: observe (process exits, admin `Status` over gRPC) -> `lockstep_planner::plan` ->
//! carry out the actions. It is the local backend of the same planner the operator uses.
//! The configuration it decides is persisted in `<data-dir>/<name>/cluster.json` before any
//! replica hears of it, so a restarted `up` continues from it.

use crate::cluster::{MasterState, cluster_dir, load_state, save_state};
use anyhow::{Context, bail};
use lockstep_planner::{Action, Desired, FailureModel, Health, MachineRef, Observed, ObservedReplica, Plan, Role};
use lockstep_proto::admin_client::AdminClient;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub file: PathBuf,
    pub data_dir: PathBuf,
    /// A replica that does not answer for this long is declared fail-stopped.
    pub failure_timeout: Duration,
    /// How long a fenced replica that is still alive (paused, partitioned) is left running
    /// (refusing everything) before it is killed.
    pub fenced_grace: Duration,
    pub no_fsync: bool,
    /// Print a status table on every change.
    pub quiet: bool,
    /// Byzantine mode, test builds only: replica id (or `replica-N`) -> injected behaviour.
    pub inject: BTreeMap<String, String>,
    /// Byzantine mode: remove a client stream that has not moved for this long.
    pub client_timeout: Duration,
    /// Run the replicas without TLS (plaintext, anyone may call anything).
    pub insecure: bool,
    /// How long the certificates it issues are valid (renewed with a third left).
    pub tls_lifetimes: crate::pki::Lifetimes,
}

struct LocalReplica {
    id: String,
    child: Child,
    dir: PathBuf,
    started: Instant,
    endpoint: Option<String>,
    exited: Option<String>,
    last_ok: Option<Instant>,
    status: Option<lockstep_proto::StatusResponse>,
}

struct Retiring {
    id: String,
    child: Child,
    kill_at: Instant,
}

const START_GRACE: Duration = Duration::from_secs(15);
const TICK: Duration = Duration::from_millis(50);
/// How often `up` looks for certificates to issue again.
const RENEWAL_CHECK: Duration = Duration::from_secs(1);

/// Read and check the resource for a local run.
pub fn load_desired(file: &Path) -> anyhow::Result<(String, Desired)> {
    load_resource(file).map(|(n, d, _)| (n, d))
}

/// The resource's name, what the planner needs, and (Byzantine) its ordering parameters.
pub fn load_resource(file: &Path) -> anyhow::Result<(String, Desired, crate::up_byz::Ordering)> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let rsm =
        lockstep_resource::from_yaml(&text).with_context(|| format!("{} is not a valid resource", file.display()))?;
    let name = rsm.metadata.name.clone().context("metadata.name is required")?;
    let spec = &rsm.spec;
    let model = match spec.failure_model {
        lockstep_resource::FailureModel::FailStop => FailureModel::FailStop,
        lockstep_resource::FailureModel::Byzantine => FailureModel::Byzantine,
    };
    let Some(factory) = lockstep_replica::machine::builtin(&spec.machine.name) else {
        bail!(
            "{}: machine '{}' is not built in (built-in: {}); run your own replica binary on Kubernetes instead",
            file.display(),
            spec.machine.name,
            lockstep_replica::machine::BUILTIN_NAMES.join(", ")
        );
    };
    let builtin = factory().identity();
    if builtin.version != spec.machine.version {
        bail!(
            "{}: machine {} version {} is not available locally; the built-in {} is version {}",
            file.display(),
            spec.machine.name,
            spec.machine.version,
            builtin.name,
            builtin.version
        );
    }
    let desired = Desired {
        faults_tolerated: u32::try_from(spec.faults_tolerated).context("faultsTolerated must not be negative")?,
        failure_model: model,
        machine: MachineRef {
            name: spec.machine.name.clone(),
            version: spec.machine.version.clone(),
            image: None,
        },
        paused: false,
    };
    let o = spec.ordering.clone().unwrap_or(lockstep_resource::OrderingSpec {
        stability: None,
        max_clock_skew_millis: None,
        max_delay_millis: None,
    });
    let ordering = crate::up_byz::Ordering {
        stability: match o.stability {
            Some(lockstep_resource::Stability::PhysicalClock) => "PhysicalClock".into(),
            _ => "LamportClock".into(),
        },
        max_delay_millis: o
            .max_delay_millis
            .map_or(lockstep_replica::byz::DEFAULT_MAX_DELAY_MILLIS, |v| v.max(1) as u64),
        max_clock_skew_millis: o.max_clock_skew_millis.map_or(0, |v| v.max(0) as u64),
    };
    Ok((name, desired, ordering))
}

struct Master {
    name: String,
    dir: PathBuf,
    desired: Desired,
    opts: UpOptions,
    state: MasterState,
    replicas: BTreeMap<String, LocalReplica>,
    retiring: Vec<Retiring>,
    began: Instant,
    last_summary: String,
    last_table: String,
    /// The errors of the last tick's actions (each is printed when it first appears).
    last_errors: Vec<String>,
    byz: Option<crate::up_byz::ByzMaster>,
    /// The cluster's certificates (None: `--insecure`).
    pki: Option<crate::pki::LocalPki>,
    /// How this master calls the replicas: its admin certificate, or plaintext.
    transport: crate::Transport,
    /// One channel per replica endpoint for the status probes (a TLS handshake per probe,
    /// every 50 ms per replica, would be a waste).
    probe_channels: BTreeMap<String, tonic::transport::Channel>,
    _lock: std::fs::File,
}

pub async fn up(opts: UpOptions) -> anyhow::Result<()> {
    let (name, desired, ordering) = load_resource(&opts.file)?;
    let dir = cluster_dir(&opts.data_dir, &name);
    let lock = lock_cluster_dir(&dir, &name)?;
    let mut state = master_state(&dir, &name, &desired, &opts.file)?;
    let pki = if opts.insecure {
        None
    } else {
        Some(
            crate::pki::LocalPki::open_with(&dir, &name, opts.tls_lifetimes)
                .context("cannot make the cluster's TLS certificates")?,
        )
    };
    let transport = match &pki {
        Some(p) => p.admin.transport()?,
        None => crate::Transport::plaintext(),
    };
    // The CLI reads the mode from here (`-c NAME`).
    state.insecure = opts.insecure;
    save_state(&dir, &state)?;
    let byz = byz_master(&dir, &name, &desired, ordering, &opts, &transport)?;
    let mut m = Master {
        byz,
        pki,
        transport,
        probe_channels: BTreeMap::new(),
        name,
        dir,
        desired,
        opts,
        state,
        replicas: BTreeMap::new(),
        retiring: Vec::new(),
        began: Instant::now(),
        last_summary: String::new(),
        last_table: String::new(),
        last_errors: Vec::new(),
        _lock: lock,
    };
    m.announce();
    m.restart_members()?;
    let result = m.run().await;
    m.shutdown().await;
    result
}

/// Create the cluster's directories and take its lock: one `lockstep up` per cluster.
fn lock_cluster_dir(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir.join("replicas")).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("up.lock"))?;
    if lock.try_lock().is_err() {
        bail!(
            "cluster '{name}' is already running from {} (another `lockstep up` holds it)",
            dir.display()
        );
    }
    Ok(lock)
}

/// The master's persisted state with the resource's t, or a new one; refuses a data directory
/// that holds another machine.
fn master_state(dir: &Path, name: &str, desired: &Desired, file: &Path) -> anyhow::Result<MasterState> {
    Ok(match load_state(dir)? {
        Some(mut s) => {
            if s.machine.name != desired.machine.name {
                bail!(
                    "{} holds cluster '{name}' running machine '{}', but {} asks for '{}'; use another --data-dir",
                    dir.display(),
                    s.machine.name,
                    file.display(),
                    desired.machine.name
                );
            }
            s.faults_tolerated = desired.faults_tolerated;
            s
        }
        None => MasterState {
            name: name.to_string(),
            machine: desired.machine.clone(),
            faults_tolerated: desired.faults_tolerated,
            config: None,
            rollout: None,
            next_ordinal: 0,
            insecure: false,
        },
    })
}

/// The Byzantine configuration master (its ticker started), for a Byzantine resource.
fn byz_master(
    dir: &Path,
    name: &str,
    desired: &Desired,
    ordering: crate::up_byz::Ordering,
    opts: &UpOptions,
    transport: &crate::Transport,
) -> anyhow::Result<Option<crate::up_byz::ByzMaster>> {
    if desired.failure_model != FailureModel::Byzantine {
        if !opts.inject.is_empty() {
            bail!("--inject applies to Byzantine clusters only");
        }
        return Ok(None);
    }
    if !opts.inject.is_empty() && !lockstep_replica::byz::inject::AVAILABLE {
        bail!("--inject needs a build with the cargo feature `fault-injection` (test builds only)");
    }
    let machine = lockstep_replica::machine::builtin(&desired.machine.name)
        .map(|f| f().identity())
        .context("built-in machine")?;
    let mut b = crate::up_byz::ByzMaster::open(dir, name, desired.faults_tolerated as usize, ordering, machine)?;
    b.set_transport(transport.clone());
    b.client_timeout = opts.client_timeout;
    b.spawn_ticker();
    Ok(Some(b))
}

impl Master {
    /// What runs where, and how it is secured.
    fn announce(&self) {
        self.say(&format!(
            "lockstep up: cluster '{}', machine {} {}, t = {} ({:?}: {} replicas), data in {}",
            self.name,
            self.desired.machine.name,
            self.desired.machine.version,
            self.desired.faults_tolerated,
            self.desired.failure_model,
            self.desired.replicas(),
            self.dir.display()
        ));
        match &self.pki {
            Some(p) => self.say(&format!(
                "mutual TLS on every replica port; certificates in {} (the CLI finds them with -c {})",
                p.dir.display(),
                self.name
            )),
            None => self.say("WARNING: --insecure: the replicas speak plaintext gRPC and accept every caller"),
        }
    }

    /// Restart: bring back every member of the persisted configuration from its data dir.
    fn restart_members(&mut self) -> anyhow::Result<()> {
        let Some(config) = self.state.config.clone() else {
            return Ok(());
        };
        self.say(&format!(
            "restarting from {}: epoch {}, members {}",
            crate::cluster::STATE_FILE,
            config.epoch,
            config
                .members
                .iter()
                .map(|x| x.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for member in &config.members {
            self.spawn(&member.id, false)?;
        }
        if self.byz.as_ref().is_some_and(|b| b.era_number() >= config.epoch) {
            // Byzantine: the restarted replicas wait for an era, and the recorded one cannot
            // go on (its streams and relays are gone): the next era starts where t + 1 of them
            // rebuild the same state (`up_byz::recovery_state`).
            let mut next = config;
            next.epoch += 1;
            self.persist_config(next)?;
        }
        Ok(())
    }

    fn say(&self, line: &str) {
        let t = self.began.elapsed();
        println!("[{:>4}.{:03}s] {line}", t.as_secs(), t.subsec_millis());
    }

    fn spawn(&mut self, id: &str, fresh: bool) -> anyhow::Result<()> {
        let dir = self.dir.join("replicas").join(id);
        if fresh && dir.exists() {
            // A new replica starts empty: it gets its state by state transfer.
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let _ = std::fs::remove_file(dir.join(lockstep_replica::LISTENING_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{id}.log")))?;
        let (exe, mut cmd) = replica_program()?;
        self.add_replica_args(&mut cmd, id, &dir)?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        stop_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start replica {id} ({})", exe.display()))?;
        self.say(&format!("started replica {id} (pid {})", child.id().unwrap_or(0)));
        self.replicas.insert(
            id.to_string(),
            LocalReplica {
                id: id.to_string(),
                child,
                dir,
                started: Instant::now(),
                endpoint: None,
                exited: None,
                last_ok: None,
                status: None,
            },
        );
        Ok(())
    }

    /// Replica `id`'s flags: its data in `dir`, the machine, fsync, its transport (its
    /// certificate, or plaintext) and, Byzantine, the era and any fault to inject.
    fn add_replica_args(&mut self, cmd: &mut Command, id: &str, dir: &Path) -> anyhow::Result<()> {
        cmd.arg("--id")
            .arg(id)
            .arg("--data-dir")
            .arg(dir)
            .arg("--machine")
            .arg(&self.desired.machine.name);
        if self.opts.no_fsync {
            cmd.arg("--no-fsync");
        }
        // The transport is this master's decision, never an inherited environment's.
        for var in [
            "LOCKSTEP_INSECURE",
            "LOCKSTEP_TLS_CA",
            "LOCKSTEP_TLS_CERT",
            "LOCKSTEP_TLS_KEY",
        ] {
            cmd.env_remove(var);
        }
        match self.pki.as_mut() {
            Some(p) => {
                cmd.args(p.replica(id)?.args());
            }
            None => {
                cmd.arg("--insecure");
            }
        }
        if let Some(b) = &self.byz {
            cmd.args(b.replica_args());
            if let Some(behaviour) = self.injected(id) {
                cmd.arg("--inject").arg(behaviour);
                self.say(&format!("  {id} will be FAULTY on purpose: {behaviour}"));
            }
        }
        Ok(())
    }

    /// The fault `--inject` asks of replica `id`, by its id or as `replica-N`.
    fn injected(&self, id: &str) -> Option<&String> {
        let ordinal = lockstep_planner::ordinal_of(id).map(|n| format!("replica-{n}"));
        self.opts
            .inject
            .get(id)
            .or_else(|| ordinal.and_then(|o| self.opts.inject.get(&o)))
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        // Listen once for the whole run: a signal that arrives while a tick is being carried
        // out is kept until the next select.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        // A replica that exits (kill -9, a crash) is noticed at once, not at the next tick:
        // the tick (50 ms) was most of the fail-over time on a loaded machine.
        let mut child_exited = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = int.recv() => { self.say("interrupted: stopping the cluster"); return Ok(()); }
                _ = term.recv() => { self.say("terminated: stopping the cluster"); return Ok(()); }
                _ = interval.tick() => {}
                _ = child_exited.recv() => {}
            }
            if Instant::now() >= next_renewal {
                next_renewal = Instant::now() + RENEWAL_CHECK;
                self.renew_certificates();
            }
            let observed = self.observe().await;
            if let Some(b) = self.byz.as_mut() {
                let statuses: BTreeMap<String, lockstep_proto::StatusResponse> = self
                    .replicas
                    .iter()
                    .filter_map(|(id, r)| r.status.clone().map(|s| (id.clone(), s)))
                    .collect();
                b.learn_keys(&statuses);
                b.on_statuses(&statuses);
            }
            let plan = lockstep_planner::plan(&self.name, &self.desired, &observed);
            self.report(&plan, &observed);
            let acting = Instant::now();
            let mut errors = Vec::new();
            for action in plan.actions {
                if let Err(e) = self.execute(action).await {
                    errors.push(format!("error: {e:#}"));
                }
            }
            // An action retried every tick (an era change waiting for its replicas) says so
            // once, not 20 times a second.
            for e in errors.iter().filter(|e| !self.last_errors.contains(*e)) {
                self.say(e);
            }
            self.last_errors = errors;
            // Time spent acting (a Byzantine era change waits for a barrier) is time nobody
            // was observed: it must not count as the replicas' silence.
            let took = acting.elapsed();
            if took > TICK * 4 {
                for r in self.replicas.values_mut() {
                    if let Some(t) = r.last_ok.as_mut() {
                        *t += took;
                    }
                }
            }
            self.reap_retiring();
        }
    }

    /// Issue again the certificates that are due (the replicas, `up` and the CLI re-read
    /// their files); a failure is logged and tried again a second later.
    fn renew_certificates(&mut self) {
        let Some(pki) = self.pki.as_mut() else { return };
        let live: Vec<&str> = self
            .replicas
            .values()
            .filter(|r| r.exited.is_none())
            .map(|r| r.id.as_str())
            .collect();
        match pki.renew(&live) {
            Ok(done) if done.is_empty() => {}
            Ok(done) => self.say(&format!("TLS: issued again: {}", done.join(", "))),
            Err(e) => self.say(&format!("error: TLS renewal failed (trying again): {e:#}")),
        }
    }

    async fn observe(&mut self) -> Observed {
        let now = Instant::now();
        self.notice_exits_and_endpoints();
        self.probe_statuses(now).await;
        let mut replicas: Vec<ObservedReplica> = self.replicas.values().map(|r| self.observed(r, now)).collect();
        // Fenced replicas still alive keep their ordinal until they are gone.
        for r in &self.retiring {
            replicas.push(ObservedReplica {
                id: r.id.clone(),
                endpoint: String::new(),
                machine: self.desired.machine.clone(),
                health: Health::Failed {
                    reason: "fenced, waiting to stop".into(),
                },
                status: None,
            });
        }
        Observed {
            config: self.state.config.clone(),
            replicas,
            rollout: self.state.rollout.clone(),
            staged: true,
            next_ordinal: self.state.next_ordinal,
            volumes: self.data_dirs(),
        }
    }

    /// Process exits, and the addresses replicas listen on (from the file each writes).
    fn notice_exits_and_endpoints(&mut self) {
        for r in self.replicas.values_mut() {
            if r.exited.is_none()
                && let Ok(Some(status)) = r.child.try_wait()
            {
                r.exited = Some(format!("process exited: {status}"));
            }
            if r.endpoint.is_none()
                && let Ok(bytes) = std::fs::read(r.dir.join(lockstep_replica::LISTENING_FILE))
                && let Ok(l) = serde_json::from_slice::<lockstep_replica::Listening>(&bytes)
                && Some(l.pid) == r.child.id()
            {
                r.endpoint = Some(format!("http://{}", l.grpc));
            }
        }
    }

    /// Admin `Status` of every live replica that listens, all at once; an answer counts as
    /// heard from at `now`.
    async fn probe_statuses(&mut self, now: Instant) {
        let live: Vec<(String, String)> = self
            .replicas
            .values()
            .filter(|r| r.exited.is_none())
            .filter_map(|r| r.endpoint.clone().map(|e| (r.id.clone(), e)))
            .collect();
        self.probe_channels.retain(|e, _| live.iter().any(|(_, l)| l == e));
        let mut probes = Vec::new();
        for (id, e) in live {
            let ch = match self.probe_channels.get(&e) {
                Some(ch) => Ok(ch.clone()),
                None => crate::cluster_channel(&self.transport, &e).inspect(|ch| {
                    self.probe_channels.insert(e.clone(), ch.clone());
                }),
            };
            probes.push(async move {
                let status = match ch {
                    Ok(ch) => crate::status_on(ch, Duration::from_millis(300)).await,
                    Err(err) => Err(err.to_string()),
                };
                (id, status)
            });
        }
        for (id, result) in futures::future::join_all(probes).await {
            if let Some(r) = self.replicas.get_mut(&id) {
                match result {
                    Ok(s) => {
                        r.last_ok = Some(now);
                        r.status = Some(s);
                    }
                    Err(_) => r.status = None,
                }
            }
        }
    }

    /// What the planner sees of replica `r` at `now`.
    fn observed(&self, r: &LocalReplica, now: Instant) -> ObservedReplica {
        let health = self.health(r, now);
        let machine = r
            .status
            .as_ref()
            .and_then(|s| s.machine.as_ref())
            .map(|mi| MachineRef {
                name: mi.name.clone(),
                version: mi.version.clone(),
                image: None,
            })
            .unwrap_or_else(|| self.desired.machine.clone());
        ObservedReplica {
            id: r.id.clone(),
            endpoint: r.endpoint.clone().unwrap_or_default(),
            machine,
            status: if health == Health::Running {
                r.status.as_ref().map(lockstep_planner::wire::replica_status)
            } else {
                None
            },
            health,
        }
    }

    /// Failed once its process exits, it does not answer within `START_GRACE` of starting, or
    /// it has not answered for `--failure-timeout`.
    fn health(&self, r: &LocalReplica, now: Instant) -> Health {
        if let Some(why) = &r.exited {
            return Health::Failed { reason: why.clone() };
        }
        match r.last_ok {
            None if r.started.elapsed() > START_GRACE => Health::Failed {
                reason: format!("did not answer within {START_GRACE:?} of starting"),
            },
            None => Health::Starting,
            Some(t) if now.duration_since(t) > self.opts.failure_timeout => Health::Failed {
                reason: format!("unreachable for {} ms", now.duration_since(t).as_millis()),
            },
            Some(_) => Health::Running,
        }
    }

    /// Replicas with a data directory (their "volume"), live or not.
    fn data_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("replicas"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn report(&mut self, plan: &Plan, observed: &Observed) {
        if plan.summary != self.last_summary && !plan.summary.starts_with("cleaning up") {
            self.say(&plan.summary);
            if let Some(d) = &plan.conditions.degraded
                && !plan.summary.contains(d.as_str())
            {
                self.say(&format!("  Degraded: {d}"));
            }
            self.last_summary = plan.summary.clone();
        }
        if self.opts.quiet {
            return;
        }
        let table = self.table(plan, observed);
        if table != self.last_table {
            println!("{table}");
            self.last_table = table;
        }
    }

    fn table(&self, plan: &Plan, observed: &Observed) -> String {
        let Some(config) = &observed.config else {
            return String::new();
        };
        let mut out = format!(
            "  {} epoch {} primary {} | Ready={} Available={}{}\n  {:<10} {:<8} {:<13} {:>8}  {}",
            self.name,
            config.epoch,
            config.primary,
            plan.conditions.ready,
            plan.conditions.available,
            plan.conditions
                .degraded
                .as_ref()
                .map_or(String::new(), |d| format!(" Degraded=\"{d}\"")),
            "ID",
            "ROLE",
            "STATE",
            "APPLIED",
            "ENDPOINT"
        );
        for m in &config.members {
            let r = self.replicas.get(&m.id);
            let state = match r {
                None => "gone".to_string(),
                Some(r) if r.exited.is_some() => "exited".into(),
                Some(r) => r.status.as_ref().map_or("no answer".into(), |s| s.state.clone()),
            };
            let applied = r.and_then(|r| r.status.as_ref()).map_or("-".into(), |s| {
                // Only print the order of magnitude so the table does not redraw per write.
                let a = s.applied_index;
                if a < 10 {
                    a.to_string()
                } else {
                    format!("~{}", 10u64.pow(a.ilog10()))
                }
            });
            out.push_str(&format!(
                "\n  {:<10} {:<8} {:<13} {:>8}  {}",
                m.id,
                match m.role {
                    Role::Voter => "voter",
                    Role::Learner => "learner",
                },
                state,
                applied,
                m.endpoint.trim_start_matches("http://")
            ));
        }
        out
    }

    async fn push(
        transport: &crate::Transport,
        endpoint: &str,
        config: &lockstep_proto::Configuration,
        timeout: Duration,
    ) -> Result<(), String> {
        let ch = transport.endpoint(endpoint)?.connect_timeout(timeout).connect_lazy();
        let mut c = AdminClient::new(ch);
        let mut req = tonic::Request::new(lockstep_proto::ReconfigureRequest {
            config: Some(config.clone()),
        });
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, c.reconfigure(req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(s.message().to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    fn endpoint_of(&self, id: &str) -> Option<String> {
        self.replicas.get(id).and_then(|r| r.endpoint.clone())
    }

    fn primary_endpoint(&self) -> Option<String> {
        self.state.config.as_ref().and_then(|c| self.endpoint_of(&c.primary))
    }

    /// Carry out one planner action. In Byzantine mode the configuration changes go through
    /// eras signed by this master instead of admin `Reconfigure`/`Seal`/`Resume` calls.
    async fn execute(&mut self, action: Action) -> anyhow::Result<()> {
        let byzantine = self.byz.is_some();
        match action {
            Action::CreateReplica { id, .. } => self.create_replica(&id),
            Action::Reconfigure { config, notify } if byzantine => self.byz_reconfigure(config, notify).await,
            Action::Reconfigure { config, notify } => self.reconfigure(config, notify).await,
            Action::PushConfig { id } if byzantine => self.byz_push_config(&id).await,
            Action::PushConfig { id } => {
                self.push_config(&id).await;
                Ok(())
            }
            Action::DeleteReplica { id, reason } => {
                self.delete_replica(id, &reason);
                Ok(())
            }
            Action::Seal if byzantine => self.byz_seal().await,
            Action::Seal => self.seal().await,
            Action::Stage { .. } => Ok(()),
            Action::RestartReplica { id, .. } => self.restart_replica(&id).await,
            Action::Resume { machine } if byzantine => self.byz_resume(&machine).await,
            Action::Resume { .. } => self.resume().await,
            Action::DeleteVolume { id } => self.delete_volume(&id),
            Action::SetRollout { rollout } => {
                self.state.rollout = rollout;
                save_state(&self.dir, &self.state)
            }
        }
    }

    /// Persist `config` as the current configuration (the fence: durable before any replica
    /// hears of it).
    fn persist_config(&mut self, config: lockstep_planner::Config) -> anyhow::Result<()> {
        self.state.config = Some(config);
        save_state(&self.dir, &self.state)
    }

    fn create_replica(&mut self, id: &str) -> anyhow::Result<()> {
        // Never hand this ordinal out again, even after this replica is gone.
        if let Some(n) = lockstep_planner::ordinal_of(id) {
            self.state.next_ordinal = self.state.next_ordinal.max(n + 1);
            save_state(&self.dir, &self.state)?;
        }
        self.spawn(id, true)
    }

    /// Byzantine mode: move to `config`'s era, then tell the removed replicas in `notify`.
    async fn byz_reconfigure(&mut self, config: lockstep_planner::Config, notify: Vec<String>) -> anyhow::Result<()> {
        self.persist_config(config.clone())?;
        self.byz_era_change(&config, None).await?;
        for id in notify {
            self.byz_push_current(&id).await;
        }
        Ok(())
    }

    /// Byzantine mode: start the persisted configuration's era if it is not running yet, else
    /// give replica `id` the current era.
    async fn byz_push_config(&mut self, id: &str) -> anyhow::Result<()> {
        let era = self.byz.as_ref().map_or(0, |b| b.era_number());
        match self.state.config.clone() {
            Some(c) if c.epoch > era => self.byz_era_change(&c, None).await?,
            _ => self.byz_push_current(id).await,
        }
        Ok(())
    }

    /// Byzantine mode: give replica `id` the current era, if it listens; failures are left to
    /// the next tick.
    async fn byz_push_current(&self, id: &str) {
        if let (Some(ep), Some(b)) = (self.endpoint_of(id), self.byz.as_ref()) {
            let _ = b.push_current(&ep).await;
        }
    }

    /// Byzantine mode: seal with an ordered barrier of the master's own stream.
    async fn byz_seal(&mut self) -> anyhow::Result<()> {
        if let Some(b) = self.byz.as_mut() {
            let (index, _) = b.barrier(true, Duration::from_secs(30)).await?;
            self.say(&format!(
                "sealed at index {index} (an ordered barrier of the master's stream)"
            ));
        }
        Ok(())
    }

    /// Byzantine mode: resume under `machine` by starting the next era with it.
    async fn byz_resume(&mut self, machine: &MachineRef) -> anyhow::Result<()> {
        let identity = lockstep_replica::machine::builtin(&machine.name)
            .map(|f| f().identity())
            .context("built-in machine")?;
        if let Some(config) = self.state.config.clone() {
            let mut next = config.clone();
            next.epoch += 1;
            self.persist_config(next.clone())?;
            self.byz_era_change(&next, Some(identity)).await?;
        }
        Ok(())
    }

    /// Fail-stop: persist `config` (the fence), give it to the primary, then to the other
    /// members, and tell the removed replicas in `notify` in the background. A member that
    /// does not take it now gets it again through `PushConfig`.
    async fn reconfigure(&mut self, config: lockstep_planner::Config, notify: Vec<String>) -> anyhow::Result<()> {
        // Fence first: the decision is durable before any replica acts on it.
        self.persist_config(config.clone())?;
        let proto = lockstep_planner::wire::to_proto(&config);
        self.push_to_primary(&config, &proto).await;
        self.push_to_other_members(&config, &proto).await;
        self.notify_removed(notify, &proto);
        Ok(())
    }

    /// The primary first: a member that learns the new epoch before the primary would fence it
    /// until the primary hears of the epoch too.
    async fn push_to_primary(&self, config: &lockstep_planner::Config, proto: &lockstep_proto::Configuration) {
        if let Some(p) = config.member(&config.primary)
            && let Err(e) = Self::push(&self.transport, &p.endpoint, proto, Duration::from_secs(1)).await
        {
            self.say(&format!(
                "  could not give epoch {} to primary {} yet: {e}",
                config.epoch, p.id
            ));
        }
    }

    /// Every member but the primary, all at once.
    async fn push_to_other_members(&self, config: &lockstep_planner::Config, proto: &lockstep_proto::Configuration) {
        let pushes: Vec<_> = config
            .members
            .iter()
            .filter(|m| m.id != config.primary)
            .map(|m| {
                let proto = proto.clone();
                let ep = m.endpoint.clone();
                let id = m.id.clone();
                let transport = self.transport.clone();
                async move { (id, Self::push(&transport, &ep, &proto, Duration::from_secs(1)).await) }
            })
            .collect();
        for (id, r) in futures::future::join_all(pushes).await {
            if let Err(e) = r {
                self.say(&format!("  could not give epoch {} to {id} yet: {e}", config.epoch));
            }
        }
    }

    /// Removed members learn the new epoch (and then refuse everything) in the background.
    fn notify_removed(&self, notify: Vec<String>, proto: &lockstep_proto::Configuration) {
        for id in notify {
            if let Some(ep) = self.endpoint_of(&id) {
                let proto = proto.clone();
                let transport = self.transport.clone();
                tokio::spawn(async move {
                    let _ = Self::push(&transport, &ep, &proto, Duration::from_secs(5)).await;
                });
            }
        }
    }

    /// Fail-stop: give replica `id` the current configuration again; a failure is left to the
    /// next tick.
    async fn push_config(&self, id: &str) {
        if let (Some(c), Some(ep)) = (self.state.config.clone(), self.endpoint_of(id)) {
            let _ = Self::push(
                &self.transport,
                &ep,
                &lockstep_planner::wire::to_proto(&c),
                Duration::from_secs(1),
            )
            .await;
        }
    }

    /// Forget replica `id`; one still running is fenced and stopped after `--fenced-grace`.
    fn delete_replica(&mut self, id: String, reason: &str) {
        if let Some(r) = self.replicas.remove(&id) {
            if r.exited.is_some() {
                self.say(&format!("removed {id}: {reason}"));
            } else {
                self.say(&format!(
                    "removed {id}: {reason}; it is fenced and will be stopped in {:?}",
                    self.opts.fenced_grace
                ));
                self.retiring.push(Retiring {
                    id,
                    child: r.child,
                    kill_at: Instant::now() + self.opts.fenced_grace,
                });
            }
        }
    }

    /// The admin service of the current primary, if it listens.
    fn primary_admin(&self) -> anyhow::Result<Option<AdminClient<tonic::transport::Channel>>> {
        match self.primary_endpoint() {
            Some(ep) => Ok(Some(AdminClient::new(crate::cluster_channel(&self.transport, &ep)?))),
            None => Ok(None),
        }
    }

    /// Fail-stop: the primary orders a seal barrier through the log.
    async fn seal(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.primary_admin()? {
            let r = c.seal(lockstep_proto::SealRequest { at_index: 0 }).await?;
            self.say(&format!("sealed at index {}", r.into_inner().index));
        }
        Ok(())
    }

    /// Fail-stop: the primary accepts commands again after a seal.
    async fn resume(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.primary_admin()? {
            c.resume(lockstep_proto::ResumeRequest {}).await?;
        }
        Ok(())
    }

    /// Stop replica `id` and start it again on its data (a rollout's new version).
    async fn restart_replica(&mut self, id: &str) -> anyhow::Result<()> {
        if let Some(mut r) = self.replicas.remove(id) {
            terminate(&mut r.child, Duration::from_secs(5)).await;
            self.spawn(id, false)?;
        }
        Ok(())
    }

    /// Delete the data of a replica that left the configuration and is gone.
    fn delete_volume(&mut self, id: &str) -> anyhow::Result<()> {
        // Planned only with full redundancy, for a replica that left the configuration.
        let live = self.replicas.contains_key(id) || self.retiring.iter().any(|r| r.id == id);
        let dir = self.dir.join("replicas").join(id);
        if !live && dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
            self.say(&format!("deleted the data of {id}: redundancy is fully restored"));
        }
        Ok(())
    }

    /// Byzantine mode: move to `config`'s era. The current era first runs to an ordered
    /// barrier (t+1 members report the same index and state digest there, or the seal of a
    /// rollout); the new era starts from that state, which new members fetch and verify.
    async fn byz_era_change(
        &mut self,
        config: &lockstep_planner::Config,
        resume: Option<lockstep_proto::MachineIdentity>,
    ) -> anyhow::Result<()> {
        let Some(b) = self.byz.as_mut() else { return Ok(()) };
        let (start, digest) = match b.current_era().cloned() {
            None => {
                let factory =
                    lockstep_replica::machine::builtin(&self.desired.machine.name).context("built-in machine")?;
                let empty = lockstep_replica::runtime::Runtime::new(factory()).snapshot();
                (0, lockstep_replica::runtime::digest(&empty))
            }
            Some(_) => {
                let endpoints: Vec<String> = config.members.iter().map(|m| m.endpoint.clone()).collect();
                b.next_era_state(&endpoints, Duration::from_secs(30)).await?
            }
        };
        b.start_era(config, start, digest, resume).await?;
        self.say(&format!(
            "era {} started at index {start} with {} (signed by the master)",
            config.epoch,
            config
                .members
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(())
    }

    fn reap_retiring(&mut self) {
        let now = Instant::now();
        self.retiring.retain_mut(|r| {
            if let Ok(Some(_)) = r.child.try_wait() {
                return false;
            }
            if now >= r.kill_at {
                let _ = r.child.start_kill();
            }
            true
        });
    }

    async fn shutdown(&mut self) {
        let mut all: Vec<Child> = std::mem::take(&mut self.replicas)
            .into_values()
            .map(|r| r.child)
            .collect();
        all.extend(std::mem::take(&mut self.retiring).into_iter().map(|r| r.child));
        futures::future::join_all(all.iter_mut().map(|c| terminate(c, Duration::from_secs(5)))).await;
        self.say(&format!(
            "stopped. Data kept in {}; `lockstep up {}` restarts from it",
            self.dir.display(),
            self.opts.file.display()
        ));
    }
}

/// The program that runs a replica: `$LOCKSTEP_REPLICA_BIN`, else this executable's
/// `replica` subcommand.
fn replica_program() -> anyhow::Result<(PathBuf, Command)> {
    match std::env::var_os("LOCKSTEP_REPLICA_BIN") {
        Some(p) => {
            let exe = PathBuf::from(p);
            let cmd = Command::new(&exe);
            Ok((exe, cmd))
        }
        None => {
            let exe = std::env::current_exe().context("cannot find the lockstep executable")?;
            let mut cmd = Command::new(&exe);
            cmd.arg("replica");
            Ok((exe, cmd))
        }
    }
}

/// A replica gets SIGTERM when `up` dies, however it dies.
fn stop_with_parent(cmd: &mut Command) {
    // SAFETY: only async-signal-safe prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
            Ok(())
        });
    }
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
