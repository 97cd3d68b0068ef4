//! The storage writer: the one owner of the [`Storage`], fed in order through a queue.
//! Whoever writes takes every queued operation, writes them, and makes them durable with ONE
//! fsync per batch (group commit), then wakes anyone waiting on a barrier and reports progress.
//!
//! The storage thread writes what is queued. A backup's replication connection may instead
//! write its own Appends on the spot ([`WriterHandle::write_here`]): that saves the two
//! hand-offs to the storage thread and back on the critical path of every write
//! (docs/storage.md, "Who writes"). Both take the disk lock and then the whole queue, so
//! operations reach the disk in the order they were queued, whoever writes them.
//!
//! A disk error is fatal: the replica halts (fail-stop) rather than acknowledge writes it may
//! not hold.

use crate::storage::Storage;
use lockstep_proto::{Configuration, LogEntry, Snapshot};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::oneshot;

pub enum StorageOp {
    Append(Vec<LogEntry>),
    Truncate(u64),
    Config(Configuration),
    Snapshot(Snapshot),
    Install(Snapshot),
    /// Answered once every earlier op is durable.
    Barrier(oneshot::Sender<()>),
}

/// Progress report after each durable batch: the last durable index, entries written, and
/// when the batch's write + fsync began. Called with the disk lock held (so in order), never
/// with the node lock held.
pub type OnDurable = Box<dyn Fn(u64, usize, Instant) + Send>;

struct Writer {
    queue: Mutex<Queue>,
    /// Signalled when operations are queued for the storage thread, or the last handle is gone.
    queued: Condvar,
    disk: Mutex<Disk>,
}

#[derive(Default)]
struct Queue {
    ops: Vec<StorageOp>,
    closed: bool,
}

struct Disk {
    storage: Storage,
    on_durable: OnDurable,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone)]
pub struct WriterHandle {
    writer: Arc<Writer>,
    /// Dropped with the last handle: the storage thread then writes what is left and ends.
    _open: Arc<Open>,
}

struct Open(Arc<Writer>);

impl Drop for Open {
    fn drop(&mut self) {
        lock(&self.0.queue).closed = true;
        self.0.queued.notify_one();
    }
}

impl WriterHandle {
    /// Queue `op` for the storage thread (every client write on a primary comes this way).
    pub fn send(&self, op: StorageOp) {
        lock(&self.writer.queue).ops.push(op);
        self.writer.queued.notify_one();
    }

    /// Queue `ops` for the storage thread.
    pub fn send_all(&self, ops: Vec<StorageOp>) {
        if ops.is_empty() {
            return;
        }
        lock(&self.writer.queue).ops.extend(ops);
        self.writer.queued.notify_one();
    }

    /// Resolves when everything queued before it is durable.
    pub fn barrier(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.send(StorageOp::Barrier(tx));
        rx
    }

    /// Queue `ops` without waking the storage thread: the caller makes them durable itself,
    /// with [`Self::write_here`], once it has let go of the node lock.
    pub fn queue_for_here(&self, ops: Vec<StorageOp>) {
        lock(&self.writer.queue).ops.extend(ops);
    }

    /// Write everything queued and make it durable on this thread (blocking). On return, every
    /// operation queued before the call is durable: written here, or by the storage thread,
    /// which holds the disk lock until its batch is. Never call it holding the node lock (the
    /// progress report takes it).
    pub fn write_here(&self) {
        self.writer.write_queued();
    }
}

/// Whether the calling task may block its thread on an fsync ([`WriterHandle::write_here`]):
/// only on a multi-threaded runtime with another worker to run everything else meanwhile.
pub fn may_write_here() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|h| {
        h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread && h.metrics().num_workers() >= 2
    })
}

fn fatal(msg: &str) -> ! {
    tracing::error!("{msg}: halting this replica (fail-stop)");
    eprintln!("lockstep-replica: fatal storage error: {msg}; halting (fail-stop)");
    std::process::exit(70);
}

impl Writer {
    /// Take the disk, then every queued operation, and make them durable.
    fn write_queued(&self) {
        let mut disk = lock(&self.disk);
        let batch = std::mem::take(&mut lock(&self.queue).ops);
        if !batch.is_empty() {
            disk.write(batch);
        }
    }

