//! The qemu guest harness itself (tests/src/guest.rs): both boots, commands with their status and
//! output while the guest keeps running, concurrent commands, background processes, the host's
//! private directory shared read-write, forwards from the host's loopback, extra qemu devices,
//! and the guest gone (by PID) with its files when dropped. Prints each boot's time (measured,
//! never asserted).

use jmp_e2e::guest::{Guest, Init};
use jmp_e2e::*;
use std::io::{Read, Write};
use std::time::Duration;

fn exercise(init: Init) {
    // An emulated USB keyboard on an emulated xHCI: qemu arguments pass through.
    let g = Guest::builder(init)
        .forward_tcp(7000)
        .qemu_args(&["-device", "qemu-xhci", "-device", "usb-kbd"])
        .boot();
    raw_stderr(&format!(
        "guest {init:?}: agent ready {:.1} s after qemu started (guest uptime {:.1} s)",
        g.boot_time().as_secs_f64(),
        g.uptime_at_ready().as_secs_f64()
    ));
    let pid = g.pid();
    let dir = g.dir().to_path_buf();
    assert!(pid_alive(pid));

    // Status and both streams come back; the guest runs Debian's kernel, not this one.
    let out = g.run("uname -r; echo to-stderr >&2; exit 3");
    assert_eq!(out.code, Some(3), "{out}");
    assert!(out.stdout.trim().ends_with("-amd64"), "{out}");
    assert_eq!(out.stderr, "to-stderr\n", "{out}");
    let out = g.run("kill -KILL $$");
    assert_eq!((out.code, out.signal), (None, Some(9)), "{out}");
    // PID 1 is what was asked for.
    let pid1 = g.sh("cat /proc/1/comm");
    match init {
        Init::Minimal => assert_eq!(pid1.trim(), "init", "{pid1}"),
        Init::Systemd => {
            assert_eq!(pid1.trim(), "systemd", "{pid1}");
            let state = g.run("systemctl is-system-running --wait");
            assert_eq!(state.stdout.trim(), "running", "{state}");
            raw_stderr(&format!(
                "guest Systemd: {}",
                g.sh("systemd-analyze").trim()
            ));
            assert!(g
                .sh("systemctl is-active jmp-guest-agent")
                .contains("active"));
        }
    }
    // Modules load (vcan is not in this machine's kernel at all).
    g.sh("modprobe vcan && ip link add vcan0 type vcan && ip link set vcan0 up");
    assert!(g.sh("ip -o link show vcan0").contains("vcan0"));

    // Its controller's module loaded by hand (no udev), the keyboard enumerates (qemu's vendor
    // id 0627).
    g.sh("modprobe xhci_pci");
    assert!(
        poll_until(READY, || g
            .run("cat /sys/bus/usb/devices/*/idVendor")
            .stdout
            .contains("0627")),
        "no USB keyboard in the guest: {}",
        g.run("ls -l /sys/bus/usb/devices/")
    );

    // The private directory is shared both ways; the host's root is read-only below a
    // writable overlay.
    std::fs::write(dir.join("from-host"), "h\n").expect("write");
    assert_eq!(
        g.sh(&format!(
            "cat {0}/from-host; echo g > {0}/from-guest",
            dir.display()
        )),
        "h\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("from-guest")).expect("read"),
        "g\n"
    );
    g.sh("echo overlay > /etc/jmp-guest-test");
    assert!(!std::path::Path::new("/etc/jmp-guest-test").exists());

    // A background process: its output read on the host while it runs; commands run
    // concurrently with a long one.
    let server = g.spawn(
        "echo-server",
        "echo listening; exec socat TCP-LISTEN:7000,reuseaddr,fork EXEC:cat",
    );
    server.expect_line(READY, "listening", |l| l == "listening");
    std::thread::scope(|s| {
        let slow = s.spawn(|| g.run("sleep 2; echo slow"));
        assert_eq!(g.sh("echo quick"), "quick\n");
        assert_eq!(slow.join().expect("join").stdout, "slow\n");
    });
    // The forward reaches the guest's port from the host's loopback (the server may need a
    // moment to listen: the first connections can be closed by the guest).
    let port = g.host_port_tcp(7000);
    let mut echoed = String::new();
    assert!(poll_until(READY, || {
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 5];
        c.write_all(b"ping\n").is_ok() && c.read_exact(&mut buf).is_ok() && {
            echoed = String::from_utf8_lossy(&buf).into_owned();
            true
        }
    }));
    assert_eq!(echoed, "ping\n");
    let waited = g.spawn("short", "echo done; exit 4");
    assert_eq!(waited.wait(READY), 4, "{}", waited.stdout());
    assert_eq!(waited.stdout(), "done\n");
    drop(waited);
    server.stop();
    assert!(server.status().is_none(), "killed, so no status recorded");
    drop(server);

    drop(g);
    assert!(!pid_alive(pid), "qemu {pid} still runs");
    assert!(!dir.exists(), "{} is still there", dir.display());
}

#[test]
fn a_minimal_guest_runs_commands_and_goes_away() {
    exercise(Init::Minimal);
}

#[test]
fn a_systemd_guest_runs_commands_and_goes_away() {
    exercise(Init::Systemd);
}

/// A test that fails with a guest up leaves neither qemu nor the guest's files behind.
#[test]
fn a_failing_test_leaves_no_guest_behind() {
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let g = Guest::boot(Init::Minimal);
        *seen.lock().unwrap() = Some((g.pid(), g.dir().to_path_buf()));
        let out = g.run("exit 1");
        assert!(out.success(), "deliberately failing: {out}");
    });
    assert!(r.is_err(), "the closure was meant to panic");
    let (pid, dir) = seen.into_inner().unwrap().expect("the guest booted");
    assert!(!pid_alive(pid), "qemu {pid} still runs");
    assert!(!dir.exists(), "{} is still there", dir.display());
}

/// Should a test process die without unwinding (SIGKILL), its guests die with it: qemu gets
/// SIGKILL when the thread that booted it ends. Seen here by a thread ending without dropping
/// its guest.
#[test]
fn a_guest_dies_with_the_thread_that_booted_it() {
    let (pid, dir) = std::thread::spawn(|| {
        let g = Guest::boot(Init::Minimal);
        let seen = (g.pid(), g.dir().to_path_buf());
        std::mem::forget(g);
        seen
    })
    .join()
    .expect("boot");
    let gone = poll_until(READY, || !pid_alive(pid));
    // The forgotten guest's directory is this test's to remove.
    let _ = std::fs::remove_dir_all(&dir);
    if !gone {
        kill_pid(pid);
    }
    assert!(gone, "qemu {pid} outlived the thread that booted it");
}
