//! End-to-end tests live in tests/*.rs; this library holds the one harness they, the device
//! crates' tests and the benchmarks (benches/) share.
//!
//! Owns: finding the built binaries; spawning real processes as a terminal would, under guards
//! that kill them by PID (never by name) and reap them even when a test panics ([`proc`]);
//! per-test temporary directories and environments (`JMP_RUNTIME_DIR`, `JMP_CONFIG_DIR`);
//! starting `jmpd`, `jmp attach` and the controller and parsing their ready lines; a raw serial
//! handle for reading consoles with timeouts; an echo server standing in for a board's service;
//! and what a test does when something it needs is missing ([`skips`]: it fails, unless
//! tests/SKIPS.md lists it).
//! Does not own: building the binaries (`cargo build --workspace --bins` must have run) nor any
//! timing assertion: every timeout here is a hang guard, never a measurement.

pub mod cluster;
pub mod guest;
pub mod lab;
pub mod netns;
pub mod netns_relay;
pub mod pipe;
pub mod proc;
pub mod py;
pub mod skips;

pub use proc::{
    as_terminal, command, kill_pid, pid_alive, poll_until, run, which, Options, Proc, RunOutput,
    Stdout,
};

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The test venv's python (target/pyenv, made by `scripts/install-test-deps.sh`) if it can
/// import every module of `modules`; else what is missing.
pub fn venv_python(modules: &[&str]) -> Result<PathBuf, String> {
    static CHECKED: OnceLock<std::sync::Mutex<std::collections::HashMap<String, bool>>> =
        OnceLock::new();
    let p = workspace_root().join("target/pyenv/bin/python");
    let key = modules.join(",");
    let ok = *CHECKED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key.clone())
        .or_insert_with(|| {
            p.exists()
                && command(&p)
                    .args(["-c", &format!("import {key}")])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        });
    if ok {
        Ok(p)
    } else {
        Err(format!(
            "no Python venv at {} that imports {key} (run scripts/install-test-deps.sh)",
            p.display()
        ))
    }
}

/// The test venv's python with pyserial (the board stand-ins in tests/board/).
pub fn python() -> Result<PathBuf, String> {
    venv_python(&["serial"])
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

/// A directory under the system temp dir, removed on drop unless the test is failing or
/// `JMP_KEEP_TMP` is set (then it is kept, and its path printed, for the post-mortem).
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
        if std::thread::panicking() || std::env::var_os("JMP_KEEP_TMP").is_some() {
            eprintln!("kept {} for inspection", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// An echo server on 127.0.0.1 standing in for a board's service: every connection gets back
/// what it sends until it half-closes, then the server closes its side. Its threads end with
/// the test process.
pub fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = l.local_addr().expect("echo server address");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                if std::io::copy(&mut r, &mut s).is_ok() {
                    let _ = s.shutdown(Shutdown::Write);
                }
            });
        }
    });
    addr
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
        let mut c = command(jmp_bin());
        c.env("JMP_RUNTIME_DIR", &self.runtime)
            .env("JMP_CONFIG_DIR", &self.config)
            .env_remove("JMP_LOG");
        c
    }

    /// An exporter config named `name`, listening on `listen`, with this env's token file and
    /// state dir (see [`exporter_yaml`]).
    pub fn exporter_yaml(&self, name: &str, listen: &str, export: &str) -> String {
        exporter_yaml(name, listen, &self.state, &self.token_file, export)
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
        let mut cmd = command(jmpd_bin());
        cmd.arg("--config").arg(&cfg).env("JMP_LOG", "info");
        let cmd = match ns {
            Some(ns) => in_netns(ns, cmd),
            None => cmd,
        };
        Jmpd::start(cmd, &self.logs).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Command line of `jmp attach` against `jmpd` (foreground, -o json, private dev dir).
    pub fn attach_cmd(&self, jmpd: &Jmpd, extra: &[&str]) -> Command {
        let mut c = self.jmp();
        attach_args(
            &mut c,
            &jmpd.addr.to_string(),
            &self.token_file,
            &jmpd.fingerprint,
            &self.dev,
        )
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
        start_attach(cmd, &self.logs).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// An exporter config in direct mode: `name` (labelled board=e2e), listening on `listen`, with
/// state in `state` and clients' token in `token_file`. `export` is the YAML body of the
/// `export:` map, one device per line, e.g. `console: {type: sim-console}`.
pub fn exporter_yaml(
    name: &str,
    listen: &str,
    state: &Path,
    token_file: &Path,
    export: &str,
) -> String {
    let mut y = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata:\n  name: {name}\n  labels: {{board: e2e}}\nlisten: {listen}\nstateDir: {}\nauth: {{tokenFile: {}}}\nexport:\n",
        state.display(),
        token_file.display()
    );
    for l in export.lines().filter(|l| !l.trim().is_empty()) {
        y.push_str("  ");
        y.push_str(l.trim());
        y.push('\n');
    }
    y
}

/// Adds what `jmp attach` needs to reach the exporter at `addr` in direct mode, foreground,
/// printing its ready line as JSON, with its devices under `dev_dir`.
pub fn attach_args<'a>(
    cmd: &'a mut Command,
    addr: &str,
    token_file: &Path,
    fingerprint: &str,
    dev_dir: &Path,
) -> &'a mut Command {
    cmd.arg("attach")
        .args(["--exporter", addr])
        .arg("--token-file")
        .arg(token_file)
        .args(["--fingerprint", fingerprint])
        .arg("--dev-dir")
        .arg(dev_dir)
        .args(["-o", "json"])
}

