//! The framed transport: a replication stream or a client session without gRPC
//! (docs/wire-protocol.md and docs/fail-stop-replication.md, "Framed transport").
//!
//! The same protobuf messages as the gRPC streams it stands in for, each behind a 4-byte
//! big-endian length, on a connection of its own to the replica's one port. The opener
//! offers TLS ALPN `lockstep-framed/1` (only that) and sends 8 bytes naming the stream: a
//! [`Stream::Replicate`] (a primary's `Peer/Replicate`: `ReplicateRequest` ->
//! `AppendResponse`, answered in order) or a [`Stream::Session`] (a client's `Client/Session`:
//! `SessionRequest` -> `SessionResponse`). In plaintext the acceptor tells these connections
//! from gRPC by their first byte. The replica's first frame is a `FramedOpen`: accepted, or
//! refused with a gRPC status code (the rule the gRPC server's authorization layer applies to
//! the same stream), then the stream's answers.
//!
//! A replica from before this transport does not know it: the TLS handshake fails for want of
//! a common ALPN protocol, or (plaintext) its HTTP/2 server drops the connection without an
//! answer; a replica that knows the transport but not the stream (a Byzantine replica) answers
//! UNIMPLEMENTED. All three are [`OpenError::NotSupported`], and the opener uses the gRPC
//! stream, so versions can be mixed during a rolling upgrade.

use crate::server::Services;
use crate::tls::{Conn, Membership, Transport};
use futures::{FutureExt as _, StreamExt as _};
use lockstep_proto::{FramedOpen, MAX_MESSAGE_BYTES, ReplicateRequest, SessionRequest};
use prost::Message;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tonic::transport::server::Connected;

/// Which stream a framed connection carries (its first 8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Replicate,
    Session,
}

impl Stream {
    pub const fn preface(self) -> &'static [u8; 8] {
        match self {
            Stream::Replicate => b"LSREPL/1",
            Stream::Session => b"LSSESS/1",
        }
    }

    /// The gRPC method whose access rule it follows.
    pub const fn path(self) -> &'static str {
        match self {
            Stream::Replicate => "/lockstep.v1.Peer/Replicate",
            Stream::Session => "/lockstep.v1.Client/Session",
        }
    }

    fn of(preface: &[u8; 8]) -> Option<Stream> {
        [Stream::Replicate, Stream::Session]
            .into_iter()
            .find(|s| s.preface() == preface)
    }
}

/// The first byte of every preface: how the plaintext acceptor tells a framed connection from
/// gRPC (HTTP/2 starts with `P`).
pub const FIRST_BYTE: u8 = b'L';

/// A stream's answers, in the order they come.
pub type Answers<M> = Pin<Box<dyn futures::Stream<Item = Result<M, Status>> + Send + Sync>>;

/// Why a framed stream did not open.
#[derive(Debug)]
pub enum OpenError {
    /// The replica does not speak the framed transport, or not this stream: use gRPC.
    NotSupported(String),
    /// It does, and the connection failed or the stream was refused.
    Failed(Status),
}

