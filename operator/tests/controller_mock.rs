//! Controller tests against a mocked API server at the HTTP edge: for each decision, the
//! API calls it makes (create, status write with conflict retry, delete) and their order.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use lockstep_operator::controller::{Context, error_policy, reconcile};
use lockstep_operator::metrics::Metrics;
use lockstep_operator::observe::Source;
use lockstep_resource::{ReplicatedStateMachine, rules};
use serde_json::json;

struct Harness {
    api: Arc<Mutex<FakeApi>>,
    admin: Arc<FakeAdmin>,
    ctx: Arc<Context>,
    log: Log,
    metrics: Arc<Metrics>,
}

fn harness() -> Harness {
    harness_with(|_| {})
}

/// A harness whose context `configure` adjusts first (operator flags).
fn harness_with(configure: impl FnOnce(&mut Context)) -> Harness {
    let log = Log::default();
    let api = Arc::new(Mutex::new(FakeApi {
        log: log.clone(),
        ..Default::default()
    }));
    let admin = Arc::new(FakeAdmin {
        log: log.clone(),
        ..Default::default()
    });
    let metrics = Arc::new(Metrics::default());
    let mut ctx = Context::new(client(api.clone()), admin.clone(), metrics.clone(), Source::Api);
    configure(&mut ctx);
    Harness {
        api,
        admin,
        ctx: Arc::new(ctx),
        log,
        metrics,
    }
}

impl Harness {
    fn add(&self, name: &str, obj: serde_json::Value) {
        lock(&self.api).insert(&rsm_path(name), obj);
    }

    async fn reconcile(&self, name: &str) -> kube::runtime::controller::Action {
        lock(&self.log).clear();
        reconcile(Arc::new(rsm(&self.api, name)), self.ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("reconcile {name}: {e}"))
    }

    fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }

    fn writes(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| !l.starts_with("GET") && !l.contains("/events"))
            .collect()
    }

    fn status(&self, name: &str) -> lockstep_resource::ReplicatedStateMachineStatus {
        rsm(&self.api, name).status.unwrap_or_default()
    }

    fn condition(&self, name: &str, type_: &str) -> (String, String, String) {
        self.status(name)
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
            .unwrap_or_default()
    }

    /// Starts pods the way the kubelet would and registers a fake replica behind each.
    fn run(&self, pods: &[(&str, &str, &str)], version: &str) {
        for (name, ip, node) in pods {
            run_pod(&self.api, name, ip, node);
            self.admin.add(ip, name, version);
        }
    }
}

fn position(log: &[String], f: impl Fn(&str) -> bool) -> usize {
    log.iter()
        .position(|l| f(l))
        .unwrap_or_else(|| panic!("not in log: {log:#?}"))
}

fn count(log: &[String], needle: &str) -> usize {
    log.iter().filter(|l| l.as_str() == needle).count()
}

const PODS: &str = "/api/v1/namespaces/apps/pods";
const PVCS: &str = "/api/v1/namespaces/apps/persistentvolumeclaims";
const NETPOLS: &str = "/apis/networking.k8s.io/v1/namespaces/apps/networkpolicies";

/// The pods the operator creates satisfy Pod Security Admission `restricted` (the e2e
/// namespaces enforce it) and never get an API token: the replica does not talk to the API
/// server.
#[tokio::test]
async fn replica_pods_are_restricted_without_api_token() {
    let h = harness();
    h.add("kv", rsm_json("kv", 1, "1.0.0", "img:1"));
    h.reconcile("kv").await;
    for name in ["kv-0", "kv-1"] {
        let pod = lock(&h.api).objects[&format!("{PODS}/{name}")].clone();
        let spec = &pod["spec"];
        assert_eq!(spec["automountServiceAccountToken"], json!(false), "{name}");
        assert_eq!(
            spec["securityContext"],
            json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                   "seccompProfile": {"type": "RuntimeDefault"}}),
            "{name}: a numeric non-root user (PSA cannot check a user name) and a data volume it can write"
        );
        let containers = spec["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1);
        assert_eq!(
            containers[0]["securityContext"],
            json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
                   "capabilities": {"drop": ["ALL"]}}),
            "{name}"
        );
        assert!(spec.get("initContainers").is_none() && spec.get("hostNetwork").is_none());
        // Read-only root: the only writable mount is the data volume; the replica's
        // certificate Secret is mounted read-only.
        let mounts = containers[0]["volumeMounts"].as_array().expect("mounts");
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        assert_eq!(mounts[0]["mountPath"], json!("/data"));
        assert_eq!(mounts[1]["mountPath"], json!("/etc/lockstep/tls"));
        assert_eq!(mounts[1]["readOnly"], json!(true));
    }
}

/// One NetworkPolicy per RSM, owned by it like the Service and the PDB: the gRPC port from
/// the cluster's own replicas and the operator (peer and admin APIs) and from everyone for
/// clients; the HTTP port from the operator and the namespace.
#[tokio::test]
async fn network_policy_shape_and_owner() {
    let h = harness();
    h.add("kv", rsm_json("kv", 1, "1.0.0", "img:1"));
    h.reconcile("kv").await;
    assert!(h.writes().contains(&format!("PATCH {NETPOLS}/kv")), "{:#?}", h.writes());
    let np = lock(&h.api).objects[&format!("{NETPOLS}/kv")].clone();
    let owner = &np["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["name"], &owner["controller"]),
        (&json!("ReplicatedStateMachine"), &json!("kv"), &json!(true))
    );
    assert_eq!(
        np["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        json!("lockstep-operator"),
        "in the operator's filtered watch"
    );
    let replicas = json!({"matchLabels": {"lockstep.dev/cluster": "kv", "app.kubernetes.io/component": "replica"}});
    let operator = json!({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "lockstep-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "lockstep-operator"}}
    });
    let grpc = json!([{"port": 7000, "protocol": "TCP"}]);
    let http = json!([{"port": 8080, "protocol": "TCP"}]);
    assert_eq!(
        np["spec"],
        json!({
            "podSelector": replicas,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": replicas}, operator], "ports": grpc},
                {"ports": grpc},
                {"from": [operator, {"podSelector": {}}], "ports": http},
            ]
        })
    );

    // spec.network.clientFrom narrows the client rule; the replicas and the operator keep
    // their access.
    let mut obj = rsm_json("kv", 1, "1.0.0", "img:1");
    let clients = json!([{"podSelector": {"matchLabels": {"role": "kv-client"}}}]);
    obj["spec"]["network"] = json!({"clientFrom": clients});
    h.add("kv", obj);
    h.reconcile("kv").await;
    assert!(
        h.writes().contains(&format!("PATCH {NETPOLS}/kv")),
        "re-applied on change"
    );
    let ingress = lock(&h.api).objects[&format!("{NETPOLS}/kv")]["spec"]["ingress"].clone();
    assert_eq!(ingress[0]["from"], json!([{"podSelector": replicas}, operator]));
    assert_eq!(ingress[1], json!({"from": clients, "ports": grpc}));

    // An empty list: no client rule at all (a rule without sources would admit everyone).
    let mut obj = rsm_json("kv", 1, "1.0.0", "img:1");
    obj["spec"]["network"] = json!({"clientFrom": []});
    h.add("kv", obj);
    h.reconcile("kv").await;
    let ingress = lock(&h.api).objects[&format!("{NETPOLS}/kv")]["spec"]["ingress"].clone();
    assert_eq!(ingress.as_array().map(Vec::len), Some(2), "{ingress:#}");
    assert!(
        ingress
            .as_array()
            .into_iter()
            .flatten()
            .all(|r| r.get("from").is_some()),
        "every rule names its sources: {ingress:#}"
    );
}

