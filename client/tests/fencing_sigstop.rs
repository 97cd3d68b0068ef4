//! Must-show 2: `SIGSTOP` the primary; the master reconfigures around it; `SIGCONT` it.
//! The old primary's writes and reads are refused by epoch (it can neither commit nor serve
//! a stale read), and the history of a concurrent workload stays linearizable.

mod common;

use common::{LocalCluster, check_history, wait_until};
use lockstep::ClientError;
use lockstep::bench::{Mix, WorkloadOptions, run_workload};
use nix::sys::signal::Signal;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[test]
fn paused_primary_is_fenced_by_epoch() {
    // Keep the fenced process alive for a long time so the test talks to it.
    let cluster = LocalCluster::start("pause", 1, "kv", &["--quiet", "--fenced-grace-ms", "60000"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut client = cluster.client();
    rt.block_on(client.put("x", "before")).expect("put before");

    let history = cluster.dir.path().join("history.jsonl");
    let endpoints = cluster.endpoints();
    let transport = cluster.transport();
    let load = rt.spawn(run_workload(
        "lockstep",
        WorkloadOptions {
            clients: 4,
            duration: Duration::from_secs(6),
            value_size: 8,
            keys: 8,
            mix: Mix::Mixed,
            history: Some(history.clone()),
        },
        move |_| lockstep::Client::new(endpoints.clone()).with_transport(transport.clone()),
        Arc::new(AtomicBool::new(false)),
    ));
    std::thread::sleep(Duration::from_millis(1000));

    let old = cluster.primary();
    let old_endpoint = cluster.endpoint(&old);
    let epoch_before = cluster.epoch();
    cluster.signal(&old, Signal::SIGSTOP);
    assert!(
        wait_until(Duration::from_secs(15), || cluster.epoch() > epoch_before
            && cluster.primary() != old),
        "no reconfiguration around the paused primary:\n{}",
        cluster.up_output()
    );
    // The new primary takes writes.
    rt.block_on(client.put("x", "after")).expect("put on the new primary");
    let new_epoch = cluster.epoch();

    cluster.signal(&old, Signal::SIGCONT);
    // Talk to the old primary ONLY.
    let mut stale = lockstep::Client::new(vec![old_endpoint.clone()]).with_transport(cluster.transport());
    stale.deadline = Duration::from_secs(3);
    let write = rt.block_on(stale.put("x", "from-the-fenced-primary"));
    assert!(write.is_err(), "the fenced primary acknowledged a write: {write:?}");
    let read = rt.block_on(stale.get("x"));
    assert!(
        matches!(&read, Err(ClientError::Rejected(m)) if m.contains("epoch") || m.contains("fenced") || m.contains("not the primary")),
        "the fenced primary must refuse reads by epoch, got {read:?}"
    );
    let status = rt
        .block_on(lockstep::status_of(
            &cluster.transport(),
            &old_endpoint,
            Duration::from_secs(2),
        ))
        .expect("old primary answers");
    assert!(
        matches!(status.state.as_str(), "fenced" | "removed"),
        "old primary state: {}",
        status.state
    );
    assert!(status.epoch < new_epoch || status.state == "removed");

    // Its write never took effect anywhere.
    let x = rt.block_on(client.get("x")).expect("read");
    assert_eq!(x.as_deref(), Some("after"));

    let report = rt.block_on(load).expect("join").expect("workload");
    assert!(report.ok > 50, "{report}");
    let n = check_history(&history);
    eprintln!(
        "{report}; {n} operations linearizable; old primary {old} ended {}",
        status.state
    );
}
