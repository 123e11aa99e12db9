//! What the client accepts from an exporter about its routing. The exporter is not trusted
//! with this machine's network: the subnets it announces become routes and the address it
//! assigns becomes a local address, so a hostile one could take the default route (as
//! `0.0.0.0/1` + `128.0.0.0/1` do together), hide part of the LAN, or claim the gateway's
//! address. Everything here is checked before anything is installed; a violation refuses the
//! network device, naming what was wrong, and the rest of the attachment goes on.

use super::sys::Route;
use jmp_protocol::kinds::net::{Assigned, Subnet};
use std::net::Ipv4Addr;

/// No announced subnet may be wider than this (a /8) unless `--allow-route` covers it.
pub const MIN_PREFIX: u8 = 8;

/// All announced subnets together may hold at most this many addresses (one /8) unless
/// `--allow-route` covers them: many narrow pieces can cover as much as one wide one.
pub const MAX_ADDRESSES: u64 = 1 << 24;

/// Where the client accepts its tunnel address unless `--tunnel-range` names another range:
/// the shared address space of RFC 6598, which holds the exporter's default tunnel range
/// (`100.64.100.0/24`).
pub const DEFAULT_TUNNEL_RANGE: &str = "100.64.0.0/10";

/// The client's rules for what an exporter may install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingPolicy {
    /// Announced subnets inside one of these may be wider than [`MIN_PREFIX`] and do not
    /// count against [`MAX_ADDRESSES`] (`--allow-route`).
    pub allow: Vec<Subnet>,
    /// The assigned address and the exporter's end must lie here (`--tunnel-range`).
    pub tunnel_range: Subnet,
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        RoutingPolicy {
            allow: Vec::new(),
            tunnel_range: DEFAULT_TUNNEL_RANGE.parse().expect("the default tunnel range"),
        }
    }
}

impl RoutingPolicy {
    /// From the options' text: `--allow-route CIDR` (repeated) and `--tunnel-range CIDR`.
    pub fn parse(allow: &[String], tunnel_range: Option<&str>) -> Result<Self, String> {
        let mut p = RoutingPolicy::default();
        for a in allow {
            let s: Subnet = a.parse().map_err(|e| format!("--allow-route: {e}"))?;
            if s.prefix() == 0 {
                return Err(format!(
                    "--allow-route {s}: that is the default route; an exporter never gets it"
                ));
            }
            p.allow.push(s);
        }
        if let Some(t) = tunnel_range {
            let s: Subnet = t.parse().map_err(|e| format!("--tunnel-range: {e}"))?;
            if s.prefix() < MIN_PREFIX {
                return Err(format!(
                    "--tunnel-range {s}: wider than a /{MIN_PREFIX}; name the exporter's tunnel range"
                ));
            }
            p.tunnel_range = s;
        }
        Ok(p)
    }

    fn allowed(&self, s: &Subnet) -> bool {
        self.allow
            .iter()
            .any(|a| a.prefix() <= s.prefix() && a.contains(s.addr()))
    }
}

fn size(s: &Subnet) -> u64 {
    1u64 << (32 - u32::from(s.prefix()))
}

/// The announced `subnets` may become routes on this machine: none is the default route or
/// wider than the policy allows, together they are not too wide, and none overlaps a route
/// the machine has (other than on `own`, the tunnel's interface) or holds a gateway.
pub fn check_subnets(
    subnets: &[Subnet],
    policy: &RoutingPolicy,
    routes: &[Route],
    own: &str,
) -> Result<(), String> {
    let mut total = 0u64;
    for s in subnets {
        if s.prefix() == 0 {
            return Err(format!(
                "the exporter announced {s}, the default route; refusing its routes"
            ));
        }
        if !policy.allowed(s) {
            if s.prefix() < MIN_PREFIX {
                return Err(format!(
                    "the exporter announced {s}, wider than a /{MIN_PREFIX}; refusing its routes (--allow-route {s} to accept it)"
                ));
            }
            total += size(s);
        }
    }
    if total > MAX_ADDRESSES {
        return Err(format!(
            "the exporter announced {total} addresses in all ({}), more than a /{MIN_PREFIX}; refusing its routes (--allow-route CIDR to accept them)",
            list(subnets)
        ));
    }
    let theirs = || routes.iter().filter(|r| r.dev != own);
    for s in subnets {
        // A gateway inside the tunnel would send the machine's own traffic to the exporter.
        for r in theirs() {
            if let Some(g) = r.gateway.filter(|g| s.contains(*g)) {
                return Err(format!(
                    "the exported subnet {s} holds {g}, the gateway of this machine's route {}; not adding a route for it (use --socks to reach the board without routes)",
                    r.text
                ));
            }
        }
        // Every subnet lies inside a default route: that one is meant to lose to the
        // tunnel's more specific routes (its gateway is checked above).
        if let Some(r) = theirs().find(|r| r.dst.prefix() > 0 && r.dst.overlaps(s)) {
            return Err(format!(
                "the exported subnet {s} overlaps this machine's route {}; not adding a route for it (use --socks to reach the board without routes)",
                r.text
            ));
        }
    }
    Ok(())
}

