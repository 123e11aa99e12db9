#!/bin/busybox sh
# PID 1 of the test guest, from its initramfs (tests/guest/guest.sh builds it around a static
# busybox). Loads the early modules, builds the root the guest runs in (the host's / over 9p,
# read-only, under a tmpfs overlay: host binaries run unchanged, writes stay in guest memory),
# mounts the guest's private directory read-write at the same path as on the host, brings up
# eth0 (qemu's user-mode network: the host's 127.0.0.1 is 10.0.2.2), then, by jmp_mode:
#   minimal  runs the agent (tests/src/bin/jmp-guest-agent.rs) chrooted into that root and
#            stays PID 1 (fast: no service manager)
#   systemd  hands the root to systemd as PID 1 (switch_root), which starts the agent as a
#            service of jmp-guest.target
#   script   runs jmp_dir/script.sh, writes its status to jmp_dir/rc and powers off
# Kernel command line words jmp_*=... arrive as variables.
B=/bin/busybox
die() { echo "guest-init: $*"; $B poweroff -f; }
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /mods/order); do $B insmod "/mods/$m" 2>/dev/null; done
n=0
until $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro host /lower 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 300 ] && die "no 9p root"; $B usleep 10000
done
KV=$($B uname -r)
$B mount -t tmpfs -o mode=0755 tmpfs /upper
U=/upper/u
$B mkdir -p $U/usr/lib/modules $U/etc /upper/w
# The host has no modules for this kernel: they are the unpacked .deb in the cache.
$B ln -s "$jmp_cache/kernel/lib/modules/$KV" "$U/usr/lib/modules/$KV"
# The host's own fstab, hostname and machine identity are not the guest's.
: > $U/etc/fstab
# This machine is a container: hide its marker, or systemd in the guest would believe it runs
# in a container (and ignore the kernel command line). An overlay whiteout is a 0:0 device.
[ -e /lower/.dockerenv ] && $B mknod $U/.dockerenv c 0 0
echo jmp-guest > $U/etc/hostname
$B tr -d '-' < /proc/sys/kernel/random/uuid > $U/etc/machine-id
$B mount -t overlay -o lowerdir=/lower,upperdir=$U,workdir=/upper/w,xino=off overlay /root || die "overlay"
R=/root
$B mount -t proc proc $R/proc
$B mount -t sysfs sys $R/sys
$B mount -t devtmpfs dev $R/dev
$B mkdir -p $R/dev/pts $R/dev/shm
$B mount -t devpts -o ptmxmode=0666 devpts $R/dev/pts
$B mount -t tmpfs -o mode=0755 tmpfs $R/run
$B mkdir -p "$R$jmp_dir"
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none share "$R$jmp_dir" || die "no share"
$B hostname jmp-guest
$B ip link set lo up
$B ip link set eth0 up && $B ip addr add 10.0.2.15/24 dev eth0
echo "guest-init: root ready after $($B cut -d' ' -f1 /proc/uptime) s"
ENV="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8"
case "$jmp_mode" in
systemd)
    # The agent as a service; jmp-guest.target is all systemd starts (plus what sysinit.target
    # and basic.target pull in), not the host's multi-user.target.
    S=$R/etc/systemd/system
    $B mkdir -p $S
    printf '[Unit]\nDescription=jmp test guest\nRequires=basic.target jmp-guest-agent.service\nAfter=basic.target jmp-guest-agent.service\nAllowIsolate=yes\n' > $S/jmp-guest.target
    printf '[Unit]\nDescription=jmp test guest agent\n[Service]\nEnvironment=%s\nExecStart=%s\n' "$ENV" "$jmp_agent" > $S/jmp-guest-agent.service
    # PID 1's root becomes the real one, so the kernel's module helper (/sbin/modprobe) works
    # there unchanged.
    exec $B switch_root $R /lib/systemd/systemd
    ;;
esac
# The kernel runs its module helper in PID 1's root (this initramfs): chroot into the real one.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /root /sbin/modprobe "$@"\n' > /bin/modprobe
$B chmod 755 /bin/modprobe
echo /bin/modprobe > /proc/sys/kernel/modprobe
case "$jmp_mode" in
minimal)
    # shellcheck disable=SC2086
    $B chroot $R /usr/bin/env -i $ENV "$jmp_agent"
    echo "guest-init: the agent ended ($?)"
    ;;
script)
    # shellcheck disable=SC2086
    $B chroot $R /usr/bin/env -i $ENV /bin/sh -c 'cd "$1" && exec /bin/sh "$2/script.sh" </dev/null' \
        sh "$jmp_cwd" "$jmp_dir"
    echo $? > "$R$jmp_dir/rc"
    ;;
*) echo "guest-init: unknown jmp_mode '$jmp_mode'" ;;
esac
$B sync
$B poweroff -f
