//! Byzantine mode run by the operator: `manifests/examples/kv-byzantine.yaml` as written
//! (only the image replaced by the one under test), a client key made and registered the
//! way docs/byzantine.md says, voted writes and reads through the `lockstep` CLI inside the
//! cluster (knowing only the client Service and the master public key from status), and a
//! replica killed (`kill -9`) and then one deleted: each is replaced through a new era with
//! state transfer, and the data is still there. A second resource is rolled out to 1.1.0: the
//! seal is a barrier of the master's stream, and the next era resumes under the new machine.

use std::time::Duration;

use kube::api::{Api, PatchParams};
use lockstep_e2e::{
    Faults, ToolsPod, condition, epoch, fresh_namespace, kubectl, kubectl_wait_ready, kubectl_with_input, repo,
    wait_for, wait_until,
};
use lockstep_resource::ReplicatedStateMachine;

use crate::common::setup;

const NS: &str = "lockstep-e2e-byz";
const NAME: &str = "kv-byz";

/// `lockstep` in the tools pod as client `alice` of the Byzantine RSM.
fn voted(tools: &ToolsPod, master: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec![
        "--master-public-key",
        master,
        "--identity",
        "alice",
        "--identity-key",
        "/work/alice.key",
    ];
    all.extend_from_slice(args);
    tools.lockstep(NAME, &all)
}

/// Retries a voted command while an era change is under way (a command that meets the end
/// of its era fails and is repeated by the user; the client library reopens on its own).
async fn voted_eventually(tools: &ToolsPod, master: &str, args: &[&str], expect: &str) {
    wait_until(
        &format!("lockstep {} answers {expect}", args.join(" ")),
        Duration::from_secs(120),
        || async {
            match voted(tools, master, args) {
                Ok(out) => Ok(out.contains(expect)),
                Err(e) => {
                    println!("  not yet: {e:#}");
                    Ok(false)
                }
            }
        },
    )
    .await
    .expect("voted command succeeds");
}

/// Waits for a new era without `gone` among the members, Ready again.
async fn replaced(api: &Api<ReplicatedStateMachine>, gone: &str, before: i64) -> ReplicatedStateMachine {
    wait_for(
        api,
        NAME,
        &format!("{gone} replaced and Ready again"),
        Duration::from_secs(300),
        |o| {
            let members: Vec<&str> = o
                .status
                .iter()
                .flat_map(|s| s.members.iter())
                .filter(|m| m.role.as_deref() == Some("Voter"))
                .map(|m| m.pod.as_str())
                .collect();
            condition(o, "Ready") && epoch(o) > before && members.len() == 3 && !members.contains(&gone)
        },
    )
    .await
    .expect("replacement")
}

fn master_key(o: &ReplicatedStateMachine) -> String {
    o.status
        .as_ref()
        .and_then(|s| s.byzantine.as_ref())
        .map(|b| b.master_public_key.clone())
        .unwrap_or_default()
}

fn apply_example(ns: &str, images: &lockstep_e2e::Images, tools: &ToolsPod) {
    let public = tools
        .exec(&["lockstep", "keygen", "/work/alice.key"])
        .expect("client key");
    let literal = format!("--from-literal=alice={}", public.trim());
    kubectl(&["-n", ns, "create", "secret", "generic", "kv-byz-clients", &literal]).expect("client Secret");
    let text = std::fs::read_to_string(repo().join("manifests/examples/kv-byzantine.yaml")).expect("example");
    let text = text.replace("ghcr.io/lockstep-dev/lockstep-replica:0.1.0", &images.replica);
    kubectl_with_input(&["-n", ns, "apply", "-f", "-"], Some(&text)).expect("example applies");
}

