//! A qemu guest for what this machine's kernel cannot do (SocketCAN, USB/IP, loadable modules,
//! systemd as PID 1): Debian's distribution kernel under software emulation, with the host's
//! root read-only over virtio-9p under a tmpfs overlay, so this build's binaries and the test
//! venv run in it unchanged (tests/guest/guest.sh and init.sh).
//!
//! ```no_run
//! use jmp_e2e::guest::{Guest, Init};
//! let g = Guest::builder(Init::Systemd).forward_udp(7811).boot();
//! let out = g.run("systemctl is-system-running --wait; uname -r");
//! assert!(out.success(), "{out}");
//! let host_port = g.host_port_udp(7811); // 127.0.0.1:host_port reaches the guest's 7811
//! ```
//!
//! What a test gets:
//! - `run`/`sh`: a shell command in the guest (root, cwd `/`), its status and output, through an
//!   agent on a virtio-serial port (tests/src/bin/jmp-guest-agent.rs); commands may run
//!   concurrently from several threads, and the guest keeps running between them.
//! - `spawn`: a background process in the guest whose output lands in files the host reads
//!   directly (`expect_line`, `wait`); it is killed (its whole session) when dropped.
//! - `dir()`: the guest's private directory, read-write at the same path on both sides (put the
//!   files the guest needs there: the host's other files are visible too, but read-only and
//!   cached from boot on).
//! - forwards from 127.0.0.1 on the host to guest ports (never another address), virtio disks
//!   backed by host files (`/dev/vda`, `/dev/vdb`, ... in order), 16550 serial ports (`/dev/ttyS1`,
//!   ...) whose other end is a Unix socket on the host, real CAN controllers (`can0`, ...).
//! - the guest reaches the host's 127.0.0.1 as 10.0.2.2 (qemu's user-mode network): nothing is
//!   added to the host's namespaces.
//!
//! Cleanup: qemu is killed by its PID when the `Guest` is dropped (also when the test panics;
//! it also gets SIGKILL if the thread that booted it ends first), and the private directory is
//! removed. A failing test gets the console's last lines on stderr. Every timeout is a hang
//! guard; the boot time is measured (`boot_time`) but never asserted.

use crate::{bin, free_tcp_port, free_udp_port, poll_until, unique, workspace_root, Proc};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Hang guard for a boot (software emulation on a loaded 2-core machine).
pub const BOOT: Duration = Duration::from_secs(240);
/// Hang guard for one command (`run`).
pub const COMMAND: Duration = Duration::from_secs(120);

/// What runs as the guest's PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// The initramfs's busybox shell, which starts the agent and nothing else (fastest).
    Minimal,
    /// systemd, starting `jmp-guest.target`: sysinit.target, basic.target and the agent as a
    /// service; no getty, none of the host's enabled services, no fstab.
    Systemd,
}

