//! End-to-end tests live in tests/*.rs; this library holds their shared helpers.
//!
//! Owns: finding the built binaries, spawning real processes under guards that kill them by PID
//! (never by name) and reap them even when a test panics, per-test temporary directories and
//! environments (`JMP_RUNTIME_DIR`, `JMP_CONFIG_DIR`), starting `jmpd` and `jmp attach` and parsing
//! their one "ready" line, a raw serial handle for reading consoles with timeouts, and `skip`.
//! Does not own: building the binaries (`cargo build --workspace --bins` must have run) nor any
//! timing assertion: every timeout here is a hang guard, never a measurement.

pub mod cluster;
pub mod guest;
pub mod lab;
pub mod netns;
pub mod netns_relay;
pub mod py;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Hang guard for anything that should happen "soon" (a process getting ready, a prompt).
pub const READY: Duration = Duration::from_secs(30);

/// The token every test exporter accepts (written to the token file before jmpd starts).
pub const TOKEN: &str = "test-token";

// ---------------------------------------------------------------------------------------------
// Binaries

/// target/debug (or whichever profile built the test binary): .../target/debug/deps/xxx → .../target/debug.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent dir");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// Path to a workspace binary, panicking with the fix if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    if !p.is_file() {
        panic!(
            "{} does not exist: run `cargo build --workspace --bins` first",
            p.display()
        );
    }
    p
}

pub fn jmpd_bin() -> PathBuf {
    bin("jmpd")
}

pub fn jmp_bin() -> PathBuf {
    bin("jmp")
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Files the tests run (Python board stand-ins and clients): tests/board/.
pub fn board_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("board")
}

/// The test venv's python if it exists and has pyserial (`scripts/install-test-deps.sh`).
pub fn python() -> Option<PathBuf> {
    static PY: OnceLock<Option<PathBuf>> = OnceLock::new();
    PY.get_or_init(|| {
        let p = workspace_root().join("target/pyenv/bin/python");
        if !p.exists() {
            return None;
        }
        let ok = Command::new(&p)
            .args(["-c", "import serial"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(p)
    })
    .clone()
}

/// Is `tool` on PATH (an executable file)?
pub fn which(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| {
        std::fs::metadata(d.join(tool))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Writes straight to fd 2, bypassing the test harness's output capture, so the line shows in
/// the log of a passing test too.
pub fn raw_stderr(line: &str) {
    let mut s = line.to_string();
    if !s.ends_with('\n') {
        s.push('\n');
    }
    let mut buf = s.as_bytes();
    while !buf.is_empty() {
        match nix::unistd::write(std::io::stderr(), buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf = &buf[n..],
        }
    }
}

/// Reports a test that cannot run here. The caller returns right after: the test counts as run,
/// and the `SKIP: <reason>` line is visible in the log (DESIGN.md: never a silent pass).
pub fn skip(reason: &str) {
    let test = std::thread::current().name().unwrap_or("?").to_string();
    println!("SKIP: {reason}");
    raw_stderr(&format!("SKIP: {reason} ({test})"));
}

// ---------------------------------------------------------------------------------------------
// Temporary directories

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name no other test (in this or a concurrent test process) uses.
pub fn unique(tag: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{tag}-{}-{n}-{nanos:x}", std::process::id())
}

/// A directory under the system temp dir, removed on drop unless the test is failing (then it
/// is kept, and its path printed, for the post-mortem).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(&format!("jmp-e2e-{tag}")));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A spawned child: stdout lines arrive on a channel (read by a thread), stderr goes to a file.
/// Dropping it sends SIGTERM by PID, waits up to 3 s, then SIGKILL, and reaps it.
pub struct Proc {
    pub label: String,
    child: Child,
    lines: Receiver<String>,
    stdin: Option<ChildStdin>,
    stderr_path: PathBuf,
    /// Every stdout line read so far (for error messages).
    seen: Vec<String>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with piped stdout, stdin from /dev/null, stderr to `<log_dir>/<label>.N.stderr`.
    pub fn spawn(label: &str, cmd: Command, log_dir: &Path) -> Proc {
        Self::spawn_inner(label, cmd, log_dir, false)
    }

    /// Like `spawn` but with a piped stdin (see `send_line`).
    pub fn spawn_with_stdin(label: &str, cmd: Command, log_dir: &Path) -> Proc {
        Self::spawn_inner(label, cmd, log_dir, true)
    }

    fn spawn_inner(label: &str, mut cmd: Command, log_dir: &Path, stdin: bool) -> Proc {
        let stderr_path = log_dir.join(format!("{}.stderr", unique(label)));
        let err = File::create(&stderr_path).expect("create stderr log");
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {label} ({cmd:?}): {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Proc {
            label: label.to_string(),
            child,
            lines: rx,
            stdin,
            stderr_path,
            seen: Vec::new(),
            status: None,
        }
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

    /// The next stdout line satisfying `pred`, panicking with the process's output if none comes
    /// within `timeout` or the process ends first.
    pub fn expect_line(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
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
                    panic!(
                        "{}: waiting for {what}: {why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        self.label,
                        self.seen.join("\n"),
                        self.stderr()
                    );
                }
            }
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
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
                    "{}: did not exit within {timeout:?}\n--- stdout ---\n{out}\n--- stderr ---\n{}",
                    self.label,
                    self.stderr()
                )
            }
        }
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), sig);
    }

    /// SIGKILL and reap, now (the "pull the plug" of resilience tests).
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.expect_exit(Duration::from_secs(10))
    }

    /// SIGTERM, up to 3 s, then SIGKILL; reaps. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        self.signal(Signal::SIGTERM);
        if let Some(s) = self.wait_timeout(Duration::from_secs(3)) {
            return Some(s);
        }
        self.signal(Signal::SIGKILL);
        self.status = self.child.wait().ok();
        self.status
    }

    /// Describes the process for an assertion message.
    pub fn describe(&mut self) -> String {
        let status = self.try_status();
        let out = self.stdout_so_far();
        format!(
            "{} (pid {}, status {status:?})\n--- stdout ---\n{out}\n--- stderr ---\n{}",
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
            let err = self.stderr();
            let tail: String = err
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!(
                "--- {} (pid {}) stdout ---\n{}\n--- {} stderr (last 40 lines) ---\n{tail}",
                self.label,
                self.pid(),
                self.seen.join("\n"),
                self.label
            );
        }
    }
}

