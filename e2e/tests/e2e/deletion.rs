//! Deleting an RSM removes its pods, Services, ConfigMap, PDB and NetworkPolicy (owner
//! references), and its
//! volumes as docs/operator-design.md says, unless `spec.storage.retainOnDelete` keeps them.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use lockstep_e2e::{ToolsPod, epoch, fresh_namespace, kubectl, kubectl_wait_ready, kv_rsm, wait_until};
use lockstep_resource::ReplicatedStateMachine;
use serde_json::json;

use crate::common::setup;

/// The test's own finalizer on an RSM it deletes.
const HOLD: &str = "e2e.lockstep.dev/hold";

/// Removes the test's finalizer from RSM `kv` in `ns` if the test ends (fails) while it still
/// holds it: a held RSM keeps its CRD from being deleted, and the next test that reinstalls
/// the operator would wait on it.
struct HeldRsm {
    ns: &'static str,
    held: bool,
}

impl Drop for HeldRsm {
    fn drop(&mut self) {
        if self.held {
            let patch = r#"{"metadata":{"finalizers":null}}"#;
            let _ = kubectl(&["-n", self.ns, "patch", "rsm", "kv", "--type=merge", "-p", patch]);
        }
    }
}

/// The claims among `selector` that are not being deleted.
async fn live_claims(pvcs: &Api<PersistentVolumeClaim>, selector: &ListParams) -> Vec<String> {
    pvcs.list(selector)
        .await
        .expect("claims")
        .items
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| c.metadata.name.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn deleting_an_rsm_removes_what_it_owns() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-delete";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api = lockstep_e2e::create_ready(&client, ns, &kv_rsm("kv", 1, "1.0.0", &images.replica)).await;
    let owned = ListParams::default().labels("lockstep.dev/cluster=kv");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    assert_eq!(pods.list(&owned).await.expect("pods").items.len(), 2);
    assert_eq!(services.list(&owned).await.expect("services").items.len(), 2);
    assert_eq!(pvcs.list(&owned).await.expect("claims").items.len(), 2);
    assert_eq!(policies.list(&owned).await.expect("policies").items.len(), 1);

    api.delete("kv", &DeleteParams::foreground())
        .await
        .expect("RSM deleted");
    wait_until(
        "pods, Services, claims and the NetworkPolicy of kv removed",
        Duration::from_secs(180),
        || async {
            Ok(pods.list(&owned).await?.items.is_empty()
                && services.list(&owned).await?.items.is_empty()
                && pvcs.list(&owned).await?.items.is_empty()
                && policies.list(&owned).await?.items.is_empty())
        },
    )
    .await
    .expect("owned objects removed (volumes are deleted with the RSM by default)");
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}

/// `spec.storage.retainOnDelete: true`: deleting the RSM keeps its claims; a new RSM of the
/// same name starts its replicas on them (same ids, the configuration they hold on disk) and
/// every acknowledged write is readable again.
#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn retained_volumes_outlive_the_rsm_and_a_new_one_starts_from_them() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-retain";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), ns);
    let mut rsm = kv_rsm("kv", 1, "1.0.0", &images.replica);
    rsm.spec.storage.get_or_insert_with(Default::default).retain_on_delete = Some(true);
    api.create(&PostParams::default(), &rsm).await.expect("RSM created");
    kubectl_wait_ready(ns, "kv", Duration::from_secs(300)).expect("Ready");
    let first = api.get("kv").await.expect("RSM");
    let members = lockstep_e2e::member_pods(&first);

    let tools = ToolsPod::start(&client, ns, &images, "kv").await.expect("tools pod");
    for i in 0..10 {
        let out = tools
            .lockstep("kv", &["put", &format!("k{i}"), &format!("v{i}")])
            .expect("write acknowledged");
        assert!(out.contains("OK"), "put k{i}: {out}");
    }

    let owned = ListParams::default().labels("lockstep.dev/cluster=kv");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    // A finalizer of the test's own holds the RSM in its deleting state until the garbage
    // collector is done with everything it owns: the operator sees its pods go while the
    // RSM still exists, and must not replace them (nor restart one from disk).
    let hold = |finalizers: Vec<&str>| Patch::Merge(json!({"metadata": {"finalizers": finalizers}}));
    let mut guard = HeldRsm { ns, held: true };
    api.patch("kv", &PatchParams::default(), &hold(vec![HOLD]))
        .await
        .expect("hold finalizer added");
    api.delete("kv", &DeleteParams::foreground())
        .await
        .expect("RSM deleted");
    wait_until(
        "the garbage collector done with what kv owns (only the test's finalizer left)",
        Duration::from_secs(180),
        || async {
            let held = api.get_opt("kv").await?.is_some_and(|r| {
                r.metadata.deletion_timestamp.is_some() && r.metadata.finalizers == Some(vec![HOLD.to_string()])
            });
            Ok(held && pods.list(&owned).await?.items.is_empty())
        },
    )
    .await
    .expect("pods gone while the RSM is being deleted");
    let kept = live_claims(&pvcs, &owned).await;
    assert_eq!(kept.len(), 2, "both claims kept, and no new one: {kept:?}");
    api.patch("kv", &PatchParams::default(), &hold(vec![]))
        .await
        .expect("hold finalizer removed");
    guard.held = false;
    wait_until("kv gone", Duration::from_secs(60), || async {
        Ok(api.get_opt("kv").await?.is_none())
    })
    .await
    .expect("RSM removed");
    let kept = live_claims(&pvcs, &owned).await;
    assert_eq!(kept.len(), 2, "both claims kept: {kept:?}");

    api.create(&PostParams::default(), &rsm).await.expect("RSM recreated");
    kubectl_wait_ready(ns, "kv", Duration::from_secs(300)).expect("Ready from the kept volumes");
    let second = api.get("kv").await.expect("RSM");
    let status = second.status.clone().unwrap_or_default();
    let again: Vec<String> = status.members.iter().map(|m| m.pod.clone()).collect();
    assert_eq!(again, members, "the same replicas, on their own volumes");
    assert!(
        epoch(&second) >= epoch(&first),
        "the epoch continues from disk: {status:?}"
    );
    // The new RSM has a new CA (its certificate Secrets went with the old one).
    tools
        .client_certificate(&client)
        .await
        .expect("the new client certificate");
    for i in 0..10 {
        let got = tools.lockstep("kv", &["get", &format!("k{i}")]).expect("read");
        assert_eq!(got.trim(), format!("v{i}"), "k{i} after recreating the RSM");
    }
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
