//! `lockstep_replica_write_stage_seconds`: two real replica processes (primary + backup,
//! plaintext, fsync on), N writes, then every stage must have been recorded for every write —
//! a stage that stops being stamped fails here.

mod common;

use common::{Pair, configure, metrics, put};
use lockstep_proto::client_client::ClientClient;
use lockstep_replica::stages::Stage;

const WRITES: u64 = 40;

/// `_count` and `_sum` of one stage.
fn stage(text: &str, name: &str) -> (u64, f64) {
    let value = |suffix: &str| {
        let key = format!("lockstep_replica_write_stage_seconds_{suffix}{{stage=\"{name}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
            .trim()
            .parse::<f64>()
            .expect("a number")
    };
    (value("count") as u64, value("sum"))
}

#[test]
fn every_stage_of_every_committed_write_is_recorded() {
    let Pair { primary, backup, .. } = &Pair::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        configure(&[("p", primary.endpoint()), ("b", backup.endpoint())]).await;
        let mut client = ClientClient::connect(primary.endpoint()).await.expect("client connect");
        for sequence in 1..=WRITES {
            put(&mut client, "stages", sequence).await;
        }
    });
    let p = metrics(primary.at.http);
    for name in Stage::of_primary().iter().map(|s| s.name()) {
        let (count, sum) = stage(&p, name);
        assert_eq!(count, WRITES, "primary stage {name}: one observation per write");
        // commit_wait is legitimately 0 when the backup acked before the local fsync ended.
        if name != "commit_wait" {
            assert!(sum > 0.0, "primary stage {name} took no time at all");
        }
    }
    // receive: every Execute, measured before its handler (headers in -> handler entered).
    let (count, sum) = stage(&p, "receive");
    assert!(
        count >= WRITES,
        "receive: one observation per Execute, {count} for {WRITES} writes"
    );
    assert!(sum > 0.0, "receive took no time at all");
    assert_eq!(stage(&p, "backup_append").0, 0, "the primary is nobody's backup");
    let b = metrics(backup.at.http);
    let (count, sum) = stage(&b, "backup_append");
    assert!(
        (1..=WRITES).contains(&count) && sum > 0.0,
        "backup_append: {count} Appends carrying entries, {sum} s"
    );
    assert_eq!(stage(&b, "validate").0, 0, "a backup orders no client write");
}
