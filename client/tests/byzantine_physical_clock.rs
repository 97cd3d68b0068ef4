//! Byzantine mode with `PhysicalClock` stability, on real processes: an item runs at local time
//! ts + Δ (no waiting for other clients), so concurrent clients make progress, the accepted
//! history is linearizable, and one replica giving wrong outputs is outvoted and named.
//! The ordering core's simulation (`replica/src/byz/order_tests.rs`) covers the windows; this
//! covers clocks, timers and relays between real processes.

mod byzcommon;

use byzcommon::{ByzCluster, Tallies};
use std::time::Duration;

#[test]
fn physical_clock_orders_concurrent_clients_and_outvotes_a_wrong_replica() {
    // δ leaves room for a loaded 2-core machine; ε is small: every process reads one clock.
    let ordering = "  ordering:\n    stability: PhysicalClock\n    maxDelayMillis: 200\n    maxClockSkewMillis: 20\n";
    let cluster = ByzCluster::start("bphys", 1, ordering, &["--inject", "replica-2=wrong-output"]);
    let tallies = Tallies::default();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (report, history) = cluster.voted_workload(&rt, "byzantine-physical", &tallies);
    assert!(
        report.ok >= 4,
        "PhysicalClock: too few accepted operations: {report}\n{}",
        cluster.up_output()
    );
    let n = byzcommon::assert_linearizable(&history);
    let faulty = "bphys-2".to_string();
    let named = || {
        tallies
            .lock()
            .ok()
            .and_then(|t| t.get(&faulty).map(|t| t.disagreed > 0))
            .unwrap_or(false)
    };
    assert!(
        byzcommon::wait_until(Duration::from_secs(15), named),
        "the voters did not name {faulty}: {:?}",
        tallies.lock().map(|t| t.clone())
    );
    let tallies = tallies.lock().map(|t| t.clone()).unwrap_or_default();
    for id in cluster.replica_ids().into_iter().filter(|id| *id != faulty) {
        let t = tallies.get(&id).cloned().unwrap_or_default();
        assert_eq!(t.disagreed, 0, "correct {id} was counted as disagreeing: {tallies:?}");
        assert!(t.agreed > 0, "correct {id} never agreed: {tallies:?}");
    }
    eprintln!("PhysicalClock t=1: {report}; {n} operations linearizable");
}

/// A client whose clock is 5 s behind, beyond what `PhysicalClock` assumes (ε): its items are
/// stamped no later than its admission's floor, which is already Δ old when the admission is
/// answered, so every one reaches every replica after its window and runs nowhere. The replicas
/// say so, signed, at ts + Δ (before, they let the client wait 20 s for an answer that could
/// not come, and the client reported only that nobody answered); the client tries a new stream
/// until its deadline and then reports that reason. Nothing it sent ran, and the cluster keeps
/// serving a client whose clock is right.
#[test]
fn a_client_with_a_clock_behind_is_told_its_items_missed_their_window() {
    let ordering = "  ordering:\n    stability: PhysicalClock\n    maxDelayMillis: 200\n    maxClockSkewMillis: 20\n";
    let cluster = ByzCluster::start("bpclk", 1, ordering, &[]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut behind = cluster.client();
        behind.set_clock_offset_us(-5_000_000);
        behind.deadline = Duration::from_secs(4);
        let err = behind
            .put("k", "late")
            .await
            .expect_err("items stamped behind run nowhere");
        assert!(
            err.to_string().contains("after its window"),
            "the client is told why: {err}\n{}",
            cluster.up_output()
        );
        behind.close().await;
        let mut other = cluster.client();
        assert_eq!(other.get("k").await.expect("read"), None, "the late write ran nowhere");
        other
            .put("k", "on time")
            .await
            .expect("a client with a right clock writes");
        other.close().await;
    });
}
