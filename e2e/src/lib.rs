//! Helpers of the Kubernetes end-to-end suite (`e2e/tests/`): the cluster, `kubectl`, the
//! images under test, an in-cluster client pod and a fault injector.
//!
//! The suite runs against whatever `KUBECONFIG` points to. `e2e/run.sh` is the entry point:
//! it starts a cluster (the one-node kit where present, kind where a container engine
//! exists), builds and loads the images from the workspace's release binaries, and runs the
//! suite. Every wait in here waits for a state; timeouts only bound a failure.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Resource};
use lockstep_resource::ReplicatedStateMachine;
use serde::de::DeserializeOwned;
use serde_json::json;

/// The namespace the plain manifests install the operator into.
pub const OPERATOR_NS: &str = "lockstep-system";
/// Where the fault injector runs (privileged, host PID namespace): never a replica's namespace.
pub const FAULTS_NS: &str = "lockstep-e2e-faults";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The images under test (built by `e2e/images.sh`).
#[derive(Clone, Debug)]
pub struct Images {
    pub operator: String,
    /// The replica image; its built-in machines report version 1.0.0.
    pub replica: String,
    /// The same image as `replica` under another tag (a promotion tag).
    pub replica_alias: String,
    /// A replica build whose built-in machines report version 1.1.0.
    pub replica_next: String,
    /// `replica` and `replica_next` built with the test-only cargo feature `fault-injection`
    /// (a replica pod acts on `LOCKSTEP_INJECT`, set by the RSM annotation `lockstep.dev/inject`).
    pub replica_inject: String,
    pub replica_inject_next: String,
    /// `lockstep`, `lockstep-check` and `lockstep-e2e-tool`.
    pub tools: String,
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

impl Images {
    pub fn from_env() -> Self {
        let tag = env_or("LOCKSTEP_E2E_TAG", "e2e");
        let repo = "ghcr.io/lockstep-dev";
        Self {
            operator: env_or("LOCKSTEP_OPERATOR_IMAGE", &format!("{repo}/lockstep-operator:{tag}")),
            replica: env_or("LOCKSTEP_REPLICA_IMAGE", &format!("{repo}/lockstep-replica:{tag}")),
            replica_alias: env_or(
                "LOCKSTEP_REPLICA_IMAGE_ALIAS",
                &format!("{repo}/lockstep-replica:{tag}-promoted"),
            ),
            replica_next: env_or(
                "LOCKSTEP_REPLICA_IMAGE_NEXT",
                &format!("{repo}/lockstep-replica:{tag}-next"),
            ),
            replica_inject: env_or(
                "LOCKSTEP_REPLICA_IMAGE_INJECT",
                &format!("{repo}/lockstep-replica:{tag}-inject"),
            ),
            replica_inject_next: env_or(
                "LOCKSTEP_REPLICA_IMAGE_INJECT_NEXT",
                &format!("{repo}/lockstep-replica:{tag}-inject-next"),
            ),
            tools: env_or("LOCKSTEP_TOOLS_IMAGE", &format!("{repo}/lockstep-e2e-tools:{tag}")),
        }
    }
}

/// Runs `kubectl` from the repository root; the error carries its stderr.
pub fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    kubectl_with_input(args, None)
}

pub fn kubectl_with_input(args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new("kubectl")
        .args(args)
        .current_dir(repo())
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl (is it on PATH?)")?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        stdin.write_all(input.as_bytes()).context("kubectl stdin")?;
    }
    let out = child.wait_with_output().context("kubectl")?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )
    }
}

/// A client for the cluster; panics (the test fails) when there is none.
pub async fn client() -> Client {
    let client = Client::try_default().await.unwrap_or_else(|e| {
        panic!("the e2e suite needs a Kubernetes cluster: no configuration ({e}); run e2e/run.sh or set KUBECONFIG")
    });
    match tokio::time::timeout(Duration::from_secs(20), client.apiserver_version()).await {
        Ok(Ok(_)) => client,
        other => panic!("the e2e suite needs a Kubernetes cluster: API not reachable ({other:?}); see e2e/README.md"),
    }
}

