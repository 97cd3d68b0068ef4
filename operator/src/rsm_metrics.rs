//! Per-RSM gauges (`lockstep_operator_rsm_*{namespace, name}`): what the last status write of
//! each RSM said, so a dashboard or alert sees one cluster's health without reading the API.
//!
//! Fed from the status the operator writes ([`RsmGauges::record`]); label sets of RSMs that
//! no longer exist are dropped by [`RsmGauges::retain`] (called periodically with the RSM
//! watch cache, since a deleted RSM is never reconciled again).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use lockstep_resource::ReplicatedStateMachineStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RsmLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub name: String,
    /// Staging, Sealing, Replacing, Resuming, or None when no rollout runs.
    pub phase: String,
}

/// What is remembered per RSM between two status writes.
#[derive(Default)]
struct Seen {
    phase: String,
    primary: Option<String>,
    last_failover: Option<Instant>,
}

#[derive(Default)]
pub struct RsmGauges {
    pub desired: Family<RsmLabels, Gauge>,
    pub ready: Family<RsmLabels, Gauge>,
    pub epoch: Family<RsmLabels, Gauge>,
    pub degraded: Family<RsmLabels, Gauge>,
    pub rollout_phase: Family<PhaseLabels, Gauge>,
    pub since_failover: Family<RsmLabels, Gauge>,
    seen: Mutex<HashMap<RsmLabels, Seen>>,
}

impl RsmGauges {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "rsm_desired_replicas",
            "Replicas the RSM asks for (t+1 or 2t+1)",
            self.desired.clone(),
        );
        r.register(
            "rsm_ready_replicas",
            "Voters serving in the current configuration",
            self.ready.clone(),
        );
        r.register(
            "rsm_epoch",
            "Configuration epoch recorded in status",
            self.epoch.clone(),
        );
        r.register(
            "rsm_degraded",
            "1 while the Degraded condition is True",
            self.degraded.clone(),
        );
        r.register(
            "rsm_rollout_phase",
            "1 for the current rollout phase (phase=\"None\" when no rollout runs)",
            self.rollout_phase.clone(),
        );
        r.register(
            "rsm_seconds_since_failover",
            "Seconds since the primary last changed (absent until this operator process saw one)",
            self.since_failover.clone(),
        );
    }

    /// Record the status just written for one RSM.
    pub fn record(&self, namespace: &str, name: &str, status: &ReplicatedStateMachineStatus) {
        let key = RsmLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.desired
            .get_or_create(&key)
            .set(status.desired_replicas.unwrap_or(0).into());
        self.ready
            .get_or_create(&key)
            .set(status.ready_replicas.unwrap_or(0).into());
        self.epoch.get_or_create(&key).set(status.epoch.unwrap_or(0));
        self.degraded.get_or_create(&key).set(i64::from(is_degraded(status)));
        let phase = status.upgrade_phase.clone().unwrap_or_else(|| "None".into());
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = seen.entry(key.clone()).or_default();
        if entry.phase != phase {
            self.rollout_phase.remove(&phase_labels(&key, &entry.phase));
            entry.phase = phase.clone();
        }
        self.rollout_phase.get_or_create(&phase_labels(&key, &phase)).set(1);
        if entry.primary.is_some() && status.primary.is_some() && entry.primary != status.primary {
            entry.last_failover = Some(Instant::now());
        }
        entry.primary = status.primary.clone();
    }

    /// Refresh the time-based gauges (called when /metrics is scraped).
    pub fn refresh(&self) {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (key, entry) in seen.iter() {
            if let Some(at) = entry.last_failover {
                let secs = i64::try_from(at.elapsed().as_secs()).unwrap_or(i64::MAX);
                self.since_failover.get_or_create(key).set(secs);
            }
        }
    }

    /// Drop every label set of an RSM for which `exists(namespace, name)` is false.
    pub fn retain(&self, exists: impl Fn(&str, &str) -> bool) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|key, entry| {
            let keep = exists(&key.namespace, &key.name);
            if !keep {
                self.desired.remove(key);
                self.ready.remove(key);
                self.epoch.remove(key);
                self.degraded.remove(key);
                self.since_failover.remove(key);
                self.rollout_phase.remove(&phase_labels(key, &entry.phase));
            }
            keep
        });
    }
}

