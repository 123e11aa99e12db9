//! The test frameworks beside pytest's classes: `jmp_testing.JmpTestCase` under `python -m
//! unittest` and under pytest (a board leased by selector, the console of a failed test in its
//! failure, SIGTERM mid-test gives the lease back), and a pool of identical boards under
//! pytest-xdist (4 workers over 2 boards: at most 2 leases at once, the other workers queue
//! with their place shown, every test's report names its board, everything given back).

use jmp_e2e::lab::{show, Lab};
use jmp_e2e::py::*;
use jmp_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::time::Duration;

fn assert_passed(out: &RunOutput, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

/// ci-client's leases, of any state. Read to the end of jmp's output (`Lab::leases` goes
/// through `run`, which gives a process's stdout 200 ms after it exits: under this test's
/// load, four pytest workers polled, that came back empty).
fn leases_of_ci(lab: &Lab) -> Vec<Value> {
    let out = lab
        .as_admin(&["get", "leases", "-a", "-o", "json"])
        .output()
        .expect("run jmp get leases");
    assert!(out.status.success(), "jmp get leases: {out:?}");
    let all: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("jmp get leases printed {out:?}: {e}"));
    all.into_iter()
        .filter(|l| l["client"] == "ci-client")
        .collect()
}

/// `python -m unittest discover -s DIR -v` as ci-client, from tests/python.
fn unittest(env: &TestEnv, bin: &std::path::Path, dir: &str) -> std::process::Command {
    let mut c = tool(env, bin, "python");
    c.args(["-m", "unittest", "discover", "-v", "-s", dir])
        .env("JMP_CLIENT", "ci-client");
    c
}

#[test]
fn unittest_cases_lease_a_board_and_report_the_console_of_a_failure() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("py-unittest");
    let env = &lab.env;
    let _left = Leftovers { env };

    // The pytest seed example as a JmpTestCase, under unittest's own runner.
    let out = run_tool(env, "unittest-seed", unittest(env, &bin, "unittest_seed"));
    assert_passed(&out, "python -m unittest");
    assert!(
        out.stderr.contains("Ran 2 tests") && out.stderr.contains("\nOK"),
        "{}",
        show(&out)
    );
    assert!(
        leases_of_ci(&lab).is_empty(),
        "released: {:?}",
        leases_of_ci(&lab)
    );
    assert!(attachments(env).is_empty(), "detached");

    // The same file under pytest, which runs unittest classes.
    let report = env.root.join("unittest-under-pytest.xml");
    let mut c = tool(env, &bin, "pytest");
    c.arg("unittest_seed")
        .arg(format!("--junitxml={}", report.display()))
        .env("JMP_CLIENT", "ci-client");
    let out = run_tool(env, "pytest-unittest-seed", c);
    assert_passed(&out, "pytest on a JmpTestCase");
    assert_eq!(junit_counts(&report), (2, 0, 0), "{}", out.stdout);
    assert!(
        leases_of_ci(&lab).is_empty(),
        "released: {:?}",
        leases_of_ci(&lab)
    );

    // A failing test: its failure carries what the console printed during it, under both
    // runners, and the board is given back.
    let out = run_tool(
        env,
        "unittest-failing",
        unittest(env, &bin, "unittest_failing"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let mut pytest = tool(env, &bin, "pytest");
    pytest
        .arg("unittest_failing")
        .env("JMP_CLIENT", "ci-client");
    let out_pytest = run_tool(env, "pytest-unittest-failing", pytest);
    assert_eq!(out_pytest.status.code(), Some(1), "{}", show(&out_pytest));
    for (runner, text) in [("unittest", &out.stderr), ("pytest", &out_pytest.stdout)] {
        let at = text
            .find("jmp console widget-01/console during this test")
            .unwrap_or_else(|| panic!("{runner}: no console transcript in the failure:\n{text}"));
        let section = &text[at..];
        for seen in ["boot complete", "echo-marker-4711"] {
            assert!(
                section.contains(seen),
                "{runner}: {seen:?} not in the transcript:\n{section}"
            );
        }
        assert!(
            text.contains("'kernel panic' did not appear within 1s"),
            "{runner}: {text}"
        );
    }
    assert!(leases_of_ci(&lab).is_empty(), "released after a failure");
    assert!(attachments(env).is_empty(), "detached after a failure");
}

#[test]
fn a_unittest_run_stopped_by_sigterm_gives_the_lease_back() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("py-unittest-term");
    let env = &lab.env;
    let _left = Leftovers { env };
    let mut p = Proc::spawn_with_stdin(
        "unittest-hang",
        unittest(env, &bin, "unittest_hang"),
        &env.logs,
    );
    let line = p.expect_line(READY, "the test holding the board", |l| {
        l.contains("JMP-HOLDING ")
    });
    assert!(line.contains("widget-01"), "{line}");
    let held = leases_of_ci(&lab);
    assert!(
        held.len() == 1 && held[0]["status"] == "active",
        "held during the test: {held:?}"
    );
    p.signal(Signal::SIGTERM);
    let status = p.expect_exit(Duration::from_secs(60));
    assert!(!status.success(), "{status}: {}", p.describe());
    let left = leases_of_ci(&lab);
    assert!(left.is_empty(), "the run left {left:?}: {}", p.describe());
    assert!(
        attachments(env).is_empty(),
        "the attachment outlived the run: {:?}",
        attachments(env)
    );
}

