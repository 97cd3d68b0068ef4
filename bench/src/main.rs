//! `lockstep-bench`: the measurements of issue 2 in one command.
//!
//! 1. starts a local lockstep t = 1 cluster (2 replicas, fsync on) with the real
//!    `lockstep up manifests/examples/kv-failstop.yaml`, and a 3-member etcd cluster (t = 1 for
//!    Raft, default durability) on loopback;
//! 2. drives both with the same load generator (`lockstep::bench::run_workload`, write mix,
//!    256-byte values, 1000 keys) for 1, 8 and 64 concurrent clients;
//! 3. measures replica memory after the load and at rest;
//! 4. `kill -9`s the lockstep primary under 8 writing clients, several times, and measures the
//!    time from the kill to the first acknowledged write that started after it.
//!
//! It prints numbers; it is a benchmark, not a pass/fail test. Every child process is stopped
//! at the end, on error, and on Ctrl-C.
//!
//! ```text
//! cargo build --release -p lockstep -p lockstep-bench
//! target/release/lockstep-bench
//! ```

mod etcd;
mod floor;
mod local;
mod procs;
mod stages;

use anyhow::{Context, bail};
use clap::Parser;
use lockstep::bench::{KvBackend, Mix, Op, Report, WorkloadOptions, run_workload};
use lockstep_linearizability::{OpKind, Outcome};
use procs::{metric_sum, rss_bytes};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "lockstep-bench",
    version,
    about = "lockstep vs etcd: write throughput, latency, fail-over, memory"
)]
struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent client counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    clients: Vec<usize>,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Operation mixes to measure, each at every client count (write, read, read-mostly,
    /// half). Reads are linearizable on both systems (etcd: a default, quorum `Range`).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "write")]
    mix: Vec<Mix>,
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Seconds of unreported warm-up load (8 clients) per target.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Number of kill -9 fail-over trials (0 skips them).
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Writing clients during the fail-over trials.
    #[arg(long, default_value_t = 8)]
    failover_clients: usize,
    /// Seconds of idle time before measuring memory at rest.
    #[arg(long, default_value_t = 5)]
    idle: u64,
    /// The `lockstep` CLI binary (default: next to this executable).
    #[arg(long)]
    lockstep_bin: Option<PathBuf>,
    /// etcd server binary (Debian: `apt-get install -y etcd-server`).
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// Skip etcd (lockstep numbers only).
    #[arg(long)]
    skip_etcd: bool,
    /// The ReplicatedStateMachine to run (default: manifests/examples/kv-failstop.yaml).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Where the temporary data dirs go. Must be a real disk, not tmpfs, or fsync is free.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Run lockstep plaintext (`lockstep up --insecure`), as etcd runs here, to compare the
    /// two with the same transport; TLS (the default of `up`) otherwise.
    #[arg(long)]
    insecure: bool,
    /// Keep the data dirs and logs after the run (their path is printed).
    #[arg(long)]
    keep: bool,
    /// Also write all results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lockstep-bench: cannot start: {e}");
            std::process::exit(1);
        }
    };
    // The benchmark future owns every child-process guard: on Ctrl-C it is dropped, and the
    // guards stop the clusters before we exit.
    let code = rt.block_on(async {
        tokio::select! {
            r = run(args) => match r {
                Ok(()) => 0,
                Err(e) => { eprintln!("lockstep-bench: error: {e:#}"); 1 }
            },
            _ = tokio::signal::ctrl_c() => { eprintln!("lockstep-bench: interrupted; stopping the clusters"); 130 }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(serde::Serialize, Debug, Clone)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    kernel: String,
    work_dir: String,
    work_dir_fs: String,
    /// Its fdatasyncs also write the inode when the mtime moves (docs/operations.md).
    ext4_without_journal_or_lazytime: bool,
    loadavg_at_start: String,
    etcd: Option<String>,
}

/// Disk work of one node during one run, from its /metrics.
#[derive(serde::Serialize, Debug, Clone)]
struct DiskStats {
    node: String,
    fsyncs_per_sec: f64,
    entries_per_fsync: f64,
    mean_fsync_ms: f64,
}

#[derive(serde::Serialize, Debug, Clone)]
struct Run {
    /// The operation mix (`Mix::name`).
    mix: String,
    report: Report,
    disk: Vec<DiskStats>,
    /// Where one write's time goes, per node (lockstep only; see `stages.rs`).
    stages: Vec<stages::NodeStages>,
    /// CPU use per process during the run, in % of one core.
    cpu_percent: BTreeMap<String, f64>,
}

#[derive(serde::Serialize, Debug, Clone)]
struct Failover {
    trial: usize,
    killed: String,
    epoch_before: u64,
    /// kill -9 -> first acknowledged write that was issued after the kill.
    failover_ms: Option<f64>,
    /// kill -9 -> the configuration master persisted the next epoch (cluster.json).
    reconfigured_ms: Option<f64>,
    /// kill -9 -> two members in primary/backup state again (replacement joined).
    rejoin_ms: Option<f64>,
    ok: u64,
    failed: u64,
    unknown: u64,
}

#[derive(serde::Serialize, Debug, Clone)]
struct Memory {
    process: String,
    after_load_bytes: Option<u64>,
    at_rest_bytes: Option<u64>,
}

#[derive(serde::Serialize, Debug, Clone)]
struct Results {
    machine: Machine,
    command: String,
    /// lockstep replicas (t + 1).
    replicas: usize,
    runs: Vec<Run>,
    memory: Vec<Memory>,
    failovers: Vec<Failover>,
    failover_median_ms: Option<f64>,
    /// The physical floor of one durable replicated write, measured in this run.
    floor: Option<floor::Floor>,
}

// ---------------------------------------------------------------------------------------------
// Machine description

fn machine(work_dir: &Path, etcd: Option<String>) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_string());
    let canon = work_dir.canonicalize().unwrap_or_else(|_| work_dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    // /proc/mounts: device, mount point, type, options.
    let mount: Option<Vec<&str>> = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && canon.starts_with(f[1]))
        .max_by_key(|f| f[1].len());
    let fs = mount.as_ref().map_or("unknown".into(), |f| {
        format!("{} on {} ({}, {})", f[2], f[1], f[0], f[3])
    });
    // A journaled ext4 lists its device under /proc/fs/jbd2 (`vda-8`).
    let ext4_without_journal_or_lazytime = mount.as_ref().is_some_and(|f| {
        let device = f[0].rsplit('/').next().unwrap_or_default();
        f[2] == "ext4"
            && !f[3].split(',').any(|o| o == "lazytime")
            && !Path::new(&format!("/proc/fs/jbd2/{device}-8")).exists()
    });
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        work_dir: canon.display().to_string(),
        work_dir_fs: fs,
        ext4_without_journal_or_lazytime,
        loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
        etcd,
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0) // USER_HZ is 100 on Linux
}

