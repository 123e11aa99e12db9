#!/usr/bin/env python3
"""An emulated slcan adapter (as a CANable speaks it) on a pty, for the CAN tests.

Usage: slcan_adapter.py LINK
Creates a pty, links LINK to its slave (what jmpd opens as `slcan: {path: LINK}`), and speaks
the adapter's side of Lawicel on the master: answers commands, and mirrors every frame it is
sent back onto the "bus" (so traffic can be checked end to end). Prints "ready LINK" when the
link exists. Commands on stdin, one a line: `unplug` (close the pty and remove the link, as a
USB adapter pulled out), `plug` (a new pty at the same link), `burst N` (send N frames of id
0x321 carrying a counter), `quit`. Prints "done CMD" after each.
"""
import os, pty, select, sys, termios, tty

link = sys.argv[1]
state = {"master": None, "open": False, "burst": 0}
log = []


def plug():
    m, s = pty.openpty()
    tty.setraw(s)
    name = os.ttyname(s)
    os.close(s)
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass
    os.symlink(name, link)
    os.set_blocking(m, False)
    state["master"] = m
    state["open"] = False


def unplug():
    if state["master"] is not None:
        os.close(state["master"])
        state["master"] = None
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass


def write(data):
    m = state["master"]
    while data and m is not None:
        try:
            n = os.write(m, data)
            data = data[n:]
        except BlockingIOError:
            select.select([], [m], [], 1.0)
        except OSError:
            return


def answer(line):
    if not line:
        return b"\r"
    c = line[0:1]
    if c in b"tTrRdDbB":
        if not state["open"]:
            return b"\a"
        ack = b"Z\r" if c in b"TRDB" else b"z\r"
        return line + b"\r" + ack
    if c in (b"O", b"L"):
        state["open"] = True
        return b"\r"
    if c == b"C":
        state["open"] = False
        return b"\r"
    if c == b"V":
        return b"V1013\r"
    if c == b"N":
        return b"NEMU1\r"
    if c in (b"S", b"Y", b"Z", b"M", b"m", b"F"):
        return b"\r"
    return b"\a"


plug()
print(f"ready {link}", flush=True)
buf = b""
n_burst = 0
while True:
    fds = [sys.stdin]
    if state["master"] is not None:
        fds.append(state["master"])
    r, _, _ = select.select(fds, [], [], 0.5)
    if sys.stdin in r:
        cmd = sys.stdin.readline().split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "unplug":
            unplug()
        elif cmd[0] == "plug":
            plug()
        elif cmd[0] == "burst":
            out = b"".join(b"t3214%08X\r" % (n_burst + i) for i in range(int(cmd[1])))
            n_burst += int(cmd[1])
            write(out)
        print("done " + cmd[0], flush=True)
    m = state["master"]
    if m is not None and m in r:
        try:
            data = os.read(m, 65536)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            # EIO: nobody has the slave open right now (jmpd is reopening it).
            select.select([], [], [], 0.05)
            continue
        buf += data
        out = []
        while b"\r" in buf:
            line, buf = buf.split(b"\r", 1)
            out.append(answer(line.strip(b"\n")))
        if out:
            write(b"".join(out))
unplug()
