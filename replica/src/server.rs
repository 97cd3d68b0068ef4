//! The gRPC services (client, peer, admin) of one replica: thin adapters from requests to
//! [`Node`](crate::node::Node) calls plus the waiting that follows.

use crate::node::{Role, Shared, failed_precondition, unknown_outcome};
use crate::stages::Stage;
use futures::StreamExt as _;
use lockstep_proto::{
    AppendRequest, AppendResponse, AppliedEntry, ExecuteRequest, ExecuteResponse, InstallSnapshotRequest, ReadRequest,
    ReadResponse, ReconfigureRequest, ReconfigureResponse, ResumeRequest, ResumeResponse, SealRequest, SealResponse,
    SessionError, SessionRequest, SessionResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
    WatchRequest, admin_server::Admin, client_server::Client, peer_server::Peer,
};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How long a command waits to commit before the client is told the outcome is unknown.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests of one client session handled at once; the session reads no further request
/// until one of them is answered.
const SESSION_IN_FLIGHT: usize = 256;

#[derive(Clone)]
pub struct Services {
    pub shared: Arc<Shared>,
}

impl Services {
    async fn execute_inner(&self, request: ExecuteRequest, received: Instant) -> Result<ExecuteResponse, Status> {
        let command = request
            .command
            .ok_or_else(|| Status::invalid_argument("missing command"))?;
        let (tx, rx) = oneshot::channel();
        let proposed = {
            let mut node = self.shared.lock();
            // Queue for the disk while holding the lock: the log reaches the storage thread
            // in index order.
            node.propose(command, tx).map(|entries| {
                // The index of the new entry, whose stages are timed (none for a retry answered
                // from the session).
                let ordered = entries.first().map(|e| e.index);
                if let Some(index) = ordered {
                    node.stages.ordered(index, received, Instant::now());
                }
                self.enqueue(entries);
                if ordered.is_some() {
                    crate::peers::send_new_entries(&self.shared, &mut node);
                }
                ordered
            })
        };
        let ordered = match proposed {
            Ok(ordered) => ordered,
            Err(status) => {
                self.shared.metrics.count_command("rejected");
                return Err(status);
            }
        };
        self.shared.poke();
        let result = self.wait(rx, "command").await;
        self.shared
            .metrics
            .count_command(if result.is_ok() { "ok" } else { "unknown" });
        let (index, output) = result?;
        let epoch = {
            let mut node = self.shared.lock();
            if ordered == Some(index) {
                node.stages.replied(index, Instant::now(), &self.shared.metrics);
            }
            node.epoch
        };
        Ok(ExecuteResponse {
            index,
            epoch,
            output,
            machine: Some(self.machine()),
        })
    }

    async fn read_inner(&self, request: ReadRequest) -> Result<ReadResponse, Status> {
        let (tx, rx) = oneshot::channel();
        self.shared.lock().read(request.query, tx);
        self.shared.poke();
        let result = match tokio::time::timeout(COMMIT_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            _ => Err(Status::unavailable("read not confirmed by every voter in time; retry")),
        };
        self.shared
            .metrics
            .count_read(if result.is_ok() { "ok" } else { "error" });
        result
    }

    /// An Execute (unary or from a session) that arrived at `started`, timed as a request.
    async fn execute_timed(&self, request: ExecuteRequest, started: Instant) -> Result<ExecuteResponse, Status> {
        let result = self.execute_inner(request, started).await;
        self.shared.metrics.observe_request("Execute", started.elapsed());
        result
    }

    async fn read_timed(&self, request: ReadRequest, started: Instant) -> Result<ReadResponse, Status> {
        let result = self.read_inner(request).await;
        self.shared.metrics.observe_request("Read", started.elapsed());
        result
    }