/// Runs `cmd` to completion (hang guard `timeout`): status, stdout, stderr.
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(label: &str, cmd: Command, log_dir: &Path, timeout: Duration) -> RunOutput {
    let mut p = Proc::spawn(label, cmd, log_dir);
    let status = p.expect_exit(timeout);
    // The stdout reader may still be draining; a background child (daemon) may also keep the
    // pipe open, so only wait briefly for lines still in flight.
    let mut out = Vec::new();
    while let Some(l) = p.line(Duration::from_millis(200)) {
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

/// A port free on 127.0.0.1 right now (UDP, as jmpd listens on UDP).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("local addr").port()
}

/// A port free on 127.0.0.1 right now (TCP).
pub fn free_tcp_port() -> u16 {
    let s = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    s.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------------------------
// A test's environment: directories, jmpd, jmp

/// Everything one test owns on disk: a temp root with `runtime/` (JMP_RUNTIME_DIR), `config/`
/// (JMP_CONFIG_DIR), `dev/` (--dev-dir), `state/` (jmpd stateDir), `logs/` and `token`.
pub struct TestEnv {
    pub root: TempDir,
    pub runtime: PathBuf,
    pub config: PathBuf,
    pub dev: PathBuf,
    pub state: PathBuf,
    pub logs: PathBuf,
    pub token_file: PathBuf,
}

impl TestEnv {
    pub fn new(tag: &str) -> TestEnv {
        let root = TempDir::new(tag);
        let mk = |n: &str| {
            let p = root.join(n);
            std::fs::create_dir_all(&p).expect("mkdir");
            p
        };
        let runtime = mk("runtime");
        let config = mk("config");
        let dev = mk("dev");
        let state = mk("state");
        let logs = mk("logs");
        let token_file = root.join("token");
        write_private(&token_file, &format!("{TOKEN}\n"));
        TestEnv {
            root,
            runtime,
            config,
            dev,
            state,
            logs,
            token_file,
        }
    }

    /// A `jmp` command with this test's private runtime and config directories.
    pub fn jmp(&self) -> Command {
        let mut c = Command::new(jmp_bin());
        c.env("JMP_RUNTIME_DIR", &self.runtime)
            .env("JMP_CONFIG_DIR", &self.config)
            .env_remove("JMP_LOG");
        c
    }

    /// An exporter config named `name`, listening on `listen`, with this env's token file and
    /// state dir. `export` is the YAML body of the `export:` map, one device per line, e.g.
    /// `console: {type: sim-console}`.
    pub fn exporter_yaml(&self, name: &str, listen: &str, export: &str) -> String {
        let mut y = format!(
            "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata:\n  name: {name}\n  labels: {{board: e2e}}\nlisten: {listen}\nstateDir: {}\nauth: {{tokenFile: {}}}\nexport:\n",
            self.state.display(),
            self.token_file.display()
        );
        for l in export.lines().filter(|l| !l.trim().is_empty()) {
            y.push_str("  ");
            y.push_str(l.trim());
            y.push('\n');
        }
        y
    }

    /// Writes `yaml` to a config file and returns its path.
    pub fn write_config(&self, yaml: &str) -> PathBuf {
        let p = self.root.join(format!("{}.yaml", unique("exporter")));
        std::fs::write(&p, yaml).expect("write config");
        p
    }

    /// Starts jmpd with `yaml`, waiting for its ready line.
    pub fn start_jmpd(&self, yaml: &str) -> Jmpd {
        self.start_jmpd_in(None, yaml)
    }

    /// Starts jmpd inside network namespace `ns` (`None`: this one).
    pub fn start_jmpd_in(&self, ns: Option<&str>, yaml: &str) -> Jmpd {
        let cfg = self.write_config(yaml);
        let mut cmd = Command::new(jmpd_bin());
        cmd.arg("--config").arg(&cfg).env("JMP_LOG", "info");
        let cmd = match ns {
            Some(ns) => in_netns(ns, cmd),
            None => cmd,
        };
        let mut proc = Proc::spawn("jmpd", cmd, &self.logs);
        let line = proc.expect_line(READY, "jmpd's ready line", |l| {
            l.starts_with("jmpd: exporter ")
        });
        let (name, addr, fingerprint) = parse_jmpd_ready(&line)
            .unwrap_or_else(|| panic!("unexpected jmpd ready line: {line:?}"));
        Jmpd {
            proc,
            name,
            addr,
            fingerprint,
        }
    }

    /// Command line of `jmp attach` against `jmpd` (foreground, -o json, private dev dir).
    pub fn attach_cmd(&self, jmpd: &Jmpd, extra: &[&str]) -> Command {
        let mut c = self.jmp();
        c.arg("attach")
            .arg("--exporter")
            .arg(jmpd.addr.to_string())
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--fingerprint")
            .arg(&jmpd.fingerprint)
            .arg("--dev-dir")
            .arg(&self.dev)
            .args(["-o", "json"])
            .args(extra);
        c
    }

    /// `jmp attach` in the foreground; returns once it printed its JSON ready line.
    pub fn attach(&self, jmpd: &Jmpd, extra: &[&str]) -> (Proc, serde_json::Value) {
        self.attach_in(None, jmpd, extra)
    }

    /// `jmp attach` inside network namespace `ns` (`None`: this one).
    pub fn attach_in(
        &self,
        ns: Option<&str>,
        jmpd: &Jmpd,
        extra: &[&str],
    ) -> (Proc, serde_json::Value) {
        let cmd = self.attach_cmd(jmpd, extra);
        let cmd = match ns {
            Some(ns) => in_netns(ns, cmd),
            None => cmd,
        };
        let mut p = Proc::spawn("jmp-attach", cmd, &self.logs);
        let line = p.expect_line(READY, "jmp attach's JSON line", |l| {
            l.trim_start().starts_with('{')
        });
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("jmp attach printed invalid JSON ({e}): {line:?}"));
        (p, v)
    }
}

/// `cmd` run inside network namespace `ns` (`ip netns exec`, which execs the program: the
/// PID stays the program's, so guards still kill the right process).
pub fn in_netns(ns: &str, cmd: Command) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

/// Parses `jmpd: exporter NAME listening on ADDR fingerprint sha256:HEX`.
pub fn parse_jmpd_ready(line: &str) -> Option<(String, SocketAddr, String)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["jmpd:", "exporter", name, "listening", "on", addr, "fingerprint", fp] => {
            Some((name.to_string(), addr.parse().ok()?, fp.to_string()))
        }
        _ => None,
    }
}

