//! Observe: the replica pods, their volumes and nodes (from watch caches, or the API in
//! tests), and each replica's own view through its Admin.Status call.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use lockstep_proto::StatusResponse;
use lockstep_resource::ReplicatedStateMachine;

use crate::admin::ReplicaAdmin;
use crate::liveness::Liveness;
use crate::names;
use crate::translate::{Admin, ReplicaObservation, Tuning, World};

/// Watch caches of everything the operator reads or owns.
#[derive(Clone)]
pub struct Caches {
    pub pods: Store<Pod>,
    pub pvcs: Store<PersistentVolumeClaim>,
    pub nodes: Store<Node>,
    pub services: Store<Service>,
    pub config_maps: Store<ConfigMap>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub network_policies: Store<NetworkPolicy>,
}

/// Where pods, claims and nodes are read from.
#[derive(Clone)]
pub enum Source {
    /// Watch caches (production): no API request per reconcile.
    Cache(Caches),
    /// Plain lists per reconcile (tests, or when caches are off).
    Api,
}

/// How the operator reaches a replica's admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAddress {
    /// `http://POD_IP:7000` (in-cluster; no DNS lag).
    PodIp,
    /// The stable DNS endpoint of the configuration.
    Dns,
}

fn belongs(
    meta_ns: Option<String>,
    labels: &std::collections::BTreeMap<String, String>,
    ns: &str,
    cluster: &str,
) -> bool {
    meta_ns.as_deref() == Some(ns) && labels.get(names::CLUSTER_LABEL).map(String::as_str) == Some(cluster)
}

/// Pods and PVC names of one cluster.
pub async fn owned(
    client: &Client,
    source: &Source,
    ns: &str,
    cluster: &str,
) -> Result<(Vec<Pod>, Vec<PersistentVolumeClaim>, HashMap<String, Node>), kube::Error> {
    match source {
        Source::Cache(Caches { pods, pvcs, nodes, .. }) => {
            let pods: Vec<Pod> = pods
                .state()
                .into_iter()
                .filter(|p| belongs(p.namespace(), p.labels(), ns, cluster))
                .map(|p| (*p).clone())
                .collect();
            let claims = pvcs
                .state()
                .into_iter()
                .filter(|p| belongs(p.namespace(), p.labels(), ns, cluster))
                .map(|p| (*p).clone())
                .collect();
            let nodes = nodes
                .state()
                .into_iter()
                .map(|n| (n.name_any(), (*n).clone()))
                .collect();
            Ok((pods, claims, nodes))
        }
        Source::Api => {
            let lp = ListParams::default().labels(&format!("{}={cluster}", names::CLUSTER_LABEL));
            let pods = Api::<Pod>::namespaced(client.clone(), ns).list(&lp).await?.items;
            let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
                .list(&lp)
                .await?
                .items;
            Ok((pods, claims, HashMap::new()))
        }
    }
}

/// Why a node counts as lost: its Ready condition has not been True for longer than the
/// grace period (the kubelet stopped reporting, or reports NotReady).
pub fn node_lost(node: &Node, now: Timestamp, tuning: &Tuning) -> Option<String> {
    let ready = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    if ready.status == "True" {
        return None;
    }
    let since = ready.last_transition_time.as_ref()?.0;
    let for_secs = now.as_second().saturating_sub(since.as_second());
    (u64::try_from(for_secs).unwrap_or(0) >= tuning.node_grace.as_secs()).then(|| {
        format!(
            "node {} not Ready ({}) for {for_secs}s",
            node.name_any(),
            ready.reason.clone().unwrap_or_else(|| ready.status.clone())
        )
    })
}

