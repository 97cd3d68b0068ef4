//! Transport security: mutual TLS on the replica's gRPC port, and who may call what.
//!
//! Every gRPC connection of a replica (client, peer and admin services, and the Byzantine
//! service) is TLS with a client certificate that chains to the cluster's CA. The identity of
//! the caller is a SAN URI in its certificate, `lockstep://<role>/<name>`:
//!
//! | role      | certificate of                        | may call                                   |
//! | --------- | ------------------------------------- | ------------------------------------------ |
//! | `replica` | a replica, `<name>` = its replica id   | peer RPCs if a member, client RPCs, Status |
//! | `admin`   | the configuration master (`up`)       | everything                                 |
//! | `client`  | a client                              | client RPCs and admin Status               |
//!
//! [`AuthorizeLayer`] enforces the table on every request (a tower layer on the whole
//! server, so no handler can forget it); see docs/security.md for what was rejected.

use anyhow::Context as _;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// Scheme of the identity URI in a certificate's subject alternative names.
pub const IDENTITY_SCHEME: &str = "lockstep://";

/// What a certificate's holder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Replica,
    Admin,
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Replica => "replica",
            Role::Admin => "admin",
            Role::Client => "client",
        }
    }
}

/// Who called: read from the verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

impl PeerIdentity {
    pub fn new(role: Role, name: impl Into<String>) -> PeerIdentity {
        PeerIdentity {
            role,
            name: name.into(),
        }
    }

    /// `lockstep://<role>/<name>`, the SAN URI that carries it.
    pub fn uri(&self) -> String {
        format!("{IDENTITY_SCHEME}{}/{}", self.role.as_str(), self.name)
    }

    pub fn parse_uri(uri: &str) -> Option<PeerIdentity> {
        let rest = uri.strip_prefix(IDENTITY_SCHEME)?;
        let (role, name) = rest.split_once('/')?;
        let role = match role {
            "replica" => Role::Replica,
            "admin" => Role::Admin,
            "client" => Role::Client,
            _ => return None,
        };
        (!name.is_empty() && !name.contains('/')).then(|| PeerIdentity::new(role, name))
    }

    /// The identity in a DER certificate: its one `lockstep://` SAN URI.
    pub fn from_certificate(der: &[u8]) -> Result<PeerIdentity, String> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unparsable certificate: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("bad subjectAltName: {e}"))?;
        let mut found = Vec::new();
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(IDENTITY_SCHEME)
            {
                found.push(PeerIdentity::parse_uri(uri).ok_or_else(|| format!("malformed identity URI '{uri}'"))?);
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(format!(
                "certificate '{}' carries no {IDENTITY_SCHEME}<role>/<name> URI",
                cert.subject()
            )),
            _ => Err(format!(
                "certificate '{}' carries more than one {IDENTITY_SCHEME} URI",
                cert.subject()
            )),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}'", self.role.as_str(), self.name)
    }
}

/// `--tls-ca`, `--tls-cert`, `--tls-key`, `--insecure`: the replica's flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM): every caller's certificate, and every replica this one calls,
    /// must chain to it.
    #[arg(long, env = "LOCKSTEP_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), with its identity as SAN URI `lockstep://<role>/<name>`.
    #[arg(long, env = "LOCKSTEP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "LOCKSTEP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Plaintext gRPC: no encryption and anyone who reaches the port may call anything.
    #[arg(long, env = "LOCKSTEP_INSECURE", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure: bool,
}

/// What a replica refuses to start without.
pub const NEED_TLS: &str = "no transport security configured: pass --tls-ca FILE --tls-cert FILE --tls-key FILE \
     (or LOCKSTEP_TLS_CA/LOCKSTEP_TLS_CERT/LOCKSTEP_TLS_KEY) for mutual TLS, or --insecure (LOCKSTEP_INSECURE=true) \
     to accept plaintext from anyone";

impl TlsArgs {
    /// The files, if all three are given; an error if only some are.
    pub fn files(&self) -> anyhow::Result<Option<(PathBuf, PathBuf, PathBuf)>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca.clone(), cert.clone(), key.clone()))),
            _ => anyhow::bail!("--tls-ca, --tls-cert and --tls-key go together: pass all three"),
        }
    }

    /// A replica's transport: TLS, or plaintext only when asked for explicitly.
    pub fn replica_transport(&self) -> anyhow::Result<Transport> {
        if self.insecure {
            return Ok(Transport::plaintext());
        }
        match self.files()? {
            Some((ca, cert, key)) => Transport::load(&ca, &cert, &key),
            None => anyhow::bail!(NEED_TLS),
        }
    }
}

mod reload;
#[cfg(test)]
pub(crate) mod test_pki;
pub use reload::{ALPN_FRAMED, CHECK_EVERY, Conn, ConnInfo, Loaded, connect_tcp, handshake, host_of, serial_of};

