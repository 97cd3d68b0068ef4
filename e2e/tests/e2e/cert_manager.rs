//! `spec.tls.issuerRef`: every certificate of an RSM issued by cert-manager instead of the
//! operator's built-in CA (docs/security.md, "cert-manager").
//!
//! Two ways to run, one test:
//!
//! - **Default (the one-node kit, CI here): a stand-in at the edge.** The real cert-manager
//!   cannot run on the kit (its images cannot be pulled). The test installs a stand-in
//!   Certificate CRD (`e2e/cert-manager/stand-in-crd.yaml`: same group, version, kind and the
//!   fields lockstep writes; not cert-manager's file) and plays the issuer itself: for every
//!   Certificate it signs a certificate with the uris and dnsNames it reads back from the API
//!   server, from a CA the test owns, writes the Secret the way cert-manager's CA issuer does
//!   (type `kubernetes.io/tls`, `tls.crt`, `tls.key`, `ca.crt`, the `cert-manager.io/*`
//!   annotations, owned by the Certificate) and sets the Certificate's `Ready` condition. What is
//!   under test — the operator, the replicas, the CLI — is real; only cert-manager is stood in.
//!   It also shows the condition of a cluster without the Certificate API, and the waiting one.
//! - **`LOCKSTEP_E2E_CERT_MANAGER=real`** (the kind workflow): the real cert-manager, installed
//!   by `e2e/cert-manager.sh` with the CA ClusterIssuer `lockstep-e2e-ca`, issues everything.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lockstep::PeerIdentity;
use lockstep::pki::Ca;
use lockstep_e2e::{ToolsPod, condition, fresh_namespace, kubectl, kubectl_wait_ready, kv_rsm, timing, wait_for};
use lockstep_resource::ReplicatedStateMachine;
use serde_json::json;

use crate::common::setup;

const NS: &str = "lockstep-e2e-cert-manager";
const ISSUER: &str = "lockstep-e2e-ca";
const CRD: &str = "certificates.cert-manager.io";
const STAND_IN_CRD: &str = "e2e/cert-manager/stand-in-crd.yaml";
const STAND_IN_LABEL: &str = "lockstep.dev/e2e-stand-in";

fn certificates() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

fn real_cert_manager() -> bool {
    std::env::var("LOCKSTEP_E2E_CERT_MANAGER").is_ok_and(|v| v == "real")
}

fn reason(obj: &ReplicatedStateMachine, type_: &str) -> Option<(String, String)> {
    let c = obj.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.reason.clone(), c.message.clone()))
}

/// The stand-in issuer: what cert-manager's CA issuer does for a Certificate, done by the test.
struct StandIn {
    ca: Ca,
    issued: AtomicUsize,
}

impl StandIn {
    /// Issues every Certificate of the namespace that is not Ready for its generation yet.
    async fn issue_pending(&self, client: &Client) -> anyhow::Result<()> {
        let certs: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &certificates());
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        for cert in certs.list(&ListParams::default()).await?.items {
            let generation = cert.metadata.generation.unwrap_or_default();
            let ready = cert.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "Ready" && c["status"] == "True" && c["observedGeneration"] == json!(generation)
                })
            });
            if ready {
                continue;
            }
            let spec = &cert.data["spec"];
            let name = cert.name_any();
            anyhow::ensure!(
                spec["issuerRef"] == json!({"name": ISSUER, "kind": "ClusterIssuer", "group": "cert-manager.io"}),
                "Certificate {name} names another issuer: {}",
                spec["issuerRef"]
            );
            let uris = spec["uris"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(
                uris.len() == 1,
                "Certificate {name}: one URI SAN expected, got {uris:?}"
            );
            let who = uris[0]
                .as_str()
                .and_then(PeerIdentity::parse_uri)
                .ok_or_else(|| anyhow::anyhow!("Certificate {name}: {} is no lockstep identity", uris[0]))?;
            let hosts: Vec<String> = spec["dnsNames"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                .unwrap_or_default();
            let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let leaf = self.ca.issue(&who, &host_refs)?;
            let secret_name = spec["secretName"].as_str().unwrap_or_default().to_string();
            let mut labels = spec["secretTemplate"]["labels"].clone();
            if !labels.is_object() {
                labels = json!({});
            }
            labels["controller.cert-manager.io/fao"] = json!("true");
            let secret: Secret = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {
                    "name": secret_name,
                    "labels": labels,
                    "annotations": {
                        "cert-manager.io/certificate-name": name,
                        "cert-manager.io/issuer-name": ISSUER,
                        "cert-manager.io/issuer-kind": "ClusterIssuer",
                        "cert-manager.io/issuer-group": "cert-manager.io",
                        "cert-manager.io/uri-sans": who.uri(),
                        "cert-manager.io/alt-names": hosts.join(","),
                    },
                    // As cert-manager with --enable-certificate-owner-ref (e2e/cert-manager.sh).
                    "ownerReferences": [{
                        "apiVersion": "cert-manager.io/v1", "kind": "Certificate", "name": name,
                        "uid": cert.metadata.uid.clone().unwrap_or_default(),
                        "controller": true, "blockOwnerDeletion": true,
                    }],
                },
                "type": "kubernetes.io/tls",
            }))?;
            let mut secret = secret;
            secret.data = Some(
                [
                    ("ca.crt", self.ca.pem().to_string()),
                    ("tls.crt", leaf.cert.clone()),
                    ("tls.key", leaf.key),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
            );
            secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply("cert-manager-certificates-issuing").force(),
                    &Patch::Apply(&secret),
                )
                .await?;
            let (not_before, not_after) =
                lockstep::pki::validity(&leaf.cert).ok_or_else(|| anyhow::anyhow!("unreadable certificate"))?;
            let ts = |s: i64| Timestamp::from_second(s).map(|t| t.to_string()).unwrap_or_default();
            let revision = cert.data["status"]["revision"].as_i64().unwrap_or(0) + 1;
            let status = json!({"status": {
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "Ready",
                    "message": "Certificate is up to date and has not expired",
                    "lastTransitionTime": Timestamp::now().to_string(),
                    "observedGeneration": generation,
                }],
                "notBefore": ts(not_before),
                "notAfter": ts(not_after),
                "renewalTime": ts(not_before + (not_after - not_before) * 2 / 3),
                "revision": revision,
            }});
            certs
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            self.issued.fetch_add(1, Ordering::Relaxed);
            println!("  stand-in issuer: {name} -> Secret {secret_name} ({})", who.uri());
        }
        Ok(())
    }
}

