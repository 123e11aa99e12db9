//! CAN: an emulated slcan adapter (a thread on a pty master that mirrors every frame, as fast
//! as a CANable's firmware would) reached five ways by the same python-can client
//! (`benches/can_bench.py`): straight on its pty (the adapter's floor), through jmp's slcan pty
//! and jmp's socketcand port (jmpd's backend is the adapter), through python-can-remote (its
//! server on the adapter, the client's `remote` interface over a websocket), and through
//! Jumpstarter's CAN driver (its local session). Then the simulated ECU through jmp's
//! socketcand port with a Rust client (python would be the bottleneck): round trip, sustained
//! frames/s with 16 in flight, and a round trip while the ECU loads the bus with about 9,000
//! frames/s (a 1 Mbit/s bus), checking that none of the load frames is lost.

use crate::jmp::{start_attach, start_jmpd, Attach, Bins};
use crate::proc::{free_port, wait_listening, Options, Proc, TempDir};
use crate::stats::{cell, json, median, percentile, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::command;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RTT_ITERS: usize = 1000;
const SUSTAINED_FRAMES: usize = 5000;
const SIM_RTT_ITERS: usize = 5000;
const SIM_SUSTAINED: usize = 100_000;

/// The emulated adapter: mirrors every frame line (and acknowledges it, `z`), answers `\r` to
/// commands.
struct Adapter {
    path: PathBuf,
    _slave: OwnedFd,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Adapter {
    fn new() -> Result<Adapter> {
        let p = nix::pty::openpty(None, None).context("openpty")?;
        crate::serial::set_raw(p.slave.as_raw_fd())?;
        let path = nix::unistd::ttyname(&p.slave).context("ttyname")?;
        let master = std::fs::File::from(p.master);
        crate::serial::set_nonblocking(master.as_raw_fd());
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut m = master;
            let mut buf = vec![0u8; 64 * 1024];
            let mut line = Vec::new();
            let mut out = Vec::new();
            while !st.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: m.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    continue;
                }
                let n = match m.read(&mut buf) {
                    Ok(n) if n > 0 => n,
                    _ => {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                };
                out.clear();
                for &c in &buf[..n] {
                    if c != b'\r' {
                        line.push(c);
                        continue;
                    }
                    match line.first() {
                        Some(b't' | b'T' | b'r' | b'R' | b'd' | b'D' | b'b' | b'B') => {
                            out.extend_from_slice(&line);
                            out.extend_from_slice(b"\rz\r");
                        }
                        Some(b'V') => out.extend_from_slice(b"V1013\r"),
                        _ => out.push(b'\r'),
                    }
                    line.clear();
                }
                let mut o = &out[..];
                while !o.is_empty() && !st.load(Ordering::Relaxed) {
                    match m.write(o) {
                        Ok(k) => o = &o[k..],
                        Err(_) => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
            }
        });
        Ok(Adapter {
            path,
            _slave: p.slave,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn python() -> Result<PathBuf> {
    jmp_e2e::venv_python(&["can", "can_remote"]).map_err(|e| anyhow!("SKIP: {e}"))
}

fn endpoint(a: &Attach, dev: &str, role: &str) -> Result<String> {
    a.ready["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == dev))
        .and_then(|d| d["endpoints"].as_array())
        .and_then(|e| e.iter().find(|e| e["role"] == role))
        .and_then(|e| e["at"].as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no {role} endpoint for {dev}: {}", a.ready))
}

/// One python-can path: the Bus arguments and what keeps it alive.
struct PyPath {
    name: &'static str,
    spec: serde_json::Value,
    _procs: Vec<Proc>,
    _adapter: Option<Arc<Adapter>>,
}

fn bench_py(
    py: &PathBuf,
    spec: &serde_json::Value,
    mode: &str,
    n: usize,
) -> Result<serde_json::Value> {
    let script = crate::jmp::workspace_dir().join("benches/can_bench.py");
    let out = command(py)
        .arg(script)
        .arg(spec.to_string())
        .arg(mode)
        .arg(n.to_string())
        .output()
        .context("run can_bench.py")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim().lines().last().unwrap_or(""))
        .with_context(|| {
            format!(
                "can_bench.py {mode}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
        })?;
    if let Some(e) = v.get("error") {
        bail!("can_bench.py {mode}: {e}");
    }
    Ok(v)
}

fn slcan_spec(path: &str) -> serde_json::Value {
    serde_json::json!({"interface": "slcan", "channel": path, "bitrate": 500000, "sleep_after_open": 0})
}

/// A minimal socketcand client for the simulated ECU.
struct Scd {
    s: std::net::TcpStream,
    buf: Vec<u8>,
}

impl Scd {
    fn open(addr: &str, bus: &str) -> Result<Scd> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = Scd { s, buf: Vec::new() };
        c.expect("< hi >")?;
        c.s.write_all(format!("< open {bus} >").as_bytes())?;
        c.expect("< ok >")?;
        c.s.write_all(b"< rawmode >")?;
        c.expect("< ok >")?;
        Ok(c)
    }
    fn expect(&mut self, m: &str) -> Result<()> {
        let got = self.msg()?;
        if got != m {
            bail!("expected {m:?}, got {got:?}");
        }
        Ok(())
    }
    fn msg(&mut self) -> Result<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'>') {
                let m: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&m).trim().to_string());
            }
            let mut b = [0u8; 65536];
            let n = self.s.read(&mut b)?;
            if n == 0 {
                bail!("socketcand connection closed");
            }
            self.buf.extend_from_slice(&b[..n]);
        }
    }
    fn send(&mut self, id: u32, v: u64) -> Result<()> {
        let d = v.to_be_bytes();
        let bytes: Vec<String> = d.iter().map(|b| format!("{b:x}")).collect();
        self.s
            .write_all(format!("< send {id:03X} 8 {} >", bytes.join(" ")).as_bytes())?;
        Ok(())
    }
}

/// Load-frame counters seen in a message (id 0x7ff), to check that none is skipped.
fn load_counter(m: &str) -> Option<u64> {
    let rest = m.strip_prefix("< frame 7FF ")?;
    let hex = rest.split_whitespace().nth(1)?;
    u64::from_str_radix(hex, 16).ok()
}

struct SimResult {
    p50: f64,
    p99: f64,
    loaded_p50: f64,
    sustained: f64,
    load_fps: f64,
    load_lost: u64,
}

fn sim_round(ecu: &str, loaded: &str) -> Result<SimResult> {
    let mut c = Scd::open(ecu, "ecu")?;
    let mut lat = Vec::with_capacity(SIM_RTT_ITERS);
    for i in 0..(SIM_RTT_ITERS + 200) as u64 {
        let t0 = Instant::now();
        c.send(0x123, i)?;
        let want = format!("{:016X} >", i);
        while !c.msg()?.ends_with(&want) {}
        if i >= 200 {
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    // Sustained: 16 in flight.
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut got = 0u64;
    while sent < 16 {
        c.send(0x124, sent)?;
        sent += 1;
    }
    while got < SIM_SUSTAINED as u64 {
        let m = c.msg()?;
        if m.starts_with("< frame 124 ") {
            got += 1;
            if sent < SIM_SUSTAINED as u64 {
                c.send(0x124, sent)?;
                sent += 1;
            }
        }
    }
    let sustained = got as f64 / t0.elapsed().as_secs_f64();
    drop(c);
    // Round trips on a loaded bus, counting the load frames and their gaps.
    let mut c = Scd::open(loaded, "loaded")?;
    let mut lat2 = Vec::new();
    let mut last: Option<u64> = None;
    let mut lost = 0u64;
    let mut frames = 0u64;
    let t0 = Instant::now();
    for i in 0..2000u64 {
        let t = Instant::now();
        c.send(0x123, i)?;
        let want = format!("{:016X} >", i);
        loop {
            let m = c.msg()?;
            if let Some(n) = load_counter(&m) {
                frames += 1;
                if let Some(l) = last {
                    lost += n.saturating_sub(l + 1);
                }
                last = Some(n);
                continue;
            }
            if m.ends_with(&want) {
                break;
            }
        }
        lat2.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let load_fps = frames as f64 / t0.elapsed().as_secs_f64();
    Ok(SimResult {
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        loaded_p50: percentile(&lat2, 50.0),
        sustained,
        load_fps,
        load_lost: lost,
    })
}

pub fn run(bins: &Bins, rounds: usize) -> Result<(String, serde_json::Value)> {
    let py = python()?;
    let dir = TempDir::new("can");
    let mut skips = Vec::new();
    let mut paths: Vec<PyPath> = Vec::new();

    let floor = Arc::new(Adapter::new()?);
    paths.push(PyPath {
        name: "adapter floor (python-can on its pty)",
        spec: slcan_spec(&floor.path.display().to_string()),
        _procs: vec![],
        _adapter: Some(floor),
    });

    // The same simulated ECU behind a second jmpd, attached with datagram channels: the
    // measurement behind the default transport (docs/benchmarks.md).
    let dir_dg = TempDir::new("can-datagram");
    let exp_dg = start_jmpd(
        bins,
        &dir_dg,
        &[
            ("ecu", "{type: can-sim, period: 0s}".to_string()),
            (
                "loaded",
                "{type: can-sim, period: 0s, load: 9000}".to_string(),
            ),
        ],
    )?;
    let att_dg = start_attach(bins, &dir_dg, &exp_dg, &["--can-transport", "datagram"])?;
    let ecu_dg = endpoint(&att_dg, "ecu", "socketcand")?;
    let loaded_dg = endpoint(&att_dg, "loaded", "socketcand")?;
    let _keep_dg = (att_dg.proc, exp_dg.jmpd.proc);

    let a_jmp = Arc::new(Adapter::new()?);
    let exp = start_jmpd(
        bins,
        &dir,
        &[
            (
                "bus",
                format!(
                    "{{type: can, slcan: {{path: {}}}, bitrate: 500000}}",
                    a_jmp.path.display()
                ),
            ),
            ("ecu", "{type: can-sim, period: 0s}".to_string()),
            (
                "loaded",
                "{type: can-sim, period: 0s, load: 9000}".to_string(),
            ),
        ],
    )?;
    let att = start_attach(bins, &dir, &exp, &[])?;
    let slcan = endpoint(&att, "bus", "slcan")?;
    let scd = endpoint(&att, "bus", "socketcand")?;
    let ecu = endpoint(&att, "ecu", "socketcand")?;
    let loaded = endpoint(&att, "loaded", "socketcand")?;
    let (host, port) = scd
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("bad address {scd}"))?;
    paths.push(PyPath {
        name: "jmp slcan",
        spec: slcan_spec(&slcan),
        _procs: vec![],
        _adapter: Some(a_jmp.clone()),
    });
    paths.push(PyPath {
        name: "jmp socketcand",
        spec: serde_json::json!({"interface": "socketcand", "host": host, "port": port.parse::<u16>()?, "channel": "bus", "tcp_tune": true}),
        _procs: vec![att.proc, exp.jmpd.proc],
        _adapter: Some(a_jmp),
    });

    // python-can-remote: its server owns the adapter.
    let a_remote = Arc::new(Adapter::new()?);
    let rport = free_port()?;
    match Proc::start(
        "can_remote",
        command(&py)
            .args(["-m", "can_remote", "-i", "slcan", "-c"])
            .arg(&a_remote.path)
            .args(["-H", "127.0.0.1", "-p", &rport.to_string()]),
        dir.path(),
        Options::LOG,
    )
    .map_err(anyhow::Error::from)
    .and_then(|mut p| wait_listening(rport, &mut p, Duration::from_secs(30)).map(|_| p))
    {
        Ok(p) => paths.push(PyPath {
            name: "python-can-remote",
            spec: serde_json::json!({"interface": "remote", "channel": format!("ws://127.0.0.1:{rport}/")}),
            _procs: vec![p],
            _adapter: Some(a_remote),
        }),
        Err(e) => skips.push(format!("SKIP: python-can-remote: {e:#}")),
    }
    let a_js = Arc::new(Adapter::new()?);
    paths.push(PyPath {
        name: "Jumpstarter CAN driver",
        spec: serde_json::json!({"jumpstarter": {"interface": "slcan", "channel": a_js.path.display().to_string()}}),
        _procs: vec![],
        _adapter: Some(a_js),
    });

    #[derive(Default)]
    struct R {
        p50: Vec<f64>,
        p99: Vec<f64>,
        fps: Vec<f64>,
        lost: f64,
    }
    let mut res: Vec<R> = paths.iter().map(|_| R::default()).collect();
    let mut sim: Vec<SimResult> = Vec::new();
    let mut sim_dg: Vec<SimResult> = Vec::new();
    for r in 0..rounds {
        for (p, out) in paths.iter().zip(res.iter_mut()) {
            let iters = if p.name.starts_with("Jumpstarter") {
                RTT_ITERS / 5
            } else {
                RTT_ITERS
            };
            let frames = if p.name.starts_with("Jumpstarter") {
                SUSTAINED_FRAMES / 5
            } else {
                SUSTAINED_FRAMES
            };
            let (p50, p99) = match bench_py(&py, &p.spec, "rtt", iters) {
                Ok(v) => (
                    v["p50_us"].as_f64().unwrap_or(f64::NAN),
                    v["p99_us"].as_f64().unwrap_or(f64::NAN),
                ),
                Err(e) => {
                    eprintln!("  round {}: {} rtt: {e:#}", r + 1, p.name);
                    (f64::NAN, f64::NAN)
                }
            };
            let fps = match bench_py(&py, &p.spec, "sustained", frames) {
                Ok(v) => {
                    let sent = v["sent"].as_f64().unwrap_or(0.0);
                    let got = v["received"].as_f64().unwrap_or(0.0);
                    out.lost += sent - got;
                    v["frames_s"].as_f64().unwrap_or(f64::NAN)
                }
                Err(e) => {
                    eprintln!("  round {}: {} sustained: {e:#}", r + 1, p.name);
                    f64::NAN
                }
            };
            eprintln!(
                "  can round {}: {:<40} p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.0} frames/s",
                r + 1,
                p.name,
                p50,
                p99,
                fps
            );
            out.p50.push(p50);
            out.p99.push(p99);
            out.fps.push(fps);
        }
        match sim_round(&ecu, &loaded) {
            Ok(s) => {
                eprintln!(
                    "  can round {}: simulated ECU: p50 {:.1} µs p99 {:.1} µs, {:.0} frames/s, loaded p50 {:.1} µs, load {:.0} frames/s, {} lost",
                    r + 1, s.p50, s.p99, s.sustained, s.loaded_p50, s.load_fps, s.load_lost
                );
                sim.push(s);
            }
            Err(e) => eprintln!("  round {}: simulated ECU: {e:#}", r + 1),
        }
        match sim_round(&ecu_dg, &loaded_dg) {
            Ok(s) => {
                eprintln!(
                    "  can round {}: simulated ECU, datagrams: p50 {:.1} µs p99 {:.1} µs, {:.0} frames/s, loaded p50 {:.1} µs, load {:.0} frames/s, {} lost",
                    r + 1, s.p50, s.p99, s.sustained, s.loaded_p50, s.load_fps, s.load_lost
                );
                sim_dg.push(s);
            }
            Err(e) => eprintln!("  round {}: simulated ECU, datagrams: {e:#}", r + 1),
        }
    }
    let med: Vec<(f64, f64, f64)> = res
        .iter()
        .map(|r| (median(&r.p50), median(&r.p99), median(&r.fps)))
        .collect();
    let find = |name: &str| {
        paths
            .iter()
            .position(|p| p.name == name)
            .map(|i| med[i])
            .unwrap_or((f64::NAN, f64::NAN, f64::NAN))
    };
    let fl = med[0];
    let rem = find("python-can-remote");
    let js = find("Jumpstarter CAN driver");
    let mut md = format!(
        "### CAN round trip and sustained frames/s\n\nThe same python-can client on every path; the \
         adapter is an emulated slcan adapter that mirrors each frame. Round trip: an 8-byte frame \
         and its mirror ({RTT_ITERS} per round, Jumpstarter {}); sustained: {SUSTAINED_FRAMES} \
         frames with 16 in flight. Medians over {rounds} interleaved rounds.\n\n\
         | path | p50 µs | p99 µs | frames/s | p50 × floor | frames/s × floor | frames lost |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        RTT_ITERS / 5
    );
    for ((p, m), r) in paths.iter().zip(&med).zip(&res) {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            p.name,
            cell(m.0, 1),
            cell(m.1, 1),
            cell(m.2, 0),
            cell(m.0 / fl.0, 2),
            cell(m.2 / fl.2, 2),
            cell(r.lost, 0)
        ));
    }
    let mut targets = Vec::new();
    fn line(
        md: &mut String,
        targets: &mut Vec<serde_json::Value>,
        what: String,
        v: f64,
        t: Target,
    ) {
        md.push_str(&format!(
            "- {what} = {} (target {}): **{}**\n",
            cell(v, 2),
            t.describe(),
            t.verdict(v)
        ));
        targets.push(serde_json::json!({"what": what, "value": json(v), "target": t.describe(), "verdict": t.verdict(v)}));
    }
    md.push('\n');
    for front in ["jmp socketcand", "jmp slcan"] {
        let j = find(front);
        line(
            &mut md,
            &mut targets,
            format!("{front} p50 / python-can-remote p50"),
            j.0 / rem.0,
            Target::AtMost(0.5),
        );
        line(
            &mut md,
            &mut targets,
            format!("{front} p50 / Jumpstarter p50"),
            j.0 / js.0,
            Target::AtMost(0.1),
        );
        line(
            &mut md,
            &mut targets,
            format!("{front} frames/s / python-can-remote frames/s"),
            j.2 / rem.2,
            Target::AtLeast(3.0),
        );
        line(
            &mut md,
            &mut targets,
            format!("{front} frames/s / adapter floor frames/s"),
            j.2 / fl.2,
            Target::AtLeast(0.9),
        );
    }
    let sp50 = median(&sim.iter().map(|s| s.p50).collect::<Vec<_>>());
    let sp99 = median(&sim.iter().map(|s| s.p99).collect::<Vec<_>>());
    let sfps = median(&sim.iter().map(|s| s.sustained).collect::<Vec<_>>());
    let lp50 = median(&sim.iter().map(|s| s.loaded_p50).collect::<Vec<_>>());
    let lfps = median(&sim.iter().map(|s| s.load_fps).collect::<Vec<_>>());
    let llost: u64 = sim.iter().map(|s| s.load_lost).sum();
    md.push_str(&format!(
        "\nSimulated ECU through jmp's socketcand port, Rust client ({SIM_RTT_ITERS} round trips, \
         {SIM_SUSTAINED} frames 16 in flight, then 2000 round trips while the ECU sends about 9000 \
         frames/s): p50 {} µs, p99 {} µs, {} frames/s sustained; on the loaded bus p50 {} µs while \
         {} load frames/s arrived, {llost} of them lost (all rounds).\n\n",
        cell(sp50, 1),
        cell(sp99, 1),
        cell(sfps, 0),
        cell(lp50, 1),
        cell(lfps, 0)
    ));
    let d = |f: fn(&SimResult) -> f64| median(&sim_dg.iter().map(f).collect::<Vec<_>>());
    let dlost: u64 = sim_dg.iter().map(|s| s.load_lost).sum();
    md.push_str(&format!(
        "The same over QUIC datagrams (`--can-transport datagram`): p50 {} µs, p99 {} µs, {} \
         frames/s sustained; loaded p50 {} µs, {} load frames/s, {dlost} lost.\n\n",
        cell(d(|s| s.p50), 1),
        cell(d(|s| s.p99), 1),
        cell(d(|s| s.sustained), 0),
        cell(d(|s| s.loaded_p50), 1),
        cell(d(|s| s.load_fps), 0),
    ));
    line(
        &mut md,
        &mut targets,
        "simulated ECU frames/s".into(),
        sfps,
        Target::AtLeast(50_000.0),
    );
    line(
        &mut md,
        &mut targets,
        "simulated ECU p50 µs".into(),
        sp50,
        Target::AtMost(200.0),
    );
    line(
        &mut md,
        &mut targets,
        "load frames lost at 1 Mbit/s".into(),
        if sim.is_empty() {
            f64::NAN
        } else {
            llost as f64
        },
        Target::AtMost(0.0),
    );
    for s in &skips {
        md.push_str(&format!("- {s}\n"));
    }
    let js_out = serde_json::json!({
        "rounds": rounds,
        "paths": paths.iter().zip(&res).zip(&med).map(|((p, r), m)| serde_json::json!({
            "name": p.name, "p50_us": json(m.0), "p99_us": json(m.1), "frames_s": json(m.2),
            "rounds": {"p50_us": r.p50.iter().map(|v| json(*v)).collect::<Vec<_>>(),
                       "frames_s": r.fps.iter().map(|v| json(*v)).collect::<Vec<_>>()},
            "frames_lost": json(r.lost),
        })).collect::<Vec<_>>(),
        "sim_datagram": {"p50_us": json(d(|s| s.p50)), "p99_us": json(d(|s| s.p99)), "frames_s": json(d(|s| s.sustained)),
                "loaded_p50_us": json(d(|s| s.loaded_p50)), "load_frames_s": json(d(|s| s.load_fps)), "load_lost": dlost},
        "sim": {"p50_us": json(sp50), "p99_us": json(sp99), "frames_s": json(sfps),
                "loaded_p50_us": json(lp50), "load_frames_s": json(lfps), "load_lost": llost},
        "targets": targets,
        "skips": skips,
    });
    drop(paths);
    Ok((md, js_out))
}
