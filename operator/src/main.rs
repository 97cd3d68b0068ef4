//! `lockstep-operator`: the Kubernetes operator for `ReplicatedStateMachine`.
//!
//! Developer loop (any kubeconfig; replicas must be reachable from where it runs, see
//! `--admin-address`):
//!
//! ```sh
//! kubectl apply --server-side -k crds/
//! cargo run -p lockstep-operator --bin lockstep-operator -- --admin-address dns --network-policy=false
//! ```
//!
//! (`--network-policy=false`: the NetworkPolicies the operator creates admit only its in-cluster
//! pods; see docs/security.md.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use lockstep_operator::admin::GrpcAdmin;
use lockstep_operator::controller::{self, Context};
use lockstep_operator::http::{HttpState, router};
use lockstep_operator::leader::{LeaderElector, LeaseConfig};
use lockstep_operator::metrics::Metrics;
use lockstep_operator::observe::AdminAddress;

#[derive(Parser, Debug)]
#[command(
    name = "lockstep-operator",
    version,
    about = "Kubernetes operator for lockstep ReplicatedStateMachines"
)]
struct Cli {
    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Run several operator replicas: only the holder of the Lease reconciles.
    #[arg(long)]
    leader_election: bool,
    #[arg(long, env = "POD_NAMESPACE", default_value = "lockstep-system")]
    lease_namespace: String,
    #[arg(long, default_value = "lockstep-operator")]
    lease_name: String,
    /// How long a Lease holds without renewal: the longest a frozen leader delays the next
    /// decision (docs/operator-design.md section 8).
    #[arg(long, default_value_t = 8)]
    lease_duration_seconds: u64,
    /// A leader that could not renew for this long steps down (must be below the duration).
    #[arg(long, default_value_t = 5)]
    renew_deadline_seconds: u64,
    /// Identity in the Lease (defaults to the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Replica image for resources without spec.machine.image.
    #[arg(long, env = "LOCKSTEP_REPLICA_IMAGE")]
    default_replica_image: Option<String>,
    /// How to reach replicas' admin API: `pod-ip` (in-cluster) or `dns` (stable names; use
    /// when running outside the cluster with a route to the service network).
    #[arg(long, default_value = "pod-ip", value_parser = ["pod-ip", "dns"])]
    admin_address: String,
    /// Own a NetworkPolicy per resource that admits only the replicas' peers, the operator and
    /// clients to the replica pods (docs/security.md). `false`: create none (manage your own).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    network_policy: bool,
    /// The operator's namespace: its pods are let into every replica pod (NetworkPolicy).
    #[arg(long, env = "POD_NAMESPACE", default_value = "lockstep-system")]
    operator_namespace: String,
    /// Labels every operator pod carries (`k=v,k=v`), for the NetworkPolicy of each resource.
    #[arg(long, default_value = "app.kubernetes.io/name=lockstep-operator", value_parser = parse_labels)]
    operator_pod_labels: BTreeMap<String, String>,
    /// Requeue interval of a converged object (seconds).
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let labels: BTreeMap<String, String> = s
        .split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("{kv:?} is not key=value"))
        })
        .collect::<Result<_, _>>()?;
    if labels.is_empty() {
        return Err("at least one label: an empty selector would admit every pod of the namespace".into());
    }
    Ok(labels)
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    let metrics = Arc::new(Metrics::default());
    let client = kube_client(&metrics).await?;
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = serve_http(cli.http, metrics.clone(), ready.clone(), stop_rx.clone()).await?;
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let elector = cli.leader_election.then(|| leader_elector(&cli, &client));

    // A follower is a healthy standby: ready before it leads.
    ready.store(true, Ordering::Relaxed);
    if let Some(e) = &elector
        && !lead_or_stop(e, stop_rx.clone()).await
    {
        let _ = http.await;
        return Ok(());
    }
    metrics.leader.set(1);

    let (source, drive_caches) = controller::caches(&client);
    tokio::spawn(drive_caches.for_each(|_| async {}));
    wait_for_caches(&source).await?;
    let ctx = controller_context(&cli, client, metrics.clone(), source);
    let lost_leadership = run_controller(ctx, elector.as_ref(), stop_rx).await;
    metrics.leader.set(0);
    if let Some(e) = &elector
        && !lost_leadership
    {
        e.release().await;
    }
    signal.abort();
    http.abort();
    if lost_leadership {
        anyhow::bail!("lost leadership; exiting so a fresh instance can campaign");
    }
    Ok(())
}

