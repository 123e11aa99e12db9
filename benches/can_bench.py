#!/usr/bin/env python3
"""The CAN benchmark's python-can client (the same client for every path, so the paths differ
only in what is between it and the adapter).

Usage: can_bench.py SPEC MODE N
SPEC is JSON: python-can Bus arguments ({"interface": "slcan", "channel": ...}), or
{"jumpstarter": {python-can Bus arguments}} for Jumpstarter's CAN driver served in this process
(its local session over a unix socket). MODE: rtt (N round trips of an 8-byte frame that the
adapter mirrors; prints p50/p99 in µs) or sustained (N frames, 16 in flight; prints frames/s
and how many came back). Prints one JSON line.
"""
import json, sys, threading, time
import can

spec = json.loads(sys.argv[1])
mode, n = sys.argv[2], int(sys.argv[3])
WARMUP = 50


def pct(v, p):
    s = sorted(v)
    return s[max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))]


def rtt(bus):
    out = []
    for i in range(WARMUP + n):
        data = (i).to_bytes(8, "big")
        t0 = time.perf_counter()
        bus.send(can.Message(arbitration_id=0x123, is_extended_id=False, data=data))
        while True:
            m = bus.recv(5.0)
            if m is None:
                raise SystemExit(json.dumps({"error": f"no answer to round trip {i}"}))
            if m.arbitration_id == 0x123 and bytes(m.data) == data:
                break
        if i >= WARMUP:
            out.append((time.perf_counter() - t0) * 1e6)
    return {"p50_us": pct(out, 50), "p99_us": pct(out, 99)}


def sustained(bus):
    window = threading.Semaphore(16)
    got = [0]
    order_ok = [True]

    def reader():
        while got[0] < n:
            m = bus.recv(5.0)
            if m is None:
                return
            if m.arbitration_id != 0x124:
                continue
            if int.from_bytes(bytes(m.data), "big") != got[0]:
                order_ok[0] = False
            got[0] += 1
            window.release()

    t = threading.Thread(target=reader)
    t.start()
    t0 = time.perf_counter()
    for i in range(n):
        if not window.acquire(timeout=5.0):
            break
        bus.send(can.Message(arbitration_id=0x124, is_extended_id=False, data=i.to_bytes(8, "big")))
    t.join(30)
    dt = time.perf_counter() - t0
    return {"frames_s": got[0] / dt, "received": got[0], "sent": n, "in_order": order_ok[0]}


def main(bus):
    r = rtt(bus) if mode == "rtt" else sustained(bus)
    print(json.dumps(r), flush=True)


if "jumpstarter" in spec:
    from jumpstarter.common.utils import serve
    from jumpstarter_driver_can.driver import Can
    a = spec["jumpstarter"]
    with serve(Can(channel=a["channel"], interface=a["interface"])) as client:
        main(client)
else:
    bus = can.Bus(**spec)
    try:
        main(bus)
    finally:
        bus.shutdown()
