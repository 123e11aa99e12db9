//! Network tunnel benchmark, in namespaces built for the run (jmp_e2e::netns: client, lab host,
//! board behind it). Through each path to the board: iperf3 TCP with 1 and 4 streams and ping
//! round trips, with 0%, 2% and 5% random loss on the client↔lab-host veth (nftables
//! `numgen random` drops at both ends' ingress, offloads off so that a drop is one wire packet).
//! Paths, interleaved round by round: the raw veth (the lab host routing, no tunnel: the
//! floor), the jmp tunnel, wireguard-go, boringtun-cli, `ssh -w`. Then TCP through jmp's
//! `--socks` against `ssh -D`, and the resident memory of `jmp attach` with its tunnel at rest.
//!
//! Needs root (namespaces). Peers that are not installed are skipped and said so:
//! wireguard-go and wg (Debian wireguard-go, wireguard-tools), boringtun-cli (`cargo install
//! boringtun-cli`), ssh/sshd.

use crate::jmp::Bins;
use crate::proc::{rss_kib, which, Proc, TempDir};
use crate::ssh::{self, keygen};
use crate::stats::{cell, json, median, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::netns::{self, Topology};
use jmp_e2e::{attach_args, command, start_attach, Jmpd, Options};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOARD: &str = netns::BOARD_ADDR;
const SUBNET: &str = netns::BOARD_SUBNET;
const BLAST_PORT: u16 = 9000;
const LOSSES: [u32; 3] = [0, 2, 5];
const PINGS: u32 = 100;

/// One way to the board.
struct Path_ {
    name: String,
    /// `ip route replace` arguments in the client namespace that send the subnet this way.
    route: Vec<String>,
    _procs: Vec<Proc>,
}

fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let out = command("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| format!("run {args:?} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = command("ip");
    c.args(["netns", "exec", ns]).arg(prog);
    c
}

/// Waits until `f` holds (setup only; hang guard `timeout`).
fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what}: not ready within {timeout:?}")
}

fn jmp_exporter(
    bins: &Bins,
    t: &Topology,
    dir: &TempDir,
    name: &str,
    port: u16,
) -> Result<(Proc, String)> {
    let token = dir.join("token");
    std::fs::write(&token, "bench-token\n")?;
    let cfg = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: {name}}}\n\
         listen: {}:{port}\nstateDir: {}\nauth: {{tokenFile: {}}}\nexport:\n  \
         lan: {{type: network, subnets: [{SUBNET}], via: {}}}\n",
        netns::LAB_ADDR,
        dir.join("state").display(),
        token.display(),
        netns::LAB_LAN_IF
    );
    let cfg_file = dir.join("exporter.yaml");
    std::fs::write(&cfg_file, cfg)?;
    let mut cmd = in_ns(&t.lab, &bins.jmpd);
    cmd.arg("--config").arg(&cfg_file);
    let jmpd = Jmpd::start(cmd, dir.path())?;
    Ok((jmpd.proc, jmpd.fingerprint))
}

