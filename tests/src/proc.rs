//! Child processes for tests and benchmarks: started as a terminal would start them, killed and
//! reaped by PID when dropped (even when the test panics), their output kept for the failure
//! message.
//!
//! Started as a terminal would: whoever launched the test binary (a terminal, `nohup`, a CI
//! runner, a background job of a non-interactive shell, which inherits SIGINT and SIGQUIT
//! ignored) must not change what a program under test sees. Every child gets the default
//! disposition of every signal, an empty signal mask and its own process group ([`as_terminal`]),
//! so a test that interrupts a program (SIGINT to it, or to its group as Ctrl-C does) means the
//! same thing everywhere.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::borrow::BorrowMut;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// What went wrong starting or waiting for a child; the message carries the child's output.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

/// Makes `cmd` start as a terminal would start it: every signal's disposition back to the
/// default (an ignored SIGINT or SIGQUIT survives `exec`, so a launcher that ignores them would
/// otherwise hand that on), an empty signal mask, and a process group of its own (as a shell
/// with job control gives each job: the test can signal the program and whatever it started, as
/// Ctrl-C does, and nothing the program does to its group reaches the test).
pub fn as_terminal(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (sigaction, sigprocmask, setpgid) on stack data.
    unsafe {
        cmd.pre_exec(|| {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut dfl.sa_mask);
            // The standard signals (1..=31); SIGKILL and SIGSTOP cannot be changed. The
            // real-time signals are left alone: glibc reserves the first ones for itself.
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::sigaction(sig, &dfl, std::ptr::null_mut());
                }
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// `Command::new(program)` started as a terminal would ([`as_terminal`]), with stdin from
/// /dev/null (a child in its own process group that read the test's terminal would be stopped
/// by SIGTTIN). Everything the harness runs starts through here or through [`Proc`].
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    as_terminal(&mut c).stdin(Stdio::null());
    c
}

/// The full path of `tool` (a name looked up on PATH, or an absolute path) if it is an
/// executable file.
pub fn which(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return runnable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| runnable(p))
}

/// Where a child's stdout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    /// Read line by line ([`Proc::line`], [`Proc::expect_line`]) and kept for failure messages.
    Lines,
    /// Into the log file with stderr (a program whose output nobody waits for, or too much of
    /// it to keep in memory).
    Log,
}

/// How [`Proc::start`] starts a child.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub stdout: Stdout,
    /// A pipe to the child's stdin ([`Proc::send_line`]) instead of /dev/null.
    pub stdin: bool,
}

impl Options {
    /// Stdout read line by line, stdin from /dev/null.
    pub const LINES: Options = Options {
        stdout: Stdout::Lines,
        stdin: false,
    };
    /// Stdout into the log, stdin from /dev/null.
    pub const LOG: Options = Options {
        stdout: Stdout::Log,
        stdin: false,
    };
}

impl Default for Options {
    fn default() -> Options {
        Options::LINES
    }
}

