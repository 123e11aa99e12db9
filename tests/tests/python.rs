//! The Python integrations end to end: pytest (PyPI) and Robot Framework (PyPI) running the
//! README's examples and Jumpstarter's spellings against the simulated board in local mode
//! (`jmp local start`), direct mode (an exporter address and token) and lease mode (a
//! controller and a selector); a failing test's report carries the console; a run interrupted
//! (Ctrl-C to its process group, SIGINT or SIGTERM to pytest) while queueing for a lease,
//! attaching, reading a console or giving the board back gives the board back all the same.

use jmp_e2e::lab::{lease_json, show, Lab};
use jmp_e2e::py::*;
use jmp_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An asciicast v2 recording of the failing example: private to its owner (0600), a header,
/// events in time order, the boot log and the marker's echo printed, nothing of what was
/// typed (input is recorded only when asked) and so not `secret`, typed at a prompt that
/// does not echo.
fn assert_recording(path: &std::path::Path, secret: Option<&str>) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("the recording {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{}: mode {mode:o}", path.display());
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the recording {}: {e}", path.display()));
    if let Some(secret) = secret {
        assert!(
            !text.contains(secret),
            "the password is in the recording: {text}"
        );
    }
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().expect("a header")).expect("header JSON");
    assert_eq!(header["version"], 2, "{header}");
    assert!(header["width"].as_u64().is_some_and(|w| w > 0), "{header}");
    let (mut out, mut inp, mut last) = (String::new(), String::new(), 0.0);
    for l in lines {
        let ev: Value = serde_json::from_str(l).expect("event JSON");
        let t = ev[0].as_f64().expect("a time");
        assert!(t >= last, "time goes back: {l}");
        last = t;
        let data = ev[2].as_str().expect("data");
        match ev[1].as_str().expect("a code") {
            "o" => out.push_str(data),
            "i" => inp.push_str(data),
            c => panic!("unknown event code {c}: {l}"),
        }
    }
    for seen in ["boot complete", "echo-marker-4711"] {
        assert!(out.contains(seen), "{seen:?} not recorded: {out:?}");
    }
    assert_eq!(inp, "", "typing recorded without being asked");
}

fn leases_of(lab: &Lab) -> Vec<Value> {
    lab.leases()
}