/// A client that returns 429/503/504 as they come instead of retrying them (kube's default
/// retries a refused eviction for minutes; the eviction test needs to see the refusal).
pub async fn client_without_retry() -> Client {
    let mut config = kube::Config::infer()
        .await
        .unwrap_or_else(|e| panic!("the e2e suite needs a Kubernetes cluster: no configuration ({e})"));
    config.default_retry = false;
    Client::try_from(config).unwrap_or_else(|e| panic!("building a Kubernetes client: {e}"))
}

/// Prints a measurement in a form the entry point collects (`E2E-TIMING name: value`).
pub fn timing(name: &str, value: impl std::fmt::Display) {
    let line = format!("E2E-TIMING {name}: {value}");
    println!("{line}");
    if let Ok(path) = std::env::var("LOCKSTEP_E2E_TIMINGS") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Deletes `name` if it exists, waits until it is gone, and creates it again. With
/// `restricted`, Pod Security Admission enforces the `restricted` profile in it.
pub async fn fresh_namespace(client: &Client, name: &str, restricted: bool) -> anyhow::Result<()> {
    let nss: Api<Namespace> = Api::all(client.clone());
    delete_namespace(client, name).await?;
    let mut labels = json!({"app.kubernetes.io/part-of": "lockstep-e2e"});
    if restricted {
        labels["pod-security.kubernetes.io/enforce"] = json!("restricted");
    }
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
    nss.create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

pub async fn delete_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss.delete(name, &DeleteParams::background()).await;
    wait_until(
        &format!("namespace {name} deleted"),
        Duration::from_secs(300),
        || async { Ok(nss.get_opt(name).await?.is_none()) },
    )
    .await
}

/// Polls `check` until it returns true; fails after `timeout` with `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                last_err.map(|e| format!(" (last error: {e:#})")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An object as JSON without the noise a person does not need to see why a wait failed
/// (managed fields, the last-applied annotation).
pub fn brief<K: serde::Serialize>(obj: &K) -> String {
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Waits for an object of kind `K` to satisfy `pred`; returns it.
pub async fn wait_for<K, F>(api: &Api<K>, name: &str, what: &str, timeout: Duration, pred: F) -> anyhow::Result<K>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
    F: Fn(&K) -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        let got = api.get_opt(name).await;
        if let Ok(Some(obj)) = &got
            && pred(obj)
        {
            return Ok(obj.clone());
        }
        if Instant::now() >= deadline {
            let seen = match &got {
                Ok(Some(obj)) => brief(obj),
                other => format!("{other:?}"),
            };
            bail!("timed out after {timeout:?} waiting for {name}: {what}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Is condition `type_` True for the object's current generation?
pub fn condition(obj: &ReplicatedStateMachine, type_: &str) -> bool {
    obj.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True" && c.observed_generation == obj.metadata.generation)
    })
}

/// The message of condition `type_`, if it is present.
pub fn condition_message(obj: &ReplicatedStateMachine, type_: &str) -> Option<String> {
    obj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.clone())
}

pub fn epoch(obj: &ReplicatedStateMachine) -> i64 {
    obj.status.as_ref().and_then(|s| s.epoch).unwrap_or(0)
}

/// The pods of the members the RSM's status lists.
pub fn member_pods(obj: &ReplicatedStateMachine) -> Vec<String> {
    obj.status
        .as_ref()
        .map(|s| s.members.iter().map(|m| m.pod.clone()).collect())
        .unwrap_or_default()
}

pub fn primary(obj: &ReplicatedStateMachine) -> Option<String> {
    obj.status.as_ref().and_then(|s| s.primary.clone())
}

/// A fail-stop key-value RSM.
pub fn kv_rsm(name: &str, t: i32, version: &str, image: &str) -> ReplicatedStateMachine {
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicatedStateMachine",
        "metadata": {"name": name},
        "spec": {"faultsTolerated": t, "failureModel": "FailStop",
                 "machine": {"name": "kv", "version": version, "image": image},
                 "storage": {"size": "256Mi"}}
    }))
    .expect("RSM fixture")
}

