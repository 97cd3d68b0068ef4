//! `lockstep_replica_write_stage_seconds`: two real replica processes (primary + backup,
//! plaintext, fsync on), N writes, then every stage must have been recorded for every write —
//! a stage that stops being stamped fails here.

use lockstep_proto::{
    Command, Configuration, ExecuteRequest, Member, MemberRole, ReconfigureRequest, admin_client::AdminClient,
    client_client::ClientClient,
};
use lockstep_replica::Listening;
use lockstep_replica::stages::Stage;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

const WRITES: u64 = 40;

/// A replica process and the addresses it bound.
struct Replica {
    _process: Kill,
    at: Listening,
}

/// A child process, killed when dropped (also when the test fails before it answers).
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(id: &str, dir: &Path) -> Replica {
    let child = Kill(
        Process::new(env!("CARGO_BIN_EXE_lockstep-replica"))
            .args(["--id", id, "--insecure", "--data-dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lockstep-replica"),
    );
    let file = dir.join(lockstep_replica::LISTENING_FILE);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Listening>(&b).ok())
        {
            return Replica { _process: child, at: l };
        }
        assert!(Instant::now() < deadline, "{id} did not write {}", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect /metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read /metrics");
    out
}

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
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let primary = start("p", dirs[0].path());
    let backup = start("b", dirs[1].path());
    let endpoint = |r: &Replica| format!("http://{}", r.at.grpc);
    let config = Configuration {
        epoch: 1,
        primary_id: "p".into(),
        members: [("p", &primary), ("b", &backup)]
            .iter()
            .map(|(id, r)| Member {
                id: id.to_string(),
                endpoint: endpoint(r),
                role: MemberRole::Voter as i32,
            })
            .collect(),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // The backup first, as the master does, so the primary's first Append is accepted.
        for r in [&backup, &primary] {
            AdminClient::connect(endpoint(r))
                .await
                .expect("admin connect")
                .reconfigure(ReconfigureRequest {
                    config: Some(config.clone()),
                })
                .await
                .expect("reconfigure");
        }
        let mut client = ClientClient::connect(endpoint(&primary)).await.expect("client connect");
        for sequence in 1..=WRITES {
            let payload = format!(r#"{{"op":"put","key":"k{sequence}","value":"v"}}"#);
            client
                .execute(ExecuteRequest {
                    command: Some(Command {
                        client_id: "stages".into(),
                        sequence,
                        payload: payload.into_bytes(),
                    }),
                })
                .await
                .expect("write");
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
