//! The CI recipes in examples/ci/ run as written: their `run:` (GitHub Actions) and
//! `script:`/`after_script:` (GitLab CI) lines, executed the way those CI systems execute them,
//! in a checkout holding the README's test module, against a controller and an exporter this
//! test started (or, for the self-hosted recipe, the runner's own local board). After each
//! step the test checks its effect: the lease exists, the tests ran against the board, the
//! lease is gone afterwards, also when the test step failed.
//!
//! How the CI systems run the lines, as reproduced here:
//! - GitHub Actions: each step in a new `bash --noprofile --norc -eo pipefail` with the step's
//!   script; lines a step appends to `$GITHUB_ENV` as `NAME=value` are in the environment of
//!   the later steps; after a failed step only steps with `if: always()` run; `uses:` steps
//!   (checkout) are done by the test itself. `GITHUB_RUN_ID`/`GITHUB_JOB` are set.
//! - GitLab CI: the `script` lines in one shell, stopping at the first failing line;
//!   `after_script` in a new shell, whatever the script did. `CI_JOB_ID` is set.

use jmp_e2e::lab::{show, Lab};
use jmp_e2e::py::*;
use jmp_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn recipe(name: &str) -> Value {
    let p = workspace_root().join("examples/ci").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A checkout of a user's repository: the README's test module under tests/hardware_tests/,
/// the simulated board's config as .jumpstarter/local-config.yaml, and with `broken` a second
/// test module that fails.
fn checkout(env: &TestEnv, broken: bool) -> PathBuf {
    let dir = env.root.join(if broken {
        "checkout-broken"
    } else {
        "checkout"
    });
    let tests = dir.join("tests/hardware_tests");
    std::fs::create_dir_all(&tests).expect("mkdir");
    std::fs::copy(
        py_dir().join("hardware_tests/test_boot.py"),
        tests.join("test_boot.py"),
    )
    .expect("copy test module");
    if broken {
        std::fs::write(
            tests.join("test_broken.py"),
            "from jmp_testing import JmpTest\n\n\nclass TestBroken(JmpTest):\n    exporter_selector = \"vendor=acme\"\n\n    def test_fails(self):\n        self.client.serial.read_until(\"a line never printed\", timeout=1)\n",
        )
        .expect("write broken test");
    }
    std::fs::create_dir_all(dir.join(".jumpstarter")).expect("mkdir");
    std::fs::copy(
        workspace_root().join("examples/local-config.yaml"),
        dir.join(".jumpstarter/local-config.yaml"),
    )
    .expect("copy local config");
    dir
}

/// A shell as the CI system starts one for a step, in `dir`, with `env`'s jmp directories
/// and the venv (pytest) and jmp on PATH.
fn ci_shell(env: &TestEnv, bin: &Path, dir: &Path, vars: &[(String, String)]) -> Command {
    let mut c = command("bash");
    c.args(["--noprofile", "--norc", "-eo", "pipefail", "-c"]);
    for v in CI_VARS {
        c.env_remove(v);
    }
    c.env("JMP_RUNTIME_DIR", &env.runtime)
        .env("JMP_CONFIG_DIR", &env.config)
        .env("JMP_DEV_DIR", &env.dev)
        .env("PATH", path_with(bin))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("CI", "true")
        .env_remove("JMP_LOG")
        .current_dir(dir);
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

struct Step {
    name: String,
    out: RunOutput,
}

/// Runs the GitHub job `job` of `workflow` step by step; `after` sees each step that ran.
fn run_github_job(
    env: &TestEnv,
    bin: &Path,
    dir: &Path,
    workflow: &Value,
    job: &str,
    mut after: impl FnMut(&Step),
) -> Vec<Step> {
    let steps = workflow["jobs"][job]["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in job {job}"));
    let github_env = env.root.join(format!("github-env-{job}"));
    std::fs::write(&github_env, "").expect("GITHUB_ENV");
    let mut ran = Vec::new();
    let mut failed = false;
    for (i, s) in steps.iter().enumerate() {
        let Some(script) = s["run"].as_str() else {
            assert!(
                s["uses"].is_string(),
                "step {i} of {job}: neither run nor uses"
            );
            continue;
        };
        let always = s["if"].as_str().is_some_and(|c| c.trim() == "always()");
        if failed && !always {
            continue;
        }
        let mut vars = vec![
            ("GITHUB_ACTIONS".to_string(), "true".to_string()),
            ("GITHUB_RUN_ID".into(), "4242".into()),
            ("GITHUB_RUN_ATTEMPT".into(), "1".into()),
            ("GITHUB_JOB".into(), job.to_string()),
            ("GITHUB_ENV".into(), github_env.display().to_string()),
        ];
        let exported = std::fs::read_to_string(&github_env).expect("read GITHUB_ENV");
        for line in exported.lines() {
            if let Some((k, v)) = line.split_once('=') {
                vars.push((k.to_string(), v.to_string()));
            }
        }
        let mut c = ci_shell(env, bin, dir, &vars);
        c.arg(script);
        let name = s["name"].as_str().unwrap_or(script).to_string();
        let out = run_tool(env, &format!("gh-{job}-{i}"), c);
        failed |= !out.status.success();
        let step = Step { name, out };
        after(&step);
        ran.push(step);
    }
    ran
}

/// Runs a GitLab job: `script` in one shell (stopping at the first failing line), then
/// `after_script` in another.
fn run_gitlab_job(env: &TestEnv, bin: &Path, dir: &Path, job: &Value) -> (RunOutput, RunOutput) {
    let lines = |k: &str| -> String {
        job[k]
            .as_array()
            .unwrap_or_else(|| panic!("no {k}"))
            .iter()
            .map(|l| l.as_str().expect("a line").to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let vars = vec![
        ("GITLAB_CI".to_string(), "true".to_string()),
        ("CI_JOB_ID".into(), "9001".into()),
    ];
    let mut c = ci_shell(env, bin, dir, &vars);
    c.arg(lines("script"));
    let script = run_tool(env, "gitlab-script", c);
    let mut c = ci_shell(env, bin, dir, &vars);
    c.arg(lines("after_script"));
    let after = run_tool(env, "gitlab-after-script", c);
    (script, after)
}

fn active(lab: &Lab) -> Vec<Value> {
    lab.leases()
        .into_iter()
        .filter(|l| l["status"] == "active")
        .collect()
}

#[test]
fn the_github_recipe_leases_tests_and_releases_even_when_the_tests_fail() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("ci-github");
    let env = &lab.env;
    let _left = Leftovers { env };
    let wf = recipe("github-hardware-test.yml");
    for broken in [false, true] {
        let dir = checkout(env, broken);
        let steps = run_github_job(env, &bin, &dir, &wf, "hardware-test", |s| {
            match s.name.as_str() {
                "Request hardware lease" => {
                    assert!(s.out.status.success(), "{}", show(&s.out));
                    let a = active(&lab);
                    assert_eq!(a.len(), 1, "one lease: {a:?}");
                    assert_eq!(a[0]["exporter"], "widget-01");
                    assert_eq!(a[0]["job"], "github:4242.1/hardware-test", "{a:?}");
                }
                "Run tests" => {
                    let out = &s.out.stdout;
                    if broken {
                        assert!(!s.out.status.success(), "the broken test fails the step");
                        assert!(out.contains("1 failed, 2 passed"), "{out}");
                        assert!(out.contains("jmp console widget-01/console"), "{out}");
                    } else {
                        assert!(s.out.status.success(), "{}", show(&s.out));
                        assert!(out.contains("2 passed"), "{out}");
                    }
                    assert!(
                        attachments(env).is_empty(),
                        "jmp shell detached: {:?}",
                        attachments(env)
                    );
                    assert_eq!(
                        active(&lab).len(),
                        1,
                        "the lease is the recipe's to release"
                    );
                }
                "Release hardware lease" => {
                    assert!(s.out.status.success(), "{}", show(&s.out));
                    assert!(lab.leases().is_empty(), "released: {:?}", lab.leases());
                }
                other => panic!("unexpected step {other}"),
            }
        });
        assert_eq!(steps.len(), 3, "every step ran (broken: {broken})");
    }
}

#[test]
fn the_gitlab_recipe_runs_unchanged_and_after_script_releases() {
    let bin = require!(venv_bin());
    let (lab, _jmpd) = widget_lab("ci-gitlab");
    let env = &lab.env;
    let _left = Leftovers { env };
    let ci = recipe("gitlab-ci.yml");
    let job = &ci["hardware-test"];
    for broken in [false, true] {
        let dir = checkout(env, broken);
        let (script, after) = run_gitlab_job(env, &bin, &dir, job);
        if broken {
            assert!(!script.status.success(), "the broken test fails the job");
            assert!(
                script.stdout.contains("1 failed, 2 passed"),
                "{}",
                script.stdout
            );
        } else {
            assert!(script.status.success(), "{}", show(&script));
            assert!(script.stdout.contains("2 passed"), "{}", script.stdout);
        }
        // after_script's shell has no LEASE_ID: `jmp delete lease` releases this job's lease.
        assert!(after.status.success(), "{}", show(&after));
        assert!(after.stdout.contains("deleted"), "{}", after.stdout);
        assert!(lab.leases().is_empty(), "released: {:?}", lab.leases());
        assert!(attachments(env).is_empty());
    }
}

#[test]
fn the_self_hosted_recipe_runs_the_board_on_the_runner() {
    let bin = require!(venv_bin());
    let env = TestEnv::new("ci-local");
    let _left = Leftovers { env: &env };
    let wf = recipe("self-hosted-hw-test.yml");
    for broken in [false, true] {
        let dir = checkout(&env, broken);
        let steps = run_github_job(&env, &bin, &dir, &wf, "hardware-test", |s| {
            match s.name.as_str() {
                "Start the board" => {
                    assert!(s.out.status.success(), "{}", show(&s.out));
                    let a = attachments(&env);
                    assert!(a.len() == 1 && a[0]["local"] == true, "{a:?}");
                }
                "Run tests" => {
                    assert_eq!(s.out.status.success(), !broken, "{}", show(&s.out));
                    assert!(s.out.stdout.contains("2 passed"), "{}", s.out.stdout);
                    assert_eq!(
                        attachments(&env).len(),
                        1,
                        "the board stays for the next step"
                    );
                }
                "Stop the board" => {
                    assert!(s.out.status.success(), "{}", show(&s.out));
                    assert!(attachments(&env).is_empty(), "{:?}", attachments(&env));
                }
                other => panic!("unexpected step {other}"),
            }
        });
        assert_eq!(steps.len(), 3);
    }
    // The one-step form: the board exists for the command only.
    let dir = checkout(&env, false);
    let steps = run_github_job(&env, &bin, &dir, &wf, "hardware-test-shell", |s| {
        assert!(s.out.status.success(), "{}", show(&s.out));
        assert!(s.out.stdout.contains("2 passed"), "{}", s.out.stdout);
    });
    assert_eq!(steps.len(), 1);
    assert!(attachments(&env).is_empty(), "{:?}", attachments(&env));
}
