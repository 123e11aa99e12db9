//! UDP forwards over an in-memory session: flows per source address, each echoed back exactly
//! to its own sender, and a datagram too large for the link dropped and counted, not cut.

use jmp_devices::serve::DeviceSet;
use jmp_devices::testing::mem_session;
use jmp_devices::udp::{UdpBridge, UdpDriver};
use jmp_devices::{Bridge, Driver};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;

const GUARD: Duration = Duration::from_secs(30);

#[tokio::test]
async fn flows_echo_exactly_to_their_own_sender_and_oversize_is_counted() {
    let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let driver: Arc<dyn Driver> = Arc::new(UdpDriver::new(
        "echo".into(),
        "127.0.0.1".into(),
        echo_addr.port(),
    ));
    let (link, _task) = mem_session(DeviceSet::new("e", vec![driver]));
    let mut b = UdpBridge::bind("echo".into(), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind bridge");
    let local = b.local_addr();
    let link2 = link.clone();
    let dropped = {
        // The bridge runs in its own task; its counter is read after the test's datagrams.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(async move {
            tokio::select! {
                _ = b.run(link2) => {}
                _ = rx => {}
            }
            b.dropped_too_large()
        });
        let clients = [
            UdpSocket::bind("127.0.0.1:0").await.expect("client a"),
            UdpSocket::bind("127.0.0.1:0").await.expect("client b"),
        ];
        for round in 0..20u32 {
            for (i, c) in clients.iter().enumerate() {
                let msg: Vec<u8> = (0..(100 + round * 50 + i as u32))
                    .map(|k| (k as u8) ^ (i as u8 * 31) ^ round as u8)
                    .collect();
                // In memory, as over QUIC, a datagram may be dropped: resend until the echo
                // comes (hang guard only).
                let got = tokio::time::timeout(GUARD, async {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        c.send_to(&msg, local).await.expect("send");
                        match tokio::time::timeout(Duration::from_millis(500), c.recv(&mut buf))
                            .await
                        {
                            Ok(Ok(n)) => break buf[..n].to_vec(),
                            _ => continue,
                        }
                    }
                })
                .await
                .expect("echo within the guard");
                assert!(
                    got == msg,
                    "client {i} round {round}: got another datagram back"
                );
            }
        }
        clients[0]
            .send_to(&vec![0u8; 1500], local)
            .await
            .expect("send oversize");
        // A small datagram after it still echoes: the flow survived the drop.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(GUARD, async {
            loop {
                clients[0].send_to(b"after", local).await.expect("send");
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(500), clients[0].recv(&mut buf))
                        .await
                {
                    break n;
                }
            }
        })
        .await
        .expect("echo after the oversize datagram");
        assert_eq!(&buf[..n], b"after");
        let _ = tx.send(());
        h.await.expect("bridge task")
    };
    assert_eq!(dropped, 1, "the 1500-byte datagram is dropped and counted");
}
