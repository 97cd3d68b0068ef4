#!/usr/bin/env bash
# Instructions per command on each replica, counted by valgrind's callgrind (issue 9): counts,
# not seconds, so the result repeats on a loaded machine. Runs `lockstep up` (t = 1, fail-stop,
# TLS, fsync on) with both replicas under callgrind, collects only while `lockstep bench`
# drives one MIX with one client for SECONDS_OF_LOAD seconds, and prints per replica the instructions
# per command and the functions that spend them (inclusive and exclusive).
#
#   cargo build --release -p lockstep
#   bench/scripts/callgrind.sh                 # MIX=write SECONDS_OF_LOAD=30; about 3 minutes
#   OUT=/tmp/cg bench/scripts/callgrind.sh     # keep the callgrind.out files there
set -euo pipefail
cd "$(dirname "$0")/../.."
LOCKSTEP=$(realpath "${LOCKSTEP:-target/release/lockstep}")
MIX=${MIX:-write}
SECONDS_OF_LOAD=${SECONDS_OF_LOAD:-30}
MANIFEST=${MANIFEST:-manifests/examples/kv-failstop.yaml}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d /var/tmp/lockstep-callgrind.XXXXXX)
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install -y valgrind)" >&2; exit 2; }
mkdir -p "$OUT"
UP_PID=
cleanup() {
    [ -n "$UP_PID" ] && kill -INT "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/replica-under-callgrind" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$OUT/callgrind.%p.out \
  --log-file=$OUT/valgrind.%p.log "$LOCKSTEP" replica "\$@"
SH
chmod +x "$WORK/replica-under-callgrind"

# Probes get 300 ms; under callgrind a replica answers ~50x slower, so give the failure
# detector a minute before it replaces anyone.
LOCKSTEP_REPLICA_BIN="$WORK/replica-under-callgrind" "$LOCKSTEP" --data-dir "$WORK/data" up "$MANIFEST" \
    --quiet --failure-timeout-ms 60000 >"$OUT/up.log" 2>&1 &
UP_PID=$!
name=$(awk '/^metadata:/{m=1} m && /name:/{print $2; exit}' "$MANIFEST")
echo "waiting for $name under callgrind (slow start)..."
for _ in $(seq 600); do
    if "$LOCKSTEP" --data-dir "$WORK/data" -c "$name" put callgrind-probe ready >/dev/null 2>&1; then break; fi
    sleep 1
done
"$LOCKSTEP" --data-dir "$WORK/data" -c "$name" status
pids=$(pgrep -f "callgrind-out-file=$OUT" | tr '\n' ' ')
[ -n "$pids" ] || { echo "no replica runs under callgrind" >&2; exit 1; }
# Two windows of the same length: idle (what runs anyway: up's status probes every 50 ms, timers),
# then under load; per command = (load - idle) / commands.
for p in $pids; do callgrind_control -i on "$p" >/dev/null; done
echo "idle window: ${SECONDS_OF_LOAD}s"
sleep "$SECONDS_OF_LOAD"
for p in $pids; do callgrind_control -d "$p" >/dev/null; done
"$LOCKSTEP" --data-dir "$WORK/data" -c "$name" bench --clients 1 --duration "$SECONDS_OF_LOAD" --mix "$MIX" | tee "$OUT/bench.txt"
for p in $pids; do callgrind_control -i off "$p" >/dev/null; callgrind_control -d "$p" >/dev/null; done
ops=$(grep -o 'ok=[0-9]*' "$OUT/bench.txt" | head -1 | cut -d= -f2)
echo
echo "commands acknowledged under load: $ops ($MIX mix, 1 client)"
total_of() { # callgrind dump -> its instruction count ("totals:"; the "summary:" line of a
    # later dump is not of that part alone, so it is set to the totals before annotating)
    local t
    t=$(awk '/^totals:/{print $2; exit}' "$1")
    sed -i "s/^summary: .*/summary: $t/" "$1"
    echo "$t"
}
for idle in "$OUT"/callgrind.*.out.1; do
    load=${idle%.1}.2
    [ -s "$load" ] || continue
    pid=$(basename "$idle" | cut -d. -f2)
    id=$(grep -o -- '--id [a-z0-9-]*' "$OUT/valgrind.$pid.log" | head -1 | cut -d' ' -f2)
    i=$(total_of "$idle")
    l=$(total_of "$load")
    echo "=== replica ${id:-?}: idle ${i:-?} instructions, under load ${l:-?}: $(( (${l:-0} - ${i:-0}) / (ops > 0 ? ops : 1) )) per command"
    callgrind_annotate "$load" 2>/dev/null >"$load.txt" || true
    callgrind_annotate --inclusive=yes "$load" 2>/dev/null >"$load.inclusive.txt" || true
    echo "--- exclusive (top 25)"
    # (`|| true`: `head` closing the pipe early must not end the script under pipefail.)
    sed -n '/file:function/,$p' "$load.txt" | sed -n 3,27p | cut -c1-160 || true
    echo "--- inclusive, project functions (top 25)"
    grep -E 'lockstep|replica/src|client/src' "$load.inclusive.txt" | head -25 | cut -c1-160 || true
done
echo "callgrind files: $OUT (callgrind_annotate FILE, or kcachegrind)"
