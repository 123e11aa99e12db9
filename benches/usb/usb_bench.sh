# The USB benchmark's guest side (benches/src/usb.rs boots the test guest, minimal init, as
# root): one configfs gadget on dummy_hcd (an ACM serial port and a 64 MiB disk) is the lab
# host's device, imported through vhci-hcd in the same guest either by jmp (jmpd + jmp attach
# over QUIC on loopback) or by the kernel's own usbip (Debian's usbipd + usbip attach over TCP
# on loopback). The caller prepends BIN (jmpd, jmp), CMP (another build's jmpd and jmp, for
# `--compare-bin-dir`, or empty), PY (the venv's python), HELPER (usb_bench.py), OUT (a
# directory the host reads), and runs one phase: setup, `round PATH N` (PATH jmp, jmpcmp (the
# CMP build) or usbip; N the round, naming the result files) or `profile PATH`.
set -eu
G=/tmp/ub
CFG=/sys/kernel/config/usb_gadget
die() { echo "FAILED: $*" >&2; for f in $G/*.err; do [ -f "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done; dmesg | tail -20 >&2; exit 1; }
# Hang guard for waits: 60 s, 0.1 s a look.
wait_until() { i=0; until eval "$1" > /dev/null 2>&1; do i=$((i + 1)); [ $i -gt 600 ] && return 1; sleep 0.1; done; }
# The gadget's bus id on dummy_hcd, and its imported copy's under vhci-hcd.
board_busid() { for d in /sys/bus/usb/devices/*; do [ "$(cat "$d/serial" 2>/dev/null)" = jmp-bench ] && ! readlink -f "$d" | grep -q vhci_hcd && basename "$d"; done | head -1; }
imported_dev() { for d in /sys/bus/usb/devices/*; do [ "$(cat "$d/serial" 2>/dev/null)" = jmp-bench ] && readlink -f "$d" | grep -q vhci_hcd && readlink -f "$d"; done | head -1; }
# The imported device's tty and disk (the same lookup for both paths).
node_tty() { d=$(imported_dev); [ -n "$d" ] && for t in /sys/class/tty/ttyACM*; do readlink -f "$t/device" | grep -q "^$d" && echo "/dev/$(basename "$t")"; done | head -1; }
node_disk() { d=$(imported_dev); [ -n "$d" ] && for b in /sys/block/sd*; do readlink -f "$b" | grep -q "^$d" && [ "$(cat "$b/size")" -gt 0 ] && echo "/dev/$(basename "$b")"; done | head -1; }
# The driver a device is bound to: "none" when it has none or is not there.
driver_of() { l=$(readlink "/sys/bus/usb/devices/$1/driver" 2> /dev/null) && basename "$l" || echo none; }
used_ports() { grep -cE '^(hs|ss) +[0-9]+ 00[567] ' /sys/devices/platform/vhci_hcd.0/status* | awk -F: '{s += $2} END {print s + 0}'; }

setup() {
    rm -rf $G; mkdir -p $G/rt $G/cfg $G/dev $G/state
    for m in dummy_hcd libcomposite usb_f_acm usb_f_mass_storage usbip-host vhci-hcd cdc_acm usb_storage sd_mod; do
        modprobe "$m"
    done
    mount -t configfs none /sys/kernel/config 2> /dev/null || true
    dd if=/dev/urandom of=$G/disk.img bs=1M count=64 2> /dev/null
    g=$CFG/bench
    mkdir -p $g/strings/0x409 $g/configs/c.1 $g/functions/acm.usb0 $g/functions/mass_storage.0
    echo 0x1209 > $g/idVendor; echo 0x0001 > $g/idProduct
    echo jmp-bench > $g/strings/0x409/serialnumber; echo jmp > $g/strings/0x409/manufacturer
    echo "jmp bench" > $g/strings/0x409/product
    echo $G/disk.img > $g/functions/mass_storage.0/lun.0/file
    ln -s $g/functions/acm.usb0 $g/configs/c.1/; ln -s $g/functions/mass_storage.0 $g/configs/c.1/
    echo dummy_udc.0 > $g/UDC
    wait_until '[ -n "$(board_busid)" ]' || die "the gadget did not enumerate"
    setsid "$PY" "$HELPER" echo /dev/ttyGS0 $G/echo.ready > /dev/null 2> $G/echo.err < /dev/null &
    wait_until "[ -e $G/echo.ready ]" || die "no echo on the gadget's tty"
    setsid usbipd > /dev/null 2> $G/usbipd.err < /dev/null &
    wait_until 'ss -ltn | grep -q :3240' || die "usbipd is not listening"
    echo bench-token > $G/token
    cat > $G/jmpd.yaml <<YAML
apiVersion: jmp.dev/v1alpha1
kind: ExporterConfig
metadata: {name: bench}
listen: 127.0.0.1:7811
stateDir: $G/state
auth: {tokenFile: $G/token}
export:
  board: {type: usb, ids: ['1209:0001']}
YAML
    echo "setup ok: $(board_busid)"
}

import_jmp() { start_jmp "$BIN"; }
import_jmpcmp() { start_jmp "$CMP"; }
release_jmpcmp() { release_jmp; }
start_jmp() { # BIN
    setsid "$1/jmpd" --config $G/jmpd.yaml > $G/jmpd.out 2> $G/jmpd.err < /dev/null &
    JMPD=$!
    wait_until "grep -q 'listening on' $G/jmpd.out" || die "jmpd not ready"
    JMP_RUNTIME_DIR=$G/rt JMP_CONFIG_DIR=$G/cfg setsid "$1/jmp" attach --exporter 127.0.0.1:7811 \
        --token-file $G/token --fingerprint "$(sed -n 's/.*fingerprint \(sha256:[0-9a-f]*\).*/\1/p' $G/jmpd.out)" \
        --dev-dir $G/dev -o json > $G/attach.out 2> $G/attach.err < /dev/null &
    ATTACH=$!
}
release_jmp() {
    kill -TERM $ATTACH; wait $ATTACH || true
    kill -TERM $JMPD; wait $JMPD || true
}
import_usbip() {
    usbip bind -b "$B" > $G/usbip.err 2>&1 || die "usbip bind"
    usbip attach -r 127.0.0.1 -b "$B" >> $G/usbip.err 2>&1 || die "usbip attach"
}
release_usbip() {
    port=$(usbip port 2> /dev/null | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -1)
    usbip detach -p "$port" >> $G/usbip.err 2>&1 || die "usbip detach"
    wait_until '[ "$(used_ports)" = 0 ]' || die "the vhci port stayed"
    usbip unbind -b "$B" >> $G/usbip.err 2>&1 || die "usbip unbind"
}

