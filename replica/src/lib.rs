//! lockstep replica runtime.
//!
//! A replica runs one deterministic [`StateMachine`](machine::StateMachine) and keeps it
//! identical to the other replicas of its cluster. Fail-stop mode (n = t + 1): primary-backup
//! with write-all acknowledgement and epoch fencing — see `docs/fail-stop-replication.md`.
//!
//! Build your own replica binary with your own machine by calling [`main_with`]; see
//! `replica/examples/custom_machine.rs`.

pub mod allocator;
pub mod byz;
pub mod framed;
pub mod http;
pub mod machine;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod runtime;
pub mod server;
pub mod stages;
pub mod storage;
pub mod tls;
pub mod writer;

use anyhow::Context;
use machine::MachineFactory;
use node::{Node, Shared};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureModel {
    #[value(name = "FailStop")]
    FailStop,
    #[value(name = "Byzantine")]
    Byzantine,
}

/// Command-line flags of a replica (shared by `lockstep-replica` and `lockstep replica`).
#[derive(clap::Args, Debug, Clone)]
pub struct ReplicaArgs {
    /// Stable replica id (a pod name, or `{cluster}-{n}` locally).
    #[arg(long, env = "LOCKSTEP_REPLICA_ID")]
    pub id: String,
    /// gRPC address (client, peer and admin APIs). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// HTTP address for /healthz, /readyz and /metrics. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: SocketAddr,
    /// Where the log, snapshots and configuration live.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Which state machine to run.
    #[arg(long, default_value = "kv")]
    pub machine: String,
    #[arg(long, value_enum, default_value = "FailStop")]
    pub failure_model: FailureModel,
    /// Skip fsync (benchmarks only: a crash may lose acknowledged writes).
    #[arg(long)]
    pub no_fsync: bool,
    /// Take a snapshot (and compact the log) every this many applied entries.
    #[arg(long, env = "LOCKSTEP_SNAPSHOT_EVERY", default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Worker threads of the replica's async runtime. 0: one per CPU. 1: a single-threaded
    /// runtime, without hand-offs between workers: one client's fail-stop write took 10–17%
    /// less time on 2 cores (no gain at 8 or 64 clients), but one long step (a snapshot, a
    /// burst of signature checks) then delays everything else, health probes included
    /// (docs/benchmarks.md, "Runtime flavour").
    #[arg(long, env = "LOCKSTEP_RUNTIME_THREADS", default_value_t = 0)]
    pub runtime_threads: usize,
    #[command(flatten)]
    pub byzantine: ByzantineArgs,
    /// Transport security: mutual TLS (`--tls-*`) or an explicit `--insecure`.
    #[command(flatten)]
    pub tls: tls::TlsArgs,
}

/// Flags of Byzantine mode (ignored in FailStop). On Kubernetes the operator sets the
/// environment variables from `spec.ordering` and `spec.clientIdentities`; see docs/byzantine.md.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ByzantineArgs {
    /// This replica's Ed25519 key (64 hex characters). Default: `<data-dir>/replica.key`,
    /// created on first start.
    #[arg(long, env = "LOCKSTEP_REPLICA_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// The configuration master's public key (hex), or a file holding it. Eras, admissions and
    /// removals must carry its signature.
    #[arg(long, env = "LOCKSTEP_MASTER_PUBLIC_KEY")]
    pub master_public_key: Option<String>,
    /// Directory of client public keys, one file per client named by the client id.
    #[arg(long, env = "LOCKSTEP_CLIENT_IDENTITIES")]
    pub client_identities: Option<PathBuf>,
    /// `LamportClock` (default) or `PhysicalClock`.
    #[arg(long, env = "LOCKSTEP_STABILITY", default_value = "LamportClock")]
    pub stability: String,
    /// δ: bound on message delay between processes, in milliseconds.
    #[arg(long, env = "LOCKSTEP_MAX_DELAY_MILLIS", default_value_t = byz::DEFAULT_MAX_DELAY_MILLIS)]
    pub max_delay_millis: u64,
    /// ε: bound on clock skew between processes (PhysicalClock), in milliseconds.
    #[arg(long, env = "LOCKSTEP_MAX_CLOCK_SKEW_MILLIS", default_value_t = 0)]
    pub max_clock_skew_millis: u64,
    /// Test builds only (cargo feature `fault-injection`): behave faultily.
    #[arg(long, env = "LOCKSTEP_INJECT")]
    pub inject: Option<String>,
}

/// Addresses a replica actually bound, written to `<data-dir>/listening.json`.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Listening {
    pub id: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub pid: u32,
}

