//! The load generator behind `lockstep bench` (and the fault tests): N concurrent clients,
//! each a closed loop of key-value operations, recording latency and, optionally, the full
//! history (one JSON line per operation, the `lockstep-linearizability` format).
//!
//! The backend is a trait so the same generator drives lockstep and, for comparison, etcd.

use crate::{Client, ClientError};
use hdrhistogram::Histogram;
use lockstep_linearizability::{HistoryEntry, OpKind, Outcome};
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One key-value operation.
#[derive(Clone, Debug)]
pub struct Op {
    pub kind: OpKind,
    pub key: String,
    pub value: Option<String>,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// A key-value service the load generator can drive.
pub trait KvBackend: Send + 'static {
    /// Run `op`; return the outcome and, for `Ok`, the output in the history format.
    fn run(&mut self, op: &Op) -> impl Future<Output = (Outcome, Option<serde_json::Value>)> + Send;

    /// Called once after the client's last operation, before the run reports (a Byzantine
    /// client closes its stream here: left open, it holds back every other client's
    /// requests until the master times it out).
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

impl KvBackend for Client {
    async fn run(&mut self, op: &Op) -> (Outcome, Option<serde_json::Value>) {
        let result = match op.kind {
            OpKind::Get => self.get(&op.key).await.map(|v| serde_json::json!({"value": v})),
            OpKind::Put => self
                .put(&op.key, op.value.as_deref().unwrap_or_default())
                .await
                .map(|p| serde_json::json!({"previous": p})),
            OpKind::Delete => self.delete(&op.key).await.map(|p| serde_json::json!({"previous": p})),
            OpKind::Cas => self
                .cas(&op.key, op.old.as_deref(), op.new.as_deref())
                .await
                .map(|(s, c)| serde_json::json!({"swapped": s, "current": c})),
        };
        match result {
            Ok(v) => (Outcome::Ok, Some(v)),
            Err(ClientError::Unknown(_)) => (Outcome::Unknown, None),
            Err(_) => (Outcome::Fail, None),
        }
    }
}

/// `op` as a command (or query) of the key-value machine.
pub fn kv_payload(op: &Op) -> Vec<u8> {
    let cmd = match op.kind {
        OpKind::Get => serde_json::json!({"op": "get", "key": op.key}),
        OpKind::Put => {
            serde_json::json!({"op": "put", "key": op.key, "value": op.value.as_deref().unwrap_or_default()})
        }
        OpKind::Delete => serde_json::json!({"op": "delete", "key": op.key}),
        OpKind::Cas => serde_json::json!({"op": "cas", "key": op.key, "old": op.old, "new": op.new}),
    };
    cmd.to_string().into_bytes()
}

/// The key-value machine's output for `op` (from [`kv_payload`]) in the history format.
pub fn history_output(op: &Op, out: &serde_json::Value) -> serde_json::Value {
    match op.kind {
        OpKind::Get => serde_json::json!({"value": out["value"].as_str()}),
        OpKind::Put | OpKind::Delete => serde_json::json!({"previous": out["previous"].as_str()}),
        OpKind::Cas => serde_json::json!({
            "swapped": out["swapped"].as_bool().unwrap_or(false),
            "current": out["current"].as_str(),
        }),
    }
}

/// A backend's answer to `op` as the load generator records it.
pub fn outcome(op: &Op, result: Result<serde_json::Value, ClientError>) -> (Outcome, Option<serde_json::Value>) {
    match result {
        Ok(v) => (Outcome::Ok, Some(history_output(op, &v))),
        Err(ClientError::Unknown(_)) => (Outcome::Unknown, None),
        Err(_) => (Outcome::Fail, None),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// Only puts (write throughput).
    Write,
    /// 50% get, 30% put, 10% cas, 10% delete (history checking).
    Mixed,
    /// Only linearizable gets (read throughput).
    Read,
    /// 90% linearizable get, 10% put.
    ReadMostly,
    /// 50% linearizable get, 50% put.
    Half,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Mix::Write => "write",
            Mix::Mixed => "mixed",
            Mix::Read => "read",
            Mix::ReadMostly => "90/10 read/write",
            Mix::Half => "50/50 read/write",
        }
    }
}

#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    pub clients: usize,
    pub duration: Duration,
    pub value_size: usize,
    pub keys: usize,
    pub mix: Mix,
    pub history: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub target: String,
    pub clients: usize,
    pub value_size: usize,
    pub seconds: f64,
    pub ok: u64,
    pub failed: u64,
    pub unknown: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<10} clients={:<3} value={}B  {:>9.0} ops/s  p50={:>7.2}ms  p99={:>7.2}ms  max={:>7.2}ms  ok={} fail={} unknown={}",
            self.target,
            self.clients,
            self.value_size,
            self.ops_per_sec,
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0,
            self.ok,
            self.failed,
            self.unknown
        )
    }
}

fn pad(s: String, size: usize) -> String {
    if s.len() >= size {
        return s;
    }
    let mut v = s;
    v.push('-');
    while v.len() < size {
        v.push('x');
    }
    v
}