impl Init {
    fn arg(self) -> &'static str {
        match self {
            Init::Minimal => "minimal",
            Init::Systemd => "systemd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// What to boot; `boot()` starts it.
pub struct GuestBuilder {
    init: Init,
    memory: String,
    forwards: Vec<(Proto, u16)>,
    disks: Vec<(PathBuf, bool)>,
    serials: usize,
    can_controllers: usize,
    extra: Vec<String>,
}

impl GuestBuilder {
    /// Host 127.0.0.1:(a free port) -> guest UDP `port` (`Guest::host_port_udp`).
    pub fn forward_udp(mut self, port: u16) -> Self {
        self.forwards.push((Proto::Udp, port));
        self
    }

    /// Host 127.0.0.1:(a free port) -> guest TCP `port` (`Guest::host_port_tcp`).
    pub fn forward_tcp(mut self, port: u16) -> Self {
        self.forwards.push((Proto::Tcp, port));
        self
    }

    /// A raw disk image on the host as a virtio disk: the first is `/dev/vda`, then `/dev/vdb`.
    pub fn disk(mut self, image: &Path, read_only: bool) -> Self {
        self.disks.push((image.to_path_buf(), read_only));
        self
    }

    /// Another 16550 serial port: the first is the guest's `/dev/ttyS1` (ttyS0 is the console),
    /// at most three. Its other end is `Guest::serial_socket(i)` on the host.
    pub fn serial_port(mut self) -> Self {
        assert!(self.serials < 3, "the guest kernel has four 16550 ports");
        self.serials += 1;
        self
    }

    /// `n` real CAN controllers (qemu's Kvaser PCI card: an SJA1000) on one emulated bus: the
    /// guest's can0, can1, ... once the test ran `modprobe kvaser_pci` (there is no udev). The
    /// emulation drops frames sent back to back, so it is for configuring a controller (bit
    /// rate, state over netlink), not for traffic tests.
    pub fn can_controllers(mut self, n: usize) -> Self {
        self.can_controllers = n;
        self
    }

    /// More qemu arguments, as they are (e.g. `-device qemu-xhci -device usb-storage,...` for
    /// emulated USB devices). Paths in them are the test's to create and remove.
    pub fn qemu_args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.extra
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Guest memory in qemu's spelling (default 768M).
    pub fn memory(mut self, m: &str) -> Self {
        self.memory = m.to_string();
        self
    }

    pub fn boot(self) -> Guest {
        Guest::boot_with(self)
    }
}

/// A command's result.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl GuestOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for GuestOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit code {:?}, signal {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.signal, self.stdout, self.stderr
        )
    }
}

type Pending = Arc<Mutex<HashMap<u64, Sender<Value>>>>;

/// A running guest; see the module's documentation.
pub struct Guest {
    init: Init,
    dir: PathBuf,
    /// In a Mutex only so that the guest is Sync (`Proc` is not).
    qemu: Mutex<Option<Proc>>,
    qemu_pid: i32,
    /// Requests are written whole under the lock: two threads' lines must not interleave.
    agent: Mutex<UnixStream>,
    pending: Pending,
    next_id: AtomicU64,
    forwards: HashMap<(Proto, u16), u16>,
    serials: usize,
    boot_time: Duration,
    uptime_at_ready: Duration,
}

impl Guest {
    pub fn builder(init: Init) -> GuestBuilder {
        GuestBuilder {
            init,
            memory: "768M".into(),
            forwards: Vec::new(),
            disks: Vec::new(),
            serials: 0,
            can_controllers: 0,
            extra: Vec::new(),
        }
    }

    /// A guest with nothing added.
    pub fn boot(init: Init) -> Guest {
        Self::builder(init).boot()
    }

