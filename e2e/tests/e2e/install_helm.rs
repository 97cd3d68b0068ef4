//! The Helm install path on a real cluster: install the chart (CRD included) where nothing is
//! installed, run an RSM, `helm uninstall` keeps the CRD and the running cluster, and the
//! plain manifests installed afterwards adopt it. On the way, `helm upgrade` to a chart with a
//! changed CRD (and back) changes the CRD on the cluster while the RSM keeps serving.

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

const CRD: &str = "replicatedstatemachines.lockstep.dev";
const CRD_TEMPLATE: &str = "templates/crds/replicatedstatemachines.lockstep.dev.yaml";

/// A copy of the chart whose CRD changed as a new release's would: a new optional spec field
/// (`upgradeProbe`) and a new printer column.
fn chart_with_changed_crd() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(lockstep_e2e::repo().join("charts/lockstep/."))
        .arg(dir.path())
        .status()
        .expect("cp");
    assert!(status.success(), "copy of the chart");
    let path = dir.path().join(CRD_TEMPLATE);
    let crd = std::fs::read_to_string(&path).expect("CRD template");
    let spec_props = "            properties:\n              clientIdentities:\n";
    assert!(
        crd.contains(spec_props),
        "the CRD template's spec properties moved: update this test"
    );
    let changed = crd
        .replacen(
            spec_props,
            "            properties:\n              upgradeProbe:\n                description: Added by the e2e chart upgrade test.\n                nullable: true\n                type: string\n              clientIdentities:\n",
            1,
        )
        .replacen(
            "  - additionalPrinterColumns:\n",
            "  - additionalPrinterColumns:\n    - jsonPath: .spec.upgradeProbe\n      name: Probe\n      priority: 1\n      type: string\n",
            1,
        );
    std::fs::write(&path, changed).expect("changed CRD");
    dir
}

fn crd_has_upgrade_probe() -> bool {
    kubectl(&[
        "get",
        "crd",
        CRD,
        "-o",
        "jsonpath={.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.upgradeProbe.type}",
    ])
    .expect("CRD")
    .trim()
        == "string"
}

/// Sets `spec.upgradeProbe` on the RSM (refused or pruned while the CRD does not know it) and
/// returns what the API server stored.
fn set_upgrade_probe(ns: &str, value: &str) -> String {
    let _ = kubectl(&[
        "-n",
        ns,
        "patch",
        "rsm",
        "kv",
        "--type=merge",
        "-p",
        &format!("{{\"spec\":{{\"upgradeProbe\":\"{value}\"}}}}"),
    ]);
    kubectl(&["-n", ns, "get", "rsm", "kv", "-o", "jsonpath={.spec.upgradeProbe}"])
        .expect("RSM")
        .trim()
        .to_string()
}

/// `helm upgrade` of the release to `chart`, keeping its values.
fn helm_upgrade(chart: &str) -> String {
    helm(&[
        "upgrade",
        "lockstep",
        chart,
        "--namespace",
        OPERATOR_NS,
        "--reuse-values",
        "--wait",
        "--timeout",
        "5m",
    ])
}

/// `helm upgrade` to a chart whose CRD changed, and back: the CRD on the cluster follows the
/// chart both ways, and the running RSM keeps serving throughout (docs/install-paths.md).
async fn upgrade_crd_with_helm(api: &Api<ReplicatedStateMachine>, tools: &ToolsPod, ns: &str) {
    assert!(!crd_has_upgrade_probe());
    assert_eq!(
        set_upgrade_probe(ns, "before"),
        "",
        "a field the CRD does not define was stored"
    );
    let changed = chart_with_changed_crd();
    let chart = changed.path().to_str().expect("utf-8 path");
    println!("{}", helm_upgrade(chart));
    assert!(crd_has_upgrade_probe(), "helm upgrade did not change the CRD");
    assert_eq!(
        set_upgrade_probe(ns, "after"),
        "after",
        "the upgraded CRD's new field was not stored"
    );
    let wide = kubectl(&["-n", ns, "get", "rsm", "kv", "-o", "wide"]).expect("get -o wide");
    assert!(
        wide.contains("PROBE") && wide.contains("after"),
        "no new printer column: {wide}"
    );
    assert!(
        tools
            .lockstep("kv", &["put", "upgraded", "1"])
            .expect("write")
            .contains("OK"),
        "the RSM stopped serving across the CRD upgrade"
    );
    // Back to the repository's chart: the field goes from the schema (a stored value is kept
    // in etcd but pruned on the next write) and the RSM stays Ready.
    helm_upgrade("charts/lockstep");
    assert!(!crd_has_upgrade_probe(), "helm upgrade back did not restore the CRD");
    wait_for(
        api,
        "kv",
        "Ready after the CRD upgrades",
        Duration::from_secs(120),
        |o| condition(o, "Ready"),
    )
    .await
    .expect("Ready");
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
    let tools = ToolsPod::start(&client, ns, &images, "kv").await.expect("tools pod");
    assert!(
        tools
            .lockstep("kv", &["put", "helm", "1"])
            .expect("write")
            .contains("OK")
    );

    upgrade_crd_with_helm(&api, &tools, ns).await;

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
