//! Transport security on Kubernetes (docs/security.md, "Kubernetes"): every replica of an RSM
//! speaks mutual TLS with certificates from a CA of that RSM.
//!
//! - `NAME-tls-ca` (`ca.crt`, `ca.key`): the RSM's CA, made on its first reconcile and kept
//!   (replicas trust only it). Per RSM, not per operator: identities are
//!   `lockstep://replica/<pod>` and pod names repeat across namespaces. At 2/3 of its life it
//!   is rotated ([`rotate_ca`]): a new CA, the old one kept as `previous.crt`/`previous.key`
//!   and trusted beside it (every Secret's `ca.crt` is then the bundle of both) until it
//!   expires; certificates keep coming from the old CA for [`CA_TRUST_SETTLE`] (written as
//!   `rotated-at`), until every replica has the bundle.
//! - `<pod>-tls` (`ca.crt`, `tls.crt`, `tls.key`): each replica's certificate, issued fresh
//!   before its pod and again at 2/3 of its life while the pod runs ([`renew`]; the pod carries
//!   the due time, [`TLS_RENEW_ANNOTATION`]); SANs are the names members and clients dial (the
//!   pod in the peers Service, the client Service). Mounted read-only at [`TLS_DIR`]; the
//!   replica reloads the files when the kubelet refreshes them.
//! - `NAME-client-tls`: a client certificate (`lockstep://client/default`) for applications
//!   in the cluster: mount it and set `LOCKSTEP_TLS_CA/CERT/KEY`.
//! - The operator's own admin identity (`lockstep://admin/operator`) is issued in memory from
//!   the CA and cached per RSM ([`PkiCache`]); it never leaves the process.
//!
//! With `spec.tls.issuerRef` cert-manager issues the same Secrets instead and there is no CA
//! Secret and no in-memory admin identity ([`crate::cert_manager`]).
//!
//! Replica pods made by an operator from before TLS run `LOCKSTEP_INSECURE=true`: the operator
//! keeps calling those plaintext, and keeps making new pods of that RSM plaintext while any
//! such pod runs (a TLS replica and a plaintext one cannot replicate to each other).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{EnvVar, Pod, Secret, SecretVolumeSource, Volume, VolumeMount};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use lockstep::Transport;
use lockstep::pki::Ca;
use lockstep_planner::MachineRef;
use lockstep_replica::tls::{PeerIdentity, Role};
use lockstep_resource::ReplicatedStateMachine;

use crate::admin::AdminTarget;
use crate::build::{self, BuildError, meta};
use crate::controller::{Context, Error, key};
use crate::execute::create_if_absent;
use crate::names::{self, TLS_RENEW_ANNOTATION};
use crate::translate::World;

/// Where a replica pod mounts its certificate Secret.
pub const TLS_DIR: &str = "/etc/lockstep/tls";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// In the CA Secret after a rotation: the previous CA, trusted until it expires.
pub const PREVIOUS_CRT: &str = "previous.crt";
pub const PREVIOUS_KEY: &str = "previous.key";
/// In the CA Secret after a rotation: when it happened (RFC 3339).
pub const ROTATED_AT: &str = "rotated-at";
/// How long after a CA rotation certificates still come from the previous CA: the new trust
/// bundle reaches a running replica when the kubelet refreshes its Secret mount (its sync
/// period, a minute by default, plus its Secret cache), and a certificate from the new CA is
/// accepted only by a replica that has it.
pub const CA_TRUST_SETTLE: std::time::Duration = std::time::Duration::from_secs(10 * 60);
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// Label value (`app.kubernetes.io/component`) of the certificate Secrets.
pub const COMPONENT_TLS: &str = "tls";
/// The operator's identity towards the replicas: `lockstep://admin/operator`.
pub const ADMIN_NAME: &str = "operator";
/// The identity in `NAME-client-tls`: `lockstep://client/default`.
pub const CLIENT_NAME: &str = "default";
/// A certificate is issued again when it has passed this part of its life (numerator,
/// denominator): 2/3, so 60 of the 90 days of a leaf (`lockstep::pki::LEAF_VALIDITY`), which
/// leaves a month for the kubelet to refresh the mount and for anything that goes wrong.
pub const RENEW_AT_LIFE: (i64, i64) = (2, 3);

pub fn ca_secret_name(cluster: &str) -> String {
    format!("{cluster}-tls-ca")
}

pub fn replica_secret_name(replica_id: &str) -> String {
    format!("{replica_id}-tls")
}

pub fn client_secret_name(cluster: &str) -> String {
    format!("{cluster}-client-tls")
}

