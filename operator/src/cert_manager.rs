//! Certificates from cert-manager instead of the built-in CA (`spec.tls.issuerRef`;
//! docs/security.md, "cert-manager").
//!
//! With an issuer named, the operator makes no CA. It server-side applies one cert-manager
//! `Certificate` (`cert-manager.io/v1`, owned by the RSM) per identity, each writing the very
//! Secret the built-in path would write, with the same keys (`ca.crt`, `tls.crt`, `tls.key`:
//! what cert-manager writes too), so replica pods mount it unchanged:
//!
//! - `<pod>-tls`: `lockstep://replica/<pod>` with the DNS names of [`crate::tls::replica_hosts`],
//!   server and client auth. The pod is created only once its Secret holds a usable
//!   certificate of that identity ([`replica_ready`]); until then the RSM's `Progressing`
//!   condition says what it waits for.
//! - `NAME-client-tls`: `lockstep://client/default`, client auth (applications mount it).
//! - `NAME-operator-tls`: `lockstep://admin/operator`, client auth: the operator reads it
//!   instead of minting its admin identity in memory, and reads it again once the loaded
//!   certificate has passed 2/3 of its life (cert-manager's default renewal point) until the
//!   renewed one is there.
//!
//! Renewal is cert-manager's (`renewBefore` of the issuer's policy; 1/3 of the life left by
//! default); replicas reload the refreshed files as they do with the built-in CA. The trust
//! bundle is each Secret's `ca.crt`, so the issuer must fill it (cert-manager's CA and Vault
//! issuers do; ACME issuers do not and cannot be used).
//!
//! No API request in steady state: a Certificate is applied when an identity is first needed
//! (per RSM and process for the admin and client ones, per new replica pod for the others).

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use lockstep_replica::tls::{Loaded, PeerIdentity, Role};
use lockstep_resource::{IssuerRef, ReplicatedStateMachine};
use serde_json::{Value, json};

use crate::build::{BuildError, meta};
use crate::controller::{Context, Error, key};
use crate::names::{self, COMPONENT_LABEL};
use crate::tls::{ADMIN_NAME, CA_CRT, CLIENT_NAME, COMPONENT_TLS, TLS_CRT, TLS_KEY};

pub const GROUP: &str = "cert-manager.io";
pub const VERSION: &str = "v1";
pub const KIND: &str = "Certificate";
pub const PLURAL: &str = "certificates";
/// Status reason while a Secret is not issued yet.
pub const REASON_WAITING: &str = "WaitingForCertificate";
/// Status reason when the cluster does not serve cert-manager's Certificate API.
pub const REASON_MISSING: &str = "CertManagerMissing";
/// Status reason when the operator may not write Certificates (an older ClusterRole).
pub const REASON_FORBIDDEN: &str = "CertManagerForbidden";

/// `certificates.cert-manager.io/v1`, for `Api<DynamicObject>`.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// The Secret (and Certificate) of the operator's admin identity of one RSM.
pub fn admin_secret_name(cluster: &str) -> String {
    format!("{cluster}-operator-tls")
}

/// One identity to be issued: the Secret (and Certificate) name, who, the DNS names, and
/// whether it serves (replicas) or only calls (admin, client).
pub struct Wanted {
    pub secret: String,
    pub who: PeerIdentity,
    pub dns_names: Vec<String>,
    pub server: bool,
}

impl Wanted {
    pub fn replica(rsm: &ReplicatedStateMachine, id: &str) -> Wanted {
        let ns = rsm.namespace().unwrap_or_default();
        Wanted {
            secret: crate::tls::replica_secret_name(id),
            who: PeerIdentity::new(Role::Replica, id),
            dns_names: crate::tls::replica_hosts(&rsm.name_any(), &ns, id),
            server: true,
        }
    }

    pub fn client(rsm: &ReplicatedStateMachine) -> Wanted {
        Wanted {
            secret: crate::tls::client_secret_name(&rsm.name_any()),
            who: PeerIdentity::new(Role::Client, CLIENT_NAME),
            dns_names: vec![],
            server: false,
        }
    }

    pub fn admin(rsm: &ReplicatedStateMachine) -> Wanted {
        Wanted {
            secret: admin_secret_name(&rsm.name_any()),
            who: PeerIdentity::new(Role::Admin, ADMIN_NAME),
            dns_names: vec![],
            server: false,
        }
    }
}