// ---------------------------------------------------------------------------------------------
// Fail-over probe: wraps a backend and notes, relative to the kill, the first acknowledged write.

#[derive(Default)]
struct ProbeState {
    kill: Mutex<Option<Instant>>,
    first_new: Mutex<Option<Instant>>,
}

fn set_min(slot: &Mutex<Option<Instant>>, t: Instant) {
    let mut s = slot.lock().expect("probe lock");
    if s.is_none_or(|old| t < old) {
        *s = Some(t);
    }
}

struct Probe<B> {
    inner: B,
    state: Arc<ProbeState>,
}

impl<B: KvBackend> KvBackend for Probe<B> {
    async fn run(&mut self, op: &Op) -> (Outcome, Option<serde_json::Value>) {
        let call = Instant::now();
        let result = self.inner.run(op).await;
        let ret = Instant::now();
        if result.0 == Outcome::Ok && op.kind != OpKind::Get {
            let kill = *self.state.kill.lock().expect("probe lock");
            if let Some(k) = kill
                && call >= k
            {
                set_min(&self.state.first_new, ret);
            }
        }
        result
    }

    async fn finish(&mut self) {
        self.inner.finish().await;
    }
}

// ---------------------------------------------------------------------------------------------

fn fmt_ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// Whole milliseconds, `-` for none.
fn fmt_opt_ms(ms: Option<f64>) -> String {
    ms.map_or("-".into(), |v| format!("{v:.0}"))
}

