//! Certificates of a local cluster (`lockstep up`), made with rcgen, kept in
//! `<data-dir>/<name>/tls/`:
//!
//! - `ca.pem`, `ca.key`: the cluster's CA (valid [`CA_VALIDITY`]; a new one is made when it
//!   has less than [`CA_RENEW_BEFORE`] left — no CA rotation, docs/security.md "Rotation");
//! - `admin.pem`, `admin.key`: `lockstep://admin/up`, what `up` itself calls the replicas with;
//! - `client.pem`, `client.key`: `lockstep://client/cli`, what the CLI uses for `-c NAME`;
//! - `replicas/<id>.pem`, `.key`: `lockstep://replica/<id>` plus `localhost` and `127.0.0.1`
//!   (the address the other replicas dial), issued each time `up` starts that replica.
//!
//! Leaf certificates are valid [`LEAF_VALIDITY`]. Keys are ECDSA P-256, files mode 0600.

use anyhow::Context;
use lockstep_replica::byz::keys::write_private;
use lockstep_replica::tls::{PeerIdentity, Role, Transport};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const TLS_DIR: &str = "tls";
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
pub const CA_RENEW_BEFORE: Duration = Duration::from_secs(100 * 24 * 3600);
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
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
    /// A new CA named `name`.
    pub fn generate(name: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::generate().context("CA key")?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("lockstep CA {name}"));
        params.distinguished_name = dn;
        params.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(60);
        params.not_after = not_after(CA_VALIDITY);
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

    /// Issue a certificate for `who` into `dir/<stem>.pem` and `dir/<stem>.key`.
    pub fn write_leaf(&self, dir: &Path, stem: &str, who: &PeerIdentity, hosts: &[&str]) -> anyhow::Result<TlsFiles> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let leaf = self.issue(who, hosts)?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        write_private(&files.key, leaf.key.as_bytes())?;
        lockstep_replica::write_atomically(&files.cert, leaf.cert.as_bytes())?;
        if std::fs::read(&files.ca).ok().as_deref() != Some(self.pem.as_bytes()) {
            lockstep_replica::write_atomically(&files.ca, self.pem.as_bytes())?;
        }
        Ok(files)
    }
}

/// The certificates of a local cluster: its CA (kept while it has more than
/// [`CA_RENEW_BEFORE`] left) and fresh admin and client certificates.
pub struct LocalPki {
    pub dir: PathBuf,
    ca: Ca,
    pub admin: TlsFiles,
    pub client: TlsFiles,
}

impl LocalPki {
    /// Open (or create) `<cluster-dir>/tls` for cluster `name`.
    pub fn open(cluster_dir: &Path, name: &str) -> anyhow::Result<LocalPki> {
        let dir = cluster_dir.join(TLS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ca = match load_ca(&dir) {
            Some(ca) => ca,
            None => {
                let ca = Ca::generate(name)?;
                write_private(&dir.join("ca.key"), ca.issuer.key().serialize_pem().as_bytes())?;
                lockstep_replica::write_atomically(&dir.join("ca.pem"), ca.pem.as_bytes())?;
                ca
            }
        };
        let admin = ca.write_leaf(&dir, "admin", &PeerIdentity::new(Role::Admin, ADMIN_NAME), &[])?;
        let client = ca.write_leaf(&dir, "client", &PeerIdentity::new(Role::Client, CLIENT_NAME), &[])?;
        Ok(LocalPki { dir, ca, admin, client })
    }

    /// A fresh certificate for replica `id`, valid for loopback.
    pub fn replica(&self, id: &str) -> anyhow::Result<TlsFiles> {
        let dir = self.dir.join("replicas");
        let mut files = self.ca.write_leaf(
            &dir,
            id,
            &PeerIdentity::new(Role::Replica, id),
            &["localhost", "127.0.0.1"],
        )?;
        // One CA file for everyone.
        let _ = std::fs::remove_file(&files.ca);
        files.ca = self.dir.join("ca.pem");
        Ok(files)
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }
}

/// The CA in `dir`, if it is there, readable, and valid for long enough.
fn load_ca(dir: &Path) -> Option<Ca> {
    let pem = std::fs::read_to_string(dir.join("ca.pem")).ok()?;
    let key = std::fs::read_to_string(dir.join("ca.key")).ok()?;
    if time_left(&pem)? < CA_RENEW_BEFORE {
        return None;
    }
    Ca::from_pem(&pem, &key).ok()
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

/// The client transport of a local cluster started by `lockstep up`, as the CLI uses it
/// for `-c NAME`: plaintext if that cluster runs `--insecure`, else its client certificate.
pub fn local_client_transport(cluster_dir: &Path) -> anyhow::Result<Transport> {
    let insecure = crate::cluster::load_state(cluster_dir)?.is_some_and(|s| s.insecure);
    if insecure {
        return Ok(Transport::plaintext());
    }
    let dir = cluster_dir.join(TLS_DIR);
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
    };
    files.transport().with_context(|| {
        format!(
            "the local cluster in {} runs with TLS, but its client certificate is not usable \
             (pass --tls-ca, --tls-cert and --tls-key, or restart `lockstep up` to issue it again)",
            cluster_dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity_and_the_ca_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = LocalPki::open(dir.path(), "kv").expect("pki");
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
