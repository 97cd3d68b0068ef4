//! Byzantine mode, must-show 4: a `kill -9`ed replica is replaced; the master orders a barrier,
//! t+1 replicas vouch for the state digest there, and the replacement installs a snapshot only
//! when it matches that digest — the faulty peer offering a corrupt snapshot is refused and named.

mod byzcommon;

use byzcommon::{ByzCluster, wait_until};
use nix::sys::signal::{Signal, kill};
use std::time::Duration;

#[test]
fn a_replacement_state_transfers_despite_a_peer_offering_a_corrupt_snapshot() {
    let cluster = ByzCluster::start("bst", 1, "", &["--inject", "replica-0=corrupt-snapshot"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_runtime = rt.enter();
    let mut c = cluster.client();
    for i in 0..10 {
        rt.block_on(c.put(&format!("k{i}"), &format!("v{i}"))).expect("put");
    }
    rt.block_on(c.close());
    let era = cluster.info().map_or(0, |i| i.era);
    let victim = "bst-2";
    kill(cluster.pid(victim).expect("victim pid"), Signal::SIGKILL).expect("kill -9");
    // Fenced (era without it), replaced (era with a newcomer), promoted: three eras later the
    // newcomer serves.
    let replaced = wait_until(Duration::from_secs(120), || {
        cluster.info().is_some_and(|i| {
            i.era > era
                && i.replicas.len() == 3
                && !i.replicas.iter().any(|r| r.id == victim)
                && i.replicas.iter().all(|r| {
                    cluster
                        .status(&r.id)
                        .is_some_and(|s| s.epoch == i.era && s.state == "member")
                })
        })
    });
    assert!(replaced, "no replacement:\n{}", cluster.up_output());
    let info = cluster.info().expect("info");
    let newcomer = info
        .replicas
        .iter()
        .map(|r| r.id.clone())
        .find(|id| id != "bst-0" && id != "bst-1")
        .expect("newcomer");
    let log = cluster.log(&newcomer);
    assert!(
        log.contains("installed the era's start state"),
        "the newcomer did not state-transfer:\n{log}"
    );
    let evidence = cluster
        .status(&newcomer)
        .and_then(|s| s.byzantine)
        .map(|b| b.evidence)
        .unwrap_or_default();
    assert!(
        evidence
            .iter()
            .any(|e| e.peer == "bst-0" && e.kind == "corrupt-snapshot"),
        "the corrupt snapshot of bst-0 was not refused and named: {evidence:?}\n{log}"
    );
    // The newcomer holds every write, and answers agree with it in the vote.
    let mut c = cluster.client();
    for i in 0..10 {
        let got = rt.block_on(c.get(&format!("k{i}"))).expect("get");
        assert_eq!(got, Some(format!("v{i}")));
    }
    rt.block_on(c.put("after", "x")).expect("put after the replacement");
    assert!(
        c.tallies().get(&newcomer).is_some_and(|t| t.agreed > 0),
        "{:?}",
        c.tallies()
    );
}
