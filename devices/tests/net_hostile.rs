//! A hostile exporter against the client's tunnel: a test double speaking the session's wire
//! (the in-memory session, the network kind's encodings) announces subnets that together take
//! the default route and assigns the client one of its own addresses. The client refuses,
//! naming why, and installs nothing. The client side runs in a namespace the test creates
//! (root, TUN and `ip` are required: without them the test fails).

use jmp_devices::net::bridge;
use jmp_devices::testing::bridge_ctx;
use jmp_devices::{Bridge, BridgeExit};
use jmp_e2e::netns::{self, Topology};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::net::{Assigned, DeviceParams, Open};
use jmp_protocol::{DeviceInfo, DeviceState, Kind};
use jmp_transport::channels::mem::{self, MemEvent};
use jmp_transport::Channels;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

const GUARD: Duration = Duration::from_secs(30);

fn info(subnets: &[&str]) -> DeviceInfo {
    DeviceInfo {
        name: "lan".into(),
        kind: Kind::Network,
        state: DeviceState::Available,
        params: to_bytes(&DeviceParams {
            subnets: subnets.iter().map(|s| s.parse().expect("subnet")).collect(),
            mtu: 1400,
        }),
        detail: String::new(),
    }
}

/// The client's side in namespace `ns`: bridges `info(subnets)` against an exporter double
/// that answers the tunnel's open with `assigned`. What `create` said or how the bridge's run
/// ended, and the namespace's routes when the bridge asked for the tunnel's fallback stream
/// (which it does once the tunnel is configured) if it did.
fn attach(
    t: &Topology,
    ns: &str,
    subnets: &'static [&'static str],
    assigned: Assigned,
) -> (String, Option<String>) {
    t.enter(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (link, mut events) = mem::pair();
            // The double ends (ending the session) once the client is set up.
            let exporter = tokio::spawn(async move {
                let mut tunnel_io = None;
                while let Some(ev) = events.recv().await {
                    let MemEvent::Incoming(inc) = ev else {
                        continue;
                    };
                    match Open::decode_exact(&inc.open.params) {
                        Ok(Open::Tunnel { .. }) => {
                            tunnel_io = inc.accept(to_bytes(&assigned));
                        }
                        Ok(Open::Fallback { .. }) => {
                            let out = std::process::Command::new("ip")
                                .args(["-4", "route"])
                                .output()
                                .expect("ip route");
                            drop(tunnel_io);
                            return Some(String::from_utf8_lossy(&out.stdout).into_owned());
                        }
                        _ => {}
                    }
                }
                None
            });
            let ctx = bridge_ctx("hostile", "hostile");
            let args = bridge::NetArgs::default();
            let mut b = match bridge::create(&info(subnets), &ctx, &args).await {
                Ok(b) => b,
                Err(e) => return (format!("create: {e}"), None),
            };
            let link: Arc<dyn Channels> = Arc::new(link);
            let exit = tokio::time::timeout(GUARD, b.run(link))
                .await
                .expect("the bridge neither refused nor ended within the guard");
            let routes = exporter.await.expect("the exporter double");
            let said = match exit {
                BridgeExit::Refused(r) => format!("refused: {}", r.reason),
                BridgeExit::LinkLost => "link lost".into(),
            };
            (said, routes)
        })
    })
}

#[test]
fn a_hostile_exporters_routes_and_address_are_refused_and_nothing_installed() {
    netns::available().expect("this test needs root and ip");
    let t = Topology::new();
    let c = t.client.clone();
    // The client's LAN (c0, 10.200.0.2/24) with a default route through it, and an address
    // in the shared space (as a CGNAT or overlay VPN gives one).
    t.sh(
        &c,
        &["ip", "route", "add", "default", "via", netns::LAB_ADDR],
    );
    t.sh(
        &c,
        &[
            "ip",
            "addr",
            "add",
            "100.64.100.7/32",
            "dev",
            netns::CLIENT_IF,
        ],
    );
    let routes_before = t.sh(&c, &["ip", "-4", "route"]);
    let addrs_before = t.sh(&c, &["ip", "-4", "-o", "addr"]);
    let own = |a: &str| Assigned {
        client: a.parse().expect("addr"),
        gateway: Ipv4Addr::new(100, 64, 100, 1),
    };

    // Two halves of the address space: each wider than a /8.
    let (said, _) = attach(&t, &c, &["0.0.0.0/1", "128.0.0.0/2"], own("10.200.0.2"));
    assert!(
        said.starts_with("create:") && said.contains("0.0.0.0/1, wider than a /8"),
        "{said}"
    );
    // A narrow piece, but it holds the default route's gateway.
    let (said, _) = attach(&t, &c, &["10.200.0.0/25"], own("10.200.0.2"));
    assert!(
        said.contains(&format!("holds {}, the gateway", netns::LAB_ADDR)),
        "{said}"
    );
    // A fair subnet, but the client's own addresses as its tunnel address.
    let (said, routes) = attach(&t, &c, &["172.30.0.0/24"], own("10.200.0.2"));
    assert!(
        said.starts_with("refused:") && said.contains("10.200.0.2 is outside the tunnel range"),
        "{said}"
    );
    assert_eq!(
        routes, None,
        "the tunnel went on after its address was refused"
    );
    let (said, _) = attach(&t, &c, &["172.30.0.0/24"], own("100.64.100.7"));
    assert!(
        said.starts_with("refused:")
            && said.contains("100.64.100.7, which is this machine's address (on c0)"),
        "{said}"
    );

    // Nothing installed: no route through a tunnel, the addresses as they were (the refused
    // bridges' TUNs closed with them).
    assert_eq!(t.sh(&c, &["ip", "-4", "route"]), routes_before);
    assert_eq!(t.sh(&c, &["ip", "-4", "-o", "addr"]), addrs_before);
    assert_eq!(t.leftovers(&c), Vec::<String>::new());

    // The checks refuse the hostile, not everything: a fair exporter gets its tunnel.
    let (said, routes) = attach(&t, &c, &["172.30.0.0/24"], own("100.64.100.2"));
    assert_eq!(said, "link lost");
    let routes = routes.expect("the fair tunnel was set up");
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("172.30.0.0/24 dev jmp") && l.contains("src 100.64.100.2")),
        "{routes}"
    );
    t.remove();
}
