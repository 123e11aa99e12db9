//! TCP forwards: the driver over an in-memory pipe (echo, half-close, refused target), the
//! bridge and the driver over an in-memory session, then on both ends of a real QUIC link (many
//! concurrent connections, a refused target, an unknown device, a lost link and the next one).

use bytes::Bytes;
use jmp_devices::serve::DeviceSet;
use jmp_devices::tcp::{TcpBridge, TcpDriver};
use jmp_devices::{Bridge, BridgeExit, Driver, Local};
use jmp_e2e::echo_server;
use jmp_protocol::*;
use jmp_transport::*;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Guards against hangs only; nothing here is expected to come near it.
const GUARD: Duration = Duration::from_secs(30);

async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress in {GUARD:?}"))
}

/// A server that reads until EOF, then answers "got N bytes" and closes: works only if the
/// client's half-close reaches it and its reply still reaches the client.
async fn count_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind count");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if sock.read_to_end(&mut all).await.is_ok() {
                    let reply = format!("got {} bytes", all.len());
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.shutdown().await;
                }
            });
        }
    });
    addr
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn open(device: &str, mode: ChannelMode) -> Open {
    Open {
        channel: 1,
        device: device.into(),
        mode,
        params: Bytes::new(),
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|x| (x.wrapping_mul(31) ^ (x >> 9) ^ seed.wrapping_mul(0x9e37_79b9)) as u8)
        .collect()
}

