//! Local endpoints belong to their owner: a user made for the test connects to each kind of
//! local port of a simulated board (a TCP forward, a UDP forward, SOCKS, socketcand) and is
//! refused; the owner is served; with `--allow-local-users` (LocalUsers::Any) the other user
//! is served too. Needs root (to make the user): without it the test fails.

use jmp_devices::can::backend::SimConfig;
use jmp_devices::can::driver::{CanDriver, Source};
use jmp_devices::can::ops::{DeviceOptions, Fronts};
use jmp_devices::common::listen::LocalUsers;
use jmp_devices::net::{bridge as net_bridge, NetDriver, NetSpec};
use jmp_devices::serve::DeviceSet;
use jmp_devices::tcp::{TcpBridge, TcpDriver};
use jmp_devices::testing::{bridge_ctx, mem_session};
use jmp_devices::udp::{UdpBridge, UdpDriver};
use jmp_devices::{Bridge, Driver, Endpoint, Local};
use jmp_e2e::echo_server;
use jmp_transport::Channels;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The client each user runs: connects to a port of one kind and prints what it got, or
/// `closed` when the port hung up without a word. Socket timeouts are hang guards only.
const CLIENT: &str = r#"
import socket, sys
kind, port = sys.argv[1], int(sys.argv[2])
def tcp():
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s
def read_all(s):
    out = b""
    while True:
        d = s.recv(4096)
        if not d:
            return out
        out += d
try:
    if kind == "tcp":
        s = tcp(); s.sendall(b"ping"); s.shutdown(socket.SHUT_WR)
        got = read_all(s)
        print(got.decode() if got else "closed")
    elif kind == "socks":
        s = tcp(); s.sendall(bytes([5, 1, 0]))
        got = s.recv(2)
        if not got:
            print("closed")
        else:
            # CONNECT to the echo server through the proxy.
            echo = int(sys.argv[3])
            s.sendall(bytes([5, 1, 0, 1, 127, 0, 0, 1]) + echo.to_bytes(2, "big"))
            rep = s.recv(10)
            s.sendall(b"ping"); s.shutdown(socket.SHUT_WR)
            print("reply %d %s" % (rep[1], read_all(s).decode()))
    elif kind == "socketcand":
        s = tcp()
        got = s.recv(64)
        print(got.decode() if got else "closed")
    elif kind == "udp-once":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"ping", ("127.0.0.1", port))
        print("sent")
    elif kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        # Datagrams may be lost on the way (in memory as over QUIC): resend until answered.
        for _ in range(60):
            s.sendto(b"ping", ("127.0.0.1", port))
            try:
                print(s.recv(100).decode()); break
            except socket.timeout:
                pass
        else:
            print("no answer")
except socket.timeout:
    print("timeout")
except OSError:
    # Reset, or hung up before the client's own shutdown.
    print("closed")
"#;

/// A user of this machine made for the test, removed when dropped (even when the test fails).
struct TestUser {
    name: String,
    uid: u32,
}

