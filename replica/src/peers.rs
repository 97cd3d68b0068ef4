//! Replication from the primary to each peer: one task per peer per epoch. It sends every
//! entry the peer lacks (batched up to MAX_APPEND_ENTRIES per Append, at most APPEND_WINDOW
//! Appends unanswered) and handles the answers; when there is nothing to send it waits for
//! new entries, a read that needs confirming, or the heartbeat interval.
//!
//! The messages go over one long-lived stream per peer (answers come back in order), not a
//! unary call each: a call costs a new HTTP/2 stream, its headers and a task on both sides,
//! which was a quarter of the primary's instructions per write (docs/fail-stop-replication.md,
//! "Transport"). The stream is the framed transport (`crate::framed`: length-prefixed
//! messages on a connection of their own, no HTTP/2) where the peer speaks it, else the gRPC
//! `Replicate` stream; a peer that answers `Replicate` with UNIMPLEMENTED gets one unary
//! `Append`/`InstallSnapshot` per message.
//!
//! A stream's sending half (its [`Outbox`]) is registered in [`Shared::outboxes`], so the
//! handler that orders a client write sends the Append itself, under the node lock it already
//! holds, instead of waking this task to do it (docs/fail-stop-replication.md, "Transport").

use crate::node::{Node, PeerMessage, Shared};
use crate::tls::Transport;
use futures::stream::{FuturesUnordered, StreamExt};
use lockstep_proto::peer_client::PeerClient;
use lockstep_proto::{AppendResponse, ReplicateRequest, replicate_request::Kind};
use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::Channel;

pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// An answer not back after this long counts as lost: the link is dropped and the peer is
/// treated as unreachable until it answers again.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

pub fn connect_lazy(transport: &Transport, endpoint: &str) -> Option<Channel> {
    transport.endpoint(endpoint).ok().map(|e| {
        e.connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .timeout(RPC_TIMEOUT)
            .connect_lazy()
    })
}

/// Start replication tasks for every peer of the current epoch (the primary calls this
/// whenever it adopts a configuration).
pub fn start(shared: &Arc<Shared>) {
    let (epoch, peers) = {
        let node = shared.lock();
        (
            node.epoch,
            node.peers
                .iter()
                .map(|(id, p)| (id.clone(), p.endpoint.clone()))
                .collect::<Vec<_>>(),
        )
    };
    for (id, endpoint) in peers {
        let shared = shared.clone();
        tokio::spawn(async move { replicate(shared, id, endpoint, epoch).await });
    }
}

type Client = PeerClient<Channel>;
type Answer = (Result<AppendResponse, Status>, u64);
type UnaryCall = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// How messages reach one peer: the `Replicate` stream, or unary calls for a peer without it.
enum Link {
    /// Not connected (at the start, and after a failure).
    Closed,
    Stream(Box<StreamLink>),
    Unary(FuturesUnordered<UnaryCall>),
}

struct StreamLink {
    outbox: Arc<Outbox>,
    answers: crate::framed::Answers<AppendResponse>,
}

/// The sending half of one peer's `Replicate` stream. Everything sent on it goes out under
/// the node lock, in the order the node produced it, from this peer's task or from a handler
/// ([`send_new_entries`]).
pub struct Outbox {
    epoch: u64,
    sending: Mutex<Sending>,
}

struct Sending {
    requests: tokio::sync::mpsc::Sender<ReplicateRequest>,
    /// The read round and send time of each unanswered message, oldest first.
    waiting: VecDeque<(u64, Instant)>,
    /// What the last Append on this stream carried, so later ones can leave it out.
    machine: Option<lockstep_proto::MachineIdentity>,
    config: Option<lockstep_proto::Configuration>,
}

/// The open replication streams of this replica (as primary), by peer.
#[derive(Default)]
pub struct Outboxes(Mutex<HashMap<String, Arc<Outbox>>>);

impl Outboxes {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Outbox>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget `outbox` unless a newer one replaced it already.
    fn remove(&self, peer: &str, outbox: &Arc<Outbox>) {
        let mut map = self.map();
        if map.get(peer).is_some_and(|o| Arc::ptr_eq(o, outbox)) {
            map.remove(peer);
        }
    }
}

