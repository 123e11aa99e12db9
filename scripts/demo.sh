#!/usr/bin/env bash
# Quick start: the main job on the built-in simulated board (no hardware, no controller).
# Builds jmp, starts a simulated board with `jmp local start`, logs in on its console through
# the local pty exactly as picocom or pyserial would, runs a command, shows the transcript and
# stops the board.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p jmp
jmp=target/debug/jmp

echo "\$ jmp local start"
$jmp local start
console=$($jmp status -o json | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]; print(next(d["local"] for d in s["devices"] if d["kind"]=="serial"))')
trap '$jmp local stop >/dev/null' EXIT

echo
echo "# the board's console is an ordinary tty at $console; a session on it:"
python3 - "$console" "$jmp" <<'PY'
import os, subprocess, sys, termios, time, tty, select
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
tty.setraw(fd)
def read_until(marker, timeout=10):
    out, end = b"", time.time() + timeout
    while marker not in out and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            out += os.read(fd, 4096)
    return out.decode(errors="replace")
def say(text, marker):
    os.write(fd, text.encode())
    return read_until(marker.encode())
transcript = read_until(b"login: ")            # the boot log, replayed from the exporter's history
transcript += say("root\r", "Password: ")
transcript += say("secret\r", "# ")
transcript += say("uname -a\r", "# ")
transcript += say("echo hello from the board\r", "# ")
print(transcript.replace("\r\n", "\n"))
ok = "hello from the board\n" in transcript.replace("\r\n", "\n")
# Power: the board's power switch is a command; the console shows it booting again.
print("$ jmp power cycle")
cycle = subprocess.run([sys.argv[2], "power", "cycle"], capture_output=True, text=True)
print(cycle.stdout.strip() or cycle.stderr.strip())
reboot = read_until(b"login: ")
lines = [l for l in reboot.replace("\r\n", "\n").splitlines() if l.strip()]
print("# the console after the cycle:")
print("\n".join(lines[:3] + ["..."] + lines[-2:]))
ok = ok and cycle.returncode == 0 and "U-Boot" in reboot
os.close(fd)
sys.exit(0 if ok else 1)
PY
echo
echo "\$ jmp local stop"
