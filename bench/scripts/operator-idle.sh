#!/usr/bin/env bash
# The operator's cost at rest: N idle fail-stop RSMs (t = 1, 2 pods each), then the operator
# leader's resident memory and Kubernetes API requests per minute over WINDOW seconds, read
# from its /metrics through the API server's pod proxy (works on any cluster). Numbers, not
# pass/fail. Needs the operator installed (e2e/run.sh leaves it installed) and the replica
# image present on the nodes.
#
#   KUBECONFIG=/var/lib/k8s-kit/kubeconfig bench/scripts/operator-idle.sh   # N=20 WINDOW=60
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-20}
WINDOW=${WINDOW:-60}
NS=${NS:-lockstep-bench-idle}
IMAGE=${LOCKSTEP_REPLICA_IMAGE:-ghcr.io/lockstep-dev/lockstep-replica:e2e}
OPNS=lockstep-system

metrics() { # the leader's /metrics
    local leader
    leader=$(kubectl -n "$OPNS" get lease lockstep-operator -o jsonpath='{.spec.holderIdentity}')
    kubectl get --raw "/api/v1/namespaces/$OPNS/pods/$leader:8080/proxy/metrics"
}
requests() { metrics | awk '/^lockstep_operator_kube_api_requests_total/ {s += $2} END {print s + 0}'; }
rss() { metrics | awk '/^lockstep_operator_resident_memory_bytes/ {print $2}'; }

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
trap 'kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true' EXIT
echo "operator before: rss $(( $(rss) / 1024 / 1024 )) MiB"
for i in $(seq 1 "$N"); do
    cat <<EOF
apiVersion: lockstep.dev/v1alpha1
kind: ReplicatedStateMachine
metadata: {name: idle-$i, namespace: $NS}
spec:
  faultsTolerated: 1
  failureModel: FailStop
  machine: {name: kv, version: "1.0.0", image: "$IMAGE"}
---
EOF
done | kubectl apply -f - >/dev/null
echo "created $N RSMs; waiting for Ready"
kubectl -n "$NS" wait rsm --all --for=condition=Ready --timeout=900s >/dev/null
echo "all $N Ready; measuring for ${WINDOW}s"
r0=$(requests)
sleep "$WINDOW"
r1=$(requests)
echo "idle RSMs: $N"
echo "operator rss: $(( $(rss) / 1024 / 1024 )) MiB"
awk -v a="$r0" -v b="$r1" -v w="$WINDOW" 'BEGIN {printf "API requests/min: %.1f (%.2f per RSM)\n", (b - a) * 60 / w, (b - a) * 60 / w / '"$N"'}'
