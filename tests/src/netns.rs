//! Network namespaces for end-to-end tests and benchmarks: a lab topology built from scratch
//! and always removed.
//!
//! ```text
//!  client ns            lab ns (the lab host)              board ns
//!  c0 10.200.0.2 ── veth ── l0 10.200.0.1
//!                           l1 192.168.10.1 ── veth ── b0 192.168.10.2, 192.168.20.2
//! ```
//!
//! The lab host routes 192.168.20.0/24 (the board's second address) but a test exports only
//! 192.168.10.0/24, so 192.168.20.2 is a real address outside the exported subnets. Nothing is
//! added to the root namespace: every address, route, link and nftables rule lives in these
//! namespaces, and deleting them (on drop, even when a test panics) removes all of it. Files a
//! namespace sees in place of /etc files (`/etc/netns/NS/hosts`) go with it.

use crate::command;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const CLIENT_ADDR: &str = "10.200.0.2";
pub const LAB_ADDR: &str = "10.200.0.1";
pub const LAB_LAN_ADDR: &str = "192.168.10.1";
pub const BOARD_ADDR: &str = "192.168.10.2";
pub const BOARD_SUBNET: &str = "192.168.10.0/24";
/// The board's address outside the exported subnet (the lab host routes it).
pub const BOARD_OTHER_ADDR: &str = "192.168.20.2";
/// The lab host's interface towards the board (`via:`).
pub const LAB_LAN_IF: &str = "l1";
/// The interfaces of the "internet" veth, client side and lab side.
pub const CLIENT_IF: &str = "c0";
pub const LAB_IF: &str = "l0";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = command("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process may build namespaces (root with CAP_NET_ADMIN, `ip` present).
pub fn available() -> Result<(), String> {
    crate::skips::root().map_err(|_| "network namespaces need root".to_string())?;
    crate::skips::tool("ip")?;
    Ok(())
}

/// The three namespaces and their veths.
pub struct Topology {
    pub client: String,
    pub lab: String,
    pub board: String,
    etc: Vec<PathBuf>,
    deleted: bool,
}

impl Topology {
    pub fn new() -> Topology {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("jmpt{}-{n}", std::process::id());
        let t = Topology {
            client: format!("{base}-c"),
            lab: format!("{base}-l"),
            board: format!("{base}-b"),
            etc: Vec::new(),
            deleted: false,
        };
        for ns in [&t.client, &t.lab, &t.board] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link", "add", CLIENT_IF, "netns", &t.client, "type", "veth", "peer", "name", LAB_IF,
            "netns", &t.lab,
        ]);
        ip(&[
            "link", "add", LAB_LAN_IF, "netns", &t.lab, "type", "veth", "peer", "name", "b0",
            "netns", &t.board,
        ]);
        let addr = |ns: &str, a: &str, dev: &str| {
            ip(&["-n", ns, "addr", "add", a, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        };
        addr(&t.client, &format!("{CLIENT_ADDR}/24"), CLIENT_IF);
        addr(&t.lab, &format!("{LAB_ADDR}/24"), LAB_IF);
        addr(&t.lab, &format!("{LAB_LAN_ADDR}/24"), LAB_LAN_IF);
        addr(&t.board, &format!("{BOARD_ADDR}/24"), "b0");
        addr(&t.board, &format!("{BOARD_OTHER_ADDR}/24"), "b0");
        ip(&[
            "-n",
            &t.lab,
            "route",
            "add",
            "192.168.20.0/24",
            "via",
            BOARD_ADDR,
        ]);
        t
    }

    /// `ip netns exec NS PROG`: PROG runs inside the namespace, with its own PID (ip execs it).
    pub fn cmd(&self, ns: &str, prog: &str) -> Command {
        let mut c = command("ip");
        c.args(["netns", "exec", ns, prog]);
        c
    }

    /// Runs `args` in `ns` to completion; its stdout, panicking with stderr on failure.
    pub fn sh(&self, ns: &str, args: &[&str]) -> String {
        let out = self
            .cmd(ns, args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {ns}: {e}"));
        assert!(
            out.status.success(),
            "{args:?} in {ns}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Makes `ip netns exec NS` see `content` as /etc/hosts (iproute2 bind-mounts
    /// /etc/netns/NS/hosts over it).
    pub fn hosts(&mut self, ns: &str, content: &str) {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("mkdir /etc/netns/NS");
        std::fs::write(dir.join("hosts"), content).expect("write hosts");
        self.etc.push(dir);
    }

    /// What of jmp's is left in `ns`: interfaces named jmp*, routes through them, nftables
    /// tables named jmp*. Empty once jmp and jmpd have stopped.
    pub fn leftovers(&self, ns: &str) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.sh(ns, &["ip", "-o", "link"]).lines() {
            if let Some(name) = l.split(':').nth(1).map(str::trim) {
                if name.starts_with("jmp") {
                    out.push(format!("interface {name}"));
                }
            }
        }
        for r in self.sh(ns, &["ip", "-4", "route"]).lines() {
            if r.contains(" dev jmp") {
                out.push(format!("route {r}"));
            }
        }
        for t in self.sh(ns, &["nft", "list", "tables"]).lines() {
            if t.split_whitespace()
                .last()
                .is_some_and(|n| n.starts_with("jmp"))
            {
                out.push(t.to_string());
            }
        }
        out
    }

    /// Deletes the namespaces and checks that none is left.
    pub fn remove(mut self) {
        let names = self.delete();
        let list = String::from_utf8_lossy(
            &command("ip")
                .args(["netns", "list"])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default(),
        )
        .into_owned();
        for n in names {
            assert!(
                !list.split_whitespace().any(|w| w == n),
                "namespace {n} is still there"
            );
        }
    }

    fn delete(&mut self) -> Vec<String> {
        let names = vec![self.client.clone(), self.lab.clone(), self.board.clone()];
        if std::mem::replace(&mut self.deleted, true) {
            return names;
        }
        for n in &names {
            let _ = command("ip").args(["netns", "del", n]).status();
        }
        for d in self.etc.drain(..) {
            let _ = std::fs::remove_dir_all(d);
        }
        names
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.delete();
    }
}
