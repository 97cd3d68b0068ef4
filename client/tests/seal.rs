//! Must-show 6: `seal at N` stops every replica at the same index with identical snapshots;
//! commands are refused while sealed and flow again after `Resume`.

mod common;

use common::{LocalCluster, wait_until};
use lockstep_proto::{ResumeRequest, SealRequest, admin_client::AdminClient};
use std::time::Duration;

#[test]
fn seal_stops_every_replica_at_one_index_with_identical_snapshots() {
    let cluster = LocalCluster::start("seal", 2, "kv", &["--quiet"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut client = cluster.client();
    rt.block_on(async {
        for i in 0..50 {
            client.put(&format!("k{i}"), &format!("v{i}")).await.expect("put");
        }
    });
    let primary = cluster.primary();
    let ep = cluster.endpoint(&primary);
    let members = cluster.members();
    let statuses = |cluster: &LocalCluster| {
        members
            .iter()
            .map(|m| {
                rt.block_on(lockstep::status_of(
                    &cluster.transport(),
                    &cluster.endpoint(m),
                    Duration::from_secs(2),
                ))
                .expect("status")
            })
            .collect::<Vec<_>>()
    };
    let last = statuses(&cluster).iter().map(|s| s.last_index).max().unwrap_or(0);
    let at = last + 10; // padded with no-ops up to N
    let sealed = rt.block_on(async {
        let mut admin = AdminClient::new(common::connect(&cluster.admin_transport(), &ep).await.expect("admin"));
        // Sealing below the current index is refused with a clear message.
        let early = admin.seal(SealRequest { at_index: 1 }).await.expect_err("too early");
        assert!(early.message().contains("already reached"), "{}", early.message());
        admin
            .seal(SealRequest { at_index: at })
            .await
            .expect("seal")
            .into_inner()
    });
    assert_eq!(sealed.index, at);

    assert!(
        wait_until(Duration::from_secs(10), || statuses(&cluster)
            .iter()
            .all(|s| s.sealed_at == at)),
        "not every replica sealed at {at}"
    );
    let all = statuses(&cluster);
    for s in &all {
        assert_eq!(s.applied_index, at, "{} applied past the seal", s.id);
        assert_eq!(
            s.sealed_digest, sealed.digest,
            "{} has a different snapshot at the seal",
            s.id
        );
    }
    assert_eq!(all.len(), 3);

    // Sealed: commands refused (not applied).
    let mut quick = cluster.client();
    quick.deadline = Duration::from_secs(2);
    let refused = rt.block_on(quick.put("k0", "after-seal"));
    assert!(
        matches!(&refused, Err(e) if e.certainly_not_applied() && e.to_string().contains("sealed")),
        "{refused:?}"
    );
    assert_eq!(
        rt.block_on(client.get("k0")).expect("reads still work").as_deref(),
        Some("v0")
    );

    // The snapshot files on disk are byte-identical.
    let snap_name = format!("snapshot-{at:020}.snap");
    let files: Vec<Vec<u8>> = members
        .iter()
        .map(|m| std::fs::read(cluster.cluster_dir().join("replicas").join(m).join(&snap_name)).expect("snapshot file"))
        .collect();
    assert!(
        files.windows(2).all(|w| w[0] == w[1]),
        "snapshot files at the seal differ"
    );

    // Resume: commands flow again.
    rt.block_on(async {
        let mut admin = AdminClient::new(common::connect(&cluster.admin_transport(), &ep).await.expect("admin"));
        admin.resume(ResumeRequest {}).await.expect("resume");
    });
    assert_eq!(
        rt.block_on(client.put("k0", "resumed"))
            .expect("put after resume")
            .as_deref(),
        Some("v0")
    );
}
