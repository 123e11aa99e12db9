#!/usr/bin/env python3
"""A stand-in for a board's serial port: a pty pair whose far end echoes every byte.

jmpd opens the slave path (printed as the first stdout line) as if it were /dev/ttyUSB0;
everything jmpd writes to it comes back unchanged, as from a board echoing its input.

With --speed-file PATH, the slave's current output speed (as jmpd last set it, read with
TCGETS2 through the master, so non-standard speeds like 250000 show exactly) is written to
PATH as decimal text whenever it changes. With --record PATH, every byte received is also
appended to PATH, so a failing test can tell which direction lost data. Runs until killed; a hangup (EIO) is waited out.
"""
import argparse
import errno
import fcntl
import os
import select
import struct
import sys
import termios
import time
import tty

TCGETS2 = 0x802C542A  # _IOR('T', 0x2A, struct termios2), 44 bytes on Linux
TERMIOS2 = "<IIIIB19sII"  # iflag oflag cflag lflag line cc[19] ispeed ospeed


def ospeed(fd):
    try:
        buf = fcntl.ioctl(fd, TCGETS2, bytes(struct.calcsize(TERMIOS2)))
        return struct.unpack(TERMIOS2, buf)[-1]
    except OSError:
        return None


def write_speed(path, speed):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{speed}\n")
    os.replace(tmp, path)  # readers never see a half-written file


def write_all(fd, data):
    while data:
        try:
            n = os.write(fd, data)
            data = data[n:]
        except BlockingIOError:
            select.select([], [fd], [], 0.05)
        except OSError as e:
            if e.errno == errno.EIO:
                time.sleep(0.05)  # nobody holds the slave right now; keep trying
            else:
                raise


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed-file")
    ap.add_argument("--record", help="append every byte received from jmpd to this file (diagnostics)")
    args = ap.parse_args()
    record = open(args.record, "ab", buffering=0) if args.record else None

    master, slave = os.openpty()
    # Raw on the slave: the line discipline must pass every byte (0x00, 0x03, XON/XOFF...) as is.
    tty.setraw(slave)
    attrs = termios.tcgetattr(slave)
    attrs[0] &= ~(termios.IXON | termios.IXOFF | termios.IXANY)
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    # The slave fd stays open: it keeps the settings and keeps the master from seeing hangups.
    print(os.ttyname(slave), flush=True)

    last = None
    next_check = 0.0
    while True:
        now = time.monotonic()
        if args.speed_file and now >= next_check:
            next_check = now + 0.05
            s = ospeed(master)
            if s is not None and s != last:
                write_speed(args.speed_file, s)
                last = s
        r, _, _ = select.select([master], [], [], 0.05)
        if not r:
            continue
        try:
            data = os.read(master, 65536)
        except OSError as e:
            if e.errno == errno.EIO:
                time.sleep(0.05)
                continue
            raise
        if data:
            if record:
                record.write(data)
            write_all(master, data)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
