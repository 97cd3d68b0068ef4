//! etcd side of the comparison: a 3-member etcd cluster on loopback (t = 1 for Raft) and a
//! [`KvBackend`] that drives it through etcd's v3 gRPC API.

use crate::procs::{ChildGuard, free_port};
use anyhow::{Context, bail};
use lockstep::bench::{KvBackend, Op};
use lockstep_linearizability::{OpKind, Outcome};
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::maintenance_client::MaintenanceClient;
use pb::request_op::Request;
use pb::response_op::Response;

fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// One etcd client session: its own HTTP/2 connection, like one `lockstep::Client`.
pub struct EtcdBackend {
    kv: KvClient<Channel>,
    timeout: Duration,
}

impl EtcdBackend {
    pub fn new(url: &str) -> anyhow::Result<EtcdBackend> {
        Ok(EtcdBackend {
            kv: KvClient::new(channel(url)?),
            timeout: Duration::from_secs(10),
        })
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    async fn exec(&mut self, op: &Op) -> Result<serde_json::Value, tonic::Status> {
        let key = op.key.as_bytes().to_vec();
        match op.kind {
            OpKind::Get => self.get(key).await,
            OpKind::Put => self.put(key, op.value.clone().unwrap_or_default()).await,
            OpKind::Delete => self.delete(key).await,
            OpKind::Cas => self.cas(key, &op.old, &op.new).await,
        }
    }

    async fn get(&mut self, key: Vec<u8>) -> Result<serde_json::Value, tonic::Status> {
        // Linearizable (etcd's default: serializable = false).
        let r = self
            .kv
            .range(self.req(pb::RangeRequest {
                key,
                ..Default::default()
            }))
            .await?
            .into_inner();
        Ok(serde_json::json!({"value": text(r.kvs.first())}))
    }

    async fn put(&mut self, key: Vec<u8>, value: String) -> Result<serde_json::Value, tonic::Status> {
        let r = self
            .kv
            .put(self.req(pb::PutRequest {
                key,
                value: value.into_bytes(),
                prev_kv: true,
                ..Default::default()
            }))
            .await?
            .into_inner();
        Ok(serde_json::json!({"previous": text(r.prev_kv.as_ref())}))
    }

    async fn delete(&mut self, key: Vec<u8>) -> Result<serde_json::Value, tonic::Status> {
        let r = self
            .kv
            .delete_range(self.req(pb::DeleteRangeRequest {
                key,
                prev_kv: true,
                ..Default::default()
            }))
            .await?
            .into_inner();
        Ok(serde_json::json!({"previous": text(r.prev_kvs.first())}))
    }

    /// lockstep's kv cas as one etcd transaction: swap when the current value equals `old`
    /// (None = absent); `new` None deletes. Output: {"swapped", "current"}.
    async fn cas(
        &mut self,
        key: Vec<u8>,
        old: &Option<String>,
        new: &Option<String>,
    ) -> Result<serde_json::Value, tonic::Status> {
        let r = self.kv.txn(self.req(cas_txn(key, old, new))).await?.into_inner();
        if r.succeeded {
            return Ok(serde_json::json!({"swapped": true, "current": new}));
        }
        let current = r.responses.iter().find_map(|x| match &x.response {
            Some(Response::ResponseRange(rr)) => Some(text(rr.kvs.first())),
            _ => None,
        });
        Ok(serde_json::json!({"swapped": false, "current": current.flatten()}))
    }
}

/// The value of a key-value pair as text, `None` for no pair.
fn text(kv: Option<&pb::KeyValue>) -> Option<String> {
    kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

/// If `key` holds `old`, set it to `new`; otherwise read it (the current value for the output).
fn cas_txn(key: Vec<u8>, old: &Option<String>, new: &Option<String>) -> pb::TxnRequest {
    let compare = match old {
        Some(v) => pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: key.clone(),
            target_union: Some(TargetUnion::Value(v.clone().into_bytes())),
            range_end: vec![],
        },
        None => pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: key.clone(),
            target_union: Some(TargetUnion::CreateRevision(0)),
            range_end: vec![],
        },
    };
    let success = match new {
        Some(v) => Request::RequestPut(pb::PutRequest {
            key: key.clone(),
            value: v.clone().into_bytes(),
            ..Default::default()
        }),
        None => Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: key.clone(),
            ..Default::default()
        }),
    };
    let failure = Request::RequestRange(pb::RangeRequest {
        key,
        ..Default::default()
    });
    pb::TxnRequest {
        compare: vec![compare],
        success: vec![pb::RequestOp { request: Some(success) }],
        failure: vec![pb::RequestOp { request: Some(failure) }],
    }
}

impl KvBackend for EtcdBackend {
    async fn run(&mut self, op: &Op) -> (Outcome, Option<serde_json::Value>) {
        match self.exec(op).await {
            Ok(v) => (Outcome::Ok, Some(v)),
            // A read that failed changed nothing; a write without an answer may have landed.
            Err(_) if op.kind == OpKind::Get => (Outcome::Fail, None),
            Err(_) => (Outcome::Unknown, None),
        }
    }
}

