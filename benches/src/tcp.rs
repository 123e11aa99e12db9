//! TCP forward throughput with iperf3, on two networks: loopback (64 KiB MTU, which favours TCP
//! peers) and two network namespaces joined by a veth pair at MTU 1500 (what a lab network looks
//! like; `jmp_e2e::netns::Topology`, removed on drop even when the benchmark fails). Paths,
//! interleaved round by round: the plain network (baseline), a jmp forward (jmpd exports the
//! iperf3 server as `type: tcp`, the client connects to `jmp attach`'s local port), the same
//! with `--compare-bin-dir`'s build, through the controller's relay (loopback only), and
//! `ssh -L` through a private sshd.
//!
//! Besides Gbit/s, the CPU time the forwarding processes spent per byte moved (jmp attach +
//! jmpd; ssh + sshd and its session children), from /proc/PID/stat utime+stime before and
//! after each iperf3 run, and that time in cycles at the clock /proc/cpuinfo reports (this
//! machine is a VM without a usable cycle counter for `perf stat`).

use crate::jmp::Bins;
use crate::proc::{free_port, wait_for, which, Proc, TempDir};
use crate::ssh::{self, keygen};
use crate::stats::{cell, json, median, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::netns::{self, Topology};
use jmp_e2e::{attach_args, command, exporter_yaml, in_netns, Jmpd, Options};
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

/// Where the benchmark runs: both ends on this namespace's loopback, or the client end and
/// the lab end in two namespaces joined by a veth pair at MTU 1500.
pub(crate) enum Net {
    Loopback,
    Veth(Topology),
}

impl Net {
    fn veth() -> Result<Net> {
        netns::available().map_err(|e| anyhow!("{e}"))?;
        let t = Topology::new();
        for (ns, dev) in [(&t.client, netns::CLIENT_IF), (&t.lab, netns::LAB_IF)] {
            netns::ip(&["-n", ns, "link", "set", dev, "mtu", "1500"]);
        }
        Ok(Net::Veth(t))
    }

    fn label(&self) -> &'static str {
        match self {
            Net::Loopback => "loopback",
            Net::Veth(_) => "veth pair between two namespaces, MTU 1500",
        }
    }

    fn key(&self) -> &'static str {
        match self {
            Net::Loopback => "loopback",
            Net::Veth(_) => "veth1500",
        }
    }

    /// `prog` on the user's side (iperf3 -c, jmp attach, ssh).
    fn client(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Net::Loopback => command(prog),
            Net::Veth(t) => in_netns(&t.client, command(prog)),
        }
    }

    /// `prog` on the lab host's side (iperf3 -s, jmpd, sshd).
    fn lab(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Net::Loopback => command(prog),
            Net::Veth(t) => in_netns(&t.lab, command(prog)),
        }
    }

    /// The lab host's address as the client side reaches it.
    fn lab_addr(&self) -> &'static str {
        match self {
            Net::Loopback => "127.0.0.1",
            Net::Veth(_) => netns::LAB_ADDR,
        }
    }
}

/// Whether some socket listens on TCP `port` in the network namespace of process `pid` (read
/// from /proc/PID/net/tcp{,6}: no connection the listener would see).
fn listens(pid: i32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let v: Vec<&str> = l.split_whitespace().collect();
                v.len() > 3 && v[1].ends_with(&want) && v[3] == "0A"
            })
    })
}

fn wait_port(proc: &mut Proc, port: u16) -> Result<()> {
    let pid = proc.pid();
    wait_for(
        &format!("listening on port {port}"),
        proc,
        Duration::from_secs(15),
        || listens(pid, port),
    )
}

pub(crate) struct Route {
    pub(crate) name: String,
    pub(crate) port: u16,
    /// The forwarding processes, whose CPU time (with their descendants') is counted.
    pub(crate) pids: Vec<i32>,
    pub(crate) _procs: Vec<Proc>,
}

fn local_port(local: &str) -> Result<u16> {
    local
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("unexpected local address {local}"))
}