/// `--network-policy=false`: the operator leaves NetworkPolicies to the user.
#[tokio::test]
async fn network_policy_can_be_left_to_the_user() {
    let h = harness_with(|ctx| ctx.network_policy = None);
    h.add("kv", rsm_json("kv", 1, "1.0.0", "img:1"));
    h.reconcile("kv").await;
    let log = h.writes();
    assert_eq!(count(&log, &format!("POST {PODS}")), 2, "{log:#?}");
    assert!(!log.iter().any(|l| l.contains("networkpolicies")), "{log:#?}");
}

#[tokio::test]
async fn bootstrap_fence_replace_and_rejoin() {
    let h = harness();
    h.add("kv", rsm_json("kv", 1, "1.0.0", "img:1"));

    // Bootstrap: t+1 = 2 replicas, each with its claim, plus the shared objects.
    h.reconcile("kv").await;
    let log = h.writes();
    assert_eq!(count(&log, &format!("POST {PVCS}")), 2, "{log:#?}");
    assert_eq!(count(&log, &format!("POST {PODS}")), 2, "{log:#?}");
    for obj in [
        "/api/v1/namespaces/apps/services/kv-peers",
        "/api/v1/namespaces/apps/services/kv",
        "/apis/policy/v1/namespaces/apps/poddisruptionbudgets/kv",
        "/api/v1/namespaces/apps/configmaps/kv-config",
        "/apis/networking.k8s.io/v1/namespaces/apps/networkpolicies/kv",
    ] {
        assert!(
            log.contains(&format!("PATCH {obj}")),
            "server-side apply of {obj}: {log:#?}"
        );
    }
    assert_eq!(pods(&h.api), vec!["kv-0", "kv-1"]);
    assert_eq!(h.status("kv").desired_replicas, Some(2));
    assert_eq!(h.condition("kv", "Ready").0, "False");
    assert_eq!(h.condition("kv", "Progressing").0, "True");

    // Pods run; the replicas answer unconfigured. The first configuration is recorded in
    // status (the fence) before any replica hears of it.
    h.run(&[("kv-0", "10.0.0.1", "n1"), ("kv-1", "10.0.0.2", "n2")], "1.0.0");
    h.reconcile("kv").await;
    let log = h.log();
    let put = position(&log, |l| {
        l.starts_with("PUT") && l.ends_with("/replicatedstatemachines/kv/status")
    });
    let push = position(&log, |l| l.starts_with("admin reconfigure"));
    assert!(put < push, "epoch written before it is pushed: {log:#?}");
    assert_eq!(h.status("kv").epoch, Some(1));
    assert_eq!(h.status("kv").primary.as_deref(), Some("kv-0"));
    assert_eq!((h.admin.epoch("10.0.0.1"), h.admin.epoch("10.0.0.2")), (1, 1));

    // Converged: Ready, and a further reconcile writes nothing at all.
    h.reconcile("kv").await;
    assert_eq!(h.condition("kv", "Ready").0, "True");
    assert_eq!(h.status("kv").ready_replicas, Some(2));
    assert_eq!(h.status("kv").current_version.as_deref(), Some("1.0.0"));
    assert_eq!(h.condition("kv", "Ready").1, "AllReplicasReady");
    h.reconcile("kv").await;
    assert_eq!(h.writes(), Vec::<String>::new(), "steady state makes no writes");

    // kv-1 fail-stops: fence (epoch 2 without it, recorded first), push to the survivor,
    // then delete the pod; its claim stays while redundancy is reduced.
    fail_pod(&h.api, "kv-1", 137, "OOMKilled");
    h.reconcile("kv").await;
    let log = h.log();
    let put = position(&log, |l| l.starts_with("PUT") && l.ends_with("/status"));
    let push = position(&log, |l| l == "admin reconfigure kv-0 epoch 2");
    let delete = position(&log, |l| l == format!("DELETE {PODS}/kv-1"));
    assert!(put < push && push < delete, "fence, push, then delete: {log:#?}");
    assert!(
        !log.contains(&format!("DELETE {PVCS}/data-kv-1")),
        "the fenced replica's volume is kept while 1 of 2 voters runs: {log:#?}"
    );
    assert_eq!(h.status("kv").epoch, Some(2));
    assert_eq!(h.metrics.replacements.get(), 1);

    // The replacement gets a new name and an empty volume (the fenced ordinal is never
    // reused: status.nextOrdinal), joins as a learner, is promoted.
    h.reconcile("kv").await;
    assert!(h.writes().contains(&format!("POST {PODS}")));
    assert!(h.writes().contains(&format!("POST {PVCS}")));
    assert_eq!(pods(&h.api), vec!["kv-0", "kv-2"]);
    assert_eq!(h.status("kv").next_ordinal, Some(3));
    assert_eq!(h.condition("kv", "Degraded").0, "True", "1 of 2 voters");
    h.run(&[("kv-2", "10.0.0.3", "n3")], "1.0.0");
    h.reconcile("kv").await; // learner
    assert_eq!(h.status("kv").epoch, Some(3));
    let roles: Vec<(String, Option<String>)> = h
        .status("kv")
        .members
        .iter()
        .map(|m| (m.pod.clone(), m.role.clone()))
        .collect();
    assert!(roles.contains(&("kv-2".into(), Some("Learner".into()))), "{roles:?}");
    assert!(
        !h.writes().contains(&format!("DELETE {PVCS}/data-kv-1")),
        "still a learner"
    );
    h.reconcile("kv").await; // promoted
    assert_eq!(h.status("kv").epoch, Some(4));
    // Full redundancy again: now the fenced replica's volume goes, with an event.
    h.reconcile("kv").await;
    assert_eq!(h.condition("kv", "Ready").0, "True");
    assert_eq!(h.condition("kv", "Degraded").0, "False");
    assert!(
        h.writes().contains(&format!("DELETE {PVCS}/data-kv-1")),
        "{:#?}",
        h.writes()
    );
    assert!(
        event_notes(&h.api)
            .iter()
            .any(|n| n.contains("deleting volume data-kv-1"))
    );
    assert_eq!(h.admin.epoch("10.0.0.3"), 4);
}

#[tokio::test]
async fn every_decision_is_an_event_with_its_own_message() {
    // kube's Recorder aggregated by reason and kept the first note: after a fail-over people
    // saw `Reconfigured (x4) "epoch 1 recorded ..."` while the cluster was at epoch 4.
    let h = harness();
    bootstrapped_pods(&h).await;
    h.reconcile("kv").await; // epoch 1
    h.reconcile("kv").await;
    fail_pod(&h.api, "kv-1", 137, "OOMKilled");
    h.reconcile("kv").await; // epoch 2
    let notes = event_notes(&h.api);
    let reconfigured: Vec<&String> = notes.iter().filter(|n| n.contains(" recorded (primary")).collect();
    assert!(
        reconfigured.iter().any(|n| n.starts_with("epoch 1 recorded"))
            && reconfigured.iter().any(|n| n.starts_with("epoch 2 recorded")),
        "each epoch visible with its own message: {notes:#?}"
    );
    assert!(reconfigured.iter().all(|n| n.ends_with("(x1)")), "{notes:#?}");
}