/// The stand-in CRD, installed fresh (a real cert-manager's CRD is never touched).
async fn install_stand_in_crd_after_showing_it_missing(client: &Client, api: &Api<ReplicatedStateMachine>) {
    let existing = kubectl(&["get", "crd", CRD, "-o", "jsonpath={.metadata.labels}"]);
    if let Ok(labels) = &existing {
        assert!(
            labels.contains(STAND_IN_LABEL),
            "the cluster runs a real cert-manager ({CRD} without the stand-in label): run with \
             LOCKSTEP_E2E_CERT_MANAGER=real so the test does not play its part next to it"
        );
        kubectl(&["delete", "crd", CRD, "--wait=true"]).expect("old stand-in CRD deleted");
    }
    // A cluster without cert-manager's API: the RSM says so and nothing is created.
    let created = Instant::now();
    api.create(&PostParams::default(), &rsm()).await.expect("RSM created");
    let missing = wait_for(
        api,
        "kv",
        "the CertManagerMissing condition",
        Duration::from_secs(120),
        |o| reason(o, "Ready").is_some_and(|(r, _)| r == "CertManagerMissing"),
    )
    .await
    .expect("a condition naming the missing cert-manager");
    let (_, message) = reason(&missing, "Ready").unwrap_or_default();
    println!("  without cert-manager: {message}");
    assert!(message.contains("certificates.cert-manager.io/v1"), "{message}");
    assert!(message.contains("ClusterIssuer lockstep-e2e-ca"), "{message}");
    timing(
        "cert-manager: RSM created -> CertManagerMissing condition",
        format!("{:.1?}", created.elapsed()),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    assert!(
        pods.list(&ListParams::default()).await.expect("pods").items.is_empty(),
        "no replica pod without certificates"
    );
    kubectl(&["apply", "--server-side", "-f", STAND_IN_CRD]).expect("stand-in CRD installed");
    kubectl(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD}"),
        "--timeout=60s",
    ])
    .expect("stand-in CRD established");
}

fn rsm() -> ReplicatedStateMachine {
    let images = lockstep_e2e::Images::from_env();
    let mut rsm = kv_rsm("kv", 1, "1.0.0", &images.replica);
    rsm.spec.tls = Some(lockstep_resource::TlsSpec {
        issuer_ref: Some(lockstep_resource::IssuerRef {
            name: ISSUER.into(),
            kind: Some("ClusterIssuer".into()),
            group: None,
        }),
    });
    rsm
}

