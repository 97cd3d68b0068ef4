//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

/// Byzantine mode: evidence `reporter` holds against `replica` of resource `namespace/name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvidenceLabel {
    pub namespace: String,
    pub name: String,
    pub replica: String,
    pub kind: String,
    pub reporter: String,
}

/// `byzantine_evidence`, with the label sets last published per RSM, so that those of
/// replicas that are gone (replaced, or their reporter is) and of deleted RSMs are dropped
/// instead of being exported until the operator restarts.
#[derive(Default)]
pub struct EvidenceGauges {
    pub family: Family<EvidenceLabel, Gauge>,
    published: std::sync::Mutex<std::collections::HashMap<(String, String), std::collections::HashSet<EvidenceLabel>>>,
}

impl EvidenceGauges {
    /// The evidence of RSM `namespace/name` now: every label set given is set, every one
    /// published before for it and not given now is removed.
    pub fn record(&self, namespace: &str, name: &str, now: impl IntoIterator<Item = (EvidenceLabel, i64)>) {
        let mut current = std::collections::HashSet::new();
        for (labels, count) in now {
            self.family.get_or_create(&labels).set(count);
            current.insert(labels);
        }
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let before = published.insert((namespace.to_string(), name.to_string()), current);
        let current = &published[&(namespace.to_string(), name.to_string())];
        for gone in before.unwrap_or_default().difference(current) {
            self.family.remove(gone);
        }
    }

    /// Drop every label set of an RSM for which `exists(namespace, name)` is false.
    pub fn retain(&self, exists: impl Fn(&str, &str) -> bool) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        published.retain(|(ns, name), labels| {
            let keep = exists(ns, name);
            if !keep {
                for l in labels.iter() {
                    self.family.remove(l);
                }
            }
            keep
        });
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub errors: Counter,
    pub duration: Histogram,
    pub actions: Family<ActionLabel, Counter>,
    pub replacements: Counter,
    pub rollouts_started: Counter,
    pub rollouts_completed: Counter,
    pub status_conflicts: Counter,
    pub leader: Gauge,
    /// Requests this process sent to the API server (a watch counts once, when it starts).
    pub api_requests: Family<MethodLabel, Counter>,
    /// Resident set size, read from /proc when /metrics is scraped.
    pub resident_memory: Gauge,
    pub byzantine_evidence: EvidenceGauges,
    /// Per-RSM gauges (`rsm_*{namespace, name}`).
    pub rsm: crate::rsm_metrics::RsmGauges,
}

impl Default for Metrics {
    /// Every metric at zero, registered under `lockstep_operator_` in the order `/metrics`
    /// lists them: Byzantine evidence, reconciliation, changes made, then the operator
    /// itself, and last the per-RSM gauges.
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("lockstep_operator"),
            reconciles: Family::<ResultLabel, Counter>::default(),
            errors: Counter::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            actions: Family::<ActionLabel, Counter>::default(),
            replacements: Counter::default(),
            rollouts_started: Counter::default(),
            rollouts_completed: Counter::default(),
            status_conflicts: Counter::default(),
            leader: Gauge::default(),
            api_requests: Family::<MethodLabel, Counter>::default(),
            resident_memory: Gauge::default(),
            byzantine_evidence: EvidenceGauges::default(),
            rsm: crate::rsm_metrics::RsmGauges::default(),
        };
        m.register_evidence();
        m.register_reconciliation();
        m.register_changes();
        m.register_operator();
        m.rsm.register(&mut m.registry);
        m
    }
}

impl Metrics {
    /// Byzantine mode: what replicas report against each other.
    fn register_evidence(&mut self) {
        self.registry.register(
            "byzantine_evidence",
            "Byzantine mode: evidence (bad signatures, refused relays, equivocation, corrupt snapshots) one replica reports against another",
            self.byzantine_evidence.family.clone(),
        );
    }

