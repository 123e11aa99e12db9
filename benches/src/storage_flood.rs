//! A console's round trip while its own session floods jmpd with storage reads it never reads
//! back (issue 18, finding 1), and jmpd's memory meanwhile. Rounds alternate: quiet, flooded.
//!
//! The hostile client is this process, speaking the protocol through jmp-transport (`jmp`
//! would never send what it sends): one session with a console channel on an echo pty and,
//! while flooded, three storage channels with 200 unread 8 MiB reads each (4.8 GB asked for).
//! jmpd serves one attachment at a time, so the console measured is the flooding session's
//! own; its QUIC receive window is made far larger than jmp's, so that the storage streams it
//! never reads do not stall its console. A flooded round starts once jmpd's metrics show the
//! budget full and no blocking job running (jmpd has taken all it will), and ends with the
//! session; the next round waits for the budget to be given back.
//!
//! Target: flooded p50 ≤ 2 × quiet p50, and jmpd's resident memory grows by at most the
//! bound docs/architecture.md ("Budgets") states for one session.

use crate::jmp::{start_jmpd_with, Bins, Exporter};
use crate::proc::{free_port, rss_kib, TempDir};
use crate::serial::Board;
use crate::stats::{cell, json, median, percentile, Target};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use jmp_protocol::codec::to_bytes;
use jmp_protocol::kinds::serial::OpenParams;
use jmp_protocol::kinds::storage::{frame, Op, Request};
use jmp_protocol::{features, ErrorCode, Hello, ALPN_EXPORTER};
use jmp_transport::{Channels, Fingerprint, Link, LinkEvent, LinkHandle, Pipe};
use std::time::{Duration, Instant};

const ITERS: usize = 1000;
const WARMUP: usize = 50;
/// Storage channels of the flood, and unread reads on each.
const CHANNELS: u64 = 3;
const READS: u64 = 200;
const READ: u64 = 8 << 20;
const IMAGE: u64 = 2 << 30;
/// What docs/architecture.md states one session can make jmpd hold (MiB), and the storage
/// share of it (`jmp_devices::budget::LIMITS.session_bytes`).
const SESSION_BOUND_MIB: f64 = 160.0;
const STORAGE_BUDGET: u64 = 64 << 20;
/// How long jmpd may take to fill or give back the budget before the benchmark gives up.
const SETTLE: Duration = Duration::from_secs(120);

/// One value of jmpd's `/metrics` (a metric without labels).
fn metric(port: u16, name: &str) -> Result<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).context("metrics")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| anyhow!("no {name} in jmpd's metrics"))
}

