//! Test harness: a real `lockstep up` process with real replica processes on loopback.
//! Faults are real signals (`kill -9`, `SIGSTOP`/`SIGCONT`) sent to real pids.
#![allow(dead_code)]

use lockstep::cluster::{MasterState, load_state};
use lockstep_planner::Role;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LocalCluster {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub yaml: PathBuf,
    up: Option<Child>,
    pub t: u32,
    extra_args: Vec<String>,
    /// Environment of `lockstep up` (and so of its replicas), besides the test's own.
    pub env: Vec<(String, String)>,
}

pub fn lockstep_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lockstep")
}

/// `lockstep up FILE --data-dir DATA`, its output appended to `dir/up.out`.
pub fn up_command(dir: &Path, yaml: &Path, data_dir: &Path) -> Command {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("up.out"))
        .expect("up.out");
    let mut cmd = Command::new(lockstep_bin());
    cmd.arg("up")
        .arg(yaml)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out);
    cmd
}

impl LocalCluster {
    pub fn yaml(name: &str, t: u32, machine: &str) -> String {
        format!(
            "apiVersion: lockstep.dev/v1alpha1\nkind: ReplicatedStateMachine\nmetadata:\n  name: {name}\nspec:\n  faultsTolerated: {t}\n  failureModel: FailStop\n  machine:\n    name: {machine}\n    version: \"1.0.0\"\n"
        )
    }

    /// Start `lockstep up` and wait until the cluster is ready.
    pub fn start(name: &str, t: u32, machine: &str, extra_args: &[&str]) -> LocalCluster {
        Self::start_with_env(name, t, machine, extra_args, &[])
    }

    /// [`LocalCluster::start`] with more environment for `lockstep up` and its replicas
    /// (`RUST_LOG`, say).
    pub fn start_with_env(
        name: &str,
        t: u32,
        machine: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> LocalCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&yaml, Self::yaml(name, t, machine)).expect("write yaml");
        let mut c = LocalCluster {
            name: name.into(),
            dir,
            yaml,
            up: None,
            t,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        c.launch();
        c.wait_ready(Duration::from_secs(30));
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn cluster_dir(&self) -> PathBuf {
        self.data_dir().join(&self.name)
    }

    /// (Re)start `lockstep up` on the same data dir.
    pub fn launch(&mut self) {
        let mut cmd = up_command(self.dir.path(), &self.yaml, &self.data_dir());
        let child = cmd
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .expect("spawn lockstep up");
        self.up = Some(child);
    }

    pub fn up_output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.out")).unwrap_or_default()
    }

    pub fn state(&self) -> Option<MasterState> {
        load_state(&self.cluster_dir()).ok().flatten()
    }

    pub fn epoch(&self) -> u64 {
        self.state().and_then(|s| s.config).map_or(0, |c| c.epoch)
    }

    pub fn primary(&self) -> String {
        self.state()
            .and_then(|s| s.config)
            .map(|c| c.primary)
            .expect("configured cluster")
    }

    pub fn members(&self) -> Vec<String> {
        self.state()
            .and_then(|s| s.config)
            .map(|c| c.members.iter().map(|m| m.id.clone()).collect())
            .unwrap_or_default()
    }

    pub fn endpoint(&self, id: &str) -> String {
        let l = self.listening(id).expect("replica listening");
        format!("http://{}", l.grpc)
    }

    pub fn listening(&self, id: &str) -> Option<lockstep_replica::Listening> {
        let bytes = std::fs::read(
            self.cluster_dir()
                .join("replicas")
                .join(id)
                .join(lockstep_replica::LISTENING_FILE),
        )
        .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn pid(&self, id: &str) -> Pid {
        Pid::from_raw(self.listening(id).expect("listening.json").pid as i32)
    }

    pub fn endpoints(&self) -> Vec<String> {
        lockstep::cluster::resolve_endpoints(&self.name, &self.data_dir()).expect("endpoints")
    }

    pub fn client(&self) -> lockstep::Client {
        lockstep::Client::new(self.endpoints()).with_transport(self.transport())
    }

    /// The CLI's client certificate of this cluster (`lockstep up` made it).
    pub fn transport(&self) -> lockstep::Transport {
        lockstep::pki::local_client_transport(&self.cluster_dir()).expect("client certificate")
    }

    /// The admin certificate `lockstep up` calls the replicas with.
    pub fn admin_transport(&self) -> lockstep::Transport {
        self.tls_files("admin").transport().expect("admin certificate")
    }

    /// The certificate `lockstep up` issued to replica `id`.
    pub fn replica_transport(&self, id: &str) -> lockstep::Transport {
        self.tls_files(&format!("replicas/{id}"))
            .transport()
            .expect("replica certificate")
    }

    pub fn tls_files(&self, stem: &str) -> lockstep::pki::TlsFiles {
        lockstep::pki::local_tls_files(&self.cluster_dir(), stem)
    }

    /// Admin status of one replica, as a client may ask for it.
    pub fn status(&self, endpoint: &str, timeout: Duration) -> Result<lockstep_proto::StatusResponse, String> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
            .block_on(lockstep::status_of(&self.transport(), endpoint, timeout))
    }