/// The address the exporter assigned may become this machine's tunnel address: inside the
/// tunnel range with the exporter's end, an ordinary unicast address, not one of this
/// machine's addresses (`addrs`, those on `own` aside: they are the tunnel's from before a
/// reconnect), not inside a route of the machine or an exported subnet.
pub fn check_assigned(
    a: &Assigned,
    policy: &RoutingPolicy,
    subnets: &[Subnet],
    routes: &[Route],
    addrs: &[(String, Ipv4Addr)],
    own: &str,
) -> Result<(), String> {
    let range = &policy.tunnel_range;
    let c = a.client;
    for (what, ip) in [("address", c), ("end of the tunnel", a.gateway)] {
        if !range.contains(ip) {
            return Err(format!(
                "the exporter's {what} {ip} is outside the tunnel range {range} (--tunnel-range CIDR to accept the exporter's tunnel range)"
            ));
        }
    }
    if c == a.gateway {
        return Err(format!(
            "the exporter assigned {c}, its own end of the tunnel"
        ));
    }
    if c.is_unspecified()
        || c.is_loopback()
        || c.is_multicast()
        || c.is_broadcast()
        || c.is_link_local()
        || c == range.addr()
        || Some(c) == range.nth((size(range) - 1) as u32)
    {
        return Err(format!(
            "the exporter assigned {c}, which is not a host address"
        ));
    }
    if let Some((dev, _)) = addrs.iter().find(|(dev, ip)| *ip == c && dev != own) {
        return Err(format!(
            "the exporter assigned {c}, which is this machine's address (on {dev})"
        ));
    }
    for r in routes.iter().filter(|r| r.dev != own) {
        if r.gateway == Some(c) {
            return Err(format!(
                "the exporter assigned {c}, the gateway of this machine's route {}",
                r.text
            ));
        }
        if r.dst.prefix() > 0 && r.dst.contains(c) {
            return Err(format!(
                "the exporter assigned {c}, inside this machine's route {}",
                r.text
            ));
        }
    }
    if let Some(s) = subnets.iter().find(|s| s.contains(c)) {
        return Err(format!(
            "the exporter assigned {c}, inside the exported subnet {s}"
        ));
    }
    Ok(())
}