pub(crate) fn jmp(
    net: &Net,
    bins: &Bins,
    name: &str,
    dir: &TempDir,
    iperf_port: u16,
) -> Result<Route> {
    let token = dir.join("token");
    std::fs::write(&token, "bench-token\n")?;
    let cfg = exporter_yaml(
        "bench",
        &format!("{}:0", net.lab_addr()),
        &dir.join("state"),
        &token,
        &format!("iperf: {{type: tcp, host: 127.0.0.1, port: {iperf_port}}}\n"),
    );
    let cfg_file = dir.join("exporter.yaml");
    std::fs::write(&cfg_file, cfg)?;
    let mut cmd = net.lab(&bins.jmpd);
    cmd.arg("--config").arg(&cfg_file);
    let exp = Jmpd::start(cmd, dir.path())?;
    for d in ["dev", "runtime", "config"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let mut cmd = net.client(&bins.jmp);
    attach_args(
        &mut cmd,
        &exp.addr.to_string(),
        &token,
        &exp.fingerprint,
        &dir.join("dev"),
    )
    .env("JMP_RUNTIME_DIR", dir.join("runtime"))
    .env("JMP_CONFIG_DIR", dir.join("config"));
    let (att, ready) = jmp_e2e::start_attach(cmd, dir.path())?;
    let port = local_port(&jmp_e2e::local_of(&ready, "iperf"))?;
    Ok(Route {
        name: name.into(),
        port,
        pids: vec![att.pid(), exp.proc.pid()],
        _procs: vec![att, exp.proc],
    })
}

/// The same forward through the controller's relay (`jmp attach --via relay`), loopback only.
fn jmp_relay(bins: &Bins, dir: &TempDir, iperf_port: u16) -> Result<Route> {
    let r = crate::via_relay::start(
        bins,
        dir,
        &[(
            "iperf",
            format!("{{type: tcp, host: 127.0.0.1, port: {iperf_port}}}"),
        )],
    )?;
    let port = local_port(&r.attach.local("iperf")?)?;
    let mut procs = vec![r.attach.proc];
    procs.extend(r.procs);
    Ok(Route {
        name: "jmp forward via relay".into(),
        port,
        pids: procs.iter().map(Proc::pid).collect(),
        _procs: procs,
    })
}

/// A private sshd on 127.0.0.1 that accepts `key` for this user (also used by the storage
/// benchmark's sshfs).
pub struct Sshd {
    pub proc: Proc,
    pub port: u16,
    pub key: std::path::PathBuf,
    pub user: String,
}

pub fn sshd(dir: &TempDir) -> Result<Sshd> {
    sshd_on(&Net::Loopback, dir)
}

fn sshd_on(net: &Net, dir: &TempDir) -> Result<Sshd> {
    let sshd = which("/usr/sbin/sshd").ok_or_else(|| anyhow!("/usr/sbin/sshd is missing"))?;
    which("ssh-keygen").ok_or_else(|| anyhow!("ssh-keygen is missing"))?;
    std::fs::create_dir_all("/run/sshd").context("mkdir /run/sshd")?;
    let host_key = dir.join("host_key");
    let user_key = dir.join("user_key");
    keygen(&host_key)?;
    keygen(&user_key)?;
    let auth = dir.join("authorized_keys");
    std::fs::copy(dir.join("user_key.pub"), &auth)?;
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())?
        .map(|u| u.name)
        .ok_or_else(|| anyhow!("no user name for this uid"))?;
    let ssh_port = free_port()?;
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {ssh_port}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nPidFile {}\nUsePAM no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
            net.lab_addr(),
            host_key.display(),
            auth.display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let mut cmd = net.lab(sshd);
    cmd.args(["-D", "-e", "-f"]).arg(&cfg);
    let mut d = Proc::start("sshd", cmd, dir.path(), Options::LOG)?;
    wait_port(&mut d, ssh_port)?;
    Ok(Sshd {
        proc: d,
        port: ssh_port,
        key: user_key,
        user,
    })
}

pub(crate) fn ssh(net: &Net, dir: &TempDir, iperf_port: u16) -> Result<Route> {
    let ssh = which("ssh").ok_or_else(|| anyhow!("ssh is missing"))?;
    let Sshd {
        proc: d,
        port: ssh_port,
        key: user_key,
        user,
    } = sshd_on(net, dir)?;
    let port = free_port()?;
    let mut cmd = net.client(ssh);
    cmd.arg("-N")
        .arg("-L")
        .arg(format!("127.0.0.1:{port}:127.0.0.1:{iperf_port}"))
        .args(["-p", &ssh_port.to_string(), "-i"])
        .arg(&user_key)
        .args(ssh::CLIENT_OPTIONS)
        .arg(format!("{user}@{}", net.lab_addr()));
    let mut c = Proc::start("ssh -L", cmd, dir.path(), Options::LOG)?;
    wait_port(&mut c, port)?;
    Ok(Route {
        name: "ssh -L".into(),
        port,
        pids: vec![c.pid(), d.pid()],
        _procs: vec![c, d],
    })
}

