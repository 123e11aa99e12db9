//! The machine's network configuration as the tunnel reads and changes it: interfaces, routes
//! and per-interface sysctls, through `ip` (iproute2) and `/proc/sys`. Every change names an
//! interface jmp created; the only exception, the `via` interface's forwarding flag, is
//! restored by [`super::nat`].

use jmp_protocol::kinds::net::Subnet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

/// A command that failed, with what it said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command}: {message}")]
pub struct CmdError {
    pub command: String,
    pub message: String,
}

/// Runs `prog args...`; its stdout, or an error with its stderr.
pub(crate) fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CmdError> {
    use std::io::Write;
    let command = format!("{prog} {}", args.join(" "));
    let err = |message: String| CmdError {
        command: command.clone(),
        message,
    };
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().map_err(|e| err(format!("cannot run it: {e}")))?;
    if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
        si.write_all(text.as_bytes())
            .map_err(|e| err(format!("cannot write its input: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(format!("cannot wait for it: {e}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(err(if msg.is_empty() {
            format!("exited with {}", out.status)
        } else {
            msg
        }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn ip(args: &[&str]) -> Result<String, CmdError> {
    run("ip", args, None)
}

/// An interface name Linux would accept and that no tool reads as something else.
pub(crate) fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > super::ifname::IFNAME_MAX
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        || name.starts_with(['-', '.'])
    {
        return Err(format!(
            "{:?} is not an interface name (1-15 letters, digits, '.', '_' or '-')",
            jmp_protocol::name::escape(name)
        ));
    }
    Ok(())
}

fn sys_class(name: &str) -> PathBuf {
    PathBuf::from("/sys/class/net").join(name)
}

/// Asked of the kernel in the caller's network namespace (sysfs shows the namespace it was
/// mounted in, which a thread that entered another one does not see).
pub(crate) fn interface_exists(name: &str) -> bool {
    check_ifname(name).is_ok() && nix::net::if_::if_nametoindex(name).is_ok()
}

/// What is in the way of creating a TUN called `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existing {
    None,
    /// A TUN nobody holds that stays (IFF_PERSIST): a leftover.
    PersistentTun,
    /// A TUN some process holds open.
    HeldTun,
    /// Some other kind of interface.
    Other,
}

pub(crate) fn existing(name: &str) -> Existing {
    let dir = sys_class(name);
    if !dir.exists() {
        return Existing::None;
    }
    // Only TUN/TAP devices have `tun_flags`; IFF_PERSIST is 0x800.
    match std::fs::read_to_string(dir.join("tun_flags")) {
        Ok(s) => {
            let flags = u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap_or(0);
            if flags & 0x800 != 0 {
                Existing::PersistentTun
            } else {
                Existing::HeldTun
            }
        }
        Err(_) => Existing::Other,
    }
}

/// Writes a per-interface sysctl (`net/ipv4/conf/IF/forwarding`); returns the old value.
pub(crate) fn set_sysctl(path: &str, value: &str) -> Result<String, String> {
    let p = PathBuf::from("/proc/sys").join(path);
    let old = std::fs::read_to_string(&p)
        .map_err(|e| format!("cannot read {}: {e}", p.display()))?
        .trim()
        .to_string();
    if old != value {
        std::fs::write(&p, value).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(old)
}

pub(crate) fn get_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(PathBuf::from("/proc/sys").join(path))
        .ok()
        .map(|s| s.trim().to_string())
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// `0.0.0.0/0` for a default route.
    pub dst: Subnet,
    pub dev: String,
    pub gateway: Option<Ipv4Addr>,
    /// As `ip route` prints it, for messages.
    pub text: String,
}

/// The main table's IPv4 routes, default routes included.
pub(crate) fn routes() -> Result<Vec<Route>, CmdError> {
    let out = ip(&["-j", "-4", "route", "show", "table", "main"])?;
    parse_routes(&out).map_err(|message| CmdError {
        command: "ip -j -4 route show table main".into(),
        message,
    })
}

fn parse_routes(json: &str) -> Result<Vec<Route>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("unreadable output: {e}"))?;
    let mut routes = Vec::new();
    for r in v.as_array().into_iter().flatten() {
        let Some(dst) = r["dst"].as_str() else {
            continue;
        };
        let subnet = if dst == "default" {
            Subnet::new(Ipv4Addr::UNSPECIFIED, 0).expect("0.0.0.0/0")
        } else {
            match dst.parse::<Subnet>() {
                Ok(s) => s,
                Err(_) => continue,
            }
        };
        let dev = r["dev"].as_str().unwrap_or("").to_string();
        let gateway = r["gateway"].as_str().and_then(|g| g.parse().ok());
        let mut text = dst.to_string();
        if let Some(g) = r["gateway"].as_str() {
            text.push_str(&format!(" via {g}"));
        }
        if !dev.is_empty() {
            text.push_str(&format!(" dev {dev}"));
        }
        routes.push(Route {
            dst: subnet,
            dev,
            gateway,
            text,
        });
    }
    Ok(routes)
}

/// Every IPv4 address of this machine's interfaces (in this network namespace), with its
/// interface.
pub(crate) fn addresses() -> Result<Vec<(String, Ipv4Addr)>, CmdError> {
    let out = ip(&["-j", "-4", "addr", "show"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| CmdError {
        command: "ip -j -4 addr show".into(),
        message: format!("unreadable output: {e}"),
    })?;
    let mut addrs = Vec::new();
    for l in v.as_array().into_iter().flatten() {
        let dev = l["ifname"].as_str().unwrap_or("").to_string();
        for a in l["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                addrs.push((dev.clone(), ip));
            }
        }
    }
    Ok(addrs)
}

pub(crate) fn add_route(subnet: &Subnet, dev: &str, src: Ipv4Addr) -> Result<(), CmdError> {
    ip(&[
        "-4",
        "route",
        "replace",
        &subnet.to_string(),
        "dev",
        dev,
        "src",
        &src.to_string(),
    ])
    .map(|_| ())
}

pub(crate) fn set_address(dev: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), CmdError> {
    ip(&["-4", "addr", "flush", "dev", dev])?;
    ip(&["-4", "addr", "add", &format!("{addr}/{prefix}"), "dev", dev]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_and_loopback_exists() {
        assert!(check_ifname("eth1").is_ok());
        for bad in ["", "a/b", "sixteen-chars-xx", "-x", "a b", "."] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
        assert!(interface_exists("lo"));
        assert!(!interface_exists("nosuchif0"));
        assert_eq!(existing("lo"), Existing::Other);
        assert_eq!(existing("nosuchif0"), Existing::None);
    }

    #[test]
    fn routes_parse_with_default_and_gateways() {
        let json = r#"[{"dst":"default","gateway":"10.0.2.2","dev":"eth0","flags":[]},
            {"dst":"10.0.2.0/24","dev":"eth0","prefsrc":"10.0.2.15","flags":[]},
            {"dst":"192.168.9.7","dev":"eth1","flags":[]},
            {"dst":"nonsense","dev":"eth1","flags":[]}]"#;
        let r = parse_routes(json).expect("routes");
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].dst.prefix(), 0);
        assert_eq!(r[0].gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(r[0].text, "default via 10.0.2.2 dev eth0");
        assert_eq!(r[1].gateway, None);
        assert_eq!(r[2].dst.to_string(), "192.168.9.7/32");
    }
}