// Two worker threads: the stand-in issuer runs as a task while the test blocks in kubectl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn certificates_from_a_cert_manager_issuer_serve_writes_through_the_cli() {
    let (client, images) = setup().await;
    fresh_namespace(&client, NS, true).await.expect("namespace");
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), NS);
    let real = real_cert_manager();
    let stand_in = Arc::new(StandIn {
        ca: Ca::generate("lockstep-e2e stand-in issuer").expect("CA"),
        issued: AtomicUsize::new(0),
    });
    let mut created = Instant::now();
    if real {
        println!("  issuer: the real cert-manager, ClusterIssuer {ISSUER} (e2e/cert-manager.sh)");
        api.create(&PostParams::default(), &rsm()).await.expect("RSM created");
    } else {
        println!(
            "  issuer: the test's STAND-IN for cert-manager (stand-in CRD; the test signs and writes the Secrets)"
        );
        install_stand_in_crd_after_showing_it_missing(&client, &api).await;
        created = Instant::now();
        // With the API there but nobody issuing: the RSM names the Secret it waits for.
        let waiting = wait_for(
            &api,
            "kv",
            "the WaitingForCertificate condition",
            Duration::from_secs(120),
            |o| reason(o, "Ready").is_some_and(|(r, _)| r == "WaitingForCertificate"),
        )
        .await
        .expect("waiting for cert-manager");
        let (_, message) = reason(&waiting, "Ready").unwrap_or_default();
        println!("  before any issuance: {message}");
        assert!(
            message
                .contains("waiting for cert-manager to issue Secret kv-operator-tls (ClusterIssuer lockstep-e2e-ca)"),
            "{message}"
        );
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        assert!(pods.list(&ListParams::default()).await.expect("pods").items.is_empty());
        let (issuer, c) = (stand_in.clone(), client.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = issuer.issue_pending(&c).await {
                    println!("  stand-in issuer: {e:#}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
    }
    let issuing = Instant::now();
    kubectl_wait_ready(NS, "kv", Duration::from_secs(300)).expect("kubectl wait --for=condition=Ready");
    timing(
        "cert-manager: issuer at work -> RSM Ready (t=1)",
        format!("{:.1?}", issuing.elapsed()),
    );
    timing(
        "cert-manager: RSM created -> Ready",
        format!("{:.1?}", created.elapsed()),
    );
    let obj = api.get("kv").await.expect("RSM");
    assert!(condition(&obj, "Ready"));
    let members: Vec<String> = obj
        .status
        .clone()
        .unwrap_or_default()
        .members
        .iter()
        .map(|m| m.pod.clone())
        .collect();
    assert_eq!(members.len(), 2, "{members:?}");

    // One Certificate per identity, owned by the RSM; the built-in CA is not made.
    let certs: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &certificates());
    let mut names: Vec<String> = certs
        .list(&ListParams::default())
        .await
        .expect("certificates")
        .items
        .iter()
        .map(|c| {
            let owner = c.metadata.owner_references.clone().unwrap_or_default();
            assert!(
                owner
                    .iter()
                    .any(|o| o.kind == "ReplicatedStateMachine" && o.name == "kv" && o.controller == Some(true)),
                "Certificate {} is owned by the RSM",
                c.name_any()
            );
            c.name_any()
        })
        .collect();
    names.sort();
    let mut want: Vec<String> = members.iter().map(|m| format!("{m}-tls")).collect();
    want.extend(["kv-client-tls".to_string(), "kv-operator-tls".to_string()]);
    want.sort();
    assert_eq!(names, want);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    assert!(
        secrets.get_opt("kv-tls-ca").await.expect("get").is_none(),
        "no built-in CA with an issuer"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for m in &members {
        let pod = pods.get(m).await.expect("replica pod");
        let mounts = serde_json::to_value(&pod.spec).expect("spec");
        assert!(
            mounts["volumes"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v["secret"]["secretName"] == json!(format!("{m}-tls")))),
            "{m} mounts its issued Secret"
        );
        if !real {
            let s = secrets.get(&format!("{m}-tls")).await.expect("secret");
            let ca = s.data.unwrap_or_default().get("ca.crt").map(|b| b.0.clone());
            assert_eq!(
                ca,
                Some(stand_in.ca.pem().as_bytes().to_vec()),
                "{m}: issued by the test's CA"
            );
        }
    }
    if !real {
        println!(
            "  stand-in issuer signed {} certificates",
            stand_in.issued.load(Ordering::Relaxed)
        );
    }

    // The CLI in a pod with the issued client certificate: writes and reads through the Service.
    let tools = ToolsPod::start(&client, NS, &images, "kv").await.expect("tools pod");
    tools
        .client_certificate(&client)
        .await
        .expect("client certificate mounted");
    let first = Instant::now();
    for i in 0..20 {
        let out = tools
            .lockstep("kv", &["put", &format!("k{i}"), &format!("v{i}")])
            .expect("write acknowledged");
        assert!(out.contains("OK"), "put k{i}: {out}");
    }
    timing(
        "cert-manager: 20 writes through the CLI",
        format!("{:.1?}", first.elapsed()),
    );
    assert_eq!(tools.lockstep("kv", &["get", "k7"]).expect("read").trim(), "v7");
    // The issued client identity is a client, not the admin; strangers are refused.
    let (line, probe) = tools.tls_probe("kv:7000");
    assert_eq!(line("client-status"), "ok", "{probe}");
    assert!(line("client-seal").starts_with("PermissionDenied: "), "{probe}");
    assert!(line("stranger-status").starts_with("refused: "), "{probe}");
    lockstep_e2e::delete_namespace(&client, NS).await.expect("cleanup");
}
