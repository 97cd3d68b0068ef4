//! The replicated state: the user's machine plus what the runtime itself must agree on —
//! client sessions (exactly-once retries), the seal barrier and the machine identity that
//! applied the log. Applying a [`LogEntry`] is deterministic, so every replica that applies
//! the same log holds the same `Runtime` and produces the same outputs.

use crate::machine::{MachineError, StateMachine};
use lockstep_proto::{Command, LogEntry, MachineIdentity, log_entry::Body};
use prost::Message;
use sha2::Digest;
use std::collections::BTreeMap;

/// What applying one entry produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub kind: &'static str,
    pub output: Vec<u8>,
    /// The command was a retry of an already-applied (client, sequence): `output` is the
    /// output of the first execution, and the state did not change.
    pub duplicate: bool,
}

#[derive(Clone, PartialEq, Message)]
struct SessionRecord {
    #[prost(string, tag = "1")]
    client_id: String,
    #[prost(uint64, tag = "2")]
    sequence: u64,
    #[prost(bytes = "vec", tag = "3")]
    output: Vec<u8>,
}

/// Encoded form of a runtime snapshot (the `data` of a `Snapshot`).
#[derive(Clone, PartialEq, Message)]
struct RuntimeImage {
    #[prost(bytes = "vec", tag = "1")]
    machine: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    sessions: Vec<SessionRecord>,
    #[prost(uint64, tag = "3")]
    sealed_at: u64,
    #[prost(message, optional, tag = "4")]
    applied_by: Option<MachineIdentity>,
}

pub struct Runtime {
    machine: Box<dyn StateMachine>,
    sessions: BTreeMap<String, (u64, Vec<u8>)>,
    sealed_at: Option<u64>,
    /// Identity of the machine version that applied the log so far.
    applied_by: MachineIdentity,
}

impl Runtime {
    pub fn new(machine: Box<dyn StateMachine>) -> Self {
        let applied_by = machine.identity();
        Runtime {
            machine,
            sessions: BTreeMap::new(),
            sealed_at: None,
            applied_by,
        }
    }

    pub fn identity(&self) -> MachineIdentity {
        self.machine.identity()
    }

    pub fn applied_by(&self) -> &MachineIdentity {
        &self.applied_by
    }

    pub fn sealed_at(&self) -> Option<u64> {
        self.sealed_at
    }

    pub fn validate(&self, command: &Command) -> Result<(), MachineError> {
        if command.client_id.is_empty() {
            return Err(MachineError("command has an empty client_id".into()));
        }
        if command.sequence == 0 {
            return Err(MachineError("command sequence numbers start at 1".into()));
        }
        self.machine.validate(&command.payload)
    }

    /// The cached answer when (client, sequence) was applied already.
    pub fn session_answer(&self, command: &Command) -> Option<Result<Vec<u8>, MachineError>> {
        let (seq, output) = self.sessions.get(&command.client_id)?;
        if command.sequence == *seq {
            Some(Ok(output.clone()))
        } else if command.sequence < *seq {
            Some(Err(MachineError(format!(
                "sequence {} of client {} is older than its last applied sequence {seq}",
                command.sequence, command.client_id
            ))))
        } else {
            None
        }
    }

    pub fn query(&self, query: &[u8]) -> Result<Vec<u8>, MachineError> {
        self.machine.query(query)
    }

