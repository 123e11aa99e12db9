# Runs inside the test guest (tests/src/guest.rs, minimal boot), as root, with USB/IP, dummy_hcd
# and configfs gadgets: the lab host's USB devices are gadgets on dummy_hcd, jmpd exports them
# and jmp attach imports them through vhci-hcd, both in this one guest.
# The caller prepends: BIN (jmp and jmpd), PY (the venv's python), TOOL (usb_tool.py), and
# runs one phase: setup, main, devices, faults, nonroot or final (the host's test talks to
# jmpd between setup and main).
# Prints "CHECK <name> ok" per check passed; exits non-zero at the first that fails.
set -eu
G=/tmp/g
CFG=/sys/kernel/config/usb_gadget
ok() { echo "CHECK $1 ok ($(cut -d" " -f1 /proc/uptime) s)"; }
fail() {
    echo "CHECK $1 FAILED: ${2:-}"
    for f in $G/*.err $G/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -25 "$f"; }; done
    echo "--- vhci"; cat /sys/devices/platform/vhci_hcd.0/status 2>/dev/null | head -4
    echo "--- dmesg"; dmesg | tail -30
    exit 1
}
# Hang guard for waits: 60 s, 0.1 s a look.
wait_until() { i=0; until eval "$1" > /dev/null 2>&1; do i=$((i + 1)); [ $i -gt 600 ] && return 1; sleep 0.1; done; }
wait_for() { wait_until "grep -q '$2' '$1'"; }
export JMP_RUNTIME_DIR=$G/rt JMP_CONFIG_DIR=$G/cfg
status() { "$BIN/jmp" status -o json > $G/status.json 2> $G/status.err; }
endpoint() { status && "$PY" "$TOOL" endpoint $G/status.json "$1" "$2"; }
summary() { status && "$PY" "$TOOL" summary $G/status.json "$1"; }
busid_of() { for d in /sys/bus/usb/devices/*; do [ -f "$d/serial" ] && [ "$(cat "$d/serial")" = "$1" ] && ! readlink -f "$d" | grep -q vhci_hcd && basename "$d"; done | head -1; }
# The driver a device is bound to: "none" when it has none or is not there.
driver_of() { l=$(readlink "/sys/bus/usb/devices/$1/driver" 2> /dev/null) && basename "$l" || echo none; }
used_ports() { grep -cE '^(hs|ss) +[0-9]+ 00[567] ' /sys/devices/platform/vhci_hcd.0/status* | awk -F: '{s += $2} END {print s + 0}'; }
# Reads the disk's first MiB again and again until a read fails (in the background: DD is its
# PID): at any moment a transfer is under way, and "copied" shows soon.
read_forever() {
    sh -c 'while dd if="$1" of=/dev/null bs=64k count=16 iflag=direct; do :; done' sh "$1" 2> "$2" &
    DD=$!
}

start_jmpd() {
    setsid "$BIN/jmpd" --config $G/jmpd.yaml > $G/jmpd.out 2> "$1" < /dev/null &
    echo $! > $G/jmpd.pid
    wait_for $G/jmpd.out 'listening on' || fail jmpd "jmpd not ready"
}
attach() {
    rm -f $G/attach.out
    setsid "$BIN/jmp" attach --exporter 127.0.0.1:7811 --token-file $G/token \
        --fingerprint "$(sed -n 's/.*fingerprint \(sha256:[0-9a-f]*\).*/\1/p' $G/jmpd.out)" \
        --dev-dir $G/dev -o json > $G/attach.out 2> "$1" < /dev/null &
    echo $! > $G/attach.pid
    wait_for $G/attach.out '"devices"' || fail attach "no ready line"
}
# Waits until both devices are imported with the nodes they make here.
imported() {
    wait_until '[ -n "$(endpoint board tty)" ] && [ -n "$(endpoint board disk)" ] && [ -n "$(endpoint board hidraw)" ] && [ -n "$(endpoint net net)" ]'
}

