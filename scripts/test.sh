#!/usr/bin/env bash
# The test command of the README: installs what the tests need (apt packages, a Python venv),
# builds the binaries the end-to-end tests run, runs every test, and fails if any test skipped
# that tests/SKIPS.md does not list (on this project's machines every test runs: a test that
# lacks something fails, naming it; only a listed test may print `SKIP: [<id>] ...` and pass).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    scripts/install-test-deps.sh
else
    echo "test.sh: not root: no apt installs (tests needing root or missing tools will FAIL)"
    JMP_NO_APT=1 scripts/install-test-deps.sh || true
fi

# The wire protocol crate must stay sans-IO.
if cargo tree -p jmp-protocol -e normal --prefix none | grep -Eq '^(tokio|quinn|mio|socket2) '; then
    echo "test.sh: jmp-protocol depends on an I/O crate:"; cargo tree -p jmp-protocol -e normal
    exit 1
fi

cargo build --workspace --bins
log=target/test-output.log
set +e
cargo test --workspace --no-fail-fast -- --test-threads="${JMP_TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# Every SKIP line the harness prints names its test: `SKIP: [<target>::<test>] <what is missing>`.
# A skip of a test the reviewed list does not name, or a SKIP line in any other form (a test
# printing its own), fails the run.
skip_lines=$(grep -o 'SKIP: .*' "$log" | sort -u || true)
skips=0
unlisted=()
while IFS= read -r line; do
    [ -n "$line" ] || continue
    skips=$((skips + 1))
    id=$(sed -n 's/^SKIP: \[\([^]]*\)\].*/\1/p' <<<"$line")
    if [ -z "$id" ] || ! grep -qF "| \`$id\` |" tests/SKIPS.md; then
        unlisted+=("$line")
    fi
done <<<"$skip_lines"
[ -z "$skip_lines" ] || echo "$skip_lines"
# One closing line with the totals over every test binary (cargo prints one summary per binary,
# the last of which is often an empty doc-test run).
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } } END { print p + 0, f + 0 }' "$log")
echo
echo "tests: $passed passed, $failed failed, $skips skipped (${#unlisted[@]} not listed in tests/SKIPS.md)"
if [ "$status" -eq 0 ] && [ "$passed" -eq 0 ]; then
    echo "test.sh: no test ran"
    exit 1
fi
if ((${#unlisted[@]})); then
    echo "test.sh: tests skipped that tests/SKIPS.md does not list (on this project's machines every test must run):"
    printf '  %s\n' "${unlisted[@]}"
    [ "$status" -ne 0 ] || status=1
fi
exit "$status"
