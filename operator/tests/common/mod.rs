//! A fake Kubernetes API server at the HTTP edge (tower-test), and fake replicas behind the
//! admin trait. The operator under test is the real one: its requests go through kube's
//! real client, serialization and error handling; only the far side is simulated.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use lockstep_operator::admin::{AdminTarget, ReplicaAdmin, to_proto};
use lockstep_planner::Config;
use lockstep_proto::{Configuration, MachineIdentity, PeerProgress, StatusResponse};
use serde_json::{Value, json};

/// Every request (API and admin), in order: "PUT /apis/.../status", "admin reconfigure kv-0 e1".
pub type Log = Arc<Mutex<Vec<String>>>;

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A change "someone else" makes to a stored object.
pub type Mutation = Box<dyn Fn(&mut Value) + Send>;

#[derive(Default)]
pub struct FakeApi {
    /// Objects by path (`/api/v1/namespaces/ns/pods/kv-0`).
    pub objects: BTreeMap<String, Value>,
    pub rv: u64,
    /// Answer the next N status writes with 409 Conflict.
    pub conflicts: usize,
    /// Applied to the stored RSM when a conflict is injected (what "someone else" wrote).
    pub on_conflict: Option<Mutation>,
    pub log: Log,
    /// Path prefixes of APIs this server does not serve (a CRD not installed): answered like
    /// the real one, 404 with a plain-text body.
    pub not_served: Vec<String>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn ok(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Merge `patch` into `target` (JSON merge patch; `containers` merged by name like a
/// strategic merge patch).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if k == "containers"
                    && let (Some(Value::Array(ta)), Value::Array(pa)) = (t.get_mut(k), v)
                {
                    for pc in pa {
                        let name = pc.get("name").cloned();
                        match ta.iter_mut().find(|c| c.get("name") == name.as_ref()) {
                            Some(tc) => merge(tc, pc),
                            None => ta.push(pc.clone()),
                        }
                    }
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeApi {
    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    pub fn insert(&mut self, path: &str, mut obj: Value) {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv);
        if obj["metadata"].get("uid").is_none() {
            obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        self.objects.insert(path.to_string(), obj);
    }

    fn list(&self, collection: &str, query: &str) -> Value {
        let selector: Option<(String, String)> = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("labelSelector="))
            .map(percent_decode)
            .and_then(|s| s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())));
        let prefix = format!("{collection}/");
        // Cluster-wide lists (`/api/v1/pods`) cover `/api/v1/namespaces/*/pods/*`.
        let (base, kind) = collection.rsplit_once('/').unwrap_or(("", collection));
        let cluster_wide = !collection.contains("/namespaces/");
        let in_collection = |p: &str| {
            if cluster_wide {
                p.strip_prefix(&format!("{base}/namespaces/"))
                    .map(|rest| rest.split('/').collect::<Vec<_>>())
                    .is_some_and(|parts| parts.len() == 3 && parts[1] == kind)
            } else {
                p.starts_with(&prefix) && !p[prefix.len()..].contains('/')
            }
        };
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(p, _)| in_collection(p))
            .map(|(_, v)| v.clone())
            .filter(|v| {
                selector
                    .as_ref()
                    .is_none_or(|(k, val)| v["metadata"]["labels"][k.as_str()] == json!(val))
            })
            .collect();
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})
    }

    pub fn handle(&mut self, method: &Method, uri: &http::Uri, body: &[u8]) -> Response<Body> {
        let path = uri.path().to_string();
        let query = uri.query().unwrap_or_default().to_string();
        lock(&self.log).push(format!("{method} {path}"));
        if self.not_served.iter().any(|p| path.starts_with(p.as_str())) {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header("content-type", "text/plain; charset=utf-8")
                .body(Body::from(b"404 page not found\n".to_vec()))
                .unwrap_or_else(|_| Response::new(Body::empty()));
        }
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let is_status = path.ends_with("/status");
        let object_path = path.trim_end_matches("/status").to_string();
        match *method {
            Method::GET => match self.objects.get(&object_path) {
                Some(v) => ok(200, v),
                None if path.rsplit('/').next().is_some_and(|last| {
                    matches!(
                        last,
                        "pods"
                            | "persistentvolumeclaims"
                            | "services"
                            | "configmaps"
                            | "replicatedstatemachines"
                            | "poddisruptionbudgets"
                            | "networkpolicies"
                            | "nodes"
                    )
                }) =>
                {
                    ok(200, &self.list(&path, &query))
                }
                None => status(404, "NotFound", &format!("{path} not found")),
            },
            Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
                if path.contains("/events") {
                    // Stored like any object, so tests read what a person would see.
                    let p = format!("{path}/{name}");
                    self.insert(&p, body);
                    return ok(201, &self.objects[&p]);
                }
                let p = format!("{path}/{name}");
                if self.objects.contains_key(&p) {
                    return status(409, "AlreadyExists", &format!("{name} already exists"));
                }
                self.insert(&p, body);
                ok(201, &self.objects[&p])
            }
            Method::DELETE => match self.objects.remove(&object_path) {
                Some(v) => ok(200, &v),
                None => status(404, "NotFound", &format!("{path} not found")),
            },
            Method::PUT if is_status => {
                let Some(stored) = self.objects.get(&object_path).cloned() else {
                    return status(404, "NotFound", "no such object");
                };
                if self.conflicts > 0 {
                    self.conflicts -= 1;
                    let mut changed = stored.clone();
                    if let Some(f) = &self.on_conflict {
                        f(&mut changed);
                    }
                    self.insert(&object_path, changed);
                    return status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                if body["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
                    return status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                let mut next = stored;
                next["status"] = body["status"].clone();
                self.insert(&object_path, next);
                ok(200, &self.objects[&object_path])
            }
            Method::PUT => {
                if let Some(stored) = self.objects.get(&object_path)
                    && body["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"]
                {
                    return status(409, "Conflict", "the object has been modified");
                }
                self.insert(&object_path, body);
                ok(200, &self.objects[&object_path])
            }
            Method::PATCH => {
                let apply = query.contains("force=true");
                if apply {
                    self.insert(&object_path, body);
                } else {
                    let Some(mut obj) = self.objects.get(&object_path).cloned() else {
                        return status(404, "NotFound", &format!("{path} not found"));
                    };
                    merge(&mut obj, &body);
                    self.insert(&object_path, obj);
                }
                ok(200, &self.objects[&object_path])
            }
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}

/// A kube Client whose requests are answered by `api`.
pub fn client(api: Arc<Mutex<FakeApi>>) -> Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            if parts.uri.query().is_some_and(|q| q.contains("watch=true")) {
                // A watch that stays open and quiet, like a real one between events.
                let log = lock(&api).log.clone();
                lock(&log).push(format!("WATCH {}", parts.uri.path()));
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                    send.send_response(Response::new(Body::empty()));
                });
                continue;
            }
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let resp = lock(&api).handle(&parts.method, &parts.uri, &bytes);
            send.send_response(resp);
        }
    });
    Client::new(svc, "default")
}

