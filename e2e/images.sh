#!/usr/bin/env bash
# Build the images the e2e suite runs, from the workspace's binaries, and load them into the
# cluster. Each image holds the same runtime content as the Dockerfiles' final stage
# (the binary, the glibc it links, a nonroot user 65532, /data for replicas) — without the
# Dockerfiles' build stage, so no container engine is needed to build.
#
#   e2e/images.sh kit    # load with ../shared/k8s/image.sh into the kit's containerd
#   e2e/images.sh kind   # docker/podman build + kind load (cluster $KIND_CLUSTER)
#
# LOCKSTEP_E2E_PROFILE picks the cargo profile of the binaries: `dev` (the default) or
# `release`. Debug binaries share every dependency with `cargo test --workspace`, which CI has
# built just before, so they cost about 3 minutes of compiling where a release build from a
# clean checkout costs far more (docs/e2e-debug-binaries.md). Release images are what the
# Dockerfiles ship; run with LOCKSTEP_E2E_PROFILE=release to test exactly those binaries.
#
# Images (tag $LOCKSTEP_E2E_TAG, default e2e):
#   ghcr.io/lockstep-dev/lockstep-operator:TAG
#   ghcr.io/lockstep-dev/lockstep-replica:TAG            built-in machines report 1.0.0
#   ghcr.io/lockstep-dev/lockstep-replica:TAG-promoted   the same image, a second tag
#   ghcr.io/lockstep-dev/lockstep-replica:TAG-next       kv 1.1.0 (replica/examples/kv_next.rs)
#   ghcr.io/lockstep-dev/lockstep-replica:TAG-inject     TAG with the test-only cargo feature
#   ghcr.io/lockstep-dev/lockstep-replica:TAG-inject-next  fault-injection (never released)
#   ghcr.io/lockstep-dev/lockstep-e2e-tools:TAG          lockstep, lockstep-check, lockstep-e2e-tool
set -euo pipefail

mode="${1:?usage: e2e/images.sh kit|kind}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="${LOCKSTEP_E2E_TAG:-e2e}"
REG="ghcr.io/lockstep-dev"
KIT="${K8S_KIT:-$ROOT/../shared/k8s}"
cd "$ROOT"

step() { printf '== %s\n' "$*" >&2; }

profile="${LOCKSTEP_E2E_PROFILE:-dev}"
case "$profile" in
  dev) bin_dir=target/debug ;;
  release) bin_dir=target/release ;;
  *) echo "e2e/images.sh: LOCKSTEP_E2E_PROFILE=$profile (dev or release)" >&2; exit 2 ;;
esac
cargo_build() { cargo build --locked --profile "$profile" "$@"; }

step "$profile build: operator, replica (and the kv 1.1.0 example), CLI, checker, e2e tool"
# One cargo invocation, always the same package set: features unify the same way every time,
# so nothing is rebuilt twice.
cargo_build \
  -p lockstep-operator --bin lockstep-operator \
  -p lockstep-replica --bin lockstep-replica --example kv_next \
  -p lockstep --bin lockstep \
  -p lockstep-linearizability --bin lockstep-check \
  -p lockstep-e2e --bin lockstep-e2e-tool
out="$ROOT/target/e2e-images"
rm -rf "$out"
mkdir -p "$out/bin" "$out/next"
cp "$bin_dir/lockstep-operator" "$bin_dir/lockstep-replica" "$bin_dir/lockstep" \
  "$bin_dir/lockstep-check" "$bin_dir/lockstep-e2e-tool" "$out/bin/"
# A replica whose machine reports kv 1.1.0 (replica/examples/kv_next.rs), as a user's next
# release would: the rollout test checks that the operator sees what replicas run.
cp "$bin_dir/examples/kv_next" "$out/next/lockstep-replica"

step "$profile build with the test-only feature fault-injection (the Byzantine rollout test)"
# Its own feature set of lockstep-replica: cargo keeps both builds' artifacts side by side,
# so neither invocation rebuilds the other's.
cargo_build -p lockstep-replica --features fault-injection --bin lockstep-replica --example kv_next
mkdir -p "$out/inject" "$out/inject-next"
cp "$bin_dir/lockstep-replica" "$out/inject/lockstep-replica"
cp "$bin_dir/examples/kv_next" "$out/inject-next/lockstep-replica"