/// Called with the node lock held right after a write was ordered: send each peer with an
/// open stream what it lacks now, so the write is on its way to the backups without waiting
/// for the peer tasks to wake. A send that fails is counted as lost; the peer's task sees the
/// broken stream and reconnects.
pub fn send_new_entries(shared: &Shared, node: &mut Node) {
    // Lock order: node, then the outbox map, then an outbox.
    let epoch = node.epoch;
    let outboxes = shared.outboxes.map();
    for (peer, outbox) in outboxes.iter().filter(|(_, o)| o.epoch == epoch) {
        while let Some(msg) = next_message(node, peer, false) {
            if outbox.send(msg).is_err() {
                node.on_peer_unreachable(peer);
                break;
            }
        }
    }
}

/// The node's next message for `peer`, its entries stamped as sent (the `replicate` stage).
fn next_message(node: &mut Node, peer: &str, heartbeat_due: bool) -> Option<PeerMessage> {
    let msg = node.next_message(peer, heartbeat_due);
    if let Some(PeerMessage::Append(req, _)) = &msg
        && let (Some(first), Some(last)) = (req.entries.first(), req.entries.last())
    {
        node.stages.sent(first.index, last.index, std::time::Instant::now());
    }
    msg
}

/// The window bounds what is unanswered, so a stream's request channel always has room.
const STREAM_CAPACITY: usize = crate::node::APPEND_WINDOW + 1;

impl Link {
    fn stream(
        epoch: u64,
        requests: tokio::sync::mpsc::Sender<ReplicateRequest>,
        answers: crate::framed::Answers<AppendResponse>,
    ) -> Link {
        Link::Stream(Box::new(StreamLink {
            outbox: Arc::new(Outbox {
                epoch,
                sending: Mutex::new(Sending {
                    requests,
                    waiting: VecDeque::new(),
                    machine: None,
                    config: None,
                }),
            }),
            answers,
        }))
    }

    fn send(&mut self, client: &Client, msg: PeerMessage) -> Result<(), Status> {
        if let PeerMessage::Snapshot(req) = &msg {
            tracing::info!(
                peer = %req.primary_id,
                index = req.snapshot.as_ref().map_or(0, |s| s.index),
                "sending snapshot (state transfer)"
            );
        }
        match self {
            Link::Closed => Err(Status::unavailable("not connected")),
            Link::Stream(link) => link.outbox.send(msg),
            Link::Unary(calls) => {
                let mut client = client.clone();
                calls.push(Box::pin(async move {
                    match msg {
                        PeerMessage::Append(req, round) => (client.append(req).await.map(|r| r.into_inner()), round),
                        PeerMessage::Snapshot(req) => (client.install_snapshot(req).await.map(|r| r.into_inner()), 0),
                    }
                }));
                Ok(())
            }
        }
    }

    /// The next answer; pending forever when nothing is in flight.
    async fn next(&mut self) -> Answer {
        match self {
            Link::Closed => std::future::pending().await,
            Link::Stream(link) => {
                let Some((round, sent)) = link.outbox.sending().waiting.front().copied() else {
                    return std::future::pending().await;
                };
                let answer = tokio::time::timeout_at(sent + RPC_TIMEOUT, link.answers.next()).await;
                link.outbox.sending().waiting.pop_front();
                match answer {
                    Ok(Some(Ok(resp))) => (Ok(resp), round),
                    Ok(None) => (Err(Status::unavailable("the peer ended the stream")), round),
                    Ok(Some(Err(status))) => (Err(status), round),
                    Err(_) => (Err(Status::deadline_exceeded("no answer from the peer")), round),
                }
            }
            Link::Unary(calls) => match calls.next().await {
                Some(answer) => answer,
                None => std::future::pending().await,
            },
        }
    }

    /// Messages sent and not answered.
    fn unanswered(&self) -> usize {
        match self {
            Link::Closed => 0,
            Link::Stream(link) => link.outbox.sending().waiting.len(),
            Link::Unary(calls) => calls.len(),
        }
    }
}

impl Outbox {
    fn sending(&self) -> MutexGuard<'_, Sending> {
        self.sending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, msg: PeerMessage) -> Result<(), Status> {
        let mut sending = self.sending();
        let (kind, round) = match msg {
            PeerMessage::Append(mut req, round) => {
                elide_repeat(&mut req.machine, &mut sending.machine);
                elide_repeat(&mut req.config, &mut sending.config);
                (Kind::Append(req), round)
            }
            PeerMessage::Snapshot(req) => (Kind::Install(req), 0),
        };
        sending
            .requests
            .try_send(ReplicateRequest { kind: Some(kind) })
            .map_err(|_| Status::unavailable("the replication stream is closed"))?;
        sending.waiting.push_back((round, Instant::now()));
        Ok(())
    }
}