/// How this process talks gRPC: plaintext, or mutual TLS with one identity whose
/// certificate may be rotated under it (files are reloaded, see `tls/reload.rs`). Cheap to clone.
#[derive(Clone, Default)]
pub struct Transport {
    tls: Option<Arc<reload::Store>>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tls {
            None => f.write_str("Transport(plaintext)"),
            Some(s) => write!(f, "Transport(TLS {} from {})", s.identity.uri(), s.source),
        }
    }
}

/// TLS handshake bound (a caller that never finishes its handshake holds nothing longer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl Transport {
    pub fn plaintext() -> Transport {
        Transport { tls: None }
    }

    /// Mutual TLS from PEM bytes (never reloaded).
    pub fn from_pem(ca: Vec<u8>, cert: Vec<u8>, key: Vec<u8>, source: String) -> anyhow::Result<Transport> {
        let loaded = Loaded::from_pem(&ca, &cert, &key)?;
        Ok(Transport {
            tls: Some(Arc::new(reload::Store::fixed(loaded, source))),
        })
    }

    /// Replace the certificate of a TLS transport (from [`Transport::from_pem`], say: issued
    /// in memory again before it expires) for every clone of it, from their next handshake
    /// on; the identity must stay the same.
    pub fn reissue(&self, ca: &[u8], cert: &[u8], key: &[u8]) -> anyhow::Result<()> {
        let store = self.tls.as_ref().context("a plaintext transport has no certificate")?;
        store.replace(Loaded::from_pem(ca, cert, key)?)
    }

    /// Mutual TLS from PEM files, read again when they change (rotation): new handshakes,
    /// in and out, use the new certificate.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Transport> {
        Ok(Transport {
            tls: Some(Arc::new(reload::Store::watch(ca, cert, key)?)),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// This process's own identity (TLS only; a reload keeps it).
    pub fn identity(&self) -> Option<&PeerIdentity> {
        self.tls.as_ref().map(|t| &t.identity)
    }

    /// The material the next handshake uses (TLS only).
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.tls.as_ref().map(|t| t.current())
    }

    /// How many changes of the certificate files were refused (unusable, or another
    /// identity): the certificate loaded before stayed in use.
    pub fn refused_reloads(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| t.refused())
    }

    /// A tonic server builder; serve it with [`Transport::incoming`], which does the TLS.
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
    }

    /// The connections of `listener` for `serve_with_incoming`: TLS handshakes with the
    /// current certificate (client certificates required, verified against the current CA),
    /// or plaintext. Requests carry a [`ConnInfo`].
    pub fn incoming(
        &self,
        listener: tokio::net::TcpListener,
    ) -> impl tokio_stream::Stream<Item = Result<reload::Conn, std::io::Error>> + use<> {
        reload::incoming(listener, self.tls.clone())
    }

    /// An endpoint for `address` (`host:port`, `http://host:port` or `https://host:port`; the
    /// scheme follows this transport, not the address): TLS with our client certificate and
    /// the server verified against the CA, or plaintext.
    pub fn endpoint(&self, address: &str) -> Result<Dial, String> {
        self.endpoint_named(address, None)
    }

    /// [`Transport::endpoint`], verifying the server's certificate for `server_name` instead
    /// of the address's host: for a replica dialled by pod IP whose certificate names its
    /// stable DNS names (the IP is not known when the certificate is issued).
    pub fn endpoint_named(&self, address: &str, server_name: Option<&str>) -> Result<Dial, String> {
        let a = address.trim();
        let host_port = without_scheme(a);
        if self.tls.is_none() && a.starts_with("https://") {
            return Err(format!(
                "{a} asks for TLS but no certificates are configured: pass --tls-ca, --tls-cert and --tls-key"
            ));
        }
        // With TLS the scheme is still http for tonic: our connector does the TLS (with the
        // certificate current at each connection), tonic's would fix it at build time.
        let endpoint =
            Endpoint::from_shared(format!("http://{host_port}")).map_err(|e| format!("bad address {a}: {e}"))?;
        Ok(Dial {
            endpoint,
            tls: self.tls.clone().map(|store| reload::Connector {
                store,
                server_name: server_name.map(str::to_string),
                nodelay: false,
            }),
        })
    }
}

/// `host:port` of an address given as `host:port`, `http://host:port` or `https://host:port`.
pub fn without_scheme(address: &str) -> &str {
    address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address)
        .trim_end_matches('/')
}

/// A tonic [`Endpoint`] and, with TLS, the connector that does the handshakes: build a
/// [`Channel`] with [`Dial::connect`] or [`Dial::connect_lazy`].
#[derive(Clone)]
pub struct Dial {
    endpoint: Endpoint,
    tls: Option<reload::Connector>,
}

