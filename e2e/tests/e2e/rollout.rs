//! Lockstep rollouts on a real cluster: under load, to an image whose replicas really report
//! another machine version; to a second tag of the same image; to an image that does not hold
//! the version the spec names (stopped with a clear condition, and rolled back).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use lockstep_e2e::{Load, ToolsPod, condition, condition_message, fresh_namespace, kubectl, kv_rsm, timing, wait_for};
use lockstep_resource::ReplicatedStateMachine;
use serde_json::{Value, json};

use crate::common::setup;
use crate::failover::{longest_write_pause, wait_for_progress};

pub(crate) fn set_machine(version: &str, image: &str) -> Patch<Value> {
    Patch::Merge(json!({"spec": {"machine": {"version": version, "image": image}}}))
}

/// Every voter reports `version` in status (what the replicas say, not the pod spec).
fn all_report(o: &ReplicatedStateMachine, version: &str) -> bool {
    o.status
        .as_ref()
        .is_some_and(|s| !s.members.is_empty() && s.members.iter().all(|m| m.version.as_deref() == Some(version)))
}

pub(crate) fn rollout_done(o: &ReplicatedStateMachine, version: &str) -> bool {
    condition(o, "Ready")
        && o.status
            .as_ref()
            .is_some_and(|s| s.upgrade_phase.is_none() && s.current_version.as_deref() == Some(version))
        && all_report(o, version)
}

/// The replicas' own answer: `lockstep status -o json` against each member.
fn reported_versions(tools: &ToolsPod, o: &ReplicatedStateMachine) -> BTreeMap<String, String> {
    let ns = o.metadata.namespace.clone().unwrap_or_default();
    let name = o.metadata.name.clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for m in o.status.as_ref().map(|s| s.members.clone()).unwrap_or_default() {
        let target = format!("{}.{name}-peers.{ns}.svc", m.pod);
        let json = tools.lockstep(&target, &["status", "-o", "json"]).expect("status");
        let v: Value = serde_json::from_str(&json).expect("status json");
        let version = v
            .pointer("/members/0/version")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        out.insert(m.pod.clone(), version);
    }
    out
}

