//! Serial echo: a "board" (an echo thread on a pty master) reached three ways, measured from a
//! client that opens a tty: the board's own pty slave (the floor), jmp's local pty (jmpd exports
//! the slave as `type: serial`), and ser2net (`chardelay: false`) + a socat local pty. Two
//! reference relays (`relay.rs`) show the bounds: the least any two-process relay costs here,
//! and the least a relay over jmp's QUIC endpoints costs.

use crate::jmp::{start_attach, start_jmpd, Attach, Bins, Exporter};
use crate::proc::{free_port, wait_listening, wait_path, which, Proc, TempDir};
use crate::stats::{cell, json, median, percentile, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::{command, Options};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const LATENCY_ITERS: usize = 2000;
pub const WARMUP_ITERS: usize = 200;
pub const BULK_BYTES: usize = 4 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Raw mode (cfmakeraw) on a tty fd.
pub fn set_raw(fd: RawFd) -> Result<()> {
    // SAFETY: plain termios calls on a valid fd with a zeroed, then kernel-filled struct.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(std::io::Error::last_os_error()).context("tcgetattr");
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(std::io::Error::last_os_error()).context("tcsetattr");
        }
    }
    Ok(())
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a valid fd.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Waits until `fd` is readable (or writable); false on timeout.
fn poll(fd: RawFd, events: libc::c_short, timeout: Duration) -> Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        return Ok(r > 0);
    }
}

