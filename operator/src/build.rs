//! Pure builders: the Kubernetes objects a `ReplicatedStateMachine` owns.
//!
//! No client here: every function maps the resource (and a replica id) to an object, so the
//! shape of what the operator creates is unit-tested without an API server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, Probe,
    SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use lockstep_planner::{Config, MachineRef};
use lockstep_resource::ReplicatedStateMachine;

use crate::names::{self, *};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error(
        "spec.machine.image is required on Kubernetes (and the operator has no --default-replica-image): \
         set the replica container image"
    )]
    NoImage,
    #[error("the resource has no uid yet (not read from the API server)")]
    NoUid,
}

/// Where the client public keys (Byzantine mode) are mounted in replica pods.
pub const CLIENT_IDENTITIES_DIR: &str = "/etc/lockstep/client-identities";

/// Default PVC size when `spec.storage.size` is unset.
pub const DEFAULT_STORAGE_SIZE: &str = "1Gi";

/// The controller reference every object the operator creates carries. It blocks the
/// RSM's foreground deletion (`kubectl delete --cascade=foreground`) until the object is
/// gone, as a StatefulSet's does for its pods: without it the garbage collector may drop the
/// RSM's `foregroundDeletion` finalizer before it has deleted every pod, and a pod it reaches
/// after that, while a finalizer of someone else still holds the RSM, is kept (its owner
/// still exists). Setting it needs `update` on `replicatedstatemachines/finalizers` where
/// the API server enforces owner-reference permissions (manifests/01-rbac.yaml).
pub fn owner_reference(rsm: &ReplicatedStateMachine) -> Result<OwnerReference, BuildError> {
    let mut owner = rsm.controller_owner_ref(&()).ok_or(BuildError::NoUid)?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

pub(crate) fn meta(rsm: &ReplicatedStateMachine, name: String, component: &str) -> Result<ObjectMeta, BuildError> {
    let cluster = rsm.name_any();
    let mut labels = cluster_labels(&cluster);
    labels.insert(COMPONENT_LABEL.into(), component.into());
    Ok(ObjectMeta {
        name: Some(name),
        namespace: rsm.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![owner_reference(rsm)?]),
        ..Default::default()
    })
}

/// `spec.storage.retainOnDelete`: claims without an owner reference, kept when the RSM is
/// deleted (see [`crate::adopt`]).
pub fn retain_on_delete(rsm: &ReplicatedStateMachine) -> bool {
    rsm.spec
        .storage
        .as_ref()
        .and_then(|s| s.retain_on_delete)
        .unwrap_or(false)
}

fn ephemeral(rsm: &ReplicatedStateMachine) -> bool {
    rsm.spec.storage.as_ref().and_then(|s| s.ephemeral).unwrap_or(false)
}

fn failure_model_flag(rsm: &ReplicatedStateMachine) -> &'static str {
    rsm.spec.failure_model.as_str()
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// Preferred anti-affinity across nodes: replicas of one cluster should not share a fate.
fn default_affinity(cluster: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(replica_selector(cluster)),
                        ..Default::default()
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn restricted_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The fault `INJECT_ANNOTATION` asks of replica `id` (tests only; see there).
fn injected_behaviour(rsm: &ReplicatedStateMachine, id: &str) -> Option<String> {
    let value = rsm.metadata.annotations.as_ref()?.get(INJECT_ANNOTATION)?;
    value.split(',').find_map(|pair| {
        let (pod, behaviour) = pair.trim().split_once('=')?;
        (pod.trim() == id).then(|| behaviour.trim().to_string())
    })
}

/// A replica pod. Pods are managed directly (see docs/operator-design.md): the operator,
/// not a StatefulSet controller, decides which replica starts, stops or changes image.
/// `tls`: mutual TLS with the certificate Secret `<id>-tls` ([`crate::tls`]); false only
/// for an RSM whose replicas an operator from before TLS started plaintext.
pub fn replica_pod(rsm: &ReplicatedStateMachine, id: &str, machine: &MachineRef, tls: bool) -> Result<Pod, BuildError> {
    let cluster = rsm.name_any();
    let image = machine.image.clone().ok_or(BuildError::NoImage)?;
    let mut metadata = meta(rsm, id.to_string(), COMPONENT_REPLICA)?;
    if let Some(labels) = metadata.labels.as_mut() {
        labels.insert(REPLICA_LABEL.into(), id.into());
        labels.insert(MACHINE_LABEL.into(), machine.name.clone());
    }
    metadata.annotations = Some(BTreeMap::from([
        (VERSION_ANNOTATION.to_string(), machine.version.clone()),
        (IMAGE_ANNOTATION.to_string(), image.clone()),
    ]));
    let mut parts = PodParts::data(rsm, id);
    // Environment variables, not flags: an older replica image ignores them instead of
    // failing to parse its arguments.
    parts.transport(tls, id);
    parts.ordering(rsm);
    parts.client_identities(rsm);
    parts.byzantine(rsm, &cluster, id);
    let container = replica_container(rsm, id, machine, image, parts.env, parts.volume_mounts);
    let scheduling = rsm.spec.scheduling.clone().unwrap_or_default();
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            hostname: Some(id.into()),
            subdomain: Some(names::peers_service(&cluster)),
            // Fail-stop: a replica that exits stays failed; the operator fences and replaces it.
            // (A rollout's image change still restarts the container: the kubelet restarts on a
            // spec change regardless of the restart policy.)
            restart_policy: Some("Never".into()),
            enable_service_links: Some(false),
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(30),
            security_context: Some(restricted_pod_security()),
            containers: vec![container],
            volumes: Some(parts.volumes),
            node_selector: scheduling.node_selector,
            tolerations: scheduling.tolerations,
            affinity: Some(scheduling.affinity.unwrap_or_else(|| default_affinity(&cluster))),
            topology_spread_constraints: scheduling.topology_spread_constraints,
            ..Default::default()
        }),
        status: None,
    })
}

