//! Must-show 4: a retried client request (same client id and sequence number) is applied
//! once — on the same primary, and after a fail-over to a new primary.

mod common;

use common::{LocalCluster, wait_until};
use lockstep_proto::{Command, ExecuteRequest, ReadRequest, client_client::ClientClient};
use nix::sys::signal::Signal;
use std::time::Duration;

async fn add(
    t: &lockstep::Transport,
    endpoint: &str,
    client: &str,
    seq: u64,
    amount: i64,
) -> Result<serde_json::Value, tonic::Status> {
    let mut c = ClientClient::new(
        common::connect(t, endpoint)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?,
    );
    let payload = serde_json::json!({"op": "add", "amount": amount})
        .to_string()
        .into_bytes();
    let r = c
        .execute(ExecuteRequest {
            command: Some(Command {
                client_id: client.into(),
                sequence: seq,
                payload,
            }),
        })
        .await?;
    Ok(serde_json::from_slice(&r.into_inner().output).expect("json output"))
}

async fn value(t: &lockstep::Transport, endpoint: &str) -> i64 {
    let mut c = ClientClient::new(common::connect(t, endpoint).await.expect("connect"));
    let r = c
        .read(ReadRequest {
            query: br#"{"op":"get"}"#.to_vec(),
        })
        .await
        .expect("read");
    let v: serde_json::Value = serde_json::from_slice(&r.into_inner().output).expect("json");
    v["value"].as_i64().expect("number")
}

#[test]
fn retried_requests_apply_once_even_across_failover() {
    let cluster = LocalCluster::start("once", 1, "counter", &["--quiet"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let primary = cluster.primary();
    let ep = cluster.endpoint(&primary);
    let t = cluster.transport();
    rt.block_on(async {
        assert_eq!(add(&t, &ep, "alice", 1, 5).await.expect("first")["value"], 5);
        // Same (client, sequence): the original answer, no second application.
        assert_eq!(add(&t, &ep, "alice", 1, 5).await.expect("retry")["value"], 5);
        // Another client in between, then alice retries again: still the first answer.
        assert_eq!(add(&t, &ep, "bob", 1, 100).await.expect("bob")["value"], 105);
        assert_eq!(add(&t, &ep, "alice", 1, 5).await.expect("retry 2")["value"], 5);
        // An older sequence than the last applied one is refused.
        assert_eq!(add(&t, &ep, "alice", 2, 1).await.expect("alice 2")["value"], 106);
        let stale = add(&t, &ep, "alice", 1, 5).await.expect_err("older sequence");
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
        assert!(stale.message().contains("older"), "{}", stale.message());
        assert_eq!(add(&t, &ep, "alice", 3, 1).await.expect("alice 3")["value"], 107);
    });

    // The answer to alice's seq 3 was "lost"; the primary dies; alice retries on the new one.
    let epoch = cluster.epoch();
    cluster.signal(&primary, Signal::SIGKILL);
    // The master records the new epoch before it pushes it: wait until the new primary
    // itself says it is primary of that epoch (a raw call is not retried like the client
    // library's; on a loaded machine the push can trail the record).
    assert!(
        wait_until(Duration::from_secs(15), || {
            let (now, new_primary) = (cluster.epoch(), cluster.primary());
            now > epoch
                && new_primary != primary
                && cluster
                    .status(&cluster.endpoint(&new_primary), Duration::from_millis(500))
                    .is_ok_and(|s| s.epoch == now && s.state == "primary")
        }),
        "no fail-over:\n{}",
        cluster.up_output()
    );
    let new_ep = cluster.endpoint(&cluster.primary());
    rt.block_on(async {
        let retry = add(&t, &new_ep, "alice", 3, 1).await.expect("retry on the new primary");
        assert_eq!(retry["value"], 107, "the retry returns the original answer");
        assert_eq!(value(&t, &new_ep).await, 107, "and the add was applied once");
        assert_eq!(add(&t, &new_ep, "alice", 4, 1).await.expect("alice 4")["value"], 108);
    });
}
