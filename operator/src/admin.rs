//! The replicas' Admin gRPC API (Status, Reconfigure, Seal, Resume), behind a trait so the
//! controller can be tested without replicas.

use std::time::Duration;

use futures::future::BoxFuture;
use lockstep_planner::Config;
use lockstep_proto::admin_client::AdminClient;
use lockstep_proto::{ReconfigureRequest, ResumeRequest, SealRequest, StatusRequest, StatusResponse};

/// Where and how to call one replica's admin API.
#[derive(Clone, Debug)]
pub struct AdminTarget {
    /// `http://host:port` (the scheme follows `transport`).
    pub addr: String,
    /// Mutual TLS with the operator's admin identity of the replica's RSM, or plaintext for
    /// a replica started without TLS (crate::tls).
    pub transport: lockstep::Transport,
    /// The name the replica's certificate is checked for, when `addr` is its pod IP.
    pub server_name: Option<String>,
}

impl AdminTarget {
    pub fn plaintext(addr: impl Into<String>) -> AdminTarget {
        AdminTarget {
            addr: addr.into(),
            transport: lockstep::Transport::plaintext(),
            server_name: None,
        }
    }
}

/// Admin calls to one replica.
pub trait ReplicaAdmin: Send + Sync {
    fn status(&self, target: AdminTarget) -> BoxFuture<'_, Result<StatusResponse, String>>;
    fn reconfigure(&self, target: AdminTarget, config: Config) -> BoxFuture<'_, Result<u64, String>>;
    fn seal(&self, target: AdminTarget) -> BoxFuture<'_, Result<u64, String>>;
    fn resume(&self, target: AdminTarget) -> BoxFuture<'_, Result<u64, String>>;
}

pub use lockstep_planner::wire::to_proto;

/// tonic client with connect and request timeouts.
#[derive(Clone, Debug)]
pub struct GrpcAdmin {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for GrpcAdmin {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl GrpcAdmin {
    async fn client(&self, target: &AdminTarget) -> Result<AdminClient<tonic::transport::Channel>, String> {
        let addr = &target.addr;
        let endpoint = target
            .transport
            .endpoint_named(addr, target.server_name.as_deref())?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {}", chain(&e)))?;
        Ok(AdminClient::new(channel))
    }
}

/// An error and its sources ("transport error: tcp connect error: Connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn rpc_err(addr: &str, e: tonic::Status) -> String {
    format!("{addr}: {} {}", e.code(), e.message())
}

impl ReplicaAdmin for GrpcAdmin {
    fn status(&self, target: AdminTarget) -> BoxFuture<'_, Result<StatusResponse, String>> {
        Box::pin(async move {
            let addr = target.addr.clone();
            let mut c = self.client(&target).await?;
            c.status(StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| rpc_err(&addr, e))
        })
    }

    fn reconfigure(&self, target: AdminTarget, config: Config) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let addr = target.addr.clone();
            let mut c = self.client(&target).await?;
            c.reconfigure(ReconfigureRequest {
                config: Some(to_proto(&config)),
            })
            .await
            .map(|r| r.into_inner().epoch)
            .map_err(|e| rpc_err(&addr, e))
        })
    }

    fn seal(&self, target: AdminTarget) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let addr = target.addr.clone();
            let mut c = self.client(&target).await?;
            c.seal(SealRequest { at_index: 0 })
                .await
                .map(|r| r.into_inner().index)
                .map_err(|e| rpc_err(&addr, e))
        })
    }

    fn resume(&self, target: AdminTarget) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let addr = target.addr.clone();
            let mut c = self.client(&target).await?;
            c.resume(ResumeRequest {})
                .await
                .map(|r| r.into_inner().index)
                .map_err(|e| rpc_err(&addr, e))
        })
    }
}
