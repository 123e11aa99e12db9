#!/usr/bin/env python3
"""python-can as a local program would use jmp's CAN fronts; prints one JSON line.

Usage:
  can_client.py slcan PATH MODE [N]          (MODE: mirror | isotp | reqresp | echo-ecu | flood)
  can_client.py socketcan IFACE MODE [N]
  can_client.py socketcand HOST:PORT BUS MODE [N]
mirror: sends N frames of every class the front carries (11- and 29-bit ids, every DLC 0-8,
remote frames and 64-byte CAN FD frames where the front and python-can carry them) with at
most 64 in flight, reads the mirrored frames back and checks that every one came back, in
order, unchanged. isotp: a 100-byte ISO-TP request to 0x7e0 answered multi-frame on 0x7e8
(can-isotp). reqresp: a UDS single-frame request/response. flood: sends N frames and never
reads (python-can's slcan reads only in recv), failing if the sends stop for 30 s.
"""
import json, sys, threading, time
import can

kind = sys.argv[1]
if kind == "socketcan":
    bus = can.Bus(interface="socketcan", channel=sys.argv[2], fd=True)
    mode, rest = sys.argv[3], sys.argv[4:]
    rich = True
elif kind == "slcan":
    bus = can.Bus(interface="slcan", channel=sys.argv[2], bitrate=500000, sleep_after_open=0)
    mode, rest = sys.argv[3], sys.argv[4:]
    rich = True   # python-can's slcan carries RTR and CAN FD
else:
    host, port = sys.argv[2].rsplit(":", 1)
    bus = can.Bus(interface="socketcand", host=host, port=int(port), channel=sys.argv[3], tcp_tune=True)
    mode, rest = sys.argv[4], sys.argv[5:]
    rich = False  # python-can's socketcand sends classic data frames only

IGNORED = {0x100, 0x7FF, 0x321}  # the ECU's counter, background load, adapter bursts


def frames(n):
    for i in range(n):
        k = i % 4 if rich else i % 2
        dlc = i % 9
        data = bytes((i + j) & 0xFF for j in range(dlc))
        if k == 0:
            yield can.Message(arbitration_id=0x200 + (i % 0x500), is_extended_id=False, data=data)
        elif k == 1:
            yield can.Message(arbitration_id=0x1000000 + (i % 0xFFFFFF), is_extended_id=True, data=data)
        elif k == 2:
            yield can.Message(arbitration_id=0x300 + (i % 0x100), is_extended_id=(i % 8 == 2),
                              is_remote_frame=True, dlc=dlc)
        else:
            yield can.Message(arbitration_id=0x123, is_extended_id=False, is_fd=True,
                              bitrate_switch=True, data=bytes((i * 7 + j) & 0xFF for j in range(64)))


def same(a, b):
    return (a.arbitration_id == b.arbitration_id and a.is_extended_id == b.is_extended_id
            and a.is_remote_frame == b.is_remote_frame and bytes(a.data) == bytes(b.data)
            and (a.dlc == b.dlc or not a.is_remote_frame) and a.is_fd == b.is_fd)


def mirror(n):
    sent = list(frames(n))
    window = threading.Semaphore(64)
    got, bad, errors = [0], [], [0]
    done = threading.Event()

    def reader():
        while got[0] < n:
            m = bus.recv(10.0)
            if m is None:
                break
            if m.is_error_frame:
                errors[0] += 1
                continue
            if m.arbitration_id in IGNORED and not m.is_extended_id and not m.is_remote_frame:
                continue
            if not same(m, sent[got[0]]) and len(bad) < 5:
                bad.append(f"#{got[0]}: sent {sent[got[0]]} got {m}")
            got[0] += 1
            window.release()
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    t0 = time.time()
    for m in sent:
        if not window.acquire(timeout=10.0):
            break
        bus.send(m)
    done.wait(60)
    t.join(1)
    return {"sent": n, "received": got[0], "mismatches": bad, "error_frames": errors[0],
            "seconds": round(time.time() - t0, 2)}


def isotp_exchange():
    import isotp
    addr = isotp.Address(isotp.AddressingMode.Normal_11bits, txid=0x7E0, rxid=0x7E8)
    stack = isotp.CanStack(bus, address=addr, params={"tx_padding": 0xCC, "blocking_send": True})
    stack.start()
    req = bytes([0x36]) + bytes(range(99))
    stack.send(req, send_timeout=10)
    t0 = time.time()
    resp = None
    while time.time() - t0 < 10 and resp is None:
        resp = stack.recv(block=True, timeout=1)
    stack.stop()
    want = bytes([0x76]) + bytes(range(99))
    return {"ok": resp == want, "len": len(resp or b""), "resp_head": (resp or b"")[:8].hex()}


def reqresp():
    bus.send(can.Message(arbitration_id=0x7E0, is_extended_id=False,
                         data=bytes([0x02, 0x10, 0x03, 0xCC, 0xCC, 0xCC, 0xCC, 0xCC])))
    t0 = time.time()
    while time.time() - t0 < 10:
        m = bus.recv(1.0)
        if m is not None and m.arbitration_id == 0x7E8:
            return {"ok": bytes(m.data[:3]) == bytes([0x02, 0x50, 0x03]), "data": bytes(m.data).hex(),
                    "timestamp_age_s": round(time.time() - m.timestamp, 3)}
    return {"ok": False}


def flood(n):
    """A writer that never reads: every send must complete although nothing is read back."""
    import os
    sent = [0]

    def watchdog():
        last = -1
        while True:
            time.sleep(30)
            if sent[0] == last:
                print(json.dumps({"sent": n, "stalled_at": sent[0]}), flush=True)
                os._exit(3)
            last = sent[0]

    threading.Thread(target=watchdog, daemon=True).start()
    msg = can.Message(arbitration_id=0x2AB, is_extended_id=False, data=bytes(range(8)))
    for _ in range(n):
        bus.send(msg)
        sent[0] += 1
    return {"sent": n, "completed": sent[0]}


def echo_ecu():
    """Mirrors every frame (an ECU on a real SocketCAN bus, for the exporter's backend test)."""
    print("echo-ecu ready", flush=True)
    while True:
        m = bus.recv(60.0)
        if m is None:
            return {"ok": True}
        if not m.is_error_frame:
            bus.send(m)


try:
    if mode == "echo-ecu":
        r = echo_ecu()
    elif mode == "mirror":
        r = mirror(int(rest[0]) if rest else 1000)
    elif mode == "flood":
        r = flood(int(rest[0]) if rest else 20000)
    elif mode == "isotp":
        r = isotp_exchange()
    else:
        r = reqresp()
finally:
    bus.shutdown()
print(json.dumps(r), flush=True)
