#!/usr/bin/env bash
# What mutual TLS costs: two local clusters of the example (kv, t = 1, fsync on) side by side,
# one `lockstep up` (TLS, the default) and one `lockstep up --insecure`, driven alternately by
# `lockstep bench` (write mix, 256-byte values) with 1, 8 and 64 clients. docs/benchmarks.md.
#
#   cargo build --release -p lockstep && bench/tls-compare.sh [SECONDS] [WORK_DIR]
set -euo pipefail
secs="${1:-10}"
work="${2:-$(mktemp -d /var/tmp/lockstep-tls-XXXXXX)}"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release/lockstep"
manifest="$root/manifests/examples/kv-failstop.yaml"
[ -x "$bin" ] || { echo "build first: cargo build --release -p lockstep" >&2; exit 1; }
mkdir -p "$work/tls" "$work/plain"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT
"$bin" up "$manifest" --data-dir "$work/tls" --quiet >"$work/tls.log" 2>&1 &
pids+=("$!")
"$bin" up --insecure "$manifest" --data-dir "$work/plain" --quiet >"$work/plain.log" 2>&1 &
pids+=("$!")
for mode in tls plain; do
  for _ in $(seq 1 100); do
    "$bin" --data-dir "$work/$mode" -c kv put ready 1 >/dev/null 2>&1 && break
    sleep 0.2
  done
done
echo "load at start: $(uptime)"
for clients in 1 8 64; do
  for mode in tls plain; do
    printf '%-5s ' "$mode"
    "$bin" --data-dir "$work/$mode" -c kv bench --clients "$clients" --duration "$secs" 2>/dev/null
  done
done
echo "load at end: $(uptime)"
