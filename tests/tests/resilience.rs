//! The link drops and comes back: `jmp attach` keeps the local pty at the same path while jmpd is
//! gone, and resumes the session when jmpd returns on the same address with the same identity.

use jmp_e2e::*;
use nix::sys::signal::Signal;
use std::path::Path;
use std::time::{Duration, Instant};

fn is_link(p: &str) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

#[test]
fn jmpd_killed_and_restarted_session_resumes() {
    let env = TestEnv::new("resilience");
    let port = free_udp_port();
    let yaml = env.exporter_yaml(
        "phoenix",
        &format!("127.0.0.1:{port}"),
        "console: {type: sim-console}",
    );
    let mut jmpd = env.start_jmpd(&yaml);
    assert_eq!(jmpd.addr.port(), port);
    let fingerprint = jmpd.fingerprint.clone();
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let path = local_of(&v, "console");
    let target = std::fs::read_link(&path).expect("console is a symlink");

    let mut c = Console::open(&path);
    c.write(b"\r");
    c.read_until("login: ", READY);
    sim_login_and_echo(&mut c, "before-the-crash");
    c.drain();

    jmpd.proc.kill9();
    assert!(
        is_link(&path),
        "{path} vanished right after jmpd was killed"
    );
    // Stay down long enough for at least one failed reconnect attempt, checking the path
    // throughout (this wait is part of the scenario, not a timing assertion).
    let down_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < down_until {
        assert!(is_link(&path), "{path} vanished while jmpd was down");
        assert!(
            attach.is_running(),
            "jmp attach exited while jmpd was down: {}",
            attach.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let jmpd2 = env.start_jmpd(&yaml);
    assert_eq!(jmpd2.addr.port(), port);
    assert_eq!(
        jmpd2.fingerprint, fingerprint,
        "same stateDir must keep the identity"
    );
    assert!(is_link(&path), "{path} vanished after jmpd restarted");
    assert_eq!(
        std::fs::read_link(&path).unwrap(),
        target,
        "the symlink must keep its target"
    );

    // Keystrokes typed while the link is down are discarded (by design), so press Enter
    // until the restarted board's login prompt answers.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        c.write(b"\r");
        let got = String::from_utf8_lossy(&c.read_some(Duration::from_millis(1500))).to_string();
        if got.contains("login: ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session never resumed after jmpd restarted\n{}\n--- jmpd ---\n{}",
            attach.describe(),
            jmpd2.proc.stderr()
        );
        assert!(
            attach.is_running(),
            "jmp attach exited: {}",
            attach.describe()
        );
    }
    c.drain();
    sim_login_and_echo(&mut c, "after-the-restart");
    assert!(attach.is_running());
}

#[test]
fn attach_sigterm_removes_devices_and_exits_zero() {
    let env = TestEnv::new("sigterm");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "term-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let (mut attach, v) = env.attach(&jmpd, &[]);
        let path = local_of(&v, "console");
        assert!(is_link(&path));
        attach.signal(sig);
        let st = attach.expect_exit(READY);
        assert!(
            st.success(),
            "jmp attach after {sig}: {st}\n{}",
            attach.stderr()
        );
        assert!(
            !Path::new(&path).exists() && !is_link(&path),
            "{path} still exists after jmp attach got {sig}"
        );
    }
}

/// The link state `jmp status -o json` shows for the only attachment.
fn link_state(env: &TestEnv) -> String {
    let mut c = env.jmp();
    c.args(["status", "-o", "json"]);
    let st = run("status", c, &env.logs, READY);
    serde_json::from_str::<serde_json::Value>(st.stdout.trim())
        .ok()
        .and_then(|v| v[0]["link"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("(no link in: {})", st.stdout))
}

/// Sends SIGCONT to a process stopped by the test, however the test ends.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// A stopped exporter (SIGSTOP: the connection stays open, nothing answers) is noticed well
/// before the session's idle timeout gives it up (issue 20 item 5): `jmp status` shows the link
/// `stalled`, the console's user reads it on the pty, what is typed meanwhile is held; once
/// the exporter runs again, the link is `up` and the board has what was typed.
#[test]
fn a_stopped_exporter_shows_as_stalled_on_status_and_on_the_pty() {
    let env = TestEnv::new("stalled");
    let jmpd =
        env.start_jmpd(&env.exporter_yaml("sleepy", "127.0.0.1:0", "console: {type: sim-console}"));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let mut c = Console::open(local_of(&v, "console"));
    c.write(b"\r");
    c.read_until("login: ", READY);
    c.drain();
    assert_eq!(link_state(&env), "up");

    jmpd.proc.signal(Signal::SIGSTOP);
    let resume = Resume(jmpd.proc.pid());
    c.read_until(
        "[jmp: no answer from the exporter; what you type is held for it, and lost if the link is given up]",
        READY,
    );
    assert_eq!(link_state(&env), "stalled", "{}", attach.describe());
    // Typed while the exporter is silent: held, and delivered once it answers (a slow host or
    // a short blip must not eat keystrokes).
    c.write(b"root\r");

    drop(resume);
    // The board's answer and the local notice race (the notice waits for the next liveness
    // check): both must come, in either order.
    c.read_until_all(&["[jmp: the exporter answers again]", "Password:"], READY);
    assert!(
        poll_until(READY, || link_state(&env) == "up"),
        "the link never showed up again: {}",
        attach.describe()
    );
    c.write(b"\r");
    c.read_until("root@sleepy:~# ", READY);
    assert!(attach.is_running(), "{}", attach.describe());
}
