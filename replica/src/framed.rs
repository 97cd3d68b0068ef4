//! The framed replication transport: the primary's replication stream to one peer without
//! gRPC (docs/fail-stop-replication.md, "Framed transport").
//!
//! The same messages as `Peer/Replicate` (`ReplicateRequest` one way, `AppendResponse` the
//! other, answered in order), each behind a 4-byte big-endian length, on a connection of
//! their own to the replica's gRPC port. With TLS the primary offers only ALPN
//! `lockstep-replicate/1`; in plaintext it starts with the 8 bytes [`PREFACE`], which it sends
//! in both cases. The backup's first frame is a `ReplicateOpen`: accepted, or refused with a
//! gRPC status code (the membership check the gRPC server's authorization layer makes).
//!
//! A replica from before this transport does not know the protocol: the TLS handshake fails
//! for want of a common ALPN protocol, or (plaintext) its HTTP/2 server drops the connection
//! without an answer. The primary then uses the gRPC stream to that peer for the rest of the
//! epoch ([`OpenError::NotSupported`]), so a rolling upgrade mixes versions safely.

use crate::server::{ReplicateStream, Services};
use crate::tls::{Conn, Membership, Transport};
use futures::{FutureExt as _, StreamExt as _};
use lockstep_proto::{AppendResponse, MAX_MESSAGE_BYTES, ReplicateOpen, ReplicateRequest};
use prost::Message;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Status;
use tonic::transport::server::Connected;

/// What a primary sends first on a framed replication connection.
pub const PREFACE: &[u8; 8] = b"LSREPL/1";

/// The gRPC path whose access rule the framed transport follows.
pub const PATH: &str = "/lockstep.v1.Peer/Replicate";

/// The answers of a replication stream, in the order of the requests.
pub type Answers = Pin<Box<dyn Stream<Item = Result<AppendResponse, Status>> + Send>>;

/// Why a framed replication stream did not open.
#[derive(Debug)]
pub enum OpenError {
    /// The peer does not speak the framed transport (a replica from before it).
    NotSupported(String),
    /// It does, and the connection failed or the stream was refused.
    Failed(Status),
}

