//! Many callers, one signed stream: commands that wait at the same moment go out as one
//! `CommandBatch` item (docs/byzantine.md, "Batching a process's commands").
//!
//! A Byzantine item costs every replica a signature check, a relay to each peer, a slot in the
//! order and a signed reply, whatever it carries; and under `LamportClock` every stream is one
//! more stream each item waits for. A process with many concurrent requests (an application
//! server, the benchmark's clients) therefore does better with one stream that carries what
//! its callers have waiting than with one stream per caller. [`ByzBatcher`] is that stream:
//! a cloneable handle; one task owns the [`ByzClient`] and, whenever its previous item was
//! answered, sends everything that arrived meanwhile (at most `max_batch` commands) as one item.
//! Queries are batched with the commands, each run at its place among them. A lone command or
//! query goes as an ordinary item.

use crate::ClientError;
use crate::byz::ByzClient;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

type Answer = oneshot::Sender<Result<Vec<u8>, ClientError>>;

enum Job {
    /// A command (`false`) or a read-only query (`true`).
    Run(Vec<u8>, bool, Answer),
    Close(oneshot::Sender<()>),
}

/// A handle to streams that batch their callers' commands. Clones share the streams.
#[derive(Clone)]
pub struct ByzBatcher {
    jobs: mpsc::UnboundedSender<Job>,
    streams: usize,
}

type Jobs = Arc<Mutex<mpsc::UnboundedReceiver<Job>>>;

impl ByzBatcher {
    /// Take over `clients`, one stream each (opened on first use), and batch at most
    /// `max_batch` requests per item. Each stream has one item in flight; the next free
    /// stream takes everything waiting.
    pub fn spawn(clients: Vec<ByzClient>, max_batch: usize) -> ByzBatcher {
        let (jobs, rx) = mpsc::unbounded_channel();
        let rx: Jobs = Arc::new(Mutex::new(rx));
        let streams = clients.len();
        for client in clients {
            tokio::spawn(run(client, rx.clone(), max_batch.max(1)));
        }
        ByzBatcher { jobs, streams }
    }

    /// Run a command, batched with whatever else waits; its voted output.
    pub async fn execute(&self, payload: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        self.submit(|tx| Job::Run(payload, false, tx)).await
    }

    /// Run a read-only query, batched with whatever else waits; its voted output.
    pub async fn query(&self, payload: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        self.submit(|tx| Job::Run(payload, true, tx)).await
    }

    async fn submit(&self, job: impl FnOnce(Answer) -> Job) -> Result<Vec<u8>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(job(tx))
            .map_err(|_| ClientError::Rejected("the batching stream is closed".into()))?;
        rx.await
            .map_err(|_| ClientError::Unknown("the batching stream ended before answering".into()))?
    }

    /// Close the streams once the jobs sent before this ran (the replicas stop waiting for
    /// them).
    pub async fn close(&self) {
        let mut acks = Vec::with_capacity(self.streams);
        for _ in 0..self.streams {
            let (tx, rx) = oneshot::channel();
            if self.jobs.send(Job::Close(tx)).is_ok() {
                acks.push(rx);
            }
        }
        for rx in acks {
            let _ = rx.await;
        }
    }
}

/// A batch stops growing once its payloads reach this: the item, its relays and the reply
/// (whose outputs can be as large as the payloads: a put answers with the previous value)
/// stay far below the largest gRPC message.
const MAX_BATCH_BYTES: usize = lockstep_proto::MAX_MESSAGE_BYTES / 16;

/// One caller's request: payload, read-only, where its answer goes.
type Request = (Vec<u8>, bool, Answer);

/// The next batch: the first request waiting, then everything else already waiting, up to
/// `max_batch`; and a close, if one came first or among them (this stream then closes after
/// its batch). `None` when every handle is gone.
async fn next_batch(jobs: &Jobs, max_batch: usize) -> Option<(Vec<Request>, Option<oneshot::Sender<()>>)> {
    let mut rx = jobs.lock().await;
    let mut batch = match rx.recv().await? {
        Job::Close(done) => return Some((Vec::new(), Some(done))),
        Job::Run(payload, read_only, answer) => vec![(payload, read_only, answer)],
    };
    // The callers answered by the previous item are being woken right now, each about to queue
    // its next request: let them run first. Without this the stream took the first request
    // alone, and the rest waited a whole round trip for the next item (measured: one stream,
    // 64 writers, 2697 -> 4260 ops/s, p50 23.4 -> 13.1 ms; batches of 64 instead of
    // alternating large and small).
    tokio::task::yield_now().await;
    let mut bytes = batch[0].0.len();
    while batch.len() < max_batch && bytes < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(Job::Run(payload, read_only, answer)) => {
                bytes += payload.len();
                batch.push((payload, read_only, answer));
            }
            Ok(Job::Close(done)) => return Some((batch, Some(done))),
            Err(_) => break,
        }
    }
    Some((batch, None))
}

