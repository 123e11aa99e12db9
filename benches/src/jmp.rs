//! Starting the real `jmpd` and `jmp attach` binaries (release builds) for a benchmark, with the
//! e2e harness's starters (`jmp_e2e`: the same config, ready lines and process guards).

use crate::proc::{Proc, TempDir};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::{attach_args, exporter_yaml, Jmpd};
use std::path::PathBuf;
use std::process::Command;

/// The workspace root (benches/..).
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches has a parent")
        .to_path_buf()
}

pub struct Bins {
    pub jmpd: PathBuf,
    pub jmp: PathBuf,
    /// Checked by the controller benchmark only (older `--bin-dir`s may lack it).
    pub controller: PathBuf,
}

/// Builds the workspace's release binaries (unless `build` is false) and locates them in
/// `<workspace>/target/release`, or in `bin_dir` when given (then nothing is built).
pub fn bins(build: bool, bin_dir: Option<PathBuf>) -> Result<Bins> {
    let ws = workspace_dir();
    if build && bin_dir.is_none() {
        eprintln!("building: cargo build --release --workspace --bins");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--release", "--workspace", "--bins"])
            .current_dir(&ws)
            .status()
            .context("run cargo build")?;
        if !st.success() {
            bail!("cargo build --release --workspace --bins failed");
        }
    }
    // Absolute: the pytest benchmark hands `jmp`'s path to programs running elsewhere.
    let dir = std::path::absolute(bin_dir.unwrap_or_else(|| ws.join("target/release")))?;
    let b = Bins {
        jmpd: dir.join("jmpd"),
        jmp: dir.join("jmp"),
        controller: dir.join("jmp-controller"),
    };
    for p in [&b.jmpd, &b.jmp] {
        if !p.exists() {
            bail!(
                "{} is missing: run `cargo build --release --workspace --bins`",
                p.display()
            );
        }
    }
    Ok(b)
}

/// A `jmpd` exporting in direct mode, and the token file its clients use.
pub struct Exporter {
    pub jmpd: Jmpd,
    /// `jmpd.addr` as the command lines take it.
    pub addr: String,
    pub token_file: PathBuf,
}

impl std::ops::Deref for Exporter {
    type Target = Jmpd;
    fn deref(&self) -> &Jmpd {
        &self.jmpd
    }
}

/// Starts `jmpd` exporting `devices` (`name`, YAML flow mapping) as exporter "bench" on
/// 127.0.0.1 and waits for its ready line.
pub fn start_jmpd(bins: &Bins, dir: &TempDir, devices: &[(&str, String)]) -> Result<Exporter> {
    start_jmpd_with(bins, dir, devices, "")
}

/// [`start_jmpd`] with `extra` top-level config lines (e.g. `metrics: 127.0.0.1:PORT\n`).
pub fn start_jmpd_with(
    bins: &Bins,
    dir: &TempDir,
    devices: &[(&str, String)],
    extra: &str,
) -> Result<Exporter> {
    let token_file = dir.join("token");
    std::fs::write(&token_file, "bench-token\n")?;
    let export: String = devices
        .iter()
        .map(|(name, spec)| format!("{name}: {spec}\n"))
        .collect();
    let cfg = exporter_yaml(
        "bench",
        "127.0.0.1:0",
        &dir.join("state"),
        &token_file,
        &export,
    );
    let cfg_file = dir.join("exporter.yaml");
    std::fs::write(&cfg_file, format!("{cfg}{extra}"))?;
    let mut cmd = Command::new(&bins.jmpd);
    cmd.arg("--config").arg(&cfg_file);
    let jmpd = Jmpd::start(cmd, dir.path())?;
    Ok(Exporter {
        addr: jmpd.addr.to_string(),
        jmpd,
        token_file,
    })
}

pub struct Attach {
    pub proc: Proc,
    pub ready: serde_json::Value,
}

impl Attach {
    /// The local endpoint (pty path or 127.0.0.1:PORT) of device `name`.
    pub fn local(&self, name: &str) -> Result<String> {
        self.ready["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == name))
            .and_then(|d| d["local"].as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("jmp attach reported no device {name}: {}", self.ready))
    }
}

/// Starts `jmp attach` against `exp` with `extra` options and waits for its JSON ready line.
pub fn start_attach(bins: &Bins, dir: &TempDir, exp: &Exporter, extra: &[&str]) -> Result<Attach> {
    let cmd = attach_command(bins, dir, exp, extra)?;
    let (proc, ready) = jmp_e2e::start_attach(cmd, dir.path())?;
    Ok(Attach { proc, ready })
}

/// The `jmp attach` command [`start_attach`] runs (its devices, runtime and config under `dir`).
pub fn attach_command(
    bins: &Bins,
    dir: &TempDir,
    exp: &Exporter,
    extra: &[&str],
) -> Result<Command> {
    let dev_dir = dir.join("dev");
    let runtime = dir.join("runtime");
    let config = dir.join("config");
    for d in [&dev_dir, &runtime, &config] {
        std::fs::create_dir_all(d)?;
    }
    let mut cmd = Command::new(&bins.jmp);
    attach_args(
        &mut cmd,
        &exp.addr,
        &exp.token_file,
        &exp.fingerprint,
        &dev_dir,
    )
    .args(extra)
    .env("JMP_RUNTIME_DIR", &runtime)
    .env("JMP_CONFIG_DIR", &config);
    Ok(cmd)
}