impl TestUser {
    fn new() -> TestUser {
        let name = format!("jmpu{}", std::process::id());
        let st = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(&name)
            .status()
            .expect("useradd (this test needs root)");
        assert!(st.success(), "useradd {name}: {st}");
        let mut u = TestUser { name, uid: 0 };
        let out = Command::new("id")
            .args(["-u", &u.name])
            .output()
            .expect("id");
        u.uid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("uid");
        u
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// Runs the client as `user` (None: as the owner, who runs the test); what it printed.
async fn client(user: Option<&TestUser>, args: &[String]) -> String {
    let mut c = match user {
        Some(u) => {
            let mut c = tokio::process::Command::new("setpriv");
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.uid))
                .arg("--clear-groups")
                .arg("/usr/bin/python3");
            c
        }
        None => tokio::process::Command::new("/usr/bin/python3"),
    };
    c.arg("-c").arg(CLIENT).args(args).current_dir("/");
    let out = tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("the client hung")
        .expect("run the client");
    assert!(
        out.status.success(),
        "client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Ports {
    tcp: u16,
    udp: u16,
    socks: u16,
    socketcand: u16,
    echo: u16,
}

/// The simulated board's devices bridged with `users`; the UDP bridge's refusals counted.
async fn board(
    users: LocalUsers,
    tag: &str,
) -> (
    Ports,
    Vec<tokio::task::JoinHandle<()>>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<u64>,
) {
    let echo = echo_server();
    let udp_echo = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    let udp_port = udp_echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = udp_echo.recv_from(&mut buf).await {
            let _ = udp_echo.send_to(&buf[..n], from).await;
        }
    });
    let spec = NetSpec {
        subnets: vec!["127.0.0.0/8".into()],
        via: "lo".into(),
        tunnel: None,
        mtu: None,
        // The "board" is the lab host's own loopback here.
        host_access: vec!["127.0.0.1".into()],
    };
    let drivers: Vec<Arc<dyn Driver>> = vec![
        Arc::new(TcpDriver::new(
            "tcp".into(),
            "127.0.0.1".into(),
            echo.port(),
        )),
        Arc::new(UdpDriver::new("udp".into(), "127.0.0.1".into(), udp_port)),
        Arc::new(NetDriver::without_tunnel(
            "lan",
            spec.plan().expect("plan"),
            "not in this test",
        )),
        Arc::new(CanDriver::start(
            "ecu",
            Source::Sim(SimConfig {
                bitrate: 500_000,
                period: None,
                counter_id: 0x100,
                request_id: 0x7e0,
                response_id: 0x7e8,
                load: 0,
                board: jmp_devices::board::Board::new(),
            }),
        )),
    ];
    let infos: Vec<_> = drivers
        .iter()
        .map(|d| jmp_devices::info(d.as_ref()))
        .collect();
    let (link, _server) = mem_session(DeviceSet::new("e", drivers));
    let link: Arc<dyn Channels> = link;
    let mut ctx = bridge_ctx("e", &format!("users-{tag}"));
    ctx.local_users = users.clone();
    let any = "127.0.0.1:0".parse::<SocketAddr>().expect("addr");
    let tcp = TcpBridge::bind("tcp".into(), any)
        .await
        .expect("tcp")
        .with_local_users(users.clone());
    let udp = UdpBridge::bind("udp".into(), any)
        .await
        .expect("udp")
        .with_local_users(users.clone());
    let socks = net_bridge::create(
        &infos[2],
        &ctx,
        &net_bridge::NetArgs {
            socks: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .await
    .expect("socks");
    let can = jmp_devices::can::CanBridge::create(
        &infos[3],
        &ctx,
        DeviceOptions {
            fronts: Some(Fronts {
                vcan: false,
                slcan: false,
                socketcand: true,
            }),
            ..DeviceOptions::default()
        },
    )
    .await
    .expect("can");
    let addr_of = |eps: Vec<Endpoint>| match eps.as_slice() {
        [Endpoint {
            local: Local::Address(a),
            ..
        }] => a.port(),
        other => panic!("endpoints {other:?}"),
    };
    let ports = Ports {
        tcp: tcp.local_addr().port(),
        udp: udp.local_addr().port(),
        socks: addr_of(socks.endpoints()),
        socketcand: addr_of(can.endpoints()),
        echo: echo.port(),
    };
    let mut tasks = Vec::new();
    for mut b in [
        Box::new(tcp) as Box<dyn Bridge>,
        Box::new(socks),
        Box::new(can),
    ] {
        let link = link.clone();
        tasks.push(tokio::spawn(async move {
            let _ = b.run(link).await;
        }));
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let udp_task = {
        let mut udp = udp;
        tokio::spawn(async move {
            tokio::select! {
                _ = udp.run(link) => {}
                _ = stopped => {}
            }
            udp.refused_datagrams()
        })
    };
    (ports, tasks, stop, udp_task)
}

fn a(kind: &str, port: u16) -> Vec<String> {
    vec![kind.to_string(), port.to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_local_user_is_refused_on_every_kind_of_port_unless_shared() {
    let other = TestUser::new();
    let me = LocalUsers::new(None, false);

    let (p, tasks, stop, udp) = board(me, "owner").await;
    let socks = vec!["socks".into(), p.socks.to_string(), p.echo.to_string()];
    // Another user: each port hangs up on it without a word.
    assert_eq!(client(Some(&other), &a("tcp", p.tcp)).await, "closed");
    assert_eq!(client(Some(&other), &socks).await, "closed");
    assert_eq!(
        client(Some(&other), &a("socketcand", p.socketcand)).await,
        "closed"
    );
    assert_eq!(client(Some(&other), &a("udp-once", p.udp)).await, "sent");
    // The owner: served on each (the UDP answer also shows the other user's datagram, sent
    // before, has been dealt with).
    assert_eq!(client(None, &a("tcp", p.tcp)).await, "ping");
    assert_eq!(client(None, &socks).await, "reply 0 ping");
    assert_eq!(client(None, &a("socketcand", p.socketcand)).await, "< hi >");
    assert_eq!(client(None, &a("udp", p.udp)).await, "ping");
    let _ = stop.send(());
    assert_eq!(
        udp.await.expect("udp bridge"),
        1,
        "the other user's datagram"
    );
    tasks.iter().for_each(|t| t.abort());

    // Shared: the other user is served too.
    let (p, tasks, stop, udp) = board(LocalUsers::Any, "any").await;
    let socks = vec!["socks".into(), p.socks.to_string(), p.echo.to_string()];
    assert_eq!(client(Some(&other), &a("tcp", p.tcp)).await, "ping");
    assert_eq!(client(Some(&other), &socks).await, "reply 0 ping");
    assert_eq!(
        client(Some(&other), &a("socketcand", p.socketcand)).await,
        "< hi >"
    );
    assert_eq!(client(Some(&other), &a("udp", p.udp)).await, "ping");
    let _ = stop.send(());
    assert_eq!(udp.await.expect("udp bridge"), 0);
    tasks.iter().for_each(|t| t.abort());
}
