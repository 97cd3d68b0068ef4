//! lockstep side of the comparison: a local cluster run by the real `lockstep up`.

use crate::procs::ChildGuard;
use anyhow::{Context, bail};
use lockstep::cluster::{MasterState, load_state};
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a replica writes to `listening.json` (the fields the benchmark uses).
#[derive(serde::Deserialize, Debug, Clone)]
pub struct Listening {
    pub http: SocketAddr,
    pub pid: u32,
}

/// A healthy configuration as observed.
#[derive(Debug, Clone)]
pub struct Healthy {
    pub epoch: u64,
    pub primary: String,
    pub members: Vec<String>,
    /// Primary first.
    pub endpoints: Vec<String>,
}

pub struct LocalCluster {
    /// `<data-dir>/<name>`.
    pub dir: PathBuf,
    pub log: PathBuf,
    /// Replicas of a healthy configuration (t + 1: the manifest's `faultsTolerated` + 1).
    pub replicas: usize,
    up: ChildGuard,
}

impl LocalCluster {
    /// `lockstep up FILE --data-dir DATA --quiet` (fsync on: no `--no-fsync`); plaintext with
    /// `insecure` (`up --insecure`), mutual TLS otherwise.
    pub fn start(bin: &Path, manifest: &Path, data_dir: &Path, insecure: bool) -> anyhow::Result<LocalCluster> {
        let (name, desired) = lockstep::up::load_desired(manifest)?;
        std::fs::create_dir_all(data_dir)?;
        let log = data_dir.join("up.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("up");
        if insecure {
            cmd.arg("--insecure");
        }
        cmd.arg(manifest)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--quiet")
            .env_remove("LOCKSTEP_REPLICA_BIN")
            .env_remove("LOCKSTEP_DATA_DIR")
            .env_remove("LOCKSTEP_CLUSTER")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SIGINT = Ctrl-C: `up` stops its replicas (SIGTERM, 5 s grace) and exits.
        let up = ChildGuard::spawn("lockstep up", &mut cmd, Signal::SIGINT, Duration::from_secs(15))?;
        Ok(LocalCluster {
            dir: data_dir.join(name),
            log,
            replicas: desired.replicas(),
            up,
        })
    }

    /// The client certificate `lockstep up` wrote (TLS is its default).
    pub fn transport(&self) -> anyhow::Result<lockstep::Transport> {
        lockstep::pki::local_client_transport(&self.dir)
    }

    pub fn state(&self) -> anyhow::Result<Option<MasterState>> {
        load_state(&self.dir)
    }

    pub fn listening(&self, id: &str) -> anyhow::Result<Listening> {
        let path = self.dir.join("replicas").join(id).join("listening.json");
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a listening file", path.display()))
    }

    /// Wait until `cluster.json` holds a configuration with all its members (t + 1), each
    /// member answers Status in that epoch as primary/backup, and a write succeeds.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<Healthy> {
        let replicas = self.replicas;
        let start = Instant::now();
        let mut last = String::from("no configuration yet");
        while start.elapsed() < timeout {
            if let Some(why) = self.up.exited() {
                bail!("`lockstep up` exited ({why}); see {}", self.log.display());
            }
            match self.check(replicas).await {
                Ok(h) => {
                    let mut c = lockstep::Client::new(h.endpoints.clone()).with_transport(self.transport()?);
                    c.deadline = Duration::from_secs(2);
                    match c.put("bench-ready", "1").await {
                        Ok(_) => return Ok(h),
                        Err(e) => last = format!("probe write failed: {e}"),
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("lockstep cluster not healthy within {timeout:?}: {last}")
    }

    async fn check(&self, replicas: usize) -> anyhow::Result<Healthy> {
        let config = self
            .state()?
            .and_then(|s| s.config)
            .context("cluster.json has no configuration yet")?;
        if config.members.len() != replicas {
            bail!(
                "epoch {}: {} members, want {replicas}",
                config.epoch,
                config.members.len()
            );
        }
        for m in &config.members {
            let s = lockstep::status_of(&self.transport()?, &m.endpoint, Duration::from_millis(500))
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", m.id))?;
            let want = if m.id == config.primary { "primary" } else { "backup" };
            if s.epoch != config.epoch || s.state != want {
                bail!(
                    "{} is {} in epoch {} (want {want} in epoch {})",
                    m.id,
                    s.state,
                    s.epoch,
                    config.epoch
                );
            }
        }
        let mut members = config.members.clone();
        members.sort_by_key(|m| m.id != config.primary);
        Ok(Healthy {
            epoch: config.epoch,
            primary: config.primary.clone(),
            members: members.iter().map(|m| m.id.clone()).collect(),
            endpoints: members.iter().map(|m| lockstep::endpoint_url(&m.endpoint)).collect(),
        })
    }

    pub fn stop(&mut self) {
        self.up.stop();
    }
}