/// The API client, without kube's own retries, counting every request in the metrics.
async fn kube_client(metrics: &Arc<Metrics>) -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (in-cluster service account or KUBECONFIG)")?;
    // kube retries 429/503/504 by itself, up to 15 times with a backoff that grows to minutes:
    // one throttled call would hold a reconcile (or the Lease renewal) that long. The
    // controller's per-object backoff and the Lease's retry period retry instead, in seconds.
    config.default_retry = false;
    Ok(kube::client::ClientBuilder::try_from(config)
        .context("building the Kubernetes client")?
        .with_layer(&metrics.api_request_layer())
        .build())
}

/// Serves /healthz, /readyz and /metrics on `addr` until `stop` turns true.
async fn serve_http(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let app = router(HttpState { metrics, ready });
    let http = tokio::spawn(async move {
        let stop = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    tracing::info!(addr = %addr, "serving /healthz /readyz /metrics");
    Ok(http)
}

fn leader_elector(cli: &Cli, client: &kube::Client) -> LeaderElector {
    let identity = cli
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("lockstep-operator-{}", std::process::id()));
    LeaderElector::new(
        client.clone(),
        LeaseConfig {
            namespace: cli.lease_namespace.clone(),
            name: cli.lease_name.clone(),
            identity,
            lease_duration: Duration::from_secs(cli.lease_duration_seconds),
            renew_deadline: Duration::from_secs(cli.renew_deadline_seconds),
            retry_period: Duration::from_secs(2),
        },
    )
}

/// Waits for the Lease: true once this instance leads, false when asked to stop first.
async fn lead_or_stop(elector: &LeaderElector, mut stop: tokio::sync::watch::Receiver<bool>) -> bool {
    tracing::info!(identity = %elector.config().identity, lease = %elector.config().name, "waiting for leadership");
    tokio::select! {
        _ = elector.acquire() => {},
        _ = stop.wait_for(|s| *s) => return false,
    }
    tracing::info!("leading");
    true
}

/// The watch caches must hold every kind the planner reads before the first reconcile.
async fn wait_for_caches(source: &lockstep_operator::observe::Source) -> anyhow::Result<()> {
    let lockstep_operator::observe::Source::Cache(c) = source else {
        return Ok(());
    };
    let wait = async {
        let _ = c.pods.wait_until_ready().await;
        let _ = c.pvcs.wait_until_ready().await;
        let _ = c.nodes.wait_until_ready().await;
        let _ = c.services.wait_until_ready().await;
        let _ = c.config_maps.wait_until_ready().await;
        let _ = c.pdbs.wait_until_ready().await;
        let _ = c.network_policies.wait_until_ready().await;
    };
    if tokio::time::timeout(Duration::from_secs(60), wait).await.is_err() {
        anyhow::bail!(
            "watch caches did not fill within 60s (RBAC for pods, persistentvolumeclaims, nodes, services, configmaps, poddisruptionbudgets, networkpolicies?)"
        );
    }
    Ok(())
}

fn controller_context(
    cli: &Cli,
    client: kube::Client,
    metrics: Arc<Metrics>,
    source: lockstep_operator::observe::Source,
) -> Arc<Context> {
    let mut ctx = Context::new(client, Arc::new(GrpcAdmin::default()), metrics, source).with_liveness();
    ctx.default_image = cli.default_replica_image.clone();
    ctx.admin_address = if cli.admin_address == "dns" {
        AdminAddress::Dns
    } else {
        AdminAddress::PodIp
    };
    ctx.network_policy = cli.network_policy.then(|| lockstep_operator::build::OperatorPods {
        namespace: cli.operator_namespace.clone(),
        labels: cli.operator_pod_labels.clone(),
    });
    ctx.steady_requeue = Duration::from_secs(cli.resync_seconds.max(5));
    Arc::new(ctx)
}

/// Runs the controller until `stop` turns true or the Lease is lost (returns true then).
async fn run_controller(
    ctx: Arc<Context>,
    elector: Option<&LeaderElector>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut stop_controller = stop.clone();
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(controller::run(ctx, async move {
        tokio::select! {
            _ = stop_controller.wait_for(|s| *s) => {},
            _ = lost_rx => {},
        }
    }));
    let mut lost_leadership = false;
    let mut stopping = stop;
    match elector {
        Some(e) => tokio::select! {
            _ = e.keep_renewing() => { lost_leadership = true; }
            _ = stopping.wait_for(|s| *s) => {}
        },
        None => {
            let _ = stopping.wait_for(|s| *s).await;
        }
    }
    let _ = lost_tx.send(());
    if let Err(e) = controller.await {
        tracing::error!(error = %e, "controller task failed");
    }
    lost_leadership
}
