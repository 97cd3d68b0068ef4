#!/usr/bin/env bash
# Static checks of everything under crds/, manifests/ and charts/ (no cluster needed):
#   yamllint, kubernetes-validate (strict, against Kubernetes 1.33), helm lint + template,
#   the examples against the CRD's own openAPIV3Schema with check-jsonschema, and the chart's
#   alerts and Grafana dashboard (e2e/check-observability.py).
# Tools: pip install yamllint kubernetes-validate check-jsonschema promql-parser; kubectl (kustomize) and
# helm v4 on PATH (or $HELM).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
HELM="${HELM:-helm}"
K8S_VERSION="${K8S_VERSION:-1.33.0}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

yamllint -d '{extends: relaxed, rules: {line-length: disable}}' crds manifests charts/lockstep/values.yaml charts/lockstep/Chart.yaml charts/lockstep/files .github

# The kustomizations build (what `kubectl apply -k` and GitOps tools read), and what they
# build is valid.
kubectl kustomize crds/ >"$tmp/crds.yaml"
kubectl kustomize manifests/ >"$tmp/install.yaml"
kubectl kustomize manifests/examples/ >"$tmp/examples.yaml"
kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$tmp/crds.yaml" "$tmp/install.yaml"

"$HELM" lint charts/lockstep
"$HELM" lint charts/lockstep --set metrics.serviceMonitor.enabled=true
"$HELM" lint charts/lockstep --set metrics.replicaPodMonitor.enabled=true
"$HELM" lint charts/lockstep --set metrics.replicaPodMonitor.enabled=true --set 'metrics.replicaPodMonitor.namespaces={a,b}'
"$HELM" lint charts/lockstep --set metrics.prometheusRule.enabled=true --set metrics.grafanaDashboard.enabled=true
# Alerts parse as PromQL over metrics the code registers; the dashboard parses and shows them.
python3 e2e/check-observability.py "$HELM"
"$HELM" template lockstep charts/lockstep --namespace lockstep-system >"$tmp/chart.yaml"
# ServiceMonitor is a prometheus-operator CRD, not in the Kubernetes schemas: validate the rest.
kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$tmp/chart.yaml"
# One least-privilege ClusterRole, two install paths: the chart's rules are the manifests' rules.
# Both operator Deployments satisfy Pod Security Admission `restricted` (explicitly, not by the
# image's defaults), and the chart renders the networkPolicy switch.
python3 - "$tmp/install.yaml" "$tmp/chart.yaml" <<'PY'
import sys, yaml
def docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]
def one(ds, kind):
    found = [d for d in ds if d["kind"] == kind]
    assert len(found) == 1, f"one {kind}, found {len(found)}"
    return found[0]
install, chart = docs(sys.argv[1]), docs(sys.argv[2])
if one(install, "ClusterRole")["rules"] != one(chart, "ClusterRole")["rules"]:
    sys.exit("the chart's ClusterRole rules differ from manifests/01-rbac.yaml")
for name, ds in (("manifests", install), ("chart", chart)):
    spec = one(ds, "Deployment")["spec"]["template"]["spec"]
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True and isinstance(pod.get("runAsUser"), int) and pod["runAsUser"] > 0, name
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    for c in spec["containers"]:
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
PY
"$HELM" template lockstep charts/lockstep --set networkPolicy.enabled=false >"$tmp/no-policy.yaml"
if ! grep -q -- '--network-policy=false' "$tmp/no-policy.yaml"; then
  echo "chart: networkPolicy.enabled=false must reach the operator as --network-policy=false" >&2
  exit 1
fi
# NOTES shows the replica image the operator will use.
# (Into a file first: `helm ... | grep -q` fails under pipefail when grep exits early.)
"$HELM" install --dry-run=client lockstep charts/lockstep --set replicaImage=registry.example/replica:9 >"$tmp/notes.txt"
if ! grep -q 'image: registry.example/replica:9}' "$tmp/notes.txt"; then
  echo "chart NOTES must show the configured replicaImage" >&2
  exit 1
fi
# values.schema.json: a value of the wrong type fails with a message naming it.
for bad in replicaCount=two image.pullPolicy=Sometimes leaderElection.enabled=maybe networkPolicy.enabled=maybe; do
  if "$HELM" template lockstep charts/lockstep --set "$bad" >/dev/null 2>&1; then
    echo "charts/lockstep/values.schema.json must reject --set $bad" >&2
    exit 1
  fi
done
if "$HELM" template lockstep charts/lockstep --set replicaCount=2 --set leaderElection.enabled=false >/dev/null 2>&1; then
  echo "chart must refuse replicaCount > 1 without leader election" >&2
  exit 1
fi

# The examples against the CRD schema (structure, enums, types; CEL rules are covered by
# the Rust tests, which evaluate them with kube-cel).
python3 - "$tmp/schema.json" <<'PY'
import json, sys, yaml
crd = yaml.safe_load(open("crds/replicatedstatemachines.lockstep.dev.yaml"))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
def strip(s):
    if isinstance(s, dict):
        s = {k: strip(v) for k, v in s.items() if not k.startswith("x-kubernetes-")}
        if s.pop("nullable", False) and "type" in s:
            s["type"] = [s["type"], "null"]
        return s
    if isinstance(s, list):
        return [strip(v) for v in s]
    return s
schema = strip(schema)
schema["properties"]["metadata"] = {"type": "object"}
schema["properties"]["apiVersion"] = {"const": "lockstep.dev/v1alpha1"}
schema["properties"]["kind"] = {"const": "ReplicatedStateMachine"}
json.dump(schema, open(sys.argv[1], "w"))
PY
examples=()
for f in manifests/examples/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || examples+=("$f")
done
check-jsonschema --schemafile "$tmp/schema.json" "${examples[@]}"
echo "manifests, chart and examples are valid"
