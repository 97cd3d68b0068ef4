//! The operator's Byzantine configuration master against real replicas (in-process, on
//! loopback) and a mocked API server at the HTTP edge holding the Secrets: the first era
//! from the replicas' own initial state, a client admitted with its key from the
//! `spec.clientIdentities` Secret, voted writes and reads, an operator fail-over (a new master
//! task that knows only the Secret continues the master stream), an era change that
//! replaces a member by state transfer, a rollout's sealing barrier read back from the Secret,
//! and a master stream ended by two items for one slot (the next era starts at the barrier
//! every replica stopped at).

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
use lockstep_operator::controller::{Context, reconcile};
use lockstep_operator::metrics::Metrics;
use lockstep_operator::observe::Source;
use lockstep_operator::translate;
use lockstep_planner::{Config, ConfigMember, Role};
use lockstep_proto::MachineIdentity;
use lockstep_replica::byz::keys;
use serde_json::json;

const SECRETS: &str = "/api/v1/namespaces/apps/secrets";
/// δ of these clusters: larger than the replicas' default (10 ms), so that what a test sends
/// to several replicas at once arrives within the bound on a loaded 2-core machine.
const DELAY_MILLIS: u64 = 50;

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
        "--max-delay-millis",
        &DELAY_MILLIS.to_string(),
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
        max_delay_millis: DELAY_MILLIS,
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

/// Three replicas in era 1 under a master task, with k = v written.
struct Three {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    api: Arc<Mutex<FakeApi>>,
    master_key: SigningKey,
    alice_file: PathBuf,
    eps: Vec<String>,
    first: Config,
    /// The same members in epoch 2.
    second: Config,
    masters: master::Masters,
    runner: Arc<master::Runner>,
}

async fn three_in_era_one() -> Three {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().to_path_buf();
    let api = Arc::new(Mutex::new(FakeApi::default()));
    let (master_key, alice_file, eps) = replicas_and_secrets(&dir, &api, 3).await;
    let members: Vec<(&str, &str)> = (0..3)
        .map(|i| (["kv-byz-0", "kv-byz-1", "kv-byz-2"][i], eps[i].as_str()))
        .collect();
    let (first, second) = (config(1, &members), config(2, &members));
    let masters = master::Masters::default();
    let runner = masters
        .ensure("apps/kv-byz", || {
            master::start(setup(&api, &master_key), Some(first.clone()))
        })
        .expect("runner");
    let mut c = connect(&eps[0], &master_key, &alice_file).await;
    assert_eq!(c.put("k", "v").await.expect("voted put"), None);
    c.close().await;
    Three {
        _tmp: tmp,
        dir,
        api,
        master_key,
        alice_file,
        eps,
        first,
        second,
        masters,
        runner,
    }
}

fn master_secret(api: &Mutex<FakeApi>) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(lock(api).objects[&format!("{SECRETS}/kv-byz-byz-master")].clone()).expect("Secret")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_operator_leader_resumes_a_rollout_from_the_sealing_barrier_in_the_secret() {
    let Three {
        _tmp,
        api,
        master_key,
        alice_file,
        eps,
        first,
        second,
        masters,
        runner,
        ..
    } = three_in_era_one().await;

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
    runner.want(Some(second));
    // Every member, not only the first: the client below asks kv-byz-1 first.
    for ep in &eps {
        wait_for_era(ep, 2, &runner).await;
    }
    let mut c = connect(&eps[1], &master_key, &alice_file).await;
    assert_eq!(c.info().era, 2);
    assert_eq!(c.get("k").await.expect("voted get in era 2").as_deref(), Some("v"));
    assert_eq!(c.put("k2", "v2").await.expect("voted put in the resumed era"), None);
    c.close().await;
    masters.stop_all();
}

/// Each replica's (era, barrier index, barrier digest) and the master stream it lists
/// (session, next seq, bound), if any.
async fn byz_view(endpoint: &str) -> Option<(u64, u64, Vec<u8>, Option<(u64, u64, u64)>)> {
    let s = lockstep::status_of(&lockstep::Transport::plaintext(), endpoint, Duration::from_secs(1))
        .await
        .ok()?;
    let b = s.byzantine?;
    let master = b
        .streams
        .iter()
        .find(|st| st.identity == keys::MASTER_IDENTITY)
        .map(|st| (st.session, st.next_seq, st.bound));
    Some((b.era, b.barrier_index, b.barrier_digest, master))
}

/// A master-signed no-op for (`session`, `seq`) at `ts`.
fn master_noop(master: &SigningKey, session: u64, seq: u64, ts: u64) -> lockstep_proto::SignedItem {
    let item = lockstep_proto::StreamItem {
        identity: keys::MASTER_IDENTITY.to_string(),
        session,
        seq,
        ts,
        horizon: 0,
        era: 1,
        body: Some(lockstep_proto::stream_item::Body::Noop(lockstep_proto::Noop {})),
    };
    lockstep_replica::byz::sign_item(master, &item)
}

