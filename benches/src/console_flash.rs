//! The console while the same attachment flashes the board's storage (issue 22, item 2): a
//! keystroke must not wait behind the flash's megabytes, and the console must not slow the
//! flash down.
//!
//! One jmpd exports a console (`con`, the echo board of `serial.rs`) and a writable storage
//! device (`tgt`, a sparse file); one `jmp attach` attaches both, and `jmp storage flash`
//! writes a 512 MiB image of random bytes (nothing for zstd to shrink) through that
//! attachment's control socket, so the flash and the console share one QUIC connection. Each
//! round measures, in this order: the console idle (back to back round trips), the flash
//! alone, and the flash with the console's round trips running back to back until it ends.
//!
//! Targets: console p99 while flashing ≤ 3 × idle p99, and the flash's time with the console
//! ≤ 1.1 × its time alone. With `--compare-bin-dir`, the other build is measured in the same
//! rounds, interleaved.

use crate::jmp::{start_attach, start_jmpd, Attach, Bins, Exporter};
use crate::proc::{command, Proc, TempDir};
use crate::serial::{Board, Client};
use crate::stats::{cell, json, median, percentile, Target};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The image flashed.
const IMAGE: u64 = 512 << 20;
/// Back to back round trips of the idle measurement.
const IDLE_ITERS: usize = 2000;
/// A flash taking longer than this is a failure, not a figure.
const FLASH_TIMEOUT: Duration = Duration::from_secs(600);

/// One build's exporter, attachment and console.
struct Setup {
    name: String,
    dir: TempDir,
    client: Client,
    _attach: Attach,
    _exp: Exporter,
    _board: Board,
}

impl Setup {
    fn start(name: &str, bins: &Bins, tag: &str) -> Result<Setup> {
        let dir = TempDir::new(&format!("console-flash-{tag}"));
        let board = Board::new()?;
        let tgt = dir.join("target.img");
        std::fs::File::create(&tgt)?.set_len(IMAGE)?;
        let exp = start_jmpd(
            bins,
            &dir,
            &[
                (
                    "con",
                    format!(
                        "{{type: serial, path: {}, baudrate: 115200}}",
                        board.path.display()
                    ),
                ),
                (
                    "tgt",
                    format!("{{type: storage, path: {}, writable: true}}", tgt.display()),
                ),
            ],
        )?;
        let attach = start_attach(bins, &dir, &exp, &[])?;
        let client = Client::open(Path::new(&attach.local("con")?))?;
        Ok(Setup {
            name: name.to_string(),
            dir,
            client,
            _attach: attach,
            _exp: exp,
            _board: board,
        })
    }

    /// `jmp storage flash` through this setup's attachment (its runtime dir names it).
    fn flash(&self, bins: &Bins, src: &Path) -> Proc {
        let mut c = command(&bins.jmp);
        c.args(["storage", "flash", "tgt"])
            .arg(src)
            .env("JMP_RUNTIME_DIR", self.dir.join("runtime"))
            .env("JMP_CONFIG_DIR", self.dir.join("config"));
        Proc::spawn("flash", c, self.dir.path())
    }
}