pub struct EtcdMember {
    pub name: String,
    pub client_url: String,
    pub client_addr: SocketAddr,
    pub log: PathBuf,
    pub proc: ChildGuard,
}

/// A local etcd cluster: `n` members on 127.0.0.1, each with its own data dir, default
/// durability (the WAL is fsynced before a proposal is acknowledged).
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
}

impl EtcdCluster {
    pub fn start(bin: &Path, base: &Path, n: usize) -> anyhow::Result<EtcdCluster> {
        let mut ports = Vec::new();
        for _ in 0..n {
            ports.push((free_port()?, free_port()?));
        }
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let dir: PathBuf = base.join(&name);
            std::fs::create_dir_all(&dir)?;
            let log_path = base.join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path)?;
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(bin);
            cmd.arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&dir)
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-token")
                .arg("lockstep-bench")
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--logger")
                .arg("zap")
                .arg("--log-outputs")
                .arg("stderr")
                // No environment from the host (ETCD_* variables) leaks into the members.
                .env_clear()
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let proc = ChildGuard::spawn(
                &format!("etcd {name}"),
                &mut cmd,
                Signal::SIGTERM,
                Duration::from_secs(10),
            )?;
            members.push(EtcdMember {
                name,
                client_url,
                client_addr: SocketAddr::from(([127, 0, 0, 1], *client)),
                log: log_path,
                proc,
            });
        }
        Ok(EtcdCluster { members })
    }

    /// Every member's (member id, leader id) from Maintenance.Status.
    async fn statuses(&self) -> Vec<anyhow::Result<(u64, u64)>> {
        let mut out = Vec::new();
        for m in &self.members {
            let r = async {
                let mut c = MaintenanceClient::new(channel(&m.client_url)?);
                let mut req = tonic::Request::new(pb::StatusRequest {});
                req.set_timeout(Duration::from_secs(1));
                let s = tokio::time::timeout(Duration::from_secs(2), c.status(req))
                    .await??
                    .into_inner();
                anyhow::Ok((s.header.map(|h| h.member_id).unwrap_or(0), s.leader))
            }
            .await;
            out.push(r);
        }
        out
    }

    /// Wait until every member answers, all agree on a leader, and a write succeeds.
    /// Returns the leader's client URL.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < timeout {
            for m in &mut self.members {
                if let Some(why) = m.proc.exited() {
                    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(3).collect();
                    bail!(
                        "etcd member {} exited ({why}); last log lines: {}",
                        m.name,
                        tail.join(" | ")
                    );
                }
            }
            let st = self.statuses().await;
            if st.iter().all(|s| s.is_ok()) {
                let st: Vec<(u64, u64)> = st.into_iter().map(|s| s.expect("checked")).collect();
                let leader = st[0].1;
                if leader != 0 && st.iter().all(|(_, l)| *l == leader) {
                    if let Some(i) = st.iter().position(|(id, _)| *id == leader) {
                        let url = self.members[i].client_url.clone();
                        let mut b = EtcdBackend::new(&url)?;
                        let probe = Op {
                            kind: OpKind::Put,
                            key: "bench-ready".into(),
                            value: Some("1".into()),
                            old: None,
                            new: None,
                        };
                        if b.run(&probe).await.0 == Outcome::Ok {
                            return Ok(url);
                        }
                        last = "leader elected but a write failed".into();
                    }
                } else {
                    last = format!("no agreed leader yet: {st:?}");
                }
            } else {
                last = st
                    .into_iter()
                    .filter_map(|s| s.err())
                    .map(|e| format!("{e:#}"))
                    .next()
                    .unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("etcd cluster not healthy within {timeout:?}: {last}")
    }

    /// Start and wait until healthy, retrying with fresh ports and data dirs: on a busy
    /// machine another process can take a port between `free_port` and etcd's bind.
    /// Returns the cluster and its leader's client URL.
    pub async fn start_healthy(bin: &Path, base: &Path, n: usize) -> anyhow::Result<(EtcdCluster, String)> {
        let mut last = None;
        for attempt in 1..=3 {
            let mut c = EtcdCluster::start(bin, &base.join(format!("try{attempt}")), n)?;
            match c.wait_healthy(Duration::from_secs(60)).await {
                Ok(url) => return Ok((c, url)),
                Err(e) => {
                    eprintln!("etcd: attempt {attempt}: {e:#}");
                    c.stop();
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    pub fn member_by_url(&self, url: &str) -> Option<&EtcdMember> {
        self.members.iter().find(|m| m.client_url == url)
    }

    pub fn stop(&mut self) {
        for m in &mut self.members {
            m.proc.stop();
        }
    }
}

/// `etcd --version`'s first line, for the report.
pub fn version(bin: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("etcd (unknown version)")
        .to_string())
}