/// Offers `item` to every replica directly, as the master does, and waits until each took it.
async fn offer_to_all(endpoints: &[String], item: &lockstep_proto::SignedItem) {
    for ep in endpoints {
        let mut c = lockstep_proto::byzantine_client::ByzantineClient::connect(ep.clone())
            .await
            .expect("connect to a replica");
        c.submit(item.clone()).await.expect("a master no-op is taken");
    }
}

/// Relays `item` to `endpoints` as replica `from` does (its relay signature appended).
async fn relay_as(from: &str, key: &SigningKey, endpoints: &[String], item: &lockstep_proto::SignedItem) {
    let batch = lockstep_proto::RelayBatch {
        from: from.to_string(),
        era: 1,
        applied_index: 0,
        items: vec![lockstep_proto::Relayed {
            item: Some(item.clone()),
            chain: vec![lockstep_replica::byz::chain_sig(from, key, 1, item)],
        }],
        retry: false,
    };
    for ep in endpoints {
        let mut c = lockstep_proto::byzantine_client::ByzantineClient::connect(ep.clone())
            .await
            .expect("connect to a replica");
        c.relay(batch.clone()).await.expect("relay taken");
    }
}

/// The replicas' agreed master stream (session, next seq, bound) once they all report the same
/// one twice, a decision window apart (its last items are decided then).
async fn agreed_master_stream(eps: &[String]) -> (u64, u64, u64) {
    let start = Instant::now();
    let mut last = None;
    loop {
        let views = futures::future::join_all(eps.iter().map(|e| byz_view(e))).await;
        let streams: Vec<_> = views.iter().map(|v| v.as_ref().and_then(|v| v.3)).collect();
        if let Some(Some(s)) = streams.first()
            && streams.iter().all(|x| *x == Some(*s))
        {
            if last == Some(*s) {
                return *s;
            }
            last = Some(*s);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replicas never agreed on the master stream: {streams:?}"
        );
        tokio::time::sleep(Duration::from_millis(8 * DELAY_MILLIS)).await;
    }
}

