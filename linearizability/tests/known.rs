//! Hand-written histories with known verdicts, and the history format.

mod common;

use common::*;
use lockstep_linearizability::{
    CheckLimits, CheckResult, HistoryEntry, HistoryError, OpKind, Outcome, check_kv, parse_history, write_entry,
};

fn check(h: &[HistoryEntry]) -> CheckResult {
    check_kv(h, CheckLimits::default())
}

#[track_caller]
fn assert_ok(h: &[HistoryEntry]) {
    let r = check(h);
    assert!(r.is_linearizable(), "expected linearizable, got {r}");
}

/// Asserts a violation on `key` and returns the explanation.
#[track_caller]
fn assert_bad(h: &[HistoryEntry], key: &str) -> String {
    match check(h) {
        CheckResult::NotLinearizable { key: k, explanation } => {
            assert_eq!(k, key, "{explanation}");
            explanation
        }
        other => panic!("expected a violation on {key}, got {other}"),
    }
}

// ------------------------------------------------------------------ known bad

#[test]
fn stale_read_after_acknowledged_put() {
    let h = [put("a", "k", "1", 0, 10, None), get("b", "k", 20, 30, None)];
    let why = assert_bad(&h, "k");
    assert!(why.contains("#2 b: get"), "{why}");
    assert!(why.contains("needs the key to hold null"), "{why}");

    // stale by one version
    let h = [
        put("a", "k", "1", 0, 10, None),
        put("a", "k", "2", 20, 30, Some("1")),
        get("b", "k", 40, 50, Some("1")),
    ];
    assert_bad(&h, "k");
}

#[test]
fn lost_write() {
    // b's put came after a's was acknowledged, yet saw nothing before it
    let h = [put("a", "k", "x", 0, 10, None), put("b", "k", "y", 20, 30, None)];
    assert_bad(&h, "k");
    // a later reader sees the older of two acknowledged sequential writes
    let h = [
        put("a", "k", "x", 0, 10, None),
        put("b", "k", "y", 20, 30, Some("x")),
        get("c", "k", 40, 50, Some("x")),
        get("c", "k", 60, 70, Some("x")),
    ];
    assert_bad(&h, "k");
}

#[test]
fn read_of_a_value_never_written() {
    let h = [put("a", "k", "1", 0, 10, None), get("b", "k", 5, 30, Some("ghost"))];
    let why = assert_bad(&h, "k");
    assert!(why.contains("\"ghost\""), "{why}");
    // even with unknown and failed writes of other values around
    let h = [
        unknown(put("a", "k", "1", 0, 10, None)),
        fail(put("a", "k", "2", 0, 10, None)),
        get("b", "k", 5, 30, Some("ghost")),
    ];
    assert_bad(&h, "k");
}

#[test]
fn cas_swapped_twice_from_the_same_old_value() {
    let h = [
        put("a", "k", "a", 0, 10, None),
        cas("b", "k", Some("a"), Some("b"), 20, 40, true, Some("b")),
        cas("c", "k", Some("a"), Some("c"), 25, 45, true, Some("c")),
    ];
    assert_bad(&h, "k");
    // the same with no put in between and an absent key
    let h = [
        cas("b", "k", None, Some("b"), 0, 40, true, Some("b")),
        cas("c", "k", None, Some("c"), 5, 45, true, Some("c")),
    ];
    assert_bad(&h, "k");
}

#[test]
fn new_old_inversion_of_concurrent_reads() {
    // both reads overlap the write, but the earlier read saw the new value and the later
    // (non-overlapping) one the old value
    let h = [
        put("w", "k", "1", 0, 10, None),
        put("w", "k", "2", 20, 100, Some("1")),
        get("r1", "k", 30, 40, Some("2")),
        get("r2", "k", 50, 60, Some("1")),
    ];
    assert_bad(&h, "k");
    // with the write's outcome unknown
    let h = [
        put("w", "k", "1", 0, 10, None),
        unknown(put("w", "k", "2", 20, 100, None)),
        get("r1", "k", 30, 40, Some("2")),
        get("r2", "k", 50, 60, Some("1")),
    ];
    assert_bad(&h, "k");
}

#[test]
fn wrong_previous_in_a_put() {
    let h = [
        put("a", "k", "a", 0, 10, None),
        put("a", "k", "b", 20, 30, Some("a")),
        put("b", "k", "c", 40, 50, Some("a")),
    ];
    let why = assert_bad(&h, "k");
    assert!(why.contains("#3 b: put \"k\" = \"c\""), "{why}");
    // wrong previous on a delete
    let h = [put("a", "k", "a", 0, 10, None), del("b", "k", 20, 30, None)];
    assert_bad(&h, "k");
}

#[test]
fn unknown_write_cannot_take_effect_before_its_call() {
    let h = [
        get("a", "k", 0, 10, Some("x")),
        unknown(put("b", "k", "x", 20, 0, None)),
    ];
    assert_bad(&h, "k");
}

