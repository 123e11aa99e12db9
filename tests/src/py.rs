//! Running the Python integrations (python/: the pytest plugin and the Robot Framework
//! library) from the e2e tests: the test venv's tools with a test's private jmp directories,
//! and a guard that leaves nothing of jmp running whatever the test did.

use crate::{
    command, jmp_bin, kill_pid, run, target_dir, venv_python, workspace_root, RunOutput, TestEnv,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Hang guard for a whole pytest or robot run.
pub const RUN: Duration = Duration::from_secs(180);

/// Variables of the CI systems jmp reads the job from: cleared, so that the CI running these
/// tests does not tag the test's leases (a test sets its own).
pub const CI_VARS: &[&str] = &[
    "JMP_JOB",
    "JMP_LEASE",
    "JMP_EXPORTER",
    "JMP_TOKEN",
    "JMP_TOKEN_FILE",
    "JMP_CLIENT",
    "JMP_CLIENT_CONFIG",
    "GITHUB_RUN_ID",
    "GITHUB_JOB",
    "GITHUB_RUN_ATTEMPT",
    "GITHUB_ENV",
    "CI_JOB_ID",
    "BUILDKITE_JOB_ID",
    "BUILD_TAG",
];

/// The venv's bin directory if it has the package and the frameworks installed
/// (scripts/install-test-deps.sh); else what is missing (for [`require!`](crate::require):
/// the test fails).
pub fn venv_bin() -> Result<PathBuf, String> {
    let py = venv_python(&["jmp_testing", "pytest", "robot", "JmpLibrary"])?;
    Ok(py.parent().expect("the venv's bin directory").to_path_buf())
}

/// The Python test files: tests/python/.
pub fn py_dir() -> PathBuf {
    workspace_root().join("tests/python")
}

/// PATH with the venv's tools and the jmp under test first.
pub fn path_with(bin: &Path) -> String {
    format!(
        "{}:{}:{}",
        bin.display(),
        target_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `TOOL ARGS` from the venv (pytest, robot, python) with `env`'s jmp directories, run in
/// tests/python.
pub fn tool(env: &TestEnv, bin: &Path, name: &str) -> Command {
    let mut c = command(bin.join(name));
    for v in CI_VARS {
        c.env_remove(v);
    }
    c.env("JMP_RUNTIME_DIR", &env.runtime)
        .env("JMP_CONFIG_DIR", &env.config)
        .env("JMP_DEV_DIR", &env.dev)
        .env("JMP_BIN", jmp_bin())
        .env("PATH", path_with(bin))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("JMP_LOG")
        .current_dir(py_dir());
    if name == "pytest" {
        c.args([
            "-p",
            "no:cacheprovider",
            "-o",
            "console_output_style=classic",
        ]);
    }
    c
}

pub fn run_tool(env: &TestEnv, label: &str, cmd: Command) -> RunOutput {
    run(label, cmd, &env.logs, RUN)
}

/// The attachments `jmp status -o json` lists for `env`.
pub fn attachments(env: &TestEnv) -> Vec<serde_json::Value> {
    let mut c = env.jmp();
    c.args(["status", "-o", "json"]);
    let out = run("jmp-status", c, &env.logs, crate::READY);
    assert!(out.status.success(), "jmp status: {}", out.stderr);
    match serde_json::from_str(&out.stdout) {
        Ok(serde_json::Value::Array(v)) => v,
        other => panic!("jmp status -o json printed {:?} ({other:?})", out.stdout),
    }
}

/// On drop: stops the local exporter and every attachment of `env`, then kills by PID any
/// attachment process still alive.
pub struct Leftovers<'a> {
    pub env: &'a TestEnv,
}

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        let pids: Vec<i32> = {
            let mut c = self.env.jmp();
            c.args(["status", "-o", "json"]);
            let out = run("jmp-status", c, &self.env.logs, crate::READY);
            serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout)
                .unwrap_or_default()
                .iter()
                .filter_map(|a| a["pid"].as_i64())
                .map(|p| p as i32)
                .collect()
        };
        for args in [&["local", "stop"][..], &["detach", "--all"][..]] {
            let mut c = self.env.jmp();
            c.args(args);
            let _ = run("jmp-cleanup", c, &self.env.logs, Duration::from_secs(15));
        }
        for p in pids {
            kill_pid(p);
        }
    }
}

/// The numbers of a JUnit XML report pytest wrote: (tests, failures + errors, skipped).
pub fn junit_counts(path: &Path) -> (u32, u32, u32) {
    let xml = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no JUnit report at {}: {e}", path.display()));
    let attr = |name: &str| -> u32 {
        let key = format!(" {name}=\"");
        xml.find(&key)
            .and_then(|i| {
                let rest = &xml[i + key.len()..];
                rest[..rest.find('"')?].parse().ok()
            })
            .unwrap_or_else(|| panic!("no {name} in {}", &xml[..xml.len().min(400)]))
    };
    (
        attr("tests"),
        attr("failures") + attr("errors"),
        attr("skipped"),
    )
}

/// An exporter config for the simulated board (console and power) with the labels the
/// examples select: vendor=acme, model=widget-v2 (and project=myproject, the CI recipes').
pub fn widget_export() -> &'static str {
    "console: {type: sim-console, hostname: jmp-sim}\npower: {type: power-sim}\n"
}

/// A lab (controller) with one simulated board, widget-01 (console and power), labelled
/// vendor=acme, model=widget-v2 (the examples' selector) and project=myproject (the CI
/// recipes'), and a client config `ci-client` (imported, not made current).
pub fn widget_lab(tag: &str) -> (crate::lab::Lab, crate::Jmpd) {
    widget_lab_with(tag, "127.0.0.1:0", &[], None)
}

/// [`widget_lab`] whose exporter tells the controller that clients reach it at `address`
/// (`controller: {address: ...}`) instead of its own listening address.
pub fn widget_lab_at(tag: &str, address: Option<&str>) -> (crate::lab::Lab, crate::Jmpd) {
    widget_lab_with(tag, "127.0.0.1:0", &[], address)
}

/// [`widget_lab_at`] with the controller listening on `listen` and given `extra` arguments.
pub fn widget_lab_with(
    tag: &str,
    listen: &str,
    extra: &[&str],
    address: Option<&str>,
) -> (crate::lab::Lab, crate::Jmpd) {
    let lab = crate::lab::Lab::with_args(tag, listen, extra);
    let token = lab.create_exporter(
        "widget-01",
        &["vendor=acme", "model=widget-v2", "project=myproject"],
    );
    let advertised = address
        .map(|a| format!(", address: {a:?}"))
        .unwrap_or_default();
    // As a lab shared by teams runs: every lease finds the board off. A lease sees only the
    // console output of its own time (issue 18), so the README's example (power on, then wait
    // for the boot log) needs the board to boot inside the lease, not to be left on by the last.
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: widget-01}}\nlisten: 127.0.0.1:0\nstateDir: {}\npowerOffAfterLease: true\ncontroller: {{tokenFile: {}{advertised}}}\nexport:\n  {}",
        lab.env.root.join("state-widget").display(),
        token.display(),
        widget_export().trim_end().replace('\n', "\n  ")
    );
    let p = lab.env.root.join("widget-01.exporter.yaml");
    std::fs::write(&p, yaml + "\n").expect("write exporter config");
    let jmpd = lab.start_jmpd(&p);
    lab.create_client("ci-client", &[]);
    (lab, jmpd)
}