fn mib(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

struct MetricNames {
    fsync_count: &'static str,
    fsync_sum: &'static str,
    entries: &'static str,
}

const LOCKSTEP_METRICS: MetricNames = MetricNames {
    fsync_count: "lockstep_replica_fsync_seconds_count",
    fsync_sum: "lockstep_replica_fsync_seconds_sum",
    entries: "lockstep_replica_entries_per_fsync_sum",
};

// etcd: WAL fsyncs per member; entries = Raft entries committed (a gauge of the commit index).
const ETCD_METRICS: MetricNames = MetricNames {
    fsync_count: "etcd_disk_wal_fsync_duration_seconds_count",
    fsync_sum: "etcd_disk_wal_fsync_duration_seconds_sum",
    entries: "etcd_server_proposals_committed_total",
};

fn disk_stats(node: &str, before: &str, after: &str, secs: f64, names: &MetricNames) -> DiskStats {
    let d = |n: &str| metric_sum(after, n) - metric_sum(before, n);
    let fsyncs = d(names.fsync_count);
    DiskStats {
        node: node.to_string(),
        fsyncs_per_sec: fsyncs / secs.max(1e-9),
        entries_per_fsync: if fsyncs > 0.0 { d(names.entries) / fsyncs } else { 0.0 },
        mean_fsync_ms: if fsyncs > 0.0 {
            d(names.fsync_sum) / fsyncs * 1000.0
        } else {
            0.0
        },
    }
}

/// Everything a measured run needs to know about the target's processes.
struct Target {
    name: &'static str,
    /// (node label, metrics address) per server process.
    metrics: Vec<(String, std::net::SocketAddr)>,
    /// (label, pid) per server process.
    pids: Vec<(String, u32)>,
    names: &'static MetricNames,
}

async fn scrape(t: &Target) -> Vec<String> {
    let mut out = Vec::new();
    for (_, addr) in &t.metrics {
        out.push(procs::http_get(*addr, "/metrics").await.unwrap_or_default());
    }
    out
}

fn measure_floor(dir: &Path, when: &str) -> Option<floor::Floor> {
    match floor::measure(dir) {
        Ok(f) => {
            println!(
                "floor ({when}): loopback round trip p50 {:.0} µs (across two CPUs; {:.0} µs on one), 256-byte append + fdatasync p50 {:.0} µs -> durable replicated write floor (2 round trips + 1 fdatasync) {:.0} µs ({:.0} µs on one CPU)",
                f.loopback_rtt_p50_us,
                f.loopback_rtt_one_cpu_p50_us,
                f.fdatasync_256b_p50_us,
                f.write_floor_us,
                f.write_floor_one_cpu_us
            );
            println!(
                "floor ({when}): the same fdatasync after 1 ms of idle disk p50 {:.0} µs; model write (the protocol with no software, both fsyncs on this disk at once) p50 {:.0} µs",
                f.fdatasync_after_idle_p50_us, f.model_write_p50_us
            );
            Some(f)
        }
        Err(e) => {
            eprintln!("floor ({when}): not measured: {e:#}");
            None
        }
    }
}

/// One pass of writes (8 clients, 2 s) under each target's key names, so reads find values.
/// `secs` of writes by 8 clients over the whole key space, on lockstep and then etcd: the
/// warm-up, and the prefill that gives reads keys that exist.
async fn write_pass<B, F>(args: &Args, secs: u64, ls_make: &F, etcd: Option<&str>) -> anyhow::Result<()>
where
    B: KvBackend,
    F: Fn(usize) -> B,
{
    let opts = workload_options(args, 8, secs, Mix::Write);
    run_workload("lockstep", opts.clone(), ls_make, Arc::new(AtomicBool::new(false))).await?;
    if let Some(url) = etcd {
        run_workload(
            "etcd",
            opts,
            |_| etcd::EtcdBackend::new(url).expect("valid etcd url"),
            Arc::new(AtomicBool::new(false)),
        )
        .await?;
    }
    Ok(())
}

fn workload_options(args: &Args, clients: usize, secs: u64, mix: Mix) -> WorkloadOptions {
    WorkloadOptions {
        clients,
        duration: Duration::from_secs(secs),
        value_size: args.value_size,
        keys: args.keys,
        mix,
        history: None,
    }
}

async fn measure<B, F>(t: &Target, opts: WorkloadOptions, make: F) -> anyhow::Result<Run>
where
    B: KvBackend,
    F: Fn(usize) -> B,
{
    let mix = opts.mix.name().to_string();
    let me = std::process::id();
    let mut pids = t.pids.clone();
    pids.push(("load generator".into(), me));
    let cpu0: Vec<Option<f64>> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let before = scrape(t).await;
    let started = Instant::now();
    let report = run_workload(t.name, opts, make, Arc::new(AtomicBool::new(false))).await?;
    let secs = started.elapsed().as_secs_f64();
    let after = scrape(t).await;
    let cpu1: Vec<Option<f64>> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let disk = t
        .metrics
        .iter()
        .zip(before.iter().zip(after.iter()))
        .map(|((node, _), (b, a))| disk_stats(node, b, a, secs, t.names))
        .collect();
    let stages = t
        .metrics
        .iter()
        .zip(before.iter().zip(after.iter()))
        .map(|((node, _), (b, a))| stages::node_stages(node, b, a))
        .filter(|n| !n.stages.is_empty())
        .collect();
    let cpu_percent = pids
        .iter()
        .zip(cpu0.iter().zip(cpu1.iter()))
        .filter_map(|((label, _), (a, b))| Some((label.clone(), (b.as_ref()? - a.as_ref()?) / secs * 100.0)))
        .collect();
    Ok(Run {
        mix,
        report,
        disk,
        stages,
        cpu_percent,
    })
}

fn print_run(r: &Run) {
    println!("{}", r.report);
    for d in &r.disk {
        println!(
            "    {:<22} {:>7.0} fsyncs/s  {:>6.1} entries/fsync  {:>6.2} ms/fsync",
            d.node, d.fsyncs_per_sec, d.entries_per_fsync, d.mean_fsync_ms
        );
    }
    let cpu: Vec<String> = r.cpu_percent.iter().map(|(k, v)| format!("{k} {v:.0}%")).collect();
    println!("    CPU (% of one core): {}", cpu.join(", "));
    for n in &r.stages {
        println!("    where one write's time goes on {} (ms):", n.node);
        println!(
            "      {:<14} {:<34} {:>8} {:>8} {:>8} {:>8}",
            "stage", "", "count", "mean", "p50", "p99"
        );
        for s in &n.stages {
            println!(
                "      {:<14} {:<34} {:>8} {:>8.3} {:>8.3} {:>8.3}",
                s.stage,
                stages::meaning(&s.stage),
                s.count,
                s.mean_ms,
                s.p50_ms,
                s.p99_ms
            );
        }
        let in_sequence: f64 = n
            .stages
            .iter()
            .filter(|s| stages::in_sequence(&s.stage))
            .map(|s| s.mean_ms)
            .sum();
        if in_sequence > 0.0 {
            println!(
                "      {:<14} {:<34} {:>8} {in_sequence:>8.3}",
                "sum", "validate .. reply (not replicate)", ""
            );
        }
        if let Some(mean) = n.execute_mean_ms {
            println!(
                "      {:<14} {:<34} {:>8} {mean:>8.3}",
                "Execute", "handler mean (request_seconds)", ""
            );
            print_outside_the_handler(r, mean);
        }
    }
}

/// For a write-only run: the clients' mean latency (closed-loop clients, so by Little's law
/// clients / throughput) and how much of it lies outside the primary's Execute handler
/// (client -> primary hop, TLS, HTTP/2, the clients themselves), which no stage covers.
fn print_outside_the_handler(r: &Run, handler_mean_ms: f64) {
    if r.mix != Mix::Write.name() || r.report.ops_per_sec <= 0.0 {
        return;
    }
    let client_mean_ms = r.report.clients as f64 * 1000.0 / r.report.ops_per_sec;
    println!(
        "      {:<14} {:<34} {:>8} {client_mean_ms:>8.3}",
        "client", "mean seen by clients (N / ops/s)", ""
    );
    println!(
        "      {:<14} {:<34} {:>8} {:>8.3}",
        "outside",
        "client mean - handler mean",
        "",
        client_mean_ms - handler_mean_ms
    );
}

fn resolve_lockstep_bin(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match arg {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("lockstep"),
    };
    if !bin.is_file() {
        bail!(
            "no lockstep binary at {} (build it: `cargo build --release -p lockstep -p lockstep-bench`, or pass --lockstep-bin)",
            bin.display()
        );
    }
    Ok(bin)
}

fn resolve_manifest(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(m) = arg {
        return Ok(m);
    }
    let rel = PathBuf::from("manifests/examples/kv-failstop.yaml");
    if rel.is_file() {
        return Ok(rel);
    }
    let from_source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/kv-failstop.yaml");
    if from_source.is_file() {
        return Ok(from_source);
    }
    bail!("cannot find manifests/examples/kv-failstop.yaml; run from the repository root or pass --manifest")
}

async fn run(args: Args) -> anyhow::Result<()> {
    let lockstep_bin = resolve_lockstep_bin(args.lockstep_bin.clone())?;
    let manifest = resolve_manifest(args.manifest.clone())?;
    let etcd_version = etcd_version(&args)?;
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    // Declared first, so it is removed last: after every guard below has stopped its process.
    let tmp = tempfile::Builder::new()
        .prefix("lockstep-bench-")
        .tempdir_in(&work_dir)?;
    let base = tmp.path().to_path_buf();
    let machine = machine(&base, etcd_version.clone());
    print_machine(&base, &machine);

    // The floor first, while nothing else of ours runs; again at the end (a busy disk or CPU
    // inflates one measurement, never deflates it: the lower one is the estimate).
    let floor_before = measure_floor(&base, "start");

    // 1 + 2: both clusters.
    let mut ls = local::LocalCluster::start(&lockstep_bin, &manifest, &base.join("lockstep"), args.insecure)?;
    let healthy = wait_lockstep(&mut ls).await?;
    let (mut ec, etcd_leader) = match &etcd_version {
        Some(_) => start_etcd(&args, &base).await.map(|(ec, url)| (Some(ec), Some(url)))?,
        None => (None, None),
    };
    let measured = measure_clusters(&args, &mut ls, &healthy, &mut ec, etcd_leader.as_deref()).await?;

    ls.stop();
    drop(ec);
    let floor = [floor_before, measure_floor(&base, "end")]
        .into_iter()
        .flatten()
        .min_by(|a, b| a.write_floor_us.total_cmp(&b.write_floor_us));
    let results = Results::new(machine, ls.replicas, measured, floor);
    print_summary(&results, &args);
    write_outputs(&results, &args, tmp)
}

/// What [`measure_clusters`] measured.
struct Measured {
    runs: Vec<Run>,
    memory: Vec<Memory>,
    failovers: Vec<Failover>,
}

/// Steps 3 to 5 on the running clusters (`ec` and its leader URL: etcd, when it runs):
/// throughput and latency, memory after the load and at rest, then the fail-over trials,
/// with etcd stopped first (they do not need it).
async fn measure_clusters(
    args: &Args,
    ls: &mut local::LocalCluster,
    healthy: &local::Healthy,
    ec: &mut Option<etcd::EtcdCluster>,
    etcd_leader: Option<&str>,
) -> anyhow::Result<Measured> {
    let lockstep_target = lockstep_target(ls, healthy)?;
    let etcd_target = ec.as_ref().map(|ec| etcd_target(ec, etcd_leader.unwrap_or_default()));
    let ls_endpoints = healthy.endpoints.clone();
    let ls_transport = ls.transport()?;
    let ls_make = |_: usize| lockstep::Client::new(ls_endpoints.clone()).with_transport(ls_transport.clone());

    // 3: throughput and latency.
    if args.warmup > 0 {
        println!("warm-up: {}s x 8 clients per target", args.warmup);
        write_pass(args, args.warmup, &ls_make, etcd_leader).await?;
    }
    let etcd = etcd_target.as_ref().zip(etcd_leader);
    let runs = measure_all(args, &lockstep_target, &ls_make, etcd).await?;

    // 5: memory after the load, then at rest.
    let memory = measure_memory(args, &lockstep_target, etcd_target.as_ref()).await;
    // etcd is not needed for the fail-over trials; give its CPU back.
    if let Some(ec) = ec {
        ec.stop();
    }

    // 4: fail-over.
    let failovers = failover_trials(ls, args).await;
    Ok(Measured {
        runs,
        memory,
        failovers,
    })
}

/// After the summary: the results as JSON (`--json`), and the data dirs kept (`--keep`).
fn write_outputs(results: &Results, args: &Args, tmp: tempfile::TempDir) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(results)?)?;
        println!("results written to {}", path.display());
    }
    if args.keep {
        let kept = tmp.keep();
        println!("data and logs kept in {}", kept.display());
    }
    Ok(())
}

