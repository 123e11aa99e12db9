#!/usr/bin/env bash
# vcan-guest.sh: a throw-away qemu guest with real SocketCAN for the CAN tests.
#
# This machine's kernel has no CAN. Debian's distribution kernel (linux-image-amd64) has vcan,
# can-raw and 9p as modules, so the guest boots it, mounts the host's root read-only over
# virtio-9p under a tmpfs overlay (host binaries and the test venv run unchanged), and runs one
# shell script. The host's 127.0.0.1 is the guest's 10.0.2.2 (qemu user-mode network: nothing
# is added to the host's namespaces).
#
#   vcan-guest.sh setup            kernel unpacked (not installed) and an initramfs, in $CACHE
#   vcan-guest.sh run SCRIPT       boots, runs SCRIPT with /bin/sh as root, exits with its status
#
# Env: JMP_GUEST_CACHE (default <repo>/target/vcan-guest), JMP_GUEST_MEM (768M),
#      JMP_GUEST_TIMEOUT (300 s). apt packages: qemu-system-x86 busybox-static kmod can-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE=${JMP_GUEST_CACHE:-$here/target/vcan-guest}
MEM=${JMP_GUEST_MEM:-768M}
TIMEOUT=${JMP_GUEST_TIMEOUT:-300}
EARLY_MODULES="virtio_pci 9pnet_virtio 9p overlay virtio_net"

say() { echo "vcan-guest: $*" >&2; }

kernel_version() {
    if [ -f "$CACHE/kernel/VERSION" ]; then cat "$CACHE/kernel/VERSION"; return; fi
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/.*Depends: linux-image-\([0-9][^ ]*\).*/\1/p' | head -1
}

setup_kernel() {
    [ -f "$CACHE/kernel/VERSION" ] && return
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
    local out="$CACHE/initrd.gz"
    [ -f "$out" ] && [ "$out" -nt "$0" ] && return
    local v; v=$(kernel_version)
    local d="$CACHE/initrd"
    say "building the initramfs"
    rm -rf "$d"; mkdir -p "$d"/{bin,mods,proc,sys,dev,lower,upper,root}
    cp /bin/busybox "$d/bin/busybox"
    # shellcheck disable=SC2086
    modprobe -d "$CACHE/kernel" -S "$v" --show-depends -a $EARLY_MODULES |
        awk '$1 == "insmod" && !seen[$2]++ { print $2 }' |
        while read -r m; do cp "$m" "$d/mods/"; basename "$m" >> "$d/mods/order"; done
    cat > "$d/init" <<'INIT'
#!/bin/busybox sh
# PID 1: loads the early modules, builds the root (the host's / over 9p, read-only, under a
# tmpfs overlay), and runs the test script in it. Kernel command line words jmp_*=... arrive
# as variables.
B=/bin/busybox
die() { echo "guest-init: $*"; $B poweroff -f; }
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
for m in $($B cat /mods/order); do $B insmod "/mods/$m" 2>/dev/null; done
n=0
until $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro host /lower 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 300 ] && die "no 9p root"; $B usleep 10000
done
$B mount -t tmpfs -o mode=0755 tmpfs /upper
$B mkdir -p /upper/u/usr/lib/modules /upper/w
$B ln -s "$jmp_cache/kernel/lib/modules/$($B uname -r)" "/upper/u/usr/lib/modules/$($B uname -r)"
$B mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w,xino=off overlay /root || die "overlay"
R=/root
$B mount -t proc proc $R/proc; $B mount -t sysfs sys $R/sys; $B mount -t devtmpfs dev $R/dev
$B mkdir -p $R/dev/pts; $B mount -t devpts -o ptmxmode=0666 devpts $R/dev/pts
$B mount -t tmpfs tmpfs $R/run
$B mkdir -p "$R$jmp_share"
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none share "$R$jmp_share" || die "no share"
# The kernel runs its module helper in PID 1's root (this initramfs): chroot into the real one.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /root /sbin/modprobe "$@"\n' > /bin/modprobe
$B chmod 755 /bin/modprobe; echo /bin/modprobe > /proc/sys/kernel/modprobe
$B ip link set lo up
$B ip link set eth0 up && $B ip addr add 10.0.2.15/24 dev eth0
echo "guest-ready"
$B chroot $R /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 /bin/sh -c 'cd "$1" && exec /bin/sh "$2/script.sh" </dev/null' sh "$jmp_cwd" "$jmp_share"
echo $? > "$R$jmp_share/rc"
$B sync
$B poweroff -f
INIT
    chmod 755 "$d/init"
    (cd "$d" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$out.new")
    mv "$out.new" "$out"
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

run() {
    local script=$1 v kernel share
    v=$(kernel_version)
    kernel="$CACHE/kernel/boot/vmlinux-$v"
    [ -s "$kernel" ] || kernel="$CACHE/kernel/boot/vmlinuz-$v"
    share=$(mktemp -d "${TMPDIR:-/tmp}/vcan-guest.XXXXXX")
    cp "$script" "$share/script.sh"
    local bios=()
    [ -f /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)
    local st=0
    # shellcheck disable=SC2046
    timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 -machine q35 $(accel) -smp 2 -m "$MEM" \
        -nodefaults -no-user-config -display none -no-reboot "${bios[@]}" \
        -kernel "$kernel" -initrd "$CACHE/initrd.gz" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off tsc=reliable rdinit=/init jmp_cache=$CACHE jmp_share=$share jmp_cwd=$PWD" \
        -serial stdio -monitor none \
        -fsdev local,id=r,path=/,security_model=none,readonly=on,multidevs=remap \
        -device virtio-9p-pci,fsdev=r,mount_tag=host \
        -fsdev local,id=s,path="$share",security_model=none,multidevs=remap \
        -device virtio-9p-pci,fsdev=s,mount_tag=share \
        -netdev user,id=n,net=10.0.2.0/24 -device virtio-net-pci,netdev=n,romfile= \
        </dev/null || st=$?
    local rc=125
    if [ -s "$share/rc" ]; then rc=$(cat "$share/rc"); else say "the guest reported no status (qemu/timeout: $st)"; fi
    rm -rf "$share"
    return "$rc"
}

case "${1:-}" in
    setup) mkdir -p "$CACHE"; setup_kernel; setup_initramfs ;;
    run) [ -n "${2:-}" ] || { echo "usage: $0 run SCRIPT" >&2; exit 2; }
         mkdir -p "$CACHE"; setup_kernel; setup_initramfs; run "$2" ;;
    *) echo "usage: $0 setup | run SCRIPT" >&2; exit 2 ;;
esac
