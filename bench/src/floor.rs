//! The physical floor of one durable replicated write on this machine, measured in the same
//! run as the benchmark (issue 9): the p50 of a loopback TCP round trip and of a 256-byte
//! append followed by `fdatasync` on the data directory's disk. A t = 1 write needs at least
//! client → primary → backup round trips (2) and one fsync (primary and backup fsync in
//! parallel), so `floor = 2 × rtt + fdatasync`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

#[derive(serde::Serialize, Debug, Clone)]
pub struct Floor {
    pub loopback_rtt_p50_us: f64,
    pub fdatasync_256b_p50_us: f64,
    /// 2 × rtt + fdatasync.
    pub write_floor_us: f64,
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// p50 of `samples` 64-byte ping-pongs over a loopback TCP connection (Nagle off).
pub fn loopback_rtt_us(samples: usize) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
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
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = [7u8; 64];
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let start = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        if i >= samples / 10 {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(c);
    let _ = echo.join();
    Ok(p50(times))
}

/// p50 of `samples` appends of 256 bytes, each followed by `fdatasync`, to a file in `dir`.
pub fn fdatasync_us(dir: &Path, samples: usize) -> anyhow::Result<f64> {
    let path = dir.join("floor-fdatasync.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let record = [0x5au8; 256];
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let start = Instant::now();
        f.write_all(&record)?;
        f.sync_data()?;
        if i >= samples / 10 {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(p50(times))
}

pub fn measure(dir: &Path) -> anyhow::Result<Floor> {
    let rtt = loopback_rtt_us(2000)?;
    let fsync = fdatasync_us(dir, 300)?;
    Ok(Floor {
        loopback_rtt_p50_us: rtt,
        fdatasync_256b_p50_us: fsync,
        write_floor_us: 2.0 * rtt + fsync,
    })
}
