//! Child processes that are always cleaned up, process memory, Prometheus scraping.

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A child process that is stopped when the guard is dropped (also on error and on panic):
/// `stop_signal`, then SIGKILL after `grace`. The child also gets SIGTERM if this process dies
/// without running destructors (PR_SET_PDEATHSIG), and runs in its own process group so a
/// Ctrl-C in the terminal reaches only the benchmark, which then stops it in order.
pub struct ChildGuard {
    pub name: String,
    child: Option<Child>,
    stop_signal: Signal,
    grace: Duration,
}

impl ChildGuard {
    /// Spawn `cmd`. Call from the thread that lives as long as the benchmark (the main
    /// thread): PDEATHSIG fires when the spawning *thread* exits.
    pub fn spawn(name: &str, cmd: &mut Command, stop_signal: Signal, grace: Duration) -> anyhow::Result<ChildGuard> {
        cmd.process_group(0);
        // SAFETY: only an async-signal-safe prctl between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
            stop_signal,
            grace,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(description)` if the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut()?.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait: {e}")),
        }
    }

    /// Stop it (signal, wait up to the grace period, then SIGKILL). Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // The signal is repeated every second: a tokio program that re-creates its
        // `ctrl_c()` future in a loop can miss one that arrives between two polls.
        let pid = Pid::from_raw(child.id() as i32);
        let deadline = Instant::now() + self.grace;
        let mut next_signal = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_signal {
                let _ = kill(pid, self.stop_signal);
                next_signal += Duration::from_secs(1);
            }
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: {} did not stop within {:?}; killing it", self.name, self.grace);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Resident set size of a process in bytes (VmRSS from /proc/PID/status).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a local benchmark).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// GET `path` over plain HTTP/1.1 (loopback /metrics endpoints only), with a timeout.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .context("metrics request timed out")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "GET {path}: {}",
        head.lines().next().unwrap_or("")
    );
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sum of every sample of metric `name` (all label sets) in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?.trim();
            (metric == name).then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_metric_samples_across_labels() {
        let text = "# HELP x y\nfoo_count 3\nfoo_sum 1.5\nfoo_bucket{le=\"1\"} 2\nfoo{a=\"b\"} 2\nfoo{a=\"c\"} 5\n";
        assert_eq!(metric_sum(text, "foo_count"), 3.0);
        assert_eq!(metric_sum(text, "foo"), 7.0);
        assert_eq!(metric_sum(text, "bar"), 0.0);
    }

    #[test]
    fn dechunks_bodies() {
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "hello world");
    }
}