/// Waits for the flash to end (polling every millisecond: the figure is its time) and checks
/// it succeeded.
fn finish(p: &mut Proc, t0: Instant) -> Result<f64> {
    let status = loop {
        if let Some(s) = p.try_status() {
            break s;
        }
        if t0.elapsed() > FLASH_TIMEOUT {
            bail!("the flash took over {FLASH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let secs = t0.elapsed().as_secs_f64();
    if !status.success() {
        bail!("jmp storage flash failed ({status}): {}", p.log_tail(20));
    }
    Ok(secs)
}

#[derive(Default)]
struct Figures {
    idle_p50: Vec<f64>,
    idle_p99: Vec<f64>,
    busy_p50: Vec<f64>,
    busy_p99: Vec<f64>,
    busy_max: Vec<f64>,
    samples: Vec<f64>,
    alone_s: Vec<f64>,
    with_s: Vec<f64>,
}

fn image(dir: &TempDir) -> Result<PathBuf> {
    let src = dir.join("image.img");
    let out = command("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("count={}", IMAGE >> 20))
        .arg(format!("of={}", src.display()))
        .output()
        .context("run dd")?;
    if !out.status.success() {
        bail!("dd failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(src)
}

fn round(s: &Setup, bins: &Bins, src: &Path, f: &mut Figures) -> Result<()> {
    let idle = s.client.latency(IDLE_ITERS)?;
    f.idle_p50.push(percentile(&idle, 50.0));
    f.idle_p99.push(percentile(&idle, 99.0));

    let t0 = Instant::now();
    let mut p = s.flash(bins, src);
    f.alone_s.push(finish(&mut p, t0)?);

    let t0 = Instant::now();
    let mut p = s.flash(bins, src);
    let mut busy = Vec::new();
    let mut i = 0u8;
    // Round trips over 10 ms and when they started (s into the flash): where stalls happen.
    let mut slow = Vec::new();
    while p.is_running() {
        let at = t0.elapsed().as_secs_f64();
        let rt = s.client.round_trip(i)?;
        if rt > 10_000.0 {
            slow.push(format!("{:.0} ms at {at:.2} s", rt / 1000.0));
        }
        busy.push(rt);
        i = i.wrapping_add(1);
    }
    f.with_s.push(finish(&mut p, t0)?);
    if !slow.is_empty() {
        eprintln!("  {}: round trips over 10 ms: {}", s.name, slow.join(", "));
    }
    if busy.len() < 100 {
        bail!(
            "only {} console round trips during the flash: too few for a p99",
            busy.len()
        );
    }
    f.busy_p50.push(percentile(&busy, 50.0));
    f.busy_p99.push(percentile(&busy, 99.0));
    f.busy_max.push(percentile(&busy, 100.0));
    f.samples.push(busy.len() as f64);
    eprintln!(
        "  {}: idle p50/p99 {:.0}/{:.0} µs; flashing p50/p99/max {:.0}/{:.0}/{:.0} µs ({} round trips); flash {:.2} s alone, {:.2} s with the console",
        s.name,
        percentile(&idle, 50.0),
        percentile(&idle, 99.0),
        percentile(&busy, 50.0),
        percentile(&busy, 99.0),
        percentile(&busy, 100.0),
        busy.len(),
        f.alone_s.last().copied().unwrap_or(f64::NAN),
        f.with_s.last().copied().unwrap_or(f64::NAN),
    );
    Ok(())
}

pub fn run(
    bins: &Bins,
    compare: Option<&Bins>,
    rounds: usize,
) -> Result<(String, serde_json::Value)> {
    let d_img = TempDir::new("console-flash-image");
    let src = image(&d_img)?;
    let mut setups = vec![(Setup::start("jmp", bins, "jmp")?, bins)];
    if let Some(c) = compare {
        setups.push((Setup::start(crate::serial::COMPARE, c, "compare")?, c));
    }
    let mut figs: Vec<Figures> = setups.iter().map(|_| Figures::default()).collect();
    for k in 0..rounds {
        eprintln!("console-flash round {}", k + 1);
        for ((s, b), f) in setups.iter().zip(figs.iter_mut()) {
            round(s, b, &src, f)?;
        }
    }

    let mut md = format!(
        "### Console while flashing (`console-flash`)\n\n\
         One attachment: a console on an echo pty and `jmp storage flash` of a {} MiB random \
         image through the same connection. Round trips in µs; flash times in s. Medians over \
         {rounds} interleaved rounds.\n\n\
         | build | idle p50 | idle p99 | flashing p50 | flashing p99 | flashing max | round trips while flashing | flash alone s | flash with console s | p99 flashing ÷ idle | flash with ÷ alone |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        IMAGE >> 20
    );
    let mut js = Vec::new();
    let mut verdicts = String::new();
    for ((s, _), f) in setups.iter().zip(&figs) {
        let p99_ratio = median(&f.busy_p99) / median(&f.idle_p99);
        let flash_ratio = median(&f.with_s) / median(&f.alone_s);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.name,
            cell(median(&f.idle_p50), 1),
            cell(median(&f.idle_p99), 1),
            cell(median(&f.busy_p50), 1),
            cell(median(&f.busy_p99), 1),
            cell(median(&f.busy_max), 0),
            cell(median(&f.samples), 0),
            cell(median(&f.alone_s), 2),
            cell(median(&f.with_s), 2),
            cell(p99_ratio, 2),
            cell(flash_ratio, 3),
        ));
        let t1 = Target::AtMost(3.0);
        let t2 = Target::AtMost(1.1);
        verdicts.push_str(&format!(
            "- {}: console p99 flashing ÷ idle = {} (target {}): **{}**; flash with the console ÷ alone = {} (target {}): **{}**\n",
            s.name,
            cell(p99_ratio, 2),
            t1.describe(),
            t1.verdict(p99_ratio),
            cell(flash_ratio, 3),
            t2.describe(),
            t2.verdict(flash_ratio),
        ));
        js.push(serde_json::json!({
            "build": s.name,
            "idle_p50_us": f.idle_p50.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "idle_p99_us": f.idle_p99.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "flashing_p50_us": f.busy_p50.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "flashing_p99_us": f.busy_p99.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "flashing_max_us": f.busy_max.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "flash_alone_s": f.alone_s.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "flash_with_console_s": f.with_s.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "p99_flashing_over_idle": json(p99_ratio),
            "flash_with_over_alone": json(flash_ratio),
        }));
    }
    md.push('\n');
    md.push_str(&verdicts);
    Ok((md, serde_json::json!({ "builds": js })))
}
