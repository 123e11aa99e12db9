"""Helpers of the USB guest checks (tests/guest/usb_checks.sh), run with the test venv's Python.

  usb_tool.py endpoint STATUS_JSON DEVICE ROLE    print the device's first endpoint of ROLE
  usb_tool.py summary STATUS_JSON DEVICE          print the device's summary
  usb_tool.py echo-server TTY LOG                 the gadget's side of a serial port: answer
                                                  every line in upper case (pyserial), the tty
                                                  opened again after each hangup
  usb_tool.py serial TTY TEXT                     write TEXT and a newline to TTY with pyserial,
                                                  expect it back in upper case
  usb_tool.py hid HIDRAW HIDG                     read one report from HIDRAW (the imported
                                                  device) while the gadget writes it to HIDG
  usb_tool.py hid-descriptor PATH                 write a keyboard's report descriptor
"""

import json
import os
import sys
import threading
import time

import serial


def status_device(path, name):
    with open(path) as f:
        v = json.load(f)
    if isinstance(v, list):
        v = v[0]
    for d in v["devices"]:
        if d["name"] == name:
            return d
    raise SystemExit(f"no device {name} in {path}")


def endpoint(path, name, role):
    d = status_device(path, name)
    for e in d.get("endpoints", []):
        if e.get("role") == role:
            print(e["at"])
            return
    raise SystemExit(1)


def echo_server(tty, log):
    # The gadget's tty hangs up whenever the host side lets the device go (an unbind, a bind to
    # usbip-host, an unplug): open it again each time, so that every import finds the echo.
    with open(log, "a", buffering=1) as out:
        out.write("ready\n")
        while True:
            try:
                port = serial.Serial(tty, 115200, timeout=None)
            except serial.SerialException:
                time.sleep(0.1)  # the gadget is between hosts: try again
                continue
            buf = b""
            try:
                while True:
                    b = port.read(1)
                    if b in (b"\r", b"\n"):
                        if buf:
                            out.write(f"got {buf.decode(errors='replace')}\n")
                            port.write(buf.upper() + b"\r\n")
                            port.flush()
                        buf = b""
                    else:
                        buf += b
            except (serial.SerialException, OSError):
                port.close()


def serial_roundtrip(tty, text):
    port = serial.Serial(tty, 115200, timeout=10, write_timeout=10)
    port.reset_input_buffer()
    port.write(text.encode() + b"\n")
    port.flush()
    want = text.upper().encode()
    got = b""
    deadline = time.monotonic() + 20
    while want not in got and time.monotonic() < deadline:
        got += port.read(max(1, port.in_waiting))
    port.close()
    if want not in got:
        raise SystemExit(f"expected {want!r}, got {got!r}")
    print("ok", got.decode(errors="replace").strip())


# A boot keyboard (Documentation/usb/gadget_hid.rst): 8-byte reports (modifiers, reserved,
# six key codes) and the LED output report.
KEYBOARD = bytes.fromhex(
    "05010906a101050719e029e7150025017501950881029501750881039505750105081901"
    "2905910295017503910395067508150025650507190029658100c0"
)


def hid(hidraw, hidg):
    report = bytes([0x02, 0, 0x0b, 0x08, 0x0f, 0x0f, 0x12, 0])  # shift + "heLLo"
    got = {}

    def read():
        fd = os.open(hidraw, os.O_RDONLY)
        try:
            got["r"] = os.read(fd, 64)
        finally:
            os.close(fd)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    # The host polls the interrupt endpoint once hidraw is open; a write before that waits in
    # the gadget (it blocks until the host takes the report), so write until it is read.
    fd = os.open(hidg, os.O_WRONLY)
    deadline = time.monotonic() + 20
    while "r" not in got and time.monotonic() < deadline:
        os.write(fd, report)
        t.join(0.5)
    os.close(fd)
    if got.get("r") != report:
        raise SystemExit(f"expected {report.hex()}, got {got.get('r', b'').hex()}")
    print("ok", report.hex())


def main():
    cmd = sys.argv[1]
    if cmd == "endpoint":
        endpoint(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "summary":
        print(status_device(sys.argv[2], sys.argv[3]).get("summary", ""))
    elif cmd == "echo-server":
        echo_server(sys.argv[2], sys.argv[3])
    elif cmd == "serial":
        serial_roundtrip(sys.argv[2], sys.argv[3])
    elif cmd == "hid":
        hid(sys.argv[2], sys.argv[3])
    elif cmd == "hid-descriptor":
        with open(sys.argv[2], "wb") as f:
            f.write(KEYBOARD)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
