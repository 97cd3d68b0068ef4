//! Prometheus metrics of one replica, served on `/metrics`.

use crate::stages::Stage;
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

pub struct Metrics {
    pub registry: Registry,
    pub commands: Family<ResultLabel, Counter>,
    pub reads: Family<ResultLabel, Counter>,
    pub applied_index: Gauge,
    pub commit_index: Gauge,
    pub epoch: Gauge,
    pub is_primary: Gauge,
    pub fsyncs: Counter,
    pub fsync_seconds: Histogram,
    pub entries_per_fsync: Histogram,
    pub snapshots: Counter,
    /// Calls received from a primary, by method: `Replicate` counts streams (one per primary,
    /// peer and epoch), `Append` and `InstallSnapshot` one call per message.
    pub peer_calls: Family<MethodLabel, Counter>,
    /// Client sessions (`Client/Session` streams) opened.
    pub client_sessions: Counter,
    /// Of those, the ones on the framed transport (`crate::framed`), not gRPC.
    pub client_sessions_framed: Counter,
    /// Seconds from receiving a client request to answering it, by method (Execute, Read).
    pub request_seconds: Family<MethodLabel, Histogram>,
    /// `write_stage_seconds{stage}`: one histogram per [`Stage`], created up front (indexed by
    /// the stage) so an observation allocates nothing.
    pub write_stage_seconds: Family<StageLabel, Histogram>,
    stage_histograms: Vec<Histogram>,
    /// Byzantine mode: signed items that arrived after their acceptance window, by sender.
    pub byz_late_items: Family<FromLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FromLabel {
    pub from: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

/// 10 µs .. ~5 s: the stages of one write range from a lock hand-over to a slow fsync.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00001, 2.0, 20))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

/// 100 µs .. ~3.3 s: a commit is one network round trip plus one fsync on every voter.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    /// Every metric, registered under the `lockstep_replica` prefix. `/metrics` lists them in
    /// the order they are registered here.
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("lockstep_replica"),
            commands: Family::default(),
            reads: Family::default(),
            applied_index: Gauge::default(),
            commit_index: Gauge::default(),
            epoch: Gauge::default(),
            is_primary: Gauge::default(),
            fsyncs: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            entries_per_fsync: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            snapshots: Counter::default(),
            peer_calls: Family::default(),
            client_sessions: Counter::default(),
            client_sessions_framed: Counter::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            write_stage_seconds: Family::new_with_constructor(stage_histogram),
            stage_histograms: Vec::new(),
            byz_late_items: Family::default(),
        };
        m.stage_histograms = stage_histograms(&m.write_stage_seconds);
        m.register_results();
        m.register_progress();
        m.register_storage();
        m.register_byzantine();
        m.register_traffic();
        m
    }
}

/// One histogram per [`Stage`], in the stage's order, each created in `family` under its name.
fn stage_histograms(family: &Family<StageLabel, Histogram>) -> Vec<Histogram> {
    Stage::ALL
        .iter()
        .map(|s| family.get_or_create(&StageLabel { stage: s.name().into() }).clone())
        .collect()
}

impl Metrics {
    /// Client commands and reads by result.
    fn register_results(&mut self) {
        self.registry
            .register("commands", "Client commands by result", self.commands.clone());
        self.registry
            .register("reads", "Linearizable reads by result", self.reads.clone());
    }

    /// Where the log and the configuration are: indexes, epoch, role.
    fn register_progress(&mut self) {
        self.registry.register(
            "applied_index",
            "Last log index applied to the state machine",
            self.applied_index.clone(),
        );
        self.registry.register(
            "commit_index",
            "Last log index known committed",
            self.commit_index.clone(),
        );
        self.registry
            .register("epoch", "Current configuration epoch", self.epoch.clone());
        self.registry.register(
            "is_primary",
            "1 when this replica is the primary",
            self.is_primary.clone(),
        );
    }

    /// The storage thread: fsyncs, their latency and batch sizes, snapshots.
    fn register_storage(&mut self) {
        self.registry
            .register("fsyncs", "fsync calls on the log", self.fsyncs.clone());
        self.registry.register(
            "fsync_seconds",
            "Time spent in one batched log write + fsync",
            self.fsync_seconds.clone(),
        );
        self.registry.register(
            "entries_per_fsync",
            "Log entries made durable by one fsync",
            self.entries_per_fsync.clone(),
        );
        self.registry
            .register("snapshots", "Snapshots taken", self.snapshots.clone());
    }

