//! How the primary's log reaches a backup: over one long-lived `Replicate` stream, and over
//! one unary `Append` per message when the backup does not know the stream (an older
//! replica). Real replica processes, plaintext, fsync on.

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
        sample(&b, &format!("{CALLS}{{method=\"Replicate\"}}")),
        1.0,
        "one stream for all {writes} writes:\n{b}"
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

/// A backup as an older replica would serve it: no `Replicate`, every unary call forwarded to
/// a real backup process.
struct WithoutStream {
    backup: PeerClient<Channel>,
    appends: Arc<AtomicU64>,
}

type Answers = Pin<Box<dyn tokio_stream::Stream<Item = Result<AppendResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for WithoutStream {
    type ReplicateStream = Answers;

    async fn replicate(&self, _: Request<tonic::Streaming<ReplicateRequest>>) -> Result<Response<Answers>, Status> {
        Err(Status::unimplemented("this replica predates the Replicate stream"))
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

#[test]
fn a_backup_without_the_stream_gets_one_append_per_message() {
    let Pair { primary, backup, .. } = &Pair::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let appends = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let older = format!("http://{}", listener.local_addr().expect("addr"));
        let service = WithoutStream {
            backup: PeerClient::connect(backup.endpoint()).await.expect("connect backup"),
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
            put(&mut client, "unary", sequence).await;
        }
    });
    assert!(
        appends.load(Ordering::Relaxed) >= 1,
        "the writes committed, so unary Appends reached the backup"
    );
    let b = metrics(backup.at.http);
    assert_eq!(sample(&b, &format!("{CALLS}{{method=\"Replicate\"}}")), 0.0);
    assert!(sample(&b, &format!("{CALLS}{{method=\"Append\"}}")) >= 1.0, "{b}");
}