#[tokio::test]
async fn exact_repeats_of_an_event_become_a_series() {
    use kube::Resource;
    let h = harness();
    h.add("kv", rsm_json("kv", 1, "1.0.0", "img:1"));
    let obj = rsm(&h.api, "kv").object_ref(&());
    for note in ["same words", "same words", "other words"] {
        h.ctx
            .recorder
            .publish(kube::runtime::events::EventType::Normal, "Test", "Test", note, &obj)
            .await
            .expect("published");
    }
    let notes = event_notes(&h.api);
    assert_eq!(
        notes,
        vec!["same words (x2)".to_string(), "other words (x1)".to_string()],
        "{notes:#?}"
    );
}

#[tokio::test]
async fn simultaneous_failure_fences_nobody_and_deletes_no_volume() {
    let h = harness();
    bootstrapped_pods(&h).await;
    h.reconcile("kv").await; // epoch 1
    h.reconcile("kv").await; // ready
    // Both replicas die; kv-1's pod still looks Running for a moment (its process is gone:
    // the admin call fails, within the grace period).
    fail_pod(&h.api, "kv-0", 137, "OOMKilled");
    lock(&h.admin.replicas).remove("http://10.0.0.2:7000");
    h.reconcile("kv").await;
    let writes = h.writes();
    assert_eq!(h.status("kv").epoch, Some(1), "no epoch whose only voter may be dead");
    assert!(
        !writes.iter().any(|l| l.contains("persistentvolumeclaims")),
        "no volume touched: {writes:#?}"
    );
    assert!(!writes.iter().any(|l| l.starts_with("DELETE")), "{writes:#?}");
    let (degraded, _, message) = h.condition("kv", "Degraded");
    assert_eq!(degraded, "True");
    assert!(
        message.contains("no surviving voter of epoch 1 has answered"),
        "{message}"
    );
    // kv-1's pod fails for good too: every voter is restarted from its own volume.
    fail_pod(&h.api, "kv-1", 137, "OOMKilled");
    h.reconcile("kv").await;
    assert_eq!(h.status("kv").epoch, Some(1));
    let writes = h.writes();
    assert!(writes.contains(&format!("DELETE {PODS}/kv-0")) && writes.contains(&format!("DELETE {PODS}/kv-1")));
    assert!(
        !writes.iter().any(|l| l.contains("persistentvolumeclaims")),
        "{writes:#?}"
    );
}

async fn bootstrapped_pods(h: &Harness) {
    h.add("kv", rsm_json("kv", 1, "1.0.0", "img:1"));
    h.reconcile("kv").await;
    h.run(&[("kv-0", "10.0.0.1", "n1"), ("kv-1", "10.0.0.2", "n2")], "1.0.0");
}

#[tokio::test]
async fn status_conflict_is_retried_when_the_persisted_epoch_did_not_move() {
    let h = harness();
    bootstrapped_pods(&h).await;
    {
        let mut api = lock(&h.api);
        api.conflicts = 1;
        // Someone else touched the object (a label), not the configuration.
        api.on_conflict = Some(Box::new(|v| v["metadata"]["labels"] = json!({"team": "a"})));
    }
    h.reconcile("kv").await;
    let log = h.log();
    let first = position(&log, |l| l.starts_with("PUT") && l.ends_with("/status"));
    let reread = position(&log, |l| {
        l.starts_with("GET") && l.ends_with("/replicatedstatemachines/kv/status")
    });
    let push = position(&log, |l| l.starts_with("admin reconfigure"));
    assert!(
        first < reread && reread < push,
        "409, re-read, retry, then push: {log:#?}"
    );
    let puts = log
        .iter()
        .filter(|l| l.starts_with("PUT") && l.ends_with("/status"))
        .count();
    assert!(puts >= 2, "retried: {log:#?}");
    assert_eq!(h.status("kv").epoch, Some(1));
    assert_eq!(h.admin.epoch("10.0.0.1"), 1);
    assert!(h.metrics.status_conflicts.get() >= 1);
}

#[tokio::test]
async fn status_conflict_with_a_newer_epoch_aborts_before_pushing() {
    let h = harness();
    bootstrapped_pods(&h).await;
    {
        let mut api = lock(&h.api);
        api.conflicts = 1;
        // Another operator instance decided epoch 7 meanwhile.
        api.on_conflict = Some(Box::new(|v| {
            v["status"]["epoch"] = json!(7);
            v["status"]["primary"] = json!("kv-1");
            v["status"]["members"] = json!([{"pod": "kv-0", "role": "Voter"}, {"pod": "kv-1", "role": "Voter"}]);
        }));
    }
    let action = h.reconcile("kv").await;
    let log = h.log();
    assert!(
        !log.iter().any(|l| l.starts_with("admin reconfigure")),
        "a stale plan must not reach the replicas: {log:#?}"
    );
    assert_eq!(h.status("kv").epoch, Some(7));
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(1))
    );
}

#[tokio::test]
async fn invalid_object_is_reported_and_does_not_block_others() {
    let h = harness();
    let mut bad = rsm_json("bad", 9, "1.0.0", "img:1");
    bad["metadata"]["generation"] = json!(3);
    h.add("bad", bad);
    h.add("good", rsm_json("good", 0, "1.0.0", "img:1"));
    let action = h.reconcile("bad").await;
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(600))
    );
    let (status, reason, message) = h.condition("bad", "Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains(rules::FAULTS_MSG), "{message}");
    let ready = h.status("bad").conditions.into_iter().find(|c| c.type_ == "Ready");
    assert_eq!(ready.and_then(|c| c.observed_generation), Some(3));
    assert!(
        h.log().iter().any(|l| l.contains("/events")),
        "a Warning event is published"
    );
    assert!(pods(&h.api).is_empty());
    h.reconcile("good").await;
    assert_eq!(pods(&h.api), vec!["good-0"]);
}

#[tokio::test]
async fn paused_object_is_observed_not_changed() {
    let h = harness();
    let mut obj = rsm_json("kv", 1, "1.0.0", "img:1");
    obj["metadata"]["annotations"] = json!({"lockstep.dev/paused": "true"});
    h.add("kv", obj);
    h.reconcile("kv").await;
    assert!(pods(&h.api).is_empty());
    let writes = h.writes();
    assert!(
        writes.iter().all(|l| l.ends_with("/status")),
        "only status: {writes:#?}"
    );
    assert_eq!(h.condition("kv", "Paused").0, "True");
}