round() { # PATH N
    B=$(board_busid)
    "import_$1"
    wait_until '[ -n "$(node_tty)" ] && [ -n "$(node_disk)" ]' || die "$1: not imported"
    TTY=$(node_tty); DISK=$(node_disk)
    # The same reads for both paths, uncached on the importing side (direct I/O).
    fio --name=seq --filename="$DISK" --rw=read --bs=1M --size=48M --direct=1 \
        --output-format=json --output="$OUT/$1-$2-seq.json" > /dev/null 2>&1 || die "$1: fio seq"
    fio --name=rand --filename="$DISK" --rw=randread --bs=4k --iodepth=1 --ioengine=psync \
        --direct=1 --size=60M --runtime=5 --time_based --randrepeat=0 \
        --output-format=json --output="$OUT/$1-$2-rand.json" > /dev/null 2>&1 || die "$1: fio rand"
    timeout 120 "$PY" "$HELPER" rtt "$TTY" 300 > "$OUT/$1-$2-rtt.json" 2> $G/rtt.err || die "$1: rtt"
    "release_$1"
    wait_until '[ "$(used_ports)" = 0 ] && [ "$(driver_of "$B")" = usb ]' || die "$1: $B not given back ($(driver_of "$B"))"
    echo "round $1 $2 ok"
}

