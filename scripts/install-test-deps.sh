#!/usr/bin/env bash
# Installs everything the test suite and the benchmarks use, on a bare Debian machine of this
# project's kind. Idempotent: a second run only checks. Run as root (CI runs as root).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

apt_pkgs=(picocom tio tmux socat ser2net iperf3 openssh-client openssh-server iproute2 procps python3-venv prometheus
    # network devices: NAT and loss (nft), SOCKS through ssh (nc -X 5), the tests' clients, and
    # the benchmark's peers (wireguard-go, wg) and offload switches (ethtool)
    nftables netcat-openbsd curl iputils-ping ethtool wireguard-go wireguard-tools
    # CAN: candump/cansend, and the qemu guest whose kernel has SocketCAN (this one has not)
    can-utils qemu-system-x86 busybox-static kmod xz-utils
    # storage: FUSE, the tools its tests run on the mount, and the benchmark's peers
    fuse3 fio sshfs nbdkit libnbd-bin bmap-tools dosfstools e2fsprogs fdisk util-linux mount qemu-utils zstd bzip2
    # the relay test's capture, and systemd-analyze for the units' test
    tcpdump systemd
    # USB (in the qemu guest): the kernel's own usbip tools (usbipd, usbip attach: the
    # benchmark's peer), lsusb
    usbip usbutils
    # the web pages' tests drive headless Chromium through chromedriver (Selenium)
    chromium chromium-driver)
# The web pages' browser code comes from npm (web/package-lock.json) and jmp's build embeds it.
# Machines of this kind carry Node.js with its own npm (NodeSource's nodejs, which conflicts
# with Debian's npm package): Debian's are installed only where there is no npm at all.
if ! command -v npm >/dev/null 2>&1; then
    apt_pkgs+=(nodejs npm)
fi
# protoc and the well-known .proto files (libprotobuf-dev) build etcd-client's gRPC code, a
# build dependency of jmp-controller; etcd-server and etcd-client (etcdctl) run the controller
# cluster tests and the etcd benchmark.
apt_pkgs+=(protobuf-compiler libprotobuf-dev etcd-server etcd-client)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})) && [ -z "${JMP_NO_APT:-}" ]; then
    echo "install-test-deps: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A private venv: the system Python is left alone, and tests find it at a fixed place.
venv="$here/target/pyenv"
# The repository's own package (python/, editable: the tests run the working tree) with the
# frameworks it plugs into (pytest, Robot Framework); python-can and can-isotp, the CAN tests'
# third-party clients; python-can-remote and jumpstarter-driver-can, the CAN benchmark's peers;
# pytest-xdist, the pool of boards' workers; mcp, the official MCP SDK whose stdio client drives
# `jmp mcp` in the tests; selenium, which drives headless Chromium in the web pages' tests.
# A venv copied from another checkout (a git worktree seeded with the main checkout's target/)
# still imports everything, but its scripts' #! lines run the other venv and its editable
# install is the other checkout's python/: the tests would run someone else's Python. Such a
# venv is made again here.
venv_is_ours() {
    [ -x "$venv/bin/python" ] || return 1
    [ "$(head -n 1 "$venv/bin/pytest" 2>/dev/null)" = "#!$venv/bin/python3" ] || return 1
    "$venv/bin/python" - "$venv" "$here/python/src" <<'PY' 2>/dev/null
import os, sys
import serial, can, isotp, can_remote, jumpstarter_driver_can, pytest, xdist, mcp, robot, selenium, jmp_testing, JmpLibrary
venv, src = (os.path.realpath(p) for p in sys.argv[1:3])
assert os.path.realpath(sys.prefix) == venv, sys.prefix
assert os.path.realpath(jmp_testing.__file__).startswith(src + os.sep), jmp_testing.__file__
PY
}
if ! venv_is_ours; then
    echo "install-test-deps: python venv at $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check pyserial python-can can-isotp \
        python-can-remote jumpstarter-driver-can pytest pytest-xdist mcp robotframework selenium
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here/python"
fi

# The web pages' browser code (xterm.js and its fit addon), exactly as the lockfile says: jmp's
# build.rs embeds it and fails, saying to run this, when it is missing.
if [ ! -f "$here/web/node_modules/.package-lock.json" ] || [ "$here/web/package-lock.json" -nt "$here/web/node_modules/.package-lock.json" ]; then
    echo "install-test-deps: npm ci in web/"
    (cd "$here/web" && npm ci --no-audit --no-fund --loglevel=error)
fi

# The test guest's kernel and initramfs (tests/guest/guest.sh): Debian's distribution kernel (it
# has vcan, can-raw, usbip and 9p as modules; this machine's own kernel has no CAN and cannot load
# modules), unpacked, not installed. The guest's systemd is the host's (package systemd above).
if [ -z "${JMP_NO_APT:-}" ]; then
    "$here/tests/guest/guest.sh" setup
fi
# boringtun-cli for `jmp-bench net` only (about 3 minutes to build; the tests do not need it).
if [ -n "${JMP_BENCH:-}" ] && ! command -v boringtun-cli >/dev/null && [ ! -x "$HOME/.cargo/bin/boringtun-cli" ]; then
    echo "install-test-deps: cargo install boringtun-cli"
    cargo install --locked boringtun-cli
fi
echo "install-test-deps: ok"
