//! The operator's leader is deleted in the middle of a replacement and in the middle of a
//! rollout: the other operator replica takes the Lease and finishes the job.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use lockstep_e2e::{
    Faults, OPERATOR_NS, condition, epoch, fresh_namespace, kv_rsm, operator_leader, primary, timing, wait_for,
    wait_until,
};
use serde_json::json;

use crate::common::setup;

async fn delete_leader(client: &kube::Client) -> String {
    let leader = operator_leader().expect("an operator leader");
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
    pods.delete(&leader, &DeleteParams::default())
        .await
        .expect("leader deleted");
    leader
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn a_new_operator_leader_finishes_a_replacement_and_a_rollout() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-opfail";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api = lockstep_e2e::create_ready(&client, ns, &kv_rsm("kv", 1, "1.0.0", &images.replica)).await;
    let faults = Faults::start(&client, &images).await.expect("fault injector");

    // Mid-replacement: a replica dies, the epoch moves on, then the leader goes.
    let obj = api.get("kv").await.expect("RSM");
    let victim = obj
        .status
        .as_ref()
        .and_then(|s| {
            s.members
                .iter()
                .find(|m| Some(&m.pod) != primary(&obj).as_ref())
                .map(|m| m.pod.clone())
        })
        .expect("a backup");
    faults.kill_replica(&client, ns, &victim).await.expect("kill -9");
    let fenced = wait_for(&api, "kv", "the failed backup fenced", Duration::from_secs(120), |o| {
        epoch(o) > epoch(&obj)
    })
    .await
    .expect("fenced");
    let gone = delete_leader(&client).await;
    let t0 = Instant::now();
    wait_until(
        "another operator to take the lease",
        Duration::from_secs(120),
        || async { Ok(operator_leader().is_ok_and(|l| l != gone)) },
    )
    .await
    .expect("new leader");
    timing("operator leader deleted -> new leader", format!("{:.1?}", t0.elapsed()));
    wait_for(
        &api,
        "kv",
        "Ready after the replacement",
        Duration::from_secs(300),
        |o| condition(o, "Ready") && epoch(o) > epoch(&fenced),
    )
    .await
    .expect("replacement finished by the new leader");

    // Mid-rollout: once a phase is recorded, the leader goes.
    api.patch(
        "kv",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"machine": {"version": "1.1.0", "image": images.replica_next}}})),
    )
    .await
    .expect("rollout started");
    wait_for(&api, "kv", "a rollout phase recorded", Duration::from_secs(120), |o| {
        o.status.as_ref().is_some_and(|s| s.upgrade_phase.is_some())
    })
    .await
    .expect("rollout in progress");
    delete_leader(&client).await;
    wait_for(
        &api,
        "kv",
        "the rollout finished by the new leader",
        Duration::from_secs(600),
        |o| {
            condition(o, "Ready")
                && o.status.as_ref().is_some_and(|s| {
                    s.upgrade_phase.is_none()
                        && s.current_version.as_deref() == Some("1.1.0")
                        && s.members.iter().all(|m| m.version.as_deref() == Some("1.1.0"))
                })
        },
    )
    .await
    .expect("rollout finished");
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
