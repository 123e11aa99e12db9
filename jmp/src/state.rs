//! Attachments running in the background: how they are started (`-d`, `jmp local start`),
//! found (`jmp serial`, `jmp detach`, `jmp status`) and stopped.
//!
//! Every running attachment writes `<runtime dir>/attach-<exporter>.json` (its Ready line, pid,
//! control socket) and listens on `attach-<exporter>.sock`; both are removed when it ends. A
//! file whose pid is gone is stale and ignored (and removed).

use crate::attach::{ControlRequest, Ready};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// Set in the environment of a background child: run in the foreground, report Ready as one
/// JSON line on stdout (the pipe to the parent), then let go of stdout.
pub const CHILD_ENV: &str = "JMP_BACKGROUND_CHILD";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub ready: ReadyOwned,
    pub socket: PathBuf,
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadyOwned {
    pub exporter: String,
    pub fingerprint: String,
    pub pid: u32,
    pub devices: Vec<Row>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub kind: String,
    pub local: String,
}

impl ReadyOwned {
    pub fn table(&self) -> String {
        Ready {
            exporter: self.exporter.clone(),
            fingerprint: self.fingerprint.clone(),
            pid: self.pid,
            devices: self
                .devices
                .iter()
                .map(|r| crate::attach::DeviceRow {
                    name: r.name.clone(),
                    kind: r.kind.clone(),
                    local: r.local.clone(),
                })
                .collect(),
        }
        .table()
    }
}

fn dir() -> PathBuf {
    crate::paths::runtime_dir()
}

pub fn local_file() -> PathBuf {
    dir().join("local.json")
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes: its devices are gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

fn read_state(path: &Path) -> Option<StateFile> {
    let text = std::fs::read_to_string(path).ok()?;
    let st: StateFile = serde_json::from_str(&text).ok()?;
    if alive(st.ready.pid) {
        Some(st)
    } else {
        let _ = std::fs::remove_file(path);
        None
    }
}

fn all_states() -> Vec<StateFile> {
    let Ok(rd) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut out: Vec<StateFile> = rd
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("attach-") && n.ends_with(".json")
        })
        .filter_map(|e| read_state(&e.path()))
        .collect();
    out.sort_by(|a, b| a.ready.exporter.cmp(&b.ready.exporter));
    out
}