    pub fn apply(&mut self, entry: &LogEntry) -> Applied {
        match &entry.body {
            Some(Body::Command(cmd)) => {
                if let Some(Ok(output)) = self.session_answer(cmd) {
                    return Applied {
                        kind: "command",
                        output,
                        duplicate: true,
                    };
                }
                if let Some(Err(e)) = self.session_answer(cmd) {
                    let output = serde_json::json!({"error": e.0}).to_string().into_bytes();
                    return Applied {
                        kind: "command",
                        output,
                        duplicate: true,
                    };
                }
                let output = self.machine.apply(&cmd.payload);
                self.sessions
                    .insert(cmd.client_id.clone(), (cmd.sequence, output.clone()));
                Applied {
                    kind: "command",
                    output,
                    duplicate: false,
                }
            }
            Some(Body::Seal(_)) => {
                self.sealed_at = Some(entry.index);
                Applied {
                    kind: "seal",
                    output: Vec::new(),
                    duplicate: false,
                }
            }
            Some(Body::Resume(r)) => {
                self.sealed_at = None;
                if let Some(m) = &r.machine {
                    self.applied_by = m.clone();
                }
                Applied {
                    kind: "resume",
                    output: Vec::new(),
                    duplicate: false,
                }
            }
            Some(Body::Noop(_)) | None => Applied {
                kind: "noop",
                output: Vec::new(),
                duplicate: false,
            },
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        RuntimeImage {
            machine: self.machine.snapshot(),
            sessions: self
                .sessions
                .iter()
                .map(|(c, (s, o))| SessionRecord {
                    client_id: c.clone(),
                    sequence: *s,
                    output: o.clone(),
                })
                .collect(),
            sealed_at: self.sealed_at.unwrap_or(0),
            applied_by: Some(self.applied_by.clone()),
        }
        .encode_to_vec()
    }

    pub fn restore(&mut self, data: &[u8]) -> Result<(), MachineError> {
        let image = RuntimeImage::decode(data).map_err(|e| MachineError(format!("snapshot is not readable: {e}")))?;
        self.machine.restore(&image.machine)?;
        self.sessions = image
            .sessions
            .into_iter()
            .map(|r| (r.client_id, (r.sequence, r.output)))
            .collect();
        self.sealed_at = (image.sealed_at > 0).then_some(image.sealed_at);
        self.applied_by = image.applied_by.unwrap_or_else(|| self.machine.identity());
        Ok(())
    }
}

pub fn digest(data: &[u8]) -> Vec<u8> {
    sha2::Sha256::digest(data).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::kv::Kv;

    fn cmd(index: u64, client: &str, seq: u64, payload: &str) -> LogEntry {
        LogEntry {
            index,
            epoch: 1,
            body: Some(Body::Command(Command {
                client_id: client.into(),
                sequence: seq,
                payload: payload.as_bytes().to_vec(),
            })),
        }
    }

    #[test]
    fn retried_command_applies_once() {
        let mut rt = Runtime::new(Box::new(Kv::default()));
        let first = rt.apply(&cmd(1, "c", 1, r#"{"op":"put","key":"k","value":"a"}"#));
        rt.apply(&cmd(2, "d", 1, r#"{"op":"put","key":"k","value":"b"}"#));
        let again = rt.apply(&cmd(3, "c", 1, r#"{"op":"put","key":"k","value":"a"}"#));
        assert!(again.duplicate);
        assert_eq!(again.output, first.output);
        let got = rt.query(br#"{"op":"get","key":"k"}"#).unwrap();
        assert_eq!(got, br#"{"value":"b"}"#, "the retry did not overwrite d's later put");
    }

    #[test]
    fn snapshot_carries_sessions_and_seal() {
        let mut rt = Runtime::new(Box::new(Kv::default()));
        rt.apply(&cmd(1, "c", 7, r#"{"op":"put","key":"k","value":"a"}"#));
        rt.apply(&LogEntry {
            index: 2,
            epoch: 1,
            body: Some(Body::Seal(Default::default())),
        });
        let mut other = Runtime::new(Box::new(Kv::default()));
        other.restore(&rt.snapshot()).unwrap();
        assert_eq!(other.sealed_at(), Some(2));
        assert!(
            other
                .apply(&cmd(3, "c", 7, r#"{"op":"put","key":"k","value":"z"}"#))
                .duplicate
        );
        assert_eq!(digest(&other.snapshot()), digest(&rt.snapshot()));
    }
}
