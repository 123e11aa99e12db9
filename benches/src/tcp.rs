//! TCP forward throughput with iperf3: plain loopback (baseline), a jmp forward (jmpd exports the
//! iperf3 server as `type: tcp`, the client connects to `jmp attach`'s local port) and `ssh -L`
//! through a private sshd on 127.0.0.1.

use crate::jmp::{start_attach, start_jmpd, Bins};
use crate::proc::{free_port, wait_listening, which, Proc, TempDir};
use crate::stats::{cell, json, median, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::{command, Options};

use std::time::Duration;

struct Route {
    name: &'static str,
    port: u16,
    _procs: Vec<Proc>,
}

fn jmp(bins: &Bins, dir: &TempDir, iperf_port: u16) -> Result<Route> {
    let exp = start_jmpd(
        bins,
        dir,
        &[(
            "iperf",
            format!("{{type: tcp, host: 127.0.0.1, port: {iperf_port}}}"),
        )],
    )?;
    let att = start_attach(bins, dir, &exp, &[])?;
    let local = att.local("iperf")?;
    let port: u16 = local
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("unexpected local address {local}"))?;
    Ok(Route {
        name: "jmp forward",
        port,
        _procs: vec![att.proc, exp.jmpd.proc],
    })
}

/// The same forward through the controller's relay (`jmp attach --via relay`).
fn jmp_relay(bins: &Bins, dir: &TempDir, iperf_port: u16) -> Result<Route> {
    let r = crate::via_relay::start(
        bins,
        dir,
        &[(
            "iperf",
            format!("{{type: tcp, host: 127.0.0.1, port: {iperf_port}}}"),
        )],
    )?;
    let local = r.attach.local("iperf")?;
    let port: u16 = local
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("unexpected local address {local}"))?;
    let mut procs = vec![r.attach.proc];
    procs.extend(r.procs);
    Ok(Route {
        name: "jmp forward via relay",
        port,
        _procs: procs,
    })
}

fn keygen(path: &std::path::Path) -> Result<()> {
    let st = command("ssh-keygen")
        .args(["-q", "-N", "", "-t", "ed25519", "-f"])
        .arg(path)
        .status()
        .context("ssh-keygen")?;
    if !st.success() {
        bail!("ssh-keygen failed");
    }
    Ok(())
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
            "Port {ssh_port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nPidFile {}\nUsePAM no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
            host_key.display(),
            auth.display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let mut d = Proc::start(
        "sshd",
        command(sshd).args(["-D", "-e", "-f"]).arg(&cfg),
        dir.path(),
        Options::LOG,
    )?;
    wait_listening(ssh_port, &mut d, Duration::from_secs(10))?;
    Ok(Sshd {
        proc: d,
        port: ssh_port,
        key: user_key,
        user,
    })
}

fn ssh(dir: &TempDir, iperf_port: u16) -> Result<Route> {
    let ssh = which("ssh").ok_or_else(|| anyhow!("ssh is missing"))?;
    let Sshd {
        proc: d,
        port: ssh_port,
        key: user_key,
        user,
    } = sshd(dir)?;
    let port = free_port()?;
    let mut c = Proc::start(
        "ssh -L",
        command(ssh)
            .arg("-N")
            .arg("-L")
            .arg(format!("127.0.0.1:{port}:127.0.0.1:{iperf_port}"))
            .args(["-p", &ssh_port.to_string(), "-i"])
            .arg(&user_key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("{user}@127.0.0.1")),
        dir.path(),
        Options::LOG,
    )?;
    wait_listening(port, &mut c, Duration::from_secs(15))?;
    Ok(Route {
        name: "ssh -L",
        port,
        _procs: vec![c, d],
    })
}