pub const LISTENING_FILE: &str = "listening.json";

pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,tower=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Entry point of a replica binary that offers `machines`.
pub fn main_with(args: ReplicaArgs, machines: &[(&str, MachineFactory)]) -> anyhow::Result<()> {
    init_tracing(args.log_json);
    let factory = machines
        .iter()
        .find(|(n, _)| *n == args.machine)
        .map(|(_, f)| *f)
        .with_context(|| {
            format!(
                "unknown machine '{}'; this replica binary offers: {}",
                args.machine,
                machines.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )
        })?;
    let rt = async_runtime(args.runtime_threads).context("cannot start the async runtime")?;
    if args.runtime_threads == 1 {
        tracing::info!("async runtime: single-threaded (--runtime-threads 1)");
    } else {
        tracing::info!("async runtime: {} worker threads", rt.metrics().num_workers());
    }
    rt.block_on(run(args, factory))
}

/// The replica's tokio runtime with `threads` workers (`--runtime-threads`).
fn async_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

/// The built-in machines.
pub fn builtin_machines() -> Vec<(&'static str, MachineFactory)> {
    machine::BUILTIN_NAMES
        .iter()
        .filter_map(|n| machine::builtin(n).map(|f| (*n, f)))
        .collect()
}

/// The replica's transport from its flags (refusing to start with neither TLS nor
/// `--insecure`), announced in the log.
pub fn transport(args: &ReplicaArgs) -> anyhow::Result<tls::Transport> {
    let transport = args.tls.replica_transport()?;
    match transport.identity() {
        Some(id) => tracing::info!(identity = %id.uri(), "mutual TLS on every gRPC service"),
        None => tls::warn_insecure(&format!("replica {}", args.id)),
    }
    Ok(transport)
}

pub async fn run(args: ReplicaArgs, factory: MachineFactory) -> anyhow::Result<()> {
    let transport = transport(&args)?;
    check_certificate_is_ours(&transport, &args)?;
    if args.failure_model == FailureModel::Byzantine {
        return byz::run(args, factory, transport).await;
    }
    let (storage, node) = recover(&args, factory)?;
    let is_primary = node.role == node::Role::Primary;
    let shared = start_shared(storage, node, &transport);
    if is_primary {
        peers::start(&shared);
    }
    shared.after_change();
    let (grpc, http) = listen(&args, "listening").await?;
    serve_until_signal(shared, transport, grpc, http).await
}

/// A replica's certificate must name this replica (its SAN URI `lockstep://replica/ID`).
fn check_certificate_is_ours(transport: &tls::Transport, args: &ReplicaArgs) -> anyhow::Result<()> {
    if let Some(id) = transport.identity()
        && (id.role != tls::Role::Replica || id.name != args.id)
    {
        anyhow::bail!(
            "--tls-cert is the certificate of {id}, not of replica '{}' (its SAN URI must be lockstep://replica/{})",
            args.id,
            args.id
        );
    }
    Ok(())
}

/// Opens the data directory (refusing one that belongs to another replica) and rebuilds the
/// node from what it holds.
fn recover(args: &ReplicaArgs, factory: MachineFactory) -> anyhow::Result<(storage::Storage, Node)> {
    let opts = storage::StorageOptions {
        fsync: !args.no_fsync,
        ..Default::default()
    };
    let (mut storage, recovered) = storage::Storage::open(&args.data_dir, opts)
        .with_context(|| format!("cannot open data dir {}", args.data_dir.display()))?;
    match &recovered.identity {
        Some(id) if *id != args.id => anyhow::bail!(
            "data dir {} belongs to replica '{id}', not '{}'",
            args.data_dir.display(),
            args.id
        ),
        Some(_) => {}
        None => storage.save_identity(&args.id)?,
    }
    let mut node = Node::new(
        args.id.clone(),
        runtime::Runtime::new(factory()),
        args.snapshot_every,
        !args.no_fsync,
    );
    let recovered_entries = recovered.entries.len();
    node.recover(recovered.config, recovered.snapshot, recovered.entries)?;
    tracing::info!(
        id = %args.id, epoch = node.epoch, role = node.role.as_str(), applied = node.applied_index,
        log_entries = recovered_entries, machine = %format!("{} {}", node.identity.name, node.identity.version),
        "recovered from disk"
    );
    Ok((storage, node))
}

