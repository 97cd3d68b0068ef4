//! Where one write's time goes: timestamps of each client write at the primary, kept by
//! index, turned into `lockstep_replica_write_stage_seconds{stage}` observations once the
//! write is applied (and, for `reply`, once its handler answers).
//!
//! The node never reads the clock: the I/O shell (server, storage callback, replication
//! tasks) passes `now` in, under the node lock it already holds. Entries of one storage batch
//! or one Append share that batch's timestamps; every committed client write gets one
//! observation per stage. Timestamps live in a ring of [`RING`] slots tagged with their
//! index, allocated once on the first write: no allocation per entry, and a write that stays
//! in flight while [`RING`] newer ones are ordered is simply not observed.
//!
//! Before the handler: `receive` (the request's headers reached our gRPC service stack ->
//! the Execute handler entered: the rest of the body, tonic's decoding, the authorization
//! layer), stamped by [`StampArrivalLayer`] and observed for every Execute.
//!
//! At the primary, the stages of one write in order (they add up to the Execute handler's
//! time): `validate` (handler entered -> validated and ordered into the log, including the wait
//! for the node lock), `queue` (ordered -> the storage thread starts the batch holding it),
//! `local_fsync` (batch started -> written and fsynced), `commit_wait` (durable here ->
//! committed, i.e. durable on every voter: the wait for the backups beyond the local fsync),
//! `apply` (committed -> applied and the reply handed to the handler), `reply` (applied -> the
//! handler returns the response). Beside them, on the parallel path: `replicate` (first sent to
//! a backup in an Append -> the last voter's acknowledgement covering it). On a backup:
//! `backup_append` (Append handler entered -> entries durable, ack returned), per Append that
//! carried entries.

use crate::metrics::Metrics;
use std::time::Instant;

/// In-flight writes whose timestamps are kept.
pub const RING: usize = 4096;

/// The stages, in the order of a write's life (`Replicate` runs beside `Queue` ..
/// `CommitWait`; `BackupAppend` is measured on backups).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Receive,
    Validate,
    Queue,
    LocalFsync,
    Replicate,
    CommitWait,
    Apply,
    Reply,
    BackupAppend,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Receive,
        Stage::Validate,
        Stage::Queue,
        Stage::LocalFsync,
        Stage::Replicate,
        Stage::CommitWait,
        Stage::Apply,
        Stage::Reply,
        Stage::BackupAppend,
    ];

    /// The stages a primary's [`StageClock`] records for every committed client write
    /// (`Validate` to `Reply`; `Receive` is observed by the unary Execute handler itself, and
    /// not for writes that arrive in a client session, which carry no headers of their own).
    pub fn of_primary() -> &'static [Stage] {
        &Self::ALL[1..8]
    }

    /// The `stage` label.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Receive => "receive",
            Stage::Validate => "validate",
            Stage::Queue => "queue",
            Stage::LocalFsync => "local_fsync",
            Stage::Replicate => "replicate",
            Stage::CommitWait => "commit_wait",
            Stage::Apply => "apply",
            Stage::Reply => "reply",
            Stage::BackupAppend => "backup_append",
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Stamps {
    /// The log index these stamps belong to (0: the slot is free).
    index: u64,
    received: Option<Instant>,
    ordered: Option<Instant>,
    batch_started: Option<Instant>,
    durable: Option<Instant>,
    sent: Option<Instant>,
    acked: Option<Instant>,
    committed: Option<Instant>,
    applied: Option<Instant>,
}

/// When a request's headers reached the gRPC service stack (in its extensions).
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

/// Puts [`Arrived`] into every request's extensions, first thing in the service stack.
#[derive(Clone, Copy, Debug, Default)]
pub struct StampArrivalLayer;

impl<S> tower::Layer<S> for StampArrivalLayer {
    type Service = StampArrival<S>;
    fn layer(&self, inner: S) -> StampArrival<S> {
        StampArrival(inner)
    }
}

#[derive(Clone, Debug)]
pub struct StampArrival<S>(S);

impl<S, B> tower::Service<http::Request<B>> for StampArrival<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        request.extensions_mut().insert(Arrived(Instant::now()));
        self.0.call(request)
    }
}

/// Timestamps of the client writes in flight at the primary.
#[derive(Default)]
pub struct StageClock {
    ring: Vec<Stamps>,
    /// Highest index stamped for each event (walks start above them).
    durable: u64,
    acked: u64,
    committed: u64,
    applied: u64,
}

impl StageClock {
    fn slot(&mut self, index: u64) -> Option<&mut Stamps> {
        let len = self.ring.len() as u64;
        if len == 0 || index == 0 {
            return None;
        }
        let s = &mut self.ring[(index % len) as usize];
        (s.index == index).then_some(s)
    }

    /// Run `f` on the stamps of every tracked index in `(from, to]` (the newest `RING` of them).
    fn each(&mut self, from: u64, to: u64, mut f: impl FnMut(&mut Stamps)) {
        let from = from.max(to.saturating_sub(RING as u64));
        for index in from + 1..=to {
            if let Some(s) = self.slot(index) {
                f(s);
            }
        }
    }

