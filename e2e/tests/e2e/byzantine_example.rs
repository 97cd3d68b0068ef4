//! The Byzantine example applied as a user would: the RSM tells what is missing instead of
//! leaving pods hanging with "waiting for replicas to answer".

use std::time::Duration;

use kube::api::Api;
use lockstep_e2e::{condition_message, fresh_namespace, kubectl, wait_for};
use lockstep_resource::ReplicatedStateMachine;

use crate::common::setup;

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn the_byzantine_example_says_what_is_missing() {
    let (client, _images) = setup().await;
    let ns = "lockstep-e2e-byz-example";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    kubectl(&["-n", ns, "apply", "-f", "manifests/examples/kv-byzantine.yaml"]).expect("example applies");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), ns);
    let o = wait_for(
        &api,
        "kv-byz",
        "a condition naming the missing client identities Secret",
        Duration::from_secs(120),
        |o| {
            ["Degraded", "Progressing", "Ready"]
                .iter()
                .filter_map(|c| condition_message(o, c))
                .any(|m| m.contains("kv-byz-clients"))
        },
    )
    .await
    .expect("the RSM says what is missing");
    for c in ["Ready", "Progressing", "Degraded"] {
        println!("{c}: {}", condition_message(&o, c).unwrap_or_default());
    }
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
