//! `lockstep`: run a local cluster (`up`), talk to a cluster (put/get/delete/cas, status,
//! watch), load it (`bench`), or run one replica process (`replica`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use lockstep::bench::{Mix, WorkloadOptions, run_workload};
use lockstep::cluster::{DEFAULT_DATA_DIR, resolve_endpoints};
use lockstep::{Client, ClientError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Replicated state machines: local clusters, clients, benchmarks"
)]
struct Cli {
    /// Cluster: the name of a local cluster started by `lockstep up`, or host:port,host:port,...
    #[arg(short = 'c', long = "cluster", global = true, env = "LOCKSTEP_CLUSTER")]
    cluster: Option<String>,
    /// Where `lockstep up` keeps local clusters.
    #[arg(long, global = true, env = "LOCKSTEP_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Byzantine clusters: the client identity to sign with (its key is
    /// `<data-dir>/<cluster>/clients/<identity>.key`).
    #[arg(long, global = true, env = "LOCKSTEP_IDENTITY", default_value = lockstep::byz::DEFAULT_IDENTITY)]
    identity: String,
    /// Byzantine clusters reached by address (e.g. a Kubernetes client Service, `-c kv-byz:7000`):
    /// the configuration master's public key (hex). The client learns members, endpoints and
    /// replica keys from the era the replicas report, and believes it only with this signature.
    /// On Kubernetes: `kubectl get rsm NAME -o jsonpath='{.status.byzantine.masterPublicKey}'`.
    #[arg(long, global = true, env = "LOCKSTEP_MASTER_PUBLIC_KEY")]
    master_public_key: Option<String>,
    /// With --master-public-key: the client's secret key file (from `lockstep keygen`);
    /// default `<identity>.key` in the current directory.
    #[arg(long, global = true, env = "LOCKSTEP_IDENTITY_KEY")]
    identity_key: Option<PathBuf>,
    #[command(flatten)]
    tls: ClientTls,
    #[command(subcommand)]
    command: Cmd,
}

