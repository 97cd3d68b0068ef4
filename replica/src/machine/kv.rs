//! `kv`: a string key-value store with get, put, delete and compare-and-swap.
//!
//! Commands and outputs are JSON (easy to produce from any client):
//! - `{"op":"put","key":K,"value":V}` -> `{"previous":V|null}`
//! - `{"op":"delete","key":K}` -> `{"previous":V|null}`
//! - `{"op":"cas","key":K,"old":V|null,"new":V|null}` -> `{"swapped":bool,"current":V|null}`
//!   (`old: null` means "absent"; `new: null` deletes)
//! - query `{"op":"get","key":K}` -> `{"value":V|null}`

use super::{MachineError, StateMachine};
use lockstep_proto::MachineIdentity;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const NAME: &str = "kv";
/// The machine version, a packaging knob: `LOCKSTEP_BUILTIN_MACHINE_VERSION=1.1.0 cargo build`
/// builds a replica whose built-in machines report 1.1.0 (e.g. the second image of a rollout
/// test). The logic is the same; a replica still refuses a data dir written by another version
/// unless it was sealed for a rollout.
pub const VERSION: &str = match option_env!("LOCKSTEP_BUILTIN_MACHINE_VERSION") {
    Some(v) => v,
    None => "1.0.0",
};
pub const MAX_KEY_BYTES: usize = 4096;

#[derive(Default)]
pub struct Kv {
    data: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum KvCommand {
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    Cas {
        key: String,
        old: Option<String>,
        new: Option<String>,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum KvQuery {
    Get { key: String },
}

impl KvCommand {
    pub fn key(&self) -> &str {
        match self {
            KvCommand::Put { key, .. } | KvCommand::Delete { key } | KvCommand::Cas { key, .. } => key,
        }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, MachineError> {
    serde_json::from_slice(bytes).map_err(|e| MachineError(format!("kv: malformed {what}: {e}")))
}

fn check_key(key: &str) -> Result<(), MachineError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(MachineError(format!(
            "kv: key of {} bytes exceeds {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

impl StateMachine for Kv {
    fn identity(&self) -> MachineIdentity {
        super::identity(NAME, VERSION, "json-v1")
    }

    fn validate(&self, command: &[u8]) -> Result<(), MachineError> {
        let cmd: KvCommand = parse(command, "command")?;
        check_key(cmd.key())
    }

    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        let out = match serde_json::from_slice::<KvCommand>(command) {
            Err(e) => serde_json::json!({"error": format!("kv: malformed command: {e}")}),
            Ok(KvCommand::Put { key, value }) => serde_json::json!({"previous": self.data.insert(key, value)}),
            Ok(KvCommand::Delete { key }) => serde_json::json!({"previous": self.data.remove(&key)}),
            Ok(KvCommand::Cas { key, old, new }) => {
                let current = self.data.get(&key).cloned();
                if current == old {
                    match &new {
                        Some(v) => self.data.insert(key, v.clone()),
                        None => self.data.remove(&key),
                    };
                    serde_json::json!({"swapped": true, "current": new})
                } else {
                    serde_json::json!({"swapped": false, "current": current})
                }
            }
        };
        out.to_string().into_bytes()
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, MachineError> {
        let KvQuery::Get { key } = parse(query, "query")?;
        Ok(serde_json::json!({"value": self.data.get(&key)})
            .to_string()
            .into_bytes())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.data).unwrap_or_default()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), MachineError> {
        self.data = parse(snapshot, "snapshot")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kv: &mut Kv, cmd: serde_json::Value) -> serde_json::Value {
        let bytes = cmd.to_string().into_bytes();
        kv.validate(&bytes).unwrap();
        serde_json::from_slice(&kv.apply(&bytes)).unwrap()
    }

    #[test]
    fn put_get_delete_cas() {
        let mut kv = Kv::default();
        assert_eq!(
            run(&mut kv, serde_json::json!({"op":"put","key":"a","value":"1"})),
            serde_json::json!({"previous": null})
        );
        assert_eq!(
            run(&mut kv, serde_json::json!({"op":"put","key":"a","value":"2"})),
            serde_json::json!({"previous": "1"})
        );
        let swapped = run(&mut kv, serde_json::json!({"op":"cas","key":"a","old":"1","new":"3"}));
        assert_eq!(swapped, serde_json::json!({"swapped": false, "current": "2"}));
        let swapped = run(&mut kv, serde_json::json!({"op":"cas","key":"a","old":"2","new":"3"}));
        assert_eq!(swapped, serde_json::json!({"swapped": true, "current": "3"}));
        let got = kv.query(br#"{"op":"get","key":"a"}"#).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&got).unwrap(),
            serde_json::json!({"value": "3"})
        );
        assert_eq!(
            run(&mut kv, serde_json::json!({"op":"delete","key":"a"})),
            serde_json::json!({"previous": "3"})
        );
        let created = run(&mut kv, serde_json::json!({"op":"cas","key":"b","old":null,"new":"x"}));
        assert_eq!(created, serde_json::json!({"swapped": true, "current": "x"}));
    }

    #[test]
    fn snapshot_round_trip_and_malformed_input() {
        let mut kv = Kv::default();
        run(&mut kv, serde_json::json!({"op":"put","key":"a","value":"1"}));
        let mut other = Kv::default();
        other.restore(&kv.snapshot()).unwrap();
        assert_eq!(other.snapshot(), kv.snapshot());
        assert!(kv.validate(b"\xff\x00garbage").is_err());
        assert!(kv.validate(br#"{"op":"put","key":"a"}"#).is_err());
        assert!(kv.query(b"{").is_err());
        assert!(other.restore(b"nope").is_err());
        // apply is total even on garbage (a log from another version could carry it)
        assert!(String::from_utf8(kv.apply(b"garbage")).unwrap().contains("error"));
    }
}