fn assert_passed(out: &RunOutput, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

#[test]
fn the_console_reader_unit_tests_pass() {
    let bin = require!(venv_bin());
    let env = TestEnv::new("py-unit");
    let report = env.root.join("unit.xml");
    let mut c = tool(&env, &bin, "pytest");
    c.arg("unit")
        .arg(format!("--junitxml={}", report.display()));
    let out = run_tool(&env, "pytest-unit", c);
    assert_passed(&out, "pytest unit");
    let (tests, failed, skipped) = junit_counts(&report);
    assert!(
        tests >= 9 && failed == 0 && skipped == 0,
        "{tests} {failed} {skipped}"
    );
}

#[test]
fn pytest_and_robot_against_a_local_board() {
    let bin = require!(venv_bin());
    let env = TestEnv::new("py-local");
    let _left = Leftovers { env: &env };
    let mut c = env.jmp();
    c.args(["local", "start", "-o", "json"])
        .env("JMP_DEV_DIR", &env.dev);
    let out = run("jmp-local-start", c, &env.logs, READY);
    assert_passed(&out, "jmp local start");

    // The README's class and Jumpstarter's (both spellings of the selector, both ways of
    // reaching the client): the selector is not needed, the local board is used.
    let report = env.root.join("local.xml");
    let mut c = tool(&env, &bin, "pytest");
    c.args(["hardware_tests", "jumpstarter", "kinds", "-v"])
        .arg(format!("--junitxml={}", report.display()));
    let out = run_tool(&env, "pytest-local", c);
    assert_passed(&out, "pytest in local mode");
    assert_eq!(junit_counts(&report), (7, 0, 0), "{}", out.stdout);

    // Robot, ours and Jumpstarter's library name.
    let mut c = tool(&env, &bin, "robot");
    c.arg("--outputdir")
        .arg(env.root.join("robot"))
        .args(["robot/boot.robot", "robot/boot_jumpstarter.robot"]);
    let out = run_tool(&env, "robot-local", c);
    assert_passed(&out, "robot in local mode");
    assert!(
        out.stdout.contains("3 tests, 3 passed, 0 failed"),
        "{}",
        out.stdout
    );

    // Neither runner stopped the board it did not start.
    let a = attachments(&env);
    assert!(
        a.len() == 1 && a[0]["local"] == true,
        "the local board is still attached, nothing else: {a:?}"
    );
}

#[test]
fn pytest_and_robot_against_a_board_reached_directly() {
    let bin = require!(venv_bin());
    let env = TestEnv::new("py-direct");
    let _left = Leftovers { env: &env };
    let jmpd = env.start_jmpd(&env.exporter_yaml("bench-01", "127.0.0.1:0", widget_export()));

    let report = env.root.join("direct.xml");
    let mut c = tool(&env, &bin, "pytest");
    c.arg("hardware_tests")
        .arg(format!("--jmp-exporter={}", jmpd.addr))
        .arg(format!("--jmp-token-file={}", env.token_file.display()))
        .arg(format!("--jmp-fingerprint={}", jmpd.fingerprint))
        .arg(format!("--junitxml={}", report.display()));
    let out = run_tool(&env, "pytest-direct", c);
    assert_passed(&out, "pytest in direct mode");
    assert_eq!(junit_counts(&report), (2, 0, 0), "{}", out.stdout);
    assert!(
        attachments(&env).is_empty(),
        "the plugin detached what it attached"
    );

    // Robot under `jmp shell` (the shell's board is the one Connect To Exporter takes).
    let mut c = env.jmp();
    for v in CI_VARS {
        c.env_remove(v);
    }
    c.arg("shell")
        .arg(format!("--exporter={}", jmpd.addr))
        .arg(format!("--token-file={}", env.token_file.display()))
        .arg(format!("--fingerprint={}", jmpd.fingerprint))
        .arg(bin.join("robot"))
        .arg("--outputdir")
        .arg(env.root.join("robot"))
        .arg("robot/boot.robot")
        .env("JMP_DEV_DIR", &env.dev)
        .env("PATH", path_with(&bin))
        .current_dir(py_dir());
    let out = run_tool(&env, "jmp-shell-robot", c);
    assert_passed(&out, "robot under jmp shell");
    assert!(
        out.stdout.contains("2 tests, 2 passed, 0 failed"),
        "{}",
        out.stdout
    );
    assert!(attachments(&env).is_empty(), "jmp shell detached");
}

#[test]
fn pytest_leases_by_selector_and_reports_the_console_of_a_failure() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("py-lease");
    let env = &lab.env;
    let _left = Leftovers { env };
    let pytest = |label: &str, args: &[&str]| {
        let mut c = tool(env, &bin, "pytest");
        c.args(args).env("JMP_CLIENT", "ci-client");
        run_tool(env, label, c)
    };

    let report = env.root.join("lease.xml");
    let recs = env.root.join("recordings");
    let record_dir = format!("--jmp-record-dir={}", recs.display());
    let out = pytest(
        "pytest-lease",
        &[
            "hardware_tests",
            "jumpstarter",
            &format!("--junitxml={}", report.display()),
            &record_dir,
        ],
    );
    assert_passed(&out, "pytest in lease mode");
    assert_eq!(junit_counts(&report), (5, 0, 0), "{}", out.stdout);
    assert!(!recs.exists(), "passed tests leave no recording");
    assert!(
        leases_of(&lab).is_empty(),
        "released: {:?}",
        leases_of(&lab)
    );
    assert!(attachments(env).is_empty(), "detached");

    // A failing test: its report has the console's output from during the test, and the
    // path of its recording.
    let out = pytest("pytest-failing", &["failing", "-rf", &record_dir]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        out.stdout.contains("jmp console widget-01/console (call)"),
        "no console section in the report:\n{}",
        out.stdout
    );
    let section = &out.stdout[out
        .stdout
        .find("jmp console widget-01/console")
        .unwrap_or(0)..];
    for seen in ["boot complete", "echo-marker-4711"] {
        assert!(
            section.contains(seen),
            "{seen:?} not in the console section:\n{section}"
        );
    }
    assert!(
        out.stdout
            .contains("'kernel panic' did not appear within 1s"),
        "{}",
        out.stdout
    );
    let section = &out.stdout[out
        .stdout
        .find("jmp recording widget-01/console (call)")
        .unwrap_or_else(|| panic!("no recording section in the report:\n{}", out.stdout))..];
    let path = section
        .lines()
        .find_map(|l| l.split("asciinema play FILE): ").nth(1))
        .unwrap_or_else(|| panic!("no recording path:\n{section}"))
        .trim();
    assert!(path.starts_with(&*recs.to_string_lossy()), "{path}");
    assert_recording(std::path::Path::new(path), Some("pw-s3cret-8841"));
    assert_eq!(
        std::fs::read_dir(&recs).expect("recordings").count(),
        1,
        "one console, one failed test"
    );
    assert!(leases_of(&lab).is_empty(), "released after a failure");

    // The pipeline leased the board first (this job's lease): the plugin uses that lease,
    // queues behind nothing, and leaves it for the pipeline to release.
    let mut c = lab.as_client(
        "ci-client",
        &[
            "create",
            "lease",
            "--selector",
            "vendor=acme",
            "--wait",
            "30",
            "-o",
            "json",
        ],
    );
    c.env("JMP_JOB", "job-7");
    let lease = lease_json(&lab.ok("create-lease", c));
    let mut c = tool(env, &bin, "pytest");
    c.args(["hardware_tests"])
        .args(["--jmp-lease-wait", "0"])
        .env("JMP_CLIENT", "ci-client")
        .env("JMP_JOB", "job-7");
    let out = run_tool(env, "pytest-reuse", c);
    assert_passed(&out, "pytest with the job's lease");
    let after = leases_of(&lab);
    assert_eq!(after.len(), 1, "no second lease: {after:?}");
    assert_eq!(
        after[0]["name"], lease["name"],
        "the pipeline's lease stays"
    );
    assert!(attachments(env).is_empty(), "detached");

    // A test that names no board runs on the job's lease (it failed with NoBoard), and leaves
    // the lease to the pipeline.
    let mut c = tool(env, &bin, "pytest");
    c.args(["no_selector", "-v"])
        .env("JMP_CLIENT", "ci-client")
        .env("JMP_JOB", "job-7");
    let out = run_tool(env, "pytest-no-selector", c);
    assert_passed(&out, "pytest without a selector, on the job's lease");
    assert!(
        out.stdout.contains("PASSED on widget-01"),
        "the report names the board: {}",
        out.stdout
    );
    let after = leases_of(&lab);
    assert_eq!(after.len(), 1, "no second lease: {after:?}");
    assert_eq!(after[0]["name"], lease["name"], "the job's lease stays");
    assert!(attachments(env).is_empty(), "detached");

    // Another job's lease is not this job's: with the board taken, queueing fails at once.
    let mut c = tool(env, &bin, "pytest");
    c.args(["hardware_tests", "--jmp-lease-wait", "0"])
        .env("JMP_CLIENT", "ci-client")
        .env("JMP_JOB", "job-8");
    let out = run_tool(env, "pytest-other-job", c);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        out.stdout.contains("exit 4") && out.stdout.contains("it is leased"),
        "busy, said so: {}",
        out.stdout
    );
    assert_eq!(leases_of(&lab).len(), 1);
}