/// The `Certificate` for `wanted`, named like its Secret and owned by the RSM (deleted with
/// it). ECDSA P-256 like the built-in CA, a new key at every issuance.
pub fn certificate(
    rsm: &ReplicatedStateMachine,
    issuer: &IssuerRef,
    wanted: &Wanted,
) -> Result<DynamicObject, BuildError> {
    let ar = api_resource();
    let mut obj = DynamicObject::new(&wanted.secret, &ar);
    obj.metadata = meta(rsm, wanted.secret.clone(), COMPONENT_TLS)?;
    let mut secret_labels = names::cluster_labels(&rsm.name_any());
    secret_labels.insert(COMPONENT_LABEL.into(), COMPONENT_TLS.into());
    let usages: &[&str] = if wanted.server {
        &["digital signature", "server auth", "client auth"]
    } else {
        &["digital signature", "client auth"]
    };
    let mut spec = json!({
        "secretName": wanted.secret,
        "issuerRef": {"name": issuer.name, "kind": issuer.kind(), "group": issuer.group()},
        "uris": [wanted.who.uri()],
        "usages": usages,
        "privateKey": {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"},
        "secretTemplate": {"labels": secret_labels},
    });
    if !wanted.dns_names.is_empty() {
        spec["dnsNames"] = json!(wanted.dns_names);
    }
    obj.data = json!({ "spec": spec });
    Ok(obj)
}

/// Why a Secret does not (yet) hold a usable certificate of `who`; its PEM parts when it does.
pub fn issued(secret: Option<&Secret>, who: &PeerIdentity) -> Result<[String; 3], String> {
    let secret = secret.ok_or("the Secret does not exist yet")?;
    let field = |name: &str| -> Result<String, String> {
        let v = secret
            .data
            .as_ref()
            .and_then(|d| d.get(name))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default();
        if v.trim().is_empty() {
            Err(format!("it has no {name}"))
        } else {
            Ok(v)
        }
    };
    let (ca, cert, key) = (field(CA_CRT)?, field(TLS_CRT)?, field(TLS_KEY)?);
    let loaded = Loaded::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes())
        .map_err(|e| format!("its certificate is not usable ({e:#})"))?;
    if loaded.identity != *who {
        return Err(format!(
            "its certificate is for {}, not {}",
            loaded.identity.uri(),
            who.uri()
        ));
    }
    if lockstep::pki::time_left(&cert).is_none() {
        return Err("its certificate has expired".into());
    }
    Ok([ca, cert, key])
}

/// Server-side applies the Certificate for `wanted` and returns cert-manager's `Ready`
/// message, if it wrote one. A cluster without cert-manager's API (404) or an operator not
/// allowed to write Certificates (403) stop the reconcile with a condition saying so.
async fn apply(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    issuer: &IssuerRef,
    wanted: &Wanted,
) -> Result<Option<String>, Error> {
    let obj = certificate(rsm, issuer, wanted)?;
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &api_resource());
    let params = PatchParams::apply(names::MANAGER).force();
    match api.patch(&wanted.secret, &params, &Patch::Apply(&obj)).await {
        Ok(applied) => Ok(ready_message(&applied)),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::Blocked {
            reason: REASON_MISSING,
            message: format!(
                "spec.tls.issuerRef names {issuer}, but this cluster does not serve cert-manager's Certificate API \
                 ({PLURAL}.{GROUP}/{VERSION}): install cert-manager (https://cert-manager.io/docs/installation/), \
                 or create the ReplicatedStateMachine again without spec.tls.issuerRef to use the built-in CA. \
                 No replica is created until then"
            ),
        }),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(Error::Blocked {
            reason: REASON_FORBIDDEN,
            message: format!(
                "the operator may not write {PLURAL}.{GROUP} in namespace {ns} ({}): its ClusterRole needs \
                 create and patch on them (manifests/01-rbac.yaml, charts/lockstep/templates/rbac.yaml)",
                s.message
            ),
        }),
        Err(e) => Err(e.into()),
    }
}