/// The board: a pty whose master echoes everything back, on its own thread.
pub struct Board {
    pub path: PathBuf,
    _slave: OwnedFd,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Board {
    pub fn new() -> Result<Board> {
        let pty = nix::pty::openpty(None, None).context("openpty")?;
        set_raw(pty.slave.as_raw_fd())?;
        let path = nix::unistd::ttyname(pty.slave.as_fd()).context("ttyname")?;
        let stop = Arc::new(AtomicBool::new(false));
        let master = File::from(pty.master);
        // Non-blocking, so that a stuck path never wedges the board thread (and its join).
        set_nonblocking(master.as_raw_fd());
        // Like a UART, receiving never waits for sending: one thread reads the master into an
        // unbounded queue, another writes the queue back. (An echo loop that stops reading while
        // its write is blocked deadlocks jmpd's serial driver; see docs/benchmarks.md.)
        let master = Arc::new(master);
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (st, m) = (stop.clone(), master.clone());
        let reader = std::thread::spawn(move || {
            let fd = m.as_raw_fd();
            let mut buf = vec![0u8; 64 * 1024];
            while !st.load(Ordering::Relaxed) {
                if !poll(fd, libc::POLLIN, Duration::from_millis(100)).unwrap_or(false) {
                    continue;
                }
                match (&*m).read(&mut buf) {
                    Ok(n) if n > 0 => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    // EIO while no one has the slave open, or a spurious wake-up.
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        let st = stop.clone();
        let writer = std::thread::spawn(move || {
            let fd = master.as_raw_fd();
            while !st.load(Ordering::Relaxed) {
                let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) else {
                    continue;
                };
                let mut out = &chunk[..];
                while !out.is_empty() && !st.load(Ordering::Relaxed) {
                    match (&*master).write(out) {
                        Ok(k) => out = &out[k..],
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            let _ = poll(fd, libc::POLLOUT, Duration::from_millis(100));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            }
        });
        Ok(Board {
            path,
            // The board keeps a slave fd so the master never sees a hangup between clients.
            _slave: pty.slave,
            stop,
            threads: vec![reader, writer],
        })
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The measuring client's tty: opened non-blocking, raw, flushed.
pub struct Client {
    f: File,
}

impl Client {
    pub fn open(path: &Path) -> Result<Client> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        set_raw(f.as_raw_fd())?;
        let c = Client { f };
        c.drain()?;
        Ok(c)
    }

    /// Discards whatever is waiting to be read (stale echo from an earlier test).
    pub fn drain(&self) -> Result<()> {
        let mut buf = [0u8; 4096];
        while poll(self.f.as_raw_fd(), libc::POLLIN, Duration::from_millis(50))? {
            match (&self.f).read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write_all(f: &File, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            match (&*f).write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !poll(f.as_raw_fd(), libc::POLLOUT, IO_TIMEOUT)? {
                        bail!("tty not writable for {IO_TIMEOUT:?}");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_some(f: &File, buf: &mut [u8]) -> Result<usize> {
        loop {
            match (&*f).read(buf) {
                Ok(0) => bail!("end of file on the tty"),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !poll(f.as_raw_fd(), libc::POLLIN, IO_TIMEOUT)? {
                        bail!("no echo for {IO_TIMEOUT:?}");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One round trip of byte `b`, in µs (the echo is checked).
    pub fn round_trip(&self, b: u8) -> Result<f64> {
        let mut buf = [0u8; 64];
        let t0 = Instant::now();
        Self::write_all(&self.f, &[b])?;
        let n = Self::read_some(&self.f, &mut buf)?;
        let dt = t0.elapsed();
        if n != 1 || buf[0] != b {
            bail!("echo mismatch: sent {:?}, got {:?}", [b], &buf[..n]);
        }
        Ok(dt.as_secs_f64() * 1e6)
    }

    /// One round trip of `data` (written whole, then read until as many bytes came back), in
    /// µs; the echo is checked.
    pub fn echo(&self, data: &[u8]) -> Result<f64> {
        let mut back = vec![0u8; data.len()];
        let t0 = Instant::now();
        Self::write_all(&self.f, data)?;
        let mut got = 0;
        while got < data.len() {
            got += Self::read_some(&self.f, &mut back[got..])?;
        }
        let dt = t0.elapsed();
        if back != data {
            let at = back.iter().zip(data).position(|(a, b)| a != b);
            bail!("echo of {} bytes differs at byte {at:?}", data.len());
        }
        Ok(dt.as_secs_f64() * 1e6)
    }

    /// Round trips of one byte at a person's typing rate: one key every `gap` (the path is
    /// idle between keys, so every byte pays the wake-ups from sleep), in µs.
    pub fn latency_paced(&self, iters: usize, gap: Duration) -> Result<Vec<f64>> {
        self.drain()?;
        for i in 0..20 {
            self.round_trip(i as u8)?;
        }
        let mut out = Vec::with_capacity(iters);
        let mut next = Instant::now();
        for i in 0..iters {
            next += gap;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            out.push(self.round_trip((i % 251) as u8)?);
        }
        Ok(out)
    }

    /// Round trips of one byte, in µs (after a warm-up).
    pub fn latency(&self, iters: usize) -> Result<Vec<f64>> {
        self.drain()?;
        let mut out = Vec::with_capacity(iters);
        let mut buf = [0u8; 64];
        for i in 0..WARMUP_ITERS + iters {
            let b = [(i % 251) as u8];
            let t0 = Instant::now();
            Self::write_all(&self.f, &b)?;
            let n = Self::read_some(&self.f, &mut buf)?;
            let dt = t0.elapsed();
            if n != 1 || buf[0] != b[0] {
                bail!("echo mismatch: sent {:?}, got {:?}", b, &buf[..n]);
            }
            if i >= WARMUP_ITERS {
                out.push(dt.as_secs_f64() * 1e6);
            }
        }
        Ok(out)
    }

    /// Writes `total` bytes while a second thread reads the echo. Throughput counts the bytes
    /// that came back, from the first write to the last byte back; the reader stops when all
    /// came back or nothing arrived for [`BULK_IDLE`]. Every byte is checked: a path that drops
    /// bytes reports how many and where the first difference was.
    pub fn bulk(&self, total: usize) -> Result<Bulk> {
        self.drain()?;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let reader = self.f.try_clone()?;
        let t0 = Instant::now();
        let r = std::thread::spawn(move || -> Result<(usize, Instant, Option<usize>)> {
            let mut got = 0usize;
            let mut last = Instant::now();
            let mut first_diff = None;
            let mut buf = vec![0u8; 64 * 1024];
            while got < total {
                if !poll(reader.as_raw_fd(), libc::POLLIN, BULK_IDLE)? {
                    break;
                }
                let n = match (&reader).read(&mut buf) {
                    Ok(0) => bail!("end of file on the tty"),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e.into()),
                };
                last = Instant::now();
                if first_diff.is_none() {
                    first_diff = (0..n)
                        .find(|k| buf[*k] != ((got + k) % 251) as u8)
                        .map(|k| got + k);
                }
                got += n;
            }
            Ok((got, last, first_diff))
        });
        let w = data
            .chunks(4096)
            .try_for_each(|c| Self::write_all(&self.f, c));
        let (got, end, first_diff) = r.join().map_err(|_| anyhow!("reader panicked"))??;
        w?;
        if got == 0 {
            bail!("nothing echoed");
        }
        Ok(Bulk {
            mb_s: got as f64 / (end - t0).as_secs_f64() / 1e6,
            lost: total.saturating_sub(got),
            first_diff,
        })
    }
}

/// Idle time after which the bulk reader stops waiting for more echo.
pub const BULK_IDLE: Duration = Duration::from_secs(2);

/// A bulk echo result.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    /// 10^6 bytes per second of bytes that came back.
    pub mb_s: f64,
    /// Bytes written that never came back.
    pub lost: usize,
    /// Offset of the first byte that differs from what was written (lost or changed bytes).
    pub first_diff: Option<usize>,
}

/// One way of reaching a board, with everything it needs kept alive.
pub(crate) struct Route {
    pub(crate) name: String,
    /// Reference relays are measured for latency only (the UDP one drops bytes under load).
    latency_only: bool,
    pub(crate) client: Client,
    /// The relaying processes (client side first), for their memory.
    pub(crate) procs: Vec<Proc>,
    _board: Board,
}

pub(crate) fn direct() -> Result<Route> {
    let board = Board::new()?;
    Ok(Route {
        name: "direct pty (floor)".into(),
        latency_only: false,
        client: Client::open(&board.path)?,
        procs: vec![],
        _board: board,
    })
}

pub(crate) fn jmp(bins: &Bins, dir: &TempDir, name: &str) -> Result<Route> {
    let board = Board::new()?;
    let exp: Exporter = start_jmpd(
        bins,
        dir,
        &[(
            "console",
            format!(
                "{{type: serial, path: {}, baudrate: 115200}}",
                board.path.display()
            ),
        )],
    )?;
    let att: Attach = start_attach(bins, dir, &exp, &[])?;
    let local = att.local("console")?;
    let client = Client::open(Path::new(&local))?;
    Ok(Route {
        name: name.into(),
        latency_only: false,
        client,
        // Attach first so it stops before the exporter.
        procs: vec![att.proc, exp.jmpd.proc],
        _board: board,
    })
}

/// The name of the relayed path.
pub const VIA_RELAY: &str = "jmp via relay";

/// jmp through the controller's relay (`jmp attach --via relay`).
fn jmp_relay(bins: &Bins, dir: &TempDir) -> Result<Route> {
    let board = Board::new()?;
    let r = crate::via_relay::start(
        bins,
        dir,
        &[(
            "console",
            format!(
                "{{type: serial, path: {}, baudrate: 115200}}",
                board.path.display()
            ),
        )],
    )?;
    let local = r.attach.local("console")?;
    let client = Client::open(Path::new(&local))?;
    let mut procs = vec![r.attach.proc];
    procs.extend(r.procs);
    Ok(Route {
        name: VIA_RELAY.into(),
        latency_only: false,
        client,
        procs,
        _board: board,
    })
}

pub(crate) fn ser2net(dir: &TempDir) -> Result<Route> {
    ser2net_with(dir, false)
}

/// ser2net + socat; `nodelay`: TCP_NODELAY on both ends (ser2net's `tcp(nodelay)` accepter,
/// socat's `nodelay`). Without it, ser2net's writes of more than a few bytes wait ~40 ms for
/// socat's delayed ACK (Nagle), which the `growth` benchmark shows.
pub(crate) fn ser2net_with(dir: &TempDir, nodelay: bool) -> Result<Route> {
    let ser2net = which("ser2net").ok_or_else(|| anyhow!("ser2net is not installed"))?;
    let socat = which("socat").ok_or_else(|| anyhow!("socat is not installed"))?;
    let board = Board::new()?;
    let port = free_port()?;
    let cfg = dir.join("ser2net.yaml");
    std::fs::write(
        &cfg,
        format!(
            "connection: &con0\n  accepter: tcp{},127.0.0.1,{port}\n  \
             connector: serialdev,{},115200n81,local\n  options:\n    chardelay: false\n",
            if nodelay { "(nodelay)" } else { "" },
            board.path.display()
        ),
    )?;
    let mut s2n = Proc::start(
        "ser2net",
        command(ser2net)
            .args(["-n", "-d", "-u", "-c"])
            .arg(&cfg)
            .arg("-P")
            .arg(dir.join("ser2net.pid")),
        dir.path(),
        Options::LOG,
    )?;
    wait_listening(port, &mut s2n, Duration::from_secs(10))?;
    let link = dir.join("socat-pty");
    let mut socat = Proc::start(
        "socat",
        command(socat)
            .arg(format!("pty,link={},raw,echo=0", link.display()))
            .arg(format!(
                "tcp:127.0.0.1:{port}{}",
                if nodelay { ",nodelay" } else { "" }
            )),
        dir.path(),
        Options::LOG,
    )?;
    wait_path(&link, &mut socat, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(200));
    let client = Client::open(&link)?;
    Ok(Route {
        name: if nodelay {
            "ser2net + socat, nodelay"
        } else {
            "ser2net + socat"
        }
        .into(),
        latency_only: false,
        client,
        procs: vec![socat, s2n],
        _board: board,
    })
}

pub const UDP_BOUND: &str = "bound: plain UDP relay";
pub const QUIC_BOUND: &str = "bound: bare quinn relay";
pub const SPIN_BOUND: &str = "bound: UDP relay, 200 µs busy-poll";

/// A reference relay pair (see `relay.rs`), run as children of this binary: `server` on the
/// board's tty prints what `client` needs; `client` prints the local pty it made.
fn reference(
    dir: &TempDir,
    name: &'static str,
    server: &str,
    client: &str,
    extra: &[&str],
) -> Result<Route> {
    let board = Board::new()?;
    let me = std::env::current_exe().context("own executable")?;
    let mut srv = Proc::start(
        server,
        command(&me)
            .args(["relay", server])
            .arg(&board.path)
            .args(extra),
        dir.path(),
        Options::LINES,
    )?;
    let hello = srv.next_line(Duration::from_secs(10))?;
    let mut cli = Proc::start(
        client,
        command(&me)
            .args(["relay", client])
            .args(hello.split_whitespace()),
        dir.path(),
        Options::LINES,
    )?;
    let local = cli.next_line(Duration::from_secs(10))?;
    let client = Client::open(Path::new(local.trim()))?;
    Ok(Route {
        name: name.into(),
        latency_only: true,
        client,
        procs: vec![cli, srv],
        _board: board,
    })
}

#[derive(Default)]
struct Rounds {
    p50: Vec<f64>,
    p99: Vec<f64>,
    bulk: Vec<f64>,
    lost: Vec<f64>,
    typing_p50: Vec<f64>,
    typing_p99: Vec<f64>,
}

/// Keystrokes per round of the typing-rate measurement, and the time between them (20 keys/s:
/// a person typing; between keys every process on the path goes idle, so each byte pays the
/// wake-ups from sleep that back-to-back round trips hide).
const TYPING_KEYS: usize = 150;
const TYPING_GAP: Duration = Duration::from_millis(50);

/// The name of the `--compare-bin-dir` build's path.
pub const COMPARE: &str = "jmp (--compare-bin-dir)";

/// Runs the serial benchmark; returns (markdown, json).
pub fn run(
    bins: &Bins,
    compare: Option<&Bins>,
    rounds: usize,
) -> Result<(String, serde_json::Value)> {
    let dir_jmp = TempDir::new("serial-jmp");
    let dir_cmp = TempDir::new("serial-jmp-compare");
    let dir_s2n = TempDir::new("serial-ser2net");
    let dir_ref = TempDir::new("serial-reference");
    let dir_relay = TempDir::new("serial-relay");
    let mut skips = Vec::new();
    let mut paths = vec![direct().context("direct pty")?];
    match jmp(bins, &dir_jmp, "jmp") {
        Ok(p) => paths.push(p),
        Err(e) => skips.push(format!("SKIP: jmp path: {e:#}")),
    }
    if let Some(c) = compare {
        // Another build of jmp (`--compare-bin-dir`), e.g. an earlier commit, measured in the
        // same interleaved rounds.
        match jmp(c, &dir_cmp, COMPARE) {
            Ok(p) => paths.push(p),
            Err(e) => skips.push(format!("SKIP: {COMPARE} path: {e:#}")),
        }
    }
    match jmp_relay(bins, &dir_relay) {
        Ok(p) => paths.push(p),
        Err(e) => skips.push(format!("SKIP: {VIA_RELAY} path: {e:#}")),
    }
    match ser2net(&dir_s2n) {
        Ok(p) => paths.push(p),
        Err(e) => skips.push(format!("SKIP: ser2net + socat path: {e:#}")),
    }
    for (name, server, client, extra) in [
        (UDP_BOUND, "udp-tty", "udp-pty", &[][..]),
        (SPIN_BOUND, "udp-tty", "udp-pty", &["200"][..]),
        (QUIC_BOUND, "quic-server", "quic-client", &[][..]),
    ] {
        match reference(&dir_ref, name, server, client, extra) {
            Ok(p) => paths.push(p),
            Err(e) => skips.push(format!("SKIP: {name}: {e:#}")),
        }
    }
    for s in &skips {
        eprintln!("{s}");
    }
    let mut res: Vec<Rounds> = paths.iter().map(|_| Rounds::default()).collect();
    for r in 0..rounds {
        for (p, out) in paths.iter().zip(res.iter_mut()) {
            let lat = p
                .client
                .latency(LATENCY_ITERS)
                .with_context(|| format!("{} latency", p.name));
            let (p50, p99) = match lat {
                Ok(l) => (percentile(&l, 50.0), percentile(&l, 99.0)),
                Err(e) => {
                    eprintln!("  round {}: {}: {e:#}", r + 1, p.name);
                    (f64::NAN, f64::NAN)
                }
            };
            let (t50, t99) = match p.client.latency_paced(TYPING_KEYS, TYPING_GAP) {
                Ok(l) => (percentile(&l, 50.0), percentile(&l, 99.0)),
                Err(e) => {
                    eprintln!("  round {}: {} typing: {e:#}", r + 1, p.name);
                    (f64::NAN, f64::NAN)
                }
            };
            out.typing_p50.push(t50);
            out.typing_p99.push(t99);
            let bulk = if p.latency_only {
                Ok(Bulk {
                    mb_s: f64::NAN,
                    lost: 0,
                    first_diff: None,
                })
            } else {
                p.client.bulk(BULK_BYTES)
            };
            let (bulk, lost) = match bulk {
                Ok(b) => {
                    if let Some(d) = b.first_diff {
                        eprintln!(
                            "  round {}: {} bulk: {} of {BULK_BYTES} bytes never came back; \
                             the echo first differs at byte {d}",
                            r + 1,
                            p.name,
                            b.lost
                        );
                    }
                    let lost = if p.latency_only {
                        f64::NAN
                    } else {
                        b.lost as f64
                    };
                    (b.mb_s, lost)
                }
                Err(e) => {
                    eprintln!("  round {}: {} bulk: {e:#}", r + 1, p.name);
                    (f64::NAN, f64::NAN)
                }
            };
            eprintln!(
                "  serial round {}: {:<24} p50 {:>7.1} µs  p99 {:>7.1} µs  typing p50 {:>7.1} µs  p99 {:>7.1} µs  bulk {:>7} MB/s",
                r + 1,
                p.name,
                p50,
                p99,
                t50,
                t99,
                cell(bulk, 1)
            );
            out.p50.push(p50);
            out.p99.push(p99);
            out.bulk.push(bulk);
            out.lost.push(lost);
        }
    }
    let med: Vec<(f64, f64, f64)> = res
        .iter()
        .map(|r| (median(&r.p50), median(&r.p99), median(&r.bulk)))
        .collect();
    let find = |name: &str| {
        paths
            .iter()
            .position(|p| p.name == name)
            .map(|i| med[i])
            .unwrap_or((f64::NAN, f64::NAN, f64::NAN))
    };
    let floor = med[0];
    let jm = find("jmp");
    let s2n = find("ser2net + socat");
    let typing: Vec<(f64, f64)> = res
        .iter()
        .map(|r| (median(&r.typing_p50), median(&r.typing_p99)))
        .collect();
    let find_typing = |name: &str| {
        paths
            .iter()
            .position(|p| p.name == name)
            .map(|i| typing[i])
            .unwrap_or((f64::NAN, f64::NAN))
    };

    let mut md = format!(
        "### Serial echo round trip and bulk\n\n1-byte round trips ({LATENCY_ITERS} per round \
         after {WARMUP_ITERS} warm-up), typing = {TYPING_KEYS} round trips per round at {} \
         keys/s, bulk = {} MiB written while reading the echo. Medians over {rounds} \
         interleaved rounds.\n\n\
         | path | p50 µs | p99 µs | typing p50 µs | typing p99 µs | bulk MB/s | p50 × floor | \
         bulk × floor | bytes lost (all rounds) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        1000 / TYPING_GAP.as_millis(),
        BULK_BYTES >> 20
    );
    let lost: Vec<f64> = res.iter().map(|r| r.lost.iter().sum()).collect();
    for (((p, m), l), t) in paths.iter().zip(&med).zip(&lost).zip(&typing) {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.name,
            cell(m.0, 1),
            cell(m.1, 1),
            cell(t.0, 1),
            cell(t.1, 1),
            cell(m.2, 1),
            cell(m.0 / floor.0, 2),
            cell(m.2 / floor.2, 3),
            cell(*l, 0)
        ));
    }
    let jmp_lost = paths
        .iter()
        .position(|p| p.name == "jmp")
        .map(|i| lost[i])
        .unwrap_or(f64::NAN);
    let lat_ratio = jm.0 / s2n.0;
    let bulk_ratio = jm.2 / s2n.2;
    let t_lat = Target::AtMost(0.7);
    let t_bulk = Target::AtLeast(2.0);
    // Throughput bought by dropping bytes does not meet a bulk target.
    let bulk_verdict = if jmp_lost > 0.0 {
        "MISS (bytes lost)"
    } else {
        t_bulk.verdict(bulk_ratio)
    };
    md.push_str(&format!(
        "\n- jmp p50 / ser2net+socat p50 = {} (target {}): **{}**\n\
         - jmp bulk / ser2net+socat bulk = {} (target {}): **{}**\n",
        cell(lat_ratio, 2),
        t_lat.describe(),
        t_lat.verdict(lat_ratio),
        cell(bulk_ratio, 2),
        t_bulk.describe(),
        bulk_verdict
    ));
    let udp = find(UDP_BOUND);
    let quic = find(QUIC_BOUND);
    let spin = find(SPIN_BOUND);
    md.push_str(&format!(
        "- {UDP_BOUND} p50 / ser2net+socat p50 = {}: the least a two-process relay costs on this \
         machine (blocking poll loops over plain UDP, no encryption, no runtime). A target below \
         it cannot be met by any relay that sleeps between bytes.\n\
         - jmp p50 / {QUIC_BOUND} p50 = {}: what jmp's protocol and features add to QUIC and \
         the runtime; {QUIC_BOUND} / {UDP_BOUND} = {}: what QUIC and the runtime add to a \
         plain relay.\n\
         - {SPIN_BOUND} p50 / ser2net+socat p50 = {}: busy-polling instead of sleeping (each relay \
         keeps a CPU busy while bytes flow, competing with the board and the client for the \
         cores).\n",
        cell(udp.0 / s2n.0, 2),
        cell(jm.0 / quic.0, 2),
        cell(quic.0 / udp.0, 2),
        cell(spin.0 / s2n.0, 2),
    ));
    let (jt, st, ut) = (
        find_typing("jmp"),
        find_typing("ser2net + socat"),
        find_typing(UDP_BOUND),
    );
    md.push_str(&format!(
        "- jmp ÷ ser2net+socat: back to back p50 {} / p99 {}; typing p50 {} / p99 {} \
         (issue 22 goal ≤ 1.0)\n\
         - jmp ÷ {UDP_BOUND}: back to back p50 {} / p99 {}; typing p50 {} / p99 {} \
         (issue 22 goal ≤ 1.15 back to back)\n",
        cell(jm.0 / s2n.0, 2),
        cell(jm.1 / s2n.1, 2),
        cell(jt.0 / st.0, 2),
        cell(jt.1 / st.1, 2),
        cell(jm.0 / udp.0, 2),
        cell(jm.1 / udp.1, 2),
        cell(jt.0 / ut.0, 2),
        cell(jt.1 / ut.1, 2),
    ));
    if compare.is_some() {
        let (c, ct) = (find(COMPARE), find_typing(COMPARE));
        md.push_str(&format!(
            "- jmp ÷ {COMPARE}: back to back p50 {} / p99 {}; typing p50 {} / p99 {}\n",
            cell(jm.0 / c.0, 2),
            cell(jm.1 / c.1, 2),
            cell(jt.0 / ct.0, 2),
            cell(jt.1 / ct.1, 2),
        ));
    }
    let rel = find(VIA_RELAY);
    md.push_str(&format!(
        "- {VIA_RELAY} / jmp: p50 × {}, bulk × {} (the relay is one more hop: the controller \
         receives and resends each batch of datagrams)\n",
        cell(rel.0 / jm.0, 2),
        cell(rel.2 / jm.2, 2),
    ));
    for s in &skips {
        md.push_str(&format!("- {s}\n"));
    }
    let js = serde_json::json!({
        "latency_iterations": LATENCY_ITERS,
        "bulk_bytes": BULK_BYTES,
        "rounds": rounds,
        "paths": paths.iter().zip(&res).zip(&med).map(|((p, r), m)| serde_json::json!({
            "name": p.name,
            "p50_us": json(m.0), "p99_us": json(m.1), "bulk_mb_s": json(m.2),
            "typing_p50_us": json(median(&r.typing_p50)), "typing_p99_us": json(median(&r.typing_p99)),
            "rounds": {
                "typing_p50_us": r.typing_p50.iter().map(|v| json(*v)).collect::<Vec<_>>(),
                "typing_p99_us": r.typing_p99.iter().map(|v| json(*v)).collect::<Vec<_>>(),
                "p50_us": r.p50.iter().map(|v| json(*v)).collect::<Vec<_>>(),
                "p99_us": r.p99.iter().map(|v| json(*v)).collect::<Vec<_>>(),
                "bulk_mb_s": r.bulk.iter().map(|v| json(*v)).collect::<Vec<_>>(),
                "bulk_bytes_lost": r.lost.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            },
        })).collect::<Vec<_>>(),
        "targets": [
            {"what": "jmp p50 / ser2net+socat p50", "value": json(lat_ratio), "target": t_lat.describe(), "verdict": t_lat.verdict(lat_ratio)},
            {"what": "jmp bulk / ser2net+socat bulk", "value": json(bulk_ratio), "target": t_bulk.describe(), "verdict": bulk_verdict},
        ],
        "bounds": {
            "udp_relay_p50_over_ser2net": json(udp.0 / s2n.0),
            "jmp_p50_over_quinn_relay": json(jm.0 / quic.0),
            "quinn_relay_p50_over_udp_relay": json(quic.0 / udp.0),
            "busy_poll_udp_relay_p50_over_ser2net": json(spin.0 / s2n.0),
            "via_relay_p50_over_jmp": json(rel.0 / jm.0),
            "via_relay_bulk_over_jmp": json(rel.2 / jm.2),
        },
        "skips": skips,
    });
    // Close clients before the processes behind them stop.
    drop(paths);
    Ok((md, js))
}