pub const NS: &str = "apps";

pub fn rsm_path(name: &str) -> String {
    format!("/apis/lockstep.dev/v1alpha1/namespaces/{NS}/replicatedstatemachines/{name}")
}

pub fn pod_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods/{name}")
}

pub fn rsm_json(name: &str, t: i32, version: &str, image: &str) -> Value {
    json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicatedStateMachine",
        "metadata": {"name": name, "namespace": NS, "generation": 1},
        "spec": {"faultsTolerated": t, "failureModel": "FailStop",
                 "machine": {"name": "kv", "version": version, "image": image}}
    })
}

/// Changes the stored object at `path` in place with `change` (a new resourceVersion, as
/// the API server would give it); nothing when there is no such object.
pub fn edit(api: &Mutex<FakeApi>, path: &str, change: impl FnOnce(&mut Value)) {
    let mut api = lock(api);
    let Some(mut obj) = api.objects.get(path).cloned() else {
        return;
    };
    change(&mut obj);
    api.insert(path, obj);
}

/// What the kubelet would do: schedule, start, and report a pod running its spec image.
pub fn run_pod(api: &Mutex<FakeApi>, name: &str, ip: &str, node: &str) {
    edit(api, &pod_path(name), |pod| {
        let image = pod["spec"]["containers"][0]["image"].clone();
        let container = pod["spec"]["containers"][0]["name"].clone();
        pod["spec"]["nodeName"] = json!(node);
        pod["status"] = json!({
            "phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": container, "image": image, "imageID": format!("sha256:{name}"),
                "ready": true, "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]
        });
    });
}