#[tokio::test]
async fn replica_that_refuses_to_start_is_reported_not_crash_looped() {
    let h = harness();
    let mut obj = rsm_json("byz", 1, "1.0.0", "img:1");
    obj["spec"]["failureModel"] = json!("Byzantine");
    h.add("byz", obj);
    h.reconcile("byz").await;
    assert_eq!(pods(&h.api), vec!["byz-0", "byz-1", "byz-2"]);
    for (i, name) in ["byz-0", "byz-1", "byz-2"].iter().enumerate() {
        run_pod(&h.api, name, &format!("10.0.1.{i}"), "n1");
        fail_pod(
            &h.api,
            name,
            2,
            "lockstep-replica: error: failure model Byzantine is not available in this version",
        );
    }
    h.reconcile("byz").await;
    h.reconcile("byz").await;
    let writes = h.writes();
    assert!(
        !writes.iter().any(|l| l.starts_with("POST /api/v1")),
        "no recreation: {writes:#?}"
    );
    assert_eq!(pods(&h.api).len(), 3, "failed pods kept for inspection");
    let (degraded, _, message) = h.condition("byz", "Degraded");
    assert_eq!(degraded, "True");
    assert!(message.contains("Byzantine is not available"), "{message}");
    assert_eq!(
        message.matches("Byzantine is not available").count(),
        1,
        "one line per distinct error: {message}"
    );
    assert!(message.contains("byz-0, byz-1, byz-2: "), "{message}");
    assert_eq!(
        h.condition("byz", "Progressing").0,
        "False",
        "holding is not progressing"
    );
}

#[tokio::test]
async fn missing_client_identities_secret_is_named_and_no_pods_are_created() {
    let h = harness();
    let mut obj = rsm_json("byz", 1, "1.0.0", "img:1");
    obj["spec"]["failureModel"] = json!("Byzantine");
    obj["spec"]["clientIdentities"] = json!({"secretRef": {"name": "byz-clients"}});
    h.add("byz", obj);
    h.reconcile("byz").await;
    assert!(pods(&h.api).is_empty(), "pods that cannot start are not created");
    let (degraded, reason, message) = h.condition("byz", "Degraded");
    assert_eq!((degraded.as_str(), reason.as_str()), ("True", "MissingSecret"));
    assert!(
        message.contains("Secret byz-clients in namespace apps") && message.contains("kubectl -n apps create secret"),
        "{message}"
    );
    assert_eq!(h.condition("byz", "Progressing").0, "False");
    // Once it exists, the replicas are created.
    lock(&h.api).insert(
        "/api/v1/namespaces/apps/secrets/byz-clients",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "byz-clients", "namespace": "apps"}}),
    );
    h.reconcile("byz").await;
    assert_eq!(pods(&h.api), vec!["byz-0", "byz-1", "byz-2"]);
}

fn set_machine(h: &Harness, version: &str, image: &str) {
    edit(&h.api, &rsm_path("kv"), |obj| {
        obj["spec"]["machine"]["version"] = json!(version);
        obj["spec"]["machine"]["image"] = json!(image);
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1);
        obj["metadata"]["generation"] = json!(generation + 1);
    });
}

/// A ready cluster on 1.0.0/img:1, rolled out to `version`/`image` up to the image patch
/// (phase Replacing): staged, sealed, both pods patched.
async fn rollout_until_replacing(h: &Harness, version: &str, image: &str) {
    bootstrapped_pods(h).await;
    h.reconcile("kv").await; // epoch 1
    h.reconcile("kv").await; // ready
    set_machine(h, version, image);
    h.reconcile("kv").await; // staging
    run_pod(&h.api, "kv-stage-0", "10.9.9.9", "n1");
    run_pod(&h.api, "kv-stage-1", "10.9.9.9", "n2");
    h.reconcile("kv").await; // sealing
    h.reconcile("kv").await; // replacing
    assert_eq!(h.status("kv").upgrade_phase.as_deref(), Some("Replacing"));
}

#[tokio::test]
async fn rollout_finishes_only_when_every_voter_reports_the_target_machine() {
    let h = harness();
    rollout_until_replacing(&h, "1.1.0", "img:2").await;
    // The kubelet restarted both containers on img:2 (they report being launched from it),
    // but the binary in img:2 reports 1.0.0: the image does not contain 1.1.0.
    kubelet_restart(&h.api, "kv-0");
    kubelet_restart(&h.api, "kv-1");
    h.admin.set_launched("img:2");
    for _ in 0..3 {
        h.reconcile("kv").await;
        assert_eq!(
            h.status("kv").upgrade_phase.as_deref(),
            Some("Replacing"),
            "never finished"
        );
        assert!(!h.log().iter().any(|l| l.starts_with("admin resume")));
    }
    let (degraded, reason, message) = h.condition("kv", "Degraded");
    assert_eq!((degraded.as_str(), reason.as_str()), ("True", "WrongMachineVersion"));
    assert!(
        message.contains("kv-0 runs img:2 but reports kv 1.0.0") && message.contains("does not contain the version"),
        "{message}"
    );
    let versions: Vec<Option<String>> = h.status("kv").members.iter().map(|m| m.version.clone()).collect();
    assert_eq!(
        versions,
        vec![Some("1.0.0".into()), Some("1.0.0".into())],
        "what the replicas report"
    );

    // Setting spec.machine back rolls back: the pods go back to img:1, then commands resume.
    set_machine(&h, "1.0.0", "img:1");
    h.reconcile("kv").await; // retargeted
    h.reconcile("kv").await; // image patched back
    let image = |n: &str| lock(&h.api).objects[&pod_path(n)]["spec"]["containers"][0]["image"].clone();
    assert_eq!((image("kv-0"), image("kv-1")), (json!("img:1"), json!("img:1")));
    kubelet_restart(&h.api, "kv-0");
    kubelet_restart(&h.api, "kv-1");
    h.admin.set_launched("img:1");
    h.reconcile("kv").await; // resuming
    h.reconcile("kv").await; // done
    assert_eq!(h.status("kv").upgrade_phase, None);
    h.reconcile("kv").await;
    assert_eq!(h.condition("kv", "Ready").0, "True");
    assert_eq!(h.status("kv").current_version.as_deref(), Some("1.0.0"));
}

#[tokio::test]
async fn lockstep_rollout_goes_through_every_phase() {
    let h = harness();
    bootstrapped_pods(&h).await;
    h.reconcile("kv").await; // epoch 1
    h.reconcile("kv").await; // ready
    assert_eq!(h.condition("kv", "Ready").0, "True");

    // New version and image.
    set_machine(&h, "1.1.0", "img:2");
    let phase = |h: &Harness| h.status("kv").upgrade_phase;

    // Staging: one pre-pull pod per node that runs a member, nothing stopped.
    h.reconcile("kv").await;
    assert_eq!(phase(&h).as_deref(), Some("Staging"));
    assert_eq!(h.metrics.rollouts_started.get(), 1);
    assert_eq!(pods(&h.api), vec!["kv-0", "kv-1", "kv-stage-0", "kv-stage-1"]);
    for stage in ["kv-stage-0", "kv-stage-1"] {
        let node = if stage.ends_with('0') { "n1" } else { "n2" };
        run_pod(&h.api, stage, "10.9.9.9", node); // image pulled
    }

    // Sealing: persisted first, then the seal barrier is ordered through the primary.
    h.reconcile("kv").await;
    assert_eq!(phase(&h).as_deref(), Some("Sealing"));
    let log = h.log();
    assert!(position(&log, |l| l.ends_with("/status")) < position(&log, |l| l.starts_with("admin seal")));
    assert!(!pods(&h.api).iter().any(|p| p.contains("stage")), "stage pods removed");

    // Replacing: every voter sealed at the same index with the same snapshot.
    h.reconcile("kv").await;
    assert_eq!(phase(&h).as_deref(), Some("Replacing"));
    assert!(h.status("kv").seal_index.is_some());
    let log = h.writes();
    assert!(
        log.contains(&format!("PATCH {PODS}/kv-0")) && log.contains(&format!("PATCH {PODS}/kv-1")),
        "{log:#?}"
    );
    // Pods keep their identity (same name, volume, IP); only the image changes.
    let image = |n: &str| lock(&h.api).objects[&pod_path(n)]["spec"]["containers"][0]["image"].clone();
    assert_eq!((image("kv-0"), image("kv-1")), (json!("img:2"), json!("img:2")));

    // Until the kubelet has restarted both containers nothing resumes.
    h.reconcile("kv").await;
    assert_eq!(phase(&h).as_deref(), Some("Replacing"));
    assert!(!h.log().iter().any(|l| l.starts_with("admin resume")));
    kubelet_restart(&h.api, "kv-0");
    kubelet_restart(&h.api, "kv-1");
    h.admin.set_version("1.1.0");

    // Resuming, then done.
    h.reconcile("kv").await;
    assert_eq!(phase(&h).as_deref(), Some("Resuming"));
    assert!(h.log().iter().any(|l| l.starts_with("admin resume")));
    h.reconcile("kv").await;
    assert_eq!(phase(&h), None);
    assert_eq!(h.metrics.rollouts_completed.get(), 1);
    h.reconcile("kv").await;
    assert_eq!(h.condition("kv", "Ready").0, "True");
    assert_eq!(h.status("kv").current_version.as_deref(), Some("1.1.0"));
}