/// A spawned child: stdout lines arrive on a channel (read by a thread), stderr goes to a file
/// in the log directory. Dropping it sends SIGTERM to its PID, waits up to 3 s, then SIGKILLs
/// its process group (the child and anything it started that stayed in it), and reaps it.
pub struct Proc {
    pub label: String,
    child: Child,
    lines: Receiver<String>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    /// Every stdout line read so far (for error messages).
    seen: Vec<String>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with its stdout read line by line, stdin from /dev/null, stderr to
    /// `<log_dir>/<label>-….log`. Panics if it cannot be started.
    pub fn spawn(label: &str, cmd: impl BorrowMut<Command>, log_dir: &Path) -> Proc {
        Self::start(label, cmd, log_dir, Options::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Proc::spawn`] with a piped stdin (see [`Proc::send_line`]).
    pub fn spawn_with_stdin(label: &str, cmd: impl BorrowMut<Command>, log_dir: &Path) -> Proc {
        let opts = Options {
            stdin: true,
            ..Options::default()
        };
        Self::start(label, cmd, log_dir, opts).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Spawns `cmd` as `opts` say, started as a terminal would ([`as_terminal`]).
    pub fn start(
        label: &str,
        mut cmd: impl BorrowMut<Command>,
        log_dir: &Path,
        opts: Options,
    ) -> Result<Proc, Error> {
        let cmd = cmd.borrow_mut();
        let log = log_dir.join(format!("{}.log", crate::unique(&label.replace(' ', "-"))));
        let err = File::create(&log)
            .map_err(|e| Error(format!("{label}: create {}: {e}", log.display())))?;
        let out = match opts.stdout {
            Stdout::Lines => Stdio::piped(),
            Stdout::Log => err
                .try_clone()
                .map_err(|e| Error(format!("{label}: {e}")))?
                .into(),
        };
        as_terminal(cmd)
            .stdout(out)
            .stderr(Stdio::from(err))
            .stdin(if opts.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd
            .spawn()
            .map_err(|e| Error(format!("cannot spawn {label} ({cmd:?}): {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            // Drains stdout for the child's whole life, so that it never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(Proc {
            label: label.to_string(),
            child,
            lines: rx,
            stdin,
            log,
            seen: Vec::new(),
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next stdout line, or None on timeout or end of output.
    pub fn line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => {
                self.seen.push(l.clone());
                Some(l)
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The next stdout line satisfying `pred`; an error with the process's output if none comes
    /// within `timeout` or the process ends first.
    pub fn wait_line(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Ok(l);
                    }
                }
                Err(e) => {
                    let why = match e {
                        RecvTimeoutError::Timeout => format!("no such line within {timeout:?}"),
                        RecvTimeoutError::Disconnected => {
                            let st = self.wait_timeout(Duration::from_secs(3));
                            format!("stdout closed (exit: {st:?})")
                        }
                    };
                    return Err(Error(format!(
                        "{}: waiting for {what}: {why}\n--- stdout ---\n{}\n--- log ---\n{}",
                        self.label,
                        self.seen.join("\n"),
                        self.log_tail(60)
                    )));
                }
            }
        }
    }

    /// [`Proc::wait_line`], panicking on failure.
    pub fn expect_line(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_line(timeout, what, pred)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The next stdout line, whatever it says.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String, Error> {
        self.wait_line(timeout, "a line", |_| true)
    }

    /// Everything the process wrote to its log (stderr, and stdout with [`Stdout::Log`]) so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of [`Proc::stderr`].
    pub fn log_tail(&self, n: usize) -> String {
        let all = self.stderr();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stdout lines read so far plus any still queued (without waiting).
    pub fn stdout_so_far(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("spawned with_stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: write to stdin: {e}", self.label));
    }

    /// Exit status if it has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit, panicking (with the output) if it does not come within `timeout`.
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_timeout(timeout) {
            Some(s) => s,
            None => {
                let out = self.stdout_so_far();
                panic!(
                    "{}: did not exit within {timeout:?}\n--- stdout ---\n{out}\n--- log ---\n{}",
                    self.label,
                    self.stderr()
                )
            }
        }
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.pid()), sig);
        }
    }

    /// Sends `sig` to the process's group (itself and what it started that stayed in its
    /// group), as a terminal sends Ctrl-C's SIGINT to its foreground job.
    pub fn signal_group(&self, sig: Signal) {
        // Only while the leader is not reaped: until then its PID (the group's id) cannot have
        // been given to anyone else.
        if self.status.is_none() {
            let _ = killpg(Pid::from_raw(self.pid()), sig);
        }
    }

    /// SIGKILL and reap, now (the "pull the plug" of resilience tests).
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.expect_exit(Duration::from_secs(10))
    }

    /// SIGTERM, up to 3 s, then SIGKILL to its group; reaps. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        self.signal(Signal::SIGTERM);
        if let Some(s) = self.wait_timeout(Duration::from_secs(3)) {
            return Some(s);
        }
        self.signal_group(Signal::SIGKILL);
        self.status = self.child.wait().ok();
        self.status
    }

    /// Describes the process for an assertion message.
    pub fn describe(&mut self) -> String {
        let status = self.try_status();
        let out = self.stdout_so_far();
        format!(
            "{} (pid {}, status {status:?})\n--- stdout ---\n{out}\n--- log ---\n{}",
            self.label,
            self.pid(),
            self.stderr()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}) stdout ---\n{}\n--- {} log (last 40 lines) ---\n{}",
                self.label,
                self.pid(),
                self.seen.join("\n"),
                self.label,
                self.log_tail(40)
            );
        }
    }
}

/// What [`run`] saw: status, stdout, stderr.
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion (hang guard `timeout`), panicking if it does not end in time.
pub fn run(
    label: &str,
    cmd: impl BorrowMut<Command>,
    log_dir: &Path,
    timeout: Duration,
) -> RunOutput {
    let mut p = Proc::spawn(label, cmd, log_dir);
    let status = p.expect_exit(timeout);
    // The stdout reader may still be draining: it passes the lines on when it is scheduled,
    // which on a loaded machine can be long after the exit (200 ms was seen to lose a whole
    // `jmp get leases -o json`). Its end of file (the channel closing) says it has them all, at
    // once for a program whose pipe closed with it; only a background child (daemon) that
    // kept the pipe open makes this wait until the pipe has been quiet for a while.
    let mut out = Vec::new();
    while let Some(l) = p.line(Duration::from_secs(2)) {
        out.push(l);
    }
    RunOutput {
        status,
        stdout: out.join("\n"),
        stderr: p.stderr(),
    }
}

/// Is a process with this PID alive (not gone and not a zombie)?
pub fn pid_alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 (after the parenthesised comm) is the state.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Kills a process we do not own as a child (a daemon `jmp` left behind) by PID.
pub fn kill_pid(pid: i32) {
    if pid <= 1 || !pid_alive(pid) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if poll_until(Duration::from_secs(3), || !pid_alive(pid)) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    poll_until(Duration::from_secs(3), || !pid_alive(pid));
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns whether it became true.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signal state /proc shows for `pid`: (SigIgn, SigBlk) masks.
    fn sig_state(pid: i32) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| {
            let v = s
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {s}"));
            u64::from_str_radix(v.trim(), 16).expect("hex mask")
        };
        (field("SigIgn:"), field("SigBlk:"))
    }

    /// A child of a parent that ignores and blocks signals (as a background job of a
    /// non-interactive shell, or nohup, leaves them) still starts with nothing ignored, nothing
    /// blocked, in a process group of its own.
    #[test]
    fn children_start_as_a_terminal_would_whatever_the_launcher_did() {
        let dir = crate::TempDir::new("proc-terminal");
        let logs = dir.path().to_path_buf();
        // This process ignores SIGINT (as a launcher may leave it) and the spawning thread
        // blocks SIGTERM, then it starts a child through the harness.
        let spawner = std::thread::spawn(move || {
            // SAFETY: changes this process's SIGINT disposition to ignore, restored below;
            // nothing in the test binary handles SIGINT.
            let old = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
            let mut block: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: plain libc calls on a local sigset.
            unsafe {
                libc::sigemptyset(&mut block);
                libc::sigaddset(&mut block, libc::SIGTERM);
                libc::pthread_sigmask(libc::SIG_BLOCK, &block, std::ptr::null_mut());
            }
            let mut c = Command::new("sleep");
            c.arg("600");
            let p = Proc::spawn("sleeper", c, &logs);
            // SAFETY: restores what was there.
            unsafe { libc::signal(libc::SIGINT, old) };
            p
        });
        let mut p = spawner.join().expect("spawner thread");
        let (ign, blk) = sig_state(p.pid());
        // The standard signals (1..=31, bits 0..=30). glibc sets its own internal real-time
        // signals (32, 33) to ignored in every child it forks; they are not ours to change.
        let standard = ign & 0x7fff_ffff;
        assert_eq!(standard, 0, "the child ignores signals: SigIgn {ign:x}");
        assert_eq!(blk, 0, "the child blocks signals: SigBlk {blk:x}");
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(p.pid()))).expect("getpgid");
        assert_eq!(
            pgid.as_raw(),
            p.pid(),
            "the child leads its own process group"
        );
        // And SIGINT does what it does from a terminal: ends it.
        p.signal_group(Signal::SIGINT);
        let st = p.expect_exit(crate::READY);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGINT), "{st}");
    }
}