/// `kubectl wait --for=condition=Ready rsm/NAME`, as a user would.
pub fn kubectl_wait_ready(ns: &str, name: &str, timeout: Duration) -> anyhow::Result<()> {
    kubectl(&[
        "-n",
        ns,
        "wait",
        "--for=condition=Ready",
        &format!("rsm/{name}"),
        &format!("--timeout={}s", timeout.as_secs()),
    ])
    .map(|_| ())
}

/// The container id (`containerd://…`) of container `container` in a pod.
pub async fn container_id(pods: &Api<Pod>, pod: &str, container: &str) -> anyhow::Result<String> {
    let p = pods.get(pod).await?;
    p.status
        .and_then(|s| s.container_statuses)
        .and_then(|cs| cs.into_iter().find(|c| c.name == container))
        .and_then(|c| c.container_id)
        .with_context(|| format!("pod {pod} has no running container {container}"))
}

fn pod_running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| cs.iter().all(|c| c.ready))
}

async fn run_pod(client: &Client, ns: &str, pod: serde_json::Value) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(pod)?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    match pods.create(&PostParams::default(), &pod).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).with_context(|| format!("creating pod {ns}/{name}")),
    }
    wait_for(&pods, &name, "running", Duration::from_secs(180), pod_running).await?;
    Ok(name)
}

/// A pod in the test's namespace with the `lockstep` CLI and `lockstep-check`: clients
/// inside the cluster, talking to an RSM through its client Service, with the client
/// certificate the operator issues for that RSM (Secret `RSM-client-tls`, as an application
/// pod would mount it: docs/security.md). It passes the `restricted` Pod Security profile.
pub struct ToolsPod {
    pub ns: String,
    pub name: String,
    /// The RSM whose client certificate the pod mounts.
    pub rsm: String,
}

impl ToolsPod {
    /// The tools pod for talking to RSM `rsm`. The certificate Secret is optional for the
    /// pod to start (a test may need the pod before the RSM exists); the kubelet fills the
    /// mount once the operator has made it ([`ToolsPod::client_certificate`] waits for that).
    pub async fn start(client: &Client, ns: &str, images: &Images, rsm: &str) -> anyhow::Result<Self> {
        let name = run_pod(
            client,
            ns,
            json!({
                "metadata": {"name": "lockstep-tools", "labels": {"app.kubernetes.io/name": "lockstep-e2e-tools"}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "tools", "image": images.tools, "imagePullPolicy": "IfNotPresent",
                        "command": ["/usr/local/bin/lockstep-e2e-tool", "idle"],
                        "workingDir": "/work",
                        "env": [
                            {"name": "LOCKSTEP_TLS_CA", "value": "/tls/ca.crt"},
                            {"name": "LOCKSTEP_TLS_CERT", "value": "/tls/tls.crt"},
                            {"name": "LOCKSTEP_TLS_KEY", "value": "/tls/tls.key"}
                        ],
                        "volumeMounts": [{"name": "work", "mountPath": "/work"},
                                         {"name": "tls", "mountPath": "/tls", "readOnly": true}],
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}}
                    }],
                    "volumes": [{"name": "work", "emptyDir": {}},
                                {"name": "tls", "secret": {"secretName": format!("{rsm}-client-tls"), "optional": true}}]
                }
            }),
        )
        .await?;
        Ok(Self {
            ns: ns.into(),
            name,
            rsm: rsm.into(),
        })
    }

    /// Waits until the pod holds the RSM's current client certificate: the kubelet fills or
    /// refreshes a Secret volume on its periodic sync, up to a minute or two after the
    /// operator made the Secret (a new RSM, or one recreated with a new CA).
    pub async fn client_certificate(&self, client: &Client) -> anyhow::Result<()> {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &self.ns);
        let name = format!("{}-client-tls", self.rsm);
        wait_until(
            &format!("the tools pod holds the current certificate of Secret {name}"),
            Duration::from_secs(240),
            || async {
                let Some(secret) = secrets.get_opt(&name).await? else {
                    return Ok(false);
                };
                let want = secret.data.unwrap_or_default().get("ca.crt").map(|b| b.0.clone());
                let mounted = self.exec(&["lockstep-e2e-tool", "cat", "/tls/ca.crt"]).ok();
                Ok(want.is_some() && mounted.map(String::into_bytes) == want)
            },
        )
        .await
    }

    /// `lockstep-e2e-tool tls-probe ENDPOINT` in the pod (printed, indented): a function
    /// giving what the probe said after `WHAT: ` (empty if it said nothing), and the output.
    pub fn tls_probe(&self, endpoint: &str) -> (impl Fn(&str) -> String, String) {
        let probe = self
            .exec(&["lockstep-e2e-tool", "tls-probe", endpoint])
            .expect("tls probe");
        println!("  {}", probe.trim().replace('\n', "\n  "));
        let out = probe.clone();
        let line = move |what: &str| {
            probe
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{what}: ")))
                .unwrap_or_default()
                .to_string()
        };
        (line, out)
    }

    /// Runs a command in the pod; returns stdout, or an error with stderr.
    pub fn exec(&self, cmd: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["-n", self.ns.as_str(), "exec", self.name.as_str(), "--"];
        args.extend_from_slice(cmd);
        kubectl(&args)
    }

    /// Starts a command in the pod in the background (its output goes to the test's).
    pub fn spawn(&self, cmd: &[&str]) -> anyhow::Result<std::process::Child> {
        let mut args = vec!["-n", self.ns.as_str(), "exec", self.name.as_str(), "--"];
        args.extend_from_slice(cmd);
        Command::new("kubectl")
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("kubectl exec")
    }

    /// `lockstep -c SERVICE:7000 ARGS...` inside the cluster.
    pub fn lockstep(&self, service: &str, args: &[&str]) -> anyhow::Result<String> {
        let target = format!("{service}:7000");
        let mut cmd = vec!["lockstep", "-c", target.as_str()];
        cmd.extend_from_slice(args);
        self.exec(&cmd)
    }
}

