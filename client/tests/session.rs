//! The client library's session (`Client/Session`): its operations share one stream per
//! replica, on the framed transport; a replica without that (an older one) gets the gRPC
//! session, and one without sessions unary calls. Real `lockstep up`, real replica processes
//! with TLS.

mod common;

use common::LocalCluster;
use lockstep_proto::client_client::ClientClient;
use lockstep_proto::client_server::{Client as ClientService, ClientServer};
use lockstep_proto::{
    AppliedEntry, ExecuteRequest, ExecuteResponse, ReadRequest, ReadResponse, SessionRequest, SessionResponse,
    WatchRequest,
};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

fn counted(cluster: &LocalCluster, id: &str, name: &str) -> u64 {
    let l = cluster.listening(id).expect("listening");
    let metrics = common::http_get(l.http, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
        .trim()
        .parse()
        .expect("a number")
}

fn sessions_opened(cluster: &LocalCluster, id: &str) -> u64 {
    counted(cluster, id, "lockstep_replica_client_sessions_total")
}

fn framed_sessions_opened(cluster: &LocalCluster, id: &str) -> u64 {
    counted(cluster, id, "lockstep_replica_client_sessions_framed_total")
}

#[test]
fn a_client_sends_all_its_operations_over_one_session() {
    let cluster = LocalCluster::start("session", 1, "kv", &["--quiet"]);
    let primary = cluster.primary();
    let before = sessions_opened(&cluster, &primary);
    let framed_before = framed_sessions_opened(&cluster, &primary);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client = cluster.client();
        for i in 0..50 {
            client.put(&format!("k{i}"), "v").await.expect("put");
            assert_eq!(client.get(&format!("k{i}")).await.expect("get").as_deref(), Some("v"));
        }
    });
    // `lockstep up` itself talks to the replicas with the Admin service only.
    assert_eq!(
        sessions_opened(&cluster, &primary) - before,
        1,
        "100 operations of one client, one session"
    );
    assert_eq!(
        framed_sessions_opened(&cluster, &primary) - framed_before,
        1,
        "on the framed transport (mutual TLS, ALPN lockstep-framed/1)"
    );
}

/// A replica as an older version would serve its clients: gRPC only (no framed transport),
/// with or without `Session`; every call forwarded to a real replica.
struct OlderReplica {
    replica: ClientClient<Channel>,
    with_session: bool,
    unary: Arc<AtomicU64>,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ClientService for OlderReplica {
    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
        self.unary.fetch_add(1, Ordering::Relaxed);
        self.replica.clone().execute(request.into_inner()).await
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        self.unary.fetch_add(1, Ordering::Relaxed);
        self.replica.clone().read(request.into_inner()).await
    }

    type SessionStream = Stream<SessionResponse>;

    async fn session(
        &self,
        request: Request<tonic::Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if !self.with_session {
            return Err(Status::unimplemented("this replica predates sessions"));
        }
        let requests = tokio_stream::StreamExt::filter_map(request.into_inner(), Result::ok);
        let answers = self.replica.clone().session(requests).await?.into_inner();
        Ok(Response::new(Box::pin(answers)))
    }

    type WatchStream = Stream<AppliedEntry>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not needed here"))
    }
}

/// 10 puts and gets through an [`OlderReplica`] front (plaintext) of a cluster's primary: how
/// many unary calls the front forwarded, and how many sessions, and framed ones, the primary
/// opened meanwhile.
fn through_an_older_replica(name: &str, with_session: bool) -> (u64, u64, u64) {
    let cluster = LocalCluster::start(name, 1, "kv", &["--quiet"]);
    let primary = cluster.primary();
    let before = (
        sessions_opened(&cluster, &primary),
        framed_sessions_opened(&cluster, &primary),
    );
    let unary = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front = format!("http://{}", listener.local_addr().expect("addr"));
        let replica = common::connect(&cluster.transport(), &cluster.endpoint(&primary))
            .await
            .expect("connect the primary");
        let service = OlderReplica {
            replica: ClientClient::new(replica),
            with_session,
            unary: unary.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ClientServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = lockstep::Client::new(vec![front]);
        for i in 0..10 {
            client
                .put(&format!("k{i}"), "v")
                .await
                .expect("put through the older replica");
            assert_eq!(client.get(&format!("k{i}")).await.expect("get").as_deref(), Some("v"));
        }
    });
    (
        unary.load(Ordering::Relaxed),
        sessions_opened(&cluster, &primary) - before.0,
        framed_sessions_opened(&cluster, &primary) - before.1,
    )
}

#[test]
fn a_replica_without_framed_sessions_gets_the_grpc_session() {
    let (unary, sessions, framed) = through_an_older_replica("grpcsession", true);
    assert_eq!(unary, 0, "no unary call");
    assert_eq!(sessions, 1, "one gRPC session for 20 operations");
    assert_eq!(framed, 0, "none framed");
}

#[test]
fn a_replica_without_sessions_gets_one_call_per_operation() {
    let (unary, sessions, _) = through_an_older_replica("nosession", false);
    assert_eq!(unary, 20, "one unary call per operation");
    assert_eq!(sessions, 0, "no session reached the replica");
}
