//! Certificates that change under a running process (rotation, docs/security.md).
//!
//! A [`Store`] holds the current TLS material of a process and, when it came from files,
//! looks at the files again at most once per [`CHECK_EVERY`] — on the next handshake (in or
//! out) after that, so an idle process does no I/O. A change of any file's mtime, size or
//! inode (Kubernetes swaps a Secret mount atomically through a symlink) re-reads all three;
//! the new material replaces the old only if it is complete and consistent (the key belongs to
//! the certificate, the CA parses, the identity is the same), else the old one stays and a WARN
//! says why. Each loaded material is one rustls `ServerConfig` and one `ClientConfig`, so a
//! handshake uses the certificate, key and CA of one moment: the client verifier follows a
//! changed CA bundle as the certificate does. Established connections keep what they
//! negotiated (certificates are checked at the handshake only).

use super::{HANDSHAKE_TIMEOUT, PeerIdentity};
use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How often the files are looked at (at most; only when a handshake needs them).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

const ALPN_H2: &[u8] = b"h2";
/// The framed transport's protocol name (`crate::framed`): its opener offers only it, so a
/// replica from before it fails the handshake (no common protocol) and the opener falls back
/// to gRPC.
pub const ALPN_FRAMED: &[u8] = b"lockstep-framed/1";

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// One consistent set of CA, certificate and key, ready for handshakes.
pub struct Loaded {
    pub identity: PeerIdentity,
    /// The leaf certificate (DER).
    pub leaf: CertificateDer<'static>,
    /// Its serial number (hex), for logs.
    pub serial: String,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// The client side of the framed transport (ALPN `lockstep-framed/1`).
    pub framed: Arc<ClientConfig>,
}

/// The serial number of a DER certificate, hex.
pub fn serial_of(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der).map_or_else(|_| "?".into(), |(_, c)| hex::encode(c.raw_serial()))
}

impl Loaded {
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> anyhow::Result<Loaded> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .context("unreadable PEM certificate")?;
        let leaf = chain.first().context("no certificate in it")?.clone();
        let identity = PeerIdentity::from_certificate(&leaf).map_err(anyhow::Error::msg)?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            roots
                .add(c.context("unreadable PEM CA certificate")?)
                .context("unusable CA certificate")?;
        }
        anyhow::ensure!(!roots.is_empty(), "no CA certificate");
        let key = PrivateKeyDer::from_pem_slice(key).context("unreadable PEM private key")?;
        let roots = Arc::new(roots);
        let p = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
            .build()
            .context("CA for client certificates")?;
        let mut server = ServerConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("the certificate and key do not belong together")?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_FRAMED.to_vec()];
        let mut client = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("the certificate and key do not belong together")?;
        let mut framed = client.clone();
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        framed.alpn_protocols = vec![ALPN_FRAMED.to_vec()];
        Ok(Loaded {
            identity,
            serial: serial_of(&leaf),
            leaf,
            server: Arc::new(server),
            client: Arc::new(client),
            framed: Arc::new(framed),
        })
    }
}

/// The three files, and what they looked like when last read.
struct Files {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// mtime, size and inode of each file (followed through symlinks); None where unreadable.
type Stamp = [Option<(SystemTime, u64, u64)>; 3];

impl Files {
    fn stamp(&self) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let one = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        };
        [one(&self.ca), one(&self.cert), one(&self.key)]
    }

    fn load(&self) -> anyhow::Result<Loaded> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        Loaded::from_pem(&read(&self.ca)?, &read(&self.cert)?, &read(&self.key)?)
            .with_context(|| format!("TLS certificate {} (CA {})", self.cert.display(), self.ca.display()))
    }
}

struct State {
    current: Arc<Loaded>,
    stamp: Stamp,
    checked: Instant,
    /// Changes of the files that were not loaded (unusable, or another identity).
    refused: u64,
}

