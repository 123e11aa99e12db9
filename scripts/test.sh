#!/usr/bin/env bash
# The test command of the README: installs what the tests need (apt packages, a Python venv),
# builds the binaries the end-to-end tests run, runs every test, and counts the skipped ones.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    scripts/install-test-deps.sh
else
    echo "test.sh: not root: skipping apt installs (tests needing missing tools will SKIP)"
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
skips=$(grep -c '^SKIP: ' "$log" || true)
grep '^SKIP: ' "$log" | sort | uniq -c || true
# One closing line with the totals over every test binary (cargo prints one summary per binary,
# the last of which is often an empty doc-test run).
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } } END { print p + 0, f + 0 }' "$log")
echo
echo "tests: $passed passed, $failed failed, $skips skipped"
if [ "$status" -eq 0 ] && [ "$passed" -eq 0 ]; then
    echo "test.sh: no test ran"
    exit 1
fi
exit "$status"
