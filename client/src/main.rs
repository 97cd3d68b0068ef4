//! `lockstep`: run a local cluster (`up`), talk to a cluster (put/get/delete/cas, status,
//! watch), load it (`bench`), or run one replica process (`replica`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use lockstep::bench::{Mix, WorkloadOptions, run_workload};
use lockstep::cluster::{DEFAULT_DATA_DIR, resolve_endpoints};
use lockstep::{Client, ClientError};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

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
    Up {
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
    },
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
    Bench {
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
    },
    /// Run one replica process (what `up` starts; `lockstep-replica` is the same).
    Replica {
        #[command(flatten)]
        args: Box<lockstep_replica::ReplicaArgs>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

/// mimalloc instead of glibc's malloc: fewer instructions per allocation on the write path
/// (docs/benchmarks.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        Cmd::Put { key, value } => {
            let mut c = byz_client(cli).await?;
            let prev = c.put(key, value).await;
            c.close().await;
            explain(&c);
            println!("OK (previous: {})", show(prev?));
        }
        Cmd::Get { key } => {
            let mut c = byz_client(cli).await?;
            let got = c.get(key).await;
            c.close().await;
            explain(&c);
            match got? {
                Some(v) => println!("{v}"),
                None => {
                    eprintln!("(not found)");
                    std::process::exit(3);
                }
            }
        }
        Cmd::Delete { key } => {
            let mut c = byz_client(cli).await?;
            let prev = c.delete(key).await;
            c.close().await;
            explain(&c);
            println!("OK (previous: {})", show(prev?));
        }
        Cmd::Cas { key, old, new } => {
            let opt = |s: &str| (s != "-").then(|| s.to_string());
            let mut c = byz_client(cli).await?;
            let r = c.cas(key, opt(old).as_deref(), opt(new).as_deref()).await;
            c.close().await;
            explain(&c);
            let (swapped, current) = r?;
            println!(
                "{} (current: {})",
                if swapped { "SWAPPED" } else { "NOT SWAPPED" },
                show(current)
            );
            if !swapped {
                std::process::exit(4);
            }
        }
        Cmd::Watch { from, until } => {
            let c = byz_client(cli).await?;
            let mut rx = c.watch(*from).await?;
            while let Some(item) = rx.recv().await {
                let (e, vote) = item.map_err(anyhow::Error::msg)?;
                let command = e.command.as_ref().map(|c| {
                    serde_json::json!({"client": c.client_id, "sequence": c.sequence,
                        "payload": String::from_utf8_lossy(&c.payload)})
                });
                let line = serde_json::json!({
                    "index": e.index, "epoch": e.epoch, "kind": e.kind, "command": command,
                    "output": String::from_utf8_lossy(&e.output),
                    "machine": e.machine.as_ref().map(|m| format!("{} {}", m.name, m.version)),
                    "votedBy": vote.agreed, "disagreed": vote.disagreed.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
                });
                println!("{line}");
                if until.is_some_and(|u| e.index >= u) {
                    break;
                }
            }
        }
        Cmd::Status { output } => byz_status(cli, *output).await?,
        Cmd::Bench {
            clients,
            duration,
            value_size,
            keys,
            mix,
            history,
            check,
            idle,
            noop_interval_ms,
        } => {
            let interval = Duration::from_millis((*noop_interval_ms).max(1));
            let mut idlers = Vec::new();
            for _ in 0..*idle {
                let mut c = byz_client(cli).await?;
                c.noop_interval = interval;
                idlers.push(c);
            }
            for c in idlers.iter_mut() {
                c.open().await?;
            }
            if *idle > 0 {
                eprintln!("bench: {idle} idle clients connected (no-op every {noop_interval_ms} ms)");
            }
            let mut pool = Vec::new();
            for _ in 0..*clients {
                let mut c = byz_client(cli).await?;
                c.noop_interval = interval;
                pool.push(Some(c));
            }
            let pool = std::sync::Mutex::new(pool);
            let opts = WorkloadOptions {
                clients: *clients,
                duration: Duration::from_secs(*duration),
                value_size: *value_size,
                keys: *keys,
                mix: *mix,
                history: history.clone(),
            };
            let report = run_workload(
                "byzantine",
                opts,
                |i| {
                    pool.lock()
                        .ok()
                        .and_then(|mut p| p.get_mut(i).and_then(Option::take))
                        .expect("one prepared client per index")
                },
                Arc::new(AtomicBool::new(false)),
            )
            .await?;
            println!("{report}");
            for mut c in idlers {
                c.close().await;
            }
            if let (Some(path), true) = (history, check) {
                let h = lockstep_linearizability::parse_history(std::io::BufReader::new(std::fs::File::open(path)?))?;
                let r = lockstep_linearizability::check_kv(&h, Default::default());
                println!("history {}: {r}", path.display());
                if !r.is_linearizable() {
                    std::process::exit(1);
                }
            }
        }
        _ => anyhow::bail!("this command does not apply to a Byzantine cluster"),
    }
    Ok(())
}

