//! More than t failures: every replica's process killed at once, shortly after the replicas
//! (re)started. Nothing acknowledged is lost, no volume is deleted while the cluster is down,
//! and the cluster comes back by itself from its volumes.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ListParams};
use lockstep_e2e::{Faults, ToolsPod, condition, fresh_namespace, kv_rsm, timing, wait_for};

use crate::common::setup;

fn claim_names(list: &[PersistentVolumeClaim]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().filter_map(|c| c.metadata.name.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn every_replica_killed_twice_in_a_row_comes_back_from_disk() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-beyond-t";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api = lockstep_e2e::create_ready(&client, ns, &kv_rsm("kv", 1, "1.0.0", &images.replica)).await;
    let tools = ToolsPod::start(&client, ns, &images, "kv").await.expect("tools pod");
    let faults = Faults::start(&client, &images).await.expect("fault injector");
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let claims = claim_names(&pvcs.list(&ListParams::default()).await.expect("claims").items);

    for round in 0..2 {
        for i in 0..10 {
            let out = tools
                .lockstep("kv", &["put", &format!("r{round}-k{i}"), "v"])
                .expect("write");
            assert!(out.contains("OK"), "{out}");
        }
        let obj = api.get("kv").await.expect("RSM");
        let members = lockstep_e2e::member_pods(&obj);
        let killed = Instant::now();
        faults
            .kill_replicas_at_once(&client, ns, &members)
            .await
            .expect("kill -9 of every replica");
        wait_for(
            &api,
            "kv",
            "the loss of every replica noticed",
            Duration::from_secs(120),
            |o| !condition(o, "Available"),
        )
        .await
        .expect("down");
        let during = claim_names(&pvcs.list(&ListParams::default()).await.expect("claims").items);
        assert!(
            claims.iter().all(|c| during.contains(c)),
            "round {round}: a volume was deleted while every replica was down: before {claims:?}, now {during:?}"
        );
        wait_for(&api, "kv", "back from disk", Duration::from_secs(300), |o| {
            condition(o, "Ready")
        })
        .await
        .expect("recovered from the volumes");
        timing(
            &format!("all replicas killed (round {round}) -> Ready from disk"),
            format!("{:.1?}", killed.elapsed()),
        );
        for r in 0..=round {
            for i in 0..10 {
                assert_eq!(
                    tools
                        .lockstep("kv", &["get", &format!("r{r}-k{i}")])
                        .expect("read")
                        .trim(),
                    "v",
                    "r{r}-k{i} lost"
                );
            }
        }
    }
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