/// Run `batch` on `client`'s stream and answer each caller.
async fn run_batch(client: &mut ByzClient, mut batch: Vec<Request>) {
    if batch.len() == 1 {
        let (payload, read_only, answer) = batch.remove(0);
        let out = if read_only {
            client.query(payload).await
        } else {
            client.execute(payload).await
        };
        let _ = answer.send(out.map(|v| v.output));
        return;
    }
    let (requests, answers): (Vec<_>, Vec<_>) = batch.into_iter().map(|(p, r, a)| ((p, r), a)).unzip();
    match client.execute_batch(requests).await {
        Ok((outputs, _)) => {
            for (a, out) in answers.into_iter().zip(outputs) {
                let _ = a.send(out);
            }
        }
        Err(e) => {
            for a in answers {
                let _ = a.send(Err(e.clone()));
            }
        }
    }
}

/// The task that owns one stream: one item in flight at a time; meanwhile the other streams
/// (or, when this is the only one, the next batch) take what arrives.
async fn run(mut client: ByzClient, jobs: Jobs, max_batch: usize) {
    while let Some((batch, close)) = next_batch(&jobs, max_batch).await {
        if !batch.is_empty() {
            run_batch(&mut client, batch).await;
        }
        if let Some(done) = close {
            client.close().await;
            let _ = done.send(());
            return;
        }
    }
    client.close().await;
}

impl crate::bench::KvBackend for ByzBatcher {
    async fn run(&mut self, op: &crate::bench::Op) -> (lockstep_linearizability::Outcome, Option<serde_json::Value>) {
        let read_only = op.kind == lockstep_linearizability::OpKind::Get;
        let result = self
            .submit(|tx| Job::Run(crate::bench::kv_payload(op), read_only, tx))
            .await;
        crate::bench::outcome(op, result.and_then(|out| crate::parse_output(&out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(jobs: Vec<Job>) -> Jobs {
        let (tx, rx) = mpsc::unbounded_channel();
        for j in jobs {
            tx.send(j).ok();
        }
        Arc::new(Mutex::new(rx))
    }

    fn run_job(bytes: usize) -> Job {
        Job::Run(vec![b'x'; bytes], false, oneshot::channel().0)
    }

    #[tokio::test]
    async fn a_batch_takes_what_waits_up_to_its_count() {
        let jobs = queue((0..10).map(|_| run_job(10)).collect());
        let (batch, close) = next_batch(&jobs, 4).await.expect("a batch");
        assert_eq!((batch.len(), close.is_none()), (4, true));
        let (batch, _) = next_batch(&jobs, 100).await.expect("the rest");
        assert_eq!(batch.len(), 6);
    }

    #[tokio::test]
    async fn a_batch_stops_growing_once_its_payloads_pass_the_byte_budget() {
        let big = MAX_BATCH_BYTES / 2 + 1;
        let jobs = queue(vec![
            run_job(big),
            run_job(big),
            run_job(1),
            run_job(MAX_BATCH_BYTES * 2),
        ]);
        let (batch, _) = next_batch(&jobs, 100).await.expect("a batch");
        assert_eq!(
            batch.len(),
            2,
            "the second request takes it over the budget: nothing more"
        );
        let (batch, _) = next_batch(&jobs, 100).await.expect("a batch");
        assert_eq!(batch.len(), 2, "a small one and then one over the budget alone");
        let jobs = queue(vec![run_job(MAX_BATCH_BYTES * 2), run_job(1)]);
        let (batch, _) = next_batch(&jobs, 100).await.expect("a batch");
        assert_eq!(batch.len(), 1, "a request over the budget goes alone");
    }

    #[tokio::test]
    async fn a_close_ends_the_batch_it_was_queued_behind() {
        let (done, _) = oneshot::channel();
        let jobs = queue(vec![run_job(1), run_job(1), Job::Close(done), run_job(1)]);
        let (batch, close) = next_batch(&jobs, 100).await.expect("a batch");
        assert_eq!((batch.len(), close.is_some()), (2, true));
    }
}
