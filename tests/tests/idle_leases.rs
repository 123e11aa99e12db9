//! Leases that end when nothing uses them, whatever their duration (issue 21, scope 1). A CI
//! job killed in the middle of its tests (its attachment and its commands SIGKILLed, no `jmp
//! delete lease` ever run) frees its board once the exporter has seen the attachment go and
//! the idle timeout has passed, with and without a controller restart in between, and a job
//! waiting for the board gets it. A pytest run killed with SIGKILL takes its attachment along.
//! An auto-extended lease in use outlives its first duration and ends at its hard limit. An
//! extension beyond the client's policy is refused.
//!
//! The controllers here default to a 2 s idle timeout; nothing in the tests waits on time:
//! each waits for what the product does (a waiter's grant, a process's exit, a listing).

use jmp_e2e::lab::*;
use jmp_e2e::py::*;
use jmp_e2e::*;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::process::Command;

const IDLE: &str = "2s";

fn lab(tag: &str, listen: &str) -> (Lab, Jmpd) {
    widget_lab_with(tag, listen, &["--default-idle-timeout", IDLE], None)
}

/// `jmp ARGS` as the CI client in job `job` (its leases are tagged with it).
fn job_cmd(lab: &Lab, job: &str, args: &[&str]) -> Command {
    let mut c = lab.jmp();
    for v in CI_VARS {
        c.env_remove(v);
    }
    c.env("JMP_CLIENT", "ci-client")
        .env("JMP_JOB", job)
        .args(args);
    c
}

/// A CI step's shell running `script` in tests/python, in a process group of its own (so the
/// test can kill the step's whole process tree, as a CI runner cancelling a job does).
fn step_shell(lab: &Lab, bin: &std::path::Path, job: &str, script: &str) -> Command {
    let env = &lab.env;
    let mut c = Command::new("bash");
    c.args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script]);
    for v in CI_VARS {
        c.env_remove(v);
    }
    c.env("JMP_RUNTIME_DIR", &env.runtime)
        .env("JMP_CONFIG_DIR", &env.config)
        .env("JMP_DEV_DIR", &env.dev)
        .env("JMP_CLIENT", "ci-client")
        .env("JMP_JOB", job)
        .env("PATH", path_with(bin))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("JMP_LOG")
        .current_dir(py_dir())
        .process_group(0);
    c
}

/// A job waiting in the queue for the board (`jmp create lease --wait`), once it is queued.
fn waiter(lab: &Lab, job: &str) -> Proc {
    let c = job_cmd(
        lab,
        job,
        &[
            "create",
            "lease",
            "--selector",
            "project=myproject",
            "--wait",
            "120",
            "-o",
            "json",
        ],
    );
    let mut p = lab.spawn(job, c);
    wait_stderr(&mut p, "waiting: position 1", READY);
    p
}

/// The waiter's lease, once granted.
fn granted(p: &mut Proc) -> Value {
    // The line first: stdout is read by another thread, which may not have passed it on yet
    // when the process's exit is seen.
    let line = p.expect_line(LONG, "the granted lease (JSON)", |l| {
        l.trim_start().starts_with('{')
    });
    let status = p.expect_exit(LONG);
    assert!(
        status.success(),
        "the waiter got no board: {}",
        p.describe()
    );
    let l = lease_json(&line);
    assert_eq!(l["exporter"], "widget-01", "{l}");
    l
}

/// `jmp delete lease NAME` of a lease that ended as idle: refused, saying how it ended.
fn told_it_ended_idle(lab: &Lab, job: &str, lease: &str) {
    let out = lab.run(
        "delete-ended",
        job_cmd(lab, job, &["delete", "lease", lease]),
    );
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    assert!(
        out.stderr.contains(&format!("lease {lease} ended at "))
            && out
                .stderr
                .contains("nothing used it for 2s (its idle timeout)"),
        "{}",
        show(&out)
    );
}