#[tokio::test]
async fn errors_back_off_per_object() {
    let h = harness();
    let obj: ReplicatedStateMachine = serde_json::from_value(rsm_json("kv", 1, "1.0.0", "img:1")).expect("fixture");
    let obj = Arc::new(obj);
    let err = lockstep_operator::controller::Error::NoNamespace;
    let delays: Vec<_> = (0..12)
        .map(|_| error_policy(obj.clone(), &err, h.ctx.clone()))
        .collect();
    use kube::runtime::controller::Action;
    use std::time::Duration;
    assert_eq!(delays[0], Action::requeue(Duration::from_secs(2)));
    assert_eq!(delays[1], Action::requeue(Duration::from_secs(4)));
    assert_eq!(delays[11], Action::requeue(Duration::from_secs(300)));
    assert_eq!(h.metrics.errors.get(), 12);
}

#[tokio::test]
async fn more_than_t_failures_wait_and_restart_the_same_replicas_from_disk() {
    let h = harness();
    bootstrapped_pods(&h).await;
    h.reconcile("kv").await; // epoch 1
    h.reconcile("kv").await; // ready
    // Both voters stop (t = 1): no fencing, no new members, nothing data-losing.
    fail_pod(&h.api, "kv-0", 137, "node power loss");
    fail_pod(&h.api, "kv-1", 137, "node power loss");
    h.reconcile("kv").await;
    let writes = h.writes();
    assert!(
        !writes.iter().any(|l| l.starts_with("POST")),
        "no new replicas: {writes:#?}"
    );
    assert!(
        !writes
            .iter()
            .any(|l| l.contains("persistentvolumeclaims") && !l.starts_with("PATCH")),
        "volumes neither deleted nor created: {writes:#?}"
    );
    assert_eq!(h.status("kv").epoch, Some(1), "no new epoch without a surviving voter");
    let (degraded, _, message) = h.condition("kv", "Degraded");
    assert_eq!(degraded, "True");
    assert!(message.contains("not taking a data-losing action"), "{message}");
    // The stopped pods are removed and the same replicas come back on their own volumes.
    assert!(writes.contains(&format!("DELETE {PODS}/kv-0")) && writes.contains(&format!("DELETE {PODS}/kv-1")));
    h.reconcile("kv").await;
    let writes = h.writes();
    assert_eq!(count(&writes, &format!("POST {PODS}")), 2, "{writes:#?}");
    assert!(
        !writes.iter().any(|l| l.starts_with(&format!("POST {PVCS}"))),
        "{writes:#?}"
    );
    assert_eq!(pods(&h.api), vec!["kv-0", "kv-1"]);
    // They restart with their data and epoch; the cluster is whole again at the same epoch.
    h.run(&[("kv-0", "10.0.0.1", "n1"), ("kv-1", "10.0.0.2", "n2")], "1.0.0");
    h.reconcile("kv").await;
    h.reconcile("kv").await;
    assert_eq!(h.condition("kv", "Ready").0, "True");

    // Both die again right after starting (a second failure within the start-up grace):
    // voters of the persisted configuration have run and joined, so they are restarted from
    // their volumes again, whatever their uptime...
    crash_at_start(&h.api, "kv-0", "killed again 1 s after start");
    crash_at_start(&h.api, "kv-1", "killed again 1 s after start");
    h.reconcile("kv").await;
    let writes = h.writes();
    assert!(
        writes.contains(&format!("DELETE {PODS}/kv-0")) && writes.contains(&format!("DELETE {PODS}/kv-1")),
        "restarted from disk after a quick death: {writes:#?}"
    );
    assert!(
        writes.contains(&format!("PATCH {PVCS}/data-kv-0")),
        "count recorded: {writes:#?}"
    );
    h.reconcile("kv").await;
    assert_eq!(pods(&h.api), vec!["kv-0", "kv-1"], "recreated on their volumes");
    assert_eq!(h.status("kv").epoch, Some(1));

    // ...but one that dies at every start is restarted with a growing backoff, never in a
    // tight loop, and Degraded names it with its last words.
    h.run(&[("kv-0", "10.0.0.1", "n1"), ("kv-1", "10.0.0.2", "n2")], "1.0.0");
    crash_just_now(&h.api, "kv-0", "data dir was written by kv 0.9.0 and is not sealed");
    crash_just_now(&h.api, "kv-1", "data dir was written by kv 0.9.0 and is not sealed");
    h.reconcile("kv").await;
    h.reconcile("kv").await;
    let writes = h.writes();
    assert!(
        !writes
            .iter()
            .any(|l| l.starts_with("DELETE") || l.starts_with("POST /api")),
        "backing off: {writes:#?}"
    );
    let (degraded, _, message) = h.condition("kv", "Degraded");
    assert_eq!(degraded, "True");
    assert!(
        message.contains("kv-0 died within 60s of starting (2 time(s) in a row)")
            && message.contains("not sealed")
            && message.contains("backing off: kv-0 in 5s"),
        "{message}"
    );
}

#[tokio::test]
async fn more_than_t_failures_with_ephemeral_storage_only_report() {
    let h = harness();
    let mut obj = rsm_json("kv", 1, "1.0.0", "img:1");
    obj["spec"]["storage"] = json!({"ephemeral": true});
    h.add("kv", obj);
    h.reconcile("kv").await;
    assert!(!h.writes().iter().any(|l| l.contains("persistentvolumeclaims")));
    h.run(&[("kv-0", "10.0.0.1", "n1"), ("kv-1", "10.0.0.2", "n2")], "1.0.0");
    h.reconcile("kv").await;
    h.reconcile("kv").await;
    lock(&h.api).objects.remove(&pod_path("kv-0"));
    lock(&h.api).objects.remove(&pod_path("kv-1"));
    h.reconcile("kv").await;
    h.reconcile("kv").await;
    let writes = h.writes();
    assert!(
        writes.iter().all(|l| l.ends_with("/status") || l.contains("/events")),
        "only report: {writes:#?}"
    );
    assert!(pods(&h.api).is_empty());
    assert_eq!(h.condition("kv", "Degraded").0, "True");
}

