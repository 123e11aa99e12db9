//! USB over jmp, in the qemu test guest (tests/src/guest.rs: Debian's kernel has usbip-host,
//! vhci-hcd, dummy_hcd and configfs gadgets; this machine's kernel has none). Gadgets on
//! dummy_hcd are the lab host's devices (an ACM serial port, a disk and a HID keyboard in one;
//! an NCM network adapter; an ACM port whose ids the config does not list); jmpd exports them
//! and jmp attach imports them through vhci-hcd, both in the guest. One boot runs every check
//! (tests/guest/usb_checks.sh, in phases): serial with pyserial and picocom, the disk with
//! cmp, fio and a mount of its partition, HID reports, a ping over NCM, two devices at once,
//! re-enumeration with another product id, unplug and kill -9 of jmpd and of jmp attach in
//! the middle of a read, a non-root attach. Between phases this test is a hostile client of
//! the guest's jmpd: it asks for devices the exporter did not list and sends USB/IP that
//! usbip-host must never see.

use bytes::Bytes;
use jmp_e2e::guest::{Guest, Init};
use jmp_e2e::*;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::usb::{build, Control, DevState, DeviceParams, Imported, OpenParams};
use jmp_protocol::{ErrorCode, Kind};
use jmp_transport::connector::{Connector, Pin};
use jmp_transport::{ChannelMsg, Channels};
use std::time::{Duration, Instant};