/// The fault injector: a privileged pod in the host's PID namespace (namespace
/// `lockstep-e2e-faults`, outside any replica's) that signals a container's processes.
pub struct Faults {
    pod: String,
}

impl Faults {
    pub async fn start(client: &Client, images: &Images) -> anyhow::Result<Self> {
        let nss: Api<Namespace> = Api::all(client.clone());
        if nss.get_opt(FAULTS_NS).await?.is_none() {
            let ns: Namespace = serde_json::from_value(
                json!({"metadata": {"name": FAULTS_NS, "labels": {"app.kubernetes.io/part-of": "lockstep-e2e"}}}),
            )?;
            match nss.create(&PostParams::default(), &ns).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let pod = run_pod(
            client,
            FAULTS_NS,
            json!({
                "metadata": {"name": "lockstep-e2e-tool"},
                "spec": {
                    "hostPID": true,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "fault", "image": images.tools, "imagePullPolicy": "IfNotPresent",
                        "command": ["/usr/local/bin/lockstep-e2e-tool", "idle"],
                        "securityContext": {"privileged": true, "runAsUser": 0}
                    }]
                }
            }),
        )
        .await?;
        Ok(Self { pod })
    }

    /// Sends `signal` (KILL, STOP, CONT) to the processes of `container` in pod `ns/pod`.
    pub async fn signal(
        &self,
        client: &Client,
        ns: &str,
        pod: &str,
        container: &str,
        signal: &str,
    ) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let id = container_id(&pods, pod, container).await?;
        kubectl(&[
            "-n",
            FAULTS_NS,
            "exec",
            &self.pod,
            "--",
            "/usr/local/bin/lockstep-e2e-tool",
            "signal",
            signal,
            &id,
        ])
        .map(|_| ())
    }

    /// `kill -9` of a replica's process.
    pub async fn kill_replica(&self, client: &Client, ns: &str, pod: &str) -> anyhow::Result<()> {
        self.signal(client, ns, pod, "replica", "KILL").await
    }

    /// `kill -9` of several replicas' processes at the same instant (one tool invocation), so
    /// the operator cannot act between the deaths.
    pub async fn kill_replicas_at_once(&self, client: &Client, ns: &str, pods: &[String]) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let mut ids = Vec::new();
        for pod in pods {
            ids.push(container_id(&api, pod, "replica").await?);
        }
        let mut args = vec![
            "-n",
            FAULTS_NS,
            "exec",
            &self.pod,
            "--",
            "/usr/local/bin/lockstep-e2e-tool",
            "signal",
            "KILL",
        ];
        args.extend(ids.iter().map(String::as_str));
        kubectl(&args).map(|_| ())
    }
}

