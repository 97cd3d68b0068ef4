//! Byzantine mode, must-show 3: a crashed client stalls Lamport stability (no stream may be
//! passed while it could still send something older), and the cluster recovers when the
//! configuration master removes the client's stream with an ordered, master-signed tombstone.

mod byzcommon;

use byzcommon::{ByzCluster, lockstep_bin, wait_until};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_killed_client_stalls_the_others_until_the_master_removes_it() {
    let cluster = ByzCluster::start("bcrash", 1, "", &["--client-timeout-ms", "3000"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_runtime = rt.enter();
    let mut survivor = cluster.client();
    rt.block_on(survivor.put("before", "1")).expect("put before the crash");

    // Another client in its own process, holding a stream open while it writes.
    let mut victim = Command::new(lockstep_bin())
        .arg("--data-dir")
        .arg(cluster.data_dir())
        .args([
            "-c",
            &cluster.name,
            "bench",
            "--clients",
            "1",
            "--duration",
            "120",
            "--keys",
            "4",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("victim client");
    let streams = || {
        cluster
            .status(&format!("{}-0", cluster.name))
            .and_then(|s| s.byzantine)
            .map(|b| b.streams.len())
            .unwrap_or(0)
    };
    // master + survivor + victim
    assert!(
        wait_until(Duration::from_secs(30), || streams() >= 3),
        "the victim never opened a stream"
    );
    victim.kill().expect("kill -9 the victim client");
    let _ = victim.wait();
    let killed = Instant::now();

    // Stalled: nothing newer than the victim's last item can run.
    survivor.deadline = Duration::from_secs(1);
    survivor.attempt_timeout = Duration::from_secs(1);
    let stalled = rt.block_on(survivor.put("during", "2"));
    assert!(
        stalled.is_err(),
        "a put ran while a crashed client's stream was open: {stalled:?}"
    );

    // The master removes the stream after its timeout; everything flows again.
    survivor.deadline = Duration::from_secs(30);
    survivor.attempt_timeout = Duration::from_secs(3);
    rt.block_on(survivor.put("after", "3")).expect("put after the removal");
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "recovered before the client timeout: the stall was not real"
    );
    assert!(
        cluster.up_output().contains("removing stalled client stream "),
        "{}",
        cluster.up_output()
    );
    assert_eq!(rt.block_on(survivor.get("after")).expect("get").as_deref(), Some("3"));
    assert_eq!(rt.block_on(survivor.get("before")).expect("get").as_deref(), Some("1"));
}
