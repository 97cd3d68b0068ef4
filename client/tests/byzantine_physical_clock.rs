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