/// The GitHub recipe's job, cancelled in the middle of its test step: the attachment `jmp
/// shell` made and the step's processes (bash, jmp shell, pytest) are SIGKILLed, and the
/// release step never runs. The board goes to the job waiting for it once the exporter has
/// seen the attachment go (its QUIC idle timeout: the killed process sent nothing) and the
/// lease's idle timeout has passed; with a restart of the controller in between too.
#[test]
fn a_killed_job_frees_its_board_as_idle_with_and_without_a_controller_restart() {
    let bin = require!(venv_bin());
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let (mut lab, _jmpd) = lab("idle-killed", &listen);
    let _left = Leftovers { env: &lab.env };
    for restart in [false, true] {
        let job = format!("job-{restart}");
        // Step 1 of the recipe, as written: no idle timeout given, the controller's applies.
        let lease = lab
            .ok(
                "request-lease",
                job_cmd(
                    &lab,
                    &job,
                    &[
                        "create",
                        "lease",
                        "--selector",
                        "project=myproject",
                        "--wait",
                        "300",
                        "-o",
                        "name",
                    ],
                ),
            )
            .trim()
            .to_string();
        let listed = lab.leases();
        let l = find_lease(&listed, &lease).expect("listed");
        assert_eq!(l["idle_timeout"], 2, "{l}");
        // Step 2: the tests, under jmp shell; they hold the board until killed.
        let script = format!("jmp shell --lease {lease} pytest -p no:cacheprovider interrupt -s");
        let mut step = lab.spawn(
            &format!("step-{restart}"),
            step_shell(&lab, &bin, &job, &script),
        );
        step.expect_line(READY, "the test holding the board", |l| {
            l.contains("JMP-HOLDING widget-01")
        });
        let att = attachments(&lab.env);
        assert_eq!(att.len(), 1, "{att:?}");
        let attachment = att[0]["pid"].as_i64().expect("pid") as i32;
        let shown = lab.leases();
        let l = find_lease(&shown, &lease).expect("listed");
        assert_eq!(l["attached"], true, "in use while attached: {l}");
        assert!(l.get("idle_deadline").is_none(), "{l}");
        let mut next = waiter(&lab, &format!("next-{restart}"));

        // Cancelled: everything of the job is killed, the attachment first.
        kill(Pid::from_raw(attachment), Signal::SIGKILL).expect("kill the attachment");
        killpg(Pid::from_raw(step.pid()), Signal::SIGKILL).expect("kill the step");
        step.expect_exit(READY);
        if restart {
            lab.ctl.proc.kill9();
            lab.ctl = start_controller_with(
                &lab.env.logs,
                &lab.data,
                &listen,
                &["--default-idle-timeout", IDLE],
            );
        }

        let got = granted(&mut next);
        assert_ne!(got["name"], lease.as_str());
        told_it_ended_idle(&lab, &job, &lease);
        let left: Vec<String> = lab
            .leases()
            .iter()
            .map(|l| l["name"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(left, vec![got["name"].as_str().unwrap().to_string()]);
        lab.ok(
            "release",
            job_cmd(
                &lab,
                &format!("next-{restart}"),
                &["delete", "lease", got["name"].as_str().unwrap()],
            ),
        );
    }
}

/// The pytest plugin's attachment belongs to the pytest process: SIGKILL of pytest (which can
/// release nothing) takes the attachment along, and the lease the plugin made ends as idle.
#[test]
fn a_killed_pytest_takes_its_attachment_along_and_its_lease_ends_as_idle() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = lab("idle-pytest", "127.0.0.1:0");
    let env = &lab.env;
    let _left = Leftovers { env };
    let mut c = tool(env, &bin, "pytest");
    c.args(["interrupt", "-s"]).env("JMP_CLIENT", "ci-client");
    let mut p = Proc::spawn("pytest-hold", c, &env.logs);
    let line = p.expect_line(READY, "the test holding the board", |l| {
        l.contains("JMP-HOLDING ")
    });
    let lease = line
        .split_whitespace()
        .last()
        .expect("the lease in the line")
        .to_string();
    let att = attachments(env);
    assert_eq!(att.len(), 1, "{att:?}");
    assert_eq!(att[0]["lease"], lease.as_str(), "{att:?}");
    let attachment = att[0]["pid"].as_i64().expect("pid") as i32;
    let mut next = waiter(&lab, "next");
    p.kill9();
    assert!(
        poll_until(LONG, || !pid_alive(attachment)),
        "the attachment outlived the pytest it belonged to"
    );
    assert!(attachments(env).is_empty());
    granted(&mut next);
    told_it_ended_idle(&lab, "", &lease);
}

/// An auto-extending lease in use (attached) is extended past its first duration, in steps,
/// and ends at its hard limit; `jmp get leases` shows its last use, idle deadline and hard
/// limit, in the table and in JSON.
#[test]
fn an_auto_extended_lease_in_use_outlives_its_duration_and_ends_at_its_hard_limit() {
    let (lab, _jmpd) = lab("idle-extend", "127.0.0.1:0");
    let out = lab.ok(
        "create-lease",
        job_cmd(
            &lab,
            "ext",
            &[
                "create",
                "lease",
                "-l",
                "project=myproject",
                "--duration",
                "3s",
                "--auto-extend",
                "--max-duration",
                "9s",
                "--idle-timeout",
                "30s",
                "-o",
                "json",
            ],
        ),
    );
    let l = lease_json(&out);
    let (name, first_end) = (
        l["name"].as_str().unwrap().to_string(),
        l["end"].as_u64().unwrap(),
    );
    let hard = l["hard_limit"].as_u64().expect("a hard limit");
    assert_eq!(hard, l["begin"].as_u64().unwrap() + 9, "{l}");
    assert_eq!(l["idle_timeout"], 30, "{l}");
    assert!(l["idle_deadline"].is_u64() && l["last_use"].is_u64(), "{l}");
    let mut cmd = job_cmd(&lab, "ext", &["attach", "-o", "json", "--dev-dir"]);
    cmd.arg(&lab.env.dev);
    let mut att = lab.spawn("attach", cmd);
    att.expect_line(READY, "the attachment's JSON line", |l| l.starts_with('{'));
    // Attached: in use; the table says so and shows the hard limit.
    assert!(poll_until(READY, || {
        find_lease(&lab.leases(), &name).is_some_and(|l| l["attached"] == true)
    }));
    let table = lab.ok("get-leases", job_cmd(&lab, "ext", &["get", "leases"]));
    for col in ["LAST USE", "IDLE UNTIL", "HARD LIMIT", "attached"] {
        assert!(table.contains(col), "{col} missing from:\n{table}");
    }
    // Extended past its first end while in use, up to its hard limit...
    let mut last_end = first_end;
    assert!(
        poll_until(LONG, || {
            match find_lease(&lab.leases(), &name) {
                Some(l) => {
                    last_end = l["end"].as_u64().unwrap_or(last_end);
                    last_end >= hard
                }
                None => false,
            }
        }),
        "never extended to its hard limit {hard} (last end {last_end}, first {first_end})"
    );
    // ... where it ends: the attachment is told, and the lease is gone.
    let status = att.expect_exit(LONG);
    assert_eq!(status.code(), Some(6), "{}", att.describe());
    assert!(find_lease(&lab.leases(), &name).is_none());
}

/// The client's policy bounds what a lease may ask: an idle timeout longer than its maximum,
/// or none, a hard limit beyond its longest lease, and an extension beyond it are refused
/// (exit 10), naming the limit.
#[test]
fn an_extension_or_a_limit_beyond_the_policy_is_refused() {
    let (lab, _jmpd) = lab("idle-policy", "127.0.0.1:0");
    lab.create_client(
        "strict",
        &["--max-duration", "1h", "--max-idle-timeout", "5m"],
    );
    let as_strict = |args: &[&str]| {
        let mut c = lab.as_client("strict", args);
        for v in ["JMP_JOB", "GITHUB_RUN_ID", "CI_JOB_ID"] {
            c.env_remove(v);
        }
        c
    };
    let refused = |label: &str, args: &[&str], needle: &str| {
        let out = lab.run(label, as_strict(args));
        assert_eq!(out.status.code(), Some(10), "{label}: {}", show(&out));
        assert!(out.stderr.contains(needle), "{label}: {}", show(&out));
    };
    let base = ["create", "lease", "-l", "project=myproject"];
    refused(
        "idle-none",
        &[&base[..], &["--idle-timeout", "none"]].concat(),
        "may not hold a lease without an idle timeout (at most 5m)",
    );
    refused(
        "idle-long",
        &[&base[..], &["--idle-timeout", "10m"]].concat(),
        "an idle timeout of 10m is longer than client strict may ask for (at most 5m)",
    );
    refused(
        "hard-long",
        &[&base[..], &["--auto-extend", "--max-duration", "2h"]].concat(),
        "a hard limit of 2h is longer than client strict may hold a lease (at most 1h)",
    );
    let name = lab
        .ok("create", as_strict(&[&base[..], &["-o", "name"]].concat()))
        .trim()
        .to_string();
    let l = find_lease(&lab.leases(), &name).cloned().expect("listed");
    assert_eq!(
        l["idle_timeout"], 2,
        "the controller's default, within the policy: {l}"
    );
    refused(
        "extend-long",
        &["update", "lease", &name, "--duration", "2h"],
        "may hold a lease for at most 1h",
    );
    let out = lab.ok(
        "extend-ok",
        as_strict(&["update", "lease", &name, "--duration", "45m", "-o", "json"]),
    );
    let l = lease_json(&out);
    assert_eq!(
        l["end"].as_u64().unwrap(),
        l["begin"].as_u64().unwrap() + 45 * 60,
        "{l}"
    );
    lab.ok("delete", as_strict(&["delete", "lease", &name]));
}