/// The message of a Certificate's `Ready` condition when it is not `True`.
pub fn ready_message(cert: &DynamicObject) -> Option<String> {
    let conditions = cert.data.pointer("/status/conditions")?.as_array()?;
    let ready = conditions
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))?;
    if ready.get("status").and_then(Value::as_str) == Some("True") {
        return None;
    }
    let reason = ready.get("reason").and_then(Value::as_str).unwrap_or_default();
    let message = ready.get("message").and_then(Value::as_str).unwrap_or_default();
    Some(format!("{reason}: {message}"))
}

/// What the RSM waits for, in the words of its status.
pub fn waiting_message(issuer: &IssuerRef, wanted: &Wanted, why: &str, cert_manager_says: Option<&str>) -> String {
    let mut msg = format!(
        "waiting for cert-manager to issue Secret {} ({issuer}) for {}: {why}",
        wanted.secret,
        wanted.who.uri()
    );
    if let Some(says) = cert_manager_says {
        msg.push_str(&format!("; Certificate {} is not Ready ({says})", wanted.secret));
    }
    msg
}

/// Applies the Certificate of `wanted` and reads its Secret: the PEM parts once issued,
/// else why not (for the status).
async fn ensure_issued(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    issuer: &IssuerRef,
    wanted: &Wanted,
) -> Result<Result<[String; 3], String>, Error> {
    let says = apply(ctx, rsm, ns, issuer, wanted).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = secrets.get_opt(&wanted.secret).await?;
    Ok(issued(secret.as_ref(), &wanted.who).map_err(|why| waiting_message(issuer, wanted, &why, says.as_deref())))
}

/// The RSM's PKI with certificates from cert-manager: the client and admin Certificates
/// applied, the admin identity loaded from its Secret. Until the admin Secret is issued the
/// reconcile stops with [`REASON_WAITING`] (nothing can be observed or created without it).
pub async fn ensure(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    issuer: &IssuerRef,
) -> Result<std::sync::Arc<crate::tls::Pki>, Error> {
    if let Some(pki) = ctx.pki.get(rsm) {
        refresh_admin(ctx, rsm, ns, &pki).await?;
        return Ok(pki);
    }
    let admin = Wanted::admin(rsm);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let pem = match issued(secrets.get_opt(&admin.secret).await?.as_ref(), &admin.who) {
        // Issued before (an operator restart): the RSM is served at once, even while
        // cert-manager's webhook or API is away; the Certificates are applied in passing
        // (one deleted by hand comes back).
        Ok(pem) => {
            for wanted in [Wanted::client(rsm), admin] {
                if let Err(e) = apply(ctx, rsm, ns, issuer, &wanted).await {
                    tracing::warn!(object = %key(rsm), certificate = %wanted.secret, error = %e,
                        "TLS: could not apply the cert-manager Certificate; the issued Secret is used meanwhile");
                }
            }
            pem
        }
        Err(_) => {
            apply(ctx, rsm, ns, issuer, &Wanted::client(rsm)).await?;
            ensure_issued(ctx, rsm, ns, issuer, &admin)
                .await?
                .map_err(|message| Error::Blocked {
                    reason: REASON_WAITING,
                    message: format!("{message}; the operator needs it to call the replicas, so none is created yet"),
                })?
        }
    };
    let pki = std::sync::Arc::new(crate::tls::Pki::from_issued(pem, &key(rsm))?);
    ctx.pki.insert(rsm, pki.clone());
    tracing::info!(object = %key(rsm), %issuer, "TLS: certificates from cert-manager; the operator's admin identity is loaded from its Secret");
    Ok(pki)
}

