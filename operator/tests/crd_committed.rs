//! The committed CRD must be exactly what the Rust types generate.

#[test]
fn committed_crd_matches_the_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/replicatedstatemachines.lockstep.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = lockstep_operator::crd::crd_yaml().expect("CRD serializes");
    assert!(
        committed == generated,
        "crds/replicatedstatemachines.lockstep.dev.yaml is out of date with resource/src/types.rs.\n\
         Regenerate it with:\n\n    \
         cargo run -p lockstep-operator --bin crdgen > crds/replicatedstatemachines.lockstep.dev.yaml\n"
    );
}

#[test]
fn helm_chart_crd_matches_the_types() {
    // The chart templates the same CRD (with a keep policy): it must not drift either.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/lockstep/templates/crds/replicatedstatemachines.lockstep.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = lockstep_operator::crd::crd_helm_yaml().expect("CRD serializes");
    assert!(
        committed == generated,
        "the Helm chart's CRD template is out of date with resource/src/types.rs.\n\
         Regenerate it with:\n\n    \
         cargo run -p lockstep-operator --bin crdgen -- --helm > charts/lockstep/templates/crds/replicatedstatemachines.lockstep.dev.yaml\n"
    );
}
