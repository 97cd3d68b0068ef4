//! Mutual TLS on a real `lockstep up` cluster (TLS is its default): for the client, peer and
//! admin services of every replica — no certificate, a certificate from another CA, a client
//! certificate on admin and peer RPCs, a replica certificate that is not (or no longer) a
//! member — each refused, while a correct client keeps being served throughout.
//! See docs/security.md.

mod common;

use common::{LocalCluster, Writers, connect, wait_until};
use lockstep::pki::Ca;
use lockstep::{PeerIdentity, Role, Transport};
use lockstep_proto::{
    AppendRequest, ExecuteRequest, ReadRequest, ReconfigureRequest, SealRequest, StatusRequest,
    admin_client::AdminClient, client_client::ClientClient, peer_client::PeerClient,
};
use nix::sys::signal::Signal;
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Every RPC family on `ep` with `transport`: (client Read, peer Append, admin Status, admin Seal).
async fn calls(transport: &Transport, ep: &str) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let ch = match connect(transport, ep).await {
        Ok(ch) => ch,
        Err(e) => {
            let s = tonic::Status::unavailable(format!("connect: {e:?}"));
            return ["client", "peer", "admin", "admin-seal"]
                .into_iter()
                .map(|w| (w, Err(s.clone())))
                .collect();
        }
    };
    let mut out = Vec::new();
    let read = ClientClient::new(ch.clone())
        .read(ReadRequest {
            query: br#"{"op":"get","key":"x"}"#.to_vec(),
        })
        .await;
    out.push(("client", read.map(|_| ())));
    let append = PeerClient::new(ch.clone()).append(AppendRequest::default()).await;
    out.push(("peer", append.map(|_| ())));
    let status = AdminClient::new(ch.clone()).status(StatusRequest {}).await;
    out.push(("admin", status.map(|_| ())));
    let seal = AdminClient::new(ch).seal(SealRequest { at_index: 0 }).await;
    out.push(("admin-seal", seal.map(|_| ())));
    out
}