/// A fresh namespace with a tools pod and the example applied, Ready.
async fn example_ready(
    client: &kube::Client,
    ns: &str,
    images: &lockstep_e2e::Images,
) -> (ToolsPod, Api<ReplicatedStateMachine>, ReplicatedStateMachine) {
    fresh_namespace(client, ns, true).await.expect("namespace");
    let tools = ToolsPod::start(client, ns, images, NAME).await.expect("tools pod");
    apply_example(ns, images, &tools);
    kubectl_wait_ready(ns, NAME, Duration::from_secs(300)).expect("Ready");
    tools.client_certificate(client).await.expect("client certificate");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), ns);
    let o = api.get(NAME).await.expect("RSM");
    (tools, api, o)
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn byzantine_rsm_votes_and_replaces_killed_and_deleted_replicas() {
    let (client, images) = setup().await;
    let (tools, api, o) = example_ready(&client, NS, &images).await;
    assert_eq!(
        o.status.as_ref().and_then(|s| s.ready_replicas),
        Some(3),
        "2t+1 = 3 replicas"
    );
    let master = master_key(&o);
    assert_eq!(master.len(), 64, "status.byzantine.masterPublicKey: {master:?}");

    let out = voted(&tools, &master, &["put", "greeting", "hello"]).expect("voted put");
    assert!(out.contains("OK"), "{out}");
    let out = voted(&tools, &master, &["get", "greeting"]).expect("voted get");
    assert_eq!(out.trim(), "hello");
    let status = voted(&tools, &master, &["status", "-o", "json"]).expect("voted status");
    println!("{status}");

    // kill -9 of one replica's process: fenced out, replaced, state transferred.
    let faults = Faults::start(&client, &images).await.expect("fault injector");
    let victim = format!("{NAME}-1");
    faults.kill_replica(&client, NS, &victim).await.expect("kill -9");
    let o = replaced(&api, &victim, epoch(&o)).await;
    voted_eventually(&tools, &master, &["get", "greeting"], "hello").await;
    voted_eventually(&tools, &master, &["put", "after-kill", "yes"], "OK").await;

    // A deleted pod, the same way.
    let victim = format!("{NAME}-0");
    kubectl(&["-n", NS, "delete", "pod", &victim, "--wait=false"]).expect("delete pod");
    let o = replaced(&api, &victim, epoch(&o)).await;
    voted_eventually(&tools, &master, &["get", "greeting"], "hello").await;
    voted_eventually(&tools, &master, &["get", "after-kill"], "yes").await;
    let byz = o.status.and_then(|s| s.byzantine).expect("status.byzantine");
    println!("status.byzantine: {byz:?}");
    assert_eq!(byz.master_public_key, master, "the master key never changes");

    lockstep_e2e::delete_namespace(&client, NS).await.expect("cleanup");
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn byzantine_rollout_seals_restarts_and_resumes_under_the_new_machine() {
    const ROLLOUT_NS: &str = "lockstep-e2e-byz-rollout";
    let (client, images) = setup().await;
    let (tools, api, o) = example_ready(&client, ROLLOUT_NS, &images).await;
    let master = master_key(&o);
    let out = voted(&tools, &master, &["put", "before-rollout", "1.0.0"]).expect("voted put");
    assert!(out.contains("OK"), "{out}");

    // A lockstep rollout: the seal is a barrier of the master's stream, every replica restarts
    // on the new image from its sealed state, and the next era resumes under the new machine.
    api.patch(
        NAME,
        &PatchParams::default(),
        &crate::rollout::set_machine("1.1.0", &images.replica_next),
    )
    .await
    .expect("version changed");
    let done = wait_for(
        &api,
        NAME,
        "Byzantine rollout to 1.1.0 finished, every member reporting 1.1.0",
        Duration::from_secs(300),
        |o| crate::rollout::rollout_done(o, "1.1.0"),
    )
    .await
    .expect("Byzantine rollout");
    assert!(epoch(&done) > epoch(&o), "the rollout resumes in a new era");
    voted_eventually(&tools, &master, &["get", "before-rollout"], "1.0.0").await;
    voted_eventually(&tools, &master, &["put", "after-rollout", "1.1.0"], "OK").await;
    let status = voted(&tools, &master, &["status", "-o", "json"]).expect("voted status");
    assert!(status.contains("1.1.0"), "the voted answers name kv 1.1.0: {status}");
    lockstep_e2e::delete_namespace(&client, ROLLOUT_NS)
        .await
        .expect("cleanup");
}
