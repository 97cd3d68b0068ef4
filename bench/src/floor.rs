//! The physical floor of one durable replicated write on this machine, measured in the same
//! run as the benchmark (issue 9): the p50 of a loopback TCP round trip and of a 256-byte
//! append followed by `fdatasync` on the data directory's disk. A t = 1 write needs at least
//! client → primary → backup round trips (2) and one fsync (primary and backup fsync in
//! parallel), so `floor = 2 × rtt + fdatasync`.
//!
//! The round trip is measured with its two ends pinned to two different CPUs: a hop from one
//! process to another wakes the receiver, as a packet from the network does. With both ends
//! on one CPU it is a context switch instead, and on a virtual machine three times cheaper
//! (a halted virtual CPU is not woken); that one is reported too, as a lower bound
//! (`write_floor_one_cpu_us`). Left to the kernel, the placement, and so the round trip,
//! changes from one measurement to the next (docs/benchmarks.md).
//!
//! That floor counts one fdatasync alone on the disk. Locally both replicas fsync the same
//! disk at the same moment, so the run also measures a **model write**: the same protocol
//! with no software around it (three threads, plain loopback TCP, a record appended and
//! fdatasynced on two files of the data directory's disk at once). It is what this machine
//! allows a local t = 1 cluster, and the distance to it is ours to remove.
//!
//! Some disks (this project's virtual test machines) answer an fdatasync that follows a pause
//! three times slower than one that follows another fsync at once, so the run also measures
//! the fdatasync after 1 ms of idleness: one client's writes always leave the disk idle in
//! between (the network, the other replica, the client itself).

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(serde::Serialize, Debug, Clone)]
pub struct Floor {
    /// Across two CPUs (on one when the process may use only one).
    pub loopback_rtt_p50_us: f64,
    /// Both ends on one CPU.
    pub loopback_rtt_one_cpu_p50_us: f64,
    pub fdatasync_256b_p50_us: f64,
    /// 2 × rtt + fdatasync.
    pub write_floor_us: f64,
    /// 2 × rtt on one CPU + fdatasync: a lower bound.
    pub write_floor_one_cpu_us: f64,
    /// p50 of the same append + fdatasync when the disk was idle for 1 ms before each: what a
    /// writer that cannot keep the disk busy (one client, closed loop) pays per fsync.
    pub fdatasync_after_idle_p50_us: f64,
    /// p50 of the model write: client → primary (which forwards to the backup and appends +
    /// fdatasyncs its own file) → the backup's append + fdatasync and ack → reply.
    pub model_write_p50_us: f64,
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// p50 in µs of `samples` runs of `op` (after `samples / 10` unrecorded warm-up runs), each
/// after an untimed `pause`.
fn p50_of(samples: usize, mut pause: impl FnMut(), mut op: impl FnMut() -> std::io::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        pause();
        let start = Instant::now();
        op()?;
        if i >= samples / 10 {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(p50(times))
}

/// The CPUs this process may run on.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

/// Keep the calling thread on `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

/// p50 of `samples` 64-byte ping-pongs over a loopback TCP connection (Nagle off), the echo
/// on `cpus.0` and the caller on `cpus.1` (each in a thread of its own: this thread keeps its
/// CPUs).
pub fn loopback_rtt_us(samples: usize, cpus: (usize, usize)) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        pin_to(cpus.0)?;
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            if s.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            s.write_all(&buf)?;
        }
    });
    let caller = std::thread::spawn(move || -> anyhow::Result<f64> {
        pin_to(cpus.1)?;
        let mut c = TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        let mut buf = [7u8; 64];
        p50_of(
            samples,
            || {},
            || {
                c.write_all(&buf)?;
                c.read_exact(&mut buf)
            },
        )
    });
    let rtt = caller
        .join()
        .map_err(|_| anyhow::anyhow!("the round-trip thread panicked"))?;
    let _ = echo.join();
    rtt
}

/// A new empty file `name` in `dir`; with `reserve`, its space reserved ahead as the
/// replica's WAL reserves it (an append then does not grow the file).
fn new_log(dir: &Path, name: &str, reserve: bool) -> anyhow::Result<(File, PathBuf)> {
    let path = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    if reserve {
        nix::fcntl::posix_fallocate(&f, 0, 16 << 20)?;
        f.sync_all()?;
    }
    Ok((f, path))
}

