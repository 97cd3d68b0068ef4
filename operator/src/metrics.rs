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
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lockstep_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let errors = Counter::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let actions = Family::<ActionLabel, Counter>::default();
        let replacements = Counter::default();
        let rollouts_started = Counter::default();
        let rollouts_completed = Counter::default();
        let status_conflicts = Counter::default();
        let leader = Gauge::default();
        let api_requests = Family::<MethodLabel, Counter>::default();
        let resident_memory = Gauge::default();
        let byzantine_evidence = EvidenceGauges::default();
        registry.register(
            "byzantine_evidence",
            "Byzantine mode: evidence (bad signatures, refused relays, equivocation, corrupt snapshots) one replica reports against another",
            byzantine_evidence.family.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciliations by result (ok, error)",
            reconciles.clone(),
        );
        registry.register("reconcile_errors", "Reconciliations that failed", errors.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconciliation",
            duration.clone(),
        );
        registry.register("actions", "Planner actions carried out, by kind", actions.clone());
        registry.register(
            "replacements",
            "Fail-stopped replicas fenced out and replaced",
            replacements.clone(),
        );
        registry.register(
            "rollouts_started",
            "Lockstep rollouts started",
            rollouts_started.clone(),
        );
        registry.register(
            "rollouts_completed",
            "Lockstep rollouts completed",
            rollouts_completed.clone(),
        );
        registry.register(
            "status_conflicts",
            "Status writes refused by optimistic concurrency (409)",
            status_conflicts.clone(),
        );
        registry.register("leader", "1 when this instance holds the leader lease", leader.clone());
        registry.register(
            "kube_api_requests",
            "Requests sent to the Kubernetes API server, by HTTP method (a watch counts once)",
            api_requests.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident memory of the operator process",
            resident_memory.clone(),
        );
        let rsm = crate::rsm_metrics::RsmGauges::default();
        rsm.register(&mut registry);
        Self {
            registry,
            reconciles,
            errors,
            duration,
            actions,
            replacements,
            rollouts_started,
            rollouts_completed,
            status_conflicts,
            leader,
            api_requests,
            resident_memory,
            byzantine_evidence,
            rsm,
        }
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
