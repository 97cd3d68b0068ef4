//! End-to-end tests against whatever cluster `KUBECONFIG` points to (see e2e/README.md;
//! `e2e/kind.sh` provisions one where a container engine exists). Ignored by default; run
//! with `cargo test -p lockstep-operator --test e2e -- --ignored --test-threads=1`.
//! Without a reachable cluster each test fails with a message naming what it needs (it is
//! `#[ignore]`d, so the default `cargo test` does not run it).
//!
//! Needs `kubectl` on PATH, and the operator and replica images available to the cluster
//! (`LOCKSTEP_OPERATOR_IMAGE`, `LOCKSTEP_REPLICA_IMAGE`, `LOCKSTEP_REPLICA_IMAGE_NEXT`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lockstep_proto::client_client::ClientClient;
use lockstep_proto::{Command as LsCommand, ExecuteRequest, ReadRequest};
use lockstep_resource::{ReplicatedStateMachine, rules};
use serde_json::json;

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn image(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

async fn cluster() -> Option<Client> {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            // Run explicitly (--ignored) without a cluster: that is a failure, not a pass.
            panic!(
                "the e2e suite needs a Kubernetes cluster: no configuration ({e}); set KUBECONFIG, see e2e/README.md"
            );
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(_)) => Some(client),
        other => {
            panic!("the e2e suite needs a Kubernetes cluster: API not reachable ({other:?}); see e2e/README.md")
        }
    }
}

fn kubectl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("kubectl")
        .args(args)
        .current_dir(repo())
        .output()
        .map_err(|e| format!("kubectl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Install CRD + operator (idempotent) and wait for the operator to be available.
fn install() {
    kubectl(&["apply", "--server-side", "-f", "crds/"]).expect("CRD installs");
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/replicatedstatemachines.lockstep.dev",
        "--timeout=60s",
    ])
    .expect("CRD established");
    kubectl(&["apply", "-f", "manifests/"]).expect("operator installs");
    let op = image(
        "LOCKSTEP_OPERATOR_IMAGE",
        "ghcr.io/lockstep-dev/lockstep-operator:0.1.0",
    );
    let replica = image("LOCKSTEP_REPLICA_IMAGE", "ghcr.io/lockstep-dev/lockstep-replica:0.1.0");
    kubectl(&[
        "-n",
        "lockstep-system",
        "set",
        "image",
        "deployment/lockstep-operator",
        &format!("operator={op}"),
    ])
    .expect("operator image set");
    kubectl(&[
        "-n",
        "lockstep-system",
        "set",
        "env",
        "deployment/lockstep-operator",
        &format!("LOCKSTEP_REPLICA_IMAGE={replica}"),
    ])
    .expect("replica image set");
    kubectl(&[
        "-n",
        "lockstep-system",
        "rollout",
        "status",
        "deployment/lockstep-operator",
        "--timeout=180s",
    ])
    .expect("operator available");
}

async fn namespace(client: &Client, name: &str) -> Api<ReplicatedStateMachine> {
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss.delete(name, &DeleteParams::default()).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while nss.get_opt(name).await.ok().flatten().is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
    nss.create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    Api::namespaced(client.clone(), name)
}

fn rsm(name: &str, t: i32, version: &str, image: &str) -> ReplicatedStateMachine {
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicatedStateMachine",
        "metadata": {"name": name},
        "spec": {"faultsTolerated": t, "failureModel": "FailStop",
                 "machine": {"name": "kv", "version": version, "image": image},
                 "storage": {"size": "256Mi"}}
    }))
    .expect("fixture")
}

async fn wait_for(
    api: &Api<ReplicatedStateMachine>,
    name: &str,
    what: &str,
    timeout: Duration,
    f: impl Fn(&ReplicatedStateMachine) -> bool,
) -> ReplicatedStateMachine {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(obj) = api.get(name).await
            && f(&obj)
        {
            return obj;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {name}: {what}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn condition(obj: &ReplicatedStateMachine, type_: &str) -> bool {
    obj.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True" && c.observed_generation == obj.metadata.generation)
    })
}