/// The CA of one RSM (and, after a rotation, the previous one) and the operator's admin
/// identity issued from it; or, with certificates from cert-manager, only the admin identity
/// read from its Secret.
pub struct Pki {
    /// None: cert-manager issues the certificates (`spec.tls.issuerRef`).
    ca: Option<Ca>,
    /// After a rotation, until it expires: the previous CA.
    previous: Option<Ca>,
    /// Until then the previous CA issues every certificate (the replicas may not trust the
    /// new one yet).
    settle_until: Option<Timestamp>,
    /// What every party trusts and every certificate Secret's `ca.crt` holds: the CA, then
    /// the previous one.
    trust: String,
    /// Mutual TLS as `lockstep://admin/operator`.
    pub admin: Transport,
    /// When the certificate in `NAME-client-tls` is due again (learned when it was read or
    /// written; None for a paused RSM's PKI, which writes nothing).
    client_due: Mutex<Option<Timestamp>>,
    /// When the admin identity is due again (an operator that runs for months): then
    /// [`ensure`] issues it again in place, for every clone of `admin` (the Byzantine master's
    /// channels too).
    admin_due: Mutex<Option<Timestamp>>,
    /// cert-manager: what new replica pods wait for (Secrets not issued yet), for the status
    /// of the reconcile that noted it.
    waiting: Mutex<Vec<String>>,
}

impl Pki {
    /// The admin identity from the PEM parts (`ca.crt`, `tls.crt`, `tls.key`) of a Secret
    /// cert-manager issued.
    pub(crate) fn from_issued(pem: [String; 3], who: &str) -> Result<Pki, Error> {
        let [ca, cert, key] = pem;
        let admin_due = renew_at(&cert);
        let admin = Transport::from_pem(
            ca.clone().into_bytes(),
            cert.into_bytes(),
            key.into_bytes(),
            format!("the operator's admin identity for {who} (issued by cert-manager)"),
        )
        .map_err(|e| tls_error(who, e))?;
        Ok(Pki {
            ca: None,
            previous: None,
            settle_until: None,
            trust: ca,
            admin,
            client_due: Mutex::new(None),
            admin_due: Mutex::new(admin_due),
            waiting: Mutex::default(),
        })
    }

    /// cert-manager: use the admin certificate read again from its Secret when it is a new
    /// one; the next due time is 2/3 of its life. The same one: look again next time.
    pub(crate) fn reload_admin(&self, pem: [String; 3], who: &str) -> Result<(), Error> {
        let [ca, cert, key] = pem;
        let new = lockstep_replica::tls::Loaded::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes())
            .map_err(|e| tls_error(who, e))?
            .serial;
        let loaded = self.admin.current().map(|l| l.serial.clone());
        if loaded.as_deref() == Some(new.as_str()) {
            return Ok(());
        }
        self.admin
            .reissue(ca.as_bytes(), cert.as_bytes(), key.as_bytes())
            .map_err(|e| tls_error(who, e))?;
        *self.admin_due.lock().unwrap_or_else(|e| e.into_inner()) = renew_at(&cert);
        tracing::info!(object = %who, old = ?loaded, %new,
            "TLS: the operator's admin identity renewed by cert-manager is in use from the next handshake");
        Ok(())
    }

    pub(crate) fn admin_due(&self) -> Option<Timestamp> {
        *self.admin_due.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether cert-manager issues this RSM's certificates.
    pub fn from_cert_manager(&self) -> bool {
        self.ca.is_none()
    }

    /// The current CA (not with cert-manager).
    fn ca(&self, who: &str) -> Result<&Ca, Error> {
        self.ca.as_ref().ok_or_else(|| {
            tls_error(
                who,
                "certificates of this RSM are issued by cert-manager, not by the operator",
            )
        })
    }

    pub(crate) fn note_waiting(&self, why: String) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).push(why);
    }

    /// What replica pods waited for since the last call (cert-manager).
    pub fn take_waiting(&self) -> Vec<String> {
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn new(cas: Cas, who: &str) -> Result<Pki, Error> {
        let mut pki = Pki {
            trust: cas.trust(),
            ca: Some(cas.ca),
            previous: cas.previous,
            settle_until: cas.settle_until,
            admin: Transport::plaintext(),
            client_due: Mutex::new(None),
            admin_due: Mutex::new(None),
            waiting: Mutex::default(),
        };
        let (leaf, due) = pki.issue(&PeerIdentity::new(Role::Admin, ADMIN_NAME), &[], who)?;
        pki.admin = Transport::from_pem(
            pki.trust.as_bytes().to_vec(),
            leaf.cert.into_bytes(),
            leaf.key.into_bytes(),
            format!("the operator's admin identity for {who}"),
        )
        .map_err(|e| tls_error(who, e))?;
        *pki.admin_due.lock().unwrap_or_else(|e| e.into_inner()) = Some(due);
        Ok(pki)
    }

    /// The CA that issues certificates now: the previous one while a rotation settles.
    fn issuer(&self, who: &str) -> Result<&Ca, Error> {
        match (&self.previous, self.settle_until) {
            (Some(previous), Some(until)) if Timestamp::now() < until => Ok(previous),
            _ => self.ca(who),
        }
    }

    /// A certificate for `who` from [`Pki::issuer`], and when it is due again: at 2/3 of its
    /// life, or when a rotation has settled if the previous CA issued it.
    fn issue(
        &self,
        who: &PeerIdentity,
        hosts: &[&str],
        object: &str,
    ) -> Result<(lockstep::pki::Leaf, Timestamp), Error> {
        let leaf = self
            .issuer(object)?
            .issue(who, hosts)
            .map_err(|e| tls_error(object, e))?;
        let mut due = renew_at(&leaf.cert).ok_or_else(|| tls_error(object, "issued an unreadable certificate"))?;
        if let Some(until) = self.settle_until.filter(|u| *u > Timestamp::now()) {
            due = due.min(until);
        }
        Ok((leaf, due))
    }

    /// Issue the admin identity again when it is due (no API request: it lives in memory).
    fn renew_admin(&self, who: &str) -> Result<(), Error> {
        if self.from_cert_manager() {
            return Ok(());
        }
        let mut due = self.admin_due.lock().unwrap_or_else(|e| e.into_inner());
        if due.is_some_and(|d| d > Timestamp::now()) {
            return Ok(());
        }
        let (leaf, next) = self.issue(&PeerIdentity::new(Role::Admin, ADMIN_NAME), &[], who)?;
        self.admin
            .reissue(self.trust.as_bytes(), leaf.cert.as_bytes(), leaf.key.as_bytes())
            .map_err(|e| tls_error(who, e))?;
        *due = Some(next);
        tracing::info!(object = %who, "TLS: the operator's admin identity issued again (past 2/3 of its life, or a CA rotation settled)");
        Ok(())
    }

    /// Whether the CA (the operator's own, not cert-manager's) is past 2/3 of its life.
    fn ca_due(&self) -> bool {
        self.ca
            .as_ref()
            .is_some_and(|ca| renew_at(ca.pem()).is_none_or(|due| due <= Timestamp::now()))
    }

    fn client_due(&self) -> Option<Timestamp> {
        *self.client_due.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_client_due(&self, due: Timestamp) {
        *self.client_due.lock().unwrap_or_else(|e| e.into_inner()) = Some(due);
    }
}

/// Per RSM (namespace, name and uid: a recreated RSM gets a new CA), its [`Pki`].
#[derive(Default)]
pub struct PkiCache(Mutex<HashMap<String, Arc<Pki>>>);

fn cache_key(rsm: &ReplicatedStateMachine) -> String {
    format!("{}/{}", key(rsm), rsm.uid().unwrap_or_default())
}

impl PkiCache {
    pub fn get(&self, rsm: &ReplicatedStateMachine) -> Option<Arc<Pki>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cache_key(rsm))
            .cloned()
    }

    pub(crate) fn insert(&self, rsm: &ReplicatedStateMachine, pki: Arc<Pki>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cache_key(rsm), pki);
    }
}

