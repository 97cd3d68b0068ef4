//! The first thing a user does: create an RSM, wait for Ready, write and read from inside the
//! cluster through the client Service; then lose a backup pod and see it replaced.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use lockstep_e2e::{
    ToolsPod, condition, epoch, fresh_namespace, kubectl_wait_ready, kv_rsm, primary, timing, wait_for,
};
use lockstep_resource::ReplicatedStateMachine;

use crate::common::setup;

const NS: &str = "lockstep-e2e-lifecycle";

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn create_write_read_and_replace_a_deleted_backup() {
    let (client, images) = setup().await;
    fresh_namespace(&client, NS, true).await.expect("namespace");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), NS);
    let created = Instant::now();
    api.create(&PostParams::default(), &kv_rsm("kv", 1, "1.0.0", &images.replica))
        .await
        .expect("RSM created");
    kubectl_wait_ready(NS, "kv", Duration::from_secs(300)).expect("kubectl wait --for=condition=Ready");
    timing("RSM created -> Ready (t=1)", format!("{:.1?}", created.elapsed()));
    let obj = api.get("kv").await.expect("RSM");
    let status = obj.status.clone().unwrap_or_default();
    assert_eq!(status.desired_replicas, Some(2));
    assert_eq!(status.ready_replicas, Some(2));

    // A client inside the cluster, through the client Service.
    let tools = ToolsPod::start(&client, NS, &images, "kv").await.expect("tools pod");
    for i in 0..20 {
        let out = tools
            .lockstep("kv", &["put", &format!("k{i}"), &format!("v{i}")])
            .expect("write acknowledged");
        assert!(out.contains("OK"), "put k{i}: {out}");
    }
    assert_eq!(tools.lockstep("kv", &["get", "k7"]).expect("read").trim(), "v7");
    // Mutual TLS on Kubernetes: the same client without its certificate gets nothing.
    let plaintext = tools.exec(&[
        "lockstep-e2e-tool",
        "without-tls",
        "lockstep",
        "-c",
        "kv:7000",
        "get",
        "k7",
    ]);
    assert!(
        plaintext.is_err(),
        "a client without a certificate was served: {plaintext:?}"
    );
    println!(
        "  without a certificate: {}",
        plaintext.err().map(|e| format!("{e:#}")).unwrap_or_default()
    );
    // The client certificate reads status but may not seal; a certificate from another CA
    // gets nothing, even from a client that trusts the cluster's CA.
    let (line, probe) = tools.tls_probe("kv:7000");
    assert_eq!(line("client-status"), "ok", "{probe}");
    assert!(line("client-seal").starts_with("PermissionDenied: "), "{probe}");
    assert!(line("client-seal").contains("admin identity"), "{probe}");
    assert!(line("stranger-status").starts_with("refused: "), "{probe}");
    let st = tools.lockstep("kv", &["status", "-o", "json"]).expect("status");
    assert!(st.contains("\"epoch\""), "{st}");

    // Delete a backup pod: fenced, replaced, Ready again, every acknowledged write readable.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let leader = primary(&obj).expect("a primary");
    let victim = status
        .members
        .iter()
        .find(|m| m.pod != leader)
        .map(|m| m.pod.clone())
        .expect("a backup");
    let before = epoch(&obj);
    let killed = Instant::now();
    pods.delete(&victim, &DeleteParams::default())
        .await
        .expect("pod deleted");
    let fenced = wait_for(
        &api,
        "kv",
        "a new epoch without the deleted backup",
        Duration::from_secs(120),
        |o| epoch(o) > before,
    )
    .await
    .expect("fenced");
    timing("backup pod deleted -> fenced", format!("{:.1?}", killed.elapsed()));
    wait_for(
        &api,
        "kv",
        "Ready after the replacement",
        Duration::from_secs(300),
        |o| condition(o, "Ready") && epoch(o) > epoch(&fenced),
    )
    .await
    .expect("replaced");
    timing(
        "backup pod deleted -> full redundancy",
        format!("{:.1?}", killed.elapsed()),
    );
    for i in 0..20 {
        assert_eq!(
            tools.lockstep("kv", &["get", &format!("k{i}")]).expect("read").trim(),
            format!("v{i}"),
            "acknowledged write k{i} survived"
        );
    }
    lockstep_e2e::delete_namespace(&client, NS).await.expect("cleanup");
}
