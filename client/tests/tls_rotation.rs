//! Certificate rotation of running replicas (issue 8, "Must show 2"; docs/security.md,
//! "Rotation"): a real TLS cluster under continuous writes from concurrent clients; every
//! replica's certificate and key files are replaced by new ones from the same CA while the load
//! runs. No request fails or ends with an unknown outcome, new handshakes to each replica get
//! its new certificate, a replica's new outgoing connection presents its new certificate, the
//! writes go on, and a half-written certificate file is refused (WARN) while the replica keeps
//! serving the certificate it had.

mod common;

use common::{LocalCluster, Writers, wait_until};
use lockstep::pki::Ca;
use lockstep::{PeerIdentity, Role, Transport};
use std::time::{Duration, Instant};

const WRITERS: usize = 4;
/// Rotations of every replica's certificate.
const ROUNDS: usize = 3;

/// The serial of the certificate a fresh TLS handshake with the replica at `endpoint`
/// receives (hex), as our client transport sees it.
fn served_serial(transport: &Transport, endpoint: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let addr = endpoint.trim_start_matches("http://").to_string();
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let config = transport.current().expect("TLS").client.clone();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no certificate")?;
        Ok(lockstep_replica::tls::serial_of(leaf))
    })
}

fn serial_of_pem(pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM");
    lockstep_replica::tls::serial_of(&der)
}

/// Replace replica `id`'s certificate and key files (what `lockstep up` passed it as
/// `--tls-cert`/`--tls-key`) with a new certificate from the cluster's CA; its serial.
fn rotate(cluster: &LocalCluster, ca: &Ca, id: &str) -> String {
    let files = cluster.tls_files(&format!("replicas/{id}"));
    let leaf = ca
        .issue(&PeerIdentity::new(Role::Replica, id), &["localhost", "127.0.0.1"])
        .expect("leaf");
    // Each file is replaced by a rename (as `lockstep up` writes them); between the two
    // renames the replica may see a key that does not match the certificate: it must keep
    // the old pair then, not serve a broken one.
    lockstep_replica::write_atomically(&files.key, leaf.key.as_bytes()).expect("key");
    lockstep_replica::write_atomically(&files.cert, leaf.cert.as_bytes()).expect("cert");
    serial_of_pem(&leaf.cert)
}

