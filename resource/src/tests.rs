use kube::CustomResourceExt;
use serde_json::{Value, json};

use super::*;
use crate::rules::*;

const KV_FAILSTOP: &str = r#"
apiVersion: lockstep.dev/v1alpha1
kind: ReplicatedStateMachine
metadata: {name: kv}
spec: {faultsTolerated: 1, failureModel: FailStop, machine: {name: kv, version: "1.0.0", image: ghcr.io/lockstep-dev/lockstep-replica:0.1.0}}
"#;

fn base() -> Value {
    serde_yaml_ng::from_str(KV_FAILSTOP).expect("fixture parses")
}

fn with(mut v: Value, pointer: &str, value: Value) -> Value {
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

fn parse(v: &Value) -> Result<ReplicatedStateMachine, ResourceError> {
    from_yaml(&serde_json::to_string(v).expect("json"))
}

/// Expected violations as (field, message).
type Expected = Vec<(&'static str, &'static str)>;

/// (case, object, expected violations).
fn cases() -> Vec<(&'static str, Value, Expected)> {
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
    ]
}

#[test]
fn validate_reports_the_rule_messages() {
    for (case, obj, expected) in cases() {
        let got: Vec<(String, String)> = match parse(&obj) {
            Ok(_) => vec![],
            Err(ResourceError::Invalid(ValidationErrors(errors))) => {
                errors.into_iter().map(|e| (e.field, e.message)).collect()
            }
            Err(other) => panic!("{case}: unexpected error {other}"),
        };
        let want: Vec<(String, String)> = expected.iter().map(|(f, m)| (f.to_string(), m.to_string())).collect();
        let (mut got, mut want) = (got, want);
        got.sort();
        want.sort();
        assert_eq!(got, want, "case {case}");
    }
}

/// The CEL rules in the generated CRD, evaluated client-side by kube-cel, must accept and
/// reject the same objects as `validate()`, with the same messages.
#[test]
fn cel_rules_agree_with_validate() {
    let crd = ReplicatedStateMachine::crd();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("CRD has a schema"),
    )
    .expect("schema serializes");
    let validator = kube::core::cel::Validator::new();
    for (case, obj, expected) in cases() {
        let mut got: Vec<String> = match validator.validate(&schema, &obj, None) {
            Ok(()) => vec![],
            Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
        };
        let mut want: Vec<String> = expected.iter().map(|(_, m)| m.to_string()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "case {case}: CEL and validate() disagree");
    }
}

#[test]
fn failure_model_is_immutable_in_both() {
    let old = base();
    let new = with(base(), "/spec/failureModel", json!("Byzantine"));
    let (old_rsm, new_rsm) = (parse(&old).expect("valid"), parse(&new).expect("valid"));
    let err = new_rsm.validate_update(&old_rsm).expect_err("immutable");
    assert_eq!(
        err.0,
        vec![FieldError {
            field: "spec.failureModel".into(),
            message: FAILURE_MODEL_IMMUTABLE_MSG.into()
        }]
    );
    assert!(old_rsm.validate_update(&old_rsm).is_ok());

    let crd = ReplicatedStateMachine::crd();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("CRD has a schema"),
    )
    .expect("schema serializes");
    let validator = kube::core::cel::Validator::new();
    let errors = validator
        .validate(&schema, &new, Some(&old))
        .expect_err("CEL transition rule rejects");
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages, vec![FAILURE_MODEL_IMMUTABLE_MSG]);
    assert!(validator.validate(&schema, &old, Some(&old)).is_ok());
}

#[test]
fn lead_example_parses_and_sizes() {
    let rsm = from_yaml(KV_FAILSTOP).expect("kv-failstop validates");
    assert_eq!(rsm.desired_replicas(), 2);
    assert_eq!(rsm.spec.failure_model, FailureModel::FailStop);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/kv-failstop.yaml");
    if let Ok(text) = std::fs::read_to_string(file) {
        let rsm = from_yaml(&text).expect("manifests/examples/kv-failstop.yaml validates");
        assert_eq!(rsm.spec.failure_model, FailureModel::FailStop);
    }
}

#[test]
fn byzantine_example_parses_and_sizes() {
    let text = include_str!("../../manifests/examples/kv-byzantine.yaml");
    let rsm = from_yaml(text).expect("kv-byzantine validates");
    assert_eq!(rsm.desired_replicas(), 3);
    for t in 0..=7 {
        let mut spec = rsm.spec.clone();
        spec.faults_tolerated = t;
        assert_eq!(spec.desired_replicas(), 2 * t + 1);
        spec.failure_model = FailureModel::FailStop;
        assert_eq!(spec.desired_replicas(), t + 1);
    }
}

#[test]
fn no_defaults_are_written_into_spec() {
    let rsm = from_yaml(KV_FAILSTOP).expect("valid");
    let round_trip = serde_json::to_value(&rsm).expect("serializes");
    let input = base();
    assert_eq!(round_trip["spec"], input["spec"], "spec must round-trip unchanged");
    assert!(round_trip.get("status").is_none());
    // And the schema carries no `default` anywhere.
    let crd = serde_json::to_string(&ReplicatedStateMachine::crd()).expect("json");
    assert!(!crd.contains("\"default\""), "CRD schema must not default fields");
}

#[test]
fn wrong_kind_unknown_fields_and_garbage_are_rejected() {
    let deploy = KV_FAILSTOP.replace("kind: ReplicatedStateMachine", "kind: Deployment");
    assert!(matches!(from_yaml(&deploy), Err(ResourceError::WrongKind { .. })));
    let typo = with(base(), "/spec/faultTolerated", json!(1));
    match parse(&typo) {
        Err(ResourceError::UnknownField(f)) => assert_eq!(f, "spec.faultTolerated"),
        other => panic!("expected unknown field, got {other:?}"),
    }
    let nested = with(base(), "/spec/machine/imag", json!("x"));
    assert!(matches!(parse(&nested), Err(ResourceError::UnknownField(f)) if f == "spec.machine.imag"));
    let model = with(base(), "/spec/failureModel", json!("Crash"));
    let err = parse(&model).expect_err("unknown failure model");
    assert!(err.to_string().contains("FailStop"), "{err}");
    assert!(from_yaml("{{{").is_err());
    assert!(from_yaml("").is_err());
}

#[test]
fn pause_annotation() {
    let mut rsm = from_yaml(KV_FAILSTOP).expect("valid");
    assert!(!rsm.is_paused());
    rsm.metadata.annotations = Some([(PAUSED_ANNOTATION.to_string(), "true".to_string())].into());
    assert!(rsm.is_paused());
}

#[test]
fn crd_shape() {
    let crd = ReplicatedStateMachine::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("replicatedstatemachines.lockstep.dev")
    );
    assert_eq!(crd.spec.names.short_names, Some(vec!["rsm".to_string()]));
    assert_eq!(crd.spec.scope, "Namespaced");
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let cols: Vec<&str> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    for want in ["T", "Model", "Replicas", "Ready", "Version", "Epoch", "Age"] {
        assert!(cols.contains(&want), "printer column {want} in {cols:?}");
    }
}
