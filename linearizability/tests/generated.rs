//! Generated histories: simulated linearizable executions (proptest), a cross-check
//! against a brute-force checker, larger histories, the budget, and the binary.

mod common;

use common::*;
use lockstep_linearizability::{CheckLimits, CheckResult, HistoryEntry, OpKind, Outcome, check_kv, write_entry};
use proptest::prelude::*;

fn spec_strategy(clients: usize, keys: usize, values: usize) -> impl Strategy<Value = OpSpec> {
    (
        0..clients,
        0u8..4,
        0..keys,
        0..values,
        proptest::option::weighted(0.75, 0..values),
        0u64..20,
        1u64..60,
        0u64..=1000,
        prop_oneof![
            7 => Just(SimOutcome::Ok),
            1 => Just(SimOutcome::Fail),
            1 => Just(SimOutcome::UnknownApplied),
            1 => Just(SimOutcome::UnknownLost),
        ],
    )
        .prop_map(|(client, kind, key, val, old, gap, dur, lin, outcome)| OpSpec {
            client,
            kind,
            key,
            val,
            old,
            gap,
            dur,
            lin,
            outcome,
        })
}

fn ok_indices(h: &[HistoryEntry]) -> Vec<usize> {
    (0..h.len()).filter(|&i| h[i].result == Outcome::Ok).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// A simulated linearizable execution is linearizable; reporting a never-written
    /// value in any one ok output makes it not.
    #[test]
    fn simulated_executions(
        specs in proptest::collection::vec(spec_strategy(6, 3, 4), 1..80),
        pick in any::<proptest::sample::Index>(),
    ) {
        let mut h = simulate(&specs);
        let r = check_kv(&h, CheckLimits::default());
        prop_assert!(r.is_linearizable(), "{}", r);

        let oks = ok_indices(&h);
        prop_assume!(!oks.is_empty());
        let victim = oks[pick.index(oks.len())];
        corrupt(&mut h[victim]);
        match check_kv(&h, CheckLimits::default()) {
            CheckResult::NotLinearizable { key, .. } => prop_assert_eq!(&key, &h[victim].key),
            other => prop_assert!(false, "corrupted #{} still passes: {}", victim + 1, other),
        }
    }

    /// Many concurrent clients on one key with a tiny value domain (so values repeat).
    #[test]
    fn simulated_single_key_high_concurrency(
        specs in proptest::collection::vec(spec_strategy(24, 1, 3), 1..150),
    ) {
        let h = simulate(&specs);
        let r = check_kv(&h, CheckLimits::default());
        prop_assert!(r.is_linearizable(), "{}", r);
    }
}

/// The checker agrees with brute force on tiny random histories whose outputs are
/// partly simulated and partly random, so both verdicts occur.
#[test]
fn agrees_with_brute_force() {
    let mut rng = Rng(0x5eed);
    let (mut yes, mut no) = (0, 0);
    for case in 0..4000 {
        let n = 1 + rng.below(9) as usize;
        let clients = 1 + rng.below(4) as usize;
        let values = 1 + rng.below(3) as usize;
        let percent_unknown = rng.below(60);
        let specs = random_specs(&mut rng, n, clients, 1, values, percent_unknown, 10);
        let mut h = simulate(&specs);
        // perturb some ok outputs to random (possibly still valid) ones
        for e in h.iter_mut() {
            if e.result == Outcome::Ok && rng.chance(30) {
                let v = match rng.below(values as u64 + 1) {
                    0 => serde_json::Value::Null,
                    k => serde_json::json!(value_name(k as usize - 1)),
                };
                let out = e.output.as_mut().unwrap();
                let field = match e.op {
                    lockstep_linearizability::OpKind::Get => "value",
                    lockstep_linearizability::OpKind::Put | lockstep_linearizability::OpKind::Delete => "previous",
                    lockstep_linearizability::OpKind::Cas => {
                        if rng.chance(50) {
                            out["swapped"] = serde_json::json!(rng.chance(50));
                        }
                        "current"
                    }
                };
                out[field] = v;
            }
        }
        let expected = brute_force(&h);
        let got = check_kv(&h, CheckLimits::default());
        assert_eq!(
            got.is_linearizable(),
            expected,
            "case {case}: brute force says {expected}, checker says {got}\n{h:#?}"
        );
        if expected { yes += 1 } else { no += 1 }
    }
    assert!(yes > 500 && no > 500, "both verdicts must be exercised: {yes} / {no}");
}

