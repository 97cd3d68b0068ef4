//! 200 ReplicatedStateMachines against the fake API server: bring them all to Ready, then
//! reconcile them again from watch caches and check that steady state makes no API
//! requests at all (no hot loops). Prints reconcile latency (p50/p99) and memory; those
//! numbers are reported, not asserted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector;
use kube::runtime::watcher;
use lockstep_operator::controller::{Context, reconcile};
use lockstep_operator::metrics::Metrics;
use lockstep_operator::observe::{Caches, Source};

const OBJECTS: usize = 200;

fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn objects_of<K: serde::de::DeserializeOwned>(api: &Mutex<FakeApi>, kind: &str) -> Vec<K> {
    let needle = format!("/{kind}/");
    lock(api)
        .objects
        .iter()
        .filter(|(p, _)| p.contains(&needle))
        .filter_map(|(_, v)| serde_json::from_value(v.clone()).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_objects_reach_ready_and_then_make_no_requests() {
    let rss_before = rss_kib();
    let log = Log::default();
    let api = Arc::new(Mutex::new(FakeApi {
        log: log.clone(),
        ..Default::default()
    }));
    let admin = Arc::new(FakeAdmin::default());
    let metrics = Arc::new(Metrics::default());
    let names: Vec<String> = (0..OBJECTS).map(|i| format!("rsm{i}")).collect();
    for n in &names {
        lock(&api).insert(&rsm_path(n), rsm_json(n, 1, "1.0.0", "img:1"));
    }
    let client = client(api.clone());
    let ctx = Arc::new(Context::new(
        client.clone(),
        admin.clone(),
        metrics.clone(),
        Source::Api,
    ));

    // Converge: create, run, configure, ready.
    for n in &names {
        reconcile(Arc::new(rsm(&api, n)), ctx.clone()).await.expect("bootstrap");
    }
    for (i, n) in names.iter().enumerate() {
        for r in 0..2 {
            let ip = format!("10.{}.{}.{r}", i / 200, i % 200);
            run_pod(&api, &format!("{n}-{r}"), &ip, &format!("node{}", r));
            admin.add(&ip, &format!("{n}-{r}"), "1.0.0");
        }
    }
    for _ in 0..2 {
        for n in &names {
            reconcile(Arc::new(rsm(&api, n)), ctx.clone()).await.expect("converge");
        }
    }
    let ready = names
        .iter()
        .filter(|n| {
            rsm(&api, n)
                .status
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    assert_eq!(ready, OBJECTS, "every object Ready");

    // Steady state from watch caches, as in production.
    let (pods, mut pods_w) = reflector::store::<Pod>();
    let (pvcs, mut pvcs_w) = reflector::store::<PersistentVolumeClaim>();
    let (nodes, _nodes_w) = reflector::store::<Node>();
    let (services, mut services_w) = reflector::store::<Service>();
    let (config_maps, mut config_maps_w) = reflector::store::<ConfigMap>();
    let (pdbs, mut pdbs_w) = reflector::store::<PodDisruptionBudget>();
    let (network_policies, mut network_policies_w) = reflector::store::<NetworkPolicy>();
    for o in objects_of::<Service>(&api, "services") {
        services_w.apply_watcher_event(&watcher::Event::Apply(o));
    }
    for o in objects_of::<ConfigMap>(&api, "configmaps") {
        config_maps_w.apply_watcher_event(&watcher::Event::Apply(o));
    }
    for o in objects_of::<PodDisruptionBudget>(&api, "poddisruptionbudgets") {
        pdbs_w.apply_watcher_event(&watcher::Event::Apply(o));
    }
    for o in objects_of::<NetworkPolicy>(&api, "networkpolicies") {
        network_policies_w.apply_watcher_event(&watcher::Event::Apply(o));
    }
    for p in objects_of::<Pod>(&api, "pods") {
        pods_w.apply_watcher_event(&watcher::Event::Apply(p));
    }
    for p in objects_of::<PersistentVolumeClaim>(&api, "persistentvolumeclaims") {
        pvcs_w.apply_watcher_event(&watcher::Event::Apply(p));
    }
    let caches = Caches {
        pods,
        pvcs,
        nodes,
        services,
        config_maps,
        pdbs,
        network_policies,
    };
    let cached = Arc::new(Context::new(
        client,
        admin.clone(),
        metrics.clone(),
        Source::Cache(caches),
    ));
    // A fresh process (empty in-memory state) with filled caches: the applied-hash
    // annotations on the owned objects say they are current, so not even the first pass
    // writes anything. It reads each RSM's CA and client certificate Secrets once (the CA
    // lives only in them; crate::tls), and nothing after that.
    lock(&log).clear();
    for n in &names {
        reconcile(Arc::new(rsm(&api, n)), cached.clone())
            .await
            .expect("first pass");
    }
    let first: Vec<String> = lock(&log).drain(..).collect();
    let expected: Vec<String> = names
        .iter()
        .flat_map(|n| {
            [
                format!("GET /api/v1/namespaces/{NS}/secrets/{n}-tls-ca"),
                format!("GET /api/v1/namespaces/{NS}/secrets/{n}-client-tls"),
            ]
        })
        .collect();
    assert_eq!(
        first, expected,
        "a fresh process reads the certificate Secrets, nothing else"
    );
    let mut latencies = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let passes = 3;
    let started = Instant::now();
    for _ in 0..passes {
        for n in &names {
            let obj = Arc::new(rsm(&api, n));
            let t = Instant::now();
            reconcile(obj, cached.clone()).await.expect("steady");
            latencies.record(t.elapsed().as_micros() as u64).ok();
        }
    }
    let elapsed = started.elapsed();
    let requests = lock(&log).clone();
    assert!(
        requests.is_empty(),
        "steady state must make no API requests; made {}: {:?}",
        requests.len(),
        requests.iter().take(10).collect::<Vec<_>>()
    );
    // Someone deletes a client Service: the next reconcile of that object re-applies it
    // (and only it).
    let gone: Service =
        serde_json::from_value(lock(&api).objects[&format!("/api/v1/namespaces/{NS}/services/rsm7")].clone())
            .expect("service");
    services_w.apply_watcher_event(&watcher::Event::Delete(gone));
    reconcile(Arc::new(rsm(&api, "rsm7")), cached.clone())
        .await
        .expect("repair");
    assert_eq!(
        lock(&log).clone(),
        vec![format!("PATCH /api/v1/namespaces/{NS}/services/rsm7")]
    );
    let rss_after = rss_kib();
    println!(
        "steady state, {OBJECTS} RSMs x {passes} passes (fake API + fake replicas, {} build): \
         reconcile p50 {} us, p99 {} us, max {} us; {:.0} reconciles/s; API requests {}; \
         RSS {} -> {} KiB",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        latencies.value_at_quantile(0.5),
        latencies.value_at_quantile(0.99),
        latencies.max(),
        (OBJECTS * passes) as f64 / elapsed.as_secs_f64(),
        requests.len(),
        rss_before.unwrap_or(0),
        rss_after.unwrap_or(0),
    );
}
