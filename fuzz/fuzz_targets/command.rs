//! The command encoding the built-in machines execute (JSON for `kv` and `counter`) on
//! hostile bytes: `validate`, `apply`, `query`, directly and through the runtime's sessions.
//!
//! Input: `[machine][ops...]` (see `lockstep_fuzz::ops`): op % 3 = 0 validates then applies
//! the bytes as a command (as a client's `Command` in a log entry when op bit 2 is set),
//! 1 runs them as a query, 2 checks a snapshot round trip.
//!
//! Checked: nothing panics; `apply` always answers JSON (clients parse it); two machines fed
//! the same commands end in the same state with the same outputs (determinism, so replicas
//! never diverge on garbage); a snapshot restores to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::machine;
use lockstep_proto::{Command, LogEntry, log_entry::Body};
use lockstep_replica::runtime::Runtime;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut a = machine(selector);
    let mut b = machine(selector);
    let mut rt = Runtime::new(machine(selector));
    let mut index = 0;
    for (op, bytes) in lockstep_fuzz::ops(rest) {
        match op % 3 {
            0 => {
                let valid = a.validate(bytes);
                assert_eq!(valid, b.validate(bytes), "validate is deterministic");
                let out = a.apply(bytes);
                assert_eq!(out, b.apply(bytes), "apply is deterministic");
                let json: serde_json::Value =
                    serde_json::from_slice(&out).expect("apply answers JSON, even to garbage");
                if valid.is_ok() {
                    // counter refuses an overflowing add at apply time; nothing else may fail.
                    let refused = json.get("error").is_some();
                    assert!(
                        !refused || json["error"] == "counter: overflow",
                        "a validated command failed: {json}"
                    );
                }
                if op & 4 != 0 {
                    index += 1;
                    let cmd = Command {
                        client_id: format!("c{}", op >> 3),
                        sequence: u64::from(op >> 3) + 1,
                        payload: bytes.to_vec(),
                    };
                    let _ = rt.validate(&cmd);
                    let applied = rt.apply(&LogEntry {
                        index,
                        epoch: 1,
                        body: Some(Body::Command(cmd)),
                    });
                    serde_json::from_slice::<serde_json::Value>(&applied.output).expect("runtime output is JSON");
                }
            }
            1 => {
                let got = a.query(bytes);
                assert_eq!(got, b.query(bytes), "query is deterministic");
                if let Ok(out) = got {
                    serde_json::from_slice::<serde_json::Value>(&out).expect("a query answers JSON");
                }
                let _ = rt.query(bytes);
            }
            _ => {
                let snap = a.snapshot();
                assert_eq!(snap, b.snapshot(), "same commands, same state");
                let mut c = machine(selector);
                c.restore(&snap).expect("a machine's own snapshot restores");
                assert_eq!(c.snapshot(), snap, "snapshot round trip keeps the state");
                let image = rt.snapshot();
                let mut rt2 = Runtime::new(machine(selector));
                rt2.restore(&image).expect("the runtime's own snapshot restores");
                assert_eq!(rt2.snapshot(), image);
            }
        }
    }
    assert_eq!(a.snapshot(), b.snapshot(), "same commands, same state");
});