    pub fn signal(&self, id: &str, sig: Signal) {
        kill(self.pid(id), sig).unwrap_or_else(|e| panic!("kill -{sig} {id}: {e}"));
    }

    /// `kill -9` member `id` and wait until the master has replaced it (a new epoch without it,
    /// every member ready).
    pub fn kill_and_wait_replaced(&self, id: &str) {
        let epoch = self.epoch();
        self.signal(id, Signal::SIGKILL);
        assert!(
            wait_until(Duration::from_secs(60), || self.epoch() > epoch
                && self.is_ready()
                && !self.members().iter().any(|m| m == id)),
            "no replacement for {id}:\n{}",
            self.up_output()
        );
    }

    /// True when every one of the n = t+1 members is a voter, each answers with the
    /// configuration's epoch, and no learner is pending.
    pub fn is_ready(&self) -> bool {
        let Some(config) = self.state().and_then(|s| s.config) else {
            return false;
        };
        if config.members.len() != self.t as usize + 1 || config.members.iter().any(|m| m.role != Role::Voter) {
            return false;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let transport = self.transport();
        config.members.iter().all(|m| {
            rt.block_on(lockstep::status_of(&transport, &m.endpoint, Duration::from_millis(500)))
                .is_ok_and(|s| s.epoch == config.epoch && (s.state == "primary" || s.state == "backup"))
        })
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let ok = wait_until(timeout, || self.is_ready());
        assert!(
            ok,
            "cluster not ready within {timeout:?}; lockstep up said:\n{}",
            self.up_output()
        );
    }

    /// Stop `lockstep up` with SIGINT (it stops the replicas) and wait for it.
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

    /// Crash everything at once: `kill -9` the master and every replica.
    pub fn crash_all(&mut self) {
        let pids = self.replica_pids();
        if let Some(mut up) = self.up.take() {
            let _ = up.kill();
            let _ = up.wait();
        }
        for p in pids {
            let _ = kill(p, Signal::SIGKILL);
        }
        // Wait for the processes to be gone (they hold their data-dir locks).
        std::thread::sleep(Duration::from_millis(300));
    }

    fn replica_pids(&self) -> Vec<Pid> {
        let dir = self.cluster_dir().join("replicas");
        let Ok(rd) = std::fs::read_dir(dir) else { return vec![] };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join(lockstep_replica::LISTENING_FILE)).ok())
            .filter_map(|b| serde_json::from_slice::<lockstep_replica::Listening>(&b).ok())
            .map(|l| Pid::from_raw(l.pid as i32))
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for p in self.replica_pids() {
            let _ = kill(p, Signal::SIGCONT);
        }
        self.stop();
        for p in self.replica_pids() {
            let _ = kill(p, Signal::SIGKILL);
        }
    }
}

/// `GET path` over plain HTTP/1.1 (a replica's `/healthz`, `/metrics`): the whole response.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect http");
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A connected channel to `endpoint` with `transport`.
pub async fn connect(
    transport: &lockstep::Transport,
    endpoint: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    transport.endpoint(endpoint).expect("endpoint").connect().await
}

/// Clients writing all along, each its own key with the client library (its retries, as the
/// bench uses it), `pause` between puts; every error is kept.
pub struct Writers {
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Puts that succeeded, all writers together.
    pub ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handles: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Writers {
    pub fn start(cluster: &LocalCluster, n: usize, pause: Duration) -> Writers {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handles = (0..n)
            .map(|w| {
                let mut client = cluster.client();
                let (stop, ok) = (stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("rt");
                    let mut errors = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        match rt.block_on(client.put(&format!("w{w}"), &i.to_string())) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.push(format!("writer {w} put {i}: {e}")),
                        }
                        std::thread::sleep(pause);
                    }
                    errors
                })
            })
            .collect();
        Writers { stop, ok, handles }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop them; every error any of them saw.
    pub fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handles
            .into_iter()
            .flat_map(|h| h.join().expect("writer"))
            .collect()
    }
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn check_history(path: &Path) -> usize {
    let file = std::fs::File::open(path).expect("history file");
    let history = lockstep_linearizability::parse_history(std::io::BufReader::new(file)).expect("parse history");
    let result = lockstep_linearizability::check_kv(&history, lockstep_linearizability::CheckLimits::default());
    assert!(
        result.is_linearizable(),
        "history {} is not linearizable: {result}",
        path.display()
    );
    history.len()
}