/// A second simulated board like widget-01 in `lab` (same labels): the pool.
fn second_widget(lab: &Lab) -> Jmpd {
    let token = lab.create_exporter(
        "widget-02",
        &["vendor=acme", "model=widget-v2", "project=myproject"],
    );
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: widget-02}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  {}",
        lab.env.root.join("state-widget-02").display(),
        token.display(),
        widget_export().trim_end().replace('\n', "\n  ")
    );
    let p = lab.env.root.join("widget-02.exporter.yaml");
    std::fs::write(&p, yaml + "\n").expect("write exporter config");
    lab.start_jmpd(&p)
}

#[test]
fn an_xdist_run_spreads_over_a_pool_of_boards() {
    let bin = require!(venv_bin());
    require!(venv_python(&["xdist"]));
    let (lab, _jmpd1) = widget_lab("py-pool");
    let _jmpd2 = second_widget(&lab);
    let env = &lab.env;
    let _left = Leftovers { env };

    let report = env.root.join("pool.xml");
    let mut c = tool(env, &bin, "pytest");
    c.args(["pool", "-n", "4", "-v", "--jmp-lease-wait", "120"])
        .arg(format!("--junitxml={}", report.display()))
        .env("JMP_CLIENT", "ci-client");
    let mut p = Proc::spawn("pytest-pool", c, &env.logs);
    // The controller's view while it runs: never more than the pool's two boards leased.
    let mut most = 0;
    let mut waited = false;
    let done = poll_until(Duration::from_secs(300), || {
        let ls = leases_of_ci(&lab);
        most = most.max(ls.iter().filter(|l| l["status"] == "active").count());
        waited |= ls.iter().any(|l| l["status"] == "waiting");
        !p.is_running()
    });
    assert!(done, "pytest -n 4 did not end: {}", p.describe());
    let status = p.expect_exit(Duration::from_secs(10));
    let out = p.stdout_so_far();
    let err = p.stderr();
    assert!(status.success(), "{status}: {out}\n{err}");
    assert_eq!(junit_counts(&report), (8, 0, 0), "{out}");
    assert!(most <= 2, "{most} leases at once on a pool of 2");
    assert!(most >= 1, "no lease seen");

    // Two of the four workers queued: each said so, named (the controller may be sampled
    // between its states, the workers' own lines are not).
    let queued: std::collections::BTreeSet<&str> = err
        .lines()
        .filter(|l| l.contains("in the queue"))
        .filter_map(|l| l.strip_prefix("jmp [")?.split(']').next())
        .collect();
    assert_eq!(
        queued.len(),
        2,
        "two workers waited for a board, with their place shown (waiting seen on the controller: {waited}):\n{err}"
    );

    // Each test's report names its board: JUnit properties, and the -v outcome lines.
    let xml = std::fs::read_to_string(&report).expect("report");
    let mut boards = std::collections::BTreeMap::<String, usize>::new();
    for case in xml.split("<testcase ").skip(1) {
        let v = case
            .split("name=\"jmp_board\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("a test without its board: {case}"));
        *boards.entry(v.to_string()).or_default() += 1;
    }
    assert_eq!(boards.values().sum::<usize>(), 8, "{boards:?}");
    assert!(
        boards.keys().all(|b| b == "widget-01" || b == "widget-02"),
        "{boards:?}"
    );
    assert!(
        out.contains("PASSED on widget-0"),
        "the terminal names the board: {out}"
    );

    assert!(
        leases_of_ci(&lab).is_empty(),
        "released: {:?}",
        leases_of_ci(&lab)
    );
    assert!(
        attachments(env).is_empty(),
        "detached: {:?}",
        attachments(env)
    );
}