/// Sends `data` on the pipe in uneven chunks, finishes, and collects what comes back until
/// the end of stream.
async fn pipe_roundtrip(pipe: Pipe, data: Vec<u8>) -> Vec<u8> {
    let (mut tx, mut rx) = pipe.split();
    let writer = tokio::spawn(async move {
        for c in data.chunks(10_007) {
            tx.send(Bytes::copy_from_slice(c)).await.expect("send");
        }
        tx.finish().expect("finish");
    });
    let mut got = Vec::new();
    while let Some(b) = rx.recv().await.expect("recv") {
        got.extend_from_slice(&b);
    }
    writer.await.expect("writer");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_echoes_a_mebibyte_byte_exact() {
    let target = echo_server();
    let driver = TcpDriver::new("echo".into(), "127.0.0.1".into(), target.port());
    let info = jmp_devices::info(&driver);
    assert_eq!(info.name, "echo");
    assert_eq!(info.kind, Kind::Tcp);
    assert_eq!(info.detail, format!("127.0.0.1:{}", target.port()));
    let params =
        jmp_protocol::kinds::tcp::DeviceParams::decode_exact(&info.params).expect("params");
    assert_eq!(
        (params.host.as_str(), params.port),
        ("127.0.0.1", target.port())
    );

    let ch = driver
        .open(&open("echo", ChannelMode::Stream))
        .await
        .expect("open");
    assert!(ch.params().is_empty());
    let (a, b) = pipe::pair(16);
    let serving = tokio::spawn(ch.serve(ChannelIo::Stream(a)));
    let data = pattern(1 << 20, 1);
    let got = guard("echo", pipe_roundtrip(b, data.clone())).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the echo differs from what was sent");
    guard("serve ends", serving).await.expect("serve task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_keeps_half_close_both_ways() {
    let target = count_server().await;
    let driver = TcpDriver::new("count".into(), "127.0.0.1".into(), target.port());
    let ch = driver
        .open(&open("count", ChannelMode::Stream))
        .await
        .expect("open");
    let (a, b) = pipe::pair(16);
    let serving = tokio::spawn(ch.serve(ChannelIo::Stream(a)));
    let got = guard(
        "reply after half-close",
        pipe_roundtrip(b, pattern(5000, 2)),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&got), "got 5000 bytes");
    guard("serve ends", serving).await.expect("serve task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_refuses_unreachable_targets_and_datagrams_with_reasons() {
    let dead = dead_addr();
    let driver = TcpDriver::new("ssh".into(), "127.0.0.1".into(), dead.port());
    let r = match driver.open(&open("ssh", ChannelMode::Stream)).await {
        Err(r) => r,
        Ok(_) => panic!("connected to a closed port"),
    };
    assert_eq!(r.code, ErrorCode::ConnectFailed);
    assert!(r.reason.contains(&dead.to_string()), "{}", r.reason);
    assert!(r.reason.starts_with("connect to "), "{}", r.reason);

    let r = jmp_devices::check_mode(&driver, ChannelMode::Datagram)
        .expect_err("a tcp device serves no datagram channels");
    assert_eq!(r.code, ErrorCode::Unsupported);
    assert!(r.reason.contains("datagram"), "{}", r.reason);
}

/// An exporter serving the given drivers through the real Link, the way jmpd does (the same
/// dispatch: open the device first, accept the stream only on success, else reject with the
/// driver's reason).
async fn exporter(drivers: Vec<TcpDriver>) -> (SocketAddr, Fingerprint) {
    exporter_stalling(drivers, None).await
}

/// An exporter with one TCP device, `name`, forwarding to 127.0.0.1:`port`.
async fn exporter_to(name: &str, port: u16) -> (SocketAddr, Fingerprint) {
    exporter(vec![TcpDriver::new(name.into(), "127.0.0.1".into(), port)]).await
}

/// A bridge for device `name` on a free local port.
async fn bind_bridge(name: &str) -> TcpBridge {
    TcpBridge::bind(name.into(), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind bridge")
}

/// Like [`exporter`], but if `stall` is given the first channel request is never answered
/// (it is held and `stall` notified), as if the link died while it was on its way.
async fn exporter_stalling(
    drivers: Vec<TcpDriver>,
    stall: Option<Arc<tokio::sync::Notify>>,
) -> (SocketAddr, Fingerprint) {
    let stall = Arc::new(std::sync::Mutex::new(stall));
    let devices = DeviceSet::new(
        "test",
        drivers
            .into_iter()
            .map(|d| Arc::new(d) as Arc<dyn Driver>)
            .collect(),
    );
    let id = Identity::generate().expect("identity");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    let endpoint = server_endpoint(sock, &id, ALPN_EXPORTER).expect("endpoint");
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let devices = devices.clone();
            let stall = stall.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                let Ok(conn) = incoming.await else { return };
                let Ok(mut link) = Link::exporter(conn).await else {
                    return;
                };
                while let Some(ev) = link.events.recv().await {
                    match ev {
                        LinkEvent::Hello(_) => link.handle.welcome(Welcome {
                            exporter: "test".into(),
                            features: features::ALL,
                            instance: 1,
                            devices: devices.infos(),
                        }),
                        LinkEvent::Incoming(inc) => {
                            let stalled = stall.lock().expect("lock").take();
                            if let Some(notify) = stalled {
                                held.push(inc);
                                notify.notify_one();
                                continue;
                            }
                            devices.serve_incoming(inc);
                        }
                        LinkEvent::Ended { .. } => break,
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, id.fingerprint())
}

/// A client link to the exporter; the endpoint is returned so it outlives the test's use.
async fn client(addr: SocketAddr, fp: Fingerprint) -> (Link, impl Sized) {
    let ep = client_endpoint(addr).expect("client endpoint");
    let (conn, _) = connect(&ep, addr, ALPN_EXPORTER, Some(fp))
        .await
        .expect("connect");
    let hello = Hello {
        features: features::ALL,
        client: "test".into(),
        session: 1,
        token: "any".into(),
    };
    let (link, _) = Link::client(conn, hello).await.expect("welcome");
    (link, ep)
}

/// Runs the bridge on `link` in its own task, handing the bridge back with how the run ended.
fn run_bridge(
    mut bridge: TcpBridge,
    link: impl Channels,
) -> tokio::task::JoinHandle<(TcpBridge, BridgeExit)> {
    let link: Arc<dyn Channels> = Arc::new(link);
    tokio::spawn(async move {
        let exit = bridge.run(link).await;
        (bridge, exit)
    })
}

/// One local client: sends `data`, half-closes, and returns everything read until EOF.
async fn local_roundtrip(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let sock = TcpStream::connect(addr)
        .await
        .expect("connect to the bridge");
    let (mut rd, mut wr) = sock.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.expect("write");
        wr.shutdown().await.expect("shutdown");
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.expect("read");
    writer.await.expect("writer");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_to_driver_over_an_in_memory_session() {
    let target = echo_server();
    let driver: Arc<dyn Driver> = Arc::new(TcpDriver::new(
        "echo".into(),
        "127.0.0.1".into(),
        target.port(),
    ));
    let (link, _server) = jmp_devices::testing::mem_session(DeviceSet::new("mem", vec![driver]));
    let bridge = bind_bridge("echo").await;
    let local = bridge.local_addr();
    let link: Arc<dyn Channels> = link;
    let running = {
        let mut bridge = bridge;
        let link = link.clone();
        tokio::spawn(async move {
            let exit = bridge.run(link).await;
            (bridge, exit)
        })
    };
    for i in 0..5u32 {
        let data = pattern(300 * 1024, 50 + i);
        let got = guard("echo over memory", local_roundtrip(local, data.clone())).await;
        assert!(got == data, "connection {i} differs");
    }
    // A half-closing protocol too.
    let counted = count_server().await;
    let d2: Arc<dyn Driver> = Arc::new(TcpDriver::new(
        "count".into(),
        "127.0.0.1".into(),
        counted.port(),
    ));
    let (link2, _s2) = jmp_devices::testing::mem_session(DeviceSet::new("mem", vec![d2]));
    let b2 = bind_bridge("count").await;
    let l2 = b2.local_addr();
    let r2 = {
        let mut b2 = b2;
        tokio::spawn(async move { b2.run(link2).await })
    };
    let got = guard("half-close", local_roundtrip(l2, pattern(7777, 3))).await;
    assert_eq!(String::from_utf8_lossy(&got), "got 7777 bytes");
    running.abort();
    r2.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_to_driver_over_quic_carries_many_connections_with_half_close() {
    let target = echo_server();
    let (addr, fp) = exporter_to("echo", target.port()).await;
    let (link, _ep) = client(addr, fp).await;
    let bridge = bind_bridge("echo").await;
    let local = bridge.local_addr();
    assert_eq!(bridge.kind(), Kind::Tcp);
    assert_eq!(bridge.device(), "echo");
    assert_eq!(
        bridge.endpoints().first().map(|e| e.local.clone()),
        Some(Local::Address(local))
    );
    let running = run_bridge(bridge, link.handle.clone());

    let clients: Vec<_> = (0..20u32)
        .map(|i| {
            tokio::spawn(async move {
                let data = pattern(200 * 1024, 100 + i);
                let got = local_roundtrip(local, data.clone()).await;
                assert_eq!(got.len(), data.len(), "client {i}");
                assert!(got == data, "client {i} got someone else's bytes");
            })
        })
        .collect();
    for c in clients {
        guard("local clients", c).await.expect("client task");
    }
    assert!(
        !running.is_finished(),
        "the bridge stopped while the link is up"
    );
    link.handle.bye(ErrorCode::Ok, "done");
    let (_, exit) = guard("bridge notices the end", running)
        .await
        .expect("bridge task");
    assert_eq!(exit, BridgeExit::LinkLost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_closes_the_local_connection_when_the_target_refuses() {
    let dead = dead_addr();
    let (addr, fp) = exporter_to("ssh", dead.port()).await;
    let (link, _ep) = client(addr, fp).await;
    let bridge = bind_bridge("ssh").await;
    let local = bridge.local_addr();
    let running = run_bridge(bridge, link.handle.clone());

    for _ in 0..2 {
        let mut sock = TcpStream::connect(local).await.expect("connect");
        let mut buf = [0u8; 16];
        match guard("local close", sock.read(&mut buf)).await {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("read {n} bytes from a refused forward"),
        }
    }
    // A refused target is no reason to give up the device: the next connection may succeed.
    assert!(!running.is_finished());
    link.handle.bye(ErrorCode::Ok, "done");
    let (_, exit) = guard("bridge ends", running).await.expect("bridge task");
    assert_eq!(exit, BridgeExit::LinkLost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_gives_up_a_device_the_exporter_does_not_have() {
    let (addr, fp) = exporter(vec![]).await;
    let (link, _ep) = client(addr, fp).await;
    let bridge = bind_bridge("nope").await;
    let local = bridge.local_addr();
    let running = run_bridge(bridge, link.handle.clone());
    let mut sock = TcpStream::connect(local).await.expect("connect");
    let mut buf = [0u8; 16];
    assert!(matches!(
        guard("local close", sock.read(&mut buf)).await,
        Ok(0) | Err(_)
    ));
    let (_, exit) = guard("bridge ends", running).await.expect("bridge task");
    match exit {
        BridgeExit::Refused(r) => {
            assert_eq!(r.code, ErrorCode::NoSuchDevice);
            assert!(r.reason.contains("nope"), "{}", r.reason);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_made_during_an_outage_are_served_on_the_next_link() {
    let target = echo_server();
    let (addr, fp) = exporter_to("echo", target.port()).await;
    let bridge = bind_bridge("echo").await;
    let local = bridge.local_addr();

    let (first, _ep1) = client(addr, fp).await;
    let running = run_bridge(bridge, first.handle.clone());
    let got = guard("first link", local_roundtrip(local, b"before".to_vec())).await;
    assert_eq!(got, b"before");
    first.handle.bye(ErrorCode::Ok, "network went away");
    let (bridge, exit) = guard("link loss", running).await.expect("bridge task");
    assert_eq!(exit, BridgeExit::LinkLost);

    // No link now: the connection waits in the listen backlog.
    let waiting = tokio::spawn(local_roundtrip(local, b"during the outage".to_vec()));

    let (second, _ep2) = client(addr, fp).await;
    let running = run_bridge(bridge, second.handle.clone());
    let got = guard("served on the next link", waiting)
        .await
        .expect("client task");
    assert_eq!(got, b"during the outage");
    second.handle.bye(ErrorCode::Ok, "done");
    let (_, exit) = guard("bridge ends", running).await.expect("bridge task");
    assert_eq!(exit, BridgeExit::LinkLost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_open_was_cut_off_is_served_on_the_next_link() {
    let target = echo_server();
    let stalled = Arc::new(tokio::sync::Notify::new());
    let (addr, fp) = exporter_stalling(
        vec![TcpDriver::new(
            "echo".into(),
            "127.0.0.1".into(),
            target.port(),
        )],
        Some(stalled.clone()),
    )
    .await;
    let bridge = bind_bridge("echo").await;
    let local = bridge.local_addr();

    let (first, _ep1) = client(addr, fp).await;
    let running = run_bridge(bridge, first.handle.clone());
    let waiting = tokio::spawn(local_roundtrip(local, pattern(100_000, 7)));
    guard("the open reaches the exporter", stalled.notified()).await;
    first.handle.bye(ErrorCode::Ok, "network went away");
    let (bridge, exit) = guard("link loss", running).await.expect("bridge task");
    assert_eq!(exit, BridgeExit::LinkLost);

    let (second, _ep2) = client(addr, fp).await;
    let running = run_bridge(bridge, second.handle.clone());
    let got = guard("served on the next link", waiting)
        .await
        .expect("client task");
    assert!(
        got == pattern(100_000, 7),
        "the kept connection was not carried intact"
    );
    second.handle.bye(ErrorCode::Ok, "done");
    let (_, exit) = guard("bridge ends", running).await.expect("bridge task");
    assert_eq!(exit, BridgeExit::LinkLost);
}
