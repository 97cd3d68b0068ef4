//! A client's session with one replica (`Client/Session`): its Executes and Reads go over one
//! long-lived stream instead of one unary call each, which saves an HTTP/2 stream, its
//! headers and a task per request on both ends (docs/wire-protocol.md, "Client sessions").
//! The stream is the framed transport (no HTTP/2 at all) where the replica has it, else the
//! gRPC stream. The answers and errors are the ones the unary calls give.

use futures::StreamExt as _;
use lockstep_proto::client_client::ClientClient;
use lockstep_proto::{SessionRequest, session_request::Kind as Asked, session_response::Kind as Answer};
use lockstep_replica::framed;
use lockstep_replica::tls::Transport;
use std::time::Duration;
use tonic::Status;
use tonic::transport::Channel;

pub(crate) struct Session {
    requests: tokio::sync::mpsc::Sender<SessionRequest>,
    answers: framed::Answers<lockstep_proto::SessionResponse>,
    last_id: u64,
}

/// Requests of one session the library has in flight (one at a time, plus room).
const CAPACITY: usize = 4;

/// How [`Session::open_framed`] ended without a session.
pub(crate) enum NotOpened {
    /// The replica has no framed sessions: open the gRPC one.
    NotSupported,
    Failed(Status),
}

/// The session can not be used any more (the stream broke, or an answer did not come in
/// time): the request's outcome is unknown, as after a unary call that failed the same way.
pub(crate) struct Broken(pub Status);

impl Session {
    /// Open a session; `Ok(None)` when the replica has none (it answers UNIMPLEMENTED: a
    /// replica from before sessions), so the caller uses unary calls with it.
    pub async fn open(channel: Channel, timeout: Duration) -> Result<Option<Session>, Status> {
        let (requests, rx) = tokio::sync::mpsc::channel(CAPACITY);
        let mut client = ClientClient::new(channel)
            .max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
        let opened = tokio::time::timeout(timeout, client.session(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .map_err(|_| Status::deadline_exceeded("no answer to opening a session in time"))?;
        match opened {
            Ok(answers) => Ok(Some(Session {
                requests,
                answers: Box::pin(answers.into_inner()),
                last_id: 0,
            })),
            Err(status) if status.code() == tonic::Code::Unimplemented => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// Open a session on the framed transport (docs/wire-protocol.md, "Framed transport").
    pub async fn open_framed(transport: &Transport, endpoint: &str, timeout: Duration) -> Result<Session, NotOpened> {
        match framed::open(transport, endpoint, framed::Stream::Session, CAPACITY, timeout).await {
            Ok((requests, answers)) => Ok(Session {
                requests,
                answers,
                last_id: 0,
            }),
            Err(framed::OpenError::NotSupported(why)) => {
                tracing::debug!(endpoint, "no framed session ({why}): the gRPC one instead");
                Err(NotOpened::NotSupported)
            }
            Err(framed::OpenError::Failed(status)) => Err(NotOpened::Failed(status)),
        }
    }

    /// Send `asked` and wait up to `timeout` for its answer. Answers to earlier requests
    /// that were given up on are skipped.
    pub async fn call(&mut self, asked: Asked, timeout: Duration) -> Result<Answer, Broken> {
        self.last_id += 1;
        let id = self.last_id;
        let exchange = async {
            self.requests
                .send(SessionRequest { id, kind: Some(asked) })
                .await
                .map_err(|_| Broken(Status::unavailable("the session is closed")))?;
            loop {
                match self.answers.next().await {
                    Some(Ok(answer)) if answer.id != id => continue,
                    Some(Ok(answer)) => {
                        return answer
                            .kind
                            .ok_or_else(|| Broken(Status::internal("an empty answer from the replica")));
                    }
                    None => return Err(Broken(Status::unavailable("the replica ended the session"))),
                    Some(Err(status)) => return Err(Broken(status)),
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(Broken(Status::deadline_exceeded("no answer from the replica in time"))))
    }
}

/// The same request as one unary call, for a replica without sessions.
pub(crate) async fn unary(channel: Channel, asked: Asked, timeout: Duration) -> Result<Answer, Status> {
    let mut client = ClientClient::new(channel)
        .max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
    match asked {
        Asked::Execute(request) => {
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout);
            client.execute(request).await.map(|r| Answer::Execute(r.into_inner()))
        }
        Asked::Read(request) => {
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout);
            client.read(request).await.map(|r| Answer::Read(r.into_inner()))
        }
    }
}