# rootfs DIR BINARY... : the binaries in /usr/local/bin, their shared libraries, the nonroot
# user, /tmp and /data (owned by 65532).
rootfs() {
  local dir="$1"
  shift
  mkdir -p "$dir/usr/local/bin" "$dir/etc" "$dir/tmp" "$dir/data"
  chmod 1777 "$dir/tmp"
  local bin lib
  for bin in "$@"; do
    cp "$bin" "$dir/usr/local/bin/"
    for lib in $(ldd "$bin" | grep -o '/[^ ]*' | sort -u); do
      cp -L --parents "$lib" "$dir/"
    done
  done
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
  chown 65532:65532 "$dir/data"
}

rootfs "$out/operator" "$out/bin/lockstep-operator"
rootfs "$out/replica" "$out/bin/lockstep-replica"
rootfs "$out/replica-next" "$out/next/lockstep-replica"
rootfs "$out/replica-inject" "$out/inject/lockstep-replica"
rootfs "$out/replica-inject-next" "$out/inject-next/lockstep-replica"
rootfs "$out/tools" "$out/bin/lockstep" "$out/bin/lockstep-check" "$out/bin/lockstep-e2e-tool"

replica_cmd=(--cmd --listen --cmd 0.0.0.0:7000 --cmd --http --cmd 0.0.0.0:8080 --cmd --data-dir --cmd /data)

load_kit() {
  local dir="$1"
  shift
  "$KIT/image.sh" "$dir" "$@" >&2
}

load_kind() {
  # load_kind DIR REF... --entrypoint E [--cmd C]... [--user U] [--port P]...
  local dir="$1"
  shift
  local refs=() entry="" cmd=() user="" ports=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --entrypoint) entry="$2"; shift 2 ;;
      --cmd) cmd+=("\"$2\""); shift 2 ;;
      --user) user="$2"; shift 2 ;;
      --port) ports+=("${2%/tcp}"); shift 2 ;;
      *) refs+=("$1"); shift ;;
    esac
  done
  local engine="${CONTAINER_ENGINE:-docker}"
  {
    echo "FROM scratch"
    echo "COPY . /"
    [ -n "$user" ] && echo "USER $user"
    [ ${#ports[@]} -gt 0 ] && echo "EXPOSE ${ports[*]}"
    echo "ENTRYPOINT [\"$entry\"]"
    if [ ${#cmd[@]} -gt 0 ]; then
      local IFS=,
      echo "CMD [${cmd[*]}]"
    fi
  } >"$dir.Dockerfile"
  local tags=()
  for r in "${refs[@]}"; do tags+=(-t "$r"); done
  "$engine" build -q -f "$dir.Dockerfile" "${tags[@]}" "$dir" >&2
  for r in "${refs[@]}"; do
    kind load docker-image --name "${KIND_CLUSTER:-lockstep-e2e}" "$r" >&2
  done
}

case "$mode" in
  kit) load=load_kit ;;
  kind) load=load_kind ;;
  *) echo "usage: e2e/images.sh kit|kind" >&2; exit 2 ;;
esac

step "loading images ($mode)"
$load "$out/operator" "$REG/lockstep-operator:$TAG" \
  --entrypoint /usr/local/bin/lockstep-operator --user 65532:65532 --port 8080/tcp
$load "$out/replica" "$REG/lockstep-replica:$TAG" "$REG/lockstep-replica:$TAG-promoted" \
  --entrypoint /usr/local/bin/lockstep-replica "${replica_cmd[@]}" --user 65532:65532 --port 7000/tcp --port 8080/tcp
$load "$out/replica-next" "$REG/lockstep-replica:$TAG-next" \
  --entrypoint /usr/local/bin/lockstep-replica "${replica_cmd[@]}" --user 65532:65532 --port 7000/tcp --port 8080/tcp
$load "$out/replica-inject" "$REG/lockstep-replica:$TAG-inject" \
  --entrypoint /usr/local/bin/lockstep-replica "${replica_cmd[@]}" --user 65532:65532 --port 7000/tcp --port 8080/tcp
$load "$out/replica-inject-next" "$REG/lockstep-replica:$TAG-inject-next" \
  --entrypoint /usr/local/bin/lockstep-replica "${replica_cmd[@]}" --user 65532:65532 --port 7000/tcp --port 8080/tcp
$load "$out/tools" "$REG/lockstep-e2e-tools:$TAG" \
  --entrypoint /usr/local/bin/lockstep-e2e-tool --cmd idle --user 65532:65532
