#!/usr/bin/env python3
"""Checks the chart's alerts and dashboard (no cluster, no Prometheus needed).

- charts/lockstep/files/prometheus-rules.yaml: the structure of a Prometheus rules file, every
  expression parsed by a PromQL parser (PyPI promql-parser, bindings of the Rust crate that
  GreptimeDB uses), every `for` a valid duration, the four expected alerts present; and
  `promtool check rules` as well when promtool is on PATH.
- charts/lockstep/files/grafana-dashboard.json: parses as JSON, has the expected panels,
  every query parses as PromQL (Grafana variables substituted).
- Every lockstep_* metric named by either exists in the code (a `register("...")` of
  operator/src or replica/src, with the operator's or replica's prefix).
- The chart renders both (helm template with the values on) to exactly these files.

Usage: check-observability.py [HELM]  (HELM defaults to `helm`; skipped when absent)
"""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import promql_parser
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "charts/lockstep/files/prometheus-rules.yaml"
DASHBOARD = ROOT / "charts/lockstep/files/grafana-dashboard.json"
ALERTS = {"LockstepRSMDegraded", "LockstepRedundancyLost", "LockstepRolloutStuck", "LockstepReplicaLagging"}
PANEL_METRICS = {
    "lockstep_operator_rsm_desired_replicas",
    "lockstep_operator_rsm_ready_replicas",
    "lockstep_operator_rsm_epoch",
    "lockstep_operator_rsm_degraded",
    "lockstep_operator_rsm_rollout_phase",
    "lockstep_operator_rsm_seconds_since_failover",
    "lockstep_replica_commit_index",
    "lockstep_replica_applied_index",
    "lockstep_replica_request_seconds_bucket",
    "lockstep_replica_fsync_seconds_bucket",
}
SUFFIXES = ("", "_bucket", "_count", "_sum", "_total")
errors = []


def fail(msg):
    errors.append(msg)


def registered_metrics():
    names = set()
    for crate, prefix in (("operator", "lockstep_operator_"), ("replica", "lockstep_replica_")):
        for src in (ROOT / crate / "src").rglob("*.rs"):
            for name in re.findall(r'\.register\(\s*"([a-z0-9_]+)"', src.read_text()):
                names.add(prefix + name)
    return names


def metric_names(expr):
    return set(re.findall(r"\blockstep_[a-z0-9_]+", expr))


def check_expr(where, expr, known):
    try:
        promql_parser.parse(expr)
    except ValueError as e:
        fail(f"{where}: PromQL does not parse: {e}: {expr}")
    for name in metric_names(expr):
        if not any(name == k + s for k in known for s in SUFFIXES):
            fail(f"{where}: metric {name} is not registered in operator/src or replica/src")


def check_rules(known):
    doc = yaml.safe_load(RULES.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        return fail(f"{RULES}: needs a top-level `groups` list")
    alerts = set()
    for g in doc["groups"]:
        if not isinstance(g.get("name"), str) or not isinstance(g.get("rules"), list):
            fail(f"{RULES}: every group needs a name and a rules list: {g}")
            continue
        for r in g["rules"]:
            name = r.get("alert") or r.get("record")
            if not name or set(r) - {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}:
                fail(f"{RULES}: bad rule keys {sorted(r)}")
                continue
            if "alert" in r:
                alerts.add(name)
                if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                    fail(f"{RULES}: {name}: labels.severity must be critical, warning or info")
                if not r.get("annotations", {}).get("summary"):
                    fail(f"{RULES}: {name}: needs annotations.summary")
            if "for" in r:
                try:
                    promql_parser.parse_duration(str(r["for"]))
                except ValueError as e:
                    fail(f"{RULES}: {name}: for: {e}")
            check_expr(f"{RULES}: {name}", str(r.get("expr", "")), known)
    if ALERTS - alerts:
        fail(f"{RULES}: missing alerts {sorted(ALERTS - alerts)}")
    if shutil.which("promtool"):
        subprocess.run(["promtool", "check", "rules", str(RULES)], check=True)


def grafana_to_promql(expr):
    return expr.replace("${datasource}", "x").replace("$namespace", ".*").replace("$rsm", ".*")


def check_dashboard(known):
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    panels = dash.get("panels") or fail(f"{DASHBOARD}: no panels") or []
    for p in panels:
        targets = p.get("targets") or []
        if not p.get("title") or not targets:
            fail(f"{DASHBOARD}: panel {p.get('id')} needs a title and targets")
        for t in targets:
            expr = grafana_to_promql(t.get("expr", ""))
            check_expr(f"{DASHBOARD}: panel {p.get('title')!r}", expr, known)
            used |= metric_names(expr)
    if PANEL_METRICS - used:
        fail(f"{DASHBOARD}: no panel shows {sorted(PANEL_METRICS - used)}")


def check_chart(helm):
    if not shutil.which(helm):
        print(f"check-observability: {helm} not found, chart rendering not checked")
        return
    out = subprocess.run(
        [helm, "template", "lockstep", str(ROOT / "charts/lockstep"),
         "--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.grafanaDashboard.enabled=true"],
        check=True, capture_output=True, text=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    if docs.get("PrometheusRule", {}).get("spec") != yaml.safe_load(RULES.read_text()):
        fail("the chart's PrometheusRule differs from files/prometheus-rules.yaml")
    dashboards = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap" and "lockstep.json" in d.get("data", {})]
    if len(dashboards) != 1 or json.loads(dashboards[0]["data"]["lockstep.json"]) != json.loads(DASHBOARD.read_text()):
        fail("the chart's dashboard ConfigMap differs from files/grafana-dashboard.json")
    default = subprocess.run([helm, "template", "lockstep", str(ROOT / "charts/lockstep")],
                             check=True, capture_output=True, text=True).stdout
    if "PrometheusRule" in default or "lockstep.json" in default:
        fail("the alerts and the dashboard must be off by default")


def main():
    known = registered_metrics()
    check_rules(known)
    check_dashboard(known)
    check_chart(sys.argv[1] if len(sys.argv) > 1 else "helm")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print("alerts and dashboard are valid")


if __name__ == "__main__":
    main()
