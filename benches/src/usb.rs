//! USB: one configfs gadget on dummy_hcd (an ACM serial port and a 64 MiB disk) in the qemu
//! test guest (this machine's kernel has no USB/IP), imported through vhci-hcd in the same
//! guest two ways, round by round: by jmp (jmpd exports it through usbip-host, jmp attach
//! imports it, QUIC on the guest's loopback, encrypted and authenticated) and by the kernel's
//! own usbip (Debian's usbipd and `usbip attach`, plain TCP on loopback). The same reads on
//! the imported disk for both (fio, direct I/O: 48 MiB sequential in 1 MiB reads, 4 KiB random
//! reads at queue depth 1 for 5 s) and the same one-byte round trips through the imported
//! ttyACM to an echo on the gadget's ttyGS0 (pyserial). The guest script is
//! `benches/usb/usb_bench.sh`. Everything runs under software emulation (TCG): the absolute
//! figures are the emulator's, the ratios are the point. With `--compare-bin-dir` another
//! build of jmp is a third path in the same rounds (a change's effect, in the same machine
//! state). After the rounds, a profile of each
//! path: context switches per exchange of everything on it, and for jmp the syscalls of jmpd
//! and jmp attach and their own counts of reads and writes per USB/IP message.

use crate::jmp::{workspace_dir, Bins};
use crate::stats::{cell, json, median, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::guest::{Guest, Init};
use std::time::Duration;

/// The paths measured, as the guest script names them: the kernel's usbip, jmp, and with
/// `--compare-bin-dir` another build of jmp (the one from before a change) in the same rounds.
const PATHS: [&str; 3] = ["usbip", "jmp", "jmpcmp"];

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

pub fn run(
    bins: &Bins,
    compare: Option<&Bins>,
    rounds: usize,
) -> Result<(String, serde_json::Value)> {
    let paths = &PATHS[..if compare.is_some() { 3 } else { 2 }];
    let cmp_dir = match compare {
        Some(c) => c
            .jmpd
            .parent()
            .ok_or_else(|| anyhow!("{} has no directory", c.jmpd.display()))?
            .display()
            .to_string(),
        None => String::new(),
    };
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
            "BIN={}\nCMP={cmp_dir}\nPY={}\nHELPER={}\nOUT={}\n{body}",
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
    let mut v: Vec<Vec<Figures>> = vec![Vec::new(); paths.len()];
    for r in 0..rounds {
        // Rotate which path goes first, so that none always follows another.
        let order: Vec<usize> = (0..paths.len()).map(|i| (i + r) % paths.len()).collect();
        for i in order {
            phase(&format!("round {} {r}", paths[i]))?;
            v[i].push(figures(&out, paths[i], r)?);
        }
        eprintln!("  usb round {} of {rounds} done", r + 1);
    }
    // Where an exchange's time goes (context switches and syscalls per exchange, and jmp's
    // own counts of reads and writes per USB/IP message): shown, not judged.
    let profile: String = paths
        .iter()
        .map(|p| {
            phase(&format!("profile {p}")).unwrap_or_else(|e| format!("profile {p} failed: {e}\n"))
        })
        .collect();
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
         | measure | usbip (TCP, plain) | jmp (QUIC, encrypted) | jmp / usbip | target | verdict |",
    );
    if compare.is_some() {
        md.push_str(
            " jmp (--compare-bin-dir) | that / usbip |\n|---|---|---|---|---|---|---|---|\n",
        );
    } else {
        md.push_str("\n|---|---|---|---|---|---|\n");
    }
    let mut js_rows = Vec::new();
    for (what, f, dec, target) in rows {
        let (u, j) = (med(0, f), med(1, f));
        let ratio = j / u;
        md.push_str(&format!(
            "| {what} | {} | {} | {} | {} | {} |",
            cell(u, dec),
            cell(j, dec),
            cell(ratio, 2),
            target.describe(),
            target.verdict(ratio)
        ));
        let mut row = serde_json::json!({
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
        });
        if compare.is_some() {
            let c = med(2, f);
            md.push_str(&format!(" {} | {} |", cell(c, dec), cell(c / u, 2)));
            row["compare"] = json(c);
            row["compare_ratio"] = json(c / u);
            row["rounds"]["compare"] = v[2].iter().map(|x| json(f(x))).collect();
        }
        md.push('\n');
        js_rows.push(row);
    }
    md.push_str(&format!(
        "\nWhere an exchange's time goes (`usb_bench.sh profile`):\n\n```\n{profile}```\n"
    ));
    Ok((
        md,
        serde_json::json!({ "rows": js_rows, "profile": profile }),
    ))
}