    /// How reconciliations went: by result, the failed ones, and how long each took.
    fn register_reconciliation(&mut self) {
        let r = &mut self.registry;
        r.register(
            "reconciles",
            "Reconciliations by result (ok, error)",
            self.reconciles.clone(),
        );
        r.register("reconcile_errors", "Reconciliations that failed", self.errors.clone());
        r.register(
            "reconcile_duration_seconds",
            "Duration of one reconciliation",
            self.duration.clone(),
        );
    }

    /// What the operator changed in the clusters: planner actions, replacements, rollouts.
    fn register_changes(&mut self) {
        let r = &mut self.registry;
        r.register("actions", "Planner actions carried out, by kind", self.actions.clone());
        r.register(
            "replacements",
            "Fail-stopped replicas fenced out and replaced",
            self.replacements.clone(),
        );
        r.register(
            "rollouts_started",
            "Lockstep rollouts started",
            self.rollouts_started.clone(),
        );
        r.register(
            "rollouts_completed",
            "Lockstep rollouts completed",
            self.rollouts_completed.clone(),
        );
    }

    /// The operator process itself: its status writes, leader lease, API requests, memory.
    fn register_operator(&mut self) {
        let r = &mut self.registry;
        r.register(
            "status_conflicts",
            "Status writes refused by optimistic concurrency (409)",
            self.status_conflicts.clone(),
        );
        r.register(
            "leader",
            "1 when this instance holds the leader lease",
            self.leader.clone(),
        );
        r.register(
            "kube_api_requests",
            "Requests sent to the Kubernetes API server, by HTTP method (a watch counts once)",
            self.api_requests.clone(),
        );
        r.register(
            "resident_memory_bytes",
            "Resident memory of the operator process",
            self.resident_memory.clone(),
        );
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss);
        }
        self.rsm.refresh();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// A layer for the kube client that counts every request by method.
    pub fn api_request_layer(
        self: &std::sync::Arc<Self>,
    ) -> tower::util::MapRequestLayer<
        impl Fn(http::Request<kube::client::Body>) -> http::Request<kube::client::Body> + Clone + use<>,
    > {
        let metrics = self.clone();
        tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
            metrics
                .api_requests
                .get_or_create(&MethodLabel {
                    method: req.method().as_str().to_string(),
                })
                .inc();
            req
        })
    }

    pub fn action(&self, name: &str) {
        self.actions.get_or_create(&ActionLabel { action: name.into() }).inc();
    }
}

/// Resident set size of this process in bytes (Linux: /proc/self/statm).
fn resident_memory_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(name: &str, replica: &str, reporter: &str) -> EvidenceLabel {
        EvidenceLabel {
            namespace: "ns".into(),
            name: name.into(),
            replica: replica.into(),
            kind: "corrupt-snapshot".into(),
            reporter: reporter.into(),
        }
    }

    fn exported(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).expect("encode");
        out.lines()
            .filter(|l| l.starts_with("lockstep_operator_byzantine_evidence{"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Evidence about a replica that is gone stops being exported at the next publish, and
    /// all of a deleted RSM's at the next prune.
    #[test]
    fn evidence_of_replicas_and_rsms_that_are_gone_is_dropped() {
        let m = Metrics::default();
        let e = &m.byzantine_evidence;
        e.record(
            "ns",
            "a",
            [(label("a", "a-1", "a-0"), 3), (label("a", "a-2", "a-0"), 1)],
        );
        e.record("ns", "b", [(label("b", "b-1", "b-0"), 2)]);
        let out = exported(&m);
        assert!(
            out.contains("replica=\"a-1\"") && out.contains("replica=\"a-2\"") && out.contains("replica=\"b-1\""),
            "{out}"
        );
        e.record("ns", "a", [(label("a", "a-1", "a-0"), 4)]);
        let out = exported(&m);
        assert!(
            out.contains("replica=\"a-1\"") && !out.contains("replica=\"a-2\""),
            "{out}"
        );
        e.retain(|_, name| name != "b");
        let out = exported(&m);
        assert!(
            out.contains("replica=\"a-1\"") && !out.contains("replica=\"b-1\""),
            "{out}"
        );
    }
}
