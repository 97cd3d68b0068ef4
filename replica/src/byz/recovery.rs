//! A Byzantine replica restarted on its data directory, before any era: what it recovered
//! from disk, kept so that it can rebuild its state at any index from its snapshot to the end
//! of its log.
//!
//! After a full-cluster restart the replicas stand at different indexes (each made durable
//! what it had when it stopped), and up to t of them may lie. The configuration master starts
//! a recovery era at the highest index t + 1 of them can rebuild with the same digest
//! (`lockstep::up_byz::recovery_state`); a replica that applied more than that rolls back to
//! it, one that applied less fetches it. The rolled-back entries were never acknowledged by
//! t + 1 replicas that still vouch for them (docs/byzantine.md, "Full-cluster restart").

use crate::machine::MachineFactory;
use crate::runtime::{Runtime, digest};
use crate::storage::Earlier;
use lockstep_proto::{LogEntry, Snapshot};

/// The number of the era recorded in the data dir's era file (`service::ERA_FILE`): the one
/// the replica was in when it stopped. 0 when there is none.
pub fn left_era(path: &std::path::Path) -> anyhow::Result<u64> {
    use anyhow::Context;
    use prost::Message;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let signed = lockstep_proto::SignedEra::decode(bytes.as_slice())
        .with_context(|| format!("{} is not an era", path.display()))?;
    let era = lockstep_proto::Era::decode(signed.era.as_slice())
        .with_context(|| format!("{} holds an undecodable era", path.display()))?;
    Ok(era.number)
}

pub struct RecoveredLog {
    snapshot: Option<Snapshot>,
    entries: Vec<LogEntry>,
    /// The snapshot before `snapshot` and the log from it up to `snapshot`, when the disk
    /// still holds them: states below the newest snapshot can be rebuilt from there.
    earlier: Option<Earlier>,
    factory: MachineFactory,
}

impl RecoveredLog {
    pub fn new(
        snapshot: Option<Snapshot>,
        entries: Vec<LogEntry>,
        earlier: Option<Earlier>,
        factory: MachineFactory,
    ) -> RecoveredLog {
        RecoveredLog {
            snapshot,
            entries,
            earlier,
            factory,
        }
    }

    /// The lowest index the state can be rebuilt at (the earlier snapshot's, or the newest's).
    pub fn from_index(&self) -> u64 {
        self.earlier
            .as_ref()
            .map_or(self.snapshot_index(), |e| e.snapshot.index)
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.index)
    }

    /// The highest (the end of the log).
    pub fn end_index(&self) -> u64 {
        self.entries.last().map_or(self.snapshot_index(), |e| e.index)
    }

    pub fn covers(&self, index: u64) -> bool {
        (self.from_index()..=self.end_index()).contains(&index)
    }

    /// The state at `index`: the newest snapshot at or below it, then the log up to `index`.
    /// None outside [`from_index`, `end_index`].
    pub fn state_at(&self, index: u64) -> anyhow::Result<Option<Snapshot>> {
        if !self.covers(index) {
            return Ok(None);
        }
        match &self.earlier {
            Some(e) if index < self.snapshot_index() => self.rebuild(Some(&e.snapshot), &e.entries, index),
            _ => self.rebuild(self.snapshot.as_ref(), &self.entries, index),
        }
        .map(Some)
    }

    fn rebuild(&self, base: Option<&Snapshot>, entries: &[LogEntry], index: u64) -> anyhow::Result<Snapshot> {
        let mut runtime = Runtime::new((self.factory)());
        if let Some(s) = base {
            runtime
                .restore(&s.data)
                .map_err(|e| anyhow::anyhow!("cannot restore snapshot at index {}: {e}", s.index))?;
        }
        for e in entries.iter().take_while(|e| e.index <= index) {
            runtime.apply(e);
        }
        let data = runtime.snapshot();
        Ok(Snapshot {
            index,
            epoch: 0,
            digest: digest(&data),
            data,
            machine: Some(runtime.applied_by().clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::kv::Kv;
    use lockstep_proto::Command;
    use lockstep_proto::log_entry::Body;

    fn kv() -> Box<dyn crate::machine::StateMachine> {
        Box::new(Kv::default())
    }

    fn put(index: u64, key: &str) -> LogEntry {
        LogEntry {
            index,
            epoch: 1,
            body: Some(Body::Command(Command {
                client_id: "c".into(),
                sequence: index,
                payload: format!(r#"{{"op":"put","key":"{key}","value":"v{index}"}}"#).into_bytes(),
            })),
        }
    }

    fn snapshot_at(runtime: &Runtime, index: u64) -> Snapshot {
        Snapshot {
            index,
            data: runtime.snapshot(),
            ..Default::default()
        }
    }

    /// Every index from the earliest snapshot kept to the end of the log rebuilds the same
    /// state a replica that applied exactly that far holds; outside that range there is
    /// nothing to rebuild.
    #[test]
    fn the_state_at_every_recovered_index_is_the_state_applied_that_far() {
        let all: Vec<LogEntry> = (1..=7).map(|i| put(i, &format!("k{i}"))).collect();
        let mut applied = Runtime::new(kv());
        let mut digests = vec![digest(&applied.snapshot())];
        let mut snapshots = Vec::new();
        for e in &all {
            applied.apply(e);
            digests.push(digest(&applied.snapshot()));
            if e.index == 1 || e.index == 3 {
                snapshots.push(snapshot_at(&applied, e.index));
            }
        }
        let earlier = Earlier {
            snapshot: snapshots[0].clone(),
            entries: all[1..3].to_vec(),
        };
        let without = RecoveredLog::new(Some(snapshots[1].clone()), all[3..].to_vec(), None, kv);
        let with = RecoveredLog::new(Some(snapshots[1].clone()), all[3..].to_vec(), Some(earlier), kv);
        for (log, from) in [(without, 3), (with, 1)] {
            assert_eq!((log.from_index(), log.end_index()), (from, 7));
            for at in from..=7 {
                let s = log.state_at(at).expect("rebuild").expect("covered");
                assert_eq!(s.index, at);
                assert_eq!(s.digest, digests[at as usize], "state at {at}");
            }
            assert!(log.state_at(from - 1).expect("no error").is_none());
            assert!(log.state_at(8).expect("no error").is_none());
        }
    }
}
