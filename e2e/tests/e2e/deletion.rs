//! Deleting an RSM removes its pods, Services, ConfigMap and PDB (owner references), and its
//! volumes as docs/operator-design.md says.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lockstep_e2e::{fresh_namespace, kubectl_wait_ready, kv_rsm, wait_until};
use lockstep_resource::ReplicatedStateMachine;

use crate::common::setup;

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn deleting_an_rsm_removes_what_it_owns() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-delete";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &kv_rsm("kv", 1, "1.0.0", &images.replica))
        .await
        .expect("RSM created");
    kubectl_wait_ready(ns, "kv", Duration::from_secs(300)).expect("Ready");
    let owned = ListParams::default().labels("lockstep.dev/cluster=kv");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    assert_eq!(pods.list(&owned).await.expect("pods").items.len(), 2);
    assert_eq!(services.list(&owned).await.expect("services").items.len(), 2);
    assert_eq!(pvcs.list(&owned).await.expect("claims").items.len(), 2);

    api.delete("kv", &DeleteParams::foreground())
        .await
        .expect("RSM deleted");
    wait_until(
        "pods, Services and claims of kv removed",
        Duration::from_secs(180),
        || async {
            Ok(pods.list(&owned).await?.items.is_empty()
                && services.list(&owned).await?.items.is_empty()
                && pvcs.list(&owned).await?.items.is_empty())
        },
    )
    .await
    .expect("owned objects removed (volumes are deleted with the RSM by default)");
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
