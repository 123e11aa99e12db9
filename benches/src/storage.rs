//! Storage: one 1 GiB image on this machine ("the lab host"), read and written through
//! jmp-mount (jmpd `type: storage` + the `jmp-mount` binary), sshfs (OpenSSH's sftp on a
//! private sshd), nbdkit `file` + nbdfuse (unencrypted NBD over loopback TCP: an upper
//! reference) and the file itself (the floor). Interleaved per round: fio sequential read and
//! write (1 MiB), dd read and write (1 MiB), fio 4 KiB random read and write at QD1 and QD16
//! (`--direct=1`, libaio). Then flashing a 2 GiB image that is 25% data: `jmp storage flash`
//! (raw, and with the bmap) vs `bmaptool copy` and `dd` onto the same target image through
//! sshfs. jmp-mount's peak resident memory is read after the sequential runs.
//!
//! Caches: the image stays in this machine's page cache (each route's server reads it from
//! there, as a lab host serving a recently used image would); before each read the route's
//! own client-side cache of the mounted file is dropped (fio's default `invalidate=1`, dd
//! `iflag=nocache`), except for the local file, whose cached reads are the floor.

use crate::jmp::{start_jmpd, Bins};
use crate::proc::{free_port, wait_listening, which, Proc, TempDir};
use crate::stats::{cell, json, median, Target};
use crate::tcp::sshd;
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::{command, Options};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const IMG: u64 = 1 << 30;
/// The route of `--compare-bin-dir`'s jmp-mount.
const COMPARE: &str = "jmp-mount, compare build";
const FLASH: u64 = 2 << 30;
/// Seconds each random-I/O job runs.
const RAND_SECS: u32 = 4;

/// Unmounts a FUSE mount on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = command("umount").arg("-l").arg(&self.0).status();
    }
}

struct Route {
    name: &'static str,
    file: PathBuf,
    /// The FUSE process, for its memory.
    pid: Option<i32>,
    local: bool,
    _procs: Vec<Proc>,
    _mount: Option<Unmount>,
}

