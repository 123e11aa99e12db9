//! The exporter's nftables table: source NAT for the tunnel's addresses leaving through `via`
//! (so the board needs no route back to the tunnel), in a table of jmp's own that is created at
//! start and deleted at stop. Rules that are not jmp's are never touched.
//!
//! Forwarding must be on for the TUN (in) and for `via` (the replies come in there). The TUN's
//! flag goes away with the TUN. If `via` had forwarding off, it is switched on, and the table
//! gets a rule dropping everything forwarded from `via` except to the tunnel, so the host
//! forwards nothing it did not forward before; the table's comment records the old value, so
//! that a table left by a killed jmpd is undone (the flag restored) at the next start.

use super::sys;
use jmp_protocol::kinds::net::Subnet;
use tracing::{info, warn};

/// The installed table; dropping it deletes the table and restores `via`'s forwarding flag.
#[derive(Debug)]
pub(crate) struct NatTable {
    table: String,
    /// `via`, if its forwarding flag was 0 before us.
    restore_via: Option<String>,
}

fn forwarding(dev: &str) -> String {
    format!("net/ipv4/conf/{dev}/forwarding")
}

/// Undoes a table of this name left by an earlier run, if there is one.
fn remove_stale(table: &str) {
    let Ok(text) = sys::run("nft", &["list", "table", "inet", table], None) else {
        return;
    };
    // The comment is `jmp: ... restore-forwarding=IF` when we had switched IF's flag on.
    if let Some(dev) = text
        .split("restore-forwarding=")
        .nth(1)
        .and_then(|r| r.split(['"', ' ']).next())
    {
        if sys::check_ifname(dev).is_ok() {
            let _ = sys::set_sysctl(&forwarding(dev), "0");
        }
    }
    match sys::run("nft", &["delete", "table", "inet", table], None) {
        Ok(_) => info!("removed the nftables table inet {table} left behind by an earlier run"),
        Err(e) => warn!("cannot remove the stale nftables table inet {table}: {e}"),
    }
}

impl NatTable {
    pub fn install(
        table: &str,
        tun: &str,
        tunnel: &Subnet,
        via: &str,
        host_access: &[std::net::Ipv4Addr],
    ) -> Result<Self, String> {
        sys::check_ifname(table)?;
        if !sys::interface_exists(via) {
            return Err(format!("via: there is no network interface {via:?}"));
        }
        if let Err(e) = sys::run("nft", &["--version"], None) {
            return Err(format!(
                "the nft command (Debian package nftables) is needed for source NAT: {e}"
            ));
        }
        remove_stale(table);
        sys::set_sysctl(&forwarding(tun), "1")?;
        let restore_via = match sys::get_sysctl(&forwarding(via)).as_deref() {
            Some("0") => Some(via.to_string()),
            _ => None,
        };
        let comment = match &restore_via {
            Some(v) => format!("jmp: network device on {tun}; restore-forwarding={v}"),
            None => format!("jmp: network device on {tun}"),
        };
        let guard = match &restore_via {
            Some(_) => format!("\t\tiifname \"{via}\" oifname != \"{tun}\" drop\n"),
            None => String::new(),
        };
        // Whatever the tunnel brings for this host itself (any address of any interface, its
        // broadcast addresses, the tunnel's own end) is dropped before any socket sees it: no
        // answer, not even a reset, unless `hostAccess` names the address. The kernel decides
        // what is local, so addresses that come and go are covered as they change.
        let allowed = if host_access.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = host_access.iter().map(|a| a.to_string()).collect();
            format!(
                "\t\tiifname \"{tun}\" ip daddr {{ {} }} accept\n",
                list.join(", ")
            )
        };
        let script = format!(
            "table inet {table} {{\n\tcomment \"{comment}\"\n\
             \tchain input {{\n\t\ttype filter hook input priority filter - 1; policy accept;\n\
             {allowed}\t\tiifname \"{tun}\" counter drop\n\t}}\n\
             \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {tunnel} oifname \"{via}\" masquerade\n\t}}\n\
             \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n{guard}\t}}\n}}\n"
        );
        // The table exists before the flag flips, so there is no moment where `via` forwards
        // more than it used to.
        sys::run("nft", &["-f", "-"], Some(&script)).map_err(|e| e.to_string())?;
        let t = NatTable {
            table: table.to_string(),
            restore_via,
        };
        if let Some(v) = &t.restore_via {
            sys::set_sysctl(&forwarding(v), "1")?;
            info!("switched on IPv4 forwarding on {v} (only into {tun}; restored at stop)");
        }
        Ok(t)
    }
}

impl Drop for NatTable {
    fn drop(&mut self) {
        if let Some(v) = &self.restore_via {
            if let Err(e) = sys::set_sysctl(&forwarding(v), "0") {
                warn!("cannot restore forwarding on {v}: {e}");
            }
        }
        if let Err(e) = sys::run("nft", &["delete", "table", "inet", &self.table], None) {
            warn!("cannot delete the nftables table inet {}: {e}", self.table);
        }
    }
}
