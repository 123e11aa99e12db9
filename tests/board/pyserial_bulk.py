#!/usr/bin/env python3
"""pyserial through a jmp console backed by an echoing board: data must come back exact.

usage: pyserial_bulk.py PORT SIZE SEED [--all-bytes] [--record BOARD_RECORD_FILE]

--all-bytes first writes the 256 byte values 0x00..0xff once (XON/XOFF, NUL, ^C included) and
expects exactly those 256 bytes back ("OK256"). Then SIZE pseudo-random bytes (from SEED) are
written by one thread while another reads; the echo must be byte-identical and in order.
Prints "OK <n>" and exits 0, or prints the first difference and exits 1. A stall of 30 s with no
progress is a failure (hang guard, not a timing assertion).
"""
import random
import sys
import threading
import time

import serial

STALL = 30.0


def read_exact(port, n):
    got = bytearray()
    last = time.monotonic()
    while len(got) < n:
        chunk = port.read(min(65536, n - len(got)))
        if chunk:
            got += chunk
            last = time.monotonic()
        elif time.monotonic() - last > STALL:
            break
    return bytes(got)


RECORD = None  # the echo board's record of what it received, for diagnostics
SKIP = 0  # bytes in the record before the bulk data


def board_side(want):
    if not RECORD:
        return ""
    try:
        rec = open(RECORD, "rb").read()[SKIP:]
    except OSError as e:
        return f" (board record unreadable: {e})"
    if rec == want:
        return " | the board received every byte intact: bytes were lost on the way back (board -> jmpd -> jmp -> pyserial)"
    i = next((k for k in range(min(len(want), len(rec))) if want[k] != rec[k]), min(len(want), len(rec)))
    if i == len(rec):
        return (f" | the board received a clean prefix of {len(rec)} bytes (the outgoing path stalled there);"
                " an echo differing before that offset means bytes were lost on the way back (board -> jmpd -> jmp -> pyserial)")
    return f" | the board received {len(rec)} bytes, corrupted at {i}: bytes were lost on the way out (pyserial -> jmp -> jmpd -> board)"

def report_diff(what, want, got):
    i = next((k for k in range(min(len(want), len(got))) if want[k] != got[k]), min(len(want), len(got)))
    print(
        f"FAIL {what}: sent {len(want)} got {len(got)} bytes; first difference at {i}: "
        f"sent {want[i:i+16].hex()} got {got[i:i+16].hex()}" + (board_side(want) if what == "bulk" else ""),
        flush=True,
    )
    sys.exit(1)


def main():
    path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    global RECORD, SKIP
    all_bytes = "--all-bytes" in sys.argv[4:]
    if "--record" in sys.argv[4:]:
        RECORD = sys.argv[sys.argv.index("--record") + 1]
    SKIP = 256 if all_bytes else 0
    port = serial.Serial(path, baudrate=115200, timeout=0.2, write_timeout=STALL)
    port.reset_input_buffer()

    if all_bytes:
        want = bytes(range(256))
        port.write(want)
        port.flush()
        got = read_exact(port, len(want))
        if got != want:
            report_diff("all byte values", want, got)
        print("OK256", flush=True)

    data = random.Random(seed).randbytes(size)
    err = []

    def writer():
        try:
            for i in range(0, len(data), 4096):
                port.write(data[i:i + 4096])
            port.flush()
        except Exception as e:  # surfaced by the main thread
            err.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    got = read_exact(port, len(data))
    t.join(STALL)
    if err:
        print(f"FAIL writer: {err[0]!r} (read {len(got)} of {len(data)})", flush=True)
        sys.exit(1)
    if got != data:
        report_diff("bulk", data, got)
    extra = port.read(4096)
    if extra:
        print(f"FAIL {len(extra)} unexpected extra bytes after the echo: {extra[:32].hex()}", flush=True)
        sys.exit(1)
    print(f"OK {len(got)}", flush=True)


if __name__ == "__main__":
    main()
