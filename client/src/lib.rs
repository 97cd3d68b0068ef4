//! lockstep client library: talk to a replicated state machine over gRPC.
//!
//! A [`Client`] is one client session (a client id and a sequence number). It finds the
//! primary on its own (replicas answer NOT_PRIMARY with a hint), and it retries a command
//! whose outcome is unknown with the SAME (client id, sequence), which the replicas apply at
//! most once — so a retried `put` never lands twice, even across a fail-over.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lockstep::ClientError> {
//! let mut c = lockstep::Client::new(vec!["http://127.0.0.1:7000".into()]);
//! c.put("greeting", "hello").await?;
//! assert_eq!(c.get("greeting").await?.as_deref(), Some("hello"));
//! # Ok(()) }
//! ```

pub mod bench;
pub mod byz;
pub mod byz_batch;
pub mod byz_discover;
pub mod cluster;
pub mod pki;
mod session;
pub mod up;
pub mod up_byz;

use lockstep_proto::{
    AppliedEntry, Command, ExecuteRequest, ExecuteResponse, ReadRequest, ReadResponse, StatusRequest, StatusResponse,
    WatchRequest, admin_client::AdminClient, client_client::ClientClient,
};
pub use lockstep_replica::tls::{PeerIdentity, Role, Transport};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long an endpoint whose connection failed is skipped.
const DOWN_FOR: Duration = Duration::from_millis(300);

/// Metadata key naming the primary's endpoint on NOT_PRIMARY errors (see the replica).
pub const PRIMARY_HINT: &str = "x-lockstep-primary";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Certainly not applied (refused before it was ordered).
    #[error("rejected: {0}")]
    Rejected(String),
    /// May or may not have been applied (no answer in time).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The request itself is wrong (malformed command, too large): not applied.
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClientError {
    /// True when the operation certainly did not take effect.
    pub fn certainly_not_applied(&self) -> bool {
        !matches!(self, ClientError::Unknown(_))
    }
}

