#!/usr/bin/env bash
# Bounded fuzzing of every decoder of untrusted or on-disk bytes (docs/fuzzing.md).
#
#   fuzz/run.sh [TARGET...]        all targets when none is named
#
# FUZZ_SECONDS (default 20) bounds each target. Each run first replays the committed crash
# inputs in fuzz/regressions/TARGET/ (an extra corpus directory), then fuzzes; any crash,
# panic, timeout or out-of-memory fails the script and leaves the input in
# fuzz/artifacts/TARGET/. Works with the stable toolchain: see "Why RUSTC_BOOTSTRAP" in
# docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
all_targets=(wal_record snapshot peer_message byz_item command history)
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=("${all_targets[@]}")
fi

started=$(date +%s)
say() { printf '== fuzz: %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    version="${CARGO_FUZZ_VERSION:-0.13.2}"
    say "installing cargo-fuzz $version"
    cargo install cargo-fuzz --locked --version "$version"
fi

# cargo fuzz builds with -Z flags (sanitizer coverage instrumentation, ASan); stable rustc
# accepts them only when told it is bootstrapping. Scoped to this script's cargo calls.
export RUSTC_BOOTSTRAP=1
export CARGO_INCREMENTAL=0
target_dir="${CARGO_TARGET_DIR:-$PWD/fuzz/target}"
build_flags=(--target-dir "$target_dir")

say "building (release, debug assertions, overflow checks, ASan)"
if [ "$#" -gt 0 ]; then
    for t in "${targets[@]}"; do cargo fuzz build "${build_flags[@]}" "$t"; done
else
    cargo fuzz build "${build_flags[@]}"
fi

logs="$target_dir/fuzz-logs"
mkdir -p "$logs"
failed=()
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    regressions="fuzz/regressions/$t"
    mkdir -p "$corpus" "$regressions"
    n=$(find "$regressions" -type f | wc -l)
    say "$t: replaying $n regression input(s), then fuzzing for ${seconds}s"
    log="$logs/$t.log"
    if cargo fuzz run "${build_flags[@]}" "$t" "$corpus" "$regressions" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        say "$t: ok, ${runs:-?} inputs, ${rate:-?} exec/s, corpus $(find "$corpus" -type f | wc -l)"
    else
        say "$t: FAILED (log $log); the end of it:"
        tail -n 60 "$log"
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    say "crashed: ${failed[*]}"
    echo "Reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/<file>"
    echo "Then fix the code, add the input to fuzz/regressions/TARGET/ and a #[test] (docs/fuzzing.md)."
    exit 1
fi
say "all ${#targets[@]} target(s) ok"
