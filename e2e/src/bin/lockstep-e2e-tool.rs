//! `lockstep-e2e-tool`: what the Kubernetes end-to-end suite needs inside the cluster besides
//! the `lockstep` CLI — real faults, a process that idles, and `cat` (the images have no shell).
//!
//! For faults it runs in a privileged pod with the host's PID namespace (the suite creates it in its own
//! namespace, never in a replica's). It finds the processes of one container by its
//! container id in `/proc/PID/cgroup` and sends them a signal — `kill -9` or `SIGSTOP` /
//! `SIGCONT` of a replica process, from outside its PID namespace, which is what a crash
//! or a freeze looks like to Kubernetes and to the replica's peers.
//!
//! ```text
//! lockstep-e2e-tool signal KILL <container-id>...   # containerd://… prefixes are accepted;
//!                                                   # several ids: all found first, then signalled
//! lockstep-e2e-tool signal STOP <container-id>
//! lockstep-e2e-tool signal CONT <container-id>
//! lockstep-e2e-tool idle                            # keep the pod running
//! lockstep-e2e-tool cat FILE                        # print a file (a recorded history)
//! lockstep-e2e-tool pkill INT PATTERN               # signal this container's processes whose
//!                                                   # command line contains PATTERN
//! lockstep-e2e-tool without-tls PROGRAM ARGS...     # run PROGRAM without LOCKSTEP_TLS_*
//! lockstep-e2e-tool tls-probe HOST:PORT             # who may call what (see `tls_probe`)
//! ```
//!
//! Test tooling only: it is not part of the product images.

use std::path::Path;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn usage() -> anyhow::Error {
    anyhow::anyhow!(
        "usage: lockstep-e2e-tool signal KILL|STOP|CONT <container-id> | pkill SIGNAL PATTERN | idle | cat FILE \
         | without-tls PROGRAM ARGS... | tls-probe HOST:PORT"
    )
}

fn parse_signal(name: &str) -> anyhow::Result<Signal> {
    Ok(match name.trim_start_matches("SIG") {
        "KILL" => Signal::SIGKILL,
        "STOP" => Signal::SIGSTOP,
        "CONT" => Signal::SIGCONT,
        "TERM" => Signal::SIGTERM,
        "INT" => Signal::SIGINT,
        other => bail!("unsupported signal {other:?} (KILL, STOP, CONT, TERM, INT)"),
    })
}

/// The container id without a runtime prefix (`containerd://`, `docker://`, `cri-o://`).
fn bare_id(id: &str) -> &str {
    id.rsplit("://").next().unwrap_or(id)
}

/// Pids whose cgroup path names the container.
fn pids_of(proc_root: &Path, container: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))
                .is_ok_and(|cg| cg.contains(container))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Signals every process of each container; the processes of all containers are found before
/// the first signal, so several replicas fail at (nearly) the same instant.
fn signal(name: &str, containers: &[&str]) -> anyhow::Result<()> {
    let sig = parse_signal(name)?;
    let mut targets = Vec::new();
    for container in containers {
        let id = bare_id(container);
        if id.len() < 12 {
            bail!("container id {id:?} is too short to identify one container");
        }
        let pids = pids_of(Path::new("/proc"), id);
        if pids.is_empty() {
            bail!("no process of container {id} is visible (is this pod running with hostPID?)");
        }
        targets.push((id, pids));
    }
    for (_, pids) in &targets {
        for pid in pids {
            kill(Pid::from_raw(*pid), sig).with_context(|| format!("sending {sig} to pid {pid}"))?;
        }
    }
    for (id, pids) in &targets {
        println!("sent {sig} to {} process(es) of container {id}: {pids:?}", pids.len());
    }
    Ok(())
}

/// Signals the processes (other than this one) whose command line contains `pattern`.
fn pkill(name: &str, pattern: &str) -> anyhow::Result<()> {
    let sig = parse_signal(name)?;
    let me = std::process::id() as i32;
    let mut hit = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Some(pid) = entry.ok().and_then(|e| e.file_name().to_str()?.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != me && cmdline.contains(pattern) {
            kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to pid {pid}"))?;
            hit.push(pid);
        }
    }
    if hit.is_empty() {
        bail!("no process matches {pattern:?}");
    }
    println!("sent {sig} to {hit:?}");
    Ok(())
}

