//! One lab host, many boards (issue 22, item 4): N boards, each an echo pty ([`Board`]), reached
//! at once by N clients, one per board, the way a lab host with N boards and N users (or CI
//! jobs) runs them:
//! - jmp: one `jmpd` per board (what the template unit `jmpd@.service` runs) and one
//!   `jmp attach` per client, all started together;
//! - jmp with one `jmpd` exporting all N boards and one `jmp attach` of all N (devices per
//!   exporter: what one jmpd and one connection cost as they grow);
//! - the peer: one `ser2net` serving every board (its usual set-up) and one `socat` local pty
//!   per client.
//!
//! Per scale (N = 1, 8, 32 unless `JMP_BENCH_BOARDS=1,4,...` says otherwise) and path, two
//! phases with every client running at the same moment:
//! - typing: one key per 50 ms (a person), each client's echo p50/p99;
//! - flat out: back-to-back round trips, each client's p50/p99.
//!
//! Reported: the time until all N attachments are ready, the median of the clients' p50s and
//! the worst client's p99, the lab-host side's CPU per active console while typing (jmpd, or
//! ser2net's share) and the client side's (jmp attach, or socat), and resident memory per board
//! on the lab host (PSS). Targets (issue 22): typing, the worst p99 at N ≤ 2 × a single client's in the
//! same round; memory per board ≤ 10 MiB.

use crate::jmp::{attach_command, start_jmpd, Attach, Bins, Exporter};
use crate::proc::{
    command, free_port, rss_kib, wait_listening, wait_path, which, Options, Proc, TempDir,
};
use crate::serial::{Board, Client};
use crate::stats::{cell, json, median, percentile, Target};
use anyhow::{anyhow, Context, Result};
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

const TYPING_KEYS: usize = 100;
const TYPING_GAP: Duration = Duration::from_millis(50);
const FLAT_ITERS: usize = 500;
const DEFAULT_SCALES: &[usize] = &[1, 8, 32];
/// Most boards one run sets up (each is a jmpd, a jmp attach and two board threads).
const MAX_SCALE: usize = 64;

const JMP: &str = "jmp (jmpd per board)";
const JMP_ONE: &str = "jmp (one jmpd, one attach, N devices)";
const PEER: &str = "ser2net + socat";

/// The scales to run: `JMP_BENCH_BOARDS` (comma separated) or 1, 8, 32.
fn scales() -> Result<Vec<usize>> {
    let Ok(v) = std::env::var("JMP_BENCH_BOARDS") else {
        return Ok(DEFAULT_SCALES.to_vec());
    };
    v.split(',')
        .map(|s| {
            let n: usize = s
                .trim()
                .parse()
                .with_context(|| format!("JMP_BENCH_BOARDS: {s:?} is not a number"))?;
            if n == 0 || n > MAX_SCALE {
                return Err(anyhow!("JMP_BENCH_BOARDS: {n} is not in 1..={MAX_SCALE}"));
            }
            Ok(n)
        })
        .collect()
}

/// N boards reached one way, with everything kept alive until dropped (clients and local
/// programs first, then the lab host's, then the boards).
struct Fleet {
    clients: Vec<Client>,
    /// The lab host's processes (jmpds, or the one ser2net).
    host: Vec<i32>,
    /// The client side's processes (jmp attaches, or socats).
    local: Vec<i32>,
    ready_s: f64,
    _local_procs: Vec<Proc>,
    _host_procs: Vec<Proc>,
    _boards: Vec<Board>,
    _dirs: Vec<TempDir>,
}