fn tls_error(who: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{who}: {e:#}"))
}

/// The RSM's PKI: its CA from `NAME-tls-ca` (made when missing), the operator's admin
/// identity, and the client Secret. API requests only the first time per RSM (per process).
pub async fn ensure(ctx: &Context, rsm: &ReplicatedStateMachine, ns: &str) -> Result<Arc<Pki>, Error> {
    if let Some(issuer) = rsm.issuer_ref() {
        return crate::cert_manager::ensure(ctx, rsm, ns, issuer).await;
    }
    if let Some(pki) = ctx.pki.get(rsm) {
        pki.renew_admin(&key(rsm))?;
        return Ok(pki);
    }
    let who = key(rsm);
    let cas = ca_of(ctx, rsm, ns).await?;
    let pki = Arc::new(Pki::new(cas, &who)?);
    let name = client_secret_name(&rsm.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let existing = api.get_opt(&name).await?;
    let due = match existing.as_ref().and_then(|s| leaf_due(s, &pki.trust)) {
        Some(due) if due > Timestamp::now() => due,
        _ => {
            if existing.is_some() {
                tracing::info!(object = %who, secret = %name,
                    "TLS: issuing the client certificate again (from another CA, or past 2/3 of its life)");
            }
            let client = PeerIdentity::new(Role::Client, CLIENT_NAME);
            issue_leaf_secret(ctx, rsm, ns, &name, &pki, &client, &[], existing.is_some()).await?
        }
    };
    pki.set_client_due(due);
    ctx.pki.insert(rsm, pki.clone());
    tracing::info!(object = %who, "TLS: the RSM's CA is loaded and the operator's admin identity issued");
    Ok(pki)
}

/// The RSM's PKI as [`ensure`] makes it, but without creating anything: for a paused RSM,
/// which is observed and not changed. `None` when it has no CA yet.
pub async fn existing(ctx: &Context, rsm: &ReplicatedStateMachine, ns: &str) -> Result<Option<Arc<Pki>>, Error> {
    if rsm.issuer_ref().is_some() {
        return crate::cert_manager::existing(ctx, rsm, ns).await;
    }
    if let Some(pki) = ctx.pki.get(rsm) {
        pki.renew_admin(&key(rsm))?;
        return Ok(Some(pki));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match api.get_opt(&ca_secret_name(&rsm.name_any())).await? {
        Some(s) => Ok(Some(Arc::new(Pki::new(
            ca_in(&s, ns, ctx.ca_trust_settle)?,
            &key(rsm),
        )?))),
        None => Ok(None),
    }
}

/// The CAs kept in `NAME-tls-ca`, or a new CA stored there.
async fn ca_of(ctx: &Context, rsm: &ReplicatedStateMachine, ns: &str) -> Result<Cas, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = ca_secret_name(&rsm.name_any());
    if let Some(s) = api.get_opt(&name).await? {
        return ca_in(&s, ns, ctx.ca_trust_settle);
    }
    let ca = Ca::generate(&key(rsm)).map_err(|e| tls_error(&key(rsm), e))?;
    let data = BTreeMap::from([(CA_CRT, ca.pem().to_string()), (CA_KEY, ca.key_pem())]);
    if create_if_absent(ctx, ns, &secret(rsm, name.clone(), data)?).await? {
        return Ok(Cas::single(ca));
    }
    // Made by someone else in the meantime (an operator that was leader a moment ago).
    ca_in(&api.get(&name).await?, ns, ctx.ca_trust_settle)
}

/// The CAs of an RSM as its CA Secret keeps them.
struct Cas {
    ca: Ca,
    /// The CA before the last rotation, while it has not expired.
    previous: Option<Ca>,
    /// Until when the previous CA still issues certificates.
    settle_until: Option<Timestamp>,
}

impl Cas {
    /// One CA, no rotation going on.
    fn single(ca: Ca) -> Cas {
        Cas {
            ca,
            previous: None,
            settle_until: None,
        }
    }

    /// The trust bundle: the CA, then the previous one.
    fn trust(&self) -> String {
        let mut pem = self.ca.pem().trim_end().to_string();
        pem.push('\n');
        if let Some(p) = &self.previous {
            pem.push_str(p.pem().trim_end());
            pem.push('\n');
        }
        pem
    }
}

fn field<'a>(secret: &'a Secret, name: &str) -> Option<&'a str> {
    std::str::from_utf8(&secret.data.as_ref()?.get(name)?.0).ok()
}