/// Ends the master stream of `t`'s era: its old leader stops, and the slot after its last
/// decided items gets two items (a slot that already holds a version takes another only with
/// relay signatures). Returns the new leader, started in `leader`, once it sees the members
/// stopped at one barrier with the stream ended.
async fn end_the_master_stream(t: &Three, leader: &master::Masters) -> Arc<master::Runner> {
    t.masters.stop_all();
    let (session, seq, bound) = agreed_master_stream(&t.eps).await;
    // The new leader's item for that slot reaches every replica; then kv-byz-0, which alone
    // got the old leader's last item for it, relays that one (within the delay bound, as a
    // faulty replica can).
    let (old, new) = (
        master_noop(&t.master_key, session, seq, bound + 1_000),
        master_noop(&t.master_key, session, seq, bound + 2_000),
    );
    offer_to_all(&t.eps, &new).await;
    let key0 = keys::load_signing_key(&t.dir.join("kv-byz-0.key")).expect("kv-byz-0's key");
    relay_as("kv-byz-0", &key0, &t.eps[1..], &old).await;

    let runner = new_leader(leader, &t.api, &t.master_key, &t.first).await;
    let start = Instant::now();
    while !runner.seen().stream_ended {
        if start.elapsed() > Duration::from_secs(30) {
            let views = futures::future::join_all(t.eps.iter().map(|e| byz_view(e))).await;
            panic!(
                "the master never saw the stream end: {:?}; replicas (era, barrier, digest, master stream): {views:?}",
                runner.seen().error
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let views = futures::future::join_all(t.eps.iter().map(|e| byz_view(e))).await;
    let barriers: Vec<_> = views
        .iter()
        .map(|v| v.as_ref().map(|v| (v.0, v.1, v.2.clone(), v.3)))
        .collect();
    let first_barrier = barriers[0].clone().expect("replica 0 answers");
    assert!(first_barrier.1 > 0 && first_barrier.3.is_none(), "{barriers:?}");
    assert!(
        barriers.iter().all(|b| b.as_ref() == Some(&first_barrier)),
        "one barrier everywhere: {barriers:?}"
    );
    runner
}

const RSM: &str = "kv-byz";

/// The resource as the new leader finds it: its pods (made by a first reconcile) running, and
/// epoch 1 with the three members recorded in status by the old leader.
async fn kv_byz_in_epoch_one(api: &Arc<Mutex<FakeApi>>, ctx: &Arc<Context>, admin: &FakeAdmin) {
    let mut obj = rsm_json(RSM, 1, "1.0.0", "img:1");
    obj["spec"]["failureModel"] = json!("Byzantine");
    lock(api).insert(&rsm_path(RSM), obj);
    reconcile(Arc::new(rsm(api, RSM)), ctx.clone())
        .await
        .expect("the reconcile that creates the pods");
    for i in 0..3 {
        let (id, ip) = (format!("kv-byz-{i}"), format!("10.0.0.{i}"));
        run_pod(api, &id, &ip, "n1");
        admin.add(&ip, &id, "1.0.0");
    }
    let members: Vec<_> = (0..3)
        .map(|i| json!({"pod": format!("kv-byz-{i}"), "role": "Voter"}))
        .collect();
    edit_rsm(api, |o| {
        o["status"]["epoch"] = json!(1);
        o["status"]["primary"] = json!("kv-byz-0");
        o["status"]["members"] = json!(members);
    });
}

fn edit_rsm(api: &Mutex<FakeApi>, change: impl FnOnce(&mut serde_json::Value)) {
    edit(api, &rsm_path(RSM), change);
}

/// The configuration recorded in the resource's status, and the `MasterStreamEnded` events.
async fn reconcile_kv_byz(api: &Mutex<FakeApi>, ctx: &Arc<Context>) -> (Option<Config>, Vec<serde_json::Value>) {
    reconcile(Arc::new(rsm(api, RSM)), ctx.clone())
        .await
        .expect("reconcile");
    let events = lock(api)
        .objects
        .iter()
        .filter(|(path, e)| path.contains("/events/") && e["reason"] == "MasterStreamEnded")
        .map(|(_, e)| e.clone())
        .collect();
    (translate::persisted_config(&rsm(api, RSM)), events)
}

/// The new leader's reconciles once its master saw the stream end: nothing while the resource
/// is paused; then the next epoch with the same members, recorded in status and reported as a
/// Warning. Returns that configuration.
async fn reconciles_after_the_stream_ended(api: &Arc<Mutex<FakeApi>>, ctx: &Arc<Context>, admin: &FakeAdmin) -> Config {
    kv_byz_in_epoch_one(api, ctx, admin).await;
    let first = translate::persisted_config(&rsm(api, RSM)).expect("epoch 1 in status");

    edit_rsm(api, |o| {
        o["metadata"]["annotations"] = json!({"lockstep.dev/paused": "true"})
    });
    let (paused, events) = reconcile_kv_byz(api, ctx).await;
    assert_eq!(paused.as_ref(), Some(&first), "paused: the operator only observes");
    assert!(events.is_empty(), "{events:#?}");

    edit_rsm(api, |o| {
        o["metadata"]["annotations"] = json!({"lockstep.dev/paused": "false"})
    });
    let (next, events) = reconcile_kv_byz(api, ctx).await;
    let next = next.expect("a configuration in status");
    assert_eq!(next, Config { epoch: 2, ..first }, "the next epoch, the same members");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["type"], "Warning");
    assert!(
        events[0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("era 2 starts there")),
        "{events:#?}"
    );
    next
}

/// The operator fail-over corner case: the old leader's last master item reached only one
/// replica, and the new leader signs a different item for the same sequence number. The
/// master stream ends there at every replica, they all stop at one barrier, the new leader's
/// reconcile records the next epoch with the same members, and the next era starts from that
/// barrier with everything written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_stream_ended_by_two_items_for_one_slot_stops_at_one_barrier_and_the_next_era_starts_there() {
    let t = three_in_era_one().await;
    let admin = Arc::new(FakeAdmin::default());
    let ctx = Arc::new(Context::new(
        client(t.api.clone()),
        admin.clone(),
        Arc::new(Metrics::default()),
        Source::Api,
    ));
    let runner = end_the_master_stream(&t, &ctx.masters).await;
    let recorded = reconciles_after_the_stream_ended(&t.api, &ctx, &admin).await;

    // The master signs it from the barrier. On Kubernetes its members' endpoints are their
    // peer DNS names (`names::endpoint`); here, the loopback addresses the replicas listen on.
    let mut on_loopback = recorded;
    for (m, ep) in on_loopback.members.iter_mut().zip(&t.eps) {
        m.endpoint = ep.clone();
    }
    assert_eq!(on_loopback, t.second);
    runner.want(Some(on_loopback));
    for ep in &t.eps {
        wait_for_era(ep, 2, &runner).await;
    }
    let mut c = connect(&t.eps[1], &t.master_key, &t.alice_file).await;
    assert_eq!(c.info().era, 2);
    assert_eq!(c.get("k").await.expect("voted get in era 2").as_deref(), Some("v"));
    assert_eq!(c.put("k2", "v2").await.expect("voted put in era 2"), None);
    c.close().await;
    ctx.masters.stop_all();
}