/// Replica `id`'s log, without terminal colour codes.
fn log_of(cluster: &LocalCluster, id: &str) -> String {
    let raw = std::fs::read_to_string(cluster.cluster_dir().join("logs").join(format!("{id}.log"))).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Wait until `ok` has grown by `n` (progress), or fail with `what`.
fn progress(writers: &Writers, n: u64, what: &str, cluster: &LocalCluster) {
    let from = writers.ok();
    assert!(
        wait_until(Duration::from_secs(60), || writers.ok() >= from + n),
        "{what}: no progress ({} writes since); lockstep up said:\n{}",
        writers.ok() - from,
        cluster.up_output()
    );
}

#[test]
fn rotating_every_replica_certificate_under_load_fails_no_request() {
    // Debug on the TLS module: each replica logs the certificate every caller presents.
    let cluster = LocalCluster::start_with_env(
        "rot",
        1,
        "kv",
        &["--quiet"],
        &[(
            "RUST_LOG",
            "info,lockstep_replica::tls=debug,h2=warn,tower=warn,hyper=warn",
        )],
    );
    let client = cluster.transport();
    let ca = Ca::load(&cluster.cluster_dir().join(lockstep::pki::TLS_DIR)).expect("the cluster's CA");
    let members = cluster.members();
    let primary = cluster.primary();
    let backup = members.iter().find(|m| **m != primary).cloned().expect("a backup");
    let began = Instant::now();
    let writers = Writers::start(&cluster, WRITERS, Duration::ZERO);
    progress(&writers, 50, "before the rotation", &cluster);

    // Rotate every member's certificate while the writers run, ROUNDS times (writes in
    // between), each time until new handshakes get the new certificate.
    let old: Vec<String> = members
        .iter()
        .map(|m| served_serial(&client, &cluster.endpoint(m)).expect("handshake"))
        .collect();
    let rotation_began = Instant::now();
    let ok_before = writers.ok();
    let mut earlier: Vec<Vec<String>> = old.iter().map(|s| vec![s.clone()]).collect();
    let mut new = old.clone();
    for round in 0..ROUNDS {
        if round > 0 {
            for (e, n) in earlier.iter_mut().zip(&new) {
                e.push(n.clone());
            }
            progress(&writers, 20, "between rotations", &cluster);
        }
        new = members.iter().map(|m| rotate(&cluster, &ca, m)).collect();
        for ((m, before), new) in members.iter().zip(&earlier).zip(&new) {
            assert!(!before.contains(new));
            let mut last = String::new();
            let served = wait_until(Duration::from_secs(30), || {
                last = served_serial(&client, &cluster.endpoint(m)).unwrap_or_else(|e| e);
                last == *new
            });
            assert!(
                served,
                "{m}, round {round}: new handshakes still get serial {last}, not the new {new} (before: {before:?})"
            );
        }
    }
    let rotation_took = rotation_began.elapsed();
    let during = writers.ok() - ok_before;
    // The writes go on after the rotation.
    progress(&writers, 50, "after the rotation", &cluster);
    for m in &members {
        assert!(
            log_of(&cluster, m).contains("TLS certificate reloaded"),
            "{m} says it reloaded:\n{}",
            log_of(&cluster, m)
        );
    }

    // A new outgoing connection of the primary presents its new certificate: kill the backup;
    // the primary replicates to its replacement over a new connection, whose log names the
    // serial the primary presented.
    cluster.kill_and_wait_replaced(&backup);
    let newcomer = cluster
        .members()
        .into_iter()
        .find(|m| !members.contains(m))
        .expect("the new member");
    assert_eq!(cluster.primary(), primary, "the primary stayed");
    let primary_new = &new[members.iter().position(|m| *m == primary).expect("primary")];
    let primary_old = &old[members.iter().position(|m| *m == primary).expect("primary")];
    let from_primary = |on: &str, serial: &str| {
        let needle = format!("caller=replica '{primary}' serial={serial}");
        log_of(&cluster, on).lines().any(|l| l.contains(&needle))
    };
    // (The old backup logged the old certificate: what the check below would see if the
    // primary's new connections still presented it.)
    assert!(from_primary(&backup, primary_old), "{}", log_of(&cluster, &backup));
    assert!(
        wait_until(Duration::from_secs(30), || from_primary(&newcomer, primary_new)),
        "{newcomer} never saw {primary}'s new certificate {primary_new}:\n{}",
        log_of(&cluster, &newcomer)
    );
    for e in &earlier[members.iter().position(|m| *m == primary).expect("primary")] {
        assert!(
            !from_primary(&newcomer, e),
            "{primary} presented an earlier certificate ({e})"
        );
    }
    progress(&writers, 50, "after the replacement", &cluster);

    // A half-written certificate: refused with a WARN, the old certificate stays in service.
    let files = cluster.tls_files(&format!("replicas/{primary}"));
    let good = std::fs::read_to_string(&files.cert).expect("cert");
    let warnings = |log: &str| log.matches("TLS files changed but are not usable").count();
    let warned_before = warnings(&log_of(&cluster, &primary));
    std::fs::write(&files.cert, &good[..good.len() / 2]).expect("write half");
    let mut served = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            // Handshakes are what make the replica look at its files.
            served = served_serial(&client, &cluster.endpoint(&primary)).unwrap_or_else(|e| e);
            warnings(&log_of(&cluster, &primary)) > warned_before
        }),
        "no WARN for the broken file:\n{}",
        log_of(&cluster, &primary)
    );
    assert_eq!(&served, primary_new, "the certificate loaded before is still served");
    assert_eq!(
        served_serial(&client, &cluster.endpoint(&primary)).as_ref(),
        Ok(primary_new)
    );
    assert!(log_of(&cluster, &primary).contains("WARN"));
    progress(&writers, 50, "with a broken file", &cluster);

    let total = writers.ok();
    let errors = writers.finish();
    println!(
        "{ROUNDS} rotations of {} replicas under {WRITERS} writers: {during} writes during the rotations \
         ({rotation_took:?}), {total} in {:?} in all, {} failed or unknown",
        members.len(),
        began.elapsed(),
        errors.len()
    );
    assert!(errors.is_empty(), "failed or unknown-outcome requests: {errors:#?}");
    assert!(during > 0, "writes went on during the rotation");
}