fn list(subnets: &[Subnet]) -> String {
    subnets
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Subnet {
        s.parse().expect("subnet")
    }

    fn route(dst: &str, gw: Option<&str>, dev: &str) -> Route {
        Route {
            dst: if dst == "default" { n("0.0.0.0/0") } else { n(dst) },
            dev: dev.into(),
            gateway: gw.map(|g| g.parse().expect("gateway")),
            text: format!("{dst} dev {dev}"),
        }
    }

    /// A laptop on a home LAN with a VPN route and an old tunnel of ours.
    fn machine() -> Vec<Route> {
        vec![
            route("default", Some("192.168.1.1"), "wlan0"),
            route("192.168.1.0/24", None, "wlan0"),
            route("10.20.0.0/16", Some("192.168.1.254"), "wlan0"),
            route("100.64.100.0/24", None, "jmp-lab1"),
        ]
    }

    #[test]
    fn announced_subnets_table() {
        let allow = |a: &[&str]| {
            RoutingPolicy::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>(), None)
                .expect("policy")
        };
        let none = allow(&[]);
        // (subnets, policy, Ok or a piece of the reason)
        let cases: Vec<(Vec<&str>, RoutingPolicy, Result<(), &str>)> = vec![
            (vec!["172.16.5.0/24"], none.clone(), Ok(())),
            (vec!["172.16.5.0/24", "172.17.0.0/16"], none.clone(), Ok(())),
            (vec!["10.0.0.0/8"], none.clone(), Err("overlaps this machine's route 10.20.0.0/16")),
            (vec!["11.0.0.0/8"], none.clone(), Ok(())),
            (vec!["0.0.0.0/0"], none.clone(), Err("the default route")),
            (vec!["0.0.0.0/1", "128.0.0.0/2"], none.clone(), Err("0.0.0.0/1, wider than a /8")),
            (vec!["128.0.0.0/1"], none.clone(), Err("wider than a /8")),
            (vec!["64.0.0.0/7"], none.clone(), Err("wider than a /8")),
            // Pieces that are each narrow but together wide.
            (vec!["11.0.0.0/8", "12.0.0.0/8"], none.clone(), Err("33554432 addresses")),
            (vec!["11.0.0.0/8", "12.0.0.0/24"], none.clone(), Err("addresses in all")),
            // The gateway's LAN, and a subnet holding the default route's gateway.
            (vec!["192.168.1.0/25"], none.clone(), Err("192.168.1.1, the gateway")),
            (vec!["192.168.0.0/16"], none.clone(), Err("192.168.1.1, the gateway")),
            (vec!["192.168.1.128/25"], none.clone(), Err("192.168.1.254, the gateway")),
            (vec!["192.168.1.200/32"], none.clone(), Err("overlaps this machine's route 192.168.1.0/24")),
            // Our own tunnel's routes are not in the way (a reconnect re-adds them).
            (vec!["100.64.100.0/24"], none.clone(), Ok(())),
            // Widened by the user, but never over the machine's routes.
            (vec!["64.0.0.0/7"], allow(&["64.0.0.0/6"]), Ok(())),
            (vec!["11.0.0.0/8", "12.0.0.0/8"], allow(&["12.0.0.0/8"]), Ok(())),
            (vec!["64.0.0.0/7"], allow(&["64.0.0.0/8"]), Err("wider than a /8")),
            (vec!["128.0.0.0/1"], allow(&["128.0.0.0/1"]), Err("192.168.1.1, the gateway")),
            (vec!["32.0.0.0/3"], allow(&["32.0.0.0/3"]), Ok(())),
            (vec!["0.0.0.0/1"], allow(&["0.0.0.0/1"]), Err("overlaps this machine's route 10.20.0.0/16")),
            (vec!["0.0.0.0/0"], allow(&["0.0.0.0/1", "128.0.0.0/1"]), Err("the default route")),
        ];
        let routes = machine();
        for (subnets, policy, want) in cases {
            let s: Vec<Subnet> = subnets.iter().map(|s| n(s)).collect();
            let got = check_subnets(&s, &policy, &routes, "jmp-lab1");
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(piece), Err(e)) if e.contains(piece) => {}
                _ => panic!("{subnets:?} with {policy:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn assigned_addresses_table() {
        let routes = machine();
        let addrs = vec![
            ("lo".to_string(), Ipv4Addr::new(127, 0, 0, 1)),
            ("wlan0".to_string(), Ipv4Addr::new(192, 168, 1, 23)),
            ("docker0".to_string(), Ipv4Addr::new(100, 64, 7, 1)),
            ("jmp-lab1".to_string(), Ipv4Addr::new(100, 64, 100, 2)),
        ];
        let subnets = vec![n("172.16.5.0/24"), n("100.65.0.0/16")];
        let def = RoutingPolicy::default();
        let other = RoutingPolicy::parse(&[], Some("10.99.0.0/24")).expect("policy");
        let a = |c: &str, g: &str| Assigned {
            client: c.parse().expect("client"),
            gateway: g.parse().expect("gateway"),
        };
        let cases: Vec<(Assigned, RoutingPolicy, Result<(), &str>)> = vec![
            (a("100.64.100.2", "100.64.100.1"), def.clone(), Ok(())),
            (a("100.64.100.9", "100.64.100.1"), def.clone(), Ok(())),
            (a("192.168.1.1", "100.64.100.1"), def.clone(), Err("outside the tunnel range")),
            (a("192.168.1.23", "100.64.100.1"), def.clone(), Err("outside the tunnel range")),
            (a("100.64.100.2", "8.8.8.8"), def.clone(), Err("end of the tunnel 8.8.8.8 is outside")),
            (a("100.64.100.1", "100.64.100.1"), def.clone(), Err("its own end")),
            (a("100.64.0.0", "100.64.100.1"), def.clone(), Err("not a host address")),
            (a("100.127.255.255", "100.64.100.1"), def.clone(), Err("not a host address")),
            (a("100.64.7.1", "100.64.7.2"), def.clone(), Err("this machine's address (on docker0)")),
            (a("100.65.3.3", "100.64.100.1"), def.clone(), Err("inside the exported subnet")),
            (a("10.99.0.2", "10.99.0.1"), def.clone(), Err("outside the tunnel range 100.64.0.0/10")),
            (a("10.99.0.2", "10.99.0.1"), other.clone(), Ok(())),
            // With a range that takes in the LAN, the LAN is still not the tunnel's.
            (a("192.168.1.23", "192.168.1.1"), RoutingPolicy::parse(&[], Some("192.168.0.0/16")).expect("p"), Err("this machine's address (on wlan0)")),
            (a("192.168.1.1", "192.168.1.2"), RoutingPolicy::parse(&[], Some("192.168.0.0/16")).expect("p"), Err("the gateway of this machine's route default")),
            (a("192.168.1.77", "192.168.1.2"), RoutingPolicy::parse(&[], Some("192.168.0.0/16")).expect("p"), Err("inside this machine's route 192.168.1.0/24")),
        ];
        for (assigned, policy, want) in cases {
            let got = check_assigned(&assigned, &policy, &subnets, &routes, &addrs, "jmp-lab1");
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(piece), Err(e)) if e.contains(piece) => {}
                _ => panic!("{assigned:?} with {policy:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn policy_options_are_checked() {
        assert!(RoutingPolicy::parse(&["0.0.0.0/0".into()], None)
            .unwrap_err()
            .contains("default route"));
        assert!(RoutingPolicy::parse(&["x".into()], None)
            .unwrap_err()
            .contains("--allow-route"));
        assert!(RoutingPolicy::parse(&[], Some("10.0.0.0/7"))
            .unwrap_err()
            .contains("--tunnel-range"));
        assert_eq!(
            RoutingPolicy::parse(&[], None).expect("default"),
            RoutingPolicy::default()
        );
    }
}