pub fn write_private(path: &Path, content: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("write file");
    f.write_all(content.as_bytes()).expect("write file");
}

/// A running jmpd and what its ready line said.
pub struct Jmpd {
    pub proc: Proc,
    pub name: String,
    pub addr: SocketAddr,
    pub fingerprint: String,
}

/// The entry for device `name` in jmp's JSON ready line.
pub fn device<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no device {name:?} in {v}"))
}

/// The `local` of device `name` in jmp's JSON line.
pub fn local_of(v: &serde_json::Value, name: &str) -> String {
    device(v, name)["local"]
        .as_str()
        .unwrap_or_else(|| panic!("device {name:?} has no string `local` in {v}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Consoles

/// A serial port (a local pty path) opened read-write, raw, for driving consoles from Rust.
pub struct Console {
    pub path: PathBuf,
    file: File,
    /// Everything read so far.
    pub seen: Vec<u8>,
}

impl Console {
    pub fn open(path: impl AsRef<Path>) -> Console {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let mut t = tcgetattr(file.as_fd()).expect("tcgetattr on the console");
        cfmakeraw(&mut t);
        // TCSANOW: pending input (the replayed history) must survive.
        tcsetattr(file.as_fd(), SetArg::TCSANOW, &t).expect("tcsetattr on the console");
        Console {
            path,
            file,
            seen: Vec::new(),
        }
    }

    pub fn write(&mut self, data: &[u8]) {
        let mut buf = data;
        let deadline = Instant::now() + READY;
        while !buf.is_empty() {
            match self.file.write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "console write stuck");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("write {}: {e}", self.path.display()),
            }
        }
    }

    /// Reads what is available within `wait`; returns the new bytes (also appended to `seen`).
    pub fn read_some(&mut self, wait: Duration) -> Vec<u8> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = wait.as_millis().min(u16::MAX as u128) as u16;
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // WouldBlock: nothing more now. EIO: the master side is (momentarily) gone.
                Err(_) => break,
            }
        }
        self.seen.extend_from_slice(&out);
        out
    }

    /// Reads until the text received since this call contains `needle`; returns that text.
    /// Panics after `timeout`, showing what arrived.
    pub fn read_until(&mut self, needle: &str, timeout: Duration) -> String {
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            got.extend(self.read_some(Duration::from_millis(100)));
            let text = String::from_utf8_lossy(&got).to_string();
            if text.contains(needle) {
                return text;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: no {needle:?} within {timeout:?}; received: {text:?}",
                    self.path.display()
                );
            }
        }
    }

    /// Discards whatever is pending.
    pub fn drain(&mut self) {
        while !self.read_some(Duration::from_millis(200)).is_empty() {}
    }
}

