//! The `lockstep` CLI as a user runs it, against a real local cluster: put/get/delete/cas,
//! `status -o json`, `watch` (the output-device stream) and `bench --history --check`.

mod common;

use common::{LocalCluster, lockstep_bin};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn cli(cluster: &LocalCluster, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(lockstep_bin())
        .arg("--data-dir")
        .arg(cluster.data_dir())
        .arg("-c")
        .arg(&cluster.name)
        .args(args)
        .output()
        .expect("run lockstep");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_commands_status_and_watch() {
    let cluster = LocalCluster::start("cli", 1, "kv", &["--quiet"]);

    // The watch stream, from a separate process, sees what the commands below apply.
    let mut watch = Command::new(lockstep_bin())
        .arg("--data-dir")
        .arg(cluster.data_dir())
        .args(["-c", "cli", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch");
    std::thread::sleep(Duration::from_millis(500));

    assert_eq!(
        cli(&cluster, &["put", "color", "red"]).1.trim(),
        "OK (previous: (none))"
    );
    assert_eq!(cli(&cluster, &["get", "color"]).1.trim(), "red");
    let (code, out, _) = cli(&cluster, &["cas", "color", "blue", "green"]);
    assert_eq!((code, out.trim()), (4, "NOT SWAPPED (current: red)"));
    let (code, out, _) = cli(&cluster, &["cas", "color", "red", "green"]);
    assert_eq!((code, out.trim()), (0, "SWAPPED (current: green)"));
    assert_eq!(cli(&cluster, &["delete", "color"]).1.trim(), "OK (previous: green)");
    let (code, _, err) = cli(&cluster, &["get", "color"]);
    assert_eq!((code, err.trim()), (3, "(not found)"));

    let (code, out, err) = cli(&cluster, &["status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(status["epoch"], cluster.epoch());
    assert_eq!(status["primary"], cluster.primary());
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 2);
    for m in members {
        assert_eq!(m["version"], "1.0.0");
        assert!(m["appliedIndex"].as_u64().unwrap_or(0) >= 4, "{m}");
    }

    // Unknown cluster: a clear error.
    let out = Command::new(lockstep_bin())
        .args(["--data-dir", "/nonexistent", "-c", "nope", "get", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no local cluster 'nope'"));

    // The watcher saw the four writes in order, with their outputs.
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let line = lines.next().expect("watch line").expect("read");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
        if v["kind"] == "command" {
            seen.push(v);
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let payloads: Vec<String> = seen
        .iter()
        .map(|v| v["command"]["payload"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        payloads[0].contains(r#""op":"put""#) && payloads[0].contains("red"),
        "{payloads:?}"
    );
    assert!(payloads[1].contains(r#""old":"blue""#));
    assert!(payloads[2].contains(r#""new":"green""#));
    assert!(payloads[3].contains("delete"));
    assert_eq!(seen[1]["output"], r#"{"current":"red","swapped":false}"#);
    let indexes: Vec<u64> = seen.iter().map(|v| v["index"].as_u64().unwrap_or(0)).collect();
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");

    // bench records a history and checks it; again on the same (now full) store, as a user
    // would: still linearizable, because each run's keys and values are its own.
    let bench_check = |file: &str| {
        let history = cluster.dir.path().join(file);
        let (code, out, err) = cli(
            &cluster,
            &[
                "bench",
                "--clients",
                "4",
                "--duration",
                "2",
                "--mix",
                "mixed",
                "--keys",
                "8",
                "--history",
                history.to_str().unwrap_or_default(),
                "--check",
            ],
        );
        assert_eq!(code, 0, "{file}: {out}\n{err}");
        assert!(out.contains("linearizable"), "{out}");
        assert!(std::fs::read_to_string(&history).expect("history").lines().count() > 10);
    };
    bench_check("bench.jsonl");
    bench_check("bench-again.jsonl");
}