/// The kubelet restarted the container after an image change.
pub fn kubelet_restart(api: &Mutex<FakeApi>, name: &str) {
    edit(api, &pod_path(name), |pod| {
        let image = pod["spec"]["containers"][0]["image"].clone();
        pod["status"]["containerStatuses"][0]["image"] = image;
    });
}

pub fn fail_pod(api: &Mutex<FakeApi>, name: &str, exit_code: i32, message: &str) {
    edit(api, &pod_path(name), |pod| {
        pod["status"]["phase"] = json!("Failed");
        pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
        pod["status"]["containerStatuses"][0]["state"] = json!({"terminated": {
            "exitCode": exit_code, "reason": "Error", "message": message,
            "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T01:00:00Z"}});
    });
}

/// A replica that exits right after it started.
pub fn crash_at_start(api: &Mutex<FakeApi>, name: &str, message: &str) {
    fail_pod(api, name, 2, message);
    edit(api, &pod_path(name), |pod| {
        pod["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = json!("2026-01-01T00:00:01Z");
    });
}

/// A replica that exits right after it started, at a time that is still ahead of the
/// operator's clock (so any backoff measured from it has not elapsed, however slow the test).
pub fn crash_just_now(api: &Mutex<FakeApi>, name: &str, message: &str) {
    fail_pod(api, name, 2, message);
    edit(api, &pod_path(name), |pod| {
        let terminated = &mut pod["status"]["containerStatuses"][0]["state"]["terminated"];
        terminated["startedAt"] = json!("2999-01-01T00:00:00Z");
        terminated["finishedAt"] = json!("2999-01-01T00:00:01Z");
    });
}

pub fn pods(api: &Mutex<FakeApi>) -> Vec<String> {
    let prefix = format!("/api/v1/namespaces/{NS}/pods/");
    lock(api)
        .objects
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

/// The notes of the stored events (with their series count), in name order.
pub fn event_notes(api: &Mutex<FakeApi>) -> Vec<String> {
    lock(api)
        .objects
        .iter()
        .filter(|(k, _)| k.contains("/events/"))
        .map(|(_, v)| {
            let count = v["series"]["count"].as_i64().unwrap_or(1);
            format!("{} (x{count})", v["note"].as_str().unwrap_or_default())
        })
        .collect()
}

pub fn rsm(api: &Mutex<FakeApi>, name: &str) -> lockstep_resource::ReplicatedStateMachine {
    let v = lock(api).objects.get(&rsm_path(name)).cloned().unwrap_or(Value::Null);
    serde_json::from_value(v).expect("stored RSM deserializes")
}

/// One fake replica: it adopts configurations like the real one (never a lower epoch),
/// seals and resumes on request.
#[derive(Clone, Debug, Default)]
pub struct FakeReplica {
    pub id: String,
    pub config: Option<Configuration>,
    pub applied: u64,
    pub sealed_at: u64,
    pub version: String,
    /// What the replica reports as `launched_image` (empty: an older replica that does not).
    pub image: String,
}

#[derive(Default)]
pub struct FakeAdmin {
    /// Replicas by admin address (http://IP:7000).
    pub replicas: Mutex<HashMap<String, FakeReplica>>,
    pub log: Log,
}

impl FakeAdmin {
    pub fn add(&self, ip: &str, id: &str, version: &str) {
        lock(&self.replicas).insert(
            format!("http://{ip}:7000"),
            FakeReplica {
                id: id.into(),
                applied: 10,
                version: version.into(),
                ..Default::default()
            },
        );
    }

    pub fn epoch(&self, ip: &str) -> u64 {
        lock(&self.replicas)
            .get(&format!("http://{ip}:7000"))
            .and_then(|r| r.config.as_ref().map(|c| c.epoch))
            .unwrap_or(0)
    }

    pub fn set_version(&self, version: &str) {
        for r in lock(&self.replicas).values_mut() {
            r.version = version.into();
        }
    }

    /// Every replica reports it was launched from `image`.
    pub fn set_launched(&self, image: &str) {
        for r in lock(&self.replicas).values_mut() {
            r.image = image.into();
        }
    }
}

fn status_of(r: &FakeReplica, all: &HashMap<String, FakeReplica>) -> StatusResponse {
    let epoch = r.config.as_ref().map_or(0, |c| c.epoch);
    let primary = r.config.as_ref().is_some_and(|c| c.primary_id == r.id);
    let member = r
        .config
        .as_ref()
        .is_some_and(|c| c.members.iter().any(|m| m.id == r.id));
    StatusResponse {
        id: r.id.clone(),
        epoch,
        state: match (r.config.is_some(), member, primary) {
            (false, _, _) => "unconfigured",
            (true, false, _) => "removed",
            (true, true, true) => "primary",
            (true, true, false) => "backup",
        }
        .into(),
        applied_index: r.applied,
        commit_index: r.applied,
        last_index: r.applied,
        machine: Some(MachineIdentity {
            name: "kv".into(),
            version: r.version.clone(),
            digest: String::new(),
        }),
        config: r.config.clone(),
        sealed_at: r.sealed_at,
        launched_image: r.image.clone(),
        sealed_digest: if r.sealed_at > 0 { vec![7; 32] } else { vec![] },
        peers: if primary {
            r.config
                .iter()
                .flat_map(|c| c.members.iter())
                .filter(|m| m.id != r.id)
                .map(|m| PeerProgress {
                    id: m.id.clone(),
                    match_index: all.values().find(|x| x.id == m.id).map_or(0, |x| x.applied),
                    reachable: true,
                })
                .collect()
        } else {
            vec![]
        },
        ..Default::default()
    }
}

impl ReplicaAdmin for FakeAdmin {
    fn status(&self, target: AdminTarget) -> BoxFuture<'_, Result<StatusResponse, String>> {
        Box::pin(async move {
            let addr = target.addr;
            let all = lock(&self.replicas);
            all.get(&addr)
                .map(|r| status_of(r, &all))
                .ok_or_else(|| format!("connect {addr}: connection refused"))
        })
    }

    fn reconfigure(&self, target: AdminTarget, config: Config) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let addr = target.addr;
            let mut all = lock(&self.replicas);
            let r = all.get_mut(&addr).ok_or_else(|| format!("connect {addr}: refused"))?;
            lock(&self.log).push(format!("admin reconfigure {} epoch {}", r.id, config.epoch));
            let current = r.config.as_ref().map_or(0, |c| c.epoch);
            if config.epoch < current {
                return Err(format!("stale epoch {} < {current}", config.epoch));
            }
            r.config = Some(to_proto(&config));
            Ok(config.epoch)
        })
    }

    fn seal(&self, target: AdminTarget) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let addr = target.addr;
            let mut all = lock(&self.replicas);
            lock(&self.log).push(format!("admin seal {addr}"));
            let index = all.get(&addr).map_or(0, |r| r.applied + 1);
            for r in all.values_mut() {
                r.applied = index;
                r.sealed_at = index;
            }
            Ok(index)
        })
    }

    fn resume(&self, target: AdminTarget) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let addr = target.addr;
            let mut all = lock(&self.replicas);
            lock(&self.log).push(format!("admin resume {addr}"));
            for r in all.values_mut() {
                r.sealed_at = 0;
                r.applied += 1;
            }
            Ok(all.get(&addr).map_or(0, |r| r.applied))
        })
    }
}