/// Per replica: what it reports about itself, and how it voted on a few probe reads.
async fn byz_status(cli: &Cli, output: Format) -> anyhow::Result<()> {
    let mut c = byz_client(cli).await?;
    let mut probe_error = None;
    for _ in 0..3 {
        if let Err(e) = c.get("lockstep-status-probe").await {
            probe_error = Some(e.to_string());
            break;
        }
    }
    c.close().await;
    let tallies = c.tallies();
    let info = c.info();
    let mut rows = Vec::new();
    let transport = transport(cli)?;
    for r in &info.replicas {
        let s = lockstep::status_of(&transport, &r.endpoint, Duration::from_secs(2)).await;
        let t = tallies.get(&r.id).cloned().unwrap_or_default();
        rows.push((r.clone(), s, t));
    }
    // Evidence each replica holds against the others.
    let mut reported: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (r, s, _) in &rows {
        if let Ok(s) = s {
            for e in s.byzantine.iter().flat_map(|b| b.evidence.iter()) {
                reported
                    .entry(e.peer.clone())
                    .or_default()
                    .push(format!("{} x{} (seen by {})", e.kind, e.count, r.id));
            }
        }
    }
    match output {
        Format::Json => {
            let members: Vec<_> = rows
                .iter()
                .map(|(r, s, t)| match s {
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
                    "probe": probe_error.clone().unwrap_or_else(|| "ok".into()), "members": members
                }))?
            );
        }
        Format::Table => {
            println!(
                "Byzantine, t = {} ({} replicas, answers need {} matching), era {}, {}",
                info.t,
                info.replicas.len(),
                info.t + 1,
                info.era,
                info.stability
            );
            println!(
                "{:<10} {:<10} {:>5} {:<12} {:>8}  {:<24} EVIDENCE",
                "ID", "STATE", "ERA", "VERSION", "INDEX", "VOTES agree/differ/silent"
            );
            for (r, s, t) in &rows {
                let votes = format!("{}/{}/{}", t.agreed, t.disagreed + t.bad_signature, t.silent);
                let evidence = reported.get(&r.id).map_or("-".to_string(), |v| v.join("; "));
                match s {
                    Ok(s) => println!(
                        "{:<10} {:<10} {:>5} {:<12} {:>8}  {:<24} {}",
                        r.id,
                        s.state,
                        s.epoch,
                        s.machine.as_ref().map_or("?".into(), |m| m.version.clone()),
                        s.applied_index,
                        votes,
                        evidence
                    ),
                    Err(e) => println!(
                        "{:<10} {:<10} {:>5} {:<12} {:>8}  {:<24} {} ({e})",
                        r.id, "unreachable", "-", "-", "-", votes, evidence
                    ),
                }
            }
            if let Some(e) = probe_error {
                println!("probe reads failed: {e}");
            }
        }
    }
    Ok(())
}

