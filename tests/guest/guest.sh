#!/usr/bin/env bash
# guest.sh: the qemu test guest (real SocketCAN, USB/IP, systemd as PID 1 ...), booting Debian's
# distribution kernel under software emulation with the host's root shared read-only.
#
# This machine's kernel has no CAN, no USB/IP and cannot load modules. Debian's distribution
# kernel (linux-image-amd64) has them as modules, so the guest boots it, mounts the host's root
# read-only over virtio-9p under a tmpfs overlay (host binaries, this build and the test venv run
# unchanged), and mounts a private directory of the host read-write at the same path. The host's
# 127.0.0.1 is the guest's 10.0.2.2 (qemu's user-mode network: nothing is added to the host's
# namespaces); guest ports reach the host through forwards bound to 127.0.0.1 only.
#
#   guest.sh setup                  unpack the kernel (not installed) and build the initramfs
#   guest.sh boot DIR MODE [--agent PATH] [--fwd RULE]... [-- QEMU ARGS...]
#                                   exec qemu (the caller's child keeps its PID: kill it by PID).
#                                   DIR: the guest's private directory (the share, console.log,
#                                   agent.sock); MODE: minimal or systemd (tests/guest/init.sh);
#                                   RULE: a qemu hostfwd, e.g. udp:127.0.0.1:4000-:7811
#   guest.sh run SCRIPT             boot, run SCRIPT with /bin/sh as root, exit with its status
#
# tests/src/guest.rs drives `boot`; `run` is for trying things by hand.
# Env: JMP_GUEST_CACHE (default <repo>/target/guest), JMP_GUEST_MEM (768M), JMP_GUEST_CPUS (2),
#      JMP_GUEST_TIMEOUT (run only, 300 s).
# apt packages: qemu-system-x86 busybox-static kmod xz-utils (scripts/install-test-deps.sh).
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE=${JMP_GUEST_CACHE:-$here/target/guest}
MEM=${JMP_GUEST_MEM:-768M}
CPUS=${JMP_GUEST_CPUS:-2}
TIMEOUT=${JMP_GUEST_TIMEOUT:-300}
# Loaded by the initramfs itself: the root (9p, overlay), eth0, the agent's channel
# (virtio_console) and disks a test adds (virtio_blk). Nothing else: there is no udev.
EARLY_MODULES="virtio_pci 9pnet_virtio 9p overlay virtio_net virtio_console virtio_blk"

say() { echo "guest: $*" >&2; }

kernel_version() {
    if [ -f "$CACHE/kernel/VERSION" ]; then cat "$CACHE/kernel/VERSION"; return; fi
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/.*Depends: linux-image-\([0-9][^ ]*\).*/\1/p' | head -1
}

setup_kernel() {
    [ -f "$CACHE/kernel/VERSION" ] && return
    # The kernel as the CAN guest's earlier harness unpacked it (target/vcan-guest).
    if [ -z "${JMP_GUEST_CACHE:-}" ] && [ -f "$here/target/vcan-guest/kernel/VERSION" ]; then
        mv "$here/target/vcan-guest/kernel" "$CACHE/kernel"
        rm -rf "$here/target/vcan-guest"
        return
    fi
    local v; v=$(kernel_version)
    if [ -z "$v" ]; then apt-get update -qq; v=$(kernel_version); fi
    [ -n "$v" ] || { say "cannot tell which kernel linux-image-amd64 is"; exit 1; }
    say "unpacking linux-image-$v into $CACHE/kernel"
    rm -rf "$CACHE/kernel.new" "$CACHE/debs"; mkdir -p "$CACHE/kernel.new" "$CACHE/debs"
    (cd "$CACHE/debs" && apt-get download -q "linux-image-$v" >/dev/null)
    dpkg-deb -x "$CACHE"/debs/linux-image-"$v"_*.deb "$CACHE/kernel.new"
    grep -q '^CONFIG_CAN_VCAN=m' "$CACHE/kernel.new/boot/config-$v" ||
        { say "linux-image-$v has no vcan module"; exit 1; }
    # The package carries no modules.dep; modprobe needs one.
    depmod -b "$CACHE/kernel.new" "$v"
    # qemu boots an uncompressed ELF kernel directly (PVH entry), skipping the decompressor,
    # which costs seconds under software emulation. Cut the xz stream out of the bzImage.
    local img="$CACHE/kernel.new/boot/vmlinuz-$v" at
    at=$(LC_ALL=C grep -abo $'\xfd7zXZ\x00' "$img" | head -1 | cut -d: -f1 || true)
    if [ -n "$at" ]; then
        tail -c +$((at + 1)) "$img" | xz -dc 2>/dev/null > "$CACHE/kernel.new/boot/vmlinux-$v" || true
    fi
    echo "$v" > "$CACHE/kernel.new/VERSION"
    rm -rf "$CACHE/kernel" "$CACHE/debs"; mv "$CACHE/kernel.new" "$CACHE/kernel"
}