/// How a run is interrupted.
#[derive(Debug, Clone, Copy)]
enum Interrupt {
    /// Ctrl-C in a terminal: SIGINT to the foreground job, pytest's process group (pytest and
    /// the `jmp` it is running).
    CtrlC,
    /// SIGINT to pytest alone (`kill -INT`).
    Sigint,
    /// A CI runner cancelling the job: SIGTERM to pytest.
    Sigterm,
}

impl Interrupt {
    fn send(self, p: &Proc) {
        match self {
            Interrupt::CtrlC => p.signal_group(Signal::SIGINT),
            Interrupt::Sigint => p.signal(Signal::SIGINT),
            Interrupt::Sigterm => p.signal(Signal::SIGTERM),
        }
    }
}

/// The command lines of `pid`'s children (from /proc: every thread's `children`).
fn children(pid: i32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|k| std::fs::read(format!("/proc/{k}/cmdline")).ok())
                .map(|argv| String::from_utf8_lossy(&argv).replace('\0', " "))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Waits until pytest runs a `jmp` whose arguments contain every word of `words` (the phase a
/// test interrupts in), failing with pytest's output if it never does.
fn wait_for_jmp(p: &mut Proc, words: &[&str]) -> String {
    let mut found = None;
    let ok = poll_until(READY, || {
        found = children(p.pid()).into_iter().find(|c| {
            let argv: Vec<&str> = c.split_whitespace().collect();
            argv.first().is_some_and(|a| a.ends_with("/jmp"))
                && words.iter().all(|w| argv.contains(w))
        });
        found.is_some() || !p.is_running()
    });
    match found {
        Some(c) if ok => c,
        _ => panic!("pytest never ran jmp {words:?}: {}", p.describe()),
    }
}

/// A process stopped (SIGSTOP) for as long as this lives: the phase a test interrupts in stays
/// open until the interruption has been sent.
struct Stopped<'a>(&'a Proc);