/// The index in the operator's `Sealing` event ("seal barrier ordered at index N: ...").
fn sealing_event_index(ns: &str) -> Option<u64> {
    let messages = kubectl(&[
        "-n",
        ns,
        "get",
        "events",
        "--field-selector",
        "reason=Sealing",
        "-o",
        "jsonpath={.items[*].message}",
    ])
    .ok()?;
    let rest = messages.split("at index ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Watch lines (`lockstep watch` JSON) of one replica.
fn watch(tools: &ToolsPod, target: &str, from: u64, until: u64) -> Vec<Value> {
    let out = tools
        .lockstep(
            target,
            &["watch", "--from", &from.to_string(), "--until", &until.to_string()],
        )
        .expect("watch");
    out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn rollout_under_load_runs_each_index_on_one_version() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-rollout";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api = lockstep_e2e::create_ready(&client, ns, &kv_rsm("kv", 1, "1.0.0", &images.replica)).await;
    let tools = ToolsPod::start(&client, ns, &images, "kv").await.expect("tools pod");
    let load = Load::start(&tools, "kv", 4, 50, "rollout").expect("load");
    wait_for_progress(&tools, "kv", 200).await;

    // Watch every replica from now on: each stream ends when its replica restarts.
    let obj = api.get("kv").await.expect("RSM");
    let members = lockstep_e2e::member_pods(&obj);
    let mut before = Vec::new();
    for m in &members {
        before.push((
            m.clone(),
            tools
                .spawn(&["lockstep", "-c", &format!("{m}.kv-peers.{ns}.svc:7000"), "watch"])
                .expect("watch"),
        ));
    }

    let started = Instant::now();
    api.patch(
        "kv",
        &PatchParams::default(),
        &set_machine("1.1.0", &images.replica_next),
    )
    .await
    .expect("version changed");
    let done = wait_for(
        &api,
        "kv",
        "rollout to 1.1.0 finished, every member reporting 1.1.0",
        Duration::from_secs(600),
        |o| rollout_done(o, "1.1.0"),
    )
    .await
    .expect("rollout finished");
    timing(
        "rollout 1.0.0 -> 1.1.0 under load: total",
        format!("{:.1?}", started.elapsed()),
    );
    for (pod, v) in reported_versions(&tools, &done) {
        assert_eq!(v, "1.1.0", "{pod} reports {v} after the rollout");
    }
    wait_for_progress(&tools, "kv", 100).await;
    let outcome = load.finish().expect("load");
    println!("{}\nlockstep-check: {}", outcome.report.trim(), outcome.check.trim());
    let (pause, _) = longest_write_pause(&outcome.history);
    timing("rollout under load: longest write pause", format!("{pause:.2?}"));

    // Up to the seal, every replica applied with 1.0.0, the seal at the same index everywhere;
    // after it, only 1.1.0. A replica is restarted right after the seal, so its watch stream
    // may end before it delivered the seal entry: the index then comes from the streams that
    // did, or from the operator's Sealing event, and that stream must have stopped before it.
    let mut streams = Vec::new();
    for (pod, child) in before {
        let out = child.wait_with_output().expect("watch ended");
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let sealed_at = lines
            .iter()
            .find(|l| l["kind"] == "seal")
            .and_then(|l| l["index"].as_u64());
        streams.push((pod, lines, sealed_at));
    }
    let mut seal_index = None;
    for (pod, _, sealed_at) in &streams {
        if let Some(idx) = sealed_at {
            assert_eq!(*seal_index.get_or_insert(*idx), *idx, "{pod} sealed at another index");
        }
    }
    let seal = seal_index.unwrap_or_else(|| sealing_event_index(ns).expect("a seal index"));
    for (pod, lines, sealed_at) in &streams {
        if sealed_at.is_none() {
            println!("{pod}: its watch ended before the seal entry arrived (restarted right after the seal)");
        }
        for l in lines.iter().filter(|l| l["index"].as_u64() <= Some(seal)) {
            assert_eq!(l["machine"], "kv 1.0.0", "{pod} applied {l} before the seal");
        }
        assert!(
            lines.iter().all(|l| l["index"].as_u64() <= Some(seal)),
            "{pod} streamed entries after the seal at {seal} before its restart"
        );
    }
    for m in &members {
        let target = format!("{m}.kv-peers.{ns}.svc");
        let after = watch(&tools, &target, seal + 1, seal + 50);
        assert_eq!(
            after.first().and_then(|l| l["index"].as_u64()),
            Some(seal + 1),
            "{m}: the entry after the seal"
        );
        for l in &after {
            assert_eq!(l["machine"], "kv 1.1.0", "{m} applied {l} after the seal");
        }
    }
    println!(
        "seal at index {seal}: before it only kv 1.0.0, after it only kv 1.1.0, on {} replicas",
        members.len()
    );
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn rollout_to_a_second_tag_and_to_a_wrong_image() {
    let (client, images) = setup().await;
    let ns = "lockstep-e2e-tags";
    fresh_namespace(&client, ns, true).await.expect("namespace");
    let api = lockstep_e2e::create_ready(&client, ns, &kv_rsm("kv", 1, "1.0.0", &images.replica)).await;
    let tools = ToolsPod::start(&client, ns, &images, "kv").await.expect("tools pod");

    // A promotion tag: the same image under another name. The rollout finishes and the
    // cluster takes writes.
    api.patch(
        "kv",
        &PatchParams::default(),
        &set_machine("1.0.0", &images.replica_alias),
    )
    .await
    .expect("image changed");
    wait_for(
        &api,
        "kv",
        "rollout to the second tag finished",
        Duration::from_secs(600),
        |o| {
            condition(o, "Ready")
                && o.status.as_ref().is_some_and(|s| s.upgrade_phase.is_none())
                && o.metadata.generation == o.status.as_ref().and_then(|s| s.observed_generation)
        },
    )
    .await
    .expect("second tag");
    assert!(
        tools
            .lockstep("kv", &["put", "after-tag", "1"])
            .expect("write after the tag rollout")
            .contains("OK")
    );

    // The spec says 1.2.0 but the image holds 1.1.0: stopped with a condition that says so.
    api.patch(
        "kv",
        &PatchParams::default(),
        &set_machine("1.2.0", &images.replica_next),
    )
    .await
    .expect("version changed");
    let stuck = wait_for(
        &api,
        "kv",
        "a Degraded condition naming the version mismatch",
        Duration::from_secs(600),
        |o| {
            condition(o, "Degraded")
                && condition_message(o, "Degraded").is_some_and(|m| m.contains("1.1.0") && m.contains("1.2.0"))
        },
    )
    .await
    .expect("wrong image reported");
    println!(
        "wrong image: {}",
        condition_message(&stuck, "Degraded").unwrap_or_default()
    );
    assert!(!condition(&stuck, "Ready"));

    // Rolling back to what runs everywhere before the mismatch recovers the cluster.
    api.patch("kv", &PatchParams::default(), &set_machine("1.0.0", &images.replica))
        .await
        .expect("rolled back");
    wait_for(&api, "kv", "Ready on 1.0.0 again", Duration::from_secs(600), |o| {
        rollout_done(o, "1.0.0")
    })
    .await
    .expect("rolled back");
    assert_eq!(tools.lockstep("kv", &["get", "after-tag"]).expect("read").trim(), "1");
    assert!(
        tools
            .lockstep("kv", &["put", "after-rollback", "1"])
            .expect("write")
            .contains("OK")
    );
    lockstep_e2e::delete_namespace(&client, ns).await.expect("cleanup");
}
