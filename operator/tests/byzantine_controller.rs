//! Byzantine resources against a mocked API server at the HTTP edge: the operator creates
//! the master Secret and each replica's key Secret before the pods that reference them,
//! publishes the master's public key in status, and never sends the fail-stop
//! Admin.Reconfigure to Byzantine replicas (their membership comes only from signed eras).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use lockstep_operator::controller::{Context, reconcile};
use lockstep_operator::metrics::Metrics;
use lockstep_operator::observe::Source;
use serde_json::{Value, json};

const SECRETS: &str = "/api/v1/namespaces/apps/secrets";

fn secret_field(api: &Mutex<FakeApi>, name: &str, field: &str) -> Option<String> {
    let s = lock(api).objects.get(&format!("{SECRETS}/{name}")).cloned()?;
    let b64 = s["data"][field].clone();
    let bytes: k8s_openapi::ByteString = serde_json::from_value(b64).ok()?;
    String::from_utf8(bytes.0).ok()
}

#[tokio::test]
async fn keys_exist_before_the_pods_and_the_master_key_is_published() {
    let log = Log::default();
    let api = Arc::new(Mutex::new(FakeApi {
        log: log.clone(),
        ..Default::default()
    }));
    let admin = Arc::new(FakeAdmin {
        log: log.clone(),
        ..Default::default()
    });
    let ctx = Arc::new(Context::new(
        client(api.clone()),
        admin.clone(),
        Arc::new(Metrics::default()),
        Source::Api,
    ));
    let mut obj = rsm_json("byz", 1, "1.0.0", "img:1");
    obj["spec"]["failureModel"] = json!("Byzantine");
    lock(&api).insert(&rsm_path("byz"), obj);

    reconcile(Arc::new(rsm(&api, "byz")), ctx.clone())
        .await
        .expect("reconcile");
    let writes: Vec<String> = lock(&log).iter().filter(|l| l.starts_with("POST")).cloned().collect();
    let at = |needle: &str| {
        writes
            .iter()
            .position(|l| l.as_str() == needle)
            .unwrap_or_else(|| panic!("{needle} not in {writes:#?}"))
    };
    let first_pod = at("POST /api/v1/namespaces/apps/pods");
    assert_eq!(
        writes[..first_pod]
            .iter()
            .filter(|l| l.starts_with(&format!("POST {SECRETS}")))
            .count(),
        7,
        "three replica keys and the master's, the RSM's CA and client certificate, and the first \
         replica's certificate, before any pod: {writes:#?}"
    );
    for (i, id) in ["byz-0", "byz-1", "byz-2"].iter().enumerate() {
        let key = secret_field(&api, &format!("{id}-byz-key"), "replica.key").expect("replica key");
        assert_eq!(key.trim().len(), 64, "{id}: a hex seed");
        let pod = lock(&api)
            .objects
            .get(&format!("/api/v1/namespaces/apps/pods/{id}"))
            .cloned()
            .unwrap_or(Value::Null);
        let volumes = pod["spec"]["volumes"].as_array().cloned().unwrap_or_default();
        assert!(
            volumes
                .iter()
                .any(|v| v["secret"]["secretName"] == json!(format!("{id}-byz-key"))),
            "pod {i} mounts its own key: {volumes:#?}"
        );
        assert!(
            volumes
                .iter()
                .any(|v| v["secret"]["secretName"] == json!(format!("{id}-tls"))),
            "pod {i} mounts its own certificate: {volumes:#?}"
        );
        let cert = secret_field(&api, &format!("{id}-tls"), "tls.crt").expect("certificate");
        let ca = secret_field(&api, "byz-tls-ca", "ca.crt").expect("the RSM's CA");
        assert_eq!(secret_field(&api, &format!("{id}-tls"), "ca.crt"), Some(ca.clone()));
        let t = lockstep::Transport::from_pem(
            ca.into_bytes(),
            cert.into_bytes(),
            secret_field(&api, &format!("{id}-tls"), "tls.key")
                .expect("key")
                .into_bytes(),
            id.to_string(),
        )
        .expect("a usable certificate and key");
        assert_eq!(
            t.identity(),
            Some(&lockstep::PeerIdentity::new(lockstep::Role::Replica, *id)),
            "the certificate names the replica"
        );
        let env = pod["spec"]["containers"][0]["env"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let master = env
            .iter()
            .find(|e| e["name"] == "LOCKSTEP_MASTER_PUBLIC_KEY")
            .expect("master public key env");
        assert_eq!(master["valueFrom"]["secretKeyRef"]["name"], "byz-byz-master");
        assert_eq!(master["valueFrom"]["secretKeyRef"]["key"], "master.pub");
    }
    let public = secret_field(&api, "byz-byz-master", "master.pub").expect("master public key");
    let secret_key = secret_field(&api, "byz-byz-master", "master.key").expect("master secret key");
    assert_ne!(public.trim(), secret_key.trim());
    let owners = lock(&api).objects[&format!("{SECRETS}/byz-byz-master")]["metadata"]["ownerReferences"].clone();
    assert_eq!(owners[0]["kind"], "ReplicatedStateMachine", "deleted with the resource");

    // The next reconcile publishes the key clients verify eras with; the master Secret is
    // neither read again nor replaced (the task keeps it).
    reconcile(Arc::new(rsm(&api, "byz")), ctx.clone())
        .await
        .expect("reconcile");
    let status = rsm(&api, "byz").status.unwrap_or_default();
    let byz = status.byzantine.expect("status.byzantine");
    assert_eq!(byz.master_public_key, public.trim());
    assert!(
        !lock(&log)
            .iter()
            .any(|l| l.contains("secrets/byz-byz-master") && !l.starts_with("GET")),
        "the master key is never rewritten"
    );

    // Running replicas: a configuration is recorded, but no Admin.Reconfigure is sent.
    for (i, name) in ["byz-0", "byz-1", "byz-2"].iter().enumerate() {
        run_pod(&api, name, &format!("10.0.1.{i}"), "n1");
        admin.add(&format!("10.0.1.{i}"), name, "1.0.0");
    }
    reconcile(Arc::new(rsm(&api, "byz")), ctx.clone())
        .await
        .expect("reconcile");
    reconcile(Arc::new(rsm(&api, "byz")), ctx.clone())
        .await
        .expect("reconcile");
    assert!(
        rsm(&api, "byz").status.unwrap_or_default().epoch.is_some(),
        "epoch recorded"
    );
    assert!(
        !lock(&log).iter().any(|l| l.starts_with("admin reconfigure")),
        "{:#?}",
        lock(&log)
    );
    ctx.masters.stop_all();
}