gadget() { # NAME UDC PID SERIAL FUNCTIONS...
    name=$1; g=$CFG/$1; udc=$2; pid=$3; ser=$4; shift 4
    mkdir -p $g/strings/0x409 $g/configs/c.1
    echo 0x1209 > $g/idVendor; echo "$pid" > $g/idProduct
    echo "$ser" > $g/strings/0x409/serialnumber; echo jmp > $g/strings/0x409/manufacturer
    echo "jmp test $name" > $g/strings/0x409/product
    for f in "$@"; do
        mkdir -p $g/functions/$f
        case $f in
            mass_storage.*) echo $G/disk.img > $g/functions/$f/lun.0/file ;;
            hid.*) echo 1 > $g/functions/$f/protocol; echo 1 > $g/functions/$f/subclass
                   echo 8 > $g/functions/$f/report_length
                   "$PY" "$TOOL" hid-descriptor $g/functions/$f/report_desc ;;
        esac
        ln -s $g/functions/$f $g/configs/c.1/
    done
    echo "$udc" > $g/UDC
}

setup() {
    rm -rf $G; mkdir -p $G/rt $G/cfg $G/dev $G/state /mnt/p
    for m in loop vfat dummy_hcd libcomposite usb_f_acm usb_f_mass_storage usb_f_hid usb_f_ncm \
        usbip-host vhci-hcd cdc_acm usb_storage sd_mod usbhid hid_generic cdc_ncm; do
        case $m in dummy_hcd) modprobe dummy_hcd num=3 ;; *) modprobe "$m" ;; esac
    done
    mount -t configfs none /sys/kernel/config 2>/dev/null || true
    # The board's disk: random data, and at 1 MiB an 8 MiB FAT partition holding a file.
    dd if=/dev/urandom of=$G/disk.img bs=1M count=16 2> /dev/null
    printf 'label: dos\nstart=2048, size=16384, type=c\n' | sfdisk -q $G/disk.img
    mkfs.vfat -n JMP --offset 2048 $G/disk.img 8192 > /dev/null
    mount -o loop,offset=1048576 $G/disk.img /mnt/p
    echo "hello from the board" > /mnt/p/hello.txt
    umount /mnt/p
    gadget g1 dummy_udc.0 0x0001 jmp-g1 acm.usb0 mass_storage.0 hid.usb0
    gadget g2 dummy_udc.1 0x0003 jmp-g2 ncm.usb0
    gadget g3 dummy_udc.2 0x0666 jmp-g3 acm.usb1
    wait_until '[ -n "$(busid_of jmp-g1)" ] && [ -n "$(busid_of jmp-g2)" ] && [ -n "$(busid_of jmp-g3)" ]' || fail setup "gadgets did not enumerate"
    echo "g1 $(busid_of jmp-g1) g2 $(busid_of jmp-g2) g3 $(busid_of jmp-g3)"
    # The gadgets' side of the serial ports: an upper-case echo.
    setsid "$PY" "$TOOL" echo-server /dev/ttyGS0 $G/echo.log > /dev/null 2> $G/echo.err < /dev/null &
    wait_for $G/echo.log ready || fail setup "no echo server"
    setsid socat TCP-LISTEN:7000,reuseaddr,fork EXEC:cat > /dev/null 2>&1 < /dev/null &
    echo guest-token > $G/token
    cat > $G/jmpd.yaml <<YAML
apiVersion: jmp.dev/v1alpha1
kind: ExporterConfig
metadata: {name: guest}
listen: 0.0.0.0:7811
stateDir: $G/state
auth: {tokenFile: $G/token}
export:
  board: {type: usb, ids: ['1209:0001', '1209:0002']}
  net: {type: usb, ids: ['1209:0003'], serial: jmp-g2}
  echo: {type: tcp, host: 127.0.0.1, port: 7000}
YAML
    start_jmpd $G/jmpd.err
    ok setup
}

