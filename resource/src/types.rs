//! The `ReplicatedStateMachine` custom resource (`lockstep.dev/v1alpha1`).
//!
//! Every optional field is `Option` and skipped when absent: nothing here writes a default into
//! `spec`, so what a user (or a GitOps tool) applied is exactly what the API server stores.
//! Defaults are applied where they are used (the operator's `build` step, the runtime).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::*;

/// A replicated, fault-tolerant state machine: `t+1` replicas for fail-stop faults, `2t+1`
/// for Byzantine faults, all running the same machine version in lockstep.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "ReplicatedStateMachine",
    plural = "replicatedstatemachines",
    shortname = "rsm",
    category = "lockstep",
    namespaced,
    status = "ReplicatedStateMachineStatus",
    derive = "PartialEq",
    doc = "A replicated state machine: t+1 fail-stop or 2t+1 Byzantine replicas running one machine version in lockstep.",
    validation = Rule::new(NAME_RULE).message(NAME_MSG),
    printcolumn(name = "T", type_ = "integer", json_path = ".spec.faultsTolerated", description = "Faults tolerated (t)"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.failureModel", description = "Failure model"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.desiredReplicas", description = "Desired replicas (t+1 or 2t+1)"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas", description = "Replicas serving in the current configuration"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.currentVersion", description = "Machine version the replicas run"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch", description = "Configuration epoch"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.upgradePhase", description = "Rollout phase", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new(ORDERING_BYZANTINE_RULE).message(ORDERING_BYZANTINE_MSG),
    validation = Rule::new(CLIENT_IDENTITIES_BYZANTINE_RULE).message(CLIENT_IDENTITIES_BYZANTINE_MSG),
    validation = Rule::new(ISSUER_IMMUTABLE_RULE).message(ISSUER_IMMUTABLE_MSG)
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedStateMachineSpec {
    /// t, the number of faulty replicas the cluster survives (0..=7).
    #[x_kube(validation = Rule::new(FAULTS_RULE).message(FAULTS_MSG))]
    pub faults_tolerated: i32,

    /// `FailStop` (t+1 replicas, primary-backup, write-all) or `Byzantine` (2t+1 replicas,
    /// signed requests, voted outputs). Immutable.
    #[x_kube(validation = Rule::new(FAILURE_MODEL_IMMUTABLE_RULE).message(FAILURE_MODEL_IMMUTABLE_MSG))]
    pub failure_model: FailureModel,

    /// The deterministic state machine the replicas run.
    pub machine: MachineSpec,

    /// Request ordering for Byzantine mode (stability by Lamport or physical clocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<OrderingSpec>,

    /// Replica storage: a PersistentVolumeClaim per replica, or `ephemeral: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,

    /// Compute resources of the replica container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Where replica pods may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,

    /// Public keys of the clients allowed to sign requests (Byzantine mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_identities: Option<ClientIdentities>,

    /// Who may reach the replicas over the network (the operator's NetworkPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,

    /// Transport security of the replicas (mutual TLS is always on; this says who issues
    /// the certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// Who issues the replicas' certificates. Absent (the default): the operator's built-in CA
/// per resource, which needs nothing else installed.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A cert-manager issuer that signs every certificate of this resource instead of the
    /// built-in CA (cert-manager must be installed). Cannot be added, removed or changed
    /// later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// A cert-manager issuer, as in a cert-manager `Certificate`'s `spec.issuerRef`.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new(ISSUER_KIND_RULE).message(ISSUER_KIND_MSG))]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the Issuer (in the resource's namespace) or ClusterIssuer.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(SUBDOMAIN_RULE).message(ISSUER_NAME_MSG))]
    pub name: String,
    /// `Issuer` (the default) or `ClusterIssuer`; an external issuer's kind with its `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub kind: Option<String>,
    /// API group of the issuer (`cert-manager.io` when unset; an external issuer's group
    /// otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(SUBDOMAIN_RULE).message(ISSUER_GROUP_MSG))]
    pub group: Option<String>,
}

/// cert-manager's own API group, the default of [`IssuerRef::group`].
pub const CERT_MANAGER_GROUP: &str = "cert-manager.io";

impl IssuerRef {
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("Issuer")
    }

    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(CERT_MANAGER_GROUP)
    }
}

