//! `counter`: one signed 64-bit counter.
//! Commands `{"op":"add","amount":N}` -> `{"value":V}` (wrapping on overflow is refused:
//! the add is not applied and `{"error":..}` returned); query `{"op":"get"}` -> `{"value":V}`.

use super::{MachineError, StateMachine};
use lockstep_proto::MachineIdentity;
use serde::Deserialize;

pub const NAME: &str = "counter";
/// The machine version, a packaging knob: `LOCKSTEP_BUILTIN_MACHINE_VERSION=1.1.0 cargo build`
/// builds a replica whose built-in machines report 1.1.0 (e.g. the second image of a rollout
/// test). The logic is the same; a replica still refuses a data dir written by another version
/// unless it was sealed for a rollout.
pub const VERSION: &str = match option_env!("LOCKSTEP_BUILTIN_MACHINE_VERSION") {
    Some(v) => v,
    None => "1.0.0",
};

#[derive(Default)]
pub struct Counter {
    value: i64,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum CounterCommand {
    Add { amount: i64 },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum CounterQuery {
    Get,
}

impl StateMachine for Counter {
    fn identity(&self) -> MachineIdentity {
        super::identity(NAME, VERSION, "json-v1")
    }

    fn validate(&self, command: &[u8]) -> Result<(), MachineError> {
        serde_json::from_slice::<CounterCommand>(command)
            .map(|_| ())
            .map_err(|e| MachineError(format!("counter: malformed command: {e}")))
    }

    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        let out = match serde_json::from_slice::<CounterCommand>(command) {
            Ok(CounterCommand::Add { amount }) => match self.value.checked_add(amount) {
                Some(v) => {
                    self.value = v;
                    serde_json::json!({"value": v})
                }
                None => serde_json::json!({"error": "counter: overflow", "value": self.value}),
            },
            Err(e) => serde_json::json!({"error": format!("counter: malformed command: {e}")}),
        };
        out.to_string().into_bytes()
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, MachineError> {
        serde_json::from_slice::<CounterQuery>(query)
            .map_err(|e| MachineError(format!("counter: malformed query: {e}")))?;
        Ok(serde_json::json!({"value": self.value}).to_string().into_bytes())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.value.to_le_bytes().to_vec()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), MachineError> {
        let bytes: [u8; 8] = snapshot
            .try_into()
            .map_err(|_| MachineError("counter: snapshot must be 8 bytes".into()))?;
        self.value = i64::from_le_bytes(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_refuses_overflow() {
        let mut c = Counter::default();
        assert_eq!(c.apply(br#"{"op":"add","amount":5}"#), br#"{"value":5}"#);
        c.restore(&i64::MAX.to_le_bytes()).unwrap();
        assert!(
            String::from_utf8(c.apply(br#"{"op":"add","amount":1}"#))
                .unwrap()
                .contains("overflow")
        );
        assert_eq!(
            c.query(br#"{"op":"get"}"#).unwrap(),
            format!(r#"{{"value":{}}}"#, i64::MAX).into_bytes()
        );
        assert!(c.validate(b"{}").is_err());
    }
}
