//! USB: one configfs gadget on dummy_hcd (an ACM serial port and a 64 MiB disk) in the qemu
//! test guest (this machine's kernel has no USB/IP), imported through vhci-hcd in the same
//! guest two ways, round by round: by jmp (jmpd exports it through usbip-host, jmp attach
//! imports it, QUIC on the guest's loopback, encrypted and authenticated) and by the kernel's
//! own usbip (Debian's usbipd and `usbip attach`, plain TCP on loopback). The same reads on
//! the imported disk for both (fio, direct I/O: 48 MiB sequential in 1 MiB reads, 4 KiB random
//! reads at queue depth 1 for 5 s) and the same one-byte round trips through the imported
//! ttyACM to an echo on the gadget's ttyGS0 (pyserial). The guest script is
//! `benches/usb/usb_bench.sh`. Everything runs under software emulation (TCG): the absolute
//! figures are the emulator's, the ratios are the point.

use crate::jmp::{workspace_dir, Bins};
use crate::stats::{cell, json, median, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::guest::{Guest, Init};
use std::time::Duration;

const PATHS: [&str; 2] = ["usbip", "jmp"];

/// A table row: what, its figure in a round, decimals shown, the target of jmp / usbip.
type Row = (&'static str, fn(&Figures) -> f64, usize, Target);

/// One round's figures for one path.
#[derive(Debug, Clone, Copy)]
struct Figures {
    seq_mb_s: f64,
    rand_iops: f64,
    rtt_us: f64,
}

fn read_json(p: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
    // fio may print notes before its JSON.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("{}: no JSON: {text}", p.display()))?;
    serde_json::from_str(&text[start..]).with_context(|| format!("parse {}", p.display()))
}

fn figures(dir: &std::path::Path, path: &str, round: usize) -> Result<Figures> {
    let seq = read_json(&dir.join(format!("{path}-{round}-seq.json")))?;
    let rand = read_json(&dir.join(format!("{path}-{round}-rand.json")))?;
    let rtt = read_json(&dir.join(format!("{path}-{round}-rtt.json")))?;
    let f = Figures {
        seq_mb_s: seq["jobs"][0]["read"]["bw_bytes"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1e6,
        rand_iops: rand["jobs"][0]["read"]["iops"].as_f64().unwrap_or(f64::NAN),
        rtt_us: rtt["p50_us"].as_f64().unwrap_or(f64::NAN),
    };
    if f.seq_mb_s.is_nan() || f.rand_iops.is_nan() || f.rtt_us.is_nan() {
        bail!("{path} round {round}: missing figures: {f:?}");
    }
    Ok(f)
}

pub fn run(bins: &Bins, rounds: usize) -> Result<(String, serde_json::Value)> {
    let py = jmp_e2e::python().map_err(|e| anyhow!("{e}"))?;
    for tool in ["fio", "usbip", "usbipd"] {
        if jmp_e2e::which(tool).is_none() {
            bail!("{tool} is not installed: run scripts/install-test-deps.sh");
        }
    }
    let bin_dir = bins
        .jmpd
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", bins.jmpd.display()))?;
    let g = Guest::builder(Init::Minimal).memory("1024M").boot();
    let out = g.dir().join("results");
    std::fs::create_dir_all(&out)?;
    let script = g.dir().join("usb_bench.sh");
    let body = std::fs::read_to_string(workspace_dir().join("benches/usb/usb_bench.sh"))?;
    std::fs::write(
        &script,
        format!(
            "BIN={}\nPY={}\nHELPER={}\nOUT={}\n{body}",
            bin_dir.display(),
            py.display(),
            workspace_dir().join("benches/usb/usb_bench.py").display(),
            out.display()
        ),
    )?;
    let phase = |args: &str| -> Result<String> {
        let o = g
            .try_run(
                &format!("/bin/sh {} {args}", script.display()),
                Duration::from_secs(600),
            )
            .map_err(|e| anyhow!("guest: {args}: {e}"))?;
        if !o.success() {
            bail!("guest: {args}: {o}");
        }
        Ok(o.stdout)
    };
    phase("setup")?;
    let mut v: Vec<Vec<Figures>> = vec![Vec::new(); PATHS.len()];
    for r in 0..rounds {
        // Alternate which path goes first, so that neither always follows the other.
        let order: Vec<usize> = if r % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for i in order {
            phase(&format!("round {} {r}", PATHS[i]))?;
            v[i].push(figures(&out, PATHS[i], r)?);
        }
        eprintln!("  usb round {} of {rounds} done", r + 1);
    }
    let med = |i: usize, f: fn(&Figures) -> f64| median(&v[i].iter().map(f).collect::<Vec<_>>());
    let rows: [Row; 3] = [
        (
            "mass storage sequential read (MB/s)",
            |f| f.seq_mb_s,
            1,
            Target::AtLeast(0.9),
        ),
        (
            "mass storage 4 KiB random read QD1 (IOPS)",
            |f| f.rand_iops,
            0,
            Target::AtLeast(0.9),
        ),
        (
            "ACM one-byte round trip p50 (µs)",
            |f| f.rtt_us,
            0,
            Target::AtMost(1.2),
        ),
    ];
    let mut md = String::from(
        "### usb (in the qemu guest, TCG; one gadget on dummy_hcd imported through vhci-hcd)\n\n\
         | measure | usbip (TCP, plain) | jmp (QUIC, encrypted) | jmp / usbip | target | verdict |\n\
         |---|---|---|---|---|---|\n",
    );
    let mut js_rows = Vec::new();
    for (what, f, dec, target) in rows {
        let (u, j) = (med(0, f), med(1, f));
        let ratio = j / u;
        md.push_str(&format!(
            "| {what} | {} | {} | {} | {} | {} |\n",
            cell(u, dec),
            cell(j, dec),
            cell(ratio, 2),
            target.describe(),
            target.verdict(ratio)
        ));
        js_rows.push(serde_json::json!({
            "what": what,
            "usbip": json(u),
            "jmp": json(j),
            "ratio": json(ratio),
            "target": target.describe(),
            "verdict": target.verdict(ratio),
            "rounds": {
                "usbip": v[0].iter().map(|x| json(f(x))).collect::<Vec<_>>(),
                "jmp": v[1].iter().map(|x| json(f(x))).collect::<Vec<_>>(),
            },
        }));
    }
    Ok((md, serde_json::json!({ "rows": js_rows })))
}