fn jmp_fleet(bins: &Bins, n: usize) -> Result<Fleet> {
    let boards = (0..n).map(|_| Board::new()).collect::<Result<Vec<_>>>()?;
    let dirs: Vec<TempDir> = (0..n)
        .map(|i| TempDir::new(&format!("boards-{i}")))
        .collect();
    let exporters = boards
        .iter()
        .zip(&dirs)
        .map(|(b, d)| {
            start_jmpd(
                bins,
                d,
                &[(
                    "console",
                    format!(
                        "{{type: serial, path: {}, baudrate: 115200}}",
                        b.path.display()
                    ),
                )],
            )
        })
        .collect::<Result<Vec<Exporter>>>()?;
    // Every client attaches at the same moment, as N jobs starting together would.
    let cmds = exporters
        .iter()
        .zip(&dirs)
        .map(|(e, d)| attach_command(bins, d, e, &[]))
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let attaches: Vec<Result<Attach>> = std::thread::scope(|s| {
        let hs: Vec<_> = cmds
            .into_iter()
            .zip(&dirs)
            .map(|(cmd, d)| {
                s.spawn(move || {
                    let (proc, ready) = jmp_e2e::start_attach(cmd, d.path())?;
                    Ok(Attach { proc, ready })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("attach thread panicked")))
            })
            .collect()
    });
    let ready_s = t0.elapsed().as_secs_f64();
    let attaches = attaches.into_iter().collect::<Result<Vec<_>>>()?;
    let clients = attaches
        .iter()
        .map(|a| Client::open(Path::new(&a.local("console")?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Fleet {
        clients,
        host: exporters.iter().map(|e| e.jmpd.proc.pid()).collect(),
        local: attaches.iter().map(|a| a.proc.pid()).collect(),
        ready_s,
        _local_procs: attaches.into_iter().map(|a| a.proc).collect(),
        _host_procs: exporters.into_iter().map(|e| e.jmpd.proc).collect(),
        _boards: boards,
        _dirs: dirs,
    })
}

/// One jmpd exporting all N boards as N serial devices and one `jmp attach` of them all: the
/// cost of devices per exporter, and the alternative to a jmpd per board.
fn jmp_one_fleet(bins: &Bins, n: usize) -> Result<Fleet> {
    let boards = (0..n).map(|_| Board::new()).collect::<Result<Vec<_>>>()?;
    let dir = TempDir::new("boards-one");
    let devices: Vec<(String, String)> = boards
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                format!("console{i}"),
                format!(
                    "{{type: serial, path: {}, baudrate: 115200}}",
                    b.path.display()
                ),
            )
        })
        .collect();
    let refs: Vec<(&str, String)> = devices
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    let exp = start_jmpd(bins, &dir, &refs)?;
    let cmd = attach_command(bins, &dir, &exp, &[])?;
    let t0 = Instant::now();
    let (proc, ready) = jmp_e2e::start_attach(cmd, dir.path())?;
    let ready_s = t0.elapsed().as_secs_f64();
    let att = Attach { proc, ready };
    let clients = (0..n)
        .map(|i| Client::open(Path::new(&att.local(&format!("console{i}"))?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Fleet {
        clients,
        host: vec![exp.jmpd.proc.pid()],
        local: vec![att.proc.pid()],
        ready_s,
        _local_procs: vec![att.proc],
        _host_procs: vec![exp.jmpd.proc],
        _boards: boards,
        _dirs: vec![dir],
    })
}

fn peer_fleet(n: usize) -> Result<Fleet> {
    let ser2net = which("ser2net").ok_or_else(|| anyhow!("ser2net is not installed"))?;
    let socat = which("socat").ok_or_else(|| anyhow!("socat is not installed"))?;
    let boards = (0..n).map(|_| Board::new()).collect::<Result<Vec<_>>>()?;
    let dir = TempDir::new("boards-ser2net");
    let ports = (0..n).map(|_| free_port()).collect::<Result<Vec<_>>>()?;
    let cfg: String = boards
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (b, p))| {
            format!(
                "connection: &con{i}\n  accepter: tcp,127.0.0.1,{p}\n  \
                 connector: serialdev,{},115200n81,local\n  options:\n    chardelay: false\n",
                b.path.display()
            )
        })
        .collect();
    std::fs::write(dir.join("ser2net.yaml"), cfg)?;
    let mut s2n = Proc::start(
        "ser2net",
        command(ser2net)
            .args(["-n", "-d", "-u", "-c"])
            .arg(dir.join("ser2net.yaml"))
            .arg("-P")
            .arg(dir.join("ser2net.pid")),
        dir.path(),
        Options::LOG,
    )?;
    for p in &ports {
        wait_listening(*p, &mut s2n, Duration::from_secs(10))?;
    }
    let t0 = Instant::now();
    let mut socats = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let link = dir.join(format!("pty-{i}"));
        socats.push((
            link.clone(),
            Proc::start(
                &format!("socat-{i}"),
                command(&socat)
                    .arg(format!("pty,link={},raw,echo=0", link.display()))
                    .arg(format!("tcp:127.0.0.1:{p}")),
                dir.path(),
                Options::LOG,
            )?,
        ));
    }
    for (link, p) in &mut socats {
        wait_path(link, p, Duration::from_secs(10))?;
    }
    let ready_s = t0.elapsed().as_secs_f64();
    let clients = socats
        .iter()
        .map(|(link, _)| Client::open(link))
        .collect::<Result<Vec<_>>>()?;
    Ok(Fleet {
        clients,
        host: vec![s2n.pid()],
        local: socats.iter().map(|(_, p)| p.pid()).collect(),
        ready_s,
        _local_procs: socats.into_iter().map(|(_, p)| p).collect(),
        _host_procs: vec![s2n],
        _boards: boards,
        _dirs: vec![dir],
    })
}

