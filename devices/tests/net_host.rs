//! The tunnel and SOCKS reach the subnets and nothing else: the lab host's own addresses are
//! unreachable even inside the exported subnet. In namespaces the test creates
//! (jmp_e2e::netns::Topology): the lab host has 192.168.10.1 inside the exported
//! 192.168.10.0/24 and listens there, on 0.0.0.0 and on loopback; the board (192.168.10.2) is
//! reachable. The exporter's driver runs in the lab namespace, the client's bridge in the
//! client's, joined by an in-memory session. Needs root, TUN and nft: without them it fails.

use jmp_devices::net::{bridge, NetDriver, NetSpec};
use jmp_devices::serve::DeviceSet;
use jmp_devices::testing::bridge_ctx;
use jmp_devices::{Bridge, Driver};
use jmp_e2e::netns::{self, Topology};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::net::Open;
use jmp_transport::channels::mem::{self, MemChannels, MemEvent};
use jmp_transport::Channels;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// How long a connect waits for an answer that must not come. Not a measure of speed: a
/// SYN-ACK or a reset across two namespaces comes back in microseconds.
const SILENCE: Duration = Duration::from_secs(2);

/// What a TCP connect from the calling thread's namespace got.
fn connect(to: SocketAddr) -> String {
    match TcpStream::connect_timeout(&to, SILENCE) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(30))).ok();
            let _ = s.write_all(b"ping");
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut got = String::new();
            let _ = s.read_to_string(&mut got);
            format!("connected: {got}")
        }
        Err(e) if e.kind() == ErrorKind::TimedOut => "no answer".into(),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => "reset".into(),
        Err(e) => format!("error: {e}"),
    }
}

fn echo_in(t: &Topology, ns: &str, addr: &'static str) -> SocketAddr {
    let l = t.enter(ns, move || TcpListener::bind(addr).expect("bind"));
    let a = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                let _ = s.write_all(&buf);
            });
        }
    });
    a
}

