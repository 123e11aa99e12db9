//! `cargo run --release -p jmp-bench -- [all|BENCHMARK...] [--rounds N]
//! [--iperf-seconds S] [--no-build] [--bin-dir DIR]`
//!
//! `--bin-dir` takes `jmpd`, `jmp` and `jmp-controller` from DIR instead of building the
//! workspace (to measure a fixed commit while the working tree changes). `--compare-bin-dir
//! DIR` adds DIR's `jmpd` and `jmp` (and `jmp-mount`) as one more path of `serial`, `tcp`,
//! `storage` and `usb` and one more build of `console-flash`, in the same interleaved rounds (to
//! show a change's effect: DIR holds the build from before it).
//!
//! Runs each benchmark's baseline and peers in the same run, interleaved round by round, prints
//! a markdown table per benchmark (medians, ratios, PASS/MISS against the targets) and writes
//! everything as JSON to `target/bench-results.json`.

use anyhow::{bail, Result};
use jmp_bench::{
    boards, can, cluster, console_flash, controller, flood, growth, jmp, memory, net, pytest, quic,
    relay, serial, storage, storage_flood, tcp, usb,
};

/// Every benchmark, in the order `all` runs them (one line each: device kinds add theirs).
const BENCHES: &[&str] = &[
    "serial",
    "tcp",
    "quinn",
    "memory",
    "controller",
    "flood",
    "pytest",
    "net",
    "can",
    "storage",
    "storage-flood",
    "console-flash",
    "usb",
    "boards",
    "growth",
];

/// Run only when named: they need etcd and take minutes.
const ON_REQUEST: &[&str] = &["etcd", "etcd-failover"];
use jmp_e2e::command;

struct Args {
    which: Vec<String>,
    rounds: usize,
    iperf_seconds: u32,
    build: bool,
    bin_dir: Option<std::path::PathBuf>,
    compare: Option<std::path::PathBuf>,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        which: Vec::new(),
        rounds: 5,
        iperf_seconds: 5,
        build: true,
        bin_dir: None,
        compare: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--rounds" => a.rounds = it.next().unwrap_or_default().parse()?,
            "--iperf-seconds" => a.iperf_seconds = it.next().unwrap_or_default().parse()?,
            "--no-build" => a.build = false,
            "--bin-dir" => a.bin_dir = it.next().map(Into::into),
            "--compare-bin-dir" => a.compare = it.next().map(Into::into),
            "all" => a.which.extend(BENCHES.iter().map(|b| b.to_string())),
            b if BENCHES.contains(&b) || ON_REQUEST.contains(&b) => a.which.push(x),
            "-h" | "--help" => {
                println!(
                    "usage: jmp-bench [all|{}|{}]... [--rounds N] [--iperf-seconds S] [--no-build] \
                     [--bin-dir DIR] [--compare-bin-dir DIR]",
                    BENCHES.join("|"),
                    ON_REQUEST.join("|")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if a.which.is_empty() {
        a.which = BENCHES.iter().map(|b| b.to_string()).collect();
    }
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(a)
}

fn sh(cmd: &str, args: &[&str]) -> String {
    command(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    // The serial benchmark's reference relays run as children of this binary.
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("relay") => return relay::main(&argv[2..]),
        // The network benchmark's helpers, run inside its namespaces.
        Some("net-blast") => return net::blast_main(&argv[2..]),
        Some("net-socks-get") => return net::socks_get_main(&argv[2..]),
        _ => {}
    }
    let args = parse()?;
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    // As it was run (`cargo run` runs target/<profile>/jmp-bench too): the harness's own
    // path says its build, `--bin-dir` which binaries were measured.
    let command = std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = sh("uname", &["-r"]);
    let bins = jmp::bins(args.build, args.bin_dir.clone())?;
    let compare = match &args.compare {
        Some(d) => Some(jmp::bins(false, Some(d.clone()))?),
        None => None,
    };

    println!("## jmp benchmarks\n");
    println!("- date: {date}");
    println!("- command: `{}`", command.trim_end());
    println!("- machine: {cores} cores, kernel {kernel}");
    println!("- jmpd: {}", bins.jmpd.display());
    println!("- jmp: {}", bins.jmp.display());
    // The machine may be shared: the ratios within one run are what counts.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: String = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    println!("- load average at start (1, 5, 15 min): {load}");
    println!(
        "- rounds: {} (interleaved; medians reported)\n",
        args.rounds
    );

    let mut results = serde_json::Map::new();
    results.insert("date".into(), date.clone().into());
    results.insert("command".into(), command.trim_end().into());
    results.insert("cores".into(), cores.into());
    results.insert("kernel".into(), kernel.into());
    results.insert("rounds".into(), args.rounds.into());
    results.insert("jmpd".into(), bins.jmpd.display().to_string().into());
    results.insert("jmp".into(), bins.jmp.display().to_string().into());
    results.insert("load_at_start".into(), load.into());
    let mut failed = false;
    for w in &args.which {
        eprintln!("running {w} ...");
        let r = match w.as_str() {
            "serial" => serial::run(&bins, compare.as_ref(), args.rounds),
            "tcp" => tcp::run(&bins, compare.as_ref(), args.rounds, args.iperf_seconds),
            "quinn" => quic::run(args.rounds),
            "memory" => memory::run(&bins, args.rounds),
            "controller" => controller::run(&bins, args.rounds),
            "flood" => flood::run(&bins, args.rounds),
            "pytest" => pytest::run(&bins, args.rounds),
            "net" => net::run(&bins, args.rounds, args.iperf_seconds),
            "can" => can::run(&bins, args.rounds),
            "storage" => storage::run(&bins, compare.as_ref(), args.rounds),
            "storage-flood" => storage_flood::run(&bins, args.rounds),
            "console-flash" => console_flash::run(&bins, compare.as_ref(), args.rounds),
            "usb" => usb::run(&bins, compare.as_ref(), args.rounds),
            "boards" => boards::run(&bins, args.rounds),
            "growth" => growth::run(&bins, args.rounds),
            "etcd" => cluster::run(&bins, args.rounds, false),
            "etcd-failover" => cluster::run(&bins, args.rounds, true),
            _ => unreachable!("parsed"),
        };
        match r {
            Ok((md, js)) => {
                println!("{md}");
                results.insert(w.clone(), js);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if msg.starts_with("SKIP:") {
                    println!("### {w}\n\n{msg}\n");
                } else {
                    failed = true;
                    println!("### {w}\n\nFAILED: {msg}\n");
                }
                results.insert(w.clone(), serde_json::json!({ "error": msg }));
            }
        }
    }
    let out = jmp::workspace_dir().join("target/bench-results.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&serde_json::Value::Object(results))?,
    )?;
    println!("Results as JSON: {}", out.display());
    if failed {
        bail!("a benchmark failed");
    }
    Ok(())
}
