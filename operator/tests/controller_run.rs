//! The real `Controller` (watches, queue, error policy, shutdown) against the fake API
//! server: every object is reconciled, an invalid one does not hold up the others, and
//! shutdown is graceful.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lockstep_operator::controller::{Context, run};
use lockstep_operator::metrics::Metrics;
use lockstep_operator::observe::Source;
use serde_json::json;

#[tokio::test]
async fn controller_reconciles_all_objects_isolates_invalid_ones_and_shuts_down() {
    let log = Log::default();
    let api = Arc::new(Mutex::new(FakeApi {
        log: log.clone(),
        ..Default::default()
    }));
    {
        let mut fake = lock(&api);
        fake.insert(&rsm_path("a"), rsm_json("a", 1, "1.0.0", "img:1"));
        let mut bad = rsm_json("bad", 9, "1.0.0", "img:1");
        bad["metadata"]["generation"] = json!(1);
        fake.insert(&rsm_path("bad"), bad);
        fake.insert(&rsm_path("b"), rsm_json("b", 0, "1.0.0", "img:1"));
    }
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(
        client(api.clone()),
        Arc::new(FakeAdmin::default()),
        metrics.clone(),
        Source::Api,
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run(ctx, async move {
        let _ = stop_rx.await;
    }));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done = {
            let pods = pods(&api);
            let bad_reported = rsm(&api, "bad")
                .status
                .is_some_and(|s| s.conditions.iter().any(|c| c.reason == "InvalidSpec"));
            pods.contains(&"a-0".to_string())
                && pods.contains(&"a-1".to_string())
                && pods.contains(&"b-0".to_string())
                && bad_reported
        };
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "controller did not converge: {:#?}",
            lock(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let watched: Vec<String> = lock(&log).iter().filter(|l| l.starts_with("WATCH")).cloned().collect();
    assert!(
        watched.iter().any(|w| w.ends_with("/replicatedstatemachines")),
        "{watched:?}"
    );
    assert!(
        watched.iter().any(|w| w.ends_with("/pods")),
        "owned pods watched: {watched:?}"
    );

    stop_tx.send(()).ok();
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("controller stops on shutdown")
        .expect("controller task");
    assert!(
        metrics
            .reconciles
            .get_or_create(&lockstep_operator::metrics::ResultLabel { result: "ok".into() })
            .get()
            >= 3
    );
}