#[test]
fn the_lab_hosts_own_addresses_are_unreachable_through_the_tunnel_and_socks() {
    netns::available().expect("this test needs root and ip");
    let t = Topology::new();
    let (lab, client) = (t.lab.clone(), t.client.clone());
    let board = echo_in(&t, &t.board.clone(), "192.168.10.2:0");
    // The lab host's services: on its address inside the subnet, on every address, and on
    // loopback only (which a reset would betray).
    let host_addr = t.enter(&lab, || TcpListener::bind("192.168.10.1:0").expect("bind"));
    let host_any = t.enter(&lab, || TcpListener::bind("0.0.0.0:0").expect("bind"));
    let host_lo = t.enter(&lab, || TcpListener::bind("127.0.0.1:0").expect("bind"));
    for l in [&host_addr, &host_any, &host_lo] {
        l.set_nonblocking(true).expect("nonblocking");
    }
    let lab_ip = "192.168.10.1".parse().expect("ip");
    let on_lab = |l: &TcpListener| SocketAddr::new(lab_ip, l.local_addr().expect("a").port());

    // The exporter, in the lab namespace, until `stop` is dropped.
    let (link_tx, link_rx) = mpsc::channel::<(MemChannels, jmp_protocol::DeviceInfo)>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let lab_ns = lab.clone();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let client_ready = ready_tx.clone();
    let exporter = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{lab_ns}")).expect("netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let spec = NetSpec {
                subnets: vec![netns::BOARD_SUBNET.into()],
                via: netns::LAB_LAN_IF.into(),
                tunnel: None,
                mtu: None,
                host_access: Vec::new(),
            };
            let driver: Arc<dyn Driver> = Arc::new(NetDriver::start(
                "lan",
                "hx",
                Ok(spec.plan().expect("plan")),
            ));
            let devices = DeviceSet::new("hx", vec![driver]);
            let info = devices.infos().remove(0);
            let (client, mut events) = mem::pair();
            link_tx.send((client, info)).expect("hand over the link");
            let serve = async move {
                while let Some(ev) = events.recv().await {
                    match ev {
                        MemEvent::Incoming(inc) => {
                            // The client opens the fallback stream once its tunnel is set up.
                            if matches!(
                                Open::decode_exact(&inc.open.params),
                                Ok(Open::Fallback { .. })
                            ) {
                                let _ = ready_tx.send(Ok(()));
                            }
                            devices.serve_incoming(inc)
                        }
                        MemEvent::Request(r) => devices.serve_request(r),
                        MemEvent::Closed { .. } => {}
                    }
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = stopped => {}
            }
        });
    });
    let (link, info) = link_rx.recv().expect("the exporter started");
    assert!(
        info.state == jmp_protocol::DeviceState::Available && !info.detail.contains("SOCKS only"),
        "the exporter's tunnel: {info:?}"
    );
    let link: Arc<dyn Channels> = Arc::new(link);

    // The client's tunnel, in the client namespace.
    let (client_stop, client_stopped) = tokio::sync::oneshot::channel::<()>();
    let client_ns = client.clone();
    let client_link = link.clone();
    let client_thread = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{client_ns}")).expect("netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let ctx = bridge_ctx("hx", "host-access");
            let mut b = match bridge::create(&info, &ctx, &bridge::NetArgs::default()).await {
                Ok(b) => b,
                Err(e) => {
                    let _ = client_ready.send(Err(format!("bridge: {e} ({info:?})")));
                    return;
                }
            };
            tokio::select! {
                exit = b.run(client_link) => {
                    let _ = client_ready.send(Err(format!("the bridge ended: {exit:?}")));
                }
                _ = client_stopped => {}
            }
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the client's tunnel came up in time")
        .expect("the client's tunnel came up");

    // Through the tunnel: the board answers; the lab host is silent on each of its ports.
    let targets = [
        ("board", board),
        ("lab host's address", on_lab(&host_addr)),
        ("lab host's 0.0.0.0 listener", on_lab(&host_any)),
        ("lab host's loopback-only port", on_lab(&host_lo)),
    ];
    let got: Vec<(&str, String)> = t.enter(&client, move || {
        targets
            .iter()
            .map(|(what, a)| (*what, connect(*a)))
            .collect()
    });
    assert_eq!(
        got,
        vec![
            ("board", "connected: ping".to_string()),
            ("lab host's address", "no answer".to_string()),
            ("lab host's 0.0.0.0 listener", "no answer".to_string()),
            ("lab host's loopback-only port", "no answer".to_string()),
        ]
    );
    for l in [&host_addr, &host_any, &host_lo] {
        assert_eq!(
            l.accept().map(|_| ()).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock),
            "the lab host accepted a connection from the tunnel"
        );
    }
    let table = t.sh(&lab, &["nft", "list", "chain", "inet", "jmpd-hx", "input"]);
    assert!(table.contains("drop"), "{table}");

    // Through SOCKS (the exporter's CONNECT): the board yes, the lab host's addresses no.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let socks = |host: String, port: u16| {
        let link = link.clone();
        rt.block_on(async move {
            match link
                .open_stream("lan", to_bytes(&Open::Connect { host, port }))
                .await
            {
                Ok(_) => "connected".to_string(),
                Err(r) => r.reason,
            }
        })
    };
    assert_eq!(socks(board.ip().to_string(), board.port()), "connected");
    for (host, port) in [
        (
            "192.168.10.1".to_string(),
            host_addr.local_addr().expect("a").port(),
        ),
        (
            "192.168.10.1".to_string(),
            host_any.local_addr().expect("a").port(),
        ),
        (
            "192.168.10.1".to_string(),
            host_lo.local_addr().expect("a").port(),
        ),
    ] {
        let said = socks(host.clone(), port);
        assert!(
            said.contains("is an address of the lab host itself"),
            "{host}:{port}: {said}"
        );
    }

    drop(client_stop);
    client_thread.join().expect("client thread");
    drop(stop);
    exporter.join().expect("exporter thread");
    t.remove();
}
