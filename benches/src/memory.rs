//! Resident memory (VmRSS) of an idle `jmpd` with two devices and of `jmp attach` attached to it.

use crate::jmp::{start_attach, start_jmpd, Bins};
use crate::proc::{free_port, rss_kib, TempDir};
use crate::stats::{cell, json, median, Target};
use anyhow::Result;
use std::time::Duration;

pub const SETTLE: Duration = Duration::from_secs(2);

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the memory benchmark; returns (markdown, json).
pub fn run(bins: &Bins, rounds: usize) -> Result<(String, serde_json::Value)> {
    let rounds = rounds.clamp(1, 3);
    let (mut d_idle, mut d_att, mut a, mut a_hwm, mut d_hwm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let dir = TempDir::new("memory");
        let tcp_port = free_port()?;
        let exp = start_jmpd(
            bins,
            &dir,
            &[
                ("console", "{type: sim-console}".to_string()),
                (
                    "web",
                    format!("{{type: tcp, host: 127.0.0.1, port: {tcp_port}}}"),
                ),
            ],
        )?;
        std::thread::sleep(SETTLE);
        let (idle, _) = rss_kib(exp.proc.pid())?;
        let att = start_attach(bins, &dir, &exp, &[])?;
        std::thread::sleep(SETTLE);
        let (arss, ahwm) = rss_kib(att.proc.pid())?;
        let (drss, dhwm) = rss_kib(exp.proc.pid())?;
        eprintln!(
            "  memory round {}: jmpd idle {:.1} MiB, jmpd with client {:.1} MiB, jmp attach {:.1} MiB",
            r + 1,
            mib(idle),
            mib(drss),
            mib(arss)
        );
        d_idle.push(mib(idle));
        d_att.push(mib(drss));
        d_hwm.push(mib(dhwm));
        a.push(mib(arss));
        a_hwm.push(mib(ahwm));
        drop(att);
        drop(exp);
    }
    let (mdi, mda, mdh, ma, mah) = (
        median(&d_idle),
        median(&d_att),
        median(&d_hwm),
        median(&a),
        median(&a_hwm),
    );
    let td = Target::AtMost(15.0);
    let ta = Target::AtMost(20.0);
    let md = format!(
        "### Resident memory\n\nRelease builds; VmRSS from /proc/PID/status {}s after start \
         (jmpd exports a `sim-console` and a `tcp` device; `jmp attach` attaches both). Medians \
         over {rounds} fresh starts.\n\n| process | VmRSS MiB | VmHWM MiB | target |\n\
         |---|---:|---:|---|\n\
         | jmpd, idle (no client) | {} | — | {} MiB: **{}** |\n\
         | jmpd, one client attached | {} | {} | |\n\
         | jmp attach, two devices | {} | {} | {} MiB: **{}** |\n",
        SETTLE.as_secs(),
        cell(mdi, 1),
        td.describe(),
        td.verdict(mdi),
        cell(mda, 1),
        cell(mdh, 1),
        cell(ma, 1),
        cell(mah, 1),
        ta.describe(),
        ta.verdict(ma)
    );
    let js = serde_json::json!({
        "rounds": rounds,
        "jmpd_idle_mib": json(mdi),
        "jmpd_attached_mib": json(mda),
        "jmpd_hwm_mib": json(mdh),
        "attach_mib": json(ma),
        "attach_hwm_mib": json(mah),
        "targets": [
            {"what": "jmpd idle VmRSS MiB", "value": json(mdi), "target": td.describe(), "verdict": td.verdict(mdi)},
            {"what": "jmp attach VmRSS MiB", "value": json(ma), "target": ta.describe(), "verdict": ta.verdict(ma)},
        ],
    });
    Ok((md, js))
}