    /// Byzantine mode only: items that arrived too late.
    fn register_byzantine(&mut self) {
        self.registry.register(
            "byz_late_items",
            "Byzantine mode: signed items ignored because they arrived after their acceptance window, by \
             sender (a client's identity or a replica): the delay bound did not hold for them",
            self.byz_late_items.clone(),
        );
    }

    /// Calls received (client sessions, replication calls) and how long requests and the
    /// stages of a write take.
    fn register_traffic(&mut self) {
        self.registry.register(
            "client_sessions",
            "Client sessions opened (one stream carrying a client's Executes and Reads)",
            self.client_sessions.clone(),
        );
        self.registry.register(
            "client_sessions_framed",
            "Client sessions opened on the framed transport (of client_sessions; the rest are gRPC streams)",
            self.client_sessions_framed.clone(),
        );
        self.registry.register(
            "peer_calls",
            "Replication calls received from a primary, by method (ReplicateFramed, Replicate: streams opened, framed or gRPC)",
            self.peer_calls.clone(),
        );
        self.registry.register(
            "request_seconds",
            "Client request latency by method (Execute, Read), including rejected requests",
            self.request_seconds.clone(),
        );
        self.registry.register(
            "write_stage_seconds",
            "Time one client write spends in each stage (docs/benchmarks.md, \"Where the time goes\"). \
             Primary, one observation per committed write (writes of one batch share its timestamps), \
             in order: validate, queue, local_fsync, commit_wait, apply, reply; replicate runs beside \
             queue..commit_wait (first sent to a backup -> last voter's ack). Backup: backup_append, one \
             observation per Append carrying entries (received -> durable -> ack)",
            self.write_stage_seconds.clone(),
        );
    }
}

impl Metrics {
    pub fn count_command(&self, result: &str) {
        self.commands
            .get_or_create(&ResultLabel { result: result.into() })
            .inc();
    }
    pub fn count_peer_call(&self, method: &str) {
        self.peer_calls
            .get_or_create(&MethodLabel { method: method.into() })
            .inc();
    }
    pub fn count_read(&self, result: &str) {
        self.reads.get_or_create(&ResultLabel { result: result.into() }).inc();
    }
    pub fn observe_request(&self, method: &str, took: std::time::Duration) {
        self.request_seconds
            .get_or_create(&MethodLabel { method: method.into() })
            .observe(took.as_secs_f64());
    }
    /// One more late item from `from` (Byzantine mode).
    pub fn late_item(&self, from: &str) {
        self.byz_late_items
            .get_or_create(&FromLabel { from: from.to_string() })
            .inc();
    }

    /// One durable batch of the storage thread: `written` entries (none: no fsync), `took`
    /// for the write + fsync.
    pub fn observe_batch(&self, written: usize, took: std::time::Duration) {
        if written > 0 {
            self.fsyncs.inc();
            self.fsync_seconds.observe(took.as_secs_f64());
            self.entries_per_fsync.observe(written as f64);
        }
    }
    pub fn observe_stage(&self, stage: Stage, took: std::time::Duration) {
        self.stage_histograms[stage as usize].observe(took.as_secs_f64());
    }
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn request_latency_is_a_histogram_per_method() {
        let m = Metrics::default();
        m.observe_request("Execute", Duration::from_millis(3));
        m.observe_request("Execute", Duration::from_secs(10));
        m.observe_request("Read", Duration::from_micros(50));
        let text = m.encode();
        assert!(
            text.contains("# TYPE lockstep_replica_request_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_replica_request_seconds_count{method="Execute"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_replica_request_seconds_count{method="Read"} 1"#),
            "{text}"
        );
        // 10 s is past the last bound (3.3 s): only in +Inf.
        let last_finite = text
            .lines()
            .filter(|l| l.starts_with("lockstep_replica_request_seconds_bucket") && l.contains(r#"method="Execute""#))
            .rfind(|l| !l.contains("+Inf"))
            .expect("finite buckets");
        assert!(last_finite.ends_with(" 1"), "{last_finite}");
        assert!(
            text.contains(r#"lockstep_replica_request_seconds_bucket{le="+Inf",method="Execute"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn indexes_and_fsync_latency_are_exported() {
        let m = Metrics::default();
        m.commit_index.set(7);
        m.applied_index.set(5);
        m.fsync_seconds.observe(0.002);
        let text = m.encode();
        assert!(text.contains("lockstep_replica_commit_index 7"), "{text}");
        assert!(text.contains("lockstep_replica_applied_index 5"), "{text}");
        assert!(
            text.contains("# TYPE lockstep_replica_fsync_seconds histogram"),
            "{text}"
        );
        assert!(text.contains("lockstep_replica_fsync_seconds_count 1"), "{text}");
    }
}
