//! The history file parser (`parse_history`) on arbitrary text, and the checker on what it
//! accepts.
//!
//! Checked: nothing panics; an accepted history written back with `write_entry` parses to
//! the same entries (outputs compared decoded: a float in an unused field may move by an ulp
//! through serde_json, which is not a loss); small accepted histories go through `check_kv`
//! under tight limits without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_linearizability::{CheckLimits, Outcome, check_kv, parse_history, write_entry};

fuzz_target!(|data: &[u8]| {
    let history = match parse_history(data) {
        Ok(h) => h,
        Err(e) => {
            // The error names the line.
            assert!(e.to_string().starts_with("line "), "{e}");
            return;
        }
    };
    let mut written = Vec::new();
    for e in &history {
        write_entry(&mut written, e).expect("writing to memory");
    }
    let again = parse_history(written.as_slice()).expect("a written history parses");
    assert_eq!(again.len(), history.len());
    for (a, b) in history.iter().zip(&again) {
        assert_eq!(
            (&a.client, a.op, &a.key, &a.value, &a.old, &a.new),
            (&b.client, b.op, &b.key, &b.value, &b.old, &b.new)
        );
        assert_eq!((a.call, a.ret, a.result), (b.call, b.ret, b.result));
        if a.result == Outcome::Ok {
            assert_eq!(a.decode_output(), b.decode_output());
        }
    }
    if history.len() <= 12 {
        let _ = check_kv(
            &history,
            CheckLimits {
                max_steps: 10_000,
                max_cache_entries: 10_000,
                max_cache_bytes: 1 << 20,
            },
        );
    }
});