fn ca_in(secret: &Secret, ns: &str, settle: std::time::Duration) -> Result<Cas, Error> {
    let ca = current_ca_in(secret, ns)?;
    // The previous CA (after a rotation) while it is valid; unreadable or expired: ignored.
    let previous = match (field(secret, PREVIOUS_CRT), field(secret, PREVIOUS_KEY)) {
        (Some(cert), Some(key_pem)) if lockstep::pki::time_left(cert).is_some() => Ca::from_pem(cert, key_pem).ok(),
        _ => None,
    };
    let settle_until = field(secret, ROTATED_AT)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map(|t| t + settle)
        .filter(|_| previous.is_some());
    Ok(Cas {
        ca,
        previous,
        settle_until,
    })
}

fn current_ca_in(secret: &Secret, ns: &str) -> Result<Ca, Error> {
    let name = secret.name_any();
    let (Some(cert), Some(key_pem)) = (field(secret, CA_CRT), field(secret, CA_KEY)) else {
        return Err(Error::Tls(format!(
            "Secret {ns}/{name} holds no {CA_CRT} and {CA_KEY}; delete it to have the operator make a new CA \
             (replicas started with the old one must then be replaced)"
        )));
    };
    Ca::from_pem(cert, key_pem).map_err(|e| {
        Error::Tls(format!(
            "Secret {ns}/{name} holds no usable CA ({e:#}); delete it to have the operator make a new CA \
             (replicas started with the old one must then be replaced)"
        ))
    })
}

fn secret(rsm: &ReplicatedStateMachine, name: String, data: BTreeMap<&str, String>) -> Result<Secret, BuildError> {
    Ok(Secret {
        metadata: meta(rsm, name, COMPONENT_TLS)?,
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    })
}

/// A certificate Secret for `who` (`ca.crt`, `tls.crt`, `tls.key`) issued by the RSM's CA,
/// and when it is due again.
fn leaf_secret(
    rsm: &ReplicatedStateMachine,
    name: &str,
    pki: &Pki,
    who: &PeerIdentity,
    hosts: &[String],
) -> Result<(Secret, Timestamp), Error> {
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let (leaf, due) = pki.issue(who, &hosts, &key(rsm))?;
    let data = BTreeMap::from([(CA_CRT, pki.trust.clone()), (TLS_CRT, leaf.cert), (TLS_KEY, leaf.key)]);
    Ok((secret(rsm, name.to_string(), data)?, due))
}

