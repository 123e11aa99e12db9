//! What an exporter config says about a network device.

use jmp_protocol::kinds::net::Subnet;
use serde::Deserialize;
use std::sync::Arc;

/// Tunnel addresses when the config names none: the exporter's end is the first address, the
/// clients get the next ones. Inside the shared address space of RFC 6598, which lab networks
/// rarely use; configurable with `tunnel:` where it clashes.
pub const DEFAULT_TUNNEL: &str = "100.64.100.0/24";
/// Leaves room in a 1500-byte path for QUIC's headers (a datagram carries about 1414 bytes
/// after MTU discovery), so ordinary packets always travel as one datagram.
pub const DEFAULT_MTU: u16 = 1400;

/// `type: network`: the board's lab network, reached on the lab host through `via`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// The only destinations the tunnel reaches (IPv4).
    pub subnets: Vec<String>,
    /// The lab host's interface towards the subnets: packets leave through it with the lab
    /// host's address (source NAT), and its replies come back through it.
    pub via: String,
    /// The tunnel's own addresses.
    #[serde(default)]
    pub tunnel: Option<String>,
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Addresses of the lab host itself that lease holders may reach (through the tunnel and
    /// SOCKS), each inside the subnets. By default none: the lab host's own addresses are
    /// unreachable, whatever subnet they sit in.
    #[serde(default, rename = "hostAccess")]
    pub host_access: Vec<String>,
}

/// A spec's values, checked.
#[derive(Debug, Clone)]
pub struct NetPlan {
    pub subnets: Vec<Subnet>,
    pub via: String,
    pub tunnel: Subnet,
    pub mtu: u16,
    pub host_access: Vec<std::net::Ipv4Addr>,
}

impl NetSpec {
    pub fn plan(&self) -> Result<NetPlan, String> {
        if self.subnets.is_empty() {
            return Err(
                "subnets is empty: name the board's networks, e.g. [192.168.10.0/24]".into(),
            );
        }
        let mut subnets: Vec<Subnet> = Vec::new();
        for s in &self.subnets {
            let n: Subnet = s.parse().map_err(|e| format!("subnets: {e}"))?;
            if n.prefix() == 0 {
                return Err(format!(
                    "subnets: {n} is everything; the tunnel reaches named networks only"
                ));
            }
            if let Some(o) = subnets.iter().find(|o| o.overlaps(&n)) {
                return Err(format!("subnets: {n} overlaps {o}"));
            }
            subnets.push(n);
        }
        let tunnel: Subnet = self
            .tunnel
            .as_deref()
            .unwrap_or(DEFAULT_TUNNEL)
            .parse()
            .map_err(|e| format!("tunnel: {e}"))?;
        if tunnel.prefix() > 30 {
            return Err(format!(
                "tunnel: {tunnel} is too small (at least a /30: the exporter's end and one client)"
            ));
        }
        if let Some(o) = subnets.iter().find(|o| o.overlaps(&tunnel)) {
            return Err(format!("tunnel: {tunnel} overlaps the exported subnet {o}"));
        }
        let mtu = self.mtu.unwrap_or(DEFAULT_MTU);
        if !(576..=9000).contains(&mtu) {
            return Err(format!("mtu: {mtu} is outside 576-9000"));
        }
        super::sys::check_ifname(&self.via).map_err(|e| format!("via: {e}"))?;
        let mut host_access = Vec::new();
        for a in &self.host_access {
            let ip: std::net::Ipv4Addr = a.trim().parse().map_err(|_| {
                format!("hostAccess: {a:?} is not an IPv4 address like 192.168.10.1")
            })?;
            if !subnets.iter().any(|s| s.contains(ip)) {
                return Err(format!(
                    "hostAccess: {ip} is outside the subnets (only addresses inside them are reached)"
                ));
            }
            host_access.push(ip);
        }
        Ok(NetPlan {
            subnets,
            via: self.via.clone(),
            tunnel,
            mtu,
            host_access,
        })
    }

    /// Static checks, and that `via` exists on this machine (a typo there would otherwise
    /// show only as a board that cannot be reached).
    pub fn validate(&self) -> Result<(), String> {
        let plan = self.plan()?;
        if !super::sys::interface_exists(&plan.via) {
            return Err(format!(
                "via: there is no network interface {:?} on this machine",
                plan.via
            ));
        }
        Ok(())
    }

    pub fn start(&self, name: &str, exporter: &str) -> Arc<dyn crate::Driver> {
        Arc::new(super::NetDriver::start(name, exporter, self.plan()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(subnets: &[&str], tunnel: Option<&str>, via: Option<&str>) -> NetSpec {
        NetSpec {
            subnets: subnets.iter().map(|s| s.to_string()).collect(),
            via: via.unwrap_or("lo").to_string(),
            tunnel: tunnel.map(str::to_string),
            mtu: None,
            host_access: Vec::new(),
        }
    }

    #[test]
    fn bad_tables_are_refused_naming_what() {
        let e = spec(&["192.168.10.0/24", "192.168.0.0/16"], None, None)
            .validate()
            .expect_err("overlap");
        assert!(e.contains("192.168.0.0/16 overlaps 192.168.10.0/24"), "{e}");
        let e = spec(&["0.0.0.0/0"], None, None)
            .validate()
            .expect_err("all");
        assert!(e.contains("everything"), "{e}");
        let e = spec(&["192.168.10.0/24"], Some("192.168.10.0/28"), None)
            .validate()
            .expect_err("tunnel overlap");
        assert!(e.contains("tunnel"), "{e}");
        let e = spec(&["192.168.10.0/24"], None, Some("nosuchif0"))
            .validate()
            .expect_err("via");
        assert!(e.contains("\"nosuchif0\""), "{e}");
        let e = spec(&["192.168.10.0/24"], None, Some("a/b"))
            .validate()
            .expect_err("via name");
        assert!(e.contains("via"), "{e}");
        let e = NetSpec {
            host_access: vec!["192.168.11.1".into()],
            ..spec(&["192.168.10.0/24"], None, None)
        }
        .validate()
        .expect_err("host access outside");
        assert!(e.contains("hostAccess: 192.168.11.1 is outside"), "{e}");
        let e = NetSpec {
            host_access: vec!["me".into()],
            ..spec(&["192.168.10.0/24"], None, None)
        }
        .validate()
        .expect_err("host access name");
        assert!(e.contains("\"me\""), "{e}");
        spec(&["192.168.10.0/24"], None, None)
            .validate()
            .expect("a good table");
    }
}
