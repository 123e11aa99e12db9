//! The unit files in systemd/ are what an operator installs: `systemd-analyze verify` must
//! accept each (with ExecStart pointing at this build's binaries, which verify checks exist),
//! and `systemd-analyze security --offline=yes` must score the controller at most 2.0 and the
//! exporter at most 4.0 (lower is safer; the original units scored 8.9).

use jmp_e2e::*;
use std::process::Command;

fn units() -> Vec<(String, String)> {
    let dir = workspace_root().join("systemd");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("systemd/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service"))
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(&n)).expect("read unit");
            (n, text)
        })
        .collect();
    v.sort();
    assert!(
        v.len() >= 3,
        "expected the controller and both jmpd units: {v:?}"
    );
    v
}

/// Writes the unit for checking: binaries from this build, a template as one instance.
fn staged(dir: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let bin = target_dir();
    let text = text.replace("/usr/local/bin/", &format!("{}/", bin.display()));
    let file = name.replace("@.service", "@board.service");
    let p = dir.join(file);
    std::fs::write(&p, text).expect("write unit");
    p
}

#[test]
fn every_unit_verifies_and_is_hardened() {
    require!(skips::tool("systemd-analyze"));
    // The binaries verify checks for.
    for b in ["jmpd", "jmp-controller"] {
        bin(b);
    }
    let dir = TempDir::new("units");
    for (name, text) in units() {
        assert!(
            text.contains("Type=notify") && text.contains("WatchdogSec="),
            "{name}: not Type=notify with a watchdog"
        );
        let unit = staged(&dir, &name, &text);
        let out = command("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .expect("run systemd-analyze verify");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: verify failed: {err}");
        let unit_name = unit.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !err.lines().any(|l| l.contains(&unit_name)),
            "{name}: verify warns: {err}"
        );
        let out = command("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit)
            .output()
            .expect("run systemd-analyze security");
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| {
                l.split_once("Overall exposure level for ")
                    .and_then(|(_, r)| r.split_once(": "))
                    .and_then(|(_, r)| r.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or_else(|| panic!("{name}: no exposure level in: {text}"));
        let limit = if name.starts_with("jmp-controller") {
            2.0
        } else {
            4.0
        };
        eprintln!("{name}: exposure {score} (at most {limit})");
        assert!(
            score <= limit,
            "{name}: exposure {score} is above {limit}:\n{text}"
        );
    }
}

/// `program ARGS` with `WATCHDOG_PID` set to its own pid, as systemd does.
fn watched(program: &std::path::Path) -> Command {
    let mut c = command("sh");
    c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(program);
    c
}

/// Reads datagrams from the notify socket until one contains `want`.
fn expect_notify(sock: &std::os::unix::net::UnixDatagram, want: &str, who: &mut Proc) -> String {
    let deadline = std::time::Instant::now() + READY;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == want) {
                return msg;
            }
        }
    }
    panic!("no {want} from {}", who.describe());
}

#[test]
fn the_daemons_tell_systemd_they_serve_and_ping_its_watchdog() {
    let env = TestEnv::new("notify");
    let path = env.root.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .expect("timeout");
    // jmpd: READY=1 once it serves, then watchdog pings at half of WATCHDOG_USEC. systemd also
    // names the watched process (WATCHDOG_PID): the shell's pid, which `exec` hands on.
    let cfg = env.write_config(&env.exporter_yaml(
        "notify-01",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let mut cmd = watched(&jmpd_bin());
    cmd.arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000");
    let mut jmpd = Proc::spawn("jmpd", cmd, &env.logs);
    let ready = expect_notify(&sock, "READY=1", &mut jmpd);
    assert!(ready.contains("STATUS=serving notify-01"), "{ready}");
    // Printed before READY=1 (it reaches this test through another pipe, so perhaps later).
    jmpd.expect_line(READY, "jmpd's ready line", |l| {
        l.starts_with("jmpd: exporter notify-01 listening on")
    });
    expect_notify(&sock, "WATCHDOG=1", &mut jmpd);
    expect_notify(&sock, "WATCHDOG=1", &mut jmpd);
    jmpd.stop();
    // The controller alike.
    let mut cmd = watched(&bin("jmp-controller"));
    cmd.arg("--data-dir")
        .arg(env.root.join("controller"))
        .args(["--listen", "127.0.0.1:0", "--metrics", ""])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000");
    let mut ctl = Proc::spawn("jmp-controller", cmd, &env.logs);
    let ready = expect_notify(&sock, "READY=1", &mut ctl);
    assert!(ready.contains("STATUS=serving on 127.0.0.1:"), "{ready}");
    expect_notify(&sock, "WATCHDOG=1", &mut ctl);
    ctl.stop();
}