/// When a certificate (PEM) is due to be issued again: at [`RENEW_AT_LIFE`] of its life.
pub fn renew_at(cert_pem: &str) -> Option<Timestamp> {
    let (not_before, not_after) = lockstep::pki::validity(cert_pem)?;
    let (num, den) = RENEW_AT_LIFE;
    Timestamp::from_second(not_before + (not_after - not_before) * num / den).ok()
}

/// When the certificate in a certificate Secret is due again; None when it is not one of
/// this CA (a recreated RSM of the same name) or unreadable: due now.
pub fn leaf_due(secret: &Secret, ca_pem: &str) -> Option<Timestamp> {
    if field(secret, CA_CRT) != Some(ca_pem) {
        return None;
    }
    renew_at(field(secret, TLS_CRT)?)
}

/// Whether a certificate Secret can stay: issued by this CA, not yet due again.
pub fn leaf_current(secret: &Secret, ca_pem: &str) -> bool {
    leaf_due(secret, ca_pem).is_some_and(|due| due > Timestamp::now())
}

/// Issues a certificate for `who` into the Secret `name`: created, or its data replaced
/// (`exists`: try the patch first). Returns when the new certificate is due again. No read:
/// the caller knows whether to replace it.
#[allow(clippy::too_many_arguments)]
async fn issue_leaf_secret(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    name: &str,
    pki: &Pki,
    who: &PeerIdentity,
    hosts: &[String],
    exists: bool,
) -> Result<Timestamp, Error> {
    let (fresh, due) = leaf_secret(rsm, name, pki, who, hosts)?;
    if !exists && create_if_absent(ctx, ns, &fresh).await? {
        return Ok(due);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({ "data": fresh.data });
    match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(due),
        // Deleted in the meantime (by hand): make it again.
        Err(kube::Error::Api(s)) if s.code == 404 => {
            create_if_absent(ctx, ns, &fresh).await?;
            Ok(due)
        }
        Err(e) => Err(e.into()),
    }
}

/// When the certificate of a TLS replica pod is due again ([`TLS_RENEW_ANNOTATION`]);
/// None for a pod without it (made by an operator from before rotation): due now.
pub fn pod_due(pod: &Pod) -> Option<Timestamp> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(TLS_RENEW_ANNOTATION)?
        .parse()
        .ok()
}

/// Issues again every certificate of the RSM that has passed [`RENEW_AT_LIFE`] of its life,
/// while its replicas keep running: a running replica's Secret `<pod>-tls` (its pod's
/// [`TLS_RENEW_ANNOTATION`] says when, from the cache: no Secret is read) — the kubelet
/// refreshes the mounted files and the replica loads them at its next handshake — and the
/// client Secret. Returns when the next one is due, for the requeue. API requests only for
/// what is due: a patch of the Secret and one of the pod's annotation.
pub async fn renew(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    world: &World,
    pki: &Arc<Pki>,
) -> Result<Option<Timestamp>, Error> {
    let rotated;
    if pki.from_cert_manager() {
        // Renewal is cert-manager's job: come back when the admin identity is due to be read
        // again.
        return Ok(pki.admin_due().filter(|due| *due > Timestamp::now()));
    }
    let pki = if pki.ca_due() {
        rotated = rotate_ca(ctx, rsm, ns, world, pki).await?;
        &rotated
    } else {
        pki
    };
    let now = Timestamp::now();
    let mut next: Option<Timestamp> = None;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for pod in world.replicas.iter().map(|r| &r.pod) {
        if runs_plaintext(pod) || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let due = match pod_due(pod) {
            Some(due) if due > now => due,
            before => {
                let id = pod.name_any();
                tracing::info!(object = %key(rsm), replica = %id, due = ?before,
                    "TLS: issuing the replica's certificate again while it runs (past 2/3 of its life)");
                let who = PeerIdentity::new(Role::Replica, &id);
                let hosts = replica_hosts(&rsm.name_any(), ns, &id);
                let due = issue_leaf_secret(ctx, rsm, ns, &replica_secret_name(&id), pki, &who, &hosts, true).await?;
                let patch = serde_json::json!({
                    "metadata": { "annotations": { TLS_RENEW_ANNOTATION: due.to_string() } }
                });
                // Deleted since the cache saw it: its successor gets a fresh certificate.
                tolerate_gone(pods.patch(&id, &PatchParams::default(), &Patch::Merge(&patch)).await)?;
                due
            }
        };
        next = Some(next.map_or(due, |n| n.min(due)));
    }
    if let Some(due) = pki.client_due() {
        let due = if due > now {
            due
        } else {
            tracing::info!(object = %key(rsm), "TLS: issuing the client certificate again (past 2/3 of its life)");
            let client = PeerIdentity::new(Role::Client, CLIENT_NAME);
            let name = client_secret_name(&rsm.name_any());
            let due = issue_leaf_secret(ctx, rsm, ns, &name, pki, &client, &[], true).await?;
            pki.set_client_due(due);
            due
        };
        next = Some(next.map_or(due, |n| n.min(due)));
    }
    Ok(next)
}