/// utime + stime, in clock ticks, of `roots` and every process descending from them (sshd does
/// its work in session children).
fn cpu_ticks(roots: &[i32]) -> u64 {
    let mut procs: HashMap<i32, (i32, u64)> = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may contain spaces and parentheses: fields start after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // state ppid ... (utime and stime are the 14th and 15th fields of the whole line).
        let (Some(ppid), Some(ut), Some(st)) = (
            f.get(1).and_then(|v| v.parse().ok()),
            f.get(11).and_then(|v| v.parse::<u64>().ok()),
            f.get(12).and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        procs.insert(pid, (ppid, ut + st));
    }
    let mut set: HashSet<i32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (pid, (ppid, _)) in &procs {
            if set.contains(ppid) {
                set.insert(*pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    set.iter()
        .filter_map(|p| procs.get(p))
        .map(|(_, t)| *t)
        .sum()
}

fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// The clock /proc/cpuinfo reports, in GHz (NaN when it says none).
fn cpu_ghz() -> f64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(f64::NAN, |mhz| mhz / 1000.0)
}

/// One iperf3 client run on the client side; (Gbit/s, bytes) received.
fn iperf(net: &Net, host: &str, port: u16, seconds: u32) -> Result<(f64, f64)> {
    let out = net
        .client("iperf3")
        .args(["-c", host, "-p", &port.to_string()])
        .args(["-t", &seconds.to_string(), "-J"])
        .output()
        .context("run iperf3 -c")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let r = &v["end"]["sum_received"];
    match (r["bits_per_second"].as_f64(), r["bytes"].as_f64()) {
        (Some(b), Some(n)) => Ok((b / 1e9, n)),
        _ => bail!("iperf3 JSON lacks end.sum_received.bits_per_second or bytes"),
    }
}

/// Runs the TCP benchmark on loopback and on the veth pair; returns (markdown, json).
pub fn run(
    bins: &Bins,
    compare: Option<&Bins>,
    rounds: usize,
    seconds: u32,
) -> Result<(String, serde_json::Value)> {
    which("iperf3").ok_or_else(|| anyhow!("SKIP: iperf3 is not installed"))?;
    let mut md = String::new();
    let mut js = serde_json::Map::new();
    let nets: [fn() -> Result<Net>; 2] = [|| Ok(Net::Loopback), Net::veth];
    for make in nets {
        let net = match make() {
            Ok(n) => n,
            Err(e) => {
                md.push_str(&format!("- SKIP: the veth network: {e:#}\n"));
                continue;
            }
        };
        match run_on(&net, bins, compare, rounds, seconds) {
            Ok((m, j)) => {
                md.push_str(&m);
                js.insert(net.key().into(), j);
            }
            Err(e) => md.push_str(&format!("- SKIP: {}: {e:#}\n", net.label())),
        }
    }
    Ok((md, serde_json::Value::Object(js)))
}

fn run_on(
    net: &Net,
    bins: &Bins,
    compare: Option<&Bins>,
    rounds: usize,
    seconds: u32,
) -> Result<(String, serde_json::Value)> {
    let dir = TempDir::new("tcp");
    let iperf_port = free_port()?;
    let mut cmd = net.lab("iperf3");
    cmd.args(["-s", "-p", &iperf_port.to_string()]);
    if matches!(net, Net::Loopback) {
        cmd.args(["-B", "127.0.0.1"]);
    }
    let mut server = Proc::start("iperf3 -s", cmd, dir.path(), Options::LOG)?;
    wait_port(&mut server, iperf_port)?;
    let mut skips = Vec::new();
    let mut routes = vec![Route {
        name: format!("plain {}", net.key()),
        port: iperf_port,
        pids: vec![],
        _procs: vec![],
    }];
    let dirs: Vec<TempDir> = (0..4).map(|i| TempDir::new(&format!("tcp-{i}"))).collect();
    match jmp(net, bins, "jmp forward", &dirs[0], iperf_port) {
        Ok(r) => routes.push(r),
        Err(e) => skips.push(format!("SKIP: jmp forward: {e:#}")),
    }
    if let Some(c) = compare {
        match jmp(net, c, "jmp forward, compare build", &dirs[1], iperf_port) {
            Ok(r) => routes.push(r),
            Err(e) => skips.push(format!("SKIP: jmp forward, compare build: {e:#}")),
        }
    }
    if matches!(net, Net::Loopback) {
        match jmp_relay(bins, &dirs[2], iperf_port) {
            Ok(r) => routes.push(r),
            Err(e) => skips.push(format!("SKIP: jmp forward via relay: {e:#}")),
        }
    }
    match ssh(net, &dirs[3], iperf_port) {
        Ok(r) => routes.push(r),
        Err(e) => skips.push(format!("SKIP: ssh -L: {e:#}")),
    }
    for s in &skips {
        eprintln!("{s}");
    }
    let tick = ticks_per_second();
    // Per route and round: Gbit/s, and CPU nanoseconds per byte of the forwarding processes.
    let mut gbit: Vec<Vec<f64>> = routes.iter().map(|_| Vec::new()).collect();
    let mut cpu: Vec<Vec<f64>> = routes.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (i, route) in routes.iter().enumerate() {
            let host = if route.pids.is_empty() {
                net.lab_addr()
            } else {
                "127.0.0.1"
            };
            let t0 = cpu_ticks(&route.pids);
            let mut g = iperf(net, host, route.port, seconds);
            if g.is_err() {
                // The server may still be finishing the previous test: one retry.
                std::thread::sleep(Duration::from_secs(1));
                g = iperf(net, host, route.port, seconds);
            }
            let t1 = cpu_ticks(&route.pids);
            let (g, ns_per_byte) = match g {
                Ok((g, bytes)) if !route.pids.is_empty() && bytes > 0.0 => {
                    (g, t1.saturating_sub(t0) as f64 / tick * 1e9 / bytes)
                }
                Ok((g, _)) => (g, f64::NAN),
                Err(e) => {
                    eprintln!("  round {}: {}: {e:#}", r + 1, route.name);
                    (f64::NAN, f64::NAN)
                }
            };
            eprintln!(
                "  tcp {} round {}: {:<28} {:>6.2} Gbit/s {:>6.2} CPU ns/B",
                net.key(),
                r + 1,
                route.name,
                g,
                ns_per_byte
            );
            gbit[i].push(g);
            cpu[i].push(ns_per_byte);
        }
    }
    let med: Vec<f64> = gbit.iter().map(|v| median(v)).collect();
    let med_cpu: Vec<f64> = cpu.iter().map(|v| median(v)).collect();
    let ghz = cpu_ghz();
    let find = |v: &[f64], name: &str| {
        routes
            .iter()
            .position(|r| r.name == name)
            .map(|i| v[i])
            .unwrap_or(f64::NAN)
    };
    let ratio = find(&med, "jmp forward") / find(&med, "ssh -L");
    let cpu_ratio = find(&med_cpu, "jmp forward") / find(&med_cpu, "ssh -L");
    let cmp_ratio = find(&med, "jmp forward") / find(&med, "jmp forward, compare build");
    let t = Target::AtLeast(1.3);
    let relay_ratio = find(&med, "jmp forward via relay") / find(&med, "jmp forward");
    let t_relay = Target::AtLeast(0.7);
    let mut md = format!(
        "### TCP forward throughput (iperf3), {}\n\n`iperf3 -c HOST -p PORT -t {seconds} -J`, one \
         TCP stream, `end.sum_received.bits_per_second`; CPU: utime+stime of the forwarding \
         processes (and their children) per byte received, in cycles at {} GHz. Medians over \
         {rounds} interleaved rounds.\n\n| path | Gbit/s | × plain | CPU ns/byte | cycles/byte \
         |\n|---|---:|---:|---:|---:|\n",
        net.label(),
        cell(ghz, 2)
    );
    for ((route, m), c) in routes.iter().zip(&med).zip(&med_cpu) {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            route.name,
            cell(*m, 2),
            cell(m / med[0], 3),
            cell(*c, 3),
            cell(c * ghz, 2)
        ));
    }
    md.push_str(&format!(
        "\n- jmp forward / ssh -L = {} (target {}, issue 22): **{}**; CPU per byte, jmp / ssh = {}\n",
        cell(ratio, 2),
        t.describe(),
        t.verdict(ratio),
        cell(cpu_ratio, 2)
    ));
    if compare.is_some() {
        md.push_str(&format!(
            "- jmp forward, this build / compare build = {}\n",
            cell(cmp_ratio, 2)
        ));
    }
    if matches!(net, Net::Loopback) {
        md.push_str(&format!(
            "- jmp forward via relay / jmp forward = {} (target {}): **{}**\n",
            cell(relay_ratio, 2),
            t_relay.describe(),
            t_relay.verdict(relay_ratio)
        ));
    }
    for s in &skips {
        md.push_str(&format!("- {s}\n"));
    }
    md.push('\n');
    let js = serde_json::json!({
        "network": net.label(),
        "seconds": seconds,
        "rounds": rounds,
        "cpu_ghz": json(ghz),
        "paths": routes.iter().enumerate().map(|(i, r)| serde_json::json!({
            "name": r.name,
            "gbit_s": json(med[i]),
            "rounds_gbit_s": gbit[i].iter().map(|x| json(*x)).collect::<Vec<_>>(),
            "cpu_ns_per_byte": json(med_cpu[i]),
            "rounds_cpu_ns_per_byte": cpu[i].iter().map(|x| json(*x)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "targets": [
            {"what": "jmp forward / ssh -L", "value": json(ratio), "target": t.describe(), "verdict": t.verdict(ratio)},
            {"what": "jmp forward via relay / jmp forward", "value": json(relay_ratio), "target": t_relay.describe(), "verdict": t_relay.verdict(relay_ratio)},
        ],
        "compare_ratio": json(cmp_ratio),
        "skips": skips,
    });
    // Processes go before the namespaces they run in.
    drop(routes);
    drop(server);
    Ok((md, js))
}