/// The state the servers share, with the storage writer whose durable batches commit and
/// apply entries.
fn start_shared(storage: storage::Storage, node: Node, transport: &tls::Transport) -> Arc<Shared> {
    let (changed, _) = tokio::sync::watch::channel(0u64);
    let (applied_tx, _) = tokio::sync::broadcast::channel(4096);
    Arc::new_cyclic(|weak: &Weak<Shared>| {
        let weak = weak.clone();
        let writer = writer::spawn(
            storage,
            Box::new(move |durable, written, started| {
                let Some(shared) = weak.upgrade() else { return };
                let now = std::time::Instant::now();
                shared.metrics.observe_batch(written, now - started);
                {
                    let mut node = shared.lock();
                    node.on_durable(durable);
                    node.stages.durable(durable, started, now);
                    shared.apply_committed(&mut node, now);
                }
                shared.after_change();
            }),
        );
        Shared {
            node: std::sync::Mutex::new(node),
            changed,
            applied_tx,
            writer,
            metrics: Default::default(),
            transport: transport.clone(),
            outboxes: Default::default(),
        }
    })
}

/// Binds the gRPC and HTTP listeners and says where in `listening.json` (and in the log, as
/// `what`).
async fn listen(args: &ReplicaArgs, what: &str) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let grpc = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let http = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on {}", args.http))?;
    let listening = Listening {
        id: args.id.clone(),
        grpc: grpc.local_addr()?,
        http: http.local_addr()?,
        pid: std::process::id(),
    };
    write_atomically(&args.data_dir.join(LISTENING_FILE), &serde_json::to_vec(&listening)?)?;
    tracing::info!(grpc = %listening.grpc, http = %listening.http, "{what}");
    Ok((grpc, http))
}

/// Who may call as a replica: the members of the current configuration (a refusal says why,
/// and the epoch it is in).
fn membership(shared: &Arc<Shared>) -> tls::Membership {
    let shared = Arc::downgrade(shared);
    Arc::new(move |id: &str| {
        let Some(shared) = shared.upgrade() else {
            return Err(("and this replica is shutting down".into(), 0));
        };
        let node = shared.lock();
        match &node.config {
            Some(c) if c.members.iter().any(|m| m.id == id) => Ok(()),
            Some(c) => Err((
                format!(
                    "not a member of epoch {} ({})",
                    c.epoch,
                    c.members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
                ),
                node.epoch,
            )),
            None => Err(("and this replica has no configuration yet".into(), node.epoch)),
        }
    })
}

/// Serves gRPC (client, peer and admin services) and HTTP until SIGINT or SIGTERM, then stops
/// both and waits for the storage writer to finish what it has.
async fn serve_until_signal(
    shared: Arc<Shared>,
    transport: tls::Transport,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let services = server::Services { shared: shared.clone() };
    let max = lockstep_proto::MAX_MESSAGE_BYTES;
    // Connections of the framed transport are served beside gRPC (framed.rs).
    let incoming = framed::beside_grpc(
        transport.incoming(grpc),
        framed::Served::FailStop(services.clone()),
        membership(&shared),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc_server = transport
        .server()
        .layer(stages::StampArrivalLayer)
        .layer(tls::AuthorizeLayer::new(&transport, membership(&shared)))
        .add_service(lockstep_proto::client_server::ClientServer::new(services.clone()).max_decoding_message_size(max))
        .add_service(lockstep_proto::peer_server::PeerServer::new(services.clone()).max_decoding_message_size(max))
        .add_service(lockstep_proto::admin_server::AdminServer::new(services.clone()).max_decoding_message_size(max))
        .serve_with_incoming_shutdown(
            // TLS handshakes (with the certificate current at each) and TCP_NODELAY on
            // accepted sockets: tls::reload::incoming.
            incoming,
            wait_stop(stop_rx.clone()),
        );
    let http_server =
        axum::serve(http, http::router(shared.clone())).with_graceful_shutdown(wait_stop(stop_rx.clone()));
    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(async move { http_server.await });
    stop_on_signal(stop_tx, grpc_task, http_task, &shared.writer).await;
    Ok(())
}

/// On SIGINT or SIGTERM: stop both servers (a second at most) and wait for the storage writer
/// to finish what it has.
pub(crate) async fn stop_on_signal<G, H>(
    stop_tx: tokio::sync::watch::Sender<bool>,
    grpc_task: tokio::task::JoinHandle<G>,
    http_task: tokio::task::JoinHandle<H>,
    writer: &writer::WriterHandle,
) {
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = grpc_task.await;
        let _ = http_task.await;
    })
    .await;
    let _ = writer.barrier().await;
}

pub(crate) async fn wait_stop(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term_fut = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term_fut => {}
    }
}

/// Write a small file atomically (tmp + fsync + rename).
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