/// One iperf3 client run; Gbit/s received.
fn iperf(port: u16, seconds: u32) -> Result<f64> {
    let out = command("iperf3")
        .args(["-c", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", &seconds.to_string(), "-J"])
        .output()
        .context("run iperf3 -c")?;
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

/// Runs the TCP benchmark; returns (markdown, json).
pub fn run(bins: &Bins, rounds: usize, seconds: u32) -> Result<(String, serde_json::Value)> {
    which("iperf3").ok_or_else(|| anyhow!("SKIP: iperf3 is not installed"))?;
    let dir = TempDir::new("tcp");
    let dir_jmp = TempDir::new("tcp-jmp");
    let dir_ssh = TempDir::new("tcp-ssh");
    let dir_relay = TempDir::new("tcp-relay");
    let iperf_port = free_port()?;
    let mut server = Proc::start(
        "iperf3 -s",
        command("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &iperf_port.to_string()]),
        dir.path(),
        Options::LOG,
    )?;
    wait_listening(iperf_port, &mut server, Duration::from_secs(10))?;
    let mut skips = Vec::new();
    let mut routes = vec![Route {
        name: "plain loopback",
        port: iperf_port,
        _procs: vec![],
    }];
    match jmp(bins, &dir_jmp, iperf_port) {
        Ok(r) => routes.push(r),
        Err(e) => skips.push(format!("SKIP: jmp forward: {e:#}")),
    }
    match jmp_relay(bins, &dir_relay, iperf_port) {
        Ok(r) => routes.push(r),
        Err(e) => skips.push(format!("SKIP: jmp forward via relay: {e:#}")),
    }
    match ssh(&dir_ssh, iperf_port) {
        Ok(r) => routes.push(r),
        Err(e) => skips.push(format!("SKIP: ssh -L: {e:#}")),
    }
    for s in &skips {
        eprintln!("{s}");
    }
    let mut res: Vec<Vec<f64>> = routes.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (route, out) in routes.iter().zip(res.iter_mut()) {
            let mut g = iperf(route.port, seconds);
            if g.is_err() {
                // The server may still be finishing the previous test: one retry.
                std::thread::sleep(Duration::from_secs(1));
                g = iperf(route.port, seconds);
            }
            let g = g.unwrap_or_else(|e| {
                eprintln!("  round {}: {}: {e:#}", r + 1, route.name);
                f64::NAN
            });
            eprintln!(
                "  tcp round {}: {:<15} {:>6.2} Gbit/s",
                r + 1,
                route.name,
                g
            );
            out.push(g);
        }
    }
    let med: Vec<f64> = res.iter().map(|v| median(v)).collect();
    let find = |name: &str| {
        routes
            .iter()
            .position(|r| r.name == name)
            .map(|i| med[i])
            .unwrap_or(f64::NAN)
    };
    let ratio = find("jmp forward") / find("ssh -L");
    let t = Target::AtLeast(1.0);
    let relay_ratio = find("jmp forward via relay") / find("jmp forward");
    let t_relay = Target::AtLeast(0.7);
    let mut md = format!(
        "### TCP forward throughput (iperf3)\n\n`iperf3 -c 127.0.0.1 -p PORT -t {seconds} -J`, \
         one TCP stream, `end.sum_received.bits_per_second`. Medians over {rounds} interleaved \
         rounds.\n\n| path | Gbit/s | × loopback |\n|---|---:|---:|\n"
    );
    for (route, m) in routes.iter().zip(&med) {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            route.name,
            cell(*m, 2),
            cell(m / med[0], 3)
        ));
    }
    md.push_str(&format!(
        "\n- jmp forward / ssh -L = {} (target {}): **{}**\n",
        cell(ratio, 2),
        t.describe(),
        t.verdict(ratio)
    ));
    md.push_str(&format!(
        "- jmp forward via relay / jmp forward = {} (target {}): **{}**\n",
        cell(relay_ratio, 2),
        t_relay.describe(),
        t_relay.verdict(relay_ratio)
    ));
    for s in &skips {
        md.push_str(&format!("- {s}\n"));
    }
    let js = serde_json::json!({
        "seconds": seconds,
        "rounds": rounds,
        "paths": routes.iter().zip(&res).zip(&med).map(|((r, v), m)| serde_json::json!({
            "name": r.name,
            "gbit_s": json(*m),
            "rounds_gbit_s": v.iter().map(|x| json(*x)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "targets": [
            {"what": "jmp forward / ssh -L", "value": json(ratio), "target": t.describe(), "verdict": t.verdict(ratio)},
            {"what": "jmp forward via relay / jmp forward", "value": json(relay_ratio), "target": t_relay.describe(), "verdict": t_relay.verdict(relay_ratio)},
        ],
        "skips": skips,
    });
    drop(routes);
    drop(server);
    Ok((md, js))
}