fn show(v: Option<String>) -> String {
    v.unwrap_or_else(|| "(none)".into())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Up {
            file,
            failure_timeout_ms,
            fenced_grace_ms,
            no_fsync,
            quiet,
            client_timeout_ms,
            inject,
            insecure_replicas,
            cert_validity,
            ca_validity,
        } => {
            lockstep_replica::init_tracing(false);
            let mut injected = std::collections::BTreeMap::new();
            for i in inject {
                let (who, what) = i
                    .split_once('=')
                    .with_context(|| format!("--inject {i}: expected replica-N=BEHAVIOUR"))?;
                lockstep_replica::byz::inject::Behaviour::parse(what).map_err(anyhow::Error::msg)?;
                injected.insert(who.to_string(), what.to_string());
            }
            lockstep::up::up(lockstep::up::UpOptions {
                file: file.clone(),
                data_dir: cli.data_dir.clone(),
                failure_timeout: Duration::from_millis(*failure_timeout_ms),
                fenced_grace: Duration::from_millis(*fenced_grace_ms),
                no_fsync: *no_fsync,
                quiet: *quiet,
                inject: injected,
                client_timeout: Duration::from_millis(*client_timeout_ms),
                insecure: *insecure_replicas,
                tls_lifetimes: lockstep::pki::Lifetimes {
                    leaf: *cert_validity,
                    ca: *ca_validity,
                },
            })
            .await
        }
        Cmd::AddClient { name } => {
            let dir = cluster_dir_of(&cli)?;
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
        Cmd::Keygen { file } => {
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
        cmd if byz_mode(&cli) => byz_command(&cli, cmd).await,
        Cmd::Put { key, value } => {
            let prev = client(&cli)?.put(key, value).await?;
            println!("OK (previous: {})", show(prev));
            Ok(())
        }
        Cmd::Get { key } => {
            match client(&cli)?.get(key).await? {
                Some(v) => println!("{v}"),
                None => {
                    eprintln!("(not found)");
                    std::process::exit(3);
                }
            }
            Ok(())
        }
        Cmd::Delete { key } => {
            let prev = client(&cli)?.delete(key).await?;
            println!("OK (previous: {})", show(prev));
            Ok(())
        }
        Cmd::Cas { key, old, new } => {
            let opt = |s: &str| (s != "-").then(|| s.to_string());
            let (swapped, current) = client(&cli)?.cas(key, opt(old).as_deref(), opt(new).as_deref()).await?;
            println!(
                "{} (current: {})",
                if swapped { "SWAPPED" } else { "NOT SWAPPED" },
                show(current)
            );
            if !swapped {
                std::process::exit(4);
            }
            Ok(())
        }
        Cmd::Status { output } => status(&cli, *output).await,
        Cmd::Watch { from, until } => {
            let mut stream = client(&cli)?.watch(*from).await?;
            while let Some(e) = stream.message().await? {
                let command = e.command.as_ref().map(|c| {
                    serde_json::json!({"client": c.client_id, "sequence": c.sequence,
                        "payload": String::from_utf8_lossy(&c.payload)})
                });
                let line = serde_json::json!({
                    "index": e.index, "epoch": e.epoch, "kind": e.kind, "command": command,
                    "output": String::from_utf8_lossy(&e.output),
                    "machine": e.machine.as_ref().map(|m| format!("{} {}", m.name, m.version)),
                });
                println!("{line}");
                if until.is_some_and(|u| e.index >= u) {
                    break;
                }
            }
            Ok(())
        }
        Cmd::Bench {
            clients,
            duration,
            value_size,
            keys,
            mix,
            history,
            check,
            ..
        } => {
            let endpoints = resolve_endpoints(
                cli.cluster
                    .as_deref()
                    .context("which cluster? pass -c NAME or -c host:port,...")?,
                &cli.data_dir,
            )?;
            let opts = WorkloadOptions {
                clients: *clients,
                duration: Duration::from_secs(*duration),
                value_size: *value_size,
                keys: *keys,
                mix: *mix,
                history: history.clone(),
            };
            eprintln!(
                "bench: {clients} clients for {duration}s against {}",
                endpoints.join(",")
            );
            // Ctrl-C (SIGINT) ends the run early: in-flight operations finish, then the report
            // and the history are written as at the end of the duration.
            let stop = Arc::new(AtomicBool::new(false));
            let interrupted = tokio::spawn({
                let stop = stop.clone();
                async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!("\nbench: interrupted, finishing in-flight operations");
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
            let progress = tokio::spawn({
                let d = *duration;
                async move {
                    for s in 1..=d {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        eprint!("\r  {s}/{d}s");
                    }
                    eprintln!();
                }
            });
            let transport = transport(&cli)?;
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
            if let (Some(path), true) = (history, check) {
                let h = lockstep_linearizability::parse_history(std::io::BufReader::new(std::fs::File::open(path)?))?;
                let r = lockstep_linearizability::check_kv(&h, Default::default());
                println!("history {}: {r}", path.display());
                if !r.is_linearizable() {
                    std::process::exit(1);
                }
            }
            Ok(())
        }
        Cmd::Replica { .. } => unreachable!("handled before the runtime starts"),
    }
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
    let _ = ClientError::Rejected(String::new());
    Ok(())
}
