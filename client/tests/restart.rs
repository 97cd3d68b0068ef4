//! Must-show 3: stop the whole cluster (cleanly, and by crashing every process at once)
//! and start it again from its data dir: every acknowledged write is there.

mod common;

use common::LocalCluster;
use std::collections::BTreeMap;
use std::time::Duration;

fn write_many(cluster: &LocalCluster, rt: &tokio::runtime::Runtime, round: &str) -> BTreeMap<String, String> {
    let mut acked = BTreeMap::new();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..4 {
            let mut client = cluster.client();
            let round = round.to_string();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..60 {
                    let (k, v) = (format!("k{c}-{i}"), format!("{round}-{c}-{i}"));
                    if client.put(&k, &v).await.is_ok() {
                        mine.push((k, v));
                    }
                }
                mine
            }));
        }
        for t in tasks {
            acked.extend(t.await.expect("join"));
        }
    });
    acked
}

fn assert_all_present(cluster: &LocalCluster, rt: &tokio::runtime::Runtime, acked: &BTreeMap<String, String>) {
    let mut client = cluster.client();
    for (k, v) in acked {
        let got = rt.block_on(client.get(k)).expect("read after restart");
        assert_eq!(got.as_deref(), Some(v.as_str()), "acknowledged write {k}={v} lost");
    }
}

#[test]
fn full_cluster_restart_keeps_every_acknowledged_write() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut cluster = LocalCluster::start("restart", 1, "kv", &["--quiet"]);
    let acked = write_many(&cluster, &rt, "clean");
    assert_eq!(acked.len(), 240, "all writes should succeed on a healthy cluster");

    // 1. Clean stop (Ctrl-C) and restart.
    cluster.stop();
    cluster.launch();
    cluster.wait_ready(Duration::from_secs(30));
    assert_all_present(&cluster, &rt, &acked);

    // 2. Crash: kill -9 the master and every replica at once, then restart.
    let acked2 = write_many(&cluster, &rt, "crash");
    cluster.crash_all();
    cluster.launch();
    cluster.wait_ready(Duration::from_secs(30));
    assert_all_present(&cluster, &rt, &acked2);
    let out = cluster.up_output();
    assert!(out.contains("restarting from cluster.json"), "{out}");
}
