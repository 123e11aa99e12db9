//! Processes for the benchmarks: the e2e harness's ([`jmp_e2e::proc`]: started as a terminal
//! would, killed by PID and reaped on drop, even when a benchmark fails), plus waits that only
//! benchmarks need (a TCP port listening, a path appearing) and memory readings.

use anyhow::{anyhow, bail, Result};
pub use jmp_e2e::{command, which, Options, Proc, TempDir};
use std::path::Path;
use std::time::{Duration, Instant};

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

/// A currently free TCP port on 127.0.0.1.
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

/// Waits until `ready` holds, or fails (with `proc`'s log) when `proc` exits or after `timeout`.
pub fn wait_for(
    what: &str,
    proc: &mut Proc,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        if !proc.is_running() {
            bail!("{} exited; its log:\n{}", proc.label, proc.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "{} not ready after {timeout:?} ({what}); its log:\n{}",
        proc.label,
        proc.log_tail(20)
    )
}

/// Waits until `port` listens.
pub fn wait_listening(port: u16, proc: &mut Proc, timeout: Duration) -> Result<()> {
    wait_for(&format!("listening on port {port}"), proc, timeout, || {
        listening(port)
    })
}

/// Waits until `path` exists.
pub fn wait_path(path: &Path, proc: &mut Proc, timeout: Duration) -> Result<()> {
    wait_for(&format!("{} exists", path.display()), proc, timeout, || {
        path.exists()
    })
}

/// Resident memory of `pid` in KiB (VmRSS) and its peak (VmHWM).
pub fn rss_kib(pid: i32) -> Result<(u64, u64)> {
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
