#!/usr/bin/env python3
"""Watches a simulated board's console through pyserial while its power is switched with the
jmp CLI: reads the boot log to the login prompt, runs `JMP power off`, types a login name (an
unpowered board must not echo it), runs `JMP power on`, and reads until the board has booted
again. Prints one JSON line with what it saw. usage: power_console.py PORT JMP
"""
import json
import subprocess
import sys
import time

import serial

path, jmp = sys.argv[1], sys.argv[2]
port = serial.Serial(path, baudrate=115200, timeout=0.2)


def read_until(pred, what, limit=30):
    buf = b""
    end = time.time() + limit
    while time.time() < end:
        buf += port.read(4096)
        if pred(buf):
            return buf
    sys.exit(f"no {what} within {limit}s; got {buf!r}")


first = read_until(lambda b: b.endswith(b"login: "), "login prompt")
off = subprocess.run([jmp, "power", "off"], capture_output=True, text=True)
port.write(b"root\r")
on = subprocess.run([jmp, "power", "on"], capture_output=True, text=True)
again = read_until(lambda b: b"U-Boot SPL" in b and b.endswith(b"login: "), "second boot")
print(json.dumps({
    "first_boot": first.count(b"U-Boot SPL"),
    "off": [off.returncode, off.stdout.strip(), off.stderr.strip()],
    "on": [on.returncode, on.stdout.strip(), on.stderr.strip()],
    "echoed_while_off": b"root" in again,
    "second_boot": again.count(b"U-Boot SPL"),
}), flush=True)