fn jmp_attach(
    bins: &Bins,
    t: &Topology,
    dir: &TempDir,
    port: u16,
    fp: &str,
    extra: &[&str],
) -> Result<Proc> {
    for d in ["dev", "runtime", "config"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let mut cmd = in_ns(&t.client, &bins.jmp);
    attach_args(
        &mut cmd,
        &format!("{}:{port}", netns::LAB_ADDR),
        &dir.join("token"),
        fp,
        &dir.join("dev"),
    )
    .args(extra)
    .env("JMP_RUNTIME_DIR", dir.join("runtime"))
    .env("JMP_CONFIG_DIR", dir.join("config"))
    .env("JMP_LOG", "info");
    Ok(start_attach(cmd, dir.path())?.0)
}

/// A WireGuard peer pair (wireguard-go or boringtun-cli): `cmd` starts one end in the
/// foreground given the interface name.
fn wireguard(
    t: &Topology,
    dir: &TempDir,
    label: &str,
    short: &str,
    net: u8,
    start: &dyn Fn(&str) -> Command,
) -> Result<Path_> {
    which("wg").ok_or_else(|| anyhow!("wg (wireguard-tools) is missing"))?;
    // The control sockets live in /var/run/wireguard, shared by every namespace: unique names.
    let tag = std::process::id() % 10000;
    let (ci, li) = (format!("jb{tag}{short}c"), format!("jb{tag}{short}l"));
    let key = |n: &str| -> Result<(PathBuf, String)> {
        let k = String::from_utf8(command("wg").arg("genkey").output()?.stdout)?;
        let path = dir.join(n);
        std::fs::write(&path, &k)?;
        let mut c = command("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        c.stdin.take().expect("piped").write_all(k.as_bytes())?;
        let out = c.wait_with_output()?;
        Ok((path, String::from_utf8(out.stdout)?.trim().to_string()))
    };
    let (ck, cpub) = key("c.key")?;
    let (lk, lpub) = key("l.key")?;
    let mut procs = Vec::new();
    for (ns, ifn) in [(&t.client, &ci), (&t.lab, &li)] {
        let mut c = start(ifn);
        let mut w = command("ip");
        w.args(["netns", "exec", ns])
            .arg(c.get_program())
            .args(c.get_args());
        for (k, v) in c.get_envs() {
            if let Some(v) = v {
                w.env(k, v);
            }
        }
        let _ = &mut c;
        procs.push(Proc::start(label, &mut w, dir.path(), Options::LOG)?);
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifn}.sock"));
        wait(&format!("{label} {ifn}"), Duration::from_secs(10), || {
            sock.exists()
        })?;
    }
    let lan = format!("10.{net}.0");
    // Each pair its own port: both lab ends share the lab namespace.
    let port = format!("51{net}");
    ip_in(
        &t.lab,
        &[
            "wg",
            "set",
            &li,
            "private-key",
            &lk.display().to_string(),
            "listen-port",
            &port,
            "peer",
            &cpub,
            "allowed-ips",
            &format!("{lan}.2/32"),
        ],
    )?;
    ip_in(
        &t.client,
        &[
            "wg",
            "set",
            &ci,
            "private-key",
            &ck.display().to_string(),
            "peer",
            &lpub,
            "endpoint",
            &format!("{}:{port}", netns::LAB_ADDR),
            "allowed-ips",
            &format!("{SUBNET},{lan}.0/24"),
        ],
    )?;
    ip_in(
        &t.client,
        &["ip", "addr", "add", &format!("{lan}.2/32"), "dev", &ci],
    )?;
    ip_in(&t.client, &["ip", "link", "set", &ci, "mtu", "1420", "up"])?;
    ip_in(
        &t.lab,
        &["ip", "addr", "add", &format!("{lan}.1/24"), "dev", &li],
    )?;
    ip_in(&t.lab, &["ip", "link", "set", &li, "mtu", "1420", "up"])?;
    Ok(Path_ {
        name: label.to_string(),
        route: vec!["dev".into(), ci, "src".into(), format!("{lan}.2")],
        _procs: procs,
    })
}

/// sshd in the lab namespace (tunnels and forwarding allowed) and the client's key.
fn sshd(t: &Topology, dir: &TempDir) -> Result<(Proc, PathBuf)> {
    let sshd = which("/usr/sbin/sshd").ok_or_else(|| anyhow!("/usr/sbin/sshd is missing"))?;
    which("ssh").ok_or_else(|| anyhow!("ssh is missing"))?;
    std::fs::create_dir_all("/run/sshd")?;
    let (host, user) = (dir.join("host_key"), dir.join("user_key"));
    keygen(&host)?;
    keygen(&user)?;
    std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))?;
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port 2222\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\n\
             PidFile none\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitTunnel yes\nAllowTcpForwarding yes\n\
             LogLevel INFO\n",
            netns::LAB_ADDR,
            host.display(),
            dir.join("authorized_keys").display()
        ),
    )?;
    let p = Proc::start(
        "sshd",
        in_ns(&t.lab, sshd).args(["-D", "-e", "-f"]).arg(&cfg),
        dir.path(),
        Options::LOG,
    )?;
    wait("sshd", Duration::from_secs(10), || {
        p.stderr().contains("Server listening")
    })?;
    Ok((p, user))
}

fn ssh_cmd(t: &Topology, key: &Path) -> Command {
    let mut c = in_ns(&t.client, "ssh");
    c.args(["-N", "-p", "2222", "-i"])
        .arg(key)
        .args(ssh::CLIENT_OPTIONS);
    c
}

