#!/usr/bin/env python3
"""Opens PORT with pyserial at the first baud rate, then switches to each following rate when a
line arrives on stdin. Prints "SET <baud>" after each change; holds the port open until stdin
closes. usage: pyserial_baud.py PORT BAUD [BAUD...]
"""
import sys

import serial

path, bauds = sys.argv[1], [int(b) for b in sys.argv[2:]]
port = serial.Serial(path, baudrate=bauds[0], timeout=0.1)
print(f"SET {bauds[0]}", flush=True)
for b in bauds[1:]:
    if not sys.stdin.readline():
        sys.exit(0)
    port.baudrate = b  # pyserial uses TCSETS2/BOTHER for non-standard rates on Linux
    print(f"SET {b}", flush=True)
sys.stdin.read()
port.close()
