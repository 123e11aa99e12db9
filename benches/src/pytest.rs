//! How long a pytest session takes from its start to its first test running, with the jmp
//! plugin getting the board, in the three modes (a lease from a controller, an exporter
//! reached directly, the board of `jmp local start`), against what the same takes by hand:
//! `jmp create lease` + `jmp attach -d` (lease), `jmp attach -d` (direct), `jmp status`
//! (local: the board is there, a script only looks up its devices).
//!
//! What the plugin adds = (pytest with the board → first test) − (pytest without the plugin
//! → first test) − (the same by hand). The target: under 100 ms. Rounds are interleaved.

use crate::jmp::{start_jmpd, workspace_dir, Bins};
use crate::proc::{Proc, TempDir};
use crate::stats::{cell, json, median, Target};
use anyhow::{bail, Context, Result};
use jmp_e2e::command;
use jmp_e2e::lab::Controller;
use jmp_e2e::Jmpd;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TARGET_MS: f64 = 100.0;

const FIRST_TEST: &str = r#"import os, time
from jmp_testing import JmpTest


class TestFirst(JmpTest):
    exporter_selector = "vendor=acme"

    def test_first(self):
        with open(os.environ["JMP_BENCH_STAMP"], "w") as f:
            f.write(str(time.time_ns()))
        assert self.client.serial is not None
"#;

const BARE_TEST: &str = r#"import os, time


def test_first():
    with open(os.environ["JMP_BENCH_STAMP"], "w") as f:
        f.write(str(time.time_ns()))
"#;

struct Env {
    dir: TempDir,
    bins_jmp: PathBuf,
    venv: PathBuf,
    admin: Option<PathBuf>,
}

