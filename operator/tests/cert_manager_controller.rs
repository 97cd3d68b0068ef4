//! `spec.tls.issuerRef` through the real reconcile against the fake API server: the
//! cert-manager Certificates it applies, what it waits for, and that no pod (nor ordinal, nor
//! claim) comes before its Secret is issued. cert-manager itself is the far side: here the
//! test writes the Secrets it would.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use lockstep::PeerIdentity;
use lockstep::pki::Ca;
use lockstep_operator::controller::{Context, reconcile};
use lockstep_operator::metrics::Metrics;
use lockstep_operator::observe::Source;
use serde_json::{Value, json};

const CERTS: &str = "/apis/cert-manager.io/v1/namespaces/apps/certificates";
const PODS: &str = "/api/v1/namespaces/apps/pods";
const PVCS: &str = "/api/v1/namespaces/apps/persistentvolumeclaims";

struct Harness {
    api: Arc<Mutex<FakeApi>>,
    ctx: Arc<Context>,
    log: Log,
}

fn harness(not_served: &[&str]) -> Harness {
    let log = Log::default();
    let api = Arc::new(Mutex::new(FakeApi {
        log: log.clone(),
        not_served: not_served.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }));
    let admin = Arc::new(FakeAdmin {
        log: log.clone(),
        ..Default::default()
    });
    let ctx = Context::new(client(api.clone()), admin, Arc::new(Metrics::default()), Source::Api);
    let mut rsm = rsm_json("kv", 1, "1.0.0", "kv:1");
    rsm["spec"]["tls"] = json!({"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}});
    lock(&api).insert(&rsm_path("kv"), rsm);
    Harness {
        api,
        ctx: Arc::new(ctx),
        log,
    }
}

impl Harness {
    async fn reconcile(&self) {
        lock(&self.log).clear();
        reconcile(Arc::new(rsm(&self.api, "kv")), self.ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("reconcile: {e}"));
    }

    fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }

    fn condition(&self, type_: &str) -> (String, String, String) {
        rsm(&self.api, "kv")
            .status
            .unwrap_or_default()
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
            .unwrap_or_default()
    }

    fn object(&self, path: &str) -> Option<Value> {
        lock(&self.api).objects.get(path).cloned()
    }

    /// What cert-manager's CA issuer would write for Certificate `name`: read its spec back,
    /// sign its URI and DNS names.
    fn issue(&self, ca: &Ca, name: &str) {
        let cert = self
            .object(&format!("{CERTS}/{name}"))
            .unwrap_or_else(|| panic!("Certificate {name} was applied"));
        let who = PeerIdentity::parse_uri(cert["spec"]["uris"][0].as_str().unwrap_or_default()).expect("identity");
        let hosts: Vec<String> = cert["spec"]["dnsNames"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let leaf = ca.issue(&who, &hosts).expect("leaf");
        let secret_name = cert["spec"]["secretName"].as_str().unwrap_or_default().to_string();
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(secret_name.clone()),
                namespace: Some(NS.into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    ("ca.crt", ca.pem().to_string()),
                    ("tls.crt", leaf.cert),
                    ("tls.key", leaf.key),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
            ),
            ..Default::default()
        };
        let mut v = serde_json::to_value(&secret).expect("secret");
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Secret");
        lock(&self.api).insert(&format!("/api/v1/namespaces/{NS}/secrets/{secret_name}"), v);
    }
}

fn created(log: &[String], collection: &str) -> bool {
    log.iter().any(|l| l.starts_with("POST ") && l.contains(collection))
}

#[tokio::test]
async fn certificates_are_applied_and_pods_wait_for_their_issued_secrets() {
    let h = harness(&[]);
    let ca = Ca::generate("corp-ca").expect("ca");

    // 1. Nothing issued: the client and admin Certificates, and a condition naming the Secret.
    h.reconcile().await;
    let log = h.log();
    assert!(log.contains(&format!("PATCH {CERTS}/kv-client-tls")), "{log:#?}");
    assert!(log.contains(&format!("PATCH {CERTS}/kv-operator-tls")), "{log:#?}");
    assert!(
        !created(&log, "/secrets"),
        "no built-in CA or certificate Secret: {log:#?}"
    );
    assert!(!created(&log, PODS) && !created(&log, PVCS), "{log:#?}");
    let (status, reason, message) = h.condition("Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "WaitingForCertificate"));
    assert!(
        message.starts_with(
            "waiting for cert-manager to issue Secret kv-operator-tls (ClusterIssuer corp-ca) for lockstep://admin/operator: the Secret does not exist yet"
        ),
        "{message}"
    );
    let admin = h
        .object(&format!("{CERTS}/kv-operator-tls"))
        .expect("admin Certificate");
    assert_eq!(admin["spec"]["uris"], json!(["lockstep://admin/operator"]));
    assert_eq!(
        admin["metadata"]["ownerReferences"][0]["kind"],
        "ReplicatedStateMachine"
    );

    // 2. Admin and client issued: the replicas' Certificates, still no pod, ordinal or claim.
    h.issue(&ca, "kv-operator-tls");
    h.issue(&ca, "kv-client-tls");
    h.reconcile().await;
    let log = h.log();
    for id in ["kv-0", "kv-1"] {
        assert!(log.contains(&format!("PATCH {CERTS}/{id}-tls")), "{log:#?}");
        let cert = h.object(&format!("{CERTS}/{id}-tls")).expect("replica Certificate");
        assert_eq!(cert["apiVersion"], "cert-manager.io/v1");
        assert_eq!(cert["kind"], "Certificate");
        assert_eq!(cert["spec"]["secretName"], format!("{id}-tls"));
        assert_eq!(cert["spec"]["uris"], json!([format!("lockstep://replica/{id}")]));
        assert_eq!(
            cert["spec"]["issuerRef"],
            json!({"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
        );
        let dns = cert["spec"]["dnsNames"].as_array().cloned().unwrap_or_default();
        assert!(dns.contains(&json!(format!("{id}.kv-peers.apps.svc"))), "{dns:?}");
        assert!(dns.contains(&json!("kv.apps.svc.cluster.local")), "{dns:?}");
        let owner = &cert["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["name"].as_str()),
            (Some("ReplicatedStateMachine"), Some("kv"))
        );
        assert_eq!(owner["controller"], true);
    }
    assert!(!created(&log, PODS) && !created(&log, PVCS), "{log:#?}");
    assert_eq!(
        rsm(&h.api, "kv").status.unwrap_or_default().next_ordinal,
        None,
        "no ordinal handed out before the Secret is issued"
    );
    let (status, reason, message) = h.condition("Progressing");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "WaitingForCertificate"),
        "{message}"
    );
    assert!(
        message.contains("Secret kv-0-tls (ClusterIssuer corp-ca) for lockstep://replica/kv-0"),
        "{message}"
    );
    assert!(message.contains("Secret kv-1-tls"), "{message}");

    // 3. The replicas' Secrets issued: their pods, mounting them, with no renewal annotation
    // (renewal is cert-manager's).
    h.issue(&ca, "kv-0-tls");
    h.issue(&ca, "kv-1-tls");
    h.reconcile().await;
    let log = h.log();
    assert!(created(&log, PODS), "{log:#?}");
    for id in ["kv-0", "kv-1"] {
        let pod = h.object(&pod_path(id)).unwrap_or_else(|| panic!("pod {id}: {log:#?}"));
        let volumes = pod["spec"]["volumes"].as_array().cloned().unwrap_or_default();
        assert!(
            volumes
                .iter()
                .any(|v| v["secret"]["secretName"] == json!(format!("{id}-tls"))),
            "{volumes:?}"
        );
        assert!(
            pod["metadata"]["annotations"]
                .get("lockstep.dev/tls-renew-after")
                .is_none()
        );
    }
    assert!(
        !log.iter().any(|l| l.contains("/secrets/kv-tls-ca")),
        "no built-in CA: {log:#?}"
    );
}

#[tokio::test]
async fn a_cluster_without_the_certificate_api_is_told_so_and_gets_no_pod() {
    let h = harness(&["/apis/cert-manager.io/"]);
    h.reconcile().await;
    let log = h.log();
    assert!(!created(&log, PODS) && !created(&log, PVCS), "{log:#?}");
    let (status, reason, message) = h.condition("Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "CertManagerMissing"),
        "{message}"
    );
    assert!(message.contains("certificates.cert-manager.io/v1"), "{message}");
    assert!(message.contains("ClusterIssuer corp-ca"), "{message}");
    assert!(message.contains("install cert-manager"), "{message}");
    // Said once as an event too.
    assert!(
        log.iter().any(|l| l.starts_with("POST") && l.contains("/events")),
        "{log:#?}"
    );
}