/// Open a framed `stream` to `endpoint` (`host:port`, with or without a scheme): the requests
/// put in the returned sender go out in order (a writer task sends each as soon as it is put
/// there, several at once when they queue up), the answers come back as the replica sends
/// them. Dropping both ends closes the connection.
pub async fn open<Req, Resp>(
    transport: &Transport,
    endpoint: &str,
    stream: Stream,
    capacity: usize,
    timeout: Duration,
) -> Result<(mpsc::Sender<Req>, Answers<Resp>), OpenError>
where
    Req: Message + 'static,
    Resp: Message + Default + 'static,
{
    let (host, port) = host_port(endpoint).map_err(|e| OpenError::Failed(Status::invalid_argument(e)))?;
    let failed = |what: &str, e: &dyn std::fmt::Display| OpenError::Failed(Status::unavailable(format!("{what}: {e}")));
    let tcp = tokio::time::timeout(timeout, crate::tls::connect_tcp(&host, port, true))
        .await
        .map_err(|_| failed("tcp connect error", &"timed out"))?
        .map_err(|e| OpenError::Failed(Status::unavailable(e.0)))?;
    let Some(loaded) = transport.current() else {
        return start(tcp, stream, capacity, timeout, false).await;
    };
    let tls = match tokio::time::timeout(timeout, crate::tls::handshake(loaded.framed.clone(), &host, tcp)).await {
        Err(_) => return Err(failed("TLS handshake", &"timed out")),
        Ok(Err(e)) if no_common_protocol(&e) => {
            return Err(OpenError::NotSupported(format!("TLS: {e}")));
        }
        Ok(Err(e)) => return Err(failed("TLS handshake", &e)),
        Ok(Ok(tls)) => tls,
    };
    if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_FRAMED) {
        return Err(OpenError::NotSupported(
            "the server chose no lockstep-framed/1 (ALPN)".into(),
        ));
    }
    start(tls, stream, capacity, timeout, true).await
}

/// The peer refused the handshake because it knows none of the offered ALPN protocols.
fn no_common_protocol(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
            )
        })
}

fn host_port(endpoint: &str) -> Result<(String, u16), String> {
    let e = endpoint.trim();
    let rest = crate::tls::without_scheme(e);
    let uri: http::Uri = format!("http://{rest}")
        .parse()
        .map_err(|err| format!("bad address {e}: {err}"))?;
    let host = crate::tls::host_of(&uri);
    if host.is_empty() {
        return Err(format!("no host in {e}"));
    }
    let port = uri.port_u16().ok_or_else(|| format!("no port in {e}"))?;
    Ok((host.to_string(), port))
}

/// Send the preface, read the replica's `FramedOpen`, then run the connection.
async fn start<S, Req, Resp>(
    mut io: S,
    stream: Stream,
    capacity: usize,
    timeout: Duration,
    tls: bool,
) -> Result<(mpsc::Sender<Req>, Answers<Resp>), OpenError>
where
    S: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
    Req: Message + 'static,
    Resp: Message + Default + 'static,
{
    let opened = tokio::time::timeout(timeout, async {
        io.write_all(stream.preface()).await?;
        io.flush().await?;
        let mut buf = Vec::new();
        read_frame(&mut io, &mut buf, 64 * 1024).await?;
        FramedOpen::decode(&buf[..]).map_err(std::io::Error::other)
    })
    .await;
    let open = match opened {
        Ok(Ok(open)) => open,
        // In plaintext, a replica from before this transport closes the connection (or
        // answers in HTTP/2) when it reads the preface; with TLS the ALPN settled that.
        Ok(Err(e)) if !tls => return Err(OpenError::NotSupported(format!("no framed answer: {e}"))),
        Ok(Err(e)) => {
            return Err(OpenError::Failed(Status::unavailable(format!(
                "opening the stream: {e}"
            ))));
        }
        Err(_) => {
            return Err(OpenError::Failed(Status::unavailable(
                "no answer to the framed preface",
            )));
        }
    };
    match tonic::Code::from_i32(open.code as i32) {
        tonic::Code::Ok => {}
        tonic::Code::Unimplemented => return Err(OpenError::NotSupported(open.message)),
        _ => return Err(OpenError::Failed(refusal(&open))),
    }
    let (reader, writer) = tokio::io::split(io);
    let (requests, rx) = mpsc::channel(capacity);
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(write_requests(writer, rx, closed_rx));
    Ok((requests, read_answers(BufReader::new(reader), closed_tx)))
}

/// A refusal as the status a refused gRPC call would have carried.
fn refusal(open: &FramedOpen) -> Status {
    let code = tonic::Code::from_i32(open.code as i32);
    if code == tonic::Code::PermissionDenied && open.epoch > 0 {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Ok(v) = open.epoch.to_string().parse() {
            metadata.insert(crate::tls::EPOCH_METADATA, v);
        }
        return Status::with_metadata(code, open.message.clone(), metadata);
    }
    Status::new(code, open.message.clone())
}

