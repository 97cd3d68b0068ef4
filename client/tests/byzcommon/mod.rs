//! Test harness for Byzantine mode: a real `lockstep up` running 2t+1 real replica processes
//! on loopback, some of them made faulty with `--inject` (test builds only).
#![allow(dead_code)]

use lockstep::bench::{KvBackend, Mix, Op, Report, WorkloadOptions, run_workload};
use lockstep::byz::{ByzClient, Tally};
use lockstep::byz_batch::ByzBatcher;
use lockstep_linearizability::Outcome;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A workload caller: its own signed stream, or a share of a batching one.
pub enum Caller {
    Stream(Box<ByzClient>),
    Batched(ByzBatcher),
}

impl KvBackend for Caller {
    async fn run(&mut self, op: &Op) -> (Outcome, Option<serde_json::Value>) {
        match self {
            Caller::Stream(c) => c.run(op).await,
            Caller::Batched(b) => b.run(op).await,
        }
    }

    async fn finish(&mut self) {
        if let Caller::Stream(c) = self {
            c.finish().await;
        }
    }
}

pub struct ByzCluster {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub t: usize,
    up: Option<Child>,
    /// What `lockstep up` is started with besides the file and the data dir.
    up_args: Vec<String>,
}

// The helpers every process test shares (one definition: tests/common).
#[path = "../common/mod.rs"]
mod common;
#[allow(unused_imports)]
pub use common::{lockstep_bin, wait_until};

/// How each replica's answers voted, per replica id, as the clients counted them.
pub type Tallies = Arc<Mutex<BTreeMap<String, Tally>>>;

/// Asserts that the recorded history at `path` is linearizable (what one correct replica
/// gives); returns its number of operations.
pub fn assert_linearizable(path: &Path) -> usize {
    common::check_history(path)
}

impl ByzCluster {
    /// Six concurrent voting callers run the mixed workload over 6 keys for 4 s: two with a
    /// signed stream each, four sharing one stream that batches what they have waiting
    /// (`ByzBatcher`). Records the history in `history.jsonl` of the cluster's directory
    /// (returned) and counts every replica's votes into `tallies`. Runs on `rt`: answers still
    /// on their way when a vote was decided are counted only while the caller keeps it alive.
    pub fn voted_workload(&self, rt: &tokio::runtime::Runtime, run: &str, tallies: &Tallies) -> (Report, PathBuf) {
        let history = self.dir.path().join("history.jsonl");
        let report = rt
            .block_on(async {
                let batcher = ByzBatcher::spawn(vec![self.client().with_tallies(tallies.clone())], 16);
                let callers: Vec<_> = (0..6)
                    .map(|i| {
                        Some(if i < 2 {
                            Caller::Stream(Box::new(self.client().with_tallies(tallies.clone())))
                        } else {
                            Caller::Batched(batcher.clone())
                        })
                    })
                    .collect();
                let pool = Mutex::new(callers);
                let report = run_workload(
                    run,
                    WorkloadOptions {
                        clients: 6,
                        duration: Duration::from_secs(4),
                        value_size: 8,
                        keys: 6,
                        mix: Mix::Mixed,
                        history: Some(history.clone()),
                    },
                    |i| {
                        pool.lock()
                            .ok()
                            .and_then(|mut p| p.get_mut(i).and_then(Option::take))
                            .expect("a caller per index")
                    },
                    Arc::new(AtomicBool::new(false)),
                )
                .await;
                batcher.close().await;
                report
            })
            .expect("workload");
        (report, history)
    }