    /// The storage thread: write what is queued until the last handle is gone.
    fn run(&self) {
        loop {
            {
                let mut queue = lock(&self.queue);
                while queue.ops.is_empty() && !queue.closed {
                    queue = self.queued.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                if queue.ops.is_empty() {
                    return;
                }
            }
            self.write_queued();
        }
    }
}

impl Disk {
    /// Write `batch` in order with one fsync, answer its barriers, then report progress.
    fn write(&mut self, batch: Vec<StorageOp>) {
        let storage = &mut self.storage;
        let started = Instant::now();
        let mut written = 0usize;
        let mut dirty = false;
        let mut barriers = Vec::new();
        for op in batch {
            let result = match op {
                StorageOp::Append(entries) => {
                    written += entries.len();
                    dirty = true;
                    storage.append(&entries)
                }
                StorageOp::Truncate(index) => storage.truncate_after(index),
                StorageOp::Config(c) => storage.save_config(&c),
                StorageOp::Snapshot(s) => {
                    // Entries after the snapshot must be durable before older
                    // segments are compacted away.
                    let r = if dirty { storage.sync() } else { Ok(()) };
                    dirty = false;
                    r.and_then(|_| storage.save_snapshot(&s))
                }
                StorageOp::Install(s) => storage.install_snapshot(&s),
                StorageOp::Barrier(tx) => {
                    barriers.push(tx);
                    Ok(())
                }
            };
            if let Err(e) = result {
                fatal(&format!("{e}"));
            }
        }
        if dirty && let Err(e) = storage.sync() {
            fatal(&format!("{e}"));
        }
        // Barriers first: a backup's acknowledgement waits on one, and it needs only the
        // fsync, not the progress report (which takes the node lock and applies).
        for b in barriers {
            let _ = b.send(());
        }
        (self.on_durable)(storage.last_index(), written, started);
    }
}

pub fn spawn(storage: Storage, on_durable: OnDurable) -> WriterHandle {
    let writer = Arc::new(Writer {
        queue: Mutex::new(Queue::default()),
        queued: Condvar::new(),
        disk: Mutex::new(Disk { storage, on_durable }),
    });
    let thread = writer.clone();
    std::thread::Builder::new()
        .name("lockstep-storage".into())
        .spawn(move || thread.run())
        .unwrap_or_else(|e| fatal(&format!("cannot start the storage thread: {e}")));
    WriterHandle {
        _open: Arc::new(Open(writer.clone())),
        writer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageOptions;
    use lockstep_proto::{Command, log_entry};
    use std::time::Duration;

    fn entries(from: u64, to: u64) -> Vec<LogEntry> {
        (from..=to)
            .map(|index| LogEntry {
                index,
                epoch: 1,
                body: Some(log_entry::Body::Command(Command {
                    client_id: "c".into(),
                    sequence: index,
                    payload: vec![index as u8; 16],
                })),
            })
            .collect()
    }

    /// A writer on a fresh data dir whose progress reports (the durable index) are recorded.
    fn writer(dir: &std::path::Path) -> (WriterHandle, Arc<Mutex<Vec<u64>>>) {
        let (storage, _) = Storage::open(dir, StorageOptions::default()).expect("open");
        let reported = Arc::new(Mutex::new(Vec::new()));
        let r = reported.clone();
        let handle = spawn(storage, Box::new(move |durable, _, _| lock(&r).push(durable)));
        (handle, reported)
    }

    /// Once the storage thread is gone (the lock is free), what the data dir holds.
    fn reopened(dir: &std::path::Path) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Storage::open(dir, StorageOptions::default()) {
                Ok((_, recovered)) => return recovered.entries.iter().map(|e| e.index).collect(),
                Err(e) if Instant::now() > deadline => panic!("the storage thread kept the lock: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    #[test]
    fn writes_queued_for_the_thread_and_for_here_reach_the_disk_in_queue_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (handle, reported) = writer(tmp.path());
        for i in 0..50u64 {
            // Entries must continue the log: any reordering between the two writers would
            // be refused by the storage and halt the process.
            handle.send(StorageOp::Append(entries(4 * i + 1, 4 * i + 2)));
            handle.queue_for_here(vec![StorageOp::Append(entries(4 * i + 3, 4 * i + 4))]);
            handle.write_here();
            // Durable on return, whoever wrote it: the progress report already said so.
            assert_eq!(lock(&reported).last().copied(), Some(4 * i + 4));
        }
        let reports = lock(&reported).clone();
        assert!(
            reports.windows(2).all(|w| w[0] < w[1]),
            "reports out of order: {reports:?}"
        );
        drop(handle);
        assert_eq!(reopened(tmp.path()), (1..=200).collect::<Vec<_>>());
    }

    #[test]
    fn the_last_handle_gone_the_thread_writes_what_is_left_and_lets_go_of_the_data_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (handle, _) = writer(tmp.path());
        let other = handle.clone();
        handle.send_all(vec![StorageOp::Append(entries(1, 3)), StorageOp::Append(entries(4, 5))]);
        drop(handle);
        let barrier = other.barrier();
        drop(other);
        barrier.blocking_recv().expect("the barrier is answered");
        assert_eq!(reopened(tmp.path()), vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_may_write_here_only_beside_another_worker() {
        assert!(may_write_here());
        let single = tokio::task::spawn_blocking(|| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
                .block_on(async { may_write_here() })
        });
        assert!(!single.await.expect("join"));
        assert!(!std::thread::spawn(may_write_here).join().expect("join"));
    }
}