/// Calls the replica at `endpoint` three ways and prints one line each, for the suite to
/// check on a real cluster what `client/tests/tls.rs` checks locally:
///
/// - `client-status: ok` — admin `Status` with the client certificate of LOCKSTEP_TLS_*;
/// - `client-seal: <code>: <message>` — admin `Seal` with that certificate (must be refused);
/// - `stranger-status: <outcome>` — `Status` with a certificate from a CA made here, trusting
///   the cluster's CA (so only the replica can refuse it).
fn tls_probe(endpoint: &str) -> anyhow::Result<()> {
    use lockstep::{PeerIdentity, Role, Transport};
    let file = |var: &str| -> anyhow::Result<std::path::PathBuf> {
        Ok(std::env::var(var).with_context(|| format!("{var} is not set"))?.into())
    };
    let ca = file("LOCKSTEP_TLS_CA")?;
    let client = Transport::load(&ca, &file("LOCKSTEP_TLS_CERT")?, &file("LOCKSTEP_TLS_KEY")?)?;
    let stranger_ca = lockstep::pki::Ca::generate("stranger")?;
    let leaf = stranger_ca.issue(&PeerIdentity::new(Role::Admin, "stranger"), &[])?;
    let stranger = Transport::from_pem(
        std::fs::read(&ca)?,
        leaf.cert.into_bytes(),
        leaf.key.into_bytes(),
        "a stranger's certificate".into(),
    )?;
    let timeout = std::time::Duration::from_secs(10);
    let outcome = |r: Result<lockstep_proto::StatusResponse, String>| match r {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("refused: {e}"),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            println!(
                "client-status: {}",
                outcome(lockstep::status_of(&client, endpoint, timeout).await)
            );
            let channel = lockstep::cluster_channel(&client, endpoint)?;
            let mut admin = lockstep_proto::admin_client::AdminClient::new(channel);
            match admin.seal(lockstep_proto::SealRequest { at_index: 0 }).await {
                Ok(r) => println!("client-seal: sealed at {}", r.into_inner().index),
                Err(s) => println!("client-seal: {:?}: {}", s.code(), s.message()),
            }
            let r = lockstep::status_of(&stranger, endpoint, timeout).await;
            println!("stranger-status: {}", outcome(r));
            anyhow::Ok(())
        })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["signal", sig, containers @ ..] if !containers.is_empty() => signal(sig, containers),
        ["pkill", sig, pattern] => pkill(sig, pattern),
        ["cat", file] => {
            use std::io::Write;
            let bytes = std::fs::read(file).with_context(|| format!("reading {file}"))?;
            std::io::stdout().write_all(&bytes).context("writing to stdout")
        }
        // A program run as a client without a certificate would be (LOCKSTEP_TLS_* unset),
        // to see the replicas refuse it; its exit status is ours.
        ["without-tls", program, rest @ ..] => {
            let status = std::process::Command::new(program)
                .args(rest)
                .env_remove("LOCKSTEP_TLS_CA")
                .env_remove("LOCKSTEP_TLS_CERT")
                .env_remove("LOCKSTEP_TLS_KEY")
                .status()
                .with_context(|| format!("running {program}"))?;
            std::process::exit(status.code().unwrap_or(1))
        }
        ["tls-probe", endpoint] => tls_probe(endpoint),
        ["idle"] => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => Err(usage()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_processes_by_container_id_in_their_cgroup() {
        let root = tempfile::tempdir().expect("tempdir");
        let id = "4cc92d2364ffc51ec7e787fb2f22e7227748cfadcfe17ade95c5d4ac9477abba";
        for (pid, cgroup) in [
            (10, format!("1:cpu:/kubepods/besteffort/pod0a/{id}\n")),
            (11, "1:cpu:/kubepods/besteffort/pod0a/other\n".to_string()),
            (12, format!("0::/system.slice/cri-containerd-{id}.scope\n")),
        ] {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("cgroup"), cgroup).expect("cgroup");
        }
        std::fs::create_dir_all(root.path().join("self")).expect("non-pid entry");
        assert_eq!(
            pids_of(root.path(), bare_id(&format!("containerd://{id}"))),
            vec![10, 12]
        );
        assert!(pids_of(root.path(), "deadbeefdeadbeef").is_empty());
        assert!(parse_signal("SIGKILL").is_ok() && parse_signal("HUP").is_err());
    }
}