/// What a replica pod's container gets besides its arguments: environment, volumes and where
/// they are mounted. Each spec field that needs one adds its part.
struct PodParts {
    env: Vec<EnvVar>,
    volume_mounts: Vec<VolumeMount>,
    volumes: Vec<Volume>,
}

impl PodParts {
    /// The data volume (the replica's claim, or an `emptyDir` for ephemeral storage), and the
    /// environment every replica gets.
    fn data(rsm: &ReplicatedStateMachine, id: &str) -> PodParts {
        let volume = if ephemeral(rsm) {
            Volume {
                name: "data".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }
        } else {
            Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: names::pvc(id),
                    read_only: None,
                }),
                ..Default::default()
            }
        };
        PodParts {
            env: vec![
                field_env("POD_NAMESPACE", "metadata.namespace".into()),
                // Resolved at each container start, so after a rollout's image patch the
                // replica reports the image it was really launched from (admin Status
                // `launched_image`).
                field_env("LOCKSTEP_IMAGE", format!("metadata.annotations['{IMAGE_ANNOTATION}']")),
            ],
            volume_mounts: vec![VolumeMount {
                name: "data".into(),
                mount_path: DATA_DIR.into(),
                ..Default::default()
            }],
            volumes: vec![volume],
        }
    }

    fn set(&mut self, name: &str, value: String) {
        self.env.push(EnvVar {
            name: name.into(),
            value: Some(value),
            ..Default::default()
        });
    }

    /// TLS: the replica's certificate Secret. Without it, the explicit opt-out (a replica
    /// refuses to start with neither).
    fn transport(&mut self, tls: bool, id: &str) {
        if tls {
            let (env, mount, volume) = crate::tls::pod_additions(id);
            self.env.extend(env);
            self.volume_mounts.push(mount);
            self.volumes.push(volume);
        } else {
            self.set("LOCKSTEP_INSECURE", "true".into());
        }
    }

    /// `spec.ordering` (Byzantine mode), field by field.
    fn ordering(&mut self, rsm: &ReplicatedStateMachine) {
        let Some(o) = &rsm.spec.ordering else { return };
        if let Some(s) = o.stability {
            self.set("LOCKSTEP_STABILITY", format!("{s:?}"));
        }
        if let Some(v) = o.max_clock_skew_millis {
            self.set("LOCKSTEP_MAX_CLOCK_SKEW_MILLIS", v.to_string());
        }
        if let Some(v) = o.max_delay_millis {
            self.set("LOCKSTEP_MAX_DELAY_MILLIS", v.to_string());
        }
    }

    /// `spec.clientIdentities`: the Secret of client public keys, mounted read-only.
    fn client_identities(&mut self, rsm: &ReplicatedStateMachine) {
        let Some(ids) = &rsm.spec.client_identities else { return };
        self.volume_mounts.push(VolumeMount {
            name: "client-identities".into(),
            mount_path: CLIENT_IDENTITIES_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        self.volumes.push(Volume {
            name: "client-identities".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ids.secret_ref.name.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
        self.set("LOCKSTEP_CLIENT_IDENTITIES", CLIENT_IDENTITIES_DIR.into());
    }

    /// Byzantine mode: the replica's signing key, and a fault to inject (test builds only).
    fn byzantine(&mut self, rsm: &ReplicatedStateMachine, cluster: &str, id: &str) {
        if rsm.spec.failure_model != lockstep_resource::FailureModel::Byzantine {
            return;
        }
        let (env, mount, volume) = crate::byzantine::objects::pod_additions(cluster, id);
        self.env.extend(env);
        self.volume_mounts.push(mount);
        self.volumes.push(volume);
        if let Some(behaviour) = injected_behaviour(rsm, id) {
            self.set("LOCKSTEP_INJECT", behaviour);
        }
    }
}

/// An environment variable from a field of the pod (the downward API).
fn field_env(name: &str, field_path: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The replica container: its arguments, ports, probes and limits.
fn replica_container(
    rsm: &ReplicatedStateMachine,
    id: &str,
    machine: &MachineRef,
    image: String,
    env: Vec<EnvVar>,
    volume_mounts: Vec<VolumeMount>,
) -> Container {
    Container {
        name: REPLICA_CONTAINER.into(),
        image: Some(image),
        args: Some(vec![
            "--id".into(),
            id.into(),
            "--listen".into(),
            format!("0.0.0.0:{GRPC_PORT}"),
            "--http".into(),
            format!("0.0.0.0:{HTTP_PORT}"),
            "--data-dir".into(),
            DATA_DIR.into(),
            "--machine".into(),
            machine.name.clone(),
            "--failure-model".into(),
            failure_model_flag(rsm).into(),
            "--log-json".into(),
        ]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", 2, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        resources: rsm.spec.resources.clone(),
        volume_mounts: Some(volume_mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(restricted_container_security()),
        ..Default::default()
    }
}

/// The data volume claim of a replica (None with `storage.ephemeral: true`).
pub fn replica_pvc(rsm: &ReplicatedStateMachine, id: &str) -> Result<Option<PersistentVolumeClaim>, BuildError> {
    if ephemeral(rsm) {
        return Ok(None);
    }
    let storage = rsm.spec.storage.clone().unwrap_or_default();
    let mut metadata = meta(rsm, names::pvc(id), COMPONENT_REPLICA)?;
    if let Some(labels) = metadata.labels.as_mut() {
        labels.insert(REPLICA_LABEL.into(), id.into());
    }
    if retain_on_delete(rsm) {
        metadata.owner_references = None;
    }
    Ok(Some(PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.size.unwrap_or_else(|| DEFAULT_STORAGE_SIZE.into())),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }))
}

/// Headless Service: stable per-replica DNS names for peers, published before readiness.
pub fn peers_service(rsm: &ReplicatedStateMachine) -> Result<Service, BuildError> {
    let cluster = rsm.name_any();
    Ok(Service {
        metadata: meta(rsm, names::peers_service(&cluster), COMPONENT_REPLICA)?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(replica_selector(&cluster)),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: GRPC_PORT,
                target_port: Some(IntOrString::String("grpc".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// Client Service: `lockstep --endpoint http://NAME.NAMESPACE.svc:7000`.
pub fn client_service(rsm: &ReplicatedStateMachine) -> Result<Service, BuildError> {
    let cluster = rsm.name_any();
    Ok(Service {
        metadata: meta(rsm, names::client_service(&cluster), COMPONENT_REPLICA)?,
        spec: Some(ServiceSpec {
            selector: Some(replica_selector(&cluster)),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: GRPC_PORT,
                target_port: Some(IntOrString::String("grpc".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// What clients and tools need to find the cluster: model, t, machine, member endpoints of
/// the current configuration.
pub fn config_map(rsm: &ReplicatedStateMachine, config: Option<&Config>) -> Result<ConfigMap, BuildError> {
    let cluster = rsm.name_any();
    let namespace = rsm.namespace().unwrap_or_else(|| "default".into());
    let mut data = BTreeMap::from([
        ("failureModel".to_string(), rsm.spec.failure_model.to_string()),
        ("faultsTolerated".to_string(), rsm.spec.faults_tolerated.to_string()),
        (
            "machine".to_string(),
            format!("{} {}", rsm.spec.machine.name, rsm.spec.machine.version),
        ),
        (
            "clientEndpoint".to_string(),
            format!("http://{}.{namespace}.svc:{GRPC_PORT}", names::client_service(&cluster)),
        ),
    ]);
    if let Some(c) = config {
        data.insert("epoch".into(), c.epoch.to_string());
        data.insert("primary".into(), c.primary.clone());
        data.insert(
            "endpoints".into(),
            c.members
                .iter()
                .map(|m| m.endpoint.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    Ok(ConfigMap {
        metadata: meta(rsm, names::config_map(&cluster), COMPONENT_REPLICA)?,
        data: Some(data),
        ..Default::default()
    })
}

/// Voluntary disruptions (drains) take one replica at a time; the operator fences and
/// replaces it before the next can go.
///
/// `minAvailable: n - 1` as an integer: a percentage or `maxUnavailable` needs a scale
/// subresource on the owner, which the RSM does not have (every eviction got 429). Ready means
/// a voter serving its role (replica `/readyz`), so one eviction is allowed while all n voters
/// are ready and none while a replacement is still a learner.
pub fn pdb(rsm: &ReplicatedStateMachine) -> Result<PodDisruptionBudget, BuildError> {
    let cluster = rsm.name_any();
    let n = rsm.desired_replicas();
    Ok(PodDisruptionBudget {
        metadata: meta(rsm, names::pdb(&cluster), COMPONENT_REPLICA)?,
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int((n - 1).max(0))),
            selector: Some(LabelSelector {
                match_labels: Some(replica_selector(&cluster)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
}

/// Where the operator's own pods run, so the NetworkPolicy of every cluster lets them in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorPods {
    /// The operator's namespace (its `POD_NAMESPACE`).
    pub namespace: String,
    /// Labels every operator pod carries (a subset of its pod template's labels).
    pub labels: BTreeMap<String, String>,
}

impl Default for OperatorPods {
    /// The install of `manifests/` (the chart's pods carry the same name label).
    fn default() -> Self {
        Self {
            namespace: "lockstep-system".into(),
            labels: BTreeMap::from([(NAME_LABEL.to_string(), MANAGER.to_string())]),
        }
    }
}

fn tcp_port(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Ingress to the replica pods of one cluster (docs/security.md). Egress is not restricted.
///
/// - gRPC (peer and admin APIs, and the client API on the same port): from the cluster's
///   own replicas and the operator's pods;
/// - gRPC for clients: from `spec.network.clientFrom`, or from everywhere when it is absent
///   (an empty list adds no rule: an ingress rule with no sources would admit everyone);
/// - HTTP (/healthz, /readyz, /metrics): from the operator's pods (liveness connections,
///   section 4 of operator-design.md) and from pods of the cluster's namespace. Kubelet
///   probes come from the pod's own node, which a NetworkPolicy cannot block.
pub fn network_policy(rsm: &ReplicatedStateMachine, operator: &OperatorPods) -> Result<NetworkPolicy, BuildError> {
    let cluster = rsm.name_any();
    let replicas = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(replica_selector(&cluster)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let operator_pods = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                operator.namespace.clone(),
            )])),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(operator.labels.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let same_namespace = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector::default()),
        ..Default::default()
    };
    let mut ingress = vec![NetworkPolicyIngressRule {
        from: Some(vec![replicas, operator_pods.clone()]),
        ports: Some(vec![tcp_port(GRPC_PORT)]),
    }];
    let client_from = rsm.spec.network.as_ref().and_then(|n| n.client_from.clone());
    match client_from {
        None => ingress.push(NetworkPolicyIngressRule {
            from: None,
            ports: Some(vec![tcp_port(GRPC_PORT)]),
        }),
        Some(peers) if peers.is_empty() => {}
        Some(peers) => ingress.push(NetworkPolicyIngressRule {
            from: Some(peers),
            ports: Some(vec![tcp_port(GRPC_PORT)]),
        }),
    }
    ingress.push(NetworkPolicyIngressRule {
        from: Some(vec![operator_pods, same_namespace]),
        ports: Some(vec![tcp_port(HTTP_PORT)]),
    });
    Ok(NetworkPolicy {
        metadata: meta(rsm, names::network_policy(&cluster), COMPONENT_REPLICA)?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(replica_selector(&cluster)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..Default::default()
        }),
    })
}

/// Staging: a short-lived pod on `node` that pulls `image` (the new version is on every
/// node before anything stops). It runs `lockstep-replica --version` and exits.
pub fn stage_pod(rsm: &ReplicatedStateMachine, replica_id: &str, node: &str, image: &str) -> Result<Pod, BuildError> {
    let cluster = rsm.name_any();
    let metadata = meta(rsm, names::stage_pod(&cluster, replica_id), COMPONENT_STAGE)?;
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            restart_policy: Some("Never".into()),
            enable_service_links: Some(false),
            automount_service_account_token: Some(false),
            security_context: Some(restricted_pod_security()),
            tolerations: rsm.spec.scheduling.as_ref().and_then(|s| s.tolerations.clone()),
            containers: vec![Container {
                name: "stage".into(),
                image: Some(image.into()),
                args: Some(vec!["--version".into()]),
                security_context: Some(restricted_container_security()),
                resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                    requests: Some(BTreeMap::from([
                        ("cpu".to_string(), Quantity("10m".into())),
                        ("memory".to_string(), Quantity("16Mi".into())),
                    ])),
                    limits: Some(BTreeMap::from([("memory".to_string(), Quantity("64Mi".into()))])),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    })
}

/// The strategic-merge patch that restarts a replica's container with `machine` in place
/// (same pod, same IP, same volume): only the image changes; the previous machine is kept
/// in annotations until the kubelet has restarted the container.
pub fn restart_patch(pod: &Pod, machine: &MachineRef) -> Result<serde_json::Value, BuildError> {
    let image = machine.image.clone().ok_or(BuildError::NoImage)?;
    let current = crate::translate::pod_machine(pod);
    Ok(serde_json::json!({
        "metadata": {
            "labels": { MACHINE_LABEL: machine.name },
            "annotations": {
                VERSION_ANNOTATION: machine.version,
                IMAGE_ANNOTATION: image,
                PREVIOUS_VERSION_ANNOTATION: current.version,
                PREVIOUS_IMAGE_ANNOTATION: current.image.unwrap_or_default(),
            }
        },
        "spec": { "containers": [ { "name": REPLICA_CONTAINER, "image": image } ] }
    }))
}

/// A stable hash of an object's desired content, to skip applies that change nothing.
pub fn content_hash<T: serde::Serialize>(obj: &T) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(obj).unwrap_or_default().hash(&mut h);
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsm(extra: &str) -> ReplicatedStateMachine {
        let text = format!(
            "apiVersion: lockstep.dev/v1alpha1\nkind: ReplicatedStateMachine\nmetadata: {{name: kv, namespace: apps, uid: u-1}}\n\
             spec: {{faultsTolerated: 1, failureModel: FailStop, machine: {{name: kv, version: 1.0.0, image: 'img:1'}}{extra}}}\n"
        );
        lockstep_resource::from_yaml(&text).expect("fixture")
    }

    fn kv() -> MachineRef {
        MachineRef {
            name: "kv".into(),
            version: "1.0.0".into(),
            image: Some("img:1".into()),
        }
    }

    #[test]
    fn replicas_run_mutual_tls_with_their_own_secret_and_plaintext_only_when_asked() {
        let pod = replica_pod(&rsm(""), "kv-0", &kv(), true).expect("builds");
        let spec = pod.spec.as_ref().expect("spec");
        let c = &spec.containers[0];
        let env: BTreeMap<String, String> = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        assert_eq!(
            env.get("LOCKSTEP_TLS_CERT").map(String::as_str),
            Some("/etc/lockstep/tls/tls.crt")
        );
        assert_eq!(
            env.get("LOCKSTEP_TLS_KEY").map(String::as_str),
            Some("/etc/lockstep/tls/tls.key")
        );
        assert_eq!(
            env.get("LOCKSTEP_TLS_CA").map(String::as_str),
            Some("/etc/lockstep/tls/ca.crt")
        );
        assert!(!env.contains_key("LOCKSTEP_INSECURE"));
        let secret = spec
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.secret.clone())
            .expect("certificate volume");
        assert_eq!(secret.secret_name.as_deref(), Some("kv-0-tls"), "each replica its own");
        assert!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == "/etc/lockstep/tls" && m.read_only == Some(true))
        );
        assert!(!crate::tls::runs_plaintext(&pod));

        let legacy = replica_pod(&rsm(""), "kv-1", &kv(), false).expect("builds");
        assert!(
            crate::tls::runs_plaintext(&legacy),
            "a replica refuses to start without TLS or an explicit --insecure"
        );
        // The flag the replica reads from that variable.
        let args = lockstep_replica::tls::TlsArgs {
            insecure: true,
            ..Default::default()
        };
        assert!(!args.replica_transport().expect("plaintext").is_tls());
        assert!(lockstep_replica::tls::TlsArgs::default().replica_transport().is_err());
    }

    #[test]
    fn the_inject_annotation_reaches_only_the_named_byzantine_replica() {
        let env_of = |rsm: &ReplicatedStateMachine, id: &str| -> Option<String> {
            let pod = replica_pod(rsm, id, &kv(), true).expect("builds");
            pod.spec.expect("spec").containers[0]
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "LOCKSTEP_INJECT")
                .and_then(|e| e.value.clone())
        };
        let text = "apiVersion: lockstep.dev/v1alpha1\nkind: ReplicatedStateMachine\n\
                    metadata: {name: kv, namespace: apps, uid: u-1, annotations: {lockstep.dev/inject: 'kv-1=wrong-output, kv-2 = silent'}}\n\
                    spec: {faultsTolerated: 1, failureModel: Byzantine, machine: {name: kv, version: 1.0.0, image: 'img:1'}}\n";
        let byz: ReplicatedStateMachine = lockstep_resource::from_yaml(text).expect("fixture");
        assert_eq!(env_of(&byz, "kv-1").as_deref(), Some("wrong-output"));
        assert_eq!(env_of(&byz, "kv-2").as_deref(), Some("silent"));
        assert_eq!(env_of(&byz, "kv-0"), None, "only the named pods");
        assert_eq!(env_of(&byz, "kv-10"), None, "names match whole");
        let mut fail_stop = rsm("");
        fail_stop.metadata.annotations = byz.metadata.annotations.clone();
        assert_eq!(
            env_of(&fail_stop, "kv-1"),
            None,
            "fault injection is a Byzantine-mode test hook"
        );
    }

    #[test]
    fn replica_pod_shape() {
        let pod = replica_pod(&rsm(""), "kv-0", &kv(), true).expect("builds");
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.hostname.as_deref(), Some("kv-0"));
        assert_eq!(spec.subdomain.as_deref(), Some("kv-peers"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:1"));
        let args = c.args.clone().unwrap_or_default().join(" ");
        assert!(
            args.contains("--id kv-0 --listen 0.0.0.0:7000 --http 0.0.0.0:8080 --data-dir /data --machine kv"),
            "{args}"
        );
        let owner = &pod.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller, owner.block_owner_deletion),
            ("ReplicatedStateMachine", Some(true), Some(true))
        );
        let vol = &spec.volumes.as_ref().expect("volumes")[0];
        assert_eq!(
            vol.persistent_volume_claim.as_ref().map(|p| p.claim_name.as_str()),
            Some("data-kv-0")
        );
        assert!(
            spec.affinity
                .as_ref()
                .and_then(|a| a.pod_anti_affinity.as_ref())
                .is_some()
        );
    }

    #[test]
    fn ephemeral_storage_has_no_claim() {
        let r = rsm(", storage: {ephemeral: true}");
        assert_eq!(replica_pvc(&r, "kv-0"), Ok(None));
        let pod = replica_pod(&r, "kv-0", &kv(), true).expect("builds");
        assert!(pod.spec.expect("spec").volumes.expect("volumes")[0].empty_dir.is_some());
        let claim = replica_pvc(&rsm(", storage: {size: 5Gi, storageClassName: fast}"), "kv-1")
            .expect("builds")
            .expect("a claim");
        let spec = claim.spec.expect("spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            spec.resources
                .and_then(|r| r.requests)
                .and_then(|r| r.get("storage").cloned()),
            Some(Quantity("5Gi".into()))
        );
    }

    #[test]
    fn byzantine_pods_get_ordering_and_client_keys() {
        let text = include_str!("../../manifests/examples/kv-byzantine.yaml");
        let mut r = lockstep_resource::from_yaml(text).expect("example");
        r.metadata.namespace = Some("apps".into());
        r.metadata.uid = Some("u-2".into());
        r.spec.ordering = Some(lockstep_resource::OrderingSpec {
            stability: Some(lockstep_resource::Stability::PhysicalClock),
            max_clock_skew_millis: Some(50),
            max_delay_millis: Some(500),
        });
        let pod = replica_pod(&r, "kv-byz-0", &kv(), true).expect("builds");
        let spec = pod.spec.expect("spec");
        let c = &spec.containers[0];
        let env: Vec<(String, Option<String>)> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        assert!(
            env.contains(&("LOCKSTEP_STABILITY".into(), Some("PhysicalClock".into()))),
            "{env:?}"
        );
        assert!(env.contains(&("LOCKSTEP_MAX_CLOCK_SKEW_MILLIS".into(), Some("50".into()))));
        assert!(c.args.iter().flatten().any(|a| a == "Byzantine"));
        assert!(
            spec.volumes
                .iter()
                .flatten()
                .filter_map(|v| v.secret.as_ref())
                .any(|s| s.secret_name.as_deref() == Some("kv-byz-clients"))
        );
        assert!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == CLIENT_IDENTITIES_DIR && m.read_only == Some(true))
        );
    }

    #[test]
    fn missing_image_is_reported() {
        let m = MachineRef { image: None, ..kv() };
        assert_eq!(replica_pod(&rsm(""), "kv-0", &m, true).err(), Some(BuildError::NoImage));
    }

    #[test]
    fn user_affinity_replaces_default() {
        let r = rsm(", scheduling: {nodeSelector: {disk: ssd}, affinity: {}}");
        let spec = replica_pod(&r, "kv-0", &kv(), true)
            .expect("builds")
            .spec
            .expect("spec");
        assert_eq!(spec.affinity, Some(Affinity::default()));
        assert_eq!(
            spec.node_selector.and_then(|n| n.get("disk").cloned()),
            Some("ssd".into())
        );
    }

    #[test]
    fn restart_patch_keeps_previous_machine() {
        let pod = replica_pod(&rsm(""), "kv-0", &kv(), true).expect("builds");
        let to = MachineRef {
            version: "1.1.0".into(),
            image: Some("img:2".into()),
            ..kv()
        };
        let p = restart_patch(&pod, &to).expect("patch");
        assert_eq!(p["spec"]["containers"][0]["image"], "img:2");
        assert_eq!(p["metadata"]["annotations"][PREVIOUS_IMAGE_ANNOTATION], "img:1");
        assert_eq!(p["metadata"]["annotations"][VERSION_ANNOTATION], "1.1.0");
        assert_eq!(
            p["metadata"]["annotations"][IMAGE_ANNOTATION], "img:2",
            "the replica learns its image from this annotation at its next start"
        );
        let c = &pod.spec.as_ref().expect("spec").containers[0];
        let env = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "LOCKSTEP_IMAGE")
            .expect("LOCKSTEP_IMAGE");
        let field = env
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone());
        assert_eq!(field.as_deref(), Some("metadata.annotations['lockstep.dev/image']"));
        assert!(
            !c.env.iter().flatten().any(|e| e.name == "LOCKSTEP_MACHINE_VERSION"),
            "read by nothing"
        );
        assert_eq!(
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(IMAGE_ANNOTATION))
                .map(String::as_str),
            Some("img:1")
        );
    }

    #[test]
    fn services_and_pdb() {
        let r = rsm("");
        let peers = peers_service(&r).expect("builds");
        assert_eq!(peers.metadata.name.as_deref(), Some("kv-peers"));
        let spec = peers.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let pdb = pdb(&r).expect("builds");
        let spec = pdb.spec.expect("spec");
        assert_eq!(spec.max_unavailable, None, "needs a scale subresource the RSM lacks");
        assert_eq!(
            spec.min_available,
            Some(IntOrString::Int(1)),
            "t = 1: 2 voters, 1 may go"
        );
        let mut t2 = rsm("");
        t2.spec.faults_tolerated = 2;
        let min = super::pdb(&t2).ok().and_then(|p| p.spec?.min_available);
        assert_eq!(min, Some(IntOrString::Int(2)), "t = 2: 3 voters, 1 may go");
        assert_eq!(
            content_hash(&peers_service(&r).ok()),
            content_hash(&peers_service(&r).ok())
        );
    }
}