/// Starts `cmd`, a `jmp attach -o json` (or one inside a namespace), and waits for its JSON
/// ready line: the process and what the line said.
pub fn start_attach(
    cmd: impl std::borrow::BorrowMut<Command>,
    logs: &Path,
) -> Result<(Proc, serde_json::Value), proc::Error> {
    let mut p = Proc::start("jmp-attach", cmd, logs, Options::default())?;
    let line = p.wait_line(READY, "jmp attach's JSON line", |l| {
        l.trim_start().starts_with('{')
    })?;
    let v = serde_json::from_str(&line)
        .map_err(|e| proc::Error(format!("jmp attach printed invalid JSON ({e}): {line:?}")))?;
    Ok((p, v))
}

/// `cmd` run inside network namespace `ns` (`ip netns exec`, which execs the program: the
/// PID stays the program's, so guards still kill the right process).
pub fn in_netns(ns: &str, cmd: Command) -> Command {
    let mut c = command("ip");
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

impl Jmpd {
    /// Starts `cmd` (jmpd with its `--config`, or that inside a namespace) and waits for its
    /// ready line.
    pub fn start(
        cmd: impl std::borrow::BorrowMut<Command>,
        logs: &Path,
    ) -> Result<Jmpd, proc::Error> {
        let mut proc = Proc::start("jmpd", cmd, logs, Options::default())?;
        let line = proc.wait_line(READY, "jmpd's ready line", |l| {
            l.starts_with("jmpd: exporter ")
        })?;
        let (name, addr, fingerprint) = parse_jmpd_ready(&line)
            .ok_or_else(|| proc::Error(format!("unexpected jmpd ready line: {line:?}")))?;
        Ok(Jmpd {
            proc,
            name,
            addr,
            fingerprint,
        })
    }
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

    /// Reads until the text received since this call contains every one of `needles`, in
    /// any order (output whose order against a local notice is not fixed); returns that text.
    pub fn read_until_all(&mut self, needles: &[&str], timeout: Duration) -> String {
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            got.extend(self.read_some(Duration::from_millis(100)));
            let text = String::from_utf8_lossy(&got).to_string();
            if needles.iter().all(|n| text.contains(n)) {
                return text;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: not all of {needles:?} within {timeout:?}; received: {text:?}",
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
        let mut c = command("tmux");
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