/// A kustomize overlay of `manifests/` (in `target/e2e-overlay/`) that points the operator at
/// the images under test — what a user does to pin images. Returns its directory relative to
/// the repository root.
pub fn install_overlay(images: &Images) -> anyhow::Result<String> {
    let dir = repo().join("target").join("e2e-overlay");
    std::fs::create_dir_all(&dir).context("creating target/e2e-overlay")?;
    let (name, tag) = images.operator.rsplit_once(':').unwrap_or((&images.operator, "latest"));
    let kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n\
         kind: Kustomization\n\
         resources:\n  - ../../manifests\n\
         images:\n  - name: ghcr.io/lockstep-dev/lockstep-operator\n    newName: {name}\n    newTag: {tag}\n\
         patches:\n  - target: {{kind: Deployment, name: lockstep-operator}}\n    patch: |-\n      \
         - op: add\n        path: /spec/template/spec/containers/0/env/-\n        \
         value: {{name: LOCKSTEP_REPLICA_IMAGE, value: \"{}\"}}\n{}",
        images.replica,
        build_annotation_patch()
    );
    std::fs::write(dir.join("kustomization.yaml"), kustomization).context("writing the overlay")?;
    Ok("target/e2e-overlay".into())
}

/// With `LOCKSTEP_E2E_BUILD` set (e2e/run.sh sets it to a hash of the binaries in the images),
/// a pod-template annotation carrying it: an image rebuilt under the same tag then rolls the
/// operator's pods, so a second run on one cluster never tests the previous build's operator.
fn build_annotation_patch() -> String {
    match std::env::var("LOCKSTEP_E2E_BUILD") {
        Ok(build) if !build.is_empty() => format!(
            "      - op: add\n        path: /spec/template/metadata/annotations\n        \
             value: {{lockstep.dev/e2e-build: \"{build}\"}}\n"
        ),
        _ => String::new(),
    }
}

/// Installs the CRD and the operator as the README says (`kubectl apply --server-side -k`),
/// through [`install_overlay`], and waits until the operator is available. Idempotent.
pub fn install_operator(images: &Images) -> anyhow::Result<()> {
    let overlay = install_overlay(images)?;
    kubectl(&["apply", "--server-side", "--force-conflicts", "-k", &overlay])?;
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/replicatedstatemachines.lockstep.dev",
        "--timeout=60s",
    ])?;
    kubectl(&[
        "-n",
        OPERATOR_NS,
        "rollout",
        "status",
        "deployment/lockstep-operator",
        "--timeout=300s",
    ])?;
    Ok(())
}

/// The operator pod holding the leader Lease.
pub fn operator_leader() -> anyhow::Result<String> {
    let holder = kubectl(&[
        "-n",
        OPERATOR_NS,
        "get",
        "lease",
        "lockstep-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    if holder.trim().is_empty() {
        bail!("no operator holds the lease");
    }
    Ok(holder.trim().to_string())
}

/// The operator leader's `/metrics` text, through the API server's pod proxy (what a
/// Prometheus in the cluster would scrape).
pub fn operator_metrics() -> anyhow::Result<String> {
    operator_metrics_of(&operator_leader()?)
}

/// `/metrics` of the operator pod `leader` (see [`operator_metrics`]).
pub fn operator_metrics_of(leader: &str) -> anyhow::Result<String> {
    kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{OPERATOR_NS}/pods/{leader}:8080/proxy/metrics"),
    ])
}

