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
echo
echo "test.sh: skipped tests: $skips"
grep '^SKIP: ' "$log" | sort | uniq -c || true
exit "$status"
