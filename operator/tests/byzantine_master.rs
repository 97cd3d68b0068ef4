//! The operator's Byzantine configuration master against real replicas (in-process, on
//! loopback) and a mocked API server at the HTTP edge holding the Secrets: the first era
//! from the replicas' own initial state, a client admitted with its key from the
//! `spec.clientIdentities` Secret, voted writes and reads, an operator fail-over (a new master
//! task that knows only the Secret continues the master stream), and an era change that
//! replaces a member by state transfer.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use ed25519_dalek::SigningKey;
use k8s_openapi::ByteString;
use lockstep::byz::ByzClient;
use lockstep::byz_discover::Discovery;
use lockstep::up_byz::{ByzMaster, Ordering};
use lockstep_operator::byzantine::{master, objects};
use lockstep_planner::{Config, ConfigMember, Role};
use lockstep_proto::MachineIdentity;
use lockstep_replica::byz::keys;
use serde_json::json;

const SECRETS: &str = "/api/v1/namespaces/apps/secrets";

fn b64(text: String) -> serde_json::Value {
    serde_json::to_value(ByteString(text.into_bytes())).unwrap_or_default()
}

fn put_secret(api: &Mutex<FakeApi>, name: &str, data: serde_json::Value) {
    lock(api).insert(
        &format!("{SECRETS}/{name}"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "apps"}, "data": data}),
    );
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: lockstep_replica::ReplicaArgs,
}

/// Starts replica `id` in this process; returns its endpoint.
async fn replica(dir: &Path, id: &str, key: &SigningKey, master: &SigningKey, identities: &Path) -> String {
    let data = dir.join(id);
    let key_file = dir.join(format!("{id}.key"));
    keys::write_private(&key_file, keys::encode_key(&key.to_bytes()).as_bytes()).expect("key file");
    let master_hex = hex::encode(master.verifying_key().to_bytes());
    let args = Wrap::try_parse_from([
        "replica",
        "--id",
        id,
        "--data-dir",
        data.to_str().unwrap_or_default(),
        "--machine",
        "kv",
        "--failure-model",
        "Byzantine",
        "--no-fsync",
        "--master-public-key",
        &master_hex,
        "--key-file",
        key_file.to_str().unwrap_or_default(),
        "--client-identities",
        identities.to_str().unwrap_or_default(),
        // As the operator runs replicas until TLS on Kubernetes lands (docs/security.md).
        "--insecure",
    ])
    .expect("replica args")
    .args;
    let factory = lockstep_replica::machine::builtin("kv").expect("kv machine");
    tokio::spawn(lockstep_replica::run(args, factory));
    let file = data.join(lockstep_replica::LISTENING_FILE);
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&file)
            && let Ok(l) = serde_json::from_slice::<lockstep_replica::Listening>(&bytes)
        {
            return format!("http://{}", l.grpc);
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{id} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(epoch: u64, members: &[(&str, &str)]) -> Config {
    Config {
        epoch,
        primary: members[0].0.to_string(),
        members: members
            .iter()
            .map(|(id, ep)| ConfigMember {
                id: id.to_string(),
                endpoint: ep.to_string(),
                role: Role::Voter,
            })
            .collect(),
    }
}

fn setup(api: &Arc<Mutex<FakeApi>>, master_key: &SigningKey) -> master::Setup {
    let secret = lock(api).objects[&format!("{SECRETS}/kv-byz-byz-master")].clone();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret).expect("Secret");
    let machine = MachineIdentity {
        name: "kv".into(),
        version: "1.0.0".into(),
        digest: String::new(),
    };
    let ordering = Ordering {
        stability: "LamportClock".into(),
        max_delay_millis: lockstep_replica::byz::DEFAULT_MAX_DELAY_MILLIS,
        max_clock_skew_millis: 0,
    };
    let byz = ByzMaster::from_parts(
        master_key.clone(),
        "kv-byz",
        1,
        ordering,
        machine.clone(),
        objects::era_in(&secret),
        BTreeMap::new(),
    );
    master::Setup {
        client: client(api.clone()),
        namespace: "apps".into(),
        name: "kv-byz".into(),
        identities_secret: Some("clients".into()),
        master: byz,
        machine,
        sealed: objects::sealed_in(&secret),
    }
}

