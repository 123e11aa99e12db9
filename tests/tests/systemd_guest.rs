//! The hardened unit, for real: in the qemu test guest with systemd as PID 1, the repository's
//! `systemd/jmpd@.service` plus the drop-in `jmpd --print-systemd` prints for the config, started
//! with `systemctl start`, serving a SocketCAN interface (a vcan), a real CAN controller whose
//! bit rate jmpd sets (qemu's SJA1000 card), a storage block device (a
//! virtio disk, and a read-only one), a writable storage image, a serial port (a 16550 whose other end is on the
//! host), a network device and a USB device (a configfs ACM gadget on dummy_hcd, exported
//! through usbip-host); checked from the host through `jmp attach` to the guest's
//! forwarded port: CAN frames both ways, the controller at the configured bit rate and running,
//! the storage mounts read and write the media, bytes both ways on the serial port, the
//! network device's TUN and NAT table exist; and, from a `jmp attach` inside the guest (this
//! host's kernel has no vhci-hcd), the gadget imported through vhci-hcd with its descriptors
//! and its tty.
//!
//! Every device is checked and the failures are reported together, so that a drop-in that
//! grants too little shows everything it misses at once.

use jmp_e2e::guest::{Guest, Init};
use jmp_e2e::*;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PORT: u16 = 7811;
const MEDIUM: usize = 4 << 20;
/// The USB gadget's serial number (told apart from every other device by it).
const USB_SERIAL: &str = "jmp-unit-gadget";
/// Where the pattern written through each mount lands.
const WRITE_AT: u64 = 1 << 20;

/// Bytes no two media share (a seeded xorshift): a read of the wrong medium or offset shows.
fn medium(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..MEDIUM)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Lazily unmounts what is left at the path (a mount of an attachment that did not end).
struct MountPoint(PathBuf);