impl std::fmt::Display for IssuerRef {
    /// `Issuer lockstep-ca`, `ClusterIssuer corp-ca`, `AWSPCAIssuer pca (awspca.cert-manager.io)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind(), self.name)?;
        if self.group() != CERT_MANAGER_GROUP {
            write!(f, " ({})", self.group())?;
        }
        Ok(())
    }
}

/// The failure model the cluster is built for.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureModel {
    /// Failures halt a replica and are observable: n = t+1.
    FailStop,
    /// Up to t replicas behave arbitrarily: n = 2t+1 with voting.
    Byzantine,
}

impl FailureModel {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureModel::FailStop => "FailStop",
            FailureModel::Byzantine => "Byzantine",
        }
    }
}

impl std::fmt::Display for FailureModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of the machine: replicas refuse peers, and clients refuse answers, whose
/// (name, version, digest) differ.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    /// Machine name, e.g. `kv`.
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new(MACHINE_NAME_RULE).message(MACHINE_NAME_MSG))]
    pub name: String,
    /// Semantic version. Changing it starts a lockstep rollout.
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(VERSION_RULE).message(VERSION_MSG))]
    pub version: String,
    /// Replica container image (required on Kubernetes; `lockstep up` runs local processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(IMAGE_RULE).message(IMAGE_MSG))]
    pub image: Option<String>,
    /// Optional content digest of the machine, part of its identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71))]
    #[x_kube(validation = Rule::new(DIGEST_RULE).message(DIGEST_MSG))]
    pub digest: Option<String>,
}

/// How Byzantine replicas decide that a request is stable (Schneider, section 3.2).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new(CLOCK_BOUNDS_RULE).message(CLOCK_BOUNDS_MSG))]
#[serde(rename_all = "camelCase")]
pub struct OrderingSpec {
    /// `LamportClock` (idle clients send no-ops) or `PhysicalClock` (bounded skew and delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability: Option<Stability>,
    /// Bound on the clock skew between any two processes (PhysicalClock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(MAX_SKEW_RULE).message(MAX_SKEW_MSG))]
    pub max_clock_skew_millis: Option<i64>,
    /// Bound on message delay between any two processes (both stabilities: requests count
    /// as agreed only after relays had time to arrive; lockstep uses 10 ms when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(MAX_DELAY_RULE).message(MAX_DELAY_MSG))]
    pub max_delay_millis: Option<i64>,
}

/// Stability test for ordering requests.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stability {
    LamportClock,
    PhysicalClock,
}

/// Replica storage.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[x_kube(validation = Rule::new(EPHEMERAL_RULE).message(EPHEMERAL_MSG))]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each replica's PersistentVolumeClaim (the operator uses 1Gi when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(SIZE_RULE).message(SIZE_MSG))]
    pub size: Option<String>,
    /// StorageClass of the claims (the cluster default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(SUBDOMAIN_RULE).message(STORAGE_CLASS_MSG))]
    pub storage_class_name: Option<String>,
    /// Keep replica data in an emptyDir: lost with the pod, recovered by state transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<bool>,
    /// Keep the claims when the RSM is deleted (default false: they are deleted with it). A
    /// new RSM of the same name and namespace starts its replicas on them, with their data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_on_delete: Option<bool>,
}

/// Placement of replica pods.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Replaces the operator's default (preferred anti-affinity across nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
}

/// Network access to the replica pods. The operator owns one NetworkPolicy per resource: the
/// gRPC port from the resource's own replicas and the operator always, and from `clientFrom`
/// for clients; /healthz, /readyz and /metrics from the operator and the resource's namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Sources allowed to connect to the client (gRPC) port, as in a NetworkPolicy ingress
    /// rule. Absent: every source. An empty list: no client beyond the resource's own replicas
    /// and the operator. (The port also carries the peer and admin APIs.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_from: Option<Vec<NetworkPolicyPeer>>,
}

/// Where the replicas find the public keys of clients allowed to sign requests.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClientIdentities {
    pub secret_ref: SecretReference,
}