/// Polls jmpd's metrics until `f` holds (jmpd signals nothing the benchmark could await).
async fn settle(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    while !f()? {
        if t0.elapsed() > SETTLE {
            bail!("jmpd did not settle within {SETTLE:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// One hostile session: its link and its console.
struct Session {
    link: LinkHandle,
    console: Pipe,
}

impl Session {
    async fn connect(exp: &Exporter, round: usize) -> Result<Session> {
        let fp: Fingerprint = exp
            .fingerprint
            .parse()
            .map_err(|e: String| anyhow!("fingerprint: {e}"))?;
        let ep = jmp_transport::client_endpoint(exp.jmpd.addr)?;
        let (conn, _) =
            jmp_transport::connect_tuned(&ep, exp.jmpd.addr, ALPN_EXPORTER, Some(fp), |t| {
                t.receive_window((1u32 << 30).into());
            })
            .await?;
        let hello = Hello {
            features: features::CLIENT,
            client: "bench@storage-flood".into(),
            session: (u64::from(std::process::id()) << 16) | round as u64,
            token: "bench-token".into(),
        };
        let (link, _) = Link::client(conn, hello).await?;
        let Link { handle, mut events } = link;
        // Events are read, or the link would end the session for not reading them.
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if matches!(ev, LinkEvent::Ended { .. }) {
                    break;
                }
            }
        });
        let params = to_bytes(&OpenParams {
            resume_from: None,
            pacing: None,
            timed: false,
        });
        let (console, _) = handle
            .open_stream("console", params)
            .await
            .map_err(|e| anyhow!("console: {e}"))?;
        Ok(Session {
            link: handle,
            console,
        })
    }

    /// One-byte round trips through the echo board, in µs (after a warm-up).
    async fn latency(&mut self) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(ITERS);
        for i in 0..WARMUP + ITERS {
            let b = (i % 251) as u8;
            let t0 = Instant::now();
            self.console.tx.send(Bytes::from(vec![b])).await?;
            // Anything before the byte (replayed history) is skipped; the byte must come back.
            loop {
                let got = tokio::time::timeout(Duration::from_secs(10), self.console.rx.recv())
                    .await
                    .map_err(|_| anyhow!("no echo for 10 s"))??
                    .ok_or_else(|| anyhow!("the console ended"))?;
                if got.last() == Some(&b) {
                    break;
                }
            }
            if i >= WARMUP {
                out.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(out)
    }

    /// A storage channel with `READS` reads of `READ` bytes sent and never read back.
    async fn unread_reads(&self) -> Result<Pipe> {
        let (mut pipe, _) = self
            .link
            .open_stream("sd", Bytes::new())
            .await
            .map_err(|e| anyhow!("storage: {e}"))?;
        for i in 0..READS {
            let r = Request {
                id: i + 1,
                op: Op::Read {
                    offset: (i * READ) % (IMAGE - READ),
                    len: READ,
                    compress: false,
                },
            };
            pipe.tx.send(frame(&r)).await?;
        }
        Ok(pipe)
    }
}

pub fn run(bins: &Bins, rounds: usize) -> Result<(String, serde_json::Value)> {
    let dir = TempDir::new("storage-flood");
    let board = Board::new()?;
    let img = dir.join("sd.img");
    std::fs::File::create(&img)?.set_len(IMAGE)?;
    let port = free_port()?;
    let exp = start_jmpd_with(
        bins,
        &dir,
        &[
            (
                "console",
                format!(
                    "{{type: serial, path: {}, baudrate: 115200}}",
                    board.path.display()
                ),
            ),
            ("sd", format!("{{type: storage, path: {}}}", img.display())),
        ],
        &format!("metrics: 127.0.0.1:{port}\n"),
    )?;
    let pid = exp.jmpd.proc.pid();
    let rt = jmp_transport::runtime()?;
    let (mut quiet, mut flooded, mut rss_quiet, mut rss_flood) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        rt.block_on(async {
            let mut s = Session::connect(&exp, r).await?;
            quiet.push(percentile(&s.latency().await?, 50.0));
            rss_quiet.push(rss_kib(pid)?.0 as f64 / 1024.0);
            let mut pipes = Vec::new();
            for _ in 0..CHANNELS {
                pipes.push(s.unread_reads().await?);
            }
            settle("the budget fills and no job runs", || {
                Ok(metric(port, "jmpd_blocking_jobs")? == 0
                    && metric(port, "jmpd_budget_bytes")? + READ > STORAGE_BUDGET)
            })
            .await?;
            flooded.push(percentile(&s.latency().await?, 50.0));
            rss_flood.push(rss_kib(pid)?.0 as f64 / 1024.0);
            drop(pipes);
            s.link.bye(ErrorCode::Ok, "round done");
            settle("the budget is given back", || {
                Ok(metric(port, "jmpd_budget_bytes")? == 0 && metric(port, "jmpd_channels")? == 0)
            })
            .await?;
            anyhow::Ok(())
        })?;
        eprintln!(
            "  storage-flood round {}: quiet p50 {:.1} µs, flooded p50 {:.1} µs, jmpd RSS {:.1} → {:.1} MiB",
            r + 1,
            quiet[r],
            flooded[r],
            rss_quiet[r],
            rss_flood[r]
        );
    }
    let (q, f) = (median(&quiet), median(&flooded));
    let ratio = f / q;
    let (rq, rf) = (median(&rss_quiet), median(&rss_flood));
    // Against jmpd's size before the first flood: the allocator keeps some of what a flood
    // freed, so a later quiet round starts higher.
    let grew = rss_flood.iter().copied().fold(f64::NAN, f64::max) - rss_quiet[0];
    let t = Target::AtMost(2.0);
    let m = Target::AtMost(SESSION_BOUND_MIB);
    let md = format!(
        "### Console round trip under a storage flood\n\n1-byte round trips ({ITERS} per round) \
         on a console channel of a session that, while flooded, also has {CHANNELS} storage \
         channels with {READS} unread {} MiB reads each ({} MiB asked for, never read back). \
         Medians over {rounds} rounds, quiet and flooded alternating; the memory growth is \
         the largest flooded size less the size before the first flood.\n\n\
         | | quiet | flooded | flooded ÷ quiet | target |\n|---|---:|---:|---:|---|\n\
         | console p50 µs | {} | {} | {} | {} {} |\n\
         | jmpd VmRSS MiB | {} | {} | +{} MiB | {} MiB {} |\n",
        READ >> 20,
        (CHANNELS * READS * READ) >> 20,
        cell(q, 1),
        cell(f, 1),
        cell(ratio, 2),
        t.describe(),
        t.verdict(ratio),
        cell(rq, 1),
        cell(rf, 1),
        cell(grew, 1),
        m.describe(),
        m.verdict(grew),
    );
    let js = serde_json::json!({
        "rounds": {"quiet_p50_us": quiet, "flooded_p50_us": flooded, "rss_quiet_mib": rss_quiet, "rss_flood_mib": rss_flood},
        "medians": {"quiet_p50_us": json(q), "flooded_p50_us": json(f), "ratio": json(ratio), "rss_quiet_mib": json(rq), "rss_flood_mib": json(rf), "rss_growth_max_mib": json(grew)},
        "targets": [
            {"what": "flooded p50 / quiet p50", "value": json(ratio), "target": t.describe(), "verdict": t.verdict(ratio)},
            {"what": "jmpd VmRSS growth, MiB", "value": json(grew), "target": m.describe(), "verdict": m.verdict(grew)},
        ],
    });
    drop(exp);
    drop(board);
    Ok((md, js))
}