fn mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn wait_mounted(p: &Path, proc: &mut Proc) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if mounted(p) {
            return Ok(());
        }
        if !proc.is_running() {
            bail!(
                "exited before mounting {}: {}",
                p.display(),
                proc.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{} was not mounted in time: {}",
        p.display(),
        proc.log_tail(20)
    )
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn jmp_mount(bins: &Bins, dir: &TempDir, img: &Path) -> Result<Route> {
    let exp = start_jmpd(
        bins,
        dir,
        &[(
            "sd",
            format!("{{type: storage, path: {}, writable: true}}", img.display()),
        )],
    )?;
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let bin = bins.jmp.with_file_name("jmp-mount");
    let mut p = Proc::start(
        "jmp-mount",
        command(bin)
            .args(["--exporter", &exp.addr])
            .arg("--token-file")
            .arg(&exp.token_file)
            .args(["--fingerprint", &exp.fingerprint])
            .arg(&mnt),
        dir.path(),
        Options::LINES,
    )?;
    p.next_line(Duration::from_secs(20))?;
    wait_mounted(&mnt, &mut p)?;
    Ok(Route {
        name: "jmp-mount",
        file: mnt.join("disk"),
        pid: Some(p.pid()),
        local: false,
        _mount: Some(Unmount(mnt)),
        _procs: vec![p, exp.jmpd.proc],
    })
}

fn sshfs(dir: &TempDir, img: &Path) -> Result<Route> {
    let bin = which("sshfs").ok_or_else(|| anyhow!("sshfs is missing"))?;
    let d = sshd(dir)?;
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let share = img.parent().ok_or_else(|| anyhow!("image has no folder"))?;
    let mut p = Proc::start(
        "sshfs",
        command(bin)
            .arg("-f")
            .arg(format!("{}@127.0.0.1:{}", d.user, share.display()))
            .arg(&mnt)
            .args(["-p", &d.port.to_string()])
            .arg("-o")
            .arg(format!(
                "IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes",
                d.key.display()
            )),
        dir.path(),
        Options::LOG,
    )?;
    wait_mounted(&mnt, &mut p)?;
    let name = img
        .file_name()
        .ok_or_else(|| anyhow!("image has no name"))?;
    Ok(Route {
        name: "sshfs",
        file: mnt.join(name),
        pid: Some(p.pid()),
        local: false,
        _mount: Some(Unmount(mnt)),
        _procs: vec![p, d.proc],
    })
}

fn nbdfuse(dir: &TempDir, img: &Path) -> Result<Route> {
    let nbdkit = which("nbdkit").ok_or_else(|| anyhow!("nbdkit is missing"))?;
    let nbdfuse = which("nbdfuse").ok_or_else(|| anyhow!("nbdfuse is missing"))?;
    let port = free_port()?;
    let mut k = Proc::start(
        "nbdkit",
        command(nbdkit)
            .args([
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "file",
            ])
            .arg(img),
        dir.path(),
        Options::LOG,
    )?;
    wait_listening(port, &mut k, Duration::from_secs(10))?;
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let mut f = Proc::start(
        "nbdfuse",
        command(nbdfuse)
            .arg(&mnt)
            .args(["--tcp", "127.0.0.1", &port.to_string()]),
        dir.path(),
        Options::LOG,
    )?;
    wait_mounted(&mnt, &mut f)?;
    Ok(Route {
        name: "nbdkit+nbdfuse",
        file: mnt.join("nbd"),
        pid: Some(f.pid()),
        local: false,
        _mount: Some(Unmount(mnt)),
        _procs: vec![f, k],
    })
}

/// One fio job; (MB/s, IOPS) of its direction.
fn fio(r: &Route, name: &str, rw: &str, bs: &str, args: &[&str]) -> Result<(f64, f64)> {
    let mut c = command("fio");
    c.arg(format!("--name={name}"))
        .arg(format!("--filename={}", r.file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--size={IMG}"))
        .args(["--output-format=json", "--ioengine=libaio"])
        .args(args);
    if r.local {
        c.arg("--invalidate=0");
    }
    let out = run_ok(&mut c, "fio")?;
    let start = out
        .find('{')
        .ok_or_else(|| anyhow!("fio printed no JSON: {out}"))?;
    let v: serde_json::Value = serde_json::from_str(&out[start..]).context("fio JSON")?;
    let dir = if rw.contains("read") { "read" } else { "write" };
    let j = &v["jobs"][0][dir];
    let bw = j["bw_bytes"]
        .as_f64()
        .ok_or_else(|| anyhow!("fio JSON lacks bw_bytes"))?;
    Ok((bw / 1e6, j["iops"].as_f64().unwrap_or(f64::NAN)))
}

/// dd of the whole image at 1 MiB; MB/s.
fn dd(r: &Route, write: bool) -> Result<f64> {
    let f = r.file.display().to_string();
    if !write && !r.local {
        // Drop this route's client-side cache of the file.
        run_ok(
            command("dd")
                .arg(format!("if={f}"))
                .args(["iflag=nocache", "count=0", "status=none"]),
            "dd nocache",
        )?;
    }
    let t = Instant::now();
    let mut c = command("dd");
    if write {
        c.arg("if=/dev/zero")
            .arg(format!("of={f}"))
            .args(["conv=notrunc,fsync"]);
    } else {
        c.arg(format!("if={f}")).arg("of=/dev/null");
    }
    c.args(["bs=1M", &format!("count={}", IMG >> 20), "status=none"]);
    run_ok(&mut c, "dd")?;
    Ok(IMG as f64 / t.elapsed().as_secs_f64() / 1e6)
}

const WORKLOADS: &[&str] = &[
    "seq read fio 1M (MB/s)",
    "seq write fio 1M (MB/s)",
    "seq read dd 1M (MB/s)",
    "seq write dd 1M (MB/s)",
    "randread 4k QD1 (IOPS)",
    "randread 4k QD16 (IOPS)",
    "randwrite 4k QD1 (IOPS)",
    "randwrite 4k QD16 (IOPS)",
];

fn warm(img: &Path) -> Result<()> {
    run_ok(
        command("cat").arg(img).stdout(std::process::Stdio::null()),
        "cat",
    )?;
    Ok(())
}

fn round(r: &Route, img: &Path) -> Result<Vec<f64>> {
    let secs = format!("--runtime={RAND_SECS}");
    let rand = |rw: &str, qd: &str| -> Result<f64> {
        Ok(fio(
            r,
            rw,
            rw,
            "4k",
            &[
                "--direct=1",
                &format!("--iodepth={qd}"),
                &secs,
                "--time_based",
                "--norandommap",
            ],
        )?
        .1)
    };
    warm(img)?;
    let sr = fio(r, "seqread", "read", "1M", &["--iodepth=4"])?.0;
    let sw = fio(
        r,
        "seqwrite",
        "write",
        "1M",
        &["--iodepth=4", "--end_fsync=1"],
    )?
    .0;
    warm(img)?;
    let dr = dd(r, false)?;
    let dw = dd(r, true)?;
    Ok(vec![
        sr,
        sw,
        dr,
        dw,
        rand("randread", "1")?,
        rand("randread", "16")?,
        rand("randwrite", "1")?,
        rand("randwrite", "16")?,
    ])
}

/// A 2 GiB image, 25% data: 64 MiB of random bytes at the start of every 256 MiB.
fn flash_source(dir: &TempDir) -> Result<(PathBuf, PathBuf)> {
    let src = dir.join("src2g.img");
    let f = std::fs::File::create(&src)?;
    f.set_len(FLASH)?;
    drop(f);
    for i in 0..8 {
        run_ok(
            command("dd")
                .args([
                    "if=/dev/urandom",
                    "bs=1M",
                    "count=64",
                    "conv=notrunc",
                    "status=none",
                ])
                .arg(format!("of={}", src.display()))
                .arg(format!("seek={}", i * 256)),
            "dd urandom",
        )?;
    }
    let bmap = dir.join("src2g.bmap");
    run_ok(
        command("bmaptool")
            .args(["-q", "create", "-o"])
            .arg(&bmap)
            .arg(&src),
        "bmaptool create",
    )?;
    Ok((src, bmap))
}

/// Runs the storage benchmark; returns (markdown, json).
pub fn run(
    bins: &Bins,
    compare: Option<&Bins>,
    rounds: usize,
) -> Result<(String, serde_json::Value)> {
    for t in ["fio", "dd", "bmaptool"] {
        which(t).ok_or_else(|| anyhow!("SKIP: {t} is not installed"))?;
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("SKIP: no /dev/fuse");
    }
    let data = TempDir::new("storage-data");
    let img = data.join("img.raw");
    run_ok(
        command("dd")
            .args(["if=/dev/urandom", "bs=1M", "status=none"])
            .arg(format!("count={}", IMG >> 20))
            .arg(format!("of={}", img.display())),
        "dd urandom",
    )?;
    let d_jmp = TempDir::new("storage-jmp");
    let d_ssh = TempDir::new("storage-sshfs");
    let d_nbd = TempDir::new("storage-nbd");
    let mut skips = Vec::new();
    let mut routes = vec![Route {
        name: "local file",
        file: img.clone(),
        pid: None,
        local: true,
        _procs: vec![],
        _mount: None,
    }];
    let d_cmp = TempDir::new("storage-jmp-compare");
    let mut candidates = vec![("jmp-mount", jmp_mount(bins, &d_jmp, &img))];
    if let Some(c) = compare {
        // The same mount from `--compare-bin-dir`'s build (its jmpd and jmp-mount), in the
        // same rounds.
        let r = jmp_mount(c, &d_cmp, &img).map(|mut r| {
            r.name = COMPARE;
            r
        });
        candidates.push((COMPARE, r));
    }
    candidates.push(("sshfs", sshfs(&d_ssh, &img)));
    candidates.push(("nbdkit+nbdfuse", nbdfuse(&d_nbd, &img)));
    for (name, r) in candidates {
        match r {
            Ok(r) => routes.push(r),
            Err(e) => skips.push(format!("SKIP: {name}: {e:#}")),
        }
    }
    for s in &skips {
        eprintln!("{s}");
    }
    // res[route][workload][round]
    let mut res: Vec<Vec<Vec<f64>>> = routes
        .iter()
        .map(|_| vec![Vec::new(); WORKLOADS.len()])
        .collect();
    let mut hwm_kib = 0u64;
    for k in 0..rounds {
        for (ri, r) in routes.iter().enumerate() {
            let v = round(r, &img).unwrap_or_else(|e| {
                eprintln!("  storage round {}: {}: {e:#}", k + 1, r.name);
                vec![f64::NAN; WORKLOADS.len()]
            });
            if r.name == "jmp-mount" {
                if let Some((_, hwm)) = r.pid.and_then(|p| crate::proc::rss_kib(p).ok()) {
                    hwm_kib = hwm_kib.max(hwm);
                }
            }
            eprintln!(
                "  storage round {}: {:<15} {}",
                k + 1,
                r.name,
                v.iter()
                    .map(|x| format!("{x:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            for (w, x) in v.into_iter().enumerate() {
                res[ri][w].push(x);
            }
        }
    }
    let med: Vec<Vec<f64>> = res
        .iter()
        .map(|r| r.iter().map(|v| median(v)).collect())
        .collect();
    let at = |name: &str, w: usize| {
        routes
            .iter()
            .position(|r| r.name == name)
            .map(|i| med[i][w])
            .unwrap_or(f64::NAN)
    };
    let mut md = format!(
        "### Storage (1 GiB image over loopback)\n\nfio 3.x `--ioengine=libaio`; sequential: `--bs=1M --iodepth=4` over the whole image \
         (writes `--end_fsync=1`); dd `bs=1M` (writes `conv=notrunc,fsync` from /dev/zero); random: `--bs=4k --direct=1 \
         --runtime={RAND_SECS} --time_based`. Medians over {rounds} interleaved rounds.\n\n| workload |"
    );
    for r in &routes {
        md.push_str(&format!(" {} |", r.name));
    }
    md.push_str("\n|---|");
    for _ in &routes {
        md.push_str("---:|");
    }
    md.push('\n');
    for (w, name) in WORKLOADS.iter().enumerate() {
        md.push_str(&format!("| {name} |"));
        for m in &med {
            md.push_str(&format!(" {} |", cell(m[w], 0)));
        }
        md.push('\n');
    }
    let mut targets = vec![
        (
            "jmp / sshfs seq read (fio)",
            at("jmp-mount", 0) / at("sshfs", 0),
            Target::AtLeast(2.0),
        ),
        (
            "jmp / sshfs randread QD1",
            at("jmp-mount", 4) / at("sshfs", 4),
            Target::AtLeast(2.0),
        ),
        (
            "jmp / sshfs randread QD16",
            at("jmp-mount", 5) / at("sshfs", 5),
            Target::AtLeast(3.0),
        ),
        (
            "jmp / nbdfuse seq read (fio)",
            at("jmp-mount", 0) / at("nbdkit+nbdfuse", 0),
            Target::AtLeast(1.0),
        ),
        (
            "jmp-mount peak RSS (MiB)",
            hwm_kib as f64 / 1024.0,
            Target::AtMost(30.0),
        ),
    ];

    if compare.is_some() {
        for (what, w) in [
            ("jmp-mount, this build / compare build, seq read (fio)", 0),
            ("jmp-mount, this build / compare build, randread QD1", 4),
            ("jmp-mount, this build / compare build, randread QD16", 5),
        ] {
            targets.push((
                what,
                at("jmp-mount", w) / at(COMPARE, w),
                Target::AtLeast(1.0),
            ));
        }
    }

    // Flashing.
    let d_flash = TempDir::new("storage-flash");
    let (src, bmap) = flash_source(&d_flash)?;
    let tgt = data.join("target.img");
    std::fs::File::create(&tgt)?.set_len(FLASH)?;
    let d_fj = TempDir::new("storage-flash-jmpd");
    let exp = start_jmpd(
        bins,
        &d_fj,
        &[(
            "tgt",
            format!("{{type: storage, path: {}, writable: true}}", tgt.display()),
        )],
    )?;
    let ssh_tgt = routes
        .iter()
        .find(|r| r.name == "sshfs")
        .map(|r| r.file.with_file_name("target.img"));
    let jmp_flash = |jmp: &Path, extra: &[&Path]| -> Result<f64> {
        let t = Instant::now();
        let mut c = command(jmp);
        c.args(["storage", "flash", "tgt"])
            .arg(&src)
            .args(["--exporter", &exp.addr])
            .arg("--token-file")
            .arg(&exp.token_file)
            .args(["--fingerprint", &exp.fingerprint])
            .env("JMP_RUNTIME_DIR", d_fj.join("rt"))
            .env("JMP_CONFIG_DIR", d_fj.join("cfg"));
        for b in extra {
            c.arg("--bmap").arg(b);
        }
        run_ok(&mut c, "jmp storage flash")?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut flash_names = vec!["jmp storage flash (raw)", "jmp storage flash --bmap"];
    if ssh_tgt.is_some() {
        flash_names.extend(["bmaptool copy onto sshfs", "dd onto sshfs"]);
    }
    // `--compare-bin-dir`'s `jmp` flashing through this run's jmpd (the flash's pacing is the
    // client's).
    let compare_jmp = compare.map(|c| c.jmp.clone());
    if compare_jmp.is_some() {
        flash_names.extend([
            "jmp storage flash (raw), compare build",
            "jmp storage flash --bmap, compare build",
        ]);
    }
    let mut fres: Vec<Vec<f64>> = flash_names.iter().map(|_| Vec::new()).collect();
    for k in 0..rounds {
        for (i, name) in flash_names.iter().enumerate() {
            let r = match *name {
                "jmp storage flash (raw)" => jmp_flash(&bins.jmp, &[]),
                "jmp storage flash --bmap" => jmp_flash(&bins.jmp, &[&bmap]),
                "jmp storage flash (raw), compare build" => {
                    jmp_flash(compare_jmp.as_deref().unwrap_or(&bins.jmp), &[])
                }
                "jmp storage flash --bmap, compare build" => {
                    jmp_flash(compare_jmp.as_deref().unwrap_or(&bins.jmp), &[&bmap])
                }
                "bmaptool copy onto sshfs" => {
                    let t = Instant::now();
                    let dst = ssh_tgt.clone().unwrap_or_default();
                    run_ok(
                        command("bmaptool")
                            .args(["-q", "copy", "--bmap"])
                            .arg(&bmap)
                            .arg(&src)
                            .arg(&dst),
                        "bmaptool copy",
                    )
                    .map(|_| t.elapsed().as_secs_f64())
                }
                _ => {
                    // "dd onto sshfs"
                    let t = Instant::now();
                    let dst = ssh_tgt.clone().unwrap_or_default();
                    run_ok(
                        command("dd")
                            .arg(format!("if={}", src.display()))
                            .arg(format!("of={}", dst.display()))
                            .args(["bs=4M", "conv=notrunc,fsync", "status=none"]),
                        "dd",
                    )
                    .map(|_| t.elapsed().as_secs_f64())
                }
            };
            let s = r.unwrap_or_else(|e| {
                eprintln!("  flash round {}: {name}: {e:#}", k + 1);
                f64::NAN
            });
            eprintln!("  flash round {}: {name:<28} {s:.2}s", k + 1);
            fres[i].push(s);
        }
    }
    let fmed: Vec<f64> = fres.iter().map(|v| median(v)).collect();
    md.push_str(&format!(
        "\nFlashing a 2 GiB image that is 25% data (8 × 64 MiB random), seconds (medians of {rounds}):\n\n| how | s | MB/s of image |\n|---|---:|---:|\n"
    ));
    for (n, s) in flash_names.iter().zip(&fmed) {
        md.push_str(&format!(
            "| {n} | {} | {} |\n",
            cell(*s, 2),
            cell(FLASH as f64 / s / 1e6, 0)
        ));
    }
    let fat = |n: &str| {
        flash_names
            .iter()
            .position(|x| *x == n)
            .map(|i| fmed[i])
            .unwrap_or(f64::NAN)
    };
    targets.push((
        "bmaptool over sshfs / jmp flash --bmap (time)",
        fat("bmaptool copy onto sshfs") / fat("jmp storage flash --bmap"),
        Target::AtLeast(3.0),
    ));
    if compare_jmp.is_some() {
        targets.push((
            "jmp flash (raw), this build / compare build (time)",
            fat("jmp storage flash (raw)") / fat("jmp storage flash (raw), compare build"),
            Target::AtMost(1.1),
        ));
    }
    md.push('\n');
    for (what, v, t) in &targets {
        md.push_str(&format!(
            "- {what} = {} (target {}): **{}**\n",
            cell(*v, 2),
            t.describe(),
            t.verdict(*v)
        ));
    }
    for s in &skips {
        md.push_str(&format!("- {s}\n"));
    }
    let js = serde_json::json!({
        "rounds": rounds,
        "workloads": WORKLOADS,
        "routes": routes.iter().zip(&med).zip(&res).map(|((r, m), v)| serde_json::json!({
            "name": r.name,
            "medians": m.iter().map(|x| json(*x)).collect::<Vec<_>>(),
            "rounds": v.iter().map(|w| w.iter().map(|x| json(*x)).collect::<Vec<_>>()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "flash": flash_names.iter().zip(&fmed).map(|(n, s)| serde_json::json!({"name": n, "seconds": json(*s)})).collect::<Vec<_>>(),
        "jmp_mount_peak_rss_kib": hwm_kib,
        "targets": targets.iter().map(|(w, v, t)| serde_json::json!({"what": w, "value": json(*v), "target": t.describe(), "verdict": t.verdict(*v)})).collect::<Vec<_>>(),
        "skips": skips,
    });
    drop(exp);
    drop(routes);
    Ok((md, js))
}