/// etcd's version, `None` with `--skip-etcd`; an error when etcd is wanted but missing.
fn etcd_version(args: &Args) -> anyhow::Result<Option<String>> {
    if args.skip_etcd {
        return Ok(None);
    }
    if !args.etcd_bin.is_file() {
        bail!(
            "no etcd at {} (Debian: `apt-get install -y etcd-server`), or pass --skip-etcd",
            args.etcd_bin.display()
        );
    }
    Ok(Some(etcd::version(&args.etcd_bin)?))
}

fn print_machine(base: &Path, machine: &Machine) {
    println!("lockstep-bench: data and logs in {}", base.display());
    println!(
        "machine: {} x {} | kernel {} | {} | load {}",
        machine.nproc, machine.cpu_model, machine.kernel, machine.work_dir_fs, machine.loadavg_at_start
    );
    if machine.work_dir_fs.starts_with("tmpfs") {
        eprintln!(
            "WARNING: {} is on tmpfs: fsync costs nothing there; pass --work-dir on a real disk",
            base.display()
        );
    }
    if machine.ext4_without_journal_or_lazytime {
        println!(
            "note: ext4 without a journal or lazytime: fdatasyncs also write the inode when the \
             mtime moves (docs/operations.md, section 5)"
        );
    }
}

async fn wait_lockstep(ls: &mut local::LocalCluster) -> anyhow::Result<local::Healthy> {
    let t0 = Instant::now();
    let healthy = ls.wait_healthy(Duration::from_secs(60)).await?;
    println!(
        "lockstep: healthy in {:.1}s: epoch {}, primary {}, members {}",
        t0.elapsed().as_secs_f64(),
        healthy.epoch,
        healthy.primary,
        healthy.members.join(", ")
    );
    Ok(healthy)
}

