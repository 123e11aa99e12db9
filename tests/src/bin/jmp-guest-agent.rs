//! The test guest's agent (tests/guest/init.sh starts it; tests/src/guest.rs talks to it): runs
//! shell commands for the host and sends back their exit status and output, while the guest
//! keeps running.
//!
//! It talks over the virtio-serial port named `jmp.agent` (qemu connects it to a Unix socket
//! in the guest's private directory on the host, so only the test that booted the guest can
//! reach it: no network port, nothing another local user could run root commands through).
//! One JSON object per line each way:
//!   agent -> host, once the host is connected: `{"hello": {"uptime_ms": N}}`
//!   host -> agent: `{"id": N, "sh": "SCRIPT"}`
//!   agent -> host: `{"id": N, "code": C|null, "signal": S|null, "stdout": "...", "stderr": "..."}`
//! Requests run concurrently, each `/bin/sh -c SCRIPT` as root in its own session, cwd `/`,
//! stdin /dev/null. Output goes to files, not pipes, so that a command that leaves a background
//! process behind (a daemon started with `&`) still answers when the shell exits.

use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PORT_NAME: &str = "jmp.agent";
/// Output kept per stream and command; the rest is cut (the host only asserts on text).
const OUTPUT_CAP: u64 = 8 << 20;
const SCRATCH: &str = "/run/jmp-guest-agent";

fn main() {
    if let Err(e) = serve() {
        eprintln!("jmp-guest-agent: {e}");
        std::process::exit(1);
    }
}

/// The device of the virtio-serial port called `jmp.agent` (there is no udev in the guest to
/// make /dev/virtio-ports/NAME).
fn find_port() -> Result<PathBuf, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == PORT_NAME {
                    return Ok(Path::new("/dev").join(e.file_name()));
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no virtio-serial port named {PORT_NAME}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the host end is connected: the port then stops reporting a hang-up. Writes
/// before that would be dropped by qemu, reads would see end of file.
fn wait_host(port: &File) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLOUT)];
        let ready = poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0);
        let hup = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP));
        if ready > 0 && !hup {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

fn serve() -> Result<(), String> {
    let path = find_port()?;
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::create_dir_all(SCRATCH).map_err(|e| format!("{SCRATCH}: {e}"))?;
    wait_host(&port);
    let out = Arc::new(Mutex::new(
        port.try_clone().map_err(|e| format!("dup: {e}"))?,
    ));
    send(&out, &json!({"hello": {"uptime_ms": uptime_ms()}}));
    let mut reader = BufReader::new(port);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            // End of file: the host end is not connected (now). The guest lives until the
            // host kills it; wait for a connection again.
            Ok(0) => {
                wait_host(reader.get_ref());
                continue;
            }
            Ok(_) => {}
            Err(e) => return Err(format!("read {}: {e}", path.display())),
        }
        let req: Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("jmp-guest-agent: bad request ({e}): {line:?}");
                continue;
            }
        };
        let (Some(id), Some(script)) = (req["id"].as_u64(), req["sh"].as_str()) else {
            eprintln!("jmp-guest-agent: request without id or sh: {line:?}");
            continue;
        };
        let script = script.to_string();
        let out = out.clone();
        std::thread::spawn(move || {
            let reply = execute(id, &script);
            send(&out, &reply);
        });
    }
}

fn send(out: &Mutex<File>, v: &Value) {
    let mut text = v.to_string();
    text.push('\n');
    let mut f = out.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = f.write_all(text.as_bytes()).and_then(|_| f.flush()) {
        eprintln!("jmp-guest-agent: write: {e}");
    }
}

fn execute(id: u64, script: &str) -> Value {
    let files = |tag: &str| PathBuf::from(SCRATCH).join(format!("{id}.{tag}"));
    let (out_path, err_path) = (files("out"), files("err"));
    let result = (|| -> std::io::Result<std::process::ExitStatus> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(File::create(&out_path)?)
            .stderr(File::create(&err_path)?);
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(Into::into));
        }
        cmd.status()
    })();
    let read = |p: &Path| {
        let mut buf = Vec::new();
        if let Ok(f) = File::open(p) {
            let _ = f.take(OUTPUT_CAP).read_to_end(&mut buf);
        }
        let _ = std::fs::remove_file(p);
        String::from_utf8_lossy(&buf).into_owned()
    };
    let (stdout, mut stderr) = (read(&out_path), read(&err_path));
    match result {
        Ok(st) => json!({
            "id": id, "code": st.code(), "signal": st.signal(),
            "stdout": stdout, "stderr": stderr,
        }),
        Err(e) => {
            stderr.push_str(&format!("jmp-guest-agent: cannot run /bin/sh: {e}\n"));
            json!({"id": id, "code": null, "signal": null, "stdout": stdout, "stderr": stderr})
        }
    }
}