/// Keys and values carry the run's id (`{run}-k3`, `{run}-c1-42`): the history checker
/// assumes every key starts absent, which holds on a store that earlier runs left full only
/// when no key (or value) of this run was ever used before.
fn next_op(rng: &mut impl Rng, run: &str, client: usize, n: u64, opts: &WorkloadOptions) -> Op {
    let key = format!("{run}-k{}", rng.random_range(0..opts.keys.max(1)));
    let value = pad(format!("{run}-c{client}-{n}"), opts.value_size);
    let roll = rng.random_range(0..100);
    let kind = match opts.mix {
        Mix::Write => OpKind::Put,
        Mix::Mixed if roll < 50 => OpKind::Get,
        Mix::Mixed if roll < 80 => OpKind::Put,
        Mix::Mixed if roll < 90 => OpKind::Cas,
        Mix::Mixed => OpKind::Delete,
        Mix::Read => OpKind::Get,
        Mix::ReadMostly if roll < 90 => OpKind::Get,
        Mix::ReadMostly => OpKind::Put,
        Mix::Half if roll < 50 => OpKind::Get,
        Mix::Half => OpKind::Put,
    };
    match kind {
        OpKind::Put => Op {
            kind,
            key,
            value: Some(value),
            old: None,
            new: None,
        },
        OpKind::Cas => {
            // Expect a value some client may have written, or absence.
            let old = if rng.random_bool(0.3) {
                None
            } else {
                Some(pad(
                    format!(
                        "{run}-c{}-{}",
                        rng.random_range(0..opts.clients.max(1)),
                        n.saturating_sub(1)
                    ),
                    opts.value_size,
                ))
            };
            Op {
                kind,
                key,
                value: None,
                old,
                new: Some(value),
            }
        }
        _ => Op {
            kind,
            key,
            value: None,
            old: None,
            new: None,
        },
    }
}

/// Run the workload: `make(i)` builds client i's backend connection.
pub async fn run_workload<B, F>(
    target: &str,
    opts: WorkloadOptions,
    make: F,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Report>
where
    B: KvBackend,
    F: Fn(usize) -> B,
{
    let shared = Shared {
        base: Instant::now(),
        // Unique to this run (see `next_op`).
        run: format!("r{:016x}", rand::rng().random::<u64>()).into(),
        opts,
        stop,
    };
    let mut tasks = Vec::new();
    for i in 0..shared.opts.clients {
        tasks.push(tokio::spawn(client_loop(i, make(i), shared.clone())));
    }
    let started = Instant::now();
    let mut total = Tally::new();
    for t in tasks {
        total.add(t.await?)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &shared.opts.history {
        write_history(path, &mut total.entries)?;
    }
    Ok(total.report(target, &shared.opts, seconds))
}

/// What every client of one run shares.
#[derive(Clone)]
struct Shared {
    /// History times are nanoseconds since `base`.
    base: Instant,
    run: Arc<str>,
    opts: WorkloadOptions,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.base).as_nanos() as u64
    }
}

/// Outcome counts, latencies of the `Ok` operations and (when recorded) the history of one
/// client, or of all of them.
struct Tally {
    latency_us: Histogram<u64>,
    entries: Vec<HistoryEntry>,
    ok: u64,
    failed: u64,
    unknown: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency_us: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            entries: Vec::new(),
            ok: 0,
            failed: 0,
            unknown: 0,
        }
    }

    fn count(&mut self, outcome: Outcome, call: Instant, ret: Instant) {
        match outcome {
            Outcome::Ok => {
                self.ok += 1;
                let _ = self
                    .latency_us
                    .record(ret.duration_since(call).as_micros().max(1) as u64);
            }
            Outcome::Fail => self.failed += 1,
            Outcome::Unknown => self.unknown += 1,
        }
    }

    fn add(&mut self, other: Tally) -> anyhow::Result<()> {
        self.latency_us.add(other.latency_us)?;
        self.entries.extend(other.entries);
        self.ok += other.ok;
        self.failed += other.failed;
        self.unknown += other.unknown;
        Ok(())
    }

    fn report(&self, target: &str, opts: &WorkloadOptions, seconds: f64) -> Report {
        Report {
            target: target.into(),
            clients: opts.clients,
            value_size: opts.value_size,
            seconds,
            ok: self.ok,
            failed: self.failed,
            unknown: self.unknown,
            ops_per_sec: self.ok as f64 / seconds.max(1e-9),
            p50_us: self.latency_us.value_at_quantile(0.5),
            p99_us: self.latency_us.value_at_quantile(0.99),
            max_us: self.latency_us.max(),
        }
    }
}

/// Client `i`: operations back to back until the run's duration is over or `stop` is set.
async fn client_loop<B: KvBackend>(i: usize, mut backend: B, shared: Shared) -> Tally {
    let mut tally = Tally::new();
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let mut n = 0u64;
    let end = shared.base + shared.opts.duration;
    while Instant::now() < end && !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let op = next_op(&mut rng, &shared.run, i, n, &shared.opts);
        let call = Instant::now();
        let (outcome, output) = backend.run(&op).await;
        let ret = Instant::now();
        tally.count(outcome, call, ret);
        if shared.opts.history.is_some() {
            tally.entries.push(HistoryEntry {
                client: format!("c{i}"),
                op: op.kind,
                key: op.key,
                value: op.value,
                old: op.old,
                new: op.new,
                call: shared.ns(call),
                ret: (outcome == Outcome::Ok).then(|| shared.ns(ret)),
                result: outcome,
                output,
            });
        }
    }
    backend.finish().await;
    tally
}

/// The history of every client, in call order, one JSON line per operation.
fn write_history(path: &Path, history: &mut [HistoryEntry]) -> anyhow::Result<()> {
    use std::io::Write;
    history.sort_by_key(|e| e.call);
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for e in history.iter() {
        lockstep_linearizability::write_entry(&mut w, e)?;
    }
    w.flush()?;
    Ok(())
}
