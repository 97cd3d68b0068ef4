//! Byzantine mode run by the operator: `manifests/examples/kv-byzantine.yaml` as written
//! (only the image replaced by the one under test), a client key made and registered the
//! way docs/byzantine.md says, voted writes and reads through the `lockstep` CLI inside the
//! cluster (knowing only the client Service and the master public key from status), and a
//! replica killed (`kill -9`) and then one deleted: each is replaced through a new era with
//! state transfer, and the data is still there; then every replica killed at once comes back
//! from its volume in a recovery era. A second resource is rolled out to 1.1.0: the
//! seal is a barrier of the master's stream, and the next era resumes under the new machine,
//! while one of its three replicas signs wrong outputs (test-only fault injection through the
//! RSM annotation `lockstep.dev/inject`, on replica images built with `fault-injection`).

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

/// `inject`: a value for the RSM annotation `lockstep.dev/inject` (test-only fault injection);
/// the replicas then run the images built with the cargo feature `fault-injection`.
fn apply_example(ns: &str, images: &lockstep_e2e::Images, tools: &ToolsPod, inject: Option<&str>) {
    let public = tools
        .exec(&["lockstep", "keygen", "/work/alice.key"])
        .expect("client key");
    let literal = format!("--from-literal=alice={}", public.trim());
    kubectl(&["-n", ns, "create", "secret", "generic", "kv-byz-clients", &literal]).expect("client Secret");
    let text = std::fs::read_to_string(repo().join("manifests/examples/kv-byzantine.yaml")).expect("example");
    let text = match inject {
        None => text.replace("ghcr.io/lockstep-dev/lockstep-replica:0.1.0", &images.replica),
        Some(faults) => text
            .replace("ghcr.io/lockstep-dev/lockstep-replica:0.1.0", &images.replica_inject)
            .replace(
                &format!("  name: {NAME}\n"),
                &format!("  name: {NAME}\n  annotations:\n    lockstep.dev/inject: \"{faults}\"\n"),
            ),
    };
    assert_eq!(inject.is_some(), text.contains("lockstep.dev/inject"), "{text}");
    kubectl_with_input(&["-n", ns, "apply", "-f", "-"], Some(&text)).expect("example applies");
}

/// A fresh namespace with a tools pod and the example applied, Ready.
async fn example_ready(
    client: &kube::Client,
    ns: &str,
    images: &lockstep_e2e::Images,
    inject: Option<&str>,
) -> (ToolsPod, Api<ReplicatedStateMachine>, ReplicatedStateMachine) {
    fresh_namespace(client, ns, true).await.expect("namespace");
    let tools = ToolsPod::start(client, ns, images, NAME).await.expect("tools pod");
    apply_example(ns, images, &tools, inject);
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
    let (tools, api, o) = example_ready(&client, NS, &images, None).await;
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
    let byz = o
        .status
        .as_ref()
        .and_then(|s| s.byzantine.clone())
        .expect("status.byzantine");
    println!("status.byzantine: {byz:?}");
    assert_eq!(byz.master_public_key, master, "the master key never changes");

    // Every replica's process killed at once (a node losing power): the containers restart on
    // their volumes, the era they were in cannot go on, and the operator starts a recovery era
    // where t + 1 of them rebuild the same state (docs/byzantine.md, "Full-cluster restart").
    let members = lockstep_e2e::member_pods(&o);
    let killed = std::time::Instant::now();
    faults
        .kill_replicas_at_once(&client, NS, &members)
        .await
        .expect("kill -9 of every replica");
    wait_for(
        &api,
        NAME,
        "the loss of every replica noticed",
        Duration::from_secs(120),
        |o| !condition(o, "Available"),
    )
    .await
    .expect("down");
    wait_for(&api, NAME, "back from the volumes", Duration::from_secs(300), |o| {
        condition(o, "Ready")
    })
    .await
    .expect("recovered");
    voted_eventually(&tools, &master, &["get", "greeting"], "hello").await;
    voted_eventually(&tools, &master, &["get", "after-kill"], "yes").await;
    voted_eventually(&tools, &master, &["put", "after-restart", "yes"], "OK").await;
    lockstep_e2e::timing(
        "Byzantine: every replica killed -> voted write in a recovery era",
        format!("{:.1?}", killed.elapsed()),
    );

    lockstep_e2e::delete_namespace(&client, NS).await.expect("cleanup");
}

/// The faulty replica of the rollout test: it signs wrong outputs (a release image would
/// refuse the variable; these pods run the `fault-injection` build).
const FAULTY: &str = "kv-byz-1";

/// The voted `status -o json`'s entry for `id`.
fn member_status(tools: &ToolsPod, master: &str, id: &str) -> anyhow::Result<serde_json::Value> {
    let json = voted(tools, master, &["status", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    v["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == id))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no member {id} in {json}"))
}

/// Waits until the voters have seen `FAULTY` answer differently from the majority (a vote is
/// decided by the first t + 1 matching answers, so one status may not have heard it yet), and
/// returns its entry: it runs `version` and still says what was injected.
async fn faulty_named(tools: &ToolsPod, master: &str, version: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until(
        &format!("the voters name {FAULTY} (injected wrong-output, kv {version}) as disagreeing"),
        Duration::from_secs(120),
        || {
            let found = member_status(tools, master, FAULTY);
            let ok = match found {
                Ok(m) => {
                    let named = m["votes"]["disagreed"].as_u64().unwrap_or(0) > 0;
                    let same = m["version"] == version && m["inject"] == "wrong-output";
                    last = m;
                    named && same
                }
                Err(e) => {
                    println!("  not yet: {e:#}");
                    false
                }
            };
            async move { Ok(ok) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}; last entry: {last}"));
    last
}

/// Issue 7, must show 4: a lockstep rollout with t = 1 completes while one replica is
/// Byzantine (it signs wrong outputs before, during and after the rollout), and every answer
/// a client accepts is the correct one.
#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn byzantine_rollout_seals_restarts_and_resumes_under_the_new_machine() {
    const ROLLOUT_NS: &str = "lockstep-e2e-byz-rollout";
    let (client, images) = setup().await;
    let inject = format!("{FAULTY}=wrong-output");
    let (tools, api, o) = example_ready(&client, ROLLOUT_NS, &images, Some(&inject)).await;
    let master = master_key(&o);
    let out = voted(&tools, &master, &["put", "before-rollout", "1.0.0"]).expect("voted put");
    assert!(out.contains("OK"), "{out}");
    println!("before: {}", faulty_named(&tools, &master, "1.0.0").await);

    // A lockstep rollout: the seal is a barrier of the master's stream, every replica restarts
    // on the new image from its sealed state, and the next era resumes under the new machine.
    api.patch(
        NAME,
        &PatchParams::default(),
        &crate::rollout::set_machine("1.1.0", &images.replica_inject_next),
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
    // The faulty replica came back under the new machine and is still faulty and named.
    println!("after: {}", faulty_named(&tools, &master, "1.1.0").await);
    voted_eventually(&tools, &master, &["get", "after-rollout"], "1.1.0").await;
    lockstep_e2e::delete_namespace(&client, ROLLOUT_NS)
        .await
        .expect("cleanup");
}
