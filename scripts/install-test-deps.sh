#!/usr/bin/env bash
# Installs everything the test suite and the benchmarks use, on a bare Debian machine of this
# project's kind. Idempotent: a second run only checks. Run as root (CI runs as root).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

apt_pkgs=(picocom tio tmux socat ser2net iperf3 openssh-client openssh-server iproute2 procps python3-venv prometheus
    nftables tcpdump systemd)
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
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import serial, can' 2>/dev/null; then
    echo "install-test-deps: python venv at $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check pyserial python-can
fi
echo "install-test-deps: ok"