    /// The answer to one request of a client session.
    async fn session_answer(self, request: SessionRequest) -> SessionResponse {
        use lockstep_proto::{session_request::Kind as Asked, session_response::Kind as Answer};
        let started = Instant::now();
        let answer = match request.kind {
            Some(Asked::Execute(r)) => self.execute_timed(r, started).await.map(Answer::Execute),
            Some(Asked::Read(r)) => self.read_timed(r, started).await.map(Answer::Read),
            None => Err(Status::invalid_argument("a session request needs execute or read")),
        };
        SessionResponse {
            id: request.id,
            kind: Some(answer.unwrap_or_else(|status| Answer::Error(SessionError::from_status(&status)))),
        }
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<Result<T, Status>>, what: &str) -> Result<T, Status> {
        match tokio::time::timeout(COMMIT_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unknown_outcome(format!("{what} was dropped"))),
            Err(_) => Err(unknown_outcome(format!(
                "{what} not committed within {COMMIT_TIMEOUT:?}"
            ))),
        }
    }

    /// Queue `entries` for the disk. Call with the node lock held, so entries reach the
    /// storage thread in log order.
    fn enqueue(&self, entries: Vec<lockstep_proto::LogEntry>) {
        if !entries.is_empty() {
            self.shared.writer.send(crate::writer::StorageOp::Append(entries));
        }
    }

    fn machine(&self) -> lockstep_proto::MachineIdentity {
        self.shared.lock().identity.clone()
    }
}

