#!/usr/bin/env bash
# The Kubernetes end-to-end entry point: a real cluster, the images built from this
# workspace, the operator installed, the suite run, timings printed; on failure, everything a
# person needs to see why (operator log, events, RSMs, replica logs).
#
#   e2e/run.sh                 # cluster: the one-node kit (../shared/k8s) where present,
#                              # else kind where a container engine exists
#   e2e/run.sh --fresh         # start from an empty cluster (kit: down --purge; kind: recreate)
#   e2e/run.sh -- TEST_FILTER  # pass a filter (and other libtest args) to the suite
#
#   LOCKSTEP_E2E_CLUSTER=existing e2e/run.sh   # use $KUBECONFIG as it is; the images named by
#                                              # LOCKSTEP_*_IMAGE must be pullable there
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${K8S_KIT:-$ROOT/../shared/k8s}"
cd "$ROOT"

fresh=0
filter=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fresh) fresh=1; shift ;;
    --) shift; filter=("$@"); break ;;
    *) echo "usage: e2e/run.sh [--fresh] [-- TEST_FILTER...]" >&2; exit 2 ;;
  esac
done

step() { printf '\n== e2e: %s (%s)\n' "$*" "$(date +%T)"; }
started=$(date +%s)

have_engine() {
  { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; } ||
    { command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; }
}

KIT_STATE="${K8S_STATE:-/var/lib/k8s-kit}"
kit_pid_alive() { [ -f "$KIT_STATE/run/$1.pid" ] && kill -0 "$(cat "$KIT_STATE/run/$1.pid")" 2>/dev/null; }
kit_healthy() {
  local c
  for c in containerd etcd apiserver controller-manager scheduler kubelet kube-proxy volumes dns; do
    kit_pid_alive "$c" || return 1
  done
  curl -sf http://127.0.0.1:10256/healthz >/dev/null &&
    KUBECONFIG="$KIT_STATE/kubeconfig" kubectl get --raw /readyz >/dev/null 2>&1
}
# Starts the kit unless every component already runs. Two traps in running up.sh again:
# it rewrites kube-proxy's configuration file, which makes a running kube-proxy exit (after
# up.sh has seen it alive), so kube-proxy is stopped first and up.sh starts a fresh one; and
# its `ip addr show | grep -q` check can lose a SIGPIPE race under pipefail when the bridge
# address already exists ("Address already assigned", about 1 run in 10 here), so a failed
# up.sh is tried again, up to 20 times.
start_kit() {
  if kit_healthy; then echo "  the kit is already running"; return 0; fi
  if kit_pid_alive kube-proxy; then
    local proxy
    proxy="$(cat "$KIT_STATE/run/kube-proxy.pid")"
    kill "$proxy" || true
    for _ in $(seq 50); do kill -0 "$proxy" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$proxy" 2>/dev/null || true
  fi
  local attempt out
  out="$(mktemp)"
  for attempt in $(seq 20); do
    if "$KIT/up.sh" >"$out" 2>&1; then
      tail -n 2 "$out"
      break
    fi
    echo "e2e: the kit's up.sh failed (attempt $attempt of 20):" >&2
    tail -n 5 "$out" | sed 's/^/  /' >&2
    if [ "$attempt" = 20 ] || ! grep -q "Address already assigned" "$out"; then
      rm -f "$out"
      return 1
    fi
  done
  rm -f "$out"
  for _ in $(seq 60); do kit_healthy && return 0; sleep 1; done
  echo "e2e: the kit did not become healthy within 60 s (pid files in $KIT_STATE/run, logs in $KIT_STATE/logs)" >&2
  return 1
}

cluster="${LOCKSTEP_E2E_CLUSTER:-}"
if [ -z "$cluster" ]; then
  if [ -x "$KIT/up.sh" ] && [ "$(id -u)" = 0 ]; then
    cluster=kit
  elif command -v kind >/dev/null 2>&1 && have_engine; then
    cluster=kind
  else
    echo "e2e: no cluster: neither the one-node kit ($KIT/up.sh, run as root) nor kind with a container engine is available; set LOCKSTEP_E2E_CLUSTER=existing with a KUBECONFIG to use another cluster" >&2
    exit 1
  fi
fi

if ! command -v helm >/dev/null 2>&1 || ! command -v kubectl >/dev/null 2>&1; then
  # The Helm install test needs helm; .ci/install-tools fetches it (and kubectl when missing).
  PATH="$(bash .ci/install-tools):$PATH"
  export PATH
fi
command -v kubectl >/dev/null 2>&1 || {
  echo "e2e: kubectl is not on PATH (.ci/install-tools installs it)" >&2
  exit 1
}