/// How the CLI reaches the replicas (given before the subcommand). Default: a local cluster
/// (`-c NAME`) with the certificates `lockstep up` wrote; endpoints (`-c host:port`) in
/// plaintext unless these are given.
#[derive(clap::Args)]
struct ClientTls {
    /// CA certificate (PEM) the replicas' certificates must chain to.
    #[arg(long, env = "LOCKSTEP_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) with a `lockstep://client/<name>` SAN URI.
    #[arg(long, env = "LOCKSTEP_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "LOCKSTEP_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Plaintext even for a local cluster whose certificates exist (replicas started with
    /// --insecure, as the operator runs them until TLS on Kubernetes lands).
    #[arg(long, env = "LOCKSTEP_INSECURE", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    insecure: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the ReplicatedStateMachine in FILE as a local cluster in the foreground (Ctrl-C stops it).
    Up(UpArgs),
    /// Byzantine clusters: create a client key pair (secret in `clients/NAME.key`, public key in
    /// `client-identities/NAME`, the directory the replicas and the master read).
    AddClient { name: String },
    /// Create a client key pair for a Byzantine cluster not run by `lockstep up` (Kubernetes):
    /// the secret key goes to FILE (never overwritten), the public key (hex) to stdout — put it
    /// in the `spec.clientIdentities` Secret under the client's name.
    Keygen { file: PathBuf },
    /// Write KEY = VALUE (prints the previous value).
    Put { key: String, value: String },
    /// Read KEY (linearizable).
    Get { key: String },
    /// Delete KEY (prints the previous value).
    Delete { key: String },
    /// Set KEY to NEW if it is OLD ("-" means absent).
    Cas { key: String, old: String, new: String },
    /// Show epoch and members.
    Status {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Stream applied commands and their outputs.
    Watch {
        /// Start from this log index (default: from now on).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Exit after the entry at this index (default: follow forever).
        #[arg(long)]
        until: Option<u64>,
    },
    /// Load generator: throughput and latency.
    Bench(BenchArgs),
    /// Run one replica process (what `up` starts; `lockstep-replica` is the same).
    Replica {
        #[command(flatten)]
        args: Box<lockstep_replica::ReplicaArgs>,
    },
}

// The flags of `lockstep up` (its help is the doc comment of `Cmd::Up`).
#[derive(clap::Args)]
struct UpArgs {
    file: PathBuf,
    /// Declare a replica fail-stopped after this many milliseconds without an answer.
    #[arg(long, default_value_t = 1000)]
    failure_timeout_ms: u64,
    /// Keep a fenced (paused/partitioned) replica alive this long before stopping it.
    #[arg(long, default_value_t = 10_000)]
    fenced_grace_ms: u64,
    /// Skip fsync in the replicas (benchmarks only; a crash may lose acknowledged writes).
    #[arg(long)]
    no_fsync: bool,
    /// Print decisions only, not the member table.
    #[arg(long)]
    quiet: bool,
    /// Byzantine mode: remove a client stream that has not moved for this long (a crashed
    /// client stalls Lamport stability until then).
    #[arg(long, default_value_t = 3000)]
    client_timeout_ms: u64,
    /// Test builds only (cargo feature `fault-injection`): make a replica faulty, e.g.
    /// `--inject replica-1=wrong-output`. Behaviours: wrong-output, silent,
    /// equivocate-relays, forge-requests, replay-requests, reorder, corrupt-snapshot,
    /// wrong-version.
    #[arg(long, hide = !lockstep_replica::byz::inject::AVAILABLE)]
    inject: Vec<String>,
    /// Run the replicas WITHOUT transport security: plaintext gRPC, every caller accepted
    /// (benchmarks of the TLS cost). Default: mutual TLS with certificates made here.
    #[arg(long = "insecure")]
    insecure_replicas: bool,
    /// How long the certificates `up` issues to the replicas, itself and the CLI are valid
    /// (e.g. `90d`, `12h`, `30s`). Each is issued again, while everything runs, once a
    /// third of this is left.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    cert_validity: Duration,
    /// How long the cluster's CA is valid. A new CA is made once a third of this is left;
    /// the old one stays trusted until it expires.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    ca_validity: Duration,
}

// The flags of `lockstep bench` (its help is the doc comment of `Cmd::Bench`).
#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    #[arg(long, value_enum, default_value = "write")]
    mix: Mix,
    /// Record every operation as a JSON line (lockstep-linearizability format).
    #[arg(long)]
    history: Option<PathBuf>,
    /// Check the recorded history for linearizability at the end.
    #[arg(long)]
    check: bool,
    /// Byzantine clusters: this many more clients stay connected but idle (they only send
    /// signed no-ops), to measure what connected clients cost Lamport stability.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Byzantine clusters: an idle client's no-op interval, in milliseconds.
    #[arg(long, default_value_t = 50)]
    noop_interval_ms: u64,
    /// Byzantine clusters: the clients share one signed stream that sends the commands
    /// waiting at once as one item, at most this many (0: one stream per client).
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Byzantine clusters with `--batch`: how many shared streams, each with one batch in
    /// flight.
    #[arg(long, default_value_t = 1)]
    batch_streams: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

// mimalloc, its arena committed on demand (docs/benchmarks.md, "Allocator").
lockstep_replica::global_allocator!();

fn main() {
    let cli = Cli::parse();
    if let Cmd::Replica { args } = cli.command {
        if let Err(e) = lockstep_replica::main_with(*args, &lockstep_replica::builtin_machines()) {
            eprintln!("lockstep replica: error: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lockstep: cannot start: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("lockstep: error: {e:#}");
        std::process::exit(1);
    }
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    let spec = cli
        .cluster
        .as_deref()
        .context("which cluster? pass -c NAME (a local cluster) or -c host:port,...")?;
    Ok(Client::new(resolve_endpoints(spec, &cli.data_dir)?).with_transport(transport(cli)?))
}

/// TLS from the flags, else a local cluster's own certificates, else plaintext.
fn transport(cli: &Cli) -> anyhow::Result<lockstep::Transport> {
    let t = &cli.tls;
    if t.insecure {
        return Ok(lockstep::Transport::plaintext());
    }
    match (&t.tls_ca, &t.tls_cert, &t.tls_key) {
        (Some(ca), Some(cert), Some(key)) => return lockstep::Transport::load(ca, cert, key),
        (None, None, None) => {}
        _ => anyhow::bail!("--tls-ca, --tls-cert and --tls-key go together: pass all three"),
    }
    match cli.cluster.as_deref() {
        Some(spec) if !spec.contains(':') && !spec.contains(',') => {
            lockstep::pki::local_client_transport(&lockstep::cluster::cluster_dir(&cli.data_dir, spec))
        }
        _ => Ok(lockstep::Transport::plaintext()),
    }
}

fn cluster_dir_of(cli: &Cli) -> anyhow::Result<PathBuf> {
    let spec = cli
        .cluster
        .as_deref()
        .context("which cluster? pass -c NAME (a local cluster)")?;
    Ok(lockstep::cluster::cluster_dir(&cli.data_dir, spec))
}

fn hex_key(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The cluster directory when `-c` names a local Byzantine cluster.
fn byzantine(cli: &Cli) -> Option<PathBuf> {
    let dir = cluster_dir_of(cli).ok()?;
    dir.join(lockstep::byz::INFO_FILE).exists().then_some(dir)
}

/// A Byzantine cluster: a local one, or one reached by address with the master's key.
fn byz_mode(cli: &Cli) -> bool {
    byzantine(cli).is_some() || cli.master_public_key.is_some()
}

async fn byz_client(cli: &Cli) -> anyhow::Result<lockstep::byz::ByzClient> {
    if let Some(dir) = byzantine(cli) {
        return lockstep::byz::ByzClient::local(&dir, &cli.identity);
    }
    let master = cli.master_public_key.as_deref().context("not a Byzantine cluster")?;
    let master = lockstep_replica::byz::keys::public_key_arg(master).context("--master-public-key")?;
    let endpoint = cli
        .cluster
        .as_deref()
        .and_then(|c| c.split(',').next())
        .context("which cluster? pass -c HOST:PORT")?
        .to_string();
    let key_file = cli
        .identity_key
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.key", cli.identity)));
    let discovery = lockstep::byz_discover::Discovery {
        endpoint,
        master,
        transport: transport(cli)?,
    };
    lockstep::byz::ByzClient::discover(discovery, &cli.identity, &key_file).await
}

/// Print who agreed and who did not (stderr, so stdout stays the answer).
fn explain(c: &lockstep::byz::ByzClient) {
    let v = &c.last_vote;
    if !v.disagreed.is_empty() || !v.silent.is_empty() {
        let mut parts = Vec::new();
        for (id, what) in &v.disagreed {
            parts.push(format!("{id} disagreed ({what})"));
        }
        if !v.silent.is_empty() {
            parts.push(format!("no answer yet from {}", v.silent.join(", ")));
        }
        eprintln!("voted by {}; {}", v.agreed.join(", "), parts.join("; "));
    }
}

async fn byz_command(cli: &Cli, cmd: &Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Put { key, value } => print_previous(byz_call(cli, async |c| c.put(key, value).await).await?),
        Cmd::Get { key } => print_found(byz_call(cli, async |c| c.get(key).await).await?),
        Cmd::Delete { key } => print_previous(byz_call(cli, async |c| c.delete(key).await).await?),
        Cmd::Cas { key, old, new } => {
            let (swapped, current) = byz_call(cli, async |c| {
                c.cas(key, cas_value(old).as_deref(), cas_value(new).as_deref()).await
            })
            .await?;
            print_cas(swapped, current);
        }
        Cmd::Watch { from, until } => byz_watch(cli, *from, *until).await?,
        Cmd::Status { output } => byz_status(cli, *output).await?,
        Cmd::Bench(args) => byz_bench(cli, args).await?,
        _ => anyhow::bail!("this command does not apply to a Byzantine cluster"),
    }
    Ok(())
}

/// One request on a client stream of its own: the stream is closed and the vote explained
/// (stderr) before the answer, or the error, is returned.
async fn byz_call<T>(
    cli: &Cli,
    call: impl AsyncFnOnce(&mut lockstep::byz::ByzClient) -> Result<T, ClientError>,
) -> anyhow::Result<T> {
    let mut c = byz_client(cli).await?;
    let answer = call(&mut c).await;
    c.close().await;
    explain(&c);
    Ok(answer?)
}

/// One JSON line per applied entry, with who voted for it and who disagreed.
async fn byz_watch(cli: &Cli, from: u64, until: Option<u64>) -> anyhow::Result<()> {
    let c = byz_client(cli).await?;
    let mut rx = c.watch(from).await?;
    while let Some(item) = rx.recv().await {
        let (e, vote) = item.map_err(anyhow::Error::msg)?;
        let mut line = watch_line(&e);
        line["votedBy"] = serde_json::json!(vote.agreed);
        line["disagreed"] = serde_json::json!(vote.disagreed.iter().map(|d| d.0.clone()).collect::<Vec<_>>());
        println!("{line}");
        if until.is_some_and(|u| e.index >= u) {
            break;
        }
    }
    Ok(())
}

/// `n` Byzantine clients (not yet opened) that send a no-op every `interval` when idle.
async fn byz_clients(cli: &Cli, n: usize, interval: Duration) -> anyhow::Result<Vec<lockstep::byz::ByzClient>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = byz_client(cli).await?;
        c.noop_interval = interval;
        clients.push(c);
    }
    Ok(clients)
}

/// The workload over signed client streams, one per benchmark client, with `--idle` more
/// streams that only send no-ops.
async fn byz_bench(cli: &Cli, args: &BenchArgs) -> anyhow::Result<()> {
    let interval = Duration::from_millis(args.noop_interval_ms.max(1));
    let mut idlers = byz_clients(cli, args.idle, interval).await?;
    let opening = Instant::now();
    for c in idlers.iter_mut() {
        c.open().await?;
    }
    if args.idle > 0 {
        eprintln!(
            "bench: {} idle clients connected in {:.2}s (no-op every {} ms)",
            args.idle,
            opening.elapsed().as_secs_f64(),
            args.noop_interval_ms
        );
    }
    let streams = if args.batch > 0 {
        args.batch_streams.clamp(1, args.clients.max(1))
    } else {
        args.clients
    };
    let mut clients = byz_clients(cli, streams, interval).await?;
    // Streams are opened (admitted by the configuration master) before the measured window,
    // as the idle ones are: the window measures the workload, not the admissions.
    let opening = Instant::now();
    futures::future::try_join_all(clients.iter_mut().map(|c| c.open())).await?;
    eprintln!(
        "bench: {streams} client stream(s) opened in {:.2}s",
        opening.elapsed().as_secs_f64()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let report = if args.batch > 0 {
        let batcher = lockstep::byz_batch::ByzBatcher::spawn(clients, args.batch);
        let label = format!("byzantine-batch{}", args.batch);
        let report = run_workload(&label, args.workload_options(), |_| batcher.clone(), stop).await?;
        batcher.close().await;
        report
    } else {
        let pool = std::sync::Mutex::new(clients.into_iter().map(Some).collect::<Vec<_>>());
        let take = |i: usize| {
            pool.lock()
                .ok()
                .and_then(|mut p| p.get_mut(i).and_then(Option::take))
                .expect("one prepared client per index")
        };
        run_workload("byzantine", args.workload_options(), take, stop).await?
    };
    println!("{report}");
    for mut c in idlers {
        c.close().await;
    }
    check_history(args)
}

/// Per replica: what it reports about itself, and how it voted on a few probe reads.
async fn byz_status(cli: &Cli, output: Format) -> anyhow::Result<()> {
    let mut c = byz_client(cli).await?;
    let probe_error = probe_reads(&mut c).await;
    c.close().await;
    let tallies = c.tallies();
    let info = c.info();
    let rows = replica_rows(cli, &info, &tallies).await?;
    let reported = evidence_against(&rows);
    match output {
        Format::Json => print_byz_status_json(&info, &rows, &reported, probe_error)?,
        Format::Table => print_byz_status_table(&info, &rows, &reported, probe_error),
    }
    Ok(())
}

/// Up to three reads, so that every replica gets a vote to tally; the first error, if any.
async fn probe_reads(c: &mut lockstep::byz::ByzClient) -> Option<String> {
    for _ in 0..3 {
        if let Err(e) = c.get("lockstep-status-probe").await {
            return Some(e.to_string());
        }
    }
    None
}

/// One replica in `byz status`: its own report (or why it has none) and how it voted.
struct ReplicaRow {
    replica: lockstep::byz::ReplicaInfo,
    status: Result<lockstep_proto::StatusResponse, String>,
    votes: lockstep::byz::Tally,
}

/// Every replica's status, asked directly, beside its votes in `tallies`.
async fn replica_rows(
    cli: &Cli,
    info: &lockstep::byz::ClusterInfo,
    tallies: &BTreeMap<String, lockstep::byz::Tally>,
) -> anyhow::Result<Vec<ReplicaRow>> {
    let mut rows = Vec::new();
    let transport = transport(cli)?;
    for r in &info.replicas {
        rows.push(ReplicaRow {
            replica: r.clone(),
            status: lockstep::status_of(&transport, &r.endpoint, Duration::from_secs(2)).await,
            votes: tallies.get(&r.id).cloned().unwrap_or_default(),
        });
    }
    Ok(rows)
}

/// Evidence each replica holds against the others: per accused replica, one line per kind.
fn evidence_against(rows: &[ReplicaRow]) -> BTreeMap<String, Vec<String>> {
    let mut reported: BTreeMap<String, Vec<String>> = Default::default();
    for row in rows {
        if let Ok(s) = &row.status {
            for e in s.byzantine.iter().flat_map(|b| b.evidence.iter()) {
                reported
                    .entry(e.peer.clone())
                    .or_default()
                    .push(format!("{} x{} (seen by {})", e.kind, e.count, row.replica.id));
            }
        }
    }
    reported
}

fn print_byz_status_json(
    info: &lockstep::byz::ClusterInfo,
    rows: &[ReplicaRow],
    reported: &BTreeMap<String, Vec<String>>,
    probe_error: Option<String>,
) -> anyhow::Result<()> {
    let members: Vec<_> = rows
        .iter()
        .map(|ReplicaRow { replica: r, status, votes: t }| match status {
            Ok(s) => serde_json::json!({
                "id": r.id, "endpoint": r.endpoint, "state": s.state, "era": s.epoch,
                "version": s.machine.as_ref().map(|m| m.version.clone()),
                "appliedIndex": s.applied_index,
                "votes": t, "evidence": reported.get(&r.id),
                "inject": s.byzantine.as_ref().map(|b| b.inject.clone()).filter(|i| !i.is_empty()),
            }),
            Err(e) => serde_json::json!({"id": r.id, "endpoint": r.endpoint, "state": "unreachable", "error": e, "votes": t}),
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "failureModel": "Byzantine", "t": info.t, "era": info.era, "stability": info.stability,
            "probe": probe_error.unwrap_or_else(|| "ok".into()), "members": members
        }))?
    );
    Ok(())
}

fn print_byz_status_table(
    info: &lockstep::byz::ClusterInfo,
    rows: &[ReplicaRow],
    reported: &BTreeMap<String, Vec<String>>,
    probe_error: Option<String>,
) {
    println!(
        "Byzantine, t = {} ({} replicas, answers need {} matching), era {}, {}",
        info.t,
        info.replicas.len(),
        info.t + 1,
        info.era,
        info.stability
    );
    println!(
        "{:<10} {:<11} {:>5} {:<12} {:>8}  {:<24} EVIDENCE",
        "ID", "STATE", "ERA", "VERSION", "INDEX", "VOTES agree/differ/silent"
    );
    for ReplicaRow {
        replica: r,
        status,
        votes: t,
    } in rows
    {
        let votes = format!("{}/{}/{}", t.agreed, t.disagreed + t.bad_signature, t.silent);
        let evidence = reported.get(&r.id).map_or("-".to_string(), |v| v.join("; "));
        match status {
            Ok(s) => println!(
                "{:<10} {:<11} {:>5} {:<12} {:>8}  {:<24} {}",
                r.id,
                s.state,
                s.epoch,
                s.machine.as_ref().map_or("?".into(), |m| m.version.clone()),
                s.applied_index,
                votes,
                evidence
            ),
            Err(e) => println!(
                "{:<10} {:<11} {:>5} {:<12} {:>8}  {:<24} {} ({e})",
                r.id, "unreachable", "-", "-", "-", votes, evidence
            ),
        }
    }
    if let Some(e) = probe_error {
        println!("probe reads failed: {e}");
    }
}

fn show(v: Option<String>) -> String {
    v.unwrap_or_else(|| "(none)".into())
}

/// `put` and `delete`: the previous value.
fn print_previous(prev: Option<String>) {
    println!("OK (previous: {})", show(prev));
}

/// `get`: the value, or exit 3 when there is none.
fn print_found(value: Option<String>) {
    match value {
        Some(v) => println!("{v}"),
        None => {
            eprintln!("(not found)");
            std::process::exit(3);
        }
    }
}

/// `cas`: whether it swapped and what is there now; exit 4 when it did not swap.
fn print_cas(swapped: bool, current: Option<String>) {
    println!(
        "{} (current: {})",
        if swapped { "SWAPPED" } else { "NOT SWAPPED" },
        show(current)
    );
    if !swapped {
        std::process::exit(4);
    }
}

/// A `cas` argument: "-" means absent.
fn cas_value(s: &str) -> Option<String> {
    (s != "-").then(|| s.to_string())
}

/// `watch`: an applied entry as one JSON object.
fn watch_line(e: &lockstep_proto::AppliedEntry) -> serde_json::Value {
    let command = e.command.as_ref().map(|c| {
        serde_json::json!({"client": c.client_id, "sequence": c.sequence,
            "payload": String::from_utf8_lossy(&c.payload)})
    });
    serde_json::json!({
        "index": e.index, "epoch": e.epoch, "kind": e.kind, "command": command,
        "output": String::from_utf8_lossy(&e.output),
        "machine": e.machine.as_ref().map(|m| format!("{} {}", m.name, m.version)),
    })
}

impl BenchArgs {
    fn workload_options(&self) -> WorkloadOptions {
        WorkloadOptions {
            clients: self.clients,
            duration: Duration::from_secs(self.duration),
            value_size: self.value_size,
            keys: self.keys,
            mix: self.mix,
            history: self.history.clone(),
        }
    }
}

/// With `--history FILE --check`: check the recorded history; exit 1 when it is not
/// linearizable.
fn check_history(args: &BenchArgs) -> anyhow::Result<()> {
    if let (Some(path), true) = (&args.history, args.check) {
        let h = lockstep_linearizability::parse_history(std::io::BufReader::new(std::fs::File::open(path)?))?;
        let r = lockstep_linearizability::check_kv(&h, Default::default());
        println!("history {}: {r}", path.display());
        if !r.is_linearizable() {
            std::process::exit(1);
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Up(args) => up(&cli, args).await,
        Cmd::AddClient { name } => add_client(&cli, name),
        Cmd::Keygen { file } => keygen(file),
        cmd if byz_mode(&cli) => byz_command(&cli, cmd).await,
        Cmd::Put { key, value } => {
            print_previous(client(&cli)?.put(key, value).await?);
            Ok(())
        }
        Cmd::Get { key } => {
            print_found(client(&cli)?.get(key).await?);
            Ok(())
        }
        Cmd::Delete { key } => {
            print_previous(client(&cli)?.delete(key).await?);
            Ok(())
        }
        Cmd::Cas { key, old, new } => {
            let (swapped, current) = client(&cli)?
                .cas(key, cas_value(old).as_deref(), cas_value(new).as_deref())
                .await?;
            print_cas(swapped, current);
            Ok(())
        }
        Cmd::Status { output } => status(&cli, *output).await,
        Cmd::Watch { from, until } => watch(&cli, *from, *until).await,
        Cmd::Bench(args) => bench(&cli, args).await,
        Cmd::Replica { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// `lockstep up FILE`: run the cluster in the foreground until Ctrl-C.
async fn up(cli: &Cli, args: &UpArgs) -> anyhow::Result<()> {
    lockstep_replica::init_tracing(false);
    let mut injected = BTreeMap::new();
    for i in &args.inject {
        let (who, what) = i
            .split_once('=')
            .with_context(|| format!("--inject {i}: expected replica-N=BEHAVIOUR"))?;
        lockstep_replica::byz::inject::Behaviour::parse(what).map_err(anyhow::Error::msg)?;
        injected.insert(who.to_string(), what.to_string());
    }
    lockstep::up::up(lockstep::up::UpOptions {
        file: args.file.clone(),
        data_dir: cli.data_dir.clone(),
        failure_timeout: Duration::from_millis(args.failure_timeout_ms),
        fenced_grace: Duration::from_millis(args.fenced_grace_ms),
        no_fsync: args.no_fsync,
        quiet: args.quiet,
        inject: injected,
        client_timeout: Duration::from_millis(args.client_timeout_ms),
        insecure: args.insecure_replicas,
        tls_lifetimes: lockstep::pki::Lifetimes {
            leaf: args.cert_validity,
            ca: args.ca_validity,
        },
    })
    .await
}

/// A new client identity of a local Byzantine cluster.
fn add_client(cli: &Cli, name: &str) -> anyhow::Result<()> {
    let dir = cluster_dir_of(cli)?;
    let key = lockstep::byz::add_client(&dir, name)?;
    println!(
        "client '{name}': public key {} in {}; secret key in {}",
        hex_key(&key.to_bytes()),
        dir.join(lockstep::byz::IDENTITIES_DIR).join(name).display(),
        dir.join(lockstep::byz::CLIENT_KEYS_DIR)
            .join(format!("{name}.key"))
            .display()
    );
    Ok(())
}

/// A client key pair for a cluster elsewhere: the secret to `file`, the public key to stdout.
fn keygen(file: &std::path::Path) -> anyhow::Result<()> {
    let key = lockstep_replica::byz::keys::random_signing_key();
    if file.exists() {
        anyhow::bail!("{} exists: not overwriting a key", file.display());
    }
    lockstep_replica::byz::keys::write_private(
        file,
        lockstep_replica::byz::keys::encode_key(&key.to_bytes()).as_bytes(),
    )?;
    println!("{}", hex_key(&key.verifying_key().to_bytes()));
    Ok(())
}

/// One JSON line per applied entry.
async fn watch(cli: &Cli, from: u64, until: Option<u64>) -> anyhow::Result<()> {
    let mut stream = client(cli)?.watch(from).await?;
    while let Some(e) = stream.message().await? {
        println!("{}", watch_line(&e));
        if until.is_some_and(|u| e.index >= u) {
            break;
        }
    }
    Ok(())
}

/// The workload against a fail-stop cluster; Ctrl-C ends it early.
async fn bench(cli: &Cli, args: &BenchArgs) -> anyhow::Result<()> {
    let endpoints = resolve_endpoints(
        cli.cluster
            .as_deref()
            .context("which cluster? pass -c NAME or -c host:port,...")?,
        &cli.data_dir,
    )?;
    let opts = args.workload_options();
    eprintln!(
        "bench: {} clients for {}s against {}",
        args.clients,
        args.duration,
        endpoints.join(",")
    );
    let stop = Arc::new(AtomicBool::new(false));
    let interrupted = tokio::spawn(stop_on_ctrl_c(stop.clone()));
    let progress = tokio::spawn(show_progress(args.duration));
    let transport = transport(cli)?;
    let report = run_workload(
        "lockstep",
        opts,
        |_| Client::new(endpoints.clone()).with_transport(transport.clone()),
        stop,
    )
    .await?;
    progress.abort();
    interrupted.abort();
    println!("{report}");
    check_history(args)
}

/// Ctrl-C (SIGINT) ends a benchmark early: in-flight operations finish, then the report and
/// the history are written as at the end of the duration.
async fn stop_on_ctrl_c(stop: Arc<AtomicBool>) {
    if tokio::signal::ctrl_c().await.is_ok() {
        eprintln!("\nbench: interrupted, finishing in-flight operations");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A benchmark's seconds so far, on stderr.
async fn show_progress(seconds: u64) {
    for s in 1..=seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprint!("\r  {s}/{seconds}s");
    }
    eprintln!();
}

async fn status(cli: &Cli, output: Format) -> anyhow::Result<()> {
    let mut c = client(cli)?;
    let all = c.status_all().await;
    match output {
        Format::Json => {
            let members: Vec<_> = all
                .iter()
                .map(|(ep, r)| match r {
                    Ok(s) => serde_json::json!({
                        "id": s.id, "endpoint": ep, "state": s.state, "epoch": s.epoch,
                        "version": s.machine.as_ref().map(|m| m.version.clone()),
                        "machine": s.machine.as_ref().map(|m| m.name.clone()),
                        "appliedIndex": s.applied_index, "commitIndex": s.commit_index,
                        "sealedAt": (s.sealed_at > 0).then_some(s.sealed_at),
                    }),
                    Err(e) => serde_json::json!({"endpoint": ep, "state": "unreachable", "error": e}),
                })
                .collect();
            let epoch = all.iter().filter_map(|(_, r)| r.as_ref().ok()).map(|s| s.epoch).max();
            let primary = all
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .find(|s| s.state == "primary" && Some(s.epoch) == epoch)
                .map(|s| s.id.clone());
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"epoch": epoch, "primary": primary, "members": members})
                )?
            );
        }
        Format::Table => {
            println!(
                "{:<12} {:<13} {:>6} {:<16} {:>10} {:>10}  ENDPOINT",
                "ID", "STATE", "EPOCH", "VERSION", "APPLIED", "COMMIT"
            );
            for (ep, r) in &all {
                match r {
                    Ok(s) => println!(
                        "{:<12} {:<13} {:>6} {:<16} {:>10} {:>10}  {}",
                        s.id,
                        if s.sealed_at > 0 {
                            format!("{} (sealed)", s.state)
                        } else {
                            s.state.clone()
                        },
                        s.epoch,
                        s.machine
                            .as_ref()
                            .map_or("?".into(), |m| format!("{} {}", m.name, m.version)),
                        s.applied_index,
                        s.commit_index,
                        ep.trim_start_matches("http://")
                    ),
                    Err(e) => println!(
                        "{:<12} {:<13} {:>6} {:<16} {:>10} {:>10}  {} ({e})",
                        "?", "unreachable", "-", "-", "-", "-", ep
                    ),
                }
            }
        }
    }
    Ok(())
}
