//! How time and memory grow with the payload (issue 22, item 5): one round trip of a payload
//! of S bytes, for S from one keystroke to a megabyte, through the console (a pty echo board:
//! its own pty, jmp, ser2net + socat) and through a TCP forward (an echo server: plain
//! loopback, jmp, `ssh -L`), with the resident memory of jmpd and `jmp attach` after each size.
//! Paths and sizes are interleaved round by round, so load changes hit every cell alike. How
//! things grow with devices per exporter and attachments per lab host is the `boards`
//! benchmark (N = 1, 8, 32).

use crate::jmp::Bins;
use crate::proc::{rss_kib, TempDir};
use crate::stats::{cell, json, median, percentile};
use crate::{serial, tcp};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Console payloads: a keystroke, a short command line, a pasted paragraph, a pasted page.
const SERIAL_SIZES: &[usize] = &[1, 16, 256, 4096];
/// TCP payloads: a keystroke over ssh, an HTTP request, a window, a file.
const TCP_SIZES: &[usize] = &[1, 1024, 64 << 10, 1 << 20];

/// Round trips per size and round: fewer for big payloads, which take longer each.
fn iters(size: usize) -> usize {
    match size {
        0..=256 => 300,
        257..=65536 => 100,
        _ => 20,
    }
}

fn payload(size: usize, salt: usize) -> Vec<u8> {
    (0..size).map(|i| ((i * 7 + salt) % 251) as u8).collect()
}

/// Per path: per size, the p50 of each round (µs), and the memory after each round (KiB,
/// summed over the path's processes: RSS and peak RSS).
struct Cells {
    p50: Vec<Vec<f64>>,
    p99: Vec<Vec<f64>>,
    rss: Vec<Vec<f64>>,
    hwm: Vec<Vec<f64>>,
}

impl Cells {
    fn new(sizes: usize) -> Cells {
        Cells {
            p50: vec![Vec::new(); sizes],
            p99: vec![Vec::new(); sizes],
            rss: vec![Vec::new(); sizes],
            hwm: vec![Vec::new(); sizes],
        }
    }

    fn record(&mut self, i: usize, samples: &[f64], pids: &[i32]) {
        self.p50[i].push(percentile(samples, 50.0));
        self.p99[i].push(percentile(samples, 99.0));
        if !pids.is_empty() {
            let (mut r, mut h) = (0, 0);
            for p in pids {
                if let Ok((a, b)) = rss_kib(*p) {
                    r += a;
                    h += b;
                }
            }
            self.rss[i].push(r as f64);
            self.hwm[i].push(h as f64);
        }
    }
}

/// A TCP echo server on loopback, one thread per connection, stopped on drop.
struct EchoServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    fn start() -> Result<EchoServer> {
        let l = TcpListener::bind("127.0.0.1:0").context("bind the echo server")?;
        let port = l.local_addr()?.port();
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_nodelay(true);
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 256 << 10];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(EchoServer { port, stop })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One round trip of `data` over `s`: written by a second thread while this one reads, so a
/// payload larger than the path's buffers cannot deadlock. In µs; the echo is checked.
fn tcp_echo(s: &TcpStream, data: &[u8]) -> Result<f64> {
    let mut back = vec![0u8; data.len()];
    let t0 = Instant::now();
    if data.len() <= 4096 {
        (&*s).write_all(data)?;
        (&*s).read_exact(&mut back)?;
    } else {
        std::thread::scope(|sc| -> Result<()> {
            let w = sc.spawn(|| (&*s).write_all(data));
            let r = (&*s).read_exact(&mut back);
            w.join().map_err(|_| anyhow!("writer panicked"))??;
            r?;
            Ok(())
        })?;
    }
    let dt = t0.elapsed();
    if back != data {
        bail!("TCP echo of {} bytes differs", data.len());
    }
    Ok(dt.as_secs_f64() * 1e6)
}