#[test]
fn every_replica_service_refuses_callers_without_the_right_certificate() {
    let cluster = LocalCluster::start("tls", 1, "kv", &["--quiet"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let writer = Writers::start(&cluster, 1, Duration::from_millis(20));
    let tls_dir = cluster.cluster_dir().join(lockstep::pki::TLS_DIR);
    let ca_pem = std::fs::read(tls_dir.join("ca.pem")).expect("ca.pem");
    let members = cluster.members();

    // Certificates from another CA: a client, an admin and a replica with a member's id. The
    // caller trusts the real CA (so only the replica's verification can refuse it).
    let other = Ca::generate("impostor").expect("other CA");
    let impostor = |role: Role, name: &str| {
        let leaf = other.issue(&PeerIdentity::new(role, name), &[]).expect("leaf");
        Transport::from_pem(ca_pem.clone(), leaf.cert.into(), leaf.key.into(), "impostor".into()).expect("transport")
    };
    let foreign = [
        impostor(Role::Client, "cli"),
        impostor(Role::Admin, "up"),
        impostor(Role::Replica, &members[0]),
    ];
    // TLS that verifies the replica but presents no certificate.
    let anonymous = |ep: &str| {
        Endpoint::from_shared(ep.replace("http://", "https://"))
            .expect("endpoint")
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))
            .expect("tls")
    };
    let client = cluster.transport();

    for m in &members {
        let ep = cluster.endpoint(m);
        rt.block_on(async {
            // No certificate at all: plaintext, and TLS without a client certificate.
            for (what, r) in calls(&Transport::plaintext(), &ep).await {
                assert!(r.is_err(), "{m}: plaintext {what} call accepted");
            }
            match anonymous(&ep).connect().await {
                Err(_) => {}
                Ok(ch) => {
                    let r = ClientClient::new(ch)
                        .read(ReadRequest {
                            query: br#"{"op":"get","key":"x"}"#.to_vec(),
                        })
                        .await;
                    assert!(r.is_err(), "{m}: a TLS call without a client certificate was served");
                }
            }
            // Another CA: refused in the handshake, whatever identity the certificate claims.
            for t in &foreign {
                for (what, r) in calls(t, &ep).await {
                    let e = r.expect_err(&format!("{m}: {what} from another CA's {:?} accepted", t.identity()));
                    assert!(
                        !matches!(e.code(), Code::PermissionDenied | Code::FailedPrecondition),
                        "{m}: {what} from another CA reached the authorization step or a handler: {e:?}"
                    );
                }
            }
            // The real client certificate: client RPCs and Status yes; admin and peer RPCs no.
            let got = calls(&client, &ep).await;
            for (what, r) in &got {
                match *what {
                    "client" => assert!(
                        !matches!(r, Err(e) if matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated | Code::Unavailable)),
                        "{m}: client read refused: {r:?}"
                    ),
                    "admin" => assert!(r.is_ok(), "{m}: a client may read Status: {r:?}"),
                    _ => {
                        let e = r.as_ref().expect_err("refused");
                        assert_eq!(e.code(), Code::PermissionDenied, "{m}: {what}: {e:?}");
                        assert!(e.message().contains("client 'cli'"), "{m}: {what}: {}", e.message());
                    }
                }
            }
            let mut admin = AdminClient::new(connect(&client, &ep).await.expect("connect"));
            let e = admin
                .reconfigure(ReconfigureRequest { config: None })
                .await
                .expect_err("a client may not reconfigure");
            assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
            assert!(e.message().contains("admin"), "{}", e.message());
            let e = ClientClient::new(connect(&client, &ep).await.expect("connect"))
                .execute(ExecuteRequest { command: None })
                .await
                .expect_err("no command");
            assert_eq!(e.code(), Code::InvalidArgument, "the client service itself answered: {e:?}");
        });
    }

    // A replica certificate of this CA whose id is not a member: its appends are refused.
    let ca = Ca::load(&tls_dir).expect("the cluster's CA");
    let stranger_leaf = ca
        .issue(&PeerIdentity::new(Role::Replica, "tls-99"), &["127.0.0.1"])
        .expect("leaf");
    let stranger = Transport::from_pem(
        ca_pem.clone(),
        stranger_leaf.cert.into(),
        stranger_leaf.key.into(),
        "stranger".into(),
    )
    .expect("transport");
    let backup = members
        .iter()
        .find(|m| **m != cluster.primary())
        .cloned()
        .expect("backup");
    let backup_ep = cluster.endpoint(&backup);
    rt.block_on(async {
        let mut p = PeerClient::new(connect(&stranger, &backup_ep).await.expect("connect"));
        let e = p.append(AppendRequest::default()).await.expect_err("stranger append");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("replica 'tls-99'") && e.message().contains("not a member"),
            "{}",
            e.message()
        );
        // A member's own certificate gets through to the peer service (which refuses the empty
        // append on its merits, not on who sent it).
        let primary = cluster.primary();
        let mut p = PeerClient::new(
            connect(&cluster.replica_transport(&primary), &backup_ep)
                .await
                .expect("connect"),
        );
        let r = p
            .append(AppendRequest::default())
            .await
            .expect("a member's append is answered");
        assert!(!r.into_inner().success);
    });

    // A replica that WAS a member: kill it, wait for its replacement; its certificate (still
    // valid, still on disk) no longer passes for a peer.
    cluster.kill_and_wait_replaced(&backup);
    let retired = cluster.replica_transport(&backup);
    for m in cluster.members() {
        let ep = cluster.endpoint(&m);
        rt.block_on(async {
            let mut p = PeerClient::new(connect(&retired, &ep).await.expect("connect"));
            let e = p.append(AppendRequest::default()).await.expect_err("retired append");
            assert_eq!(e.code(), Code::PermissionDenied, "{m}: {e:?}");
            assert!(e.message().contains(&format!("replica '{backup}'")), "{}", e.message());
        });
    }

    // The correct client was served throughout (the fail-over only delays it).
    let made = writer.ok();
    let errors = writer.finish();
    assert!(errors.is_empty(), "the correct client saw errors: {errors:?}");
    assert!(made > 10, "the correct client made progress");
    let mut c = cluster.client();
    rt.block_on(c.put("after", "all")).expect("put");
    assert_eq!(rt.block_on(c.get("after")).expect("get").as_deref(), Some("all"));
}

#[test]
fn a_replica_refuses_to_start_without_tls_or_insecure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(common::lockstep_bin())
        .args(["replica", "--id", "r-0", "--data-dir"])
        .arg(dir.path())
        .env_remove("LOCKSTEP_INSECURE")
        .env_remove("LOCKSTEP_TLS_CA")
        .env_remove("LOCKSTEP_TLS_CERT")
        .env_remove("LOCKSTEP_TLS_KEY")
        .output()
        .expect("run replica");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-ca") && err.contains("--insecure"),
        "the refusal names the flags: {err}"
    );
    // --insecure starts, and says so loudly.
    let child = std::process::Command::new(common::lockstep_bin())
        .args(["replica", "--id", "r-0", "--insecure", "--data-dir"])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run replica");
    assert!(
        wait_until(Duration::from_secs(10), || dir
            .path()
            .join(lockstep_replica::LISTENING_FILE)
            .exists()),
        "the insecure replica did not start"
    );
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WARN") && err.contains("INSECURE"), "{err}");
}