impl<'a> Stopped<'a> {
    fn new(p: &'a Proc) -> Stopped<'a> {
        p.signal(Signal::SIGSTOP);
        Stopped(p)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal(Signal::SIGCONT);
    }
}

/// `pytest ARGS` as ci-client, from tests/python, with a piped stdin.
fn pytest_as_ci(env: &TestEnv, bin: &std::path::Path, args: &[&str]) -> Proc {
    let mut c = tool(env, bin, "pytest");
    c.args(args).env("JMP_CLIENT", "ci-client");
    Proc::spawn_with_stdin("pytest", c, &env.logs)
}

/// Waits for the interrupted pytest to end, failing, then checks that nothing of the run is
/// left: no lease or waiting request of ci-client on the controller, no attachment here.
fn assert_given_back(lab: &Lab, mut p: Proc, how: Interrupt, phase: &str) {
    let status = p.expect_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "{how:?} {phase}: pytest ended with {status}: {}",
        p.describe()
    );
    let left: Vec<Value> = leases_of(lab)
        .into_iter()
        .filter(|l| l["client"] == "ci-client")
        .collect();
    assert!(
        left.is_empty(),
        "{how:?} {phase}: the run left {left:?}: {}",
        p.describe()
    );
    assert!(
        attachments(&lab.env).is_empty(),
        "{how:?} {phase}: the attachment outlived the run: {:?}",
        attachments(&lab.env)
    );
}

const INTERRUPTS: [Interrupt; 3] = [Interrupt::CtrlC, Interrupt::Sigint, Interrupt::Sigterm];

#[test]
fn an_interrupted_pytest_gives_the_board_back() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("py-interrupt");
    let env = &lab.env;
    let _left = Leftovers { env };
    // During a console read: the test holds the board, reading a line that never comes.
    for how in INTERRUPTS {
        let mut p = pytest_as_ci(env, &bin, &["interrupt", "-s"]);
        let line = p.expect_line(READY, "the test holding the board", |l| {
            l.contains("JMP-HOLDING ")
        });
        assert!(line.contains("widget-01"), "{line}");
        assert_eq!(leases_of(&lab).len(), 1, "held during the test");
        assert_eq!(attachments(env).len(), 1);
        how.send(&p);
        assert_given_back(&lab, p, how, "during a console read");
    }
}