async fn connect(endpoint: &str, master: &SigningKey, key_file: &Path) -> ByzClient {
    let d = Discovery {
        endpoint: endpoint.to_string(),
        master: master.verifying_key(),
        transport: lockstep::Transport::plaintext(),
    };
    let start = Instant::now();
    loop {
        match ByzClient::discover(d.clone(), "alice", key_file).await {
            Ok(c) => return c,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                println!("no era yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no era within 30s: {e:#}"),
        }
    }
}

/// The operator leader changes: the old master task is stopped, a new one starts from the
/// Secrets alone.
async fn new_leader(
    masters: &master::Masters,
    api: &Arc<Mutex<FakeApi>>,
    master_key: &SigningKey,
    config: &Config,
) -> Arc<master::Runner> {
    masters.stop_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    masters
        .ensure("apps/kv-byz", || {
            master::start(setup(api, master_key), Some(config.clone()))
        })
        .expect("runner")
}

/// Waits up to a minute for the replica at `endpoint` to report `era` (failing with what the
/// master last reported).
async fn wait_for_era(endpoint: &str, era: u64, runner: &master::Runner) {
    let start = Instant::now();
    while era_of(endpoint).await < era {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "era {era} never reached {endpoint}: {:?}",
            runner.seen().error
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn era_of(endpoint: &str) -> u64 {
    lockstep::status_of(&lockstep::Transport::plaintext(), endpoint, Duration::from_secs(1))
        .await
        .ok()
        .and_then(|s| s.byzantine)
        .map_or(0, |b| b.era)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_master_serves_fails_over_and_replaces_a_member() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().to_path_buf();
    let api = Arc::new(Mutex::new(FakeApi::default()));
    let (master_key, alice_file, eps) = replicas_and_secrets(&dir, &api, 4).await;
    let first = config(
        1,
        &[("kv-byz-0", &eps[0]), ("kv-byz-1", &eps[1]), ("kv-byz-2", &eps[2])],
    );

    let masters = master::Masters::default();
    masters.ensure("apps/kv-byz", || {
        master::start(setup(&api, &master_key), Some(first.clone()))
    });
    let mut c = connect(&eps[0], &master_key, &alice_file).await;
    assert_eq!(c.put("k", "v").await.expect("voted put"), None);
    assert_eq!(c.get("k").await.expect("voted get").as_deref(), Some("v"));
    assert!(
        objects::era_in(
            &serde_json::from_value(lock(&api).objects[&format!("{SECRETS}/kv-byz-byz-master")].clone())
                .expect("Secret")
        )
        .is_some(),
        "the era is recorded in the master Secret"
    );

    // Fail-over: the old master is gone; a new one knows only the Secret.
    let runner = new_leader(&masters, &api, &master_key, &first).await;
    assert_eq!(c.put("k2", "v2").await.expect("voted put after fail-over"), None);

    // kv-byz-2 replaced by kv-byz-3: a barrier, a new era, state transfer.
    let second = config(
        2,
        &[("kv-byz-0", &eps[0]), ("kv-byz-1", &eps[1]), ("kv-byz-3", &eps[3])],
    );
    runner.want(Some(second));
    wait_for_era(&eps[3], 2, &runner).await;
    c.close().await;
    let mut c = connect(&eps[3], &master_key, &alice_file).await;
    assert_eq!(c.info().era, 2);
    assert_eq!(c.get("k").await.expect("voted get in era 2").as_deref(), Some("v"));
    assert_eq!(c.get("k2").await.expect("voted get in era 2").as_deref(), Some("v2"));
    // The newcomer answers the same once it installed the vouched state (t + 1 answers are
    // enough for a vote, so it may still be catching up for the first reads).
    let start = Instant::now();
    while !c.last_vote.agreed.iter().any(|r| r == "kv-byz-3") {
        assert!(start.elapsed() < Duration::from_secs(20), "{:?}", c.last_vote);
        assert_eq!(c.get("k").await.expect("voted get").as_deref(), Some("v"));
    }
    c.close().await;
    masters.stop_all();
}

/// The master Secret with a fresh key, client alice (her key file and the identities
/// Secret), and `n` replicas kv-byz-0.. with their key Secrets; returns the master key,
/// alice's key file and the replicas' endpoints.
async fn replicas_and_secrets(dir: &Path, api: &Arc<Mutex<FakeApi>>, n: usize) -> (SigningKey, PathBuf, Vec<String>) {
    let master_key = keys::random_signing_key();
    put_secret(
        api,
        "kv-byz-byz-master",
        json!({"master.key": b64(keys::encode_key(&master_key.to_bytes()))}),
    );
    let alice = keys::random_signing_key();
    let alice_file = dir.join("alice.key");
    keys::write_private(&alice_file, keys::encode_key(&alice.to_bytes()).as_bytes()).expect("alice key");
    let identities = dir.join("identities");
    std::fs::create_dir_all(&identities).expect("identities dir");
    let alice_pub = hex::encode(alice.verifying_key().to_bytes());
    std::fs::write(identities.join("alice"), &alice_pub).expect("alice pub");
    put_secret(api, "clients", json!({"alice": b64(alice_pub)}));
    let mut eps = Vec::new();
    for i in 0..n {
        let id = format!("kv-byz-{i}");
        let key = keys::random_signing_key();
        put_secret(
            api,
            &format!("{id}-byz-key"),
            json!({"replica.key": b64(keys::encode_key(&key.to_bytes()))}),
        );
        eps.push(replica(dir, &id, &key, &master_key, &identities).await);
    }
    (master_key, alice_file, eps)
}

fn master_secret(api: &Mutex<FakeApi>) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(lock(api).objects[&format!("{SECRETS}/kv-byz-byz-master")].clone()).expect("Secret")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_operator_leader_resumes_a_rollout_from_the_sealing_barrier_in_the_secret() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().to_path_buf();
    let api = Arc::new(Mutex::new(FakeApi::default()));
    let (master_key, alice_file, eps) = replicas_and_secrets(&dir, &api, 3).await;
    let members: Vec<(&str, &str)> = (0..3)
        .map(|i| (["kv-byz-0", "kv-byz-1", "kv-byz-2"][i], eps[i].as_str()))
        .collect();
    let first = config(1, &members);
    let masters = master::Masters::default();
    let runner = masters
        .ensure("apps/kv-byz", || {
            master::start(setup(&api, &master_key), Some(first.clone()))
        })
        .expect("runner");
    let mut c = connect(&eps[0], &master_key, &alice_file).await;
    assert_eq!(c.put("k", "v").await.expect("voted put"), None);
    c.close().await;

    // A rollout's seal: the barrier t + 1 members reach goes to the master Secret.
    runner.seal();
    let start = Instant::now();
    while runner.seen().seal_recorded != Some(1) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no sealing barrier recorded: {:?}",
            runner.seen().error
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let barrier = objects::sealed_in(&master_secret(&api)).expect("the barrier is in the master Secret");
    assert_eq!(barrier.era, 1);
    assert!(barrier.index > 0 && !barrier.digest.is_empty(), "{barrier:?}");

    // The operator leader changes: the new master knows the barrier from the Secret alone.
    let runner = new_leader(&masters, &api, &master_key, &first).await;
    assert_eq!(
        runner.seen().seal_recorded,
        Some(1),
        "read back from the Secret at start"
    );
    // ...and resumes the sealed state in the next era (here under the same machine: a
    // rollback before any restart takes the same path).
    runner.resume_under("kv", "1.0.0");
    runner.want(Some(config(2, &members)));
    wait_for_era(&eps[0], 2, &runner).await;
    let mut c = connect(&eps[1], &master_key, &alice_file).await;
    assert_eq!(c.info().era, 2);
    assert_eq!(c.get("k").await.expect("voted get in era 2").as_deref(), Some("v"));
    assert_eq!(c.put("k2", "v2").await.expect("voted put in the resumed era"), None);
    c.close().await;
    masters.stop_all();
}