/// Rotates the RSM's CA (past 2/3 of its life) while its replicas run, in two steps so that
/// no handshake fails:
///
/// 1. now: a new CA becomes current in `NAME-tls-ca`, the old one stays as `previous.*` with
///    `rotated-at`; every certificate Secret's `ca.crt` becomes the bundle of both (its
///    certificate and key are kept), and every pod and the client Secret become due at the end
///    of [`Context::ca_trust_settle`];
/// 2. then ([`renew`], as for any certificate that is due): certificates from the new CA.
///
/// Until then the previous CA issues everything (new pods, the admin identity), since a replica
/// whose mount the kubelet has not refreshed yet trusts only it. The old CA is trusted until it
/// expires, a third of its life later. Returns the RSM's new [`Pki`] (also cached).
pub async fn rotate_ca(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    world: &World,
    old: &Pki,
) -> Result<Arc<Pki>, Error> {
    let who = key(rsm);
    let now = Timestamp::now();
    let until = now + ctx.ca_trust_settle;
    let old_ca = old.ca(&who)?;
    let cas = Cas {
        ca: Ca::generate(&who).map_err(|e| tls_error(&who, e))?,
        previous: Some(Ca::from_pem(old_ca.pem(), &old_ca.key_pem()).map_err(|e| tls_error(&who, e))?),
        settle_until: Some(until),
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    store_rotated(&secrets, rsm, &cas, old_ca, now).await?;
    tracing::info!(object = %who, settle_until = %until,
        "TLS: the RSM's CA is past 2/3 of its life: a new CA, trusted beside the old one from now on; \
         certificates come from it once every replica has the new trust bundle");
    let pki = rotated_pki(cas, old, until, &who)?;
    spread_trust(ctx, rsm, ns, world, &secrets, &pki.trust, until).await?;
    let pki = Arc::new(pki);
    ctx.pki.insert(rsm, pki.clone());
    Ok(pki)
}

fn b64(v: &str) -> ByteString {
    ByteString(v.as_bytes().to_vec())
}

/// The new CA as current in the CA Secret, the old one as previous, rotated `now`.
async fn store_rotated(
    secrets: &Api<Secret>,
    rsm: &ReplicatedStateMachine,
    cas: &Cas,
    old_ca: &Ca,
    now: Timestamp,
) -> Result<(), Error> {
    let ca_data = serde_json::json!({ "data": {
        CA_CRT: b64(cas.ca.pem()),
        CA_KEY: b64(&cas.ca.key_pem()),
        PREVIOUS_CRT: b64(old_ca.pem()),
        PREVIOUS_KEY: b64(&old_ca.key_pem()),
        ROTATED_AT: b64(&now.to_string()),
    }});
    secrets
        .patch(
            &ca_secret_name(&rsm.name_any()),
            &PatchParams::default(),
            &Patch::Merge(&ca_data),
        )
        .await?;
    Ok(())
}

/// The RSM's PKI after a rotation to `cas`, everything due at `until`. The admin identity
/// keeps its certificate (from the old CA) and trusts both.
fn rotated_pki(cas: Cas, old: &Pki, until: Timestamp, who: &str) -> Result<Pki, Error> {
    let pki = Pki {
        trust: cas.trust(),
        ca: Some(cas.ca),
        previous: cas.previous,
        settle_until: cas.settle_until,
        admin: old.admin.clone(),
        client_due: Mutex::new(Some(until)),
        admin_due: Mutex::new(Some(until)),
        waiting: Mutex::default(),
    };
    let (leaf, _) = pki.issue(&PeerIdentity::new(Role::Admin, ADMIN_NAME), &[], who)?;
    pki.admin
        .reissue(pki.trust.as_bytes(), leaf.cert.as_bytes(), leaf.key.as_bytes())
        .map_err(|e| tls_error(who, e))?;
    Ok(pki)
}

/// The `trust` bundle into every running TLS replica's certificate Secret (its pod due at
/// `until`) and the client Secret.
async fn spread_trust(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    world: &World,
    secrets: &Api<Secret>,
    trust: &str,
    until: Timestamp,
) -> Result<(), Error> {
    let trust = serde_json::json!({ "data": { CA_CRT: b64(trust) } });
    let due = serde_json::json!({ "metadata": { "annotations": { TLS_RENEW_ANNOTATION: until.to_string() } } });
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for pod in world.replicas.iter().map(|r| &r.pod) {
        if runs_plaintext(pod) || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let id = pod.name_any();
        tolerate_gone(
            secrets
                .patch(
                    &replica_secret_name(&id),
                    &PatchParams::default(),
                    &Patch::Merge(&trust),
                )
                .await,
        )?;
        tolerate_gone(pods.patch(&id, &PatchParams::default(), &Patch::Merge(&due)).await)?;
    }
    tolerate_gone(
        secrets
            .patch(
                &client_secret_name(&rsm.name_any()),
                &PatchParams::default(),
                &Patch::Merge(&trust),
            )
            .await,
    )?;
    Ok(())
}

/// Deleted since the cache saw it: its successor gets what it needs when it is made.
fn tolerate_gone<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// The DNS names a replica is dialled by: its pod in the peers Service (members, the
/// Byzantine master), the client Service (clients), and `localhost`.
pub fn replica_hosts(cluster: &str, ns: &str, id: &str) -> Vec<String> {
    let peer = format!("{id}.{}", names::peers_service(cluster));
    let client = names::client_service(cluster);
    let mut hosts = Vec::new();
    for base in [peer, client] {
        hosts.push(base.clone());
        hosts.push(format!("{base}.{ns}"));
        hosts.push(format!("{base}.{ns}.svc"));
        hosts.push(format!("{base}.{ns}.svc.cluster.local"));
    }
    hosts.push("localhost".into());
    debug_assert!(hosts.contains(&names::peer_host(cluster, ns, id)));
    hosts
}

/// Whether `pod` runs without TLS (`LOCKSTEP_INSECURE=true` in its spec).
pub fn runs_plaintext(pod: &Pod) -> bool {
    pod.spec.iter().flat_map(|s| s.containers.iter()).any(|c| {
        c.env
            .iter()
            .flatten()
            .any(|e| e.name == "LOCKSTEP_INSECURE" && e.value.as_deref() == Some("true"))
    })
}

/// New replica pods of the cluster run plaintext while any of its replica pods does (one
/// made by an operator from before TLS on Kubernetes).
pub fn cluster_plaintext(world: &World) -> bool {
    world.replicas.iter().any(|o| runs_plaintext(&o.pod))
}

/// How the operator calls the admin API of `pod` at `addr`.
pub fn admin_target(rsm: &ReplicatedStateMachine, pod: &Pod, addr: String, pki: Option<&Pki>) -> AdminTarget {
    match pki {
        Some(pki) if !runs_plaintext(pod) => AdminTarget {
            addr,
            transport: pki.admin.clone(),
            server_name: Some(names::peer_host(
                &rsm.name_any(),
                &rsm.namespace().unwrap_or_default(),
                &pod.name_any(),
            )),
        },
        _ => AdminTarget::plaintext(addr),
    }
}

/// The transport of the Byzantine master of the cluster (its replicas all speak one).
pub async fn master_transport(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    world: &World,
) -> Result<Transport, Error> {
    if cluster_plaintext(world) {
        return Ok(Transport::plaintext());
    }
    Ok(ensure(ctx, rsm, ns).await?.admin.clone())
}

/// Creates the pod of replica `id` (its certificate Secret first, unless the cluster runs
/// plaintext); false when it already existed, or (cert-manager) while its Secret is not
/// issued yet.
pub async fn create_replica_pod(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    id: &str,
    machine: &MachineRef,
    world: &World,
) -> Result<bool, Error> {
    let plaintext = cluster_plaintext(world);
    let mut due = None;
    if plaintext {
        tracing::warn!(object = %key(rsm), replica = %id,
            "creating a plaintext replica: other replicas of this RSM were started without TLS by an older operator \
             (docs/security.md, \"Upgrading from plaintext\")");
    } else if let Some(issuer) = rsm.issuer_ref() {
        // cert-manager issues the Secret and renews it: no due time on the pod.
        if !crate::cert_manager::replica_ready(ctx, rsm, ns, issuer, id).await? {
            return Ok(false);
        }
    } else {
        let pki = ensure(ctx, rsm, ns).await?;
        let who = PeerIdentity::new(Role::Replica, id);
        let hosts = replica_hosts(&rsm.name_any(), ns, id);
        let name = replica_secret_name(id);
        // Always a fresh certificate for a new pod (create, or replace what a pod of this id
        // had before): its renewal time is then known, and goes on the pod.
        due = Some(issue_leaf_secret(ctx, rsm, ns, &name, &pki, &who, &hosts, false).await?);
    }
    let mut pod = build::replica_pod(rsm, id, machine, !plaintext)?;
    if let Some(due) = due {
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert(TLS_RENEW_ANNOTATION.into(), due.to_string());
    }
    create_if_absent(ctx, ns, &pod).await
}

/// Env, mount and volume of a TLS replica pod: its certificate Secret, read-only.
pub fn pod_additions(id: &str) -> (Vec<EnvVar>, VolumeMount, Volume) {
    let var = |name: &str, file: &str| EnvVar {
        name: name.into(),
        value: Some(format!("{TLS_DIR}/{file}")),
        ..Default::default()
    };
    let env = vec![
        var("LOCKSTEP_TLS_CA", CA_CRT),
        var("LOCKSTEP_TLS_CERT", TLS_CRT),
        var("LOCKSTEP_TLS_KEY", TLS_KEY),
    ];
    let mount = VolumeMount {
        name: "tls".into(),
        mount_path: TLS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let volume = Volume {
        name: "tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(replica_secret_name(id)),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    };
    (env, mount, volume)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_secret_is_current_only_from_this_ca_and_far_from_expiry() {
        let ca = Ca::generate("test").expect("ca");
        let other = Ca::generate("other").expect("ca");
        let leaf = ca
            .issue(&PeerIdentity::new(Role::Replica, "kv-0"), &["kv"])
            .expect("leaf");
        let s = |ca_pem: &str| Secret {
            data: Some(
                [(CA_CRT, ca_pem.to_string()), (TLS_CRT, leaf.cert.clone())]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        };
        assert!(leaf_current(&s(ca.pem()), ca.pem()));
        assert!(!leaf_current(&s(other.pem()), ca.pem()), "another CA");
        assert!(!leaf_current(&Secret::default(), ca.pem()), "empty");
    }

    #[test]
    fn the_admin_identity_is_issued_again_in_place_when_due() {
        let pki = Pki::new(Cas::single(Ca::generate("kv").expect("ca")), "ns/kv").expect("pki");
        let clone = pki.admin.clone();
        let first = clone.current().expect("tls").serial.clone();
        pki.renew_admin("ns/kv").expect("not due: nothing");
        assert_eq!(clone.current().expect("tls").serial, first);
        *pki.admin_due.lock().unwrap() = Some(Timestamp::now() - std::time::Duration::from_secs(1));
        pki.renew_admin("ns/kv").expect("due: issued again");
        assert_ne!(
            clone.current().expect("tls").serial,
            first,
            "clones use the new certificate"
        );
        assert_eq!(clone.identity(), Some(&PeerIdentity::new(Role::Admin, ADMIN_NAME)));
        assert!(pki.admin_due.lock().unwrap().is_some_and(|d| d > Timestamp::now()));
    }

    #[test]
    fn a_ca_kept_in_a_secret_issues_certificates_that_chain_to_it() {
        let ca = Ca::generate("kv").expect("ca");
        let again = Ca::from_pem(ca.pem(), &ca.key_pem()).expect("from pem");
        let pki = Pki::new(Cas::single(again), "ns/kv").expect("pki");
        assert_eq!(pki.admin.identity(), Some(&PeerIdentity::new(Role::Admin, ADMIN_NAME)));
        let hosts = replica_hosts("kv", "prod", "kv-0");
        assert!(hosts.contains(&"kv-0.kv-peers.prod.svc".to_string()));
        assert!(hosts.contains(&"kv".to_string()));
        assert!(hosts.contains(&"kv.prod.svc.cluster.local".to_string()));
    }

    /// A CA Secret in the middle of a rotation: both CAs trusted, the previous one issuing
    /// until the rotation settles, the new one after; an expired previous CA is dropped.
    #[test]
    fn a_rotated_ca_secret_trusts_both_and_issues_from_the_old_one_until_it_settles() {
        let old = Ca::generate("kv").expect("old");
        let new = Ca::generate("kv").expect("new");
        let settle = std::time::Duration::from_secs(600);
        let at = |rotated: Timestamp| {
            let data = BTreeMap::from([
                (CA_CRT, new.pem().to_string()),
                (CA_KEY, new.key_pem()),
                (PREVIOUS_CRT, old.pem().to_string()),
                (PREVIOUS_KEY, old.key_pem()),
                (ROTATED_AT, rotated.to_string()),
            ]);
            Secret {
                data: Some(
                    data.into_iter()
                        .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                        .collect(),
                ),
                ..Default::default()
            }
        };
        let cas = ca_in(&at(Timestamp::now()), "ns", settle).expect("cas");
        let pki = Pki::new(cas, "ns/kv").expect("pki");
        assert!(pki.trust.contains(new.pem().trim()) && pki.trust.contains(old.pem().trim()));
        assert!(pki.trust.starts_with(new.pem().trim()), "the current CA first");
        assert_eq!(
            pki.issuer("ns/kv").expect("issuer").pem(),
            old.pem(),
            "the old CA issues while it settles"
        );
        let (_, due) = pki
            .issue(&PeerIdentity::new(Role::Replica, "kv-0"), &["localhost"], "ns/kv")
            .expect("leaf");
        assert!(due <= Timestamp::now() + settle, "due again when it settles: {due}");
        let settled = ca_in(&at(Timestamp::now() - settle * 2), "ns", settle).expect("cas");
        let pki = Pki::new(settled, "ns/kv").expect("pki");
        assert_eq!(
            pki.issuer("ns/kv").expect("issuer").pem(),
            new.pem(),
            "the new CA issues once settled"
        );
        assert!(
            pki.trust.contains(old.pem().trim()),
            "the old CA is trusted until it expires"
        );
        assert!(!pki.ca_due(), "a new CA is far from due");
    }
}