/// A 3-member etcd and the URL of its leader, which the clients talk to.
async fn start_etcd(args: &Args, base: &Path) -> anyhow::Result<(etcd::EtcdCluster, String)> {
    let (ec, url) = etcd::EtcdCluster::start_healthy(&args.etcd_bin, &base.join("etcd"), 3).await?;
    let name = ec.member_by_url(&url).map(|m| m.name.clone()).unwrap_or_default();
    println!(
        "etcd: healthy: {} members, leader {name} ({url}) — clients talk to the leader",
        ec.members.len()
    );
    Ok((ec, url))
}

fn lockstep_target(ls: &local::LocalCluster, healthy: &local::Healthy) -> anyhow::Result<Target> {
    let mut metrics = Vec::new();
    let mut pids = Vec::new();
    for (i, id) in healthy.members.iter().enumerate() {
        let l = ls.listening(id)?;
        let label = format!("{id} ({})", if i == 0 { "primary" } else { "backup" });
        metrics.push((label.clone(), l.http));
        pids.push((label, l.pid));
    }
    Ok(Target {
        name: "lockstep",
        metrics,
        pids,
        names: &LOCKSTEP_METRICS,
    })
}

fn etcd_target(ec: &etcd::EtcdCluster, leader: &str) -> Target {
    let label = |m: &etcd::EtcdMember| {
        format!(
            "etcd {}{}",
            m.name,
            if m.client_url == leader { " (leader)" } else { "" }
        )
    };
    Target {
        name: "etcd",
        metrics: ec.members.iter().map(|m| (label(m), m.client_addr)).collect(),
        pids: ec
            .members
            .iter()
            .filter_map(|m| m.proc.pid().map(|p| (label(m), p)))
            .collect(),
        names: &ETCD_METRICS,
    }
}