impl Drop for MountPoint {
    fn drop(&mut self) {
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*self.0.to_string_lossy()));
        if mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn endpoint(v: &serde_json::Value, dev: &str, role: &str) -> Option<String> {
    device(v, dev)["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["role"] == role || e["type"] == role)
        .and_then(|e| e["at"].as_str())
        .map(str::to_string)
}

#[test]
fn the_hardened_unit_with_its_printed_drop_in_serves_every_kind() {
    let py = python().expect("no test venv: run scripts/install-test-deps.sh");
    assert!(Path::new("/dev/fuse").exists(), "no /dev/fuse on this host");
    let env = TestEnv::new("systemd-guest");
    let disk_image = env.root.join("vda.img");
    std::fs::write(&disk_image, medium(1)).expect("write the disk's image");
    let card_image = env.root.join("vdb.img");
    std::fs::write(&card_image, medium(3)).expect("write the card's image");
    let g = Guest::builder(Init::Systemd)
        .forward_udp(PORT)
        .disk(&disk_image, false)
        .disk(&card_image, true)
        .serial_port()
        .can_controllers(1)
        .boot();
    raw_stderr(&format!(
        "systemd guest: ready {:.1} s after qemu started",
        g.boot_time().as_secs_f64()
    ));
    let dir = g.dir().to_path_buf();
    let image = medium(2);
    std::fs::write(dir.join("board.img"), &image).expect("write the image");
    let pattern: Vec<u8> = b"written through the mount\n".repeat(160)[..4096].to_vec();
    std::fs::write(dir.join("pattern"), &pattern).expect("write the pattern");

    // The unit exactly as the repository ships it (jmpd where it says, /usr/local/bin), the
    // config, its token, a vcan with an ECU on it, the image outside /tmp (PrivateTmp hides it),
    // a CAN controller left at another bit rate than the config's, modules for the TUN and the
    // controller loaded (no udev).
    let bin = target_dir();
    let repo = workspace_root();
    g.sh(&format!(
        "set -e
         ln -sf {bin}/jmpd /usr/local/bin/jmpd
         install -m 644 {repo}/systemd/jmpd@.service /etc/systemd/system/jmpd@.service
         mkdir -p /etc/jmp/exporters /srv/jmp
         cp {dir}/board.img /srv/jmp/board.img
         ip link add vcan0 type vcan && ip link set vcan0 up
         modprobe tun; modprobe kvaser_pci
         ip link set can0 type can bitrate 500000
         for m in dummy_hcd libcomposite usb_f_acm usbip-host vhci-hcd cdc_acm; do modprobe $m; done
         mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
         g=/sys/kernel/config/usb_gadget/g1; mkdir -p $g/strings/0x409 $g/configs/c.1 $g/functions/acm.usb0
         echo 0x1209 > $g/idVendor; echo 0x0001 > $g/idProduct
         echo {USB_SERIAL} > $g/strings/0x409/serialnumber
         ln -s $g/functions/acm.usb0 $g/configs/c.1/; echo dummy_udc.0 > $g/UDC
         umask 077; echo {TOKEN} > /etc/jmp/board.token
         cat > /etc/jmp/exporters/board.yaml <<'EOF'
apiVersion: jmp.dev/v1alpha1
kind: ExporterConfig
metadata: {{name: board}}
listen: 0.0.0.0:{PORT}
auth: {{tokenFile: /etc/jmp/board.token}}
export:
  bus: {{type: can, interface: vcan0}}
  hw: {{type: can, interface: can0, bitrate: 250000}}
  sd: {{type: storage, path: /dev/vda, writable: true}}
  card: {{type: storage, path: /dev/vdb}}
  img: {{type: storage, path: /srv/jmp/board.img, writable: true}}
  console: {{type: serial, path: /dev/ttyS1}}
  lan: {{type: network, subnets: [10.0.2.0/24], via: eth0}}
  gadget: {{type: usb, ids: ['1209:0001']}}
EOF",
        bin = bin.display(),
        repo = repo.display(),
        dir = dir.display(),
    ));
    let ecu = g.spawn(
        "ecu",
        &format!(
            // On one CPU: a vcan can reorder the frames of a writer that moves between CPUs.
            "exec taskset -c 0 {} {}/can_client.py socketcan vcan0 echo-ecu",
            py.display(),
            board_dir().display()
        ),
    );
    ecu.expect_line(READY, "the ECU", |l| l.contains("echo-ecu ready"));
    let dropin = g.sh(
        "set -e; d=/etc/systemd/system/jmpd@board.service.d; mkdir -p $d
         jmpd --config /etc/jmp/exporters/board.yaml --print-systemd > $d/devices.conf
         cat $d/devices.conf",
    );
    raw_stderr(&format!("the printed drop-in:\n{dropin}"));
    let start = g.run("systemctl daemon-reload && systemctl start jmpd@board");
    let journal = || g.run("journalctl -u jmpd@board -o cat --no-pager").stdout;
    assert!(
        start.success(),
        "systemctl start jmpd@board: {start}\n{}",
        journal()
    );
    let shown = g.sh("systemctl show jmpd@board -p ActiveState -p DropInPaths -p DevicePolicy");
    assert!(
        shown.contains("ActiveState=active")
            && shown.contains("DevicePolicy=closed")
            && shown.contains("jmpd@board.service.d/devices.conf"),
        "{shown}"
    );
    let fingerprint = journal()
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no fingerprint in jmpd's journal:\n{}", journal()));

    // From the host: the guest's port through qemu's forward on 127.0.0.1.
    let mut attach = env.jmp();
    attach
        .arg("attach")
        .arg("--exporter")
        .arg(format!("127.0.0.1:{}", g.host_port_udp(PORT)))
        .arg("--token-file")
        .arg(&env.token_file)
        .arg("--fingerprint")
        .arg(&fingerprint)
        .arg("--dev-dir")
        .arg(&env.dev)
        .args(["-o", "json", "--can-as", "socketcand"])
        .arg("--socks")
        .arg(format!("127.0.0.1:{}", free_tcp_port()));
    let mut attached = Proc::spawn("jmp-attach", attach, &env.logs);
    let line = attached.expect_line(READY, "jmp attach's JSON line", |l| {
        l.trim_start().starts_with('{')
    });
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    raw_stderr(&format!("jmp attach: {line}"));
    let mut failures: Vec<String> = Vec::new();
    let available = |name: &str| device(&v, name)["state"] == "available";

    // CAN: frames through jmp attach's socketcand port, mirrored by the ECU on the vcan.
    match endpoint(&v, "bus", "socketcand") {
        Some(at) if available("bus") => {
            let mut c = Command::new(&py);
            c.arg(board_dir().join("can_client.py")).args([
                "socketcand",
                &at,
                "bus",
                "mirror",
                "2000",
            ]);
            let out = run("can-mirror", c, &env.logs, Duration::from_secs(120));
            if !out
                .stdout
                .contains("\"received\": 2000, \"mismatches\": []")
            {
                failures.push(format!("CAN: {}\n{}", out.stdout, out.stderr));
            }
        }
        _ => failures.push(format!("CAN: {}", device(&v, "bus"))),
    }

    // The controller: at the config's bit rate (set over netlink), up, its state read.
    let hw = g.run("ip -details link show can0");
    if !available("hw")
        || !hw.stdout.contains("bitrate 250000")
        || !hw.stdout.contains("state ERROR-ACTIVE")
    {
        failures.push(format!(
            "CAN controller: {}
in the guest: {hw}",
            device(&v, "hw")
        ));
    }

    // Storage: each mount reads its medium, and a write through it lands on the medium.
    let mut mounts = Vec::new();
    for (name, expected, medium_path, writable) in [
        ("sd", medium(1), "/dev/vda", true),
        ("card", medium(3), "/dev/vdb", false),
        ("img", image.clone(), "/srv/jmp/board.img", true),
    ] {
        let d = device(&v, name);
        let Some(at) = endpoint(&v, name, "mount").filter(|_| available(name)) else {
            failures.push(format!("storage {name}: {d}"));
            continue;
        };
        mounts.push(MountPoint(PathBuf::from(&at)));
        let mode = if writable { " rw" } else { " ro" };
        if d["summary"].as_str().is_none_or(|s| !s.ends_with(mode)) {
            failures.push(format!("storage {name} is not{mode}: {d}"));
            continue;
        }
        let disk = Path::new(&at).join("disk");
        let mut read = Vec::new();
        if let Err(e) = std::fs::File::open(&disk).and_then(|mut f| f.read_to_end(&mut read)) {
            failures.push(format!("storage {name}: read {}: {e}", disk.display()));
            continue;
        }
        if read != expected {
            failures.push(format!(
                "storage {name}: read {} bytes, not the medium's {}",
                read.len(),
                expected.len()
            ));
            continue;
        }
        if !writable {
            continue;
        }
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| {
                f.write_all_at(&pattern, WRITE_AT)
                    .and_then(|_| f.sync_all())
            });
        if let Err(e) = written {
            failures.push(format!("storage {name}: write: {e}"));
            continue;
        }
        // The disk past the guest's page cache; the image (on tmpfs, which has no O_DIRECT)
        // through it, where jmpd's write is.
        let direct = if medium_path.starts_with("/dev/") {
            "iflag=direct"
        } else {
            ""
        };
        let landed = g.run(&format!(
            "dd if={medium_path} bs=4096 skip={} count=1 {direct} status=none | cmp - {}/pattern",
            WRITE_AT / 4096,
            dir.display()
        ));
        if !landed.success() {
            failures.push(format!(
                "storage {name}: the write is not on {medium_path}: {landed}"
            ));
        }
    }

    // Serial: bytes both ways between the local pty and the 16550's other end on the host.
    match device(&v, "console")["local"].as_str() {
        Some(at) if available("console") => {
            let mut board =
                UnixStream::connect(g.serial_socket(1)).expect("connect ttyS1's socket");
            board
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut pty = Console::open(at);
            pty.write(b"to-the-board\n");
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while !String::from_utf8_lossy(&got).contains("to-the-board\n") {
                match board.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            if !String::from_utf8_lossy(&got).contains("to-the-board\n") {
                failures.push(format!("serial: the board got {got:?}"));
            } else {
                board
                    .write_all(b"from-the-board\n")
                    .expect("write to ttyS1");
                pty.read_until("from-the-board", READY);
            }
        }
        _ => failures.push(format!("serial: {}", device(&v, "console"))),
    }

    // Network: the exporter's TUN and its NAT table exist (the client side is SOCKS here: a
    // TUN on this host would route into the root namespace).
    let tun = g.run("ip -o link show type tun; nft list tables");
    if !available("lan") || !tun.stdout.contains("jmp") {
        failures.push(format!(
            "network: {}\nin the guest: {tun}",
            device(&v, "lan")
        ));
    }

    // The exporter serves one holder at a time: this host's attachment ends first (its USB
    // import failed: no vhci-hcd here).
    attached.stop();
    // USB: imported by a `jmp attach` in the guest (vhci-hcd is there, not here) from jmpd
    // under the unit, which bound the gadget to usbip-host and carries its USB/IP. Its ready
    // line names the tty it became; the imported device's serial number was read through the
    // link.
    let by_serial = |under: &str| {
        format!(
            "for d in /sys/bus/usb/devices/*; do [ \"$(cat $d/serial 2>/dev/null)\" = {USB_SERIAL} ] && readlink -f $d | grep -q {under} && basename $d; done; true"
        )
    };
    let gadget_busid = g.sh(&by_serial("dummy_hcd")).trim().to_string();
    let inside = g.spawn(
        "usb-attach",
        &format!(
            // It bridges every device: FUSE for the storage mounts, and no TUN or vcan in the
            // guest (SOCKS, socketcand).
            "modprobe fuse; exec {bin}/jmp attach --exporter 127.0.0.1:{PORT} --token-file /etc/jmp/board.token --fingerprint {fingerprint} --dev-dir /run/jmp-usb --can-as socketcand --socks 127.0.0.1:1080 -o json",
            bin = bin.display()
        ),
    );
    let ready = inside.expect_line(READY, "the guest's jmp attach's JSON line", |l| {
        l.trim_start().starts_with('{')
    });
    let u: serde_json::Value = serde_json::from_str(&ready).expect("JSON");
    let imported = g.sh(&by_serial("vhci_hcd")).trim().to_string();
    // The ready line waits for the imported device's bind (every interface probed), so it
    // already names the ttyACM cdc_acm made of it, and that is the tty sysfs shows under it.
    let ready_tty = u["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["name"] == "gadget")
        .flat_map(|d| d["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["role"] == "tty")
        .and_then(|e| e["at"].as_str())
        .map(str::to_string);
    let sysfs_tty = g
        .run(&format!(
            "ls /sys/bus/usb/devices/{imported}:1.0/tty 2>/dev/null"
        ))
        .stdout
        .trim()
        .to_string();
    let acm = ready_tty.as_deref().filter(|t| {
        t.starts_with("/dev/ttyACM")
            && *t == format!("/dev/{sysfs_tty}")
            && g.run(&format!("test -c {t}")).success()
    });
    if gadget_busid.is_empty() || imported.is_empty() || acm.is_none() {
        failures.push(format!(
            "USB: the gadget at {gadget_busid:?}, imported as {imported:?}; tty in the ready line {ready_tty:?}, in sysfs {sysfs_tty:?}: {ready}\nin the guest: {}",
            g.run("cat /sys/devices/platform/vhci_hcd.0/status; lsusb")
        ));
    }
    // Ended as a user ends it (SIGTERM, by the PID its ready line gives), given time to unmount
    // its storage mounts and detach its port under emulation.
    let pid = u["pid"].as_u64().expect("pid");
    g.run(&format!("kill -TERM {pid}"));
    inside.wait(Duration::from_secs(120));
    // Given back to its driver once the import ended.
    let back = g.try_run(
        &format!(
            "i=0; until [ \"$(basename \"$(readlink -f /sys/bus/usb/devices/{gadget_busid}/driver)\")\" = usb ]; do i=$((i+1)); [ $i -gt 60 ] && exit 1; sleep 0.5; done"
        ),
        Duration::from_secs(90),
    );
    if gadget_busid.is_empty() || !back.as_ref().is_ok_and(|o| o.success()) {
        failures.push(format!(
            "USB: {gadget_busid} not back on its driver: {back:?}\nin the guest: {}",
            g.run(&format!("ls -l /sys/bus/usb/devices/{gadget_busid}/driver; cat /sys/devices/platform/vhci_hcd.0/status"))
        ));
    }

    // Nothing it does is refused quietly either (a refused sched_setaffinity, say, is only a
    // warning, and lets CAN frames overtake each other): no warning naming an error a sandbox
    // gives.
    let log = journal();
    let refusals = [
        "not permitted",
        "Permission denied",
        "Read-only file system",
        "not supported",
        "No such file",
    ];
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| refusals.iter().any(|r| l.contains(r)))
        .collect();
    if !complaints.is_empty() {
        failures.push(format!("jmpd complained:\n{}", complaints.join("\n")));
    }

    if !failures.is_empty() {
        panic!(
            "under the hardened unit with the printed drop-in:\n{dropin}\n{}\n--- jmpd's journal ---\n{}",
            failures.join("\n"),
            journal()
        );
    }
    drop(mounts);
    // The unit stops cleanly.
    g.sh("systemctl stop jmpd@board");
    let state = g.run("systemctl is-active jmpd@board");
    assert_eq!(state.stdout.trim(), "inactive", "{state}");
}
