//! A good session's console round trip while a flood of unauthenticated connections hits jmpd
//! (handshakes that never say Hello, reopened as fast as jmpd closes or displaces them), and
//! jmpd's memory meanwhile. Rounds alternate: quiet, flooded. The flood runs in its own process
//! (`jmp-bench relay flood ADDR FINGERPRINT N`), N connections in flight, from the same
//! address as the good session (the hard case for a per-source limit).
//!
//! Target: flooded p50 ≤ 2 × quiet p50, and jmpd's resident memory bounded (it stays near its
//! quiet size instead of growing with the flood).

use crate::jmp::{start_attach, start_jmpd, Bins};
use crate::proc::{rss_kib, Proc, TempDir};
use crate::serial::{Board, Client};
use crate::stats::{cell, json, median, percentile, Target};
use anyhow::{Context, Result};
use jmp_e2e::{command, Options};
use std::path::Path;

use std::time::Duration;

const ITERS: usize = 2000;
/// Connections the flood keeps in flight.
const FLOOD: usize = 200;

/// The flood process's body: keeps `n` QUIC connections to `addr` in flight that complete the
/// handshake and then say nothing.
pub fn flood_main(args: &[String]) -> Result<()> {
    let addr: std::net::SocketAddr = args.first().context("ADDR")?.parse()?;
    let fp: jmp_transport::Fingerprint = args
        .get(1)
        .context("FINGERPRINT")?
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(FLOOD);
    let rt = jmp_transport::runtime()?;
    rt.block_on(async move {
        let ep = jmp_transport::client_endpoint(addr)?;
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while tasks.len() < n {
                let ep = ep.clone();
                tasks.spawn(async move {
                    if let Ok((c, _)) = jmp_transport::connect_without_retry(
                        &ep,
                        addr,
                        jmp_protocol::ALPN_EXPORTER,
                        Some(fp),
                    )
                    .await
                    {
                        c.closed().await;
                    }
                });
            }
            tasks.join_next().await;
        }
    })
}

fn p50(c: &Client) -> f64 {
    c.latency(ITERS)
        .map(|l| percentile(&l, 50.0))
        .unwrap_or(f64::NAN)
}

pub fn run(bins: &Bins, rounds: usize) -> Result<(String, serde_json::Value)> {
    let dir = TempDir::new("flood");
    let board = Board::new()?;
    let exp = start_jmpd(
        bins,
        &dir,
        &[(
            "console",
            format!(
                "{{type: serial, path: {}, baudrate: 115200}}",
                board.path.display()
            ),
        )],
    )?;
    let att = start_attach(bins, &dir, &exp, &[])?;
    let client = Client::open(Path::new(&att.local("console")?))?;
    let me = std::env::current_exe()?;
    let (mut quiet, mut flooded, mut rss_quiet, mut rss_flood) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        quiet.push(p50(&client));
        rss_quiet.push(rss_kib(exp.proc.pid())?.0 as f64 / 1024.0);
        let flood = Proc::start(
            "flood",
            command(&me).args([
                "relay",
                "flood",
                &exp.addr,
                &exp.fingerprint,
                &FLOOD.to_string(),
            ]),
            dir.path(),
            Options::LOG,
        )?;
        // Let the flood reach its steady state (every place taken, displacement under way).
        std::thread::sleep(Duration::from_secs(2));
        flooded.push(p50(&client));
        rss_flood.push(rss_kib(exp.proc.pid())?.0 as f64 / 1024.0);
        drop(flood);
        eprintln!(
            "  flood round {}: quiet p50 {:.1} µs, flooded p50 {:.1} µs, jmpd RSS {:.1} → {:.1} MiB",
            r + 1,
            quiet[r],
            flooded[r],
            rss_quiet[r],
            rss_flood[r]
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let (q, f) = (median(&quiet), median(&flooded));
    let ratio = f / q;
    let (rq, rf) = (median(&rss_quiet), median(&rss_flood));
    let t = Target::AtMost(2.0);
    let md = format!(
        "### Console round trip under a connection flood\n\n1-byte round trips ({ITERS} per \
         round) through jmp while a separate process keeps {FLOOD} unauthenticated QUIC \
         connections to jmpd in flight (handshake done, no Hello; reopened as jmpd closes them), \
         from the same address. Medians over {rounds} rounds, quiet and flooded alternating.\n\n\
         | | quiet | flooded | flooded ÷ quiet | target |\n|---|---:|---:|---:|---|\n\
         | console p50 µs | {} | {} | {} | {} {} |\n\
         | jmpd VmRSS MiB | {} | {} | {} | bounded |\n",
        cell(q, 1),
        cell(f, 1),
        cell(ratio, 2),
        t.describe(),
        t.verdict(ratio),
        cell(rq, 1),
        cell(rf, 1),
        cell(rf / rq, 2),
    );
    let js = serde_json::json!({
        "rounds": {"quiet_p50_us": quiet, "flooded_p50_us": flooded, "rss_quiet_mib": rss_quiet, "rss_flood_mib": rss_flood},
        "medians": {"quiet_p50_us": json(q), "flooded_p50_us": json(f), "ratio": json(ratio), "rss_quiet_mib": json(rq), "rss_flood_mib": json(rf)},
        "targets": [{"what": "flooded p50 / quiet p50", "value": json(ratio), "target": t.describe(), "verdict": t.verdict(ratio)}],
    });
    drop(client);
    drop(att);
    Ok((md, js))
}