#[test]
fn failed_write_never_takes_effect() {
    let h = [fail(put("a", "k", "x", 0, 10, None)), get("b", "k", 20, 30, Some("x"))];
    assert_bad(&h, "k");
}

#[test]
fn read_after_delete_sees_absent() {
    let h = [
        put("a", "k", "x", 0, 10, None),
        del("a", "k", 20, 30, Some("x")),
        get("b", "k", 40, 50, Some("x")),
    ];
    assert_bad(&h, "k");
}

#[test]
fn self_contradictory_cas_outputs() {
    // swapped, but the value after is not `new`
    let h = [cas("a", "k", None, Some("x"), 0, 10, true, Some("y"))];
    let why = assert_bad(&h, "k");
    assert!(why.contains("impossible"), "{why}");
    // not swapped, but the value is `old`
    let h = [cas("a", "k", Some("x"), Some("y"), 0, 10, false, Some("x"))];
    assert_bad(&h, "k");
    // not swapped on an absent key with old = null
    let h = [cas("a", "k", None, Some("y"), 0, 10, false, None)];
    assert_bad(&h, "k");
}

#[test]
fn violation_is_reported_on_the_right_key() {
    let h = [
        put("a", "k1", "1", 0, 10, None),
        put("a", "k2", "1", 0, 10, None),
        get("b", "k1", 20, 30, Some("1")),
        get("b", "k2", 20, 30, Some("2")),
        get("b", "k3", 20, 30, None),
    ];
    assert_bad(&h, "k2");
}

// ------------------------------------------------------------------ known good

#[test]
fn empty_history() {
    assert_eq!(check(&[]), CheckResult::Linearizable { ops: 0, keys: 0 });
}

#[test]
fn sequential_ops_of_every_kind() {
    let h = [
        get("a", "k", 0, 1, None),
        put("a", "k", "1", 2, 3, None),
        get("a", "k", 4, 5, Some("1")),
        cas("a", "k", Some("1"), Some("2"), 6, 7, true, Some("2")),
        cas("a", "k", Some("1"), Some("3"), 8, 9, false, Some("2")),
        cas("a", "k", None, Some("3"), 10, 11, false, Some("2")),
        put("a", "k", "2", 12, 13, Some("2")),
        del("a", "k", 14, 15, Some("2")),
        del("a", "k", 16, 17, None),
        cas("a", "k", None, Some("4"), 18, 19, true, Some("4")),
        cas("a", "k", Some("4"), None, 20, 21, true, None),
        get("a", "k", 22, 23, None),
    ];
    assert_eq!(check(&h), CheckResult::Linearizable { ops: 12, keys: 1 });
}

#[test]
fn overlapping_ops() {
    // reads overlapping a write may see either value, as long as they don't invert
    let h = [
        put("w", "k", "1", 0, 100, None),
        get("r1", "k", 10, 90, Some("1")),
        get("r2", "k", 20, 30, None),
        get("r3", "k", 40, 50, Some("1")),
        get("r4", "k", 60, 70, Some("1")),
    ];
    assert_ok(&h);
    // concurrent writes: the previous values fix their order
    let h = [
        put("a", "k", "a", 0, 50, Some("b")),
        put("b", "k", "b", 10, 60, None),
        get("c", "k", 70, 80, Some("a")),
    ];
    assert_ok(&h);
    // concurrent cas: exactly one swaps
    let h = [
        put("a", "k", "0", 0, 10, None),
        cas("b", "k", Some("0"), Some("b"), 20, 40, false, Some("c")),
        cas("c", "k", Some("0"), Some("c"), 25, 45, true, Some("c")),
        get("d", "k", 50, 60, Some("c")),
    ];
    assert_ok(&h);
    // ops at equal timestamps count as concurrent
    let h = [put("a", "k", "1", 0, 10, None), get("b", "k", 10, 20, None)];
    assert_ok(&h);
}

#[test]
fn unknown_ops_that_did_and_did_not_take_effect() {
    // took effect, long after the client gave up
    let h = [
        put("a", "k", "1", 0, 10, None),
        unknown(put("b", "k", "2", 20, 0, None)),
        get("c", "k", 30, 40, Some("1")),
        get("c", "k", 1_000, 1_010, Some("2")),
        put("c", "k", "3", 1_020, 1_030, Some("2")),
    ];
    assert_ok(&h);
    // never took effect
    let h = [
        put("a", "k", "1", 0, 10, None),
        unknown(put("b", "k", "2", 20, 0, None)),
        unknown(del("b", "k", 25, 0, None)),
        get("c", "k", 30, 40, Some("1")),
        get("c", "k", 1_000, 1_010, Some("1")),
    ];
    assert_ok(&h);
    // an unknown cas that swapped, and one that had nothing to swap
    let h = [
        put("a", "k", "1", 0, 10, None),
        unknown(cas("b", "k", Some("1"), Some("2"), 20, 0, true, None)),
        unknown(cas("b", "k", Some("9"), Some("3"), 20, 0, true, None)),
        get("c", "k", 30, 40, Some("2")),
    ];
    assert_ok(&h);
    // unknown gets are dropped
    let h = [unknown(get("a", "k", 0, 0, None)), put("b", "k", "1", 5, 6, None)];
    assert_eq!(check(&h), CheckResult::Linearizable { ops: 2, keys: 1 });
}

