//! Prometheus metrics of one replica, served on `/metrics`.

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
}

impl Default for Metrics {
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
        };
        m.registry
            .register("commands", "Client commands by result", m.commands.clone());
        m.registry
            .register("reads", "Linearizable reads by result", m.reads.clone());
        m.registry.register(
            "applied_index",
            "Last log index applied to the state machine",
            m.applied_index.clone(),
        );
        m.registry
            .register("commit_index", "Last log index known committed", m.commit_index.clone());
        m.registry
            .register("epoch", "Current configuration epoch", m.epoch.clone());
        m.registry
            .register("is_primary", "1 when this replica is the primary", m.is_primary.clone());
        m.registry
            .register("fsyncs", "fsync calls on the log", m.fsyncs.clone());
        m.registry.register(
            "fsync_seconds",
            "Time spent in one batched log write + fsync",
            m.fsync_seconds.clone(),
        );
        m.registry.register(
            "entries_per_fsync",
            "Log entries made durable by one fsync",
            m.entries_per_fsync.clone(),
        );
        m.registry.register("snapshots", "Snapshots taken", m.snapshots.clone());
        m
    }
}

impl Metrics {
    pub fn count_command(&self, result: &str) {
        self.commands
            .get_or_create(&ResultLabel { result: result.into() })
            .inc();
    }
    pub fn count_read(&self, result: &str) {
        self.reads.get_or_create(&ResultLabel { result: result.into() }).inc();
    }
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
