#!/bin/bash
# The keep-alive's cost at rest: one idle direct-mode attachment (a simulated console) over
# loopback inside a network namespace made for the measurement, counting that namespace's UDP
# datagrams (/proc/net/snmp) and loopback bytes (/proc/net/dev) for 60 s. Everything the
# namespace carries is jmp's, so the figures are the keep-alives, their acknowledgements and
# whatever else an idle session sends. Needs root (ip netns). BIN: where jmp and jmpd are
# (default target/debug). Cleans up its namespace, processes and files on every exit.
set -eu
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/debug}
SECS=${SECS:-60}
D=$(mktemp -d /tmp/jmp-keepalive.XXXXXX)
NS=jmpka$$
ip netns add "$NS"
cleanup() {
    [ -n "${AP:-}" ] && kill "$AP" 2>/dev/null
    [ -n "${JP:-}" ] && kill "$JP" 2>/dev/null
    wait 2>/dev/null || true
    ip netns del "$NS"
    rm -rf "$D"
}
trap cleanup EXIT
ip netns exec "$NS" ip link set lo up
echo "keepalive-$$" > "$D/token"
chmod 600 "$D/token"
cat > "$D/exporter.yaml" <<Y
apiVersion: jmp.dev/v1alpha1
kind: ExporterConfig
metadata: {name: ka, labels: {board: ka}}
listen: 127.0.0.1:7799
stateDir: $D/state
auth: {tokenFile: $D/token}
export:
  console: {type: sim-console}
Y
ip netns exec "$NS" "$BIN/jmpd" --config "$D/exporter.yaml" > "$D/jmpd.out" 2> "$D/jmpd.err" &
JP=$!
for _ in $(seq 100); do grep -q sha256: "$D/jmpd.out" 2>/dev/null && break; sleep 0.1; done
FP=$(grep -o 'sha256:[0-9a-f]*' "$D/jmpd.out" | head -1)
ip netns exec "$NS" env JMP_RUNTIME_DIR="$D/rt" JMP_CONFIG_DIR="$D/cfg" "$BIN/jmp" attach \
    --exporter 127.0.0.1:7799 --token-file "$D/token" --fingerprint "$FP" --dev-dir "$D/dev" \
    -o json > "$D/attach.out" 2> "$D/attach.err" &
AP=$!
for _ in $(seq 100); do grep -q '{' "$D/attach.out" 2>/dev/null && break; sleep 0.1; done
grep -q '{' "$D/attach.out" || { echo "jmp attach did not start: $(cat "$D/attach.err")"; exit 1; }
sleep 3 # the session's start (handshake, device opens) is not "at rest"
snap() {
    ip netns exec "$NS" sh -c "awk '/^Udp:/{getline; print \$2}' /proc/net/snmp; awk '/lo:/{print \$2}' /proc/net/dev"
}
read -r -d '' A1 A2 < <(snap) || true
sleep "$SECS"
read -r -d '' B1 B2 < <(snap) || true
echo "at rest for ${SECS}s: $((B1 - A1)) UDP datagrams, $((B2 - A2)) bytes of IP (both directions)"