/// A paused RSM's PKI: the admin identity if its Secret is issued, nothing applied.
pub async fn existing(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
) -> Result<Option<std::sync::Arc<crate::tls::Pki>>, Error> {
    if let Some(pki) = ctx.pki.get(rsm) {
        return Ok(Some(pki));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let admin = Wanted::admin(rsm);
    match issued(secrets.get_opt(&admin.secret).await?.as_ref(), &admin.who) {
        Ok(pem) => Ok(Some(std::sync::Arc::new(crate::tls::Pki::from_issued(pem, &key(rsm))?))),
        Err(_) => Ok(None),
    }
}

/// Once the loaded admin certificate has passed 2/3 of its life, read its Secret again (one
/// GET per reconcile until cert-manager has renewed it) and use the new one from the next
/// handshake on.
async fn refresh_admin(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    pki: &crate::tls::Pki,
) -> Result<(), Error> {
    if pki.admin_due().is_some_and(|d| d > Timestamp::now()) {
        return Ok(());
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let admin = Wanted::admin(rsm);
    let Ok(pem) = issued(secrets.get_opt(&admin.secret).await?.as_ref(), &admin.who) else {
        tracing::warn!(object = %key(rsm), secret = %admin.secret,
            "TLS: the operator's admin Secret holds no usable certificate; keeping the one loaded before");
        return Ok(());
    };
    pki.reload_admin(pem, &key(rsm))
}

/// Whether replica `id`'s Secret holds its certificate (its Certificate applied first). When
/// not, the reason is noted on the RSM's PKI for the status and the pod must wait.
pub async fn replica_ready(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    ns: &str,
    issuer: &IssuerRef,
    id: &str,
) -> Result<bool, Error> {
    let pki = ensure(ctx, rsm, ns, issuer).await?;
    match ensure_issued(ctx, rsm, ns, issuer, &Wanted::replica(rsm, id)).await? {
        Ok(_) => Ok(true),
        Err(why) => {
            tracing::info!(object = %key(rsm), replica = %id, "{why}");
            pki.note_waiting(why);
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;
    use lockstep::pki::Ca;
    use lockstep_resource::TlsSpec;

    fn rsm(issuer: IssuerRef) -> ReplicatedStateMachine {
        let mut rsm = lockstep_resource::from_yaml(lockstep_resource::rule_cases::KV_FAILSTOP).expect("valid");
        rsm.spec.tls = Some(TlsSpec {
            issuer_ref: Some(issuer),
        });
        rsm.metadata = ObjectMeta {
            name: Some("kv".into()),
            namespace: Some("prod".into()),
            uid: Some("uid-1".into()),
            ..Default::default()
        };
        rsm
    }

    fn issuer() -> IssuerRef {
        IssuerRef {
            name: "lockstep-ca".into(),
            kind: None,
            group: None,
        }
    }

    #[test]
    fn a_replica_certificate_names_its_secret_identity_dns_names_and_issuer_and_is_owned() {
        let rsm = rsm(issuer());
        let cert = certificate(&rsm, &issuer(), &Wanted::replica(&rsm, "kv-3")).expect("built");
        assert_eq!(
            cert.types.as_ref().map(|t| t.api_version.as_str()),
            Some("cert-manager.io/v1")
        );
        assert_eq!(cert.types.as_ref().map(|t| t.kind.as_str()), Some("Certificate"));
        assert_eq!(cert.metadata.name.as_deref(), Some("kv-3-tls"));
        assert_eq!(cert.metadata.namespace.as_deref(), Some("prod"));
        let owner = &cert.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str(),
                owner.controller
            ),
            ("ReplicatedStateMachine", "kv", "uid-1", Some(true))
        );
        let labels = cert.metadata.labels.as_ref().expect("labels");
        assert_eq!(
            labels.get(names::MANAGED_BY_LABEL).map(String::as_str),
            Some(names::MANAGER)
        );
        let spec = &cert.data["spec"];
        assert_eq!(spec["secretName"], "kv-3-tls", "the Secret the pod mounts");
        assert_eq!(
            spec["issuerRef"],
            json!({"name": "lockstep-ca", "kind": "Issuer", "group": "cert-manager.io"})
        );
        assert_eq!(spec["uris"], json!(["lockstep://replica/kv-3"]));
        let dns: Vec<&str> = spec["dnsNames"]
            .as_array()
            .expect("dnsNames")
            .iter()
            .map(|v| v.as_str().expect("string"))
            .collect();
        assert_eq!(dns, crate::tls::replica_hosts("kv", "prod", "kv-3"));
        assert!(
            dns.contains(&"kv-3.kv-peers.prod.svc"),
            "what peers and the operator dial"
        );
        assert!(dns.contains(&"kv.prod.svc.cluster.local"), "the client Service");
        assert_eq!(
            spec["usages"],
            json!(["digital signature", "server auth", "client auth"])
        );
        assert_eq!(spec["privateKey"]["algorithm"], "ECDSA");
        assert_eq!(spec["privateKey"]["rotationPolicy"], "Always");
        assert_eq!(
            spec["secretTemplate"]["labels"][names::CLUSTER_LABEL],
            "kv",
            "the Secret is labelled like the built-in ones"
        );
    }

    #[test]
    fn the_client_and_admin_certificates_are_client_only_and_name_no_host() {
        let ext = IssuerRef {
            name: "corp".into(),
            kind: Some("ClusterIssuer".into()),
            group: None,
        };
        let rsm = rsm(ext.clone());
        let client = certificate(&rsm, &ext, &Wanted::client(&rsm)).expect("built");
        assert_eq!(client.data["spec"]["secretName"], "kv-client-tls");
        assert_eq!(client.data["spec"]["uris"], json!(["lockstep://client/default"]));
        assert!(client.data["spec"].get("dnsNames").is_none());
        assert_eq!(
            client.data["spec"]["usages"],
            json!(["digital signature", "client auth"])
        );
        assert_eq!(client.data["spec"]["issuerRef"]["kind"], "ClusterIssuer");
        let admin = certificate(&rsm, &ext, &Wanted::admin(&rsm)).expect("built");
        assert_eq!(admin.data["spec"]["secretName"], "kv-operator-tls");
        assert_eq!(admin.data["spec"]["uris"], json!(["lockstep://admin/operator"]));
    }

    fn secret(parts: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                parts
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_counts_as_issued_only_with_all_three_keys_and_the_right_identity() {
        let ca = Ca::generate("issuer").expect("ca");
        let who = PeerIdentity::new(Role::Replica, "kv-0");
        let leaf = ca.issue(&who, &["kv"]).expect("leaf");
        let good = secret(&[
            (CA_CRT, ca.pem()),
            (TLS_CRT, leaf.cert.as_str()),
            (TLS_KEY, leaf.key.as_str()),
        ]);
        assert!(issued(Some(&good), &who).is_ok());
        assert_eq!(issued(None, &who).unwrap_err(), "the Secret does not exist yet");
        // cert-manager creates the Secret with an empty ca.crt for issuers that give none.
        let no_ca = secret(&[
            (CA_CRT, ""),
            (TLS_CRT, leaf.cert.as_str()),
            (TLS_KEY, leaf.key.as_str()),
        ]);
        assert_eq!(issued(Some(&no_ca), &who).unwrap_err(), "it has no ca.crt");
        let other = PeerIdentity::new(Role::Replica, "kv-1");
        assert!(
            issued(Some(&good), &other)
                .unwrap_err()
                .contains("lockstep://replica/kv-0, not")
        );
        let stranger = Ca::generate("x").expect("ca").issue(&who, &[]).expect("leaf");
        let mismatched = secret(&[
            (CA_CRT, ca.pem()),
            (TLS_CRT, leaf.cert.as_str()),
            (TLS_KEY, stranger.key.as_str()),
        ]);
        assert!(issued(Some(&mismatched), &who).unwrap_err().contains("not usable"));
    }

    #[test]
    fn the_waiting_message_names_the_secret_the_issuer_and_what_cert_manager_says() {
        let rsm = rsm(issuer());
        let msg = waiting_message(
            &issuer(),
            &Wanted::replica(&rsm, "kv-0"),
            "the Secret does not exist yet",
            Some("IssuerNotReady: issuer lockstep-ca not found"),
        );
        assert_eq!(
            msg,
            "waiting for cert-manager to issue Secret kv-0-tls (Issuer lockstep-ca) for lockstep://replica/kv-0: \
             the Secret does not exist yet; Certificate kv-0-tls is not Ready (IssuerNotReady: issuer lockstep-ca not found)"
        );
        let mut cert = certificate(&rsm, &issuer(), &Wanted::client(&rsm)).expect("built");
        assert_eq!(ready_message(&cert), None, "no status yet");
        cert.data["status"] = json!({"conditions": [{"type": "Ready", "status": "False", "reason": "DoesNotExist", "message": "Issuing certificate as Secret does not exist"}]});
        assert_eq!(
            ready_message(&cert).as_deref(),
            Some("DoesNotExist: Issuing certificate as Secret does not exist")
        );
        cert.data["status"]["conditions"][0]["status"] = json!("True");
        assert_eq!(ready_message(&cert), None);
    }
}