    fn boot_with(b: GuestBuilder) -> Guest {
        let script = workspace_root().join("tests/guest/guest.sh");
        // Idempotent (a check when nothing changed); builds the initramfs after init.sh changed.
        let setup = Command::new(&script)
            .arg("setup")
            .output()
            .expect("run tests/guest/guest.sh setup");
        assert!(
            setup.status.success(),
            "tests/guest/guest.sh setup failed (scripts/install-test-deps.sh installs what it needs): {}{}",
            String::from_utf8_lossy(&setup.stdout),
            String::from_utf8_lossy(&setup.stderr)
        );
        let agent = bin("jmp-guest-agent");
        let dir = std::env::temp_dir().join(unique("jmp-guest"));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .expect("create the guest's directory");
        }
        let logs = dir.join("logs");
        std::fs::create_dir(&logs).expect("mkdir logs");
        let mut forwards = HashMap::new();
        let mut cmd = Command::new(&script);
        cmd.arg("boot")
            .arg(&dir)
            .arg(b.init.arg())
            .arg("--agent")
            .arg(&agent)
            .env("JMP_GUEST_MEM", &b.memory);
        for (proto, port) in &b.forwards {
            let (host, p) = match proto {
                Proto::Udp => (free_udp_port(), "udp"),
                Proto::Tcp => (free_tcp_port(), "tcp"),
            };
            cmd.arg("--fwd")
                .arg(format!("{p}:127.0.0.1:{host}-10.0.2.15:{port}"));
            forwards.insert((*proto, *port), host);
        }
        cmd.arg("--");
        for (i, (image, ro)) in b.disks.iter().enumerate() {
            cmd.arg("-drive").arg(format!(
                "file={},if=none,id=disk{i},format=raw{}",
                image.display(),
                if *ro { ",readonly=on" } else { "" }
            ));
            cmd.arg("-device")
                .arg(format!("virtio-blk-pci,drive=disk{i},serial=jmp-disk{i}"));
        }
        for i in 0..b.serials {
            let sock = dir.join(format!("ttyS{}.sock", i + 1));
            cmd.arg("-chardev").arg(format!(
                "socket,id=ser{i},path={},server=on,wait=off",
                sock.display()
            ));
            cmd.arg("-serial").arg(format!("chardev:ser{i}"));
        }
        if b.can_controllers > 0 {
            cmd.args(["-object", "can-bus,id=canbus0"]);
            for _ in 0..b.can_controllers {
                cmd.args(["-device", "kvaser_pci,canbus=canbus0"]);
            }
        }
        cmd.args(&b.extra);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe. qemu (which the script execs,
        // keeping the PID) dies with the thread that booted it, should this process be killed
        // before the guard's Drop runs.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(Into::into)
            });
        }
        let started = Instant::now();
        let mut qemu = Proc::spawn("qemu", cmd, &logs);
        let sock = dir.join("agent.sock");
        let made = poll_until(Duration::from_secs(30), || {
            sock.exists() || !qemu.is_running()
        });
        let agent_stream = match UnixStream::connect(&sock) {
            Ok(s) if made => s,
            r => {
                let why = r.err().map(|e| e.to_string()).unwrap_or_default();
                let d = qemu.describe();
                let _ = std::fs::remove_dir_all(&dir);
                panic!("qemu did not open the agent's socket ({why}): {d}");
            }
        };
        let pending: Pending = Arc::default();
        let (hello_tx, hello_rx) = channel();
        {
            let reader = agent_stream.try_clone().expect("clone the agent socket");
            let pending = pending.clone();
            std::thread::spawn(move || read_agent(reader, pending, hello_tx));
        }
        let mut g = Guest {
            init: b.init,
            dir,
            qemu_pid: qemu.pid(),
            qemu: Mutex::new(Some(qemu)),
            agent: Mutex::new(agent_stream),
            pending,
            next_id: AtomicU64::new(1),
            forwards,
            serials: b.serials,
            boot_time: Duration::ZERO,
            uptime_at_ready: Duration::ZERO,
        };
        let deadline = Instant::now() + BOOT;
        let hello = loop {
            match hello_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(v) => break v,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    let running = g
                        .qemu
                        .get_mut()
                        .ok()
                        .and_then(|q| q.as_mut())
                        .is_some_and(|q| q.is_running());
                    if !running {
                        g.fail("qemu ended before the guest's agent answered");
                    }
                }
                Err(_) => g.fail(&format!("the guest's agent did not answer within {BOOT:?}")),
            }
        };
        g.boot_time = started.elapsed();
        g.uptime_at_ready = Duration::from_millis(hello["uptime_ms"].as_u64().unwrap_or(0));
        g
    }

    /// Panics with the console's end (the Drop then cleans up).
    fn fail(&mut self, why: &str) -> ! {
        let q = self
            .qemu
            .get_mut()
            .ok()
            .and_then(|q| q.as_mut())
            .map(|q| q.describe())
            .unwrap_or_default();
        panic!(
            "{why}\n{q}\n--- guest console (end) ---\n{}",
            self.console_tail(60)
        );
    }

    pub fn init(&self) -> Init {
        self.init
    }

    /// The guest's private directory: read-write, at this same path in the guest.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// From starting qemu to the agent's first message (kernel, init, for systemd its
    /// sysinit.target and basic.target).
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The guest's own uptime when its agent first spoke.
    pub fn uptime_at_ready(&self) -> Duration {
        self.uptime_at_ready
    }

    /// qemu's PID on the host.
    pub fn pid(&self) -> i32 {
        self.qemu_pid
    }

    /// The host port on 127.0.0.1 forwarded to the guest's UDP `port` (from `forward_udp`).
    pub fn host_port_udp(&self, port: u16) -> u16 {
        self.forwarded(Proto::Udp, port)
    }

    /// The host port on 127.0.0.1 forwarded to the guest's TCP `port` (from `forward_tcp`).
    pub fn host_port_tcp(&self, port: u16) -> u16 {
        self.forwarded(Proto::Tcp, port)
    }

    fn forwarded(&self, proto: Proto, port: u16) -> u16 {
        *self
            .forwards
            .get(&(proto, port))
            .unwrap_or_else(|| panic!("no forward to the guest's {proto:?} port {port}"))
    }

    /// The host end (a Unix socket: connect to it) of the guest's `/dev/ttyS{i}`, i from 1.
    pub fn serial_socket(&self, i: usize) -> PathBuf {
        assert!(
            (1..=self.serials).contains(&i),
            "ttyS{i} was not added (serial_port)"
        );
        self.dir.join(format!("ttyS{i}.sock"))
    }

    /// The serial console so far (kernel messages, init's and systemd's).
    pub fn console(&self) -> String {
        let b = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
        String::from_utf8_lossy(&b).into_owned()
    }

    fn console_tail(&self, lines: usize) -> String {
        let c = self.console();
        let v: Vec<&str> = c.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `script` with `/bin/sh -c` in the guest; Err if the guest is gone or the hang guard
    /// `timeout` passes (the command may still be running then).
    pub fn try_run(&self, script: &str, timeout: Duration) -> Result<GuestOutput, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let mut line = json!({"id": id, "sh": script}).to_string();
        line.push('\n');
        let sent = self
            .agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(line.as_bytes());
        if let Err(e) = sent {
            return Err(format!("cannot reach the guest's agent: {e}"));
        }
        let reply = rx.recv_timeout(timeout);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match reply {
            Ok(v) => Ok(GuestOutput {
                code: v["code"].as_i64().map(|c| c as i32),
                signal: v["signal"].as_i64().map(|s| s as i32),
                stdout: v["stdout"].as_str().unwrap_or_default().to_string(),
                stderr: v["stderr"].as_str().unwrap_or_default().to_string(),
            }),
            Err(RecvTimeoutError::Timeout) => Err(format!("no answer within {timeout:?}")),
            Err(RecvTimeoutError::Disconnected) => Err("the guest's agent is gone".into()),
        }
    }

    /// `try_run` with the default hang guard, panicking (with the console) if there is no answer.
    pub fn run(&self, script: &str) -> GuestOutput {
        self.run_timeout(script, COMMAND)
    }

    pub fn run_timeout(&self, script: &str, timeout: Duration) -> GuestOutput {
        self.try_run(script, timeout).unwrap_or_else(|e| {
            panic!(
                "guest command {script:?}: {e}\n--- guest console (end) ---\n{}",
                self.console_tail(40)
            )
        })
    }

    /// Runs `script`, asserting it succeeds; its stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self.run(script);
        assert!(out.success(), "guest command {script:?} failed: {out}");
        out.stdout
    }

    /// Starts `script` in the background in the guest (its own session, `/bin/sh`), its
    /// stdout and stderr in files of `dir()`. `label` names them in messages.
    pub fn spawn(&self, label: &str, script: &str) -> GuestProcess<'_> {
        let base = self.dir.join(unique(label));
        let body = base.with_extension("sh");
        std::fs::write(&body, script).expect("write the guest script");
        let (out, err, rc) = (
            base.with_extension("out"),
            base.with_extension("err"),
            base.with_extension("rc"),
        );
        // The wrapper records the status; `$!` is the session's leader (no job control in a
        // non-interactive shell, so setsid does not fork).
        let pid = self.sh(&format!(
            "setsid /bin/sh -c '/bin/sh {b}; echo $? > {rc}' > {out} 2> {err} < /dev/null & echo $!",
            b = body.display(),
            rc = rc.display(),
            out = out.display(),
            err = err.display()
        ));
        let pid: i32 = pid
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("spawn {label}: no PID in {pid:?}"));
        GuestProcess {
            guest: self,
            label: label.to_string(),
            pid,
            out,
            err,
            rc,
        }
    }
}

