//! "Where one write's time goes": the per-stage histograms of a replica
//! (`lockstep_replica_write_stage_seconds{stage}`, see `replica/src/stages.rs`), as deltas of
//! two `/metrics` scrapes taken before and after a run.

/// The histogram family, without its `_bucket`/`_sum`/`_count` suffix.
pub const FAMILY: &str = "lockstep_replica_write_stage_seconds";

/// One stage of one node over one run.
#[derive(serde::Serialize, Debug, Clone, PartialEq)]
pub struct StageStats {
    pub stage: String,
    pub count: u64,
    pub mean_ms: f64,
    /// Estimated from the bucket counts (linear within a bucket, as Prometheus'
    /// `histogram_quantile`): good to about a factor of 2 (the buckets double).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The stages of one node over one run, in the order of a write's life.
#[derive(serde::Serialize, Debug, Clone)]
pub struct NodeStages {
    pub node: String,
    pub stages: Vec<StageStats>,
    /// Mean time in the Execute handler over the run (`request_seconds{method="Execute"}`),
    /// which the stages in sequence add up to.
    pub execute_mean_ms: Option<f64>,
}

/// The stages a replica exports, in the order of a write's life, each with what it is in a
/// few words.
const STAGES: [(&str, &str); 9] = [
    ("receive", "(before) headers in -> handler"),
    ("validate", "handler -> validated, ordered"),
    ("queue", "ordered -> storage batch starts"),
    ("local_fsync", "write + fsync here"),
    ("replicate", "(beside) sent -> last backup ack"),
    ("commit_wait", "durable here -> committed"),
    ("apply", "committed -> applied"),
    ("reply", "applied -> handler returns"),
    ("backup_append", "Append in -> durable -> ack"),
];

/// The value of the sample `series` (name and labels exactly as exported), 0 if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One histogram as parsed from a scrape: per stage, (upper bound, cumulative count) pairs,
/// sum and count.
#[derive(Default, Debug)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

/// The `FAMILY{stage=...}` histograms of one scrape, by stage.
fn parse(text: &str) -> Vec<(String, Histogram)> {
    let mut out: Vec<(String, Histogram)> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(FAMILY) else {
            continue;
        };
        let Some((series, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let Some((suffix, labels)) = series.split_once('{') else {
            continue;
        };
        let label = |key: &str| {
            labels.trim_end_matches('}').split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let Some(stage) = label("stage") else { continue };
        let i = match out.iter().position(|(s, _)| *s == stage) {
            Some(i) => i,
            None => {
                out.push((stage, Histogram::default()));
                out.len() - 1
            }
        };
        let h = &mut out[i].1;
        match suffix {
            "_sum" => h.sum = value,
            "_count" => h.count = value,
            "_bucket" => {
                let le = label("le").map_or(f64::INFINITY, |le| le.parse().unwrap_or(f64::INFINITY));
                h.buckets.push((le, value));
            }
            _ => {}
        }
    }
    for (_, h) in &mut out {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The `q` quantile of cumulative `buckets`, in seconds. Past the last finite bound it
/// answers that bound (the true value is larger).
fn quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else { return 0.0 };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let in_bucket = cum - lower.1;
            let frac = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return lower.0 + (le - lower.0) * frac;
        }
        lower = (le, cum);
    }
    lower.0
}

/// Per-stage figures of one node from the scrapes `before` and `after` a run; stages with no
/// observation during the run are left out (a backup has one stage, a primary seven).
pub fn node_stages(node: &str, before: &str, after: &str) -> NodeStages {
    let execute = |suffix: &str| {
        let series = format!("lockstep_replica_request_seconds_{suffix}{{method=\"Execute\"}}");
        sample(after, &series) - sample(before, &series)
    };
    let executes = execute("count");
    let execute_mean_ms = (executes > 0.0).then(|| execute("sum") / executes * 1000.0);
    let before = parse(before);
    let mut stages: Vec<StageStats> = parse(after)
        .into_iter()
        .filter_map(|(stage, a)| {
            let b = before.iter().find(|(s, _)| *s == stage).map(|(_, h)| h);
            let count = a.count - b.map_or(0.0, |b| b.count);
            if count <= 0.0 {
                return None;
            }
            let sum = a.sum - b.map_or(0.0, |b| b.sum);
            let buckets: Vec<(f64, f64)> = a
                .buckets
                .iter()
                .map(|&(le, cum)| {
                    let was = b
                        .and_then(|b| b.buckets.iter().find(|(l, _)| *l == le))
                        .map_or(0.0, |&(_, c)| c);
                    (le, cum - was)
                })
                .collect();
            Some(StageStats {
                stage,
                count: count as u64,
                mean_ms: sum / count * 1000.0,
                p50_ms: quantile(0.5, &buckets) * 1000.0,
                p99_ms: quantile(0.99, &buckets) * 1000.0,
            })
        })
        .collect();
    stages.sort_by_key(|s| STAGES.iter().position(|(name, _)| *name == s.stage));
    NodeStages {
        node: node.to_string(),
        stages,
        execute_mean_ms,
    }
}

/// What a stage is, in a few words, for the printed table.
pub fn meaning(stage: &str) -> &'static str {
    STAGES.iter().find(|(name, _)| *name == stage).map_or("", |(_, m)| m)
}

/// The stages that follow one another at the primary (`replicate` runs beside them): their
/// means add up to about the Execute handler's mean.
pub fn in_sequence(stage: &str) -> bool {
    matches!(
        stage,
        "validate" | "queue" | "local_fsync" | "commit_wait" | "apply" | "reply"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP lockstep_replica_write_stage_seconds x
lockstep_replica_write_stage_seconds_sum{stage="apply"} 1.0
lockstep_replica_write_stage_seconds_count{stage="apply"} 10
lockstep_replica_write_stage_seconds_bucket{le="0.001",stage="apply"} 10
lockstep_replica_write_stage_seconds_bucket{le="0.002",stage="apply"} 10
lockstep_replica_write_stage_seconds_bucket{le="+Inf",stage="apply"} 10
lockstep_replica_request_seconds_sum{method="Execute"} 2.0
lockstep_replica_request_seconds_count{method="Execute"} 10
lockstep_replica_write_stage_seconds_sum{stage="reply"} 0.0
lockstep_replica_write_stage_seconds_count{stage="reply"} 0
lockstep_replica_write_stage_seconds_bucket{le="0.001",stage="reply"} 0
lockstep_replica_write_stage_seconds_bucket{le="+Inf",stage="reply"} 0
"#;

    #[test]
    fn deltas_give_mean_and_quantiles_of_the_run_only() {
        // During the run: 100 more apply observations, 50 in (1, 2] ms and 50 past the last bound.
        let after = BEFORE
            .replace(r#"sum{stage="apply"} 1.0"#, r#"sum{stage="apply"} 1.3"#)
            .replace(r#"count{stage="apply"} 10"#, r#"count{stage="apply"} 110"#)
            .replace(r#"le="0.002",stage="apply"} 10"#, r#"le="0.002",stage="apply"} 60"#)
            .replace(r#"le="+Inf",stage="apply"} 10"#, r#"le="+Inf",stage="apply"} 110"#);
        let after = after
            .replace(
                r#"seconds_sum{method="Execute"} 2.0"#,
                r#"seconds_sum{method="Execute"} 2.5"#,
            )
            .replace(
                r#"seconds_count{method="Execute"} 10"#,
                r#"seconds_count{method="Execute"} 110"#,
            );
        let n = node_stages("p", BEFORE, &after);
        assert_eq!(n.execute_mean_ms, Some(5.0));
        assert_eq!(n.stages.len(), 1, "reply saw nothing during the run: {n:?}");
        let s = &n.stages[0];
        assert_eq!((s.stage.as_str(), s.count), ("apply", 100));
        assert!((s.mean_ms - 3.0).abs() < 1e-9, "{s:?}");
        assert!(
            (s.p50_ms - 2.0).abs() < 1e-9,
            "the 50th of 100 is the last in (1, 2] ms: {s:?}"
        );
        assert!((s.p99_ms - 2.0).abs() < 1e-9, "past the last bound: that bound: {s:?}");
    }

    #[test]
    fn quantile_interpolates_within_a_bucket() {
        let b = [(0.001, 0.0), (0.002, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &b) - 0.0015).abs() < 1e-12);
        assert_eq!(quantile(0.5, &[]), 0.0);
    }
}