fn ssh_w(t: &Topology, dir: &TempDir, key: &Path) -> Result<Path_> {
    let tun = 77;
    let dev = format!("tun{tun}");
    let c = Proc::start(
        "ssh -w",
        ssh_cmd(t, key)
            .args(["-o", "Tunnel=point-to-point", "-w", &format!("{tun}:{tun}")])
            .arg(format!("root@{}", netns::LAB_ADDR)),
        dir.path(),
        Options::LOG,
    )?;
    for ns in [&t.client, &t.lab] {
        wait("ssh -w tun", Duration::from_secs(15), || {
            ip_in(ns, &["ip", "link", "show", &dev]).is_ok()
        })?;
    }
    ip_in(
        &t.client,
        &[
            "ip",
            "addr",
            "add",
            "10.96.0.2/32",
            "peer",
            "10.96.0.1",
            "dev",
            &dev,
        ],
    )?;
    ip_in(&t.client, &["ip", "link", "set", &dev, "up"])?;
    ip_in(
        &t.lab,
        &[
            "ip",
            "addr",
            "add",
            "10.96.0.1/32",
            "peer",
            "10.96.0.2",
            "dev",
            &dev,
        ],
    )?;
    ip_in(&t.lab, &["ip", "link", "set", &dev, "up"])?;
    Ok(Path_ {
        name: "ssh -w".into(),
        route: vec!["dev".into(), dev, "src".into(), "10.96.0.2".into()],
        _procs: vec![c],
    })
}

/// Random loss of `pct` % on both ends of the client↔lab-host veth (0: none, offloads back on).
fn set_loss(t: &Topology, pct: u32) -> Result<()> {
    for (ns, dev) in [(&t.client, netns::CLIENT_IF), (&t.lab, netns::LAB_IF)] {
        let _ = ip_in(ns, &["nft", "delete", "table", "netdev", "jmpbench_loss"]);
        let on = if pct == 0 { "on" } else { "off" };
        // One drop must be one wire packet, not a 64 KiB super-packet or a UDP GSO batch.
        let _ = ip_in(ns, &["ethtool", "-K", dev, "tso", on, "gso", on, "gro", on]);
        if pct > 0 {
            let script = format!(
                "table netdev jmpbench_loss {{\n chain ingress {{\n  type filter hook ingress device \"{dev}\" priority 0;\n  numgen random mod 1000 < {} drop\n }}\n}}\n",
                pct * 10
            );
            let mut c = in_ns(ns, "nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()?;
            c.stdin
                .take()
                .expect("piped")
                .write_all(script.as_bytes())?;
            if !c.wait()?.success() {
                bail!("nft loss table in {ns}");
            }
        }
    }
    Ok(())
}

fn use_path(t: &Topology, p: &Path_) -> Result<()> {
    let mut args = vec!["ip", "route", "replace", SUBNET];
    args.extend(p.route.iter().map(String::as_str));
    ip_in(&t.client, &args).map(|_| ())
}

/// iperf3 TCP to the board; Gbit/s received. One retry: after a collapsed run the server may
/// still be finishing it.
fn iperf(t: &Topology, streams: u32, seconds: u32) -> Result<f64> {
    iperf_once(t, streams, seconds).or_else(|_| {
        std::thread::sleep(Duration::from_secs(2));
        iperf_once(t, streams, seconds)
    })
}

fn iperf_once(t: &Topology, streams: u32, seconds: u32) -> Result<f64> {
    // `timeout`: a tunnel that collapses under loss must not hang the benchmark.
    let out = in_ns(&t.client, "timeout")
        .arg((seconds * 4 + 20).to_string())
        .arg("iperf3")
        .args([
            "-c",
            BOARD,
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()
        .context("iperf3 -c")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow!("iperf3 JSON lacks end.sum_received.bits_per_second"))
}

/// Median ping round trip to the board, µs.
fn ping(t: &Topology) -> Result<f64> {
    let out = in_ns(&t.client, "ping")
        .args(["-c", &PINGS.to_string(), "-i", "0.01", "-W", "1", BOARD])
        .output()
        .context("ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .split("time=")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if rtts.is_empty() {
        bail!("no ping answer");
    }
    Ok(median(&rtts))
}

/// `jmp-bench net-blast ADDR`: serves zeros to every connection until it closes (the board's
/// side of the SOCKS measurement).
pub fn blast_main(args: &[String]) -> Result<()> {
    let addr = args
        .first()
        .ok_or_else(|| anyhow!("usage: net-blast ADDR"))?;
    let l = TcpListener::bind(addr)?;
    println!("listening");
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let buf = vec![0u8; 256 * 1024];
            while s.write_all(&buf).is_ok() {}
        });
    }
    Ok(())
}