main() {
    G1=$(busid_of jmp-g1); G2=$(busid_of jmp-g2); G3=$(busid_of jmp-g3)
    attach $G/attach.err
    grep -q '"name":"board","kind":"usb"' $G/attach.out && grep -q '"name":"net","kind":"usb"' $G/attach.out || fail listed "$(cat $G/attach.out)"
    ok listed
    # The ready line waits for each import's bind (every interface probed): it already names
    # the ttyACM cdc_acm made, and the node is there.
    head -1 $G/attach.out > $G/ready.json
    READY_TTY=$("$PY" "$TOOL" endpoint $G/ready.json board tty) || fail ready-tty "no tty in the ready line: $(cat $G/ready.json)"
    case $READY_TTY in /dev/ttyACM*) ;; *) fail ready-tty "$READY_TTY" ;; esac
    [ -c "$READY_TTY" ] || fail ready-tty "$READY_TTY is not a device"
    ok ready-tty
    imported || fail imported "$(cat $G/status.json)"
    ok imported
    # Both devices imported at the same time, each with its nodes.
    [ "$(used_ports)" = 2 ] || fail two-at-once "$(cat /sys/devices/platform/vhci_hcd.0/status)"
    summary board | grep -q "1209:0001 jmp jmp test g1 (480 Mbit/s, serial jmp-g1) at $G1, imported" || fail two-at-once "$(summary board)"
    summary net | grep -q "1209:0003 .* at $G2, imported" || fail two-at-once "$(summary net)"
    ok two-at-once
    TTY=$(endpoint board tty); DISK=$(endpoint board disk); HIDRAW=$(endpoint board hidraw); NIF=$(endpoint net net)

    # Serial: pyserial and picocom on the imported tty; the gadget answers in upper case.
    "$PY" "$TOOL" serial "$TTY" hello-pyserial > $G/serial.log 2>&1 || fail acm-pyserial "$(cat $G/serial.log)"
    grep -q 'got hello-pyserial' $G/echo.log || fail acm-pyserial "the gadget did not get it"
    ok acm-pyserial
    (sleep 2; printf 'hello-picocom\r'; sleep 4) |
        script -qfec "picocom -q -b 115200 --imap lfcrlf -x 4000 $TTY" $G/picocom.log > /dev/null 2>&1 || true
    grep -q 'got hello-picocom' $G/echo.log || fail acm-picocom "the gadget did not get it: $(cat $G/picocom.log)"
    grep -q 'HELLO-PICOCOM' $G/picocom.log || fail acm-picocom "$(cat $G/picocom.log)"
    ok acm-picocom

    # Mass storage: the imported disk is the board's image; fio writes and verifies; a
    # partition mounts, directly and through a loop device.
    cmp "$DISK" $G/disk.img || fail disk-cmp
    ok disk-cmp
    fio --name=verify --filename="$DISK" --rw=randwrite --bs=4k --offset=10M --size=1M \
        --direct=1 --verify=crc32c --do_verify=1 --output=$G/fio.log > /dev/null 2>&1 || fail disk-fio "$(cat $G/fio.log)"
    grep -q 'err= 0' $G/fio.log || fail disk-fio "$(cat $G/fio.log)"
    cmp "$DISK" $G/disk.img || fail disk-fio "the image differs from the disk after fio"
    ok disk-fio
    wait_until "[ -b ${DISK}1 ]" || fail disk-mount "no ${DISK}1"
    mount -o ro "${DISK}1" /mnt/p && grep -q 'hello from the board' /mnt/p/hello.txt || fail disk-mount
    umount /mnt/p
    LOOP=$(losetup -r -f --show "${DISK}1")
    mount -o ro "$LOOP" /mnt/p && grep -q 'hello from the board' /mnt/p/hello.txt || fail disk-mount "loop"
    umount /mnt/p; losetup -d "$LOOP"
    ok disk-mount
}

