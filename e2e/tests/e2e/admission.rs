//! Invalid resources are rejected by the API server itself (schema + CEL rules), each with
//! the message of its rule in `resource/src/rules.rs`.

use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use lockstep_e2e::fresh_namespace;
use lockstep_resource::ReplicatedStateMachine;
use lockstep_resource::rule_cases::cases;
use lockstep_resource::rules;
use serde_json::json;

use crate::common::setup;

const NS: &str = "lockstep-e2e-admission";

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn every_rule_is_enforced_by_the_api_server_with_its_message() {
    let (client, _) = setup().await;
    fresh_namespace(&client, NS, true).await.expect("namespace");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), NS);
    let mut checked = 0;
    for (case, mut obj, expected) in cases() {
        // Each case gets its own name so a valid one does not collide with the next.
        let name = format!("case-{checked}");
        if obj.pointer("/metadata/name").and_then(|n| n.as_str()) == Some("kv") {
            obj["metadata"]["name"] = json!(name);
        }
        let created = api
            .create(
                &PostParams::default(),
                &serde_json::from_value(obj.clone()).unwrap_or_else(|e| panic!("{case}: {e}")),
            )
            .await;
        match (&created, expected.is_empty()) {
            (Ok(o), true) => {
                let n = o.metadata.name.clone().unwrap_or_default();
                api.delete(&n, &DeleteParams::default()).await.expect("delete");
            }
            (Ok(_), false) => panic!("{case}: the API server accepted an invalid object (expected {expected:?})"),
            (Err(e), true) => panic!("{case}: the API server rejected a valid object: {e}"),
            (Err(e), false) => {
                let text = e.to_string();
                for (field, message) in &expected {
                    assert!(
                        text.contains(message),
                        "{case}: {field}: expected message {message:?} in {text}"
                    );
                }
            }
        }
        checked += 1;
    }
    println!("{checked} admission cases checked against the API server");

    // failureModel is immutable (a transition rule).
    let mut obj: ReplicatedStateMachine =
        serde_json::from_value(lockstep_resource::rule_cases::base()).expect("base case");
    obj.metadata.name = Some("immutable".into());
    obj.spec.machine.image = Some("example.invalid/never-pulled:1".into());
    api.create(&PostParams::default(), &obj).await.expect("valid object");
    let err = api
        .patch(
            "immutable",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"failureModel": "Byzantine"}})),
        )
        .await
        .expect_err("failureModel is immutable");
    assert!(err.to_string().contains(rules::FAILURE_MODEL_IMMUTABLE_MSG), "{err}");
    let _ = tokio::time::timeout(Duration::from_secs(60), lockstep_e2e::delete_namespace(&client, NS)).await;
}