/// The opener's writer: every request queued at the moment goes out in one write. Ends when
/// the senders are gone or the answers' reader is dropped (`closed`), even in the middle of a
/// write to a peer that stopped reading.
async fn write_requests<W: AsyncWrite + Unpin, M: Message>(
    mut writer: W,
    mut rx: mpsc::Receiver<M>,
    mut closed: oneshot::Receiver<()>,
) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = &mut closed => None,
        };
        let Some(first) = first else { break };
        emptied(&mut buf);
        push_frame(&mut buf, &first);
        while let Ok(more) = rx.try_recv() {
            push_frame(&mut buf, &more);
        }
        let sent = tokio::select! {
            r = async { writer.write_all(&buf).await?; writer.flush().await } => r.is_ok(),
            _ = &mut closed => false,
        };
        if !sent {
            break;
        }
    }
    let _ = writer.shutdown().now_or_never();
}

/// The answers of an opened stream, until the connection ends. `closed` stops the writer
/// when they are dropped.
fn read_answers<R, M>(reader: R, closed: oneshot::Sender<()>) -> Answers<M>
where
    R: AsyncRead + Unpin + Send + Sync + 'static,
    M: Message + Default + 'static,
{
    let frames = read_frames::<_, M>(reader, None, "answer from the replica");
    Box::pin(frames.map(move |answer| {
        let _keep_writer = &closed;
        answer
    }))
}

/// The messages of one connection, until it ends; a frame that is too large or does not
/// decode is the last item, as an error.
fn read_frames<R, M>(reader: R, remote: Option<std::net::SocketAddr>, what: &'static str) -> Answers<M>
where
    R: AsyncRead + Unpin + Send + Sync + 'static,
    M: Message + Default + 'static,
{
    Box::pin(futures::stream::unfold(
        Some((reader, Vec::new())),
        move |state| async move {
            let (mut r, mut buf) = state?;
            match read_frame(&mut r, &mut buf, MAX_MESSAGE_BYTES).await {
                Ok(()) => match M::decode(&buf[..]) {
                    Ok(msg) => Some((Ok(msg), Some((r, buf)))),
                    Err(e) => {
                        tracing::warn!(?remote, "undecodable {what}: {e}; connection closed");
                        Some((Err(Status::invalid_argument(format!("undecodable {what}: {e}"))), None))
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                Err(e) => {
                    tracing::warn!(?remote, "framed connection: {e}; closed");
                    Some((Err(Status::unavailable(format!("framed connection: {e}"))), None))
                }
            }
        },
    ))
}

/// A buffer that held a large frame (a snapshot) is given back rather than kept for the
/// connection's life.
const KEEP_BUFFER_BYTES: usize = 1 << 20;

/// `buf`, emptied, with its memory given back if a large frame grew it.
fn emptied(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_BUFFER_BYTES {
        *buf = Vec::new();
    }
    buf.clear();
}

/// Append `msg` to `buf` as one frame.
fn push_frame<M: Message>(buf: &mut Vec<u8>, msg: &M) {
    let len = msg.encoded_len();
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(buf).expect("a Vec grows");
}

/// Read one frame's body into `buf`; a length above `max` is an error (nothing is allocated
/// for it).
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> std::io::Result<()> {
    let len = r.read_u32().await? as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {max})"),
        ));
    }
    emptied(buf);
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(())
}

/// What a replica serves on framed connections.
#[derive(Clone)]
pub enum Served {
    /// A fail-stop replica: replication streams and client sessions.
    FailStop(Services),
    /// A replica with neither (Byzantine mode): every stream is answered UNIMPLEMENTED, so
    /// the opener uses gRPC.
    Nothing,
}