fn phase_labels(key: &RsmLabels, phase: &str) -> PhaseLabels {
    PhaseLabels {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        phase: phase.into(),
    }
}

fn is_degraded(status: &ReplicatedStateMachineStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn status(epoch: i64, primary: &str, degraded: bool, phase: Option<&str>) -> ReplicatedStateMachineStatus {
        ReplicatedStateMachineStatus {
            desired_replicas: Some(2),
            ready_replicas: Some(if degraded { 1 } else { 2 }),
            epoch: Some(epoch),
            primary: Some(primary.into()),
            upgrade_phase: phase.map(str::to_string),
            conditions: vec![Condition {
                type_: "Degraded".into(),
                status: if degraded { "True" } else { "False" }.into(),
                reason: "Test".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            }],
            ..Default::default()
        }
    }

    fn encode(g: &RsmGauges) -> String {
        let mut registry = Registry::with_prefix("lockstep_operator");
        g.register(&mut registry);
        g.refresh();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    const KV: &str = r#"{namespace="ns",name="kv"}"#;

    #[test]
    fn gauges_follow_a_fail_over() {
        let g = RsmGauges::default();
        g.record("ns", "kv", &status(1, "kv-0", false, None));
        let text = encode(&g);
        assert!(text.contains(&format!("lockstep_operator_rsm_epoch{KV} 1")), "{text}");
        assert!(
            text.contains(&format!("lockstep_operator_rsm_degraded{KV} 0")),
            "{text}"
        );
        assert!(
            text.contains(&format!("lockstep_operator_rsm_desired_replicas{KV} 2")),
            "{text}"
        );
        assert!(
            !text.contains("rsm_seconds_since_failover{"),
            "no fail-over seen yet: {text}"
        );
        g.record("ns", "kv", &status(2, "kv-0", true, None));
        let text = encode(&g);
        assert!(
            text.contains(&format!("lockstep_operator_rsm_degraded{KV} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("lockstep_operator_rsm_ready_replicas{KV} 1")),
            "{text}"
        );
        g.record("ns", "kv", &status(3, "kv-1", false, None));
        let text = encode(&g);
        assert!(
            text.contains(&format!("lockstep_operator_rsm_degraded{KV} 0")),
            "{text}"
        );
        assert!(text.contains(&format!("lockstep_operator_rsm_epoch{KV} 3")), "{text}");
        assert!(
            text.contains(&format!("lockstep_operator_rsm_seconds_since_failover{KV} 0")),
            "{text}"
        );
    }

    #[test]
    fn one_rollout_phase_at_a_time() {
        let g = RsmGauges::default();
        g.record("ns", "kv", &status(1, "kv-0", false, None));
        g.record("ns", "kv", &status(1, "kv-0", false, Some("Sealing")));
        let text = encode(&g);
        assert!(
            text.contains(r#"lockstep_operator_rsm_rollout_phase{namespace="ns",name="kv",phase="Sealing"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"phase="None"} "#), "{text}");
    }

    #[test]
    fn a_deleted_rsm_leaves_no_series() {
        let g = RsmGauges::default();
        g.record("ns", "kv", &status(1, "kv-0", false, Some("Staging")));
        g.record("ns", "other", &status(4, "other-0", false, None));
        g.record("ns", "kv", &status(2, "kv-1", false, Some("Staging")));
        g.retain(|_, name| name != "kv");
        let text = encode(&g);
        assert!(!text.contains(r#"name="kv""#), "{text}");
        assert!(
            text.contains(r#"lockstep_operator_rsm_epoch{namespace="ns",name="other"} 4"#),
            "{text}"
        );
    }
}