/// `kubectl port-forward` to the primary's gRPC port; returns the child and local address.
fn forward(ns: &str, pod: &str) -> (std::process::Child, String) {
    let mut child = Command::new("kubectl")
        .args(["-n", ns, "port-forward", &format!("pod/{pod}"), ":7000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl port-forward");
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        use std::io::BufRead;
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    // "Forwarding from 127.0.0.1:PORT -> 7000"
    let addr = line
        .split_whitespace()
        .nth(2)
        .map(|a| format!("http://{a}"))
        .unwrap_or_else(|| panic!("unexpected port-forward output: {line:?}"));
    (child, addr)
}

async fn put(addr: &str, key: &str, value: &str, seq: u64) -> Result<u64, String> {
    let mut c = ClientClient::connect(addr.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let payload = serde_json::to_vec(&json!({"op": "put", "key": key, "value": value})).map_err(|e| e.to_string())?;
    c.execute(ExecuteRequest {
        command: Some(LsCommand {
            client_id: "e2e".into(),
            sequence: seq,
            payload,
        }),
    })
    .await
    .map(|r| r.into_inner().index)
    .map_err(|e| e.to_string())
}

async fn get(addr: &str, key: &str) -> Result<serde_json::Value, String> {
    let mut c = ClientClient::connect(addr.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let query = serde_json::to_vec(&json!({"op": "get", "key": key})).map_err(|e| e.to_string())?;
    let out = c
        .read(ReadRequest { query })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .output;
    serde_json::from_slice(&out).map_err(|e| e.to_string())
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: set KUBECONFIG; see e2e/README.md"]
async fn invalid_resources_are_rejected_with_their_message() {
    let Some(client) = cluster().await else { return };
    install();
    let api = namespace(&client, "lockstep-e2e-invalid").await;
    let mut bad = rsm("bad", 9, "1.0.0", "img:1");
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("t = 9 is rejected");
    assert!(err.to_string().contains(rules::FAULTS_MSG), "{err}");
    bad.spec.faults_tolerated = 1;
    bad.spec.machine.version = "1.0".into();
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("version 1.0 is rejected");
    assert!(err.to_string().contains(rules::VERSION_MSG), "{err}");
    // The failure model is immutable.
    bad.spec.machine.version = "1.0.0".into();
    api.create(&PostParams::default(), &bad).await.expect("valid object");
    let err = api
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"failureModel": "Byzantine"}})),
        )
        .await
        .expect_err("failureModel is immutable");
    assert!(err.to_string().contains(rules::FAILURE_MODEL_IMMUTABLE_MSG), "{err}");
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: set KUBECONFIG; see e2e/README.md"]
async fn failstop_lifecycle_write_replace_rollout_resize() {
    let Some(client) = cluster().await else { return };
    install();
    let ns = "lockstep-e2e";
    let api = namespace(&client, ns).await;
    let v1 = image("LOCKSTEP_REPLICA_IMAGE", "ghcr.io/lockstep-dev/lockstep-replica:0.1.0");
    let v2 = image("LOCKSTEP_REPLICA_IMAGE_NEXT", &v1);
    api.create(&PostParams::default(), &rsm("kv", 1, "1.0.0", &v1))
        .await
        .expect("created");
    let obj = wait_for(&api, "kv", "Ready", Duration::from_secs(300), |o| condition(o, "Ready")).await;
    let status = obj.status.clone().unwrap_or_default();
    assert_eq!(status.desired_replicas, Some(2));
    let primary = status.primary.clone().expect("a primary");

    // Write and read through the primary.
    let (mut pf, addr) = forward(ns, &primary);
    let mut acked = Vec::new();
    for i in 0..20u64 {
        put(&addr, &format!("k{i}"), &format!("v{i}"), i + 1)
            .await
            .expect("write acknowledged");
        acked.push(i);
    }
    assert_eq!(get(&addr, "k7").await.expect("read")["value"], json!("v7"));
    let _ = pf.kill();

    // Delete a replica pod: fenced, replaced, Ready again, no acknowledged write lost.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let victim = obj
        .status
        .as_ref()
        .and_then(|s| s.members.iter().find(|m| m.pod != primary).map(|m| m.pod.clone()))
        .expect("a backup");
    let epoch_before = status.epoch.unwrap_or(0);
    let killed = Instant::now();
    pods.delete(&victim, &DeleteParams::default())
        .await
        .expect("pod deleted");
    let fenced = wait_for(&api, "kv", "new epoch", Duration::from_secs(120), |o| {
        o.status.as_ref().and_then(|s| s.epoch).unwrap_or(0) > epoch_before
    })
    .await;
    let to_fence = killed.elapsed();
    let healed = wait_for(&api, "kv", "Ready after replacement", Duration::from_secs(300), |o| {
        condition(o, "Ready") && o.status.as_ref().and_then(|s| s.epoch) > fenced.status.as_ref().and_then(|s| s.epoch)
    })
    .await;
    println!(
        "replica death -> fenced (writes flow): {to_fence:?}; -> full redundancy: {:?}",
        killed.elapsed()
    );
    let primary = healed.status.as_ref().and_then(|s| s.primary.clone()).expect("primary");
    let (mut pf, addr) = forward(ns, &primary);
    for i in acked {
        assert_eq!(
            get(&addr, &format!("k{i}")).await.expect("read")["value"],
            json!(format!("v{i}")),
            "acknowledged write k{i} survived"
        );
    }
    let _ = pf.kill();

    // Lockstep rollout to a new version.
    api.patch(
        "kv",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"machine": {"version": "1.1.0", "image": v2}}})),
    )
    .await
    .expect("version changed");
    wait_for(&api, "kv", "rollout started", Duration::from_secs(60), |o| {
        o.status.as_ref().is_some_and(|s| s.upgrade_phase.is_some())
            || o.status.as_ref().and_then(|s| s.current_version.clone()).as_deref() == Some("1.1.0")
    })
    .await;
    wait_for(&api, "kv", "rollout finished", Duration::from_secs(600), |o| {
        condition(o, "Ready")
            && o.status
                .as_ref()
                .is_some_and(|s| s.upgrade_phase.is_none() && s.current_version.as_deref() == Some("1.1.0"))
    })
    .await;

    // Change t: 1 -> 2 (3 replicas) -> 1.
    api.patch(
        "kv",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"faultsTolerated": 2}})),
    )
    .await
    .expect("t raised");
    wait_for(&api, "kv", "3 ready replicas", Duration::from_secs(600), |o| {
        condition(o, "Ready") && o.status.as_ref().and_then(|s| s.ready_replicas) == Some(3)
    })
    .await;
    api.patch(
        "kv",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"faultsTolerated": 1}})),
    )
    .await
    .expect("t lowered");
    wait_for(&api, "kv", "2 ready replicas", Duration::from_secs(600), |o| {
        condition(o, "Ready") && o.status.as_ref().and_then(|s| s.ready_replicas) == Some(2)
    })
    .await;
    let left = pods
        .list(&kube::api::ListParams::default().labels("lockstep.dev/cluster=kv,app.kubernetes.io/component=replica"))
        .await
        .expect("pods");
    assert_eq!(
        left.items.len(),
        2,
        "{:?}",
        left.items.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
}