impl Dial {
    pub fn connect_timeout(mut self, d: Duration) -> Dial {
        self.endpoint = self.endpoint.connect_timeout(d);
        self
    }

    /// Per-request timeout.
    pub fn timeout(mut self, d: Duration) -> Dial {
        self.endpoint = self.endpoint.timeout(d);
        self
    }

    pub fn tcp_nodelay(mut self, on: bool) -> Dial {
        self.endpoint = self.endpoint.tcp_nodelay(on);
        if let Some(c) = &mut self.tls {
            c.nodelay = on;
        }
        self
    }

    pub fn connect_lazy(&self) -> Channel {
        match &self.tls {
            Some(c) => self.endpoint.connect_with_connector_lazy(c.clone()),
            None => self.endpoint.connect_lazy(),
        }
    }

    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            Some(c) => self.endpoint.connect_with_connector(c.clone()).await,
            None => self.endpoint.connect().await,
        }
    }
}

/// Who may call an RPC (by its gRPC path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Any caller with a valid certificate (client RPCs, the read-only admin Status).
    Authenticated,
    /// The configuration master only.
    Admin,
    /// A replica that is a member of this replica's current configuration.
    Member,
    /// Any replica of the cluster (state transfer to a replica not yet in this one's era).
    Replica,
}

/// The access rule of each RPC. Unknown paths need admin (the router answers UNIMPLEMENTED
/// to an admin; nobody else learns what exists).
pub fn access(path: &str) -> Access {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match (service, method) {
        ("lockstep.v1.Client", _) => Access::Authenticated,
        ("lockstep.v1.Admin", "Status") => Access::Authenticated,
        ("lockstep.v1.Admin", _) => Access::Admin,
        ("lockstep.v1.Peer", _) => Access::Member,
        ("lockstep.v1.Byzantine", "Submit" | "SubmitStream" | "Watch") => Access::Authenticated,
        ("lockstep.v1.Byzantine", "Relay") => Access::Member,
        ("lockstep.v1.Byzantine", "FetchSnapshot") => Access::Replica,
        ("lockstep.v1.Byzantine", "StartEra") => Access::Admin,
        _ => Access::Admin,
    }
}

/// The members of this replica's current configuration (or era): `Ok` if `id` is one, else
/// `Err` with what this replica knows (for the refusal message) and its epoch.
pub type Membership = Arc<dyn Fn(&str) -> Result<(), (String, u64)> + Send + Sync>;

/// Metadata of a peer refusal: the refusing replica's epoch. A replica that was removed from
/// the configuration learns from it that it is fenced, as it would from an epoch in an
/// `AppendResponse` (the refusal comes from an authenticated replica of the cluster).
pub const EPOCH_METADATA: &str = "x-lockstep-epoch";

/// The epoch a peer refusal carries (see [`EPOCH_METADATA`]).
pub fn refused_epoch(status: &Status) -> Option<u64> {
    if status.code() != tonic::Code::PermissionDenied {
        return None;
    }
    status.metadata().get(EPOCH_METADATA)?.to_str().ok()?.parse().ok()
}

/// Decide one call: `identity` is None for a connection without TLS (plaintext servers
/// admit everything; a TLS server always has one, the handshake demands it).
pub fn authorize(path: &str, identity: Option<&PeerIdentity>, members: &Membership) -> Result<(), Status> {
    let Some(who) = identity else {
        return Err(Status::unauthenticated(format!(
            "{path} needs a client certificate chained to the cluster's CA; none was presented"
        )));
    };
    match (access(path), who.role) {
        (_, Role::Admin) | (Access::Authenticated, _) => Ok(()),
        (Access::Replica, Role::Replica) => Ok(()),
        (Access::Member, Role::Replica) => members(&who.name).map_err(|(why, epoch)| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            if let Ok(v) = epoch.to_string().parse() {
                metadata.insert(EPOCH_METADATA, v);
            }
            Status::with_metadata(
                tonic::Code::PermissionDenied,
                format!("{path} is for members of this replica's configuration; the caller is {who}, {why}"),
                metadata,
            )
        }),
        (need, _) => Err(Status::permission_denied(format!(
            "{path} needs {}; the caller is {who}",
            match need {
                Access::Admin => "the admin identity (lockstep://admin/...)",
                Access::Member | Access::Replica => "a replica identity (lockstep://replica/<member id>)",
                Access::Authenticated => "a certificate",
            }
        ))),
    }
}

/// The tower layer that authorizes every request of a TLS server (see [`authorize`]). On a
/// plaintext server (`--insecure`) it lets everything through.
#[derive(Clone)]
pub struct AuthorizeLayer {
    tls: bool,
    members: Membership,
}

