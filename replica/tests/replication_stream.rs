//! How the primary's log reaches a backup: over one long-lived framed stream (no HTTP/2), over
//! the gRPC `Replicate` stream when the backup does not know the framed transport, and over
//! one unary `Append` per message when it knows neither (older replicas). Real replica
//! processes, plaintext, fsync on.

mod common;

use common::{Pair, configure, configure_via, metrics, put, sample};
use lockstep_proto::client_client::ClientClient;
use lockstep_proto::peer_client::PeerClient;
use lockstep_proto::peer_server::{Peer, PeerServer};
use lockstep_proto::{AppendRequest, AppendResponse, InstallSnapshotRequest, ReplicateRequest};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const CALLS: &str = "lockstep_replica_peer_calls_total";

#[test]
fn a_primary_replicates_over_one_stream_that_outlives_the_call_timeout() {
    let Pair { primary, backup, .. } = &Pair::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let writes = rt.block_on(async {
        configure(&[("p", primary.endpoint()), ("b", backup.endpoint())]).await;
        let mut client = ClientClient::connect(primary.endpoint()).await.expect("client connect");
        // Keep writing for longer than the peer channel's 2 s per-call timeout
        // (`peers::RPC_TIMEOUT`): a stream cut by it would be opened again and counted twice.
        let started = Instant::now();
        let mut sequence = 0;
        while sequence < 40 || started.elapsed() < Duration::from_millis(2500) {
            sequence += 1;
            put(&mut client, "stream", sequence).await;
        }
        sequence
    });
    let b = metrics(backup.at.http);
    assert_eq!(
        sample(&b, &format!("{CALLS}{{method=\"ReplicateFramed\"}}")),
        1.0,
        "one framed stream for all {writes} writes:\n{b}"
    );
    assert_eq!(
        sample(&b, &format!("{CALLS}{{method=\"Replicate\"}}")),
        0.0,
        "no gRPC stream"
    );
    assert_eq!(
        sample(&b, &format!("{CALLS}{{method=\"Append\"}}")),
        0.0,
        "no unary Append"
    );
    assert!(
        sample(
            &b,
            "lockstep_replica_write_stage_seconds_count{stage=\"backup_append\"}"
        ) >= 1.0,
        "the backup timed the Appends it got on the stream"
    );
}

/// A backup as an older replica would serve it: gRPC only (no framed transport), with or
/// without the `Replicate` stream; every call forwarded to a real backup process.
struct OlderReplica {
    backup: PeerClient<Channel>,
    with_stream: bool,
    appends: Arc<AtomicU64>,
}

type Answers = Pin<Box<dyn tokio_stream::Stream<Item = Result<AppendResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for OlderReplica {
    type ReplicateStream = Answers;

    async fn replicate(
        &self,
        request: Request<tonic::Streaming<ReplicateRequest>>,
    ) -> Result<Response<Answers>, Status> {
        if !self.with_stream {
            return Err(Status::unimplemented("this replica predates the Replicate stream"));
        }
        let requests = tokio_stream::StreamExt::filter_map(request.into_inner(), Result::ok);
        let answers = self.backup.clone().replicate(requests).await?.into_inner();
        Ok(Response::new(Box::pin(answers)))
    }

    async fn append(&self, request: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        self.appends.fetch_add(1, Ordering::Relaxed);
        self.backup.clone().append(request.into_inner()).await
    }

    async fn install_snapshot(
        &self,
        request: Request<InstallSnapshotRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        self.backup.clone().install_snapshot(request.into_inner()).await
    }
}

/// Writes through a primary whose backup is reached through an [`OlderReplica`] front; the
/// backup's metrics after them, and how many unary Appends the front forwarded.
fn through_an_older_replica(with_stream: bool, label: &str) -> (String, u64) {
    let Pair { primary, backup, .. } = &Pair::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let appends = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let older = format!("http://{}", listener.local_addr().expect("addr"));
        let service = OlderReplica {
            backup: PeerClient::connect(backup.endpoint()).await.expect("connect backup"),
            with_stream,
            appends: appends.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        // The configuration names the older replica's front as the backup's endpoint.
        configure_via(
            &[("p", primary.endpoint()), ("b", older)],
            &[primary.endpoint(), backup.endpoint()],
        )
        .await;
        let mut client = ClientClient::connect(primary.endpoint()).await.expect("client connect");
        for sequence in 1..=20 {
            put(&mut client, label, sequence).await;
        }
    });
    (metrics(backup.at.http), appends.load(Ordering::Relaxed))
}

#[test]
fn a_backup_without_the_framed_transport_gets_the_grpc_stream() {
    let (b, appends) = through_an_older_replica(true, "grpc-stream");
    assert!(
        sample(&b, &format!("{CALLS}{{method=\"Replicate\"}}")) >= 1.0,
        "the writes committed over the gRPC stream:\n{b}"
    );
    assert_eq!(sample(&b, &format!("{CALLS}{{method=\"ReplicateFramed\"}}")), 0.0);
    assert_eq!(appends, 0, "no unary Append");
}

#[test]
fn a_backup_without_the_stream_gets_one_append_per_message() {
    let (b, appends) = through_an_older_replica(false, "unary");
    assert!(
        appends >= 1,
        "the writes committed, so unary Appends reached the backup"
    );
    assert_eq!(sample(&b, &format!("{CALLS}{{method=\"Replicate\"}}")), 0.0);
    assert_eq!(sample(&b, &format!("{CALLS}{{method=\"ReplicateFramed\"}}")), 0.0);
    assert!(sample(&b, &format!("{CALLS}{{method=\"Append\"}}")) >= 1.0, "{b}");
}

/// Garbage on the framed transport ends that connection, never the backup: after an
/// undecodable frame, an oversized length and a wrong preface, the pair still commits writes.
#[test]
fn malformed_frames_close_the_connection_and_the_backup_serves_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Pair { primary, backup, .. } = &Pair::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        configure(&[("p", primary.endpoint()), ("b", backup.endpoint())]).await;
        let attacks: [&[u8]; 3] = [
            b"LSREPL/1\x00\x00\x00\x05\xff\xff\xff\xff\xff",
            b"LSREPL/1\xff\xff\xff\xff",
            b"LSREPL/2 and then some",
        ];
        for attack in attacks {
            let mut s = tokio::net::TcpStream::connect(backup.at.grpc).await.expect("connect");
            s.write_all(attack).await.expect("send");
            // The connection ends (after the accepting answer, if the preface was right).
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "the backup closes the connection after {attack:?}");
        }
        let mut client = ClientClient::connect(primary.endpoint()).await.expect("client connect");
        for sequence in 1..=5 {
            put(&mut client, "after-garbage", sequence).await;
        }
    });
    let b = metrics(backup.at.http);
    assert_eq!(
        sample(&b, &format!("{CALLS}{{method=\"ReplicateFramed\"}}")),
        3.0,
        "the primary's stream and the two attacks with a right preface:\n{b}"
    );
}