#[test]
fn failed_ops_are_ignored() {
    let h = [
        put("a", "k", "1", 0, 10, None),
        fail(put("b", "k", "2", 20, 30, None)),
        fail(del("b", "k", 20, 30, None)),
        get("c", "k", 40, 50, Some("1")),
    ];
    assert_eq!(check(&h), CheckResult::Linearizable { ops: 2, keys: 1 });
}

#[test]
fn many_independent_keys() {
    let mut h = Vec::new();
    for k in 0..50 {
        let key = format!("k{k}");
        h.push(put("a", &key, "1", 0, 10, None));
        h.push(get("b", &key, 5, 15, Some("1")));
    }
    assert_eq!(check(&h), CheckResult::Linearizable { ops: 100, keys: 50 });
}

// ------------------------------------------------------------------ format

const EXAMPLE: &str = r#"{"client":"c3","op":"put","key":"k1","value":"v","old":null,"new":null,"call":123,"return":456,"result":"ok","output":{"previous":null}}"#;

#[test]
fn parses_the_documented_example() {
    let h = parse_history(EXAMPLE.as_bytes()).unwrap();
    assert_eq!(h, vec![put("c3", "k1", "v", 123, 456, None)]);
}

#[test]
fn write_then_parse_round_trips() {
    let h = vec![
        put("a", "k", "1", 0, 10, None),
        unknown(cas("b", "k", None, Some("x"), 3, 0, true, None)),
        fail(del("c", "k", 4, 9, None)),
        get("d", "k", 20, 30, Some("1")),
    ];
    let mut buf = Vec::new();
    for e in &h {
        write_entry(&mut buf, e).unwrap();
    }
    let text = String::from_utf8(buf.clone()).unwrap();
    assert_eq!(text.lines().count(), 4);
    assert!(text.lines().next().unwrap().contains("\"return\":10"), "{text}");
    assert_eq!(parse_history(buf.as_slice()).unwrap(), h);
}

#[test]
fn absent_optional_fields_and_blank_lines() {
    let text = "\n{\"client\":\"a\",\"op\":\"get\",\"key\":\"k\",\"call\":1,\"return\":2,\"result\":\"ok\",\"output\":{\"value\":\"x\"}}\n\n{\"client\":\"a\",\"op\":\"delete\",\"key\":\"k\",\"call\":3,\"result\":\"unknown\"}\n";
    let h = parse_history(text.as_bytes()).unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].op, OpKind::Get);
    assert_eq!(h[1].result, Outcome::Unknown);
    assert_eq!(h[1].ret, None);
}

#[test]
fn errors_name_the_line() {
    let bad_json = format!("{EXAMPLE}\n{EXAMPLE}\n{{not json\n");
    match parse_history(bad_json.as_bytes()) {
        Err(e @ HistoryError::Json { line: 3, .. }) => {
            assert!(e.to_string().starts_with("line 3:"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let bad_op = EXAMPLE.replace("\"put\"", "\"scan\"");
    assert!(matches!(
        parse_history(bad_op.as_bytes()),
        Err(HistoryError::Json { line: 1, .. })
    ));
    let no_return = format!("{EXAMPLE}\n{}", EXAMPLE.replace("456", "null"));
    match parse_history(no_return.as_bytes()) {
        Err(HistoryError::Invalid { line: 2, reason }) => assert!(reason.contains("return")),
        other => panic!("{other:?}"),
    }
    let bad_output = EXAMPLE.replace("{\"previous\":null}", "{\"value\":null}");
    assert!(matches!(
        parse_history(bad_output.as_bytes()),
        Err(HistoryError::Invalid { line: 1, .. })
    ));
    let backwards = EXAMPLE.replace("456", "100");
    assert!(matches!(
        parse_history(backwards.as_bytes()),
        Err(HistoryError::Invalid { line: 1, .. })
    ));
}

#[test]
fn malformed_entries_given_directly_are_inconclusive() {
    let mut e = put("a", "k", "1", 0, 10, None);
    e.output = None;
    match check(&[e]) {
        CheckResult::Inconclusive { reason } => assert!(reason.contains("#1"), "{reason}"),
        other => panic!("{other}"),
    }
}

#[test]
fn display() {
    assert_eq!(
        CheckResult::Linearizable { ops: 3, keys: 2 }.to_string(),
        "linearizable (3 ops on 2 keys)"
    );
    let bad = check(&[get("a", "k", 0, 1, Some("x"))]).to_string();
    assert!(bad.starts_with("NOT linearizable: key \"k\"\n"), "{bad}");
    assert_eq!(
        CheckResult::Inconclusive {
            reason: "budget".into()
        }
        .to_string(),
        "inconclusive: budget"
    );
}
