//! The Helm install path on a real cluster: install the chart (CRD included) where nothing is
//! installed, run an RSM, `helm uninstall` keeps the CRD and the running cluster, and the
//! plain manifests installed afterwards adopt it.

use std::time::Duration;

use kube::api::{Api, PostParams};
use lockstep_e2e::{
    OPERATOR_NS, ToolsPod, condition, fresh_namespace, install_operator, kubectl, kubectl_wait_ready, kv_rsm, wait_for,
    wait_until,
};
use lockstep_resource::ReplicatedStateMachine;

use crate::common::setup;

fn helm(args: &[&str]) -> String {
    let out = std::process::Command::new(std::env::var("HELM").unwrap_or_else(|_| "helm".into()))
        .args(args)
        .current_dir(lockstep_e2e::repo())
        .output()
        .expect("helm on PATH (.ci/install-tools installs it)");
    assert!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn helm_install_uninstall_keeps_crd_and_clusters() {
    // Before anything is uninstalled: without helm the suite would be left with no operator.
    helm(&["version", "--short"]);
    let (client, images) = setup().await;
    // Start from nothing: remove the plain install and the CRD (no RSM exists between tests).
    kubectl(&[
        "delete",
        "-k",
        "manifests/",
        "--ignore-not-found",
        "--wait=true",
        "--timeout=300s",
    ])
    .expect("plain install removed");

    let (repo, tag) = split_image(&images.operator);
    let out = helm(&[
        "install",
        "lockstep",
        "charts/lockstep",
        "--namespace",
        OPERATOR_NS,
        "--create-namespace",
        "--set",
        &format!("image.repository={repo}"),
        "--set",
        &format!("image.tag={tag}"),
        "--set",
        &format!("replicaImage={}", images.replica),
        "--wait",
        "--timeout",
        "5m",
    ]);
    println!("{out}");
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/replicatedstatemachines.lockstep.dev",
        "--timeout=60s",
    ])
    .expect("CRD from the chart");

    let ns = "lockstep-e2e-helm";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), ns);
    let mut rsm = kv_rsm("kv", 1, "1.0.0", &images.replica);
    rsm.spec.machine.image = None; // the chart's replicaImage is the default
    api.create(&PostParams::default(), &rsm).await.expect("RSM created");
    kubectl_wait_ready(ns, "kv", Duration::from_secs(300)).expect("Ready under the Helm-installed operator");
    let tools = ToolsPod::start(&client, ns, &images).await.expect("tools pod");
    assert!(
        tools
            .lockstep("kv", &["put", "helm", "1"])
            .expect("write")
            .contains("OK")
    );

    helm(&["uninstall", "lockstep", "--namespace", OPERATOR_NS, "--wait"]);
    kubectl(&["get", "crd", "replicatedstatemachines.lockstep.dev"]).expect("helm uninstall keeps the CRD");
    assert!(api.get("kv").await.is_ok(), "helm uninstall keeps the RSMs");
    assert_eq!(
        tools
            .lockstep("kv", &["get", "helm"])
            .expect("the cluster keeps serving")
            .trim(),
        "1"
    );

    // The plain manifests take over (the suite's other tests use them).
    install_operator(&images).expect("plain install after helm uninstall");
    wait_until(
        "the plain operator to reconcile the RSM",
        Duration::from_secs(120),
        || async { Ok(lockstep_e2e::operator_leader().is_ok()) },
    )
    .await
    .expect("leader");
    wait_for(
        &api,
        "kv",
        "Ready under the plain install",
        Duration::from_secs(120),
        |o| condition(o, "Ready"),
    )
    .await
    .expect("adopted");
    assert!(
        tools
            .lockstep("kv", &["put", "plain", "1"])
            .expect("write")
            .contains("OK")
    );
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