/// The connections of `incoming` for the gRPC server: the framed ones are served here, each in
/// its own task, as `served` says.
pub fn beside_grpc(
    incoming: impl futures::Stream<Item = std::io::Result<Conn>>,
    served: Served,
    members: Membership,
) -> impl futures::Stream<Item = std::io::Result<Conn>> {
    incoming.filter_map(move |conn| {
        let grpc = match conn {
            Ok(conn) if conn.is_framed() => {
                tokio::spawn(serve(conn, served.clone(), members.clone()));
                None
            }
            other => Some(other),
        };
        std::future::ready(grpc)
    })
}

/// The replica's side of one framed connection: read the preface, check the caller, then
/// answer the stream as its gRPC counterpart would. A malformed frame ends the connection,
/// never the replica.
pub async fn serve(conn: Conn, served: Served, members: Membership) {
    let serves = matches!(served, Served::FailStop(_));
    let Some((stream, reader, writer, remote)) = admit(conn, serves, &members).await else {
        return;
    };
    let Served::FailStop(services) = served else {
        return;
    };
    match stream {
        Stream::Replicate => {
            services.shared.metrics.count_peer_call("ReplicateFramed");
            let requests = read_frames::<_, ReplicateRequest>(reader, remote, "replication request")
                .filter_map(|r| std::future::ready(r.ok()));
            write_answers(writer, services.replicate_answers(Box::pin(requests))).await;
        }
        Stream::Session => {
            services.shared.metrics.client_sessions_framed.inc();
            let requests = read_frames::<_, SessionRequest>(reader, remote, "session request");
            write_answers(writer, services.session_answers(requests)).await;
        }
    }
}

type Halves = (
    Stream,
    BufReader<tokio::io::ReadHalf<Conn>>,
    tokio::io::WriteHalf<Conn>,
    Option<std::net::SocketAddr>,
);

/// Read the preface, decide the caller (with TLS, by the rule of the stream's gRPC method) and
/// answer with a `FramedOpen` (UNIMPLEMENTED when this replica `serves` no framed streams).
/// None: the connection is closed.
async fn admit(conn: Conn, serves: bool, members: &Membership) -> Option<Halves> {
    let tls = conn.is_tls();
    let info = conn.connect_info();
    let (caller, remote) = (info.identity.map(|id| id.as_ref().clone()), info.remote);
    let (reader, mut writer) = tokio::io::split(conn);
    let mut reader = BufReader::new(reader);
    let mut preface = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_exact(&mut preface)).await;
    let decision = match (read, Stream::of(&preface)) {
        (Ok(Ok(_)), Some(_)) if !serves => Err(Status::unimplemented(
            "this replica serves no framed streams (Byzantine mode): use gRPC",
        )),
        (Ok(Ok(_)), Some(stream)) if tls => {
            crate::tls::authorize_caller(stream.path(), caller, members).map(|_| stream)
        }
        (Ok(Ok(_)), Some(stream)) => Ok(stream),
        (Ok(Ok(_)), None) => Err(Status::unimplemented(format!(
            "unknown framed stream {:?}",
            String::from_utf8_lossy(&preface)
        ))),
        _ => {
            tracing::debug!(?remote, "no framed preface: connection closed");
            return None;
        }
    };
    let open = match &decision {
        Ok(_) => FramedOpen::default(),
        Err(status) => FramedOpen {
            code: status.code() as u32,
            message: status.message().to_string(),
            epoch: crate::tls::refused_epoch(status).unwrap_or(0),
        },
    };
    let mut buf = Vec::new();
    push_frame(&mut buf, &open);
    let answered = writer.write_all(&buf).await.is_ok() && writer.flush().await.is_ok();
    match decision {
        Ok(stream) if answered => Some((stream, reader, writer, remote)),
        _ => {
            let _ = writer.shutdown().await;
            None
        }
    }
}

