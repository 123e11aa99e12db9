//! The Python integrations end to end: pytest (PyPI) and Robot Framework (PyPI) running the
//! README's examples and Jumpstarter's spellings against the simulated board in local mode
//! (`jmp local start`), direct mode (an exporter address and token) and lease mode (a
//! controller and a selector); a failing test's report carries the console; an interrupted run
//! gives the board back.

use jmp_e2e::lab::{lease_json, show, Lab};
use jmp_e2e::py::*;
use jmp_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::time::Duration;

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
    let out = pytest(
        "pytest-lease",
        &[
            "hardware_tests",
            "jumpstarter",
            &format!("--junitxml={}", report.display()),
        ],
    );
    assert_passed(&out, "pytest in lease mode");
    assert_eq!(junit_counts(&report), (5, 0, 0), "{}", out.stdout);
    assert!(
        leases_of(&lab).is_empty(),
        "released: {:?}",
        leases_of(&lab)
    );
    assert!(attachments(env).is_empty(), "detached");

    // A failing test: its report has the console's output from during the test.
    let out = pytest("pytest-failing", &["failing", "-rf"]);
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

#[test]
fn an_interrupted_pytest_gives_the_board_back() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("py-interrupt");
    let env = &lab.env;
    let _left = Leftovers { env };
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let mut c = tool(env, &bin, "pytest");
        c.args(["interrupt", "-s"]).env("JMP_CLIENT", "ci-client");
        let mut p = Proc::spawn("pytest-hold", c, &env.logs);
        let line = p.expect_line(READY, "the test holding the board", |l| {
            l.contains("JMP-HOLDING ")
        });
        assert!(line.contains("widget-01"), "{line}");
        assert_eq!(leases_of(&lab).len(), 1, "held during the test");
        assert_eq!(attachments(env).len(), 1);
        p.signal(sig);
        let status = p.expect_exit(Duration::from_secs(60));
        assert!(!status.success(), "{sig:?}: pytest ended with {status}");
        assert!(
            leases_of(&lab).is_empty(),
            "{sig:?}: the lease outlived the run: {:?}",
            leases_of(&lab)
        );
        assert!(
            attachments(env).is_empty(),
            "{sig:?}: the attachment outlived the run"
        );
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
