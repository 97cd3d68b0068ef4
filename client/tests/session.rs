//! The client library's session (`Client/Session`): its operations share one stream per
//! replica, and a replica without sessions (an older one) gets unary calls instead.
//! Real `lockstep up`, real replica processes with TLS.

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

fn sessions_opened(cluster: &LocalCluster, id: &str) -> u64 {
    let l = cluster.listening(id).expect("listening");
    let metrics = common::http_get(l.http, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("lockstep_replica_client_sessions_total "))
        .unwrap_or_else(|| panic!("no client_sessions_total in:\n{metrics}"))
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn a_client_sends_all_its_operations_over_one_session() {
    let cluster = LocalCluster::start("session", 1, "kv", &["--quiet"]);
    let primary = cluster.primary();
    let before = sessions_opened(&cluster, &primary);
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
}

/// A replica as an older version would serve its clients: no `Session`, every unary call
/// forwarded to a real replica.
struct WithoutSessions {
    replica: ClientClient<Channel>,
    unary: Arc<AtomicU64>,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ClientService for WithoutSessions {
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
        _: Request<tonic::Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("this replica predates sessions"))
    }

    type WatchStream = Stream<AppliedEntry>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not needed here"))
    }
}

#[test]
fn a_replica_without_sessions_gets_one_call_per_operation() {
    let cluster = LocalCluster::start("nosession", 1, "kv", &["--quiet"]);
    let primary = cluster.primary();
    let before = sessions_opened(&cluster, &primary);
    let unary = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front = format!("http://{}", listener.local_addr().expect("addr"));
        let replica = common::connect(&cluster.transport(), &cluster.endpoint(&primary))
            .await
            .expect("connect the primary");
        let service = WithoutSessions {
            replica: ClientClient::new(replica),
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
    assert_eq!(unary.load(Ordering::Relaxed), 20, "one unary call per operation");
    assert_eq!(
        sessions_opened(&cluster, &primary),
        before,
        "no session reached the replica"
    );
}