    /// `ordering` is the YAML of `spec.ordering` (or empty); `args` go to `lockstep up`.
    pub fn start(name: &str, t: usize, ordering: &str, args: &[&str]) -> ByzCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = dir.path().join("rsm.yaml");
        std::fs::write(
            &yaml,
            format!(
                "apiVersion: lockstep.dev/v1alpha1\nkind: ReplicatedStateMachine\nmetadata:\n  name: {name}\nspec:\n  faultsTolerated: {t}\n  failureModel: Byzantine\n  machine:\n    name: kv\n    version: \"1.0.0\"\n{ordering}"
            ),
        )
        .expect("yaml");
        let mut up_args: Vec<String> = vec!["--quiet".into(), "--failure-timeout-ms".into(), "5000".into()];
        if !args.contains(&"--client-timeout-ms") {
            // A loaded test machine delays no-ops: only remove a client stream when a test asks.
            up_args.extend(["--client-timeout-ms".into(), "30000".into()]);
        }
        up_args.extend(args.iter().map(|a| a.to_string()));
        let mut c = ByzCluster {
            name: name.into(),
            dir,
            t,
            up: None,
            up_args,
        };
        c.launch();
        c.wait_members(2 * t + 1, Duration::from_secs(60));
        c
    }

    /// (Re)start `lockstep up` on the cluster's file and data dir.
    pub fn launch(&mut self) {
        let up = common::up_command(self.dir.path(), &self.dir.path().join("rsm.yaml"), &self.data_dir())
            .args(&self.up_args)
            .spawn()
            .expect("spawn lockstep up");
        self.up = Some(up);
    }

    /// `kill -9` `lockstep up` and every replica at once, and wait until they are gone.
    pub fn crash_all(&mut self) {
        let pids: Vec<Pid> = self.replica_dirs().iter().filter_map(|id| self.pid(id)).collect();
        if let Some(mut up) = self.up.take() {
            let _ = up.kill();
            let _ = up.wait();
        }
        for &p in &pids {
            let _ = kill(p, Signal::SIGKILL);
        }
        let gone = wait_until(Duration::from_secs(20), || pids.iter().all(|&p| kill(p, None).is_err()));
        assert!(gone, "replicas still running after kill -9");
    }

    /// Every replica that ever had a data dir in this cluster.
    fn replica_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.cluster_dir().join("replicas"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn cluster_dir(&self) -> PathBuf {
        self.data_dir().join(&self.name)
    }

    pub fn up_output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.out")).unwrap_or_default()
    }

    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.cluster_dir().join("logs").join(format!("{id}.log"))).unwrap_or_default()
    }

    pub fn info(&self) -> Option<lockstep::byz::ClusterInfo> {
        lockstep::byz::load_info(&self.cluster_dir()).ok().flatten()
    }

    fn endpoint(&self, id: &str) -> Option<String> {
        let info = self.info()?;
        Some(info.replicas.into_iter().find(|r| r.id == id)?.endpoint)
    }

    pub fn status(&self, id: &str) -> Option<lockstep_proto::StatusResponse> {
        let endpoint = self.endpoint(id)?;
        block_on(lockstep::status_of(
            &self.transport(),
            &endpoint,
            Duration::from_secs(2),
        ))
        .ok()
    }

    /// Has replica `id` take a snapshot and waits until its file is on disk; its index.
    pub fn snapshot(&self, id: &str) -> u64 {
        let endpoint = self.endpoint(id).expect("replica endpoint");
        let index = block_on(async {
            let admin = lockstep::pki::local_tls_files(&self.cluster_dir(), "admin");
            let transport = admin.transport().expect("admin certificate");
            let ch = lockstep::cluster_channel(&transport, &endpoint).expect("channel");
            let mut admin = lockstep_proto::admin_client::AdminClient::new(ch);
            admin
                .take_snapshot(lockstep_proto::SnapshotRequest {})
                .await
                .unwrap_or_else(|e| panic!("snapshot of {id}: {e}"))
                .into_inner()
                .index
        });
        let file = self
            .cluster_dir()
            .join("replicas")
            .join(id)
            .join(format!("snapshot-{index:020}.snap"));
        assert!(
            wait_until(Duration::from_secs(30), || file.exists()),
            "{} was not written",
            file.display()
        );
        index
    }

    /// Wait until `n` replicas of the newest era report themselves members of it.
    pub fn wait_members(&self, n: usize, timeout: Duration) {
        let ok = wait_until(timeout, || {
            let Some(info) = self.info() else { return false };
            info.replicas.len() == n
                && info.replicas.iter().all(|r| {
                    self.status(&r.id)
                        .is_some_and(|s| s.epoch == info.era && s.state == "member")
                })
        });
        assert!(
            ok,
            "cluster not ready within {timeout:?}; lockstep up said:\n{}",
            self.up_output()
        );
    }

    /// The CLI's client certificate of this cluster (`lockstep up` made it).
    pub fn transport(&self) -> lockstep::Transport {
        lockstep::pki::local_client_transport(&self.cluster_dir()).expect("client certificate")
    }

    pub fn client(&self) -> ByzClient {
        ByzClient::local(&self.cluster_dir(), lockstep::byz::DEFAULT_IDENTITY).expect("client")
    }

    pub fn replica_ids(&self) -> Vec<String> {
        self.info()
            .map(|i| i.replicas.into_iter().map(|r| r.id).collect())
            .unwrap_or_default()
    }

    pub fn pid(&self, id: &str) -> Option<Pid> {
        let bytes = std::fs::read(
            self.cluster_dir()
                .join("replicas")
                .join(id)
                .join(lockstep_replica::LISTENING_FILE),
        )
        .ok()?;
        let l: lockstep_replica::Listening = serde_json::from_slice(&bytes).ok()?;
        Some(Pid::from_raw(l.pid as i32))
    }

    pub fn stop(&mut self) {
        if let Some(mut up) = self.up.take() {
            let _ = kill(Pid::from_raw(up.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = up.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = up.kill();
            let _ = up.wait();
        }
    }
}

impl Drop for ByzCluster {
    fn drop(&mut self) {
        let ids = self.replica_dirs();
        self.stop();
        for id in ids {
            if let Some(p) = self.pid(&id) {
                let _ = kill(p, Signal::SIGKILL);
            }
        }
    }
}

/// Runs `f` to completion on a runtime of its own (the harness's callers are synchronous).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}
