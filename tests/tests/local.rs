//! `jmp local start/stop`: a simulated board in the background, and `jmp attach -d`/`detach`.

use jmp_e2e::*;
use std::path::Path;
use std::time::Duration;

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

/// The README's quick start: `scripts/demo.sh` runs to the end against the simulated board
/// (console login, power cycle, the SD card read through its mount, the ECU answering through
/// the socketcand port), here in this test's own directories.
#[test]
fn the_quick_start_demo_runs_every_kind_of_the_simulated_board() {
    let env = TestEnv::new("demo");
    let mut c = command(workspace_root().join("scripts/demo.sh"));
    c.env("JMP_RUNTIME_DIR", &env.runtime)
        .env("JMP_CONFIG_DIR", &env.config)
        .env("JMP_DEV_DIR", &env.dev)
        .env("JMP_BIN", jmp_bin())
        .env_remove("JMP_LOG");
    let out = run("demo", c, &env.logs, Duration::from_secs(600));
    let all = format!("{}\n--- stderr ---\n{}", out.stdout, out.stderr);
    assert!(out.status.success(), "demo.sh failed:\n{all}");
    for needle in [
        "hello from the board",
        "power: cycled",
        "U-Boot",
        "disk  p1  p2",
        "answer < frame 7E8 ",
        "$ jmp local stop",
    ] {
        assert!(all.contains(needle), "demo output lacks {needle:?}:\n{all}");
    }
    // Nothing of the demo's is left in its directories (the stopped attachment removes its
    // entries, mount and exporter folder as it exits).
    let left = || -> Vec<std::ffi::OsString> {
        std::fs::read_dir(&env.dev)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    assert!(
        poll_until(READY, || left().is_empty()),
        "left in the dev dir: {:?}",
        left()
    );
}

/// With two attachments running, a verb that names none (`jmp power cycle`) asks for one by
/// name, listing them, instead of saying that no attachment is running.
#[test]
fn a_verb_with_several_attachments_asks_which() {
    let env = TestEnv::new("several");
    let mut guards = Vec::new();
    let mut jmpds = Vec::new();
    for name in ["board-a", "board-b"] {
        let jmpd = env.start_jmpd(&env.exporter_yaml(
            name,
            "127.0.0.1:0",
            "console: {type: sim-console}\npower: {type: power-sim}",
        ));
        let mut p = Proc::spawn("jmp-attach-d", env.attach_cmd(&jmpd, &["-d"]), &env.logs);
        let line = p.expect_line(READY, "the JSON line", |l| l.trim_start().starts_with('{'));
        assert!(p.expect_exit(READY).success(), "{}", p.describe());
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        guards.push(DaemonGuard {
            env: &env,
            pid: v["pid"].as_i64().expect("pid") as i32,
            stop_args: vec!["detach".into(), name.into()],
            stopped: false,
        });
        jmpds.push(jmpd);
    }
    let mut c = env.jmp();
    c.args(["power", "cycle"]);
    let out = run("jmp-power-cycle", c, &env.logs, READY);
    assert_eq!(out.status.code(), Some(2), "a usage error: {}", out.stderr);
    assert!(
        out.stderr
            .contains("several attachments are running (board-a, board-b)")
            && out.stderr.contains("--exporter"),
        "names them and how to choose: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("no attachment is running"),
        "{}",
        out.stderr
    );
    // Named, it acts on that one.
    let mut c = env.jmp();
    c.args(["power", "cycle", "--exporter", "board-b"]);
    let out = run("jmp-power-cycle-b", c, &env.logs, READY);
    assert!(out.status.success(), "{}", out.stderr);
    for g in &mut guards {
        assert!(g.stop().status.success());
    }
}

/// Two CI jobs on one runner (one user, one runtime directory): each job's plain `jmp detach`
/// and `jmp detach --all` act on its own attachment only.
#[test]
fn two_jobs_on_one_runner_each_detach_their_own() {
    let env = TestEnv::new("two-jobs");
    let mut guards = Vec::new();
    let mut jmpds = Vec::new();
    let mut pids = Vec::new();
    for (name, job) in [("board-a", "job-a"), ("board-b", "job-b")] {
        let jmpd =
            env.start_jmpd(&env.exporter_yaml(name, "127.0.0.1:0", "console: {type: sim-console}"));
        let mut c = env.attach_cmd(&jmpd, &["-d"]);
        c.env("JMP_JOB", job);
        let mut p = Proc::spawn("jmp-attach-d", c, &env.logs);
        let line = p.expect_line(READY, "the JSON line", |l| l.trim_start().starts_with('{'));
        assert!(p.expect_exit(READY).success(), "{}", p.describe());
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        let pid = v["pid"].as_i64().expect("pid") as i32;
        pids.push(pid);
        guards.push(DaemonGuard {
            env: &env,
            pid,
            stop_args: vec!["detach".into(), name.into()],
            stopped: false,
        });
        jmpds.push(jmpd);
    }
    let as_job = |job: &str, args: &[&str]| {
        let mut c = env.jmp();
        c.env("JMP_JOB", job).args(args);
        run("jmp-detach", c, &env.logs, READY)
    };
    let out = as_job("job-b", &["detach"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "detached board-b", "{}", out.stderr);
    assert!(
        poll_until(READY, || !pid_alive(pids[1])),
        "job b's attachment ended"
    );
    assert!(pid_alive(pids[0]), "job a's attachment was left alone");

    // Job a's is now the only attachment running, and still not job c's to take (issue 20
    // item 3): plain detach says whose there are instead of detaching it.
    let out = as_job("job-c", &["detach"]);
    assert_eq!(out.status.code(), Some(5), "{}", out.stderr);
    assert!(
        out.stderr.contains("no attachment of yours") && out.stderr.contains("board-a"),
        "{}",
        out.stderr
    );
    assert!(pid_alive(pids[0]), "job a's attachment was left alone");

    let out = as_job("job-c", &["detach", "--all"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        !out.stdout.contains("detached"),
        "another job's --all detached nothing: {}",
        out.stdout
    );
    assert!(pid_alive(pids[0]), "job a's attachment was left alone");

    let out = as_job("job-a", &["detach", "--all"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "detached board-a", "{}", out.stderr);
    assert!(
        poll_until(READY, || !pid_alive(pids[0])),
        "job a's attachment ended"
    );
    for g in &mut guards {
        g.stopped = true;
    }
}