/// One phase of the guest script; its output, asserting every named check passed.
fn phase(g: &Guest, script: &std::path::Path, name: &str, checks: &[&str]) -> String {
    let started = Instant::now();
    // The script traces its commands into a file this side reads, so that a phase that hangs
    // says where.
    let trace = g.dir().join(format!("{name}.trace"));
    let out = match g.try_run(
        &format!(
            "/bin/sh -x {} {name} 2> {}",
            script.display(),
            trace.display()
        ),
        Duration::from_secs(600),
    ) {
        Ok(out) => out,
        Err(e) => {
            let t = std::fs::read_to_string(&trace).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(40).collect();
            let diag = g
                .try_run(
                    "for f in /tmp/g/*.err /tmp/g/*.log; do echo \"--- $f\"; tail -15 \"$f\"; done; \
                     echo --- vhci; cat /sys/devices/platform/vhci_hcd.0/status; \
                     echo --- match_busid; cat /sys/bus/usb/drivers/usbip-host/match_busid; \
                     echo --- ps; ps -eo pid,stat,wchan:24,args | grep -v ' \\[' ; echo --- dmesg; dmesg | tail -60",
                    Duration::from_secs(60),
                )
                .map(|o| o.stdout)
                .unwrap_or_else(|e| format!("no diagnostics: {e}"));
            panic!(
                "guest phase {name}: {e}\n--- its last commands (newest first) ---\n{}\n{diag}",
                tail.join("\n")
            );
        }
    };
    let t = std::fs::read_to_string(&trace).unwrap_or_default();
    let tail: Vec<&str> = t.lines().rev().take(40).collect();
    let text = format!(
        "{}\n--- its last commands (newest first) ---\n{}",
        out.stdout,
        tail.join("\n")
    );
    for check in checks {
        assert!(
            text.contains(&format!("CHECK {check} ok")),
            "guest check {check} did not pass:\n{text}"
        );
    }
    assert!(out.success(), "guest phase {name} failed:\n{text}");
    raw_stderr(&format!(
        "usb guest: phase {name} took {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        text.lines()
            .filter(|l| l.starts_with("CHECK "))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    text
}

#[test]
fn usb_devices_through_vhci_in_a_guest() {
    let started = Instant::now();
    let py = python().expect("no test venv: run scripts/install-test-deps.sh");
    for tool in ["picocom", "fio", "socat", "sfdisk", "mkfs.vfat"] {
        assert!(
            which(tool).is_some(),
            "{tool} is not installed: run scripts/install-test-deps.sh"
        );
    }
    let g = Guest::builder(Init::Minimal)
        .memory("1024M")
        .forward_udp(7811)
        .boot();
    raw_stderr(&format!(
        "usb guest: ready {:.1} s after qemu started",
        g.boot_time().as_secs_f64()
    ));
    let script = g.dir().join("usb_checks.sh");
    let header = format!(
        "BIN={}\nPY={}\nTOOL={}\n",
        target_dir().display(),
        py.display(),
        workspace_root().join("tests/guest/usb_tool.py").display()
    );
    let checks = std::fs::read_to_string(workspace_root().join("tests/guest/usb_checks.sh"))
        .expect("usb_checks.sh");
    std::fs::write(&script, header + &checks).expect("write script");

    let text = phase(&g, &script, "setup", &["setup"]);
    let busids: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("g1 "))
        .expect("the gadgets' bus ids")
        .split_whitespace()
        .collect();
    let (g1, g3) = (busids[1].to_string(), busids[5].to_string());

    hostile_client(&g, &g1, &g3);

    phase(
        &g,
        &script,
        "main",
        &[
            "listed",
            "ready-tty",
            "imported",
            "two-at-once",
            "acm-pyserial",
            "acm-picocom",
            "disk-cmp",
            "disk-fio",
            "disk-mount",
        ],
    );
    phase(
        &g,
        &script,
        "devices",
        &["hid", "ncm-ping", "not-in-ids", "reenumerate"],
    );
    phase(
        &g,
        &script,
        "faults",
        &["unplug-mid-transfer", "kill9-jmpd", "kill9-attach"],
    );
    phase(&g, &script, "nonroot", &["nonroot"]);
    phase(&g, &script, "final", &["clean-exit"]);
    raw_stderr(&format!(
        "usb guest: every check in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// A command usbip-host must never see: what it is, and its bytes for a device id.
type Hostile = (&'static str, fn(u32) -> Vec<u8>);

/// Connects to the guest's jmpd as a client would, and tries what a hostile one would.
fn hostile_client(g: &Guest, g1: &str, g3: &str) {
    let token = g.sh("cat /tmp/g/token").trim().to_string();
    let addr = format!("127.0.0.1:{}", g.host_port_udp(7811))
        .parse()
        .expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let c = Connector::new(
            addr,
            Pin::Any,
            "hostile@test".into(),
            token,
            jmp_protocol::features::CLIENT,
        )
        .expect("connector");
        let (link, welcome, _) = tokio::time::timeout(READY, c.connect())
            .await
            .expect("connect in time")
            .expect("connect");
        let board = welcome
            .devices
            .iter()
            .find(|d| d.name == "board")
            .expect("board");
        assert_eq!(board.kind, Kind::Usb);
        let params = DeviceParams::decode_exact(&board.params).expect("params");
        assert_eq!(params.devices.len(), 1, "{params:?}");
        let listed = params.devices[0].id;
        assert_eq!(params.devices[0].busid, g1);
        for d in &welcome.devices {
            if d.kind == Kind::Usb {
                let p = DeviceParams::decode_exact(&d.params).expect("params");
                assert!(
                    p.devices
                        .iter()
                        .all(|x| x.busid != g3 && x.product != 0x0666),
                    "a device outside ids is listed: {p:?}"
                );
            }
        }
        let h = &link.handle;
        // Every id the exporter did not list, and a bus id in place of parameters: refused,
        // and nothing is bound.
        for id in (0..64).filter(|i| *i != listed) {
            let r = h
                .open_stream("board", to_bytes(&OpenParams::Import { id }))
                .await;
            match r {
                Err(e) => assert_eq!(e.code, ErrorCode::NoSuchDevice, "id {id}: {e:?}"),
                Ok(_) => panic!("device {id} was imported"),
            }
        }
        let r = h
            .open_stream("board", Bytes::from(format!("\x01{g3}")))
            .await;
        assert!(r.is_err(), "a bus id as parameters was accepted");

        // The device list, followed: after each import below ends, the exporter lists the
        // device as present again once it gave it back (an import before that is refused as
        // busy).
        let (watch, _) = h
            .open_stream("board", to_bytes(&OpenParams::Watch))
            .await
            .expect("watch");
        let jmp_transport::Pipe {
            tx: _watch_tx,
            rx: _watch_rx,
            mut control_rx,
            ..
        } = watch;

        // The listed device, imported; then commands usbip-host must never see. Each ends the
        // import, and the device goes back to its driver.
        let hostile: [Hostile; 3] = [
            ("an endpoint the device does not have", |devid| {
                build::submit(1, devid, 9, true, 64, 0, [0; 8])
            }),
            ("a 2 GiB transfer", |devid| {
                build::submit(
                    1,
                    devid,
                    0,
                    true,
                    0x7fff_ffff,
                    0,
                    [0x80, 6, 0, 1, 0, 0, 0xff, 0xff],
                )
            }),
            ("another device's id", |devid| {
                build::submit(
                    1,
                    devid ^ 0x10000,
                    0,
                    true,
                    18,
                    0,
                    [0x80, 6, 0, 1, 0, 0, 18, 0],
                )
            }),
        ];
        for (what, cmd) in hostile {
            let (pipe, opened) = tokio::time::timeout(
                READY,
                h.open_stream("board", to_bytes(&OpenParams::Import { id: listed })),
            )
            .await
            .expect("import in time")
            .unwrap_or_else(|e| panic!("import {listed}: {e:?}"));
            let imp = Imported::decode_exact(&opened).expect("imported");
            let (mut tx, mut rx) = pipe.split();
            tx.send(Bytes::from(cmd(imp.devid))).await.expect("send");
            // The exporter ends the import: the stream ends without an answer.
            let end = tokio::time::timeout(READY, rx.recv()).await;
            assert!(
                matches!(end, Ok(Ok(None)) | Ok(Err(_))),
                "{what}: the import did not end: {end:?}"
            );
            let back = poll_until(READY, || {
                g.run(&format!("readlink /sys/bus/usb/devices/{g1}/driver"))
                    .stdout
                    .trim_end()
                    .ends_with("/usb")
            });
            assert!(back, "{what}: {g1} was not given back to usb");
            let present = tokio::time::timeout(READY, async {
                while let Some(m) = control_rx.recv().await {
                    if let ChannelMsg::Control(b) = m {
                        let Ok(Control::Changed(p)) = Control::decode_exact(&b) else {
                            continue;
                        };
                        if p.devices
                            .iter()
                            .any(|d| d.id == listed && d.state == DevState::Present)
                        {
                            return true;
                        }
                    }
                }
                false
            })
            .await;
            assert!(
                matches!(present, Ok(true)),
                "{what}: the exporter did not list {g1} as present again: {present:?}"
            );
        }
        // Gone for good, so that the next client is not told the board is busy.
        link.handle.bye(ErrorCode::Ok, "done");
        c.linger(&link).await;
    });
    // usbip-host never saw those commands: it complains about each one it gets.
    let dmesg = g.sh("dmesg");
    for complaint in [
        "invalid epnum",
        "recv invalid request",
        "sgl_alloc",
        "CMD_SUBMIT",
    ] {
        assert!(
            !dmesg.contains(complaint),
            "usbip-host saw a hostile command ({complaint}):\n{dmesg}"
        );
    }
    let matched = g.sh("cat /sys/bus/usb/drivers/usbip-host/match_busid");
    assert!(matched.trim().is_empty(), "usbip-host lists {matched}");
    assert!(g
        .sh(&format!("readlink /sys/bus/usb/devices/{g3}/driver"))
        .trim_end()
        .ends_with("/usb"));
}
