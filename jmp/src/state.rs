//! Attachments running in the background: how they are started (`-d`, `jmp local start`),
//! found (`jmp serial`, `jmp detach`, `jmp status`) and stopped.
//!
//! Every running attachment writes `<runtime dir>/attach-<exporter>.json` (its Ready line, pid,
//! control socket) and listens on `attach-<exporter>.sock` ([`crate::ctlsock`]); both are
//! removed when it ends. A file whose pid is gone is stale and ignored (and removed).

use crate::attach::{Live, Ready, Shared};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Set in the environment of a background child: run in the foreground, report Ready as one
/// JSON line on stdout (the pipe to the parent), then let go of stdout.
pub const CHILD_ENV: &str = "JMP_BACKGROUND_CHILD";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub ready: Ready,
    pub socket: PathBuf,
    pub log: Option<PathBuf>,
    /// Local mode: the config it runs (none: the built-in simulated board).
    #[serde(default)]
    pub config: Option<PathBuf>,
}

/// Local mode's own state file and the config it runs.
#[derive(Debug, Clone)]
pub struct LocalState {
    pub file: PathBuf,
    pub config: Option<PathBuf>,
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

/// Every running attachment, by exporter name.
pub fn all() -> Vec<StateFile> {
    all_states()
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
        shared: Arc<Shared>,
        local: Option<LocalState>,
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
            ready: r.clone(),
            socket: sock_path.clone(),
            log: std::env::var_os("JMP_LOG_FILE").map(PathBuf::from),
            config: local.as_ref().and_then(|l| l.config.clone()),
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?;
        let mut files = vec![sock_path];
        for p in std::iter::once(json_path).chain(local.map(|l| l.file)) {
            std::fs::write(&p, &text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
            files.push(p);
        }
        let server = tokio::spawn(crate::ctlsock::serve(listener, shared));
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
    let ready: Ready = serde_json::from_str(line.trim())
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

pub fn local_running() -> Option<StateFile> {
    read_state(&local_file())
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

/// The attachment's live state from its control socket, or, if it does not answer, what its
/// state file says (link unknown).
pub fn live(st: &StateFile) -> Live {
    let req = crate::ctlsock::Request {
        v: crate::ctlsock::VERSION,
        op: crate::ctlsock::Op::Status,
    };
    match crate::ctlsock::call(&st.socket, &req, Duration::from_secs(2)) {
        Ok(crate::ctlsock::Reply {
            body: crate::ctlsock::ReplyBody::Status(l),
            ..
        }) => l,
        _ => Live {
            ready: st.ready.clone(),
            link: "unknown".into(),
            since: 0,
            log: st.log.clone(),
        },
    }
}

pub fn status(json: bool) -> Result<()> {
    let all: Vec<Live> = all_states().iter().map(live).collect();
    let mut out = String::new();
    if json {
        out = serde_json::to_string(&all)? + "\n";
    } else if all.is_empty() {
        out.push_str("no attachment is running\n");
    } else {
        for l in &all {
            let r = &l.ready;
            out.push_str(&format!(
                "{} (pid {}, link {}{}, {})\n",
                jmp_protocol::name::escape(&r.exporter),
                r.pid,
                l.link,
                r.lease
                    .as_deref()
                    .map(|x| format!(", lease {x}"))
                    .unwrap_or_default(),
                r.fingerprint
            ));
            for line in r.table().lines() {
                out.push_str(&format!("  {line}\n"));
            }
            if let Some(log) = &l.log {
                out.push_str(&format!("  log: {}\n", log.display()));
            }
        }
    }
    crate::print_out(&out)
}