#[test]
fn a_pytest_interrupted_while_waiting_for_a_lease_leaves_no_request() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("py-int-wait");
    let env = &lab.env;
    let _left = Leftovers { env };
    lab.create_client("blocker", &[]);
    for how in INTERRUPTS {
        // Someone else has the board: the run queues for it.
        let held = lease_json(&lab.ok(
            "blocker-lease",
            lab.as_client(
                "blocker",
                &["create", "lease", "--selector", "vendor=acme", "-o", "json"],
            ),
        ));
        let p = pytest_as_ci(env, &bin, &["interrupt", "-s"]);
        let waiting = poll_until(READY, || {
            leases_of(&lab)
                .iter()
                .any(|l| l["client"] == "ci-client" && l["status"] == "waiting")
        });
        assert!(
            waiting,
            "{how:?}: the run never queued: {:?}",
            leases_of(&lab)
        );
        how.send(&p);
        assert_given_back(&lab, p, how, "while waiting for a lease");
        // When the board comes free, nobody gets it on the interrupted run's behalf.
        let mut del = lab.as_client("blocker", &["delete", "lease"]);
        del.arg(held["name"].as_str().expect("lease name"));
        lab.ok("blocker-delete", del);
        assert!(
            leases_of(&lab).is_empty(),
            "{how:?}: granted to an interrupted run: {:?}",
            leases_of(&lab)
        );
    }
}

/// A UDP relay between clients and one server (jmpd) that carries nothing while closed: a
/// client's QUIC handshake through it stays under way (its packets are dropped, and resent by
/// QUIC) until it opens. Its thread ends with the test process.
struct UdpGate {
    addr: std::net::SocketAddr,
    server: Arc<Mutex<Option<std::net::SocketAddr>>>,
    open: Arc<AtomicBool>,
}

impl UdpGate {
    fn new() -> UdpGate {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the gate");
        let addr = sock.local_addr().expect("the gate's address");
        let server: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let open = Arc::new(AtomicBool::new(false));
        let (srv, op) = (server.clone(), open.clone());
        std::thread::spawn(move || {
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let Some(server) = *srv.lock().unwrap_or_else(|e| e.into_inner()) else {
                    continue;
                };
                if !op.load(Ordering::SeqCst) {
                    continue;
                }
                let to = if from == server {
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    server
                };
                let _ = sock.send_to(&buf[..n], to);
            }
        });
        UdpGate { addr, server, open }
    }

    fn to(&self, server: std::net::SocketAddr) {
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

#[test]
fn a_pytest_interrupted_while_attaching_gives_the_board_back() {
    let bin = require!(venv_bin());
    // Clients reach the exporter through a gate: closed, an attachment stays under way for as
    // long as the test needs, while the exporter stays connected to the controller.
    let gate = UdpGate::new();
    let (lab, jmpd) = widget_lab_at("py-int-attach", Some(&gate.addr.to_string()));
    gate.to(jmpd.addr);
    let env = &lab.env;
    let _left = Leftovers { env };
    for how in INTERRUPTS {
        gate.set_open(false);
        let mut p = pytest_as_ci(env, &bin, &["interrupt", "-s"]);
        wait_for_jmp(&mut p, &["attach", "--lease"]);
        how.send(&p);
        // The exporter answers again, as a slow one would, once the interruption is sent.
        gate.set_open(true);
        assert_given_back(&lab, p, how, "while attaching");
    }
}

#[test]
fn a_pytest_interrupted_while_giving_the_board_back_still_gives_it_back() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("py-int-teardown");
    let env = &lab.env;
    let _left = Leftovers { env };
    for how in INTERRUPTS {
        let mut p = pytest_as_ci(env, &bin, &["interrupt_teardown", "-s"]);
        p.expect_line(READY, "the test holding the board", |l| {
            l.contains("JMP-HOLDING ")
        });
        {
            // The controller does not answer while stopped: giving the lease back stays under
            // way.
            let _stopped = Stopped::new(&lab.ctl.proc);
            p.send_line("go");
            wait_for_jmp(&mut p, &["delete", "lease"]);
            how.send(&p);
        }
        assert_given_back(&lab, p, how, "while giving the board back");
    }
}