/// Every mix at every client count, lockstep and then etcd (its target and leader URL).
async fn measure_all<B, F>(
    args: &Args,
    lockstep: &Target,
    ls_make: &F,
    etcd: Option<(&Target, &str)>,
) -> anyhow::Result<Vec<Run>>
where
    B: KvBackend,
    F: Fn(usize) -> B,
{
    let mut runs = Vec::new();
    for &mix in &args.mix {
        if mix != Mix::Write {
            // Reads need keys that exist: one pass of writes over the key space, both targets.
            write_pass(args, 2, ls_make, etcd.map(|(_, url)| url)).await?;
        }
        for &clients in &args.clients {
            println!(
                "--- {clients} clients, {}s each, {} mix, {}-byte values, {} keys",
                args.duration,
                mix.name(),
                args.value_size,
                args.keys
            );
            let opts = workload_options(args, clients, args.duration, mix);
            let r = measure(lockstep, opts.clone(), ls_make).await?;
            print_run(&r);
            runs.push(r);
            if let Some((t, url)) = etcd {
                let r = measure(t, opts, |_| etcd::EtcdBackend::new(url).expect("valid etcd url")).await?;
                print_run(&r);
                runs.push(r);
            }
        }
    }
    Ok(runs)
}

/// RSS of every process after the load, and again after `--idle` seconds at rest.
async fn measure_memory(args: &Args, lockstep: &Target, etcd: Option<&Target>) -> Vec<Memory> {
    let mut mem_pids = lockstep.pids.clone();
    if let Some(t) = etcd {
        mem_pids.extend(t.pids.iter().cloned());
    }
    let after_load: Vec<Option<u64>> = mem_pids.iter().map(|(_, p)| rss_bytes(*p)).collect();
    println!("memory: waiting {}s idle", args.idle);
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    let memory: Vec<Memory> = mem_pids
        .iter()
        .zip(after_load)
        .map(|((label, pid), a)| Memory {
            process: label.clone(),
            after_load_bytes: a,
            at_rest_bytes: rss_bytes(*pid),
        })
        .collect();
    for m in &memory {
        println!(
            "  {:<24} RSS after load {:>10}   at rest ({}s idle) {:>10}",
            m.process,
            mib(m.after_load_bytes),
            args.idle,
            mib(m.at_rest_bytes)
        );
    }
    memory
}

/// `--failovers` trials of killing the primary under load; stops at the first that fails.
async fn failover_trials(ls: &mut local::LocalCluster, args: &Args) -> Vec<Failover> {
    let opts = |clients: usize, secs: u64| workload_options(args, clients, secs, Mix::Write);
    let mut failovers = Vec::new();
    for trial in 1..=args.failovers {
        match failover_trial(ls, trial, args, &opts).await {
            Ok(f) => {
                println!(
                    "fail-over {trial}: killed {} (epoch {}): next epoch decided after {} ms, first new write acked after {} ms, replacement joined after {} ms; ok={} fail={} unknown={}",
                    f.killed,
                    f.epoch_before,
                    fmt_opt_ms(f.reconfigured_ms),
                    fmt_opt_ms(f.failover_ms),
                    fmt_opt_ms(f.rejoin_ms),
                    f.ok,
                    f.failed,
                    f.unknown
                );
                failovers.push(f);
            }
            Err(e) => {
                eprintln!("fail-over {trial}: {e:#}");
                break;
            }
        }
    }
    failovers
}