# The attachment of phase main goes on.
devices() {
    G1=$(busid_of jmp-g1); G2=$(busid_of jmp-g2); G3=$(busid_of jmp-g3)
    HIDRAW=$(endpoint board hidraw); NIF=$(endpoint net net)

    # HID: a report the gadget sends arrives on the imported hidraw.
    "$PY" "$TOOL" hid "$HIDRAW" /dev/hidg0 > $G/hid.log 2>&1 || fail hid "$(cat $G/hid.log)"
    ok hid

    # NCM: a ping through the imported network interface to the gadget's, each in a
    # namespace of its own.
    GIF=$(cat $CFG/g2/functions/ncm.usb0/ifname)
    ip netns add usbg; ip netns add usbh
    ip link set "$GIF" netns usbg; ip link set "$NIF" netns usbh
    ip -n usbg addr add 10.77.0.1/24 dev "$GIF"; ip -n usbg link set "$GIF" up
    ip -n usbh addr add 10.77.0.2/24 dev "$NIF"; ip -n usbh link set "$NIF" up
    ip netns exec usbh ping -c 3 -W 5 10.77.0.1 > $G/ping.log 2>&1 || fail ncm-ping "$(cat $G/ping.log)"
    ok ncm-ping

    # A device not in ids is never exported: not listed, on its own driver, unknown to
    # usbip-host.
    status
    ! grep -q 0666 $G/status.json || fail not-in-ids "$(cat $G/status.json)"
    [ "$(driver_of "$G3")" = usb ] || fail not-in-ids "$G3 is on $(driver_of "$G3")"
    ! grep -qw "$G3" /sys/bus/usb/drivers/usbip-host/match_busid || fail not-in-ids "$(cat /sys/bus/usb/drivers/usbip-host/match_busid)"
    ok not-in-ids

    # Re-enumeration: the board switches mode (another product id that ids lists); it is
    # exported and imported again, and a program that opens the new tty works.
    echo "" > $CFG/g1/UDC
    echo 0x0002 > $CFG/g1/idProduct
    echo dummy_udc.0 > $CFG/g1/UDC
    wait_until 'summary board | grep -q "1209:0002 .*imported" && [ -n "$(endpoint board tty)" ]' || fail reenumerate "$(summary board)"
    grep -q '(back)' $G/jmpd.err || fail reenumerate "jmpd did not see it come back"
    "$PY" "$TOOL" serial "$(endpoint board tty)" hello-again > $G/serial2.log 2>&1 || fail reenumerate "$(cat $G/serial2.log)"
    ok reenumerate

}

faults() {
    G1=$(busid_of jmp-g1); G2=$(busid_of jmp-g2); G3=$(busid_of jmp-g3)

    # Unplugged in the middle of a read: the read fails, no vhci port or usbip-host binding
    # is left, and plugged in again the board comes back.
    DISK=$(endpoint board disk)
    read_forever "$DISK" $G/dd1.err
    wait_for $G/dd1.err copied || fail unplug "the disk was not read"
    echo "" > $CFG/g1/UDC
    wait $DD || true
    grep -qiE 'input/output error|no such|no medium' $G/dd1.err || fail unplug "$(cat $G/dd1.err)"
    wait_until '[ "$(used_ports)" = 1 ]' || fail unplug "vhci: $(cat /sys/devices/platform/vhci_hcd.0/status)"
    wait_until "[ ! -e /sys/bus/usb/devices/$G1 ]" || fail unplug "$G1 is still there, on $(driver_of "$G1")"
    # Plugged in again: it is imported again (if usbip-host took it, having kept its bus id,
    # jmpd gave it back first: an import of a device left on usbip-host would fail).
    echo 0x0001 > $CFG/g1/idProduct
    echo dummy_udc.0 > $CFG/g1/UDC
    wait_until '[ -n "$(endpoint board disk)" ]' || fail unplug "not back: $(summary board)"
    ok unplug-mid-transfer

    # jmpd killed in the middle of a read: the read fails (the link is gone: the import looks
    # unplugged here), and the next jmpd gives the device back before exporting it again.
    DISK=$(endpoint board disk)
    read_forever "$DISK" $G/dd2.err
    wait_for $G/dd2.err copied || fail kill9-jmpd "the disk was not read"
    kill -9 "$(cat $G/jmpd.pid)"
    wait $DD || true
    grep -qiE 'input/output error|no such|no medium' $G/dd2.err || fail kill9-jmpd "$(cat $G/dd2.err)"
    wait_until '[ "$(used_ports)" = 0 ]' || fail kill9-jmpd "vhci: $(cat /sys/devices/platform/vhci_hcd.0/status)"
    [ "$(driver_of "$G1")" = usbip-host ] || fail kill9-jmpd "jmpd's death left $G1 on $(driver_of "$G1")"
    start_jmpd $G/jmpd2.err
    wait_for $G/jmpd2.err "gave $G1 (1209:0001) back to usb" || fail kill9-jmpd "$(cat $G/jmpd2.err)"
    wait_until '[ -n "$(endpoint board disk)" ] && [ -n "$(endpoint net net)" ]' || fail kill9-jmpd "not imported again: $(cat $G/status.json)"
    ok kill9-jmpd

    # jmp attach killed in the middle of a read: the read fails, the kernel frees the vhci
    # ports, and jmpd gives both devices back to their drivers.
    DISK=$(endpoint board disk)
    read_forever "$DISK" $G/dd3.err
    wait_for $G/dd3.err copied || fail kill9-attach "the disk was not read"
    kill -9 "$(cat $G/attach.pid)"
    wait $DD || true
    grep -qiE 'input/output error|no such|no medium' $G/dd3.err || fail kill9-attach "$(cat $G/dd3.err)"
    wait_until '[ "$(used_ports)" = 0 ]' || fail kill9-attach "vhci: $(cat /sys/devices/platform/vhci_hcd.0/status)"
    wait_until '[ "$(driver_of "$G1")" = usb ] && [ "$(driver_of "$G2")" = usb ]' || fail kill9-attach "$G1 on $(driver_of "$G1"), $G2 on $(driver_of "$G2")"
    [ -z "$(tr -d ' \n' < /sys/bus/usb/drivers/usbip-host/match_busid)" ] || fail kill9-attach "$(cat /sys/bus/usb/drivers/usbip-host/match_busid)"
    # A new attachment imports them again.
    attach $G/attach2.err
    imported || fail kill9-attach "not imported again: $(cat $G/status.json)"
    kill -TERM "$(cat $G/attach.pid)"
    wait_until '[ "$(used_ports)" = 0 ]' || fail kill9-attach "ports left at exit"
    wait_until '[ "$(driver_of "$G1")" = usb ] && [ "$(driver_of "$G2")" = usb ]' || fail kill9-attach "not given back at exit"
    ok kill9-attach
}