# Where an exchange's time goes. The context switches of everything on the path (the kernel's
# USB/IP threads vhci_tx/vhci_rx/stub_rx/stub_tx, and with jmp also jmpd and jmp attach) over
# 120 one-byte round trips (rtt 100 after its 20 for warm-up) and over 100 4 KiB reads at QD1;
# then, with jmp, the same again under strace -c for the two processes' syscalls (a separate
# pass: tracing adds switches of its own). Prints one line per figure and strace's tables.
ctxt_of() { cat /proc/"$1"/task/*/status 2> /dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }
ctxt_sum() { s=0; for p in "$@"; do s=$((s + $(ctxt_of "$p"))); done; echo $s; }
kthreads() { for p in /proc/[0-9]*; do case "$(cat "$p/comm" 2> /dev/null)" in vhci_tx | vhci_rx | stub_rx | stub_tx) basename "$p" ;; esac; done; }
workload() { # WHAT
    case $1 in
        rtt) timeout 120 "$PY" "$HELPER" rtt "$TTY" 100 > /dev/null 2> $G/rtt.err || die "profile rtt" ;;
        rand) fio --name=p --filename="$DISK" --rw=randread --bs=4k --iodepth=1 --ioengine=psync \
                --direct=1 --size=60M --number_ios=100 --randrepeat=0 > /dev/null 2>&1 || die "profile rand" ;;
    esac
}
profile() { # PATH
    B=$(board_busid)
    "import_$1"
    wait_until '[ -n "$(node_tty)" ] && [ -n "$(node_disk)" ]' || die "$1: not imported"
    TTY=$(node_tty); DISK=$(node_disk)
    K=$(kthreads | tr '\n' ' ')
    U=""; [ "$1" != usbip ] && U="$JMPD $ATTACH"
    for what in rtt rand; do
        n=100; unit="4 KiB reads"; [ $what = rtt ] && n=120 && unit="one-byte round trips"
        k0=$(ctxt_sum $K); u0=$(ctxt_sum $U)
        t0=$(cut -d" " -f1 /proc/uptime)
        workload $what
        t1=$(cut -d" " -f1 /proc/uptime)
        k1=$(ctxt_sum $K); u1=$(ctxt_sum $U)
        echo "profile $1 $what: $n $unit in $(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}') s; context switches each: kernel USB/IP threads $(echo "$k0 $k1 $n" | awk '{printf "%.1f", ($2 - $1) / $3}'), jmpd + jmp attach $(echo "$u0 $u1 $n" | awk '{printf "%.1f", ($2 - $1) / $3}')"
        [ -n "$U" ] || continue
        S=""
        for p in $U; do
            strace -c -f -qq -o "$G/strace-$what-$p" -p "$p" &
            S="$S $!"
            wait_until "! grep -q '^TracerPid:[[:space:]]*0\$' /proc/$p/status" || die "strace did not attach to $p"
        done
        workload $what
        kill -INT $S; wait $S || true
        for p in $U; do
            who=jmpd; [ "$p" = "$ATTACH" ] && who="jmp attach"
            calls=$(awk '$NF == "total" {print $4}' "$G/strace-$what-$p")
            echo "profile $1 $what: $who: ${calls:-?} syscalls ($(echo "${calls:-0} $n" | awk '{printf "%.1f", $1 / $2}') each); the most frequent:"
            grep -vE '^(%|-|.*total$)' "$G/strace-$what-$p" | sort -k4 -n -r | head -6 | awk '{print "    " $NF, $4}'
        done
    done
    "release_$1"
    wait_until '[ "$(used_ports)" = 0 ] && [ "$(driver_of "$B")" = usb ]' || die "$1: $B not given back ($(driver_of "$B"))"
    # jmp's own figures per stream (builds before they were logged have none).
    [ "$1" != usbip ] && grep -h 'USB/IP stream ended' $G/jmpd.err $G/attach.err | sed "s/^.*USB\/IP/$1: USB\/IP/"
    true
}

"$@"