/// A Secret in the resource's namespace.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
pub struct SecretReference {
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(SUBDOMAIN_RULE).message(SECRET_NAME_MSG))]
    pub name: String,
}

/// Observed state, written only by the configuration master (the operator).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedStateMachineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Configuration epoch. Written here (with optimistic concurrency) before any replica
    /// is told about it: the API server is the fencing authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
    /// Replica id of the primary of `epoch` (FailStop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Configuration members of `epoch` and observed replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Rollout phase: empty when steady; otherwise Staging, Sealing, Replacing, Resuming,
    /// Failed (as decided by the planner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_phase: Option<String>,
    /// Log index N of the seal barrier of the current rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_index: Option<i64>,
    /// The rollout in progress, as the configuration master persists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// Replica ordinals below this were handed out before: a replacement never reuses the
    /// name (and volume) of a replica it replaces. Persisted before a replica is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_ordinal: Option<i64>,
    /// Ready, Available, Progressing, Degraded, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Byzantine mode: what the operator, as configuration master, publishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<ByzantineStatus>,
}

/// Byzantine mode, as the configuration master (the operator) sees it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ByzantineStatus {
    /// The master's Ed25519 public key (hex). Clients verify the era replicas report with it:
    /// `lockstep -c NAME:7000 --master-public-key KEY ...`.
    pub master_public_key: String,
    /// The era the master signed last (members, keys and bounds change only between eras).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub era: Option<i64>,
    /// Per replica: what the other replicas hold against it. A replica that is faulty but
    /// keeps running is never replaced by the operator; this is where it shows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ByzantineReplicaStatus>,
}

/// One replica in Byzantine mode.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ByzantineReplicaStatus {
    pub id: String,
    /// The era it reports being in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub era: Option<i64>,
    /// Evidence against it (bad signatures, refused or replayed relays, equivocation,
    /// corrupt snapshots) as reported by other replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<ByzantineEvidence>,
}

/// Evidence one replica reports against another.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ByzantineEvidence {
    pub kind: String,
    pub count: i64,
    pub reported_by: String,
}

/// A lockstep rollout in progress: from one machine to another, phase by phase.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub from: MachineStatus,
    pub to: MachineStatus,
    /// Staging, Sealing, Replacing or Resuming.
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_index: Option<i64>,
}

/// A machine identity as recorded in status.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// One replica as the operator sees it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Pod name (on Kubernetes) or process id (local).
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<i64>,
    /// Replica state: primary, backup, learner, fenced, unconfigured, removed, sealed,
    /// unreachable, pending, failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Voter or Learner in the configuration of the current epoch; absent when not a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Condition types the operator maintains.
pub mod condition_types {
    pub const READY: &str = "Ready";
    pub const AVAILABLE: &str = "Available";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const PAUSED: &str = "Paused";
    pub const ALL: [&str; 5] = [READY, AVAILABLE, PROGRESSING, DEGRADED, PAUSED];
}

/// Annotation that pauses reconciliation of one object: `lockstep.dev/paused: "true"`.
pub const PAUSED_ANNOTATION: &str = "lockstep.dev/paused";

impl ReplicatedStateMachineSpec {
    /// n = t+1 for FailStop, 2t+1 for Byzantine.
    pub fn desired_replicas(&self) -> i32 {
        let t = self.faults_tolerated.max(0);
        match self.failure_model {
            FailureModel::FailStop => t + 1,
            FailureModel::Byzantine => 2 * t + 1,
        }
    }
}

impl ReplicatedStateMachine {
    /// `spec.tls.issuerRef`: certificates from cert-manager instead of the built-in CA.
    pub fn issuer_ref(&self) -> Option<&IssuerRef> {
        self.spec.tls.as_ref()?.issuer_ref.as_ref()
    }

    /// n = t+1 for FailStop, 2t+1 for Byzantine.
    pub fn desired_replicas(&self) -> i32 {
        self.spec.desired_replicas()
    }

    /// True when the pause annotation is set to "true".
    pub fn is_paused(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PAUSED_ANNOTATION))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}
