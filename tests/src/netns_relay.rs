//! A three-namespace topology for the relay's tests: a client, the relay (the controller's
//! host, routing between the two others) and an exporter whose namespace drops every inbound
//! connection (nftables: only flows it started itself get answers), as a home router or a
//! corporate NAT would.
//!
//! ```text
//!  client ns  10.231.1.2 ── veth ── 10.231.1.1  relay ns  10.231.2.1 ── veth ── 10.231.2.2  exporter ns
//!                                   (forwards; the controller)                 (ct state new → drop)
//! ```
//!
//! Everything lives in namespaces this helper creates; the root namespace gets no address and
//! no route. Dropping the topology deletes the namespaces (and with them the veths and the
//! nftables table), also when a test fails; processes started in them must be stopped first
//! (the tests' `Proc` guards, by PID).

use crate::command;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const CLIENT_IP: &str = "10.231.1.2";
/// The relay's (and controller's) address on the client side; the exporter reaches it too,
/// through the relay namespace's routing.
pub const RELAY_IP: &str = "10.231.1.1";
pub const RELAY_EXPORTER_SIDE_IP: &str = "10.231.2.1";
pub const EXPORTER_IP: &str = "10.231.2.2";

pub struct RelayNet {
    pub client: String,
    pub relay: String,
    pub exporter: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = command("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl RelayNet {
    /// Builds the topology; `Err` says why it cannot be built here (then the test fails, naming it).
    pub fn new() -> Result<RelayNet, String> {
        for tool in ["ip", "nft"] {
            crate::skips::tool(tool)?;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("jr{}x{n}", std::process::id() % 100_000);
        let net = RelayNet {
            client: format!("{tag}c"),
            relay: format!("{tag}r"),
            exporter: format!("{tag}e"),
        };
        // From here on Drop cleans up whatever was made.
        net.build(&tag)?;
        Ok(net)
    }

    fn build(&self, tag: &str) -> Result<(), String> {
        for ns in [&self.client, &self.relay, &self.exporter] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (c0, c1) = (format!("{tag}a0"), format!("{tag}a1"));
        let (e0, e1) = (format!("{tag}b0"), format!("{tag}b1"));
        ip(&[
            "-n",
            &self.client,
            "link",
            "add",
            &c0,
            "type",
            "veth",
            "peer",
            "name",
            &c1,
            "netns",
            &self.relay,
        ])?;
        ip(&[
            "-n",
            &self.exporter,
            "link",
            "add",
            &e0,
            "type",
            "veth",
            "peer",
            "name",
            &e1,
            "netns",
            &self.relay,
        ])?;
        for (ns, dev, addr) in [
            (&self.client, &c0, format!("{CLIENT_IP}/24")),
            (&self.relay, &c1, format!("{RELAY_IP}/24")),
            (&self.relay, &e1, format!("{RELAY_EXPORTER_SIDE_IP}/24")),
            (&self.exporter, &e0, format!("{EXPORTER_IP}/24")),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            &self.client,
            "route",
            "add",
            "default",
            "via",
            RELAY_IP,
        ])?;
        ip(&[
            "-n",
            &self.exporter,
            "route",
            "add",
            "default",
            "via",
            RELAY_EXPORTER_SIDE_IP,
        ])?;
        // The relay namespace routes between the two: without the firewall, the client could
        // reach the exporter directly. It is the exporter's own firewall that stops that.
        let out = self
            .cmd(
                &self.relay,
                "sysctl",
                &["-q", "-w", "net.ipv4.ip_forward=1"],
            )
            .output()
            .map_err(|e| format!("sysctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "sysctl ip_forward in {}: {}",
                self.relay,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let rules = "table inet jmp_relay_test {\n\
             chain input {\n\
               type filter hook input priority 0; policy accept;\n\
               ct state established,related accept\n\
               iif lo accept\n\
               ct state new counter drop comment \"inbound\"\n\
             }\n\
           }\n";
        let mut nft = self.cmd(&self.exporter, "nft", &["-f", "-"]);
        nft.stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = nft.spawn().map_err(|e| format!("nft: {e}"))?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().ok_or("nft: no stdin")?;
            stdin
                .write_all(rules.as_bytes())
                .map_err(|e| format!("nft: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nft in {}: {}",
                self.exporter,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// `program args` inside namespace `ns`.
    pub fn cmd(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut c = command("ip");
        c.args(["netns", "exec", ns, program]).args(args);
        c
    }

    /// `cmd` (program, arguments, environment, directory) inside namespace `ns`.
    pub fn wrap(&self, ns: &str, cmd: Command) -> Command {
        crate::in_netns(ns, cmd)
    }

    /// Packets the exporter's firewall dropped (new inbound connections).
    pub fn dropped(&self) -> u64 {
        let out = self
            .cmd(
                &self.exporter,
                "nft",
                &["list", "table", "inet", "jmp_relay_test"],
            )
            .output()
            .expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.contains("inbound"))
            .and_then(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.iter()
                    .position(|x| *x == "packets")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or_else(|| panic!("no drop counter in: {text}"))
    }

    /// Runs `f` on a thread that has entered namespace `ns` (sockets it opens live there).
    pub fn enter<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let f_ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(f_ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .expect("thread in the namespace panicked")
    }
}

impl Drop for RelayNet {
    fn drop(&mut self) {
        for ns in [&self.client, &self.relay, &self.exporter] {
            let _ = command("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// `GET path` over plain HTTP/1.0 to `addr` from the calling thread's namespace; the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out)
}

/// The value of the first sample of `metric` (name with its labels, as printed) in a
/// Prometheus text exposition.
pub fn sample(text: &str, metric: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == metric).then(|| v.parse().ok()).flatten()
    })
}
