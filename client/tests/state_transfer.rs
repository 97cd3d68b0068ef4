//! State transfer on real processes: after the log has been compacted past what a newcomer
//! could replay, a replacement joins from the primary's snapshot plus the log suffix, holds
//! every acknowledged write, and can take over as primary.

mod common;

use common::{LocalCluster, wait_until};
use nix::sys::signal::Signal;
use std::time::Duration;

#[test]
fn replacement_joins_from_a_snapshot_and_can_take_over() {
    // Small snapshot interval so the log is compacted during the test (inherited by `lockstep
    // up` and its replicas). This binary holds this one test only.
    // SAFETY: set before any other thread of this test process reads the environment.
    unsafe { std::env::set_var("LOCKSTEP_SNAPSHOT_EVERY", "100") };
    let cluster = LocalCluster::start("transfer", 1, "kv", &["--quiet"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let keys = 2400;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..8 {
            let mut client = cluster.client();
            tasks.push(tokio::spawn(async move {
                for i in (c..keys).step_by(8) {
                    client.put(&format!("k{i}"), &format!("v{i}")).await.expect("put");
                }
            }));
        }
        for t in tasks {
            t.await.expect("join");
        }
    });
    let primary = cluster.primary();
    let status = rt
        .block_on(lockstep::status_of(
            &cluster.transport(),
            &cluster.endpoint(&primary),
            Duration::from_secs(2),
        ))
        .expect("status");
    assert!(
        status.snapshot_index >= 2000,
        "the primary compacted its log: {status:?}"
    );

    // Replace the backup: the newcomer cannot replay from index 1 any more.
    let backup = cluster.members().into_iter().find(|m| *m != primary).expect("backup");
    cluster.kill_and_wait_replaced(&backup);
    let newcomer = cluster.members().into_iter().find(|m| *m != primary).expect("newcomer");
    let log = std::fs::read_to_string(cluster.cluster_dir().join("logs").join(format!("{newcomer}.log"))).expect("log");
    assert!(
        log.contains("installed snapshot"),
        "the newcomer joined without a snapshot:\n{log}"
    );
    let s = rt
        .block_on(lockstep::status_of(
            &cluster.transport(),
            &cluster.endpoint(&newcomer),
            Duration::from_secs(2),
        ))
        .expect("status");
    assert!(
        s.applied_index >= keys as u64,
        "newcomer applied {} of {keys}",
        s.applied_index
    );

    // The newcomer alone must hold everything: kill the old primary and read every key.
    let epoch = cluster.epoch();
    cluster.signal(&primary, Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(30), || cluster.epoch() > epoch
            && cluster.primary() == newcomer),
        "newcomer did not take over:\n{}",
        cluster.up_output()
    );
    let mut client = cluster.client();
    for i in 0..keys {
        let got = rt.block_on(client.get(&format!("k{i}"))).expect("get");
        assert_eq!(got, Some(format!("v{i}")), "k{i} lost in the state transfer");
    }
}