impl Env {
    fn jmp(&self, args: &[&str]) -> Command {
        let mut c = command(&self.bins_jmp);
        c.args(args)
            .env("JMP_CONFIG_DIR", self.dir.join("config"))
            .env("JMP_RUNTIME_DIR", self.dir.join("runtime"))
            .env("JMP_DEV_DIR", self.dir.join("dev"))
            .env_remove("JMP_LEASE")
            .env_remove("JMP_JOB")
            .env_remove("JMP_TOKEN")
            .env_remove("JMP_TOKEN_FILE")
            .stdin(Stdio::null());
        if let Some(a) = &self.admin {
            c.env("JMP_ADMIN_CONFIG", a);
        }
        c
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self
            .jmp(args)
            .output()
            .with_context(|| format!("run jmp {args:?}"))?;
        if !o.status.success() {
            bail!(
                "jmp {args:?} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// ms from spawning `pytest ARGS` to its first test writing the stamp.
    fn pytest_first(&self, file: &str, args: &[&str]) -> Result<f64> {
        let stamp = self.dir.join("stamp");
        let _ = std::fs::remove_file(&stamp);
        let mut c = command(self.venv.join("pytest"));
        c.args(["-q", "-p", "no:cacheprovider"])
            .args(args)
            .arg(self.dir.join(file))
            .current_dir(self.dir.path())
            .env("JMP_BENCH_STAMP", &stamp)
            .env("JMP_BIN", &self.bins_jmp)
            .env("JMP_CONFIG_DIR", self.dir.join("config"))
            .env("JMP_RUNTIME_DIR", self.dir.join("runtime"))
            .env("JMP_DEV_DIR", self.dir.join("dev"))
            .env_remove("JMP_LEASE")
            .env_remove("JMP_JOB")
            .env_remove("JMP_EXPORTER")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null());
        let t0 = epoch_ns();
        let o = c.output().context("run pytest")?;
        if !o.status.success() {
            bail!(
                "pytest {file} failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let t1: u128 = std::fs::read_to_string(&stamp)
            .context("the first test wrote no stamp")?
            .trim()
            .parse()?;
        Ok((t1.saturating_sub(t0)) as f64 / 1e6)
    }
}

fn epoch_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A controller with one exporter (console, power) labelled vendor=acme, and a client config
/// made current.
fn lab(bins: &Bins, env: &mut Env) -> Result<(Proc, Proc)> {
    let data = env.dir.join("controller");
    let ctl = Controller::start(&bins.controller, env.dir.path(), &data, "127.0.0.1:0", &[])?;
    env.admin = Some(ctl.admin_file.clone());
    let token = env.ok(&["admin", "create", "exporter", "widget", "-l", "vendor=acme"])?;
    let token_file = env.dir.join("exporter.token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    let cfg = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: widget}}\n\
         listen: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  \
         console: {{type: sim-console}}\n  power: {{type: power-sim}}\n",
        env.dir.join("state-widget").display(),
        token_file.display()
    );
    let cfg_file = env.dir.join("widget.yaml");
    std::fs::write(&cfg_file, cfg)?;
    let mut cmd = command(&bins.jmpd);
    cmd.arg("--config").arg(&cfg_file);
    let jmpd = Jmpd::start(cmd, env.dir.path())?;
    let client = env.dir.join("client.yaml");
    let client_s = client.display().to_string();
    env.ok(&["admin", "create", "client", "bench-py", "--out", &client_s])?;
    env.ok(&[
        "config", "client", "create", "bench-py", "--from", &client_s,
    ])?;
    // Registered once a lease can be granted.
    let t = Instant::now();
    loop {
        match env.ok(&["create", "lease", "-l", "vendor=acme", "--duration", "1m"]) {
            Ok(l) => {
                env.ok(&["delete", "lease", &l])?;
                break;
            }
            Err(e) if t.elapsed() > Duration::from_secs(20) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok((ctl.proc, jmpd.proc))
}

pub fn run(bins: &Bins, rounds: usize) -> Result<(String, Value)> {
    let venv = workspace_dir().join("target/pyenv/bin");
    if !venv.join("pytest").exists() {
        bail!("SKIP: no test venv with pytest (run scripts/install-test-deps.sh)");
    }
    let mut env = Env {
        dir: TempDir::new("pytest"),
        bins_jmp: bins.jmp.clone(),
        venv,
        admin: None,
    };
    for d in ["config", "runtime", "dev"] {
        std::fs::create_dir_all(env.dir.join(d))?;
    }
    std::fs::write(env.dir.join("test_first.py"), FIRST_TEST)?;
    std::fs::write(env.dir.join("test_bare.py"), BARE_TEST)?;
    let (_ctl, _jmpd) = lab(bins, &mut env)?;
    let direct_dir = TempDir::new("pytest-direct");
    let direct = start_jmpd(
        bins,
        &direct_dir,
        &[
            ("console", "{type: sim-console}".to_string()),
            ("power", "{type: power-sim}".to_string()),
        ],
    )?;
    let token_file = direct.token_file.display().to_string();
    let direct_args = [
        format!("--jmp-exporter={}", direct.addr),
        format!("--jmp-token-file={token_file}"),
        format!("--jmp-fingerprint={}", direct.fingerprint),
    ];
    let direct_args: Vec<&str> = direct_args.iter().map(String::as_str).collect();

    let (mut bare, mut hand_lease, mut py_lease, mut hand_direct, mut py_direct) =
        (vec![], vec![], vec![], vec![], vec![]);
    // One warm-up round (page cache, Python bytecode).
    for r in 0..=rounds {
        let keep = r > 0;
        let b = env.pytest_first("test_bare.py", &["-p", "no:jmp"])?;
        // By hand: lease, attach; then give both back (untimed).
        let t = Instant::now();
        let lease: Value = serde_json::from_str(&env.ok(&[
            "create",
            "lease",
            "-l",
            "vendor=acme",
            "--wait",
            "30",
            "-o",
            "json",
        ])?)?;
        let name = lease["name"].as_str().unwrap_or_default().to_string();
        env.ok(&["attach", "--lease", &name, "-d", "-o", "json"])?;
        let hl = ms(t.elapsed());
        env.ok(&["detach", "widget"])?;
        env.ok(&["delete", "lease", &name])?;
        let pl = env.pytest_first("test_first.py", &[])?;
        let t = Instant::now();
        let mut a = vec!["attach", "--exporter", &direct.addr, "--token-file"];
        a.extend([token_file.as_str(), "--fingerprint", &direct.fingerprint]);
        a.extend(["-d", "-o", "json"]);
        env.ok(&a)?;
        let hd = ms(t.elapsed());
        env.ok(&["detach", "bench"])?;
        let pd = env.pytest_first("test_first.py", &direct_args)?;
        if keep {
            bare.push(b);
            hand_lease.push(hl);
            py_lease.push(pl);
            hand_direct.push(hd);
            py_direct.push(pd);
        }
    }
    // Local mode: the board of `jmp local start` (no lease: the plugin would take the local
    // board first, so this phase comes last).
    env.ok(&["local", "start", "-o", "json"])?;
    let (mut bare_l, mut hand_local, mut py_local) = (vec![], vec![], vec![]);
    let res = (|| -> Result<()> {
        for r in 0..=rounds {
            let b = env.pytest_first("test_bare.py", &["-p", "no:jmp"])?;
            let t = Instant::now();
            env.ok(&["status", "-o", "json"])?;
            let hl = ms(t.elapsed());
            let pl = env.pytest_first("test_first.py", &[])?;
            if r > 0 {
                bare_l.push(b);
                hand_local.push(hl);
                py_local.push(pl);
            }
        }
        Ok(())
    })();
    env.ok(&["local", "stop"])?;
    res?;
    drop(direct);

    let rows = [
        ("lease (controller)", &bare, &hand_lease, &py_lease),
        ("direct", &bare, &hand_direct, &py_direct),
        ("local", &bare_l, &hand_local, &py_local),
    ];
    let mut md = String::from(
        "### pytest: session start to the first test, with the board\n\n\
         | mode | pytest alone (ms) | by hand: jmp (ms) | pytest + plugin + board (ms) | plugin adds (ms) | target | verdict |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut js = serde_json::Map::new();
    for (mode, b, h, p) in rows {
        let (mb, mh, mp) = (median(b), median(h), median(p));
        let added = mp - mb - mh;
        let t = Target::AtMost(TARGET_MS);
        md.push_str(&format!(
            "| {mode} | {} | {} | {} | {} | {} ms | {} |\n",
            cell(mb, 1),
            cell(mh, 1),
            cell(mp, 1),
            cell(added, 1),
            t.describe(),
            t.verdict(added)
        ));
        js.insert(
            mode.into(),
            serde_json::json!({
                "pytest_alone_ms": json(mb),
                "by_hand_ms": json(mh),
                "pytest_with_board_ms": json(mp),
                "plugin_adds_ms": json(added),
                "samples": { "bare": b, "by_hand": h, "pytest": p },
            }),
        );
    }
    md.push_str(&format!(
        "\n{rounds} interleaved rounds after one warm-up; by hand is `jmp create lease --wait` + \
         `jmp attach -d` (lease), `jmp attach -d` (direct), `jmp status -o json` (local).\n"
    ));
    Ok((md, Value::Object(js)))
}
