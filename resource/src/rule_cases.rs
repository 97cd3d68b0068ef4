//! The admission cases: objects and the violations each must produce, as (field, message).
//!
//! Shared by the unit tests (the Rust validation and a client-side evaluation of the CRD's
//! CEL rules must both produce exactly these) and by the Kubernetes e2e suite (the real API
//! server must reject each invalid case with its message).

use serde_json::{Value, json};

use crate::rules::*;

pub const KV_FAILSTOP: &str = r#"
apiVersion: lockstep.dev/v1alpha1
kind: ReplicatedStateMachine
metadata: {name: kv}
spec: {faultsTolerated: 1, failureModel: FailStop, machine: {name: kv, version: "1.0.0", image: ghcr.io/lockstep-dev/lockstep-replica:0.1.0}}
"#;

pub fn base() -> Value {
    serde_yaml_ng::from_str(KV_FAILSTOP).expect("fixture parses")
}

pub fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let obj = v
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent is an object");
    if value.is_null() {
        obj.remove(key);
    } else {
        obj.insert(key.to_string(), value);
    }
    v
}

/// Expected violations as (field, message).
pub type Expected = Vec<(&'static str, &'static str)>;

/// (case, object, expected violations).
pub fn cases() -> Vec<(&'static str, Value, Expected)> {
    let b = base;
    vec![
        ("valid fail-stop", b(), vec![]),
        ("t = 0", with(b(), "/spec/faultsTolerated", json!(0)), vec![]),
        ("t = 7", with(b(), "/spec/faultsTolerated", json!(7)), vec![]),
        (
            "t = 8",
            with(b(), "/spec/faultsTolerated", json!(8)),
            vec![("spec.faultsTolerated", FAULTS_MSG)],
        ),
        (
            "t = -1",
            with(b(), "/spec/faultsTolerated", json!(-1)),
            vec![("spec.faultsTolerated", FAULTS_MSG)],
        ),
        (
            "version 1.0",
            with(b(), "/spec/machine/version", json!("1.0")),
            vec![("spec.machine.version", VERSION_MSG)],
        ),
        (
            "version v1.0.0",
            with(b(), "/spec/machine/version", json!("v1.0.0")),
            vec![("spec.machine.version", VERSION_MSG)],
        ),
        (
            "version 2.1.0-rc.1+b7",
            with(b(), "/spec/machine/version", json!("2.1.0-rc.1+b7")),
            vec![],
        ),
        (
            "machine name with capitals",
            with(b(), "/spec/machine/name", json!("KV")),
            vec![("spec.machine.name", MACHINE_NAME_MSG)],
        ),
        (
            "image with a space",
            with(b(), "/spec/machine/image", json!("ghcr.io/x y")),
            vec![("spec.machine.image", IMAGE_MSG)],
        ),
        (
            "no image (lockstep up)",
            with(b(), "/spec/machine/image", Value::Null),
            vec![],
        ),
        (
            "good digest",
            with(
                b(),
                "/spec/machine/digest",
                json!(format!("sha256:{}", "ab".repeat(32))),
            ),
            vec![],
        ),
        (
            "short digest",
            with(b(), "/spec/machine/digest", json!("sha256:abc")),
            vec![("spec.machine.digest", DIGEST_MSG)],
        ),
        (
            "name too long",
            with(b(), "/metadata/name", json!("a".repeat(51))),
            vec![("metadata.name", NAME_MSG)],
        ),
        (
            "name starts with a digit",
            with(b(), "/metadata/name", json!("1kv")),
            vec![("metadata.name", NAME_MSG)],
        ),
        (
            "ordering on fail-stop",
            with(b(), "/spec/ordering", json!({"stability": "LamportClock"})),
            vec![("spec", ORDERING_BYZANTINE_MSG)],
        ),
        (
            "client identities on fail-stop",
            with(b(), "/spec/clientIdentities", json!({"secretRef": {"name": "ids"}})),
            vec![("spec", CLIENT_IDENTITIES_BYZANTINE_MSG)],
        ),
        (
            "clock bounds with Lamport clocks",
            with(
                with(b(), "/spec/failureModel", json!("Byzantine")),
                "/spec/ordering",
                json!({"stability": "LamportClock", "maxClockSkewMillis": 10}),
            ),
            vec![("spec.ordering", CLOCK_BOUNDS_MSG)],
        ),
        (
            "skew out of range",
            with(
                with(b(), "/spec/failureModel", json!("Byzantine")),
                "/spec/ordering",
                json!({"stability": "PhysicalClock", "maxClockSkewMillis": 60001, "maxDelayMillis": 0}),
            ),
            vec![
                ("spec.ordering.maxClockSkewMillis", MAX_SKEW_MSG),
                ("spec.ordering.maxDelayMillis", MAX_DELAY_MSG),
            ],
        ),
        (
            "ephemeral with a size",
            with(b(), "/spec/storage", json!({"ephemeral": true, "size": "1Gi"})),
            vec![("spec.storage", EPHEMERAL_MSG)],
        ),
        (
            "ephemeral alone",
            with(b(), "/spec/storage", json!({"ephemeral": true})),
            vec![],
        ),
        (
            "size and class",
            with(
                b(),
                "/spec/storage",
                json!({"size": "10Gi", "storageClassName": "fast-ssd"}),
            ),
            vec![],
        ),
        (
            "size not a quantity",
            with(b(), "/spec/storage", json!({"size": "10GB"})),
            vec![("spec.storage.size", SIZE_MSG)],
        ),
        (
            "size negative",
            with(b(), "/spec/storage", json!({"size": "-1Gi"})),
            vec![("spec.storage.size", SIZE_MSG)],
        ),
        (
            "size fraction and exponent",
            with(b(), "/spec/storage", json!({"size": "0.5Gi"})),
            vec![],
        ),
        (
            "size exponent",
            with(b(), "/spec/storage", json!({"size": "1e9"})),
            vec![],
        ),
        (
            "size zero fraction",
            with(b(), "/spec/storage", json!({"size": "0.000"})),
            vec![("spec.storage.size", SIZE_MSG)],
        ),
        (
            "size zero",
            with(b(), "/spec/storage", json!({"size": "0"})),
            vec![("spec.storage.size", SIZE_MSG)],
        ),
        (
            "storage class with capitals",
            with(b(), "/spec/storage", json!({"storageClassName": "Fast"})),
            vec![("spec.storage.storageClassName", STORAGE_CLASS_MSG)],
        ),
        (
            "bad secret name on Byzantine",
            with(
                with(b(), "/spec/failureModel", json!("Byzantine")),
                "/spec/clientIdentities",
                json!({"secretRef": {"name": "Bad_Name"}}),
            ),
            vec![("spec.clientIdentities.secretRef.name", SECRET_NAME_MSG)],
        ),
        (
            "cert-manager issuer, defaults",
            with(b(), "/spec/tls", json!({"issuerRef": {"name": "lockstep-ca"}})),
            vec![],
        ),
        (
            "cert-manager ClusterIssuer",
            with(
                b(),
                "/spec/tls",
                json!({"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}}),
            ),
            vec![],
        ),
        (
            "external issuer with its own kind",
            with(
                b(),
                "/spec/tls",
                json!({"issuerRef": {"name": "pca", "kind": "AWSPCAClusterIssuer", "group": "awspca.cert-manager.io"}}),
            ),
            vec![],
        ),
        (
            "cert-manager issuer of an unknown kind",
            with(
                b(),
                "/spec/tls",
                json!({"issuerRef": {"name": "ca", "kind": "Issuers"}}),
            ),
            vec![("spec.tls.issuerRef", ISSUER_KIND_MSG)],
        ),
        (
            "issuer name with capitals",
            with(b(), "/spec/tls", json!({"issuerRef": {"name": "My_CA"}})),
            vec![("spec.tls.issuerRef.name", ISSUER_NAME_MSG)],
        ),
        (
            "issuer group not a DNS name",
            with(
                b(),
                "/spec/tls",
                json!({"issuerRef": {"name": "ca", "group": "Cert Manager"}}),
            ),
            vec![("spec.tls.issuerRef.group", ISSUER_GROUP_MSG)],
        ),
        (
            "tls without an issuer (built-in CA)",
            with(b(), "/spec/tls", json!({})),
            vec![],
        ),
    ]
}
