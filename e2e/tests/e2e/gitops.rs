//! What GitOps tools do: re-apply the same manifest with another field manager (Argo CD,
//! Flux). Nothing changes, no rollout starts, and an idle RSM's resourceVersion stays put —
//! the operator writes no field a GitOps tool owns and no status when nothing changes.

use std::time::{Duration, Instant};

use kube::api::Api;
use lockstep_e2e::{fresh_namespace, kubectl, kubectl_wait_ready, kv_rsm};
use lockstep_resource::ReplicatedStateMachine;

use crate::common::setup;

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn reapplying_with_another_field_manager_changes_nothing_and_idle_stays_put() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-gitops";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), ns);
    let rsm = kv_rsm("kv", 1, "1.0.0", &images.replica);
    let manifest = serde_json::to_string(&rsm).expect("manifest");
    lockstep_e2e::kubectl_with_input(
        &[
            "-n",
            ns,
            "apply",
            "--server-side",
            "--field-manager=argocd-controller",
            "-f",
            "-",
        ],
        Some(&manifest),
    )
    .expect("applied by one manager");
    kubectl_wait_ready(ns, "kv", Duration::from_secs(300)).expect("Ready");
    let before = api.get("kv").await.expect("RSM");

    // Same manifest, another manager (as when a second tool or a migration takes over).
    let out = lockstep_e2e::kubectl_with_input(
        &[
            "-n",
            ns,
            "apply",
            "--server-side",
            "--field-manager=flux-kustomize-controller",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&manifest),
    )
    .expect("re-applied");
    println!("{}", out.trim());
    let diff = lockstep_e2e::kubectl_with_input(
        &[
            "-n",
            ns,
            "diff",
            "--server-side",
            "--field-manager=flux-kustomize-controller",
            "-f",
            "-",
        ],
        Some(&manifest),
    );
    assert!(diff.is_ok(), "kubectl diff shows a difference after re-apply: {diff:?}");
    let after = api.get("kv").await.expect("RSM");
    assert_eq!(
        before.metadata.generation, after.metadata.generation,
        "re-apply changed the spec"
    );
    assert!(
        after.status.as_ref().is_some_and(|s| s.upgrade_phase.is_none()),
        "re-apply started a rollout"
    );

    // The install itself, re-applied by another manager: nothing changes either.
    let overlay = lockstep_e2e::install_overlay(&images).expect("overlay");
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), lockstep_e2e::OPERATOR_NS);
    let op_before = deployments.get("lockstep-operator").await.expect("operator deployment");
    lockstep_e2e::kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=argocd-controller",
        "--force-conflicts",
        "-k",
        &overlay,
    ])
    .expect("install re-applied by another manager");
    let op_after = deployments.get("lockstep-operator").await.expect("operator deployment");
    assert_eq!(
        op_before.metadata.generation, op_after.metadata.generation,
        "re-applying the install changed the operator"
    );
    let diff = lockstep_e2e::kubectl(&[
        "diff",
        "--server-side",
        "--field-manager=argocd-controller",
        "-k",
        &overlay,
    ]);
    assert!(
        diff.is_ok(),
        "kubectl diff -k shows a difference after re-apply: {diff:?}"
    );

    // Idle for a minute: the operator writes nothing (no status churn).
    let rv = api.get("kv").await.expect("RSM").metadata.resource_version;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(65) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = api.get("kv").await.expect("RSM");
        assert_eq!(
            now.metadata.resource_version,
            rv,
            "an idle RSM was rewritten after {:?}: {:?}",
            t0.elapsed(),
            now.status
        );
    }
    let events = kubectl(&["-n", ns, "get", "events", "-o", "name"]).unwrap_or_default();
    println!(
        "idle for 65 s: resourceVersion unchanged; {} events in the namespace",
        events.lines().count()
    );
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