#[tokio::test]
async fn changing_t_grows_and_shrinks_through_epochs() {
    let h = harness();
    bootstrapped_pods(&h).await;
    h.reconcile("kv").await;
    h.reconcile("kv").await;
    let set_t = |t: i32| edit(&h.api, &rsm_path("kv"), |obj| obj["spec"]["faultsTolerated"] = json!(t));
    set_t(2);
    h.reconcile("kv").await;
    assert_eq!(pods(&h.api), vec!["kv-0", "kv-1", "kv-2"]);
    assert_eq!(h.status("kv").desired_replicas, Some(3));
    h.run(&[("kv-2", "10.0.0.3", "n3")], "1.0.0");
    h.reconcile("kv").await; // learner, epoch 2
    h.reconcile("kv").await; // voter, epoch 3
    h.reconcile("kv").await;
    assert_eq!(h.status("kv").epoch, Some(3));
    assert_eq!(h.status("kv").ready_replicas, Some(3));
    assert_eq!(h.condition("kv", "Ready").0, "True");

    set_t(1);
    h.reconcile("kv").await;
    let log = h.log();
    let put = position(&log, |l| l.starts_with("PUT") && l.ends_with("/status"));
    let delete = position(&log, |l| l.starts_with(&format!("DELETE {PODS}/")));
    assert!(
        put < delete,
        "removed from the configuration before its pod goes: {log:#?}"
    );
    assert_eq!(h.status("kv").epoch, Some(4));
    assert_eq!(pods(&h.api).len(), 2);
    h.reconcile("kv").await;
    assert_eq!(h.condition("kv", "Ready").0, "True");
    assert_eq!(h.status("kv").ready_replicas, Some(2));
}

/// What the garbage collector does when the RSM is deleted: every object whose owner
/// reference names it goes too.
fn delete_rsm_and_collect_garbage(h: &Harness, name: &str) {
    let mut api = lock(&h.api);
    let uid = api.objects.remove(&rsm_path(name)).expect("RSM exists")["metadata"]["uid"].clone();
    api.objects.retain(|_, obj| {
        let owners = obj["metadata"]["ownerReferences"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        !owners.iter().any(|o| o["uid"] == uid)
    });
}

#[tokio::test]
async fn retained_volumes_outlive_the_rsm_and_a_new_one_adopts_their_configuration() {
    let h = harness();
    let mut kv = rsm_json("kv", 1, "1.0.0", "img:1");
    kv["spec"]["storage"] = json!({"retainOnDelete": true});
    h.add("kv", kv.clone());
    h.reconcile("kv").await;
    let claim = format!("{PVCS}/data-kv-0");
    let owners = lock(&h.api).objects[&claim]["metadata"]["ownerReferences"].clone();
    assert!(owners.is_null(), "a retained claim has no owner: {owners}");
    h.run(&[("kv-0", "10.0.0.1", "n1"), ("kv-1", "10.0.0.2", "n2")], "1.0.0");
    h.reconcile("kv").await;
    assert_eq!(h.status("kv").epoch, Some(1));
    assert_eq!(h.admin.epoch("10.0.0.1"), 1);

    // kubectl delete rsm kv: pods, Services... go; the claims (and the data on them) stay.
    delete_rsm_and_collect_garbage(&h, "kv");
    assert_eq!(pods(&h.api), Vec::<String>::new());
    assert!(lock(&h.api).objects.contains_key(&claim));

    // A new RSM of the same name: the same replicas come back on their volumes...
    h.add("kv", kv);
    h.reconcile("kv").await;
    let log = h.writes();
    assert_eq!(count(&log, &format!("POST {PODS}")), 2, "{log:#?}");
    assert_eq!(count(&log, &format!("POST {PVCS}")), 0, "no new claims: {log:#?}");
    assert_eq!(pods(&h.api), vec!["kv-0", "kv-1"]);
    assert_eq!(h.status("kv").epoch, None, "nothing decided before the replicas answer");
    // ... (the kubelet starts them; the fake replicas behind the same addresses kept their
    // configuration, as the real ones keep it on disk) ...
    run_pod(&h.api, "kv-0", "10.0.0.1", "n1");
    run_pod(&h.api, "kv-1", "10.0.0.2", "n2");
    h.reconcile("kv").await;
    // ... and their configuration becomes the master's, without a new epoch or a push.
    let status = h.status("kv");
    assert_eq!((status.epoch, status.primary.as_deref()), (Some(1), Some("kv-0")));
    assert_eq!(status.next_ordinal, Some(2));
    let log = h.log();
    assert!(!log.iter().any(|l| l.starts_with("admin reconfigure")), "{log:#?}");
    assert!(
        event_notes(&h.api)
            .iter()
            .any(|n| n.contains("adopted configuration epoch 1")),
        "{:#?}",
        event_notes(&h.api)
    );
    h.reconcile("kv").await;
    let writes = h.writes();
    assert!(
        !writes
            .iter()
            .any(|l| l.starts_with("POST") && !l.contains("/events") || l.starts_with("DELETE")),
        "steady after adoption: {writes:#?}"
    );
    assert_eq!(h.status("kv").epoch, Some(1));
}

#[tokio::test]
async fn claims_follow_retain_on_delete_when_it_changes() {
    let h = harness();
    bootstrapped_pods(&h).await;
    h.reconcile("kv").await;
    let claim = format!("{PVCS}/data-kv-0");
    assert!(lock(&h.api).objects[&claim]["metadata"]["ownerReferences"].is_array());
    {
        let mut api = lock(&h.api);
        let obj = api.objects.get_mut(&rsm_path("kv")).expect("RSM");
        obj["spec"]["storage"] = json!({"retainOnDelete": true});
    }
    h.reconcile("kv").await;
    assert!(h.writes().contains(&format!("PATCH {claim}")), "{:#?}", h.writes());
    assert!(lock(&h.api).objects[&claim]["metadata"]["ownerReferences"].is_null());
    h.reconcile("kv").await;
    assert!(
        !h.writes().iter().any(|l| l.contains("persistentvolumeclaims")),
        "steady: {:#?}",
        h.writes()
    );
}

/// A CA Secret that holds no usable CA stops the RSM with a Warning event that says what to
/// do; no pod is made (it could not get a certificate).
#[tokio::test]
async fn an_unusable_ca_secret_is_reported_on_the_rsm_and_nothing_is_created() {
    let h = harness();
    h.add("kv", rsm_json("kv", 1, "1.0.0", "img:1"));
    lock(&h.api).insert(
        "/api/v1/namespaces/apps/secrets/kv-tls-ca",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "kv-tls-ca", "namespace": "apps"},
               "data": {"ca.crt": "bm90IGEgY2VydGlmaWNhdGU=", "ca.key": "bm8ga2V5"}}),
    );
    lock(&h.log).clear();
    let err = reconcile(Arc::new(rsm(&h.api, "kv")), h.ctx.clone())
        .await
        .expect_err("no CA, no reconcile");
    assert!(err.to_string().contains("kv-tls-ca"), "{err}");
    assert!(err.to_string().contains("delete it"), "{err}");
    let log = h.log();
    assert!(
        log.iter().any(|l| l.starts_with("POST") && l.contains("/events")),
        "{log:#?}"
    );
    assert!(pods(&h.api).is_empty());
}

