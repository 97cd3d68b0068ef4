#!/usr/bin/env bash
# Provision a kind cluster, build and load the lockstep images, and run the e2e suite.
#
#   e2e/kind.sh            # create cluster "lockstep-e2e" (if missing), build, load, test
#   e2e/kind.sh --delete   # delete the cluster
#
# Needs: kind, kubectl, and a container engine (docker or podman). Without them it exits 0
# with a SKIP message, so CI machines without a container engine pass through.
set -euo pipefail

CLUSTER="${KIND_CLUSTER:-lockstep-e2e}"
TAG="${LOCKSTEP_E2E_TAG:-e2e}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPERATOR_IMAGE="ghcr.io/lockstep-dev/lockstep-operator:${TAG}"
REPLICA_IMAGE="ghcr.io/lockstep-dev/lockstep-replica:${TAG}"
REPLICA_IMAGE_NEXT="ghcr.io/lockstep-dev/lockstep-replica:${TAG}-next"

skip() {
  echo "SKIP: $*" >&2
  exit 0
}

engine=""
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
  engine=podman
  export KIND_EXPERIMENTAL_PROVIDER=podman
fi
command -v kind >/dev/null 2>&1 || skip "kind is not installed (https://kind.sigs.k8s.io)"
command -v kubectl >/dev/null 2>&1 || skip "kubectl is not installed"
[ -n "$engine" ] || skip "no working container engine (docker or podman)"

if [ "${1:-}" = "--delete" ]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  cat <<YAML | kind create cluster --name "$CLUSTER" --wait 120s --config=-
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
  - role: worker
YAML
fi
KUBECONFIG_FILE="$(mktemp)"
trap 'rm -f "$KUBECONFIG_FILE"' EXIT
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
export KUBECONFIG="$KUBECONFIG_FILE"

cd "$ROOT"
DOCKER_BUILDKIT=1 "$engine" build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
DOCKER_BUILDKIT=1 "$engine" build -f replica/Dockerfile -t "$REPLICA_IMAGE" .
# The rollout test needs a second image reference; the same build under another tag is
# enough to exercise stage -> seal -> replace -> resume.
"$engine" tag "$REPLICA_IMAGE" "$REPLICA_IMAGE_NEXT"
for image in "$OPERATOR_IMAGE" "$REPLICA_IMAGE" "$REPLICA_IMAGE_NEXT"; do
  kind load docker-image --name "$CLUSTER" "$image"
done

export LOCKSTEP_OPERATOR_IMAGE="$OPERATOR_IMAGE"
export LOCKSTEP_REPLICA_IMAGE="$REPLICA_IMAGE"
export LOCKSTEP_REPLICA_IMAGE_NEXT="$REPLICA_IMAGE_NEXT"
cargo test -p lockstep-operator --test e2e -- --ignored --test-threads=1 --nocapture
