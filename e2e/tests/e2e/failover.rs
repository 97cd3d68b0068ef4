//! `kill -9` of the primary's replica process under load: the operator fences it and
//! replaces it; the recorded client history (clients inside the cluster) is linearizable
//! (`lockstep-check`), and writes resume.

use std::time::{Duration, Instant};

use kube::Client;
use lockstep_e2e::{
    Faults, Images, Load, ToolsPod, condition, epoch, fresh_namespace, kv_rsm, primary, timing, wait_for, wait_until,
};
use lockstep_linearizability::{HistoryEntry, OpKind, Outcome};

use crate::common::setup;

/// The longest pause between two acknowledged writes of a history, and how many writes were
/// acknowledged after it.
pub fn longest_write_pause(history: &str) -> (Duration, usize) {
    let entries: Vec<HistoryEntry> =
        lockstep_linearizability::parse_history(std::io::BufReader::new(history.as_bytes())).expect("history parses");
    let mut acks: Vec<u64> = entries
        .iter()
        .filter(|e| e.result == Outcome::Ok && e.op != OpKind::Get)
        .filter_map(|e| e.ret)
        .collect();
    acks.sort_unstable();
    let mut best = (0u64, 0usize);
    for (i, w) in acks.windows(2).enumerate() {
        let gap = w[1] - w[0];
        if gap > best.0 {
            best = (gap, acks.len() - (i + 1));
        }
    }
    (Duration::from_nanos(best.0), best.1)
}

/// The highest applied index `lockstep status -o json` reports through the client Service.
pub fn applied_index(tools: &ToolsPod, service: &str) -> anyhow::Result<u64> {
    let out = tools.lockstep(service, &["status", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v.pointer("/members")
        .and_then(|r| r.as_array())
        .and_then(|rs| rs.iter().filter_map(|r| r["appliedIndex"].as_u64()).max())
        .ok_or_else(|| anyhow::anyhow!("no member reported an applied index: {out}"))
}

/// Waits until the cluster behind `service` has applied `n` more commands.
pub async fn wait_for_progress(tools: &ToolsPod, service: &str, n: u64) {
    let start = applied_index(tools, service).unwrap_or(0);
    let waited = wait_until(
        &format!("{n} more commands applied after index {start}"),
        Duration::from_secs(120),
        || async { Ok(applied_index(tools, service)? >= start + n) },
    )
    .await;
    if let Err(e) = waited {
        // Say what the client saw, not only that it saw too little.
        let seen = tools.lockstep(service, &["status", "-o", "json"]);
        panic!("the load makes progress: {e:#}\n`lockstep status -o json` now: {seen:#?}");
    }
}

/// Creates a t-fault RSM, runs a load, kills the primary's process once the load runs, and
/// checks the outcome.
pub async fn kill_primary_under_load(client: &Client, images: &Images, ns: &str, t: i32) {
    fresh_namespace(client, ns, true).await.expect("namespace");
    let api = lockstep_e2e::create_ready(client, ns, &kv_rsm("kv", t, "1.0.0", &images.replica)).await;
    let tools = ToolsPod::start(client, ns, images, "kv").await.expect("tools pod");
    let faults = Faults::start(client, images).await.expect("fault injector");
    let obj = api.get("kv").await.expect("RSM");
    let victim = primary(&obj).expect("a primary");
    let before = epoch(&obj);

    let load = Load::start(&tools, "kv", 4, 50, "kill").expect("load started");
    wait_for_progress(&tools, "kv", 200).await;
    // Issue 10: the operator's per-RSM gauges, scraped as Prometheus would, follow the
    // fail-over (degraded 1 then 0, the epoch rises).
    let gauges = lockstep_e2e::GaugeRecorder::start(ns, "kv");
    let killed = Instant::now();
    faults
        .kill_replica(client, ns, &victim)
        .await
        .expect("kill -9 of the primary");
    let fenced = wait_for(
        &api,
        "kv",
        "a new epoch without the killed primary",
        Duration::from_secs(120),
        |o| epoch(o) > before && primary(o).is_some_and(|p| p != victim),
    )
    .await
    .expect("fenced");
    timing(
        &format!("t={t}: primary killed -> new epoch recorded"),
        format!("{:.1?}", killed.elapsed()),
    );
    wait_for(
        &api,
        "kv",
        "Ready again (replacement joined)",
        Duration::from_secs(300),
        |o| condition(o, "Ready") && epoch(o) > epoch(&fenced),
    )
    .await
    .expect("full redundancy");
    timing(
        &format!("t={t}: primary killed -> full redundancy"),
        format!("{:.1?}", killed.elapsed()),
    );
    let healed_epoch = epoch(&api.get("kv").await.expect("RSM"));
    wait_until(
        "the operator's gauges show the healed RSM",
        Duration::from_secs(60),
        || async {
            let text = lockstep_e2e::operator_metrics()?;
            let g = |m| lockstep_e2e::rsm_gauge(&text, m, ns, "kv");
            Ok(g("lockstep_operator_rsm_degraded") == Some(0.0)
                && g("lockstep_operator_rsm_epoch").is_some_and(|e| e >= healed_epoch as f64))
        },
    )
    .await
    .expect("gauges healed");
    let seen = gauges.finish();
    let first_degraded = seen.iter().position(|(d, _)| *d == 1.0);
    assert!(
        first_degraded.is_some_and(|i| seen[i..].iter().any(|(d, _)| *d == 0.0)),
        "lockstep_operator_rsm_degraded did not go 1 then 0 during the fail-over: {seen:?}"
    );
    assert!(
        seen.iter().any(|(_, e)| *e > before as f64),
        "lockstep_operator_rsm_epoch never rose above {before}: {seen:?}"
    );
    // Every decision is visible with its own message: the latest epoch is in an event.
    let healed = api.get("kv").await.expect("RSM");
    let notes = lockstep_e2e::kubectl(&[
        "-n",
        ns,
        "get",
        "events",
        "--field-selector",
        "reason=Reconfigured",
        "-o",
        "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
    ])
    .expect("events");
    assert!(
        notes.contains(&format!("epoch {} recorded", epoch(&healed))),
        "no Reconfigured event for epoch {}: {notes}",
        epoch(&healed)
    );
    wait_for_progress(&tools, "kv", 100).await;

    let outcome = load.finish().expect("load");
    println!("{}\nlockstep-check: {}", outcome.report.trim(), outcome.check.trim());
    let (pause, after) = longest_write_pause(&outcome.history);
    timing(
        &format!("t={t}: primary killed -> first acknowledged write (longest write pause)"),
        format!("{pause:.2?}"),
    );
    assert!(after > 0, "no write was acknowledged after the primary was killed");
    lockstep_e2e::delete_namespace(client, ns).await.expect("cleanup");
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn kill_9_of_the_primary_under_load_t1() {
    let (client, images) = setup().await;
    kill_primary_under_load(&client, &images, "lockstep-e2e-kill-t1", 1).await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn kill_9_of_the_primary_under_load_t2() {
    let (client, images) = setup().await;
    kill_primary_under_load(&client, &images, "lockstep-e2e-kill-t2", 2).await;
}
