//! Process-death detection faster than the kubelet's.
//!
//! When a replica process dies (`kill -9`, OOM, a crash) the kubelet notices on its next
//! container relist (about a second) and then reports the pod; only then would the operator
//! reconcile. But the kernel closes every TCP connection of the process at once. So the leader
//! holds one idle HTTP/1.1 keep-alive connection to each running replica's `/healthz` port
//! (a request every [`PING_EVERY`] keeps it from idling out). When the connection ends, the
//! replica's cluster is reconciled at once, and if the replica's admin port now refuses
//! connections, [`crate::translate::classify`] counts it failed: a live process never
//! refuses connections on its own listening port.
//!
//! See docs/operator-design.md ("Detecting a dead replica process").

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use lockstep_resource::ReplicatedStateMachine;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::names;

/// Keep-alive request interval (servers close connections idle for longer than ~30 s).
pub const PING_EVERY: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Trigger = mpsc::UnboundedSender<ObjectRef<ReplicatedStateMachine>>;

/// The watched connections, by pod uid.
pub struct Liveness {
    trigger: Trigger,
    watching: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Pods whose established connection was closed by the other side.
    lost: Arc<Mutex<HashSet<String>>>,
}

impl Liveness {
    /// The detector and the stream of clusters to reconcile because a connection ended.
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<ObjectRef<ReplicatedStateMachine>>) {
        let (trigger, rx) = mpsc::unbounded_channel();
        let me = Liveness {
            trigger,
            watching: Mutex::default(),
            lost: Arc::default(),
        };
        (Arc::new(me), rx)
    }

    /// True when the operator held a connection to this pod's replica and the replica closed
    /// it (its process is most likely gone; the admin call decides).
    pub fn connection_lost(&self, rsm: &ReplicatedStateMachine, pod: &Pod) -> bool {
        lock(&self.lost).contains(&key(rsm, pod))
    }

    /// The replica answered: whatever ended the last connection, it is alive; watch it again.
    pub fn answered(&self, rsm: &ReplicatedStateMachine, pod: &Pod) {
        lock(&self.lost).remove(&key(rsm, pod));
    }

    /// Watch every running replica pod of `rsm` not yet watched; stop watching pods of `rsm`
    /// that are no longer listed.
    pub fn watch(&self, rsm: &ReplicatedStateMachine, pods: &[Pod]) {
        let rsm_ref = ObjectRef::from_obj(rsm);
        let prefix = format!("{}/{}/", rsm.namespace().unwrap_or_default(), rsm.name_any());
        let mut watching = lock(&self.watching);
        let listed: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
        watching.retain(|key, task| {
            let keep = !key.starts_with(&prefix) || listed.contains(&key[prefix.len()..]);
            if !keep {
                task.abort();
            }
            keep
        });
        lock(&self.lost).retain(|key| !key.starts_with(&prefix) || listed.contains(&key[prefix.len()..]));
        for pod in pods {
            let (Some(uid), Some(ip)) = (pod.uid(), running_ip(pod)) else {
                continue;
            };
            let key = format!("{prefix}{uid}");
            if watching.contains_key(&key) || lock(&self.lost).contains(&key) {
                continue;
            }
            let addr = if ip.contains(':') {
                format!("[{ip}]:{}", names::HTTP_PORT)
            } else {
                format!("{ip}:{}", names::HTTP_PORT)
            };
            let task = tokio::spawn(hold(
                addr,
                key.clone(),
                rsm_ref.clone(),
                self.trigger.clone(),
                self.lost.clone(),
            ));
            watching.insert(key, task.abort_handle());
        }
        // Finished tasks (connection ended or never opened) are watched again next time.
        watching.retain(|_, t| !t.is_finished());
    }
}

fn key(rsm: &ReplicatedStateMachine, pod: &Pod) -> String {
    format!(
        "{}/{}/{}",
        rsm.namespace().unwrap_or_default(),
        rsm.name_any(),
        pod.uid().unwrap_or_default()
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn running_ip(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some() || status.phase.as_deref() != Some("Running") {
        return None;
    }
    status.pod_ip.clone().filter(|ip| !ip.is_empty())
}

/// Holds one connection until it ends; if it ended from the replica's side, marks the pod
/// and triggers a reconcile of its cluster. A connection that cannot be opened is not news
/// (the replica may still be starting): the next reconcile tries again.
async fn hold(
    addr: String,
    key: String,
    rsm: ObjectRef<ReplicatedStateMachine>,
    trigger: Trigger,
    lost: Arc<Mutex<HashSet<String>>>,
) {
    let Ok(Ok(stream)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await else {
        return;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
        return;
    };
    let pings = async move {
        loop {
            tokio::time::sleep(PING_EVERY).await;
            let req = hyper::Request::get("/healthz")
                .header(hyper::header::HOST, addr.as_str())
                .body(Empty::<Bytes>::new());
            let Ok(req) = req else { return };
            if sender.send_request(req).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = conn => {}
        () = pings => {}
    }
    tracing::debug!(pod = %key, "connection to a replica ended");
    lock(&lost).insert(key);
    let _ = trigger.send(rsm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;

    fn pod(uid: &str, ip: &str) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                uid: Some(uid.into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_running_pods_with_an_ip_are_watched() {
        assert_eq!(running_ip(&pod("u", "10.0.0.1")).as_deref(), Some("10.0.0.1"));
        let mut pending = pod("u", "");
        assert_eq!(running_ip(&pending), None);
        if let Some(s) = pending.status.as_mut() {
            s.phase = Some("Pending".into());
        }
        assert_eq!(running_ip(&pending), None);
    }

    /// A real socket: a server that accepts one connection and closes it when told, as the
    /// kernel does for a killed process.
    #[tokio::test]
    async fn a_closed_connection_triggers_a_reconcile_and_marks_the_pod() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let _ = close_rx.await;
            drop(s);
        });
        let (live, mut rx) = Liveness::new();
        let rsm: ReplicatedStateMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicatedStateMachine",
            "metadata": {"name": "kv", "namespace": "ns"},
            "spec": {"faultsTolerated": 1, "failureModel": "FailStop", "machine": {"name": "kv", "version": "1.0.0"}}
        }))
        .expect("an RSM");
        let p = pod("uid-1", "10.0.0.1");
        let task = tokio::spawn(hold(
            addr,
            key(&rsm, &p),
            ObjectRef::from_obj(&rsm),
            live.trigger.clone(),
            live.lost.clone(),
        ));
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "nothing while the connection is open");
        close_tx.send(()).expect("close");
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("in time");
        assert_eq!(got.map(|r| r.name), Some("kv".to_string()));
        assert!(live.connection_lost(&rsm, &p));
        live.answered(&rsm, &p);
        assert!(!live.connection_lost(&rsm, &p), "an answer clears it");
        task.await.expect("task ends");
    }
}