#[test]
fn five_thousand_ops_ten_keys_sixteen_clients() {
    let mut rng = Rng(42);
    let specs = random_specs(&mut rng, 5_000, 16, 10, 1_000, 10, 5);
    let mut h = simulate(&specs);
    let r = check_kv(&h, CheckLimits::default());
    assert!(r.is_linearizable(), "{r}");
    if let CheckResult::Linearizable { ops, keys } = r {
        assert_eq!(keys, 10);
        assert!(ops > 4_000, "{ops}");
    }
    // a stale value late in the history
    let victim = *ok_indices(&h).iter().rev().nth(100).unwrap();
    corrupt(&mut h[victim]);
    assert!(matches!(
        check_kv(&h, CheckLimits::default()),
        CheckResult::NotLinearizable { .. }
    ));
}

#[test]
fn sixty_four_clients_one_key_many_unknown() {
    // unique written values, as the bench writes them; a quarter of the ops unanswered
    let mut rng = Rng(7);
    let specs = random_specs(&mut rng, 2_000, 64, 1, 1_000_000_000, 25, 5);
    let h = simulate(&specs);
    let r = check_kv(&h, CheckLimits::default());
    assert!(r.is_linearizable(), "{r}");
    let victim = ok_indices(&h)[1_000];
    let mut never = h.clone();
    corrupt(&mut never[victim]);
    assert!(matches!(
        check_kv(&never, CheckLimits::default()),
        CheckResult::NotLinearizable { .. }
    ));
    // a stale read: a late get returns a value that was certainly overwritten before
    // the get was called (values are unique, so it cannot come back)
    let puts: Vec<usize> = ok_indices(&h).into_iter().filter(|&i| h[i].op == OpKind::Put).collect();
    let get = *ok_indices(&h)
        .iter()
        .rev()
        .find(|&&i| h[i].op == OpKind::Get && i > h.len() / 2)
        .unwrap();
    let (old_put, _) = puts
        .iter()
        .flat_map(|&p| puts.iter().map(move |&q| (p, q)))
        .find(|&(p, q)| h[p].ret.unwrap() < h[q].call && h[q].ret.unwrap() < h[get].call && h[p].call > 1_000)
        .unwrap();
    let mut stale = h.clone();
    stale[get].output = Some(serde_json::json!({ "value": h[old_put].value }));
    // (the explanation shows where the search got stuck, which may be before the get:
    // the old value cannot be left while a read of it is pending)
    assert!(matches!(
        check_kv(&stale, CheckLimits::default()),
        CheckResult::NotLinearizable { .. }
    ));
}

#[test]
fn budget_gives_inconclusive() {
    let mut rng = Rng(3);
    let specs = random_specs(&mut rng, 400, 16, 1, 5, 30, 0);
    let h = simulate(&specs);
    let tiny = CheckLimits {
        max_steps: 10,
        ..CheckLimits::default()
    };
    match check_kv(&h, tiny) {
        CheckResult::Inconclusive { reason } => assert!(reason.contains("budget"), "{reason}"),
        r => panic!("expected inconclusive, got {r}"),
    }
    let tiny = CheckLimits {
        max_cache_entries: 10,
        ..CheckLimits::default()
    };
    assert!(matches!(check_kv(&h, tiny), CheckResult::Inconclusive { .. }));
    let tiny = CheckLimits {
        max_cache_bytes: 1000,
        ..CheckLimits::default()
    };
    assert!(matches!(check_kv(&h, tiny), CheckResult::Inconclusive { .. }));
    assert!(check_kv(&h, CheckLimits::default()).is_linearizable());
}

#[test]
fn binary_exit_codes() {
    let dir = std::env::temp_dir().join(format!("lockstep-check-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, h: &[HistoryEntry]| {
        let path = dir.join(name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for e in h {
            write_entry(&mut f, e).unwrap();
        }
        drop(f);
        path
    };
    let good = write(
        "good.jsonl",
        &[put("a", "k", "1", 0, 10, None), get("b", "k", 20, 30, Some("1"))],
    );
    let bad = write(
        "bad.jsonl",
        &[put("a", "k", "1", 0, 10, None), get("b", "k", 20, 30, None)],
    );
    let garbage = dir.join("garbage.jsonl");
    std::fs::write(&garbage, "{\n").unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-check"))
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = run(&[good.as_os_str()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("linearizable"), "{out}");
    let (code, out) = run(&[bad.as_os_str()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("NOT linearizable"), "{out}");
    assert_eq!(run(&[garbage.as_os_str()]).0, Some(2));
    assert_eq!(run(&[dir.join("missing").as_os_str()]).0, Some(2));
    assert_eq!(run(&[]).0, Some(2));
    std::fs::remove_dir_all(&dir).ok();
}
