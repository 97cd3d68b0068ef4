//! The storage thread: the one owner of the [`Storage`], fed in order through a channel.
//! It drains every queued operation, writes them, and makes them durable with ONE fsync per
//! batch (group commit), then wakes anyone waiting on a barrier and reports progress.
//! A disk error is fatal: the replica halts (fail-stop) rather than acknowledge writes it may
//! not hold.

use crate::storage::Storage;
use lockstep_proto::{Configuration, LogEntry, Snapshot};
use std::sync::mpsc;
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

#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<StorageOp>,
}

impl WriterHandle {
    pub fn send(&self, op: StorageOp) {
        if self.tx.send(op).is_err() {
            fatal("the storage thread is gone");
        }
    }

    pub fn send_all(&self, ops: Vec<StorageOp>) {
        for op in ops {
            self.send(op);
        }
    }

    /// Resolves when everything queued before it is durable.
    pub fn barrier(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.send(StorageOp::Barrier(tx));
        rx
    }
}

fn fatal(msg: &str) -> ! {
    tracing::error!("{msg}: halting this replica (fail-stop)");
    eprintln!("lockstep-replica: fatal storage error: {msg}; halting (fail-stop)");
    std::process::exit(70);
}

/// Progress report after each durable batch: the last durable index, entries written, and
/// when the batch's write + fsync began.
pub type OnDurable = Box<dyn Fn(u64, usize, Instant) + Send>;

pub fn spawn(mut storage: Storage, on_durable: OnDurable) -> WriterHandle {
    let (tx, rx) = mpsc::channel::<StorageOp>();
    std::thread::Builder::new()
        .name("lockstep-storage".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while let Ok(op) = rx.try_recv() {
                    batch.push(op);
                }
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
                // Barriers first: a backup's acknowledgement waits on one, and it needs only
                // the fsync, not the progress report (which takes the node lock and applies).
                for b in barriers {
                    let _ = b.send(());
                }
                on_durable(storage.last_index(), written, started);
            }
        })
        .unwrap_or_else(|e| fatal(&format!("cannot start the storage thread: {e}")));
    WriterHandle { tx }
}