/// Reads the agent's messages: the hello, then replies routed to their waiting `try_run`.
fn read_agent(stream: UnixStream, pending: Pending, hello: Sender<Value>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(h) = v.get("hello") {
            let _ = hello.send(h.clone());
            continue;
        }
        let Some(id) = v["id"].as_u64() else { continue };
        let tx = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(tx) = tx {
            let _ = tx.send(v);
        }
    }
    // The guest is gone: waiting commands see their channel close.
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self
            .agent
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown(std::net::Shutdown::Both);
        if std::thread::panicking() {
            eprintln!(
                "--- guest console (pid {}, last 60 lines) ---\n{}",
                self.pid(),
                self.console_tail(60)
            );
        }
        // SIGTERM by PID, then SIGKILL; reaped. Only then the files qemu serves go.
        let qemu = self
            .qemu
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut q) = qemu {
            q.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A background process in the guest (`Guest::spawn`); its session is killed when dropped.
pub struct GuestProcess<'g> {
    guest: &'g Guest,
    pub label: String,
    /// PID (and session id) in the guest.
    pub pid: i32,
    out: PathBuf,
    err: PathBuf,
    rc: PathBuf,
}

impl GuestProcess<'_> {
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Its exit status if it has ended.
    pub fn status(&self) -> Option<i32> {
        std::fs::read_to_string(&self.rc)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn describe(&self) -> String {
        format!(
            "{} (guest pid {}, status {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.label,
            self.pid,
            self.status(),
            self.stdout(),
            self.stderr()
        )
    }

    /// The first stdout line satisfying `pred`, panicking with its output if none comes within
    /// `timeout` or it ends first.
    pub fn expect_line(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let mut found = None;
        let mut ended = false;
        poll_until(timeout, || {
            // Read the status first: output written before the end is then complete.
            ended = self.status().is_some();
            found = self.stdout().lines().find(|l| pred(l)).map(str::to_string);
            found.is_some() || ended
        });
        found.unwrap_or_else(|| {
            panic!(
                "waiting for {what}: {}: {}",
                if ended {
                    "it ended"
                } else {
                    "no such line in time"
                },
                self.describe()
            )
        })
    }

    /// Waits for its end (hang guard `timeout`); its exit status.
    pub fn wait(&self, timeout: Duration) -> i32 {
        if !poll_until(timeout, || self.status().is_some()) {
            panic!("did not end within {timeout:?}: {}", self.describe());
        }
        self.status().expect("status")
    }

    /// Ends its session: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&self) {
        if self.status().is_some() {
            return;
        }
        let _ = self.guest.try_run(
            &format!(
                "kill -TERM -- -{p} 2>/dev/null; i=0; while kill -0 -- -{p} 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done; kill -KILL -- -{p} 2>/dev/null; true",
                p = self.pid
            ),
            Duration::from_secs(30),
        );
    }
}

impl Drop for GuestProcess<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- guest process {}", self.describe());
        }
        self.stop();
    }
}
