use kube::CustomResourceExt;
use serde_json::{Value, json};

use super::*;
use crate::rule_cases::*;
use crate::rules::*;

fn parse(v: &Value) -> Result<ReplicatedStateMachine, ResourceError> {
    from_yaml(&serde_json::to_string(v).expect("json"))
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
fn issuer_cannot_be_added_removed_or_changed_in_both() {
    let builtin = base();
    let issued = |name: &str| with(base(), "/spec/tls", json!({"issuerRef": {"name": name}}));
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
    let refused = [
        ("added", builtin.clone(), issued("ca")),
        ("removed", issued("ca"), builtin.clone()),
        ("changed", issued("ca"), issued("other-ca")),
        ("emptied", issued("ca"), with(base(), "/spec/tls", json!({}))),
    ];
    for (case, old, new) in refused {
        let (old_rsm, new_rsm) = (parse(&old).expect("valid"), parse(&new).expect("valid"));
        let err = new_rsm.validate_update(&old_rsm).expect_err(case);
        assert_eq!(
            err.0,
            vec![FieldError {
                field: "spec".into(),
                message: ISSUER_IMMUTABLE_MSG.into()
            }],
            "{case}"
        );
        let errors = validator
            .validate(&schema, &new, Some(&old))
            .expect_err("CEL transition rule rejects");
        let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, vec![ISSUER_IMMUTABLE_MSG], "{case}");
    }
    for (case, obj) in [("built-in kept", builtin), ("issuer kept", issued("ca"))] {
        assert!(
            parse(&obj)
                .expect("valid")
                .validate_update(&parse(&obj).expect("valid"))
                .is_ok(),
            "{case}"
        );
        assert!(validator.validate(&schema, &obj, Some(&obj)).is_ok(), "{case}");
    }
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
