//! `jmp local start/stop`: a simulated board in the background, and `jmp attach -d`/`detach`.

use jmp_e2e::*;
use std::path::Path;

#[test]
fn local_start_shows_login_then_stop_removes_everything() {
    let env = TestEnv::new("local");
    let mut cmd = env.jmp();
    cmd.args(["local", "start", "-o", "json", "--dev-dir"])
        .arg(&env.dev);
    let mut start = Proc::spawn("jmp-local-start", cmd, &env.logs);
    let line = start.expect_line(READY, "the JSON line", |l| l.trim_start().starts_with('{'));
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("invalid JSON ({e}): {line:?}"));
    let status = start.expect_exit(READY);
    let pid = v["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {v}")) as i32;
    let mut guard = DaemonGuard {
        env: &env,
        pid,
        stop_args: vec!["local".into(), "stop".into()],
        stopped: false,
    };
    assert!(
        status.success(),
        "jmp local start: {status}\n{}",
        start.stderr()
    );
    assert!(
        pid_alive(pid),
        "the background process {pid} is not running: {v}"
    );

    let serial = v["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["kind"] == "serial"))
        .unwrap_or_else(|| panic!("no serial device in {v}"));
    let path = serial["local"].as_str().expect("local path").to_string();
    assert!(
        path.starts_with(env.dev.to_str().unwrap()),
        "{path} is not under --dev-dir {}",
        env.dev.display()
    );
    assert!(Path::new(&path).exists(), "{path} does not exist");

    // The history replays the boot log, ending in the login prompt: no keystroke needed.
    let mut c = Console::open(&path);
    c.read_until("login: ", READY);
    sim_login_and_echo(&mut c, "local-e2e-ok");
    drop(c);

    let out = guard.stop();
    assert!(
        out.status.success(),
        "jmp local stop: {}\n{}",
        out.status,
        out.stderr
    );
    assert!(
        poll_until(READY, || std::fs::symlink_metadata(&path).is_err()),
        "{path} still exists after jmp local stop"
    );
    assert!(
        poll_until(READY, || !pid_alive(pid)),
        "process {pid} still runs after jmp local stop"
    );
}

#[test]
fn attach_daemon_then_detach() {
    let env = TestEnv::new("detach");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "bg-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let mut p = Proc::spawn("jmp-attach-d", env.attach_cmd(&jmpd, &["-d"]), &env.logs);
    let line = p.expect_line(READY, "the JSON line", |l| l.trim_start().starts_with('{'));
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("invalid JSON ({e}): {line:?}"));
    let status = p.expect_exit(READY);
    let pid = v["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {v}")) as i32;
    let mut guard = DaemonGuard {
        env: &env,
        pid,
        stop_args: vec!["detach".into(), "bg-board".into()],
        stopped: false,
    };
    assert!(status.success(), "jmp attach -d: {status}\n{}", p.stderr());
    assert_eq!(v["exporter"], "bg-board", "{v}");
    assert_eq!(
        v["fingerprint"].as_str(),
        Some(jmpd.fingerprint.as_str()),
        "{v}"
    );
    let path = local_of(&v, "console");
    let mut c = Console::open(&path);
    c.write(b"\r");
    c.read_until("login: ", READY);
    drop(c);

    let out = guard.stop();
    assert!(
        out.status.success(),
        "jmp detach: {}\n{}",
        out.status,
        out.stderr
    );
    assert!(
        poll_until(READY, || std::fs::symlink_metadata(&path).is_err()),
        "{path} still exists after jmp detach"
    );
    assert!(
        poll_until(READY, || !pid_alive(pid)),
        "{pid} still runs after jmp detach"
    );
}