/// A Secret's certificate past 2/3 of its life is issued again from the same CA while its
/// replica keeps running (no pod is deleted or recreated); so is the certificate of a pod made
/// before the operator recorded renewal times. Nothing else is written, the next reconcile
/// writes nothing, and the requeue comes back no later than the next renewal.
#[tokio::test]
async fn certificates_past_two_thirds_of_their_life_are_issued_again_while_the_replicas_run() {
    use k8s_openapi::jiff::Timestamp;
    use lockstep::pki::Ca;
    use lockstep::{PeerIdentity, Role, Transport};
    use lockstep_operator::names::TLS_RENEW_ANNOTATION;
    use lockstep_operator::tls::{renew_at, replica_hosts};
    const SECRETS: &str = "/api/v1/namespaces/apps/secrets";
    let h = harness_with(|c| c.steady_requeue = std::time::Duration::from_secs(24 * 3600));
    bootstrapped_pods(&h).await;
    h.reconcile("kv").await;
    h.reconcile("kv").await;
    let field = |secret: &str, f: &str| -> String {
        let v = lock(&h.api).objects[&format!("{SECRETS}/{secret}")]["data"][f].clone();
        let bytes: k8s_openapi::ByteString = serde_json::from_value(v).expect("base64");
        String::from_utf8(bytes.0).expect("utf8")
    };
    let annotation = |pod: &str| {
        lock(&h.api).objects[&format!("{PODS}/{pod}")]["metadata"]["annotations"][TLS_RENEW_ANNOTATION]
            .as_str()
            .map(str::to_string)
    };
    // Each pod carries when its certificate is due: 2/3 into the 90 days.
    let fresh_due = renew_at(&field("kv-0-tls", "tls.crt")).expect("due");
    assert_eq!(annotation("kv-0"), Some(fresh_due.to_string()));
    let left = fresh_due.duration_since(Timestamp::now()).as_secs();
    assert!((59 * 86400..61 * 86400).contains(&left), "due in 60 days: {left}s");

    // kv-0's certificate was issued 61 days ago (its pod says so, as the operator wrote when
    // it issued it); kv-1's pod has no renewal time (made by an operator from before).
    let ca_pem = field("kv-tls-ca", "ca.crt");
    let ca = Ca::from_pem(&ca_pem, &field("kv-tls-ca", "ca.key")).expect("the RSM's CA");
    let now = time::OffsetDateTime::now_utc();
    let day = std::time::Duration::from_secs(86400);
    let hosts = replica_hosts("kv", NS, "kv-0");
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let old = ca
        .issue_valid(
            &PeerIdentity::new(Role::Replica, "kv-0"),
            &hosts,
            now - 61 * day,
            now + 29 * day,
        )
        .expect("old leaf");
    let old_due = renew_at(&old.cert).expect("due");
    assert!(old_due < Timestamp::now());
    {
        let mut api = lock(&h.api);
        let secret = api.objects.get_mut(&format!("{SECRETS}/kv-0-tls")).expect("kv-0-tls");
        secret["data"]["tls.crt"] =
            serde_json::to_value(k8s_openapi::ByteString(old.cert.clone().into_bytes())).unwrap();
        secret["data"]["tls.key"] =
            serde_json::to_value(k8s_openapi::ByteString(old.key.clone().into_bytes())).unwrap();
        let pod = api.objects.get_mut(&format!("{PODS}/kv-0")).expect("kv-0");
        pod["metadata"]["annotations"][TLS_RENEW_ANNOTATION] = json!(old_due.to_string());
        let pod = api.objects.get_mut(&format!("{PODS}/kv-1")).expect("kv-1");
        pod["metadata"]["annotations"]
            .as_object_mut()
            .expect("annotations")
            .remove(TLS_RENEW_ANNOTATION);
    }
    let kv1_before = field("kv-1-tls", "tls.crt");
    let uids: Vec<_> = ["kv-0", "kv-1"]
        .iter()
        .map(|p| lock(&h.api).objects[&format!("{PODS}/{p}")]["metadata"]["uid"].clone())
        .collect();

    h.reconcile("kv").await;
    let writes = h.writes();
    assert_eq!(
        writes,
        vec![
            format!("PATCH {SECRETS}/kv-0-tls"),
            format!("PATCH {PODS}/kv-0"),
            format!("PATCH {SECRETS}/kv-1-tls"),
            format!("PATCH {PODS}/kv-1"),
        ],
        "the two Secrets and the renewal times on their pods, nothing else (no pod deleted)"
    );
    assert!(
        !h.log().iter().any(|l| l.starts_with("GET") && l.contains("/secrets/")),
        "no Secret is read to know when it is due: {:#?}",
        h.log()
    );
    for (p, uid) in ["kv-0", "kv-1"].iter().zip(&uids) {
        assert_eq!(
            &lock(&h.api).objects[&format!("{PODS}/{p}")]["metadata"]["uid"],
            uid,
            "{p} kept running"
        );
    }
    let new = field("kv-0-tls", "tls.crt");
    assert_ne!(new, old.cert, "kv-0's certificate issued again");
    assert_ne!(field("kv-1-tls", "tls.crt"), kv1_before, "kv-1's too");
    assert_eq!(field("kv-0-tls", "ca.crt"), ca_pem, "from the same CA");
    let due = renew_at(&new).expect("due");
    assert!(due > Timestamp::now() + 59 * day, "a fresh certificate: {due}");
    assert_eq!(annotation("kv-0"), Some(due.to_string()));
    assert!(annotation("kv-1").is_some());

    // The new certificate and key work: a TLS handshake in which the operator's admin
    // identity verifies it, for the name it dials, against the CA.
    let replica = Transport::from_pem(
        ca_pem.clone().into_bytes(),
        new.into_bytes(),
        field("kv-0-tls", "tls.key").into_bytes(),
        "kv-0".into(),
    )
    .expect("usable certificate and key");
    assert_eq!(replica.identity(), Some(&PeerIdentity::new(Role::Replica, "kv-0")));
    operator_handshake(&ca, &ca_pem, &replica).await;

    // Steady again: nothing written, and the requeue is no later than the next renewal.
    h.reconcile("kv").await;
    assert!(h.writes().is_empty(), "{:#?}", h.writes());
    {
        let mut api = lock(&h.api);
        let pod = api.objects.get_mut(&format!("{PODS}/kv-0")).expect("kv-0");
        let soon = Timestamp::now() + std::time::Duration::from_secs(600);
        pod["metadata"]["annotations"][TLS_RENEW_ANNOTATION] = json!(soon.to_string());
    }
    let action = h.reconcile("kv").await;
    let secs: f64 = format!("{action:?}")
        .split("Some(")
        .nth(1)
        .and_then(|s| s.split("s)").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{action:?}"));
    assert!(
        secs <= 600.0 && secs > 500.0,
        "back when kv-0 is due, not at the 24 h resync: {action:?}"
    );
}

/// The RSM's CA past 2/3 of its life is rotated while the replicas run, in two steps: first
/// every certificate Secret trusts the old and the new CA (certificates kept, pods due when the
/// rotation settles), then certificates come from the new CA. Seen by an operator that starts
/// after the CA got old (a new `Context` on the same API objects).
#[tokio::test]
async fn a_ca_past_two_thirds_of_its_life_is_rotated_in_two_steps_while_the_replicas_run() {
    use k8s_openapi::jiff::Timestamp;
    use lockstep::pki::Ca;
    use lockstep::{PeerIdentity, Role, Transport};
    use lockstep_operator::names::TLS_RENEW_ANNOTATION;
    use lockstep_operator::tls::replica_hosts;
    use std::time::Duration;
    const SECRETS: &str = "/api/v1/namespaces/apps/secrets";
    let settle = Duration::from_secs(2);
    let configure = |c: &mut Context| {
        c.steady_requeue = Duration::from_secs(24 * 3600);
        c.ca_trust_settle = settle;
    };
    let h = harness_with(configure);
    bootstrapped_pods(&h).await;
    h.reconcile("kv").await;
    let api = h.api.clone();
    let field = |secret: &str, f: &str| -> String {
        let v = lock(&api).objects[&format!("{SECRETS}/{secret}")]["data"][f].clone();
        let bytes: k8s_openapi::ByteString = serde_json::from_value(v).expect("base64");
        String::from_utf8(bytes.0).expect("utf8")
    };
    let set = |secret: &str, f: &str, v: &str| {
        let mut objects = lock(&api);
        let s = objects.objects.get_mut(&format!("{SECRETS}/{secret}")).expect("secret");
        s["data"][f] = serde_json::to_value(k8s_openapi::ByteString(v.as_bytes().to_vec())).unwrap();
    };
    // The CA in use is near its end (valid 25 s more, past 2/3 of its life), and it issued
    // every certificate the replicas and the client Secret hold.
    let old = Ca::generate_valid("kv-old", Duration::from_secs(25)).expect("old CA");
    set("kv-tls-ca", "ca.crt", old.pem());
    set("kv-tls-ca", "ca.key", &old.key_pem());
    let mut old_leaves = Vec::new();
    for id in ["kv-0", "kv-1"] {
        let hosts = replica_hosts("kv", NS, id);
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let leaf = old.issue(&PeerIdentity::new(Role::Replica, id), &hosts).expect("leaf");
        let secret = format!("{id}-tls");
        set(&secret, "ca.crt", old.pem());
        set(&secret, "tls.crt", &leaf.cert);
        set(&secret, "tls.key", &leaf.key);
        old_leaves.push(leaf.cert);
    }
    let client_leaf = old
        .issue(&PeerIdentity::new(Role::Client, "default"), &[])
        .expect("client");
    set("kv-client-tls", "ca.crt", old.pem());
    set("kv-client-tls", "tls.crt", &client_leaf.cert);
    set("kv-client-tls", "tls.key", &client_leaf.key);

    // An operator that starts now.
    let mut ctx = Context::new(client(h.api.clone()), h.admin.clone(), h.metrics.clone(), Source::Api);
    configure(&mut ctx);
    let h = Harness {
        ctx: Arc::new(ctx),
        ..h
    };

    // Step 1: a new CA; every Secret trusts both; no certificate changes; pods due when settled.
    let began = Timestamp::now();
    h.reconcile("kv").await;
    // (A new operator also applies the shared objects once: not about certificates.)
    let tls_writes: Vec<String> = h
        .writes()
        .into_iter()
        .filter(|w| w.contains("/secrets/") || w.contains("/pods"))
        .collect();
    assert_eq!(
        tls_writes,
        vec![
            format!("PATCH {SECRETS}/kv-tls-ca"),
            format!("PATCH {SECRETS}/kv-0-tls"),
            format!("PATCH {PODS}/kv-0"),
            format!("PATCH {SECRETS}/kv-1-tls"),
            format!("PATCH {PODS}/kv-1"),
            format!("PATCH {SECRETS}/kv-client-tls"),
        ],
        "the CA Secret, the trust bundle in each certificate Secret, and when the pods are due"
    );
    let new_pem = field("kv-tls-ca", "ca.crt");
    assert_ne!(new_pem, old.pem(), "a new CA");
    assert_eq!(field("kv-tls-ca", "previous.crt"), old.pem(), "the old one is kept");
    for (id, leaf) in ["kv-0", "kv-1"].iter().zip(&old_leaves) {
        let bundle = field(&format!("{id}-tls"), "ca.crt");
        assert!(
            bundle.contains(new_pem.trim()) && bundle.contains(old.pem().trim()),
            "{id} trusts both"
        );
        assert_eq!(
            &field(&format!("{id}-tls"), "tls.crt"),
            leaf,
            "{id} keeps its certificate for now"
        );
        let due: Timestamp = lock(&h.api).objects[&format!("{PODS}/{id}")]["metadata"]["annotations"]
            [TLS_RENEW_ANNOTATION]
            .as_str()
            .expect("due")
            .parse()
            .expect("time");
        assert!(
            due >= began + settle && due <= Timestamp::now() + settle,
            "{id} due when settled: {due}"
        );
    }
    assert_eq!(field("kv-client-tls", "tls.crt"), client_leaf.cert);
    h.reconcile("kv").await;
    assert!(h.writes().is_empty(), "nothing until it settles: {:#?}", h.writes());

    // Step 2, once settled: certificates from the new CA, which alone now verifies them.
    tokio::time::sleep(settle + Duration::from_millis(200)).await;
    h.reconcile("kv").await;
    let writes = h.writes();
    for w in [
        format!("PATCH {SECRETS}/kv-0-tls"),
        format!("PATCH {SECRETS}/kv-1-tls"),
        format!("PATCH {SECRETS}/kv-client-tls"),
    ] {
        assert!(writes.contains(&w), "{w}: {writes:#?}");
    }
    let new = Ca::from_pem(&new_pem, &field("kv-tls-ca", "ca.key")).expect("new CA");
    let replica = Transport::from_pem(
        new_pem.clone().into_bytes(),
        field("kv-0-tls", "tls.crt").into_bytes(),
        field("kv-0-tls", "tls.key").into_bytes(),
        "kv-0".into(),
    )
    .expect("kv-0's new certificate");
    // Trusting the new CA alone.
    operator_handshake(&new, &new_pem, &replica).await;
}

/// A TLS handshake over a pipe between `replica` and an admin identity issued by `ca` that
/// trusts `trust` alone, dialling kv-0's peer name: both sides must accept the other.
async fn operator_handshake(ca: &lockstep::pki::Ca, trust: &str, replica: &lockstep::Transport) {
    use lockstep::{PeerIdentity, Role, Transport};
    let admin_leaf = ca
        .issue(&PeerIdentity::new(Role::Admin, "operator"), &[])
        .expect("admin leaf");
    let admin = Transport::from_pem(
        trust.as_bytes().to_vec(),
        admin_leaf.cert.into_bytes(),
        admin_leaf.key.into_bytes(),
        "admin".into(),
    )
    .expect("admin");
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = tokio_rustls::TlsAcceptor::from(replica.current().expect("tls").server.clone());
    let client = tokio_rustls::TlsConnector::from(admin.current().expect("tls").client.clone());
    let name = rustls::pki_types::ServerName::try_from("kv-0.kv-peers.apps.svc").expect("name");
    let (s, c) = tokio::join!(server.accept(a), client.connect(name, b));
    s.expect("the replica accepts the operator");
    c.expect("the operator accepts the replica's certificate");
}
