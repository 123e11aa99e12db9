# Runs inside the test guest (tests/src/guest.rs, minimal boot), as root, with real SocketCAN.
# The caller prepends: BIN (jmp and jmpd), PY (the venv's python), BOARD (tests/board),
# EXPORTER (the host's jmpd as 10.0.2.2:PORT), TOKEN (its token file), FP (its fingerprint).
# Prints "CHECK <name> ok" per check passed; exits non-zero at the first that fails.
set -eu
mkdir -p /tmp/g
ok() { echo "CHECK $1 ok"; }
fail() { echo "CHECK $1 FAILED: ${2:-}"; for f in /tmp/g/*.err; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
# Waits (hang guard: 60 s) until FILE contains PATTERN.
wait_for() { i=0; until grep -q "$2" "$1" 2>/dev/null; do i=$((i + 1)); [ $i -gt 600 ] && return 1; sleep 0.1; done; }
modprobe vcan; modprobe can_raw
export JMP_RUNTIME_DIR=/tmp/g/rt JMP_CONFIG_DIR=/tmp/g/cfg
mkdir -p /tmp/g/rt /tmp/g/cfg /tmp/g/dev
attach() {
    "$BIN/jmp" attach --exporter "$EXPORTER" --token-file "$TOKEN" --fingerprint "$FP" \
        --dev-dir /tmp/g/dev -o json "$@" > /tmp/g/attach.out 2> /tmp/g/attach.err &
    AP=$!
    wait_for /tmp/g/attach.out '"devices"' || fail attach "no ready line"
}

# 1. jmp attach against the host's jmpd: the default front here is a vcan interface.
attach
grep -q '"role":"vcan","type":"interface","at":"jmp0"' /tmp/g/attach.out || fail vcan-endpoint "$(cat /tmp/g/attach.out)"
ip link show jmp0 > /dev/null || fail vcan-endpoint "no jmp0"
ok vcan-endpoint
# candump sees the ECU's counter frame, with the bus's data.
timeout 20 candump -n 1 jmp0,100:7FF > /tmp/g/counter.out 2> /tmp/g/candump.err || fail candump-counter
grep -q '4A 4D 50 00' /tmp/g/counter.out || fail candump-counter "$(cat /tmp/g/counter.out)"
ok candump-counter
# cansend a UDS request; candump sees the ECU's answer (repeated until candump has it: it
# gives no sign of being ready).
timeout 30 candump -n 1 jmp0,7E8:7FF > /tmp/g/resp.out 2> /tmp/g/candump2.err &
CD=$!
i=0
while kill -0 $CD 2>/dev/null && [ $i -lt 100 ]; do cansend jmp0 7E0#021003CCCCCCCCCC; i=$((i + 1)); sleep 0.1; done
wait $CD || fail cansend-candump "$(cat /tmp/g/resp.out)"
grep -q '02 50 03' /tmp/g/resp.out || fail cansend-candump "$(cat /tmp/g/resp.out)"
ok cansend-candump
# python-can socketcan: request/response, ISO-TP multi-frame, frames of every class.
r=$("$PY" "$BOARD/can_client.py" socketcan jmp0 reqresp 2> /tmp/g/py1.err) || fail python-can-reqresp "$r"
echo "$r" | grep -q '"ok": true' || fail python-can-reqresp "$r"
ok python-can-reqresp
r=$("$PY" "$BOARD/can_client.py" socketcan jmp0 isotp 2> /tmp/g/py2.err) || fail python-can-isotp "$r"
echo "$r" | grep -q '"ok": true' || fail python-can-isotp "$r"
ok python-can-isotp
r=$(taskset -c 0 "$PY" "$BOARD/can_client.py" socketcan jmp0 mirror 4000 2> /tmp/g/py3.err) || fail python-can-mirror "$r"
echo "$r" | grep -q '"received": 4000, "mismatches": \[\]' || fail python-can-mirror "$r"
ok python-can-mirror
# A crashed attachment leaves its interface behind; the next one removes it at start.
kill -9 $AP; wait $AP 2>/dev/null || true
ip link show jmp0 > /dev/null 2>&1 || fail stale-left "jmp0 vanished with the process"
attach
wait_for /tmp/g/attach.err 'previous jmp left behind' || fail stale-cleaned "$(cat /tmp/g/attach.err)"
ip link show jmp0 > /dev/null || fail stale-cleaned "no jmp0 after the restart"
ok stale-cleaned
kill -TERM $AP; wait $AP 2>/dev/null || true
if ip link show jmp0 > /dev/null 2>&1; then fail removed-at-exit "jmp0 is still there"; fi
ok removed-at-exit

# 2. jmpd in the guest whose backend is a vcan interface (SocketCAN with kernel timestamps),
# an ECU on that bus (python-can socketcan, mirroring), reached through jmp attach's socketcand.
ip link add vcan0 type vcan && ip link set vcan0 up
echo guest-token > /tmp/g/gtoken
cat > /tmp/g/jmpd.yaml <<YAML
apiVersion: jmp.dev/v1alpha1
kind: ExporterConfig
metadata: {name: guest}
listen: 127.0.0.1:7811
stateDir: /tmp/g/jmpd-state
auth: {tokenFile: /tmp/g/gtoken}
export:
  bus: {type: can, interface: vcan0}
  nope: {type: can, interface: can7}
YAML
"$BIN/jmpd" --config /tmp/g/jmpd.yaml > /tmp/g/jmpd.out 2> /tmp/g/jmpd.err &
JP=$!
wait_for /tmp/g/jmpd.out 'listening on' || fail jmpd-vcan "jmpd not ready"
GFP=$(sed -n 's/.*fingerprint \(sha256:[0-9a-f]*\).*/\1/p' /tmp/g/jmpd.out)
taskset -c 0 "$PY" "$BOARD/can_client.py" socketcan vcan0 echo-ecu > /tmp/g/ecu.out 2> /tmp/g/ecu.err &
EP=$!
wait_for /tmp/g/ecu.out 'echo-ecu ready' || fail jmpd-vcan "no ECU"
"$BIN/jmp" attach --exporter 127.0.0.1:7811 --token-file /tmp/g/gtoken --fingerprint "$GFP" \
    --dev-dir /tmp/g/dev2 -o json --can-as socketcand > /tmp/g/attach2.out 2> /tmp/g/attach2.err &
AP2=$!
wait_for /tmp/g/attach2.out '"devices"' || fail jmpd-vcan "no ready line"
PORT=$("$PY" -c 'import json, sys
v = json.loads(open(sys.argv[1]).readline())
d = [d for d in v["devices"] if d["name"] == "bus"][0]
print([e["at"] for e in d["endpoints"] if e["role"] == "socketcand"][0].split(":")[1])' /tmp/g/attach2.out)
[ -n "$PORT" ] || fail jmpd-vcan "$(cat /tmp/g/attach2.out)"
grep -q '"state":"unavailable","reason":"interface can7 does not exist on this host"' /tmp/g/attach2.out ||
    fail jmpd-vcan "missing interface not named: $(cat /tmp/g/attach2.out)"
r=$("$PY" "$BOARD/can_client.py" socketcand "127.0.0.1:$PORT" bus mirror 4000 2> /tmp/g/py4.err) || fail jmpd-vcan-mirror "$r"
echo "$r" | grep -q '"received": 4000, "mismatches": \[\]' || fail jmpd-vcan-mirror "$r"
ok jmpd-vcan-mirror
kill -TERM $AP2 $EP $JP; wait $AP2 $EP $JP 2>/dev/null || true
echo ALL-CHECKS-DONE
