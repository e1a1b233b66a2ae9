#!/usr/bin/env bash
# Run the libFuzzer harnesses: fuzz/run.sh BUILD_DIR SECONDS TARGET...
# For each target: replay every committed input (fuzz/corpus/TARGET, the
# seeds, and fuzz/regressions/TARGET, the inputs that once crashed it), then
# fuzz for SECONDS from those seeds. New interesting inputs go to
# BUILD_DIR/fuzz/corpus/TARGET (not committed); a crashing input is written to
# BUILD_DIR/fuzz/crashes/ and the run fails. Prints the executions per target.
set -euo pipefail
out=$1 seconds=$2
shift 2
cd "$(dirname "$0")/.."
# leaks are errors; a big allocation is one too: a header must be checked
# against the input before memory is reserved for what it claims
common=(-rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 -print_final_stats=1)
export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
total=0
for t in "$@"; do
    bin=$out/fuzz/fuzz_$t
    seeds=fuzz/corpus/$t regress=fuzz/regressions/$t work=$out/fuzz/corpus/$t
    crashes=$out/fuzz/crashes
    mkdir -p "$work" "$crashes" "$regress"
    dict=()
    [ -f "fuzz/$t.dict" ] && dict=(-dict="fuzz/$t.dict")
    log=$out/fuzz/$t.log
    echo "== fuzz $t: replay $(ls "$seeds" | wc -l) seeds + $(ls "$regress" | wc -l) regressions, then ${seconds}s"
    if ! "$bin" "${common[@]}" -runs=0 "$seeds" "$regress" >"$log" 2>&1; then
        tail -40 "$log"; echo "fuzz $t: a committed input fails (see $log)"; exit 1
    fi
    if ! "$bin" "${common[@]}" "${dict[@]}" -max_total_time="$seconds" \
            -artifact_prefix="$crashes/$t-" "$work" "$seeds" "$regress" >"$log" 2>&1; then
        tail -60 "$log"
        echo "fuzz $t: crash; the input is in $crashes/ (fix it, then add it to $regress/)"
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    echo "fuzz $t: ${runs:-?} executions, $cov, no crash"
    total=$((total + ${runs:-0}))
done
echo "fuzz: $total executions in all, no crash"
