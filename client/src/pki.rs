//! Certificates of a local cluster (`lockstep up`), made with rcgen, kept in
//! `<data-dir>/<name>/tls/`:
//!
//! - `ca.pem`, `ca.key`: the cluster's CA. `ca.pem` is the trust bundle: the current CA first,
//!   then, after a rotation, the previous CA until it expires;
//! - `admin.pem`, `admin.key`: `lockstep://admin/up`, what `up` itself calls the replicas with;
//! - `client.pem`, `client.key`: `lockstep://client/cli`, what the CLI uses for `-c NAME`;
//! - `replicas/<id>.pem`, `.key`: `lockstep://replica/<id>` plus `localhost` and `127.0.0.1`
//!   (the address the other replicas dial), issued each time `up` starts that replica.
//!
//! Validity ([`Lifetimes`]): leaves [`LEAF_VALIDITY`], the CA [`CA_VALIDITY`] by default
//! (`lockstep up --cert-validity`, `--ca-validity`). While `up` runs, [`LocalPki::renew`] issues
//! every certificate again once less than a third of its validity is left, without restarting
//! anything: the replicas, `up` and the CLI re-read the files (docs/security.md, "Rotation").
//! A CA is rotated the same way: the new one joins the trust bundle first, the leaves follow
//! [`TRUST_SETTLE`] later, and the old CA leaves the bundle when it expires.
//! Keys are ECDSA P-256, files mode 0600.

use anyhow::Context;
use lockstep_replica::byz::keys::write_private;
use lockstep_replica::tls::{PeerIdentity, Role, Transport};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const TLS_DIR: &str = "tls";
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// A certificate is issued again once less than `1 / RENEW_WHEN_LEFT` of its validity is left
/// (a CA of 365 days 122 days before it expires, a leaf of 90 days after 60).
pub const RENEW_WHEN_LEFT: u32 = 3;
/// After a new CA joins the trust bundle, leaves from it wait this long: a process re-reads
/// its files at most once a second, before a handshake, so by then every peer trusts it.
pub const TRUST_SETTLE: Duration = Duration::from_secs(2);

/// How long a local cluster's certificates are valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub leaf: Duration,
    pub ca: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            leaf: LEAF_VALIDITY,
            ca: CA_VALIDITY,
        }
    }
}
/// The identity `up` calls the replicas' admin API with.
pub const ADMIN_NAME: &str = "up";
/// The identity of the CLI's certificate for a local cluster.
pub const CLIENT_NAME: &str = "cli";

/// A CA that issues the certificates of one cluster.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

/// Paths of a certificate, its key and the CA (what `--tls-cert`, `--tls-key`, `--tls-ca` take).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn transport(&self) -> anyhow::Result<Transport> {
        Transport::load(&self.ca, &self.cert, &self.key)
    }

    /// `--tls-ca CA --tls-cert CERT --tls-key KEY`.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--tls-ca".into(),
            self.ca.clone().into(),
            "--tls-cert".into(),
            self.cert.clone().into(),
            "--tls-key".into(),
            self.key.clone().into(),
        ]
    }
}

fn not_after(validity: Duration) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + validity
}

impl Ca {
    /// A new CA named `name`, valid [`CA_VALIDITY`].
    pub fn generate(name: &str) -> anyhow::Result<Ca> {
        Ca::generate_valid(name, CA_VALIDITY)
    }

