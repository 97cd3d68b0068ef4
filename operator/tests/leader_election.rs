//! Lease-based leader election against the fake API server.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lockstep_operator::leader::{Attempt, LeaderElector, LeaseConfig};
use serde_json::json;

fn elector(api: &Arc<Mutex<FakeApi>>, identity: &str) -> LeaderElector {
    LeaderElector::new(
        client(api.clone()),
        LeaseConfig {
            namespace: "lockstep-system".into(),
            name: "lockstep-operator".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_millis(10),
        },
    )
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/lockstep-system/leases/lockstep-operator";

#[tokio::test]
async fn one_leader_renewals_and_takeover_after_expiry() {
    let api = Arc::new(Mutex::new(FakeApi::default()));
    let a = elector(&api, "a");
    let b = elector(&api, "b");
    assert_eq!(a.try_acquire_or_renew().await.ok(), Some(Attempt::Leading));
    assert_eq!(b.try_acquire_or_renew().await.ok(), Some(Attempt::Following));
    assert_eq!(a.try_acquire_or_renew().await.ok(), Some(Attempt::Leading), "renewal");
    assert_eq!(lock(&api).objects[LEASE]["spec"]["holderIdentity"], json!("a"));

    // a stops renewing: its lease expires and b takes over, counting a transition.
    {
        let mut fake = lock(&api);
        let mut lease = fake.objects[LEASE].clone();
        lease["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
        fake.insert(LEASE, lease);
    }
    assert_eq!(b.try_acquire_or_renew().await.ok(), Some(Attempt::Leading));
    assert_eq!(lock(&api).objects[LEASE]["spec"]["holderIdentity"], json!("b"));
    assert_eq!(lock(&api).objects[LEASE]["spec"]["leaseTransitions"], json!(1));
    assert_eq!(a.try_acquire_or_renew().await.ok(), Some(Attempt::Following));

    // Release on shutdown: a successor does not wait for expiry.
    b.release().await;
    assert_eq!(a.try_acquire_or_renew().await.ok(), Some(Attempt::Leading));
}

#[tokio::test]
async fn concurrent_writers_cannot_both_win() {
    let api = Arc::new(Mutex::new(FakeApi::default()));
    let a = elector(&api, "a");
    assert_eq!(a.try_acquire_or_renew().await.ok(), Some(Attempt::Leading));
    {
        let mut fake = lock(&api);
        let mut lease = fake.objects[LEASE].clone();
        lease["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
        fake.insert(LEASE, lease);
    }
    // b and c both see the expired lease; the API's resourceVersion check lets one win.
    let b = elector(&api, "b");
    let c = elector(&api, "c");
    let (rb, rc) = tokio::join!(b.try_acquire_or_renew(), c.try_acquire_or_renew());
    let leaders = [rb.ok(), rc.ok()]
        .iter()
        .filter(|r| **r == Some(Attempt::Leading))
        .count();
    assert_eq!(leaders, 1);
}