/// Appends `record` to `log` and makes it durable, as a WAL append does.
fn append_durably(log: &mut File, record: &[u8]) -> std::io::Result<()> {
    log.write_all(record)?;
    log.sync_data()
}

/// Appends each `RECORD`-byte request read from `peer` to `log` and fdatasyncs it; then
/// answers one byte on `peer`. Returns when `peer` closes.
fn backup_loop(mut peer: TcpStream, mut log: File) -> anyhow::Result<()> {
    let mut record = [0u8; RECORD];
    while peer.read_exact(&mut record).is_ok() {
        append_durably(&mut log, &record)?;
        peer.write_all(&[1])?;
    }
    Ok(())
}

/// Forwards each request from `client` to `backup`, appends it to `log` and fdatasyncs,
/// waits for the backup's ack, then answers the client.
fn primary_loop(mut client: TcpStream, mut backup: TcpStream, mut log: File) -> anyhow::Result<()> {
    let mut record = [0u8; RECORD];
    let mut ack = [0u8; 1];
    while client.read_exact(&mut record).is_ok() {
        backup.write_all(&record)?;
        append_durably(&mut log, &record)?;
        backup.read_exact(&mut ack)?;
        client.write_all(&ack)?;
    }
    Ok(())
}

const RECORD: usize = 256;

/// A connected loopback pair with Nagle off on both ends.
fn socket_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(listener.local_addr()?)?;
    let (b, _) = listener.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

/// p50 of `samples` model writes (see the module comment), on two files in `dir`.
pub fn model_write_us(dir: &Path, samples: usize) -> anyhow::Result<f64> {
    let (primary_log, primary_path) = new_log(dir, "floor-model-primary.tmp", true)?;
    let (backup_log, backup_path) = new_log(dir, "floor-model-backup.tmp", true)?;
    let (to_backup, at_backup) = socket_pair()?;
    let (mut client, at_primary) = socket_pair()?;
    let backup = std::thread::spawn(move || backup_loop(at_backup, backup_log));
    let primary = std::thread::spawn(move || primary_loop(at_primary, to_backup, primary_log));
    let mut ack = [0u8; 1];
    let write = p50_of(
        samples,
        || {},
        || {
            client.write_all(&[0x5au8; RECORD])?;
            client.read_exact(&mut ack)
        },
    );
    drop(client);
    for done in [primary.join(), backup.join()] {
        done.map_err(|_| anyhow::anyhow!("a model-write thread panicked"))??;
    }
    std::fs::remove_file(primary_path)?;
    std::fs::remove_file(backup_path)?;
    write
}

/// p50 of `samples` appends of 256 bytes, each followed by `fdatasync`, to a file in `dir`,
/// with `idle` of nothing before each (none: back to back).
pub fn fdatasync_us(dir: &Path, samples: usize, idle: Duration) -> anyhow::Result<f64> {
    let (mut f, path) = new_log(dir, "floor-fdatasync.tmp", false)?;
    let pause = || {
        if !idle.is_zero() {
            std::thread::sleep(idle);
        }
    };
    let fsync = p50_of(samples, pause, || append_durably(&mut f, &[0x5au8; 256]));
    drop(f);
    std::fs::remove_file(&path)?;
    fsync
}

pub fn measure(dir: &Path) -> anyhow::Result<Floor> {
    let cpus = allowed_cpus()?;
    let first = *cpus.first().ok_or_else(|| anyhow::anyhow!("no CPU to run on"))?;
    let other = cpus.get(1).copied().unwrap_or(first);
    let rtt_one_cpu = loopback_rtt_us(2000, (first, first))?;
    // With one CPU to run on, "across two CPUs" is the same measurement.
    let rtt = if other == first {
        rtt_one_cpu
    } else {
        loopback_rtt_us(2000, (first, other))?
    };
    let fsync = fdatasync_us(dir, 300, Duration::ZERO)?;
    let after_idle = fdatasync_us(dir, 300, Duration::from_millis(1))?;
    let model = model_write_us(dir, 300)?;
    Ok(Floor {
        loopback_rtt_p50_us: rtt,
        loopback_rtt_one_cpu_p50_us: rtt_one_cpu,
        fdatasync_256b_p50_us: fsync,
        fdatasync_after_idle_p50_us: after_idle,
        write_floor_us: 2.0 * rtt + fsync,
        write_floor_one_cpu_us: 2.0 * rtt_one_cpu + fsync,
        model_write_p50_us: model,
    })
}