/// Where to call a replica's admin API, if it can be called at all.
pub fn admin_address(pod: &Pod, rsm: &ReplicatedStateMachine, mode: AdminAddress) -> Option<String> {
    let status = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some() || status.phase.as_deref() != Some("Running") {
        return None;
    }
    match mode {
        AdminAddress::PodIp => {
            let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_string()
            };
            Some(format!("http://{host}:{}", names::GRPC_PORT))
        }
        AdminAddress::Dns => Some(names::endpoint(
            &rsm.name_any(),
            &rsm.namespace().unwrap_or_default(),
            &pod.name_any(),
        )),
    }
}

/// Everything the planner needs about one cluster.
#[allow(clippy::too_many_arguments)]
pub async fn world(
    client: &Client,
    source: &Source,
    admin: &dyn ReplicaAdmin,
    mode: AdminAddress,
    pki: Option<&crate::tls::Pki>,
    unreachable: &Mutex<HashMap<String, (Timestamp, Timestamp)>>,
    liveness: Option<&Liveness>,
    rsm: &ReplicatedStateMachine,
    tuning: &Tuning,
    now: Timestamp,
) -> Result<World, kube::Error> {
    let ns = rsm.namespace().unwrap_or_default();
    let cluster = rsm.name_any();
    let (pods, pvcs, nodes) = owned(client, source, &ns, &cluster).await?;
    let (replica_pods, stage_pods) = replicas_and_stages(pods);
    if let Some(l) = liveness {
        l.watch(rsm, &replica_pods);
    }
    let answers = statuses(admin, mode, pki, rsm, &replica_pods).await;
    let view = ReplicaView {
        rsm,
        liveness,
        nodes: &nodes,
        tuning,
        now,
    };
    let replicas = view.observe(replica_pods, answers, unreachable);
    Ok(World {
        replicas,
        stage_pods,
        terminating_pvcs: terminating_claims(&pvcs, rsm),
        owned_pvcs: owned_claims(&pvcs, rsm),
        pvcs: pvcs.iter().map(|p| p.name_any()).collect(),
        disk_restarts: disk_restarts(&pvcs),
        now: Some(now),
    })
}

/// The replica pods and the image pre-pull pods of the cluster (other pods are dropped).
fn replicas_and_stages(pods: Vec<Pod>) -> (Vec<Pod>, Vec<Pod>) {
    let component = |p: &Pod| p.labels().get(names::COMPONENT_LABEL).cloned().unwrap_or_default();
    pods.into_iter()
        .filter(|p| component(p) == names::COMPONENT_REPLICA || component(p) == names::COMPONENT_STAGE)
        .partition(|p| component(p) == names::COMPONENT_REPLICA)
}

/// Each replica's Admin.Status answer, asked of all at once (`None`: not asked, the pod has
/// no admin address).
async fn statuses(
    admin: &dyn ReplicaAdmin,
    mode: AdminAddress,
    pki: Option<&crate::tls::Pki>,
    rsm: &ReplicatedStateMachine,
    replica_pods: &[Pod],
) -> Vec<Option<Result<StatusResponse, String>>> {
    let calls = replica_pods.iter().map(|pod| {
        let addr = admin_address(pod, rsm, mode).map(|a| crate::tls::admin_target(rsm, pod, a, pki));
        async move {
            match addr {
                Some(a) => Some(admin.status(a).await),
                None => None,
            }
        }
    });
    futures::future::join_all(calls).await
}

/// What a reconcile knows besides the replica pods and their answers.
struct ReplicaView<'a> {
    rsm: &'a ReplicatedStateMachine,
    liveness: Option<&'a Liveness>,
    nodes: &'a HashMap<String, Node>,
    tuning: &'a Tuning,
    now: Timestamp,
}

