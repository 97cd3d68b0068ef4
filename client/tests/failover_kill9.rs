//! Must-show 1: under concurrent writes from several clients, `kill -9` of any t replicas
//! loses no acknowledged write, the cluster keeps accepting writes, replacements join, and
//! the recorded history (plus a final read of every key) is linearizable.

mod common;

use common::{LocalCluster, check_history, wait_until};
use lockstep::bench::{Mix, WorkloadOptions, run_workload};
use lockstep_linearizability::{HistoryEntry, OpKind, Outcome};
use nix::sys::signal::Signal;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const KEYS: usize = 16;

fn kill_t_under_load(t: u32, env: &[(&str, &str)], victims: impl Fn(&LocalCluster) -> Vec<String>) -> LocalCluster {
    let cluster = LocalCluster::start_with_env(&format!("kill{t}"), t, "kv", &["--quiet"], env);
    let history = cluster.dir.path().join("history.jsonl");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let endpoints = cluster.endpoints();
    let transport = cluster.transport();
    let opts = WorkloadOptions {
        clients: 6,
        duration: Duration::from_secs(8),
        value_size: 16,
        keys: KEYS,
        mix: Mix::Mixed,
        history: Some(history.clone()),
    };
    let t0 = Instant::now();
    let load = rt.spawn(run_workload(
        "lockstep",
        opts,
        move |_| lockstep::Client::new(endpoints.clone()).with_transport(transport.clone()),
        Arc::new(AtomicBool::new(false)),
    ));
    std::thread::sleep(Duration::from_millis(1500));
    let epoch_before = cluster.epoch();
    let victims = victims(&cluster);
    assert_eq!(victims.len(), t as usize);
    let killed_at = t0.elapsed().as_nanos() as u64;
    for v in &victims {
        cluster.signal(v, Signal::SIGKILL);
    }
    // Fenced, replaced, back to full strength — while the load runs.
    assert!(
        wait_until(Duration::from_secs(20), || cluster.epoch() > epoch_before
            && cluster.is_ready()),
        "cluster did not recover after kill -9 of {victims:?}:\n{}",
        cluster.up_output()
    );
    let report = rt.block_on(load).expect("join").expect("workload");
    assert!(report.ok > 100, "too few successful operations: {report}");

    // The replacements are new replicas holding the whole state.
    let members = cluster.members();
    assert_eq!(members.len(), t as usize + 1);
    for v in &victims {
        assert!(
            !members.contains(v),
            "replacements get new names, {v} is not reused: {members:?}"
        );
    }
    let fresh: Vec<_> = members.iter().filter(|m| cluster.pid(m).as_raw() != 0).collect();
    assert_eq!(fresh.len(), t as usize + 1);

    // Final read of every key, appended to the history after everything else.
    let mut client = cluster.client();
    let mut entries = Vec::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let call = (t0.elapsed().as_nanos() as u64) + 1_000_000_000;
        let value = rt.block_on(client.get(&key)).expect("final read");
        entries.push(HistoryEntry {
            client: "final".into(),
            op: OpKind::Get,
            key,
            value: None,
            old: None,
            new: None,
            call,
            ret: Some(call + 1),
            result: Outcome::Ok,
            output: Some(serde_json::json!({"value": value})),
        });
    }
    let text = std::fs::read_to_string(&history).expect("history");
    let recorded = lockstep_linearizability::parse_history(text.as_bytes()).expect("parse");
    let writes_after_kill = recorded
        .iter()
        .filter(|e| e.op != OpKind::Get && e.result == Outcome::Ok && e.call > killed_at + 1_000_000)
        .count();
    assert!(
        writes_after_kill > 10,
        "the cluster must keep accepting writes after the kill ({writes_after_kill}); {report}\n{}",
        cluster.up_output()
    );
    let mut f = std::fs::OpenOptions::new().append(true).open(&history).expect("append");
    for e in &entries {
        lockstep_linearizability::write_entry(&mut f, e).expect("write");
    }
    let n = check_history(&history);
    eprintln!("t={t}: {report}; {n} operations linearizable, {writes_after_kill} writes acknowledged after the kill");
    cluster
}

#[test]
fn kill_primary_t1() {
    kill_t_under_load(1, &[], |c| vec![c.primary()]);
}

/// The same with `--runtime-threads 1` (through its environment variable, which `lockstep up`
/// passes on): a replica whose async runtime is one thread must not stall anywhere.
#[test]
fn kill_primary_t1_with_single_threaded_replicas() {
    let cluster = kill_t_under_load(1, &[("LOCKSTEP_RUNTIME_THREADS", "1")], |c| vec![c.primary()]);
    for id in cluster.members() {
        let log =
            std::fs::read_to_string(cluster.cluster_dir().join("logs").join(format!("{id}.log"))).unwrap_or_default();
        assert!(
            log.contains("async runtime: single-threaded"),
            "{id} did not run single-threaded; its log:\n{log}"
        );
    }
}

#[test]
fn kill_primary_and_backup_t2() {
    kill_t_under_load(2, &[], |c| {
        let p = c.primary();
        let backup = c.members().into_iter().find(|m| *m != p).expect("a backup");
        vec![p, backup]
    });
}
