//! Changing t under load: 1 -> 2 (three replicas) -> 1, with the history linearizable.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use lockstep_e2e::{Load, ToolsPod, condition, fresh_namespace, kv_rsm, timing, wait_for, wait_until};
use lockstep_resource::ReplicatedStateMachine;
use serde_json::json;

use crate::common::setup;
use crate::failover::wait_for_progress;

async fn set_t(api: &Api<ReplicatedStateMachine>, t: i32) -> ReplicatedStateMachine {
    let started = Instant::now();
    api.patch(
        "kv",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"faultsTolerated": t}})),
    )
    .await
    .expect("t changed");
    let n = t + 1;
    let o = wait_for(api, "kv", &format!("{n} ready voters"), Duration::from_secs(600), |o| {
        condition(o, "Ready") && o.status.as_ref().and_then(|s| s.ready_replicas) == Some(n)
    })
    .await
    .expect("resized");
    timing(&format!("t -> {t} under load"), format!("{:.1?}", started.elapsed()));
    o
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn t_from_1_to_2_and_back_under_load() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-scale";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api = lockstep_e2e::create_ready(&client, ns, &kv_rsm("kv", 1, "1.0.0", &images.replica)).await;
    let tools = ToolsPod::start(&client, ns, &images, "kv").await.expect("tools pod");
    let load = Load::start(&tools, "kv", 4, 50, "scale").expect("load");
    wait_for_progress(&tools, "kv", 100).await;
    set_t(&api, 2).await;
    wait_for_progress(&tools, "kv", 100).await;
    set_t(&api, 1).await;
    wait_for_progress(&tools, "kv", 100).await;
    let outcome = load.finish().expect("load");
    println!("{}\nlockstep-check: {}", outcome.report.trim(), outcome.check.trim());
    // Ready with two voters comes first; the removed replica's pod then terminates (its
    // grace period): wait for it to be gone, not for a duration.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let replicas = ListParams::default().labels("lockstep.dev/cluster=kv,app.kubernetes.io/component=replica");
    wait_until(
        "two replica pods remain after t went back to 1",
        Duration::from_secs(120),
        || async { Ok(pods.list(&replicas).await?.items.len() == 2) },
    )
    .await
    .expect("the removed replica's pod gone");
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
