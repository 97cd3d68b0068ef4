#!/usr/bin/env bash
# Byzantine (t = 1, 3 replicas) beside fail-stop (t = 1, 2 replicas): write throughput and
# latency at 1, 8 and 64 clients; then Byzantine latency versus the number of connected clients
# (1 writing + N-1 idle ones sending signed no-ops) for both stabilities and two no-op
# intervals. Writes bench/results/byzantine-throughput.csv and byzantine-latency.csv; render
# the plot with bench/scripts/plot_byzantine.py. Numbers, not pass/fail.
#
#   cargo build --release -p lockstep
#   bench/scripts/byzantine.sh            # DURATION=10 by default, about 10 minutes
#
# delta is MAX_DELAY (2 ms) for LamportClock and PHYS_DELAY (10 ms) for PhysicalClock: with
# 2 ms, items on this 2-core machine reach replicas after their PhysicalClock window
# (lockstep_replica_byz_late_items_total) and writes stall (docs/byzantine.md).
# ByzantineBatched: the same clients sharing one signed stream that sends the commands waiting
# at once as one item (lockstep bench --batch BATCH, default 256; docs/byzantine.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
LOCKSTEP=${LOCKSTEP:-target/release/lockstep}
DURATION=${DURATION:-10}
SWEEP_DURATION=${SWEEP_DURATION:-5}
CLIENTS=${CLIENTS:-"1 8 64"}
CONNECTED=${CONNECTED:-"1 4 16 64 256"}
INTERVALS=${INTERVALS:-"20 100"}
OUT=bench/results
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

manifest() { # name model stability
    local ordering=""
    if [ "$2" = Byzantine ]; then
        if [ "$3" = PhysicalClock ]; then
            ordering="  ordering: {stability: $3, maxDelayMillis: ${PHYS_DELAY:-10}, maxClockSkewMillis: ${MAX_SKEW:-1}"
        else
            ordering="  ordering: {stability: $3, maxDelayMillis: ${MAX_DELAY:-2}"
        fi
        ordering="$ordering}"
    fi
    cat > "$WORK/$1.yaml" <<YAML
apiVersion: lockstep.dev/v1alpha1
kind: ReplicatedStateMachine
metadata: {name: $1}
spec:
  faultsTolerated: 1
  failureModel: $2
  machine: {name: kv, version: "1.0.0"}
$ordering
YAML
}

start() { # name model stability
    manifest "$1" "$2" "${3:-}"
    "$LOCKSTEP" up "$WORK/$1.yaml" --data-dir "$WORK/data" --quiet --client-timeout-ms 30000 > "$WORK/$1.up" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 300); do
        if "$LOCKSTEP" --data-dir "$WORK/data" -c "$1" put warmup x > /dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "cluster $1 did not start:"; cat "$WORK/$1.up"; exit 1
}

stop_last() {
    local p=${PIDS[-1]}
    kill -INT "$p"; wait "$p" 2>/dev/null || true
    unset 'PIDS[-1]'
}

# "byzantine clients=8 value=256B 1234 ops/s p50= 1.23ms p99= 4.56ms ..." -> "1234,1.23,4.56"
parse() { sed -E 's/.* ([0-9.]+) ops\/s +p50= *([0-9.]+)ms +p99= *([0-9.]+)ms.*/\1,\2,\3/'; }

# A point that could not be measured (the clients' opens timed out on a saturated machine)
# is recorded as "0,nan,nan" with the reason on stderr, and the run goes on.
bench() { # name clients [extra args]
    local name=$1 clients=$2 out; shift 2
    if out=$("$LOCKSTEP" --data-dir "$WORK/data" -c "$name" bench --clients "$clients" --duration "$DURATION" "$@" 2>&1) &&
        grep -q "ops/s" <<<"$out"; then
        grep "ops/s" <<<"$out" | parse
    else
        echo "  (no result: $(tail -n 1 <<<"$out"))" >&2
        echo "0,nan,nan"
    fi
}

echo "model,clients,ops_per_sec,p50_ms,p99_ms" > "$OUT/byzantine-throughput.csv"
start fs FailStop
start byz Byzantine LamportClock
for c in $CLIENTS; do
    for target in fs byz byz-batched; do
        case $target in
            fs) model=FailStop; line=$(bench fs "$c") ;;
            byz) model=Byzantine; line=$(bench byz "$c") ;;
            # The same clients sharing one signed stream that batches their waiting commands.
            byz-batched) model=ByzantineBatched; line=$(bench byz "$c" --batch "${BATCH:-256}") ;;
        esac
        echo "$model,$c,$line" | tee -a "$OUT/byzantine-throughput.csv"
    done
done
stop_last; stop_last

echo "stability,noop_interval_ms,connected,ops_per_sec,p50_ms,p99_ms" > "$OUT/byzantine-latency.csv"
for stability in LamportClock PhysicalClock; do
    name=$(echo "$stability" | tr '[:upper:]' '[:lower:]' | cut -c1-4)
    start "$name" Byzantine "$stability"
    for interval in $INTERVALS; do
        for n in $CONNECTED; do
            line=$(DURATION=$SWEEP_DURATION bench "$name" 1 --idle $((n - 1)) --noop-interval-ms "$interval")
            echo "$stability,$interval,$n,$line" | tee -a "$OUT/byzantine-latency.csv"
        done
    done
    stop_last
done