/// One fail-over trial: `kill -9` the primary under `--failover-clients` writing clients and
/// time, from the kill, the next epoch, the first acknowledged write issued after it, and the
/// replacement's joining.
async fn failover_trial(
    ls: &mut local::LocalCluster,
    trial: usize,
    args: &Args,
    opts: &impl Fn(usize, u64) -> WorkloadOptions,
) -> anyhow::Result<Failover> {
    let h = ls.wait_healthy(Duration::from_secs(60)).await?;
    let victim = ls.listening(&h.primary)?;
    let state = Arc::new(ProbeState::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_probe_load(ls, &h, opts(args.failover_clients, 60), &state, &stop)?;
    // Let the load reach a steady state, then kill the primary.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = kill_primary(&h, &victim, &state)?;
    let reconfigured = wait_first_new_write(ls, &state, h.epoch, killed_at).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let report = load.await??;
    let ms = |t: Option<Instant>| t.map(|t| t.duration_since(killed_at).as_secs_f64() * 1000.0);
    let failover_ms = ms(*state.first_new.lock().expect("probe lock"));
    let reconfigured_ms = ms(reconfigured);
    let rejoin_ms = rejoin_ms(ls, h.epoch, killed_at).await?;
    Ok(Failover {
        trial,
        killed: h.primary.clone(),
        epoch_before: h.epoch,
        failover_ms,
        reconfigured_ms,
        rejoin_ms,
        ok: report.ok,
        failed: report.failed,
        unknown: report.unknown,
    })
}

/// The fail-over load: writes through [`Probe`]s that note into `state` the first write
/// acknowledged after the kill, until `stop` is set.
fn spawn_probe_load(
    ls: &local::LocalCluster,
    h: &local::Healthy,
    o: WorkloadOptions,
    state: &Arc<ProbeState>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Report>>> {
    let endpoints = h.endpoints.clone();
    let transport = ls.transport()?;
    let state = state.clone();
    let stop = stop.clone();
    Ok(tokio::spawn(async move {
        run_workload(
            "failover",
            o,
            move |_| Probe {
                inner: lockstep::Client::new(endpoints.clone()).with_transport(transport.clone()),
                state: state.clone(),
            },
            stop,
        )
        .await
    }))
}

/// `kill -9` the primary (`victim`) and note the time in `state`: writes issued from then on
/// are the ones the trial waits for.
fn kill_primary(h: &local::Healthy, victim: &local::Listening, state: &ProbeState) -> anyhow::Result<Instant> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .with_context(|| format!("kill -9 {} (pid {})", h.primary, victim.pid))?;
    // Taken after kill(2) returned: a write issued from now on cannot be served by the victim.
    let killed_at = Instant::now();
    *state.kill.lock().expect("probe lock") = Some(killed_at);
    Ok(killed_at)
}

/// Wait (20 s at most after the kill) for the first acknowledged write issued after it;
/// meanwhile, when the master persisted an epoch after `epoch` (`None`: not seen by then).
async fn wait_first_new_write(
    ls: &local::LocalCluster,
    state: &ProbeState,
    epoch: u64,
    killed_at: Instant,
) -> Option<Instant> {
    let deadline = killed_at + Duration::from_secs(20);
    let mut reconfigured = None;
    while state.first_new.lock().expect("probe lock").is_none() && Instant::now() < deadline {
        if reconfigured.is_none()
            && let Ok(Some(s)) = ls.state()
            && s.config.is_some_and(|c| c.epoch > epoch)
        {
            reconfigured = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reconfigured
}

/// Milliseconds from the kill until the cluster is healthy again in an epoch after `epoch`
/// (the replacement joined); `None` when it is healthy still in `epoch`.
async fn rejoin_ms(ls: &mut local::LocalCluster, epoch: u64, killed_at: Instant) -> anyhow::Result<Option<f64>> {
    match ls.wait_healthy(Duration::from_secs(60)).await {
        Ok(h2) if h2.epoch > epoch => Ok(Some(killed_at.elapsed().as_secs_f64() * 1000.0)),
        Ok(_) => Ok(None),
        Err(e) => Err(e.context("the replacement did not join")),
    }
}

fn print_summary(r: &Results, args: &Args) {
    print_setup(r, args);
    print_throughput_table(&r.runs);
    if r.runs.iter().any(|x| x.report.target == "etcd") {
        print_comparison_table(r, args);
    }
    if r.runs.iter().any(|x| !x.stages.is_empty()) {
        print_stage_table(&r.runs);
    }
    if let (Some(f), Some(one)) = (&r.floor, r.run(Mix::Write.name(), "lockstep", 1)) {
        print_floor_line(f, one);
    }
    if !r.failovers.is_empty() {
        print_failovers(r);
    }
    if !r.memory.is_empty() {
        print_memory(&r.memory);
    }
}

impl Results {
    /// The results of one benchmark on `machine`, with `replicas` lockstep replicas; the
    /// command line is this process's.
    fn new(machine: Machine, replicas: usize, measured: Measured, floor: Option<floor::Floor>) -> Results {
        let failover_median_ms = median(measured.failovers.iter().filter_map(|f| f.failover_ms).collect());
        Results {
            machine,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            replicas,
            runs: measured.runs,
            memory: measured.memory,
            failovers: measured.failovers,
            failover_median_ms,
            floor,
        }
    }

    /// The run of `mix` against `target` with `clients` clients, if it was measured.
    fn run(&self, mix: &str, target: &str, clients: usize) -> Option<&Run> {
        self.runs
            .iter()
            .find(|x| x.mix == mix && x.report.target == target && x.report.clients == clients)
    }
}

/// The summary's header: the machine, both systems under test and the load.
fn print_setup(r: &Results, args: &Args) {
    println!();
    println!("==================================== summary ====================================");
    println!(
        "machine: {} x {}, {}",
        r.machine.nproc, r.machine.cpu_model, r.machine.work_dir_fs
    );
    if let Some(v) = &r.machine.etcd {
        println!("etcd:    {v}, 3 members on loopback, default durability (WAL fsync)");
    }
    println!(
        "lockstep: {} replicas (t = {}, FailStop), fsync on, {}",
        r.replicas,
        r.replicas - 1,
        if args.insecure {
            "plaintext (--insecure)"
        } else {
            "mutual TLS"
        }
    );
    println!(
        "load:    {}-byte values, {} keys, {}s per run; reads are linearizable on both",
        args.value_size, args.keys, args.duration
    );
}

/// One row per run: throughput, latency and failures.
fn print_throughput_table(runs: &[Run]) {
    println!();
    println!("| mix | target   | clients |    ops/s | p50 ms | p99 ms | max ms | fail | unknown |");
    println!("|-----|----------|--------:|---------:|-------:|-------:|-------:|-----:|--------:|");
    for run in runs {
        let x = &run.report;
        println!(
            "| {} | {:<8} | {:>7} | {:>8.0} | {:>6} | {:>6} | {:>6} | {:>4} | {:>7} |",
            run.mix,
            x.target,
            x.clients,
            x.ops_per_sec,
            fmt_ms(x.p50_us),
            fmt_ms(x.p99_us),
            fmt_ms(x.max_us),
            x.failed,
            x.unknown
        );
    }
}

/// lockstep against etcd, for every mix and client count measured on both.
fn print_comparison_table(r: &Results, args: &Args) {
    println!();
    println!(
        "| mix | clients | lockstep/etcd throughput (target: write >= 2.0, read >= 3.0 at 64) | lockstep p99 | etcd p99 | p99 no worse? |"
    );
    println!("|-----|--------:|------:|-------------:|---------:|:-------------:|");
    for &mix in &args.mix {
        for &c in &args.clients {
            if let (Some(l), Some(e)) = (r.run(mix.name(), "lockstep", c), r.run(mix.name(), "etcd", c)) {
                let ratio = l.report.ops_per_sec / e.report.ops_per_sec.max(1e-9);
                println!(
                    "| {} | {:>7} | {:.2}x | {:>9} ms | {:>5} ms | {:^13} |",
                    mix.name(),
                    c,
                    ratio,
                    fmt_ms(l.report.p99_us),
                    fmt_ms(e.report.p99_us),
                    if l.report.p99_us <= e.report.p99_us {
                        "yes"
                    } else {
                        "NO"
                    }
                );
            }
        }
    }
}

/// Where one write's time goes, per run, node and stage (lockstep runs only have stages).
fn print_stage_table(runs: &[Run]) {
    println!();
    println!(
        "where one write's time goes (lockstep; means and bucket-estimated p50/p99, ms; replicate runs beside queue .. commit_wait):"
    );
    println!();
    println!("| mix | clients | node | stage | count | mean ms | p50 ms | p99 ms |");
    println!("|-----|--------:|------|-------|------:|--------:|-------:|-------:|");
    for run in runs {
        for n in &run.stages {
            for s in &n.stages {
                println!(
                    "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} |",
                    run.mix, run.report.clients, n.node, s.stage, s.count, s.mean_ms, s.p50_ms, s.p99_ms
                );
            }
        }
    }
}

/// The single-client write latency against the physical floor of a durable replicated write.
fn print_floor_line(f: &floor::Floor, one: &Run) {
    let against = |floor_us: f64, what: String| {
        println!(
            "single-client write p50 {} ms = {:.2} x {what}",
            fmt_ms(one.report.p50_us),
            one.report.p50_us as f64 / floor_us
        );
    };
    println!();
    against(
        f.write_floor_us,
        format!(
            "the floor ({:.0} µs = 2 x loopback round trip across two CPUs {:.0} µs + fdatasync {:.0} µs; target <= 2)",
            f.write_floor_us, f.loopback_rtt_p50_us, f.fdatasync_256b_p50_us
        ),
    );
    against(
        f.write_floor_one_cpu_us,
        format!(
            "the floor with both ends of each round trip on one CPU ({:.0} µs = 2 x {:.0} µs + {:.0} µs: a lower bound, no CPU is woken)",
            f.write_floor_one_cpu_us, f.loopback_rtt_one_cpu_p50_us, f.fdatasync_256b_p50_us
        ),
    );
    against(
        f.model_write_p50_us,
        format!(
            "the model write on this machine ({:.0} µs: the same protocol with plain sockets and threads, both fsyncs on this one disk at once)",
            f.model_write_p50_us
        ),
    );
}

/// Fail-over and rejoin times of every trial.
fn print_failovers(r: &Results) {
    println!();
    let each: Vec<String> = r.failovers.iter().map(|f| fmt_opt_ms(f.failover_ms)).collect();
    println!(
        "fail-over (kill -9 primary -> first acked write issued after it), ms: {} | median {} (target: median <= 50)",
        each.join(", "),
        fmt_opt_ms(r.failover_median_ms)
    );
    let rejoin: Vec<String> = r.failovers.iter().map(|f| fmt_opt_ms(f.rejoin_ms)).collect();
    println!(
        "replacement joined (back to {} replicas), ms after the kill: {}",
        r.replicas,
        rejoin.join(", ")
    );
}

/// RSS of every process after the load and at rest.
fn print_memory(memory: &[Memory]) {
    println!();
    for m in memory {
        println!(
            "memory {:<24} after load {:>10}, at rest {:>10}",
            m.process,
            mib(m.after_load_bytes),
            mib(m.at_rest_bytes)
        );
    }
}
