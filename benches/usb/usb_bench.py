#!/usr/bin/env python3
"""The USB benchmark's serial helpers (benches/usb/usb_bench.sh, in the test guest; the test
venv's Python for pyserial).

  usb_bench.py echo TTY READY     the gadget's side: send every byte back as it comes (raw),
                                  reopening the tty after each hangup; touches READY once open
  usb_bench.py rtt TTY N          N one-byte round trips through TTY (after 20 for warm-up);
                                  prints {"p50_us": ..., "p99_us": ...}
"""
import json
import os
import sys
import time

import serial


def pct(v, p):
    s = sorted(v)
    return s[max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))]


def echo(tty, ready):
    # The gadget's tty hangs up whenever the host side lets the device go (an unbind, a bind to
    # usbip-host, a detach): open it again each time, so that every import finds the echo.
    first = True
    while True:
        try:
            port = serial.Serial(tty, 115200, timeout=None)
        except (serial.SerialException, OSError):
            time.sleep(0.1)  # the gadget is between hosts: try again
            continue
        if first:
            open(ready, "w").close()
            first = False
        try:
            while True:
                b = port.read(max(1, port.in_waiting))
                port.write(b)
        except (serial.SerialException, OSError):
            port.close()


def rtt(tty, n):
    port = serial.Serial(tty, 115200, timeout=5, write_timeout=5)
    port.reset_input_buffer()
    out = []
    for i in range(20 + n):
        b = bytes([0x41 + i % 26])
        t0 = time.perf_counter()
        port.write(b)
        got = port.read(1)
        if got != b:
            raise SystemExit(f"round trip {i}: sent {b!r}, got {got!r}")
        if i >= 20:
            out.append((time.perf_counter() - t0) * 1e6)
    print(json.dumps({"p50_us": pct(out, 50), "p99_us": pct(out, 99)}))


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "rtt":
        rtt(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