/// Open a framed replication stream to `endpoint` (`host:port`, with or without a scheme):
/// the requests put in the returned sender go out in order (a writer task sends each as soon
/// as it is put there, several at once when they queue up), the answers come back in order.
/// Dropping both ends closes the connection.
pub async fn open(
    transport: &Transport,
    endpoint: &str,
    capacity: usize,
    timeout: Duration,
) -> Result<(mpsc::Sender<ReplicateRequest>, Answers), OpenError> {
    let (host, port) = host_port(endpoint).map_err(|e| OpenError::Failed(Status::invalid_argument(e)))?;
    let failed = |what: &str, e: &dyn std::fmt::Display| OpenError::Failed(Status::unavailable(format!("{what}: {e}")));
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| failed("tcp connect", &"timed out"))?
        .map_err(|e| failed("tcp connect error", &e))?;
    let _ = tcp.set_nodelay(true);
    let Some(loaded) = transport.current() else {
        return start(tcp, capacity, timeout, false).await;
    };
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| failed("TLS server name", &e))?;
    let connector = tokio_rustls::TlsConnector::from(loaded.replicate.clone());
    let tls = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => return Err(failed("TLS handshake", &"timed out")),
        Ok(Err(e)) if no_common_protocol(&e) => {
            return Err(OpenError::NotSupported(format!("TLS: {e}")));
        }
        Ok(Err(e)) => return Err(failed("TLS handshake", &e)),
        Ok(Ok(tls)) => tls,
    };
    if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_REPLICATE) {
        return Err(OpenError::NotSupported(
            "the server chose no lockstep-replicate/1 (ALPN)".into(),
        ));
    }
    start(tls, capacity, timeout, true).await
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
        .map_err(|err| format!("bad peer address {e}: {err}"))?;
    let host = uri.host().ok_or_else(|| format!("no host in {e}"))?;
    let port = uri.port_u16().ok_or_else(|| format!("no port in {e}"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// Send the preface, read the backup's `ReplicateOpen`, then run the connection.
async fn start<S>(
    mut io: S,
    capacity: usize,
    timeout: Duration,
    tls: bool,
) -> Result<(mpsc::Sender<ReplicateRequest>, Answers), OpenError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let opened = tokio::time::timeout(timeout, async {
        io.write_all(PREFACE).await?;
        io.flush().await?;
        let mut buf = Vec::new();
        read_frame(&mut io, &mut buf, 64 * 1024).await?;
        ReplicateOpen::decode(&buf[..]).map_err(std::io::Error::other)
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
    if open.code != 0 {
        return Err(OpenError::Failed(refusal(&open)));
    }
    let (reader, writer) = tokio::io::split(io);
    let (requests, rx) = mpsc::channel(capacity);
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(write_requests(writer, rx, closed_rx));
    Ok((requests, read_answers(BufReader::new(reader), closed_tx)))
}

/// A refusal as the status a refused gRPC call would have carried.
fn refusal(open: &ReplicateOpen) -> Status {
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

/// The primary's writer: every request queued at the moment goes out in one write. Ends when
/// the senders are gone or the answers' reader is dropped (`closed`), even in the middle of a
/// write to a peer that stopped reading.
async fn write_requests<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<ReplicateRequest>,
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

/// The answers of the primary's stream, until the connection ends.
fn read_answers<R: AsyncRead + Unpin + Send + 'static>(reader: R, closed: oneshot::Sender<()>) -> Answers {
    let state = (reader, Vec::new(), closed, false);
    Box::pin(futures::stream::unfold(
        state,
        |(mut r, mut buf, closed, ended)| async move {
            if ended {
                return None;
            }
            let answer = match read_frame(&mut r, &mut buf, MAX_MESSAGE_BYTES).await {
                Ok(()) => AppendResponse::decode(&buf[..])
                    .map_err(|e| Status::internal(format!("undecodable answer from the peer: {e}"))),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
                Err(e) => Err(Status::unavailable(format!("replication connection: {e}"))),
            };
            let ended = answer.is_err();
            Some((answer, (r, buf, closed, ended)))
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

/// The backup's side of one framed connection: check the preface and the caller, then answer
/// the requests as the gRPC stream would ([`Services::replicate_answers`]). A malformed frame
/// ends the connection, never the replica.
pub async fn serve(conn: Conn, services: Services, members: Membership) {
    let Some((reader, writer, remote)) = admit(conn, &members).await else {
        return;
    };
    services.shared.metrics.count_peer_call("ReplicateFramed");
    let answers = services.replicate_answers(read_requests(reader, remote));
    write_answers(writer, answers).await;
}

type Halves = (
    BufReader<tokio::io::ReadHalf<Conn>>,
    tokio::io::WriteHalf<Conn>,
    Option<std::net::SocketAddr>,
);

/// Read the preface, decide the caller (TLS: a member of this replica's configuration, as
/// for `Peer/Replicate`) and answer with a `ReplicateOpen`. None: the connection is closed.
async fn admit(conn: Conn, members: &Membership) -> Option<Halves> {
    let tls = conn.is_tls();
    let info = conn.connect_info();
    let (caller, remote) = (info.identity.map(|id| id.as_ref().clone()), info.remote);
    let (reader, mut writer) = tokio::io::split(conn);
    let mut reader = BufReader::new(reader);
    let mut preface = [0u8; 8];
    match tokio::time::timeout(Duration::from_secs(5), reader.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == PREFACE => {}
        _ => {
            tracing::debug!(?remote, "not a framed replication preface: connection closed");
            return None;
        }
    }
    let decision = if tls {
        crate::tls::authorize_caller(PATH, caller, members).map(|_| ())
    } else {
        Ok(())
    };
    let open = match &decision {
        Ok(()) => ReplicateOpen::default(),
        Err(status) => ReplicateOpen {
            code: status.code() as u32,
            message: status.message().to_string(),
            epoch: crate::tls::refused_epoch(status).unwrap_or(0),
        },
    };
    let mut buf = Vec::new();
    push_frame(&mut buf, &open);
    if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() || decision.is_err() {
        let _ = writer.shutdown().await;
        return None;
    }
    Some((reader, writer, remote))
}

/// The requests of one framed connection, until it ends or a frame is malformed.
fn read_requests<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    remote: Option<std::net::SocketAddr>,
) -> Pin<Box<dyn Stream<Item = ReplicateRequest> + Send>> {
    Box::pin(futures::stream::unfold(
        (reader, Vec::new()),
        move |(mut r, mut buf)| async move {
            match read_frame(&mut r, &mut buf, MAX_MESSAGE_BYTES).await {
                Ok(()) => match ReplicateRequest::decode(&buf[..]) {
                    Ok(msg) => Some((msg, (r, buf))),
                    Err(e) => {
                        tracing::warn!(?remote, "undecodable replication request: {e}; connection closed");
                        None
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                Err(e) => {
                    tracing::warn!(?remote, "replication connection: {e}; closed");
                    None
                }
            }
        },
    ))
}

/// Write each answer as it is ready; those ready together go out in one write.
async fn write_answers<W: AsyncWrite + Unpin>(mut writer: W, mut answers: ReplicateStream) {
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

    /// A replica "b" that admits framed connections and echoes each request's last index.
    async fn backup(ca: &Ca) -> String {
        let server = transport(ca, Role::Replica, "b");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let mut incoming = server.incoming(listener);
        tokio::spawn(async move {
            while let Some(Ok(conn)) = incoming.next().await {
                assert!(conn.is_framed_replication(), "chosen by ALPN");
                tokio::spawn(async move {
                    let Some((mut r, mut w, _)) = admit(conn, &members()).await else {
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

    #[tokio::test]
    async fn a_member_replicates_over_mutual_tls_and_answers_come_in_order() {
        let ca = ca();
        let address = backup(&ca).await;
        let a = transport(&ca, Role::Replica, "a");
        let (requests, mut answers) = open(&a, &format!("https://{address}"), 8, WAIT).await.unwrap();
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
        let address = backup(&ca).await;
        let Err(OpenError::Failed(status)) = open(&transport(&ca, Role::Replica, "c"), &address, 8, WAIT).await else {
            panic!("a replica outside the configuration must be refused");
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(crate::tls::refused_epoch(&status), Some(7), "{status:?}");
        assert!(status.message().contains("not a member of epoch 7"), "{status:?}");
        let Err(OpenError::Failed(status)) = open(&transport(&ca, Role::Client, "app"), &address, 8, WAIT).await else {
            panic!("a client identity must be refused");
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("needs a replica identity"), "{status:?}");
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
        match open(&a, &address, 8, WAIT).await {
            Err(OpenError::NotSupported(why)) => assert!(why.contains("NoApplicationProtocol"), "{why}"),
            other => panic!("expected NotSupported, got {:?}", other.err()),
        }
        // Nobody listening is a failure, not an older replica.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap().to_string();
        drop(closed);
        assert!(matches!(open(&a, &gone, 8, WAIT).await, Err(OpenError::Failed(_))));
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