/// The current material of a process; see the module documentation.
pub struct Store {
    /// The identity, fixed for the life of the process (a reload must keep it).
    pub identity: PeerIdentity,
    /// Where it was loaded from (for messages).
    pub source: String,
    files: Option<Files>,
    state: Mutex<State>,
}

impl Store {
    /// Material that never changes (issued in memory).
    pub fn fixed(loaded: Loaded, source: String) -> Store {
        Store {
            identity: loaded.identity.clone(),
            source,
            files: None,
            state: Mutex::new(State {
                current: Arc::new(loaded),
                stamp: [None, None, None],
                checked: Instant::now(),
                refused: 0,
            }),
        }
    }

    /// Material from files, looked at again when they change.
    pub fn watch(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Store> {
        let files = Files {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        };
        let stamp = files.stamp();
        let loaded = files.load()?;
        Ok(Store {
            identity: loaded.identity.clone(),
            source: cert.display().to_string(),
            state: Mutex::new(State {
                current: Arc::new(loaded),
                stamp,
                checked: Instant::now(),
                refused: 0,
            }),
            files: Some(files),
        })
    }

    /// The material to use for a handshake now (reloaded first if the files changed).
    pub fn current(&self) -> Arc<Loaded> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(files) = &self.files
            && s.checked.elapsed() >= CHECK_EVERY
        {
            s.checked = Instant::now();
            let stamp = files.stamp();
            if stamp != s.stamp {
                // A failed read is not retried until the files change again (one WARN per
                // change, not one per second); a half-written pair changes again when done.
                s.stamp = stamp;
                match files.load() {
                    Ok(new) if new.identity != self.identity => {
                        s.refused += 1;
                        tracing::warn!(
                            source = %self.source,
                            "TLS files changed to a certificate of {}, not of {}: keeping the certificate loaded before (serial {})",
                            new.identity, self.identity, s.current.serial
                        )
                    }
                    // The same certificate: the CA bundle changed (or only the mtimes).
                    Ok(new) if new.leaf == s.current.leaf => {
                        tracing::info!(source = %self.source, serial = %new.serial,
                            "TLS files reloaded, same certificate: new handshakes verify with the CA bundle read now");
                        s.current = Arc::new(new);
                    }
                    Ok(new) => {
                        tracing::info!(
                            source = %self.source, old_serial = %s.current.serial, serial = %new.serial,
                            "TLS certificate reloaded: new handshakes use it"
                        );
                        s.current = Arc::new(new);
                    }
                    Err(e) => {
                        s.refused += 1;
                        tracing::warn!(
                            source = %self.source,
                            "TLS files changed but are not usable, keeping the certificate loaded before (serial {}): {e:#}",
                            s.current.serial
                        )
                    }
                }
            }
        }
        s.current.clone()
    }

    /// Replace the material in place (a certificate issued in memory again): every clone
    /// of the transport uses it from its next handshake on. It must keep the identity.
    pub fn replace(&self, loaded: Loaded) -> anyhow::Result<()> {
        anyhow::ensure!(
            loaded.identity == self.identity,
            "a certificate of {} cannot replace one of {}",
            loaded.identity,
            self.identity
        );
        self.state.lock().unwrap_or_else(|e| e.into_inner()).current = Arc::new(loaded);
        Ok(())
    }

    /// How many changes of the files were refused (kept the certificate before).
    pub fn refused(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).refused
    }
}

/// What the server knows of a connection: request extension of every request on it
/// (`tls::caller` reads the client certificate from it).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The client's verified certificate chain (TLS), leaf first.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The identity in the leaf, parsed once per connection (not once per request: parsing
    /// the certificate was 2.4% of a Byzantine replica's CPU when it ran per request).
    pub identity: Option<Arc<Result<PeerIdentity, String>>>,
}

