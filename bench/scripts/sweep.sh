#!/usr/bin/env bash
# lockstep vs etcd over what users run (issue 9): value sizes, read/write mixes, t = 1 and
# t = 2, 1 to 256 clients. Each configuration is one `lockstep-bench` run (lockstep and etcd
# measured back to back in the same run) that writes bench/results/sweep-NAME.json; render the
# plots with bench/scripts/plot_bench.py. Numbers, not pass/fail.
#
#   cargo build --release -p lockstep -p lockstep-bench
#   bench/scripts/sweep.sh                 # DURATION=5: about 15 minutes
#   RUNS="t1-256" bench/scripts/sweep.sh   # only some configurations
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=${BENCH:-target/release/lockstep-bench}
DURATION=${DURATION:-5}
WORK_DIR=${WORK_DIR:-/var/tmp}
RUNS=${RUNS:-"t1-256 t2-256 t1-4k t1-64k"}
OUT=bench/results
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# A fail-stop kv with t = 2 (3 replicas: as many processes as etcd's 3 members).
sed -e 's/faultsTolerated: 1/faultsTolerated: 2/' manifests/examples/kv-failstop.yaml >"$TMP/kv-t2.yaml"
grep -q 'faultsTolerated: 2' "$TMP/kv-t2.yaml"

run() { # name, then lockstep-bench flags
    local name=$1
    shift
    echo "=== $name ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
    "$BENCH" --duration "$DURATION" --work-dir "$WORK_DIR" --json "$OUT/sweep-$name.json" "$@"
}

for r in $RUNS; do
    case $r in
    t1-256) run "$r" --value-size 256 --clients 1,8,64,256 --mix write,read,half,read-mostly ;;
    t2-256) run "$r" --value-size 256 --clients 1,8,64,256 --mix write,read --manifest "$TMP/kv-t2.yaml" --failovers 0 ;;
    t1-4k) run "$r" --value-size 4096 --clients 1,8,64 --mix write,read --failovers 0 ;;
    t1-64k) run "$r" --value-size 65536 --clients 1,8,64 --mix write,read --failovers 0 --keys 100 ;;
    *) echo "unknown run '$r' (t1-256, t2-256, t1-4k, t1-64k)" >&2; exit 2 ;;
    esac
done