/// Leave `field` out when it equals what was last sent; remember it otherwise.
fn elide_repeat<T: PartialEq + Clone>(field: &mut Option<T>, last: &mut Option<T>) {
    if field.is_none() {
        return;
    }
    if *field == *last {
        *field = None;
    } else {
        last.clone_from(field);
    }
}

async fn replicate(shared: Arc<Shared>, peer: String, endpoint: String, epoch: u64) {
    let Some(channel) = connect_lazy(&shared.transport, &endpoint) else {
        tracing::error!(peer, endpoint, "invalid peer endpoint");
        return;
    };
    let client = PeerClient::new(channel)
        .max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
    let changed = shared.changed.subscribe();
    Replicator {
        shared,
        peer,
        endpoint,
        epoch,
        client,
        changed,
        last_sent: Instant::now() - HEARTBEAT,
        failures: 0,
        framed: true,
        link: Link::Closed,
    }
    .run()
    .await;
}

/// The task that replicates to one peer for one epoch.
struct Replicator {
    shared: Arc<Shared>,
    peer: String,
    endpoint: String,
    epoch: u64,
    client: Client,
    changed: tokio::sync::watch::Receiver<u64>,
    last_sent: Instant,
    /// Failures in a row.
    failures: u32,
    /// Whether to try the framed transport (cleared for the epoch when the peer lacks it).
    framed: bool,
    link: Link,
}

impl Replicator {
    /// Until this replica no longer replicates to the peer in this epoch: open the link, fill
    /// the window, wait for an answer, a change or the heartbeat.
    async fn run(mut self) {
        loop {
            if !still_replicating(&self.shared, &self.peer, self.epoch) {
                close_link(&self.shared, &self.peer, &mut self.link);
                return;
            }
            if matches!(self.link, Link::Closed) && !self.open().await {
                continue;
            }
            if self.fill_window().await.is_break() {
                return;
            }
            self.wait().await;
        }
    }