    /// A new CA named `name` (plus the time, so that a rotated CA has a name of its own),
    /// valid for `validity`.
    pub fn generate_valid(name: &str, validity: Duration) -> anyhow::Result<Ca> {
        let key = KeyPair::generate().context("CA key")?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        let now = time::OffsetDateTime::now_utc();
        dn.push(
            DnType::CommonName,
            format!("lockstep CA {name} {}", now.unix_timestamp()),
        );
        params.distinguished_name = dn;
        params.not_before = now - Duration::from_secs(60);
        params.not_after = not_after(validity);
        let cert = params.self_signed(&key).context("CA certificate")?;
        Ok(Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA kept in a cluster's `tls/` directory, if it is there and valid for long enough.
    pub fn load(tls_dir: &Path) -> Option<Ca> {
        load_ca(tls_dir)
    }

    /// A CA from its certificate and private key (PEM), as kept in a file or a Secret.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Ca> {
        use rustls_pki_types::pem::PemObject;
        let key = KeyPair::from_pem(key_pem).context("unreadable CA private key")?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .context("unreadable CA certificate")?;
        let issuer = Issuer::from_ca_cert_der(&der, key).context("CA certificate and key do not go together")?;
        Ok(Ca {
            issuer,
            pem: cert_pem.to_string(),
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The CA's private key, PEM (to keep it: a file of mode 0600, or a Secret).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A leaf certificate for `who`; `hosts` (DNS names or IP addresses) make it usable by a
    /// server too.
    pub fn issue(&self, who: &PeerIdentity, hosts: &[&str]) -> anyhow::Result<Leaf> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(who, hosts, now - Duration::from_secs(60), not_after(LEAF_VALIDITY))
    }

    /// [`Ca::issue`] with the given validity (tests: a certificate near its renewal).
    pub fn issue_valid(
        &self,
        who: &PeerIdentity,
        hosts: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate().context("key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, who.uri());
        params.distinguished_name = dn;
        let uri = who
            .uri()
            .try_into()
            .map_err(|e| anyhow::anyhow!("identity {}: {e}", who.uri()))?;
        params.subject_alt_names.push(SanType::URI(uri));
        for h in hosts {
            params.subject_alt_names.push(match h.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*h).try_into().map_err(|e| anyhow::anyhow!("host {h}: {e}"))?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !hosts.is_empty() {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).context("sign certificate")?;
        Ok(Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// The certificates of a local cluster: its CA (and the previous one while it is trusted),
/// and the leaves this process issued, with when each is due again.
pub struct LocalPki {
    pub dir: PathBuf,
    name: String,
    ca: Ca,
    /// The CA before the last rotation: in the trust bundle until it expires.
    previous: Option<String>,
    lifetimes: Lifetimes,
    pub admin: TlsFiles,
    pub client: TlsFiles,
    /// When each leaf is issued again, by file stem (`admin`, `client`, `replicas/<id>`).
    due: BTreeMap<String, SystemTime>,
}

impl LocalPki {
    /// Open (or create) `<cluster-dir>/tls` for cluster `name`, with the default lifetimes.
    pub fn open(cluster_dir: &Path, name: &str) -> anyhow::Result<LocalPki> {
        LocalPki::open_with(cluster_dir, name, Lifetimes::default())
    }

    /// Open (or create) `<cluster-dir>/tls`: keep the CA there (a new one when it is missing,
    /// unreadable or due), issue fresh admin and client certificates.
    pub fn open_with(cluster_dir: &Path, name: &str, lifetimes: Lifetimes) -> anyhow::Result<LocalPki> {
        let dir = cluster_dir.join(TLS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let (ca, previous) = match load_bundle(&dir) {
            Some((ca, previous)) if !due_for(ca.pem(), lifetimes.ca) => (ca, previous),
            Some((old, _)) => (
                Ca::generate_valid(name, lifetimes.ca)?,
                Some(old.pem).filter(|p| time_left(p).is_some()),
            ),
            None => (Ca::generate_valid(name, lifetimes.ca)?, None),
        };
        let files = |stem: &str| local_tls_files(cluster_dir, stem);
        let mut pki = LocalPki {
            admin: files("admin"),
            client: files("client"),
            dir: dir.clone(),
            name: name.to_string(),
            ca,
            previous,
            lifetimes,
            due: BTreeMap::new(),
        };
        pki.write_ca()?;
        pki.issue("admin")?;
        pki.issue("client")?;
        Ok(pki)
    }

    /// A fresh certificate for replica `id`, valid for loopback.
    pub fn replica(&mut self, id: &str) -> anyhow::Result<TlsFiles> {
        self.issue(&format!("replicas/{id}"))
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Issue again what is due: the CA when less than a third of its validity is left, an
    /// expired previous CA out of the bundle, then every leaf that is due (the admin and client
    /// certificates, and those of `replicas`). Returns what it did, for the log.
    pub fn renew(&mut self, replicas: &[&str]) -> anyhow::Result<Vec<String>> {
        let now = SystemTime::now();
        let mut done = Vec::new();
        if due_for(self.ca.pem(), self.lifetimes.ca) {
            let old = std::mem::replace(&mut self.ca, Ca::generate_valid(&self.name, self.lifetimes.ca)?);
            self.previous = Some(old.pem);
            self.write_ca()?;
            // Leaves from the new CA only once every process trusts it.
            for due in self.due.values_mut() {
                *due = now + TRUST_SETTLE;
            }
            done.push("a new CA (the old one stays trusted until it expires)".to_string());
        }
        if self.previous.as_deref().is_some_and(|p| time_left(p).is_none()) {
            self.previous = None;
            self.write_ca()?;
            done.push("the expired previous CA left the trust bundle".to_string());
        }
        let stems = ["admin".to_string(), "client".to_string()]
            .into_iter()
            .chain(replicas.iter().map(|id| format!("replicas/{id}")));
        for stem in stems {
            if self.due.get(&stem).is_some_and(|d| *d <= now) {
                self.issue(&stem)?;
                done.push(format!("the certificate {stem}.pem"));
            }
        }
        Ok(done)
    }

    /// The trust bundle: the current CA, then the previous one.
    fn trust(&self) -> String {
        let mut pem = self.ca.pem().to_string();
        if let Some(p) = &self.previous {
            pem.push_str(p);
        }
        pem
    }

    /// `ca.key` (first: `ca.pem` names the CA it belongs to) and the trust bundle `ca.pem`.
    fn write_ca(&self) -> anyhow::Result<()> {
        write_private(&self.dir.join("ca.key"), self.ca.key_pem().as_bytes())?;
        lockstep_replica::write_atomically(&self.dir.join("ca.pem"), self.trust().as_bytes())?;
        Ok(())
    }

    /// Issue the leaf `<stem>.pem`/`.key` (its identity follows from the stem) and note when it
    /// is due again. The key is written before the certificate: a reader that sees a new key
    /// with the old certificate refuses the pair and keeps what it had until the next look.
    fn issue(&mut self, stem: &str) -> anyhow::Result<TlsFiles> {
        let (who, hosts): (PeerIdentity, &[&str]) = match stem.strip_prefix("replicas/") {
            Some(id) => (PeerIdentity::new(Role::Replica, id), &["localhost", "127.0.0.1"]),
            None if stem == "admin" => (PeerIdentity::new(Role::Admin, ADMIN_NAME), &[]),
            None => (PeerIdentity::new(Role::Client, CLIENT_NAME), &[]),
        };
        let now = time::OffsetDateTime::now_utc();
        let ca_end = validity(self.ca.pem()).map_or(now + self.lifetimes.leaf, |(_, end)| {
            time::OffsetDateTime::from_unix_timestamp(end).unwrap_or(now)
        });
        let end = (now + self.lifetimes.leaf).min(ca_end);
        let leaf = self.ca.issue_valid(&who, hosts, now - Duration::from_secs(60), end)?;
        let files = TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        if let Some(parent) = files.cert.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        write_private(&files.key, leaf.key.as_bytes())?;
        lockstep_replica::write_atomically(&files.cert, leaf.cert.as_bytes())?;
        let left = Duration::try_from(end - now).unwrap_or_default();
        let renew_after = left.saturating_sub(self.lifetimes.leaf.min(left) / RENEW_WHEN_LEFT);
        self.due.insert(stem.to_string(), SystemTime::now() + renew_after);
        Ok(files)
    }
}

/// Whether less than `1 / RENEW_WHEN_LEFT` of `validity` is left of the certificate in `pem`.
fn due_for(pem: &str, validity: Duration) -> bool {
    time_left(pem).is_none_or(|left| left < validity / RENEW_WHEN_LEFT)
}

/// The certificates in a PEM bundle, each as its own PEM text.
fn split_pem(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter(|c| c.contains(END))
        .map(|c| format!("{}\n", c.trim()))
        .collect()
}

/// The CA in `dir` (the first certificate of `ca.pem`, with `ca.key`) and the previous CA after
/// it, if it is still valid. `None` when there is no usable CA.
fn load_bundle(dir: &Path) -> Option<(Ca, Option<String>)> {
    let bundle = std::fs::read_to_string(dir.join("ca.pem")).ok()?;
    let key = std::fs::read_to_string(dir.join("ca.key")).ok()?;
    let mut certs = split_pem(&bundle).into_iter();
    let ca = Ca::from_pem(&certs.next()?, &key).ok()?;
    time_left(ca.pem())?;
    let previous = certs.find(|p| time_left(p).is_some());
    Some((ca, previous))
}

/// The current CA kept in `dir`, if it is there and readable.
fn load_ca(dir: &Path) -> Option<Ca> {
    load_bundle(dir).map(|(ca, _)| ca)
}

/// `f` of the (first) certificate in `pem`; `None` if it is unreadable.
fn with_certificate<T>(
    pem: &str,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate) -> Option<T>,
) -> Option<T> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).ok()?;
    f(&parsed)
}

/// How long the (first) certificate in `pem` stays valid; `None` if it is unreadable or
/// already expired.
pub fn time_left(pem: &str) -> Option<Duration> {
    with_certificate(pem, |c| Duration::try_from(c.validity().time_to_expiration()?).ok())
}

/// The validity of the (first) certificate in `pem`: not before, not after (Unix seconds).
pub fn validity(pem: &str) -> Option<(i64, i64)> {
    with_certificate(pem, |c| {
        Some((c.validity().not_before.timestamp(), c.validity().not_after.timestamp()))
    })
}

/// The CA, certificate and key `lockstep up` keeps for `stem` (`admin`, `client`,
/// `replicas/<id>`) in `<cluster-dir>/tls`.
pub fn local_tls_files(cluster_dir: &Path, stem: &str) -> TlsFiles {
    let dir = cluster_dir.join(TLS_DIR);
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    }
}

/// The client transport of a local cluster started by `lockstep up`, as the CLI uses it
/// for `-c NAME`: plaintext if that cluster runs `--insecure`, else its client certificate.
pub fn local_client_transport(cluster_dir: &Path) -> anyhow::Result<Transport> {
    let insecure = crate::cluster::load_state(cluster_dir)?.is_some_and(|s| s.insecure);
    if insecure {
        return Ok(Transport::plaintext());
    }
    let files = local_tls_files(cluster_dir, "client");
    // `lockstep up` replaces the pair key first, certificate right after: a read in between
    // sees a key that does not match the certificate. Look again for a moment before
    // calling the pair unusable.
    let mut tries = 0;
    loop {
        match files.transport() {
            Ok(transport) => return Ok(transport),
            Err(_) if tries < PAIR_REPLACED_TRIES => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "the local cluster in {} runs with TLS, but its client certificate is not usable \
                         (pass --tls-ca, --tls-cert and --tls-key, or restart `lockstep up` to issue it again)",
                        cluster_dir.display()
                    )
                });
            }
        }
    }
}

/// How many times (10 ms apart) a client key and certificate that do not match are read
/// again: long enough for `lockstep up` to finish replacing the pair.
const PAIR_REPLACED_TRIES: u32 = 50;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity_and_the_ca_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pki = LocalPki::open(dir.path(), "kv").expect("pki");
        let r = pki.replica("kv-3").expect("replica cert");
        let t = r.transport().expect("transport");
        assert_eq!(t.identity(), Some(&PeerIdentity::new(Role::Replica, "kv-3")));
        let admin = pki.admin.transport().expect("admin");
        assert_eq!(admin.identity().map(|i| i.role), Some(Role::Admin));
        let ca = std::fs::read(dir.path().join("tls/ca.pem")).expect("ca");
        drop(pki);
        let again = LocalPki::open(dir.path(), "kv").expect("reopen");
        assert_eq!(again.ca().pem().as_bytes(), ca.as_slice(), "a valid CA is kept");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls/ca.key"))
            .expect("ca.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