impl AuthorizeLayer {
    pub fn new(transport: &Transport, members: Membership) -> AuthorizeLayer {
        AuthorizeLayer {
            tls: transport.is_tls(),
            members,
        }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

/// Decide a call of `path` on a TLS server by the caller's identity as its connection gave it
/// (None: no certificate; `Err`: a certificate without a usable identity). On success, the
/// caller, for handlers that need it. Refusals are logged.
pub fn authorize_caller(
    path: &str,
    caller: Option<Result<PeerIdentity, String>>,
    members: &Membership,
) -> Result<Option<PeerIdentity>, Status> {
    match caller {
        Some(Ok(who)) => authorize(path, Some(&who), members)
            .inspect_err(|s| tracing::warn!(path, caller = %who, "refused: {}", s.message()))
            .map(|()| Some(who)),
        Some(Err(why)) => Err(Status::unauthenticated(format!(
            "{path}: the client certificate has no usable identity: {why}"
        ))),
        None => authorize(path, None, members).map(|()| None),
    }
}

/// The identity of the caller of a request, from the TLS connection it came on.
pub fn caller<B>(request: &http::Request<B>) -> Option<Result<PeerIdentity, String>> {
    let identity = request.extensions().get::<ConnInfo>()?.identity.as_ref()?;
    Some(identity.as_ref().clone())
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !self.layer.tls {
            return futures::future::Either::Left(self.inner.call(request));
        }
        let path = request.uri().path().to_string();
        match authorize_caller(&path, caller(&request), &self.layer.members) {
            Ok(who) => {
                // Handlers that need the caller (a relay's sender) find it here.
                if let Some(who) = who {
                    request.extensions_mut().insert(who);
                }
                futures::future::Either::Left(self.inner.call(request))
            }
            Err(status) => futures::future::Either::Right(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// Log loudly that this process runs without transport security.
pub fn warn_insecure(what: &str) {
    tracing::warn!(
        "INSECURE: {what} speaks plaintext gRPC and accepts every caller (--insecure); \
         anyone who reaches the port can reconfigure, seal or read this replica"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &'static [&'static str]) -> Membership {
        Arc::new(move |id: &str| {
            if ids.contains(&id) {
                Ok(())
            } else {
                Err((format!("which is not one of {ids:?}"), 7))
            }
        })
    }

    #[test]
    fn identity_uri_round_trips_and_rejects_junk() {
        let id = PeerIdentity::new(Role::Replica, "kv-2");
        assert_eq!(id.uri(), "lockstep://replica/kv-2");
        assert_eq!(PeerIdentity::parse_uri(&id.uri()), Some(id));
        for bad in [
            "lockstep://replica/",
            "lockstep://root/x",
            "https://replica/x",
            "lockstep://replica/a/b",
        ] {
            assert_eq!(PeerIdentity::parse_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn who_may_call_what() {
        let m = members(&["kv-0", "kv-1"]);
        let admin = PeerIdentity::new(Role::Admin, "up");
        let client = PeerIdentity::new(Role::Client, "cli");
        let member = PeerIdentity::new(Role::Replica, "kv-1");
        let stranger = PeerIdentity::new(Role::Replica, "kv-9");
        let ok = |p: &str, who: &PeerIdentity| authorize(p, Some(who), &m).is_ok();
        for p in [
            "/lockstep.v1.Admin/Reconfigure",
            "/lockstep.v1.Admin/Seal",
            "/lockstep.v1.Peer/Append",
            "/lockstep.v1.Byzantine/StartEra",
        ] {
            assert!(ok(p, &admin), "{p}");
        }
        assert!(ok("/lockstep.v1.Client/Execute", &client));
        assert!(ok("/lockstep.v1.Admin/Status", &client));
        assert!(ok("/lockstep.v1.Byzantine/Submit", &client));
        assert!(ok("/lockstep.v1.Byzantine/SubmitStream", &client));
        assert!(ok("/lockstep.v1.Peer/Append", &member));
        assert!(ok("/lockstep.v1.Byzantine/FetchSnapshot", &stranger));
        let denied = authorize("/lockstep.v1.Admin/Seal", Some(&client), &m).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("client 'cli'"), "{}", denied.message());
        let denied = authorize("/lockstep.v1.Peer/Append", Some(&stranger), &m).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("replica 'kv-9'"), "{}", denied.message());
        assert_eq!(refused_epoch(&denied), Some(7), "the refusal tells the epoch");
        assert!(!ok("/lockstep.v1.Peer/Append", &client));
        assert!(!ok("/lockstep.v1.Byzantine/Relay", &stranger));
        assert!(!ok("/lockstep.v1.Byzantine/StartEra", &member));
        assert!(!ok("/grpc.reflection.v1.ServerReflection/Info", &client));
        let none = authorize("/lockstep.v1.Client/Execute", None, &m).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
    }
}
