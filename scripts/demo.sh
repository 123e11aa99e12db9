#!/usr/bin/env bash
# Quick start: the main job on the built-in simulated board (no hardware, no controller).
# Builds jmp, starts a simulated board with `jmp local start`, logs in on its console through
# the local pty exactly as picocom or pyserial would, runs a command, shows the transcript and
# stops the board.
set -euo pipefail
cd "$(dirname "$0")/.."
# JMP_BIN: a jmp already built (the e2e test that runs this script sets it; cargo holds its
# build lock while tests run).
if [ -n "${JMP_BIN:-}" ]; then
    jmp=$JMP_BIN
else
    cargo build -q -p jmp
    jmp=target/debug/jmp
fi

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
echo "\$ jmp status      # the simulated board's other devices: its CAN ECU and its SD card"
$jmp status
echo
echo "# the SD card is a mount, read here as any program would; the ECU answers on its CAN bus:"
python3 - "$jmp" <<'PY'
import json, os, socket, subprocess, sys, time
jmp = sys.argv[1]
st = json.loads(subprocess.run([jmp, "status", "-o", "json"], capture_output=True, text=True, check=True).stdout)[0]
dev = {d["kind"]: d for d in st["devices"]}
ok = True
sd = dev.get("storage")
if sd and sd["endpoints"]:
    mount = sd["endpoints"][0]["at"]
    print(f"$ ls {mount}")
    print("  ".join(sorted(os.listdir(mount))))
    with open(os.path.join(mount, "disk"), "rb") as f:
        mbr = f.read(512)
    # The partition table, read like fdisk would: the type byte and size of each MBR entry.
    print("# its partition table (MBR entries: type, size):")
    for i in range(4):
        e = mbr[446 + 16 * i: 462 + 16 * i]
        if e[4]:
            print(f"  p{i + 1}: type 0x{e[4]:02x}, {int.from_bytes(e[12:16], 'little') * 512 // (1 << 20)} MiB")
    ok = ok and mbr[510:512] == b"\x55\xaa"
can = dev.get("can")
addr = next((e["at"] for e in (can or {}).get("endpoints", []) if e.get("role") == "socketcand"), None)
if addr:
    host, port = addr.rsplit(":", 1)
    print(f"# the ECU through the socketcand port {addr} (what python-can's socketcand interface speaks):")
    s = socket.create_connection((host, int(port)), timeout=5)
    f = s.makefile("rwb", buffering=0)
    def word():
        out = b""
        while not out.endswith(b">"):
            c = s.recv(1)
            if not c:
                raise SystemExit("socketcand port closed")
            out += c
        return out.decode().strip()
    assert word() == "< hi >"
    for cmd in (f"< open {can['name']} >", "< rawmode >"):
        s.sendall(cmd.encode())
        word()
    req = "< send 7E0 3 02 10 03 >"
    print(f"  sent   {req}   (UDS: start an extended diagnostic session)")
    s.sendall(req.encode())
    end = time.time() + 5
    answer = None
    while time.time() < end and answer is None:
        w = word()
        if w.startswith("< frame 7E8 "):
            answer = w
    print(f"  answer {answer}")
    ok = ok and answer is not None
    s.close()
sys.exit(0 if ok else 1)
PY
echo
echo "\$ jmp local stop"
