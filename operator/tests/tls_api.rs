//! The operator's Kubernetes client against an API server over TLS, as every real cluster
//! serves it: a CA and a server certificate made here (rcgen), a TLS server (rustls, with the
//! process-level crypto provider the operator's own dependencies give it) in front of the fake
//! API, and the operator's client built from a `kube::Config` that trusts the CA.
//!
//! This is what failed on a real cluster: with kube's `ring` feature turned off, rustls has no
//! crypto provider and `kube::Client` panics on its first HTTPS connection.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http_body_util::{BodyExt, Full};
use kube::api::{Api, ListParams};
use lockstep_operator::controller::{Context, reconcile};
use lockstep_operator::metrics::Metrics;
use lockstep_operator::observe::Source;
use lockstep_resource::ReplicatedStateMachine;
use serde_json::json;

struct Certs {
    ca_der: Vec<u8>,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

fn certs() -> Certs {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lockstep test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("server params");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    Certs {
        ca_der: ca.der().to_vec(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

/// Serves `api` over TLS on 127.0.0.1; returns the port.
async fn serve_tls(api: Arc<Mutex<FakeApi>>, certs: &Certs) -> u16 {
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![certs.cert_der.clone().into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(certs.key_der.clone().into()),
        )
        .expect("server TLS config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let api = api.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let api = api.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let resp = lock(&api).handle(&parts.method, &parts.uri, &bytes);
                        let (parts, body) = resp.into_parts();
                        let bytes = body.collect_bytes().await.unwrap_or_default();
                        Ok::<_, std::convert::Infallible>(hyper::Response::from_parts(parts, Full::new(bytes)))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    port
}

fn tls_client(port: u16, ca_der: Vec<u8>) -> kube::Client {
    let url: http::Uri = format!("https://127.0.0.1:{port}").parse().expect("url");
    let mut config = kube::Config::new(url);
    config.root_cert = Some(vec![ca_der]);
    config.default_namespace = NS.into();
    kube::Client::try_from(config).expect("client from config")
}

#[tokio::test]
async fn operator_client_talks_to_an_api_server_over_tls() {
    let certs = certs();
    let log = Log::default();
    let api = Arc::new(Mutex::new(FakeApi {
        log: log.clone(),
        ..Default::default()
    }));
    lock(&api).objects.insert(
        "/version".into(),
        json!({"major": "1", "minor": "28", "gitVersion": "v1.28.15", "gitCommit": "", "gitTreeState": "clean",
               "buildDate": "2024-01-01T00:00:00Z", "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"}),
    );
    lock(&api).insert(&rsm_path("kv"), rsm_json("kv", 1, "1.0.0", "img:1"));
    let port = serve_tls(api.clone(), &certs).await;
    let client = tls_client(port, certs.ca_der.clone());

    // Plain requests: the version, and a list of the resources the operator watches.
    let version = client.apiserver_version().await.expect("GET /version over TLS");
    assert_eq!(version.git_version, "v1.28.15");
    let rsms = Api::<ReplicatedStateMachine>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect("list RSMs over TLS");
    assert_eq!(rsms.items.len(), 1);

    // One real reconcile through the TLS client: bootstrap creates the replicas.
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(FakeAdmin::default()),
        Arc::new(Metrics::default()),
        Source::Api,
    ));
    let obj = Arc::new(rsm(&api, "kv"));
    reconcile(obj, ctx).await.expect("reconcile over TLS");
    assert_eq!(pods(&api), vec!["kv-0", "kv-1"]);
    assert!(
        lock(&log)
            .iter()
            .any(|l| l.starts_with("PUT") && l.ends_with("/status")),
        "status written over TLS"
    );
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused() {
    // The TLS is real: the same client without the CA cannot talk to the server.
    let certs = certs();
    let api = Arc::new(Mutex::new(FakeApi::default()));
    let port = serve_tls(api, &certs).await;
    let other = self::certs();
    let client = tls_client(port, other.ca_der);
    assert!(client.apiserver_version().await.is_err());
}
