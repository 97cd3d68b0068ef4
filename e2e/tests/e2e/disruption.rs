//! What `kubectl drain` does: an Eviction of one replica pod is allowed while the cluster is
//! fully redundant and refused (429) while it is not.
//!
//! The window between the two is short (a replacement of an empty store catches up in a few
//! seconds, and then a second eviction is rightly allowed), so the operator is scaled to zero
//! while the evictions happen: the replacement then waits, redundancy stays reduced for as long
//! as the test needs, and the PDB — not the operator — is what must refuse. The operator is
//! scaled back and must restore full redundancy.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, EvictParams};
use lockstep_e2e::{OPERATOR_NS, condition, fresh_namespace, kubectl, kv_rsm, primary, wait_for};

use crate::common::setup;

async fn evict(pods: &Api<Pod>, name: &str) -> Result<(), u16> {
    match pods.evict(name, &EvictParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(s.code),
        Err(e) => panic!("eviction of {name}: {e}"),
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn eviction_allowed_only_while_fully_redundant() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-evict";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api = lockstep_e2e::create_ready(&client, ns, &kv_rsm("kv", 1, "1.0.0", &images.replica)).await;
    // The disruption controller must have counted both replicas healthy.
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    wait_for(
        &pdbs,
        "kv",
        "the PDB to allow one disruption",
        Duration::from_secs(120),
        |p| p.status.as_ref().is_some_and(|s| s.disruptions_allowed == 1),
    )
    .await
    .expect("PDB allows one disruption");

    let obj = api.get("kv").await.expect("RSM");
    let leader = primary(&obj).expect("primary");
    let backup = obj
        .status
        .as_ref()
        .and_then(|s| s.members.iter().find(|m| m.pod != leader).map(|m| m.pod.clone()))
        .expect("a backup");
    let pods: Api<Pod> = Api::namespaced(lockstep_e2e::client_without_retry().await, ns);
    let operator = StoppedOperator::stop();
    evict(&pods, &backup)
        .await
        .expect("evicting one replica of a fully redundant cluster is allowed");
    // Redundancy is reduced until a replacement has caught up (none can start now).
    assert_eq!(
        evict(&pods, &leader).await,
        Err(429),
        "evicting the last up-to-date replica must be refused while redundancy is reduced"
    );
    drop(operator);
    // The status still says Ready from before the operator stopped: wait for the evicted
    // backup to be gone from the members.
    wait_for(
        &api,
        "kv",
        "Ready after the replacement",
        Duration::from_secs(300),
        |o| {
            condition(o, "Ready")
                && o.status.as_ref().is_some_and(|s| {
                    let voters: Vec<_> = s
                        .members
                        .iter()
                        .filter(|m| m.role.as_deref() == Some("Voter"))
                        .collect();
                    voters.len() == 2 && voters.iter().all(|m| m.pod != backup)
                })
        },
    )
    .await
    .expect("Ready again");
    wait_for(
        &pdbs,
        "kv",
        "the PDB to allow a disruption again",
        Duration::from_secs(120),
        |p| p.status.as_ref().is_some_and(|s| s.disruptions_allowed == 1),
    )
    .await
    .expect("disruption allowed again");
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}

/// The operator's Deployment scaled to zero until dropped (then back to its replica count, even
/// when the test fails, so later tests find it running).
struct StoppedOperator {
    replicas: String,
}

impl StoppedOperator {
    fn stop() -> Self {
        let deploy = "deployment/lockstep-operator";
        let replicas = kubectl(&["-n", OPERATOR_NS, "get", deploy, "-o", "jsonpath={.spec.replicas}"])
            .expect("operator replicas")
            .trim()
            .to_string();
        kubectl(&["-n", OPERATOR_NS, "scale", deploy, "--replicas=0"]).expect("scale the operator to 0");
        // Wait until no operator pod is left (terminating ones could still act).
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let left = kubectl(&[
                "-n",
                OPERATOR_NS,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=lockstep-operator",
                "-o",
                "name",
            ])
            .expect("operator pods");
            if left.trim().is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "operator pods still there: {left}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        StoppedOperator { replicas }
    }
}

impl Drop for StoppedOperator {
    fn drop(&mut self) {
        let deploy = "deployment/lockstep-operator";
        let scale = format!("--replicas={}", self.replicas);
        let _ = kubectl(&["-n", OPERATOR_NS, "scale", deploy, &scale]);
        let _ = kubectl(&["-n", OPERATOR_NS, "rollout", "status", deploy, "--timeout=300s"]);
    }
}