    /// A client write was ordered at `index`: its handler started at `received`.
    pub fn ordered(&mut self, index: u64, received: Instant, now: Instant) {
        if self.ring.is_empty() {
            self.ring = vec![Stamps::default(); RING];
        }
        // A log cut back (a new epoch) makes indexes count again: so do the walks.
        let below = index.saturating_sub(1);
        for mark in [
            &mut self.durable,
            &mut self.acked,
            &mut self.committed,
            &mut self.applied,
        ] {
            *mark = (*mark).min(below);
        }
        self.ring[(index % RING as u64) as usize] = Stamps {
            index,
            received: Some(received),
            ordered: Some(now),
            ..Default::default()
        };
    }

    /// Entries up to `index` sit in one of the first Appends sent to a backup.
    pub fn sent(&mut self, from: u64, to: u64, now: Instant) {
        self.each(from.saturating_sub(1), to, |s| {
            s.sent.get_or_insert(now);
        });
    }

    /// The storage thread made everything up to `index` durable in a batch it began at
    /// `started`.
    pub fn durable(&mut self, index: u64, started: Instant, now: Instant) {
        self.each(self.durable, index, |s| {
            s.batch_started = Some(started);
            s.durable = Some(now);
        });
        self.durable = self.durable.max(index);
    }

    /// Every voter has acknowledged everything up to `index`.
    pub fn acked(&mut self, index: u64, now: Instant) {
        self.each(self.acked, index, |s| s.acked = Some(now));
        self.acked = self.acked.max(index);
    }

    /// The commit index reached `index`.
    pub fn committed(&mut self, index: u64, now: Instant) {
        self.each(self.committed, index, |s| s.committed = Some(now));
        self.committed = self.committed.max(index);
    }

    /// Everything up to `index` is applied: observe all stages but `reply`.
    pub fn applied(&mut self, index: u64, now: Instant, metrics: &Metrics) {
        self.each(self.applied, index, |s| {
            s.applied = Some(now);
            let stage = |name: Stage, from: Option<Instant>, to: Option<Instant>| {
                if let (Some(a), Some(b)) = (from, to) {
                    metrics.observe_stage(name, b.saturating_duration_since(a));
                }
            };
            stage(Stage::Validate, s.received, s.ordered);
            stage(Stage::Queue, s.ordered, s.batch_started);
            stage(Stage::LocalFsync, s.batch_started, s.durable);
            stage(Stage::Replicate, s.sent, s.acked);
            stage(Stage::CommitWait, s.durable, s.committed);
            stage(Stage::Apply, s.committed, s.applied);
        });
        self.applied = self.applied.max(index);
    }

    /// The handler of the write at `index` is about to answer: observe `reply` and free the
    /// slot.
    pub fn replied(&mut self, index: u64, now: Instant, metrics: &Metrics) {
        if let Some(s) = self.slot(index) {
            if let Some(applied) = s.applied {
                metrics.observe_stage(Stage::Reply, now.saturating_duration_since(applied));
            }
            *s = Stamps::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn count(text: &str, stage: &str) -> u64 {
        let key = format!(r#"lockstep_replica_write_stage_seconds_count{{stage="{stage}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |v| v.trim().parse().expect("a count"))
    }

    #[test]
    fn every_stage_of_an_applied_write_is_observed_once() {
        let m = Metrics::default();
        let mut c = StageClock::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for index in 5..=7 {
            c.ordered(index, at(0), at(1));
        }
        c.sent(5, 7, at(2));
        c.durable(7, at(2), at(3));
        c.acked(6, at(4));
        c.committed(6, at(4));
        c.applied(6, at(5), &m);
        c.replied(5, at(6), &m);
        c.replied(6, at(6), &m);
        let text = m.encode();
        for stage in Stage::of_primary() {
            assert_eq!(count(&text, stage.name()), 2, "{stage:?}: {text}");
        }
        // Index 7 finishes later; the walk does not observe 5 and 6 again.
        c.acked(7, at(8));
        c.committed(7, at(8));
        c.applied(7, at(9), &m);
        c.replied(7, at(9), &m);
        let text = m.encode();
        assert_eq!(count(&text, "apply"), 3, "{text}");
        assert_eq!(count(&text, "reply"), 3, "{text}");
        // 1 ms of validate each, 5 ms of commit wait for index 7.
        assert!(
            text.contains(r#"lockstep_replica_write_stage_seconds_sum{stage="validate"} 0.003"#),
            "{text}"
        );
    }

    #[test]
    fn a_new_epoch_reusing_indexes_is_stamped_again() {
        let m = Metrics::default();
        let mut c = StageClock::default();
        let t = Instant::now();
        c.ordered(10, t, t);
        c.durable(10, t, t);
        c.committed(10, t);
        c.applied(10, t, &m);
        // The log was cut back: index 9 is ordered again and must still be seen.
        c.ordered(9, t, t);
        c.durable(9, t, t);
        c.committed(9, t);
        c.applied(9, t, &m);
        assert_eq!(count(&m.encode(), "apply"), 2);
    }
}
