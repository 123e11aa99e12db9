#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (libFuzzer, coverage-guided) on stable Rust, without cargo-fuzz:
# the same instrumentation `cargo fuzz build --sanitizer none` uses, in fuzz/target/.
#
#   scripts/fuzz.sh [-runs=N | -max_total_time=S] [TARGET...]
#
# Default: every target, 10,000,000 executions each (what the release checklist asks for).
# .ci/run runs a short pass. Each target starts from its corpus in fuzz/corpus/TARGET (seeded
# from the protocol's documented examples) and adds what it finds there. A crash, a hang or an
# allocation larger than the input justifies (fuzz/src/lib.rs) fails the run, leaving the input
# in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
limit="-runs=10000000"
if [[ "${1:-}" == -* ]]; then limit="$1"; shift; fi
targets=("$@")
if ((${#targets[@]} == 0)); then
    targets=(control_frames kind_bodies controller_frames tokens control_socket)
fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation off build scripts (they run on the host and
# would not link against libFuzzer's coverage hooks).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --quiet --target "$host" $(printf -- '--bin %s ' "${targets[@]}")
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "fuzz: $t ($limit)"
    start=$(date +%s)
    "target/$host/release/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" -max_len=65536 \
        -rss_limit_mb=512 -timeout=10 -print_final_stats=1 "$limit" 2> "target/$t.log" || {
        tail -40 "target/$t.log"
        echo "fuzz: $t FAILED (input in fuzz/artifacts/$t/)"
        exit 1
    }
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "target/$t.log" | grep -o '[0-9]*$' || echo '?')
    echo "fuzz: $t ok: $runs executions in $(( $(date +%s) - start ))s"
done