/// The certificates in the PEM bundle at `path`.
fn bundle(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive("-----END CERTIFICATE-----")
        .filter(|c| c.contains("-----END CERTIFICATE-----"))
        .map(|c| format!("{}\n", c.trim()))
        .collect()
}

/// `lockstep up` renews what it issued while everything runs: with leaves valid 12 s and the CA
/// 36 s, under writers with no pause, every replica serves new leaves, the CA is rotated (the
/// new one first joins the trust bundle, then the leaves come from it), the old CA leaves the
/// bundle when it expires, and no request fails or has an unknown outcome.
#[test]
fn up_renews_its_certificates_and_rotates_its_ca_with_no_failed_request() {
    let cluster = LocalCluster::start(
        "renew",
        1,
        "kv",
        &["--quiet", "--cert-validity", "12s", "--ca-validity", "36s"],
    );
    let tls = cluster.cluster_dir().join(lockstep::pki::TLS_DIR);
    let ca_file = tls.join("ca.pem");
    let first_ca = bundle(&ca_file);
    assert_eq!(first_ca.len(), 1, "one CA at the start");
    let client = cluster.transport();
    let members = cluster.members();
    let began = Instant::now();
    let writers = Writers::start(&cluster, WRITERS, Duration::ZERO);
    progress(&writers, 50, "before any renewal", &cluster);

    // Leaves: every member serves a new certificate from the same CA (renewed after 8 s).
    let old: Vec<String> = members
        .iter()
        .map(|m| served_serial(&client, &cluster.endpoint(m)).expect("handshake"))
        .collect();
    for (m, before) in members.iter().zip(&old) {
        let mut last = String::new();
        assert!(
            wait_until(Duration::from_secs(60), || {
                last = served_serial(&client, &cluster.endpoint(m)).unwrap_or_else(|e| e);
                last != *before && !last.contains(' ')
            }),
            "{m} still serves {before} ({last}); lockstep up said:\n{}",
            cluster.up_output()
        );
    }
    progress(&writers, 50, "after the leaves were renewed", &cluster);

    // The CA: a new one joins the bundle (renewed with 12 s of 36 left)...
    let mut now_trusted = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            now_trusted = bundle(&ca_file);
            now_trusted.len() == 2
        }),
        "the CA was never rotated; lockstep up said:\n{}",
        cluster.up_output()
    );
    assert_eq!(
        now_trusted[1], first_ca[0],
        "the old CA stays trusted, after the new one"
    );
    let new_ca = now_trusted[0].clone();
    // ...every member then serves a leaf from it: a client that trusts only the new CA (and
    // holds a client certificate from it) completes a handshake with each.
    let only_new = || {
        let cert = std::fs::read(tls.join("client.pem")).expect("client.pem");
        let key = std::fs::read(tls.join("client.key")).expect("client.key");
        lockstep::Transport::from_pem(new_ca.clone().into_bytes(), cert, key, "the new CA only".into())
    };
    for m in &members {
        let mut last = String::new();
        assert!(
            wait_until(Duration::from_secs(60), || {
                last = match only_new() {
                    Ok(t) => served_serial(&t, &cluster.endpoint(m)).err().unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                last.is_empty()
            }),
            "{m} never served a leaf of the new CA ({last}); lockstep up said:\n{}",
            cluster.up_output()
        );
    }
    progress(&writers, 50, "after the CA rotation", &cluster);
    // ...and the old CA leaves the bundle once it has expired.
    assert!(
        wait_until(Duration::from_secs(60), || bundle(&ca_file) == vec![new_ca.clone()]),
        "the expired CA is still in the bundle; lockstep up said:\n{}",
        cluster.up_output()
    );
    progress(&writers, 50, "after the old CA left", &cluster);

    let total = writers.ok();
    let errors = writers.finish();
    let said = cluster.up_output();
    println!(
        "{total} writes by {WRITERS} writers in {:?} across leaf renewals and a CA rotation, {} failed or unknown",
        began.elapsed(),
        errors.len()
    );
    assert!(errors.is_empty(), "failed or unknown-outcome requests: {errors:#?}");
    assert!(said.contains("TLS: issued again"), "up says what it renewed:\n{said}");
    assert!(said.contains("a new CA"), "{said}");
}