/// CPU time `pid` has used, in seconds: the sum over its threads of the scheduler's
/// nanosecond run time (`/proc/PID/task/TID/schedstat`); /proc/PID/stat counts in 10 ms ticks,
/// too coarse for a console typed at 20 keys/s. A thread that ended meanwhile is not counted.
fn cpu_s(pid: i32) -> Result<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let p = t?.path().join("schedstat");
        let Ok(s) = std::fs::read_to_string(&p) else {
            continue;
        };
        ns += s
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow!("empty {}", p.display()))?
            .parse::<u64>()
            .with_context(|| format!("{}", p.display()))?;
    }
    Ok(ns as f64 / 1e9)
}

fn cpu_of(pids: &[i32]) -> Result<f64> {
    pids.iter().map(|p| cpu_s(*p)).sum()
}

/// One phase's result: each client's p50 and p99 (µs), and the CPU share (of one core) the lab
/// host's and the client side's processes used per client meanwhile.
struct Phase {
    p50: Vec<f64>,
    p99: Vec<f64>,
    host_cpu: f64,
    local_cpu: f64,
}

fn phase(f: &Fleet, typing: bool) -> Result<Phase> {
    let n = f.clients.len();
    let barrier = Barrier::new(n);
    let (h0, l0) = (cpu_of(&f.host)?, cpu_of(&f.local)?);
    let t0 = Instant::now();
    let runs: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = f
            .clients
            .iter()
            .map(|c| {
                let b = &barrier;
                s.spawn(move || {
                    b.wait();
                    if typing {
                        c.latency_paced(TYPING_KEYS, TYPING_GAP)
                    } else {
                        c.latency(FLAT_ITERS)
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("client thread panicked")))
            })
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let (h1, l1) = (cpu_of(&f.host)?, cpu_of(&f.local)?);
    let mut p = Phase {
        p50: Vec::new(),
        p99: Vec::new(),
        host_cpu: (h1 - h0) / wall / n as f64,
        local_cpu: (l1 - l0) / wall / n as f64,
    };
    for r in runs {
        let v = r?;
        p.p50.push(percentile(&v, 50.0));
        p.p99.push(percentile(&v, 99.0));
    }
    Ok(p)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// Medians over rounds of one (path, scale).
#[derive(Default)]
struct Cell {
    ready_s: Vec<f64>,
    typing_p50: Vec<f64>,
    typing_worst_p99: Vec<f64>,
    flat_p50: Vec<f64>,
    flat_worst_p99: Vec<f64>,
    host_cpu: Vec<f64>,
    local_cpu: Vec<f64>,
    host_rss_mib: Vec<f64>,
    host_pss_mib: Vec<f64>,
    local_pss_mib: Vec<f64>,
    /// The worst typing p99 at this scale ÷ the single client's in the same round.
    typing_p99_vs_one: Vec<f64>,
}

/// Proportional set size of `pid` in KiB: its private memory plus its share of pages mapped by
/// several processes (N jmpds share one binary's text, which VmRSS would count N times).
fn pss_kib(pid: i32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    s.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no Pss for pid {pid}"))?
        .parse()
        .context("Pss")
}

/// (VmRSS, PSS) in MiB per board of `pids`.
fn mib_per_board(pids: &[i32], boards: usize) -> Result<(f64, f64)> {
    let (mut rss, mut pss) = (0, 0);
    for p in pids {
        rss += rss_kib(*p)?.0;
        pss += pss_kib(*p)?;
    }
    let per = |kib: u64| kib as f64 / 1024.0 / boards as f64;
    Ok((per(rss), per(pss)))
}

/// Runs the benchmark; returns (markdown, json).
pub fn run(bins: &Bins, rounds: usize) -> Result<(String, serde_json::Value)> {
    let scales = scales()?;
    let paths = [JMP, JMP_ONE, PEER];
    let mut cells: Vec<Vec<Cell>> = paths
        .iter()
        .map(|_| scales.iter().map(|_| Cell::default()).collect())
        .collect();
    for r in 0..rounds {
        // Each path's single-client typing p99 this round, the reference for its larger scales.
        let mut one = [f64::NAN; 3];
        for (si, &n) in scales.iter().enumerate() {
            for (pi, path) in paths.iter().enumerate() {
                let f = match pi {
                    0 => jmp_fleet(bins, n)?,
                    1 => jmp_one_fleet(bins, n)?,
                    _ => peer_fleet(n)?,
                };
                let typing = phase(&f, true)?;
                let flat = phase(&f, false)?;
                let (host_rss, host_pss) = mib_per_board(&f.host, n)?;
                let (_, local_pss) = mib_per_board(&f.local, n)?;
                let worst = max(&typing.p99);
                if n == 1 {
                    one[pi] = worst;
                }
                eprintln!(
                    "  boards round {} N={n} {path}: ready {:.2} s; typing p50 {:.0} µs worst p99 {:.0} µs; \
                     flat out p50 {:.0} µs worst p99 {:.0} µs; CPU per console host {:.2}% local {:.2}%; \
                     {:.1} MiB per board on the host (VmRSS {:.1})",
                    r + 1,
                    f.ready_s,
                    median(&typing.p50),
                    worst,
                    median(&flat.p50),
                    max(&flat.p99),
                    typing.host_cpu * 100.0,
                    typing.local_cpu * 100.0,
                    host_pss,
                    host_rss
                );
                let c = &mut cells[pi][si];
                c.ready_s.push(f.ready_s);
                c.typing_p50.push(median(&typing.p50));
                c.typing_worst_p99.push(worst);
                c.flat_p50.push(median(&flat.p50));
                c.flat_worst_p99.push(max(&flat.p99));
                c.host_cpu.push(typing.host_cpu * 100.0);
                c.local_cpu.push(typing.local_cpu * 100.0);
                c.host_rss_mib.push(host_rss);
                c.host_pss_mib.push(host_pss);
                c.local_pss_mib.push(local_pss);
                c.typing_p99_vs_one.push(worst / one[pi]);
            }
        }
    }
    let t_p99 = Target::AtMost(2.0);
    let t_mem = Target::AtMost(10.0);
    let mut md = format!(
        "### One lab host, many boards (`boards`)\n\n\
         N echo boards, one client per board, all running at once. jmp: one `jmpd` per board \
         and one `jmp attach` per client; peer: one `ser2net` for all boards and one `socat` pty \
         per client. Typing: {TYPING_KEYS} keys at one per {} ms per client; flat out: \
         {FLAT_ITERS} back-to-back round trips per client. µs; CPU in % of one core per active \
         console while typing; memory per board is PSS (shared pages such as the binary's text \
         split among the processes that map them; VmRSS counts them in every jmpd). Medians over {rounds} rounds.\n\n\
         | path | N | all ready s | typing p50 (median client) | typing p99 (worst client) | \
         worst p99 ÷ N=1 | flat out p50 | flat out p99 (worst) | host CPU % per console | \
         client CPU % per console | host MiB per board (PSS) | host VmRSS MiB per board | \
         client MiB per board (PSS) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        TYPING_GAP.as_millis()
    );
    let mut js = Vec::new();
    let mut verdicts = String::new();
    for (pi, path) in paths.iter().enumerate() {
        for (si, &n) in scales.iter().enumerate() {
            let c = &cells[pi][si];
            let m = |v: &Vec<f64>| median(v);
            md += &format!(
                "| {path} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                cell(m(&c.ready_s), 2),
                cell(m(&c.typing_p50), 0),
                cell(m(&c.typing_worst_p99), 0),
                cell(m(&c.typing_p99_vs_one), 2),
                cell(m(&c.flat_p50), 0),
                cell(m(&c.flat_worst_p99), 0),
                cell(m(&c.host_cpu), 2),
                cell(m(&c.local_cpu), 2),
                cell(m(&c.host_pss_mib), 1),
                cell(m(&c.host_rss_mib), 1),
                cell(m(&c.local_pss_mib), 1),
            );
            js.push(serde_json::json!({
                "path": path, "boards": n,
                "ready_s": json(m(&c.ready_s)),
                "typing_p50_us": json(m(&c.typing_p50)),
                "typing_worst_p99_us": json(m(&c.typing_worst_p99)),
                "typing_worst_p99_vs_one": json(m(&c.typing_p99_vs_one)),
                "flat_p50_us": json(m(&c.flat_p50)),
                "flat_worst_p99_us": json(m(&c.flat_worst_p99)),
                "host_cpu_pct_per_console": json(m(&c.host_cpu)),
                "local_cpu_pct_per_console": json(m(&c.local_cpu)),
                "host_pss_mib_per_board": json(m(&c.host_pss_mib)),
                "host_rss_mib_per_board": json(m(&c.host_rss_mib)),
                "local_pss_mib_per_board": json(m(&c.local_pss_mib)),
            }));
            if pi < 2 && n > 1 {
                let v = m(&c.typing_p99_vs_one);
                verdicts += &format!(
                    "- {path}, N={n}: typing worst p99 ÷ a single client's = {} (target {}): **{}**\n",
                    cell(v, 2),
                    t_p99.describe(),
                    t_p99.verdict(v)
                );
            }
            if pi < 2 {
                let v = m(&c.host_pss_mib);
                verdicts += &format!(
                    "- {path}, N={n}: jmpd MiB (PSS) per board = {} (target {}): **{}**\n",
                    cell(v, 1),
                    t_mem.describe(),
                    t_mem.verdict(v)
                );
            }
        }
    }
    // jmp against the peer at each scale, flat out (where the lab host's work shows).
    for (si, &n) in scales.iter().enumerate() {
        let (j, p) = (&cells[0][si], &cells[2][si]);
        verdicts += &format!(
            "- N={n}: {JMP} ÷ {PEER}: typing p50 {} / worst p99 {}; flat out p50 {} / worst p99 {}; host CPU per console {}\n",
            cell(median(&j.typing_p50) / median(&p.typing_p50), 2),
            cell(median(&j.typing_worst_p99) / median(&p.typing_worst_p99), 2),
            cell(median(&j.flat_p50) / median(&p.flat_p50), 2),
            cell(median(&j.flat_worst_p99) / median(&p.flat_worst_p99), 2),
            cell(median(&j.host_cpu) / median(&p.host_cpu), 2),
        );
    }
    md += "\n";
    md += &verdicts;
    Ok((md, serde_json::json!({ "rows": js })))
}
