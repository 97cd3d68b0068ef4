//! What one primary -> backup hop costs per transport, without a disk: a ping-pong of
//! one-entry Appends (a 256-byte command) between two processes on loopback, answered at once.
//!
//! `cargo run --release -p lockstep-replica --example hop_latency -- [grpc|framed] [tls|plain] [N] [threads]`
//!
//! `grpc` is today's `Replicate` stream (tonic, HTTP/2); `framed` is the same protobuf messages,
//! each behind a 4-byte length, on the bare connection. Both use the replica's own TLS
//! configuration (mutual TLS, ring) and hand each request to a writer task through a channel
//! as the primary's outbox does.
use lockstep_proto::peer_client::PeerClient;
use lockstep_proto::peer_server::{Peer, PeerServer};
use lockstep_proto::{
    AppendRequest, AppendResponse, Command, InstallSnapshotRequest, LogEntry, ReplicateRequest, log_entry,
    replicate_request::Kind,
};
use lockstep_replica::tls::{Loaded, PeerIdentity, Role, Transport};
use prost::Message;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use std::io::{BufRead, Write};
use std::pin::Pin;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

fn pki(dir: &std::path::Path) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(rcgen::DnType::CommonName, "hop CA");
    let ca_pem = params.self_signed(&key).unwrap().pem();
    let issuer = Issuer::new(params, key);
    std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
    for name in ["a", "b"] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let who = PeerIdentity::new(Role::Replica, name);
        p.subject_alt_names.push(SanType::URI(who.uri().try_into().unwrap()));
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        std::fs::write(
            dir.join(format!("{name}.pem")),
            p.signed_by(&key, &issuer).unwrap().pem(),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn loaded(dir: &std::path::Path, name: &str) -> Loaded {
    let r = |f: String| std::fs::read(dir.join(f)).unwrap();
    Loaded::from_pem(
        &r("ca.pem".into()),
        &r(format!("{name}.pem")),
        &r(format!("{name}.key")),
    )
    .unwrap()
}

fn answer(req: &ReplicateRequest) -> AppendResponse {
    let index = match &req.kind {
        Some(Kind::Append(a)) => a.entries.last().map_or(a.prev_index, |e| e.index),
        _ => 0,
    };
    AppendResponse {
        epoch: 1,
        success: true,
        match_index: index,
        ..Default::default()
    }
}

#[derive(Clone)]
struct Echo;

#[tonic::async_trait]
impl Peer for Echo {
    type ReplicateStream = Pin<Box<dyn Stream<Item = Result<AppendResponse, Status>> + Send>>;
    async fn replicate(
        &self,
        request: Request<tonic::Streaming<ReplicateRequest>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if tx.send(Ok(answer(&m))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
    async fn append(&self, _: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn install_snapshot(&self, _: Request<InstallSnapshotRequest>) -> Result<Response<AppendResponse>, Status> {
        Err(Status::unimplemented(""))
    }
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let len = r.read_u32().await? as usize;
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin, M: Message>(w: &mut W, m: &M, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    buf.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
    m.encode(buf).unwrap();
    w.write_all(buf).await?;
    w.flush().await
}

async fn serve_framed<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let (mut rbuf, mut wbuf) = (Vec::new(), Vec::new());
    while read_frame(&mut s, &mut rbuf).await.is_ok() {
        let req = ReplicateRequest::decode(&rbuf[..]).unwrap();
        if write_frame(&mut s, &answer(&req), &mut wbuf).await.is_err() {
            break;
        }
    }
}

async fn serve(kind: String, tls: bool, dir: std::path::PathBuf) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    if kind == "grpc" {
        let t = if tls {
            let r = |f: &str| std::fs::read(dir.join(f)).unwrap();
            Transport::from_pem(r("ca.pem"), r("b.pem"), r("b.key"), "hop".into()).unwrap()
        } else {
            Transport::plaintext()
        };
        t.server()
            .add_service(PeerServer::new(Echo))
            .serve_with_incoming(t.incoming(listener))
            .await
            .unwrap();
        return;
    }
    let server = loaded(&dir, "b").server.clone();
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        if tls {
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            tokio::spawn(async move { serve_framed(acceptor.accept(tcp).await.unwrap()).await });
        } else {
            tokio::spawn(serve_framed(tcp));
        }
    }
}

fn request(i: u64) -> ReplicateRequest {
    ReplicateRequest {
        kind: Some(Kind::Append(AppendRequest {
            epoch: 1,
            primary_id: "a".into(),
            prev_index: i - 1,
            prev_epoch: 1,
            commit_index: i - 1,
            entries: vec![LogEntry {
                index: i,
                epoch: 1,
                body: Some(log_entry::Body::Command(Command {
                    client_id: "bench-client-0".into(),
                    sequence: i,
                    payload: vec![b'x'; 256],
                })),
            }],
            ..Default::default()
        })),
    }
}

/// Round trips of `n` requests; each goes to the writer task through a channel (as the
/// primary's outbox does), the answer is read here.
async fn grpc_rounds(port: u16, tls: bool, dir: &std::path::Path, n: u64) -> Vec<f64> {
    let t = if tls {
        let r = |f: &str| std::fs::read(dir.join(f)).unwrap();
        Transport::from_pem(r("ca.pem"), r("a.pem"), r("a.key"), "hop".into()).unwrap()
    } else {
        Transport::plaintext()
    };
    let ch = t
        .endpoint(&format!("127.0.0.1:{port}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut answers = PeerClient::new(ch)
        .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    for i in 1..=n {
        let t0 = Instant::now();
        tx.send(request(i)).await.unwrap();
        let a = answers.message().await.unwrap().unwrap();
        assert_eq!(a.match_index, i);
        out.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    out
}

async fn framed_rounds<S: AsyncRead + AsyncWrite + Send + 'static>(s: S, n: u64) -> Vec<f64> {
    let (mut r, mut w) = tokio::io::split(s);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ReplicateRequest>(8);
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(m) = rx.recv().await {
            write_frame(&mut w, &m, &mut buf).await.unwrap();
        }
    });
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for i in 1..=n {
        let t0 = Instant::now();
        tx.send(request(i)).await.unwrap();
        read_frame(&mut r, &mut buf).await.unwrap();
        assert_eq!(AppendResponse::decode(&buf[..]).unwrap().match_index, i);
        out.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    out
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    if arg(0, "") == "serve" {
        let threads = arg(3, "0").parse().unwrap();
        runtime(threads).block_on(serve(arg(1, ""), arg(2, "") == "tls", arg(4, "").into()));
        return;
    }
    let (kind, tls, n, threads) = (arg(0, "grpc"), arg(1, "tls"), arg(2, "5000"), arg(3, "0"));
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["serve", &kind, &tls, &threads, dir.path().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let (n, tls_on): (u64, bool) = (n.parse().unwrap(), tls == "tls");
    let mut rounds = runtime(threads.parse().unwrap()).block_on(async {
        if kind == "grpc" {
            return grpc_rounds(port, tls_on, dir.path(), n).await;
        }
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        if tls_on {
            let c = tokio_rustls::TlsConnector::from(loaded(dir.path(), "a").client.clone());
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
            framed_rounds(c.connect(name, tcp).await.unwrap(), n).await
        } else {
            framed_rounds(tcp, n).await
        }
    });
    child.kill().ok();
    child.wait().ok();
    rounds.drain(..rounds.len() / 10); // warm-up
    rounds.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| rounds[((rounds.len() - 1) as f64 * p) as usize];
    println!(
        "{kind} {tls} threads={threads}: round trip p50 {:.0} µs, p90 {:.0}, p99 {:.0} ({} rounds)",
        q(0.5),
        q(0.9),
        q(0.99),
        rounds.len()
    );
}