/// Normalise `host:port` to `http://host:port`.
pub fn endpoint_url(s: &str) -> String {
    let s = s.trim();
    if s.starts_with("http://") || s.starts_with("https://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

fn channel(transport: &Transport, endpoint: &str) -> Result<Channel, ClientError> {
    transport
        .endpoint(endpoint)
        .map(|e| {
            e.connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .connect_lazy()
        })
        .map_err(|e| ClientError::Invalid(format!("bad endpoint {endpoint}: {e}")))
}

/// A hint for errors of a plaintext client: a replica that requires TLS closes the
/// connection of a client without a certificate.
fn plaintext_hint(transport: &Transport, status: &Status) -> String {
    let m = status.message();
    let refused_h2 = m.contains("h2 protocol error") || (status.code() == Code::Unavailable && !never_sent(status));
    if transport.is_tls() || !refused_h2 {
        return String::new();
    }
    " (if the replicas run with TLS — the default of `lockstep up` — pass --tls-ca, --tls-cert and --tls-key, \
     or use -c NAME for a local cluster)"
        .into()
}

/// True for errors raised before a connection existed (refused, no route, name not
/// resolved): the request was never sent, so it certainly did not take effect. A Service
/// whose endpoints are not programmed yet refuses connections this way.
fn never_sent(status: &Status) -> bool {
    let m = status.message();
    status.code() == Code::Unavailable && (m.starts_with("tcp connect error") || m.starts_with("dns error"))
}

fn new_client_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("c-{n:016x}")
}

pub struct Client {
    transport: Transport,
    endpoints: Vec<String>,
    channels: HashMap<String, Channel>,
    /// The open session with each endpoint, opened on first use.
    sessions: HashMap<String, session::Session>,
    /// Endpoints without sessions (replicas from before them): one unary call per request.
    unary_only: std::collections::HashSet<String>,
    /// Endpoints without framed sessions (replicas from before them, Byzantine replicas): the
    /// gRPC session.
    grpc_sessions: std::collections::HashSet<String>,
    primary: Option<String>,
    /// Endpoints whose connection just failed, and when: not worth a retry for a moment,
    /// even when another replica's (stale) hint names them as the primary.
    down: HashMap<String, Instant>,
    next: usize,
    client_id: String,
    sequence: u64,
    /// How long one operation keeps retrying before giving up.
    pub deadline: Duration,
    /// Per-attempt timeout.
    pub attempt_timeout: Duration,
}

impl Client {
    pub fn new(endpoints: Vec<String>) -> Client {
        Client {
            transport: Transport::plaintext(),
            endpoints: endpoints.iter().map(|e| endpoint_url(e)).collect(),
            channels: HashMap::new(),
            sessions: HashMap::new(),
            unary_only: Default::default(),
            grpc_sessions: Default::default(),
            primary: None,
            down: HashMap::new(),
            next: 0,
            client_id: new_client_id(),
            sequence: 0,
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(6),
        }
    }

    /// Talk mutual TLS (or plaintext) as `transport` says; plaintext by default.
    pub fn with_transport(mut self, transport: Transport) -> Client {
        self.transport = transport;
        self.channels.clear();
        self.sessions.clear();
        self
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn with_client_id(mut self, id: impl Into<String>) -> Client {
        self.client_id = id.into();
        self
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn chan(&mut self, endpoint: &str) -> Result<Channel, ClientError> {
        if let Some(c) = self.channels.get(endpoint) {
            return Ok(c.clone());
        }
        let c = channel(&self.transport, endpoint)?;
        self.channels.insert(endpoint.to_string(), c.clone());
        Ok(c)
    }

    fn is_down(&self, endpoint: &str) -> bool {
        self.down.get(endpoint).is_some_and(|t| t.elapsed() < DOWN_FOR)
    }

    fn target(&mut self) -> String {
        if let Some(p) = &self.primary {
            return p.clone();
        }
        // Round robin, skipping endpoints that just failed (unless all did).
        let n = self.endpoints.len().max(1);
        for _ in 0..n {
            let e = self.endpoints[self.next % n].clone();
            self.next += 1;
            if !self.is_down(&e) {
                return e;
            }
        }
        let e = self.endpoints[self.next % n].clone();
        self.next += 1;
        e
    }

    /// Learn from an error where to go next. Returns true if the error says the request
    /// certainly was not applied by that replica.
    fn route(&mut self, endpoint: &str, status: &Status) -> bool {
        let hint = status
            .metadata()
            .get(PRIMARY_HINT)
            .and_then(|v| v.to_str().ok())
            .map(endpoint_url);
        let from_replica = hint.is_some()
            || status.code() != Code::Unavailable
            || status.message().starts_with("outcome unknown")
            || status.message().contains("configuration");
        if !from_replica {
            // Connection refused/reset or no answer: that endpoint is down for now.
            self.down.insert(endpoint.to_string(), Instant::now());
        }
        match hint {
            Some(h) if h != endpoint && !self.is_down(&h) => {
                if !self.endpoints.contains(&h) {
                    self.endpoints.push(h.clone());
                }
                self.primary = Some(h);
            }
            _ => {
                self.primary = None;
                self.channels.remove(endpoint);
                self.sessions.remove(endpoint);
            }
        }
        matches!(
            status.code(),
            Code::FailedPrecondition | Code::InvalidArgument | Code::OutOfRange
        ) && !status.message().starts_with("outcome unknown")
    }

    /// One attempt of `asked` at `endpoint`: over the endpoint's session (opened on first
    /// use), or as one unary call to a replica without sessions. Errors are the unary call's.
    async fn attempt(
        &mut self,
        endpoint: &str,
        asked: lockstep_proto::session_request::Kind,
        timeout: Duration,
    ) -> Result<lockstep_proto::session_response::Kind, Status> {
        use lockstep_proto::session_response::Kind as Answer;
        let channel = self
            .chan(endpoint)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !self.unary_only.contains(endpoint) && !self.sessions.contains_key(endpoint) {
            self.open_session(endpoint, channel.clone(), timeout).await?;
        }
        let answer = match self.sessions.get_mut(endpoint) {
            Some(s) => match s.call(asked, timeout).await {
                Ok(answer) => answer,
                Err(session::Broken(status)) => {
                    self.sessions.remove(endpoint);
                    return Err(status);
                }
            },
            None => session::unary(channel, asked, timeout).await?,
        };
        match answer {
            Answer::Error(e) => Err(e.into_status()),
            answer => Ok(answer),
        }
    }

    /// Open a session with `endpoint`: framed, else gRPC, else note that it takes unary calls.
    async fn open_session(&mut self, endpoint: &str, channel: Channel, timeout: Duration) -> Result<(), Status> {
        if !self.grpc_sessions.contains(endpoint) {
            match session::Session::open_framed(&self.transport, endpoint, timeout).await {
                Ok(s) => {
                    self.sessions.insert(endpoint.to_string(), s);
                    return Ok(());
                }
                Err(session::NotOpened::NotSupported) => {
                    self.grpc_sessions.insert(endpoint.to_string());
                }
                Err(session::NotOpened::Failed(status)) => return Err(status),
            }
        }
        match session::Session::open(channel, timeout).await? {
            Some(s) => {
                self.sessions.insert(endpoint.to_string(), s);
            }
            None => {
                self.unary_only.insert(endpoint.to_string());
            }
        }
        Ok(())
    }

    /// Pause before the next attempt once every endpoint was tried (or none is known to
    /// be the primary), growing with the number of attempts.
    async fn backoff(&self, attempt: u32) {
        let n = self.endpoints.len().max(1) as u32;
        if self.primary.is_none() && attempt.is_multiple_of(n) {
            // A full pass found no primary (a reconfiguration is under way): wait a little,
            // longer each pass.
            tokio::time::sleep(Duration::from_millis(5 * u64::from((attempt / n).min(20)))).await;
        }
    }

    /// Execute a machine command (raw payload), exactly once.
    pub async fn execute(&mut self, payload: Vec<u8>) -> Result<ExecuteResponse, ClientError> {
        if self.endpoints.is_empty() {
            return Err(ClientError::Invalid("no endpoints".into()));
        }
        if payload.len() > lockstep_replica::node::MAX_COMMAND_BYTES {
            // What the replica would answer, without sending it (a message over the gRPC
            // limit would end the session instead of getting an answer).
            return Err(ClientError::Invalid(format!(
                "command of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                lockstep_replica::node::MAX_COMMAND_BYTES
            )));
        }
        self.sequence += 1;
        let command = Command {
            client_id: self.client_id.clone(),
            sequence: self.sequence,
            payload,
        };
        let start = Instant::now();
        let mut maybe_applied = false;
        let mut last_error = String::new();
        let mut attempt = 0u32;
        while start.elapsed() < self.deadline {
            let endpoint = self.target();
            self.chan(&endpoint)?;
            let asked = lockstep_proto::session_request::Kind::Execute(ExecuteRequest {
                command: Some(command.clone()),
            });
            let timeout = self
                .attempt_timeout
                .min(self.deadline.saturating_sub(start.elapsed()))
                .max(Duration::from_millis(50));
            match self.attempt(&endpoint, asked, timeout).await.and_then(execute_answer) {
                Ok(resp) => {
                    self.primary = Some(endpoint);
                    return Ok(resp);
                }
                Err(status) if status.code() == Code::InvalidArgument => {
                    return Err(ClientError::Invalid(status.message().to_string()));
                }
                Err(status) => {
                    let refused = self.route(&endpoint, &status);
                    if !refused && !never_sent(&status) {
                        maybe_applied = true;
                    }
                    last_error = format!(
                        "{endpoint}: {}{}",
                        status.message(),
                        plaintext_hint(&self.transport, &status)
                    );
                    if status.message().contains("sealed") && start.elapsed() > Duration::from_secs(1) && !maybe_applied
                    {
                        return Err(ClientError::Rejected(last_error));
                    }
                }
            }
            attempt += 1;
            self.backoff(attempt).await;
        }
        Err(if maybe_applied {
            ClientError::Unknown(last_error)
        } else {
            ClientError::Rejected(last_error)
        })
    }

    /// A linearizable read-only query.
    pub async fn read(&mut self, query: Vec<u8>) -> Result<ReadResponse, ClientError> {
        let start = Instant::now();
        let mut last_error = String::from("no endpoints");
        let mut attempt = 0u32;
        while start.elapsed() < self.deadline && !self.endpoints.is_empty() {
            let endpoint = self.target();
            self.chan(&endpoint)?;
            let asked = lockstep_proto::session_request::Kind::Read(ReadRequest { query: query.clone() });
            match self
                .attempt(&endpoint, asked, self.attempt_timeout)
                .await
                .and_then(read_answer)
            {
                Ok(resp) => {
                    self.primary = Some(endpoint);
                    return Ok(resp);
                }
                Err(status) if status.code() == Code::InvalidArgument => {
                    return Err(ClientError::Invalid(status.message().to_string()));
                }
                Err(status) => {
                    self.route(&endpoint, &status);
                    last_error = format!(
                        "{endpoint}: {}{}",
                        status.message(),
                        plaintext_hint(&self.transport, &status)
                    );
                }
            }
            attempt += 1;
            self.backoff(attempt).await;
        }
        Err(ClientError::Rejected(last_error))
    }

    async fn kv(&mut self, cmd: serde_json::Value) -> Result<serde_json::Value, ClientError> {
        let resp = self.execute(cmd.to_string().into_bytes()).await?;
        parse_output(&resp.output)
    }

    /// `put`: returns the previous value.
    pub async fn put(&mut self, key: &str, value: &str) -> Result<Option<String>, ClientError> {
        let out = self
            .kv(serde_json::json!({"op": "put", "key": key, "value": value}))
            .await?;
        Ok(out["previous"].as_str().map(String::from))
    }

    /// `delete`: returns the previous value.
    pub async fn delete(&mut self, key: &str) -> Result<Option<String>, ClientError> {
        let out = self.kv(serde_json::json!({"op": "delete", "key": key})).await?;
        Ok(out["previous"].as_str().map(String::from))
    }

    /// Compare-and-swap: returns (swapped, current value).
    pub async fn cas(
        &mut self,
        key: &str,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Result<(bool, Option<String>), ClientError> {
        let out = self
            .kv(serde_json::json!({"op": "cas", "key": key, "old": old, "new": new}))
            .await?;
        Ok((
            out["swapped"].as_bool().unwrap_or(false),
            out["current"].as_str().map(String::from),
        ))
    }

    /// Linearizable `get`.
    pub async fn get(&mut self, key: &str) -> Result<Option<String>, ClientError> {
        let resp = self
            .read(serde_json::json!({"op": "get", "key": key}).to_string().into_bytes())
            .await?;
        let out = parse_output(&resp.output)?;
        Ok(out["value"].as_str().map(String::from))
    }

    /// Status of every known replica (errors per endpoint).
    pub async fn status_all(&mut self) -> Vec<(String, Result<StatusResponse, String>)> {
        let endpoints = self.endpoints.clone();
        let mut out = Vec::new();
        for e in endpoints {
            out.push((e.clone(), status_of(&self.transport, &e, Duration::from_secs(2)).await));
        }
        out
    }

    /// Subscribe to applied commands and their outputs (the seed's output devices).
    pub async fn watch(&mut self, from_index: u64) -> Result<tonic::Streaming<AppliedEntry>, ClientError> {
        let mut last = String::new();
        for _ in 0..self.endpoints.len().max(1) * 2 {
            let endpoint = self.target();
            let mut client = ClientClient::new(self.chan(&endpoint)?);
            match client.watch(WatchRequest { from_index }).await {
                Ok(s) => return Ok(s.into_inner()),
                Err(status) => {
                    self.route(&endpoint, &status);
                    last = status.message().to_string();
                }
            }
        }
        Err(ClientError::Rejected(last))
    }
}

fn execute_answer(answer: lockstep_proto::session_response::Kind) -> Result<ExecuteResponse, Status> {
    match answer {
        lockstep_proto::session_response::Kind::Execute(r) => Ok(r),
        _ => Err(Status::internal("the replica answered an Execute with something else")),
    }
}

fn read_answer(answer: lockstep_proto::session_response::Kind) -> Result<ReadResponse, Status> {
    match answer {
        lockstep_proto::session_response::Kind::Read(r) => Ok(r),
        _ => Err(Status::internal("the replica answered a Read with something else")),
    }
}

pub fn parse_output(bytes: &[u8]) -> Result<serde_json::Value, ClientError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ClientError::Invalid(format!("machine output is not JSON: {e}")))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(ClientError::Invalid(err.to_string()));
    }
    Ok(v)
}

/// Channels to replicas, one per endpoint, reused: callers that talk to the same replicas
/// again and again (the configuration masters) pay for a connection — with TLS a handshake —
/// once, not per call. Bound to the tokio runtime the channels are first made on. Cheap to
/// clone (the clones share the channels).
#[derive(Clone, Debug, Default)]
pub struct Channels {
    transport: Transport,
    map: std::sync::Arc<std::sync::Mutex<HashMap<String, Channel>>>,
}

impl Channels {
    pub fn new(transport: Transport) -> Channels {
        Channels {
            transport,
            map: Default::default(),
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The channel to `endpoint` (made on first use).
    pub fn get(&self, endpoint: &str) -> Result<Channel, ClientError> {
        let key = endpoint_url(endpoint);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let c = channel(&self.transport, &key)?;
        map.insert(key, c.clone());
        Ok(c)
    }

    /// Forget the channels of endpoints `keep` says no to (replicas gone).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|e, _| keep(e));
    }

    /// Admin status of `endpoint` over its channel.
    pub async fn status(&self, endpoint: &str, timeout: Duration) -> Result<StatusResponse, String> {
        let ch = self.get(endpoint).map_err(|e| e.to_string())?;
        status_on(ch, timeout).await
    }
}

/// A lazily connecting channel to one replica.
pub fn cluster_channel(transport: &Transport, endpoint: &str) -> Result<Channel, ClientError> {
    channel(transport, &endpoint_url(endpoint))
}

/// One replica's admin status.
pub async fn status_of(transport: &Transport, endpoint: &str, timeout: Duration) -> Result<StatusResponse, String> {
    let ch = channel(transport, &endpoint_url(endpoint)).map_err(|e| e.to_string())?;
    status_on(ch, timeout).await
}

/// Admin status over an existing channel (callers that ask often keep one per replica: with
/// TLS a new connection costs a handshake).
pub async fn status_on(ch: Channel, timeout: Duration) -> Result<StatusResponse, String> {
    let mut c = AdminClient::new(ch);
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, c.status(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_certainly_not_applied() {
        // A port nothing listens on: every attempt is refused before anything is sent.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut c = Client::new(vec![format!("127.0.0.1:{port}")]);
        c.deadline = Duration::from_millis(700);
        let err = c.put("k", "v").await.expect_err("nothing listens");
        assert!(err.certainly_not_applied(), "{err}");
        assert!(err.to_string().contains("connect"), "{err}");
    }
}