/// An accepted connection: plaintext (`--insecure`) or TLS after the handshake.
pub struct Conn {
    io: ConnIo,
    framed: bool,
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    /// The framed transport (`crate::framed`), not gRPC.
    pub fn is_framed(&self) -> bool {
        self.framed
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.io, ConnIo::Tls(_))
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match &self.io {
            ConnIo::Plain(s) => ConnInfo {
                remote: s.peer_addr().ok(),
                peer_certs: None,
                identity: None,
            },
            ConnIo::Tls(s) => {
                let (tcp, session) = s.get_ref();
                let peer_certs = session.peer_certificates().map(|c| Arc::new(c.to_vec()));
                let identity = peer_certs.as_ref().map(|certs| {
                    Arc::new(
                        certs
                            .first()
                            .ok_or_else(|| "empty certificate chain".to_string())
                            .and_then(|leaf| PeerIdentity::from_certificate(leaf)),
                    )
                });
                ConnInfo {
                    remote: tcp.peer_addr().ok(),
                    peer_certs,
                    identity,
                }
            }
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            ConnIo::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ConnIo::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Accepted connections of `listener` for `serve_with_incoming`: TCP_NODELAY set (without it
/// a reply can sit ~40 ms behind the peer's delayed ACK), and with `store` the TLS handshake
/// done with the material current at that moment. Handshakes run in their own tasks with a
/// bound, so a slow or failing client holds up no other; the stream never ends on an error
/// (an accept error, EMFILE say, is logged and accepting goes on). Each connection says
/// whether it is the framed transport ([`Conn::is_framed`]): by its ALPN with TLS, by its
/// first byte in plaintext (`L` of its preface, where gRPC starts with the `P` of HTTP/2's).
pub fn incoming(
    listener: TcpListener,
    store: Option<Arc<Store>>,
) -> tokio_stream::wrappers::ReceiverStream<Result<Conn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept on the gRPC port failed: {e}");
                    // Back off: a full file table fails every accept at once.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(store) = &store else {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    // A caller that sends nothing (a TCP probe) is dropped after the bound.
                    if let Ok(Ok(1)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                        let framed = first[0] == crate::framed::FIRST_BYTE;
                        let _ = tx
                            .send(Ok(Conn {
                                io: ConnIo::Plain(tcp),
                                framed,
                            }))
                            .await;
                    }
                });
                continue;
            };
            let (store, tx) = (store.clone(), tx.clone());
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(store.current().server.clone());
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        if tracing::enabled!(tracing::Level::DEBUG)
                            && let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                        {
                            // Which certificate a caller presented (a peer after a rotation).
                            let who = PeerIdentity::from_certificate(leaf).map_or_else(|e| e, |id| id.to_string());
                            tracing::debug!(%remote, caller = %who, serial = %serial_of(leaf), "TLS connection");
                        }
                        let framed = tls.get_ref().1.alpn_protocol() == Some(ALPN_FRAMED);
                        let _ = tx
                            .send(Ok(Conn {
                                io: ConnIo::Tls(Box::new(tls)),
                                framed,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A connection that failed before anything was sent. Its message starts like hyper's
/// ("tcp connect error", "dns error"): clients tell a request that was never sent by it.
#[derive(Debug)]
pub struct ConnectFailed(pub String);

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectFailed {}

/// The connector of a TLS channel: TCP, then a TLS handshake with the material current at
/// that moment (a rotated certificate is presented from the next connection on).
#[derive(Clone)]
pub struct Connector {
    pub store: Arc<Store>,
    /// The name to verify the server's certificate for; else the host dialled.
    pub server_name: Option<String>,
    pub nodelay: bool,
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<http::Uri> for Connector {
    type Response = Io;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Io, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = host_of(&uri);
            let tcp = connect_tcp(host, uri.port_u16().unwrap_or(443), this.nodelay).await?;
            let name = this.server_name.as_deref().unwrap_or(host);
            let tls = handshake(this.store.current().client.clone(), name, tcp).await?;
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err("the server did not negotiate HTTP/2 (ALPN h2)".into());
            }
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// The host of `uri`, without the brackets of an IPv6 address.
pub fn host_of(uri: &http::Uri) -> &str {
    uri.host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// A TCP connection to `host:port`, trying each address the name resolves to, with
/// TCP_NODELAY if asked. Errors are worded as hyper's (`dns error`, `tcp connect error`):
/// clients tell from them that nothing was sent.
pub async fn connect_tcp(host: &str, port: u16, nodelay: bool) -> Result<TcpStream, ConnectFailed> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ConnectFailed(format!("dns error: {e}")))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(tcp) => {
                if nodelay {
                    let _ = tcp.set_nodelay(true);
                }
                return Ok(tcp);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ConnectFailed(match last {
        Some(e) => format!("tcp connect error: {e}"),
        None => format!("dns error: no address for {host}"),
    }))
}

/// The TLS handshake of an outgoing connection with `config` (its ALPN offer included),
/// verifying the server's certificate for `name`, within the handshake bound.
pub async fn handshake(
    config: Arc<ClientConfig>,
    name: &str,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(name.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS server name {name}: {e}")))?;
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Role;
    use crate::tls::test_pki::{Ca, ca, issue};

    /// The files as a Kubernetes Secret volume has them: `tls.crt -> ..data/tls.crt`, and a
    /// change makes a new directory and swaps the `..data` symlink to it (atomically).
    struct Dir {
        dir: tempfile::TempDir,
        version: std::cell::Cell<u32>,
    }

    impl Dir {
        fn new(ca: &Ca, pair: &(String, String)) -> Dir {
            let d = Dir {
                dir: tempfile::tempdir().unwrap(),
                version: Default::default(),
            };
            std::fs::write(d.path("ca.pem"), &ca.pem).unwrap();
            d.write(pair);
            for f in ["tls.crt", "tls.key"] {
                std::os::unix::fs::symlink(format!("..data/{f}"), d.path(f)).unwrap();
            }
            d
        }
        fn path(&self, f: &str) -> PathBuf {
            self.dir.path().join(f)
        }
        fn write(&self, (cert, key): &(String, String)) {
            let v = self.version.get() + 1;
            self.version.set(v);
            let data = format!("..{v}");
            std::fs::create_dir(self.path(&data)).unwrap();
            std::fs::write(self.path(&data).join("tls.crt"), cert).unwrap();
            std::fs::write(self.path(&data).join("tls.key"), key).unwrap();
            std::os::unix::fs::symlink(&data, self.path("..data_tmp")).unwrap();
            std::fs::rename(self.path("..data_tmp"), self.path("..data")).unwrap();
        }
        fn store(&self) -> Store {
            Store::watch(&self.path("ca.pem"), &self.path("tls.crt"), &self.path("tls.key")).unwrap()
        }
    }

    /// Poll `f` (each call may look at the files) until it holds; false after 10 s.
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn a_rotated_certificate_is_loaded_and_broken_files_keep_the_one_before() {
        let ca = ca();
        let me = PeerIdentity::new(Role::Replica, "kv-0");
        let dir = Dir::new(&ca, &issue(&ca, &me));
        let store = dir.store();
        let first = store.current().serial.clone();

        let second = issue(&ca, &me);
        dir.write(&second);
        assert!(
            eventually(|| store.current().serial != first),
            "the new certificate is loaded"
        );
        let serial = store.current().serial.clone();
        assert_eq!(store.refused(), 0);

        // Garbage, a key of another certificate, a certificate of another identity: each is
        // refused (one count per change) and the certificate before stays.
        let other = issue(&ca, &me);
        let stranger = issue(&ca, &PeerIdentity::new(Role::Replica, "kv-9"));
        let half = second.0[..second.0.len() / 2].to_string();
        for (n, bad) in [(half, second.1.clone()), (second.0.clone(), other.1.clone()), stranger]
            .iter()
            .enumerate()
        {
            dir.write(bad);
            // (current() is what looks at the files: on a handshake.)
            let refused = || store.current().serial.is_empty() || store.refused() == n as u64 + 1;
            assert!(eventually(refused), "change {n} refused: {} refusals", store.refused());
            assert_eq!(
                store.current().serial,
                serial,
                "change {n}: still the certificate before"
            );
        }
        dir.write(&other);
        assert!(
            eventually(|| store.current().serial != serial),
            "a good pair is loaded again"
        );
        assert_eq!(store.current().leaf.as_ref(), pem_der(&other.0).as_slice());
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }

    /// Both directions after a rotation: a new connection to the server presents its new
    /// certificate, and a new connection from the client presents the client's new one.
    #[tokio::test]
    async fn new_handshakes_in_and_out_use_the_rotated_certificates() {
        use tokio_stream::StreamExt;
        use tonic::transport::server::Connected;
        let ca = ca();
        let (server_id, client_id) = (
            PeerIdentity::new(Role::Replica, "kv-0"),
            PeerIdentity::new(Role::Replica, "kv-1"),
        );
        let (sdir, cdir) = (
            Dir::new(&ca, &issue(&ca, &server_id)),
            Dir::new(&ca, &issue(&ca, &client_id)),
        );
        let (server, client) = (Arc::new(sdir.store()), Arc::new(cdir.store()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = incoming(listener, Some(server.clone()));
        let mut connector = Connector {
            store: client.clone(),
            server_name: None,
            nodelay: true,
        };
        let uri: http::Uri = format!("http://{addr}").parse().unwrap();
        // (what the client saw of the server, what the server saw of the client)
        let mut handshake = async || {
            use tower::Service;
            let io = connector.call(uri.clone()).await.unwrap();
            let seen = io.inner().get_ref().1.peer_certificates().unwrap()[0].to_vec();
            let conn = conns.next().await.unwrap().unwrap();
            let info = conn.connect_info();
            (seen, info.peer_certs.unwrap()[0].to_vec())
        };
        assert_eq!(
            handshake().await,
            (server.current().leaf.to_vec(), client.current().leaf.to_vec())
        );
        let (s2, c2) = (issue(&ca, &server_id), issue(&ca, &client_id));
        sdir.write(&s2);
        cdir.write(&c2);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = handshake().await;
            if seen == (pem_der(&s2.0), pem_der(&c2.0)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "new handshakes still use the old certificates"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A changed CA bundle is what verifies callers from the next handshake on (the first step
    /// of a CA rotation: old and new CA trusted together).
    #[tokio::test]
    async fn a_changed_ca_bundle_verifies_client_certificates_from_then_on() {
        use tokio::io::AsyncReadExt;
        use tokio_stream::StreamExt;
        use tower::Service;
        let (old_ca, new_ca) = (ca(), ca());
        let sdir = Dir::new(&old_ca, &issue(&old_ca, &PeerIdentity::new(Role::Replica, "kv-0")));
        // A client with a certificate of the new CA (it trusts the old one, the server's).
        let cdir = Dir::new(&old_ca, &issue(&new_ca, &PeerIdentity::new(Role::Replica, "kv-1")));
        let (server, client) = (Arc::new(sdir.store()), Arc::new(cdir.store()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: http::Uri = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
        let mut conns = incoming(listener, Some(server.clone()));
        let mut connector = Connector {
            store: client,
            server_name: None,
            nodelay: true,
        };
        // Accepted: the server hands the connection on; refused: the client reads its alert.
        let mut accepted = async || {
            let Ok(io) = connector.call(uri.clone()).await else {
                return false;
            };
            let mut tls = io.into_inner();
            let mut byte = [0u8; 1];
            tokio::select! {
                c = conns.next() => c.is_some_and(|c| c.is_ok()),
                _ = tls.read(&mut byte) => false,
            }
        };
        assert!(!accepted().await, "a certificate of a CA the server does not trust");
        let bundle = format!("{}{}", old_ca.pem, new_ca.pem);
        crate::write_atomically(&sdir.path("ca.pem"), bundle.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !accepted().await {
            assert!(Instant::now() < deadline, "the new CA bundle is not used");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
