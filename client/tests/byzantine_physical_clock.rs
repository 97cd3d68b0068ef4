//! Byzantine mode with `PhysicalClock` stability, on real processes: an item runs at local time
//! ts + Δ (no waiting for other clients), so concurrent clients make progress, the accepted
//! history is linearizable, and one replica giving wrong outputs is outvoted and named.
//! The ordering core's simulation (`replica/src/byz/order_tests.rs`) covers the windows; this
//! covers clocks, timers and relays between real processes.

mod byzcommon;

use byzcommon::ByzCluster;
use lockstep::bench::{Mix, WorkloadOptions, run_workload};
use lockstep::byz::Tally;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn physical_clock_orders_concurrent_clients_and_outvotes_a_wrong_replica() {
    // δ leaves room for a loaded 2-core machine; ε is small: every process reads one clock.
    let ordering = "  ordering:\n    stability: PhysicalClock\n    maxDelayMillis: 200\n    maxClockSkewMillis: 20\n";
    let cluster = ByzCluster::start("bphys", 1, ordering, &["--inject", "replica-2=wrong-output"]);
    let history = cluster.dir.path().join("history.jsonl");
    let tallies = Arc::new(Mutex::new(BTreeMap::<String, Tally>::new()));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt
        .block_on(async {
            let clients: Vec<_> = (0..4)
                .map(|_| Some(cluster.client().with_tallies(tallies.clone())))
                .collect();
            let pool = Mutex::new(clients);
            run_workload(
                "byzantine-physical",
                WorkloadOptions {
                    clients: 4,
                    duration: Duration::from_secs(4),
                    value_size: 8,
                    keys: 6,
                    mix: Mix::Mixed,
                    history: Some(history.clone()),
                },
                |i| {
                    pool.lock()
                        .ok()
                        .and_then(|mut p| p.get_mut(i).and_then(Option::take))
                        .expect("a client per index")
                },
                Arc::new(AtomicBool::new(false)),
            )
            .await
        })
        .expect("workload");
    assert!(
        report.ok >= 4,
        "PhysicalClock: too few accepted operations: {report}\n{}",
        cluster.up_output()
    );
    let file = std::fs::File::open(&history).expect("history file");
    let parsed = lockstep_linearizability::parse_history(std::io::BufReader::new(file)).expect("parse history");
    let result = lockstep_linearizability::check_kv(&parsed, lockstep_linearizability::CheckLimits::default());
    assert!(
        result.is_linearizable(),
        "PhysicalClock history is not linearizable: {result}"
    );
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
    eprintln!("PhysicalClock t=1: {report}; {} operations linearizable", parsed.len());
}