/// The attachment of `exporter`, or the only one.
pub fn find(exporter: Option<&str>) -> Result<StateFile> {
    let all = all_states();
    match exporter {
        Some(name) => all
            .into_iter()
            .find(|s| s.ready.exporter == name)
            .ok_or_else(|| anyhow!("no attachment of exporter {name:?} is running")),
        None => match all.len() {
            0 => bail!("no attachment is running"),
            1 => Ok(all.into_iter().next().expect("one element")),
            _ => bail!(
                "several attachments are running ({}); name one with --exporter",
                all.iter()
                    .map(|s| s.ready.exporter.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// Owns an attachment's state file and control socket; removes both on drop.
pub struct StateGuard {
    files: Vec<PathBuf>,
    server: tokio::task::JoinHandle<()>,
}

impl StateGuard {
    pub fn create(
        r: &Ready,
        controls: mpsc::Sender<ControlRequest>,
        local: Option<PathBuf>,
    ) -> Result<StateGuard, String> {
        let d = dir();
        std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        let json_path = d.join(format!("attach-{}.json", r.exporter));
        let sock_path = d.join(format!("attach-{}.sock", r.exporter));
        if let Some(other) = read_state(&json_path) {
            if other.ready.pid != std::process::id() {
                return Err(format!(
                    "exporter {} is already attached on this machine (pid {}); `jmp detach {}` first",
                    r.exporter, other.ready.pid, r.exporter
                ));
            }
        }
        let _ = std::fs::remove_file(&sock_path);
        let listener = tokio::net::UnixListener::bind(&sock_path)
            .map_err(|e| format!("cannot create control socket {}: {e}", sock_path.display()))?;
        let state = StateFile {
            ready: ReadyOwned {
                exporter: r.exporter.clone(),
                fingerprint: r.fingerprint.clone(),
                pid: r.pid,
                devices: r
                    .devices
                    .iter()
                    .map(|d| Row {
                        name: d.name.clone(),
                        kind: d.kind.clone(),
                        local: d.local.clone(),
                    })
                    .collect(),
            },
            socket: sock_path.clone(),
            log: std::env::var_os("JMP_LOG_FILE").map(PathBuf::from),
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?;
        let mut files = vec![sock_path];
        for p in std::iter::once(json_path).chain(local) {
            std::fs::write(&p, &text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
            files.push(p);
        }
        let server = tokio::spawn(serve_controls(listener, controls));
        Ok(StateGuard { files, server })
    }
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        self.server.abort();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

async fn serve_controls(
    listener: tokio::net::UnixListener,
    controls: mpsc::Sender<ControlRequest>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    while let Ok((stream, _)) = listener.accept().await {
        let controls = controls.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<serde_json::Value>(&line)
                .map_err(|e| format!("bad request: {e}"))
                .and_then(|v| crate::parse_request(&v))
            {
                Err(e) => Err(e),
                Ok((device, op)) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if controls
                        .send(ControlRequest {
                            device,
                            op,
                            reply: tx,
                        })
                        .await
                        .is_err()
                    {
                        Err("the attachment is ending".to_string())
                    } else {
                        rx.await
                            .unwrap_or_else(|_| Err("the attachment is ending".into()))
                    }
                }
            };
            let v = match reply {
                Ok(m) => serde_json::json!({ "ok": m }),
                Err(e) => serde_json::json!({ "error": e }),
            };
            let _ = w.write_all(format!("{v}\n").as_bytes()).await;
        });
    }
}

/// In a background child: stdout was the pipe to the parent, who has read the Ready line and
/// left; anything printed later must not die with SIGPIPE.
pub fn after_ready() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto stdout of descriptors we own.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

/// Re-runs this command as a background child (`attach -d` → `attach`, `local start` →
/// `local run`), waits for its Ready line, prints it, returns. The child logs to a file in the
/// runtime dir.
pub fn spawn_background(json: bool) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the jmp executable")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(pos) = args.iter().position(|a| a == "start") {
        if args.first().is_some_and(|a| a == "local") {
            args[pos] = "run".into();
        }
    }
    let d = dir();
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    let log_path = d.join(format!("jmp-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .env(CHILD_ENV, "1")
        .env("JMP_LOG_FILE", &log_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log.try_clone()?);
    // Its own session: a Ctrl-C in the shell that started it must not reach it.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .context("cannot start the background attachment")?;
    let stdout = child.stdout.take().context("no pipe to the child")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim().is_empty() {
        let status = child.wait()?;
        let mut tail = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(4000)));
            let _ = f.read_to_string(&mut tail);
        }
        eprint!("{tail}");
        let code = status.code().unwrap_or(1);
        return Err(crate::Exit {
            code,
            message: format!(
                "the background attachment failed (log: {})",
                log_path.display()
            ),
        }
        .into());
    }
    let ready: ReadyOwned = serde_json::from_str(line.trim())
        .context("bad ready line from the background attachment")?;
    if json {
        print!("{}", line);
    } else {
        print!("{}", ready.table());
    }
    Ok(())
}

fn stop_pid(pid: u32, what: &str) -> Result<()> {
    let p = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("cannot signal {what} (pid {pid})"))?;
    for _ in 0..200 {
        if !alive(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    warn!("{what} (pid {pid}) did not stop within 10 s; killing it");
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    Ok(())
}

pub fn detach(exporter: Option<&str>, all: bool) -> Result<()> {
    let targets = if all {
        all_states()
    } else {
        vec![find(exporter)?]
    };
    if targets.is_empty() {
        println!("no attachment is running");
    }
    for st in targets {
        stop_pid(
            st.ready.pid,
            &format!("the attachment of {}", st.ready.exporter),
        )?;
        println!("detached {}", st.ready.exporter);
    }
    Ok(())
}

pub fn local_running() -> Result<Option<ReadyOwned>> {
    Ok(read_state(&local_file()).map(|s| s.ready))
}

pub fn local_stop() -> Result<()> {
    match read_state(&local_file()) {
        None => {
            println!("no local exporter is running");
            Ok(())
        }
        Some(st) => {
            stop_pid(st.ready.pid, "the local exporter")?;
            let _ = std::fs::remove_file(local_file());
            println!("stopped local exporter {}", st.ready.exporter);
            Ok(())
        }
    }
}

pub fn status(json: bool) -> Result<()> {
    let all = all_states();
    if json {
        let list: Vec<&ReadyOwned> = all.iter().map(|s| &s.ready).collect();
        println!("{}", serde_json::to_string(&list)?);
    } else if all.is_empty() {
        println!("no attachment is running");
    } else {
        for s in all {
            println!(
                "{} (pid {}, {})",
                s.ready.exporter, s.ready.pid, s.ready.fingerprint
            );
            for line in s.ready.table().lines() {
                println!("  {line}");
            }
        }
    }
    Ok(())
}