setup_initramfs() {
    local out="$CACHE/initrd.gz" init="$here/tests/guest/init.sh"
    if [ -f "$out" ] && [ "$out" -nt "$0" ] && [ "$out" -nt "$init" ]; then return; fi
    local v; v=$(kernel_version)
    local d="$CACHE/initrd"
    say "building the initramfs"
    rm -rf "$d"; mkdir -p "$d"/{bin,mods,proc,sys,dev,lower,upper,root}
    cp /bin/busybox "$d/bin/busybox"
    # shellcheck disable=SC2086
    modprobe -d "$CACHE/kernel" -S "$v" --show-depends -a $EARLY_MODULES |
        awk '$1 == "insmod" && !seen[$2]++ { print $2 }' |
        while read -r m; do cp "$m" "$d/mods/"; basename "$m" >> "$d/mods/order"; done
    cp "$init" "$d/init"
    chmod 755 "$d/init"
    (cd "$d" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$out.new")
    mv "$out.new" "$out"
    rm -rf "$d"
}

setup() {
    mkdir -p "$CACHE"
    # Tests booting guests at once share the cache: one builds, the others wait.
    exec 9> "$CACHE/.lock"
    flock 9
    setup_kernel
    setup_initramfs
}

accel() {
    # KVM only where it runs an unmodified kernel: this project's machines have a paravirtual
    # /dev/kvm (kvm_pvm) under which Debian's kernel hangs, and no vmx/svm flag.
    if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
        echo "-accel kvm -cpu host"
    else
        echo "-accel tcg,thread=multi -cpu max"
    fi
}

# boot DIR MODE [--agent PATH] [--fwd RULE]... [-- QEMU ARGS...]
boot() {
    local dir=$1 mode=$2 agent="" net="user,id=n,net=10.0.2.0/24"
    shift 2
    while [ $# -gt 0 ]; do
        case $1 in
            --agent) agent=$2; shift 2 ;;
            --fwd) net+=",hostfwd=$2"; shift 2 ;;
            --) shift; break ;;
            *) say "boot: unknown option $1"; exit 2 ;;
        esac
    done
    case $mode in minimal|systemd|script) ;; *) say "boot: unknown mode $mode"; exit 2 ;; esac
    local v kernel append
    v=$(kernel_version)
    kernel="$CACHE/kernel/boot/vmlinux-$v"
    [ -s "$kernel" ] || kernel="$CACHE/kernel/boot/vmlinuz-$v"
    append="console=ttyS0 panic=-1 mitigations=off tsc=reliable rdinit=/init"
    append+=" jmp_cache=$CACHE jmp_dir=$dir jmp_mode=$mode jmp_agent=$agent jmp_cwd=$PWD"
    if [ "$mode" = systemd ]; then
        # Only jmp-guest.target; no first-boot questions, no host fstab. systemd-tmpfiles
        # would empty /tmp at boot: the host's files there (test directories, the guest's own
        # private directory, which is writable) are the tests' to keep. No clock sync (there is
        # no route out).
        append+=" systemd.unit=jmp-guest.target systemd.firstboot=off fstab=no loglevel=4"
        append+=" systemd.mask=systemd-tmpfiles-setup.service systemd.mask=systemd-tmpfiles-clean.timer"
        append+=" systemd.mask=systemd-timesyncd.service"
        # What a test never uses, each a second or more under software emulation.
        local u
        for u in systemd-binfmt.service proc-sys-fs-binfmt_misc.automount dev-hugepages.mount \
            sys-kernel-debug.mount sys-kernel-tracing.mount kmod-static-nodes.service \
            modprobe@.service systemd-pstore.service systemd-update-utmp.service \
            systemd-random-seed.service systemd-sysusers.service systemd-journal-flush.service \
            systemd-modules-load.service e2scrub_reap.service; do
            append+=" systemd.mask=$u"
        done
    else
        append+=" quiet loglevel=1"
    fi
    local bios=()
    [ -f /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)
    # shellcheck disable=SC2046
    exec qemu-system-x86_64 -machine q35 $(accel) -smp "$CPUS" -m "$MEM" \
        -nodefaults -no-user-config -display none -no-reboot "${bios[@]}" \
        -kernel "$kernel" -initrd "$CACHE/initrd.gz" -append "$append" \
        -monitor none -chardev file,id=con,path="$dir/console.log" -serial chardev:con \
        -fsdev local,id=r,path=/,security_model=none,readonly=on,multidevs=remap \
        -device virtio-9p-pci,fsdev=r,mount_tag=host \
        -fsdev local,id=s,path="$dir",security_model=none,multidevs=remap \
        -device virtio-9p-pci,fsdev=s,mount_tag=share \
        -netdev "$net" -device virtio-net-pci,netdev=n,romfile= \
        -device virtio-serial-pci,id=vs \
        -chardev socket,id=agent,path="$dir/agent.sock",server=on,wait=off \
        -device virtserialport,bus=vs.0,chardev=agent,name=jmp.agent \
        "$@" </dev/null
}

run() {
    local script=$1 dir st=0
    dir=$(mktemp -d "${TMPDIR:-/tmp}/jmp-guest.XXXXXX")
    cp "$script" "$dir/script.sh"
    # The hang guard ends qemu by its PID (boot execs it in timeout's child).
    timeout -k 5 "$TIMEOUT" "$0" boot "$dir" script > "$dir/qemu.out" 2>&1 || st=$?
    cat "$dir/console.log" "$dir/qemu.out" 2>/dev/null || true
    local rc=125
    if [ -s "$dir/rc" ]; then rc=$(cat "$dir/rc"); else say "the guest reported no status (qemu: $st)"; fi
    rm -rf "$dir"
    return "$rc"
}

case "${1:-}" in
    setup) setup ;;
    boot) [ $# -ge 3 ] || { echo "usage: $0 boot DIR MODE [--agent PATH] [--fwd RULE]... [-- QEMU ARGS]" >&2; exit 2; }
          shift; boot "$@" ;;
    run) [ -n "${2:-}" ] || { echo "usage: $0 run SCRIPT" >&2; exit 2; }
         setup; run "$2" ;;
    *) echo "usage: $0 setup | boot DIR MODE ... | run SCRIPT" >&2; exit 2 ;;
esac