/// `jmp-bench net-socks-get PROXY HOST PORT SECONDS`: reads through a SOCKS5 proxy for
/// SECONDS; prints Gbit/s.
pub fn socks_get_main(args: &[String]) -> Result<()> {
    let [proxy, host, port, secs] = args else {
        bail!("usage: net-socks-get PROXY HOST PORT SECONDS");
    };
    let port: u16 = port.parse()?;
    let secs: f64 = secs.parse()?;
    let mut s = TcpStream::connect(proxy)?;
    s.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m)?;
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req)?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep)?;
    if rep[1] != 0 {
        bail!("SOCKS reply {}", rep[1]);
    }
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    let _ = s.shutdown(Shutdown::Both);
    println!("{}", n as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9);
    Ok(())
}

fn socks_get(t: &Topology, proxy: &str, seconds: u32) -> Result<f64> {
    let me = std::env::current_exe()?;
    let out = in_ns(&t.client, me)
        .args([
            "net-socks-get",
            proxy,
            BOARD,
            &BLAST_PORT.to_string(),
            &seconds.to_string(),
        ])
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Runs the network benchmark; returns (markdown, json).
pub fn run(bins: &Bins, rounds: usize, seconds: u32) -> Result<(String, serde_json::Value)> {
    netns::available().map_err(|e| anyhow!("SKIP: {e}"))?;
    for tool in ["iperf3", "nft", "ethtool", "ping"] {
        which(tool).ok_or_else(|| anyhow!("SKIP: {tool} is not installed"))?;
    }
    let t = Topology::new();
    let dir = TempDir::new("net");
    // The lab host forwards (as a router would), and NATs whatever leaves towards the board,
    // for every path alike; jmpd adds its own table on top.
    ip_in(&t.lab, &["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"])?;
    let mut nat = in_ns(&t.lab, "nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    nat.stdin.take().expect("piped").write_all(
        format!(
            "table ip jmpbench {{\n chain post {{\n  type nat hook postrouting priority srcnat;\n  oifname \"{}\" masquerade\n }}\n}}\n",
            netns::LAB_LAN_IF
        )
        .as_bytes(),
    )?;
    if !nat.wait()?.success() {
        bail!("bench NAT table");
    }
    let _iperf_server = Proc::start(
        "iperf3 -s",
        in_ns(&t.board, "iperf3").args(["-s", "-B", BOARD]),
        dir.path(),
        Options::LOG,
    )?;
    let mut blast = Proc::start(
        "blast",
        in_ns(&t.board, std::env::current_exe()?)
            .args(["net-blast", &format!("{BOARD}:{BLAST_PORT}")]),
        dir.path(),
        Options::LINES,
    )?;
    blast.next_line(Duration::from_secs(10))?;

    let mut skips = Vec::new();
    let mut paths = vec![Path_ {
        name: "raw veth".into(),
        route: vec!["via".into(), netns::LAB_ADDR.into()],
        _procs: vec![],
    }];
    // jmp first: it refuses to add a route over one that exists, so the others come after.
    let dj = TempDir::new("net-jmp");
    let (jmpd, fp) = jmp_exporter(bins, &t, &dj, "bench", 7700)?;
    let attach = jmp_attach(bins, &t, &dj, 7700, &fp, &[])?;
    wait("jmp tunnel", Duration::from_secs(20), || {
        attach.stderr().contains("tunnel up on")
    })?;
    let attach_pid = attach.pid();
    let jmp_src = ip_in(
        &t.client,
        &["ip", "-4", "-o", "addr", "show", "dev", "jmp-bench"],
    )?
    .split_whitespace()
    .skip_while(|w| *w != "inet")
    .nth(1)
    .and_then(|a| a.split('/').next())
    .map(str::to_string)
    .ok_or_else(|| anyhow!("jmp-bench has no address"))?;
    paths.push(Path_ {
        name: "jmp".into(),
        route: vec!["dev".into(), "jmp-bench".into(), "src".into(), jmp_src],
        _procs: vec![attach, jmpd],
    });
    let dw = TempDir::new("net-wg");
    match which("wireguard-go")
        .ok_or_else(|| anyhow!("wireguard-go is not installed"))
        .and_then(|wg| {
            wireguard(&t, &dw, "wireguard-go", "wg", 98, &|ifn| {
                let mut c = command(&wg);
                c.args(["-f", ifn])
                    .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
                c
            })
        }) {
        Ok(p) => paths.push(p),
        Err(e) => skips.push(format!("SKIP: wireguard-go: {e:#}")),
    }
    let db = TempDir::new("net-boringtun");
    let boringtun = which("boringtun-cli").or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cargo/bin/boringtun-cli");
        p.exists().then_some(p)
    });
    match boringtun
        .ok_or_else(|| anyhow!("boringtun-cli is not installed (cargo install boringtun-cli)"))
        .and_then(|bt| {
            wireguard(&t, &db, "boringtun", "bt", 97, &|ifn| {
                let mut c = command(&bt);
                c.args(["-f", "--disable-drop-privileges", ifn]);
                c
            })
        }) {
        Ok(p) => paths.push(p),
        Err(e) => skips.push(format!("SKIP: boringtun-cli: {e:#}")),
    }
    let ds = TempDir::new("net-ssh");
    let ssh = sshd(&t, &ds);
    let mut ssh_d = None;
    match &ssh {
        Ok((_, key)) => {
            match ssh_w(&t, &ds, key) {
                Ok(p) => paths.push(p),
                Err(e) => skips.push(format!("SKIP: ssh -w: {e:#}")),
            }
            match Proc::start(
                "ssh -D",
                ssh_cmd(&t, key)
                    .args(["-D", "127.0.0.1:1081"])
                    .arg(format!("root@{}", netns::LAB_ADDR)),
                ds.path(),
                Options::LOG,
            ) {
                Ok(p) => ssh_d = Some(p),
                Err(e) => skips.push(format!("SKIP: ssh -D: {e:#}")),
            }
        }
        Err(e) => skips.push(format!("SKIP: ssh -w and ssh -D: {e:#}")),
    }
    // jmp's SOCKS door: a second exporter (its own TUN name), attached with --socks.
    let dk = TempDir::new("net-socks");
    let (kjmpd, kfp) = jmp_exporter(bins, &t, &dk, "benchs", 7701)?;
    let kattach = jmp_attach(bins, &t, &dk, 7701, &kfp, &["--socks", "1080"])?;
    for s in &skips {
        eprintln!("{s}");
    }

    // results[loss][path] = (tcp1, tcp4, ping)
    let mut res: Vec<Vec<[Vec<f64>; 3]>> = LOSSES
        .iter()
        .map(|_| paths.iter().map(|_| Default::default()).collect())
        .collect();
    let mut socks: [Vec<f64>; 2] = Default::default();
    let mut rss_rest = Vec::new();
    for r in 0..rounds {
        for (li, &loss) in LOSSES.iter().enumerate() {
            set_loss(&t, loss)?;
            for (pi, p) in paths.iter().enumerate() {
                use_path(&t, p)?;
                let mut m = |what: usize, v: Result<f64>| {
                    let v = v.unwrap_or_else(|e| {
                        eprintln!("  round {}: {} {loss}%: {e:#}", r + 1, p.name);
                        f64::NAN
                    });
                    res[li][pi][what].push(v);
                    v
                };
                let a = m(0, iperf(&t, 1, seconds));
                let b = m(1, iperf(&t, 4, seconds));
                let c = m(2, ping(&t));
                eprintln!(
                    "  net round {} loss {loss}%: {:<13} tcp {a:>6.2} Gbit/s  4 streams {b:>6.2}  ping {c:>6.0} µs",
                    r + 1,
                    p.name
                );
            }
        }
        set_loss(&t, 0)?;
        let a = socks_get(&t, "127.0.0.1:1080", seconds).unwrap_or_else(|e| {
            eprintln!("  socks: {e:#}");
            f64::NAN
        });
        let b = if ssh_d.is_some() {
            socks_get(&t, "127.0.0.1:1081", seconds).unwrap_or_else(|e| {
                eprintln!("  ssh -D: {e:#}");
                f64::NAN
            })
        } else {
            f64::NAN
        };
        eprintln!(
            "  net round {}: jmp --socks {a:.2} Gbit/s, ssh -D {b:.2}",
            r + 1
        );
        socks[0].push(a);
        socks[1].push(b);
        // At rest: after this round's traffic, once idle.
        std::thread::sleep(Duration::from_secs(2));
        rss_rest.push(
            rss_kib(attach_pid)
                .map(|(r, _)| r as f64 / 1024.0)
                .unwrap_or(f64::NAN),
        );
    }
    let med = |li: usize, name: &str, what: usize| {
        paths
            .iter()
            .position(|p| p.name == name)
            .map(|pi| median(&res[li][pi][what]))
            .unwrap_or(f64::NAN)
    };
    let mut md = format!(
        "### Network tunnel (iperf3 TCP, ping)\n\nNamespaces client → lab host → board; \
         `iperf3 -c {BOARD} -t {seconds} [-P 4] -J` (Gbit/s received) and `ping -c {PINGS} -i 0.01` \
         (median µs) through each path, with random loss on the client↔lab-host veth \
         (nftables `numgen random` at both ingresses, offloads off when lossy). Medians over \
         {rounds} interleaved rounds.\n\n"
    );
    for (li, loss) in LOSSES.iter().enumerate() {
        md.push_str(&format!(
            "| {loss}% loss | TCP 1 stream | TCP 4 streams | ping µs |\n|---|---:|---:|---:|\n"
        ));
        for p in &paths {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                p.name,
                cell(med(li, &p.name, 0), 2),
                cell(med(li, &p.name, 1), 2),
                cell(med(li, &p.name, 2), 0)
            ));
        }
        md.push('\n');
    }
    let socks_med = [median(&socks[0]), median(&socks[1])];
    let rss = median(&rss_rest);
    md.push_str(&format!(
        "| TCP through SOCKS5 | Gbit/s |\n|---|---:|\n| jmp --socks | {} |\n| ssh -D | {} |\n\n\
         - jmp attach resident with the tunnel at rest: {} MiB\n",
        cell(socks_med[0], 2),
        cell(socks_med[1], 2),
        cell(rss, 1)
    ));
    let mut targets = Vec::new();
    let mut target = |what: String, value: f64, t: Target| {
        md.push_str(&format!(
            "- {what} = {} (target {}): **{}**\n",
            cell(value, 2),
            t.describe(),
            t.verdict(value)
        ));
        targets.push(serde_json::json!({"what": what, "value": json(value), "target": t.describe(), "verdict": t.verdict(value)}));
    };
    for (w, i) in [("1 stream", 0), ("4 streams", 1)] {
        for peer in ["boringtun", "wireguard-go"] {
            target(
                format!("jmp / {peer}, TCP {w}, no loss"),
                med(0, "jmp", i) / med(0, peer, i),
                Target::AtLeast(5.0),
            );
        }
    }
    target(
        "jmp ping / wireguard-go ping, no loss".into(),
        med(0, "jmp", 2) / med(0, "wireguard-go", 2),
        Target::AtMost(1.0),
    );
    for (w, i) in [("1 stream", 0), ("4 streams", 1)] {
        target(
            format!("jmp / ssh -w, TCP {w}, 5% loss"),
            med(2, "jmp", i) / med(2, "ssh -w", i),
            Target::AtLeast(2.0),
        );
        target(
            format!("jmp / wireguard-go, TCP {w}, 5% loss"),
            med(2, "jmp", i) / med(2, "wireguard-go", i),
            Target::AtLeast(1.0),
        );
    }
    target(
        "jmp --socks / ssh -D".into(),
        socks_med[0] / socks_med[1],
        Target::AtLeast(1.0),
    );
    target(
        "jmp attach RSS at rest, MiB".into(),
        rss,
        Target::AtMost(25.0),
    );
    for s in &skips {
        md.push_str(&format!("- {s}\n"));
    }
    let js = serde_json::json!({
        "seconds": seconds,
        "rounds": rounds,
        "losses_percent": LOSSES,
        "paths": paths.iter().enumerate().map(|(pi, p)| serde_json::json!({
            "name": p.name,
            "by_loss": LOSSES.iter().enumerate().map(|(li, l)| serde_json::json!({
                "loss_percent": l,
                "tcp1_gbit_s": res[li][pi][0].iter().map(|x| json(*x)).collect::<Vec<_>>(),
                "tcp4_gbit_s": res[li][pi][1].iter().map(|x| json(*x)).collect::<Vec<_>>(),
                "ping_us": res[li][pi][2].iter().map(|x| json(*x)).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "socks_gbit_s": {"jmp": socks[0].iter().map(|x| json(*x)).collect::<Vec<_>>(), "ssh -D": socks[1].iter().map(|x| json(*x)).collect::<Vec<_>>()},
        "attach_rss_mib_at_rest": rss_rest.iter().map(|x| json(*x)).collect::<Vec<_>>(),
        "targets": targets,
        "skips": skips,
    });
    drop((kattach, kjmpd, ssh_d, ssh, blast));
    drop(paths);
    t.remove();
    Ok((md, js))
}