/// Logs into a sim-console that is showing (or will show after Enter) its login prompt, and
/// checks a command's output: the sim console works end to end.
pub fn sim_login_and_echo(c: &mut Console, marker: &str) {
    c.write(b"root\r");
    c.read_until("Password:", READY);
    c.write(b"x\r");
    c.read_until("# ", READY);
    c.write(format!("echo {marker}\r").as_bytes());
    let out = c.read_until(&format!("\r\n{marker}\r\n"), READY);
    assert!(out.contains(marker), "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// tmux (for interactive terminal programs)

/// A private tmux server (`tmux -L <socket>`), killed on drop.
pub struct Tmux {
    pub socket: String,
    pub session: String,
}

impl Tmux {
    /// Starts `command` in a detached 120x40 session on a private server.
    pub fn start(command: &str) -> Tmux {
        let socket = unique("jmp-e2e");
        let session = "e2e".to_string();
        let t = Tmux { socket, session };
        let st = t
            .cmd()
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                &t.session,
                "-x",
                "120",
                "-y",
                "40",
            ])
            .arg(command)
            .env_remove("TMUX")
            .status()
            .expect("run tmux");
        assert!(st.success(), "tmux new-session failed: {st}");
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-L").arg(&self.socket);
        c.stdin(Stdio::null());
        c
    }

    pub fn capture(&self) -> String {
        let out = self
            .cmd()
            .args([
                "capture-pane",
                "-p",
                "-J",
                "-S",
                "-200",
                "-t",
                &self.session,
            ])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Types `text` literally, then Enter if `enter`.
    pub fn send(&self, text: &str, enter: bool) {
        let st = self
            .cmd()
            .args(["send-keys", "-t", &self.session, "-l", text])
            .status()
            .expect("tmux send-keys");
        assert!(st.success());
        if enter {
            let st = self
                .cmd()
                .args(["send-keys", "-t", &self.session, "Enter"])
                .status()
                .expect("tmux send-keys");
            assert!(st.success());
        }
    }

    /// Polls the pane until `pred` holds; panics with the pane's content after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if pred(&screen) {
                return screen;
            }
            if Instant::now() >= deadline {
                panic!("tmux pane never showed {what} within {timeout:?}; pane:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- tmux pane ---\n{}", self.capture());
        }
        let _ = self
            .cmd()
            .arg("kill-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// Daemons `jmp` leaves behind (attach -d, local start)

/// Stops a background `jmp` process on drop: runs `stop_args` (e.g. `local stop`) under a hang
/// guard, then kills the PID if it is still alive.
pub struct DaemonGuard<'a> {
    pub env: &'a TestEnv,
    pub pid: i32,
    pub stop_args: Vec<String>,
    pub stopped: bool,
}

impl DaemonGuard<'_> {
    pub fn stop(&mut self) -> RunOutput {
        self.stopped = true;
        let mut c = self.env.jmp();
        c.args(&self.stop_args);
        run("jmp-stop", c, &self.env.logs, READY)
    }
}

impl Drop for DaemonGuard<'_> {
    fn drop(&mut self) {
        if !self.stopped {
            let mut c = self.env.jmp();
            c.args(&self.stop_args);
            let mut p = Proc::spawn("jmp-stop", c, &self.env.logs);
            let _ = p.wait_timeout(Duration::from_secs(10));
        }
        kill_pid(self.pid);
    }
}

/// Pseudo-random bytes (xorshift), reproducible from `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