#[test]
fn robot_leases_by_selector_and_logs_the_console_of_a_failure() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("py-robot");
    let env = &lab.env;
    let _left = Leftovers { env };
    let out_dir = env.root.join("robot");
    let robot = |label: &str, file: &str| {
        let mut c = tool(env, &bin, "robot");
        c.arg("--outputdir")
            .arg(&out_dir)
            .args([
                "--output",
                &format!("{label}.xml"),
                "--log",
                "NONE",
                "--report",
                "NONE",
            ])
            .arg(file)
            .env("JMP_CLIENT", "ci-client");
        run_tool(env, label, c)
    };
    let out = robot("pass", "robot/boot.robot");
    assert_passed(&out, "robot in lease mode");
    assert!(leases_of(&lab).is_empty(), "released");
    let recs = out_dir.join("jmp-recordings");
    assert!(!recs.exists(), "passed tests leave no recording");

    let out = robot("fail", "robot/failing.robot");
    assert_eq!(
        out.status.code(),
        Some(1),
        "one test failed: {}",
        show(&out)
    );
    let xml = std::fs::read_to_string(out_dir.join("fail.xml")).expect("robot output");
    let t = xml
        .find("<test ")
        .map(|i| &xml[i..])
        .expect("a test in the output");
    let t = &t[..t.find("</test>").expect("end of test")];
    assert!(t.contains("status=\"FAIL\""), "{t}");
    let log = t
        .find("during this test")
        .map(|i| &t[i..])
        .unwrap_or_else(|| panic!("no console transcript logged for the failure: {t}"));
    assert!(
        log.contains("boot complete") && log.contains("echo-marker-4711"),
        "{log}"
    );
    // The recording, beside the log and linked from it.
    let files: Vec<_> = std::fs::read_dir(&recs)
        .expect("the recordings")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0]
        .file_name()
        .expect("a name")
        .to_string_lossy()
        .into_owned();
    assert!(
        t.contains("href=") && t.contains(&format!("jmp-recordings/{name}")),
        "no link to {name} in the log: {t}"
    );
    assert_recording(&files[0], None);
    assert!(leases_of(&lab).is_empty(), "released after a failure");
    assert!(attachments(env).is_empty(), "detached");
}

#[test]
fn the_robot_library_documentation_builds() {
    let bin = require!(venv_bin());
    let env = TestEnv::new("py-libdoc");
    for lib in ["JmpLibrary", "JumpstarterLibrary"] {
        let spec = env.root.join(format!("{lib}.json"));
        let mut c = tool(&env, &bin, "python");
        c.args(["-m", "robot.libdoc", "--format", "JSON", lib])
            .arg(&spec);
        let out = run_tool(&env, "libdoc", c);
        assert_passed(&out, "libdoc");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&spec).expect("spec"))
            .expect("libdoc JSON");
        let names: Vec<&str> = v["keywords"]
            .as_array()
            .expect("keywords")
            .iter()
            .filter_map(|k| k["name"].as_str())
            .collect();
        for k in [
            "Connect To Exporter",
            "Power On",
            "Power Off",
            "Power Cycle",
            "Read Serial Until",
            "Write Serial",
            "Flash Storage",
            "Release Board",
        ] {
            assert!(names.contains(&k), "{lib} lacks {k}: {names:?}");
        }
        for k in v["keywords"].as_array().expect("keywords") {
            assert!(
                !k["doc"].as_str().unwrap_or("").trim().is_empty(),
                "{lib}: {} has no documentation",
                k["name"]
            );
        }
    }
}