case "$cluster" in
  kit)
    step "starting the one-node Kubernetes kit"
    if [ "$fresh" = 1 ]; then "$KIT/down.sh" --purge; fi
    start_kit
    export KUBECONFIG="${K8S_STATE:-/var/lib/k8s-kit}/kubeconfig"
    step "building and loading images"
    bash e2e/images.sh kit
    ;;
  kind)
    export KIND_CLUSTER="${KIND_CLUSTER:-lockstep-e2e}"
    if [ "$fresh" = 1 ]; then kind delete cluster --name "$KIND_CLUSTER" || true; fi
    if ! kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
      step "creating kind cluster $KIND_CLUSTER"
      printf 'kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n  - role: control-plane\n  - role: worker\n  - role: worker\n  - role: worker\n' |
        kind create cluster --name "$KIND_CLUSTER" --wait 180s --config=-
    fi
    kcfg="$(mktemp)"
    trap 'rm -f "$kcfg"' EXIT
    kind get kubeconfig --name "$KIND_CLUSTER" >"$kcfg"
    export KUBECONFIG="$kcfg"
    if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
      export CONTAINER_ENGINE=podman KIND_EXPERIMENTAL_PROVIDER=podman
    fi
    step "building and loading images"
    bash e2e/images.sh kind
    ;;
  existing)
    : "${KUBECONFIG:?LOCKSTEP_E2E_CLUSTER=existing needs KUBECONFIG}"
    ;;
  *)
    echo "e2e: unknown LOCKSTEP_E2E_CLUSTER=$cluster (kit, kind, existing)" >&2
    exit 2
    ;;
esac
kubectl version 2>/dev/null | sed 's/^/  /' || true
# The test `cert_manager` plays cert-manager's part itself (a stand-in CRD and issuer; the kit
# cannot pull cert-manager's images); with LOCKSTEP_E2E_CERT_MANAGER=real (the kind workflow)
# the real cert-manager is installed here and the test uses it.
if [ "${LOCKSTEP_E2E_CERT_MANAGER:-}" = real ]; then
  step "installing cert-manager (LOCKSTEP_E2E_CERT_MANAGER=real)"
  bash e2e/cert-manager.sh
fi
if [ -d target/e2e-images/bin ]; then
  # Rolls the operator when its image was rebuilt under the same tag (e2e/src/lib.rs).
  LOCKSTEP_E2E_BUILD="$(cat target/e2e-images/bin/* | sha256sum | cut -c1-16)"
  export LOCKSTEP_E2E_BUILD
fi
ready_at=$(date +%s)

diagnostics() {
  step "FAILED — diagnostics"
  local ns
  for ns in $(kubectl get ns -o name | sed 's|namespace/||' | grep -E '^lockstep-'); do
    echo "---- namespace $ns: objects"
    kubectl -n "$ns" get rsm,pods,svc,pvc,pdb,leases -o wide 2>&1 || true
    echo "---- namespace $ns: RSMs"
    kubectl -n "$ns" get rsm -o yaml 2>&1 | sed -n '1,400p' || true
    echo "---- namespace $ns: events"
    kubectl -n "$ns" get events --sort-by=.lastTimestamp 2>&1 | tail -n 80 || true
    local pod
    for pod in $(kubectl -n "$ns" get pods -o name 2>/dev/null); do
      echo "---- $ns/$pod: log (last 60 lines)"
      kubectl -n "$ns" logs "$pod" --all-containers --tail=60 2>&1 || true
      kubectl -n "$ns" logs "$pod" --all-containers --previous --tail=30 2>/dev/null | sed 's/^/[previous] /' || true
    done
  done
}

timings="$(mktemp)"
export LOCKSTEP_E2E_TIMINGS="$timings"
# The fault injector pod outlives runs; recreate it so it runs the tool just built.
kubectl -n lockstep-e2e-faults delete pod lockstep-e2e-tool --ignore-not-found --wait=true >/dev/null
# Known failing tests, left out of the default run with the reason (none today). A filter
# given on the command line runs what it names, known failing or not.
known_failing=()
if [ "${#filter[@]}" -gt 0 ]; then known_failing=(); fi
step "running the suite"
# Each line of the suite's output is stamped with the time it ended, so a CI log shows how
# long each test took.
set +e
cargo test --locked -p lockstep-e2e --test e2e -- --ignored --test-threads=1 --nocapture \
  "${known_failing[@]}" "${filter[@]}" 2>&1 |
  while IFS= read -r line || [ -n "$line" ]; do printf '[%(%T)T] %s\n' -1 "$line"; done
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
  diagnostics
fi
step "timings"
sed 's/^E2E-TIMING /  /' "$timings"
echo "  cluster + images ready: $((ready_at - started)) s; suite: $(($(date +%s) - ready_at)) s"
rm -f "$timings"
exit "$rc"