/// The value of the operator's per-RSM gauge `metric` for `namespace`/`name` in a scrape.
pub fn rsm_gauge(scrape: &str, metric: &str, namespace: &str, name: &str) -> Option<f64> {
    let ns = format!("namespace=\"{namespace}\"");
    let nm = format!("name=\"{name}\"");
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| l.contains(&ns) && l.contains(&nm))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrapes the operator's `/metrics` in the background until dropped, keeping every
/// (degraded, epoch) pair of one RSM's gauges in the order seen.
pub struct GaugeRecorder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, f64)>>>,
}

impl GaugeRecorder {
    pub fn start(namespace: &str, name: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, nm, flag) = (namespace.to_string(), name.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seen: Vec<(f64, f64)> = Vec::new();
            // Looked up once, and again only when a scrape fails (the leader moved).
            let mut leader = operator_leader().ok();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if leader.is_none() {
                    leader = operator_leader().ok();
                }
                let scrape = leader.as_deref().map(operator_metrics_of);
                if let Some(Ok(text)) = scrape {
                    let degraded = rsm_gauge(&text, "lockstep_operator_rsm_degraded", &ns, &nm);
                    let epoch = rsm_gauge(&text, "lockstep_operator_rsm_epoch", &ns, &nm);
                    if let (Some(d), Some(e)) = (degraded, epoch)
                        && seen.last() != Some(&(d, e))
                    {
                        seen.push((d, e));
                    }
                } else {
                    leader = None; // moved: look it up again
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            seen
        });
        GaugeRecorder {
            stop,
            thread: Some(thread),
        }
    }

    /// Every distinct (degraded, epoch) seen, in order.
    pub fn finish(mut self) -> Vec<(f64, f64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

/// A `lockstep bench` load with its history recorded, running inside the cluster until the
/// test stops it (SIGINT: the bench finishes in-flight operations, then writes its report and
/// history).
pub struct Load<'a> {
    tools: &'a ToolsPod,
    child: std::process::Child,
    history: String,
}

/// What a load saw.
pub struct LoadOutcome {
    pub report: String,
    /// `lockstep-check`'s verdict (the check passed when this exists).
    pub check: String,
    /// The recorded history, one JSON object per line.
    pub history: String,
}

impl<'a> Load<'a> {
    /// `lockstep -c SERVICE:7000 bench --mix mixed` with `clients` clients over `keys` keys.
    pub fn start(tools: &'a ToolsPod, service: &str, clients: usize, keys: usize, name: &str) -> anyhow::Result<Self> {
        let history = format!("/work/{name}.jsonl");
        let target = format!("{service}:7000");
        let clients = clients.to_string();
        let keys = keys.to_string();
        let child = tools.spawn(&[
            "lockstep",
            "-c",
            &target,
            "bench",
            "--clients",
            &clients,
            "--keys",
            &keys,
            "--duration",
            "1800",
            "--mix",
            "mixed",
            "--history",
            &history,
        ])?;
        Ok(Self { tools, child, history })
    }

    /// Stops the load, waits for its report, and checks the history with `lockstep-check`.
    pub fn finish(self) -> anyhow::Result<LoadOutcome> {
        self.tools.exec(&["lockstep-e2e-tool", "pkill", "INT", "bench"])?;
        let out = self.child.wait_with_output().context("waiting for the load")?;
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("the load failed: {report}{}", String::from_utf8_lossy(&out.stderr));
        }
        let check = self
            .tools
            .exec(&["lockstep-check", &self.history])
            .context("lockstep-check: the history is not linearizable")?;
        let history = self.tools.exec(&["lockstep-e2e-tool", "cat", &self.history])?;
        Ok(LoadOutcome { report, check, history })
    }
}

/// Creates `rsm` in `ns` and waits (as a user would, `kubectl wait`) until it is Ready.
pub async fn create_ready(client: &Client, ns: &str, rsm: &ReplicatedStateMachine) -> Api<ReplicatedStateMachine> {
    let api: Api<ReplicatedStateMachine> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), rsm).await.expect("RSM created");
    kubectl_wait_ready(ns, &kube::ResourceExt::name_any(rsm), Duration::from_secs(300)).expect("Ready");
    api
}