fn table(
    title: &str,
    sizes: &[usize],
    names: &[String],
    cells: &[Cells],
    peer: usize,
    js: &mut serde_json::Map<String, serde_json::Value>,
) -> String {
    let mut md = format!(
        "#### {title}\n\nRound trip p50 (µs; p99 in brackets), median over rounds; \"÷ 1st\" is \
         the path's own growth from the smallest payload; \"÷ {}\" is jmp against it at the \
         same size.\n\n| payload | {} | jmp ÷ 1st | jmp ÷ {} |\n|---:|{}---:|---:|\n",
        names[peer],
        names.join(" | "),
        names[peer],
        "---:|".repeat(names.len())
    );
    let jmp = names.iter().position(|n| n == "jmp").unwrap_or(0);
    let base = median(&cells[jmp].p50[0]);
    for (i, size) in sizes.iter().enumerate() {
        let mut row = format!("| {} |", human(*size));
        for c in cells {
            row.push_str(&format!(
                " {} ({}) |",
                cell(median(&c.p50[i]), 0),
                cell(median(&c.p99[i]), 0)
            ));
        }
        let j = median(&cells[jmp].p50[i]);
        row.push_str(&format!(
            " {} | {} |\n",
            cell(j / base, 1),
            cell(j / median(&cells[peer].p50[i]), 2)
        ));
        md.push_str(&row);
    }
    md.push_str("\nResident memory after each size (MiB, the path's processes summed; peak in brackets):\n\n| payload |");
    let with_mem: Vec<usize> = (0..names.len())
        .filter(|k| !cells[*k].rss[0].is_empty())
        .collect();
    for k in &with_mem {
        md.push_str(&format!(" {} |", names[*k]));
    }
    md.push_str(&format!("\n|---:|{}\n", "---:|".repeat(with_mem.len())));
    for (i, size) in sizes.iter().enumerate() {
        md.push_str(&format!("| {} |", human(*size)));
        for k in &with_mem {
            md.push_str(&format!(
                " {} ({}) |",
                cell(median(&cells[*k].rss[i]) / 1024.0, 1),
                cell(median(&cells[*k].hwm[i]) / 1024.0, 1)
            ));
        }
        md.push('\n');
    }
    md.push('\n');
    for (k, n) in names.iter().enumerate() {
        let per: Vec<serde_json::Value> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({
                    "bytes": s,
                    "p50_us": cells[k].p50[i].iter().map(|v| json(*v)).collect::<Vec<_>>(),
                    "p99_us": cells[k].p99[i].iter().map(|v| json(*v)).collect::<Vec<_>>(),
                    "rss_kib": cells[k].rss[i].iter().map(|v| json(*v)).collect::<Vec<_>>(),
                    "hwm_kib": cells[k].hwm[i].iter().map(|v| json(*v)).collect::<Vec<_>>(),
                })
            })
            .collect();
        js.insert(format!("{title}: {n}"), serde_json::Value::Array(per));
    }
    md
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

fn serial_growth(
    bins: &Bins,
    rounds: usize,
    js: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    let dirs: Vec<TempDir> = (0..3)
        .map(|i| TempDir::new(&format!("growth-serial-{i}")))
        .collect();
    let routes = [
        serial::direct()?,
        serial::jmp(bins, &dirs[0], "jmp")?,
        serial::ser2net(&dirs[1])?,
        serial::ser2net_with(&dirs[2], true)?,
    ];
    let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    let mut cells: Vec<Cells> = routes
        .iter()
        .map(|_| Cells::new(SERIAL_SIZES.len()))
        .collect();
    for round in 0..rounds {
        for (i, size) in SERIAL_SIZES.iter().enumerate() {
            for (k, r) in routes.iter().enumerate() {
                r.client.drain()?;
                let mut v = Vec::with_capacity(iters(*size));
                for n in 0..iters(*size) + 5 {
                    let t = r
                        .client
                        .echo(&payload(*size, n + round))
                        .with_context(|| format!("{}: {} bytes", r.name, size))?;
                    if n >= 5 {
                        v.push(t);
                    }
                }
                let pids: Vec<i32> = r.procs.iter().map(|p| p.pid()).collect();
                cells[k].record(i, &v, &pids);
            }
        }
    }
    // The tuned peer is the fair one to compare with.
    Ok(table(
        "Console (pty echo board)",
        SERIAL_SIZES,
        &names,
        &cells,
        3,
        js,
    ))
}

fn tcp_growth(
    bins: &Bins,
    rounds: usize,
    js: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    let echo = EchoServer::start()?;
    let dirs: Vec<TempDir> = (0..2)
        .map(|i| TempDir::new(&format!("growth-tcp-{i}")))
        .collect();
    let net = tcp::Net::Loopback;
    let routes = [
        tcp::Route {
            name: "plain loopback".into(),
            port: echo.port,
            pids: vec![],
            _procs: vec![],
        },
        tcp::jmp(&net, bins, "jmp", &dirs[0], echo.port)?,
        tcp::ssh(&net, &dirs[1], echo.port)?,
    ];
    let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    let conns = routes
        .iter()
        .map(|r| {
            let s = TcpStream::connect(("127.0.0.1", r.port))
                .with_context(|| format!("connect to {}", r.name))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut cells: Vec<Cells> = routes.iter().map(|_| Cells::new(TCP_SIZES.len())).collect();
    for round in 0..rounds {
        for (i, size) in TCP_SIZES.iter().enumerate() {
            for (k, r) in routes.iter().enumerate() {
                let mut v = Vec::with_capacity(iters(*size));
                for n in 0..iters(*size) + 3 {
                    let t = tcp_echo(&conns[k], &payload(*size, n + round))
                        .with_context(|| format!("{}: {} bytes", r.name, size))?;
                    if n >= 3 {
                        v.push(t);
                    }
                }
                cells[k].record(i, &v, &r.pids);
            }
        }
    }
    Ok(table(
        "TCP forward (echo server, loopback)",
        TCP_SIZES,
        &names,
        &cells,
        2,
        js,
    ))
}

/// Runs the growth benchmark; returns (markdown, json).
pub fn run(bins: &Bins, rounds: usize) -> Result<(String, serde_json::Value)> {
    let mut js = serde_json::Map::new();
    let mut md = String::from("### Cost as the payload grows (`growth`)\n\n");
    md.push_str(&serial_growth(bins, rounds, &mut js)?);
    md.push_str(&tcp_growth(bins, rounds, &mut js)?);
    Ok((md, serde_json::Value::Object(js)))
}
