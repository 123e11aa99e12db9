//! Child processes that are always cleaned up (by PID, on drop, even when a benchmark fails), a
//! temporary directory removed on drop, and small helpers to wait for a process to be ready.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A spawned child. Dropping it sends SIGTERM to its PID, waits up to 3 s, then SIGKILLs it.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Option<mpsc::Receiver<String>>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stderr (and stdout unless `capture_stdout`) going to `log`. With
    /// `capture_stdout`, stdout lines are available through [`Proc::line`].
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path, capture_stdout: bool) -> Result<Proc> {
        let err = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let out: Stdio = if capture_stdout {
            Stdio::piped()
        } else {
            err.try_clone()?.into()
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn {name} ({cmd:?})"))?;
        let lines = if capture_stdout {
            let stdout = child.stdout.take().expect("piped");
            let (tx, rx) = mpsc::channel();
            // Keeps draining stdout for the child's whole life so it never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
            Some(rx)
        } else {
            None
        };
        Ok(Proc {
            name: name.to_string(),
            child,
            lines,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, waiting at most `timeout`.
    pub fn line(&mut self, timeout: Duration) -> Result<String> {
        let got = self
            .lines
            .as_ref()
            .ok_or_else(|| anyhow!("{}: stdout not captured", self.name))?
            .recv_timeout(timeout);
        match got {
            Ok(l) => Ok(l),
            Err(_) => {
                let alive = self.alive();
                bail!(
                    "{} printed no ready line within {timeout:?} (alive: {alive}); its log:\n{}",
                    self.name,
                    self.log_tail()
                )
            }
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, a grace period, then SIGKILL; always reaps the child.
    pub fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A directory under /tmp, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("jmp-bench-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // JMP_BENCH_KEEP=1 keeps configs and logs for a look afterwards.
        if std::env::var_os("JMP_BENCH_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A currently free TCP port on 127.0.0.1.
/// The word after `key` in a program's ready line ("listening on ADDR fingerprint FP").
pub fn word_after(line: &str, key: &str, what: &str) -> Result<String> {
    let mut words = line.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == key)
        .and(words.next())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("unexpected {what} ready line: {line}"))
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether some socket listens on TCP `port` (read from /proc/net/tcp{,6}, so that waiting for a
/// listener never makes a connection the listener would see).
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let v: Vec<&str> = l.split_whitespace().collect();
                v.len() > 3 && v[1].ends_with(&want) && v[3] == "0A"
            })
    })
}

/// Waits until `port` listens, or fails (with `proc`'s log) after `timeout`.
pub fn wait_listening(port: u16, proc: &mut Proc, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if listening(port) {
            return Ok(());
        }
        if !proc.alive() {
            bail!("{} exited; its log:\n{}", proc.name, proc.log_tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "{} does not listen on port {port} after {timeout:?}; its log:\n{}",
        proc.name,
        proc.log_tail()
    )
}

/// Waits until `path` exists.
pub fn wait_path(path: &Path, proc: &mut Proc, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return Ok(());
        }
        if !proc.alive() {
            bail!("{} exited; its log:\n{}", proc.name, proc.log_tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} did not create {}", proc.name, path.display())
}

/// The full path of `tool` on PATH (or given as an absolute path), if it exists.
pub fn which(tool: &str) -> Option<PathBuf> {
    if tool.starts_with('/') {
        let p = PathBuf::from(tool);
        return p.exists().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// Resident memory of `pid` in KiB (VmRSS) and its peak (VmHWM).
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let l = s
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow!("no {name} for pid {pid}"))?;
        Ok(l.split_whitespace().nth(1).unwrap_or("0").parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