#[tonic::async_trait]
impl Client for Services {
    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
        let started = Instant::now();
        if let Some(arrived) = request.extensions().get::<crate::stages::Arrived>() {
            self.shared
                .metrics
                .observe_stage(Stage::Receive, started.saturating_duration_since(arrived.0));
        }
        self.execute_timed(request.into_inner(), started)
            .await
            .map(Response::new)
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        self.read_timed(request.into_inner(), Instant::now())
            .await
            .map(Response::new)
    }

    type SessionStream = SessionStream;

    /// The gRPC carrier of a client session ([`Services::session_answers`]).
    async fn session(
        &self,
        request: Request<tonic::Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let inbound = futures::stream::unfold(Some(request.into_inner()), |inbound| async move {
            let mut inbound = inbound?;
            match inbound.message().await {
                Ok(Some(request)) => Some((Ok(request), Some(inbound))),
                Ok(None) => None,
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(self.session_answers(Box::pin(inbound))))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<AppliedEntry, Status>> + Send>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let from = request.into_inner().from_index;
        // Subscribe before reading the replay buffer so nothing falls between the two.
        let mut live = self.shared.applied_tx.subscribe();
        let replay = {
            let node = self.shared.lock();
            if from == 0 {
                Vec::new()
            } else {
                node.replay_from(from).ok_or_else(|| {
                    Status::out_of_range(format!(
                        "index {from} is no longer available for replay; the oldest is {}",
                        node.oldest_replayable()
                    ))
                })?
            }
        };
        let mut next = replay.last().map_or(from, |e| e.index + 1);
        let stream = async_stream(move |tx| async move {
            for e in replay {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(e) if e.index < next => continue,
                    Ok(e) => {
                        next = e.index + 1;
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell {n} entries behind; resume with from_index {next}"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a bounded channel.
fn async_stream<T, F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = T> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What the backup keeps of a replication stream: the `machine` and `config` the primary
/// sent last, for requests that leave them out.
#[derive(Default)]
struct StreamContext {
    machine: Option<lockstep_proto::MachineIdentity>,
    config: Option<lockstep_proto::Configuration>,
}

impl StreamContext {
    fn fill_in(&mut self, req: &mut AppendRequest) {
        match &req.machine {
            Some(m) => self.machine = Some(m.clone()),
            None => req.machine = self.machine.clone(),
        }
        match &req.config {
            Some(c) => self.config = Some(c.clone()),
            None => req.config = self.config.clone(),
        }
    }
}

/// An answer of the replication stream waiting for its entries to be durable.
struct PendingAnswer {
    resp: AppendResponse,
    durable: Durable,
    /// When the request arrived, for the `backup_append` stage (Appends with entries only).
    timed: Option<Instant>,
}

/// What an answer to the primary waits for.
enum Durable {
    /// Nothing was written.
    Nothing,
    /// Its writes are queued for this task to make durable ([`WriterHandle::write_here`])
    /// before it hands the answer on.
    ///
    /// [`WriterHandle::write_here`]: crate::writer::WriterHandle::write_here
    Here,
    /// The storage thread writes them; this resolves when they are durable.
    Barrier(oneshot::Receiver<()>),
}

/// At most this many requests that have already arrived share one fsync on the connection.
const GATHER: usize = 2 * crate::node::APPEND_WINDOW;

pub type ReplicateStream = Pin<Box<dyn Stream<Item = Result<AppendResponse, Status>> + Send>>;
pub type SessionStream = Pin<Box<dyn Stream<Item = Result<SessionResponse, Status>> + Send>>;

impl Services {
    /// A client session, whatever carries it (the gRPC `Client/Session` stream or the framed
    /// transport, `crate::framed`): requests are handled as they arrive, up to
    /// SESSION_IN_FLIGHT at once, and each answer goes out when it is ready, tagged with its
    /// request's id. An error from `inbound` (a message too large, undecodable) ends the
    /// session with it once the requests before it are answered.
    pub fn session_answers(
        &self,
        mut inbound: Pin<Box<dyn Stream<Item = Result<SessionRequest, Status>> + Send>>,
    ) -> SessionStream {
        self.shared.metrics.client_sessions.inc();
        let services = self.clone();
        async_stream(move |tx| async move {
            let mut running = futures::stream::FuturesUnordered::new();
            let mut reading = true;
            // Why reading stopped, when it was an error (a message too large, undecodable):
            // the session ends with it once the requests before it are answered.
            let mut failed = None;
            loop {
                tokio::select! {
                    msg = inbound.next(), if reading && running.len() < SESSION_IN_FLIGHT => match msg {
                        Some(Ok(request)) => running.push(services.clone().session_answer(request)),
                        None => reading = false,
                        Some(Err(status)) => {
                            reading = false;
                            failed = Some(status);
                        }
                    },
                    Some(answer) = running.next() => {
                        if tx.send(Ok(answer)).await.is_err() {
                            return;
                        }
                    }
                    else => break,
                }
            }
            if let Some(status) = failed {
                let _ = tx.send(Err(status)).await;
            }
        })
    }

    /// The backup side of the primary's replication stream, whatever carries it (the gRPC
    /// `Replicate` stream or the framed transport, `crate::framed`). Requests are handled in
    /// arrival order, and each answer goes out, in the same order, once its entries are
    /// durable. On a multi-threaded runtime the connection's task writes and fsyncs them
    /// itself, every request that has arrived by then in one batch; otherwise the storage
    /// thread does, and a later Append is on its way to the disk while an earlier one is
    /// fsynced. The requests end with `inbound`.
    pub fn replicate_answers(
        &self,
        mut inbound: Pin<Box<dyn Stream<Item = lockstep_proto::ReplicateRequest> + Send>>,
    ) -> ReplicateStream {
        use futures::FutureExt as _;
        let services = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<PendingAnswer>(2 * crate::node::APPEND_WINDOW);
        tokio::spawn(async move {
            let here = crate::writer::may_write_here();
            let mut context = StreamContext::default();
            let mut arrived = Vec::new();
            let mut ended = false;
            while !ended {
                match inbound.next().await {
                    Some(msg) => arrived.push(msg),
                    None => break,
                }
                // When this task fsyncs, everything that has arrived shares the fsync.
                while here && !ended && arrived.len() < GATHER {
                    match inbound.next().now_or_never() {
                        Some(Some(msg)) => arrived.push(msg),
                        Some(None) => ended = true,
                        None => break,
                    }
                }
                let mut answers = Vec::with_capacity(arrived.len());
                for msg in arrived.drain(..) {
                    let Some(pending) = services.follow_request(msg, &mut context, here) else {
                        ended = true;
                        break;
                    };
                    answers.push(pending);
                }
                if answers.iter().any(|p| matches!(p.durable, Durable::Here)) {
                    // Blocks this worker for the fsync; the others run everything else.
                    services.shared.writer.write_here();
                }
                for pending in answers {
                    if tx.send(pending).await.is_err() {
                        return;
                    }
                }
                // The task that writes the acks was just woken onto this worker, where no
                // other worker takes it from: let it run before the next fsync.
                tokio::task::yield_now().await;
            }
        });
        let shared = self.shared.clone();
        let answers = tokio_stream::wrappers::ReceiverStream::new(rx).then(move |pending| {
            let shared = shared.clone();
            async move {
                match pending.durable {
                    // The storage thread's progress report refreshes the gauges and wakes the
                    // tasks after the fsync; the answer need not wait for it.
                    Durable::Barrier(durable) => durable.await.map_err(|_| Status::internal("storage stopped"))?,
                    Durable::Here => {}
                    Durable::Nothing => shared.after_change(),
                }
                if let Some(received) = pending.timed.filter(|_| pending.resp.success) {
                    shared.metrics.observe_stage(Stage::BackupAppend, received.elapsed());
                }
                Ok(pending.resp)
            }
        });
        Box::pin(answers)
    }

    /// One request of the replication stream, handled up to its storage writes (queued for
    /// this task to make durable when `here`). None: not a request, the stream ends.
    fn follow_request(
        &self,
        msg: lockstep_proto::ReplicateRequest,
        context: &mut StreamContext,
        here: bool,
    ) -> Option<PendingAnswer> {
        use lockstep_proto::replicate_request::Kind;
        let received = Instant::now();
        match msg.kind? {
            Kind::Append(mut req) => {
                context.fill_in(&mut req);
                let timed = (!req.entries.is_empty()).then_some(received);
                let (resp, durable) = self.follow_start(here, |node| node.handle_append(req));
                // The new entries are on their way to the disk; apply what the primary says
                // is committed meanwhile, not before.
                self.apply_committed_here();
                Some(PendingAnswer { resp, durable, timed })
            }
            Kind::Install(req) => {
                let (resp, durable) = self.follow_start(here, |node| node.handle_install(req));
                Some(PendingAnswer {
                    resp,
                    durable,
                    timed: None,
                })
            }
        }
    }
}

#[tonic::async_trait]
impl Peer for Services {
    type ReplicateStream = ReplicateStream;

    /// The gRPC carrier of the replication stream ([`Services::replicate_answers`]); a request
    /// that cannot be decoded ends it.
    async fn replicate(
        &self,
        request: Request<tonic::Streaming<lockstep_proto::ReplicateRequest>>,
    ) -> Result<Response<ReplicateStream>, Status> {
        self.shared.metrics.count_peer_call("Replicate");
        let inbound = futures::stream::unfold(request.into_inner(), |mut inbound| async move {
            inbound.message().await.ok().flatten().map(|msg| (msg, inbound))
        });
        Ok(Response::new(self.replicate_answers(Box::pin(inbound))))
    }

    async fn append(&self, request: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        let received = Instant::now();
        self.shared.metrics.count_peer_call("Append");
        let req = request.into_inner();
        let carries_entries = !req.entries.is_empty();
        // The primary pipelines appends; on one HTTP/2 connection they can be handled out of
        // order. Give the earlier ones a moment to land before refusing this one for a gap.
        let mut changed = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        loop {
            {
                let node = self.shared.lock();
                if req.epoch != node.epoch || req.prev_index <= node.last_index() {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                break;
            }
        }
        let answer = self
            .follow(|node| {
                let (resp, mut ops) = node.handle_append(req);
                ops.extend(node.apply_committed(&self.shared.applied_tx));
                (resp, ops)
            })
            .await;
        if carries_entries && answer.as_ref().is_ok_and(|r| r.get_ref().success) {
            self.shared
                .metrics
                .observe_stage(Stage::BackupAppend, received.elapsed());
        }
        answer
    }

    async fn install_snapshot(
        &self,
        request: Request<InstallSnapshotRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        self.shared.metrics.count_peer_call("InstallSnapshot");
        self.follow(|node| node.handle_install(request.into_inner())).await
    }
}

impl Services {
    /// Backup side of a peer message: run `handle` under the lock, queue its storage ops in
    /// order, and answer only once they are on disk.
    async fn follow(
        &self,
        handle: impl FnOnce(&mut crate::node::Node) -> (AppendResponse, Vec<crate::writer::StorageOp>),
    ) -> Result<Response<AppendResponse>, Status> {
        let (resp, durable) = self.follow_start(false, handle);
        if let Durable::Barrier(durable) = durable {
            durable.await.map_err(|_| Status::internal("storage stopped"))?;
        }
        self.shared.after_change();
        Ok(Response::new(resp))
    }

    /// Apply what is committed (a backup: what the primary said) and queue the snapshots that
    /// asks for.
    fn apply_committed_here(&self) {
        let ops = self.shared.lock().apply_committed(&self.shared.applied_tx);
        self.shared.writer.send_all(ops);
    }

    /// The part of [`Self::follow`] under the lock: the answer, and what it waits for when it
    /// succeeded and wrote anything: the caller's own fsync (`here`) or a barrier that
    /// resolves once the storage thread made the writes durable.
    fn follow_start(
        &self,
        here: bool,
        handle: impl FnOnce(&mut crate::node::Node) -> (AppendResponse, Vec<crate::writer::StorageOp>),
    ) -> (AppendResponse, Durable) {
        let mut node = self.shared.lock();
        let (resp, ops) = handle(&mut node);
        let writes = !ops.is_empty() && resp.success;
        let writer = &self.shared.writer;
        // Queued under the node lock, so in the order the node decided them.
        let durable = match (writes, here) {
            (true, true) => {
                writer.queue_for_here(ops);
                Durable::Here
            }
            (true, false) => {
                writer.send_all(ops);
                Durable::Barrier(writer.barrier())
            }
            (false, _) => {
                writer.send_all(ops);
                Durable::Nothing
            }
        };
        (resp, durable)
    }
}

#[tonic::async_trait]
impl Admin for Services {
    async fn reconfigure(&self, request: Request<ReconfigureRequest>) -> Result<Response<ReconfigureResponse>, Status> {
        let config = request
            .into_inner()
            .config
            .ok_or_else(|| Status::invalid_argument("missing config"))?;
        let (changed, epoch, primary) = {
            let mut node = self.shared.lock();
            let changed = node.reconfigure(config)?;
            if let Some(c) = &changed {
                self.shared.writer.send(crate::writer::StorageOp::Config(c.clone()));
            }
            (changed.is_some(), node.epoch, node.role == Role::Primary)
        };
        if changed {
            // The configuration is durable before the master hears "ok".
            self.shared
                .writer
                .barrier()
                .await
                .map_err(|_| Status::internal("storage stopped"))?;
            tracing::info!(epoch, primary, "adopted configuration");
            if primary {
                crate::peers::start(&self.shared);
            }
        }
        self.shared.after_change();
        Ok(Response::new(ReconfigureResponse { epoch }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let mut status = self.shared.lock().status();
        status.launched_image = launched_image();
        Ok(Response::new(status))
    }

    async fn seal(&self, request: Request<SealRequest>) -> Result<Response<SealResponse>, Status> {
        let (tx, rx) = oneshot::channel();
        {
            let mut node = self.shared.lock();
            self.enqueue(node.seal(request.into_inner().at_index, tx)?);
        }
        self.shared.poke();
        let (index, digest) = self.wait(rx, "seal").await?;
        Ok(Response::new(SealResponse { index, digest }))
    }

    async fn resume(&self, _: Request<ResumeRequest>) -> Result<Response<ResumeResponse>, Status> {
        let (tx, rx) = oneshot::channel();
        {
            let mut node = self.shared.lock();
            self.enqueue(node.resume(tx)?);
        }
        self.shared.poke();
        let (index, _) = self.wait(rx, "resume").await?;
        Ok(Response::new(ResumeResponse { index }))
    }

    async fn take_snapshot(&self, _: Request<SnapshotRequest>) -> Result<Response<SnapshotResponse>, Status> {
        let taken = {
            let mut node = self.shared.lock();
            match node.take_snapshot() {
                Some(crate::writer::StorageOp::Snapshot(s)) => {
                    let index = s.index;
                    self.shared.writer.send(crate::writer::StorageOp::Snapshot(s));
                    Some(index)
                }
                _ => None,
            }
        };
        let index = match taken {
            Some(index) => {
                self.shared
                    .writer
                    .barrier()
                    .await
                    .map_err(|_| Status::internal("storage stopped"))?;
                index
            }
            None => self.shared.lock().status().snapshot_index,
        };
        if index == 0 {
            return Err(failed_precondition("nothing applied yet"));
        }
        Ok(Response::new(SnapshotResponse { index }))
    }
}

/// The image the master launched this process from (`LOCKSTEP_IMAGE`, set by the operator
/// through the downward API), reported beside the machine identity so the master verifies
/// what runs instead of trusting pod specs.
pub fn launched_image() -> String {
    std::env::var("LOCKSTEP_IMAGE").unwrap_or_default()
}