/// Write each answer as it is ready; those ready together go out in one write. An error ends
/// the connection (after the answers before it).
async fn write_answers<W: AsyncWrite + Unpin, M: Message>(
    mut writer: W,
    mut answers: Pin<Box<dyn futures::Stream<Item = Result<M, Status>> + Send>>,
) {
    let mut buf = Vec::with_capacity(256);
    while let Some(Ok(first)) = answers.next().await {
        emptied(&mut buf);
        push_frame(&mut buf, &first);
        let mut failed = false;
        while let Some(ready) = answers.next().now_or_never() {
            match ready {
                Some(Ok(more)) => push_frame(&mut buf, &more),
                _ => {
                    failed = true;
                    break;
                }
            }
        }
        if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() || failed {
            break;
        }
    }
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_pki::{Ca, ca, issue};
    use crate::tls::{PeerIdentity, Role};
    use lockstep_proto::AppendResponse;
    use std::sync::Arc;

    fn transport(ca: &Ca, role: Role, name: &str) -> Transport {
        let (cert, key) = issue(ca, &PeerIdentity::new(role, name));
        Transport::from_pem(ca.pem.clone().into(), cert.into(), key.into(), name.into()).unwrap()
    }

    /// Members "a" and "b", at epoch 7.
    fn members() -> Membership {
        Arc::new(|id: &str| match id {
            "a" | "b" => Ok(()),
            _ => Err(("not a member of epoch 7 (a, b)".into(), 7)),
        })
    }

    /// A replica "b" that admits framed connections (if it `serves` them) and answers each
    /// Append with its last index.
    async fn backup(ca: &Ca, serves: bool) -> String {
        let server = transport(ca, Role::Replica, "b");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let mut incoming = server.incoming(listener);
        tokio::spawn(async move {
            while let Some(Ok(conn)) = incoming.next().await {
                assert!(conn.is_framed(), "chosen by ALPN");
                tokio::spawn(async move {
                    let Some((Stream::Replicate, mut r, mut w, _)) = admit(conn, serves, &members()).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    while read_frame(&mut r, &mut buf, MAX_MESSAGE_BYTES).await.is_ok() {
                        let req = ReplicateRequest::decode(&buf[..]).unwrap();
                        let Some(lockstep_proto::replicate_request::Kind::Append(a)) = req.kind else {
                            return;
                        };
                        let mut out = Vec::new();
                        push_frame(
                            &mut out,
                            &AppendResponse {
                                success: true,
                                match_index: a.prev_index + a.entries.len() as u64,
                                ..Default::default()
                            },
                        );
                        w.write_all(&out).await.unwrap();
                    }
                });
            }
        });
        address
    }

    fn append(prev_index: u64) -> ReplicateRequest {
        ReplicateRequest {
            kind: Some(lockstep_proto::replicate_request::Kind::Append(
                lockstep_proto::AppendRequest {
                    prev_index,
                    entries: vec![lockstep_proto::LogEntry::default(); 2],
                    ..Default::default()
                },
            )),
        }
    }

    const WAIT: Duration = Duration::from_secs(5);

    async fn open_replicate(
        t: &Transport,
        address: &str,
    ) -> Result<(mpsc::Sender<ReplicateRequest>, Answers<AppendResponse>), OpenError> {
        open(t, address, Stream::Replicate, 8, WAIT).await
    }

    #[tokio::test]
    async fn a_member_replicates_over_mutual_tls_and_answers_come_in_order() {
        let ca = ca();
        let address = backup(&ca, true).await;
        let a = transport(&ca, Role::Replica, "a");
        let (requests, mut answers) = open_replicate(&a, &format!("https://{address}")).await.unwrap();
        for i in 0..5 {
            requests.send(append(10 * i)).await.unwrap();
        }
        for i in 0..5 {
            let answer = answers.next().await.unwrap().unwrap();
            assert_eq!(answer.match_index, 10 * i + 2);
        }
    }

    #[tokio::test]
    async fn a_non_member_is_refused_with_the_epoch_and_a_client_identity_with_why() {
        let ca = ca();
        let address = backup(&ca, true).await;
        let Err(OpenError::Failed(status)) = open_replicate(&transport(&ca, Role::Replica, "c"), &address).await else {
            panic!("a replica outside the configuration must be refused");
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(crate::tls::refused_epoch(&status), Some(7), "{status:?}");
        assert!(status.message().contains("not a member of epoch 7"), "{status:?}");
        let Err(OpenError::Failed(status)) = open_replicate(&transport(&ca, Role::Client, "app"), &address).await
        else {
            panic!("a client identity must be refused");
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("needs a replica identity"), "{status:?}");
    }

    #[tokio::test]
    async fn a_replica_without_framed_streams_sends_the_opener_to_grpc() {
        let ca = ca();
        let address = backup(&ca, false).await;
        match open_replicate(&transport(&ca, Role::Replica, "a"), &address).await {
            Err(OpenError::NotSupported(why)) => assert!(why.contains("Byzantine"), "{why}"),
            other => panic!("expected NotSupported, got {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn a_replica_from_before_the_transport_is_told_apart_from_a_failure() {
        let ca = ca();
        // An older replica's TLS server offers HTTP/2 only.
        let b = transport(&ca, Role::Replica, "b");
        let mut old = (*b.current().unwrap().server).clone();
        old.alpn_protocols = vec![b"h2".to_vec()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(old));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let a = transport(&ca, Role::Replica, "a");
        match open_replicate(&a, &address).await {
            Err(OpenError::NotSupported(why)) => assert!(why.contains("NoApplicationProtocol"), "{why}"),
            other => panic!("expected NotSupported, got {:?}", other.err()),
        }
        // Nobody listening is a failure, not an older replica.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap().to_string();
        drop(closed);
        assert!(matches!(open_replicate(&a, &gone).await, Err(OpenError::Failed(_))));
    }

    #[test]
    fn host_port_takes_every_form_of_an_endpoint() {
        assert_eq!(host_port("http://127.0.0.1:7000").unwrap(), ("127.0.0.1".into(), 7000));
        assert_eq!(
            host_port("https://r-0.r.ns.svc:7000/").unwrap(),
            ("r-0.r.ns.svc".into(), 7000)
        );
        assert_eq!(host_port("localhost:1").unwrap(), ("localhost".into(), 1));
        assert_eq!(host_port("[::1]:9").unwrap(), ("::1".into(), 9));
        assert!(host_port("no-port").is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_an_oversized_length_is_refused_unread() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msg = AppendResponse {
            epoch: 3,
            success: true,
            match_index: 42,
            ..Default::default()
        };
        let mut buf = Vec::new();
        push_frame(&mut buf, &msg);
        push_frame(&mut buf, &msg);
        a.write_all(&buf).await.unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            read_frame(&mut b, &mut got, 1024).await.unwrap();
            assert_eq!(AppendResponse::decode(&got[..]).unwrap(), msg);
        }
        let err = read_frame(&mut b, &mut got, 1024).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("at most 1024"), "{err}");
    }

    #[tokio::test]
    async fn a_buffer_grown_by_a_snapshot_is_given_back() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let big = lockstep_proto::InstallSnapshotRequest {
            snapshot: Some(lockstep_proto::Snapshot {
                data: vec![7; 3 << 20],
                ..Default::default()
            }),
            ..Default::default()
        };
        let small = AppendResponse::default();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            push_frame(&mut buf, &big);
            push_frame(&mut buf, &small);
            a.write_all(&buf).await.unwrap();
        });
        let mut got = Vec::new();
        read_frame(&mut b, &mut got, MAX_MESSAGE_BYTES).await.unwrap();
        assert!(got.len() > 3 << 20);
        read_frame(&mut b, &mut got, MAX_MESSAGE_BYTES).await.unwrap();
        assert!(got.capacity() <= KEEP_BUFFER_BYTES, "{} bytes kept", got.capacity());
    }
}
