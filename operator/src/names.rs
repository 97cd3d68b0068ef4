//! Names, labels and annotations of the objects the operator owns.

/// Field manager for server-side apply and the reporter of events.
pub const MANAGER: &str = "lockstep-operator";

pub const CLUSTER_LABEL: &str = "lockstep.dev/cluster";
pub const REPLICA_LABEL: &str = "lockstep.dev/replica";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const MACHINE_LABEL: &str = "lockstep.dev/machine";

pub const COMPONENT_REPLICA: &str = "replica";
pub const COMPONENT_STAGE: &str = "stage";

/// Machine version the pod was created (or last restarted) for.
pub const VERSION_ANNOTATION: &str = "lockstep.dev/machine-version";
/// The replica container image the operator asked for, set in the same patch that changes
/// the image; the replica reads it (env `LOCKSTEP_IMAGE`, downward API, resolved at each
/// container start) and reports it back in its admin Status.
pub const IMAGE_ANNOTATION: &str = "lockstep.dev/image";
/// During a rollout restart: the machine the container ran before the image was changed,
/// until the kubelet has restarted it with the new image.
pub const PREVIOUS_VERSION_ANNOTATION: &str = "lockstep.dev/previous-machine-version";
pub const PREVIOUS_IMAGE_ANNOTATION: &str = "lockstep.dev/previous-image";
/// On a replica's claim: how many times in a row it was restarted from its disk after dying
/// within the start-up grace (the crash-loop backoff of section 4 of operator-design.md).
pub const DISK_RESTARTS_ANNOTATION: &str = "lockstep.dev/restarts-from-disk";
/// On an RSM, for tests only: `POD=BEHAVIOUR[,POD=BEHAVIOUR...]` gives the named replica pods
/// `LOCKSTEP_INJECT=BEHAVIOUR` when they are created (Byzantine fault injection). Only a replica
/// image built with the cargo feature `fault-injection` acts on it; a release image refuses to
/// start with it, so the annotation cannot make a production replica misbehave.
pub const INJECT_ANNOTATION: &str = "lockstep.dev/inject";
/// On a TLS replica pod: when the certificate in its Secret `<pod>-tls` is due to be issued
/// again (RFC 3339; 2/3 of its life), written with the Secret. Read from the pod cache, so
/// the operator knows it without reading any Secret (crate::tls::renew).
pub const TLS_RENEW_ANNOTATION: &str = "lockstep.dev/tls-renew-after";
/// Hash of the desired state of an applied object (skip no-op applies).
pub const HASH_ANNOTATION: &str = "lockstep.dev/applied-hash";

pub const GRPC_PORT: i32 = 7000;
pub const HTTP_PORT: i32 = 8080;
pub const DATA_DIR: &str = "/data";
pub const REPLICA_CONTAINER: &str = "replica";
/// UID/GID of the distroless `nonroot` user the images run as.
pub const RUN_AS: i64 = 65532;

/// Headless Service giving each replica a stable DNS name for peers.
pub fn peers_service(cluster: &str) -> String {
    format!("{cluster}-peers")
}

/// Client Service.
pub fn client_service(cluster: &str) -> String {
    cluster.to_string()
}

pub fn config_map(cluster: &str) -> String {
    format!("{cluster}-config")
}

pub fn pdb(cluster: &str) -> String {
    cluster.to_string()
}

/// The NetworkPolicy guarding the replica pods of one cluster.
pub fn network_policy(cluster: &str) -> String {
    cluster.to_string()
}

pub fn pvc(replica_id: &str) -> String {
    format!("data-{replica_id}")
}

pub fn stage_pod(cluster: &str, replica_id: &str) -> String {
    let ordinal = replica_id.rsplit_once('-').map_or(replica_id, |(_, n)| n);
    format!("{cluster}-stage-{ordinal}")
}

/// The stable peer endpoint of a replica (pod `hostname` + `subdomain` = the headless
/// Service): the same before and after the pod restarts, so configurations stay valid.
pub fn endpoint(cluster: &str, namespace: &str, replica_id: &str) -> String {
    format!("http://{}:{GRPC_PORT}", peer_host(cluster, namespace, replica_id))
}

/// The stable DNS name of a replica pod, `<id>.<cluster>-peers.<ns>.svc`: the host of its
/// [`endpoint`], and the name its TLS certificate is checked for.
pub fn peer_host(cluster: &str, namespace: &str, replica_id: &str) -> String {
    format!("{replica_id}.{}.{namespace}.svc", peers_service(cluster))
}

/// Labels shared by everything owned by one cluster.
pub fn cluster_labels(cluster: &str) -> std::collections::BTreeMap<String, String> {
    [
        (CLUSTER_LABEL, cluster),
        (MANAGED_BY_LABEL, MANAGER),
        (NAME_LABEL, "lockstep-replica"),
        (INSTANCE_LABEL, cluster),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Selector of the replica pods of one cluster.
pub fn replica_selector(cluster: &str) -> std::collections::BTreeMap<String, String> {
    [(CLUSTER_LABEL, cluster), (COMPONENT_LABEL, COMPONENT_REPLICA)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