impl ReplicaView<'_> {
    /// One observation per replica pod; `unreachable` (held throughout) keeps since when each
    /// replica has failed to answer.
    fn observe(
        &self,
        replica_pods: Vec<Pod>,
        answers: Vec<Option<Result<StatusResponse, String>>>,
        unreachable: &Mutex<HashMap<String, (Timestamp, Timestamp)>>,
    ) -> Vec<ReplicaObservation> {
        let mut replicas = Vec::with_capacity(replica_pods.len());
        let mut silent = unreachable.lock().unwrap_or_else(|e| e.into_inner());
        for (pod, answer) in replica_pods.into_iter().zip(answers) {
            let admin = self.admin(&pod, answer, &mut silent);
            let node_lost = self.node_lost(&pod);
            let connection_lost = self.liveness.is_some_and(|l| l.connection_lost(self.rsm, &pod));
            replicas.push(ReplicaObservation {
                pod,
                admin,
                node_lost,
                connection_lost,
            });
        }
        // Forget replicas not seen failing for ten minutes (deleted pods, other clusters' gone).
        let now = self.now;
        silent.retain(|_, (_, last)| now.as_second().saturating_sub(last.as_second()) < 600);
        drop(silent);
        replicas
    }

    /// The replica's answer, and since when it has failed in a row (kept in `silent`).
    fn admin(
        &self,
        pod: &Pod,
        answer: Option<Result<StatusResponse, String>>,
        silent: &mut HashMap<String, (Timestamp, Timestamp)>,
    ) -> Admin {
        let key = pod.uid().unwrap_or_else(|| pod.name_any());
        match answer {
            None => {
                silent.remove(&key);
                Admin::NotAsked
            }
            Some(Ok(s)) => {
                let s = Box::new(s);
                silent.remove(&key);
                if let Some(l) = self.liveness {
                    l.answered(self.rsm, pod);
                }
                Admin::Answered(s)
            }
            Some(Err(error)) => {
                let entry = silent.entry(key).or_insert((self.now, self.now));
                entry.1 = self.now;
                Admin::Failed { error, since: entry.0 }
            }
        }
    }

    /// Why the pod's node counts as lost (with no nodes known, none is).
    fn node_lost(&self, pod: &Pod) -> Option<String> {
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .and_then(|n| match self.nodes.get(n) {
                Some(node) => node_lost(node, self.now, self.tuning),
                None if !self.nodes.is_empty() => Some(format!("node {n} no longer exists")),
                None => None,
            })
    }
}

/// Claims being deleted; a claim still owned by a deleted RSM of the same name is about to be
/// collected.
fn terminating_claims(pvcs: &[PersistentVolumeClaim], rsm: &ReplicatedStateMachine) -> Vec<String> {
    pvcs.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some() || crate::adopt::owned_by_other(p, rsm))
        .map(|p| p.name_any())
        .collect()
}

fn owned_claims(pvcs: &[PersistentVolumeClaim], rsm: &ReplicatedStateMachine) -> Vec<String> {
    pvcs.iter()
        .filter(|p| crate::adopt::owned_by(p, rsm))
        .map(|p| p.name_any())
        .collect()
}

/// Per replica id, the quick restarts from disk its claim's annotation counts.
fn disk_restarts(pvcs: &[PersistentVolumeClaim]) -> BTreeMap<String, u32> {
    pvcs.iter()
        .filter_map(|p| {
            let id = p.name_any().strip_prefix("data-")?.to_string();
            let n = p.annotations().get(names::DISK_RESTARTS_ANNOTATION)?.parse().ok()?;
            Some((id, n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn node(status: &str, since: i64) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some("n1".into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: status.into(),
                    reason: Some("NodeStatusUnknown".into()),
                    last_transition_time: Some(Time(Timestamp::from_second(since).unwrap_or(Timestamp::UNIX_EPOCH))),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn node_loss_after_grace() {
        let t = Tuning::default();
        let now = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        assert_eq!(node_lost(&node("True", 0), now, &t), None);
        assert_eq!(node_lost(&node("Unknown", 990), now, &t), None);
        let lost = node_lost(&node("Unknown", 900), now, &t).unwrap_or_default();
        assert!(
            lost.contains("node n1 not Ready (NodeStatusUnknown) for 100s"),
            "{lost}"
        );
    }
}
