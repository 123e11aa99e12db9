//! Starting the real `jmpd` and `jmp attach` binaries (release builds) for a benchmark.

use crate::proc::{Proc, TempDir};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

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
    let dir = bin_dir.unwrap_or_else(|| ws.join("target/release"));
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

pub struct Exporter {
    pub proc: Proc,
    pub addr: String,
    pub fingerprint: String,
    pub token_file: PathBuf,
}

/// Starts `jmpd` exporting `devices` (`name`, YAML flow mapping) as exporter "bench" on
/// 127.0.0.1 and waits for its ready line.
pub fn start_jmpd(bins: &Bins, dir: &TempDir, devices: &[(&str, String)]) -> Result<Exporter> {
    let token_file = dir.join("token");
    std::fs::write(&token_file, "bench-token\n")?;
    let mut cfg = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: bench}}\n\
         listen: 127.0.0.1:0\nstateDir: {}\nauth: {{tokenFile: {}}}\nexport:\n",
        dir.join("state").display(),
        token_file.display()
    );
    for (name, spec) in devices {
        cfg.push_str(&format!("  {name}: {spec}\n"));
    }
    let cfg_file = dir.join("exporter.yaml");
    std::fs::write(&cfg_file, cfg)?;
    let mut proc = Proc::spawn(
        "jmpd",
        Command::new(&bins.jmpd).arg("--config").arg(&cfg_file),
        &dir.join("jmpd.log"),
        true,
    )?;
    let line = proc.line(Duration::from_secs(20))?;
    // "jmpd: exporter NAME listening on ADDR fingerprint sha256:HEX"
    let after = |w: &str| crate::proc::word_after(&line, w, "jmpd");
    Ok(Exporter {
        addr: after("on")?,
        fingerprint: after("fingerprint")?,
        proc,
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

/// Starts `jmp attach` against `exp` and waits for its JSON ready line.
pub fn start_attach(bins: &Bins, dir: &TempDir, exp: &Exporter) -> Result<Attach> {
    let dev_dir = dir.join("dev");
    let runtime = dir.join("runtime");
    let config = dir.join("config");
    for d in [&dev_dir, &runtime, &config] {
        std::fs::create_dir_all(d)?;
    }
    let mut proc = Proc::spawn(
        "jmp attach",
        Command::new(&bins.jmp)
            .arg("attach")
            .args(["--exporter", &exp.addr])
            .arg("--token-file")
            .arg(&exp.token_file)
            .args(["--fingerprint", &exp.fingerprint])
            .arg("--dev-dir")
            .arg(&dev_dir)
            .args(["-o", "json"])
            .env("JMP_RUNTIME_DIR", &runtime)
            .env("JMP_CONFIG_DIR", &config),
        &dir.join("attach.log"),
        true,
    )?;
    let line = proc.line(Duration::from_secs(20))?;
    let ready: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("jmp attach ready line is not JSON: {line}"))?;
    Ok(Attach { proc, ready })
}