nonroot() {
    G1=$(busid_of jmp-g1)
    mkdir -p $G/nr && chmod 777 $G/nr
    install -m 644 $G/token $G/nr/token
    setsid setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=$G/nr JMP_RUNTIME_DIR=$G/nr/rt JMP_CONFIG_DIR=$G/nr/cfg \
        "$BIN/jmp" attach --exporter 127.0.0.1:7811 --token-file $G/nr/token \
        --fingerprint "$(sed -n 's/.*fingerprint \(sha256:[0-9a-f]*\).*/\1/p' $G/jmpd.out)" \
        --dev-dir $G/nr/dev -o json > $G/nr.out 2> $G/nr.err < /dev/null &
    NP=$!
    wait_for $G/nr.out '"devices"' || fail nonroot "no ready line"
    grep -q 'board: listed, not bridged: this needs CAP_DAC_OVERRIDE' $G/nr.err || fail nonroot "$(cat $G/nr.err)"
    grep -q 'run jmp attach as root (sudo jmp attach' $G/nr.err || fail nonroot "$(cat $G/nr.err)"
    # The other kinds work: the TCP forward reaches the echo server, for the user it belongs to
    # (a local endpoint refuses other local users, root included, unless --allow-local-users).
    PORT=$("$PY" -c 'import json, sys
v = json.loads(open(sys.argv[1]).readline())
print([d for d in v["devices"] if d["name"] == "echo"][0]["endpoints"][0]["at"].split(":")[1])' $G/nr.out)
    [ "$(printf 'tcp-works\n' | timeout 20 setpriv --reuid=65534 --regid=65534 --clear-groups socat -t 10 - "TCP:127.0.0.1:$PORT")" = tcp-works ] || fail nonroot "the TCP forward did not echo"
    [ "$(used_ports)" = 0 ] && [ "$(driver_of "$G1")" = usb ] || fail nonroot "something was imported"
    kill -TERM $NP; wait $NP || true
    ok nonroot
}

final() {
    kill -TERM "$(cat $G/jmpd.pid)"
    wait_until '! kill -0 "$(cat $G/jmpd.pid)"' || fail clean-exit "jmpd did not stop"
    [ "$(used_ports)" = 0 ] || fail clean-exit "vhci ports left"
    for s in jmp-g1 jmp-g2 jmp-g3; do
        [ "$(driver_of "$(busid_of $s)")" = usb ] || fail clean-exit "$s on $(driver_of "$(busid_of $s)")"
    done
    [ -z "$(tr -d ' \n' < /sys/bus/usb/drivers/usbip-host/match_busid)" ] || fail clean-exit "usbip-host still lists $(cat /sys/bus/usb/drivers/usbip-host/match_busid)"
    [ ! -e $G/state/usb-board.json ] && [ ! -e $G/state/usb-net.json ] || fail clean-exit "a record is left"
    ok clean-exit
}

"$1"
