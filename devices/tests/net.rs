//! Network devices over an in-memory session: the SOCKS5 bridge against a driver without a
//! tunnel (no TUN: nothing on this machine changes), with the board's service on loopback and
//! 127.0.0.0/8 as the exported subnet. The tunnel itself needs namespaces: tests/tests/net.rs.

use jmp_devices::net::{bridge, NetDriver, NetSpec};
use jmp_devices::serve::DeviceSet;
use jmp_devices::testing::{bridge_ctx, mem_session};
use jmp_devices::{Bridge, Driver, Endpoint, Local};
use jmp_e2e::echo_server;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GUARD: Duration = Duration::from_secs(30);

async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress in {GUARD:?}"))
}

/// A SOCKS5 request for `target` (ATYP and address bytes, then the port); the reply code.
async fn socks(proxy: SocketAddr, cmd: u8, atyp_addr: &[u8], port: u16) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.expect("method");
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, cmd, 0];
    req.extend_from_slice(atyp_addr);
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.expect("request");
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.expect("reply");
    assert_eq!(rep[0], 5);
    (rep[1], s)
}

fn name(n: &str) -> Vec<u8> {
    let mut v = vec![3, n.len() as u8];
    v.extend_from_slice(n.as_bytes());
    v
}

#[tokio::test]
async fn socks_connects_by_name_on_the_exporter_and_answers_refusals_with_their_codes() {
    let echo = echo_server();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    };
    let spec = NetSpec {
        subnets: vec!["127.0.0.0/8".into()],
        via: "lo".into(),
        tunnel: None,
        mtu: None,
    };
    let driver: Arc<dyn Driver> = Arc::new(NetDriver::without_tunnel(
        "lan",
        spec.plan().expect("plan"),
        "not in this test",
    ));
    let info = jmp_devices::info(driver.as_ref());
    let (link, _task) = mem_session(DeviceSet::new("e", vec![driver]));
    let ctx = bridge_ctx("e", "net-socks");
    let args = bridge::NetArgs {
        socks: Some("127.0.0.1:0".into()),
    };
    let mut b = bridge::create(&info, &ctx, &args).await.expect("bridge");
    let proxy = match b.endpoints().as_slice() {
        [Endpoint {
            local: Local::Address(a),
            ..
        }] => *a,
        other => panic!("endpoints {other:?}"),
    };
    let link2 = link.clone();
    tokio::spawn(async move { b.run(link2).await });

    // By name: resolved by the exporter ("localhost" is 127.0.0.1, inside the subnet).
    let (code, mut s) = guard(
        "connect by name",
        socks(proxy, 1, &name("localhost"), echo.port()),
    )
    .await;
    assert_eq!(code, 0);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.write_all(&data).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    guard("echo", s.read_to_end(&mut got)).await.expect("read");
    assert!(
        got == data,
        "echoed bytes differ ({} of {})",
        got.len(),
        data.len()
    );

    // An address outside the subnets: refused before anything is opened.
    let (code, _) = guard("outside", socks(proxy, 1, &[1, 10, 1, 2, 3], 80)).await;
    assert_eq!(code, 0x02);
    // Inside, but nothing listens: the exporter's "connection refused".
    let (code, _) = guard("closed", socks(proxy, 1, &[1, 127, 0, 0, 1], closed)).await;
    assert_eq!(code, 0x05);
    // A name that does not resolve.
    let (code, _) = guard(
        "no such name",
        socks(proxy, 1, &name("no-such-host.invalid"), 80),
    )
    .await;
    assert_eq!(code, 0x04);
    // BIND is not served.
    let (code, _) = guard("bind", socks(proxy, 2, &[1, 127, 0, 0, 1], 80)).await;
    assert_eq!(code, 0x07);
    // IPv6 is outside every subnet.
    let mut v6 = vec![4];
    v6.extend_from_slice(&[0u8; 15]);
    v6.push(1);
    let (code, _) = guard("ipv6", socks(proxy, 1, &v6, 80)).await;
    assert_eq!(code, 0x02);
}
