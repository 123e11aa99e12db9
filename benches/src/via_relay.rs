//! A jmp path through the controller's relay, for the serial and TCP benchmarks: a release
//! `jmp-controller`, a controller-mode `jmpd` with `controller: {relay: true}` exporting the
//! given devices, a lease, and `jmp attach --via relay` (on loopback nothing blocks the direct
//! path, so the relay is chosen explicitly). Everything listens on 127.0.0.1.

use crate::jmp::{Attach, Bins};
use crate::proc::{command, Proc, TempDir};
use anyhow::{bail, Context, Result};
use jmp_e2e::lab::Controller;
use jmp_e2e::{start_attach, Jmpd};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Everything behind one relayed attachment; dropped attach-first.
pub struct Relayed {
    pub attach: Attach,
    pub procs: Vec<Proc>,
}

fn jmp(bins: &Bins, dir: &TempDir, admin: &PathBuf) -> Command {
    let mut c = command(&bins.jmp);
    c.env("JMP_RUNTIME_DIR", dir.join("runtime"))
        .env("JMP_CONFIG_DIR", dir.join("config"))
        .env("JMP_ADMIN_CONFIG", admin)
        .env("JMP_CLIENT", "bench")
        .env_remove("JMP_LOG");
    c
}

fn ok(what: &str, mut c: Command) -> Result<String> {
    let out = c.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the controller, jmpd (exporting `devices`, YAML flow mappings) and a relayed
/// attachment.
pub fn start(bins: &Bins, dir: &TempDir, devices: &[(&str, String)]) -> Result<Relayed> {
    if !bins.controller.exists() {
        bail!("{} is missing", bins.controller.display());
    }
    for d in ["runtime", "config", "dev", "controller"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let ctl = Controller::start(
        &bins.controller,
        dir.path(),
        &dir.join("controller"),
        "127.0.0.1:0",
        &[],
    )?;
    let admin = ctl.admin_file.clone();
    let token = ok("jmp admin create exporter", {
        let mut c = jmp(bins, dir, &admin);
        c.args(["admin", "create", "exporter", "bench", "-l", "board=bench"]);
        c
    })?;
    let token_file = dir.join("exporter.token");
    std::fs::write(&token_file, token.trim())?;
    let client_file = dir.join("client.yaml");
    let mut c = jmp(bins, dir, &admin);
    c.args(["admin", "create", "client", "bench", "--out"])
        .arg(&client_file);
    ok("jmp admin create client", c)?;
    let mut c = jmp(bins, dir, &admin);
    c.args(["config", "client", "create", "bench", "--from"])
        .arg(&client_file);
    ok("jmp config client create", c)?;
    let mut cfg = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: bench}}\n\
         listen: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}, relay: true}}\nexport:\n",
        dir.join("state").display(),
        token_file.display()
    );
    for (name, spec) in devices {
        cfg.push_str(&format!("  {name}: {spec}\n"));
    }
    let cfg_file = dir.join("exporter.yaml");
    std::fs::write(&cfg_file, cfg)?;
    let mut cmd = command(&bins.jmpd);
    cmd.arg("--config").arg(&cfg_file).env("JMP_LOG", "info");
    let exp = Jmpd::start(cmd, dir.path())?.proc;
    // Registered once a lease can be granted: retry the lease until then.
    let mut granted = None;
    for _ in 0..100 {
        let mut c = jmp(bins, dir, &admin);
        c.args(["create", "lease", "-l", "board=bench", "--duration", "2h"]);
        if let Ok(out) = ok("jmp create lease", c) {
            granted = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if granted.is_none() {
        bail!(
            "no lease on the relayed exporter; jmpd's log:\n{}",
            exp.log_tail(20)
        );
    }
    let mut cmd = jmp(bins, dir, &admin);
    cmd.args(["attach", "--via", "relay", "-o", "json", "--dev-dir"])
        .arg(dir.join("dev"));
    let (att, ready) = start_attach(cmd, dir.path())?;
    let log = att.stderr();
    if !log.contains("through the controller's relay") {
        bail!("jmp attach did not go through the relay: {log}");
    }
    Ok(Relayed {
        attach: Attach { proc: att, ready },
        procs: vec![exp, ctl.proc],
    })
}
