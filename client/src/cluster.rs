//! Local clusters started by `lockstep up`: where their state lives and how `-c NAME` finds
//! their endpoints.

use anyhow::{Context, bail};
use lockstep_planner::{Config, MachineRef, Rollout};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_DATA_DIR: &str = ".lockstep";
pub const STATE_FILE: &str = "cluster.json";

/// What the local configuration master persists (`<data-dir>/<name>/cluster.json`). The
/// configuration is written here, durably, BEFORE any replica hears of it: this file is the
/// local stand-in for the operator's status in etcd.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MasterState {
    pub name: String,
    pub machine: MachineRef,
    pub faults_tolerated: u32,
    pub config: Option<Config>,
    pub rollout: Option<Rollout>,
    /// Replica ordinals below this were used before and are never reused.
    #[serde(default)]
    pub next_ordinal: usize,
    /// `lockstep up --insecure`: the replicas speak plaintext (else mutual TLS with the
    /// certificates in `tls/`, see [`crate::pki`]).
    #[serde(default)]
    pub insecure: bool,
}

pub fn cluster_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(name)
}

pub fn load_state(dir: &Path) -> anyhow::Result<Option<MasterState>> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not a lockstep cluster state", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn save_state(dir: &Path, state: &MasterState) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    lockstep_replica::write_atomically(&dir.join(STATE_FILE), &serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("cannot write {}", dir.join(STATE_FILE).display()))?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `-c` takes a local cluster name or a comma-separated list of endpoints.
pub fn resolve_endpoints(spec: &str, data_dir: &Path) -> anyhow::Result<Vec<String>> {
    if spec.contains(':') || spec.contains(',') {
        let eps: Vec<String> = spec
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(crate::endpoint_url)
            .collect();
        if eps.is_empty() {
            bail!("no endpoints in '{spec}'");
        }
        return Ok(eps);
    }
    let dir = cluster_dir(data_dir, spec);
    let state = load_state(&dir)?.with_context(|| {
        format!(
            "no local cluster '{spec}' under {} (start one with `lockstep up FILE`, or pass endpoints: -c host:port,host:port)",
            data_dir.display()
        )
    })?;
    let config = state
        .config
        .with_context(|| format!("cluster '{spec}' has not finished bootstrapping yet"))?;
    // Primary first: it serves commands and reads.
    let mut members = config.members.clone();
    members.sort_by_key(|m| m.id != config.primary);
    Ok(members.into_iter().map(|m| m.endpoint).collect())
}
