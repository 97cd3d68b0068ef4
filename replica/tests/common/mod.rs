//! Real replica processes for the replica crate's integration tests: start them, configure
//! them as the master would, write through the primary, read `/metrics`.
#![allow(dead_code)] // each test binary uses its own part

use lockstep_proto::{
    Command, Configuration, ExecuteRequest, Member, MemberRole, ReconfigureRequest, admin_client::AdminClient,
    client_client::ClientClient,
};
use lockstep_replica::Listening;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

/// A replica process and the addresses it bound.
pub struct Replica {
    _process: Kill,
    pub at: Listening,
}

/// A child process, killed when dropped (also when the test fails before it answers).
pub struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start(id: &str, dir: &Path) -> Replica {
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

pub fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect /metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read /metrics");
    out
}

/// A primary "p" and a backup "b" (not configured yet), each with its own temporary data
/// directory; the processes are killed before the directories are removed.
pub struct Pair {
    pub primary: Replica,
    pub backup: Replica,
    _dirs: [tempfile::TempDir; 2],
}

impl Pair {
    pub fn start() -> Pair {
        let dirs = [
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        ];
        Pair {
            primary: start("p", dirs[0].path()),
            backup: start("b", dirs[1].path()),
            _dirs: dirs,
        }
    }
}

impl Replica {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.at.grpc)
    }
}

/// Configure epoch 1 with `members[0]` as primary and every member a voter, `(id, endpoint)`:
/// the backups first, as the master does, so the primary's first Append is accepted.
pub async fn configure(members: &[(&str, String)]) {
    let admins: Vec<String> = members.iter().map(|(_, e)| e.clone()).collect();
    configure_via(members, &admins).await
}

/// [`configure`], reaching each member's Admin service at `admins[i]` (where the member's
/// own endpoint is not the replica itself).
pub async fn configure_via(members: &[(&str, String)], admins: &[String]) {
    let config = Configuration {
        epoch: 1,
        primary_id: members[0].0.into(),
        members: members
            .iter()
            .map(|(id, endpoint)| Member {
                id: id.to_string(),
                endpoint: endpoint.clone(),
                role: MemberRole::Voter as i32,
            })
            .collect(),
    };
    for endpoint in admins.iter().rev() {
        AdminClient::connect(endpoint.clone())
            .await
            .expect("admin connect")
            .reconfigure(ReconfigureRequest {
                config: Some(config.clone()),
            })
            .await
            .expect("reconfigure");
    }
}

/// Write `put k<sequence>` as client `client` with that session sequence number.
pub async fn put(client: &mut ClientClient<tonic::transport::Channel>, id: &str, sequence: u64) {
    let payload = format!(r#"{{"op":"put","key":"k{sequence}","value":"v"}}"#);
    client
        .execute(ExecuteRequest {
            command: Some(Command {
                client_id: id.into(),
                sequence,
                payload: payload.into_bytes(),
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("write {sequence}: {e}"));
}

/// The value of one sample of `/metrics` text (`name{labels}`), 0 when absent (a counter
/// family exports only the label sets that were ever counted).
pub fn sample(text: &str, name_and_labels: &str) -> f64 {
    let key = format!("{name_and_labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}