    /// Open the framed stream (while `framed` is set); a peer that does not know it gets the
    /// gRPC stream from then on (`framed` cleared), and one that does not know that either,
    /// unary calls.
    async fn open_link(&mut self) -> Result<Link, Status> {
        if self.framed {
            let (transport, stream) = (&self.shared.transport, crate::framed::Stream::Replicate);
            match crate::framed::open(transport, &self.endpoint, stream, STREAM_CAPACITY, RPC_TIMEOUT).await {
                Ok((requests, answers)) => return Ok(Link::stream(self.epoch, requests, answers)),
                Err(crate::framed::OpenError::NotSupported(why)) => {
                    tracing::info!(
                        endpoint = self.endpoint,
                        "peer has no framed replication ({why}): the gRPC stream instead"
                    );
                    self.framed = false;
                }
                Err(crate::framed::OpenError::Failed(status)) => return Err(status),
            }
        }
        let (requests, rx) = tokio::sync::mpsc::channel(STREAM_CAPACITY);
        match self
            .client
            .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(answers) => Ok(Link::stream(self.epoch, requests, Box::pin(answers.into_inner()))),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!("peer has no Replicate stream: one call per Append");
                Ok(Link::Unary(FuturesUnordered::new()))
            }
            Err(status) => Err(status),
        }
    }

    /// Open the link and make it the peer's outbox (false: it failed).
    async fn open(&mut self) -> bool {
        match self.open_link().await {
            Ok(open) => self.link = open,
            Err(status) => {
                self.on_failure(0, &status).await;
                return false;
            }
        }
        if let Link::Stream(stream) = &self.link {
            let _node = self.shared.lock();
            self.shared
                .outboxes
                .map()
                .insert(self.peer.clone(), stream.outbox.clone());
        }
        true
    }

    /// Fill the window. Messages go out under the node lock, in the order the node made
    /// them, as handlers send theirs (`send_new_entries`). Break: no longer replicating (the
    /// link is closed).
    async fn fill_window(&mut self) -> ControlFlow<()> {
        loop {
            let sent = {
                let mut node = self.shared.lock();
                if !replicates_to(&node, &self.peer, self.epoch) {
                    drop(node);
                    close_link(&self.shared, &self.peer, &mut self.link);
                    return ControlFlow::Break(());
                }
                let Some(msg) = next_message(&mut node, &self.peer, self.last_sent.elapsed() >= HEARTBEAT) else {
                    return ControlFlow::Continue(());
                };
                self.last_sent = Instant::now();
                self.link.send(&self.client, msg)
            };
            if let Err(status) = sent {
                drop_link(&self.shared, &self.peer, &mut self.link);
                self.on_failure(0, &status).await;
                return ControlFlow::Continue(());
            }
        }
    }

    /// Until an answer (or a failure) arrives, the node changes, or a heartbeat is due.
    async fn wait(&mut self) {
        tokio::select! {
            (result, round) = self.link.next() => match result {
                Ok(resp) => self.on_answer(round, &resp).await,
                Err(status) => {
                    if matches!(self.link, Link::Stream(_)) {
                        // The stream is broken (or an answer is overdue): everything else
                        // sent on it is lost too.
                        drop_link(&self.shared, &self.peer, &mut self.link);
                    }
                    self.on_failure(round, &status).await;
                }
            },
            _ = self.changed.changed() => {}
            _ = tokio::time::sleep_until(self.last_sent + HEARTBEAT) => {}
        }
    }

    /// The peer answered message `round`: count it, apply what it commits.
    async fn on_answer(&mut self, round: u64, resp: &AppendResponse) {
        self.failures = 0;
        let now = std::time::Instant::now();
        {
            let mut node = self.shared.lock();
            node.on_peer_response(&self.peer, self.epoch, round, resp);
            if let Some(replicated) = node.replicated_index() {
                node.stages.acked(replicated, now);
            }
            self.shared.apply_committed(&mut node, now);
        }
        self.shared.after_change();
        // Let the handlers just answered reply before this task sends the new
        // commit index on (which would run first and delay them).
        tokio::task::yield_now().await;
    }

    /// One message to the peer (or opening the link) failed with `status`: count it as lost
    /// and back off, or be fenced when the peer refused this replica as a non-member at a
    /// newer epoch.
    async fn on_failure(&mut self, round: u64, status: &Status) {
        let (shared, peer, epoch) = (&self.shared, self.peer.as_str(), self.epoch);
        if let Some(their) = crate::tls::refused_epoch(status).filter(|e| *e > epoch) {
            // Refused as a non-member by a replica at a newer epoch: this replica was removed,
            // so it is fenced (as an AppendResponse at that epoch says).
            let resp = AppendResponse {
                epoch: their,
                ..Default::default()
            };
            shared.lock().on_peer_response(peer, epoch, round, &resp);
            shared.after_change();
            return;
        }
        self.failures += 1;
        let failures = self.failures;
        shared.lock().on_peer_unreachable(peer);
        if failures == 1 || failures.is_multiple_of(50) {
            tracing::warn!(peer, endpoint = self.endpoint.as_str(), error = %status.message(), "peer unreachable");
        }
        tokio::time::sleep(Duration::from_millis(10 * u64::from(failures.min(10)))).await;
    }
}

fn still_replicating(shared: &Shared, peer: &str, epoch: u64) -> bool {
    replicates_to(&shared.lock(), peer, epoch)
}

fn replicates_to(node: &Node, peer: &str, epoch: u64) -> bool {
    node.epoch == epoch && node.peers.contains_key(peer)
}

/// Close `link`, counting each of its unanswered messages as lost. Under the node lock, so no
/// handler sends on it between the count and the close.
fn drop_link(shared: &Shared, peer: &str, link: &mut Link) {
    let mut node = shared.lock();
    let lost = link.unanswered();
    close(shared, peer, link);
    for _ in 0..lost {
        node.on_peer_unreachable(peer);
    }
}

/// Close `link` when this task ends: handlers no longer send on it.
fn close_link(shared: &Shared, peer: &str, link: &mut Link) {
    let _node = shared.lock();
    close(shared, peer, link);
}

/// Call with the node lock held.
fn close(shared: &Shared, peer: &str, link: &mut Link) {
    if let Link::Stream(stream) = &link {
        shared.outboxes.remove(peer, &stream.outbox);
    }
    *link = Link::Closed;
}
